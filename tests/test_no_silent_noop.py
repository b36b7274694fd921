"""No silent no-ops (issue 11): a pass asked for a change that matches nothing raises a
SlimcError naming what it looked for and what the graph has; ``on_no_match="warn"`` (per call,
PassManager, recipe) turns that into a warning and the unchanged graph. Every pass reports
``stats["matched"]`` and ``stats["changed"]``.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from test_attention_forms import _export, _minilm

import slimc
from slimc import passes
from slimc.errors import OptionError, UnsupportedError
from slimc.passes import PassManager
from slimc.passes._no_match import NoMatchWarning
from slimc.recipe import Recipe


class _NoWeights(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x) * 2.0


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _x():
    return torch.randn(2, 16, generator=torch.Generator().manual_seed(0))


def _no_weights_onnx() -> slimc.Graph:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]),
                               helper.make_node("Mul", ["r", "two"], ["y"])],
                              "plain", [x], [y], [two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return slimc.Graph("onnx", model, example_inputs=[_x().numpy()])


def _graphs():
    return {"fx": slimc.capture(_NoWeights(), (_x(),)), "onnx": _no_weights_onnx()}


# (pass, options asking for a change, words its error must contain)
ASKS = [
    ("prune_heads", {"ratio": 0.3}, "attention"),
    ("prune_heads", {"heads": {0: [0]}}, "attention"),
    ("threshold_weights", {"sparsity": 0.5}, "Linear"),
    ("threshold_weights", {"tau": 0.1}, "Linear"),
    ("threshold_weights", {"pattern": "2:4"}, "Linear"),
    ("quantize", {"calib": [(_x().numpy(),)]}, "MatMul"),
    ("fuse", {"rules": ["layer_norm"]}, "layer_norm"),
    ("factorize_low_rank", {"rank": 2}, "Linear"),
]


@pytest.mark.parametrize("backend", ["fx", "onnx"])
@pytest.mark.parametrize("name,options,words", ASKS, ids=[f"{a[0]}-{next(iter(a[1]))}"
                                                          for a in ASKS])
def test_asked_change_matching_nothing_raises(backend, name, options, words):
    g = _graphs()[backend]
    before = g.copy()
    with pytest.raises(UnsupportedError, match="matched nothing") as info:
        getattr(passes, name)(g, **options)
    msg = str(info.value)
    assert words in msg
    # what the graph has instead: its op histogram
    top = "relu" if backend == "fx" else "Relu"
    assert top in msg and "×1" in msg
    assert "on_no_match='warn'" in msg  # the fix names the way out
    # the input is untouched
    if backend == "onnx":
        assert g.native.SerializeToString() == before.native.SerializeToString()
    else:
        assert g.native.code == before.native.code


@pytest.mark.parametrize("name,options,words", ASKS[:1] + ASKS[2:], ids=lambda v: str(v)[:20])
def test_warn_policy_per_call_returns_unchanged(name, options, words):
    g = _graphs()["onnx"]
    with pytest.warns(NoMatchWarning, match="matched nothing"):
        res = getattr(passes, name).run(g, on_no_match="warn", **options)
    assert not res.modified
    assert res.stats["matched"] == 0 and res.stats["changed"] == 0
    assert words in res.stats["no_match"]
    assert res.graph.native.SerializeToString() == g.native.SerializeToString()


def test_pass_manager_and_recipe_policy():
    g = _graphs()["fx"]
    steps = [("threshold_weights", {"sparsity": 0.5}), ("cleanup", {})]
    with pytest.raises(UnsupportedError, match="In pass threshold_weights .*matched nothing"):
        PassManager(steps).run(g)
    with pytest.warns(NoMatchWarning):
        _, report = PassManager(steps, on_no_match="warn").run(g, check_inputs=[(_x(),)])
    assert report[0].stats["matched"] == 0 and not report[0].modified
    # one step may override the manager's policy
    with pytest.warns(NoMatchWarning):
        PassManager([("threshold_weights", {"sparsity": 0.5, "on_no_match": "warn"})]).run(g)
    recipe = Recipe.from_dict({"passes": [{"name": "factorize_low_rank", "rank": 2}]})
    with pytest.raises(UnsupportedError, match="factorize_low_rank"):
        recipe.apply(g)
    recipe = Recipe.from_dict({"on_no_match": "warn",
                               "passes": [{"name": "factorize_low_rank", "rank": 2}]})
    with pytest.warns(NoMatchWarning):
        recipe.apply(g)
    with pytest.raises(OptionError, match="on_no_match"):
        Recipe.from_dict({"on_no_match": "ignore", "passes": []})
    with pytest.raises(OptionError, match="on_no_match"):
        PassManager(steps, on_no_match="quiet")
    with pytest.raises(OptionError, match="on_no_match"):
        passes.threshold_weights(g, sparsity=0.5, on_no_match="silent")


@pytest.mark.parametrize("name,options", [
    ("threshold_weights", {"tau": 0}),
    ("threshold_weights", {"sparsity": 0}),
    ("factorize_low_rank", {"energy": 1.0}),
    ("fuse", {}),
    ("fuse", {"rules": passes.fuse.DEFAULT}),
    ("cleanup", {}),
])
def test_identity_settings_on_nothing_are_no_error(name, options):
    """Options that ask for no change (the identity setting, a whole rule set) may match
    nothing: the graph comes back unchanged, without an error or a warning."""
    g = _graphs()["onnx"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoMatchWarning)
        res = getattr(passes, name).run(g, **options)
    assert not res.modified


def test_stats_count_matches_and_changes():
    g = slimc.capture(_MLP(), (_x(),))
    s = passes.threshold_weights.run(g, sparsity=0.5).stats
    assert (s["matched"], s["changed"]) == (2, 2)
    s = passes.threshold_weights.run(g, tau=0).stats
    assert (s["matched"], s["changed"]) == (2, 0)
    s = passes.quantize.run(g, calib=[(_x().numpy(),)]).stats
    assert s["matched"] == s["changed"] == 2
    s = passes.factorize_low_rank.run(g, rank=2).stats
    assert (s["matched"], s["changed"]) == (2, 2)
    # a rank that would not save anything: both layers are candidates, neither changes
    s = passes.factorize_low_rank.run(g, rank=16).stats
    assert (s["matched"], s["changed"]) == (2, 0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w"),
             onnx.numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["xw"]),
                               helper.make_node("Add", ["xw", "b"], ["y"])],
                              "linear", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    s = passes.fuse.run(slimc.Graph("onnx", model), rules=["matmul_add"]).stats
    assert s["matched"] == s["changed"] == s["fired"]["matmul_add"] == 1


_MINILM: dict = {}


def _minilm_ts() -> slimc.Graph:
    """all-MiniLM-L6-v2 as a user exports it: TorchScript exporter, opset 17, padding mask
    (exported once per session; callers get a copy)."""
    if "g" not in _MINILM:
        _MINILM["g"] = _export_minilm_ts()
    return _MINILM["g"].copy()


def _export_minilm_ts() -> slimc.Graph:
    # the same padded MiniLM and TorchScript export the attention-form tests use
    module, (ids, mask) = _minilm()
    return slimc.Graph("onnx", _export(module, (ids, mask), "torchscript"),
                       example_inputs=[ids.numpy(), mask.numpy()])


def test_minilm_torchscript_prune_30_percent_really_prunes():
    """The scenario where onnxsim's head pruning returns the model unchanged: slimc finds the 6
    blocks (padding mask built with Where/IsNaN) and removes round(0.3 × 72) = 22 heads."""
    g = _minilm_ts()
    hist = g.op_histogram()
    assert hist["IsNaN"] == 6 and hist["Where"] >= 6  # the export form of the issue
    res = passes.prune_heads.run(g, ratio=0.3)
    assert res.modified
    assert res.stats["matched"] == 6 and res.stats["changed"] >= 1
    assert sum(res.stats["heads_before"].values()) == 72
    assert sum(res.stats["heads_after"].values()) == 72 - round(0.3 * 72)
    assert res.stats["params_after"] == res.stats["params_before"] - \
        res.stats["removed_parameters"] < res.stats["params_before"]
    assert [b.num_heads for b in res.graph.attention_blocks()] == \
        [res.stats["heads_after"][i] for i in range(6)]
    out = res.graph.run(*g.example_inputs)[0]
    assert out.shape == g.run(*g.example_inputs)[0].shape and np.isfinite(out).all()



def test_candidates_all_refused_warn_with_reasons():
    """Candidates found but every one refused (here: the only Linear reads a weight tied to an
    embedding): no error, but a warning that carries the pass's reasons."""

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(32, 16)
            self.head = torch.nn.Linear(16, 32, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    g = slimc.capture(Tied().eval(), (torch.arange(8).reshape(1, 8),))
    with pytest.warns(NoMatchWarning, match="changed none: .*embedding"):
        res = passes.threshold_weights.run(g, sparsity=0.5)
    assert (res.stats["matched"], res.stats["changed"]) == (1, 0) and not res.modified
    once = passes.quantize(slimc.capture(_MLP(), (_x(),)), calib=[(_x().numpy(),)])
    with pytest.warns(NoMatchWarning, match="already quantized"):  # not an error
        passes.quantize(once, calib=[(_x().numpy(),)])


def test_every_pass_reports_matched_and_changed():
    from zoo import ZOO
    module, inputs, _ = ZOO["mha"]()
    g = slimc.capture(module, inputs)
    calib = [tuple(x.numpy() for x in inputs)]
    runs = {"prune_heads": {"heads": {0: [1]}}, "threshold_weights": {"sparsity": 0.5},
            "quantize": {"calib": calib}, "factorize_low_rank": {"rank": 4}, "fuse": {},
            "cleanup": {}}
    for name, options in runs.items():
        s = getattr(passes, name).run(g, **options).stats
        assert isinstance(s["matched"], int) and isinstance(s["changed"], int), name
        assert 0 <= s["changed"] <= s["matched"], (name, s["matched"], s["changed"])
    q = passes.quantize(g, calib=calib)
    s = passes.fold_fake_quant.run(q).stats
    assert s["matched"] >= s["changed"] > 0


def test_minilm_after_onnxruntime_optimizer_still_prunes():
    """The issue's second scenario: onnxruntime's transformer optimizer fuses LayerNorms and
    Gelus but no Attention on this export; slimc still finds the 6 decomposed blocks and the
    30 % pruning equals the zeroed-value oracle."""
    import tempfile

    from onnxruntime.transformers.optimizer import optimize_model
    from test_prune_heads import zeroed
    g = _minilm_ts()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "minilm.onnx")
        onnx.save(g.onnx, path)
        model = optimize_model(path, model_type="bert", num_heads=12, hidden_size=384).model
    opt = slimc.Graph("onnx", model, example_inputs=g.example_inputs)
    hist = opt.op_histogram()
    assert hist["com.microsoft::SkipLayerNormalization"] > 0 and "com.microsoft::Attention" \
        not in hist and hist["IsNaN"] == 6
    res = passes.prune_heads.run(opt, ratio=0.3)
    assert sum(res.stats["heads_after"].values()) == 72 - round(0.3 * 72)
    want = zeroed(opt, res.stats["removed"]).run(*opt.example_inputs)
    for a, b in zip(res.graph.run(*opt.example_inputs), want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
