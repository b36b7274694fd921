"""Block sparsity against latency and size: where do BSR kernels beat the dense build?

    .venv/bin/python bench/sparsity.py                              # BERT-base shape, b1 s128
    .venv/bin/python bench/sparsity.py --layers 2 --rounds 5        # quicker
    .venv/bin/python bench/sparsity.py --block 32x1 --levels 0,80,95

A BERT-base-shaped encoder (transformers BertConfig: 12 layers, hidden 768, 12 heads, FFN 3072,
random weights), batch 1, sequence 128, fp32. At each block sparsity s the Linear weights are
thresholded with ``passes.threshold_weights(g, sparsity=s, block=(r, c))`` and built with every
weight lowered to the BSR kernel (``sparse_hook(threshold=0)``: the crossover is only visible if
sparse runs at every level, including 0 %); both builds use the default CPU schedules for the
rest. Compared against the dense TVM build and onnxruntime running the same thresholded model.

The dense build is compiled once: a dense kernel does the same work whatever the weights' values
(zeros included). Each level times dense TVM, sparse TVM and onnxruntime in interleaved rounds
(one call of each per round), so load from other processes falls on all three alike; the table
gives medians. Sizes are the artifacts' ``lib.so`` on disk (weights are bound into the library)
and the ONNX file onnxruntime loads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _models import bert, inputs_for

import slimc
from slimc import passes


def build_model(layers: int) -> torch.nn.Module:
    return bert(layers).eval()



def _block(text: str) -> tuple[int, int]:
    try:
        r, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a block shape like 16x1") from None
    return r, c


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


def cpu_name() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``; masked on some VMs) and LLVM's name for it."""
    from slimc.codegen.targets import host_cpu
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = host_cpu()
    features = ", ".join(k for k, v in info["features"].items() if v) or "-"
    return f"{model} (LLVM: {info['cpu']}; {info['cores']} cores used; {features})"


def tvm_build(graph, inputs, hook, workdir: Path, name: str):
    """(run, output, library bytes, compile seconds) of ``graph`` built with ``hook``."""
    import tvm
    from tvm import relax
    start = time.perf_counter()
    art = slimc.compile(graph, "x86", tune=hook)
    seconds = time.perf_counter() - start
    size = (art.save(workdir / name) / "lib.so").stat().st_size
    vm = relax.VirtualMachine(art.executable, tvm.cpu())
    args = [tvm.runtime.tensor(x.numpy()) for x in inputs]
    main = vm["main"]

    def run():
        return main(*args)
    out = run()
    out = out.numpy() if hasattr(out, "numpy") else out[0].numpy()
    return run, out, size, seconds


def ort_session(model_proto, inputs, workdir: Path, name: str, threads: int):
    import onnxruntime as ort
    path = workdir / f"{name}.onnx"
    path.write_bytes(model_proto.SerializeToString())
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = dict(zip([i.name for i in sess.get_inputs()], (x.numpy() for x in inputs)))

    def run():
        return sess.run(None, feed)
    return run, run()[0], path.stat().st_size


def time_rounds(variants: dict, rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds of each variant over interleaved rounds."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            # TVM's and onnxruntime's pool workers spin ~0.2 s after a call: on 2 cores they
            # would slow whichever variant runs next
            time.sleep(0.3)
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--block", type=_block, default=(16, 1),
                    help="rows (output features) x columns (reduction), default 16x1")
    ap.add_argument("--levels", default="0,50,70,80,90,95",
                    help="block sparsities in percent (default 0,50,70,80,90,95)")
    ap.add_argument("--rounds", type=int, default=8, help="timed rounds per level (default 8)")
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args(argv)
    levels = [float(v) / 100 for v in args.levels.split(",")]

    import tvm

    from slimc.codegen.schedules import apply_default_schedules, cpu_config
    from slimc.codegen.sparse import crossover, sparse_hook
    from slimc.codegen.targets import resolve_target

    threads = torch.get_num_threads()
    print(f"CPU: {cpu_name()}")
    print(f"tvm {tvm.__version__}, onnxruntime threads {threads}; load average at start: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"model: BERT-base shape ({args.layers} layers, hidden 768, 12 heads, FFN 3072), "
          f"random weights; batch {args.batch}, sequence {args.seq}, fp32; blocks "
          f"{args.block[0]}x{args.block[1]} (output features x reduction)")

    module = build_model(args.layers)
    inputs = inputs_for(args.batch, args.seq)
    graph = slimc.capture(module, inputs)
    onnx_graph = slimc.Graph("onnx", graph.to_onnx())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dense, dense_out, dense_size, dense_secs = tvm_build(
            graph, inputs, apply_default_schedules, work, "dense")
        with torch.inference_mode():
            dense_err = float(np.abs(dense_out - module(*inputs).numpy()).max())
        print(f"dense TVM build: {dense_secs:.0f} s, lib.so {_mb(dense_size)} MB, max |err| "
              f"{dense_err:.1e} against torch")
        for s in levels:
            g = passes.threshold_weights(graph, sparsity=s, block=args.block) if s else graph
            og = passes.threshold_weights(onnx_graph, sparsity=s, block=args.block) \
                if s else onnx_graph
            hook = sparse_hook(0.0, args.block, then=apply_default_schedules)
            sparse, sparse_out, sparse_size, secs = tvm_build(g, inputs, hook, work,
                                                              f"sparse{s}")
            ort, ort_out, onnx_size = ort_session(og.onnx, inputs, work, f"model{s}", threads)
            with torch.inference_mode():
                reference = g.to_torch()(*inputs).numpy()
            err = max(float(np.abs(sparse_out - reference).max()),
                      float(np.abs(ort_out - reference).max()))
            t = time_rounds({"dense": dense, "sparse": sparse, "ort": ort}, args.rounds,
                            args.warmup)
            rows.append((s, t, sparse_size, onnx_size, secs, err))
            print(f"  {s:4.0%}: dense {t['dense'] * 1e3:7.1f} ms  sparse {t['sparse'] * 1e3:7.1f}"
                  f" ms  onnxruntime {t['ort'] * 1e3:7.1f} ms  (build {secs:.0f} s)", flush=True)
            del sparse, ort
            (work / f"sparse{s}" / "lib.so").unlink()

    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\n{'block sparsity':>14s} {'dense ms':>9s} {'sparse ms':>9s} {'ORT ms':>8s} "
          f"{'sparse/dense':>12s} {'sparse/ORT':>10s} {'dense MB':>9s} {'sparse MB':>9s} "
          f"{'ONNX MB':>8s} {'max |err|':>9s}")
    for s, t, size, onnx_size, _, err in rows:
        print(f"{s:14.0%} {t['dense'] * 1e3:9.1f} {t['sparse'] * 1e3:9.1f} {t['ort'] * 1e3:8.1f} "
              f"{t['sparse'] / t['dense']:11.2f}x {t['sparse'] / t['ort']:9.2f}x "
              f"{_mb(dense_size):>9s} {_mb(size):>9s} {_mb(onnx_size):>8s} {err:9.1e}")
    faster = [s for s, t, *_ in rows if t["sparse"] < t["dense"]]
    print(f"\nsparse beats dense TVM at: {', '.join(f'{s:.0%}' for s in faster) or 'no level'}")
    auto = crossover(args.block, cpu_config(resolve_target("x86")).lanes, args.batch * args.seq)
    print(f"threshold='auto' (the default) lowers {args.block[0]}x{args.block[1]} blocks from "
          f"{auto:.0%} block sparsity on this CPU")
    print(f"{args.rounds} interleaved rounds per level (medians); max |err|: sparse TVM and "
          "onnxruntime against the thresholded torch model.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
