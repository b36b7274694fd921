"""Default CPU schedules, fast math and MetaSchedule tuning (slimc/codegen/{schedules,fast_math,
tune}.py): numerics against numpy/torch, which rule scheduled what, and the tuning database."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, te, tirx, topi
from zoo import ZOO

import slimc
from slimc.codegen.schedules import CPUConfig, apply_default_schedules, cpu_config, schedule_report
from slimc.codegen.targets import resolve_target
from slimc.codegen.tune import apply_database, count_records, database_hook, tune
from slimc.errors import OptionError

TARGET = resolve_target("x86")
RNG = np.random.default_rng(0)


def _run(mod: tvm.IRModule, *args: np.ndarray) -> np.ndarray:
    ex = tvm.compile(mod, target=TARGET, relax_pipeline="default")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


# -- fast math ---------------------------------------------------------------------------------
def _elementwise(fn, x: np.ndarray) -> np.ndarray:
    a = te.placeholder(x.shape, name="a", dtype="float32")
    b = fn(a)
    f = te.create_prim_func([a, b]).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": f}), target=TARGET).jit()
    out = tvm.runtime.tensor(np.zeros_like(x))
    lib["main"](tvm.runtime.tensor(x), out)
    return out.numpy()


@pytest.mark.parametrize("name, fast, exact, lo, hi, bound, relative", [
    ("erf", topi.fast_erf, np.vectorize(math.erf), -6.0, 6.0, 4e-7, False),
    ("exp", topi.fast_exp, np.exp, -87.0, 88.0, 4e-7, True),
    ("tanh", topi.fast_tanh, np.tanh, -12.0, 12.0, 4e-7, False),
])
def test_fast_math_error_is_within_the_documented_bound(name, fast, exact, lo, hi, bound,
                                                        relative):
    x = np.linspace(lo, hi, 200_001, dtype=np.float32)
    got = _elementwise(fast, x).astype(np.float64)
    want = exact(x.astype(np.float64))
    err = np.abs(got - want)
    if relative:
        err = err / np.abs(want)
    assert err.max() < bound, f"{name}: max error {err.max():.2e} above {bound:.0e}"
    # the libm version is not better by orders of magnitude: the bound is not vacuous
    assert err.max() > bound / 100


def test_fast_gelu_matches_the_exact_one():
    from slimc.codegen.fast_math import fast_math
    x = np.linspace(-8, 8, 4097, dtype=np.float32).reshape(1, -1)
    bb = relax.BlockBuilder()
    v = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with bb.function("main", [v]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.gelu(v)))
        bb.emit_func_output(out)
    mod = fast_math(bb.get())
    text = mod.script()
    assert "erf(" not in text.replace("fast_erf", ""), "erf was not replaced"
    got = _run(mod, x)
    want = torch.nn.functional.gelu(torch.from_numpy(x).double()).numpy()
    assert np.abs(got - want).max() < 2e-6


# -- default schedules: matmul shapes ------------------------------------------------------------
def _matmul_module(a_shape, b_shape, *, const_b, trans_b=False, bias=True, gelu=False,
                   dynamic_rows=False):
    b_np = RNG.standard_normal(b_shape).astype("float32")
    rows = tirx.Var("m", "int64") if dynamic_rows else a_shape[-2]
    x = relax.Var("x", relax.TensorType([*a_shape[:-2], rows, a_shape[-1]], "float32"))
    params = [x]
    if const_b:
        b = relax.const(b_np)
    else:
        b = relax.Var("w", relax.TensorType(b_shape, "float32"))
        params.append(b)
    n = b_shape[-2] if trans_b else b_shape[-1]
    bias_np = np.linspace(-1, 1, n, dtype=np.float32)
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            rank = len(b_shape)
            rhs = relax.op.permute_dims(b, [*range(rank - 2), rank - 1, rank - 2]) if trans_b \
                else b
            y = relax.op.matmul(x, rhs)
            if bias:
                y = relax.op.add(y, relax.const(bias_np))
            if gelu:
                y = relax.op.nn.gelu(y)
            out = bb.emit_output(bb.emit(y))
        bb.emit_func_output(out)
    a_np = RNG.standard_normal(a_shape).astype("float32")
    want = a_np.astype(np.float64) @ (np.swapaxes(b_np, -1, -2) if trans_b else b_np)
    if bias:
        want = want + bias_np
    if gelu:
        want = torch.nn.functional.gelu(torch.from_numpy(want)).numpy()
    args = (a_np,) if const_b else (a_np, b_np)
    return bb.get(), args, want


MATMULS = {
    "bert-linear": ((128, 768), (768, 768), {"const_b": True}),
    "odd-sizes": ((7, 13), (13, 10), {"const_b": True}),
    "rows-not-multiple-of-tile": ((37, 64), (64, 48), {"const_b": True, "gelu": True}),
    "weight-transposed": ((5, 33), (48, 33), {"const_b": True, "trans_b": True}),
    "activation": ((5, 33), (33, 48), {"const_b": False}),
    "activation-transposed": ((5, 33), (48, 33), {"const_b": False, "trans_b": True}),
    "batched-attention": ((3, 9, 64), (3, 64, 9), {"const_b": False, "bias": False}),
    "batch-and-rows-3d": ((2, 9, 64), (64, 32), {"const_b": True}),
    "4d-nt": ((2, 3, 9, 16), (2, 3, 9, 16), {"const_b": False, "bias": False, "trans_b": True}),
    "dynamic-rows": ((100, 64), (64, 96), {"const_b": True, "dynamic_rows": True, "gelu": True}),
}


@pytest.mark.parametrize("case", sorted(MATMULS))
def test_default_schedules_compute_matmuls_exactly(case):
    a_shape, b_shape, opts = MATMULS[case]
    mod, args, want = _matmul_module(a_shape, b_shape, **opts)
    out = apply_default_schedules(mod, TARGET)
    report = schedule_report(out)
    matmuls = {name: rule for name, rule in report.items() if "matmul" in name}
    assert matmuls and all(rule == "matmul" for rule in matmuls.values()), report
    got = _run(out, *args)
    assert got.shape == want.shape
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() / scale < 1e-5


def test_constant_weights_are_packed_at_build_time():
    mod, args, _ = _matmul_module((16, 64), (64, 64), const_b=True)
    out = apply_default_schedules(mod, TARGET)
    names = [gv.name_hint for gv, f in out.functions_items() if isinstance(f, tirx.PrimFunc)]
    # SplitLayoutRewritePreproc split the kernel; FoldConstant ran the packing and dropped it
    assert any(n.endswith("_prepacked") for n in names), names
    assert not any("weight_prepack" in n for n in names), names
    packed = [c for c in _constants(out) if c.shape == (4, 64, 16) or c.shape == (2, 64, 32)]
    assert packed, "no packed [N/nr, K, nr] weight constant in main"
    no_pack = apply_default_schedules(mod, TARGET, config=CPUConfig(
        **{**cpu_config(TARGET).__dict__, "pack_weights": False}))
    assert not any(gv.name_hint.endswith("_prepacked") for gv, _ in no_pack.functions_items())
    np.testing.assert_allclose(_run(no_pack, *args), _run(out, *args), rtol=1e-6, atol=1e-5)


def _constants(mod: tvm.IRModule) -> list[np.ndarray]:
    found = []

    def visit(e):
        if isinstance(e, tvm.ir.expr.Constant) and hasattr(e.value, "numpy"):
            found.append(e.value.numpy())

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def test_non_cpu_targets_are_left_to_tvm():
    mod, _, _ = _matmul_module((4, 8), (8, 8), const_b=True)
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_80"}, host={"kind": "llvm"})
    assert apply_default_schedules(mod, cuda).same_as(mod)


def test_cpu_config_follows_the_vector_isa():
    wide = cpu_config(tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"}))
    avx2 = cpu_config(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}))
    arm = cpu_config(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                        "mattr": ["+neon"]}))
    assert (wide.lanes, avx2.lanes, arm.lanes) == (16, 8, 4)
    for cfg in (wide, avx2, arm):
        assert cfg.nr % cfg.lanes == 0


# -- default schedules on real architectures -----------------------------------------------------
@pytest.mark.parametrize("name", ["bert", *(pytest.param(n, marks=pytest.mark.slow)
                                            for n in ("gpt2", "vit", "llama"))])
def test_default_schedules_keep_zoo_models_exact(name):
    module, inputs, _ = ZOO[name]()
    g = slimc.capture(module, inputs)
    art = slimc.compile(g, "x86", tune=apply_default_schedules)
    vm = relax.VirtualMachine(art.executable, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x) for x in g.example_inputs])
    got = out.numpy() if hasattr(out, "numpy") else out[0].numpy()
    want = g.run(*g.example_inputs)[0]
    assert np.abs(got - want).max() < 1e-4


def test_every_matmul_of_an_encoder_gets_the_matmul_rule():
    from slimc.codegen.build import to_relax
    module, inputs, _ = ZOO["bert"]()
    mod, _, _ = to_relax(slimc.capture(module, inputs))
    report = schedule_report(apply_default_schedules(mod, TARGET))
    matmuls = [n for n in report if "matmul" in n]
    assert len(matmuls) >= 5   # QKV/out/FFN linears + two attention batch matmuls
    assert all(report[n] == "matmul" for n in matmuls), report
    unscheduled = [n for n, rule in report.items() if rule is None]
    # only tiny whole-tensor reductions (the mask check) may stay as TVM legalized them
    assert len(unscheduled) <= 1, unscheduled


def test_default_schedules_are_much_faster_than_untuned():
    mod, args, _ = _matmul_module((64, 256), (256, 256), const_b=True)
    fast = tvm.compile(apply_default_schedules(mod, TARGET), target=TARGET)
    slow = tvm.compile(mod, target=TARGET)

    def best_of(ex, n=5):
        vm = relax.VirtualMachine(ex, tvm.cpu())
        a = [tvm.runtime.tensor(x) for x in args]
        vm["main"](*a)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            vm["main"](*a)
            times.append(time.perf_counter() - t)
        return min(times)

    # measured ~50-100x here; 5x leaves room for a loaded machine without becoming vacuous
    assert best_of(slow) > 5 * best_of(fast)


# -- tuning --------------------------------------------------------------------------------------
def _small_model():
    """One linear + GELU: two kernels at most, fast to tune."""
    return _matmul_module((32, 64), (64, 64), const_b=True, gelu=True)


def test_tuning_writes_records_and_a_second_tune_runs_no_trials(tmp_path, capsys):
    mod, args, want = _small_model()
    db = tmp_path / "db"
    first = tune(mod, TARGET, trials=6, db=db)
    assert first.trials >= 1 and first.tuned == first.tasks >= 1
    assert count_records(db) > 0
    assert (db / "database_tuning_record.json").stat().st_size > 0
    err = capsys.readouterr().err
    assert "tune [" in err and "best" in err and "ETA" in err

    # the estimate's trajectory: complete after the first batch of every task, never rising
    assert first.history and all(b >= a for (a, _), (b, _) in zip(first.history,
                                                                   first.history[1:]))
    assert all(b <= a for (_, a), (_, b) in zip(first.history, first.history[1:]))
    assert 0 <= first.seconds_to_reach(0.9) <= first.history[-1][0]
    assert "90 % of its final speed" in first.table()

    second = tune(mod, TARGET, trials=6, db=db)
    assert second.trials == 0 and second.skipped == second.tasks
    assert count_records(db) == first.records

    # a larger budget reopens the tasks and adds trials
    third = tune(mod, TARGET, trials=12, db=db, progress=False)
    assert third.trials > 0 and count_records(db) > first.records

    tuned = apply_database(mod, TARGET, db)
    got = _run(tuned, *args)
    assert np.abs(got - want).max() / max(1.0, np.abs(want).max()) < 1e-5


@pytest.mark.slow
def test_tuned_model_matches_torch(tmp_path):
    module, inputs, _ = ZOO["mha"]()
    g = slimc.capture(module, inputs)
    from slimc.codegen.build import to_relax
    mod, _, _ = to_relax(g)
    db = tmp_path / "db"
    summary = tune(mod, TARGET, trials=12, db=db, progress=False)
    assert summary.records > 0
    art = slimc.compile(g, "x86", tune=database_hook(db))
    assert "database_hook" in art.metadata["schedules"]
    vm = relax.VirtualMachine(art.executable, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x) for x in g.example_inputs])
    got = out.numpy() if hasattr(out, "numpy") else out[0].numpy()
    assert np.abs(got - g.run(*g.example_inputs)[0]).max() < 1e-4


def test_time_budget_stops_tuning(tmp_path):
    mod, _, _ = _small_model()
    start = time.perf_counter()
    summary = tune(mod, TARGET, seconds=3, db=tmp_path / "db", progress=False)
    # the budget is checked after each measured batch: one batch may run over
    assert time.perf_counter() - start < 120
    assert summary.trials >= 1 and summary.records >= 1


def test_budget_is_shared_by_cost_with_a_floor():
    from slimc.codegen.tune import TaskStatus, _budgets
    tasks = [TaskStatus("matmul", 4, 1e9), TaskStatus("gelu", 1, 1e5), TaskStatus("add", 8, 1e4)]
    _budgets(tasks, trials=200, seconds=None)
    budgets = [t.budget for t in tasks]
    assert sum(budgets) <= 200 and budgets[0] > 150 and min(budgets) >= 8
    fresh = [TaskStatus("matmul", 4, 1e9), TaskStatus("gelu", 1, 1e5)]
    _budgets(fresh, trials=None, seconds=None)
    assert all(t.budget == 64 for t in fresh)
    _budgets(tasks, trials=None, seconds=None)   # a default budget never lowers an earlier one
    assert tasks[0].budget == budgets[0]


def test_a_torn_last_line_is_dropped_and_the_database_loads(tmp_path):
    mod, args, want = _small_model()
    db = tmp_path / "db"
    tune(mod, TARGET, trials=3, db=db, progress=False)
    records = db / "database_tuning_record.json"
    good = records.read_text()
    lines = good.splitlines()
    assert len(lines) >= 2
    before = count_records(db)
    records.write_text(good + lines[0][: len(lines[0]) // 2])   # a kill during an append
    assert count_records(db) == before                         # counting skips the torn line
    tuned = apply_database(mod, TARGET, db)                     # opening drops it
    assert records.read_text() == good
    np.testing.assert_allclose(_run(tuned, *args), want, rtol=1e-4, atol=1e-4)
    records.write_text("\n".join([lines[0][:10], *lines[1:]]) + "\n")
    with pytest.raises(slimc.SlimcError, match="corrupt at line 1"):
        apply_database(mod, TARGET, db)


@pytest.mark.slow
def test_a_killed_tune_keeps_its_records_and_resumes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    db = tmp_path / "db"
    paths = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
    script = (
        f"import sys; sys.path[:0] = {paths!r}\n"
        "from test_tune import _small_model, TARGET\n"
        "from slimc.codegen.tune import tune\n"
        "mod, _, _ = _small_model()\n"
        f"tune(mod, TARGET, trials=400, db={str(db)!r}, progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = db / "slimc_tune.json"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if state.exists() and count_records(db) >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the tuning process ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    kept = count_records(db)
    assert kept >= 2
    mod, args, want = _small_model()
    resumed = tune(mod, TARGET, trials=400, db=db, seconds=5, progress=False)
    # progress was saved: the resumed run continues from the trials already made
    assert any(t.trials > resumed.trials for t in resumed.per_task) or resumed.skipped
    assert count_records(db) >= kept
    np.testing.assert_allclose(_run(apply_database(mod, TARGET, db), *args), want,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_ctrl_c_stops_after_the_batch_and_the_next_tune_continues(tmp_path):
    import os
    import signal
    import threading
    mod, args, want = _small_model()
    db = tmp_path / "db"

    def press_ctrl_c():
        while count_records(db) < 1:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    stopped = tune(mod, TARGET, trials=200, db=db, progress=False)
    assert stopped.interrupted and 1 <= stopped.trials < 200
    assert stopped.unfinished == 1          # the task is not marked done: it resumes
    resumed = tune(mod, TARGET, trials=stopped.trials + 2, db=db, progress=False)
    assert not resumed.interrupted and resumed.trials == 2
    np.testing.assert_allclose(_run(apply_database(mod, TARGET, db), *args), want,
                               rtol=1e-4, atol=1e-4)


def test_a_database_for_another_target_is_refused(tmp_path):
    mod, _, _ = _small_model()
    db = tmp_path / "db"
    tune(mod, TARGET, trials=1, db=db, progress=False)
    other = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
    with pytest.raises(slimc.errors.OptionError, match="one database directory per target"):
        tune(mod, other, trials=1, db=db, progress=False)


def test_missing_database_is_an_error(tmp_path):
    mod, _, _ = _small_model()
    with pytest.raises(slimc.SlimcError, match="does not exist"):
        apply_database(mod, TARGET, tmp_path / "nowhere")


def test_time_to_reach_a_fraction_of_the_final_speed():
    from slimc.codegen.tune import TuneSummary
    summary = TuneSummary(tasks=1, tuned=1, skipped=0, trials=3, records=3, seconds=9.0,
                          history=[(1.0, 10.0), (2.0, 5.0), (4.0, 4.4), (8.0, 4.0)])
    # 90 % of the final speed: latency <= 4.0 / 0.9 = 4.44 ms, first reached at 4 s
    assert summary.seconds_to_reach(0.9) == 4.0
    assert summary.seconds_to_reach(0.5) == 2.0
    assert TuneSummary(tasks=1, tuned=0, skipped=1, trials=0, records=0,
                       seconds=0.0).seconds_to_reach() is None


def test_tuning_fills_in_the_core_count_only_for_this_cpu():
    from slimc.codegen.tune import _with_core_count
    host = tvm.target.Target({"kind": "llvm", "mcpu": TARGET.attrs["mcpu"]})
    assert int(_with_core_count(host).attrs["num-cores"]) >= 1
    cross = resolve_target("arm")
    with pytest.raises(OptionError, match="core count"):
        tune(_small_model()[0], cross, trials=1, db="/nonexistent/never-created")
    assert int(_with_core_count(resolve_target("arm", num_cores=3)).attrs["num-cores"]) == 3
    assert int(_with_core_count(resolve_target("arm", board="rpi4")).attrs["num-cores"]) == 4


def test_arm_board_presets(capfd):
    from slimc.codegen.targets import ARM_BOARDS
    g3 = resolve_target("arm", board="graviton3")
    assert g3.attrs["mcpu"] == "neoverse-v1"
    assert {"+dotprod", "+i8mm", "+sve"} <= set(g3.attrs["mattr"])
    # explicit options override the preset
    assert "+dotprod" not in set(resolve_target("arm", board="rpi5", dotprod=False)
                                 .attrs["mattr"])
    assert int(resolve_target("arm", board="rpi5", num_cores=2).attrs["num-cores"]) == 2
    with pytest.raises(OptionError, match="rpi4"):
        resolve_target("arm", board="rpi9")
    with pytest.raises(OptionError, match="num_cores"):
        resolve_target("arm", num_cores=0)
    # LLVM knows every preset's CPU (it prints "not a recognized processor" otherwise)
    A = te.placeholder((64,), name="A")
    f = te.create_prim_func([A, te.compute((64,), lambda i: A[i] * 2.0, name="B")])
    for board in ARM_BOARDS:
        tvm.compile(tvm.IRModule({"main": f}), target=resolve_target("arm", board=board))
    assert "not a recognized" not in capfd.readouterr().err


def test_a_time_budget_tune_continues_where_the_last_one_stopped(tmp_path):
    # a task whose share of a time budget ran out is not finished: the next tune with a time
    # budget goes on searching it (before, it was marked done and every later slice was empty)
    mod, _, _ = _small_model()
    db = tmp_path / "db"
    first = tune(mod, TARGET, seconds=2, db=db, progress=False)
    assert first.trials >= 1 and first.unfinished >= 1
    second = tune(mod, TARGET, seconds=2, db=db, progress=False)
    assert second.trials >= 1 and second.skipped < second.tasks
    assert count_records(db) > first.records


def test_a_tuning_where_every_candidate_fails_is_an_error_and_starts_over(tmp_path):
    # a real failure: a runner whose time limit no candidate can meet (every run times out)
    from tvm.s_tir import meta_schedule as ms
    mod, _, _ = _small_model()
    db = tmp_path / "db"
    hopeless = ms.runner.LocalRunner(timeout_sec=1e-4)
    with pytest.raises(slimc.SlimcError, match="every one failed") as err:
        tune(mod, TARGET, trials=4, db=db, progress=False, runner=hopeless)
    assert "first failure" in str(err.value) and "tune again" in str(err.value)
    assert count_records(db) == 0
    # the failed trials taught nothing: with a working runner the tasks start over
    fixed = tune(mod, TARGET, trials=4, db=db, progress=False)
    assert fixed.skipped == 0 and fixed.trials >= fixed.tasks and fixed.records > 0


def test_cuda_is_tuned_only_where_candidates_can_be_measured(tmp_path):
    from slimc.codegen.targets import local_cuda_arch
    mod, _, _ = _small_model()
    cuda = resolve_target("cuda", arch=local_cuda_arch() or "sm_90")
    if local_cuda_arch() is None:
        with pytest.raises(OptionError, match="no CUDA GPU.*--rpc-tracker"):
            tune(mod, cuda, trials=4, db=tmp_path / "db", progress=False)
        assert not (tmp_path / "db" / "slimc_tune.json").exists()
    else:   # on a GPU machine: a real tuning run, and its build matches the untuned one
        summary = tune(mod, cuda, trials=8, db=tmp_path / "db", progress=False)
        assert summary.records > 0 and summary.failed < summary.trials


def test_candidates_are_measured_on_every_core(tmp_path, monkeypatch):
    # the runner's worker inherits TVM_NUM_THREADS: without it TVM uses half the CPUs (it assumes
    # SMT), and on a VM without SMT every candidate would be timed on half the machine
    from slimc.runtime import physical_cores
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    mod, _, _ = _small_model()
    tune(mod, TARGET, trials=2, db=tmp_path / "db", progress=False)
    assert os.environ["TVM_NUM_THREADS"] == str(physical_cores())
