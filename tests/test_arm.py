"""ARM for real: a model compiled for ``"arm"`` runs on an aarch64 CPU and matches x86.

The aarch64 CPU is qemu-user: ``scripts/setup_arm.sh`` (run by ``./setup.sh --test``) installs
qemu-user and the aarch64 cross compiler, and builds a sysroot with Debian's arm64 CPython,
numpy and TVM's aarch64 *runtime* library (no compiler, as on a deployed board). slimc's
runtime is imported there from this source tree, loads the cross-compiled ``lib.so`` and runs
it; its outputs must equal the x86 build's (and torch's) within 1e-4.

Without that tooling these tests fail (CI installs it), saying how to install it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import numpy as np
import pytest
from arm_qemu import REPO, aarch64_python
from zoo import ZOO

import slimc
from slimc import runtime

ATOL = 1e-4
EM_AARCH64 = 183  # ELF e_machine of aarch64

# Runs on the aarch64 side: load the ARM artifact, run it, benchmark it briefly, try to load the
# x86 artifact, check the serving guarantees (an out-of-range token id is refused and the process
# goes on; threads calling one module get the single-threaded outputs), and report which modules
# the process imported. One process for all of it: the emulated Python takes ~25 s to start.
_DRIVER = r"""
import json, platform, sys, threading, time
import numpy as np
start = time.perf_counter()
import slimc.runtime as rt
from slimc.errors import ArtifactError, IndexRangeError
arm_dir, x86_dir, inputs_npz, outputs_npz, guarantees_npz = sys.argv[1:6]
imported = time.perf_counter()
m = rt.load(arm_dir)
loaded = time.perf_counter()
inputs = np.load(inputs_npz)
outputs = m(*(inputs[name] for name in m.input_names))
np.savez(outputs_npz, *outputs)
ran = time.perf_counter()
bench = m.benchmark(*(inputs[name] for name in m.input_names), repeat=3, warmup=1)
try:
    rt.load(x86_dir)
    refusal = None
except ArtifactError as e:
    refusal = str(e)
benched = time.perf_counter()

# an out-of-range token id: refused before the call, and this process goes on serving
(ids_name,) = [n for n in m.input_names if n in m.index_ranges]
ids = inputs[ids_name]
lo, hi = m.index_ranges[ids_name]
refused = []
for value in (hi + 1, lo - 1, 2**40):
    bad = {n: inputs[n].copy() for n in m.input_names}
    bad[ids_name][0, 3] = value
    try:
        m(*(bad[n] for n in m.input_names))
        refused.append({"value": value, "error": None})
    except IndexRangeError as e:
        refused.append({"value": value, "error": type(e).__name__, "message": str(e),
                        "index_error": isinstance(e, IndexError)})
after = m(*(inputs[name] for name in m.input_names))
after_bad_equal = len(after) == len(outputs) and all(
    np.array_equal(a, b) for a, b in zip(after, outputs))

# threads: each its own token ids, its outputs equal to a single-threaded call's on them
THREADS, CALLS = 4, 3
per_thread = []
for k in range(THREADS):
    x = {n: inputs[n].copy() for n in m.input_names}
    x[ids_name] = (ids + 7 * k) % (hi + 1)
    per_thread.append(x)
single = [m(*(x[n] for n in m.input_names)) for x in per_thread]
threaded = {}
for concurrency in (1, THREADS):
    mod = m if concurrency == 1 else rt.load(arm_dir, concurrency=concurrency)
    barrier = threading.Barrier(THREADS)
    results = {"calls": 0, "mismatches": 0, "errors": []}
    lock = threading.Lock()
    def serve(k):
        try:
            barrier.wait()
            for _ in range(CALLS):
                got = mod(*(per_thread[k][n] for n in mod.input_names))
                same = len(got) == len(single[k]) and all(
                    np.array_equal(a, b) for a, b in zip(got, single[k]))
                with lock:
                    results["calls"] += 1
                    results["mismatches"] += not same
        except Exception as e:
            with lock:
                results["errors"].append(f"{type(e).__name__}: {e}")
    workers = [threading.Thread(target=serve, args=(k,)) for k in range(THREADS)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    threaded[str(concurrency)] = results
np.savez(guarantees_npz, **{f"thread{k}_out{i}": o for k, outs in enumerate(single)
                            for i, o in enumerate(outs)},
         **{f"thread{k}_ids": x[ids_name] for k, x in enumerate(per_thread)})
checked = time.perf_counter()

import tvm
print(json.dumps({
    "machine": platform.machine(),
    "modules": sorted({name.split(".")[0] for name in sys.modules}),
    "slimc_modules": sorted(n for n in sys.modules if n.startswith("slimc")),
    "tvm_libraries": sorted(tvm.base._LOADED_LIBS),
    "x86_refusal": refusal,
    "benchmark_median_ms": bench["median_ms"],
    "index_ranges": {k: list(v) for k, v in m.index_ranges.items()},
    "refused": refused,
    "after_bad_equal": after_bad_equal,
    "threads": THREADS, "calls_per_thread": CALLS, "threaded": threaded,
    "seconds": {"import": imported - start, "load": loaded - imported, "run": ran - loaded,
                "guarantees": checked - benched},
}))
"""


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The zoo's tiny BERT compiled for "arm" and "x86", saved; its inputs; torch's outputs."""
    python = aarch64_python()  # fail before spending a compile on a machine without qemu
    module, inputs, _ = ZOO["bert"]()
    g = slimc.capture(module, inputs)
    out = tmp_path_factory.mktemp("arm")
    arm = slimc.compile(g, "arm").save(out / "arm")
    x86 = slimc.compile(g, "x86").save(out / "x86")
    inputs_npz = out / "inputs.npz"
    np.savez(inputs_npz, **dict(zip(g.input_names, g.example_inputs)))
    return {"python": python, "arm": arm, "x86": x86, "inputs": inputs_npz, "graph": g,
            "torch": g.run(), "dir": out}


@pytest.fixture(scope="module")
def on_aarch64(artifacts):
    """Run the ARM artifact under qemu-aarch64 once; its report and outputs."""
    outputs_npz = artifacts["dir"] / "aarch64_outputs.npz"
    guarantees_npz = artifacts["dir"] / "aarch64_guarantees.npz"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(artifacts["dir"]),
           "PYTHONPATH": str(REPO), "PYTHONNOUSERSITE": "1", "LC_ALL": "C.UTF-8"}
    start = time.perf_counter()
    proc = subprocess.run(
        [str(artifacts["python"]), "-c", _DRIVER, str(artifacts["arm"]), str(artifacts["x86"]),
         str(artifacts["inputs"]), str(outputs_npz), str(guarantees_npz)],
        capture_output=True, text=True, env=env, timeout=600, check=False)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"the aarch64 run failed:\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["seconds"]["process"] = seconds
    with np.load(outputs_npz) as f:
        outputs = [f[f"arr_{i}"] for i in range(len(f.files))]
    with np.load(guarantees_npz) as f:
        report["per_thread"] = {k: f[k] for k in f.files}
    print(f"\naarch64 under qemu: {json.dumps(report['seconds'])}")
    return report, outputs


def test_arm_library_is_aarch64(artifacts):
    meta = runtime.read_metadata(artifacts["arm"])
    assert meta["target"]["triple"] == "aarch64-linux-gnu" and meta["target"]["isa"] == ["neon"]
    header = (artifacts["arm"] / runtime.LIBRARY_FILE).read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == EM_AARCH64


def test_arm_matches_x86_and_torch(artifacts, on_aarch64):
    report, outputs = on_aarch64
    assert report["machine"] == "aarch64"
    x86 = runtime.load(artifacts["x86"])(*artifacts["graph"].example_inputs)
    assert len(outputs) == len(x86) == len(artifacts["torch"])
    for arm_out, x86_out, torch_out in zip(outputs, x86, artifacts["torch"]):
        assert arm_out.shape == x86_out.shape and arm_out.dtype == x86_out.dtype
        assert float(np.abs(arm_out - x86_out).max()) < ATOL
        assert float(np.abs(arm_out - torch_out).max()) < ATOL
    assert report["benchmark_median_ms"] > 0


def test_aarch64_runtime_needs_numpy_and_tvm_runtime_only(on_aarch64):
    report, _ = on_aarch64
    # the deployed path: no torch, onnx or compiler code, and TVM's runtime library alone
    assert not {"torch", "onnx", "onnxruntime", "transformers"} & set(report["modules"])
    assert not [m for m in report["slimc_modules"]
                if m.startswith(("slimc.codegen", "slimc.passes"))]
    assert report["tvm_libraries"] == ["tvm_runtime"]


def test_aarch64_runtime_refuses_x86_artifact(on_aarch64):
    report, _ = on_aarch64
    refusal = report["x86_refusal"]
    assert refusal is not None and "x86_64" in refusal and "aarch64" in refusal


def test_aarch64_refuses_out_of_range_ids_and_keeps_serving(artifacts, on_aarch64):
    report, outputs = on_aarch64
    meta = runtime.read_metadata(artifacts["arm"])
    (name,) = meta["index_ranges"]
    lo, hi = meta["index_ranges"][name]
    assert (lo, hi) == (0, 99)  # the tiny BERT's vocabulary: 100 rows
    assert report["index_ranges"] == {name: [lo, hi]}
    assert [r["value"] for r in report["refused"]] == [hi + 1, lo - 1, 2**40]
    for r in report["refused"]:
        # refused before the call (a Gather past its table reads out of bounds, or segfaults)
        assert r["error"] == "IndexRangeError" and r["index_error"], r
        message = r["message"]
        assert repr(name) in message and str(r["value"]) in message
        assert "(0, 3)" in message and f"from {lo} to {hi}" in message
    # the process lived on: a good call after the bad ones gives the first call's outputs
    assert report["after_bad_equal"]
    assert outputs  # and the driver finished (on_aarch64 checks its exit code)


def test_aarch64_threads_get_single_threaded_outputs(artifacts, on_aarch64):
    report, outputs = on_aarch64
    threads, calls = report["threads"], report["calls_per_thread"]
    assert threads == 4 and calls >= 2
    for concurrency, results in report["threaded"].items():
        assert results["errors"] == [], f"concurrency={concurrency}: {results['errors']}"
        assert results["calls"] == threads * calls, concurrency
        assert results["mismatches"] == 0, (
            f"concurrency={concurrency}: {results['mismatches']} of {results['calls']} threaded "
            "calls differ from the single-threaded outputs")
    assert set(report["threaded"]) == {"1", str(threads)}
    # the threads' inputs differed (a call answered with another's outputs would show), and the
    # single-threaded outputs they were held to match the x86 build on the same ids
    per_thread = report["per_thread"]
    ids = [per_thread[f"thread{k}_ids"] for k in range(threads)]
    assert len({x.tobytes() for x in ids}) == threads
    x86 = runtime.load(artifacts["x86"])
    for k in range(threads):
        expected = x86(ids[k])
        got = [per_thread[f"thread{k}_out{i}"] for i in range(len(expected))]
        for arm_out, x86_out in zip(got, expected):
            assert arm_out.shape == x86_out.shape
            assert float(np.abs(arm_out - x86_out).max()) < ATOL
    assert np.array_equal(per_thread["thread0_out0"], outputs[0])  # k=0: the example ids
