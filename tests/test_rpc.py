"""Distributed tuning on loopback: a TVM RPC tracker, RPC servers, MetaSchedule's RPC runner.

Two servers of this machine under one key measure one tuning run's candidates in parallel (their
session logs overlap in time), and the records they measured build a correct kernel. A third
server is an aarch64 device: the sysroot's CPython under qemu-user with TVM's runtime, linking
candidates with the cross compiler, tuning the "arm" target.

Serving over RPC (``slimc.runtime.load_remote``): a compiled artifact uploaded to a loopback
server gives the local outputs, out-of-range token ids are refused on the client (the server
keeps answering), threads calling one remote module each get their own right answer, and an ARM
artifact on the aarch64 server under qemu matches the x86 build.
"""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest
import tvm
from arm_qemu import CROSS_CXX, aarch64_python
from tvm import rpc
from tvm.script import relax as R
from zoo import ZOO

import slimc
from slimc import runtime
from slimc.codegen.rpc import LocalCluster, rpc_runner, tracker_queue
from slimc.codegen.targets import resolve_target
from slimc.codegen.tune import apply_database, count_records, tune
from slimc.errors import IndexRangeError, OptionError, ShapeError, SlimcError, TargetError


def _matmul_relu() -> tvm.IRModule:
    @tvm.script.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((64, 128), "float32"), w: R.Tensor((128, 256), "float32")):
            with R.dataflow():
                y = R.nn.relu(R.matmul(x, w))
                R.output(y)
            return y
    return Module


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster() as c:
        yield c


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> int:
    return sum(1 for s1, e1 in a for s2, e2 in b if s1 < e2 and s2 < e1)


def test_two_servers_tune_in_parallel(cluster, tmp_path):
    servers = cluster.add_server("x86", count=2)
    assert tracker_queue(cluster.tracker)["x86"]["total"] == 2
    runner = rpc_runner(cluster.tracker, "x86")  # one measurement per server at a time
    target = resolve_target("x86")
    summary = tune(_matmul_relu(), target, db=tmp_path / "db", trials=16, runner=runner,
                   progress=False)
    assert summary.trials == 16 and count_records(tmp_path / "db") > 0
    (task,) = summary.per_task
    assert task.best_ms is not None and task.best_ms < 1e3  # measured, not MetaSchedule's 1e10 s
    spans = [s.sessions() for s in servers]
    assert all(spans), f"each server should have measured candidates: {spans}"
    assert _overlap(*spans) > 0, "the two servers never measured at the same time"
    print(f"\nx86 sessions per server: {[len(s) for s in spans]}, overlapping pairs "
          f"{_overlap(*spans)}, tuning {summary.seconds:.1f} s")
    # the records measured remotely build a correct kernel
    lib = tvm.compile(apply_database(_matmul_relu(), target, tmp_path / "db"), target=target)
    vm = tvm.relax.VirtualMachine(lib, tvm.cpu())
    rng = np.random.default_rng(0)
    x, w = (rng.standard_normal(s).astype("float32") for s in ((64, 128), (128, 256)))
    out = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()
    np.testing.assert_allclose(out, np.maximum(x @ w, 0), rtol=1e-5, atol=1e-4)


@pytest.mark.slow  # an emulated Python starting twice (server, worker): ~25 s here
def test_aarch64_server_under_qemu_tunes_arm(cluster, tmp_path):
    (server,) = cluster.add_server("arm", python=aarch64_python(), env={"CXX": CROSS_CXX})
    runner = rpc_runner(cluster.tracker, "arm")
    # MetaSchedule sizes parallel loops by the target's core count
    summary = tune(_matmul_relu(), resolve_target("arm", num_cores=2), db=tmp_path / "db",
                   trials=8, runner=runner, progress=False)
    (task,) = summary.per_task
    assert task.trials == 8 and task.best_ms is not None and task.best_ms < 1e3
    assert count_records(tmp_path / "db") > 0
    sessions = server.sessions()
    assert len(sessions) >= 1
    print(f"\naarch64 (qemu) sessions: {len(sessions)}, best {task.best_ms:.3f} ms emulated, "
          f"tuning {summary.seconds:.1f} s")


def test_rpc_runner_errors(cluster):
    with pytest.raises(TargetError, match="no server under key 'no-such-board'"):
        rpc_runner(cluster.tracker, "no-such-board")
    with pytest.raises(OptionError, match="HOST:PORT"):
        rpc_runner("localhost", "x86")


def _matmul_relu_onnx(path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((128, 256))
                                .astype("float32"), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
        "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 128])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [64, 256])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_cli_tunes_over_the_tracker(cluster, tmp_path, capsys):
    import json

    from slimc.cli import main
    if tracker_queue(cluster.tracker).get("x86", {}).get("total", 0) == 0:
        cluster.add_server("x86")
    model = tmp_path / "mm.onnx"
    _matmul_relu_onnx(model)
    sessions_before = sum(len(s.sessions()) for s in cluster.servers if s.key == "x86")
    rc = main(["tune", str(model), "--db", str(tmp_path / "db"), "--trials", "4", "--quiet",
               "--json", "--rpc-tracker", cluster.tracker, "--rpc-key", "x86"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trials"] == 4 and summary["records"] > 0
    # the candidates were measured by the servers, not locally
    assert sum(len(s.sessions()) for s in cluster.servers if s.key == "x86") > sessions_before
    assert main(["tune", str(model), "--db", str(tmp_path / "db2"), "--trials", "4",
                 "--rpc-tracker", cluster.tracker]) == 2
    assert "--rpc-key" in capsys.readouterr().err


# -- serving a compiled model over RPC (runtime.load_remote) -------------------------------------
REMOTE_ATOL = 1e-5   # the same x86 library on the same CPU, run by the server
ARM_ATOL = 1e-4      # another ISA's kernels (as tests/test_arm.py)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """The zoo's tiny BERT (vocab 100) compiled for "x86" and saved; its graph; the local
    outputs on its example ids."""
    module, inputs, _ = ZOO["bert"]()
    g = slimc.capture(module, inputs)
    out = tmp_path_factory.mktemp("remote")
    x86 = slimc.compile(g, "x86").save(out / "x86")
    local = runtime.load(x86)
    (ids,) = g.example_inputs
    return {"graph": g, "x86": x86, "dir": out, "local": local, "ids": ids,
            "expected": local(ids)}


SERVE_KEY = "x86-serve"  # servers of this machine for the serving tests, apart from tuning's


@pytest.fixture(scope="module")
def serving(cluster):
    """Two x86 servers under SERVE_KEY: a session a failed test keeps open (its traceback
    holds the module) holds one until its timeout, not the next test's."""
    return cluster.add_server(SERVE_KEY, count=2)


def _session(cluster, key: str, **server):
    """A tracker session on a server under ``key``, started when the cluster has none."""
    # an earlier test's session ends when its module is freed; one held in a reference cycle
    # (a pytest.raises traceback holds the frame holding the module) until a collection
    gc.collect()
    if tracker_queue(cluster.tracker).get(key, {}).get("total", 0) == 0:
        cluster.add_server(key, **server)
    host, port = cluster.tracker.rsplit(":", 1)
    return rpc.connect_tracker(host, int(port)).request(key, session_timeout=60)


def _assert_close(got, expected, atol):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert isinstance(a, np.ndarray) and a.shape == b.shape and a.dtype == b.dtype
        assert float(np.abs(a - b).max()) < atol


def _ids_for(k: int, ids: np.ndarray, vocab: int = 100) -> np.ndarray:
    return (ids + 7 * k) % vocab


def _servers_alive(cluster, key: str) -> None:
    servers = [s for s in cluster.servers if s.key == key]
    assert servers and all(s.process.poll() is None for s in servers), \
        [(s.key, s.process.poll(), s.log.read_text()[-500:]) for s in servers]


def test_load_remote_matches_local(cluster, serving, bert):
    # over the tracker
    m = runtime.load_remote(bert["x86"], _session(cluster, SERVE_KEY))
    assert m.input_names == bert["local"].input_names
    assert m.index_ranges == bert["local"].index_ranges == {m.input_names[0]: (0, 99)}
    _assert_close(m(bert["ids"]), bert["expected"], REMOTE_ATOL)
    # and straight to a server (rpc.connect), no tracker
    server = rpc.Server(host="127.0.0.1", port=9400, port_end=9499, silent=True)
    try:
        direct = runtime.load_remote(bert["x86"], rpc.connect("127.0.0.1", server.port))
        _assert_close(direct(bert["ids"]), bert["expected"], REMOTE_ATOL)
        ids = _ids_for(3, bert["ids"])
        _assert_close(direct(ids), bert["local"](ids), REMOTE_ATOL)
    finally:
        server.terminate()


def test_load_remote_refuses_bad_ids_on_the_client(cluster, serving, bert):
    m = runtime.load_remote(bert["x86"], _session(cluster, SERVE_KEY))
    name = m.input_names[0]
    _assert_close(m(bert["ids"]), bert["expected"], REMOTE_ATOL)
    for value in (100, -1, 2**40):
        bad = bert["ids"].copy()
        bad[0, 3] = value
        # an IndexRangeError, not a RunError: checked here, before anything is sent (sent, a
        # gather 2**40 rows past its table would crash the server's worker)
        with pytest.raises(IndexRangeError) as info:
            m(bad)
        assert isinstance(info.value, IndexError) and isinstance(info.value, SlimcError)
        message = str(info.value)
        assert repr(name) in message and f"holds {value} at position (0, 3)" in message
        assert "from 0 to 99" in message
    with pytest.raises(ShapeError, match="dtype int32"):
        m(bert["ids"].astype("int32"))
    # the session, and the server behind it, still answer
    _assert_close(m(bert["ids"]), bert["expected"], REMOTE_ATOL)
    ids = _ids_for(5, bert["ids"])
    _assert_close(m(ids), bert["local"](ids), REMOTE_ATOL)
    _servers_alive(cluster, SERVE_KEY)


@pytest.mark.parametrize("threads", [4, 8])
def test_load_remote_threads_each_get_their_answer(cluster, serving, bert, threads):
    m = runtime.load_remote(bert["x86"], _session(cluster, SERVE_KEY))
    calls = 3
    inputs = [_ids_for(k, bert["ids"]) for k in range(threads)]
    expected = [bert["local"](x) for x in inputs]
    barrier = threading.Barrier(threads)
    got: dict[int, list] = {k: [] for k in range(threads)}
    errors: list[str] = []

    def serve(k):
        try:
            barrier.wait()
            for _ in range(calls):
                got[k].append(m(inputs[k]))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"thread {k}: {type(e).__name__}: {e}")

    workers = [threading.Thread(target=serve, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert not any(w.is_alive() for w in workers), "a remote call hung"
    assert errors == []
    for k in range(threads):
        assert len(got[k]) == calls
        for outputs in got[k]:   # a call answered with another thread's ids would differ
            _assert_close(outputs, expected[k], REMOTE_ATOL)
    # and the module still serves one caller afterwards
    _assert_close(m(bert["ids"]), bert["expected"], REMOTE_ATOL)


def test_load_remote_arm_on_aarch64_server_matches_x86(cluster, bert):
    python = aarch64_python()
    start = time.perf_counter()
    arm = slimc.compile(bert["graph"], "arm").save(bert["dir"] / "arm")
    session = _session(cluster, "arm", python=python, env={"CXX": CROSS_CXX})
    m = runtime.load_remote(arm, session)
    assert m.metadata["target"]["triple"] == "aarch64-linux-gnu"
    _assert_close(m(bert["ids"]), bert["expected"], ARM_ATOL)
    bad = bert["ids"].copy()
    bad[0, 0] = 100
    with pytest.raises(IndexRangeError, match="holds 100 at position"):
        m(bad)
    ids = _ids_for(2, bert["ids"])
    _assert_close(m(ids), bert["local"](ids), ARM_ATOL)
    _servers_alive(cluster, "arm")
    print(f"\nARM artifact over RPC on qemu-aarch64: {time.perf_counter() - start:.1f} s "
          "(compile, server, upload, calls)")
