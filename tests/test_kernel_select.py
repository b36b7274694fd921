"""Kernel selection (slimc.codegen.select): a plain ``slimc.compile`` (tune="default") gives
int8 matmuls the VNNI kernels where the target has AVX512-VNNI and block-sparse weights the BSR
kernels past the crossover, both in one build; ``metadata["kernels"]`` and ``slimc compile``
say which kernels each matmul got; an explicit ``tune=`` wins; int8 on a CPU without VNNI warns.

Builds for named targets (Cascade Lake, Zen 3, Haswell) are checked without running, so the
tests hold on any x86 CI machine; what runs, runs on the host.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from zoo import ZOO

import slimc
from slimc import passes, runtime
from slimc.codegen import resolve_target, to_relax
from slimc.codegen.int8 import has_vnni, int8_schedules
from slimc.codegen.schedules import apply_default_schedules
from slimc.codegen.select import SlowInt8Warning
from slimc.codegen.sparse import plan_sparse

VNNI = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake"}
NO_VNNI = [{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu}
           for cpu in ("znver3", "haswell")]
LINEARS = 12  # tiny BERT: q, k, v, attention output, FFN in, FFN out × 2 layers


class _Net(torch.nn.Module):
    """Two Linears to quantize and one whose weight is 90 % zero 16x1 blocks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(32, 64)
        self.b = torch.nn.Linear(64, 32)
        self.sparse = torch.nn.Linear(32, 64)
        keep = torch.rand(64 // 16, 32) >= 0.9
        with torch.no_grad():
            self.sparse.weight.mul_(keep.repeat_interleave(16, 0).float())

    def forward(self, x):
        return self.sparse(self.b(torch.relu(self.a(x))))


def _asm(executable) -> str:
    def walk(m):
        yield m
        for i in m.imports:
            yield from walk(i)
    return "".join(m.inspect_source("asm") for m in walk(executable.mod) if m.kind == "llvm")


def _compile(g, target, **kw):
    """slimc.compile with every warning an error: a test that expects one says so."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowInt8Warning)
        return slimc.compile(g, target, **kw)


@pytest.fixture(scope="module")
def models():
    x = np.random.default_rng(0).standard_normal((2, 8, 32)).astype(np.float32)
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(_Net().eval(), (torch.from_numpy(x),), buf, dynamo=False,
                          opset_version=17)
    g = slimc.Graph("onnx", onnx.load_from_string(buf.getvalue()), example_inputs=(x,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = passes.quantize(g, calib=[(x,)], symmetric=False, exclude=["*sparse*"])
    return x, g, passes.fold_fake_quant(q)


# -- int8 --------------------------------------------------------------------------------------
def test_plain_build_for_a_vnni_cpu_picks_vnni_and_bsr(models):
    """Cascade Lake, build only: both quantized Linears are vpdpbusd kernels and the sparse one
    a BSR kernel, in one build with no tune= named."""
    _, _, folded = models
    art = _compile(folded, VNNI)
    assert art.metadata["kernels"] == {"int8_vnni": 2, "int8_generic": 0, "bsr": 1, "dense": 0}
    assert art.metadata["schedules"] == "select_kernels"
    assert "vpdpbusd" in _asm(art.executable)


@pytest.mark.parametrize("target", NO_VNNI, ids=lambda t: t["mcpu"])
def test_plain_build_without_vnni_keeps_int32_and_warns(models, target):
    _, _, folded = models
    with pytest.warns(SlowInt8Warning, match="2 int8 matmuls compiled as int32 loops"):
        art = slimc.compile(folded, target)
    assert art.metadata["kernels"] == {"int8_vnni": 0, "int8_generic": 2, "bsr": 1, "dense": 0}
    assert "vpdpbusd" not in _asm(art.executable)


@pytest.mark.parametrize("target", NO_VNNI, ids=lambda t: t["mcpu"])
def test_fp32_build_without_vnni_does_not_warn(models, target):
    _, g, _ = models
    art = _compile(g, target)  # a SlowInt8Warning would raise
    assert art.metadata["kernels"] == {"int8_vnni": 0, "int8_generic": 0, "bsr": 1, "dense": 2}


def test_plain_build_on_this_cpu_equals_the_explicit_int8_build(models, tmp_path):
    """What runs here: the plain build and tune=int8_schedules give the same outputs (and the
    same kernels: VNNI where this CPU has it, else int32 loops and a warning)."""
    x, _, folded = models
    host = resolve_target("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowInt8Warning)
        plain = slimc.compile(folded, "x86").save(tmp_path / "plain")
        explicit = slimc.compile(folded, "x86", tune=int8_schedules).save(tmp_path / "explicit")
    meta = runtime.read_metadata(plain)
    assert meta["kernels"]["int8_vnni"] == (2 if has_vnni(host) else 0)
    assert meta["kernels"]["bsr"] == 1
    got, want = runtime.load(plain)(x)[0], runtime.load(explicit)(x)[0]
    reference = folded.run(x)[0]
    assert np.abs(got - reference).max() <= 1e-5 * np.abs(reference).max()
    # the explicit build keeps the sparse Linear dense: the two differ by fp32 rounding only
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_explicit_tune_wins(models):
    """tune=apply_default_schedules on a VNNI target: no VNNI, no BSR, and no warning (the
    target has the instructions; the choice was the caller's)."""
    _, _, folded = models
    art = _compile(folded, VNNI, tune=apply_default_schedules)
    assert art.metadata["kernels"] == {"int8_vnni": 0, "int8_generic": 2, "bsr": 0, "dense": 1}
    assert "vpdpbusd" not in _asm(art.executable)
    art = _compile(folded, VNNI, tune=int8_schedules)
    assert art.metadata["kernels"] == {"int8_vnni": 2, "int8_generic": 0, "bsr": 0, "dense": 1}


# -- block sparsity ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert():
    module, inputs, _ = ZOO["bert"]()
    return module, slimc.capture(module, inputs)


@pytest.mark.parametrize("block", [(16, 1), (4, 4)])
def test_plain_build_of_a_block_sparse_bert_gets_bsr(bert, block, tmp_path):
    """Thresholded to 90 % zero blocks: every Linear is a BSR kernel, with the block shape it
    was thresholded in (block="auto" judges each weight), and the build equals torch."""
    module, g = bert
    s = passes.threshold_weights(g, sparsity=0.9, block=block)
    decisions = plan_sparse(to_relax(s)[0], resolve_target("x86"), threshold="auto",
                            block="auto")
    assert [d.block for d in decisions if d.lowered] == [block] * LINEARS, decisions
    art = _compile(s, "x86")
    assert art.metadata["kernels"] == {"int8_vnni": 0, "int8_generic": 0, "bsr": LINEARS,
                                       "dense": 4}  # q·kᵀ and p·v per layer stay dense
    got = runtime.load(art.save(tmp_path / "art"))(*s.example_inputs)
    for o, ref in zip(got, s.run(), strict=True):
        assert np.abs(o - ref).max() < 1e-4


def test_dense_or_lightly_sparse_bert_stays_dense(bert):
    """Below every block shape's crossover (5 % zero blocks) and dense: no BSR."""
    _, g = bert
    for graph in (g, passes.threshold_weights(g, sparsity=0.05, block=(16, 1))):
        art = _compile(graph, "x86")
        assert art.metadata["kernels"]["bsr"] == 0
        assert art.metadata["kernels"]["dense"] == LINEARS + 4


def test_explicit_tune_keeps_a_sparse_model_dense(bert):
    _, g = bert
    s = passes.threshold_weights(g, sparsity=0.9, block=(16, 1))
    art = _compile(s, "x86", tune=apply_default_schedules)
    assert art.metadata["kernels"]["bsr"] == 0
    assert art.metadata["schedules"] == "apply_default_schedules"


# -- the CLI -------------------------------------------------------------------------------------
def test_cli_compile_says_which_kernels(models, tmp_path, capsys):
    from slimc.cli import main
    _, _, folded = models
    folded.save(tmp_path / "m.onnx")
    assert main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "art"),
                 "--target", "x86"]) == 0
    err = capsys.readouterr().err
    vnni = has_vnni(resolve_target("x86"))
    line = "2 int8 VNNI" if vnni else "2 int8 as int32 loops"
    assert f"slimc: kernels: {line}, 1 block-sparse (BSR) matmuls (select_kernels)" in err
    assert ("slimc: warning:" in err) is (not vnni)
