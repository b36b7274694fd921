"""Block-sparse lowering: matmuls with a constant, block-sparse weight → BSR kernels.

Zeros in a dense matrix save nothing: ``threshold_weights(g, sparsity=s, block=(r, c))`` leaves
the shapes as they were and the dense kernel multiplies by every zero. This Relax module pass
finds ``matmul(x, W)`` with ``W`` a constant (ONNX ``MatMul`` with an initializer; torch
``linear``, imported as ``matmul(x, permute_dims(W))``), and an ``add`` of a constant bias after
it, measures the block sparsity of ``W`` and, where it reaches ``threshold``, replaces the matmul
(and the bias add) by a ``call_tir`` to a block-sparse-row (BSR) kernel written here in TIR. The
module then holds only the non-zero blocks, so the library on disk shrinks with the sparsity.
Dense stays where sparse would be slower: the default ``threshold="auto"`` is the block
sparsity from which :func:`crossover` expects the kernel to beat the dense default schedules
for the block shape (measured; about 18 % for 16x1 blocks, 28 % for 4x4, 70 % for 1x8).

Blocks are ``(r, c)`` of the canonical weight matrix ``W`` (rows = output features, columns =
the reduction axis), the convention of ``threshold_weights(block=...)``. Two kernels, both
parallel over block rows, both skipping the zero blocks through ``indptr``/``indices``:

``bsr_matmul`` (the "outputs" kernel), for blocks of a vector of output features or more::

    for each block row i, in parallel:                     (r output features)
        for each tile of mr rows of x:
            acc[mr, r] = bias[i·r : (i+1)·r]               (registers)
            for each non-zero block j of row i:
                for each of its c columns:
                    acc[a, :] += x[row a, indices[j]·c + col] · data[j, col, :]   (vector FMA)
            y[rows, i·r : (i+1)·r] = acc

  A block's r output features are contiguous in ``data`` and in ``y``: with r = 16 or 32 (one
  or two AVX-512 vectors) each x value is broadcast into full-vector FMAs.

``bsr_matmul_rows`` (the "rows" kernel), for narrower blocks (1x8, 4x4, 8x1 …) with a static
row count of at least two vectors: the same loops on xᵀ and yᵀ, each weight broadcast and
multiplied into ``mv`` rows of x at once (``yᵀ = W · xᵀ``), so the vector runs along the rows
of x instead of the block's few output features; the caller transposes x and y, which costs
little next to the product.

TVM 0.27's topi has no ``sparse_dense`` any more, hence the TIR.

Composition with the schedules: the kernels are marked scheduled and opaque, so
:func:`.schedules.apply_default_schedules` (and a tuning database) leave it whole and schedule
the rest; :func:`sparse_hook` runs this pass first and then the hook given as ``then``.

Numerics: each output sums the same products as the dense matmul, minus those with a zero
weight (which are exactly 0), in increasing ``k`` with the bias first instead of last: fp32
results match the dense thresholded build to rounding (the tests hold them to 1e-4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.ir.expr import Constant  # relax.const's class (TVM 0.27 moved it to tvm.ir)
from tvm.script import tirx as T
from tvm.target import Target

from ..errors import OptionError

# build.ScheduleHook, spelled out: build imports the kernel selection, which imports this module
ScheduleHook = Callable[[tvm.IRModule, Target], tvm.IRModule]

# on every BSR PrimFunc: "KxN rxc", plus " rows" for the rows kernel (see sparse_report)
KERNEL_ATTR = "slimc.bsr"
DEFAULT_BLOCK = (16, 1)
# block="auto": the shapes tried on each weight, the one with the lowest expected time kept
AUTO_BLOCKS = ((32, 1), (16, 1), (8, 1), (4, 4), (2, 4), (1, 8))
DEFAULT_THRESHOLD = "auto"   # see :func:`crossover`
# relax OpPatternKind.kOpaque: FuseOps must not fuse a neighbour into the hand-written kernel
_OPAQUE = 8
_FLOAT32 = "float32"


# -- the BSR format ----------------------------------------------------------------------------
@dataclass(frozen=True)
class BSR:
    """A matrix ``W`` (N, K) in block-sparse-row form with (r, c) blocks.

    ``data[j]`` is the j-th non-zero block, stored transposed (c, r) so a block's r output
    features are contiguous; ``indices[j]`` its block column; the blocks of block row ``i`` are
    ``indptr[i]:indptr[i + 1]``. An all-zero matrix keeps one zero block that no row points to
    (TVM buffers cannot be empty).
    """

    data: np.ndarray      # (max(nnz, 1), c, r)
    indices: np.ndarray   # (max(nnz, 1),) int32
    indptr: np.ndarray    # (N / r + 1,) int32
    shape: tuple[int, int]
    block: tuple[int, int]

    @property
    def nnz_blocks(self) -> int:
        return int(self.indptr[-1])

    @property
    def density(self) -> float:
        """The fraction of blocks stored."""
        n, k = self.shape
        r, c = self.block
        return self.nnz_blocks / ((n // r) * (k // c))

    def to_dense(self) -> np.ndarray:
        n, k = self.shape
        r, c = self.block
        out = np.zeros((n // r, r, k // c, c), dtype=self.data.dtype)
        rows = np.repeat(np.arange(n // r), np.diff(self.indptr))
        out[rows, :, self.indices[:self.nnz_blocks], :] = \
            self.data[:self.nnz_blocks].transpose(0, 2, 1)
        return out.reshape(n, k)


def _blocks(w: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """(N, K) → (N/r, K/c, c, r): each block transposed, as the kernel reads it."""
    n, k = w.shape
    r, c = block
    return w.reshape(n // r, r, k // c, c).transpose(0, 2, 3, 1)


def block_sparsity(w: np.ndarray, block: tuple[int, int]) -> float:
    """The fraction of (r, c) blocks of ``w`` (N, K) that are all zero."""
    return _mask_sparsity(w != 0, block)


def _mask_sparsity(nonzero: np.ndarray, block: tuple[int, int]) -> float:
    """:func:`block_sparsity` from ``w != 0`` (computed once for several block shapes)."""
    n, k = nonzero.shape
    r, c = block
    blocks = nonzero.reshape(n // r, r, k // c, c).any(axis=(1, 3))
    return 1.0 - float(blocks.mean()) if blocks.size else 0.0


def to_bsr(w: np.ndarray, block: tuple[int, int]) -> BSR:
    """``w`` (N, K), both divisible by the block, in BSR form (all-zero blocks dropped)."""
    n, k = w.shape
    r, c = block
    if n % r or k % c:
        raise OptionError(f"A {n}x{k} weight does not split into {r}x{c} blocks.",
                          "Choose a block whose sides divide the weight's (out, in) shape.")
    blocks = _blocks(w, block)
    nonzero = np.any(blocks != 0, axis=(2, 3))
    rows, cols = np.nonzero(nonzero)   # row-major: block rows in order, columns ascending
    indptr = np.zeros(n // r + 1, dtype=np.int32)
    np.cumsum(nonzero.sum(axis=1), out=indptr[1:])
    if rows.size:
        data = np.ascontiguousarray(blocks[rows, cols])
        indices = cols.astype(np.int32)
    else:
        data = np.zeros((1, c, r), dtype=w.dtype)
        indices = np.zeros(1, dtype=np.int32)
    return BSR(data, indices, indptr, (n, k), (r, c))


# -- the kernel -------------------------------------------------------------------------------
def _row_tile(r: int, lanes: int) -> int:
    """Rows of x per register tile: mr × ceil(r / lanes) accumulators stay at or under 16 vector
    registers, half the AVX-512 file (measured on Zen 4: r=16 and r=32 fastest at mr=8)."""
    vectors = max(1, -(-r // lanes))
    return max(1, min(8, 16 // vectors))


def bsr_matmul_kernel(m, k: int, n: int, block: tuple[int, int], *,
                      mr: int = 8) -> tirx.PrimFunc:
    """The TIR kernel ``y (m, n) = x (m, k) · Wᵀ + bias`` for any ``W`` (n, k) in :class:`BSR`
    form with ``block`` blocks. ``m`` is an int or a ``tirx.Var`` (int64) for a dynamic row
    count; the number of stored blocks is symbolic, so one kernel serves every weight of a shape.

    Parameters, in order: x (m, k), data (nnz, c, r), indices (nnz,) int32, indptr
    (n / r + 1,) int32, bias (n,), y (m, n). Parallel over block rows; within a block row the
    rows of x go mr at a time, the rows left over one at a time.
    """
    r, c = block
    nb = n // r
    nnz = tirx.Var("nnz", "int64")

    # s_tir: the schedulable TIR of legalized operators (buffers without a tirx layout, whose
    # shape variables TVM's function-copying passes can rename), in a root block holding one
    # opaque block, the shape SplitLayoutRewritePreproc (run by the default schedules) requires
    @T.prim_func(private=True, s_tir=True)
    def bsr_matmul(x: T.Buffer((m, k), _FLOAT32), data: T.Buffer((nnz, c, r), _FLOAT32),
                   indices: T.Buffer((nnz,), "int32"), indptr: T.Buffer((nb + 1,), "int32"),
                   bias: T.Buffer((n,), _FLOAT32), y: T.Buffer((m, n), _FLOAT32)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": _OPAQUE,
                     KERNEL_ATTR: f"{k}x{n} {r}x{c}"})
        with T.sblock("root"):  # noqa: SIM117 (two blocks, not two contexts)
            with T.sblock("bsr_matmul"):
                # declared, not detected: detection would list the per-thread accumulator
                T.reads(x[0:m, 0:k], data[0:nnz, 0:c, 0:r], indices[0:nnz], indptr[0:nb + 1],
                        bias[0:n])
                T.writes(y[0:m, 0:n])
                for i in T.parallel(nb):
                    acc = T.alloc_buffer((mr, r), _FLOAT32, scope="local")
                    for mo in T.serial(m // mr):
                        for a in T.unroll(mr):
                            for v in T.vectorized(r):
                                acc[a, v] = bias[i * r + v]
                        for j in T.serial(indptr[i], indptr[i + 1]):
                            for col in T.unroll(c):
                                kk = indices[j] * c + col
                                for a in T.unroll(mr):
                                    for v in T.vectorized(r):
                                        acc[a, v] += x[mo * mr + a, kk] * data[j, col, v]
                        for a in T.unroll(mr):
                            for v in T.vectorized(r):
                                y[mo * mr + a, i * r + v] = acc[a, v]
                    for t in T.serial(m % mr):
                        row = m // mr * mr + t
                        for v in T.vectorized(r):
                            acc[0, v] = bias[i * r + v]
                        for j in T.serial(indptr[i], indptr[i + 1]):
                            for col in T.unroll(c):
                                kk = indices[j] * c + col
                                for v in T.vectorized(r):
                                    acc[0, v] += x[row, kk] * data[j, col, v]
                        for v in T.vectorized(r):
                            y[row, i * r + v] = acc[0, v]

    return bsr_matmul


def _vector_rows(r: int, m: int, lanes: int) -> int:
    """Rows of x per register tile of the rows kernel (a multiple of ``lanes``, at most m):
    8 vectors when a block has one output feature (every x load feeds one FMA, so longer runs
    amortise the weight broadcast), else 2 vectors × r outputs (measured on Zen 4)."""
    mv = lanes * (8 if r == 1 else 2)
    while mv > lanes and mv > m:
        mv //= 2
    return mv


def uses_rows_kernel(block: tuple[int, int], m, lanes: int) -> bool:
    """Whether a weight with ``block`` blocks times ``m`` rows of x (an int, or None when
    symbolic) goes to :func:`bsr_matmul_rows_kernel`: blocks with fewer output features than a
    vector, when there are at least two vectors of rows (measured on Zen 4: 8x1 blocks run at
    1.1-1.2x dense there against 1.2-1.6x in the outputs kernel; 16x1 the other way round)."""
    return block[0] < lanes and m is not None and m >= 2 * lanes


def bsr_matmul_rows_kernel(m: int, k: int, n: int, block: tuple[int, int], *,
                           mv: int) -> tirx.PrimFunc:
    """The transposed kernel ``yᵀ (n, m) = W · xᵀ (k, m) + bias`` for ``W`` in :class:`BSR`
    form, for blocks narrower than a vector: each weight is broadcast and multiplied into a run
    of ``mv`` rows of x (a vector of xᵀ), so the vector lanes run along the rows of x instead of
    a block's few output features. The caller transposes x and y (cheap next to the product).

    Parameters, in order: xt (k, m), data (nnz, c, r), indices (nnz,) int32, indptr
    (n / r + 1,) int32, bias (n,), yt (n, m). Parallel over block rows; rows of x in runs of
    ``mv``, the rest one at a time.
    """
    r, c = block
    nb = n // r
    nnz = tirx.Var("nnz", "int64")

    @T.prim_func(private=True, s_tir=True)
    def bsr_matmul_rows(xt: T.Buffer((k, m), _FLOAT32), data: T.Buffer((nnz, c, r), _FLOAT32),
                        indices: T.Buffer((nnz,), "int32"),
                        indptr: T.Buffer((nb + 1,), "int32"), bias: T.Buffer((n,), _FLOAT32),
                        yt: T.Buffer((n, m), _FLOAT32)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": _OPAQUE,
                     KERNEL_ATTR: f"{k}x{n} {r}x{c} rows"})
        with T.sblock("root"):  # noqa: SIM117 (two blocks, not two contexts)
            with T.sblock("bsr_matmul_rows"):
                T.reads(xt[0:k, 0:m], data[0:nnz, 0:c, 0:r], indices[0:nnz], indptr[0:nb + 1],
                        bias[0:n])
                T.writes(yt[0:n, 0:m])
                for i in T.parallel(nb):
                    acc = T.alloc_buffer((r, mv), _FLOAT32, scope="local")
                    for mo in T.serial(m // mv):
                        for a in T.unroll(r):
                            for v in T.vectorized(mv):
                                acc[a, v] = bias[i * r + a]
                        for j in T.serial(indptr[i], indptr[i + 1]):
                            for col in T.unroll(c):
                                kk = indices[j] * c + col
                                for a in T.unroll(r):
                                    for v in T.vectorized(mv):
                                        acc[a, v] += data[j, col, a] * xt[kk, mo * mv + v]
                        for a in T.unroll(r):
                            for v in T.vectorized(mv):
                                yt[i * r + a, mo * mv + v] = acc[a, v]
                    for t in T.serial(m % mv):
                        row = m // mv * mv + t
                        for a in T.serial(r):
                            acc[a, 0] = bias[i * r + a]
                        for j in T.serial(indptr[i], indptr[i + 1]):
                            for col, a in T.grid(c, r):
                                acc[a, 0] += data[j, col, a] * xt[indices[j] * c + col, row]
                        for a in T.serial(r):
                            yt[i * r + a, row] = acc[a, 0]

    return bsr_matmul_rows


# -- when sparse pays ------------------------------------------------------------------------
def crossover(block: tuple[int, int], lanes: int, rows: int | None = None) -> float:
    """The block sparsity from which a BSR kernel is expected to beat the dense kernel of the
    default schedules, for ``block`` on a CPU with ``lanes`` fp32 vector lanes and ``rows`` rows
    of x (None: symbolic).

    Model: sparse time / dense time = penalty × (1 − sparsity), lowered when that is at most
    0.9 (a 10 % margin for timing noise and for the per-block overhead, which grows as the rows
    thin out). The penalty is the kernel's slowdown on a fully dense weight, measured on Zen 4
    (16 lanes; 768x768, 768x3072 and 3072x768 weights, 128 rows; sparse at 0 % / dense):

    * outputs kernel (vectors along a block's r output features): r=1 8.7-12.3, r=2 4.3-5.2,
      r=4 2.2-2.7, r=8 1.3-1.6, r=16 1.0-1.2, r=32 0.9-0.95, which
      penalty = max(0.55 · lanes / r + 0.35, 1.1 if r < 2 · lanes else 1.0) follows;
    * rows kernel (vectors along the rows of x, for r < lanes; transposes included): r=1
      2.0-3.2 (each load of x feeds one FMA), r=2 1.2-1.9, r=4 1.1-1.3, r=8 1.1-1.2; the
      3072-deep weight is the slow end (xᵀ no longer fits in L2).

    So 32x1 blocks pay from 10 % zero blocks, 16x1 from 18 %; with ≥ 2 vectors of rows 4x4 and
    8x1 from 28 %, 2x4 from 50 %, 1x8 from 70 % (with few or symbolic rows 8x1 from 38 %, 4x4
    from 65 %, 1x8 from 90 %). The block's c hardly matters.
    """
    return max(0.0, 1.0 - 0.9 / penalty(block, lanes, rows))


def penalty(block: tuple[int, int], lanes: int, rows: int | None = None) -> float:
    """The BSR kernel's time on a fully dense weight over the dense kernel's (see
    :func:`crossover`); the expected time at block sparsity s is penalty × (1 − s) of dense."""
    r = block[0]
    if uses_rows_kernel(block, rows, lanes):
        return 3.0 if r == 1 else 1.8 if r == 2 else 1.25
    return max(0.55 * lanes / r + 0.35, 1.1 if r < 2 * lanes else 1.0)


# -- finding the matmuls ---------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    """What :func:`plan_sparse` decided for one matmul with a constant weight."""

    var: str                    # the Relax variable the result is bound to
    shape: tuple[int, int]      # the weight's canonical (out, in) shape
    block_sparsity: float | None  # None when the weight cannot be lowered at all
    lowered: bool
    bias: bool                  # whether the kernel also adds the bias that followed
    kernel: str | None          # "outputs" or "rows" (see the module docstring) when lowered
    reason: str
    block: tuple[int, int] | None = None  # the block shape judged (chosen, with block="auto")


@dataclass(frozen=True)
class _Plan:
    x: relax.Expr
    bsr: BSR
    bias: np.ndarray | None
    rows_kernel: bool


def _const(expr, var2val) -> np.ndarray | None:
    while isinstance(expr, relax.Var) and expr in var2val:
        expr = var2val[expr]
    return expr.value.numpy() if isinstance(expr, Constant) else None


def _weight(expr, var2val) -> np.ndarray | None:
    """The canonical (N, K) matrix of a matmul's right operand B (K, N) when B is a constant,
    or the transpose of one (how torch's linear arrives)."""
    while isinstance(expr, relax.Var) and expr in var2val:
        expr = var2val[expr]
    if isinstance(expr, Constant):
        b = expr.value.numpy()
        return b.T if b.ndim == 2 else None
    if isinstance(expr, relax.Call) and expr.op.same_as(tvm.ir.Op.get("relax.permute_dims")):
        w = _const(expr.args[0], var2val)
        axes = expr.attrs.axes
        if w is not None and w.ndim == 2 and (axes is None or [int(a) for a in axes] == [1, 0]):
            return w
    return None


def _static_shape(ty) -> list | None:
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    return list(ty.shape.values)


def _users(func: relax.Function) -> dict:
    """{variable: number of places that read it} over the whole function."""
    count: dict = {}

    def read(expr):
        for v in relax.analysis.free_vars(expr):
            count[v] = count.get(v, 0) + 1

    body = func.body
    for blk in body.blocks:
        for b in blk.bindings:
            read(b.value)
    read(body.body)
    return count


def _bias(add: relax.Call, mm_var, n: int, var2val) -> np.ndarray | None:
    """The bias of ``add(mm, b)`` / ``add(b, mm)`` when b is a float32 constant of shape (n,)
    or (1, …, 1, n) and the add does not broadcast the matmul result."""
    a, b = add.args
    other = b if a.same_as(mm_var) else a if b.same_as(mm_var) else None
    if other is None or a.same_as(b):
        return None
    c = _const(other, var2val)
    if c is None or c.dtype != np.float32 or c.ndim < 1 or c.shape[-1] != n \
            or any(d != 1 for d in c.shape[:-1]):
        return None
    if not tvm_ffi.structural_equal(add.ty, mm_var.ty):
        return None
    return c.reshape(n)


def _rows(xs: list) -> int | None:
    """The number of rows of x (its dimensions but the last, multiplied) when static."""
    if not all(isinstance(d, tirx.IntImm) for d in xs[:-1]):
        return None
    return int(np.prod([int(d) for d in xs[:-1]]))


def _find(func: relax.Function, threshold: float | str, block: tuple[int, int] | str,
          lanes: int) -> tuple[dict, set, list[Decision]]:
    """(plans by result variable, matmul variables folded into a bias add, decisions)."""
    var2val = relax.analysis.get_var2val(func)
    users = _users(func)
    matmul, add = tvm.ir.Op.get("relax.matmul"), tvm.ir.Op.get("relax.add")
    adds = {}  # matmul variable → the add binding that reads it
    for var, value in var2val.items():
        if isinstance(value, relax.Call) and value.op.same_as(add):
            for arg in value.args:
                if isinstance(arg, relax.Var):
                    adds.setdefault(arg, []).append((var, value))
    plans, folded, decisions = {}, set(), []
    for var, value in var2val.items():
        if not (isinstance(value, relax.Call) and value.op.same_as(matmul)):
            continue
        w = _weight(value.args[1], var2val)
        if w is None:
            continue  # activation × activation (attention), or a weight we cannot read
        x = value.args[0]
        shape = (int(w.shape[0]), int(w.shape[1]))

        def decide(ok: bool, reason: str, sparsity=None, bias=False, kernel=None, var=var,
                   shape=shape, block=None):
            decisions.append(Decision(var.name, shape, sparsity, ok, bias, kernel, reason,
                                      block))

        xs = _static_shape(x.ty)
        if w.dtype != np.float32 or getattr(x.ty, "dtype", None) != _FLOAT32 \
                or getattr(value.ty, "dtype", None) != _FLOAT32:
            decide(False, "not float32 (the BSR kernel is fp32)")
            continue
        if xs is None or len(xs) < 2 or not isinstance(xs[-1], tirx.IntImm) \
                or int(xs[-1]) != shape[1]:
            decide(False, f"input of unknown rank or shape {xs}")
            continue
        m = _rows(xs)
        choice = _choose_block(w, block, threshold, lanes, m)
        if choice.block is None or choice.sparsity < choice.threshold:
            decide(False, choice.reason, choice.sparsity, block=choice.block)
            continue
        rows_kernel = uses_rows_kernel(choice.block, m, lanes)
        kernel = "rows" if rows_kernel else "outputs"
        bias, at = None, var
        readers = adds.get(var, [])
        if users.get(var, 0) == 1 and len(readers) == 1:
            bias = _bias(readers[0][1], var, shape[0], var2val)
            if bias is not None:
                at = readers[0][0]
                folded.add(var)
        plans[at] = _Plan(x, to_bsr(w, choice.block), bias, rows_kernel)
        decide(True, choice.reason, choice.sparsity, bias is not None, kernel,
               block=choice.block)
    return plans, folded, decisions


@dataclass(frozen=True)
class _Choice:
    block: tuple[int, int] | None   # None: no candidate block divides the weight
    sparsity: float | None
    threshold: float
    reason: str


def _choose_block(w: np.ndarray, block: tuple[int, int] | str, threshold: float | str,
                  lanes: int, rows: int | None) -> _Choice:
    """The block shape for ``w`` (N, K): ``block`` itself, or with ``block="auto"`` the
    candidate of :data:`AUTO_BLOCKS` that reaches its threshold with the lowest expected time,
    :func:`penalty` × (1 − block sparsity); when none reaches it, the one closest to it."""
    n, k = w.shape
    candidates = AUTO_BLOCKS if block == "auto" else (block,)
    fits = [b for b in candidates if n % b[0] == 0 and k % b[1] == 0]
    if not fits:
        r, c = candidates[0] if block != "auto" else (0, 0)
        what = f"{r}x{c} blocks" if block != "auto" else "any block shape tried"
        return _Choice(None, None, 0.0, f"({n}, {k}) does not split into {what}")
    nonzero = w != 0
    zero = 1.0 - float(nonzero.mean())  # no block shape has more zero blocks than zeros
    best = None
    for b in fits:
        t = crossover(b, lanes, rows) if threshold == "auto" else threshold
        s = _mask_sparsity(nonzero, b) if zero >= t or len(fits) == 1 else 0.0
        ok = s >= t
        # eligible first, then the lower expected time; among the rest the smallest shortfall
        key = (not ok, penalty(b, lanes, rows) * (1.0 - s) if ok else t - s)
        if best is None or key < best[0]:
            best = (key, b, s, t)
    _, b, s, t = best
    if s == 0.0 and zero > 0.0:  # skipped above: measure the shape reported
        s = _mask_sparsity(nonzero, b)
    kernel = "rows" if uses_rows_kernel(b, rows, lanes) else "outputs"
    how = f" (auto: {b[0]}x{b[1]} blocks, {lanes} lanes, {kernel} kernel)" \
        if threshold == "auto" else f" ({b[0]}x{b[1]} blocks)" if block == "auto" else ""
    sign = ">=" if s >= t else "<"
    return _Choice(b, s, t, f"block sparsity {s:.3f} {sign} threshold {t:.2f}{how}")


# -- the rewrite ------------------------------------------------------------------------------
@relax.expr_functor.mutator
class _Lower(relax.PyExprMutator):
    """Replaces the planned bindings by BSR kernel calls; drops the matmuls a bias add took."""

    def __init__(self, mod: tvm.IRModule, lanes: int) -> None:
        super().__init__(mod)
        self.mod_ = mod
        self.lanes = lanes
        self.plans: dict = {}
        self.folded: set = set()
        self.kernels: dict = {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.folded:
            return  # its only reader, the bias add, becomes the kernel call
        plan = self.plans.get(binding.var)
        if plan is None:
            super().visit_var_binding_(binding)
            return
        value = self.builder_.normalize(self._kernel_call(plan, binding.var.ty))
        self.builder_.emit_normalized(relax.VarBinding(binding.var, value))

    def _kernel(self, m, k: int, n: int, bsr: BSR, rows_kernel: bool) -> tvm.ir.GlobalVar:
        """The kernel for this weight shape (shared by every weight of it)."""
        r = bsr.block[0]
        static = isinstance(m, tirx.IntImm)
        key = (int(m) if static else None, k, n, bsr.block, rows_kernel)
        if static and key in self.kernels:
            return self.kernels[key]
        if rows_kernel:  # only with static rows (uses_rows_kernel)
            mv = _vector_rows(r, int(m), self.lanes)
            func, name = bsr_matmul_rows_kernel(int(m), k, n, bsr.block, mv=mv), "bsr_matmul_rows"
        else:
            rows = int(m) if static else tirx.Var("m", "int64")
            mr = _row_tile(r, self.lanes)
            func, name = bsr_matmul_kernel(rows, k, n, bsr.block, mr=mr), "bsr_matmul"
        self.kernels[key] = self.builder_.add_func(func, name)
        return self.kernels[key]

    def _kernel_call(self, plan: _Plan, out_ty) -> relax.Expr:
        x = self.visit_expr(plan.x)
        n, k = plan.bsr.shape
        lead = _static_shape(x.ty)[:-1]
        if all(isinstance(d, tirx.IntImm) for d in lead):
            m = tirx.IntImm("int64", int(np.prod([int(d) for d in lead])))
        else:
            m = lead[0]
            for d in lead[1:]:
                m = m * d
        if len(lead) != 1:
            x = self.builder_.emit(relax.op.reshape(x, [m, k]))
        bias = plan.bias if plan.bias is not None else np.zeros(n, dtype=np.float32)
        consts = [relax.const(plan.bsr.data), relax.const(plan.bsr.indices),
                  relax.const(plan.bsr.indptr), relax.const(bias)]
        gv = self._kernel(m, k, n, plan.bsr, plan.rows_kernel)
        if plan.rows_kernel:  # yᵀ = W · xᵀ: transpose in, transpose out
            xt = self.builder_.emit(relax.op.permute_dims(x, [1, 0]))
            yt = self.builder_.emit(relax.call_tir(gv, [xt, *consts],
                                                   relax.TensorType([n, m], _FLOAT32)))
            y = relax.op.permute_dims(yt, [1, 0])
        else:
            y = relax.call_tir(gv, [x, *consts], relax.TensorType([m, n], _FLOAT32))
        if len(lead) == 1:
            return y
        y = self.builder_.emit(y)
        return relax.op.reshape(y, _static_shape(out_ty))

    def run(self, threshold: float | str, block: tuple[int, int] | str) -> tuple[tvm.IRModule, list]:
        decisions = []
        for gv, func in self.mod_.functions_items():
            if not isinstance(func, relax.Function):
                continue
            plans, folded, found = _find(func, threshold, block, self.lanes)
            decisions += found
            if not plans:
                continue
            self.plans, self.folded = plans, folded
            self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get(), decisions


def _check(threshold, block) -> tuple[float | str, tuple[int, int]]:
    if threshold != "auto" and (isinstance(threshold, bool)
                                or not isinstance(threshold, (int, float))
                                or not 0 <= threshold <= 1):
        raise OptionError(f"threshold={threshold!r} is neither 'auto' nor a fraction in [0, 1].",
                          "It is the block sparsity from which a weight is lowered to the BSR "
                          "kernel: 'auto' (the default) estimates where sparse beats dense for "
                          "the block shape; a number such as 0.5 sets it.")
    if block == "auto":
        return (threshold if threshold == "auto" else float(threshold)), block
    ok = (isinstance(block, Sequence) and not isinstance(block, str) and len(block) == 2
          and all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b >= 1
                  for b in block))
    if not ok:
        raise OptionError(f"block={block!r} is not a block shape.",
                          "Pass two positive integers (rows along the output features, columns "
                          f"along the reduction axis), e.g. block={DEFAULT_BLOCK}, the shape "
                          "threshold_weights(block=...) zeroed, or 'auto' (the candidate "
                          "shape with the lowest expected time, per weight).")
    threshold = threshold if threshold == "auto" else float(threshold)
    return threshold, (int(block[0]), int(block[1]))


def _lanes(target: Target | None) -> int:
    if target is None:
        return 16
    from .schedules import cpu_config
    return cpu_config(target).lanes


def plan_sparse(mod: tvm.IRModule, target: Target | None = None, *,
                threshold: float | str = DEFAULT_THRESHOLD,
                block: tuple[int, int] | str = DEFAULT_BLOCK) -> list[Decision]:
    """What :func:`lower_sparse` would do with every matmul of ``mod`` that has a constant
    weight, and why (the module is not changed)."""
    threshold, block = _check(threshold, block)
    out = []
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            out += _find(func, threshold, block, _lanes(target))[2]
    return out


def lower_sparse(mod: tvm.IRModule, target: Target | None = None, *,
                 threshold: float | str = DEFAULT_THRESHOLD,
                 block: tuple[int, int] | str = DEFAULT_BLOCK) -> tvm.IRModule:
    """Lower every ``matmul(x, W)`` of an imported Relax module whose constant weight ``W`` has
    at least ``threshold`` of its ``block`` blocks all zero to the BSR kernel (with the bias add
    that follows it, when there is one).

    Math: y = x · Wᵀ + b computed as Σ over the non-zero blocks only.
    Pre: ``mod`` as imported (before legalization); weights bound as constants. Only float32
    matmuls whose weight splits into ``block`` blocks are candidates (:func:`plan_sparse` says
    why each was or was not lowered). ``threshold="auto"``: :func:`crossover` for the block,
    the rows of x and the target's vector width (16 lanes without a target).
    ``block="auto"``: per weight, the shape of :data:`AUTO_BLOCKS` that reaches its threshold
    with the lowest expected time (:func:`penalty` × the fraction of blocks kept). A non-CPU
    ``target`` leaves ``mod`` unchanged.
    Post: the lowered weights are gone from the module; in their place their non-zero blocks
    (data, indices, indptr) and the bias are arguments of ``call_tir`` to ``bsr_matmul`` (or,
    between transposes, ``bsr_matmul_rows``) PrimFuncs, one per weight and block shape, marked
    scheduled. Below the threshold the module is returned unchanged.
    Numerics: the same sums as the dense matmul without the zero products (fp32 rounding).
    """
    threshold, block = _check(threshold, block)
    if target is not None and target.kind.name != "llvm":
        return mod
    new, decisions = _Lower(mod, _lanes(target)).run(threshold, block)
    if not any(d.lowered for d in decisions):
        return mod
    # the dense weights (and torch's permute_dims of them) are now unread
    return relax.transform.DeadCodeElimination()(new)


def sparse_report(mod: tvm.IRModule) -> dict[str, int]:
    """``{BSR kernel name: number of call_tir to it}`` over the module's Relax functions."""
    kernels = {gv: 0 for gv, f in mod.functions_items()
               if isinstance(f, tirx.PrimFunc) and f.attrs is not None and KERNEL_ATTR in f.attrs}
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(e):
        if isinstance(e, relax.Call) and e.op.same_as(call_tir) and e.args[0] in kernels:
            kernels[e.args[0]] += 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return {gv.name_hint: n for gv, n in kernels.items()}


def sparse_hook(threshold: float | str = DEFAULT_THRESHOLD,
                block: tuple[int, int] | str = DEFAULT_BLOCK, *,
                then: ScheduleHook | str | None = "default") -> ScheduleHook:
    """A schedule hook for ``slimc.compile(g, tune=sparse_hook(...))``: :func:`lower_sparse`,
    then ``then`` on the result, which schedules the dense rest and leaves the BSR kernels as
    they are. ``then="default"``: :func:`.schedules.apply_default_schedules`; a callable
    ``(mod, target) -> mod`` such as a tuning database's hook; ``None``: nothing (TVM's stock
    pipeline for the rest, for comparison only)."""
    threshold, block = _check(threshold, block)
    if then == "default":
        from .schedules import apply_default_schedules
        then = apply_default_schedules
    elif then is not None and not callable(then):
        raise OptionError(f"then={then!r} is not a schedule hook.",
                          "Pass 'default', None or a callable (mod, target) -> mod.")

    def sparse(mod: tvm.IRModule, target: Target) -> tvm.IRModule:
        mod = lower_sparse(mod, target, threshold=threshold, block=block)
        return then(mod, target) if then is not None else mod

    name = f"sparse_hook(threshold={threshold!r}, block={block})"
    if then is not None:
        name += " + " + (getattr(then, "__qualname__", None) or repr(then))
    sparse.__qualname__ = name
    return sparse
