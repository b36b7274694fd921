"""Distributed tuning on loopback: a TVM RPC tracker, RPC servers, MetaSchedule's RPC runner.

Two servers of this machine under one key measure one tuning run's candidates in parallel (their
session logs overlap in time), and the records they measured build a correct kernel. A third
server is an aarch64 device: the sysroot's CPython under qemu-user with TVM's runtime, linking
candidates with the cross compiler, tuning the "arm" target.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from arm_qemu import CROSS_CXX, aarch64_python
from tvm.script import relax as R

from slimc.codegen.rpc import LocalCluster, rpc_runner, tracker_queue
from slimc.codegen.targets import resolve_target
from slimc.codegen.tune import apply_database, count_records, tune
from slimc.errors import OptionError, TargetError


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
