"""SmoothQuant: the factors equal the formula, the smoothed fp32 model equals the original (FX and
ONNX, LayerNorm / RMSNorm-scale / Linear producers), the int8 model with smoothing is closer to
fp32 than without on a model with activation outliers, and the refusals."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from zoo import ZOO, to_onnx

import slimc
from slimc import passes
from slimc.errors import OptionError, ShapeError, SlimcError, UnsupportedError
from slimc.passes.smooth_quant import _math as sm


class _PreLN(torch.nn.Module):
    """A pre-LayerNorm block whose LayerNorms have a few huge gammas (the activation outlier
    channels SmoothQuant is for), and a low-rank pair (Linear → Linear, no bias between)."""

    def __init__(self, d=32, heads=4, outliers=(3, 17)):
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.f1, self.f2 = torch.nn.Linear(d, 64), torch.nn.Linear(64, d)
        self.down, self.up = torch.nn.Linear(d, 8, bias=False), torch.nn.Linear(8, d)
        with torch.no_grad():
            for ln in (self.ln1, self.ln2):
                ln.weight.copy_(1 + 0.1 * torch.randn(d))
                ln.bias.copy_(0.1 * torch.randn(d))
                ln.weight[list(outliers)] = torch.tensor([40.0, -60.0])
        self.eval()

    def forward(self, x):
        b, t, d = x.shape
        y = self.ln1(x)
        q, k, v = (m(y).view(b, t, self.heads, -1).transpose(1, 2)
                   for m in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        x = x + self.f2(torch.nn.functional.gelu(self.f1(self.ln2(x))))
        return x + self.up(self.down(x))


class _PostLN(torch.nn.Module):
    """BERT's post-LayerNorm layout: every LayerNorm output feeds the residual Add as well as
    the next Linears, so no fold is exact; outlier gammas as in _PreLN."""

    def __init__(self, d=32, heads=4, outliers=(3, 17)):
        super().__init__()
        torch.manual_seed(1)
        self.heads = heads
        self.ln0, self.ln1, self.ln2 = (torch.nn.LayerNorm(d) for _ in range(3))
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.f1, self.f2 = torch.nn.Linear(d, 64), torch.nn.Linear(64, d)
        with torch.no_grad():
            for ln in (self.ln0, self.ln1):
                ln.weight.copy_(1 + 0.1 * torch.randn(d))
                ln.weight[list(outliers)] = torch.tensor([40.0, -60.0])
        self.eval()

    def forward(self, x):
        b, t, d = x.shape
        y = self.ln0(x)
        q, k, v = (m(y).view(b, t, self.heads, -1).transpose(1, 2)
                   for m in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v
        y = self.ln1(y + self.o(a.transpose(1, 2).reshape(b, t, d)))
        return self.ln2(y + self.f2(torch.nn.functional.gelu(self.f1(y))))


_POST: list = []


def _post_ln() -> _PostLN:
    if not _POST:
        _POST.append(_PostLN())
    return _POST[0]


def _batches(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(2, 8, 32)).astype(np.float32),) for _ in range(n)]


_GRAPHS: dict = {}


def _graph(backend, module, x) -> slimc.Graph:
    """The module's graph, captured once per (backend, module, input shape): passes never edit
    their input, so tests share it."""
    key = (backend, id(module), x.shape)
    if key not in _GRAPHS:
        _GRAPHS[key] = (module, _export(backend, module, x))  # keeps id(module) alive
    return _GRAPHS[key][1]


def _export(backend, module, x) -> slimc.Graph:
    if backend == "fx":
        return slimc.capture(module, (torch.from_numpy(x),))
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, (torch.from_numpy(x),), buf, dynamo=False, opset_version=17)
    return slimc.Graph("onnx", onnx.load_from_string(buf.getvalue()))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def model():
    return _PreLN()


def test_factors_formula():
    # s_j = max|X_j|^α / max|W_j|^(1−α); 1 where X or W is zero on that channel
    s = sm.factors(np.array([4.0, 1.0, 0.0, 9.0]), np.array([1.0, 4.0, 2.0, 0.0]), 0.5)
    np.testing.assert_allclose(s, [2.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(sm.factors(np.array([8.0]), np.array([2.0]), 1.0), [8.0])
    np.testing.assert_allclose(sm.factors(np.array([8.0]), np.array([2.0]), 0.0), [0.5])
    assert sm.factors(np.array([1e-12]), np.array([1.0]), 1.0)[0] == sm.MIN_SCALE


@pytest.mark.parametrize("backend", ["fx", "onnx"])
def test_smoothed_fp32_model_equals_the_original(model, backend):
    calib = _batches()
    x = _batches(1, seed=9)[0][0]
    g = _graph(backend, model, x)
    r = passes.smooth_quant.run(g, alpha=0.5, calib=calib)
    groups = {v["kind"]: len(v["consumers"]) for v in r.stats["groups"].values()}
    kinds = sorted((v["kind"], len(v["consumers"])) for v in r.stats["groups"].values())
    # ln1 → q, k, v; ln2 → f1; down → up. The o / f2 inputs come from attention / GELU.
    assert kinds == [("layernorm", 1), ("layernorm", 3), ("linear", 1)], groups
    assert r.modified and r.stats["matched"] == r.stats["changed"] == 3
    assert _rel(r.graph.run(x)[0], g.run(x)[0]) < 1e-5
    changed = [k for k, w in g.weights().items() if not np.array_equal(w, r.graph.weights()[k])]
    assert changed  # the weights did move
    for v in r.stats["groups"].values():  # outliers moved into the weights
        assert v["act_absmax_after"] < v["act_absmax_before"] / 3


def test_factors_are_smoothquants_on_qkv(model):
    # independent: the LayerNorm output by torch on the calibration batches, the stacked
    # Q/K/V weights; s = gamma / gamma' must be max|X_j|^α / max|W_j|^(1−α)
    calib = _batches()
    alpha = 0.7
    g = _graph("fx", model, calib[0][0])
    out = passes.smooth_quant(g, alpha=alpha, calib=calib)
    with torch.no_grad():
        xs = torch.cat([model.ln1(torch.from_numpy(b[0])).reshape(-1, 32) for b in calib])
        w_max = torch.cat([model.q.weight, model.k.weight, model.v.weight]).abs().amax(0)
    x_max = xs.abs().amax(0).double().numpy()
    want = x_max ** alpha / w_max.double().numpy() ** (1 - alpha)
    gamma = model.ln1.weight.detach().numpy()
    (name,) = [k for k in g.weights() if "ln1" in k and "weight" in k]
    np.testing.assert_allclose(gamma / out.get_weight(name), want, rtol=1e-5)
    qname = next(k for k in g.weights() if k.startswith("q") and "weight" in k)
    np.testing.assert_allclose(out.get_weight(qname), model.q.weight.detach().numpy() * want,
                               rtol=1e-5)


@pytest.mark.parametrize("backend", ["fx", "onnx"])
def test_int8_error_is_lower_with_smoothing(model, backend):
    calib = _batches()
    # an input the calibration saw: the gain is in rounding, not in clipping unseen outliers
    x = calib[0][0]
    g = _graph(backend, model, x)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    err = {}
    for alpha in (None, 0.5):
        q = passes.quantize.run(g, calib=calib, smooth=alpha)
        assert ("smooth" in q.stats) == (alpha is not None)
        y = passes.fold_fake_quant(q.graph).run(x)[0]
        err[alpha] = float(np.linalg.norm(np.asarray(y) - ref) / np.linalg.norm(ref))
    assert err[0.5] < 0.5 * err[None], err


@pytest.mark.parametrize("backend", ["fx", "onnx"])
def test_post_norm_insert_mode(backend):
    module = _post_ln()
    calib = _batches()
    x = calib[0][0]
    g = _graph(backend, module, x)
    folded = passes.smooth_quant.run(g, alpha=0.5, calib=calib, on_no_match="warn")
    assert folded.stats["matched"] == 0  # fold mode: nothing is exact to fold
    r = passes.smooth_quant.run(g, alpha=0.5, calib=calib, mode="insert")
    groups = sorted(len(v["consumers"]) for v in r.stats["groups"].values())
    assert groups == [1, 3] and not any(v["folded"] for v in r.stats["groups"].values())
    muls = ("Mul", "aten.mul.Tensor")
    count = sum(v for k, v in r.graph.op_histogram().items() if k in muls or "mul.Tensor" in k)
    before = sum(v for k, v in g.op_histogram().items() if k in muls or "mul.Tensor" in k)
    assert count == before + 2  # one scale in front of Q/K/V, one in front of f1
    assert _rel(r.graph.run(x)[0], g.run(x)[0]) < 1e-5
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    err = {}
    for alpha in (None, 0.5):
        q = passes.quantize(g, calib=calib, smooth=alpha, smooth_mode="insert")
        y = passes.fold_fake_quant(q).run(x)[0]
        err[alpha] = float(np.linalg.norm(np.asarray(y) - ref) / np.linalg.norm(ref))
    assert err[0.5] < 0.5 * err[None], err


def test_quantize_smoothing_nothing_is_no_silent_no_op():
    from slimc.passes._no_match import NoMatchWarning, on_no_match
    calib = _batches(2)
    g = _graph("fx", _post_ln(), calib[0][0])
    with pytest.raises(UnsupportedError, match="smooth") as e:
        passes.quantize(g, calib=calib, smooth=0.5)  # fold mode: nothing folds post-norm
    assert "smooth_mode='insert'" in e.value.fix
    with on_no_match("warn"), pytest.warns(NoMatchWarning, match="smooth"):
        r = passes.quantize.run(g, calib=calib, smooth=0.5)
    assert r.stats["quantized"] and r.stats["smooth"]["matched"] == 0
    # the pass alone too: nothing to fold raises, naming the mode that would apply
    with pytest.raises(UnsupportedError, match="mode='insert'"):
        passes.smooth_quant(g, alpha=0.5, calib=calib)
    assert passes.smooth_quant.run(g, alpha=0.5, calib=calib, mode="insert").stats["changed"]


@pytest.mark.slow  # a transformers capture / dynamo export: several seconds
def test_zoo_bert_insert_mode_is_exact():
    module, inputs, _ = ZOO["bert"]()
    g = slimc.capture(module, inputs)
    calib = [g.sample_inputs(seed=i) for i in range(2)]
    x = g.sample_inputs(seed=5)
    r = passes.smooth_quant.run(g, alpha=0.5, calib=calib, mode="insert")
    assert r.stats["matched"] == 4  # embeddings LN → Q/K/V, attention LN → FFN, twice
    assert _rel(r.graph.run(*x)[0], g.run(*x)[0]) < 1e-5


@pytest.mark.parametrize("name,kind", [("vit", "layernorm"), ("llama", "scale")])
def test_zoo_pre_norm_models_fx(name, kind):
    module, inputs, _ = ZOO[name]()
    g = slimc.capture(module, inputs)
    calib = [g.sample_inputs(seed=i) for i in range(2)]
    x = g.sample_inputs(seed=5)
    r = passes.smooth_quant.run(g, alpha=0.5, calib=calib)
    assert r.stats["matched"] == 4  # 2 layers × (before attention, before the MLP)
    assert {v["kind"] for v in r.stats["groups"].values()} == {kind}
    assert _rel(r.graph.run(*x)[0], g.run(*x)[0]) < 1e-5


@pytest.mark.slow  # a transformers capture / dynamo export: several seconds
def test_zoo_vit_onnx_with_merged_layernorm_initializers():
    # the dynamo exporter merges the (equal, freshly initialised) LayerNorm gammas of all
    # layers into one initializer: each smoothed LayerNorm gets a private copy
    g = slimc.Graph("onnx", to_onnx("vit"))
    calib = [g.sample_inputs(seed=i) for i in range(2)]
    x = g.sample_inputs(seed=5)
    r = passes.smooth_quant.run(g, alpha=0.5, calib=calib)
    assert r.stats["matched"] == 4
    assert _rel(r.graph.run(*x)[0], g.run(*x)[0]) < 1e-5


def test_post_norm_bert_is_refused_with_the_reason():
    # BERT's LayerNorm output feeds the residual Add as well as Q/K/V: no exact fold exists
    module, inputs, _ = ZOO["bert"]()
    g = slimc.capture(module, inputs)
    r = passes.smooth_quant.run(g, alpha=0.5, calib=[g.sample_inputs()], on_no_match="warn")
    assert r.stats["matched"] == 0 and not r.modified
    assert any("not a Linear" in why for why in r.stats["skipped"].values())


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_bad_alpha(model, alpha):
    calib = _batches(1)
    g = _graph("fx", model, calib[0][0])
    with pytest.raises(OptionError, match="alpha") as e:
        passes.smooth_quant(g, alpha=alpha, calib=calib)
    assert e.value.fix
    with pytest.raises(OptionError, match="smooth"):
        passes.quantize(g, calib=calib, smooth=alpha)


def test_bad_calibration(model):
    calib = _batches(1)
    g = _graph("fx", model, calib[0][0])
    before = g.weights()
    with pytest.raises(OptionError, match="calib"):
        passes.smooth_quant(g, alpha=0.5)
    with pytest.raises(OptionError, match="calib"):
        passes.smooth_quant(g, alpha=0.5, calib=[])
    with pytest.raises(ShapeError, match="shape"):
        passes.smooth_quant(g, alpha=0.5, calib=[(np.zeros((2, 8, 31), np.float32),)])
    with pytest.raises(OptionError, match="static"):
        passes.quantize(g, activations="dynamic", smooth=0.5)
    with pytest.raises(OptionError, match="mode"):
        passes.smooth_quant(g, alpha=0.5, calib=calib, mode="both")
    with pytest.raises(OptionError, match="smooth_mode"):
        passes.quantize(g, calib=calib, smooth=0.5, smooth_mode="both")
    with pytest.raises(SlimcError):
        passes.quantize(g, smooth=0.5)  # static without calib
    assert all(np.array_equal(w, g.weights()[k]) for k, w in before.items())


# -- recipes and the command line ------------------------------------------------------------

def test_recipe_hands_calib_only_where_it_is_read(model):
    from slimc.recipe import Recipe
    calib = _batches(2)
    g = _graph("fx", model, calib[0][0])
    # magnitude thresholding refuses calib=, so apply() must not hand it the shared batches
    for steps in ([("threshold_weights", {"sparsity": 0.5}), ("quantize", {"smooth": 0.5})],
                  [("threshold_weights", {"sparsity": 0.5, "importance": "wanda"}),
                   ("quantize", {})]):
        new, _ = Recipe.from_dict({"passes": [{"name": n, **o} for n, o in steps]}).apply(
            g, calib=calib)
        assert new.history[-2:] == ["threshold_weights", "quantize"]
    with pytest.raises(OptionError, match="smooth"):
        Recipe.from_dict({"passes": [{"name": "quantize", "smooth": "high"}]}).apply(
            g, calib=calib)


def test_cli_wanda_and_smoothquant_flags(model, tmp_path):
    from slimc.cli import main
    calib = _batches(3)
    g = _graph("onnx", model, calib[0][0])
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    g.save(src)
    npz = tmp_path / "calib.npz"
    np.savez(npz, **{g.input_names[0]: np.stack([b[0] for b in calib])})
    assert main(["optimize", str(src), "-o", str(out), "--sparsity", "0.5", "--importance",
                 "wanda", "--quantize", "int8", "--smooth", "0.5", "--calib", str(npz)]) == 0
    got = slimc.load(out)
    assert any(w.dtype == np.int8 for w in got.weights().values())
    y = got.run(calib[0][0])[0]
    assert np.isfinite(y).all() and y.shape == (2, 8, 32)
    # magnitude thresholding with --calib (for quantize) works too
    assert main(["optimize", str(src), "-o", str(out), "--sparsity", "0.5", "--quantize",
                 "int8", "--calib", str(npz)]) == 0
    assert main(["optimize", str(src), "-o", str(out), "--quantize", "int8", "--smooth", "0.5",
                 "--smooth-mode", "insert", "--calib", str(npz)]) == 0
