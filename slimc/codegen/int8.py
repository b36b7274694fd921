"""int8 matmuls on the CPU's integer dot-product instructions (x86 AVX512-VNNI ``vpdpbusd``).

``fold_fake_quant`` turns an ONNX model's quantized MatMuls into ``MatMulInteger``, which TVM's
ONNX frontend imports as ``matmul(astype(a, int32) − z_a, astype(W, int32) − z_w)`` in int32:
correct, but int32 multiplies. :func:`use_vnni` rewrites each such matmul whose weight is an
int8 constant into one call of a kernel that multiplies the uint8 activation codes by the int8
weight (packed at build time into 16-column × 4-row tiles) with ``vpdpbusd`` — 64 multiply-adds
per instruction — and adds the zero-point terms separately (all integer, so exact):

    Σ_k (x_k − z)(w_k − z_w) = x·w − z·colsum(w) − z_w·rowsum(x) + K·z·z_w

int8 activation codes become uint8 by adding 128 (z grows by 128). :func:`int8_schedules` is
``use_vnni`` followed by the default CPU schedules, for ``slimc.compile(..., tune=...)``.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx
from tvm.script import tirx as T
from tvm.target import Target

VNNI_INTRIN = "slimc_dot_16x4_vnni"
KERNEL_ATTR = "slimc.vnni"  # on every VNNI kernel PrimFunc: "MxKxN" (see select.kernel_counts)
_OPAQUE = 8  # relax OpPatternKind.kOpaque: FuseOps never merges the kernel (and its schedule)


@T.prim_func(s_tir=True)
def _dot_16x4_desc(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _dot_16x4_vnni(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    # TVM's own "dot_16x4_vnni" passes <16 x i32> where LLVM's intrinsic now takes <64 x i8>
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"),
                                      16), dtype="uint8x64")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"), a, B.vload([0, 0], dtype="int8x64"),
            dtype="int32x16")


try:
    s_tir.TensorIntrin.register(VNNI_INTRIN, _dot_16x4_desc, _dot_16x4_vnni)
except (RuntimeError, ValueError):  # registered already (module reloaded)
    pass


def has_vnni(target: Target) -> bool:
    if target.kind.name != "llvm":
        return False
    try:
        return bool(tvm.target.codegen.llvm_cpu_has_features("avx512vnni", target))
    except (RuntimeError, ValueError):
        return False


def pack_weight(w: np.ndarray) -> np.ndarray:
    """(K, N) int8 → (N/16, K/4, 16, 4): the 16 × 4 tile one ``vpdpbusd`` reads, contiguous."""
    k, n = w.shape
    return np.ascontiguousarray(w.reshape(k // 4, 4, n // 16, 16).transpose(2, 0, 3, 1))


def vnni_kernel(m: int, k: int, n: int, rows: int = 4) -> tirx.PrimFunc:
    """C (m, n) int32 = A (m, k) uint8 · B, B packed by :func:`pack_weight`; scheduled: the
    16-column panels run in parallel, ``rows`` rows share each loaded weight tile, the inner
    16 × 4 product is one ``vpdpbusd``."""
    a = te.placeholder((m, k), "uint8", name="A")
    b = te.placeholder((n // 16, k // 4, 16, 4), "int8", name="B")
    r = te.reduce_axis((0, k), name="k")
    c = te.compute((m, n), lambda i, j: te.sum(
        a[i, r].astype("int32") * b[j // 16, r // 4, j % 16, r % 4].astype("int32"), axis=r),
        name="C")
    sch = s_tir.Schedule(te.create_prim_func([a, b, c]))
    block = sch.get_sblock("C")
    i, j, kk = sch.get_loops(block)
    jo, ji = sch.split(j, [None, 16])
    ko, ki = sch.split(kk, [None, 4])
    step = rows if m % rows == 0 else 1
    io, ii = sch.split(i, [None, step])
    sch.reorder(jo, io, ko, ii, ji, ki)
    sch.parallel(sch.fuse(jo, io))
    sch.decompose_reduction(block, ko)
    sch.tensorize(ji, VNNI_INTRIN)
    func = sch.mod["main"].without_attr("global_symbol")  # private: named by its GlobalVar
    return func.with_attr({"tirx.is_scheduled": True, "op_pattern": _OPAQUE,
                           "tirx.noalias": True, KERNEL_ATTR: f"{m}x{k}x{n}"})


# -- the Relax rewrite -----------------------------------------------------------------------
def _op(name: str):
    return tvm.ir.Op.get(name)


def _call(expr, name: str):
    return isinstance(expr, tvm.ir.expr.Call) and expr.op.same_as(_op(name))


def _is_const(expr) -> bool:
    return isinstance(expr, tvm.ir.expr.Constant)


def _const(expr) -> np.ndarray | None:
    return expr.value.numpy() if _is_const(expr) else None


class _Match:
    """matmul(x − z, w − z_w): x uint8/int8 codes, w an int8 (K, N) constant."""

    def __init__(self, x, zero, w: np.ndarray, w_zero: np.ndarray | None):
        self.x, self.zero, self.w, self.w_zero = x, zero, w, w_zero


def _shape(expr) -> list[int] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    dims = getattr(ty.shape, "values", None)
    if dims is None or not all(isinstance(d, tirx.IntImm) for d in dims):
        return None
    return [int(d.value) for d in dims]


def _dtype(expr) -> str:
    return str(expr.ty.dtype)


@relax.expr_functor.mutator
class _VNNIRewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, var2val: dict):
        super().__init__(mod)
        self.var2val = var2val
        self.kernels: dict[tuple, relax.GlobalVar] = {}
        self.count = 0

    def _value(self, expr):
        while isinstance(expr, tvm.ir.expr.Var) and expr in self.var2val:
            expr = self.var2val[expr]
        return expr

    def _int32_of(self, expr):
        """x if ``expr`` is astype(x, int32) of an 8-bit tensor, or an 8-bit tensor itself
        (``matmul(int8, int8, out_dtype=int32)``, what ``_int_mm`` imports as)."""
        if _dtype(expr) in ("uint8", "int8"):
            return expr
        e = self._value(expr)
        if _call(e, "relax.astype") and str(e.attrs.dtype) == "int32":
            return e.args[0]
        return None

    def _match(self, call) -> _Match | None:
        if not _call(call, "relax.matmul") or str(call.attrs.out_dtype) != "int32":
            return None
        lhs, rhs = self._value(call.args[0]), self._value(call.args[1])
        zero = None
        if _call(lhs, "relax.subtract"):
            x, zero = self._int32_of(lhs.args[0]), lhs.args[1]
            if _shape(zero) not in ([], [1]):
                return None
        else:
            x = self._int32_of(call.args[0])
        if x is None or _dtype(x) not in ("uint8", "int8"):
            return None
        w_zero = None
        if _call(rhs, "relax.subtract"):
            w, wz = self._int32_of(rhs.args[0]), self._value(rhs.args[1])
            if _call(wz, "relax.expand_dims"):
                wz = self._value(wz.args[0])
            wz = self._int32_of(wz) if not _is_const(wz) else wz
            w_zero = _const(self._value(wz)) if wz is not None else None
            if w_zero is None:
                return None
        else:
            w = self._int32_of(call.args[1])
        w = _const(self._value(w)) if w is not None else None
        xs = _shape(x)
        if w is None or w.dtype != np.int8 or w.ndim != 2 or xs is None:
            return None
        k, n = w.shape
        if xs[-1] != k or k % 4 or n % 16:
            return None
        return _Match(x, zero, w, w_zero)

    def visit_call_(self, call):
        call = super().visit_call_(call)
        m = self._match(call)
        if m is None:
            return call
        self.count += 1
        return self._rewrite(m)

    def _rewrite(self, m: _Match):
        bb = self.builder_
        k, n = m.w.shape
        xs = _shape(m.x)
        rows = int(np.prod(xs[:-1]))
        x2 = bb.emit(relax.op.reshape(self.visit_expr(m.x), [rows, k]))
        offset = 0
        if _dtype(m.x) == "int8":  # x + 128 as uint8: x − z = (x + 128) − (z + 128)
            x2 = bb.emit(relax.op.astype(relax.op.add(relax.op.astype(x2, "int16"),
                                                       relax.const(128, "int16")), "uint8"))
            offset = 128
        key = (rows, k, n)
        if key not in self.kernels:
            name = f"vnni_matmul_{rows}x{k}x{n}"
            self.kernels[key] = bb.add_func(vnni_kernel(rows, k, n), name)
        acc = bb.emit(relax.call_tir(self.kernels[key], [x2, relax.const(pack_weight(m.w))],
                                     relax.TensorType([rows, n], "int32")))
        # z' = z + offset, scalar (a constant or computed at run time)
        z = relax.const(offset, "int32")
        if m.zero is not None:
            zero = relax.op.astype(self.visit_expr(m.zero), "int32")
            z = relax.op.add(relax.op.reshape(zero, []), z)
        colsum = m.w.astype(np.int64).sum(axis=0)
        acc = relax.op.subtract(acc, relax.op.multiply(
            relax.const(colsum.astype(np.int32)), z))
        if m.w_zero is not None and np.any(m.w_zero):
            zw = np.broadcast_to(m.w_zero.astype(np.int32).reshape(-1), (n,))
            rowsum = relax.op.sum(relax.op.astype(x2, "int32"), axis=[1], keepdims=True)
            acc = relax.op.subtract(acc, relax.op.multiply(rowsum, relax.const(zw.copy())))
            acc = relax.op.add(acc, relax.op.multiply(relax.const((k * zw).astype(np.int32)),
                                                      z))
        acc = bb.emit(acc)
        return bb.emit(relax.op.reshape(acc, [*xs[:-1], n]))


def _int_mm(node, importer):
    a, b = importer.env[node.args[0]], importer.env[node.args[1]]
    return importer.block_builder.emit(relax.op.matmul(a, b, out_dtype="int32"))


# converters for TVM's PyTorch frontend (``from_exported_program(custom_convert_map=...)``):
# fold_fake_quant writes FX int8 matmuls as aten._int_mm (int8 × int8 → int32)
TORCH_CONVERTERS = {"_int_mm.default": _int_mm}


def use_vnni(mod: tvm.IRModule, target) -> tvm.IRModule:
    """Rewrite int8-weight integer matmuls of ``mod`` (an imported, not yet legalized Relax
    module) into VNNI kernels when ``target`` has AVX512-VNNI; unchanged otherwise."""
    target = target if isinstance(target, Target) else Target(target)
    if not has_vnni(target):
        return mod
    out = mod
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        rw = _VNNIRewriter(out, relax.analysis.get_var2val(func))
        new = rw.visit_expr(func)
        if rw.count:
            out = rw.builder_.get()
            out[gv] = new
    return relax.transform.DeadCodeElimination()(out)


def int8_schedules(mod: tvm.IRModule, target) -> tvm.IRModule:
    """:func:`use_vnni`, then the default CPU schedules for everything else."""
    from .schedules import apply_default_schedules
    return apply_default_schedules(use_vnni(mod, target), target)
