"""MetaSchedule auto-tuning of a whole Relax module, with a records database on disk.

    summary = tune(mod, target, trials=2000, db="build/tune-db")     # or seconds=600
    art = slimc.compile(graph, "x86", tune=database_hook("build/tune-db"))

``tune`` legalizes and fuses ``mod`` exactly as :func:`apply_database` will at build time (TVM's
CPU legalization, :mod:`.fast_math`, weights marked for build-time packing), extracts one task per
distinct kernel and tunes them one after another, most expensive first, with MetaSchedule's
evolutionary search. A task's trials go to a JSON database in ``db`` (TVM's own format: one
record per line, appended as each batch is measured), and ``db/slimc_tune.json`` notes how many
trials each task has had. Hence:

* a second ``tune`` with the same ``db`` runs no trials for tasks already tuned to their trial
  budget (it continues a task that was interrupted or whose share of a time budget ran out, and
  tunes tasks the database has never seen); a task none of whose candidates ever built and ran
  (a broken compiler or driver) starts over;
* an interrupt (Ctrl-C, a kill) loses at most the batch being measured: records and progress are
  on disk after every batch, the progress file is replaced atomically, and a half-written last
  line of a database file (a kill during the append) is dropped when the database is opened;
* ``apply_database`` / ``database_hook`` schedule every kernel the database has a record for
  with its best record and the rest with :func:`.schedules.apply_default_schedules`.

Budgets: ``trials`` is the total number of measured candidates, shared by the tasks in proportion
to their cost (FLOPs × occurrences) with a floor, so element-wise kernels get a few trials and
matmuls most of them; ``seconds`` is a wall-clock budget for the measurements (legalization and
starting the runner come on top), shared the same way: each task tunes until its share runs out,
checked after each batch of 16 candidates, so a task can overrun by one batch. With both,
whichever ends first. Neither: 64 trials a task.

A tuning where every candidate fails raises :class:`SlimcError` with the first failure (the
records and progress are on disk): MetaSchedule itself records a failure as a 1e10 s run and
goes on, so such a search would otherwise end with nothing learned and no word said.

CUDA targets (``"cuda"``, a tag such as ``"nvidia/nvidia-h100"``): the same, with TVM's GPU
search space (``sch_rules="cuda"``: multi-level tiling with shared-memory staging, thread
binding, cross-thread reductions), the target's limits filled in where a plain ``{"kind":
"cuda", "arch": ...}`` lacks them, no fast math and no weight packing (``prepare``), and DLight's
schedule of each kernel measured first as its baseline (what an untuned CUDA build runs). The
candidates must be measured on the GPU: without one (and without an RPC ``runner`` reaching one)
``tune`` refuses.

Building candidates: MetaSchedule's ``LocalBuilder`` starts fresh worker processes for every batch
and each imports all targets' tensor intrinsics (40-80 s on a small machine, past its 30 s
timeout: every candidate fails and nothing is recorded). :class:`InProcessBuilder` compiles in
this process instead (~0.1 s a candidate). Candidates run in MetaSchedule's ``LocalRunner`` (one
worker process, kept between batches), or any ``runner`` passed in (an RPC runner).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from ..errors import OptionError, SlimcError
from .schedules import (
    _REFUSED,
    apply_default_schedules,
    default_schedule,
    freeze_scheduled,
    legalize,
    mark_weights,
    schedule_module,
)

STATE_FILE = "slimc_tune.json"
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
# slimc's default schedules, measured: a database of their own, because MetaSchedule's search
# replays its database's records through its postprocessors, which do not accept their weight
# packing; a build takes the faster of the two (UnionDatabase)
DEFAULT_WORKLOAD_FILE = "slimc_default_workload.json"
DEFAULT_RECORD_FILE = "slimc_default_tuning_record.json"
DEFAULT_TRIALS_PER_TASK = 64
_MIN_TRIALS = 8            # floor of a task's share of a trial budget
_BATCH = 16                # candidates measured per batch (MetaSchedule's num_trials_per_iter)
_FAILED = 1e9              # MetaSchedule records a failed candidate with a run time of 1e10 s
_STATE_VERSION = 1
# MetaSchedule's evolutionary search, smaller than its defaults (population 512, 4 generations):
# on a 2-core machine the default spends ~40 % of tuning time mutating candidates
_EVOLUTION = {"population_size": 256, "genetic_num_iters": 3, "init_min_unmeasured": 32}
# below this many trials (or seconds) a task samples its design space at random instead: an
# evolutionary search (and retraining its XGBoost cost model after every batch) costs ~10 s a
# task here, more than a few measurements
_EVOLVE_MIN_TRIALS = 32
_EVOLVE_MIN_SECONDS = 120   # its first batch alone can take half a minute on 2 busy cores


# -- database on disk ------------------------------------------------------------------------
def _salvage_lines(path: Path) -> int:
    """Drop a trailing partial line (a kill during an append); returns how many were dropped.
    A broken line before the end is not a torn append: the file is reported, not rewritten."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    good = len(lines)
    while good and not _is_json(lines[good - 1]):
        good -= 1
    for i, line in enumerate(lines[:good]):
        if not _is_json(line):
            raise SlimcError(f"Tuning database file {path} is corrupt at line {i + 1}.",
                             "Restore it from a copy, or delete the database directory to tune "
                             "from scratch.")
    if good == len(lines):
        return 0
    _atomic_write(path, "".join(line + "\n" for line in lines[:good]))
    return len(lines) - good


def _is_json(line: str) -> bool:
    if not line.strip():
        return False
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def _atomic_write(path: Path, text: str) -> None:
    # slimc/_atomic.py: a hidden pid-tagged temporary, fsync, rename; a killed writer's
    # temporary is removed by the next write
    from .._atomic import write_text
    write_text(path, text)


def open_database(db, *, create: bool = True, defaults: bool = False
                  ) -> ms.database.JSONDatabase:
    """The MetaSchedule JSON database in directory ``db`` (created when ``create``), after
    dropping a torn last line from either file; ``defaults``: the database of measured default
    schedules instead of the search's."""
    path = Path(db)
    if not path.is_dir():
        if not create:
            raise SlimcError(f"Tuning database {path} does not exist.",
                             "Tune first (slimc tune … --db DIR), or check the path.")
        path.mkdir(parents=True, exist_ok=True)
    names = (DEFAULT_WORKLOAD_FILE, DEFAULT_RECORD_FILE) if defaults else \
        (WORKLOAD_FILE, RECORD_FILE)
    for name in names:
        _salvage_lines(path / name)
    return ms.database.JSONDatabase(str(path / names[0]), str(path / names[1]),
                                    allow_missing=True)


def count_records(db) -> int:
    """Measured (successful) tuning records in the database directory ``db``: the search's and
    the default schedules'."""
    n = 0
    for name in (RECORD_FILE, DEFAULT_RECORD_FILE):
        path = Path(db) / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            if not _is_json(line):
                continue
            record = json.loads(line)
            # TVM's record line: [workload index, [trace, run_secs, target, args_info]]
            secs = record[1][1] if len(record) > 1 and len(record[1]) > 1 else None
            if secs and min(float(x) for x in secs) < _FAILED:
                n += 1
    return n


# -- in-process builder ----------------------------------------------------------------------
@derived_object
class InProcessBuilder(ms.builder.PyBuilder):
    """Builds candidates in the tuning process: what MetaSchedule's default build does (drop the
    weight-layout preprocessing block, compile, export a tar) without a worker per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="slimc-tune-build-"))

    def build(self, build_inputs: list) -> list:
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
        from tvm.support.tar import tar
        results = []
        for i, inp in enumerate(build_inputs):
            try:
                mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(inp.mod)
                # in the target's scope: TVM's CUDA compile callback reads the GPU
                # architecture from the current target
                with inp.target:
                    lib = tvm.compile(mod, target=inp.target)
                out = tempfile.mkdtemp(dir=self.tmp, prefix=f"c{i}-")
                path = os.path.join(out, "tvm_tmp_mod." + tar.output_format)
                lib.export_library(path, fcompile=tar)
                results.append(ms.builder.BuilderResult(path, None))
            except Exception as e:  # noqa: BLE001 (a candidate that fails to build is a result)
                results.append(ms.builder.BuilderResult(None, f"{type(e).__name__}: {e}"))
        return results

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# -- tasks -----------------------------------------------------------------------------------
def prepare(mod: tvm.IRModule, target: Target) -> tvm.IRModule:
    """The module tuning extracts tasks from and a tuned build schedules: legalized and fused
    (with fast math), constant weights marked for packing. Both sides must see the same
    PrimFuncs for database records to match.

    CUDA: legalized and fused as TVM's default CUDA pipeline does (no fast math: the GPU's
    ``erf``/``exp`` are fast already, and an untuned build must compute what a tuned one does),
    weights left as they are."""
    if _is_gpu(target):
        return legalize(mod, target, fast=False)
    mod = legalize(mod, target, fast=True)
    with target:
        return mark_weights(mod)


@dataclass
class TaskStatus:
    """One tuning task in the progress file and the summary."""

    name: str
    weight: int              # occurrences in the model
    flops: float
    trials: int = 0          # measured so far, over all runs
    budget: int = 0          # trials this task is tuned to
    best_ms: float | None = None
    done: bool = False

    @property
    def cost(self) -> float:
        return max(self.flops, 1.0) * self.weight


@dataclass
class TuneSummary:
    """What :func:`tune` did."""

    tasks: int                          # tasks in the model
    tuned: int                          # tasks that ran trials in this call
    skipped: int                        # tasks already tuned (no trials in this call)
    trials: int                         # candidates measured in this call
    records: int                        # successful records in the database afterwards
    seconds: float
    interrupted: bool = False           # stopped by Ctrl-C
    unfinished: int = 0                 # tasks left when the time budget ran out
    estimated_ms: float | None = None   # Σ weight × best kernel time, over tuned tasks
    per_task: list[TaskStatus] = field(default_factory=list)
    # (seconds since this call started measuring, estimated_ms) after every measured batch at
    # which every task had a measured kernel: how the estimate fell during the search
    history: list[tuple[float, float]] = field(default_factory=list)
    failed: int = 0                     # candidates of this call that did not build or run
    first_error: str | None = None      # the first such failure's message

    def seconds_to_reach(self, fraction: float = 0.9) -> float | None:
        """Seconds of this call's search until the kernel estimate first reached ``fraction`` of
        its final speed (latency <= final / fraction); None without a complete estimate."""
        if not self.history:
            return None
        final = self.history[-1][1]
        return next(t for t, ms_ in self.history if ms_ <= final / fraction)

    def table(self) -> str:
        """A text report: one row per task (most expensive first), then the totals."""
        rows = [f"{'task':44s} {'x':>3s} {'MFLOP':>9s} {'trials':>7s} {'best ms':>9s}"]
        for t in sorted(self.per_task, key=lambda t: -t.cost):
            best = "-" if t.best_ms is None else f"{t.best_ms:.4f}"
            rows.append(f"{t.name[:44]:44s} {t.weight:3d} {t.flops / 1e6:9.2f} {t.trials:7d} "
                        f"{best:>9s}")
        est = "-" if self.estimated_ms is None else f"{self.estimated_ms:.2f} ms"
        rows.append(f"{self.tasks} tasks: {self.tuned} tuned now, {self.skipped} already tuned; "
                    f"{self.trials} trials in {_fmt_time(self.seconds)}; {self.records} records; "
                    f"kernels ≈ {est}" + ("; interrupted" if self.interrupted else "")
                    + (f"; {self.unfinished} tasks left (time budget)" if self.unfinished else ""))
        if self.failed:
            rows.append(f"{self.failed} of {self.trials} candidates failed to build or run; "
                        f"the first: {_first_lines(self.first_error, 300)}")
        reach = self.seconds_to_reach(0.9)
        if reach is not None:
            rows.append(f"the kernel estimate reached 90 % of its final speed after "
                        f"{_fmt_time(reach)} of search")
        return "\n".join(rows)


def _task_key(task) -> str:
    return f"{tvm_ffi.structural_hash(task.dispatched[0]) & (2**64 - 1):016x}"


def _load_state(db: Path, target: Target) -> dict:
    path = db / STATE_FILE
    if not path.exists():
        return {"version": _STATE_VERSION, "target": str(target), "tasks": {}}
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SlimcError(f"Tuning progress file {path} is corrupt ({e}).",
                         "Delete it: finished records stay in the database; the next tune "
                         "starts each task's trials again.") from None
    if state.get("target") != str(target):
        raise OptionError(
            f"Tuning database {db} was tuned for target {state.get('target')}, not {target}.",
            "Use one database directory per target (e.g. build/tune-x86, build/tune-arm).")
    return state


def _save_state(db: Path, state: dict) -> None:
    _atomic_write(db / STATE_FILE, json.dumps(state, indent=1, sort_keys=True))


def _budgets(statuses: list[TaskStatus], trials: int | None, seconds: float | None) -> None:
    """Each task's trial budget: a share of ``trials`` by cost, with a floor; no trial cap when
    only a time budget is given."""
    n = len(statuses)
    if trials is None:
        per = DEFAULT_TRIALS_PER_TASK if seconds is None else 10**6
        for s in statuses:
            s.budget = max(s.budget, per) if seconds is None else per
        return
    floor = max(1, min(_MIN_TRIALS, trials // max(n, 1)))
    rest = max(0, trials - floor * n)
    total = sum(s.cost for s in statuses) or 1.0
    for s in statuses:
        s.budget = floor + int(rest * s.cost / total)


# -- progress --------------------------------------------------------------------------------
def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


class _Progress:
    """One status line on stderr: tasks done, trials, best kernel time, estimated model time and
    ETA. Redrawn in place on a terminal, one line per batch otherwise."""

    def __init__(self, enabled: bool, statuses: list[TaskStatus], seconds: float | None):
        self.enabled = enabled
        self.statuses = statuses
        self.seconds = seconds
        self.start = time.monotonic()
        self.trials_run = 0
        self.tty = enabled and sys.stderr.isatty()

    def update(self, index: int, status: TaskStatus, todo_trials: int) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        done = sum(s.done for s in self.statuses)
        est = estimated_ms(self.statuses)
        if self.seconds is not None:
            eta = max(0.0, self.seconds - elapsed)
        elif self.trials_run:
            eta = elapsed / self.trials_run * max(0, todo_trials)
        else:
            eta = float("nan")
        best = "-" if status.best_ms is None else f"{status.best_ms:.3f} ms"
        line = (f"tune [{done}/{len(self.statuses)} done] task {index + 1} {status.name[:40]} "
                f"x{status.weight}: {status.trials}/{status.budget if status.budget < 10**6 else '∞'}"
                f" trials, best {best} | kernels ≈ "
                f"{'-' if est is None else f'{est:.1f} ms'} | {_fmt_time(elapsed)} elapsed, ETA "
                f"{'?' if math.isnan(eta) else _fmt_time(eta)}")
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def estimated_ms(statuses: list[TaskStatus]) -> float | None:
    """Σ weight × best time of the tuned kernels (None before any measurement)."""
    tuned = [s for s in statuses if s.best_ms is not None]
    if not tuned:
        return None
    return sum(s.weight * s.best_ms for s in tuned)


@derived_object
class _Recorder(ms.measure_callback.PyMeasureCallback):
    """After each measured batch: count trials, keep the best time, save progress, stop the task
    at its deadline."""

    def __init__(self, on_batch: Callable[[int, list[float], list[str]], bool]) -> None:
        super().__init__()
        self.on_batch = on_batch

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
              runner_results) -> None:
        times, errors = [], []
        for built, result in zip(builder_results, runner_results):
            secs = list(result.run_secs) if result.run_secs is not None else []
            ok = result.error_msg is None and secs
            times.append(min(float(s) for s in secs) if ok else float("inf"))
            if not ok:
                errors.append(str(built.error_msg or result.error_msg or "no run time"))
        if self.on_batch(len(runner_results), times, errors):
            task_scheduler.terminate_task(task_id)


# -- tuning ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _stop_on_ctrl_c(stop: threading.Event, progress: bool):
    """First Ctrl-C: finish the batch being measured, save, stop (a KeyboardInterrupt raised
    inside TVM's C++ loop would surface as a bare RuntimeError). Second Ctrl-C: stop now."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        if progress:
            sys.stderr.write("\ntune: stopping after this batch (Ctrl-C again to stop now)\n")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _tune_context(task, target: Target, seed: int | None, integer: bool,
                  evolve: bool) -> ms.TuneContext:
    """A TuneContext built without its constructor's ``import tvm.s_tir.tensor_intrin`` (all
    targets' intrinsics, ~40 s on a small machine). Float models search TVM's generic LLVM space;
    the target's own space (VNNI / dot-product tensorization of int8 kernels) needs the
    intrinsics, which :func:`tune` then imports first."""
    from tvm.s_tir.meta_schedule import _ffi_api
    from tvm.s_tir.meta_schedule.logging import get_logger, get_logging_func
    from tvm.s_tir.meta_schedule.search_strategy import SearchStrategy
    from tvm.s_tir.meta_schedule.space_generator import SpaceGenerator
    ctx = ms.TuneContext.__new__(ms.TuneContext)
    # CUDA: TVM's generic GPU space (multi-level tiling with shared-memory staging, cross-thread
    # reductions, thread binding); tensor-core rules would need the intrinsics
    kind = "cuda" if _is_gpu(target) else "llvm"
    ctx.__init_handle_by_constructor__(
        _ffi_api.TuneContext, task.dispatched[0], target,
        SpaceGenerator.create("post-order-apply") if integer else SpaceGenerator.create(
            "post-order-apply", sch_rules=kind, postprocs=kind, mutator_probs=kind),
        SearchStrategy.create("evolutionary", **_EVOLUTION) if evolve
        else SearchStrategy.create("replay-trace"),
        task.task_name, _search_threads(target),
        -1 if seed is None else seed, get_logging_func(get_logger("slimc.tune")))
    _ffi_api.TuneContextInitialize(ctx)
    return ctx


def _seed_with_default(task, target: Target, builder, runner, database
                       ) -> tuple[float | None, str | None]:
    """Measure slimc's default schedule of the task (DLight's on CUDA) and commit it to the
    defaults database, so a tuned build is never slower than the untuned default (beyond
    measurement noise). Returns (its time in seconds or None, why it failed or None); (None,
    None) when no default rule applies."""
    if _is_gpu(target):
        sch = dlight_schedule(task.dispatched[0], target)
    else:
        sch, _ = default_schedule(task.dispatched[0], target)
    if sch is None:
        return None, None
    args_info = ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)
    built = builder.build([ms.builder.BuilderInput(sch.mod, target)])[0]
    if built.error_msg is not None:
        return None, f"default schedule did not build: {built.error_msg}"
    try:
        device = "cpu" if target.kind.name == "llvm" else target.kind.name
        result = runner.run([ms.runner.RunnerInput(built.artifact_path, device,
                                                   args_info)])[0].result()
    finally:
        shutil.rmtree(os.path.dirname(built.artifact_path), ignore_errors=True)
    if result.error_msg is not None or not result.run_secs:
        return None, f"default schedule did not run: {result.error_msg or 'no run time'}"
    workload = database.commit_workload(task.dispatched[0])
    database.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, workload, list(result.run_secs), target, args_info))
    return min(float(x) for x in result.run_secs), None


def _is_gpu(target: Target) -> bool:
    return target.kind.name == "cuda"


def _search_threads(target: Target) -> int:
    """Threads for MetaSchedule's search and cost model: the target's core count (a CPU target
    measured here), else this machine's CPUs (a GPU target)."""
    return max(1, int(target.attrs.get("num-cores", 0) or os.cpu_count() or 1))


def _has_cuda_gpu() -> bool:
    return bool(tvm.cuda(0).exist)


# what MetaSchedule's GPU rules read from the target; a plain {"kind": "cuda", "arch": ...}
# target has none of them. The values hold for every NVIDIA GPU since Volta (48 KB is the shared
# memory a kernel gets without opting in); a tag such as "nvidia/nvidia-h100" sets its own.
_GPU_LIMITS = {"max_threads_per_block": 1024, "max_shared_memory_per_block": 49152,
               "registers_per_block": 65536, "thread_warp_size": 32}


def _with_gpu_limits(target: Target) -> Target:
    attrs = dict(target.attrs)
    missing = {k: v for k, v in _GPU_LIMITS.items() if k not in attrs}
    if not missing:
        return target
    conf = dict(target.export())
    conf.update(missing)
    return Target(conf)


def dlight_schedule(func: tirx.PrimFunc | tvm.IRModule, target: Target
                    ) -> s_tir.Schedule | None:
    """The schedule TVM's default CUDA pipeline gives ``func`` (or a task's one-function
    module): the first DLight GPU rule that applies, in the pipeline's order
    (relax/backend/cuda/pipeline.py). Its trace is what :func:`tune` measures and records as
    the untuned baseline of a CUDA task."""
    from tvm.s_tir import dlight as dl
    if isinstance(func, tvm.IRModule):
        func = func["main"]
    rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
             dl.gpu.Fallback()]
    with target:
        for rule in rules:
            try:
                sch = rule.apply(func, target, False)
            except _REFUSED:
                continue
            if isinstance(sch, list):
                sch = sch[0] if sch else None
            if sch is not None:
                return sch
    return None


def _has_integer_kernels(tasks) -> bool:
    """True when a task multiplies int8/uint8 data in a reduction: the only kernels whose search
    space uses tensor intrinsics (VNNI, AMX, dot-product) on CPU."""
    from tvm.s_tir.dlight.analysis import get_root_block
    for task in tasks:
        sch = s_tir.Schedule(task.dispatched[0])
        for block in sch.get_child_blocks(get_root_block(sch)):
            stmt = sch.get(block)
            reduces = any(iv.iter_type != tirx.IterVar.DataPar for iv in stmt.iter_vars)
            narrow = sum(str(r.source.ty.dtype) in ("int8", "uint8") for r in stmt.reads)
            if reduces and narrow >= 2:   # a dot product, not a max over a mask
                return True
    return False


def _default_runner():
    # a measurement that yields a few hundred ms of samples; fresh caches are not simulated
    config = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50,
                                       enable_cpu_cache_flush=False)
    return ms.runner.LocalRunner(timeout_sec=60, evaluator_config=config)


def _with_core_count(target: Target) -> Target:
    """MetaSchedule sizes parallel loops by the target's ``num-cores`` and fails deep inside the
    search without it: fill it in for this machine's CPU, ask for it for any other device."""
    if int(target.attrs.get("num-cores", 0) or 0) > 0:
        return target
    from .targets import _available_cores
    triple = str(target.attrs.get("mtriple", "") or "")
    host = tvm.target.codegen.llvm_get_system_triple()
    if triple and triple.split("-")[0] != host.split("-")[0]:
        raise OptionError(
            f"Tuning for {triple} needs the core count of the device that measures the kernels "
            f"(the target has no num-cores).",
            "Pass it: resolve_target('arm', num_cores=4) / a board preset such as "
            "resolve_target('arm', board='rpi4'), or `slimc tune --num-cores 4`.")
    conf = dict(target.export())
    conf["num-cores"] = _available_cores()
    return Target(conf)


def tune(mod: tvm.IRModule, target, *, db, trials: int | None = None,
         seconds: float | None = None, progress: bool = True, runner=None,
         seed: int | None = None) -> TuneSummary:
    """Tune every kernel of ``mod`` (an imported Relax module) for ``target`` into database
    directory ``db``. See the module docstring for budgets, reuse and interrupts.

    ``runner``: a MetaSchedule runner (default: a local one); ``seed`` makes the search
    repeatable. Returns a :class:`TuneSummary`. Ctrl-C stops at the end of the batch being
    measured and returns (``interrupted=True``); a second Ctrl-C raises ``KeyboardInterrupt`` at
    once. Either way the records and progress so far are on disk.
    """
    target = target if isinstance(target, Target) else Target(target)
    if target.kind.name not in ("llvm", "cuda"):
        raise OptionError(f"slimc tunes CPU (llvm) and CUDA targets; {target.kind.name} is "
                          "neither.", "Pass target 'x86', 'arm', 'cuda' or an llvm/cuda Target.")
    if trials is not None and trials < 1 or seconds is not None and seconds <= 0:
        raise OptionError(f"A tuning budget must be positive (trials={trials}, "
                          f"seconds={seconds}).", "Pass trials=N and/or seconds=S.")
    if _is_gpu(target):
        target = _with_gpu_limits(target)
        if runner is None and not _has_cuda_gpu():
            raise OptionError(
                "Tuning for CUDA measures every candidate on the GPU, and this machine has no "
                "CUDA GPU (or this TVM has no CUDA runtime).",
                "Tune on the GPU machine, or measure there remotely: start a TVM RPC server on "
                "it and pass `slimc tune --rpc-tracker HOST:PORT --rpc-key KEY` (runner=...). "
                "Without tuning, `slimc compile --target cuda` uses DLight's default schedules.")
    else:
        target = _with_core_count(target)
        # the runner's worker inherits the thread count: measure candidates on every core, as
        # the deployed model runs (TVM's own default is half the CPUs; see use_physical_cores)
        from ..runtime import use_physical_cores
        use_physical_cores()
    start = time.monotonic()
    path = Path(db)
    database = open_database(path)
    defaults = open_database(path, defaults=True)
    state = _load_state(path, target)
    prepared = prepare(mod, target)
    tasks = [t for t in ms.relax_integration.extract_tasks(prepared, target)
             if not t.dispatched[0]["main"].attrs.get("tirx.is_scheduled", False)]
    integer = _has_integer_kernels(tasks)
    if integer:
        import tvm.s_tir.tensor_intrin  # noqa: F401 (VNNI/AMX/dot-product intrinsics for int8)

    statuses, keys = [], []
    for task in tasks:
        key = _task_key(task)
        saved = state["tasks"].get(key, {})
        if saved.get("best_ms") is None:
            # every trial so far failed (a broken compiler or driver, since fixed?): those
            # trials taught nothing, so the task starts over instead of counting them
            saved = {}
        flops = float(s_tir.analysis.estimate_tir_flops(task.dispatched[0]))
        statuses.append(TaskStatus(task.task_name, int(task.weight), flops,
                                   trials=int(saved.get("trials", 0)),
                                   budget=int(saved.get("budget", 0)),
                                   best_ms=saved.get("best_ms"),
                                   done=bool(saved.get("done", False))))
        keys.append(key)
    previous_budget = [s.budget for s in statuses]
    _budgets(statuses, trials, seconds)
    for s, old in zip(statuses, previous_budget):
        # a task is finished when it had its budget (or its search ran out of candidates);
        # a larger budget reopens it
        s.done = s.trials >= s.budget or (s.done and s.budget <= old)

    order = sorted(range(len(tasks)), key=lambda i: -statuses[i].cost)
    todo = [i for i in order if not statuses[i].done]
    bar = _Progress(progress, statuses, seconds)
    summary = TuneSummary(tasks=len(tasks), tuned=0, skipped=len(tasks) - len(todo), trials=0,
                          records=0, seconds=0.0, per_task=statuses)

    def save(i: int) -> None:
        s = statuses[i]
        state["tasks"][keys[i]] = {"name": s.name, "weight": s.weight, "flops": s.flops,
                                   "trials": s.trials, "budget": s.budget, "best_ms": s.best_ms,
                                   "done": s.done}
        _save_state(path, state)

    builder = InProcessBuilder()
    cores = _search_threads(target)
    runner = runner or _default_runner()
    try:
        import xgboost  # noqa: F401
        cost_model = ms.cost_model.CostModel.create("xgb", num_tuning_cores=cores)
    except ImportError:  # without xgboost the search samples at random (slower to converge)
        cost_model = ms.cost_model.CostModel.create("random")
    clock = bar.start = time.monotonic()   # the time budget is for measuring, not the setup
    measured = [0]   # candidates of this call that built and ran
    stop = threading.Event()
    try:
        with _stop_on_ctrl_c(stop, progress):
            for position, i in enumerate(todo):
                if stop.is_set():
                    break
                s = statuses[i]
                remaining_cost = sum(statuses[j].cost for j in todo[position:])
                deadline = None
                if seconds is not None:
                    left = seconds - (time.monotonic() - clock)
                    if left <= 0:
                        break
                    deadline = time.monotonic() + left * s.cost / remaining_cost
                want = s.budget - s.trials
                todo_trials = sum(statuses[j].budget - statuses[j].trials for j in todo[position:])
                ran_out = [False]   # the task's time share ended it: a later tune continues it

                def on_batch(n: int, times: list[float], errors: list[str], i=i, s=s,
                             ran_out=ran_out, deadline=deadline,
                             todo_trials=todo_trials) -> bool:
                    s.trials += n
                    summary.trials += n
                    summary.failed += len(errors)
                    if errors and summary.first_error is None:
                        summary.first_error = f"{s.name}: {errors[0]}"
                    bar.trials_run += n
                    good = [t for t in times if t < _FAILED]
                    measured[0] += len(good)
                    if good:
                        best = min(good) * 1e3
                        s.best_ms = best if s.best_ms is None else min(s.best_ms, best)
                    save(i)
                    if all(t.best_ms is not None for t in statuses):
                        summary.history.append((time.monotonic() - clock,
                                                estimated_ms(statuses)))
                    bar.update(i, s, todo_trials - (summary.trials))
                    ran_out[0] = deadline is not None and time.monotonic() >= deadline
                    return stop.is_set() or ran_out[0]

                bar.update(i, s, todo_trials - summary.trials)
                if s.trials == 0:
                    default, error = _seed_with_default(tasks[i], target, builder, runner,
                                                        defaults)
                    if on_batch(1, [float("inf") if default is None else default],
                                [] if error is None else [error]) or want <= 1:
                        s.done = not stop.is_set() and not ran_out[0]
                        save(i)
                        summary.tuned += 1
                        continue
                    want -= 1
                evolve = want >= _EVOLVE_MIN_TRIALS and (
                    deadline is None or deadline - time.monotonic() >= _EVOLVE_MIN_SECONDS)
                callbacks = [ms.measure_callback.AddToDatabase(),
                             ms.measure_callback.RemoveBuildArtifact(), _Recorder(on_batch)]
                if evolve:
                    callbacks.insert(2, ms.measure_callback.UpdateCostModel())
                ms.tune.tune_tasks(
                    tasks=[_tune_context(tasks[i], target, seed, integer, evolve)],
                    task_weights=[float(s.weight)], work_dir=str(path), max_trials_global=want,
                    max_trials_per_task=want, num_trials_per_iter=min(_BATCH, want),
                    builder=builder, runner=runner, database=database, cost_model=cost_model,
                    measure_callbacks=callbacks, task_scheduler="round-robin")
                # a search that runs out of new candidates ends early: that task is done too;
                # one stopped by Ctrl-C or by its time share is not (the next tune continues it)
                s.done = not stop.is_set() and not ran_out[0]
                save(i)
                summary.tuned += 1
    except KeyboardInterrupt:
        summary.interrupted = True
        raise
    except RuntimeError:
        # a second Ctrl-C inside TVM's C++ loop arrives as a bare RuntimeError
        if stop.is_set():
            summary.interrupted = True
            raise KeyboardInterrupt from None
        raise
    finally:
        bar.close()
        builder.cleanup()
        summary.seconds = time.monotonic() - start
        summary.records = count_records(path)
        summary.estimated_ms = estimated_ms(statuses)
    summary.interrupted = stop.is_set()
    summary.unfinished = sum(not s.done for s in statuses)
    if summary.failed and not measured[0]:
        # MetaSchedule records a failed candidate as a 1e10 s run and goes on: a search where
        # every candidate failed would otherwise "finish" with nothing learned
        raise SlimcError(
            f"Tuning measured {summary.trials} candidates and every one failed to build or "
            f"run, so nothing was learned (first failure: {_first_lines(summary.first_error)}).",
            "Fix what the message names (compiler, driver, runner), then tune again with the "
            "same --db: tasks that never measured a candidate start over.")
    return summary


def _first_lines(text: str | None, limit: int = 600) -> str:
    """A failure message on one line; of a traceback, its first line and the last three (where
    the exception is)."""
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    if len(lines) > 5:
        lines = lines[:1] + ["…"] + lines[-3:]
    text = " | ".join(lines)
    return text if len(text) <= limit else text[:limit] + " …"


def tune_graph(graph, target="x86", *, db, trials: int | None = None,
               seconds: float | None = None, input_shapes: dict | None = None,
               target_options: dict | None = None, progress: bool = True,
               runner=None) -> TuneSummary:
    """:func:`tune` for a :class:`slimc.Graph` (or ONNX ModelProto) and a slimc target name, as
    ``slimc.compile`` takes them: what ``slimc tune`` runs."""
    from .build import to_relax
    from .targets import resolve_target
    tgt = resolve_target(target, **(target_options or {}))
    mod, _, _ = to_relax(graph, input_shapes)
    return tune(mod, tgt, db=db, trials=trials, seconds=seconds, progress=progress, runner=runner)


# -- applying a database ---------------------------------------------------------------------
def apply_database(mod: tvm.IRModule, target, db) -> tvm.IRModule:
    """Relax module → Relax module whose kernels use the best records in database ``db`` and
    :func:`.schedules.apply_default_schedules` where the database has none. Constant weights are
    packed at build time, as tuning measured them."""
    target = target if isinstance(target, Target) else Target(target)
    if target.kind.name not in ("llvm", "cuda"):
        return apply_default_schedules(mod, target)
    if not Path(db).is_dir():
        raise SlimcError(f"Tuning database {db} does not exist.",
                         "Tune first (slimc tune … --db DIR), or check the path.")
    database = ms.database.UnionDatabase(open_database(db), open_database(db, defaults=True))
    if _is_gpu(target):
        # kernels without a record are left unscheduled: the CUDA pipeline gives them DLight's
        with _with_gpu_limits(target), database:
            return freeze_scheduled(relax.transform.MetaScheduleApplyDatabase()(
                prepare(mod, target)))
    prepared = prepare(mod, target)
    with target, database:
        tuned = freeze_scheduled(relax.transform.MetaScheduleApplyDatabase()(prepared))
        # kernels the database does not know get the default schedules
        tuned = schedule_module(tuned, target)
        tuned = relax.transform.SplitLayoutRewritePreproc()(tuned)
        tuned = relax.transform.FoldConstant()(tuned)
        tuned = relax.transform.DeadCodeElimination()(tuned)
    return tuned


def database_hook(db) -> Callable[[tvm.IRModule, Target], tvm.IRModule]:
    """A schedule hook for ``slimc.compile(..., tune=database_hook(db))``."""
    def tuned_schedules(mod: tvm.IRModule, target: Target) -> tvm.IRModule:
        return apply_database(mod, target, db)
    tuned_schedules.__qualname__ = f"database_hook({str(db)!r})"
    return tuned_schedules


def summary_json(summary: TuneSummary) -> dict:
    """A JSON-friendly dict of a :class:`TuneSummary` (for the CLI's report)."""
    out = asdict(summary)
    out["seconds_to_90_percent"] = summary.seconds_to_reach(0.9)
    return out
