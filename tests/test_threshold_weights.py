"""threshold_weights: the formula on known matrices, N:M groups, sparsity fractions, blocks, the
weights it must never touch, Taylor importance, and bad options — on FX and ONNX."""

from __future__ import annotations

import io
import math

import numpy as np
import onnx
import pytest
import torch
from zoo import ZOO, to_onnx

import slimc
from slimc import passes
from slimc.errors import OptionError, SlimcError, UnsupportedError
from slimc.passes.threshold_weights.fx import taylor_importance

_VALUES = np.array([-1, -0.5, -0.25, -0.125, 0, 0.125, 0.25, 0.5, 1], dtype=np.float32)


def _known(shape, seed) -> torch.Tensor:
    """Values from a small set of exactly representable numbers: zeros, and ties everywhere."""
    return torch.from_numpy(np.random.default_rng(seed).choice(_VALUES, size=shape))


def _set(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.copy_(_known(tuple(p.shape), seed + i))
    return module.eval()


class _Tiny(torch.nn.Module):
    """Embedding → Linear → LayerNorm → GELU → Linear."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)
        self.fc1 = torch.nn.Linear(8, 16)
        self.ln = torch.nn.LayerNorm(16)
        self.fc2 = torch.nn.Linear(16, 8)

    def forward(self, ids):
        return self.fc2(torch.nn.functional.gelu(self.ln(self.fc1(self.emb(ids)))))


class _Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3)
        self.fc = torch.nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class _Forms(torch.nn.Module):
    """Weights read as x @ A (in_out), x @ Bᵀ (a transposed read) and by Linear. Every reduction
    dimension is divisible by 4 and no output dimension is, so a wrong axis cannot pass."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(8, 6))  # (in, out)
        self.b = torch.nn.Parameter(torch.zeros(10, 12))  # (out, in), used transposed
        self.c = torch.nn.Linear(16, 6)

    def forward(self, x):
        return self.c(torch.cat([x[:, :8] @ self.a, x @ self.b.t()], dim=-1))


def _ids():
    return (torch.tensor([[1, 3, 5, 7, 9, 0]]),)


def _fx(module, inputs) -> slimc.Graph:
    return slimc.capture(module, inputs)


def _ts_onnx(module, inputs) -> slimc.Graph:
    """ONNX from the TorchScript exporter (fast; Linear on 2-D input becomes Gemm transB=1)."""
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, inputs, buf, dynamo=False, opset_version=17)
    return slimc.Graph("onnx", onnx.load_from_string(buf.getvalue()))


@pytest.fixture(scope="module")
def bert_fx():
    module, inputs, _ = ZOO["bert"]()
    return slimc.capture(module, inputs)


@pytest.fixture(scope="module")
def bert_onnx():
    return slimc.Graph("onnx", to_onnx("bert"))


def _canonical(g: slimc.Graph, name: str, w: np.ndarray) -> np.ndarray:
    """(out, reduction) matrix of a weight, found independently of the pass from the View."""
    for n in g.view().nodes:
        if n.op == "linear" and n.attrs["weight"] == name:
            return w if n.attrs["layout"] == "out_in" else w.T
    return w.reshape(w.shape[0], -1)  # conv (out, in·kh·kw), embedding (vocab, dim)


def _linear_weights(g: slimc.Graph) -> set[str]:
    return {n.attrs["weight"] for n in g.view().nodes if n.op == "linear"}


def _untouched_except(before: dict, after: dict, edited) -> None:
    assert before.keys() == after.keys()
    for k, w in before.items():
        if k not in edited:
            np.testing.assert_array_equal(w, after[k], err_msg=k)


# -- tau: the formula -------------------------------------------------------------------------

def _tiny_reference(module: torch.nn.Module, tau: float) -> torch.nn.Module:
    ref = _set(_Tiny())
    ref.load_state_dict(module.state_dict())
    with torch.no_grad():
        for lin in (ref.fc1, ref.fc2):
            w = lin.weight
            w.copy_(torch.where(w.abs() > tau, w, torch.zeros_like(w)))
    return ref


@pytest.mark.parametrize("backend", ["fx", "onnx"])
@pytest.mark.parametrize("tau", [0.125, 0.25, 0.3])
def test_tau_equals_formula_on_known_matrices(backend, tau):
    module = _set(_Tiny())
    g = _fx(module, _ids()) if backend == "fx" else _ts_onnx(module, _ids())
    before = g.weights()
    r = passes.threshold_weights.run(g, tau=tau)
    after = r.graph.weights()
    assert set(r.stats["layers"]) == _linear_weights(g) and len(r.stats["layers"]) == 2
    for name in r.stats["layers"]:
        w = before[name]
        np.testing.assert_array_equal(after[name], np.where(np.abs(w) > tau, w, 0))
        assert r.stats["layers"][name]["sparsity"] == np.mean(after[name] == 0)
    # embedding, LayerNorm and biases hold values <= tau too; they stay as they were
    _untouched_except(before, after, r.stats["layers"])
    with torch.no_grad():
        ref = _tiny_reference(module, tau)(*_ids()).numpy()
    out = r.graph.run(*(x.numpy() for x in _ids()))[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_tau_hand_written_matrix_strictly_greater():
    lin = torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -0.5, 0.25, -0.75], [0.0, 1.0, -0.25, 0.2]]))
    g = _fx(lin, (torch.randn(3, 4),))
    out = passes.threshold_weights(g, tau=0.25).get_weight("weight")
    np.testing.assert_array_equal(out, [[0.5, -0.5, 0, -0.75], [0, 1.0, 0, 0]])
    # tau compares real numbers: float32(0.1) is a hair above 0.1, so it stays
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, 0.1, 0.1, 0.1]] * 2))
    g = _fx(lin, (torch.randn(3, 4),))
    assert np.count_nonzero(passes.threshold_weights(g, tau=0.1).get_weight("weight")) == 8
    assert passes.threshold_weights(g, tau=0.1000001).nonzeros() == 0


@pytest.mark.parametrize("backend", ["fx", "onnx"])
def test_tau_zoo_formula_and_identity(backend, bert_fx, bert_onnx):
    g = bert_fx if backend == "fx" else bert_onnx
    before = g.weights()
    r = passes.threshold_weights.run(g, tau=0.02)
    after = r.graph.weights()
    assert set(r.stats["layers"]) == _linear_weights(g)
    for name in r.stats["layers"]:
        w = before[name]
        np.testing.assert_array_equal(after[name], np.where(np.abs(w) > 0.02, w, 0))
    assert 0.3 < r.stats["sparsity"] < 0.95
    _untouched_except(before, after, r.stats["layers"])
    assert any("embedding" in why for why in r.stats["skipped"].values())
    # tau = 0 is the identity
    same = passes.threshold_weights.run(g, tau=0)
    assert not same.modified
    x = g.sample_inputs()
    np.testing.assert_array_equal(same.graph.run(*x)[0], g.run(*x)[0])


# -- N:M ----------------------------------------------------------------------------------------

def _check_nm(g: slimc.Graph, before: dict, after: dict, names, n: int, m: int,
              by_magnitude: bool = True) -> None:
    """Every group of m along the reduction axis: non-zeros after = min(n, non-zeros before),
    kept values unchanged, and (by magnitude) no dropped |w| above a kept one."""
    for name in names:
        cb = _canonical(g, name, before[name])
        ca = _canonical(g, name, after[name])
        assert cb.shape[1] % m == 0
        gb = cb.reshape(cb.shape[0], -1, m)
        ga = ca.reshape(ca.shape[0], -1, m)
        nnz_b = np.count_nonzero(gb, axis=-1)
        nnz_a = np.count_nonzero(ga, axis=-1)
        np.testing.assert_array_equal(nnz_a, np.minimum(n, nnz_b), err_msg=name)
        assert np.all((ga == gb) | (ga == 0))
        if not by_magnitude:
            continue
        kept = np.where(ga != 0, np.abs(gb), np.inf).min(axis=-1)
        dropped = np.where((ga == 0) & (gb != 0), np.abs(gb), -np.inf).max(axis=-1)
        assert np.all(dropped <= kept), name


def test_nm_hand_written_matrix():
    lin = torch.nn.Linear(16, 1, bias=False)
    row = [0, 0, 0, 0, 1, 0, 0, 0, 3, -1, 0, 0, 0.5, -2, 0.25, 0.1]
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([row]))
    g = _fx(lin, (torch.randn(2, 16),))
    out = passes.threshold_weights(g, pattern="2:4").get_weight("weight")
    np.testing.assert_array_equal(out, [[0, 0, 0, 0, 1, 0, 0, 0, 3, -1, 0, 0, 0.5, -2, 0, 0]])
    # all tied: exactly 2 of 4 survive
    with torch.no_grad():
        lin.weight.fill_(0.5)
    g = _fx(lin, (torch.randn(2, 16),))
    out = passes.threshold_weights(g, pattern="2:4").get_weight("weight")
    assert (np.count_nonzero(out.reshape(-1, 4), axis=1) == 2).all()


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:4"])
@pytest.mark.parametrize("backend", ["fx", "onnx"])
def test_nm_with_ties_and_zeros_on_every_layout(backend, pattern):
    n, m = map(int, pattern.split(":"))
    module = _set(_Forms(), seed=3)
    inputs = (torch.randn(2, 12),)
    g = _fx(module, inputs) if backend == "fx" else _ts_onnx(module, inputs)
    before = g.weights()
    r = passes.threshold_weights.run(g, pattern=pattern)
    assert len(r.stats["layers"]) == 3
    _check_nm(g, before, r.graph.weights(), r.stats["layers"], n, m)
    _untouched_except(before, r.graph.weights(), r.stats["layers"])


@pytest.mark.parametrize("backend", ["fx", "onnx"])
def test_nm_conv_groups_run_over_in_kh_kw(backend):
    module = _set(_Conv(), seed=5)
    inputs = (torch.randn(1, 4, 6, 6),)
    g = _fx(module, inputs) if backend == "fx" else _ts_onnx(module, inputs)
    before = g.weights()
    r = passes.threshold_weights.run(g, pattern="2:4")
    kinds = sorted(v["kind"] for v in r.stats["layers"].values())
    assert kinds == ["conv", "linear"]
    _check_nm(g, before, r.graph.weights(), r.stats["layers"], 2, 4)


@pytest.mark.parametrize("backend", ["fx", "onnx"])
def test_nm_zoo(backend, bert_fx, bert_onnx):
    g = bert_fx if backend == "fx" else bert_onnx
    before = g.weights()
    r = passes.threshold_weights.run(g, pattern="2:4")
    assert set(r.stats["layers"]) == _linear_weights(g)
    _check_nm(g, before, r.graph.weights(), r.stats["layers"], 2, 4)
    assert r.stats["sparsity"] == 0.5  # random weights: no zeros, no ties


def test_nm_in_out_layout_gpt2():
    module, inputs, _ = ZOO["gpt2"]()
    g = slimc.capture(module, inputs)
    before = g.weights()
    r = passes.threshold_weights.run(g, pattern="2:4")
    w = before["model.h.0.mlp.c_proj.weight"]  # stored (in=256, out=64): groups run down axis 0
    assert w.shape == (256, 64)
    a = r.graph.get_weight("model.h.0.mlp.c_proj.weight")
    assert (np.count_nonzero(a.reshape(64, 4, 64), axis=1) == 2).all()
    _check_nm(g, before, r.graph.weights(), r.stats["layers"], 2, 4)


# -- sparsity -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["fx", "onnx"])
@pytest.mark.parametrize("s", [0.3, 0.5])
def test_sparsity_per_layer(backend, s, bert_fx, bert_onnx):
    g = bert_fx if backend == "fx" else bert_onnx
    before = g.weights()
    r = passes.threshold_weights.run(g, sparsity=s)
    after = r.graph.weights()
    for name, row in r.stats["layers"].items():
        w, a = before[name], after[name]
        assert np.count_nonzero(a == 0) == math.floor(s * w.size + 0.5)
        assert row["sparsity"] == np.mean(a == 0)
        assert np.abs(w[a == 0]).max() <= np.abs(w[a != 0]).min()
    _untouched_except(before, after, r.stats["layers"])


@pytest.mark.parametrize("backend", ["fx", "onnx"])
def test_sparsity_global(backend, bert_fx, bert_onnx):
    g = bert_fx if backend == "fx" else bert_onnx
    before = g.weights()
    r = passes.threshold_weights.run(g, sparsity=0.5, scope="global")
    after = r.graph.weights()
    names = list(r.stats["layers"])
    w = np.concatenate([before[k].ravel() for k in names])
    a = np.concatenate([after[k].ravel() for k in names])
    assert np.count_nonzero(a == 0) == math.floor(0.5 * w.size + 0.5)
    assert np.abs(w[a == 0]).max() <= np.abs(w[a != 0]).min()
    per_layer = [r.stats["layers"][k]["sparsity"] for k in names]
    assert max(per_layer) - min(per_layer) > 0.01  # one threshold, different layers
    assert r.stats["sparsity"] == pytest.approx(0.5, abs=1e-9)


def test_sparsity_counts_preexisting_zeros():
    """A layer already 1/9 zeros (the known values) with ties: still exactly round(s·n) zeros."""
    module = _set(_Tiny())
    g = _fx(module, _ids())
    r = passes.threshold_weights.run(g, sparsity=0.6)
    for name, row in r.stats["layers"].items():
        a = r.graph.get_weight(name)
        assert np.count_nonzero(a == 0) == math.floor(0.6 * a.size + 0.5)
        assert row["sparsity_before"] == np.mean(g.get_weight(name) == 0) > 0


# -- blocks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["fx", "onnx"])
@pytest.mark.parametrize("scope", ["per_layer", "global"])
def test_block_zeroes_whole_blocks(backend, scope, bert_fx, bert_onnx):
    g = bert_fx if backend == "fx" else bert_onnx
    br, bc = 4, 8
    before = g.weights()
    r = passes.threshold_weights.run(g, sparsity=0.5, block=(br, bc), scope=scope)
    after = r.graph.weights()
    zero_norms, kept_norms, nblocks, nzero = [], [], 0, 0
    for name in r.stats["layers"]:
        cb = _canonical(g, name, before[name])
        ca = _canonical(g, name, after[name])
        rows, k = cb.shape
        bb = cb.reshape(rows // br, br, k // bc, bc)
        ba = ca.reshape(rows // br, br, k // bc, bc)
        zero = (ba == 0).all(axis=(1, 3))
        same = (ba == bb).all(axis=(1, 3))
        assert (zero | same).all(), name  # every block is whole: gone or intact
        norms = np.sqrt(np.square(bb.astype(np.float64)).sum(axis=(1, 3)))
        if scope == "per_layer":
            assert zero.sum() == math.floor(0.5 * zero.size + 0.5)
            assert norms[zero].max() <= norms[~zero].min()
        zero_norms.append(norms[zero])
        kept_norms.append(norms[~zero])
        nblocks += zero.size
        nzero += zero.sum()
    if scope == "global":
        assert nzero == math.floor(0.5 * nblocks + 0.5)
        assert np.concatenate(zero_norms).max() <= np.concatenate(kept_norms).min()


# -- what must not be touched -----------------------------------------------------------------

class _Shared(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.fc2 = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(torch.relu(self.fc(x)))  # one weight, two Linear uses
        return self.fc2(h) * self.fc2.weight.mean()  # fc2.weight is also read by a mean


class _Tied(torch.nn.Module):
    """An embedding table that is also the output projection (tied weights)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)

    def forward(self, ids):
        return torch.nn.functional.linear(self.emb(ids), self.emb.weight)


@pytest.mark.parametrize("backend", ["fx", "onnx"])
def test_shared_weights(backend):
    module = _set(_Shared())
    inputs = (torch.randn(2, 8),)
    g = _fx(module, inputs) if backend == "fx" else _ts_onnx(module, inputs)
    before = g.weights()
    r = passes.threshold_weights.run(g, tau=0.25)
    fc2 = [k for k, why in r.stats["skipped"].items() if "must not change" in why]
    assert len(fc2) == 1 and fc2[0] not in r.stats["layers"]
    np.testing.assert_array_equal(r.graph.get_weight(fc2[0]), before[fc2[0]])
    (fc,) = r.stats["layers"]  # fc's weight, once, although two nodes use it
    np.testing.assert_array_equal(r.graph.get_weight(fc),
                                  np.where(np.abs(before[fc]) > 0.25, before[fc], 0))


@pytest.mark.parametrize("backend", ["fx", "onnx"])
def test_embeddings_only_when_asked(backend):
    module = _set(_Tiny())
    g = _fx(module, _ids()) if backend == "fx" else _ts_onnx(module, _ids())
    r = passes.threshold_weights.run(g, tau=0.25)
    (emb,) = [k for k, why in r.stats["skipped"].items() if "embedding" in why]
    np.testing.assert_array_equal(r.graph.get_weight(emb), g.get_weight(emb))
    r = passes.threshold_weights.run(g, tau=0.25, include=("embedding",))
    assert r.stats["layers"][emb]["kind"] == "embedding"
    w = g.get_weight(emb)
    np.testing.assert_array_equal(r.graph.get_weight(emb), np.where(np.abs(w) > 0.25, w, 0))


def test_tied_embedding_and_head():
    module = _set(_Tied())
    g = _fx(module, _ids())
    assert "emb.weight" in passes.threshold_weights.run(g, pattern="2:4").stats["skipped"]
    r = passes.threshold_weights.run(g, pattern="2:4", include="embedding")
    # the table (vocab, dim) and the head's weight (out=vocab, in=dim) agree on the axis
    assert r.stats["layers"]["emb.weight"]["sparsity"] == 0.5


def test_exclude_by_name():
    g = _fx(_set(_Tiny()), _ids())
    r = passes.threshold_weights.run(g, tau=0.25, exclude=("fc2.*",))
    assert set(r.stats["layers"]) == {"fc1.weight"}
    assert r.stats["skipped"]["fc2.weight"].startswith("excluded")
    np.testing.assert_array_equal(r.graph.get_weight("fc2.weight"), g.get_weight("fc2.weight"))


def test_input_untouched_every_kind():
    module = _set(_Tiny())
    state = {k: v.clone() for k, v in module.state_dict().items()}
    g = _fx(module, _ids())
    before = g.weights()
    out = passes.threshold_weights(g, sparsity=0.5)
    assert isinstance(out, slimc.Graph) and out.history[-1] == "threshold_weights"
    _untouched_except(before, g.weights(), ())
    gm = passes.threshold_weights(g.fx, sparsity=0.5)
    assert isinstance(gm, torch.fx.GraphModule) and gm is not g.fx
    _untouched_except(before, g.weights(), ())
    for k, v in module.state_dict().items():
        assert torch.equal(v, state[k])
    proto = _ts_onnx(module, _ids()).onnx
    raw = proto.SerializeToString()
    res = passes.threshold_weights(proto, pattern="2:4")
    assert isinstance(res, onnx.ModelProto) and proto.SerializeToString() == raw
    assert res.SerializeToString() != raw


# -- Taylor importance ------------------------------------------------------------------------

class _DeadUnit(torch.nn.Module):
    """Hidden unit 0 has the largest weights but nothing reads it; unit 1 feeds output 1 only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(4, 8)
        self.fc2 = torch.nn.Linear(8, 2)
        with torch.no_grad():
            self.fc1.weight.uniform_(0.5, 1.0)
            self.fc1.weight[0] = 10.0
            self.fc1.weight[1] = 5.0
            self.fc1.bias.fill_(1.0)
            self.fc2.weight[:, 0] = 0.0
            self.fc2.weight[0, 1] = 0.0

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_taylor_finds_what_magnitude_misses():
    g = _fx(_DeadUnit().eval(), (torch.rand(4, 4),))
    calib = [(np.random.default_rng(i).random((4, 4), dtype=np.float32),) for i in range(3)]
    opts = {"sparsity": 0.125, "exclude": ("fc2.*",)}  # 4 of fc1's 32 weights: one row
    mag = passes.threshold_weights(g, **opts).get_weight("fc1.weight")
    assert (mag[0] != 0).all()  # magnitude keeps the dead unit's big row
    tay = passes.threshold_weights(g, importance="taylor", calib=calib, **opts)
    w = tay.get_weight("fc1.weight")
    assert (w[0] == 0).all() and np.count_nonzero(w[1:] == 0) == 0
    gm = passes.threshold_weights(g.fx, importance="taylor", calib=calib, **opts)
    np.testing.assert_array_equal(gm.fc1.weight.detach().numpy(), w)  # a bare GraphModule too
    # a labelled loss on output 0 only: unit 1 (output 1 only) is now the unimportant one
    tay = passes.threshold_weights(g, importance="taylor", calib=calib, sparsity=0.25,
                                   exclude=("fc2.*",), loss=lambda outs, i: outs[0][:, 0].sum())
    w = tay.get_weight("fc1.weight")
    assert (w[:2] == 0).all() and np.count_nonzero(w[2:] == 0) == 0


def test_taylor_score_formula_with_a_loss():
    """ℓ = Σ y for y = x Wᵀ + b: ∂ℓ/∂Wᵢⱼ = Σₛ xₛⱼ, so I = (Wᵢⱼ Σₛ xₛⱼ)² exactly."""
    lin = torch.nn.Linear(5, 3)
    x = torch.randn(7, 5)
    gm = slimc.capture(lin, (x,)).fx
    imp = taylor_importance(gm, ["weight"], [(x.numpy(),)], loss=lambda o, i: o[0].sum())
    w = lin.weight.detach().double().numpy()
    np.testing.assert_allclose(imp["weight"], (w * x.double().numpy().sum(0)) ** 2,
                               rtol=1e-6)
    assert gm.weight.grad is None and gm.weight.requires_grad == lin.weight.requires_grad


def test_taylor_pattern_and_onnx_refusal():
    module = _DeadUnit().eval()
    g = _fx(module, (torch.rand(4, 4),))
    calib = [torch.rand(4, 4)]
    r = passes.threshold_weights.run(g, pattern="1:4", importance="taylor", calib=calib)
    _check_nm(g, g.weights(), r.graph.weights(), r.stats["layers"], 1, 4, by_magnitude=False)
    go = _ts_onnx(module, (torch.rand(4, 4),))
    with pytest.raises(UnsupportedError, match="autograd"):
        passes.threshold_weights(go, sparsity=0.5, importance="taylor", calib=calib)


# -- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("opts, match", [
    ({"tau": -0.1}, "tau"),
    ({"tau": float("nan")}, "tau"),
    ({"tau": "0.1"}, "tau"),
    ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": -0.1}, "sparsity"),
    ({"sparsity": True}, "sparsity"),
    ({"pattern": "4:2"}, "N:M"),
    ({"pattern": "2:2"}, "N:M"),
    ({"pattern": "0:4"}, "N:M"),
    ({"pattern": "2-4"}, "N:M"),
    ({"pattern": (2, 4)}, "N:M"),
    ({"sparsity": 0.5, "block": (0, 4)}, "block"),
    ({"sparsity": 0.5, "block": 4}, "block"),
    ({}, "how much"),
    ({"block": (1, 4)}, "how much"),
    ({"tau": 0.1, "sparsity": 0.5}, "together"),
    ({"tau": 0.1, "pattern": "2:4"}, "together"),
    ({"sparsity": 0.5, "pattern": "2:4"}, "together"),
    ({"tau": 0.1, "block": (1, 4)}, "block"),
    ({"pattern": "2:4", "block": (1, 4)}, "block"),
    ({"tau": 0.1, "scope": "global"}, "scope"),
    ({"sparsity": 0.5, "scope": "layer"}, "scope"),
    ({"sparsity": 0.5, "importance": "random"}, "importance"),
    ({"sparsity": 0.5, "importance": "taylor"}, "calib"),
    ({"tau": 0.1, "importance": "taylor", "calib": [1]}, "tau"),
    ({"sparsity": 0.5, "calib": [1]}, "taylor"),
    ({"sparsity": 0.5, "include": ("bias",)}, "include"),
])
def test_bad_options(opts, match):
    g = _fx(_set(_Tiny()), _ids())
    before = g.weights()
    with pytest.raises(OptionError, match=match) as e:
        passes.threshold_weights(g, **opts)
    assert isinstance(e.value, SlimcError) and e.value.fix
    _untouched_except(before, g.weights(), ())


@pytest.mark.parametrize("backend", ["fx", "onnx"])
def test_reduction_not_divisible(backend):
    module = _set(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 6),
                                      torch.nn.ReLU(), torch.nn.Linear(6, 2)))
    inputs = (torch.randn(2, 8),)
    g = _fx(module, inputs) if backend == "fx" else _ts_onnx(module, inputs)
    before = g.weights()
    with pytest.raises(OptionError, match="not divisible by M=4") as e:
        passes.threshold_weights(g, pattern="2:4")
    assert "exclude=" in e.value.fix
    _untouched_except(before, g.weights(), ())  # nothing half-done
    with pytest.raises(OptionError, match="not divisible by block"):
        passes.threshold_weights(g, sparsity=0.5, block=(1, 8))
    # the fix works: exclude the offending layer
    name = [k for k, w in before.items() if w.ndim == 2 and 6 in w.shape and 2 in w.shape]
    r = passes.threshold_weights.run(g, pattern="2:4", exclude=name)
    assert len(r.stats["layers"]) == 2


def test_bad_calibration_batch():
    g = _fx(_DeadUnit().eval(), (torch.rand(4, 4),))
    with pytest.raises(SlimcError, match="shape"):
        passes.threshold_weights(g, sparsity=0.5, importance="taylor", calib=[torch.rand(3, 5)])
