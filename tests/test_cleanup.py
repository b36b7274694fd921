"""cleanup: exact on every zoo architecture (FX, and ONNX from both exporters), removes exactly the
nodes it should on hand-built graphs and nothing on near-misses, idempotent, never edits its input.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from zoo import TS_EXPORTABLE, ZOO, to_onnx

import slimc
from slimc import passes
from slimc.errors import OptionError
from slimc.passes import PassManager


def _other_inputs(g: slimc.Graph, seed: int = 1) -> tuple:
    """Inputs unlike the example ones (token ids over the zoo's whole vocabulary of 100), so a
    fold that baked in an input value would show."""
    rng = np.random.default_rng(seed)
    out = []
    for x in g.sample_inputs():
        if np.issubdtype(x.dtype, np.integer):
            out.append(rng.integers(0, 100, size=x.shape).astype(x.dtype))
        else:
            out.append(rng.standard_normal(x.shape).astype(x.dtype))
    return tuple(out)


def _fx_snapshot(g: slimc.Graph) -> tuple:
    return (g.fx.code, [n.name for n in g.fx.graph.nodes],
            {k: v.copy() for k, v in g.weights().items()})


def _assert_same_fx(a: tuple, b: tuple) -> None:
    assert a[0] == b[0] and a[1] == b[1]
    assert a[2].keys() == b[2].keys()
    for k in a[2]:
        np.testing.assert_array_equal(a[2][k], b[2][k])


def _clean_checked(g: slimc.Graph):
    """cleanup under the PassManager, whose Exact check (1e-5) runs on two input sets."""
    out, report = PassManager(["cleanup"]).run(
        g, check_inputs=[g.sample_inputs(), _other_inputs(g)])
    row = report["cleanup"]
    assert row.checked and row.max_abs <= 1e-5 and row.cosine > 1 - 1e-9
    return out, row


# -- the zoo ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ZOO))
def test_fx_zoo_exact_idempotent_input_untouched(name):
    module, inputs, _ = ZOO[name]()
    g = slimc.capture(module, inputs)
    before = _fx_snapshot(g)
    out, row = _clean_checked(g)
    _assert_same_fx(before, _fx_snapshot(g))
    # every zoo capture has something to clean: dead attention weights (mha), dropout in eval
    # mode, constant position ids and masks
    assert row.modified
    assert row.stats["nodes_after"] < row.stats["nodes_before"]
    assert sum(row.stats["removed"].values()) == \
        row.stats["nodes_before"] - row.stats["nodes_after"]
    assert out.history[-1] == "cleanup"
    again = passes.cleanup.run(out)
    assert not again.modified
    assert again.graph.fx.code == out.fx.code
    assert again.graph.weights().keys() == out.weights().keys()


def _onnx_cases():
    # the dynamo exporter takes ~2 s a model; the eager-attention variants (same weights, other
    # attention graph) are the slow tail
    cases = [pytest.param(name, "dynamo", marks=[pytest.mark.slow] if "eager" in name else [])
             for name in ZOO]
    cases += [(name, "torchscript") for name in TS_EXPORTABLE]
    return cases


@pytest.mark.parametrize("name,exporter", _onnx_cases())
def test_onnx_zoo_exact_idempotent_input_untouched(name, exporter):
    g = slimc.Graph("onnx", to_onnx(name, exporter))
    raw = g.onnx.SerializeToString()
    out, row = _clean_checked(g)
    assert g.onnx.SerializeToString() == raw
    assert out.output_names == g.output_names
    assert out.input_names == g.input_names
    if exporter == "torchscript":
        # the TorchScript exporter leaves Constant nodes and Identity aliases of shared weights
        assert row.modified and row.stats["removed"].get("Constant", 0) > 0
    if not row.modified:
        assert out.onnx.SerializeToString() == raw
    again = passes.cleanup.run(out)
    assert not again.modified
    assert again.graph.onnx.SerializeToString() == out.onnx.SerializeToString()


def test_native_objects_in_native_objects_out():
    module, inputs, _ = ZOO["mha"]()
    gm = slimc.capture(module, inputs).fx
    out = passes.cleanup(gm)
    assert isinstance(out, torch.fx.GraphModule) and out is not gm
    torch.testing.assert_close(out(*inputs), gm(*inputs), rtol=0, atol=0)
    model = to_onnx("mha", "torchscript")
    cleaned = passes.cleanup(model)
    assert isinstance(cleaned, onnx.ModelProto)
    assert len(cleaned.graph.node) < len(model.graph.node)


def test_options_are_checked():
    module, inputs, _ = ZOO["mha"]()
    g = slimc.capture(module, inputs)
    with pytest.raises(OptionError, match="max_fold_bytes"):
        passes.cleanup(g, max_fold_bytes=-1)


# -- FX: what fires, what does not ------------------------------------------------------------

class _Noisy(torch.nn.Module):
    """Known no-ops, dead code and constant subgraphs, next to near-misses that must stay."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.register_buffer("scale", torch.arange(8.0))
        self.w = torch.nn.Parameter(torch.randn(8, 8))
        self.shared = torch.nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        y = self.lin(x)
        y = torch.nn.functional.dropout(y, 0.5, training=False)  # no-op
        y = y.clone()                                           # no-op
        y = y.view(y.shape)                                     # no-op
        y = y * 1                                               # no-op
        _ = y.sum() * 3                                         # dead: sum, mul
        s = self.scale * 2 + 1                                  # folded: mul, add
        wt = x @ self.w.t()                                     # folded: t(w), w read only here
        z = x.transpose(0, 1).contiguous().view(-1)             # needed: contiguous before view
        u = (x @ self.shared) + (x @ self.shared.t())           # t(shared): folded (small)
        return y * s + wt + u, z, y * 1.5


def test_fx_removes_exactly_the_known_nodes():
    x = torch.randn(4, 8)
    g = slimc.capture(_Noisy().eval(), (x,))
    out, row = _clean_checked(g)
    assert row.stats["removed"] == {"dropout.default": 1, "clone.default": 1,
                                    "view.default": 1, "mul.Tensor": 3, "sum.default": 1,
                                    "add.Tensor": 1, "t.default": 2}
    assert row.stats["noops"] == 4 and row.stats["dead"] == 2
    left = out.op_histogram()
    assert left["contiguous.default"] == 1 and left["transpose.int"] == 1
    # w and scale are read by folded nodes only: they are gone; shared is still read
    weights = out.weights()
    assert "w" not in weights and "scale" not in weights and "shared" in weights
    folded = {k: v for k, v in weights.items() if k.startswith("_folded_")}
    assert sorted(v.shape for v in folded.values()) == [(8,), (8, 8), (8, 8)]


def test_fx_fold_size_limit():
    class Big(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("b", torch.arange(4.0))
            self.w = torch.nn.Parameter(torch.randn(8, 8))
            self.tied = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            big = self.b.expand(64, 4) * 2            # 1 KiB from 16 bytes of weights
            return x @ big, x[:, :8] @ self.w.t() + x[:, :8] @ self.tied + \
                x[:, :8] @ self.tied.t()

    g = slimc.capture(Big().eval(), (torch.randn(2, 4 * 16),))
    # with no size budget: t(w) still folds (it replaces w, read nowhere else); the expanded
    # buffer and t(tied) (tied is read elsewhere, so folding would duplicate it) do not
    tight = passes.cleanup.run(g, max_fold_bytes=0)
    hist = tight.graph.op_histogram()
    assert hist["expand.default"] == 1 and hist["t.default"] == 1
    assert "w" not in tight.graph.weights() and "b" in tight.graph.weights()
    roomy = passes.cleanup.run(g)
    hist = roomy.graph.op_histogram()
    assert hist["expand.default"] == 0 and hist["t.default"] == 0
    off = passes.cleanup.run(g, fold_constants=False)
    assert off.graph.op_histogram()["t.default"] == 2 and not off.stats["folded"]
    for r in (tight, roomy, off):
        x = _other_inputs(g)
        for a, b in zip(r.graph.run(*x), g.run(*x)):
            np.testing.assert_array_equal(a, b)


def test_fx_random_dropout_and_output_aliases_stay():
    class Train(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.dropout(x, 0.5, training=True), x.clone()

    g = slimc.capture(Train(), (torch.randn(2, 3),))
    r = passes.cleanup.run(g)
    # training dropout is random, and removing the clone would return the input itself
    assert not r.modified
    assert r.graph.op_histogram() == g.op_histogram()


# -- ONNX: what fires, what does not ----------------------------------------------------------

def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "t", inputs, outputs, list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _t(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _const(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def _noisy_onnx():
    rng = np.random.default_rng(0)
    n = helper.make_node
    nodes = [
        n("Identity", ["X"], ["a"]),                                   # no-op
        n("MatMul", ["a", "W"], ["b"]),
        n("Dropout", ["b"], ["c"]),                                    # no-op (inference)
        n("Cast", ["c"], ["d"], to=TensorProto.FLOAT),                 # no-op (same type)
        n("Transpose", ["d"], ["e"], perm=[0, 1]),                     # no-op (identity perm)
        n("Reshape", ["e", "shape"], ["f"]),                           # no-op (same shape)
        n("Mul", ["C1", "C2"], ["k"]),                                 # folded
        n("Add", ["f", "k"], ["g"]),
        n("Sigmoid", ["b"], ["unused"]),                               # dead
        n("Relu", ["g"], ["h"]),
        n("Identity", ["h"], ["Y"]),                                   # no-op on an output
        # near-misses that must stay
        n("Identity", ["X"], ["Z"]),                     # input -> output: gives Z its name
        n("Cast", ["b"], ["b16"], to=TensorProto.FLOAT16),
        n("Transpose", ["b"], ["bt"], perm=[1, 0]),
        n("Dropout", ["b", "ratio", "T"], ["dt"]),                     # runtime training flag
        n("Dropout", ["b"], ["dm", "mask"]),                           # its mask is read
        n("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        n("Add", ["dm", "maskf"], ["M"]),
    ]
    inits = [_const("W", rng.standard_normal((4, 4)).astype(np.float32)),
             _const("shape", np.array([2, 4], dtype=np.int64)),
             _const("C1", rng.standard_normal(4).astype(np.float32)),
             _const("C2", rng.standard_normal(4).astype(np.float32)),
             _const("ratio", np.array(0.5, dtype=np.float32))]
    outputs = [_t("Y", [2, 4]), _t("Z", [2, 4]), _t("b16", [2, 4], TensorProto.FLOAT16),
               _t("bt", [4, 2]), _t("dt", [2, 4]), _t("M", [2, 4])]
    inputs = [_t("X", [2, 4]), _t("T", [], TensorProto.BOOL)]
    return _model(nodes, inputs, outputs, inits)


def test_onnx_removes_exactly_the_known_nodes():
    model = _noisy_onnx()
    g = slimc.Graph("onnx", model)
    x = (np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32),
         np.array(False))
    out, report = PassManager(["cleanup"]).run(g, check_inputs=[x])
    row = report[0]
    assert row.checked and row.max_abs == 0.0
    assert row.stats["removed"] == {"Identity": 2, "Dropout": 1, "Cast": 1, "Transpose": 1,
                                    "Reshape": 1, "Mul": 1, "Sigmoid": 1}
    assert row.stats["noops"] == 6 and row.stats["dead"] == 1 and row.stats["folded"] == 1
    assert out.output_names == ["Y", "Z", "b16", "bt", "dt", "M"]
    # the Relu now writes Y itself; the Identity that names input X as output Z stays
    producers = {o: node.op_type for node in out.onnx.graph.node for o in node.output}
    assert producers["Y"] == "Relu" and producers["Z"] == "Identity"
    assert {i.name for i in out.onnx.graph.initializer} >= {"W", "ratio"}
    assert not {"C1", "C2", "shape"} & {i.name for i in out.onnx.graph.initializer}
    again = passes.cleanup.run(out)
    assert not again.modified
    assert again.graph.onnx.SerializeToString() == out.onnx.SerializeToString()


def test_onnx_nothing_to_clean_is_byte_identical():
    n = helper.make_node
    model = _model([n("MatMul", ["X", "W"], ["Y"])], [_t("X", [2, 4])], [_t("Y", [2, 4])],
                   [_const("W", np.eye(4, dtype=np.float32))])
    model.graph.node[0].metadata_props.add(key="origin", value="kept")
    r = passes.cleanup.run(model)
    assert not r.modified
    assert r.graph.SerializeToString() == model.SerializeToString()
    assert r.graph is not model


def test_onnx_keeps_node_metadata_through_graphsurgeon():
    n = helper.make_node
    model = _model([n("Identity", ["X"], ["a"]), n("Relu", ["a"], ["Y"], name="relu")],
                   [_t("X", [2])], [_t("Y", [2])])
    model.graph.node[1].metadata_props.add(key="origin", value="kept")
    out = passes.cleanup(model)
    assert [node.op_type for node in out.graph.node] == ["Relu"]
    assert {p.key: p.value for p in out.graph.node[0].metadata_props} == {"origin": "kept"}
