"""TVM's thread pool gets one worker per physical core (slimc.runtime.use_physical_cores): TVM's
own default halves the logical CPUs on x86, which on a machine without SMT leaves half the cores
idle (on the 2-core test machine: every kernel on one thread, 1.7x slower end to end)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from slimc.runtime import physical_cores

ROOT = Path(__file__).resolve().parents[1]
_PROBE = """
import os
from slimc.runtime import use_physical_cores
set_to = use_physical_cores()
import tvm
print(set_to, os.environ.get("TVM_NUM_THREADS"), tvm.get_global_func("runtime.NumThreads")())
"""


def _probe(**env: str) -> list[str]:
    """(returned count, TVM_NUM_THREADS, TVM's thread count) in a fresh process: TVM reads the
    variable once per thread, so only a new process shows what a user's run would get."""
    clean = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env}, cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.split()


def test_physical_cores_counts_the_cores_this_process_may_use():
    n = physical_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))


def _fake_sys(root: Path, cores: list[int], cgroup: dict[str, str] | None = None) -> Path:
    """A sysfs tree: logical CPU i on physical core cores[i] (one package); cgroup files."""
    for cpu, core in enumerate(cores):
        topology = root / f"sys/devices/system/cpu/cpu{cpu}/topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text("0\n")
        (topology / "core_id").write_text(f"{core}\n")
    for name, text in (cgroup or {}).items():
        path = root / "sys/fs/cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize("cores, cgroup, want", [
    ([0, 1, 2, 3], None, 4),
    ([0, 0, 1, 1], None, 2),                                     # 2-way SMT
    ([0, 1, 2, 3], {"cpu.max": "200000 100000\n"}, 2),          # cgroup v2: 2 CPUs' quota
    ([0, 1, 2, 3], {"cpu.max": "150000 100000\n"}, 2),          # 1.5 CPUs: round up
    ([0, 1, 2, 3], {"cpu.max": "max 100000\n"}, 4),             # unlimited
    ([0, 1, 2, 3], {"cpu/cpu.cfs_quota_us": "100000\n",         # cgroup v1
                    "cpu/cpu.cfs_period_us": "100000\n"}, 1),
    ([0, 1, 2, 3], {"cpu/cpu.cfs_quota_us": "-1\n",
                    "cpu/cpu.cfs_period_us": "100000\n"}, 4),
])
def test_physical_cores_counts_smt_once_and_honours_cpu_quotas(tmp_path, monkeypatch, cores,
                                                               cgroup, want):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(len(cores))))
    assert physical_cores(_fake_sys(tmp_path, cores, cgroup)) == want


def test_thread_pool_uses_every_physical_core():
    n = physical_cores()
    assert _probe() == [str(n), str(n), str(n)]


@pytest.mark.parametrize("variable", ["TVM_NUM_THREADS", "OMP_NUM_THREADS"])
def test_a_users_thread_setting_stands(variable):
    assert _probe(**{variable: "1"}) == ["None", "1" if variable == "TVM_NUM_THREADS" else "None",
                                         "1"]


def test_compile_and_load_size_the_pool_before_the_first_run(monkeypatch, tmp_path):
    from zoo import ZOO

    import slimc
    module, inputs, _ = ZOO["mha"]()
    n = str(physical_cores())
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    art = slimc.compile(slimc.capture(module, inputs), "x86")
    assert os.environ.get("TVM_NUM_THREADS") == n
    art.save(tmp_path / "art")
    monkeypatch.delenv("TVM_NUM_THREADS")
    slimc.runtime.load(tmp_path / "art")
    assert os.environ.get("TVM_NUM_THREADS") == n


def test_the_target_plans_for_the_threads_that_run_the_kernels():
    # MetaSchedule and the schedules size parallel loops by the target's num-cores: the same
    # count slimc gives TVM's thread pool
    from slimc.codegen.targets import host_cpu, resolve_target
    assert int(resolve_target("x86").attrs["num-cores"]) == physical_cores()
    assert host_cpu()["cores"] == physical_cores()
