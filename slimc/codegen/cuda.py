"""CUDA builds checked offline, with kernels compiled ahead of time.

``tvm.compile`` for a CUDA target schedules every kernel with DLight (the default Relax pipeline
for CUDA applies ``dl.gpu.Matmul/GEMV/Reduction/GeneralReduction/Fallback``) and generates CUDA
C++. Two things can then go wrong without a GPU to notice:

* **CPU code in a GPU build.** A TIR function that reaches code generation without thread
  bindings (a schedule hook or tuning database that marks it scheduled but binds no threads, or a
  pipeline without DLight) is compiled *silently* as host code. On a GPU it would run on the CPU
  over device pointers. :func:`verify_device_build` finds every such function.
* **Kernels compiled on the deployment machine.** A TVM without the CUDA runtime (any machine
  without a GPU driver, as here) keeps the generated CUDA *source* in the executable, and the
  library compiles it with NVRTC or nvcc when it is loaded, so the GPU machine needs the CUDA
  compiler (and ``cuda-bindings``). :func:`precompile` compiles the kernels here with nvcc into a
  fatbin (SASS for the target's ``sm_XY`` plus ``compute_XY`` PTX, which newer GPUs' drivers
  JIT-compile), and :meth:`DeviceCode.pack_imports` puts that fatbin into ``lib.so`` in place
  of the source: ``cuModuleLoadData`` loads it with the driver alone.

ptxas' ``-v`` report is kept per kernel and architecture (registers, spill stores and loads,
stack, shared memory), so a build can be checked for spills without a GPU.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import tvm

from ..errors import SlimcError, TargetError, UnsupportedError

# nvcc flags of TVM's own nvcc path (tvm.support.nvcc._compile_cuda_nvcc), so kernels compile as
# they would at load time: the half/bfloat16 operators TVM's code uses, and fast math
_NVCC_FLAGS = [
    "-O3",
    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
    # -v: the per-kernel report parsed below
    "--ptxas-options=-v,--warn-on-local-memory-usage",
    # TVM's generated code declares index temporaries it does not always use
    "-diag-suppress=177",
]
# the format tag the CUDA module is saved under; "cubin" is what TVM itself tags a fatbin with
# (anything but "cuda" is handed to cuModuleLoadData, which takes cubin, fatbin and PTX)
_BINARY_FORMAT = "cubin"
_SOURCE_FORMAT = "cuda"
_FATBIN_MAGIC = b"\x50\xed\x55\xba"
# read by TVM's CUDA codegen (cuda_fallback_module.h) each time it builds a CUDA module
_FORCE_SOURCE = "TVM_COMPILE_FORCE_FALLBACK"


@dataclass(frozen=True)
class KernelReport:
    """ptxas' ``-v`` report of one kernel for one architecture."""

    kernel: str
    arch: str
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack_bytes: int
    shared_bytes: int


@dataclass
class DeviceCode:
    """A CUDA build's kernels: the generated source and its fatbin, compiled ahead of time."""

    arch: str
    source: str
    kernels: dict[str, int]  # kernel name -> threads per block (its __launch_bounds__)
    binary: bytes  # fatbin: SASS for arch, PTX for compute_<arch>
    ptxas: list[KernelReport] = field(default_factory=list)
    nvcc_version: str = ""

    def summary(self) -> dict:
        """What an artifact's metadata records about its kernels."""
        spills = sum(r.spill_stores + r.spill_loads for r in self.ptxas)
        return {"arch": self.arch, "binary": f"fatbin ({self.arch} SASS + compute_"
                f"{self.arch[3:]} PTX)", "binary_bytes": len(self.binary),
                "kernels": len(self.kernels), "nvcc": self.nvcc_version,
                "max_registers": max((r.registers for r in self.ptxas), default=0),
                "spill_bytes": spills}

    def pack_imports(self, mod, is_system_lib: bool, symbol_prefix: str,
                     workspace_dir: str) -> str:
        """``export_library(fpack_imports=...)``: pack ``mod``'s imported modules as TVM does,
        with the CUDA module's source replaced by :attr:`binary`; returns the object file."""
        blob = tvm.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy().tobytes()
        blob = _replace_cuda_source(blob, self.source, self.binary)
        llvm = [m for m in _walk(mod) if m.kind == "llvm"]
        if not llvm:
            raise SlimcError("The CUDA executable has no host (llvm) module to pack into.",
                             "This is a slimc bug; please report it with the model.")
        target = llvm[0].get_function("_get_target_string")()
        obj = tvm.get_global_func("codegen.codegen_blob")(blob, is_system_lib, target,
                                                          symbol_prefix)
        path = os.path.join(workspace_dir, f"{symbol_prefix}devc.o")
        obj.write_to_file(path)
        return path


# -- what the build contains ----------------------------------------------------------------------
def _walk(root) -> list:
    """``root`` and every module it imports, directly or not."""
    seen, stack, out = set(), [root], []
    while stack:
        m = stack.pop()
        if m in seen:
            continue
        seen.add(m)
        out.append(m)
        stack.extend(m.imports)
    return out


def _modules(executable) -> list:
    return _walk(executable.mod)


@contextlib.contextmanager
def keep_source():
    """Make ``tvm.compile`` keep the generated CUDA as source, as it does on a machine without
    the CUDA driver, also on one with it (there TVM would compile the kernels during the build
    with NVRTC, which needs the ``cuda-bindings`` package): every build then goes through
    :func:`precompile` alike."""
    old = os.environ.get(_FORCE_SOURCE)
    os.environ[_FORCE_SOURCE] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ[_FORCE_SOURCE]
        else:
            os.environ[_FORCE_SOURCE] = old


def device_source(executable) -> str | None:
    """The CUDA C++ TVM generated for ``executable`` (a ``tvm.compile`` result), or None when it
    has no CUDA module at all."""
    cuda = [m for m in _modules(executable) if m.kind == "cuda"]
    if not cuda:
        return None
    if len(cuda) > 1:
        raise SlimcError(f"The build has {len(cuda)} CUDA modules; slimc handles one.",
                         "This is a slimc bug; please report it with the model.")
    return cuda[0].inspect_source(_SOURCE_FORMAT)


_KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\((\d+)\) )?(\w+)\(')
_BRACE = re.compile(r"\s*\{")
_HOST_ONLY = re.compile(r"shape_func\d*")


def _kernel_bodies(source: str) -> dict[str, tuple[int, str]]:
    """kernel name -> (threads per block, body text) for every kernel defined in ``source``."""
    matches = list(_KERNEL.finditer(source))
    out: dict[str, tuple[int, str]] = {}
    for i, m in enumerate(matches):
        close = source.find(")", m.end())  # parameters are plain pointers and scalars
        if not _BRACE.match(source, close + 1):
            continue  # the forward declaration
        end = matches[i + 1].start() if i + 1 < len(matches) else len(source)
        out[m.group(2)] = (int(m.group(1) or 0), source[close + 1:end])
    return out


def _host_functions(executable) -> list[str]:
    """The TIR functions of the host module: each is exported as ``__tvm_ffi_<name>``."""
    names = []
    for m in _modules(executable):
        if m.kind == "llvm":
            names += re.findall(r"^define [^@]*@__tvm_ffi_([\w.$]+)\(", m.inspect_source("ll"),
                                re.MULTILINE)
    return names


def verify_device_build(executable) -> dict[str, int]:
    """Check that a build for a CUDA target runs its kernels on the GPU; returns
    ``{kernel: threads per block}``.

    Raises :class:`~slimc.errors.UnsupportedError` when the build has no CUDA module (it fell
    back to CPU code), when a TIR function was compiled as host code (no thread bindings: it
    would run on the CPU over device memory), or when a kernel uses no thread or block index.
    """
    source = device_source(executable)
    fix = ("Build with the default schedules (DLight on CUDA), or make the schedule hook / "
           "tuning database bind every loop nest to blockIdx/threadIdx.")
    if source is None:
        raise UnsupportedError("The CUDA build contains no CUDA kernels: every function was "
                               "compiled for the CPU.", fix)
    kernels = _kernel_bodies(source)
    if not kernels:
        raise UnsupportedError("The CUDA build's device module defines no kernels.", fix)
    unbound = sorted(k for k, (_, body) in kernels.items()
                     if "threadIdx." not in body and "blockIdx." not in body)
    if unbound:
        raise UnsupportedError(f"CUDA kernel(s) {', '.join(unbound)} use no thread or block "
                               "index: each would run as one GPU thread.", fix)
    # SplitHostDevice names a function's kernels <name>_kernel, <name>_kernel_1, ...; the
    # shape functions VMShapeLower adds for symbolic dimensions compute on the host's shape heap
    on_cpu = sorted(f for f in _host_functions(executable)
                    if not _HOST_ONLY.fullmatch(f)
                    and not any(k.startswith(f"{f}_kernel") for k in kernels))
    if on_cpu:
        shown = ", ".join(on_cpu[:8]) + (f" and {len(on_cpu) - 8} more" if len(on_cpu) > 8 else "")
        raise UnsupportedError(
            f"{len(on_cpu)} function(s) of the CUDA build have no GPU schedule and were compiled "
            f"as CPU code ({shown}); on a GPU they would run on the host over device memory.",
            fix)
    return {k: threads for k, (threads, _) in kernels.items()}


# -- nvcc -----------------------------------------------------------------------------------------
def find_nvcc() -> str | None:
    """nvcc from PATH, ``$CUDA_HOME``/``$CUDA_PATH``, or the newest ``/usr/local/cuda*``."""
    found = shutil.which("nvcc")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
             *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for home in homes:
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    return None


def _nvcc_or_fail(nvcc: str | None) -> str:
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise TargetError("Compiling CUDA kernels ahead of time needs nvcc, and none was found "
                          "(PATH, $CUDA_HOME, /usr/local/cuda*).",
                          "Install the CUDA toolkit, or put its bin/ on PATH or set CUDA_HOME.")
    return nvcc


def nvcc_version(nvcc: str | None = None) -> str:
    """``"13.0"``-style release of ``nvcc`` (found when not given)."""
    out = subprocess.run([_nvcc_or_fail(nvcc), "--version"], capture_output=True, text=True,
                         check=False)
    match = re.search(r"release (\d+\.\d+)", out.stdout)
    return match.group(1) if match else "unknown"


def _arch_number(arch: str) -> str:
    if not re.fullmatch(r"sm_\d+a?", arch):
        raise TargetError(f"CUDA architecture {arch!r} is not of the form 'sm_XY'.",
                          "Use e.g. 'sm_80' (A100) or 'sm_90' (H100).")
    return arch[3:]


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(output: str) -> list[KernelReport]:
    """The per-kernel records of ptxas' ``-v`` output (as printed through nvcc)."""
    reports, current, frame = [], None, (0, 0, 0)
    for line in output.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            current, frame = (m.group(1), m.group(2)), (0, 0, 0)
        elif (m := _PTXAS_FRAME.search(line)) and current:
            frame = tuple(int(g) for g in m.groups())
        elif (m := _PTXAS_USED.search(line)) and current:
            smem = _PTXAS_SMEM.search(line)
            reports.append(KernelReport(current[0], current[1], int(m.group(1)), frame[1],
                                        frame[2], frame[0], int(smem.group(1)) if smem else 0))
            current = None
    return reports


def compile_kernels(source: str, archs: list[str], *, ptx: bool = True,
                    nvcc: str | None = None) -> tuple[bytes, list[KernelReport]]:
    """Compile CUDA ``source`` with nvcc into one fatbin holding SASS for every ``sm_XY`` in
    ``archs`` (and, with ``ptx``, the PTX of the last, for newer GPUs to JIT-compile).

    Returns the fatbin and ptxas' report per kernel and architecture. Raises
    :class:`~slimc.errors.TargetError` when nvcc is missing or rejects the code.
    """
    nvcc = _nvcc_or_fail(nvcc)
    gencode = []
    for arch in archs:
        num = _arch_number(arch)
        gencode += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    if ptx and archs:
        num = _arch_number(archs[-1])
        gencode += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    with tempfile.TemporaryDirectory(prefix="slimc-nvcc-") as tmp:
        cu, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        cu.write_text(source)
        proc = subprocess.run([nvcc, "--fatbin", *_NVCC_FLAGS, *gencode, "-o", str(out),
                               str(cu)], capture_output=True, text=True, cwd=tmp, check=False)
        said = proc.stdout + proc.stderr
        if proc.returncode != 0:
            errors = [line for line in said.splitlines() if "error" in line.lower()]
            raise TargetError(f"nvcc could not compile the generated CUDA kernels for "
                              f"{', '.join(archs)}: {' | '.join(errors[:5]) or said[-600:]}",
                              "Check that this nvcc supports the architecture (nvcc "
                              "--list-gpu-arch); otherwise report it with the model.")
        binary = out.read_bytes()
    if not binary.startswith(_FATBIN_MAGIC):
        raise TargetError("nvcc wrote something that is not a fatbin.",
                          "Check the CUDA toolkit installation.")
    return binary, parse_ptxas(said)


def precompile(executable, target: tvm.target.Target, *, nvcc: str | None = None) -> DeviceCode:
    """Verify a CUDA build (:func:`verify_device_build`) and compile its kernels for the
    target's architecture into a fatbin."""
    kernels = verify_device_build(executable)
    source = device_source(executable)
    arch = str(target.attrs.get("arch", ""))
    if not arch:
        raise TargetError(f"The CUDA target {target} names no architecture.",
                          "Give one: target_options={'arch': 'sm_90'}, or a tag such as "
                          "'nvidia/nvidia-h100'.")
    binary, reports = compile_kernels(source, [arch], nvcc=nvcc)
    compiled = {r.kernel for r in reports}
    missing = sorted(set(kernels) - compiled)
    if missing:
        raise SlimcError(f"ptxas reported no result for kernel(s) {', '.join(missing)}.",
                         "This is a slimc bug; please report it with the model.")
    return DeviceCode(arch, source, kernels, binary, reports, nvcc_version(nvcc))


# -- TVM's module serialization -------------------------------------------------------------------
# export_library packs every non-DSO module into one blob (src/target/codegen.cc,
# PackImportsToBytes): u64 length, then the import tree (two u64 vectors), then per module group a
# type key string and, except for the DSO placeholder "_lib", the module's SaveToBytes() as a
# string. A CUDA module's bytes are [format string][function table][code string]. Strings and
# vectors are a u64 count followed by the items.
def _u64(buf: bytes, pos: int) -> tuple[int, int]:
    if pos + 8 > len(buf):
        raise ValueError("truncated")
    return struct.unpack_from("<Q", buf, pos)[0], pos + 8


def _string(buf: bytes, pos: int) -> tuple[bytes, int]:
    n, pos = _u64(buf, pos)
    if pos + n > len(buf):
        raise ValueError("truncated")
    return buf[pos:pos + n], pos + n


def _pack_string(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def _replace_cuda_source(blob: bytes, source: str, binary: bytes) -> bytes:
    """``blob`` (PackImportsToBytes) with the CUDA module holding ``source`` re-tagged as the
    compiled ``binary``. Checks the layout strictly and refuses what it does not recognise."""
    try:
        size, pos = _u64(blob, 0)
        if size != len(blob) - 8:
            raise ValueError("length header")
        rows, pos = _u64(blob, pos)
        row_ptr = list(struct.unpack_from(f"<{rows}Q", blob, pos))
        pos += 8 * rows
        children, pos = _u64(blob, pos)
        pos += 8 * children
        out = [blob[8:pos]]
        replaced = 0
        for _ in range(len(row_ptr) - 1):
            key, pos = _string(blob, pos)
            out.append(_pack_string(key))
            if key == b"_lib":
                continue
            payload, pos = _string(blob, pos)
            if key == b"cuda":
                payload, did = _compiled_cuda_payload(payload, source, binary)
                replaced += did
            out.append(_pack_string(payload))
        if pos != len(blob):
            raise ValueError("trailing bytes")
    except (ValueError, struct.error) as e:
        raise SlimcError(f"TVM's packed module layout is not the one slimc knows ({e}); the "
                         "CUDA kernels cannot be swapped for their compiled form.",
                         f"This TVM ({tvm.__version__}) needs a slimc update; please report "
                         "it.") from None
    if replaced != 1:
        raise SlimcError(f"Found {replaced} CUDA modules with the generated source to replace, "
                         "not 1.", "This is a slimc bug; please report it with the model.")
    body = b"".join(out)
    return struct.pack("<Q", len(body)) + body


def _compiled_cuda_payload(payload: bytes, source: str, binary: bytes) -> tuple[bytes, int]:
    fmt, pos = _string(payload, 0)
    if fmt != _SOURCE_FORMAT.encode():
        return payload, 0  # compiled already (a TVM with the CUDA runtime compiles at build time)
    code = source.encode()
    tail = _pack_string(code)
    if not payload.endswith(tail):
        raise ValueError("the CUDA module's code is not the generated source")
    fmap = payload[pos:len(payload) - len(tail)]
    return _pack_string(_BINARY_FORMAT.encode()) + fmap + _pack_string(binary), 1


__all__ = ["DeviceCode", "KernelReport", "compile_kernels", "device_source", "find_nvcc",
           "nvcc_version", "parse_ptxas", "precompile", "verify_device_build"]
