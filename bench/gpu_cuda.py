"""CUDA on a real GPU: numerics, latency and a MetaSchedule tuning run (issue #7).

    python bench/gpu_cuda.py                                   # BERT-base shape, b1 s128, fp32
    python bench/gpu_cuda.py --model bert-tiny --tune-seconds 60
    python bench/gpu_cuda.py --prebuilt ART --expect REF.npz   # an artifact built elsewhere

Needs a CUDA GPU (CI has none: tests/test_cuda_offline.py checks what can be checked without
one). For the model it prints, in one run on this machine:

* numerics: the slimc/TVM CUDA build (DLight default schedules, and the tuned build) against
  torch fp32 on the CPU, max |difference| of the last hidden state;
* latency: medians of ``--runs`` calls (inputs already on the GPU, synchronised after each) of
  torch eager on the GPU (fp32, TF32 off, as torch's default for matmuls), torch with TF32 on,
  and the slimc builds;
* tuning (``--tune-seconds``): tasks, trials, records, the estimate after tuning and the time to
  reach 90 % of it (slimc.codegen.tune's summary), then the tuned build timed as above.

``--prebuilt ART --expect REF.npz`` loads an artifact compiled on another machine (slimc compiles
the kernels to a fatbin at build time, so this machine needs no nvcc) and compares its outputs
with ``REF.npz`` (``inputs`` / ``outputs`` arrays written beside it by the build).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import slimc
from slimc import runtime


def _torch_cuda_ms(module, inputs, runs: int, tf32: bool) -> tuple[float, np.ndarray]:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    model = module.to("cuda")
    args = [x.to("cuda") for x in inputs]
    times = []
    with torch.inference_mode():
        for _ in range(5):
            out = model(*args)
        torch.cuda.synchronize()
        for _ in range(runs):
            start = time.perf_counter()
            out = model(*args)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    module.to("cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    return statistics.median(times), out.float().cpu().numpy()


def _slimc_build(graph, art_dir: Path, runs: int, inputs, **compile_opts) -> dict:
    start = time.perf_counter()
    art = slimc.compile(graph, "cuda", **compile_opts)
    seconds = time.perf_counter() - start
    art.save(art_dir)
    module = runtime.load(art_dir)
    out = module(*inputs)[0]
    stats = module.benchmark(*inputs, repeat=runs, warmup=5)
    return {"compile_s": round(seconds, 1), "median_ms": stats["median_ms"], "output": out,
            "kernels": art.metadata["cuda"]["kernels"],
            "spill_bytes": art.metadata["cuda"]["spill_bytes"]}


def _note(build: dict) -> str:
    return (f"compile {build['compile_s']} s, {build['kernels']} kernels, "
            f"spills {build['spill_bytes']} B")


def prebuilt(art: str, expect: str) -> int:
    ref = np.load(expect)
    module = runtime.load(art)
    names = sorted(k for k in ref.files if k.startswith("input"))
    outputs = module(*[ref[k] for k in names])
    dev = max(float(np.abs(o - ref[f"output{i}"]).max()) for i, o in enumerate(outputs))
    meta = runtime.read_metadata(art)
    print(f"prebuilt artifact {art}: built on {meta['build_host']['cpu']} for "
          f"{meta['cuda']['arch']} ({meta['cuda']['binary']}), {meta['cuda']['kernels']} kernels")
    print(f"  max |artifact - reference| over {len(outputs)} outputs: {dev:.3g}")
    return 0 if dev < 1e-4 else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bert-base", choices=["bert-base", "bert-tiny"])
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--tune-seconds", type=float, default=None)
    ap.add_argument("--json", default=None, help="write the figures here too")
    ap.add_argument("--db", default=None, help="tuning database directory (default: temporary)")
    ap.add_argument("--prebuilt", default=None)
    ap.add_argument("--expect", default=None)
    args = ap.parse_args(argv)

    import tvm

    from slimc.codegen.targets import local_cuda_arch
    from slimc.codegen.tune import TuneSummary, tune_graph

    if local_cuda_arch() is None:
        print("bench/gpu_cuda.py needs a CUDA GPU; this machine has none (or TVM has no CUDA "
              "runtime here).", file=sys.stderr)
        return 2
    if args.prebuilt:
        return prebuilt(args.prebuilt, args.expect)
    dev = tvm.cuda(0)
    print(f"GPU: {dev.device_name} ({local_cuda_arch()}), tvm {tvm.__version__}, "
          f"torch {torch.__version__}")
    from _models import inputs_for
    from latency import build_model
    module, desc = build_model(args.model, args.layers)
    inputs = inputs_for(1, args.seq)
    print(f"model: {desc}; batch 1, sequence {args.seq}, fp32")
    with torch.inference_mode():
        reference = module(*inputs).numpy()   # torch fp32 on the CPU
    np_inputs = [x.numpy() for x in inputs]

    rows, figures = [], {"gpu": dev.device_name, "model": desc, "seq": args.seq}
    t_ms, t_out = _torch_cuda_ms(module, inputs, args.runs, tf32=False)
    rows.append(("torch eager CUDA fp32", t_ms, float(np.abs(t_out - reference).max()), ""))
    t32_ms, t32_out = _torch_cuda_ms(module, inputs, args.runs, tf32=True)
    rows.append(("torch eager CUDA TF32", t32_ms, float(np.abs(t32_out - reference).max()), ""))

    graph = slimc.capture(module, inputs)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        default = _slimc_build(graph, tmp / "default", args.runs, np_inputs)
        rows.append(("slimc CUDA, DLight defaults", default["median_ms"],
                     float(np.abs(default["output"] - reference).max()),
                     _note(default)))
        if args.tune_seconds:
            db = Path(args.db) if args.db else tmp / "db"
            try:
                summary: TuneSummary = tune_graph(graph, "cuda", db=db,
                                                  seconds=args.tune_seconds, progress=False)
            except slimc.SlimcError as e:
                print(f"tuning failed: {e}")
                figures["tuning"] = {"error": str(e)}
                summary = None
        if args.tune_seconds and summary is not None:
            reach = summary.seconds_to_reach(0.9)
            figures["tuning"] = {"seconds": round(summary.seconds, 1), "tasks": summary.tasks,
                                 "trials": summary.trials, "records": summary.records,
                                 "estimated_ms": summary.estimated_ms,
                                 "seconds_to_90_percent": reach,
                                 "history": summary.history}
            est = summary.estimated_ms
            print(f"tuning: {summary.tasks} tasks, {summary.trials} trials, {summary.records} "
                  f"records in {summary.seconds:.0f} s; sum of best kernel times "
                  f"{'-' if est is None else f'{est:.3f}'} ms; 90 % of that reached after "
                  f"{'-' if reach is None else f'{reach:.1f}'} s")
            for s in sorted(summary.per_task, key=lambda s: -s.cost)[:8]:
                print(f"  {s.name:60s} x{s.weight} trials {s.trials:4d} best "
                      f"{s.best_ms if s.best_ms is None else round(s.best_ms, 4)} ms")
            tuned = _slimc_build(graph, tmp / "tuned", args.runs, np_inputs, db=str(db))
            rows.append((f"slimc CUDA, tuned {args.tune_seconds:.0f} s", tuned["median_ms"],
                         float(np.abs(tuned["output"] - reference).max()),
                         _note(tuned)))

    print("\n| variant | median ms | vs torch fp32 | max abs dev vs torch CPU fp32 | notes |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, ms, dv, note in rows:
        print(f"| {name} | {ms:.3f} | {ms / t_ms:.2f}x | {dv:.2e} | {note} |")
    figures["rows"] = [{"variant": n, "median_ms": m, "max_abs_dev": d, "notes": x}
                       for n, m, d, x in rows]
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
