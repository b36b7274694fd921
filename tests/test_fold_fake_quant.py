"""fold_fake_quant: int8 weights and integer matmuls that match the fake-quant model within one
quantization step of the output on every element, ~4x smaller weights, the fake-quant others
produce (onnxruntime QDQ and dynamic, torch.ao QAT modules, PT2E) recognised and folded, and
bad quantization parameters refused — on FX and ONNX.

How the step bound is checked. For a Linear y = x̂·ŵᵀ + b the output grid is s_x·s_w[n] per
output column n (one unit of the int32 accumulator): the folded sum is exact, the fake-quant
one is float, so they differ by float rounding only, and every element must be within one
such step (``test_single_linear_within_one_output_step``, static and dynamic scales). For whole
models the output is not quantized; there "one step" is one int8 step of the output's own
range, max|y| / 127, which a tie flipped by rounding in an inner quantizer could approach but
float rounding alone never does.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from zoo import ZOO, to_onnx

import slimc
from slimc import passes
from slimc.errors import UnsupportedError
from slimc.passes.fold_fake_quant import FakeQuantLeftInFloat
from slimc.passes.quantize import _math as qm

CONFIGS = {
    "static": {"method": "minmax"},
    "asym_entropy": {"method": "entropy", "symmetric": False},
    "per_tensor_mse": {"method": "mse", "weights": "per_tensor"},
    "dynamic": {"activations": "dynamic"},
    "dynamic_asym": {"activations": "dynamic", "symmetric": False},
}


def _rand(shape, seed, scale=1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _onnx(module, inputs, opset=17) -> slimc.Graph:
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, inputs, buf, dynamo=False, opset_version=opset)
    return slimc.Graph("onnx", onnx.load_from_string(buf.getvalue()),
                       example_inputs=tuple(x.numpy() for x in inputs))


def _graph(module, inputs, backend) -> slimc.Graph:
    return slimc.capture(module, inputs) if backend == "fx" else _onnx(module, inputs)


def _fold(g, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FakeQuantLeftInFloat)  # nothing may be left behind
        return passes.fold_fake_quant.run(g, **kw)


# -- one Linear: the exact step bound --------------------------------------------------------
class _Linear(torch.nn.Module):
    def __init__(self, k=48, n=24):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(k, n)

    def forward(self, x):
        return self.fc(x)


def _output_step(m: _Linear, x: np.ndarray, cfg: dict, act_stats: dict) -> np.ndarray:
    """s_x · s_w[n]: one unit of the output grid of the quantized Linear, per column."""
    sym = cfg.get("symmetric", True)
    w = m.fc.weight.detach().numpy()
    axis = 0 if cfg.get("weights", "per_channel") == "per_channel" else None
    s_w = qm.weight_qparams(w, axis, sym).scale
    if cfg.get("activations") == "dynamic":
        grid = qm.WEIGHT_SYMMETRIC if sym else qm.ACT_ASYMMETRIC
        s_x = qm.qparams_from_range(x.min(), x.max(), grid, sym).scale
    else:
        s_x = next(iter(act_stats.values()))["scale"]
    return np.float64(s_x) * s_w.astype(np.float64)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("backend", ["fx", "onnx"])
def test_single_linear_within_one_output_step(backend, cfg):
    m = _Linear().eval()
    x = _rand((3, 8, 48), 0, 2.0)
    g = _graph(m, (torch.from_numpy(x),), backend)
    calib = [(_rand((3, 8, 48), s, 2.0),) for s in (1, 2, 3)]
    q = passes.quantize.run(g, calib=calib, **CONFIGS[cfg])
    r = _fold(q.graph)
    assert r.modified and len(r.stats["folded"]) == 1
    for seed in (0, 4, 5):
        xs = _rand((3, 8, 48), seed, 2.0 if seed else 1.0) if seed else x
        want, got = q.graph.run(xs)[0], r.graph.run(xs)[0]
        step = _output_step(m, xs, CONFIGS[cfg], q.stats["activations"])
        dev = np.abs(got.astype(np.float64) - want)
        assert np.all(dev <= step), f"max deviation {(dev / step).max():.3g} steps"
        assert (dev / step).max() < 0.1  # float rounding only: far below a step


@pytest.mark.parametrize("cfg", ["static", "asym_entropy", "dynamic_asym"])
def test_onnx_gemm_with_transposed_weight_folds(cfg):
    """2-D inputs export as Gemm(x, W, b, transB=1): the int8 weight is transposed at fold
    time, its per-row scales become per-column, the bias is added after the rescale."""
    m = _Linear().eval()
    x = _rand((6, 48), 0)
    g = _onnx(m, (torch.from_numpy(x),))
    assert g.op_histogram() == {"Gemm": 1}
    q = passes.quantize.run(g, calib=[(x,)], **CONFIGS[cfg])
    r = _fold(q.graph)
    assert r.graph.op_histogram()["MatMulInteger"] == 1
    step = _output_step(m, x, CONFIGS[cfg], q.stats["activations"])
    assert np.all(np.abs(r.graph.run(x)[0] - q.graph.run(x)[0]) <= step)


# -- whole models ----------------------------------------------------------------------------
def _ids_calib(g: slimc.Graph) -> list[tuple]:
    return [g.example_inputs] + [tuple(np.random.default_rng(s).integers(0, 100, x.shape)
                                       .astype(x.dtype) for x in g.example_inputs)
                                 for s in (1, 2)]


def _within_output_step(want: list, got: list) -> float:
    """max |got − want| in units of one int8 step of the output range, max|y| / 127."""
    worst = 0.0
    for a, b in zip(want, got):
        step = np.abs(a).max() / 127
        worst = max(worst, float(np.abs(b.astype(np.float64) - a).max() / step))
    return worst


@pytest.mark.parametrize("name,backend,cfg", [
    ("bert_eager", "fx", "static"),  # attention matmuls (activation × activation) too
    ("bert_eager", "fx", "dynamic_asym"),
    ("llama_eager", "fx", "asym_entropy"),  # grouped-query attention
    ("gpt2", "fx", "per_tensor_mse"),  # Conv1D: addmm with (in, out) weights
    ("bert", "onnx", "static"),
    ("bert", "onnx", "dynamic_asym"),
    ("distilbert", "onnx", "asym_entropy"),
])
def test_zoo_folded_within_one_step_of_fake_quant(name, backend, cfg):
    module, inputs, _ = ZOO[name]()
    g = (slimc.capture(module, inputs) if backend == "fx" else
         slimc.Graph("onnx", to_onnx(name), example_inputs=tuple(x.numpy() for x in inputs)))
    calib = _ids_calib(g)
    q = passes.quantize.run(g, calib=calib, **CONFIGS[cfg])
    r = _fold(q.graph)
    assert len(r.stats["folded"]) == len(q.stats["quantized"])
    want = [q.graph.run(*b)[0] for b in calib]
    got = [r.graph.run(*b)[0] for b in calib]
    assert _within_output_step(want, got) <= 1.0
    hist = r.graph.op_histogram()
    if backend == "onnx":
        assert hist["MatMulInteger"] == len(r.stats["folded"]) and "MatMul" not in hist
        assert "DequantizeLinear" not in hist
    else:
        linears = sum(1 for v in q.stats["quantized"].values() if v["kind"] == "linear")
        assert hist["_int_mm.default"] == linears
        assert not any("dequantize" in k for k in hist)


# -- storage ---------------------------------------------------------------------------------
class _Wide(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(256, 512, bias=False)
        self.b = torch.nn.Linear(512, 256, bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _float_matrices(g: slimc.Graph) -> int:
    return sum(w.nbytes for w in g.weights().values() if w.dtype == np.float32 and w.ndim == 2)


@pytest.mark.parametrize("backend", ["fx", "onnx"])
def test_weight_storage_drops_about_4x(backend):
    x = _rand((2, 4, 256), 0)
    g = _graph(_Wide().eval(), (torch.from_numpy(x),), backend)
    q = passes.quantize(g, calib=[(x,)])
    r = _fold(q)
    f = r.graph
    assert _float_matrices(f) == 0  # the fp32 copies are gone
    assert r.stats["float_weights_removed"] == 2
    assert r.stats["weight_bytes_float_removed"] == 2 * 256 * 512 * 4
    assert r.stats["weight_bytes_int"] == 2 * 256 * 512
    ratio = q.serialized_size() / f.serialized_size()
    assert 3.5 < ratio < 4.0, ratio  # int8 codes plus per-channel scales (and column sums)


# -- what others produce ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def ort_models(tmp_path_factory):
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    d = tmp_path_factory.mktemp("ort")
    src = d / "bert.onnx"
    model = to_onnx("bert")
    onnx.save(model, src)
    name = model.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.it = iter([{name: rng.integers(0, 100, (1, 8)).astype(np.int64)}
                            for _ in range(3)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(d / "static.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8)
    quantize_dynamic(str(src), str(d / "dynamic.onnx"), weight_type=QuantType.QInt8)
    return d


def test_onnxruntime_static_qdq_is_recognised_and_folded(ort_models):
    g = slimc.load(ort_models / "static.onnx")
    found = passes.fold_fake_quant.recognise(g)
    assert found["qdq_pairs"] > 0 and found["int_weights"] >= 12
    assert found["QuantizeLinear"] == found["qdq_pairs"]
    with pytest.warns(FakeQuantLeftInFloat, match="LayerNormalization"):
        r = passes.fold_fake_quant.run(g)
    assert len(r.stats["folded"]) == sum(1 for n in g.onnx.graph.node if n.op_type == "MatMul")
    x = np.random.default_rng(7).integers(0, 100, (1, 8)).astype(np.int64)
    assert _within_output_step([g.run(x)[0]], [r.graph.run(x)[0]]) <= 1.0
    assert r.graph.serialized_size() < g.serialized_size()


def test_onnxruntime_dynamic_is_recognised_and_left_as_is(ort_models):
    g = slimc.load(ort_models / "dynamic.onnx")
    found = passes.fold_fake_quant.recognise(g)
    assert found["MatMulInteger"] == 12 and found["DynamicQuantizeLinear"] > 0
    r = _fold(g)
    assert not r.modified  # already integer compute: nothing to fold
    assert r.graph.onnx.SerializeToString() == g.onnx.SerializeToString()


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(32, 48)
        self.b = torch.nn.Linear(48, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _qat(observe_off=True):
    import torch.ao.quantization as tq
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = torch.nn.Sequential(tq.QuantStub(), _MLP(), tq.DeQuantStub()).train()
        m.qconfig = tq.get_default_qat_qconfig("x86")
        m = tq.prepare_qat(m)
        for s in range(4):
            m(torch.from_numpy(_rand((4, 32), s)))
        m.eval()
        if observe_off:
            m.apply(tq.disable_observer)
    return m


def test_torch_qat_fake_quant_modules_are_recognised_and_folded():
    x = torch.from_numpy(_rand((4, 32), 9))
    g = slimc.capture(_qat(), (x,))
    assert passes.fold_fake_quant.recognise(g)["fake_quantize"] == 5  # in, 2 weights, 2 outs
    r = _fold(g)
    assert sorted(r.stats["folded"].values()) == ["linear.default", "linear.default"]
    assert _float_matrices(r.graph) == 0
    want, got = g.run(x.numpy())[0], r.graph.run(x.numpy())[0]
    assert _within_output_step([want], [got]) <= 1.0


def test_qat_with_observers_on_is_left_float_with_a_warning():
    x = torch.from_numpy(_rand((4, 32), 9))
    g = slimc.capture(_qat(observe_off=False), (x,))
    with pytest.warns(FakeQuantLeftInFloat, match="linear"):
        r = passes.fold_fake_quant.run(g)
    assert not r.stats["folded"] and not r.modified


class _PT2E(torch.nn.Module):
    """What torchao's convert_pt2e produces: int8 weight codes with per-channel dequantize,
    uint8 activations quantized and dequantized with literal parameters."""

    def __init__(self):
        super().__init__()
        import torch.ao.quantization.fx._decomposed
        m = _MLP()
        for name in ("a", "b"):
            w = getattr(m, name).weight.detach()
            s = w.abs().amax(1) / 127
            self.register_buffer(f"{name}_q", torch.round(w / s[:, None]).to(torch.int8))
            self.register_buffer(f"{name}_s", s)
            self.register_buffer(f"{name}_z", torch.zeros(w.shape[0], dtype=torch.int64))
            setattr(self, f"{name}_bias", torch.nn.Parameter(getattr(m, name).bias.detach()))

    def _lin(self, x, name, s, z):
        qd = torch.ops.quantized_decomposed
        x = qd.dequantize_per_tensor(qd.quantize_per_tensor(x, s, z, 0, 255, torch.uint8),
                                     s, z, 0, 255, torch.uint8)
        w = qd.dequantize_per_channel(getattr(self, f"{name}_q"), getattr(self, f"{name}_s"),
                                      getattr(self, f"{name}_z"), 0, -127, 127, torch.int8)
        return torch.nn.functional.linear(x, w, getattr(self, f"{name}_bias"))

    def forward(self, x):
        return self._lin(torch.relu(self._lin(x, "a", 0.03, 128)), "b", 0.01, 0)


def test_pt2e_quantize_dequantize_ops_are_recognised_and_folded():
    x = _rand((4, 32), 3)
    g = slimc.capture(_PT2E().eval(), (torch.from_numpy(x),))
    found = passes.fold_fake_quant.recognise(g)
    assert found["qdq_pairs"] == 2 and found["dequantize_per_channel.default"] == 2
    r = _fold(g)
    assert len(r.stats["folded"]) == 2
    assert _within_output_step([g.run(x)[0]], [r.graph.run(x)[0]]) <= 1.0
    assert "a_q" not in dict(r.graph.fx.named_buffers())  # codes re-laid out for _int_mm


def test_torchao_pt2e_models_fold():
    ao = pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e")
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )
    x = torch.from_numpy(_rand((4, 32), 1))
    ep = torch.export.export(_MLP().eval(), (x,)).module()
    prepared = ao.prepare_pt2e(ep, X86InductorQuantizer().set_global(
        get_default_x86_inductor_quantization_config()))
    for s in range(3):
        prepared(torch.from_numpy(_rand((4, 32), s)))
    g = slimc.capture(ao.convert_pt2e(prepared), (x,))
    r = _fold(g)
    assert len(r.stats["folded"]) == 2 and _float_matrices(r.graph) == 0
    assert _within_output_step([g.run(x.numpy())[0]], [r.graph.run(x.numpy())[0]]) <= 1.0


# -- cancelling and leftovers ----------------------------------------------------------------
def _qdq_model(nodes, inits, opset=19, out_type=TensorProto.FLOAT) -> slimc.Graph:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [2, 4])],
                              [helper.make_tensor_value_info("y", out_type, [2, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return slimc.Graph("onnx", model, example_inputs=(_rand((2, 4), 0),))


def _c(name, value, dtype):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def test_dequantize_quantize_with_equal_parameters_cancels():
    inits = [_c("s", 0.05, np.float32), _c("z", 3, np.int8), _c("s2", 0.05, np.float32),
             _c("z2", 3, np.int8)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("QuantizeLinear", ["d", "s2", "z2"], ["q2"]),
             helper.make_node("DequantizeLinear", ["q2", "s2", "z2"], ["y"])]
    g = _qdq_model(nodes, inits)
    r = passes.fold_fake_quant.run(g)
    assert r.stats["cancelled"] == 1
    assert r.graph.op_histogram() == {"QuantizeLinear": 1, "DequantizeLinear": 1}
    x = _rand((2, 4), 1)
    np.testing.assert_array_equal(r.graph.run(x)[0], g.run(x)[0])


def test_qdq_on_an_op_without_integer_form_stays_float_with_a_warning():
    inits = [_c("s", 0.05, np.float32), _c("z", 0, np.int8)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("Sigmoid", ["d"], ["y"], name="my_sigmoid")]
    g = _qdq_model(nodes, inits)
    with pytest.warns(FakeQuantLeftInFloat, match="my_sigmoid"):
        r = passes.fold_fake_quant.run(g)
    assert "my_sigmoid" in r.stats["left_in_float"] and not r.modified
    x = _rand((2, 4), 2)
    np.testing.assert_array_equal(r.graph.run(x)[0], g.run(x)[0])


def _matmul_qdq(dtype, scale=0.05, w_scale=0.01, opset=21) -> slimc.Graph:
    np_t = {"int8": np.int8, "int16": np.int16}[dtype]
    inits = [_c("s", scale, np.float32), _c("z", 0, np_t), _c("sw", w_scale, np.float32),
             _c("zw", 0, np_t), _c("w", _rand((4, 4), 3), np.float32)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("QuantizeLinear", ["w", "sw", "zw"], ["wq"]),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"]),
             helper.make_node("MatMul", ["d", "wd"], ["y"], name="the_matmul")]
    return _qdq_model(nodes, inits, opset=opset)


def test_unsupported_bit_width_is_left_float_with_a_warning():
    g = _matmul_qdq("int16")
    with pytest.warns(FakeQuantLeftInFloat, match="the_matmul.*int16"):
        r = passes.fold_fake_quant.run(g)
    assert not r.stats["folded"]
    x = _rand((2, 4), 4)
    np.testing.assert_array_equal(r.graph.run(x)[0], g.run(x)[0])
    assert _matmul_qdq("int8").run(x)  # the same model at 8 bits runs and folds
    assert len(_fold(_matmul_qdq("int8")).stats["folded"]) == 1


@pytest.mark.parametrize("scale", [0.0, float("nan"), -0.5, float("inf")])
def test_bad_scales_are_errors_onnx(scale):
    with pytest.raises(UnsupportedError, match="QuantizeLinear|DequantizeLinear"):
        passes.fold_fake_quant(_matmul_qdq("int8", scale=scale))


class _BadFX(torch.nn.Module):
    def __init__(self, scale, zero):
        super().__init__()
        import torch.ao.quantization.fx._decomposed
        self.scale, self.zero = scale, zero
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        qd = torch.ops.quantized_decomposed
        q = qd.quantize_per_tensor(x, self.scale, self.zero, 0, 255, torch.uint8)
        return self.fc(qd.dequantize_per_tensor(q, self.scale, self.zero, 0, 255, torch.uint8))


@pytest.mark.parametrize("scale,zero,match", [(0.0, 0, "scale"), (float("nan"), 0, "scale"),
                                              (0.1, 300, "zero point")])
def test_bad_parameters_are_errors_fx(scale, zero, match):
    g = slimc.capture(_BadFX(scale, zero).eval(), (torch.ones(2, 4),))
    with pytest.raises(UnsupportedError, match=match):
        passes.fold_fake_quant(g)


# -- the pass manager and TVM ----------------------------------------------------------------
def test_pass_manager_reports_fold_within_a_step():
    m = _Linear().eval()
    x = _rand((3, 8, 48), 0)
    g = slimc.capture(m, (torch.from_numpy(x),))
    pm = passes.PassManager([("quantize", {"calib": [(x,)]}), "fold_fake_quant"])
    _, report = pm.run(g, check_inputs=[(x,)])
    fold = report["fold_fake_quant"]
    assert fold.modified and fold.stats["folded"]
    step = _output_step(m, x, CONFIGS["static"], report["quantize"].stats["activations"])
    assert fold.max_abs <= step.min()
    assert report["quantize"].max_abs > fold.max_abs  # quantizing moved it; folding did not


def test_folded_onnx_compiles_with_tvm_and_matches(tmp_path):
    """TVM's stock pipeline (tune=None) imports MatMulInteger / QuantizeLinear as int32 matmuls
    and reproduces onnxruntime bit for bit."""
    m = _MLP().eval()
    x = _rand((2, 8, 32), 0)
    g = _onnx(m, (torch.from_numpy(x),))
    f = passes.fold_fake_quant(passes.quantize(g, calib=[(x,)], symmetric=False))
    slimc.compile(f, "x86", tune=None).save(tmp_path / "int32")
    np.testing.assert_array_equal(slimc.runtime.load(tmp_path / "int32")(x)[0], f.run(x)[0])


# -- int8 code generation --------------------------------------------------------------------
def _asm(executable) -> str:
    def walk(m):
        yield m
        for i in m.imports:
            yield from walk(i)
    return "".join(m.inspect_source("asm") for m in walk(executable.mod) if m.kind == "llvm")


@pytest.fixture(scope="module")
def folded_mlp():
    x = _rand((2, 8, 32), 0)
    g = _onnx(_MLP().eval(), (torch.from_numpy(x),))
    return x, {cfg: passes.fold_fake_quant(passes.quantize(g, calib=[(x,)], **CONFIGS[cfg]))
               for cfg in ("static", "asym_entropy", "dynamic_asym")}


def test_int8_build_for_a_vnni_cpu_uses_vpdpbusd(folded_mlp):
    """Compiled for Cascade Lake (AVX512-VNNI) without running: every int8 matmul is a
    ``vpdpbusd`` kernel; for Skylake (AVX2, no VNNI) the same graph builds without it."""
    from slimc.codegen.int8 import int8_schedules
    _, graphs = folded_mlp
    vnni = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake"}
    asm = _asm(slimc.compile(graphs["static"], vnni, tune=int8_schedules).executable)
    assert "vpdpbusd" in asm
    plain = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake"}
    assert "vpdpbusd" not in _asm(slimc.compile(graphs["static"], plain,
                                                tune=int8_schedules).executable)


@pytest.mark.parametrize("cfg", ["static", "asym_entropy", "dynamic_asym"])
def test_int8_build_on_this_cpu_matches_onnxruntime(folded_mlp, cfg, tmp_path):
    """int8 (and uint8 − 128 shifted) codes, zero points on both sides, static and dynamic
    scales: the VNNI build equals onnxruntime's MatMulInteger up to the float rescale."""
    from slimc.codegen.int8 import int8_schedules
    x, graphs = folded_mlp
    f = graphs[cfg]
    slimc.compile(f, "x86", tune=int8_schedules).save(tmp_path / cfg)
    got = slimc.runtime.load(tmp_path / cfg)(x)[0]
    want = f.run(x)[0]
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


def test_vnni_kernel_is_exact_on_extreme_codes():
    import tvm

    from slimc.codegen.int8 import has_vnni, pack_weight, vnni_kernel
    host = slimc.codegen.resolve_target("x86")
    if not has_vnni(host):
        pytest.skip(f"this CPU ({host}) has no AVX512-VNNI to run the kernel on")
    m, k, n = 12, 64, 32
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    w = rng.integers(-128, 128, (k, n)).astype(np.int8)
    a[0], w[:, 0] = 255, -128  # the extremes: 255 · −128 · 64 stays exact in int32
    lib = tvm.compile(tvm.IRModule({"main": vnni_kernel(m, k, n).with_attr(
        "global_symbol", "main")}), target=host)
    c = tvm.runtime.tensor(np.zeros((m, n), np.int32))
    lib(tvm.runtime.tensor(a), tvm.runtime.tensor(pack_weight(w)), c)
    np.testing.assert_array_equal(c.numpy(), a.astype(np.int64) @ w.astype(np.int64))


def test_folded_fx_imports_into_tvm_with_the_int_mm_converter():
    """FX int8 matmuls are aten._int_mm, which TVM's PyTorch frontend lacks: with
    ``codegen.int8.TORCH_CONVERTERS`` they import as int8 × int8 → int32 matmuls and take the
    VNNI kernels; the build equals torch."""
    import tvm
    import tvm.relax.frontend.torch as tvm_torch
    from tvm import relax

    from slimc.codegen.build import _TORCH_CONVERTERS
    from slimc.codegen.int8 import TORCH_CONVERTERS, int8_schedules
    x = _rand((2, 8, 32), 0)
    g = slimc.capture(_MLP().eval(), (torch.from_numpy(x),))
    target = slimc.codegen.resolve_target("x86")
    for cfg in ("static", "dynamic_asym"):
        f = passes.fold_fake_quant(passes.quantize(g, calib=[(x,)], **CONFIGS[cfg]))
        mod = tvm_torch.from_exported_program(
            f.to_exported_program(), custom_convert_map={**_TORCH_CONVERTERS,
                                                         **TORCH_CONVERTERS})
        vm = relax.VirtualMachine(tvm.compile(int8_schedules(mod, target), target=target),
                                  tvm.cpu())
        got = vm["main"](tvm.runtime.tensor(x))[0].numpy()
        want = f.run(x)[0]
        assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
