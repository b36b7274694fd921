"""fuse: each rule fires where it should (counted), not on near misses (graph unchanged, the
reason reported), and keeps the numerics; the rule-set API; every zoo architecture on FX and on
ONNX from both exporters, checked by the PassManager against the Exact contract."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from zoo import TS_EXPORTABLE, ZOO, to_onnx

import slimc
from slimc import passes
from slimc.errors import OptionError, UnsupportedError
from slimc.passes import PassManager
from slimc.passes._no_match import NoMatchWarning
from slimc.passes.fuse import DEFAULT, ONNXRUNTIME, ORT, SPLIT_QKV, Op, Refusal, Rule, Var, _math

# -- helpers ---------------------------------------------------------------------------------


def _fx(module: torch.nn.Module, *inputs) -> slimc.Graph:
    torch.manual_seed(0)
    return slimc.capture(module.eval(), tuple(inputs))


def _onnx(nodes, inputs: dict, inits: dict | None = None, *, opset: int = 20,
          outputs=("y",), domains=()) -> slimc.Graph:
    graph = helper.make_graph(
        nodes, "t",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in (inits or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]
                              + [helper.make_opsetid(d, 1) for d in domains])
    model.ir_version = 10
    model = onnx.shape_inference.infer_shapes(model)  # declares the outputs' shapes
    onnx.checker.check_model(model)
    return slimc.Graph("onnx", model)


def _rand(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _fuse(g, rules=None, **options):
    r = passes.fuse.run(g, rules=rules, **options)
    return r.graph, r.stats


def _assert_same_function(g, g2, seeds=(0, 1)) -> None:
    """Outputs agree within the Exact contract (1e-5) on random inputs (not just the example)."""
    for seed in seeds:
        xs = g.sample_inputs(seed=seed, dims={"batch": 2})
        want, got = g.run(*xs), g2.run(*xs)
        assert len(want) == len(got)
        for a, b in zip(want, got):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def _assert_unchanged(g, g2) -> None:
    if g.backend == "onnx":
        assert g2.onnx.SerializeToString() == g.onnx.SerializeToString()
        return
    assert g2.fx.code == g.fx.code
    a, b = g.fx.state_dict(), g2.fx.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _ops(g) -> dict:
    return dict(g.op_histogram())


def _refusals(stats, rule) -> list[str]:
    return list(stats["refused"].get(rule, {}))


# -- layout ---------------------------------------------------------------------------------


class _TwoTransposes(torch.nn.Module):
    def __init__(self, leak: bool = False):
        super().__init__()
        self.leak = leak

    def forward(self, x):
        t = x.transpose(1, 2)
        y = t.permute(0, 1, 3, 2).transpose(1, 2) + 1.0
        return (y, t) if self.leak else y


def test_cancel_transpose_fx():
    g = _fx(_TwoTransposes(), torch.randn(2, 3, 4, 5))
    g2, stats = _fuse(g, rules=["cancel_transpose"])
    assert stats["fired"] == {"cancel_transpose": 2}
    # transpose(1,2) . permute(0,1,3,2) . transpose(1,2) is one permutation
    assert sum(v for k, v in _ops(g2).items() if "permute" in k or "transpose" in k) == 1
    _assert_same_function(g, g2)


def test_cancel_transpose_near_miss_fx():
    """The inner transpose is also a graph output: fusing would compute it twice."""
    g = _fx(_TwoTransposes(leak=True), torch.randn(2, 3, 4, 5))
    g2, stats = _fuse(g, rules=["cancel_transpose"])
    assert stats["fired"] == {"cancel_transpose": 1}  # only the pair inside the chain
    assert any("read outside the pattern" in r for r in _refusals(stats, "cancel_transpose"))
    _assert_same_function(g, g2)


def test_cancel_transpose_to_nothing_onnx():
    g = _onnx([helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1, 3]),
               helper.make_node("Transpose", ["t"], ["u"], perm=[0, 2, 1, 3]),
               helper.make_node("Relu", ["u"], ["y"])], {"x": (2, 3, 4, 5)})
    g2, stats = _fuse(g)
    assert stats["fired"] == {"cancel_transpose": 1}
    assert _ops(g2) == {"Relu": 1}
    _assert_same_function(g, g2)


def test_cancel_transpose_keeps_graph_output_name_onnx():
    g = _onnx([helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
               helper.make_node("Transpose", ["t"], ["y"], perm=[1, 0])], {"x": (3, 4)})
    g2, stats = _fuse(g)
    assert stats["fired"] == {"cancel_transpose": 1}
    assert g2.output_names == ["y"] and _ops(g2) == {"Identity": 1}
    _assert_same_function(g, g2)


def test_cancel_reshape_onnx():
    shape = lambda *d: np.asarray(d, np.int64)
    g = _onnx([helper.make_node("Reshape", ["x", "s1"], ["r"]),
               helper.make_node("Reshape", ["r", "s2"], ["y"])], {"x": (2, 3, 4)},
              {"s1": shape(6, 4), "s2": shape(4, -1)})
    g2, stats = _fuse(g)
    assert stats["fired"] == {"cancel_reshape": 1} and _ops(g2) == {"Reshape": 1}
    _assert_same_function(g, g2)


def test_cancel_reshape_near_miss_copied_dim_onnx():
    """With a dynamic batch, target 0 copies the dim of the inner Reshape's output (batch * 3):
    skipping the inner Reshape would copy the batch instead."""
    shape = lambda *d: np.asarray(d, np.int64)
    g = _onnx([helper.make_node("Reshape", ["x", "s1"], ["r"]),
               helper.make_node("Reshape", ["r", "s2"], ["y"])], {"x": ("batch", 3, 4)},
              {"s1": shape(-1, 4), "s2": shape(0, 2, 2)})
    g2, stats = _fuse(g)
    assert stats["fired"] == {}
    assert any("copies a dimension" in r for r in _refusals(stats, "cancel_reshape"))
    _assert_unchanged(g, g2)


def test_collapse_layout_onnx():
    """The dynamo exporter's k^T: Reshape -> Transpose(3-D) -> Reshape is one 4-D Transpose."""
    shape = lambda *d: np.asarray(d, np.int64)
    g = _onnx([helper.make_node("Reshape", ["x", "s1"], ["a"]),
               helper.make_node("Transpose", ["a"], ["b"], perm=[0, 2, 1]),
               helper.make_node("Reshape", ["b", "s2"], ["c"]),
               helper.make_node("Relu", ["c"], ["y"])], {"x": (1, 4, 8, 16)},
              {"s1": shape(4, 8, 16), "s2": shape(1, 4, 16, 8)})
    g2, stats = _fuse(g)
    assert stats["fired"] == {"collapse_layout": 1}
    assert _ops(g2) == {"Transpose": 1, "Relu": 1}
    perm = next(a for a in g2.onnx.graph.node[0].attribute if a.name == "perm")
    assert list(perm.ints) == [0, 1, 3, 2]
    _assert_same_function(g, g2)


def test_collapse_layout_near_miss_onnx():
    """Reshape-Transpose-Reshape that mixes the head axis into the sequence is no one op."""
    shape = lambda *d: np.asarray(d, np.int64)
    g = _onnx([helper.make_node("Reshape", ["x", "s1"], ["a"]),
               helper.make_node("Transpose", ["a"], ["b"], perm=[1, 0]),
               helper.make_node("Reshape", ["b", "s2"], ["y"])], {"x": (2, 3, 4)},
              {"s1": shape(6, 4), "s2": shape(2, 3, 4)})
    g2, stats = _fuse(g)
    assert stats["fired"] == {}
    _assert_unchanged(g, g2)
    why = [w for w in passes.fuse.explain(g, "collapse_layout") if isinstance(w, Refusal)]
    assert why and "no sub-chain is one Transpose or Reshape" in why[0].reason


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_layout_chain_algebra(data):
    """Seeded fuzzing of the chain algebra: whatever single op it answers moves the data
    exactly like the chain, on a tensor of distinct values."""
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
    x = np.arange(math.prod(shape)).reshape(shape) * 7 + 3
    steps, y = [], x
    for _ in range(data.draw(st.integers(1, 4))):
        if data.draw(st.booleans()):
            perm = tuple(data.draw(st.permutations(range(y.ndim))))
            steps.append(("Transpose", perm))
            y = y.transpose(perm)
        else:
            dims = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
            if math.prod(dims) != y.size:
                dims = [y.size]
            steps.append(("Reshape", tuple(dims)))
            y = y.reshape(dims)
    found = _math.layout_chain(shape, steps)
    if found is None:
        return
    kind, arg = found
    z = x if kind == "Identity" else x.reshape(arg) if kind == "Reshape" else x.transpose(arg)
    assert z.shape == y.shape and np.array_equal(z, y)


# -- MatMul + Add -----------------------------------------------------------------------------


class _MatMulAdd(torch.nn.Module):
    def __init__(self, bias_shape=(32,)):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16, 32))
        self.b = torch.nn.Parameter(torch.randn(*bias_shape))

    def forward(self, x):
        return x @ self.w + self.b


def test_matmul_add_fx():
    g = _fx(_MatMulAdd(), torch.randn(2, 8, 16))
    g2, stats = _fuse(g)
    assert stats["fired"] == {"matmul_add": 1}
    assert _ops(g2).get("linear.default") == 1 and "matmul.default" not in _ops(g2)
    _assert_same_function(g, g2)
    assert g2.num_parameters() == g.num_parameters()  # the old weight is gone with its node


def test_matmul_add_near_miss_not_a_bias_fx():
    """An added [8, 32] matrix is not a bias of a 32-feature projection."""
    g = _fx(_MatMulAdd(bias_shape=(8, 32)), torch.randn(2, 8, 16))
    g2, stats = _fuse(g)
    assert stats["fired"] == {}
    assert any("(8, 32)" in r for r in _refusals(stats, "matmul_add"))
    _assert_unchanged(g, g2)


def test_matmul_add_onnx():
    g = _onnx([helper.make_node("MatMul", ["x", "w"], ["m"]),
               helper.make_node("Add", ["b", "m"], ["y"])], {"x": (2, 8, 16)},
              {"w": _rand(16, 32), "b": _rand(32, seed=1)})
    g2, stats = _fuse(g)
    assert stats["fired"] == {"matmul_add": 1}
    assert _ops(g2) == {"Reshape": 2, "Gemm": 1}  # Gemm is 2-D: flattened around it
    _assert_same_function(g, g2)


def test_matmul_add_near_miss_onnx():
    g = _onnx([helper.make_node("MatMul", ["x", "w"], ["m"]),
               helper.make_node("Add", ["m", "b"], ["y"])], {"x": (2, 8, 16)},
              {"w": _rand(16, 32), "b": _rand(8, 32, seed=1)})
    g2, stats = _fuse(g)
    assert stats["fired"] == {}
    assert any("(8, 32)" in r for r in _refusals(stats, "matmul_add"))
    _assert_unchanged(g, g2)


# -- LayerNorm ------------------------------------------------------------------------------


class _ManualLayerNorm(torch.nn.Module):
    def __init__(self, axis=-1, eps: float | None = 1e-5, form="div"):
        super().__init__()
        self.axis, self.eps, self.form = axis, eps, form
        self.gamma = torch.nn.Parameter(torch.randn(16))
        self.beta = torch.nn.Parameter(torch.randn(16))

    def forward(self, x):
        mu = x.mean(self.axis, keepdim=True)
        d = x - mu
        var = (d ** 2).mean(self.axis, keepdim=True)
        if self.eps is None:
            n = d / torch.sqrt(var)
        elif self.form == "rsqrt":
            n = d * torch.rsqrt(var + self.eps)
        else:
            n = d / torch.sqrt(var + self.eps)
        return n * self.gamma + self.beta


@pytest.mark.parametrize("form", ["div", "rsqrt"])
def test_layer_norm_fx(form):
    g = _fx(_ManualLayerNorm(form=form), torch.randn(2, 5, 16) * 3 + 1)
    g2, stats = _fuse(g)
    assert stats["fired"] == {"layer_norm": 1}
    assert _ops(g2) == {"layer_norm.default": 1}
    _assert_same_function(g, g2)


@pytest.mark.parametrize("axis,eps,why", [(1, 1e-5, "normalises axes"),
                                          (-1, None, "expected Add")])
def test_layer_norm_near_misses_fx(axis, eps, why):
    """Mean over the wrong axis (refused by the check); no epsilon added (no match)."""
    g = _fx(_ManualLayerNorm(axis=axis, eps=eps), torch.randn(2, 16, 16))
    g2, stats = _fuse(g)
    assert stats["fired"] == {}
    _assert_unchanged(g, g2)
    reasons = [w.reason for w in passes.fuse.explain(g, "layer_norm") if isinstance(w, Refusal)]
    assert any(why in r for r in reasons), reasons


def _ln_onnx(axes=(-1,), eps=1e-5, shape=(2, 5, 16)):
    inits = {"axes": np.asarray(axes, np.int64), "two": np.float32(2.0),
             "eps": np.asarray(eps, np.float32),
             "gamma": _rand(16, seed=1), "beta": _rand(16, seed=2)}
    return _onnx([helper.make_node("ReduceMean", ["x", "axes"], ["mu"]),
                  helper.make_node("Sub", ["x", "mu"], ["d"]),
                  helper.make_node("Pow", ["d", "two"], ["sq"]),
                  helper.make_node("ReduceMean", ["sq", "axes"], ["var"]),
                  helper.make_node("Add", ["var", "eps"], ["ve"]),
                  helper.make_node("Sqrt", ["ve"], ["std"]),
                  helper.make_node("Div", ["d", "std"], ["n"]),
                  helper.make_node("Mul", ["n", "gamma"], ["s"]),
                  helper.make_node("Add", ["s", "beta"], ["y"])], {"x": shape}, inits)


def test_layer_norm_onnx():
    g = _ln_onnx()
    g2, stats = _fuse(g)
    assert stats["fired"] == {"layer_norm": 1}
    assert _ops(g2) == {"LayerNormalization": 1}
    _assert_same_function(g, g2)


@pytest.mark.parametrize("kwargs,why", [
    ({"axes": (1,), "shape": (2, 16, 16)}, "normalises axes"),
    ({"eps": np.full(16, 1e-5, np.float32)}, "epsilon"),
])
def test_layer_norm_near_misses_onnx(kwargs, why):
    g = _ln_onnx(**kwargs)
    g2, stats = _fuse(g)
    assert stats["fired"] == {}
    assert any(why in r for r in _refusals(stats, "layer_norm"))
    _assert_unchanged(g, g2)


# -- GELU -------------------------------------------------------------------------------------


class _Gelu(torch.nn.Module):
    def __init__(self, form="erf", half=0.5):
        super().__init__()
        self.form, self.half = form, half

    def forward(self, x):
        if self.form == "erf":
            return x * self.half * (1.0 + torch.erf(x / math.sqrt(2.0)))
        return self.half * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi)
                                                 * (x + 0.044715 * torch.pow(x, 3.0))))


@pytest.mark.parametrize("form,approx", [("erf", "none"), ("tanh", "tanh")])
def test_gelu_fx(form, approx):
    g = _fx(_Gelu(form), torch.randn(2, 8, 32) * 3)
    g2, stats = _fuse(g)
    assert stats["fired"] == {"gelu": 1}
    assert _ops(g2) == {"gelu.default": 1}
    node = next(n for n in g2.fx.graph.nodes if n.op == "call_function")
    assert node.kwargs.get("approximate", "none") == approx
    _assert_same_function(g, g2)


def test_gelu_near_miss_fx():
    g = _fx(_Gelu("erf", half=0.6), torch.randn(2, 8, 32))
    g2, stats = _fuse(g)
    assert stats["fired"] == {}
    _assert_unchanged(g, g2)


def _gelu_erf_onnx(opset):
    inits = {"sqrt2": np.float32(math.sqrt(2)), "one": np.float32(1), "half": np.float32(0.5),
             "bias": _rand(32, seed=3)}
    return _onnx([helper.make_node("Add", ["bias", "h"], ["x"]),
                  helper.make_node("Div", ["x", "sqrt2"], ["a"]),
                  helper.make_node("Erf", ["a"], ["e"]),
                  helper.make_node("Add", ["e", "one"], ["p"]),
                  helper.make_node("Mul", ["x", "p"], ["m"]),
                  helper.make_node("Mul", ["m", "half"], ["y"])], {"h": (2, 8, 32)}, inits,
                 opset=opset)


def test_gelu_onnx_opset20_and_bias_gelu_ort():
    g = _gelu_erf_onnx(20)
    g2, stats = _fuse(g)
    assert stats["fired"] == {"gelu": 1} and _ops(g2) == {"Add": 1, "Gelu": 1}
    _assert_same_function(g, g2)
    g3, stats = _fuse(g, rules=ORT)
    assert stats["fired"] == {"bias_gelu": 1} and _ops(g3) == {"com.microsoft::BiasGelu": 1}
    _assert_same_function(g, g3)


def test_gelu_onnx_opset17_needs_ort():
    """Opset 17 has no Gelu: the standard rule says so; the onnxruntime set fuses anyway."""
    g = _gelu_erf_onnx(17)
    g2, stats = _fuse(g)
    assert stats["fired"] == {}
    assert any("opset 20" in r for r in _refusals(stats, "gelu"))
    _assert_unchanged(g, g2)
    g3, stats = _fuse(g, rules=ONNXRUNTIME)
    assert stats["fired"] == {"bias_gelu": 1}
    _assert_same_function(g, g3)


# -- BatchNorm folding --------------------------------------------------------------------------


def _bn(channels, dims=2):
    bn = (torch.nn.BatchNorm2d if dims == 2 else torch.nn.BatchNorm1d)(channels)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn


class _ConvBN(torch.nn.Module):
    def __init__(self, linear_rank=2):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3, bias=False), _bn(4)
        self.lin = torch.nn.Linear(4, 5)
        self.bn1 = _bn(5 if linear_rank == 2 else 2, dims=1)
        self.linear_rank = linear_rank

    def forward(self, x):
        y = self.bn(self.conv(x)).mean((2, 3))
        if self.linear_rank == 3:
            y = y.reshape(1, 2, 4)
        return self.bn1(self.lin(y))


def test_fold_batchnorm_fx():
    g = _fx(_ConvBN(), torch.randn(2, 3, 8, 8))
    g2, stats = _fuse(g)
    assert stats["fired"] == {"fold_batchnorm": 2}
    assert "batch_norm.default" not in _ops(g2)
    _assert_same_function(g, g2)


def test_fold_batchnorm_near_miss_fx():
    """BatchNorm1d over [N, C, L] after a Linear normalises C, not the Linear's features."""
    g = _fx(_ConvBN(linear_rank=3), torch.randn(2, 3, 8, 8))
    g2, stats = _fuse(g)
    assert stats["fired"] == {"fold_batchnorm": 1}
    assert any("2-D outputs" in r for r in _refusals(stats, "fold_batchnorm"))
    _assert_same_function(g, g2)


def test_fold_batchnorm_onnx():
    bn = _bn(4)
    inits = {"w": _rand(4, 3, 3, 3), "b": _rand(4, seed=1),
             **{k: getattr(bn, a).detach().numpy() for k, a in
                [("s", "weight"), ("t", "bias"), ("mu", "running_mean"),
                 ("var", "running_var")]}}
    g = _onnx([helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
               helper.make_node("BatchNormalization", ["c", "s", "t", "mu", "var"], ["y"],
                                epsilon=1e-3)], {"x": (2, 3, 8, 8)}, inits)
    g2, stats = _fuse(g)
    assert stats["fired"] == {"fold_batchnorm": 1} and _ops(g2) == {"Conv": 1}
    _assert_same_function(g, g2)


# -- QKV merge and split ---------------------------------------------------------------------


class _QKV(torch.nn.Module):
    def __init__(self, shared_input=True):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(16, n) for n in (16, 16, 8))
        self.shared_input = shared_input

    def forward(self, x, x2):
        return self.q(x), self.k(x), self.v(x if self.shared_input else x2)


def test_merge_qkv_fx():
    g = _fx(_QKV(), torch.randn(2, 5, 16), torch.randn(2, 5, 16))
    g2, stats = _fuse(g)
    assert stats["fired"] == {"merge_qkv": 1}
    assert _ops(g2)["linear.default"] == 1 and _ops(g2)["split_with_sizes.default"] == 1
    _assert_same_function(g, g2)
    assert g2.num_parameters() == g.num_parameters()


def test_merge_qkv_near_miss_fx():
    """v reads another input: q and k still merge, v stays alone."""
    g = _fx(_QKV(shared_input=False), torch.randn(2, 5, 16), torch.randn(2, 5, 16))
    g2, stats = _fuse(g)
    assert stats["fired"] == {"merge_qkv": 1}
    assert _ops(g2)["linear.default"] == 2
    _assert_same_function(g, g2)


def test_merge_qkv_onnx_distinct_biases():
    ins = {"x": (2, 5, 16)}
    inits = {f"w{i}": _rand(16, n, seed=i) for i, n in enumerate((16, 16, 8))}
    inits.update({f"b{i}": _rand(n, seed=10 + i) for i, n in enumerate((16, 16, 8))})
    nodes = []
    for i in range(3):
        nodes += [helper.make_node("MatMul", ["x", f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"b{i}", f"m{i}"], [f"y{i}"])]
    g = _onnx(nodes, ins, inits, outputs=("y0", "y1", "y2"))
    g2, stats = _fuse(g, disable=["matmul_add"])
    assert stats["fired"] == {"merge_qkv": 1}
    assert _ops(g2) == {"MatMul": 1, "Add": 1, "Split": 1}
    assert g2.output_names == ["y0", "y1", "y2"]
    _assert_same_function(g, g2)


@pytest.mark.parametrize("kind", ["fx", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_split_qkv_reverses_merge_gpt2(kind):
    """GPT-2's fused c_attn splits into three projections (for head pruning), and merges back."""
    g = _zoo_graph("gpt2", kind)
    g2, stats = _fuse(g, rules=SPLIT_QKV)
    assert stats["fired"] == {"split_qkv": 2}
    _assert_same_function(g, g2)
    g3, stats = _fuse(g2, rules=["merge_qkv"])
    assert stats["fired"] == {"merge_qkv": 2}
    _assert_same_function(g, g3)


# -- attention ------------------------------------------------------------------------------


class _Attention(torch.nn.Module):
    def __init__(self, axis=-1, divide=True):
        super().__init__()
        self.axis, self.divide = axis, divide

    def forward(self, q, k, v, mask):
        s = q @ k.transpose(-2, -1)
        s = s / 4.0 if self.divide else s * 0.25
        return torch.softmax(s + mask, dim=self.axis) @ v


def _attention_inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 16, generator=g) for _ in range(3))
    mask = torch.where(torch.rand(2, 1, 8, 8, generator=g) < 0.2, -1e4, 0.0)
    return q, k, v, mask


@pytest.mark.parametrize("divide", [True, False])
def test_attention_fx(divide):
    g = _fx(_Attention(divide=divide), *_attention_inputs())
    g2, stats = _fuse(g)
    assert stats["fired"].get("attention") == 1
    assert _ops(g2).get("scaled_dot_product_attention.default") == 1
    assert "softmax.int" not in _ops(g2)
    _assert_same_function(g, g2)


def test_attention_near_miss_fx():
    g = _fx(_Attention(axis=-2), *_attention_inputs())
    g2, stats = _fuse(g, rules=["attention"])
    assert stats["fired"] == {}
    assert any("axis -2" in r for r in _refusals(stats, "attention"))
    _assert_unchanged(g, g2)


def test_attention_onnx_opset23_bert():
    """The dynamo export of BERT, upgraded to opset 23, gets the standard Attention op."""
    from onnx import version_converter
    g = slimc.Graph("onnx", version_converter.convert_version(to_onnx("bert", "dynamo"), 23))
    g2, stats = _fuse(g)
    assert stats["fired"]["attention"] == 2
    assert _ops(g2)["Attention"] == 2 and "Softmax" not in _ops(g2)
    _assert_same_function(g, g2)


@pytest.mark.parametrize("kind", ["fx", "dynamo"])
def test_attention_per_head_3d(kind):
    """nn.MultiheadAttention computes per head on [batch*heads, seq, dim]: the fused op gets a
    heads axis of 1 (ONNX Attention reads 3-D as [batch, seq, hidden]; TVM imports 4-D sdpa)."""
    from onnx import version_converter
    if kind == "fx":  # cleanup drops the averaged attention weights nobody reads
        g = passes.cleanup(_zoo_graph("mha", "fx"))
    else:
        g = slimc.Graph("onnx", version_converter.convert_version(to_onnx("mha", kind), 23))
    g2, stats = _fuse(g)
    assert stats["fired"]["attention"] == 1
    _assert_same_function(g, g2)


def test_onnxruntime_rules_bert_dynamo():
    g = _zoo_graph("bert", "dynamo")
    g2, stats = _fuse(g, rules=ORT)
    fired = stats["fired"]
    assert (fired["skip_layer_norm"], fired["bias_gelu"], fired["attention_ort"]) == (5, 2, 2)
    ops = _ops(g2)
    assert ops["com.microsoft::MultiHeadAttention"] == 2 and "Softmax" not in ops
    assert "Transpose" not in ops  # the heads' reshapes/transposes cancelled around MHA
    _assert_same_function(g, g2)


def test_onnxruntime_rules_refuse_on_fx():
    g = _zoo_graph("bert_eager", "fx")
    why = [w for w in passes.fuse.explain(g, "skip_layer_norm") if isinstance(w, Refusal)]
    assert why and all(w.stage == "target" and "onnxruntime" in w.reason for w in why)
    g2, stats = _fuse(g, rules=ONNXRUNTIME)
    assert stats["fired"] == {}
    _assert_unchanged(g, g2)


# -- the rule-set API -----------------------------------------------------------------------


def test_rule_sets_list_compose_and_disable():
    assert DEFAULT.names[:2] == ["cancel_transpose", "cancel_reshape"]
    assert (ONNXRUNTIME + DEFAULT).names == ORT.names
    assert "merge_qkv" not in DEFAULT.without("merge_qkv")
    assert all(r.doc for r in ORT)  # every rule says what it does
    with pytest.raises(ValueError, match="two rules named"):
        _ = DEFAULT + DEFAULT["gelu"]
    with pytest.raises(OptionError, match="no rule named"):
        passes.fuse(_ln_onnx(), rules=["layernorm"])
    with pytest.raises(OptionError, match="cannot disable"):
        passes.fuse(_ln_onnx(), disable=["nope"])
    _, stats = _fuse(_ln_onnx(), disable=["layer_norm"])
    assert stats["fired"] == {}


def test_user_rule_in_a_few_lines():
    """The module docstring's example: relu(relu(x)) -> relu(x), on both backends."""
    twice = Rule("relu_twice", Op("Relu", Op("Relu", Var("x"), name="inner")),
                 lambda b, m: m["inner"].outputs[0])
    fx = _fx(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.ReLU()), torch.randn(3, 4))
    ox = _onnx([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Relu", ["r"], ["y"])],
               {"x": (3, 4)})
    for g in (fx, ox):
        g2, stats = _fuse(g, rules=DEFAULT + twice)
        assert stats["fired"] == {"relu_twice": 1}
        assert sum(_ops(g2).values()) == 1
        _assert_same_function(g, g2)


def test_fuse_leaves_its_input_alone():
    g = _ln_onnx()
    before = g.onnx.SerializeToString()
    passes.fuse(g)
    passes.fuse(g.onnx)
    assert g.onnx.SerializeToString() == before


@pytest.mark.parametrize("name,kind", [("bert", "dynamo"), ("bert", "ts"), ("gpt2", "fx")])
def test_no_rule_fires_graph_unchanged(name, kind):
    g = _zoo_graph(name, kind)
    # rules named explicitly that match nothing: an error by default (no silent no-op),
    # the unchanged graph and a warning on request
    with pytest.raises(UnsupportedError, match="matched nothing"):
        passes.fuse(g, rules=["fold_batchnorm"])
    with pytest.warns(NoMatchWarning):
        g2, stats = _fuse(g, rules=["fold_batchnorm"], on_no_match="warn")
    assert stats["fired"] == {}
    _assert_unchanged(g, g2)


# -- real architectures ---------------------------------------------------------------------


def _zoo_graph(name: str, kind: str) -> slimc.Graph:
    if kind == "fx":
        module, inputs, _ = ZOO[name]()
        return slimc.capture(module, inputs)
    return slimc.Graph("onnx", to_onnx(name, kind))


# What must fire on each architecture (2 layers each). Ones not listed may fire any number of
# times (the layout rules clean up whatever the exporter left); listed ones must fire exactly so.
EXPECTED = {
    ("bert", "fx", "DEFAULT"): {"merge_qkv": 2},
    ("bert_eager", "fx", "DEFAULT"): {"merge_qkv": 2, "attention": 2},
    ("gpt2_eager", "fx", "DEFAULT"): {"gelu": 2, "attention": 2},
    ("gpt2", "fx", "DEFAULT"): {"gelu": 2},
    ("llama_eager", "fx", "DEFAULT"): {"merge_qkv": 4, "attention": 2},
    ("vit", "fx", "DEFAULT"): {"merge_qkv": 2},
    ("bert", "dynamo", "DEFAULT"): {"merge_qkv": 2, "matmul_add": 8},
    ("gpt2", "dynamo", "DEFAULT"): {"gelu": 2},
    ("llama", "dynamo", "DEFAULT"): {"merge_qkv": 4},
    ("bert", "ts", "DEFAULT"): {"merge_qkv": 2},
    ("bert", "dynamo", "ORT"): {"skip_layer_norm": 5, "bias_gelu": 2, "attention_ort": 2},
    ("gpt2", "dynamo", "ORT"): {"skip_layer_norm": 5, "gelu_ort": 2, "attention_ort": 2},
    ("vit", "ts", "ORT"): {"skip_layer_norm": 5, "bias_gelu": 2, "attention_ort": 2},
    ("distilbert", "ts", "ORT"): {"skip_layer_norm": 5, "bias_gelu": 2},
    ("mha", "dynamo", "ORT"): {"attention_ort": 1},
}

_FAST = {("bert_eager", "fx"), ("bert", "dynamo"), ("bert", "ts")}
_CASES = ([(n, "fx") for n in ZOO] + [(n, "dynamo") for n in ZOO]
          + [(n, "ts") for n in TS_EXPORTABLE])


@pytest.mark.parametrize("rules_name", ["DEFAULT", "ORT"])
@pytest.mark.parametrize("name,kind", [
    pytest.param(n, k, marks=() if (n, k) in _FAST else pytest.mark.slow) for n, k in _CASES])
def test_zoo(name, kind, rules_name):
    """Every architecture, FX and ONNX from both exporters: the PassManager checks the Exact
    contract on the example and on random inputs; the listed rules fire exactly so often."""
    g = _zoo_graph(name, kind)
    checks = [g.sample_inputs(), g.sample_inputs(seed=1, dims={"batch": 1})]
    pm = PassManager([("fuse", {"rules": getattr(passes.fuse, rules_name)})])
    _, report = pm.run(g, check_inputs=checks)
    assert report[0].checked
    stats = report[0].stats
    for rule, count in EXPECTED.get((name, kind, rules_name), {}).items():
        assert stats["fired"].get(rule, 0) == count, (rule, stats["fired"])
    assert stats["converged"]


# -- TVM sees the fused forms ---------------------------------------------------------------


def _tvm_kernel_calls(graph) -> int:
    from slimc.codegen.build import to_relax
    from slimc.codegen.fusion import kernel_launches
    from slimc.codegen.targets import resolve_target
    mod, _, _ = to_relax(graph)
    return sum(kernel_launches(mod, resolve_target("x86"))[1].values())


class _Heads(torch.nn.Module):
    """q, k, v projections, each split into heads (reshape + transpose), as in attention."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))

    def forward(self, x):
        return tuple(p(x).view(2, 5, 2, 8).transpose(1, 2) for p in (self.q, self.k, self.v))


def test_split_to_slices_fuses_into_readers():
    """merge_qkv's split becomes slices that TVM fuses into the heads' reshape/transpose: one
    GEMM and three layout kernels instead of three GEMMs and three layout kernels; the compiled
    module still computes the unfused model."""
    import tvm
    from tvm import relax

    from slimc.codegen.fusion import fusion_hook
    g = _fx(_Heads(), torch.randn(2, 5, 16))
    g2 = passes.fuse(g)
    art = slimc.compile(g2, "x86", tune=fusion_hook())
    vm = relax.VirtualMachine(art.executable, tvm.cpu())
    xs = g.sample_inputs()
    got = vm["main"](*[tvm.runtime.tensor(x) for x in xs])
    for want, out in zip(g.run(*xs), got):
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)
    assert (_tvm_kernel_calls(g), _tvm_kernel_calls(g2)) == (6, 4)


@pytest.mark.slow
def test_tvm_compiles_fused_bert():
    """BERT (eager attention) before and after fuse, through TVM with the default schedules:
    fewer kernel launches after, and both match torch."""
    import tvm
    from tvm import relax

    from slimc.codegen.fusion import fusion_hook
    from slimc.codegen.schedules import apply_default_schedules
    module, inputs, _ = ZOO["bert_eager"]()
    g = slimc.capture(module, inputs)
    g2 = passes.fuse(g)
    assert _tvm_kernel_calls(g2) < _tvm_kernel_calls(g)
    with torch.no_grad():
        want = module(*inputs).numpy()
    art = slimc.compile(g2, "x86", tune=fusion_hook(apply_default_schedules))
    got = relax.VirtualMachine(art.executable, tvm.cpu())["main"](
        *[tvm.runtime.tensor(x.numpy()) for x in inputs])
    got = got if hasattr(got, "numpy") else got[0]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)
