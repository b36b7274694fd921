"""Compilation targets: slimc's short names → ``tvm.target.Target``.

``"x86"``  this machine's CPU, as LLVM detects it (``-mcpu`` = ``llvm_get_system_cpu()``; never a
           hard-coded CPU name, so the library uses every vector extension the CPU has).
``"arm"``  64-bit ARM Linux (``aarch64-linux-gnu``) with NEON; ``dotprod=True`` adds the Armv8.2
           dot-product instructions (int8 ``sdot``/``udot``), which not every aarch64 core has.
``"cuda"`` an NVIDIA GPU: ``arch="sm_90"`` (H100), ``"sm_80"`` (A100)…, or the GPU of this machine
           when there is one. TVM tags (``"nvidia/nvidia-h100"``) work too.
Anything else is passed to TVM as is: a ``tvm.target.Target``, a target dict, or a string TVM
understands (a tag, a JSON dict); what TVM rejects is a :class:`~slimc.errors.TargetError`.
"""

from __future__ import annotations

import json

import tvm
from tvm.target import codegen as _llvm

from ..errors import OptionError, TargetError

NAMES = ("x86", "arm", "cuda")
# the options each named target takes (resolve_target keyword arguments)
OPTIONS = {"x86": ("num_cores",),
           "arm": ("board", "dotprod", "i8mm", "sve", "mcpu", "num_cores"),
           "cuda": ("arch",)}
# named aarch64 boards: the CPU LLVM schedules for, its extensions and (where fixed) its cores
ARM_BOARDS = {
    "rpi4": {"mcpu": "cortex-a72", "num_cores": 4},
    "rpi5": {"mcpu": "cortex-a76", "dotprod": True, "num_cores": 4},
    "jetson-orin-nano": {"mcpu": "cortex-a78ae", "dotprod": True, "num_cores": 6},
    "jetson-agx-orin": {"mcpu": "cortex-a78ae", "dotprod": True, "num_cores": 12},
    "graviton2": {"mcpu": "neoverse-n1", "dotprod": True},
    "graviton3": {"mcpu": "neoverse-v1", "dotprod": True, "i8mm": True, "sve": True},
}
_ARM_TRIPLE = "aarch64-linux-gnu"
# LLVM feature names of the x86 extensions that matter for Transformer kernels
_X86_FEATURES = {"avx2": ("avx2",), "avx512f": ("avx512f",), "avx512vnni": ("avx512vnni",),
                 "amx": ("amx-tile", "amx-int8")}
# LLVM features that are instruction sets kernels use (not tuning flags such as "fast-bextr"): a
# library compiled with one of them dies on the first illegal instruction on a CPU without it
_ISA_PREFIXES = ("sse", "ssse3", "avx", "amx", "fma", "f16c",
                 "neon", "dotprod", "fullfp16", "i8mm", "bf16", "sve", "sme")


def _valid_forms() -> str:
    return ("Use one of " + ", ".join(repr(n) for n in NAMES) + ", a TVM tag such as "
            "'nvidia/nvidia-h100', a target dict such as {'kind': 'llvm', 'mcpu': 'skylake'}, or "
            "a tvm.target.Target.")


def _host_is_x86() -> bool:
    return _llvm.llvm_get_system_triple().split("-")[0] in ("x86_64", "i686", "i386")


def _available_cores() -> int:
    # the cores this process's kernels run on: the thread count slimc gives TVM's pool (its
    # affinity, SMT siblings once, a container's CPU quota), so that MetaSchedule plans the
    # parallel loops for the threads that will run them
    from ..runtime import physical_cores
    return physical_cores()


def _check_options(name: str, options: dict) -> None:
    unknown = sorted(set(options) - set(OPTIONS[name]))
    if unknown:
        raise OptionError(f"Target {name!r} takes no option(s) {', '.join(unknown)}.",
                          f"Its options are: {', '.join(OPTIONS[name])}.")


def _x86(num_cores: int | None = None) -> tvm.target.Target:
    if not _host_is_x86():
        raise TargetError(
            f"Target 'x86' means this machine's CPU, but this machine is "
            f"{_llvm.llvm_get_system_triple()}.",
            "Cross-compile with an explicit target, e.g. "
            "target={'kind': 'llvm', 'mtriple': 'x86_64-linux-gnu', 'mcpu': 'skylake-avx512'}.")
    # num-cores is what MetaSchedule sizes its parallel schedules by
    return tvm.target.Target({"kind": "llvm", "mcpu": _llvm.llvm_get_system_cpu(),
                              "num-cores": num_cores or _available_cores()})


def _arm(board: str | None = None, dotprod: bool | None = None, i8mm: bool | None = None,
         sve: bool | None = None, mcpu: str | None = None,
         num_cores: int | None = None) -> tvm.target.Target:
    if board is not None:
        if board not in ARM_BOARDS:
            raise OptionError(f"Unknown ARM board {board!r}.",
                              "Known boards: " + ", ".join(sorted(ARM_BOARDS)) + "; or give "
                              "mcpu=, dotprod=, i8mm=, sve=, num_cores= yourself.")
        preset = ARM_BOARDS[board]   # explicit options override the preset
        dotprod = preset.get("dotprod", False) if dotprod is None else dotprod
        i8mm = preset.get("i8mm", False) if i8mm is None else i8mm
        sve = preset.get("sve", False) if sve is None else sve
        mcpu = mcpu or preset["mcpu"]
        num_cores = num_cores or preset.get("num_cores")
    if num_cores is not None and (not isinstance(num_cores, int) or num_cores < 1):
        raise OptionError(f"num_cores={num_cores!r} is not a positive integer.",
                          "Pass the device's core count, e.g. num_cores=4.")
    mattr = ["+neon"]
    if dotprod or i8mm or sve:
        mattr.append("+v8.2a")
    mattr += [f"+{name}" for name, on in (("dotprod", dotprod), ("i8mm", i8mm), ("sve", sve))
              if on]
    conf = {"kind": "llvm", "mtriple": _ARM_TRIPLE, "mattr": mattr}
    if mcpu:
        conf["mcpu"] = mcpu
    if num_cores:
        conf["num-cores"] = num_cores
    return tvm.target.Target(conf)


def local_cuda_arch() -> str | None:
    """``"sm_XY"`` of this machine's first CUDA GPU, or None when there is none."""
    dev = tvm.cuda(0)  # False .exist also without a driver or a CUDA-enabled TVM
    if not dev.exist:
        return None
    return "sm_" + dev.compute_version.replace(".", "")


def _cuda(arch: str | None = None) -> tvm.target.Target:
    arch = arch or local_cuda_arch()
    if arch is None:
        raise TargetError(
            "Target 'cuda' needs the GPU architecture, and this machine has no CUDA GPU to "
            "detect it from.",
            "Pass it: target_options={'arch': 'sm_90'} (H100), 'sm_80' (A100), 'sm_89' (L4), "
            "or a tag: target='nvidia/nvidia-h100'.")
    if not (arch.startswith("sm_") and arch[3:].rstrip("a").isdigit()):
        raise OptionError(f"CUDA architecture {arch!r} is not of the form 'sm_XY'.",
                          "Pass e.g. arch='sm_90' (H100) or arch='sm_80' (A100).")
    # the host part runs the VM's control flow only: keep it generic so the library runs on
    # any x86-64 host the GPU sits in
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})


def resolve_target(target, **options) -> tvm.target.Target:
    """The ``tvm.target.Target`` for ``target`` (a name in :data:`NAMES`, or a TVM target).

    ``options`` go to the named target: ``x86``: ``num_cores``; ``arm``: ``board`` (a preset of
    :data:`ARM_BOARDS`), ``dotprod``, ``i8mm``, ``sve``, ``mcpu``, ``num_cores``; ``cuda``:
    ``arch``. TVM targets take no options (put them in the target).
    """
    if isinstance(target, tvm.target.Target):
        if options:
            raise OptionError("Target options were given with a tvm.target.Target.",
                              "Put them in the Target itself.")
        return target
    if isinstance(target, str) and target.strip().lower() in NAMES:
        name = target.strip().lower()
        _check_options(name, options)
        return {"x86": _x86, "arm": _arm, "cuda": _cuda}[name](**options)
    if options:
        raise OptionError(f"Target options were given with target {target!r}, which takes none.",
                          "Options go with the named targets " + ", ".join(NAMES) + ".")
    if isinstance(target, str) and target.strip().startswith("{"):
        try:
            target = json.loads(target)
        except json.JSONDecodeError as e:
            raise TargetError(f"Target {target!r} looks like JSON but does not parse: {e}.",
                              _valid_forms()) from None
    if not isinstance(target, (str, dict)):
        raise TargetError(f"A target must be a name or a TVM target, not "
                          f"{type(target).__name__}.", _valid_forms())
    try:
        return tvm.target.Target(target)
    except ValueError as e:
        detail = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise TargetError(f"Unknown target {target!r} ({detail}).", _valid_forms()) from None


def device_kind(target: tvm.target.Target) -> str:
    """Where a library built for ``target`` runs: ``"cpu"`` or ``"cuda"``."""
    kind = target.kind.name
    if kind == "llvm":
        return "cpu"
    if kind == "cuda":
        return "cuda"
    raise TargetError(f"slimc cannot run or package libraries for TVM target kind {kind!r}.",
                      "Use an llvm (CPU) or cuda target.")


def target_triple(target: tvm.target.Target) -> str:
    """The LLVM triple the host code of ``target`` is compiled for."""
    host = target.host or target
    attrs = dict(host.attrs) if host.kind.name == "llvm" else {}
    return str(attrs.get("mtriple") or _llvm.llvm_get_system_triple())


def isa_features(target: tvm.target.Target) -> list[str]:
    """The instruction-set extensions a CPU needs to run code compiled for ``target`` (empty
    for GPU targets, whose host code is generic)."""
    if target.kind.name != "llvm":
        return []
    feats = _llvm.llvm_get_cpu_features(target)
    return sorted(f for f in feats if f.startswith(_ISA_PREFIXES))


def host_cpu() -> dict:
    """This machine's CPU as LLVM sees it: name, triple, cores and the x86 extensions that
    matter for Transformer kernels (``avx2``, ``avx512f``, ``avx512vnni``, ``amx``)."""
    cpu = _llvm.llvm_get_system_cpu()
    info = {"cpu": cpu, "triple": _llvm.llvm_get_system_triple(), "cores": _available_cores()}
    if _host_is_x86():
        host = tvm.target.Target({"kind": "llvm", "mcpu": cpu})
        info["features"] = {name: all(_llvm.llvm_cpu_has_features(f, host) for f in feats)
                            for name, feats in _X86_FEATURES.items()}
    else:
        info["features"] = {}
    return info
