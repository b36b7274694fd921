"""Tuning on remote devices: TVM's RPC tracker and servers, measured by MetaSchedule.

A tracker hands out devices by key; every device runs TVM's RPC server registered under its key.
:func:`rpc_runner` is a MetaSchedule runner measuring candidates on the devices under one key,
as many at a time as there are servers, so N boards measure N candidates at once::

    # the tuning host:  python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190
    # every board:      python -m tvm.exec.rpc_server --tracker HOST:9190 --key rk3588
    runner = rpc_runner("HOST:9190", "rk3588")
    tune(mod, resolve_target("arm", num_cores=8), db="tune-db", runner=runner)

Candidates are compiled on the tuning host into a tar of object files for the target; the
server links each with its C++ compiler (``$CXX``, else ``g++``) and runs it. A board needs TVM's
runtime (``libtvm_runtime``), numpy, cloudpickle and psutil, and a C++ compiler for itself.

:class:`LocalCluster` starts a tracker and servers on this machine (127.0.0.1) for tests and
experiments: servers of this machine's Python, and an aarch64 one under qemu-user (the sysroot
of ``scripts/setup_arm.sh``), which links candidates with the host's aarch64 cross compiler.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Self

from ..errors import OptionError, TargetError

# Runs a TVM RPC server in a Python that may be emulated (qemu-user without binfmt_misc): its
# worker processes are started through sys.executable, which must then be the qemu wrapper
# rather than the foreign ELF. A runtime-only TVM (a board's) leaves libtvm_runtime_extra
# unloaded; it holds the random fill MetaSchedule's runner asks the server for.
_SERVER = r"""
import os, sys
if os.environ.get("SLIMC_RPC_PYTHON"):
    sys.executable = os.environ["SLIMC_RPC_PYTHON"]
import tvm
from tvm import rpc
extra = None
if tvm.base._RUNTIME_ONLY:
    lib_dir = os.path.dirname(tvm.base._LOADED_LIBS["tvm_runtime"]._name)
    extra = os.path.join(lib_dir, "libtvm_runtime_extra.so")
host, port = os.environ["SLIMC_RPC_TRACKER"].rsplit(":", 1)
server = rpc.Server("127.0.0.1", port=9090, port_end=9999, key=os.environ["SLIMC_RPC_KEY"],
                    tracker_addr=(host, int(port)), load_library=extra)
print(f"slimc-rpc-server listening on {server.port}", file=sys.stderr, flush=True)
server.proc.join()
"""


def parse_tracker(tracker: str) -> tuple[str, int]:
    """``"host:port"`` → (host, port)."""
    host, _, port = str(tracker).rpartition(":")
    if not host or not port.isdigit():
        raise OptionError(f"RPC tracker address {tracker!r} is not HOST:PORT.",
                          "Pass e.g. '127.0.0.1:9190'.")
    return host, int(port)


def tracker_queue(tracker: str) -> dict[str, dict]:
    """The tracker's servers by key: ``{key: {"total", "free", "pending"}}``."""
    from tvm import rpc
    host, port = parse_tracker(tracker)
    try:
        summary = rpc.connect_tracker(host, port).summary()
    except (OSError, RuntimeError) as e:
        raise TargetError(f"Cannot reach the RPC tracker at {tracker}: {e}.",
                          "Start it (python -m tvm.exec.rpc_tracker --port PORT) or check the "
                          "address.") from None
    queue: dict[str, dict] = {}
    for server in summary["server_info"]:
        key = server["key"].split(":", 1)[-1]  # "server:<key>"
        queue.setdefault(key, {"total": 0, "free": 0, "pending": 0})["total"] += 1
    for key, info in summary["queue_info"].items():
        entry = queue.setdefault(key, {"total": 0, "free": 0, "pending": 0})
        entry["free"], entry["pending"] = int(info["free"]), int(info["pending"])
    return queue


def rpc_runner(tracker: str, key: str, *, max_workers: int | None = None,
               session_timeout: float = 60.0, number: int = 3, repeat: int = 1,
               min_repeat_ms: int = 50):
    """A MetaSchedule runner measuring on the RPC servers registered under ``key`` at
    ``tracker`` (``"host:port"``): pass it to :func:`slimc.codegen.tune.tune` as ``runner=``.

    ``max_workers`` candidates are measured at once, by default one per server under the key.
    Each measurement runs the kernel ``number`` times per sample, at least ``min_repeat_ms``,
    ``repeat`` samples. Raises :class:`~slimc.errors.TargetError` when the tracker is not
    reachable or has no server under ``key``.
    """
    from tvm.s_tir import meta_schedule as ms
    host, port = parse_tracker(tracker)
    queue = tracker_queue(tracker)
    servers = queue.get(key, {}).get("total", 0)
    if servers == 0:
        known = ", ".join(sorted(k for k, q in queue.items() if q["total"])) or "none"
        raise TargetError(f"The RPC tracker at {tracker} has no server under key {key!r} "
                          f"(keys with servers: {known}).",
                          f"Start one on the device: python -m tvm.exec.rpc_server --tracker "
                          f"{tracker} --key {key}")
    workers = max_workers or servers
    if workers < 1:
        raise OptionError(f"max_workers={max_workers} measures nothing.", "Use 1 or more.")
    runner = ms.runner.RPCRunner(
        rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                       session_timeout_sec=session_timeout),
        evaluator_config=ms.runner.EvaluatorConfig(number=number, repeat=repeat,
                                                   min_repeat_ms=min_repeat_ms,
                                                   enable_cpu_cache_flush=False),
        max_workers=workers)
    # start every worker process now, together: the pool starts them lazily, one per thread, and
    # a cold one (a Python importing TVM: seconds) joins a batch only after the warm one has
    # measured most of it, one device at a time
    for started in [runner.pool.submit(time.sleep, 0.5) for _ in range(workers)]:
        started.result()
    return runner


# -- a cluster on loopback ------------------------------------------------------------------------
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) INFO (start|finish) serving")


@dataclass
class LocalServer:
    """An RPC server process of a :class:`LocalCluster`; its log holds one line per session."""

    key: str
    python: str
    process: subprocess.Popen
    log: Path

    def sessions(self) -> list[tuple[float, float]]:
        """(start, end) times (seconds since the epoch) of the sessions it has served."""
        starts, spans = [], []
        for line in self.log.read_text(errors="replace").splitlines():
            m = _LOG_TIME.match(line.strip())
            if not m:
                continue
            when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
            if m.group(2) == "start":
                starts.append(when)
            elif starts:
                spans.append((starts.pop(0), when))
        return spans


class LocalCluster:
    """A tracker and RPC servers on 127.0.0.1, stopped on :meth:`close` (or leaving a ``with``).

    ``add_server(key)`` starts a server of this machine's Python; ``add_server(key,
    python=".cache/arm-sysroot/python", env={"CXX": "aarch64-linux-gnu-g++"})`` an aarch64 one
    under qemu-user, linking candidates with the cross compiler.
    """

    def __init__(self):
        from tvm.rpc.tracker import Tracker
        self._tracker = Tracker(host="127.0.0.1", port=9190, port_end=9290, silent=True)
        self.tracker = f"127.0.0.1:{self._tracker.port}"
        self.servers: list[LocalServer] = []
        self._logs = Path(tempfile.mkdtemp(prefix="slimc-rpc-"))

    def add_server(self, key: str, *, python: str | None = None, env: dict | None = None,
                   count: int = 1, timeout: float = 180.0) -> list[LocalServer]:
        """Start ``count`` RPC servers under ``key`` (at once) and wait until the tracker lists
        them all."""
        python = str(Path(python).resolve()) if python else sys.executable
        expected = tracker_queue(self.tracker).get(key, {}).get("total", 0) + count
        started = []
        for _ in range(count):
            log = self._logs / f"server{len(self.servers)}-{key}.log"
            run_env = {**os.environ, **(env or {}), "SLIMC_RPC_TRACKER": self.tracker,
                       "SLIMC_RPC_KEY": key, "SLIMC_RPC_PYTHON": python}
            with open(log, "w") as out:
                # its own process group: the server's worker processes end with it
                process = subprocess.Popen([python, "-c", _SERVER], env=run_env, stdout=out,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True)
            started.append(LocalServer(key, python, process, log))
            self.servers.append(started[-1])
        deadline = time.monotonic() + timeout
        while tracker_queue(self.tracker).get(key, {}).get("total", 0) < expected:
            for server in started:
                if server.process.poll() is not None:
                    raise TargetError(
                        f"The RPC server for {key!r} ({python}) exited with code "
                        f"{server.process.returncode}: {server.log.read_text()[-1500:]}",
                        "Check that this Python has TVM, numpy, cloudpickle and psutil.")
            if time.monotonic() > deadline:
                raise TargetError(f"The RPC servers for {key!r} did not register with the "
                                  f"tracker within {timeout:.0f} s.",
                                  f"See their logs in {self._logs}.")
            time.sleep(0.2)
        return started

    def close(self) -> None:
        for server in self.servers:
            if server.process.poll() is None:
                try:
                    os.killpg(server.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    server.process.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(server.process.pid, signal.SIGKILL)
                    server.process.wait()
        self._tracker.terminate()
        shutil.rmtree(self._logs, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["LocalCluster", "LocalServer", "parse_tracker", "rpc_runner", "tracker_queue"]
