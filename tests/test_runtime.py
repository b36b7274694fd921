"""slimc.runtime: load an artifact, run it, time it; refuse bad inputs and damaged artifacts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from zoo import ZOO

import slimc
from slimc import runtime
from slimc.errors import ArtifactError, OptionError, ShapeError

ATOL = 1e-4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Tiny BERT compiled for this CPU: (artifact dir, example inputs, torch outputs)."""
    module, inputs, _ = ZOO["bert"]()
    g = slimc.capture(module, inputs)
    out = slimc.compile(g, "x86").save(tmp_path_factory.mktemp("rt") / "bert")
    return out, g.example_inputs, g.run()


@pytest.fixture
def copy_of(built, tmp_path):
    """A private copy of the artifact, to damage."""
    dst = tmp_path / "art"
    shutil.copytree(built[0], dst)
    return dst


def _edit_metadata(path: Path, **changes) -> None:
    meta_path = path / runtime.METADATA_FILE
    meta = json.loads(meta_path.read_text())
    for key, value in changes.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    meta_path.write_text(json.dumps(meta))


def test_run_matches_torch(built):
    path, inputs, reference = built
    m = runtime.load(path)
    for _ in range(2):  # a second call reuses the VM
        outputs = m(*inputs)
        assert len(outputs) == len(reference)
        assert all(isinstance(o, np.ndarray) for o in outputs)
        assert max(float(np.abs(o - r).max()) for o, r in zip(outputs, reference)) < ATOL


def test_specs(built):
    path, inputs, reference = built
    m = runtime.load(path)
    assert [(s.shape, s.dtype) for s in m.input_specs] == [(x.shape, x.dtype.name)
                                                           for x in inputs]
    assert [s.shape for s in m.output_specs] == [r.shape for r in reference]
    assert m.input_names == [s.name for s in m.input_specs]
    assert len(m.output_names) == len(reference)
    assert json.loads(m.target)["kind"] == "llvm"


def test_benchmark(built):
    m = runtime.load(built[0])
    stats = m.benchmark(repeat=7, warmup=1)
    assert stats["repeat"] == 7 and stats["warmup"] == 1
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"] <= stats["max_ms"]
    assert stats["min_ms"] <= stats["mean_ms"] <= stats["max_ms"]
    assert stats["input_shapes"] == {s.name: list(s.shape) for s in m.input_specs}
    given = m.benchmark(*built[1], repeat=2, warmup=0)
    assert given["repeat"] == 2
    for bad in ({"repeat": 0}, {"warmup": -1}, {"repeat": 2.5}):
        with pytest.raises(OptionError):
            m.benchmark(**bad)


def test_wrong_inputs(built):
    path, inputs, _ = built
    m = runtime.load(path)
    (ids,) = inputs
    with pytest.raises(ShapeError, match="1 input"):
        m()
    with pytest.raises(ShapeError, match="1 input"):
        m(ids, ids)
    with pytest.raises(ShapeError, match=r"shape \(1, 9\)"):
        m(np.zeros((1, 9), dtype=ids.dtype))
    with pytest.raises(ShapeError, match="shape"):
        m(ids[0])
    with pytest.raises(ShapeError, match="astype"):
        m(ids.astype(np.int32))


def _hammer(m, inputs, threads: int, calls: int) -> list:
    """``calls`` calls from each of ``threads`` threads started together; their outputs."""
    barrier = threading.Barrier(threads)
    results: list = []

    def work():
        barrier.wait()
        for _ in range(calls):
            try:
                results.append(m(*inputs))
            except Exception as e:  # noqa: BLE001 - recorded, asserted below
                results.append(e)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return results


@pytest.mark.parametrize("concurrency", [1, 3])
def test_many_threads_share_one_module(built, concurrency):
    # one Relax VM shared by overlapping calls crashed the process or raised "Mismatched type
    # on argument" before calls ran on a pool of VMs
    path, inputs, _ = built
    m = runtime.load(path, concurrency=concurrency)
    want = m(*inputs)
    results = _hammer(m, inputs, threads=8, calls=10)
    assert len(results) == 80
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors[:3]
    assert all(np.array_equal(o, w) for r in results for o, w in zip(r, want))
    assert m._pool.workers <= concurrency


def test_concurrency_must_be_a_positive_integer(built):
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(OptionError, match="concurrency"):
            runtime.load(built[0], concurrency=bad)


def test_missing_or_not_an_artifact(built, tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        runtime.load(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="is a file"):
        runtime.load(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no metadata.json"):
        runtime.load(tmp_path / "empty")


@pytest.mark.parametrize("text, match", [
    ("{not json", "not readable JSON"),
    ("[1, 2]", "not a JSON object"),
    ("", "not readable JSON"),
])
def test_corrupt_metadata(copy_of, text, match):
    (copy_of / runtime.METADATA_FILE).write_text(text)
    with pytest.raises(ArtifactError, match=match):
        runtime.load(copy_of)


@pytest.mark.parametrize("changes, match", [
    ({"inputs": None}, "lacks inputs"),
    ({"outputs": [{"name": "y"}]}, "'outputs' is not a list"),
    ({"target": {"device": "tpu", "triple": "x"}}, "device or triple"),
    ({"format_version": runtime.FORMAT_VERSION + 1}, "Upgrade slimc"),
    ({"format_version": 0}, "Compile the model again with this slimc"),
    ({"tvm_version": "0.1.0"}, "built with TVM 0.1.0"),
    ({"index_ranges": {"nope": [0, 1]}}, "'index_ranges' is not a map"),
    ({"index_ranges": {"args_0": [0]}}, "'index_ranges' is not a map"),
    ({"index_ranges": [0, 99]}, "'index_ranges' is not a map"),
])
def test_metadata_mismatch(copy_of, changes, match):
    _edit_metadata(copy_of, **changes)
    with pytest.raises(ArtifactError, match=match):
        runtime.load(copy_of)


def test_damaged_library(copy_of):
    lib = copy_of / runtime.LIBRARY_FILE
    data = lib.read_bytes()
    lib.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated"):
        runtime.load(copy_of)
    lib.unlink()
    with pytest.raises(ArtifactError, match="no lib.so"):
        runtime.load(copy_of)
    lib.write_bytes(b"\0" * len(data))  # right size, not a library
    with pytest.raises(ArtifactError, match="cannot load"):
        runtime.load(copy_of)


def test_foreign_machine(copy_of):
    meta = json.loads((copy_of / runtime.METADATA_FILE).read_text())
    foreign = "x86_64-linux-gnu" if runtime.machine_arch(meta["target"]["triple"]) != \
        "x86_64" else "aarch64-linux-gnu"
    _edit_metadata(copy_of, target={**meta["target"], "triple": foreign})
    with pytest.raises(ArtifactError, match="holds a library for"):
        runtime.load(copy_of)


def test_cpu_lacking_an_extension(copy_of):
    """An artifact needing an instruction set this CPU lacks is refused before it can crash."""
    import tvm
    from tvm.target import codegen
    host = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    # no current CPU has all three: XOP is pre-Zen AMD, AMX is Intel, SSE4a is AMD only
    lacking = next(f for f in ("xop", "amx-tile", "sse4a")
                   if not codegen.llvm_cpu_has_features(f, host))
    meta = json.loads((copy_of / runtime.METADATA_FILE).read_text())
    _edit_metadata(copy_of, target={**meta["target"], "isa": meta["target"]["isa"] + [lacking]})
    with pytest.raises(ArtifactError, match=lacking):
        runtime.load(copy_of)


_NO_TORCH = """
import json, sys
import numpy as np
import slimc.runtime as rt
m = rt.load(sys.argv[1])
outputs = m(np.load(sys.argv[2]))
reference = np.load(sys.argv[3])
heavy = sorted({k.split(".")[0] for k in sys.modules} & {"torch", "onnx", "onnxruntime",
                                                         "transformers"})
print(json.dumps({"err": float(np.abs(outputs[0] - reference).max()), "heavy": heavy}))
"""


def test_runs_without_torch_or_onnx(built, tmp_path):
    path, (ids,), reference = built
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "ref.npy", reference[0])
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, str(path), str(tmp_path / "ids.npy"),
                           str(tmp_path / "ref.npy")], capture_output=True, text=True, check=False,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert result["err"] < ATOL


def test_a_ragged_list_is_a_shape_error(built):
    m = runtime.load(built[0])
    with pytest.raises(ShapeError, match="not an array.*rectangular"):
        m([[1, 2], [3]])
