"""The plugin API: every pass on plain torch.fx.GraphModule / onnx.ModelProto objects, user
passes and fusion rules registered with a decorator, found by recipes, ``fuse`` and
``slimc passes --list``."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from zoo import ZOO, to_onnx

import slimc
from slimc import passes
from slimc.cli import main as cli_main
from slimc.errors import OptionError
from slimc.ir.graph import Graph
from slimc.passes import Exact, PassResult, register_pass
from slimc.passes.fuse import DEFAULT, Op, Var, register_rule
from slimc.recipe import Recipe

TOL = 1e-5


# -- every registered pass on the native objects --------------------------------------------------
def _calib(inputs):
    return [tuple(np.asarray(x) for x in inputs)]


# per pass: options that change a small BERT (or, for exact passes, keep it equal) and what must
# hold afterwards. "exact": outputs within TOL; "changed": some weight or the op set differs.
CASES = {
    "cleanup": (lambda inputs: {}, "exact"),
    "fuse": (lambda inputs: {}, "exact"),
    "threshold_weights": (lambda inputs: {"sparsity": 0.3}, "changed"),
    "prune_heads": (lambda inputs: {"heads": {0: [1]}}, "changed"),
    "prune_ffn": (lambda inputs: {"neurons": {0: [1]}}, "changed"),
    "drop_layers": (lambda inputs: {"n": 1, "calib": _calib(inputs)}, "changed"),
    "factorize_low_rank": (lambda inputs: {"rank": 4, "only_if_smaller": False}, "changed"),
    "quantize": (lambda inputs: {"calib": _calib(inputs)}, "changed"),
    # BERT is post-norm: its LayerNorm outputs also feed the residual, so only "insert" applies
    "smooth_quant": (lambda inputs: {"calib": _calib(inputs), "alpha": 0.5, "mode": "insert"},
                     "exact"),
    # needs fake-quant to fold: runs on quantize's result (see _prepare)
    "fold_fake_quant": (lambda inputs: {}, "changed"),
}


def _builtin_passes() -> list[str]:
    return [i.name for i in passes.list_passes() if i.run.__module__.startswith("slimc.passes")]


def test_cases_cover_every_builtin_pass():
    missing = sorted(set(_builtin_passes()) - set(CASES))
    assert not missing, f"add these passes to CASES: {missing}"


@pytest.fixture(scope="module")
def bert():
    model, inputs, _ = ZOO["bert"]()
    fx = slimc.capture(model, inputs).native
    return {"fx": fx, "onnx": to_onnx("bert"), "inputs": tuple(np.asarray(x) for x in inputs)}


def _prepare(name, native, inputs):
    if name == "fold_fake_quant":
        return passes.quantize(native, calib=_calib(inputs))
    return native


def _fingerprint(native):
    if isinstance(native, onnx.ModelProto):
        return native.SerializeToString()
    return (native.code, {k: v.detach().clone() for k, v in native.state_dict().items()})


def _same(a, b) -> bool:
    if isinstance(a, bytes):
        return a == b
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(
        torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize("backend", ["fx", "onnx"])
@pytest.mark.parametrize("name", [n for n in sorted(CASES) if n in _builtin_passes()])
def test_pass_on_native_object(bert, name, backend):
    make_options, expect = CASES[name]
    native = _prepare(name, bert[backend], bert["inputs"])
    before = _fingerprint(native)
    out = getattr(passes, name)(native, **make_options(bert["inputs"]))
    kind = torch.fx.GraphModule if backend == "fx" else onnx.ModelProto
    assert isinstance(out, kind) and out is not native
    assert _same(_fingerprint(native), before), "the pass edited its input"
    want = Graph(backend, native).run(*bert["inputs"])
    got = Graph(backend, out).run(*bert["inputs"])
    if expect == "exact":
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=TOL, atol=TOL)
    else:
        assert not _same(_fingerprint(out), before)
        assert all(np.all(np.isfinite(g)) and g.shape == w.shape for g, w in zip(got, want))


# -- user passes --------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _forget_user_registrations():
    """Passes and rules a test registers are removed after it: the registries are global, and
    sweeps over every registered pass in other tests must not see them."""
    from slimc.passes import registry
    from slimc.passes.fuse import CATALOGUE, USER_RULES
    passes_before, rules_before = set(registry._REGISTRY), set(CATALOGUE)
    yield
    for name in set(registry._REGISTRY) - passes_before:
        del registry._REGISTRY[name]
    for name in set(CATALOGUE) - rules_before:
        del CATALOGUE[name]
        USER_RULES.remove(name)


def _double_bias(graph, /, *, factor: float = 2.0) -> PassResult:
    """Scale every 1-D weight (the biases) by ``factor`` (a test pass: not semantics-preserving
    unless factor is 1)."""
    changed = 0
    for name, w in graph.weights().items():
        if w.ndim == 1 and np.issubdtype(w.dtype, np.floating):
            graph.set_weight(name, w * factor)
            changed += 1
    return PassResult(graph, changed > 0, {"scaled": changed})


def _linear():
    torch.manual_seed(0)
    return slimc.capture(torch.nn.Linear(4, 3), (torch.randn(2, 4),))


def test_user_pass_works_on_every_form_and_in_recipes():
    double_bias = register_pass("test_plugins_double_bias", contract=Exact())(_double_bias)
    g = _linear()
    assert passes.get_pass("test_plugins_double_bias").options == ("factor",)
    out = double_bias(g.fx, factor=1.0)
    assert isinstance(out, torch.fx.GraphModule)
    recipe = Recipe.from_dict({"passes": [{"name": "test_plugins_double_bias", "factor": 1.0},
                                          {"name": "cleanup"}]})
    new, report = recipe.apply(g, check_inputs=[g.example_inputs])
    assert [r.name for r in report.rows] == ["test_plugins_double_bias", "cleanup"]
    np.testing.assert_allclose(new.run(*g.example_inputs)[0], g.run(*g.example_inputs)[0],
                               rtol=TOL, atol=TOL)
    with pytest.raises(OptionError, match="has no option 'scale'.*Valid options.*factor"):
        Recipe.from_dict({"passes": [{"name": "test_plugins_double_bias", "scale": 1.0}]})
    # its Exact contract is checked on the result: factor 2 breaks it, and the error says so
    with pytest.raises(slimc.SlimcError, match="test_plugins_double_bias"):
        Recipe.from_dict({"passes": [{"name": "test_plugins_double_bias"}]}).apply(
            g, check_inputs=[g.example_inputs])


def test_taken_pass_name_is_an_error():
    with pytest.raises(slimc.SlimcError, match="already registered"):
        register_pass("cleanup", contract=Exact())(lambda graph: PassResult(graph, False))


# -- user fusion rules --------------------------------------------------------------------------
def _relu_twice(b, m):
    """relu(relu(x)) -> relu(x)."""
    return m["inner"].outputs[0]


class _ReluTwice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(torch.relu(self.lin(x)))


def _relu_twice_onnx() -> onnx.ModelProto:
    # built by hand: torch's exporter already drops the second Relu
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8), np.float32),
                                "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r1"]),
             helper.make_node("Relu", ["r1"], ["y"])]
    graph = helper.make_graph(nodes, "relu_twice",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_user_rule_fires_by_object_by_name_and_in_recipes():
    rule = register_rule("test_plugins_relu_twice",
                         pattern=Op("Relu", Op("Relu", Var("x"), name="inner")))(_relu_twice)
    assert rule.doc == "relu(relu(x)) -> relu(x)."
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    g = slimc.capture(_ReluTwice(), (torch.from_numpy(x),))
    by_object = passes.fuse.run(g.fx, rules=DEFAULT + rule)
    by_name = passes.fuse.run(g, rules=["DEFAULT", "test_plugins_relu_twice"])
    for r in (by_object, by_name):
        assert r.stats["fired"]["test_plugins_relu_twice"] == 1
    assert by_name.graph.op_histogram()["relu.default"] == 1
    np.testing.assert_allclose(by_name.graph.run(x)[0], g.run(x)[0], rtol=TOL, atol=TOL)
    model = _relu_twice_onnx()
    out = passes.fuse.run(model, rules=[rule])
    assert out.stats["fired"] == {"test_plugins_relu_twice": 1}
    assert [n.op_type for n in out.graph.graph.node] == ["MatMul", "Relu"]
    np.testing.assert_allclose(Graph("onnx", out.graph).run(x)[0],
                               Graph("onnx", model).run(x)[0], rtol=TOL, atol=TOL)
    recipe = Recipe.from_dict({"passes": [{"name": "fuse",
                                           "rules": ["DEFAULT", "test_plugins_relu_twice"]}]})
    new, _ = recipe.apply(g)
    assert new.last_stats["fired"]["test_plugins_relu_twice"] == 1
    # DEFAULT stays as shipped: a registered rule runs only where asked for
    assert "test_plugins_relu_twice" not in DEFAULT
    assert "test_plugins_relu_twice" not in passes.fuse.run(g).stats["fired"]


def test_rule_name_clash_is_an_error():
    with pytest.raises(OptionError, match="'layer_norm' is already registered"):
        register_rule("layer_norm", pattern=Op("Relu", Var("x")))(lambda b, m: m["x"])
    with pytest.raises(OptionError, match="already registered"):
        register_rule("DEFAULT", pattern=Op("Relu", Var("x")))(lambda b, m: m["x"])


PLUGIN = '''
import numpy as np
from slimc.passes import Exact, PassResult, register_pass
from slimc.passes.fuse import Op, Var, register_rule


@register_pass("test_cli_plugin_pass", contract=Exact())
def test_cli_plugin_pass(graph, /, *, alpha: float = 1.0) -> PassResult:
    """A plugin pass that changes nothing."""
    return PassResult(graph, False, {})


@register_rule(pattern=Op("Neg", Op("Neg", Var("x"), name="inner")))
def test_cli_plugin_rule(b, m):
    """neg(neg(x)) -> x."""
    return m["x"]
'''


@pytest.fixture
def plugin(tmp_path):
    path = tmp_path / "my_slimc_plugin.py"
    path.write_text(PLUGIN)
    yield path
    sys.modules.pop(path.stem, None)


def test_cli_plugin_shows_user_pass_and_rule(tmp_path, plugin, capsys):
    assert cli_main(["--plugin", str(plugin), "passes", "--list"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("test_cli_plugin_pass "))
    assert "exact" in line and "alpha" in line and "A plugin pass that changes nothing." in line
    line = next(ln for ln in out.splitlines() if ln.startswith("test_cli_plugin_rule "))
    assert "user" in line and "neg(neg(x)) -> x." in line
    assert cli_main(["--plugin", str(tmp_path / "missing.py"), "passes"]) == 2
    assert "no such file" in capsys.readouterr().err

    # the plugin's pass and rule in a recipe given to `slimc optimize`
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32) * 3, "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Neg", ["h"], ["n"]),
             helper.make_node("Neg", ["n"], ["y"])]
    graph = helper.make_graph(nodes, "negneg",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "m.onnx")
    (tmp_path / "r.toml").write_text('[[passes]]\nname = "test_cli_plugin_pass"\nalpha = 2.0\n\n'
                                     '[[passes]]\nname = "fuse"\n'
                                     'rules = ["test_cli_plugin_rule"]\n')
    rc = cli_main(["--plugin", str(plugin), "optimize", str(tmp_path / "m.onnx"), "--recipe",
                   str(tmp_path / "r.toml"), "-o", str(tmp_path / "out.onnx")])
    assert rc == 0, capsys.readouterr().err
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert [n.op_type for n in out.graph.node] == ["MatMul"]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(Graph("onnx", out).run(x)[0], x * 3, rtol=TOL, atol=TOL)
