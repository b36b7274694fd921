"""Run a compiled slimc artifact with TVM's runtime and numpy only: no torch, no onnx.

An artifact is a directory holding ``lib.so`` (the TVM Relax VM executable, weights included)
and ``metadata.json`` (inputs, outputs, target, versions, the passes applied)::

    m = slimc.runtime.load("build/")
    outputs = m(input_ids)              # list of numpy arrays, in m.output_names order
    m.benchmark(repeat=50, warmup=5)    # {"median_ms": ..., "mean_ms": ..., "p90_ms": ...}

Serving guarantees: a loaded module may be called from any number of threads at once (each call
runs on one of the module's Relax VMs, each VM on a worker thread of its own, see :class:`VMPool`), and index inputs (token ids,
positions) are checked against the range the model defines before the call
(:func:`check_index_ranges`): bad values raise :class:`~slimc.errors.IndexRangeError` instead of
reading outside a table.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, IndexRangeError, OptionError, RunError, ShapeError
from ..ir.graph import TensorSpec, check_inputs, random_inputs

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
LIBRARY_FILE = "lib.so"
_REQUIRED = ("format_version", "tvm_version", "slimc_version", "library_bytes", "target", "inputs",
             "outputs")


def _tvm():
    """TVM, imported without torch.

    ``tvm_ffi`` imports torch at start-up whenever it is installed (a workaround for a Windows
    symbol clash); a deployed model needs neither torch nor the seconds its import takes. While
    ``tvm_ffi`` loads, ``import torch`` is made to fail as if torch were not installed; TVM then
    only lacks its torch interop (DLPack still works through ``__dlpack__``). A process that
    imported torch or TVM before keeps them as they are.
    """
    hide = "torch" not in sys.modules and "tvm_ffi" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # the import system reads None as "not installed"
    try:
        # the VM from tvm.runtime, not tvm.relax: a runtime-only TVM (libtvm_runtime alone, as
        # deployed on a board) has no tvm.relax
        import tvm
        from tvm.runtime import vm  # noqa: F401
    finally:
        if hide and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return tvm


def physical_cores(root: Path = Path("/")) -> int:
    """The physical cores this process may run on: its CPU affinity with SMT siblings counted
    once, capped by a container's CPU quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``).
    ``root``: where ``sys/`` is found (tests give a fake tree)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") \
        else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = root / f"sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:   # no sysfs topology (not Linux, a sandbox): count logical CPUs
            cores.add(("cpu", cpu))
    count = len(cores)
    quota = _cpu_quota(root / "sys/fs/cgroup")
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def _cpu_quota(cgroup: Path) -> float | None:
    """CPUs' worth of time per period a cgroup allows this process, or None when unlimited."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup / "cpu/cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def use_physical_cores() -> int | None:
    """Size TVM's thread pool to :func:`physical_cores` unless ``TVM_NUM_THREADS`` or
    ``OMP_NUM_THREADS`` is set; returns the count set, or None when the user's setting stands.

    TVM's default on x86 is half the logical CPUs, assuming two hyper-threads per core: on a
    machine without SMT (many VMs and cloud instances) it uses half the cores: on a 2-core VM
    every kernel ran on one thread, which was most of slimc's fp32 gap to onnxruntime there
    (bench/matmul.py). TVM reads the variable when a thread first launches a parallel kernel,
    so this runs before any model does (:func:`load`, ``slimc.compile``); child processes
    inherit it.
    """
    if os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS"):
        return None
    count = physical_cores()
    os.environ["TVM_NUM_THREADS"] = str(count)
    return count


def machine_arch(triple_or_machine: str) -> str:
    """``"x86_64"`` / ``"aarch64"`` / … from an LLVM triple or ``platform.machine()``."""
    arch = triple_or_machine.split("-")[0].lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)


def _corrupt(path: Path, what: str) -> ArtifactError:
    return ArtifactError(f"{path / METADATA_FILE} is corrupt: {what}.",
                         "Compile the model again (slimc compile / slimc.compile(...).save()).")


def read_metadata(path) -> dict:
    """The validated metadata of the artifact directory ``path``."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"No artifact at {path}: the directory does not exist.",
                            "Pass the directory written by `slimc compile -o DIR` or "
                            "Artifact.save(DIR).")
    if not path.is_dir():
        raise ArtifactError(f"{path} is a file, not an artifact directory.",
                            "Pass the directory written by `slimc compile -o DIR`.")
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise ArtifactError(f"{path} has no {METADATA_FILE}: it is not a slimc artifact, or it "
                            "is incomplete.", "Compile the model again into this directory.")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"it is not readable JSON ({e})") from None
    if not isinstance(meta, dict):
        raise _corrupt(path, "it is not a JSON object")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise _corrupt(path, f"it lacks {', '.join(missing)}")
    version = meta["format_version"]
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise ArtifactError(
            f"{path} is artifact format {version!r}; this slimc reads format {FORMAT_VERSION}.",
            "Upgrade slimc to run it, or compile the model again." if newer else
            "Compile the model again with this slimc.")
    for key in ("inputs", "outputs"):
        specs = meta[key]
        if not isinstance(specs, list) or not all(
                isinstance(s, dict) and isinstance(s.get("name"), str)
                and isinstance(s.get("shape"), list) and isinstance(s.get("dtype"), str)
                for s in specs):
            raise _corrupt(path, f"{key!r} is not a list of name/shape/dtype entries")
    target = meta["target"]
    if not isinstance(target, dict) or target.get("device") not in ("cpu", "cuda") \
            or not isinstance(target.get("triple"), str):
        raise _corrupt(path, "'target' lacks its device or triple")
    ranges = meta.get("index_ranges", {})
    names = {s["name"] for s in meta["inputs"]}
    if not isinstance(ranges, dict) or not all(
            k in names and isinstance(v, list) and len(v) == 2
            and all(isinstance(b, int) for b in v) for k, v in ranges.items()):
        raise _corrupt(path, "'index_ranges' is not a map of input names to [low, high]")
    return meta


def _check_tvm_version(path: Path, meta: dict, tvm) -> None:
    # the VM executable format is not stable across TVM releases: same major.minor only
    built, here = str(meta["tvm_version"]), tvm.__version__
    if built.split(".")[:2] != here.split(".")[:2]:
        raise ArtifactError(f"{path} was built with TVM {built}; this runtime has TVM {here}.",
                            f"Install apache-tvm {built} to run it, or compile the model again "
                            "with this TVM.")


def _check_host(path: Path, meta: dict, tvm) -> None:
    """Refuse a library this CPU cannot execute (a crash on the first illegal instruction)."""
    built, here = machine_arch(meta["target"]["triple"]), machine_arch(platform.machine())
    if built != here:
        raise ArtifactError(f"{path} holds a library for {meta['target']['triple']}; this "
                            f"machine is {platform.machine()}.",
                            f"Run it on a {built} machine, or compile the model again for this "
                            "one (target='x86' or 'arm').")
    isa = meta["target"].get("isa") or []
    if meta["target"]["device"] != "cpu" or not isa:
        return
    try:
        from tvm.target import codegen
        host = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
        lacking = [f for f in isa if not codegen.llvm_cpu_has_features(f, host)]
    except (ImportError, AttributeError):  # a TVM runtime without LLVM cannot tell: try it
        return
    if lacking:
        raise ArtifactError(
            f"{path} was compiled for a CPU with {', '.join(lacking)}, which this CPU "
            f"({codegen.llvm_get_system_cpu()}) lacks.",
            "Compile the model again on this machine with target='x86', or for the oldest CPU "
            "you deploy on (target={'kind': 'llvm', 'mcpu': ...}).")


def _device(path: Path, meta: dict, tvm):
    if meta["target"]["device"] == "cuda":
        dev = tvm.cuda(0)
        if not dev.exist:
            raise ArtifactError(f"{path} was compiled for CUDA, and this machine has no CUDA "
                                "GPU.", "Run it on a machine with an NVIDIA GPU, or compile "
                                "again with target='x86'.")
        return dev
    return tvm.cpu(0)


def _library(path: Path, meta: dict) -> Path:
    lib_path = path / LIBRARY_FILE
    if not lib_path.is_file():
        raise ArtifactError(f"{path} has no {LIBRARY_FILE}: the artifact is incomplete.",
                            "Compile the model again into this directory.")
    size = lib_path.stat().st_size
    if size != meta["library_bytes"]:
        raise ArtifactError(f"{lib_path} is {size:,} bytes; the metadata says "
                            f"{meta['library_bytes']:,}: the copy is truncated or was replaced.",
                            "Copy the artifact directory again, or compile the model again.")
    if "index_ranges" not in meta:
        warnings.warn(f"slimc: {path} was compiled by slimc {meta['slimc_version']}, which did "
                      "not record the valid range of index inputs: an out-of-range token id "
                      "is not caught and can crash this process. Compile the model again.",
                      UserWarning, stacklevel=3)
    return lib_path


def _check_concurrency(concurrency) -> int:
    if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
        raise OptionError(f"concurrency={concurrency!r} is not valid.",
                          "Pass an integer >= 1: how many calls may run at the same time.")
    return concurrency


def load(path, *, concurrency: int = 1) -> Module:
    """Load the artifact directory ``path`` (written by ``Artifact.save``) for running.

    ``concurrency``: how many calls may run at the same time (each on its own VM and worker
    thread; see :class:`VMPool`). Any number of threads may call the module; calls beyond this
    wait for a free VM. The default, 1, runs each call on every core in turn, which gave the most
    throughput on 2 cores (``bench/serving.py``); on larger machines several VMs, each with
    ``TVM_NUM_THREADS`` set to its share of the cores, can serve more.
    """
    path = Path(path)
    concurrency = _check_concurrency(concurrency)
    meta = read_metadata(path)
    lib_path = _library(path, meta)
    use_physical_cores()
    tvm = _tvm()
    _check_tvm_version(path, meta, tvm)
    _check_host(path, meta, tvm)
    device = _device(path, meta, tvm)
    try:
        lib = tvm.runtime.load_module(str(lib_path))
        pool = VMPool(lib, device, concurrency)
    except Exception as e:
        raise ArtifactError(f"TVM cannot load {lib_path}: {str(e).strip()[:300]}",
                            "The library is damaged or was built for another system; compile "
                            "the model again.") from e
    return Module(pool, meta, device)


def load_remote(path, session) -> Module:
    """Load the artifact directory ``path`` onto a TVM RPC server and run it there.

    ``session``: a ``tvm.rpc`` session (``tvm.rpc.connect(host, port)``, or
    ``tvm.rpc.connect_tracker(host, port).request(key)``). The library is uploaded, inputs are
    checked here (shapes, dtypes, index ranges) before anything is sent, and calls from several
    threads take turns on the session, which is one connection.
    """
    path = Path(path)
    meta = read_metadata(path)
    lib_path = _library(path, meta)
    tvm = _tvm()
    _check_tvm_version(path, meta, tvm)
    device = session.cuda(0) if meta["target"]["device"] == "cuda" else session.cpu(0)
    name = f"slimc-{os.getpid()}-{threading.get_ident()}-{LIBRARY_FILE}"
    try:
        session.upload(str(lib_path), name)
        lib = session.load_module(name)
        pool = VMPool(lib, device, 1)
    except Exception as e:
        raise ArtifactError(f"The RPC server cannot load {lib_path}: "
                            f"{str(e).strip().splitlines()[-1][:300]}",
                            "Check that the server's CPU matches the artifact's target "
                            f"({meta['target']['triple']}) and that it runs TVM "
                            f"{meta['tvm_version']}.") from e
    return Module(pool, meta, device, remote=True)


def _flatten(value) -> list:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    return [a for v in value for a in _flatten(v)]


class VMPool:
    """Relax VMs over one loaded library, each run by a worker thread of its own.

    A TVM Relax VM keeps per-call state (its registers, the frame of the running function), so
    two calls overlapping on one VM corrupt each other (a crash, or "Mismatched type on
    argument" errors). ``run(fn)`` hands ``fn(vm, main)`` to a free worker and waits for its
    result; at most ``size`` calls run at once, the others queue in arrival order.

    Workers, not a lock: TVM gives every thread that launches a parallel kernel a thread pool of
    its own (``TVM_NUM_THREADS`` workers, kept until the process exits). Run on the callers'
    threads, a server with 64 request threads would hold 64 pools, and leaving the process took
    about 0.5 s per calling thread; here only the ``size`` workers ever run TVM code. The VMs
    share the library and its bound weights, so each costs little memory. The first VM is made
    at once (a bad library fails at load), the others on first need.
    """

    def __init__(self, lib, device, size: int = 1):
        from concurrent.futures import ThreadPoolExecutor
        self._lib, self._device, self.size = lib, device, size
        self._spare = [self._make()]
        self._local = threading.local()
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="slimc-vm")

    def _make(self):
        vm = _tvm().runtime.vm.VirtualMachine(self._lib, self._device)
        return vm, vm["main"]

    def _entry(self):
        entry = getattr(self._local, "entry", None)
        if entry is None:
            try:
                entry = self._spare.pop()
            except IndexError:
                entry = self._make()
            self._local.entry = entry
        return entry

    @property
    def workers(self) -> int:
        """Worker threads (and VMs) started so far."""
        return len(self._executor._threads)

    def run(self, fn):
        """``fn(vm, main)`` on a worker's VM; its result, or the exception it raised."""
        return self._executor.submit(lambda: fn(*self._entry())).result()

    def close(self) -> None:
        self._executor.shutdown(wait=False)

    def __del__(self):
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False)


def check_index_ranges(ranges: dict, specs, arrays) -> None:
    """Raise :class:`IndexRangeError` unless every index input's values lie in its range.

    ``ranges``: ``{input name: [low, high]}`` (``metadata["index_ranges"]``, found by the
    compiler: the rows of the table each input indexes, negative values included where the
    model wraps them as ONNX ``Gather`` does).
    """
    for spec, x in zip(specs, arrays):
        bounds = ranges.get(spec.name)
        if bounds is None or x.size == 0:
            continue
        lo, hi = bounds
        low, high = x.min(), x.max()
        if low >= lo and high <= hi:
            continue
        bad = np.flatnonzero((x < lo) | (x > hi))
        first = np.unravel_index(int(bad[0]), x.shape)
        value = x[first].item()
        raise IndexRangeError(
            f"Input {spec.name!r} holds {value} at position {tuple(int(i) for i in first)} "
            f"({bad.size} value(s) out of range); the model takes values from {lo} to {hi} "
            f"(it indexes a table of {hi + 1} rows).",
            "Check the tokenizer and vocabulary the inputs were made with: they must match "
            "the model's.")


def _remote_call(vm, args) -> list[np.ndarray]:
    # over RPC a function's tuple result is an opaque remote object: the VM's stateful
    # interface fetches the outputs one by one
    vm.set_input("main", *args)
    vm.invoke_stateful("main")
    return _flatten(vm.get_outputs("main"))


@contextlib.contextmanager
def _run_errors(arrays):
    """TVM's failures while running (an allocation the shapes need that fails, a lost RPC
    connection) as :class:`RunError` naming the input shapes."""
    try:
        yield
    except Exception as e:   # noqa: BLE001 - TVM raises plain RuntimeError/TVMError/MemoryError
        text = str(e).strip()
        last = text.splitlines()[-1] if text else type(e).__name__
        shapes = ", ".join(str(tuple(x.shape)) for x in arrays)
        raise RunError(f"TVM's runtime failed running the model on inputs of shape {shapes}: "
                       f"{type(e).__name__}: {last[:300]}",
                       "If the inputs are very large, run smaller batches or sequences; "
                       "otherwise report it with the artifact and inputs.") from e


class Module:
    """A loaded artifact: call it with numpy arrays, get a list of numpy arrays back.

    Thread-safe: calls from several threads each run on a VM of the module's :class:`VMPool`.
    """

    def __init__(self, pool: VMPool, metadata: dict, device, *, remote: bool = False):
        self.metadata = metadata
        self.device = device
        self._pool = pool
        self._remote = remote      # runs on an RPC server (see _remote_call)
        self._ranges = metadata.get("index_ranges", {})
        self._tensor = _tvm().runtime.tensor
        self.input_specs = [TensorSpec(s["name"], tuple(s["shape"]), s["dtype"])
                            for s in metadata["inputs"]]
        self.output_specs = [TensorSpec(s["name"], tuple(s["shape"]), s["dtype"])
                             for s in metadata["outputs"]]

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.input_specs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.output_specs]

    @property
    def target(self) -> str:
        return self.metadata["target"]["tvm"]

    def __repr__(self) -> str:
        ins = ", ".join(f"{s.name}: {s.dtype}{list(s.shape)}" for s in self.input_specs)
        return f"<slimc.runtime.Module ({ins}) on {self.device}>"

    def _check(self, inputs) -> list[np.ndarray]:
        arrays = []
        for i, x in enumerate(inputs):
            try:
                arrays.append(np.asarray(x))
            except (ValueError, TypeError) as e:   # ragged nested lists, unconvertible objects
                name = self.input_specs[i].name if i < len(self.input_specs) else f"#{i}"
                raise ShapeError(f"Input {name!r} is not an array: {e}",
                                 "Pass a numpy array (nested lists must be rectangular).") \
                    from None
        check_inputs(self.input_specs, arrays)
        sizes: dict[str, tuple[int, str]] = {}
        for spec, x in zip(self.input_specs, arrays):
            if x.dtype != np.dtype(spec.dtype):
                raise ShapeError(f"Input {spec.name!r} has dtype {x.dtype}, but the model takes "
                                 f"{spec.dtype}.", f"Convert it: x.astype(np.{spec.dtype}).")
            for d, n in zip(spec.shape, x.shape):
                if isinstance(d, str):
                    seen = sizes.setdefault(d, (n, spec.name))
                    if seen[0] != n:
                        raise ShapeError(
                            f"Dimension {d!r} is {seen[0]} in input {seen[1]!r} but {n} in "
                            f"input {spec.name!r}.", f"Inputs sharing {d!r} need the same size "
                            "there.")
        check_index_ranges(self._ranges, self.input_specs, arrays)
        return arrays

    @property
    def index_ranges(self) -> dict[str, tuple[int, int]]:
        """``{input name: (low, high)}``: the values each index input may hold."""
        return {k: tuple(v) for k, v in self._ranges.items()}

    def _to_device(self, arrays):
        return [self._tensor(np.ascontiguousarray(x), self.device) for x in arrays]

    def __call__(self, *inputs) -> list[np.ndarray]:
        """Run the model; outputs in :attr:`output_names` order. Safe to call from several
        threads at once."""
        arrays = self._check(inputs)
        with _run_errors(arrays):
            args = self._to_device(arrays)
            if self._remote:
                return self._pool.run(lambda vm, main: _remote_call(vm, args))
            return self._pool.run(lambda vm, main: _flatten(main(*args)))

    def benchmark(self, *inputs, repeat: int = 50, warmup: int = 5, dims: dict | None = None,
                  seed: int = 0) -> dict:
        """Time the model on ``inputs`` (random ones when none are given; ``dims`` sizes
        symbolic dimensions, default 1 for the first axis and 16 for others).

        Each sample is one call from Python, inputs already on the device, outputs left there.
        """
        if not isinstance(repeat, int) or repeat < 1 or not isinstance(warmup, int) \
                or warmup < 0:
            raise OptionError(f"benchmark(repeat={repeat!r}, warmup={warmup!r}) is not valid.",
                              "Use an integer repeat >= 1 and warmup >= 0.")
        arrays = self._check(inputs or random_inputs(self.input_specs, seed, dims))
        args = self._to_device(arrays)

        def timed(vm, main) -> list[float]:   # on the worker: no hand-over inside the timing
            for _ in range(warmup):
                main(*args)
            self.device.sync()
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                main(*args)
                self.device.sync()
                times.append((time.perf_counter() - start) * 1e3)
            return times

        times = self._pool.run(timed)
        t = np.asarray(times)
        return {"median_ms": float(np.median(t)), "mean_ms": float(t.mean()),
                "p90_ms": float(np.percentile(t, 90)), "min_ms": float(t.min()),
                "max_ms": float(t.max()), "std_ms": float(t.std()), "repeat": repeat,
                "warmup": warmup, "device": str(self.device),
                "input_shapes": {s.name: list(x.shape) for s, x in zip(self.input_specs, arrays)}}


def interleaved_medians(fns: dict, repeat: int, warmup: int = 2) -> dict[str, float]:
    """Median ms of each of ``fns`` (label -> call of no arguments), timed in alternating rounds (the order
    reversed every other round), so that a slow spell of the machine falls on every label
    alike: timing one model fully before the other showed the smaller one 13-20 % *slower* in
    one idle run of three, in every runtime at once.

    Each call waits 0.3 s first: TVM's and onnxruntime's pool workers spin ~0.2 s after a call,
    and each onnxruntime session has a pool of its own, so the other model's spinning workers
    would take the cores (onnxruntime measured 33 ms instead of 18 without the pause)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for r in range(repeat):
        for label in (order if r % 2 == 0 else order[::-1]):
            time.sleep(0.3)
            t = time.perf_counter()
            fns[label]()
            times[label].append((time.perf_counter() - t) * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


__all__ = ["FORMAT_VERSION", "LIBRARY_FILE", "METADATA_FILE", "Module", "VMPool",
           "check_index_ranges", "interleaved_medians", "load", "load_remote", "read_metadata"]
