"""What ``passes.fuse`` changes for TVM: kernels and latency with and without fusion, and how often
each rule fires on the test zoo.

    .venv/bin/python bench/fusion.py                  # BERT-base shape, b1 s128, FX, eager + sdpa
    .venv/bin/python bench/fusion.py --onnx           # also the ONNX (dynamo export) path
    .venv/bin/python bench/fusion.py --layers 2 --runs 5
    .venv/bin/python bench/fusion.py rules            # rule x architecture table (tests/zoo.py)

The workload is DESIGN.md's: a BERT-base-shaped encoder (12 layers, hidden 768, 12 heads, FFN
3072; transformers ``BertConfig``, random weights), batch 1, sequence 128, fp32. Every variant is
compiled the same way, ``slimc.compile(..., tune=fusion_hook(apply_default_schedules))``:
``split_to_slices`` (codegen/fusion.py), TVM's legalization and default FuseOps (which merges
element-wise work into its neighbours), slimc's default CPU schedules. Kernels are
counted on the legalized and fused Relax module (``codegen.fusion.kernel_launches``): ``kernels``
= distinct PrimFuncs, ``calls`` = ``call_tir`` launches per inference (a lone reshape is a view). Latency: interleaved rounds (one call of each variant per
round), medians; every variant is checked against torch eager first.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _models import bert, inputs_for

import slimc
from slimc import passes


def bert_base(layers: int, attn: str) -> torch.nn.Module:
    return bert(layers, attn=attn)



# -- kernels ------------------------------------------------------------------------------------
def kernels(graph, target) -> tuple[int, int, collections.Counter]:
    """(distinct PrimFuncs, call_tir launches per inference, launches by kernel name)."""
    from slimc.codegen.build import to_relax
    from slimc.codegen.fusion import kernel_launches
    mod, _, _ = to_relax(graph)
    funcs, calls = kernel_launches(mod, target)
    return funcs, sum(calls.values()), calls


def compiled(graph, inputs):
    import tvm
    from tvm import relax

    from slimc.codegen.fusion import fusion_hook
    from slimc.codegen.schedules import apply_default_schedules
    start = time.perf_counter()
    art = slimc.compile(graph, "x86", tune=fusion_hook(apply_default_schedules))
    seconds = time.perf_counter() - start
    vm = relax.VirtualMachine(art.executable, tvm.cpu())
    args = [tvm.runtime.tensor(x.numpy()) for x in inputs]
    main = vm["main"]

    def run():
        out = main(*args)
        return out[0] if not hasattr(out, "numpy") else out
    return run, seconds


def _numpy(out) -> np.ndarray:
    while not hasattr(out, "numpy"):
        out = out[0]
    return out.numpy()


def fusion_bench(args) -> int:
    import tvm

    from slimc.codegen.targets import host_cpu, resolve_target
    from slimc.passes.fuse import DEFAULT, ONNXRUNTIME

    cpu = host_cpu()
    print(f"CPU (LLVM host): {cpu['cpu']}  cores used: {cpu['cores']}")
    print(f"torch {torch.__version__}, tvm {tvm.__version__}; load average at start: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"workload: BERT-base shape ({args.layers} layers, hidden 768, 12 heads, FFN 3072), "
          f"batch {args.batch}, sequence {args.seq}, fp32, random weights")
    target = resolve_target("x86")
    inputs = inputs_for(args.batch, args.seq)

    graphs: dict[str, slimc.Graph] = {}
    reference: dict[str, np.ndarray] = {}
    fired: dict[str, dict] = {}
    for attn in args.attn:
        module = bert_base(args.layers, attn)
        with torch.inference_mode():
            ref = module(*inputs).numpy()
        g = slimc.capture(module, inputs)
        r = passes.fuse.run(g)
        graphs[f"fx {attn}"], graphs[f"fx {attn} + fuse"] = g, r.graph
        fired[f"fx {attn} + fuse"] = r.stats["fired"]
        reference[f"fx {attn}"] = reference[f"fx {attn} + fuse"] = ref
        if args.onnx:
            proto = torch.onnx.export(module, inputs, dynamo=True, verbose=False,
                                      input_names=["input_ids", "attention_mask"]).model_proto
            og = slimc.Graph("onnx", proto)
            # TVM's ONNX frontend reads SkipLayerNormalization and BiasGelu but neither
            # MultiHeadAttention nor opset-23 Attention: the onnxruntime set minus attention
            tvm_rules = ONNXRUNTIME.without("attention_ort", "gelu_ort") + DEFAULT
            r = passes.fuse.run(og, rules=tvm_rules)
            graphs[f"onnx {attn}"], graphs[f"onnx {attn} + fuse"] = og, r.graph
            fired[f"onnx {attn} + fuse"] = r.stats["fired"]
            reference[f"onnx {attn}"] = reference[f"onnx {attn} + fuse"] = ref

    for name, rules_fired in fired.items():
        print(f"{name}: rules fired {rules_fired}")

    counts = {name: kernels(g, target) for name, g in graphs.items()}
    runs, build = {}, {}
    for name, g in graphs.items():
        runs[name], build[name] = compiled(g, inputs)
    errors = {name: float(np.abs(_numpy(fn()) - reference[name]).max())
              for name, fn in runs.items()}
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.runs):
        for name, fn in runs.items():
            time.sleep(0.3)   # TVM's pool workers spin ~0.2 s after a call
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)

    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\n{'variant':22s} {'kernels':>8s} {'calls':>6s} {'median ms':>10s} {'min ms':>8s} "
          f"{'max |err|':>10s} {'build s':>8s}")
    for name in runs:
        funcs, calls, _ = counts[name]
        med = statistics.median(times[name])
        print(f"{name:22s} {funcs:8d} {calls:6d} {med * 1e3:10.1f} {min(times[name]) * 1e3:8.1f} "
              f"{errors[name]:10.1e} {build[name]:8.0f}")
    print(f"\n{args.runs} interleaved rounds; max |err| against torch eager fp32.")
    if args.verbose:
        for name, (_, _, by_name) in counts.items():
            print(f"\n{name}: launches by kernel: {dict(by_name.most_common())}")
    return 0


# -- rules x architectures ------------------------------------------------------------------
def rules_table(args) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from zoo import TS_EXPORTABLE, ZOO, to_onnx

    from slimc.passes.fuse import CATALOGUE, DEFAULT, ORT

    rows = []
    for name in ZOO:
        for kind in ("fx", "dynamo", "ts"):
            if kind == "ts" and name not in TS_EXPORTABLE:
                continue
            if kind == "fx":
                module, inputs, _ = ZOO[name]()
                g = slimc.capture(module, inputs)
            else:
                g = slimc.Graph("onnx", to_onnx(name, kind))
            for set_name, rules in (("DEFAULT", DEFAULT), ("ORT", ORT)):
                if kind == "fx" and set_name == "ORT":
                    continue  # the onnxruntime rules refuse on FX: same as DEFAULT
                if args.cleanup:
                    g = passes.cleanup(g)
                r = passes.fuse.run(g, rules=rules)
                rows.append((f"{name} {kind}", set_name, r.stats["fired"],
                             r.stats["nodes_before"], r.stats["nodes_after"]))
    used = [n for n in CATALOGUE if any(n in fired for _, _, fired, _, _ in rows)]
    short = {n: n.replace("cancel_", "c_").replace("_layer_norm", "_ln") for n in used}
    print("| graph | rules | " + " | ".join(short[n] for n in used) + " | nodes |")
    print("|---|---|" + "---:|" * (len(used) + 1))
    for graph, set_name, fired, before, after in rows:
        cells = " | ".join(str(fired.get(n, "")) for n in used)
        print(f"| {graph} | {set_name} | {cells} | {before} -> {after} |")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="?", default="bench", choices=["bench", "rules"])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--attn", nargs="+", default=["eager", "sdpa"], choices=["eager", "sdpa"])
    ap.add_argument("--onnx", action="store_true", help="also the ONNX (dynamo export) path")
    ap.add_argument("--cleanup", action="store_true", help="rules: run passes.cleanup first")
    ap.add_argument("--verbose", action="store_true", help="launches per kernel name")
    args = ap.parse_args(argv)
    return rules_table(args) if args.what == "rules" else fusion_bench(args)


if __name__ == "__main__":
    sys.exit(main())
