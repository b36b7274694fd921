"""The default CPU schedules' loop structure (slimc/codegen/schedules.py): what runs in
parallel, what is vectorized, and the code built for other x86 ISAs. Numerics of the matmul rule
are in test_tune.py; these tests check the structure that makes the kernels fast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, tirx

from slimc.codegen.schedules import apply_default_schedules, cpu_config, schedule_report

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                          "num-cores": 2})


def _module(*shapes: tuple, op=relax.op.matmul) -> tvm.IRModule:
    params = [relax.Var(f"x{i}", relax.TensorType(s, "float32")) for i, s in enumerate(shapes)]
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(op(*params)))
        bb.emit_func_output(out)
    return bb.get()


def _kernels(mod: tvm.IRModule, rule: str) -> list[str]:
    """TVMScript of every PrimFunc the given rule scheduled."""
    report = schedule_report(mod)
    return [f.script() for gv, f in mod.functions_items()
            if isinstance(f, tirx.PrimFunc) and report.get(gv.name_hint) == rule]


@pytest.mark.parametrize("a, b, parallel", [
    # 12 heads of softmax(S) @ V: 128 × 64 outputs each, 98k in all
    ((12, 128, 128), (12, 128, 64), True),
    ((128, 128), (128, 64), False),   # 8k outputs: below min_parallel, one thread
])
def test_matmul_parallel_work_counts_the_batch(a, b, parallel):
    cfg = cpu_config(HOST)
    assert (np.prod(a[:-1]) * b[-1] >= cfg.min_parallel) == parallel
    (text,) = _kernels(apply_default_schedules(_module(a, b), HOST), "matmul")
    assert ("T.parallel(" in text) == parallel


def _asm(mod: tvm.IRModule, target: tvm.target.Target) -> str:
    ex = tvm.compile(apply_default_schedules(mod, target), target=target)
    return ex.mod.imports[0].inspect_source("s")


@pytest.mark.parametrize("mcpu, register", [("haswell", "ymm"), ("znver3", "ymm"),
                                            ("znver4", "zmm"), ("skylake-avx512", "zmm")])
def test_matmul_inner_loop_is_fma_on_the_targets_vector_registers(mcpu, register):
    """Built (not run: the host may lack the ISA) for AVX2 and AVX-512 CPUs: broadcast + FMA on
    the widest registers the ISA has, and no 512-bit code for an AVX2 CPU."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    lines = _asm(_module((64, 256), (256, 128)), target).splitlines()
    fma = [ln for ln in lines if "vfmadd" in ln]
    assert len([ln for ln in fma if f"%{register}" in ln]) >= cpu_config(target).mr, mcpu
    if register == "ymm":
        assert not any("%zmm" in ln for ln in lines), mcpu


def _run(mod: tvm.IRModule, *args: np.ndarray) -> np.ndarray:
    ex = tvm.compile(apply_default_schedules(mod, HOST), target=HOST)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


def _layer_norm(x, n: int):
    gamma = relax.const(np.linspace(0.5, 1.5, n, dtype="float32"))
    return relax.op.nn.layer_norm(x, gamma, relax.const(np.zeros(n, "float32")), axes=[-1],
                                  epsilon=1e-12)


def _want(kind: str, x: np.ndarray) -> np.ndarray:
    x64 = torch.from_numpy(x).double()
    if kind == "softmax":
        return torch.softmax(x64, -1).numpy()
    gamma = torch.linspace(0.5, 1.5, x.shape[-1], dtype=torch.float64)
    return torch.nn.functional.layer_norm(x64, (x.shape[-1],), eps=1e-12).numpy() * gamma.numpy()


@pytest.mark.parametrize("kind", ["layer_norm", "softmax"])
@pytest.mark.parametrize("shape, vectorized", [
    ((1, 128, 768), True),     # BERT-base hidden
    ((2, 12, 128), True),      # attention rows
    ((3, 100), False),         # not a multiple of the vector: DLight's scalar rule
    ((5, 8), False),           # shorter than two vectors
])
def test_row_reductions_are_vectorized_and_exact(kind, shape, vectorized):
    op = (lambda x: _layer_norm(x, shape[-1])) if kind == "layer_norm" \
        else (lambda x: relax.op.nn.softmax(x, axis=-1))
    mod = _module(shape, op=op)
    (text,) = _kernels(apply_default_schedules(mod, HOST), "reduction")
    lanes = cpu_config(HOST).lanes
    partial = "_rf_update" in text and f"T.vectorized(T.int64({lanes}))" in text
    assert partial == (vectorized and shape[-1] % lanes == 0)
    x = np.random.default_rng(0).standard_normal(shape).astype("float32") * 3
    got = _run(mod, x)
    assert np.abs(got - _want(kind, x)).max() < 2e-6


@pytest.mark.parametrize("mcpu, register", [("haswell", "ymm"), ("znver4", "zmm")])
def test_row_reductions_build_vector_sums_for_the_targets_isa(mcpu, register):
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    lines = _asm(_module((4, 768), op=lambda x: _layer_norm(x, 768)), target).splitlines()
    assert any("vaddps" in ln and f"%{register}" in ln for ln in lines), mcpu
    if register == "ymm":
        assert not any("%zmm" in ln for ln in lines), mcpu


def _any_finite(x):
    """SDPA's check for fully masked rows: max over k of (scores != -inf), as int8."""
    finite = relax.op.logical_not(relax.op.equal(x, relax.const(-np.inf, "float32")))
    return relax.op.max(relax.op.astype(finite, "int8"), axis=-1, keepdims=True)


def test_fallback_runs_a_batched_reduction_in_parallel():
    """A reduction with nothing after it (no rule but the fallback takes it) behind a unit batch
    axis: the leading spatial loops are fused, so the rows are split over the threads."""
    mod = _module((1, 12, 128, 128), op=_any_finite)
    (text,) = _kernels(apply_default_schedules(mod, HOST), "fallback")
    assert "T.parallel(T.int64(1536))" in text
    x = np.random.default_rng(0).standard_normal((1, 12, 128, 128)).astype("float32")
    x[0, 3, 7, :] = -np.inf
    want = np.isfinite(x).any(axis=-1, keepdims=True).astype("int8")
    np.testing.assert_array_equal(_run(mod, x), want)
