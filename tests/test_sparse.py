"""Block-sparse lowering (slimc.codegen.sparse): the BSR format, the TIR kernel against numpy, and
whole models — a sparse-lowered build matches the dense build of the same thresholded model
(FX and ONNX) within 1e-4, calls the kernel for every Linear, and is smaller on disk; below the
threshold the module is left as it was.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from zoo import ZOO

import slimc
from slimc import passes, runtime
from slimc.codegen import resolve_target, to_relax
from slimc.codegen.schedules import apply_default_schedules, cpu_config
from slimc.codegen.sparse import (
    block_sparsity,
    bsr_matmul_kernel,
    bsr_matmul_rows_kernel,
    crossover,
    lower_sparse,
    plan_sparse,
    sparse_hook,
    sparse_report,
    to_bsr,
    uses_rows_kernel,
)
from slimc.errors import OptionError

ATOL = 1e-4
BLOCK = (16, 1)
LINEARS = 12  # tiny BERT: q, k, v, attention output, FFN in, FFN out × 2 layers


def _sparse_weight(rng, n, k, block, sparsity):
    r, c = block
    keep = rng.random((n // r, k // c)) >= sparsity
    w = rng.standard_normal((n, k)).astype(np.float32)
    return w * np.repeat(np.repeat(keep, r, 0), c, 1), 1.0 - keep.mean()


# -- the format --------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.sampled_from([(1, 1), (16, 1), (4, 4), (1, 8), (2, 3)]), st.integers(1, 4),
       st.integers(1, 4), st.floats(0, 1), st.integers(0, 2**16))
def test_bsr_round_trip(block, nb, kb, sparsity, seed):
    rng = np.random.default_rng(seed)
    w, zero_blocks = _sparse_weight(rng, nb * block[0], kb * block[1], block, sparsity)
    bsr = to_bsr(w, block)
    np.testing.assert_array_equal(bsr.to_dense(), w)
    assert bsr.data.shape[1:] == (block[1], block[0])
    assert bsr.indptr[0] == 0 and np.all(np.diff(bsr.indptr) >= 0)
    # a random dense block is never all zero, so block sparsity is exactly the dropped blocks
    assert block_sparsity(w, block) == pytest.approx(zero_blocks)
    assert bsr.density == pytest.approx(1 - zero_blocks)


def test_all_zero_weight_keeps_one_unused_block():
    bsr = to_bsr(np.zeros((32, 8), np.float32), BLOCK)
    assert bsr.nnz_blocks == 0 and bsr.data.shape == (1, 1, 16)
    np.testing.assert_array_equal(bsr.to_dense(), 0)


def test_block_must_divide_the_weight():
    with pytest.raises(OptionError, match="does not split into 16x1 blocks"):
        to_bsr(np.ones((24, 8), np.float32), BLOCK)


# -- the kernel --------------------------------------------------------------------------------
def _run_kernel(func, x, bsr, bias, out_shape=None):
    tgt = resolve_target("x86")
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=tgt)
    y = np.zeros(out_shape or (x.shape[0], bsr.shape[0]), np.float32)
    args = [tvm.runtime.tensor(a) for a in (x, bsr.data, bsr.indices, bsr.indptr, bias, y)]
    lib["main"](*args)
    return args[-1].numpy()


@pytest.mark.parametrize(("m", "block", "sparsity"), [
    (16, (16, 1), 0.5),    # whole row tiles
    (9, (32, 2), 0.7),     # a tile and a leftover row
    (3, (4, 4), 0.5),      # only leftover rows; blocks narrower than a vector
    (8, (1, 8), 0.9),
    (5, (16, 1), 1.0),     # nothing stored: y = bias
])
def test_kernel_matches_numpy(m, block, sparsity):
    rng = np.random.default_rng(0)
    w, _ = _sparse_weight(rng, 64, 48, block, sparsity)
    x = rng.standard_normal((m, 48)).astype(np.float32)
    bias = rng.standard_normal(64).astype(np.float32)
    bsr = to_bsr(w, block)
    func = bsr_matmul_kernel(m, 48, 64, block)
    np.testing.assert_allclose(_run_kernel(func, x, bsr, bias), x @ w.T + bias, rtol=0,
                               atol=ATOL)


@pytest.mark.parametrize(("m", "block", "mv", "sparsity"), [
    (32, (1, 8), 32, 0.7),   # whole runs of rows
    (21, (4, 4), 16, 0.5),   # a run and five leftover rows
    (7, (2, 3), 16, 0.3),    # only leftover rows
])
def test_rows_kernel_matches_numpy(m, block, mv, sparsity):
    rng = np.random.default_rng(2)
    w, _ = _sparse_weight(rng, 64, 48, block, sparsity)
    x = rng.standard_normal((m, 48)).astype(np.float32)
    bias = rng.standard_normal(64).astype(np.float32)
    bsr = to_bsr(w, block)
    func = bsr_matmul_rows_kernel(m, 48, 64, block, mv=mv)
    yt = _run_kernel(func, np.ascontiguousarray(x.T), bsr, bias, out_shape=(64, m))
    np.testing.assert_allclose(yt.T, x @ w.T + bias, rtol=0, atol=ATOL)


def test_kernel_with_a_dynamic_row_count():
    rng = np.random.default_rng(1)
    w, _ = _sparse_weight(rng, 32, 32, BLOCK, 0.5)
    bsr = to_bsr(w, BLOCK)
    bias = np.zeros(32, np.float32)
    func = bsr_matmul_kernel(tvm.tirx.Var("m", "int64"), 32, 32, BLOCK)
    tgt = resolve_target("x86")
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=tgt)
    for m in (1, 8, 19):
        x = rng.standard_normal((m, 32)).astype(np.float32)
        args = [tvm.runtime.tensor(a) for a in (x, bsr.data, bsr.indices, bsr.indptr, bias,
                                                 np.zeros((m, 32), np.float32))]
        lib["main"](*args)
        np.testing.assert_allclose(args[-1].numpy(), x @ w.T, rtol=0, atol=ATOL)


# -- whole models ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert():
    """Tiny BERT, thresholded to 75 % zero (16, 1) blocks, as FX and as ONNX."""
    module, inputs, _ = ZOO["bert"]()
    g = passes.threshold_weights(slimc.capture(module, inputs), sparsity=0.75, block=BLOCK)
    onnx_g = slimc.Graph("onnx", g.to_onnx(), history=[*g.history, "to_onnx"])
    return {"fx": g, "onnx": onnx_g, "inputs": g.example_inputs, "reference": g.run(),
            "relax": {"fx": to_relax(g)[0], "onnx": to_relax(onnx_g)[0]}}


@pytest.fixture(scope="module")
def builds(bert, tmp_path_factory):
    """{(backend, "dense" | "sparse"): saved artifact directory}, each built once."""
    cache = {}

    def get(backend, kind):
        if (backend, kind) not in cache:
            hook = apply_default_schedules if kind == "dense" else sparse_hook(0.5, BLOCK)
            art = slimc.compile(bert[backend], "x86", tune=hook)
            cache[backend, kind] = art.save(tmp_path_factory.mktemp(f"{backend}-{kind}"))
        return cache[backend, kind]
    return get


@pytest.mark.parametrize("backend", ["fx", "onnx"])
def test_sparse_build_matches_dense_model(bert, builds, backend):
    """Against the dense thresholded model: torch (both backends), onnxruntime (ONNX) and the
    dense TVM build (FX; built once, it is also the size baseline)."""
    sparse = runtime.load(builds(backend, "sparse"))(*bert["inputs"])
    references = [bert["reference"]]
    if backend == "onnx":
        references.append(bert["onnx"].run(*bert["inputs"]))
    else:
        references.append(runtime.load(builds("fx", "dense"))(*bert["inputs"]))
    for reference in references:
        for s, ref in zip(sparse, reference, strict=True):
            assert s.shape == ref.shape and np.abs(s - ref).max() < ATOL


@pytest.mark.parametrize("backend", ["fx", "onnx"])
def test_every_linear_calls_the_kernel(bert, backend):
    mod = bert["relax"][backend]
    decisions = plan_sparse(mod, threshold=0.5, block=BLOCK)
    assert len(decisions) == LINEARS
    assert all(d.lowered and d.bias for d in decisions), decisions
    assert all(d.block_sparsity == pytest.approx(0.75, abs=0.01) for d in decisions)
    lowered = lower_sparse(mod, resolve_target("x86"), threshold=0.5, block=BLOCK)
    report = sparse_report(lowered)
    assert sum(report.values()) == LINEARS
    assert len(report) == 3  # one kernel per weight shape: 64x64, 64x128, 128x64
    assert sparse_report(mod) == {}  # the input module is not changed
    # the Linear matmuls are gone; what remains are the attention's activation products
    matmuls = []
    relax_ = tvm.relax
    for _, f in lowered.functions_items():
        if isinstance(f, relax_.Function):
            relax_.analysis.post_order_visit(f, lambda e: matmuls.append(e) if isinstance(
                e, relax_.Call) and getattr(e.op, "name", "") == "relax.matmul" else None)
    assert len(matmuls) == 2 * 2  # q·kᵀ and p·v per layer


@pytest.mark.parametrize("backend", ["fx", "onnx"])
def test_kernel_survives_the_default_schedules(bert, backend):
    mod = bert["relax"][backend]
    hook = sparse_hook(0.5, BLOCK)  # then the default schedules
    assert "apply_default_schedules" in hook.__qualname__
    scheduled = hook(mod, resolve_target("x86"))
    assert sum(sparse_report(scheduled).values()) == LINEARS


def test_artifact_is_smaller(bert, builds):
    dense = runtime.read_metadata(builds("fx", "dense"))["library_bytes"]
    sparse = runtime.read_metadata(builds("fx", "sparse"))["library_bytes"]
    # 3/4 of the Linear weights (fp32) are gone; the three small kernels cost a little code
    linear_bytes = sum(w.nbytes for name, w in bert["fx"].weights().items() if w.ndim == 2
                       and "embeddings" not in name)
    assert dense - sparse > 0.5 * linear_bytes, (dense, sparse, linear_bytes)


def test_below_the_threshold_nothing_changes(bert):
    mod = bert["relax"]["fx"]
    assert lower_sparse(mod, resolve_target("x86"), threshold=0.9, block=BLOCK) is mod
    decisions = plan_sparse(mod, threshold=0.9, block=BLOCK)
    assert not any(d.lowered for d in decisions)
    assert all("< threshold 0.90" in d.reason for d in decisions)
    # a block the zeros do not follow: (1, 16) blocks of a (16, 1)-block-sparse weight are
    # almost never all zero
    assert not any(d.lowered for d in plan_sparse(mod, threshold=0.5, block=(1, 16)))


def test_auto_threshold_keeps_dense_where_sparse_is_slower():
    """The default threshold follows the block: 16x1 blocks pay from ~18 % zero blocks, 1x8
    blocks (one output feature: one vector lane of sixteen) only from ~90 %."""
    x86 = resolve_target("x86")
    assert crossover((16, 1), 16) < 0.25 < crossover((4, 4), 16) < 0.7 < crossover((1, 8), 16)
    # with enough rows of x the rows kernel makes narrow blocks pay much earlier
    assert crossover((4, 4), 16, rows=128) < 0.3 and crossover((1, 8), 16, rows=128) < 0.75
    module, inputs, _ = ZOO["bert"]()
    g = passes.threshold_weights(slimc.capture(module, inputs), sparsity=0.75, block=(1, 8))
    mod, _, _ = to_relax(g)
    auto = plan_sparse(mod, x86, block=(1, 8))
    assert auto and not any(d.lowered for d in auto)
    assert all("(auto: 1x8 blocks" in d.reason for d in auto)
    assert all(d.lowered for d in plan_sparse(mod, x86, threshold=0.5, block=(1, 8)))


def test_narrow_blocks_use_the_rows_kernel(tmp_path):
    """(2, 4) blocks with 32 rows of x: the rows kernel between two transposes, on FX and ONNX,
    equal to the thresholded model."""
    module, _, _ = ZOO["bert"]()
    ids = torch.randint(0, 100, (1, 32), generator=torch.Generator().manual_seed(0))
    g = passes.threshold_weights(slimc.capture(module, (ids,)), sparsity=0.7, block=(2, 4))
    x86 = resolve_target("x86")
    lanes = cpu_config(x86).lanes
    expected = "rows" if uses_rows_kernel((2, 4), 32, lanes) else "outputs"
    onnx_g = slimc.Graph("onnx", g.to_onnx())
    for source in (g, onnx_g):
        decisions = plan_sparse(to_relax(source)[0], x86, threshold=0.5, block=(2, 4))
        assert len(decisions) == LINEARS
        assert all(d.lowered and d.kernel == expected for d in decisions), decisions
        art = slimc.compile(source, "x86", tune=sparse_hook(0.5, (2, 4)))
        out = runtime.load(art.save(tmp_path / source.backend))(ids.numpy())
        assert np.abs(out[0] - g.run()[0]).max() < ATOL


def test_dense_model_is_left_alone():
    module, inputs, _ = ZOO["bert"]()
    mod, _, _ = to_relax(slimc.capture(module, inputs))
    assert lower_sparse(mod, resolve_target("x86"), threshold=0.01) is mod


def test_other_targets_are_left_alone(bert):
    mod = bert["relax"]["fx"]
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    assert lower_sparse(mod, cuda, threshold=0.5, block=BLOCK) is mod


def test_blocks_that_do_not_divide_are_skipped(bert):
    mod = bert["relax"]["fx"]
    decisions = plan_sparse(mod, threshold=0.5, block=(48, 1))
    assert decisions and not any(d.lowered for d in decisions)
    assert all("does not split into 48x1 blocks" in d.reason for d in decisions)


def test_dynamic_batch_onnx(tmp_path):
    """Symbolic rows: an ONNX MLP exported with a dynamic batch keeps it in the library."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(),
                              torch.nn.Linear(64, 32)).eval()
    with contextlib.redirect_stdout(io.StringIO()):
        prog = torch.onnx.export(mlp, (torch.randn(2, 32),), dynamo=True, input_names=["x"],
                                 dynamic_shapes=({0: "batch"},))
    prog.save(str(tmp_path / "mlp.onnx"))
    g = passes.threshold_weights(slimc.load(tmp_path / "mlp.onnx"), sparsity=0.6, block=BLOCK)
    mod, _, _ = to_relax(g)
    assert sum(sparse_report(lower_sparse(mod, threshold=0.5, block=BLOCK)).values()) == 2
    art = slimc.compile(g, "x86", tune=sparse_hook(0.5, BLOCK))
    assert "batch" in art.metadata["inputs"][0]["shape"]
    m = runtime.load(art.save(tmp_path / "art"))
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 32)).astype(np.float32)
        assert np.abs(m(x)[0] - g.run(x)[0]).max() < ATOL  # g.run: onnxruntime


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"threshold": 1.5}, "threshold=1.5 is neither 'auto' nor a fraction"),
    ({"threshold": -0.1}, "nor a fraction in"),
    ({"threshold": True}, "nor a fraction in"),
    ({"threshold": "fast"}, "nor a fraction in"),
    ({"block": (16,)}, "is not a block shape"),
    ({"block": (0, 4)}, "is not a block shape"),
    ({"block": "16x1"}, "is not a block shape"),
    ({"then": "tuned"}, "is not a schedule hook"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(OptionError, match=match):
        sparse_hook(**kwargs)
