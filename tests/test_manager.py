"""PassManager: report fields against independent counts, contracts enforced on results, errors that
name the pass and the passes before it, instruments, and passes given as plain callables."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from zoo import ZOO, to_onnx

import slimc
from slimc.errors import OptionError, PassError
from slimc.passes import Exact, Lossy, PassManager, PassResult, register_pass, registry
from slimc.passes.manager import Dump, compare
from slimc.passes.registry import Instrument, instrument_all_passes


class _Small(torch.nn.Module):
    """Known weights: a Linear with a zeroed block, and a dropout cleanup removes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 6)
        self.out = torch.nn.Linear(6, 3)
        with torch.no_grad():
            self.lin.weight[:2] = 0.0

    def forward(self, x):
        return self.out(torch.nn.functional.dropout(torch.relu(self.lin(x)), 0.1, False))


@pytest.fixture
def small():
    module = _Small().eval()
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    return module, x, slimc.capture(module, (x,))


@pytest.fixture
def test_passes():
    """Passes registered for one test and removed after it (the registry is global: other tests,
    e.g. contract sweeps over every registered pass, must not see them)."""
    names = []

    def register(name, contract, impl):
        names.append(name)
        return register_pass(name, contract=contract)(impl)

    yield register
    for name in names:
        registry._REGISTRY.pop(name, None)


def _scale_first_weight(graph, factor):
    name = min(graph.weights())
    graph.set_weight(name, graph.get_weight(name) * factor)
    return name


def _float_weight_arrays(module):
    return [p.detach().numpy() for p in module.parameters()]


# -- the report -------------------------------------------------------------------------------

def test_report_fields_match_independent_counts(small):
    module, x, g = small
    other = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    out, report = PassManager(["cleanup"]).run(g, check_inputs=[(x,), (other.numpy(),)])
    arrays = _float_weight_arrays(module)
    assert report.baseline["parameters"] == sum(a.size for a in arrays) == 8 * 6 + 6 + 6 * 3 + 3
    assert report.baseline["nonzeros"] == sum(np.count_nonzero(a) for a in arrays)
    assert report.baseline["bytes"] == g.serialized_size()
    (row,) = report.rows
    assert row.name == "cleanup" and row.contract == "exact(1e-05,1e-05)" and row.checked
    assert row.modified and row.stats["removed"] == {"dropout.default": 1}
    assert row.parameters == report.baseline["parameters"]
    assert row.nonzeros == report.baseline["nonzeros"]
    assert row.bytes == out.serialized_size()
    assert row.seconds > 0
    # deviation measured by hand against the torch module, on both inputs
    with torch.no_grad():
        want = np.concatenate([module(t).numpy().ravel() for t in (x, other)])
    got = np.concatenate([out.run(t.numpy())[0].ravel() for t in (x, other)])
    assert row.max_abs_total == pytest.approx(float(np.abs(got - want).max()), abs=1e-12)
    cos = float(got @ want / np.linalg.norm(got) / np.linalg.norm(want))
    assert row.cosine_total == pytest.approx(cos, abs=1e-12)
    assert row.max_abs == 0.0 and row.cosine == pytest.approx(1.0)


def test_report_onnx_bytes_and_parameters():
    model = to_onnx("mha", "torchscript")
    g = slimc.Graph("onnx", model)
    out, report = PassManager(["cleanup"]).run(g, check_inputs=[g.sample_inputs()])
    assert report.baseline["bytes"] == len(model.SerializeToString())
    assert report[0].bytes == len(out.onnx.SerializeToString())
    weights = [numpy_helper.to_array(t) for t in out.onnx.graph.initializer]
    counted = [w for w in weights if w.dtype.kind == "f" or (w.dtype.kind in "iu" and w.ndim >= 2)]
    assert report[0].parameters == sum(w.size for w in counted)
    assert report[0].nonzeros == sum(np.count_nonzero(w) for w in counted)


def test_report_table_and_dict(small, test_passes):
    _, x, g = small

    def lossy(graph, /, *, factor=1.0):
        _scale_first_weight(graph, factor)
        return PassResult(graph, factor != 1.0, {"factor": factor, "shape": (2, 3)})

    test_passes("_test_manager_table_lossy", Lossy(identity={"factor": 1.0}), lossy)
    pm = PassManager(["cleanup", ("_test_manager_table_lossy", {"factor": 0.5})])
    _, report = pm.run(g, check_inputs=[(x,)])
    text = report.table()
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["pass", "contract", "modified"]
    assert lines[2].startswith("(input)")
    assert lines[3].startswith("cleanup") and lines[4].startswith("_test_manager_table_lossy")
    assert str(report) == text
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert [p["name"] for p in d["passes"]] == ["cleanup", "_test_manager_table_lossy"]
    assert d["passes"][1]["stats"] == {"factor": 0.5, "shape": [2, 3]}
    assert d["passes"][1]["contract"] == "lossy" and d["passes"][1]["checked"] is False
    assert d["baseline"] == report.baseline


def test_no_check_inputs_means_no_deviation(small):
    _, _, g = small
    _, report = PassManager(["cleanup"]).run(g)
    assert report[0].max_abs is None and report[0].cosine is None and not report[0].checked


# -- contracts --------------------------------------------------------------------------------

def test_broken_exact_pass_fails_naming_it_and_the_passes_before(small, test_passes):
    _, x, g = small

    def broken(graph, /):
        _scale_first_weight(graph, 1.01)
        return PassResult(graph, True, {})

    test_passes("_test_manager_broken_exact", Exact(), broken)
    pm = PassManager(["cleanup", "_test_manager_broken_exact", "cleanup"])
    with pytest.raises(PassError) as info:
        pm.run(g, check_inputs=[(x,)])
    msg = str(info.value)
    assert "Pass _test_manager_broken_exact" in msg and "(after cleanup)" in msg
    # the deviation it reports is the real one
    bad = registry.get_pass("_test_manager_broken_exact").run(slimc.passes.cleanup(g)).graph
    dev = np.abs(bad.run(x.numpy())[0] - g.run(x.numpy())[0]).max()
    assert f"max |deviation| {dev:.3g}" in msg


def test_lossy_pass_is_reported_not_failed(small, test_passes):
    _, x, g = small

    def zero_half(graph, /, *, ratio=0.0):
        name = "lin.weight"
        w = graph.get_weight(name)
        w.ravel()[: int(ratio * w.size)] = 0.0
        graph.set_weight(name, w)
        return PassResult(graph, ratio > 0, {"zeroed": int(ratio * w.size)})

    test_passes("_test_manager_lossy", Lossy(identity={"ratio": 0.0}), zero_half)
    out, report = PassManager([("_test_manager_lossy", {"ratio": 0.5})]).run(
        g, check_inputs=[(x,)])
    row = report[0]
    assert not row.checked and row.contract == "lossy"
    want = g.run(x.numpy())[0]
    got = out.run(x.numpy())[0]
    assert row.max_abs == pytest.approx(float(np.abs(got - want).max())) and row.max_abs > 1e-3
    assert row.cosine < 1.0
    assert row.nonzeros < report.baseline["nonzeros"]
    # at its identity setting the lossy pass is exact, and held to it
    _, report = PassManager([("_test_manager_lossy", {"ratio": 0.0})]).run(
        g, check_inputs=[(x,)])
    assert report[0].checked and report[0].max_abs == 0.0


def test_lossy_pass_that_is_not_exact_at_identity_fails(small, test_passes):
    _, x, g = small

    def always_changes(graph, /, *, ratio=0.0):
        _scale_first_weight(graph, 2.0)
        return PassResult(graph, True, {})

    test_passes("_test_manager_bad_identity", Lossy(identity={"ratio": 0.0}), always_changes)
    with pytest.raises(PassError, match="_test_manager_bad_identity"):
        PassManager([("_test_manager_bad_identity", {"ratio": 0.0})]).run(g, check_inputs=[(x,)])


def test_changed_output_shape_fails(small):
    _, x, g = small

    def slice_output(gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        last = out.args[0][0]
        with gm.graph.inserting_before(out):
            cut = gm.graph.call_function(torch.ops.aten.slice.Tensor, (last, 1, 0, 1))
        out.args = ((cut,),)
        gm.recompile()

    with pytest.raises(PassError, match="slice_output.*changed the model's outputs"):
        PassManager([slice_output]).run(g.fx, check_inputs=[(x,)])


# -- plain callables, errors, instruments ------------------------------------------------------

def test_plain_callable_gets_a_copy_of_the_callers_kind(small):
    _, x, g = small
    gm = g.fx
    code, seen = gm.code, []

    def drop_relu(m):
        seen.append(type(m))
        for n in list(m.graph.nodes):
            if n.target == torch.ops.aten.relu.default:
                n.replace_all_uses_with(n.args[0])
                m.graph.erase_node(n)
        m.recompile()

    out, report = PassManager(["cleanup", drop_relu]).run(gm, check_inputs=[(x,)])
    assert isinstance(out, torch.fx.GraphModule) and len(seen) == 1
    assert issubclass(seen[0], torch.fx.GraphModule)
    assert gm.code == code  # the caller's module is untouched
    row = report["drop_relu"]
    assert row.contract == "none" and row.modified and not row.checked
    assert row.max_abs > 0  # reported, not enforced: a plain callable declares no contract
    assert not any(n.target == torch.ops.aten.relu.default for n in out.graph.nodes)


def test_plain_callable_with_an_exact_contract_is_checked(small):
    _, x, g = small

    def nudge(graph):
        _scale_first_weight(graph, 1.5)

    nudge.contract = Exact()
    with pytest.raises(PassError, match=r"Pass nudge .*\(after cleanup\)"):
        PassManager(["cleanup", nudge]).run(g, check_inputs=[(x,)])


def test_an_exception_names_the_pass_and_those_before(small):
    _, _, g = small

    def explode(graph):
        raise RuntimeError("boom")

    with pytest.raises(PassError, match=r"Pass explode failed \(after cleanup, cleanup\).*boom"):
        PassManager(["cleanup", "cleanup", explode]).run(g)


def test_option_errors_name_the_pass_and_those_before(small):
    _, _, g = small
    with pytest.raises(OptionError, match=r"In pass cleanup \(after cleanup\).*max_fold_bytes"):
        PassManager(["cleanup", ("cleanup", {"max_fold_bytes": -1})]).run(g)


def test_bad_specs_are_refused_when_building():
    with pytest.raises(OptionError, match="no option 'ratio'"):
        PassManager([("cleanup", {"ratio": 0.5})])
    with pytest.raises(OptionError, match="Unknown pass"):
        PassManager(["no_such_pass"])
    with pytest.raises(OptionError, match="not a pass"):
        PassManager([42])
    with pytest.raises(OptionError, match="check_inputs"):
        PassManager(["cleanup"]).run(slimc.Graph("onnx", to_onnx("mha")), check_inputs=np.ones(3))


def test_verification_is_on_for_plain_callables_in_tests(small):
    """conftest.py switches verification on for every pass: an FX edit without recompile and an
    ONNX model the checker rejects both fail, naming the pass."""
    _, _, g = small

    def forget_recompile(gm):
        n = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.relu.default)
        n.replace_all_uses_with(n.args[0])
        gm.graph.erase_node(n)

    with pytest.raises(PassError, match="forget_recompile produced a malformed FX graph.*stale"):
        PassManager([forget_recompile]).run(g.fx)

    def dangling(model):
        model.graph.node[0].input[0] = "nowhere"

    with pytest.raises(PassError, match="dangling produced a malformed ONNX graph"):
        PassManager([dangling]).run(to_onnx("mha"))


def test_verification_is_on_for_registered_passes_called_directly(small, test_passes):
    _, _, g = small

    def stale(graph, /):
        gm = graph.native
        n = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.relu.default)
        n.replace_all_uses_with(n.args[0])
        gm.graph.erase_node(n)
        return PassResult(graph, True, {})

    bad = test_passes("_test_manager_stale", Exact(), stale)
    with pytest.raises(PassError, match="_test_manager_stale produced a malformed FX graph"):
        bad(g)


def test_instruments_run_around_every_pass_in_order(small, tmp_path):
    _, x, g = small
    calls = []

    class Record(Instrument):
        def before(self, name, graph):
            calls.append(("before", name, graph.backend))

        def after(self, name, graph, result):
            calls.append(("after", name, result.modified))

    def noop(gm):
        return gm

    dump = Dump(tmp_path)
    PassManager(["cleanup", noop], instruments=[Record(), dump]).run(g, check_inputs=[(x,)])
    assert calls == [("before", "cleanup", "fx"), ("after", "cleanup", True),
                     ("before", "noop", "fx"), ("after", "noop", False)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01_cleanup.py", "02_noop.py"]
    assert "dropout" not in (tmp_path / "01_cleanup.py").read_text()

    onnx_dir = tmp_path / "onnx"
    PassManager(["cleanup"], instruments=[Dump(onnx_dir)]).run(to_onnx("mha", "torchscript"))
    dumped = onnx.load(str(onnx_dir / "01_cleanup.onnx"))
    onnx.checker.check_model(dumped)


def test_global_instruments_see_registered_passes_once(small):
    _, _, g = small
    names = []

    class Count(Instrument):
        def after(self, name, graph, result):
            names.append(name)

    with instrument_all_passes(Count()):
        PassManager(["cleanup", lambda gm: None]).run(g)
        slimc.passes.cleanup(g)
    assert names == ["cleanup", "<lambda>", "cleanup"]


def test_onnx_pipeline_returns_a_model_proto():
    model = to_onnx("bert", "torchscript")
    g = slimc.Graph("onnx", model)
    out, report = PassManager(["cleanup", "cleanup"]).run(model, check_inputs=[g.sample_inputs()])
    assert isinstance(out, onnx.ModelProto)
    assert [r.modified for r in report.rows] == [True, False]
    assert report[1].bytes == report[0].bytes


# -- the comparison ---------------------------------------------------------------------------

def test_compare_edge_cases():
    nan, inf = float("nan"), float("inf")
    a = [np.array([1.0, nan, inf, 0.0], dtype=np.float32), np.array([True, False])]
    d = compare(a, [x.copy() for x in a], rtol=0.0, atol=0.0)
    assert d.max_abs == 0.0 and d.cosine == pytest.approx(1.0) and d.worst is None
    d = compare([np.array([1.0, 2.0])], [np.array([1.0, 2.5])], rtol=0.0, atol=0.1)
    assert d.max_abs == 0.5 and d.worst == (0, 1, 2.0, 2.5)
    assert compare([np.array([nan])], [np.array([1.0])]).max_abs == inf
    assert compare([np.zeros(3)], [np.zeros(3)]).cosine == 1.0
    assert compare([np.zeros(3)], [np.ones(3)]).cosine == 0.0
    assert math.isclose(compare([np.array([1.0, 0.0])], [np.array([0.0, 1.0])]).cosine, 0.0)
    with pytest.raises(ValueError, match="shape"):
        compare([np.zeros(3)], [np.zeros(4)])


def test_zoo_pipeline_on_both_backends():
    module, inputs, _ = ZOO["gpt2"]()
    g = slimc.capture(module, inputs)
    for graph in (g, slimc.Graph("onnx", to_onnx("gpt2"))):
        out, report = PassManager(["cleanup"]).run(graph, check_inputs=[graph.sample_inputs()])
        assert report[0].checked and report[0].max_abs <= 1e-5
        assert out.history[-1] == "cleanup"
