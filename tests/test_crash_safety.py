"""Nothing half-written: ``kill -9`` at any point of a write leaves the old output or the new one.

Each test starts the real command in a subprocess (``slimc optimize``, ``slimc compile``,
``slimc tune``) over an output that a previous successful run wrote, kills it with SIGKILL, and
checks the output path: byte-identical to the old output, or a complete new output that loads
(``slimc.load``, ``slimc.runtime.load``) and equals what an uninterrupted run writes. Leftover
temporary files must be hidden names that nothing loads by mistake, and the next run removes
them.

Kill points are deterministic where the write is slimc's: a small wrapper (``_HOOK``) runs the
CLI with ``os.replace`` / ``os.rename`` / the directory exchange of ``slimc/_atomic.py`` (and a
file write, for a half-written temporary file) wrapped so that the Nth such call inside the test
folder stops the process just before or just after it; the test then kills it there. Each test
walks N up from 0 until a run finishes without stopping, so every rename of the commit protocol is
a kill point, whatever the code's number of renames. Where the write happens inside TVM (the
tuning database's appends, linking ``lib.so``), the test polls the files and kills as soon as
they change, and at increasing delays.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from zoo import to_onnx

import slimc

ROOT = Path(__file__).resolve().parents[1]
TEMP = re.compile(r"\..+\.slimc-\d+-.*\.tmp")   # slimc/_atomic.py's temporary names

# Runs the slimc CLI, stopping it at a deterministic point of its writes (see the module
# docstring). argv[1] is a JSON spec: argv, dir (only paths inside count), n, when
# ("before" / "after" the Nth rename, "partial": the Nth write_bytes/write_text writes half its
# data), marker (created when stopped), external (save ONNX weights as external data).
_HOOK = r"""
import json, os, pathlib, sys, time
spec = json.loads(sys.argv[1])
count = [0, 0]

def hold():
    pathlib.Path(spec["marker"]).touch()
    time.sleep(3600)

def inside(p):
    return os.path.abspath(os.fspath(p)).startswith(spec["dir"])

def wrap_rename(fn):
    def hooked(src, dst, *a, **k):
        mine = inside(dst)
        if mine and count[0] == spec["n"] and spec["when"] == "before":
            hold()
        out = fn(src, dst, *a, **k)
        if mine:
            if count[0] == spec["n"] and spec["when"] == "after":
                hold()
            count[0] += 1
        return out
    return hooked

def wrap_write(fn, encode):
    def hooked(self, data, *a, **k):
        if inside(self) and spec["when"] == "partial":
            if count[1] == spec["n"]:
                raw = encode(data)
                with open(self, "wb") as f:
                    f.write(raw[: len(raw) // 2])
                hold()
            count[1] += 1
        return fn(self, data, *a, **k)
    return hooked

os.replace, os.rename = wrap_rename(os.replace), wrap_rename(os.rename)
pathlib.Path.write_bytes = wrap_write(pathlib.Path.write_bytes, bytes)
pathlib.Path.write_text = wrap_write(pathlib.Path.write_text, str.encode)
import slimc._atomic as atomic
atomic._renameat2_exchange = wrap_rename(atomic._renameat2_exchange)
if spec.get("external"):
    sys.modules["slimc.ir.capture"]._EXTERNAL_DATA_THRESHOLD = 0
from slimc.cli import main
sys.exit(main(spec["argv"]))
"""


def _cli(*args, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "slimc.cli", *map(str, args)], capture_output=True,
                       text=True, timeout=600, check=False, **kw)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _stop_at(argv: list, folder: Path, n: int, when: str, *, external: bool = False,
             timeout: float = 300) -> bool:
    """Run the CLI until the hook stops it at point (n, when), then kill -9 it. False when the
    run finished without reaching that point (there is no Nth rename/write)."""
    marker = folder.parent / f"stopped-{n}-{when}"
    marker.unlink(missing_ok=True)
    spec = {"argv": [str(a) for a in argv], "dir": str(folder.resolve()), "n": n,
            "when": when, "marker": str(marker), "external": external}
    proc = subprocess.Popen([sys.executable, "-c", _HOOK, json.dumps(spec)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if marker.exists():
        _kill(proc)
        return True
    if proc.poll() is None:
        _kill(proc)
        raise AssertionError(f"no progress within {timeout} s")
    err = proc.stderr.read().decode()
    assert proc.returncode == 0, err[-2000:]
    return False


def _kill_points(argv: list, folder: Path, check, reset, *,
                 whens=("partial", "before", "after"), external: bool = False) -> dict[str, int]:
    """Stop the run at every kill point of each kind in turn, calling ``check(point)`` after
    each kill and ``reset()`` (put the old output back) before each run; returns how many points
    of each kind there were."""
    counts = {}
    for when in whens:
        n = 0
        while True:
            reset()
            if not _stop_at(argv, folder, n, when, external=external):
                break
            check(f"{when} {n}")
            n += 1
        counts[when] = n
        check(f"{when}: ran to the end")
    return counts


def _restore(folder: Path, files: dict[str, bytes]) -> None:
    """Put ``files`` back in ``folder`` as the only outputs (slimc temporaries stay)."""
    for p in folder.iterdir():
        if p.is_file() and not TEMP.fullmatch(p.name):
            p.unlink()
    for name, data in files.items():
        (folder / name).write_bytes(data)


def _leftovers(folder: Path, outputs: set[str]) -> list[str]:
    """Names in ``folder`` that are neither outputs nor slimc temporaries."""
    return sorted(p.name for p in folder.iterdir() if p.name not in outputs
                  and not TEMP.fullmatch(p.name))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# -- slimc optimize -o model.onnx (and --report) ---------------------------------------------
@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "bert.onnx"
    path.write_bytes(to_onnx("bert", "ts").SerializeToString())
    return path


def _optimize_case(bert_onnx: Path, tmp_path: Path, external: bool):
    """An old output (sparsity 0.3) in ``out/``, the new run's argv (sparsity 0.6), and what an
    uninterrupted new run writes (in ``ref/``)."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    out.mkdir()
    ref.mkdir()
    hook_free = ["optimize", bert_onnx, "--no-check"]
    for folder, sparsity in ((out, "0.3"), (ref, "0.6")):
        assert not _stop_at([*hook_free, "-o", folder / "m.onnx", "--sparsity", sparsity],
                            folder, 10**6, "before", external=external)
    argv = [*hook_free, "-o", out / "m.onnx", "--sparsity", "0.6"]
    return out, argv, _files(out), _files(ref)


ORPHAN = re.compile(r"m\.onnx\.[0-9a-f]{8}\.data")  # a new model's data, renamed before it


def _model_state(out: Path, old: dict, new: dict) -> str:
    """"old" or "new": which model ``out/m.onnx`` is, with the very data files it refers to;
    anything else there is a slimc temporary or a complete data file no model refers to."""
    import onnx
    files = {k: v for k, v in _files(out).items() if not TEMP.fullmatch(k)}
    which = "old" if files["m.onnx"] == old["m.onnx"] else "new"
    assert files["m.onnx"] == (old if which == "old" else new)["m.onnx"]
    model = onnx.load(str(out / "m.onnx"), load_external_data=False)
    refs = {kv.value for t in model.graph.initializer for kv in t.external_data
            if kv.key == "location"}
    expected = old if which == "old" else new
    assert set(expected) == {"m.onnx", *refs}
    for name in refs:
        assert files[name] == expected[name]
    assert all(ORPHAN.fullmatch(k) for k in set(files) - set(expected)), sorted(files)
    g = slimc.load(out / "m.onnx")   # loads, with its own weights
    assert g.nonzeros() < g.num_parameters()
    return which


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external_data"])
def test_killed_optimize_leaves_the_old_model_or_the_new_one(bert_onnx, tmp_path, external):
    out, argv, old, new = _optimize_case(bert_onnx, tmp_path, external)
    assert old != new
    seen: dict[str, str] = {}

    def check(point):
        seen[point] = _model_state(out, old, new)
        assert not _leftovers(out, set(old) | set(new)) or external

    counts = _kill_points(argv, out, check, lambda: _restore(out, old), external=external)
    # every rename of the commit protocol was a kill point: one file, or data then model
    assert counts["before"] == counts["after"] == (2 if external else 1)
    last = counts["after"] - 1
    assert all(v == "old" for k, v in seen.items() if k.startswith(("partial ", "before ")))
    assert seen[f"after {last}"] == "new"
    assert all(v == "old" for k, v in seen.items() if k.startswith("after ")
               and k != f"after {last}")
    assert all(v == "new" for k, v in seen.items() if "ran to the end" in k)
    if not external:
        assert counts["partial"] == 1
    # the last (uninterrupted) run removed the temporaries and orphans of the killed ones
    assert _files(out) == new


def test_optimize_killed_at_increasing_delays(bert_onnx, tmp_path):
    out, argv, old, new = _optimize_case(bert_onnx, tmp_path, external=False)
    start = time.monotonic()
    _cli(*argv)
    full = time.monotonic() - start
    _cli(*argv[:-1], "0.3")                 # the old output again
    assert _files(out) == old
    outcomes = []
    for k in range(1, 7):
        proc = subprocess.Popen([sys.executable, "-m", "slimc.cli", *map(str, argv)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(full * k / 6)
        _kill(proc)
        files = {k: v for k, v in _files(out).items() if not TEMP.fullmatch(k)}
        assert files in (old, new)
        outcomes.append("old" if files == old else "new")
        slimc.load(out / "m.onnx")
        if files == new:                    # start over from the old output
            _cli(*argv[:-1], "0.3")
    assert "old" in outcomes


def test_killed_report_keeps_each_file_old_or_complete(bert_onnx, tmp_path):
    out = tmp_path / "out"
    argv = ["optimize", bert_onnx, "--no-check", "-o", out / "m.onnx", "--report", out / "rep"]
    _cli(*argv, "--sparsity", "0.3")
    old, old_model = _files(out / "rep"), _files(out)
    assert "report.json" in old

    def check(point):
        files = {k: v for k, v in _files(out / "rep").items() if not TEMP.fullmatch(k)
                 and not k.startswith(".")}
        assert set(files) == set(old), point
        for name, data in files.items():
            if data != old[name] and name.endswith(".json"):
                json.loads(data)            # a new report file is complete
        assert json.loads(files["report.json"])

    _kill_points([*argv, "--sparsity", "0.6"], out, check,
                 lambda: (_restore(out / "rep", old), _restore(out, old_model)),
                 whens=("before", "after"))


# -- slimc compile -o DIR --------------------------------------------------------------------
def _artifact_outputs(path: Path, x: np.ndarray) -> list[np.ndarray]:
    code = ("import json, sys, numpy as np, slimc.runtime as rt\n"
            f"m = rt.load({str(path)!r})\n"
            f"np.save(sys.stdout.buffer, m(np.load({str(x)!r}))[0])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    import io
    return np.load(io.BytesIO(r.stdout))


def _compile_case(bert_onnx: Path, tmp_path: Path):
    """The old artifact: bert; the new one: bert with half its weights zeroed (another
    library, other outputs)."""
    sparse = tmp_path / "sparse.onnx"
    _cli("optimize", bert_onnx, "-o", sparse, "--sparsity", "0.5", "--no-check")
    out = tmp_path / "out"
    out.mkdir()
    art = out / "art"
    _cli("compile", bert_onnx, "-o", art)
    g_old, g_new = slimc.load(bert_onnx), slimc.load(sparse)
    x = tmp_path / "x.npy"
    np.save(x, g_old.sample_inputs()[0])
    want_old = g_old.run(np.load(x))[0]
    want_new = g_new.run(np.load(x))[0]
    old = _files(art)
    return out, art, ["compile", sparse, "-o", art], old, x, want_old, want_new


def _check_artifact(out: Path, art: Path, old: dict, x: Path, want_old, want_new) -> str:
    assert not _leftovers(out, {"art"})
    files = _files(art)
    assert set(files) == set(old)
    if files == old:
        got, want, which = _artifact_outputs(art, x), want_old, "old"
    else:
        meta = json.loads(files["metadata.json"])
        assert meta["library_bytes"] == len(files["lib.so"])   # complete, not half-linked
        got, want, which = _artifact_outputs(art, x), want_new, "new"
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    return which


@pytest.mark.slow
def test_killed_compile_leaves_the_old_artifact_or_the_new_one(bert_onnx, tmp_path):
    out, art, argv, old, x, want_old, want_new = _compile_case(bert_onnx, tmp_path)
    # while TVM links lib.so (slimc does not write it itself): the temporary directory exists
    proc = subprocess.Popen([sys.executable, "-m", "slimc.cli", *map(str, argv)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not [p for p in out.iterdir() if TEMP.fullmatch(p.name)]:
        time.sleep(0.01)
    assert proc.poll() is None, "compile finished before its temporary directory was seen"
    _kill(proc)
    assert _check_artifact(out, art, old, x, want_old, want_new) == "old"
    # metadata.json half-written, just before the swap, just after it
    seen = {}
    counts = _kill_points(argv, out, lambda point: seen.__setitem__(
        point, _check_artifact(out, art, old, x, want_old, want_new)),
        lambda: _restore(art, old), whens=("partial", "before", "after"))
    assert counts == {"partial": 1, "before": 1, "after": 1}
    assert seen == {"partial 0": "old", "partial: ran to the end": "new", "before 0": "old",
                    "before: ran to the end": "new", "after 0": "new",
                    "after: ran to the end": "new"}
    # the uninterrupted runs removed what the killed ones left (the old artifact included)
    assert sorted(p.name for p in out.iterdir()) == ["art"]


# -- slimc tune --db DIR -----------------------------------------------------------------------
def _db_lines(db: Path) -> dict[str, list[str]]:
    return {p.name: p.read_text().splitlines() for p in sorted(db.glob("*.json"))}


def _check_database(db: Path, finished: int) -> int:
    """Every line of every database file parses, except at most a torn last line of a file
    (an append cut by the kill); the database loads with at least ``finished`` records."""
    from slimc.codegen.tune import count_records, open_database
    for name, lines in _db_lines(db).items():
        if name == "slimc_tune.json":
            json.loads("\n".join(lines))        # replaced atomically: always whole
            continue
        for i, line in enumerate(lines):
            try:
                json.loads(line)
            except json.JSONDecodeError:
                assert i == len(lines) - 1, f"{name}: line {i + 1} of {len(lines)} is broken"
    records = count_records(db)
    assert records >= finished
    loaded = 0
    for defaults, name in ((False, "database_tuning_record.json"),
                           (True, "slimc_default_tuning_record.json")):
        database = open_database(db, create=False, defaults=defaults)  # drops a torn last line
        lines = (db / name).read_text().splitlines() if (db / name).exists() else []
        assert all(json.loads(line) for line in lines)
        assert len(database.get_all_tuning_records()) == len(lines)
        loaded += len(lines)
    assert loaded >= records
    return records


def _tune_until(argv: list, db: Path, more_than: int, timeout: float = 300) -> int:
    """Start ``slimc tune``, kill -9 it as soon as the database holds more than ``more_than``
    records; return the records counted just before the kill."""
    from slimc.codegen.tune import count_records
    proc = subprocess.Popen([sys.executable, "-m", "slimc.cli", *map(str, argv)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            n = count_records(db) if db.is_dir() else 0
            if n > more_than:
                _kill(proc)
                return n
            time.sleep(0.05)
        raise AssertionError(f"tune ended (rc {proc.returncode}) before it could be killed")
    finally:
        if proc.poll() is None:
            _kill(proc)


@pytest.mark.slow
def test_killed_tune_keeps_every_finished_record_and_resumes(bert_onnx, tmp_path):
    db = tmp_path / "db"
    argv = ["tune", bert_onnx, "--db", db, "--trials", "400", "--quiet"]
    finished = _tune_until(argv, db, 1)
    assert _check_database(db, finished) >= finished
    state = json.loads((db / "slimc_tune.json").read_text())
    trials_before = sum(t["trials"] for t in state["tasks"].values())
    assert trials_before >= 1
    # the resumed tune continues: earlier trials count, new ones are added
    resumed = json.loads(_cli(*argv[:-1], "--seconds", "3", "--json", "--quiet").stdout)
    assert resumed["trials"] >= 1 and resumed["records"] >= finished
    state = json.loads((db / "slimc_tune.json").read_text())
    assert sum(t["trials"] for t in state["tasks"].values()) == trials_before + resumed["trials"]
    assert not [p.name for p in db.iterdir() if TEMP.fullmatch(p.name)]


@pytest.mark.slow
def test_tune_killed_repeatedly_then_compiled_with_its_database(bert_onnx, tmp_path):
    db = tmp_path / "db"
    argv = ["tune", bert_onnx, "--db", db, "--trials", "400", "--quiet"]
    finished = 0
    for _ in range(3):
        finished = _tune_until(argv, db, finished)
        finished = _check_database(db, finished)
    _cli("compile", bert_onnx, "-o", tmp_path / "art", "--db", db)
    x = bert_onnx.parent / "x.npy"
    g = slimc.load(bert_onnx)
    np.save(x, g.sample_inputs()[0])
    np.testing.assert_allclose(_artifact_outputs(tmp_path / "art", x), g.run(np.load(x))[0],
                               rtol=1e-4, atol=1e-4)
