"""slimc.compress / `slimc compress`: the budgeted search over layers, FFN neurons, heads and int8.

What is checked: budgets are validated before any work (clear errors); the per-layer allocation
keeps its mean and its cap and cuts the less sensitive layers more; a real search on a small
BERT compiles every candidate, whose recorded passes rebuild exactly the graph that was
compiled (the artifact agrees with that graph) and whose front is the brute-force Pareto set;
the chosen candidate meets the budget, an impossible budget chooses none and says why; the
command writes model, build, report (with the front) and JSON, or nothing at all.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from zoo import _ids, bert, to_onnx

import slimc
from slimc import passes, runtime
from slimc.cli import main
from slimc.compression import (Setting, Space, _allocate, _check_budgets, agreement_metric,
                               compress, parse_fraction, parse_latency)
from slimc.errors import OptionError, UnsupportedError


@pytest.mark.parametrize("kw, match", [
    ({"max_drop": -0.01}, "max_drop"), ({"max_drop": 1.5}, "max_drop"),
    ({"max_drop": float("nan")}, "max_drop"), ({"latency": 0}, "fraction"),
    ({"latency": 2.0}, "fraction"), ({"latency_ms": -3}, "milliseconds"),
    ({"latency": 0.5, "latency_ms": 3}, "alternatives")])
def test_bad_budgets_are_clear_errors(kw, match):
    kw = {"max_drop": 0.01, "latency": None, "latency_ms": None, **kw}
    with pytest.raises(OptionError, match=match):
        _check_budgets(kw["max_drop"], kw["latency"], kw["latency_ms"])


def test_parse_budgets():
    assert parse_fraction("1%") == pytest.approx(0.01) and parse_fraction("0.02") == 0.02
    assert parse_latency("0.5") == (0.5, None) and parse_latency("0.5x") == (0.5, None)
    assert parse_latency("12ms") == (None, 12.0)
    with pytest.raises(OptionError, match="percentage"):
        parse_fraction("one percent")
    with pytest.raises(OptionError, match="milliseconds"):
        parse_latency("fast")


def test_allocate_keeps_mean_and_cap_and_follows_sensitivity():
    sens = [0.001, 0.01, 0.1, 0.0001]
    r = _allocate(sens, 0.5, cap=0.75)
    assert r.mean() == pytest.approx(0.5, abs=1e-9)
    assert r.max() <= 0.75 + 1e-12
    by_sens = r[np.argsort(sens)]  # least sensitive first: cut most (ties at the cap)
    assert all(a >= b - 1e-12 for a, b in zip(by_sens, by_sens[1:]))
    assert r[2] < r[1] < r[0]
    flat = _allocate([0.2] * 4, 0.3, cap=0.9)
    assert np.allclose(flat, 0.3)


def test_space_moves_stop_at_their_limits():
    sp = Space(ffn_step=0.25, ffn_max=0.5, heads_step=0.5, heads_max=0.5)
    s = Setting(drop=2, ffn=0.5, heads=0.5)
    assert sp.moves(s, 4, {"layers", "ffn", "heads"}) == []
    assert sp.moves(Setting(), 4, {"ffn"}) == [Setting(ffn=0.25)]


@pytest.fixture(scope="module")
def small():
    module, example, _ = bert(layers=4, heads=4, hidden=64)
    g = slimc.capture(module, example)
    calib = [(_ids(seed=i).numpy(),) for i in range(10)]
    return g, calib


def test_input_errors(small):
    g, calib = small
    with pytest.raises(OptionError, match="at least 4"):
        compress(g, calib=calib[:3])
    with pytest.raises(OptionError, match="precision"):
        compress(g, calib=calib, precisions=("int4",))
    with pytest.raises(OptionError, match="slimc.Graph"):
        compress(g.native, calib=calib)


def test_agreement_metric_is_one_for_the_reference(small):
    g, calib = small
    m = agreement_metric(g, calib[5:])
    est = m(g.run)
    assert float(est) == pytest.approx(1.0, abs=1e-6)
    other = passes.drop_layers(g, layers=[0, 1])
    assert float(m(other.run)) < 1 - 1e-4


@pytest.fixture(scope="module")
def searched(small, tmp_path_factory):
    g, calib = small
    work = tmp_path_factory.mktemp("search")
    res = compress(g, calib=calib, max_drop=0.2, max_steps=2, repeat=3, workdir=str(work),
                   space=Space(round_to=8), precisions=("fp32", "int8"), verbose=False)
    return g, calib, res


def test_search_compiles_and_measures_every_candidate(searched):
    g, calib, res = searched
    assert len(res.candidates) == 2 * 3  # original + 2 steps, fp32 and int8 each
    assert res.base.setting == Setting() and res.base.precision == "fp32"
    assert res.base.drops == {"agreement": pytest.approx(0.0, abs=1e-6)}
    assert set(res.sensitivity) == {"layers", "ffn", "heads", "int8"}
    assert all(len(v) == 4 for k, v in res.sensitivity.items() if k != "int8")
    for c in res.candidates:
        assert c.latency_ms > 0 and c.size_bytes > 0 and c.params > 0
        lo, hi = c.intervals["agreement"]
        assert lo <= c.metrics["agreement"] <= hi
    # every cut has fewer multiply-adds than the original
    assert all(c.macs < res.base.macs for c in res.candidates if c.setting != Setting())


def test_candidate_steps_rebuild_the_compiled_graph(searched):
    g, calib, res = searched
    c = [c for c in res.candidates if c.precision == "fp32"][-1]
    assert c.steps and c.graph is not None
    rebuilt = g
    for name, opts in c.steps:
        rebuilt = getattr(passes, name)(rebuilt, **opts)
    rebuilt = passes.cleanup(rebuilt)  # as the search does before compiling
    assert rebuilt.num_parameters() == c.params
    for x in calib[:2]:
        assert np.allclose(rebuilt.run(*x)[0], c.graph.run(*x)[0], atol=1e-5)
    # the artifact computes what its graph computes
    m = runtime.load(c.artifact_dir)
    for x in calib[:2]:
        assert np.allclose(m(*x)[0], c.graph.run(*x)[0], atol=1e-4)


def test_front_is_the_pareto_set(searched):
    _, _, res = searched

    def key(c):
        return (c.latency_ms, c.size_bytes, c.worst_drop)
    for c in res.candidates:
        dominated = any(all(a <= b for a, b in zip(key(o), key(c))) and key(o) != key(c)
                        for o in res.candidates if o is not c)
        assert c.front == (not dominated), c.name
    assert res.front and res.front == sorted(res.front, key=lambda c: c.latency_ms)


def test_chosen_meets_the_budget(searched):
    _, _, res = searched
    assert res.chosen is not None and res.chosen.worst_drop <= 0.2
    ok = [c for c in res.candidates if c.worst_drop <= 0.2]
    assert res.chosen.latency_ms == min(c.latency_ms for c in ok)
    table = res.table()
    assert "chosen" in table and res.chosen.name in table
    json.dumps(res.to_json(), default=str)


def test_a_cut_over_budget_is_kept_and_the_path_backs_off(small):
    g, calib = small
    res = compress(g, calib=calib, max_drop=0.0, max_steps=6, repeat=2, precisions=("fp32",),
                   verbose=False)
    cuts = [c.setting for c in res.candidates if c.setting != Setting()]
    # every cut loses something: each kind is tried once from the original, then blocked
    assert sorted(cuts, key=str) == sorted([Setting(drop=1), Setting(ffn=0.125),
                                            Setting(heads=0.125)], key=str)
    assert all(c.worst_drop > 0 for c in res.candidates if c.setting != Setting())
    assert res.chosen is res.base  # only the original meets a zero budget


def test_impossible_budget_chooses_none_and_says_why(small):
    g, calib = small
    res = compress(g, calib=calib, max_drop=0.0, latency=0.01, max_steps=1, repeat=2,
                   precisions=("fp32",), verbose=False)
    assert res.chosen is None
    assert "no candidate met the budget" in res.reason and "0." in res.reason


def test_recover_steps_need_a_torch_graph(tmp_path):
    (tmp_path / "bert.onnx").write_bytes(to_onnx("bert").SerializeToString())
    g = slimc.load(tmp_path / "bert.onnx")
    calib = [(_ids(seed=i).numpy(),) for i in range(4)]
    with pytest.raises(UnsupportedError, match="ONNX"):
        compress(g, calib=calib, recover_steps=5)


def _calib_npz(path, n=6):
    np.savez(path, *[np.stack([_ids(seed=i).numpy() for i in range(n)])])
    return path


def test_cli_writes_model_build_report(tmp_path, capsys):
    model = tmp_path / "bert.onnx"
    model.write_bytes(to_onnx("bert").SerializeToString())
    calib = _calib_npz(tmp_path / "calib.npz")
    out = tmp_path / "out"
    rc = main(["compress", str(model), "--calib", str(calib), "-o", str(out), "--max-drop",
               "30%", "--max-steps", "1", "--precision", "fp32", "--repeat", "2", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "chosen" in printed
    names = sorted(p.name for p in out.iterdir())
    assert names == ["build", "compress.json", "model.onnx", "report"]
    assert (out / "report" / "front.png").stat().st_size > 1000
    html = (out / "report" / "index.html").read_text()
    assert "front-table" in html and "Compression search" in html
    info = json.loads((out / "compress.json").read_text())
    assert info["chosen"] and len(info["candidates"]) == 2
    m = runtime.load(out / "build")
    g2 = slimc.load(out / "model.onnx")
    x = _ids(seed=7).numpy()
    assert np.allclose(m(x)[0], g2.run(x)[0], atol=1e-4)


def test_cli_budget_errors_write_nothing(tmp_path, capsys):
    model = tmp_path / "bert.onnx"
    model.write_bytes(to_onnx("bert").SerializeToString())
    calib = _calib_npz(tmp_path / "calib.npz")
    out = tmp_path / "out"
    rc = main(["compress", str(model), "--calib", str(calib), "-o", str(out),
               "--max-drop=-1%"])
    assert rc == 2 and "max_drop" in capsys.readouterr().err
    rc = main(["compress", str(model), "--calib", str(calib), "-o", str(out), "--latency",
               "0.01", "--max-drop", "0", "--max-steps", "1", "--precision", "fp32",
               "--repeat", "2", "--quiet", "--report", str(tmp_path / "rep")])
    err = capsys.readouterr().err
    assert rc == 3 and "no candidate met the budget" in err.lower()
    assert not out.exists()
    assert (tmp_path / "rep" / "front.png").exists()


def test_an_error_mid_search_leaves_no_candidates_behind(small, tmp_path, monkeypatch):
    import tempfile
    g, calib = small
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def broken(model):
        raise RuntimeError("metric failed")
    with pytest.raises(RuntimeError, match="metric failed"):
        compress(g, calib=calib, metrics={"broken": broken}, max_steps=1, repeat=1,
                 precisions=("fp32",), verbose=False)
    assert not list(tmp_path.glob("slimc-compress-*"))
