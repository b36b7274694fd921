"""Kernel selection: each matmul of the graph gets the kernel that pays on the target.

:func:`select_kernels` is what ``slimc.compile(..., tune="default")`` (the default, and
``slimc compile`` without ``--no-schedules`` or ``--db``) runs on CPU targets:

1. integer matmuls with an int8 constant weight (``fold_fake_quant``'s) → the VNNI kernels of
   :func:`.int8.use_vnni` where the target has AVX512-VNNI; elsewhere they stay int32 matmuls;
2. float32 matmuls whose constant weight has enough all-zero blocks → the BSR kernels of
   :func:`.sparse.lower_sparse` with ``threshold="auto"`` (the measured crossover) and
   ``block="auto"`` (per weight, the block shape with the lowest expected time);
3. everything else → :func:`.schedules.apply_default_schedules`, which leaves the kernels of
   steps 1 and 2 whole (they are marked scheduled and opaque).

The steps touch disjoint matmuls (integer vs float), so their order does not matter. An explicit
``tune=`` hook (``int8_schedules``, ``sparse_hook(...)``, ``apply_default_schedules``, a
database) replaces this selection entirely.

:func:`count_matmuls` (before the hook) and :func:`kernel_counts` (after it) say which kernels
each matmul got, for any hook: ``compile`` stores that in ``metadata["kernels"]``.
"""

from __future__ import annotations

import warnings

import tvm
from tvm import relax, tirx
from tvm.target import Target

from .int8 import KERNEL_ATTR as VNNI_ATTR
from .int8 import has_vnni, use_vnni
from .schedules import apply_default_schedules
from .sparse import KERNEL_ATTR as BSR_ATTR
from .sparse import lower_sparse


class SlowInt8Warning(UserWarning):
    """An int8 model compiled for a CPU without int8 dot-product kernels: its integer matmuls
    run as int32 loops, slower than the fp32 build of the same model."""


def select_kernels(mod: tvm.IRModule, target) -> tvm.IRModule:
    """The default CPU schedule hook: VNNI kernels for int8 matmuls where the target has the
    instructions, BSR kernels for block-sparse weights past the crossover, the default
    schedules for the rest (see the module docstring). Non-CPU targets: unchanged."""
    target = target if isinstance(target, Target) else Target(target)
    if target.kind.name != "llvm":
        return mod
    mod = use_vnni(mod, target)   # unchanged without AVX512-VNNI
    mod = lower_sparse(mod, target, threshold="auto", block="auto")
    return apply_default_schedules(mod, target)


def count_matmuls(mod: tvm.IRModule) -> dict[str, int]:
    """``{"integer": n, "float": n}``: the ``relax.matmul`` calls of an imported module by
    result type (integer: an int32 accumulator, as ``fold_fake_quant``'s int8 matmuls import)."""
    matmul = tvm.ir.Op.get("relax.matmul")
    counts = {"integer": 0, "float": 0}

    def visit(e):
        if isinstance(e, relax.Call) and e.op.same_as(matmul):
            dtype = str(getattr(e.ty, "dtype", ""))
            counts["integer" if dtype.startswith(("int", "uint")) else "float"] += 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return counts


def _kernel_calls(mod: tvm.IRModule, attr: str) -> int:
    """The number of ``call_tir`` to PrimFuncs carrying ``attr``."""
    marked = {gv for gv, f in mod.functions_items()
              if isinstance(f, tirx.PrimFunc) and f.attrs is not None and attr in f.attrs}
    call_tir = tvm.ir.Op.get("relax.call_tir")
    n = 0

    def visit(e):
        nonlocal n
        if isinstance(e, relax.Call) and e.op.same_as(call_tir) and e.args[0] in marked:
            n += 1

    if marked:
        for _, func in mod.functions_items():
            if isinstance(func, relax.Function):
                relax.analysis.post_order_visit(func, visit)
    return n


def kernel_counts(before: dict[str, int], mod: tvm.IRModule) -> dict[str, int]:
    """Which kernels the matmuls counted by :func:`count_matmuls` got in ``mod`` (what a
    schedule hook returned): ``int8_vnni`` (VNNI kernels), ``int8_generic`` (integer matmuls
    left as int32 loops: without VNNI, or without a constant int8 weight, e.g. an int8
    attention's q·kᵀ), ``bsr`` (block-sparse kernels), ``dense`` (float matmuls on dense
    kernels, the attention's activation products included)."""
    vnni, bsr = _kernel_calls(mod, VNNI_ATTR), _kernel_calls(mod, BSR_ATTR)
    return {"int8_vnni": vnni, "int8_generic": max(0, before["integer"] - vnni),
            "bsr": bsr, "dense": max(0, before["float"] - bsr)}


def describe_kernels(kernels: dict[str, int]) -> str:
    """``kernel_counts`` in words, e.g. "12 int8 VNNI, 4 dense fp32 matmuls"."""
    words = {"int8_vnni": "int8 VNNI", "int8_generic": "int8 as int32 loops",
             "bsr": "block-sparse (BSR)", "dense": "dense float"}
    parts = [f"{kernels[k]} {w}" for k, w in words.items() if kernels.get(k)]
    return ", ".join(parts) + " matmuls" if parts else "no matmuls"


def warn_slow_int8(kernels: dict[str, int], target: Target) -> str | None:
    """Warn (:class:`SlowInt8Warning`) when integer matmuls run as int32 loops because the
    CPU target has no AVX512-VNNI; returns the message, or None."""
    if not kernels.get("int8_generic") or target.kind.name != "llvm" or has_vnni(target):
        return None
    cpu = target.attrs.get("mcpu") or "this target"
    msg = (f"{kernels['int8_generic']} int8 matmuls compiled as int32 loops: the target "
           f"({cpu}) has no AVX512-VNNI, and slimc's int8 dot-product kernels need it, so this "
           "build is likely slower than the fp32 model's. Compile the model before "
           "quantize/fold_fake_quant for this CPU, or target a CPU with AVX512-VNNI.")
    warnings.warn(msg, SlowInt8Warning, stacklevel=3)
    return msg
