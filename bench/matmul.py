"""Per-GEMM speed of slimc's default CPU schedules against onnxruntime (MLAS), in one run.

    .venv/bin/python bench/matmul.py                    # the BERT-base GEMMs (batch 1, seq 128)
    .venv/bin/python bench/matmul.py --shape ffn1 --mr 8 --nr 32 --kc 768   # try a tile
    .venv/bin/python bench/matmul.py --shape qkv --asm build/qkv.s          # dump the kernel

Each shape is one Relax function built the way ``slimc.compile`` builds a model (legalize and
fuse with fast math, :func:`slimc.codegen.schedules.apply_default_schedules`, ``tvm.compile``
with the default Relax pipeline), the weight a constant as in a captured model, so it is packed
at build time. onnxruntime runs the same computation as a one-node-per-op ONNX graph (MatMul, Add,
Gelu, residual Add; all graph optimisations, default threads). Rounds alternate between the two
(``--rounds`` rounds of ``--number`` calls each); the table gives the median round of each as
GFLOP/s (2·M·N·K per call; the epilogue is not counted) and onnxruntime's speed over slimc's.
Outputs are checked against numpy (float64) before timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# pause before each timed round: onnxruntime's and TVM's idle workers spin for a while after a
# call (TVM's for about 0.2 s), and on a 2-core machine they would take the cores of the other
# runtime's round
_SETTLE = 0.3

# name: (batch dims, M, K, N, epilogue, B is a constant weight)
SHAPES = {
    "qkv": ((1,), 128, 768, 768, "bias", True),            # Q/K/V and attention output
    "ffn1": ((1,), 128, 768, 3072, "bias+gelu", True),     # FFN up
    "ffn2": ((1,), 128, 3072, 768, "bias+residual", True),  # FFN down
    "scores": ((1, 12), 128, 64, 128, "", False),           # Q @ K^T per head
    "context": ((1, 12), 128, 128, 64, "", False),          # softmax(S) @ V per head
}


def _gelu(x: np.ndarray) -> np.ndarray:
    from math import erf
    return 0.5 * x * (1.0 + np.vectorize(erf)(x / np.sqrt(2.0)))


def problem(name: str, seed: int = 0):
    """(inputs, weight or None, bias or None, expected float64 output) for one shape."""
    batch, m, k, n, epi, const_b = SHAPES[name]
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((*batch, m, k)).astype("float32")
    b = (rng.standard_normal((k, n)) / np.sqrt(k) if const_b
         else rng.standard_normal((*batch, k, n))).astype("float32")
    bias = rng.standard_normal(n).astype("float32") if "bias" in epi else None
    res = rng.standard_normal((*batch, m, n)).astype("float32") if "residual" in epi else None
    want = a.astype(np.float64) @ b
    if bias is not None:
        want = want + bias
    if "gelu" in epi:
        want = _gelu(want)
    if res is not None:
        want = want + res
    inputs = [a] + ([] if const_b else [b]) + ([res] if res is not None else [])
    return inputs, (b if const_b else None), bias, want


def build_tvm(name: str, target, config=None, asm: str | None = None):
    """A VM function running the shape's Relax function with slimc's default schedules."""
    import tvm
    from tvm import relax

    from slimc.codegen.schedules import apply_default_schedules
    inputs, w, bias, _ = problem(name)
    epi = SHAPES[name][4]
    params = [relax.Var(f"x{i}", relax.TensorType(x.shape, "float32"))
              for i, x in enumerate(inputs)]
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            rhs = relax.const(w) if w is not None else params[1]
            y = bb.emit(relax.op.matmul(params[0], rhs))
            if bias is not None:
                y = bb.emit(relax.op.add(y, relax.const(bias)))
            if "gelu" in epi:
                y = bb.emit(relax.op.nn.gelu(y))
            if "residual" in epi:
                y = bb.emit(relax.op.add(y, params[-1]))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = apply_default_schedules(bb.get(), target, config=config)
    ex = tvm.compile(mod, target=target, relax_pipeline="default")
    if asm:
        Path(asm).write_text(ex.mod.imports[0].inspect_source("s")
                             if hasattr(ex, "mod") else ex.inspect_source("s"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm, [tvm.runtime.tensor(x) for x in inputs]


def build_ort(name: str):
    """An onnxruntime session and its feed for the same computation."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    inputs, w, bias, want = problem(name)
    epi = SHAPES[name][4]
    names = ["a"] + ([] if w is not None else ["b"]) + (["r"] if "residual" in epi else [])
    graph_inputs = [helper.make_tensor_value_info(nm, TensorProto.FLOAT, x.shape)
                    for nm, x in zip(names, inputs)]
    inits, nodes = [], []
    if w is not None:
        inits.append(numpy_helper.from_array(w, "b"))
    nodes.append(helper.make_node("MatMul", ["a", "b"], ["mm"]))
    last = "mm"
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        nodes.append(helper.make_node("Add", [last, "bias"], ["biased"]))
        last = "biased"
    if "gelu" in epi:
        nodes.append(helper.make_node("Gelu", [last], ["gelu"]))
        last = "gelu"
    if "residual" in epi:
        nodes.append(helper.make_node("Add", [last, "r"], ["res"]))
        last = "res"
    nodes[-1].output[0] = "y"
    g = helper.make_graph(nodes, name, graph_inputs,
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, want.shape)],
                          inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess, dict(zip(names, inputs))


def measure(name: str, target, config, rounds: int, number: int, asm: str | None):
    """(slimc GFLOP/s, onnxruntime GFLOP/s, max relative error of each) for one shape."""
    batch, m, k, n, _, _ = SHAPES[name]
    flops = 2.0 * m * n * k * int(np.prod(batch))
    _, _, _, want = problem(name)
    vm, args = build_tvm(name, target, config, asm)
    sess, feed = build_ort(name)
    scale = max(1.0, float(np.abs(want).max()))
    err_tvm = float(np.abs(vm["main"](*args).numpy() - want).max()) / scale
    err_ort = float(np.abs(sess.run(None, feed)[0] - want).max()) / scale
    timer = vm.time_evaluator("main", _device(), number=number, repeat=1)
    tvm_s, ort_s = [], []
    timer(*args)
    for _ in range(3):   # warm-up: thread pools, caches, onnxruntime's first-run allocations
        sess.run(None, feed)
    for _ in range(rounds):
        time.sleep(_SETTLE)   # let the other runtime's spinning workers go to sleep
        tvm_s.append(timer(*args).median)
        time.sleep(_SETTLE)
        t = time.perf_counter()
        for _ in range(number):
            sess.run(None, feed)
        ort_s.append((time.perf_counter() - t) / number)
    return (flops / statistics.median(tvm_s) / 1e9, flops / statistics.median(ort_s) / 1e9,
            err_tvm, err_ort)


def _device():
    import tvm
    return tvm.cpu()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES),
                    help="one shape (repeatable; default: all)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--number", type=int, default=20, help="calls per timed round")
    ap.add_argument("--mcpu", default=None, help="LLVM CPU to build for (default: the host)")
    ap.add_argument("--mr", type=int, default=None)
    ap.add_argument("--nr", type=int, default=None)
    ap.add_argument("--kc", type=int, default=None)
    ap.add_argument("--asm", default=None, help="write the assembly here (one shape)")
    args = ap.parse_args(argv)

    import tvm
    from tvm.target import Target

    from slimc.codegen.schedules import CPUConfig, cpu_config
    from slimc.runtime import use_physical_cores
    use_physical_cores()   # as slimc.compile and slimc.runtime.load do
    cpu = args.mcpu or tvm.target.codegen.llvm_get_system_cpu()
    target = Target({"kind": "llvm", "mcpu": cpu, "num-cores": os.cpu_count()})
    config = cpu_config(target)
    overrides = {k: v for k, v in (("mr", args.mr), ("nr", args.nr), ("kc", args.kc)) if v}
    if overrides:
        config = CPUConfig(**{**config.__dict__, **overrides})
    print(f"CPU (LLVM host): {tvm.target.codegen.llvm_get_system_cpu()}; built for {cpu}; "
          f"{os.cpu_count()} cores; TVM threads "
          f"{tvm.get_global_func('runtime.NumThreads')()}; config {config}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'shape':8s} {'M x K x N (batch)':24s} {'epilogue':14s} {'slimc':>8s} {'ORT':>8s} "
          f"{'ORT/slimc':>9s} {'err slimc':>9s} {'err ORT':>8s}   (GFLOP/s, median round)")
    for name in args.shape or list(SHAPES):
        batch, m, k, n, epi, _ = SHAPES[name]
        ours, ort, e1, e2 = measure(name, target, config, args.rounds, args.number, args.asm)
        dims = f"{m}x{k}x{n} ({'x'.join(map(str, batch))})"
        print(f"{name:8s} {dims:24s} {epi or '-':14s} {ours:8.1f} {ort:8.1f} {ort / ours:8.2f}x "
              f"{e1:9.1e} {e2:8.1e}", flush=True)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
