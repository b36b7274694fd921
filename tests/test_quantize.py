"""quantize: observer and scale math on known arrays, the affine map within one step, and the
pass on FX and ONNX — checked against a numpy reference of the fake-quant model, against the
other backend, and on bad options."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from zoo import ZOO, to_onnx

import slimc
from slimc import passes
from slimc.errors import OptionError, UnsupportedError
from slimc.passes.quantize import _math as qm

# -- observer and scale math -----------------------------------------------------------------


def _observe(data, chunks=1) -> qm.Observer:
    obs = qm.Observer()
    for part in np.array_split(np.asarray(data, dtype=np.float32), chunks):
        obs.update(part)
    return obs


def test_minmax_symmetric_scale_is_max_abs_over_127():
    x = np.array([-0.5, 0.25, 2.54, -1.0], dtype=np.float32)
    lo, hi = qm.choose_range(_observe(x), "minmax", qm.ACT_SYMMETRIC, True)
    qp = qm.qparams_from_range(lo, hi, qm.ACT_SYMMETRIC, True)
    assert float(qp.scale) == pytest.approx(2.54 / 127, rel=1e-6)
    assert int(qp.zero_point) == 0
    assert qm.quantize(x, qp).tolist() == [-25, 12, 127, -50]


def test_minmax_asymmetric_scale_and_zero_point():
    x = np.array([-1.0, 0.0, 3.0], dtype=np.float32)
    lo, hi = qm.choose_range(_observe(x), "minmax", qm.ACT_ASYMMETRIC, False)
    qp = qm.qparams_from_range(lo, hi, qm.ACT_ASYMMETRIC, False)
    assert float(qp.scale) == pytest.approx(4.0 / 255, rel=1e-6)
    assert int(qp.zero_point) == 64  # 0 − round(−1 / (4/255)) = round(63.75)
    assert qm.quantize(x, qp).tolist() == [0, 64, 255]  # −1 clamps at 0 (63.75 → 64 shift)


def test_asymmetric_range_always_holds_zero():
    qp = qm.qparams_from_range(2.0, 6.0, qm.ACT_ASYMMETRIC, False)
    assert int(qp.zero_point) == 0  # the range became [0, 6]
    assert qm.dequantize(qm.quantize(np.zeros(3), qp), qp).tolist() == [0.0, 0.0, 0.0]


def test_all_zero_tensor_gets_unit_scale_and_round_trips():
    obs = _observe(np.zeros(100))
    for sym in (True, False):
        grid = qm.activation_grid(sym)
        qp = qm.qparams_from_range(*qm.choose_range(obs, "entropy", grid, sym), grid, sym)
        assert float(qp.scale) == 1.0
        assert not np.any(qm.fake_quantize(np.zeros(5), qp))


def test_percentile_keeps_the_requested_share():
    x = np.arange(10_000, dtype=np.float32)  # |x| uniform on [0, 9999]
    obs = _observe(x, chunks=5)
    lo, hi = qm.choose_range(obs, "percentile", qm.ACT_SYMMETRIC, True, percentile=99.0)
    assert hi == -lo
    assert abs(hi - 9899.0) <= 2 * obs.width
    inside = np.mean(np.abs(x) <= hi)
    assert inside == pytest.approx(0.99, abs=2e-4)


def test_percentile_asymmetric_cuts_each_tail():
    x = np.arange(-5000, 5000, dtype=np.float32)
    obs = _observe(x, chunks=3)
    lo, hi = qm.choose_range(obs, "percentile", qm.ACT_ASYMMETRIC, False, percentile=98.0)
    assert lo == pytest.approx(-4900, abs=2 * obs.width)
    assert hi == pytest.approx(4899, abs=2 * obs.width)


@pytest.mark.parametrize("sym", [True, False])
def test_entropy_and_mse_clip_outliers_below_max(sym):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(200_000), [60.0, -55.0]]).astype(np.float32)
    obs = _observe(x, chunks=4)
    grid = qm.activation_grid(sym)
    for method in ("entropy", "mse", "percentile"):
        lo, hi = qm.choose_range(obs, method, grid, sym)
        assert -55.0 <= lo < 0 < hi <= 60.0, method
        assert max(-lo, hi) < 40.0, f"{method} kept the outliers: ({lo}, {hi})"


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_entropy_and_mse_keep_the_range_of_uniform_data(method):
    x = np.random.default_rng(1).uniform(-1, 1, 100_000).astype(np.float32)
    lo, hi = qm.choose_range(_observe(x), method, qm.ACT_SYMMETRIC, True)
    assert 0.9 <= hi <= 1.0 and lo == -hi


@pytest.mark.parametrize("sym", [True, False])
def test_mse_choice_is_near_the_brute_force_optimum(sym):
    """The histogram estimate picks a clip whose true error (on the raw values) is within 5 %
    of the best of 200 clips tried exhaustively."""
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.laplace(size=50_000), [80.0, -70.0]]).astype(np.float32)
    grid = qm.activation_grid(sym)
    obs = _observe(x, chunks=3)

    def err(lo, hi):
        qp = qm.qparams_from_range(lo, hi, grid, sym)
        return float(np.mean((qm.fake_quantize(x, qp) - x) ** 2))

    chosen = err(*qm.choose_range(obs, "mse", grid, sym))
    lo, hi = qm.choose_range(obs, "minmax", grid, sym)
    best = min(err(a * lo, a * hi) for a in np.linspace(0.01, 1, 200))
    assert chosen <= 1.05 * best


def test_histogram_growth_is_exact():
    """Batches of growing range: the merged histogram holds every value, and the chunked
    percentile agrees with the one-batch one within a bin."""
    x = np.random.default_rng(3).laplace(size=40_000).astype(np.float32)
    x.sort()  # the range grows batch after batch
    chunked, whole = _observe(np.abs(x), 16), _observe(np.abs(x), 1)
    assert chunked.magnitudes().sum() == x.size
    a = qm.choose_range(chunked, "percentile", qm.ACT_SYMMETRIC, True, 99.0)[1]
    b = qm.choose_range(whole, "percentile", qm.ACT_SYMMETRIC, True, 99.0)[1]
    assert abs(a - b) <= chunked.width + whole.width


@pytest.mark.parametrize("method", qm.METHODS)
@pytest.mark.parametrize("sym", [True, False])
def test_quantize_dequantize_of_calibration_tensor_within_one_step(method, sym):
    x = np.random.default_rng(4).standard_normal((64, 96)).astype(np.float32) * 3
    grid = qm.activation_grid(sym)
    lo, hi = qm.choose_range(_observe(x), method, grid, sym)
    qp = qm.qparams_from_range(lo, hi, grid, sym)
    s = float(qp.scale)
    xr = qm.fake_quantize(x, qp)
    inside = (x >= lo) & (x <= hi)
    assert np.all(np.abs(xr - x)[inside] <= s / 2 * (1 + 1e-5))  # rounding: half a step
    if method == "minmax":
        assert inside.all() and np.abs(xr - x).max() <= s


def test_weight_qparams_per_channel_and_per_tensor():
    w = np.array([[1.0, -2.0], [0.5, 0.25], [-4.0, 3.0]], dtype=np.float32)
    pc = qm.weight_qparams(w, 0, True)
    np.testing.assert_allclose(pc.scale, [2 / 127, 0.5 / 127, 4 / 127], rtol=1e-6)
    assert qm.quantize(w, pc).tolist() == [[64, -127], [127, 64], [-127, 95]]
    pt = qm.weight_qparams(w, None, True)
    assert pt.scale.shape == () and float(pt.scale) == pytest.approx(4 / 127)
    asym = qm.weight_qparams(w, 1, False)
    assert asym.grid == qm.WEIGHT_ASYMMETRIC
    assert np.all(np.abs(qm.fake_quantize(w, asym) - w) <= asym.scale / 2 * (1 + 1e-5))


def test_onnxruntime_quantizelinear_matches_the_numpy_map():
    """The numpy map (division, round half to even) is bit-identical to onnxruntime's
    QuantizeLinear, ties included: fold_fake_quant relies on it for weight codes."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    s = np.float32(0.0731)
    x = np.concatenate([np.random.default_rng(5).standard_normal(20_000) * 5,
                        (np.arange(-300, 300) + 0.5) * s]).astype(np.float32)
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", 1, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.INT8, x.shape)],
                              [numpy_helper.from_array(np.array(s), "s"),
                               numpy_helper.from_array(np.array(0, np.int8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    got = ort.InferenceSession(model.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    qp = qm.QParams(np.asarray(s), np.asarray(0), qm.ACT_SYMMETRIC)
    assert np.array_equal(got, qm.quantize(x, qp))


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scales_are_refused(scale):
    with pytest.raises(UnsupportedError, match="scale"):
        qm.check_qparams(np.array([0.1, scale]), np.array([0, 0]), qm.WEIGHT_SYMMETRIC, "w")


def test_zero_point_out_of_range_is_refused():
    with pytest.raises(UnsupportedError, match="zero point"):
        qm.check_qparams(0.1, 300, qm.ACT_ASYMMETRIC, "x")


# -- the pass --------------------------------------------------------------------------------
class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(32, 48)
        self.b = torch.nn.Linear(48, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _x(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 8, 32)).astype(np.float32)


CALIB = [(_x(i),) for i in range(1, 5)]


def _onnx(module, inputs, opset=17) -> slimc.Graph:
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, inputs, buf, dynamo=False, opset_version=opset)
    return slimc.Graph("onnx", onnx.load_from_string(buf.getvalue()),
                       example_inputs=tuple(x.numpy() for x in inputs))


@pytest.fixture(scope="module")
def mlp():
    m = _MLP().eval()
    inputs = (torch.from_numpy(_x()),)
    return m, {"fx": slimc.capture(m, inputs), "onnx": _onnx(m, inputs)}


def _reference(m: _MLP, x: np.ndarray, stats: dict, backend: str, dynamic=False) -> np.ndarray:
    """The fake-quant MLP in numpy: what quantize must have built."""
    acts = list(stats["activations"].values())
    w = {"a": m.a.weight.detach().numpy(), "b": m.b.weight.detach().numpy()}
    b = {"a": m.a.bias.detach().numpy(), "b": m.b.bias.detach().numpy()}

    def fq_act(v, i):
        if dynamic:
            qp = qm.qparams_from_range(-np.abs(v).max(), np.abs(v).max(), qm.WEIGHT_SYMMETRIC,
                                       True)
        else:
            qp = qm.QParams(np.float32(acts[i]["scale"]), np.int64(acts[i]["zero_point"]),
                            qm.ACT_SYMMETRIC)
        return qm.fake_quantize(v, qp)

    def fq_w(name):
        # FX stores the Linear weight (out, in); the ONNX export reads it transposed (in, out)
        axis = 0
        return qm.fake_quantize(w[name], qm.weight_qparams(w[name], axis, True))

    h = np.maximum(fq_act(x, 0) @ fq_w("a").T + b["a"], 0)
    return fq_act(h, 1) @ fq_w("b").T + b["b"]


@pytest.mark.parametrize("backend", ["fx", "onnx"])
def test_static_fake_quant_matches_numpy_reference(mlp, backend):
    m, graphs = mlp
    r = passes.quantize.run(graphs[backend], calib=CALIB, method="minmax")
    assert r.modified and r.stats["qdq_pairs"] == 4 and len(r.stats["quantized"]) == 2
    # minmax scales come from the calibration data alone
    first = next(iter(r.stats["activations"].values()))
    want = max(np.abs(b[0]).max() for b in CALIB) / 127
    assert first["scale"] == pytest.approx(want, rel=1e-6)
    x = _x(9)
    got = r.graph.run(x)[0]
    np.testing.assert_allclose(got, _reference(m, x, r.stats, backend), rtol=0, atol=2e-5)
    # and it is a quantization, not the float model
    assert np.abs(got - graphs[backend].run(x)[0]).max() > 1e-4


@pytest.mark.parametrize("backend", ["fx", "onnx"])
def test_dynamic_fake_quant_matches_numpy_reference(mlp, backend):
    m, graphs = mlp
    r = passes.quantize.run(graphs[backend], activations="dynamic")  # no calib needed
    x = _x(10) * 3
    np.testing.assert_allclose(r.graph.run(x)[0], _reference(m, x, r.stats, backend, True),
                               rtol=0, atol=2e-5)


@pytest.mark.parametrize("method", qm.METHODS)
def test_fx_and_onnx_calibrate_to_the_same_scales(mlp, method):
    _, graphs = mlp
    scales = {}
    for backend in ("fx", "onnx"):
        st = passes.quantize.run(graphs[backend], calib=CALIB, method=method,
                                 symmetric=False).stats
        scales[backend] = [(a["scale"], a["zero_point"]) for a in st["activations"].values()]
    assert len(scales["fx"]) == 2
    for (sf, zf), (so, zo) in zip(scales["fx"], scales["onnx"]):
        assert sf == pytest.approx(so, rel=1e-5) and zf == zo


def test_input_graph_is_not_changed(mlp):
    _, graphs = mlp
    for g in graphs.values():
        before = g.op_histogram()
        passes.quantize(g, calib=CALIB)
        assert g.op_histogram() == before


def test_quantizing_twice_finds_nothing_new(mlp):
    _, graphs = mlp
    for g in graphs.values():
        once = passes.quantize(g, calib=CALIB)
        twice = passes.quantize.run(once, calib=CALIB)
        assert not twice.modified
        assert all("already quantized" in v for v in twice.stats["skipped"].values())


def test_exclude_leaves_a_layer_float(mlp):
    _, graphs = mlp
    r = passes.quantize.run(graphs["fx"], calib=CALIB, exclude=["*linear_1*", "b.*"])
    assert list(r.stats["quantized"]) == ["linear"]
    assert r.stats["qdq_pairs"] == 2


@pytest.mark.parametrize("name", ["bert_eager", "llama"])
@pytest.mark.parametrize("backend", ["fx", "onnx"])
def test_zoo_models_quantize_every_linear_and_matmul(name, backend):
    module, inputs, _ = ZOO[name]()
    g = (slimc.capture(module, inputs) if backend == "fx" else
         slimc.Graph("onnx", to_onnx(name), example_inputs=tuple(x.numpy() for x in inputs)))
    calib = [g.example_inputs] + [tuple(np.random.default_rng(s).integers(0, 100, x.shape)
                                        .astype(x.dtype) for x in g.example_inputs)
                                  for s in (1, 2)]
    kinds = [n.op for n in g.view().nodes if n.op in ("linear", "matmul")]
    r = passes.quantize.run(g, calib=calib, method="percentile")
    assert len(r.stats["quantized"]) + len(r.stats["skipped"]) == len(kinds)
    assert len(r.stats["quantized"]) >= kinds.count("linear")
    ref, got = g.run()[0].ravel(), r.graph.run()[0].ravel()
    cos = ref @ got / np.linalg.norm(ref) / np.linalg.norm(got)
    assert 0.99 < cos < 1.0 - 1e-9


def test_bad_options_fail_clearly(mlp):
    _, graphs = mlp
    g = graphs["fx"]
    with pytest.raises(OptionError, match="bits=4"):
        passes.quantize(g, calib=CALIB, bits=4)
    with pytest.raises(OptionError, match="method"):
        passes.quantize(g, calib=CALIB, method="kl")
    with pytest.raises(OptionError, match="calib"):
        passes.quantize(g)  # static activations without calibration data
    with pytest.raises(OptionError, match="list of input tuples"):
        passes.quantize(g, calib=_x())
    with pytest.raises(OptionError, match="percentile"):
        passes.quantize(g, calib=CALIB, method="percentile", percentile=101)
    with pytest.raises(slimc.errors.ShapeError):
        passes.quantize(g, calib=[(np.zeros((3, 3), np.float32),)])
    bad = [(np.full((2, 8, 32), np.nan, np.float32),)]
    with pytest.raises(OptionError, match="NaN"):
        passes.quantize(g, calib=bad)


def test_old_opset_with_per_channel_weights_is_refused():
    m = _MLP().eval()
    g = _onnx(m, (torch.from_numpy(_x()),), opset=11)
    with pytest.raises(OptionError, match="opset 11"):
        passes.quantize(g, calib=CALIB)
    r = passes.quantize.run(g, calib=CALIB, weights="per_tensor")
    assert r.stats["qdq_pairs"] == 4
