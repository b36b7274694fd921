"""Default CPU schedules: fast kernels for an untuned build.

TVM's CPU pipeline legalizes every operator into a naive loop nest and leaves it to LLVM: a
matmul becomes three scalar loops with the weight read down its columns, on one thread. This
module schedules the PrimFuncs of a legalized, fused Relax module the way DLight does for GPUs,
with rules tried in order on each function:

``matmul``     any function whose one reduction block is a GEMM (``C[s, i, j] += A * B`` in any
               index order, with injective prologue/epilogue blocks): a register tile of
               ``mr`` rows × ``nr`` columns accumulated in a local buffer (vector registers), the
               reduction split into ``kc`` blocks, the epilogue (bias, GELU, residual) computed
               from the registers, and the (batch, column-tile, row-tile) loops run in parallel
               when the whole output (all batches) has ``min_parallel`` elements.
               A weight bound as a constant is packed into column panels ``[N/nr, K, nr]`` at
               build time, so the kernel streams it contiguously; an activation whose columns
               are not contiguous is packed on each call.
``reduction``  softmax / layer norm / RMS norm: DLight's CPU rule (rows in parallel, element-wise
               parts vectorized) with each row's sums and maxima vectorized too: split into
               ``lanes`` partial results (one vector register) combined after the row (rfactor).
               Rows that are not a multiple of the vector keep DLight's scalar reductions.
``injective``  element-wise, broadcast, reshape and transpose chains: inlined into one loop nest,
               vectorized and run in parallel.
``fallback``   anything else: producers inlined, the leading spatial loops fused, in parallel.

Parallel loops run on TVM's thread pool, which ``slimc.compile`` and ``slimc.runtime.load`` size
to the physical cores (:func:`slimc.runtime.use_physical_cores`; TVM alone would use half the
logical CPUs on x86, one thread on a 2-core VM without SMT).

Each rule is a search-free schedule built from the target's vector width; a rule that cannot
apply (or whose schedule primitive refuses) leaves the function to the next rule, and a function
no rule takes is left as TVM legalized it (correct, only slow). Every scheduled function records
the rule in its ``slimc.schedule_rule`` attribute (see :func:`schedule_report`).

Numerics: matmul schedules reorder loops but keep each output's reduction order over ``k`` except
for the ``kc`` blocking, which still sums in increasing ``k``. Row reductions sum ``lanes``
interleaved partial sums, then those: a different order from the sequential sum, within fp32
rounding of it (pairwise-like, so no worse). fp32 results match the unscheduled build to rounding
(the tests compare with torch at 1e-4). Fast math is separate (:mod:`.fast_math`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block, normalize_prim_func
from tvm.s_tir.dlight.cpu import Reduction as _DLightReduction
from tvm.s_tir.dlight.gpu.matmul import detect_iter_traits
from tvm.target import Target
from tvm.target.codegen import llvm_cpu_has_features
from tvm.tirx.analysis import undefined_vars

from .._quiet import tvm_native_noise

RULE_ATTR = "slimc.schedule_rule"
# relax OpPatternKind.kOpaque: the build's default pipeline runs FuseOps/FuseTIR again; an opaque
# kernel is never fused into a neighbour, which would discard its schedule
_OPAQUE = 8
_PREPROC = "meta_schedule.layout_rewrite_preproc"
# what a schedule primitive raises when it refuses (ScheduleError and TVM's errors are
# RuntimeErrors; DLight rules assert)
_REFUSED = (RuntimeError, ValueError, TypeError, AssertionError, IndexError)


@dataclass(frozen=True)
class CPUConfig:
    """Tile sizes for one CPU; :func:`cpu_config` derives them from the target's ISA."""

    lanes: int          # fp32 lanes in one vector register
    mr: int             # rows of the register tile (broadcast loads of A)
    nr: int             # columns of the register tile (a multiple of ``lanes``)
    kc: int             # reduction block: a kc × nr panel of B stays in L1/L2
    min_parallel: int   # loop nests with fewer elements run on one thread (launch costs ~µs)
    pack_weights: bool = True   # pack constant B operands into column panels at build time


def cpu_config(target: Target) -> CPUConfig:
    """Register-tile sizes for ``target``: ``mr × nr`` accumulators fill about half the vector
    registers, leaving room for the B loads and the A broadcasts.

    AVX-512 (measured on Zen 4 with bench/matmul.py, 2 cores): 8 × 32 runs the BERT-base GEMMs
    at 195-225 GFLOP/s, 85-97 % of the FMA peak; 4 × 64, 16 × 16 and 8 × 64 (and ``kc`` of 256 or
    all of K: the tile's whole reduction runs before the next tile) measured within noise."""
    def has(feature: str) -> bool:
        try:
            return bool(llvm_cpu_has_features(feature, target))
        except (RuntimeError, ValueError):  # a triple LLVM lacks: assume the baseline ISA
            return False

    if has("avx512f"):   # 32 zmm registers of 16 fp32
        return CPUConfig(lanes=16, mr=8, nr=32, kc=256, min_parallel=1 << 14)
    if has("avx2") or has("avx"):   # 16 ymm registers of 8 fp32 (BLIS' Haswell kernel is 6x16)
        return CPUConfig(lanes=8, mr=6, nr=16, kc=256, min_parallel=1 << 14)
    # SSE2 / NEON: 16 or 32 registers of 4 fp32
    return CPUConfig(lanes=4, mr=4, nr=16, kc=256, min_parallel=1 << 14)


# -- helpers ---------------------------------------------------------------------------------
def _int(expr) -> int | None:
    return int(expr.value) if isinstance(expr, tirx.IntImm) else None


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    return _int(sch.get(loop).extent)


def _is_reduction(sch: s_tir.Schedule, block) -> bool:
    return any(iv.iter_type != tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def _try(fn: Callable, *args) -> bool:
    try:
        fn(*args)
        return True
    except _REFUSED:
        return False


def _inline_all(sch: s_tir.Schedule, blocks: list) -> list:
    """Inline every block that can be (into consumers, else into its producer); returns the
    blocks left, in program order."""
    left = list(blocks)
    progress = True
    while progress:
        progress = False
        for blk in list(left):
            if _try(sch.compute_inline, blk) or _try(sch.reverse_compute_inline, blk):
                left.remove(blk)
                progress = True
                break
    return left


def _vector_width(total: int | None, lanes: int) -> int:
    """The widest vector (≤ lanes) that divides ``total``: a split that leaves a remainder puts
    a bounds predicate inside the vector loop, which the vectorizer cannot lower."""
    if total is None:
        return 1
    width = lanes
    while width > 1 and total % width:
        width //= 2
    return width


def _parallel_vectorize(sch: s_tir.Schedule, block, cfg: CPUConfig) -> None:
    """Vectorize a block's innermost loop and run the loops outside it in parallel.

    Only the innermost loop is split: fusing the whole nest first would turn reshape/transpose
    indices into div/mod of the fused index, which the simplifier cannot undo and the vectorizer
    turns into per-lane gathers. Innermost loops shorter than a vector are fused outward first.
    """
    loops = sch.get_loops(block)
    if not loops:
        return
    while len(loops) > 1 and (_extent(sch, loops[-1]) or cfg.lanes) < cfg.lanes:
        loops = [*loops[:-2], sch.fuse(loops[-2], loops[-1])]
    inner = loops[-1]
    extent = _extent(sch, inner)
    width = _vector_width(extent, cfg.lanes)
    outer_loops = list(loops[:-1])
    if width > 1 and extent > width:
        rest, vec = sch.split(inner, [None, width])
        sch.vectorize(vec)
        outer_loops.append(rest)
    elif width > 1:
        sch.vectorize(inner)
    else:
        outer_loops.append(inner)
    if not outer_loops:
        return
    total = 1
    for lp in loops:
        e = _extent(sch, lp) if _try(sch.get, lp) else None
        total = None if e is None or total is None else total * e
    if total is not None and total < cfg.min_parallel:
        return
    outer = sch.fuse(*outer_loops) if len(outer_loops) > 1 else outer_loops[0]
    sch.parallel(outer)


def _pick(n: int | None, preferred: int, step: int, lowest: int) -> int:
    """The largest multiple of ``step`` in [lowest, preferred] dividing ``n``, else ``preferred``
    (capped at ``n``); a tile that divides the extent needs no bounds predicate."""
    if n is None:
        return preferred
    if n <= preferred:
        return n
    for t in range(preferred, lowest - 1, -step):
        if t > 0 and n % t == 0:
            return t
    return preferred


# -- matmul ----------------------------------------------------------------------------------
@dataclass
class _Gemm:
    """The loops of a GEMM block, by role in C[s, i, j] += A[s, i, k] · B[s, k, j]."""

    unit: list       # extent-1 loops
    batch: list      # in A, B and C
    rows: list       # in A and C
    cols: list       # in B and C; C's innermost index, so these are vectorized
    red: list        # the reduction
    b_read: int      # which of the block's two reads is B (holds the columns)
    col_var: object  # the block iterator of the column axis when there is one, else None


def _access_vars(region) -> set:
    out: set = set()
    for r in region:
        out.update(undefined_vars(r.min))
    return out


def _analyze_gemm(sch: s_tir.Schedule, block) -> _Gemm | None:
    stmt = sch.get(block)
    if len(stmt.reads) != 2 or len(stmt.writes) != 1 or detect_iter_traits(stmt) is None:
        return None
    loops = sch.get_loops(block)
    if len(loops) != len(stmt.iter_vars):
        return None
    last = list(undefined_vars(stmt.writes[0].region[-1].min))
    if len(last) != 1:
        return None
    a_vars = _access_vars(stmt.reads[0].region)
    b_vars = _access_vars(stmt.reads[1].region)
    c_vars = _access_vars(stmt.writes[0].region)
    col = last[0]
    if col in b_vars and col not in a_vars:
        b_read, col_side, row_side = 1, b_vars, a_vars
    elif col in a_vars and col not in b_vars:
        b_read, col_side, row_side = 0, a_vars, b_vars
    else:
        return None
    g = _Gemm([], [], [], [], [], b_read, None)
    for loop, iv in zip(loops, stmt.iter_vars):
        v = iv.var
        if _int(iv.dom.extent) == 1:
            g.unit.append(loop)
        elif iv.iter_type == tirx.IterVar.CommReduce:
            g.red.append(loop)
        elif v in col_side and v in row_side:
            g.batch.append(loop)
        elif v in col_side and v in c_vars:
            g.cols.append(loop)
            g.col_var = v
        elif v in row_side and v in c_vars:
            g.rows.append(loop)
        else:
            return None
    if not (g.rows and g.cols and g.red):
        return None
    if len(g.cols) > 1:
        g.col_var = None
    return g


def _is_copy(sch: s_tir.Schedule, block) -> bool:
    """A block that only moves data (reshape, transpose, broadcast, cast): cheap to recompute
    inside the matmul, unlike GELU or a dequantization, which inlining would repeat N times."""
    body = sch.get(block).body
    value = getattr(body, "value", None)
    while isinstance(value, tirx.Cast):
        value = value.value
    return isinstance(value, tirx.BufferLoad)


def _pack_map(stmt, b_read: int, col_var, red_vars: set, panel: int):
    """Index map B[...] → B_packed[batch..., col // panel, red..., col % panel], or None when B's
    indices are not plain iterators."""
    dims = []
    for r in stmt.reads[b_read].region:
        if isinstance(r.min, tirx.IntImm):
            dims.append("unit")
        elif isinstance(r.min, tirx.Var):
            v = r.min
            dims.append("col" if v.same_as(col_var) else "red" if v in red_vars else "batch")
        else:
            return None
    if dims.count("col") != 1:
        return None

    def index_map(*idx):
        pick = lambda kind: [i for i, d in zip(idx, dims) if d == kind]
        (c,) = pick("col")
        return [*pick("unit"), *pick("batch"), c // panel, *pick("red"), c % panel]

    return index_map


def _schedule_matmul(sch: s_tir.Schedule, func: tirx.PrimFunc, cfg: CPUConfig) -> bool:
    root = get_root_block(sch)
    blocks = sch.get_child_blocks(root)
    reductions = [b for b in blocks if _is_reduction(sch, b)]
    if len(reductions) != 1:
        return False
    mm = reductions[0]
    names = [sch.get(b).name_hint for b in blocks]
    position = names.index(sch.get(mm).name_hint)
    prologue, epilogue = blocks[:position], blocks[position + 1:]
    for blk in prologue:
        if _is_copy(sch, blk):
            _try(sch.compute_inline, blk)
    gemm = _analyze_gemm(sch, mm)
    if gemm is None:
        return False
    stmt = sch.get(mm)
    col_iter = gemm.col_var
    red_vars = {iv.var for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce}
    # one epilogue block reading the matmul result is computed from the register tile below
    epilogue = _inline_all(sch, epilogue)
    # only the innermost row and column loops are tiled: a tile of a fused (b, s) row axis is
    # not a rectangle of C, and the register tile's write-back would cover rows it has not
    # computed
    rows, cols = gemm.rows[-1], gemm.cols[-1]
    red = sch.fuse(*gemm.red) if len(gemm.red) > 1 else gemm.red[0]
    m, n, k = _extent(sch, rows), _extent(sch, cols), _extent(sch, red)
    mr = _pick(m, cfg.mr, 1, max(1, cfg.mr // 2))
    vec = n is not None and n % cfg.lanes == 0
    nr = _pick(n, cfg.nr, cfg.lanes, cfg.lanes) if vec else min(n or cfg.lanes, cfg.lanes)
    vec = vec or (n is not None and n <= cfg.lanes)
    kc = k if k is not None and k <= 2 * cfg.kc else _pick(k, cfg.kc, 1, cfg.kc // 4)

    # B: a weight is packed into column panels once, at build time; an activation only when
    # its columns are not contiguous (then per call)
    b_buf = stmt.reads[gemm.b_read].source
    free = {int(i) for i in (func.attrs.get("layout_free_buffers") or [])} \
        if func.attrs is not None else set()
    is_weight = any(b_buf.same_as(func.params[i]) for i in free if i < len(func.params))
    b_last = stmt.reads[gemm.b_read].region[-1].min
    contiguous = col_iter is not None and isinstance(b_last, tirx.Var) and b_last.same_as(col_iter)
    packed = None
    if col_iter is not None and n is not None and n % nr == 0 and (
            (is_weight and cfg.pack_weights) or not contiguous):
        index_map = _pack_map(stmt, gemm.b_read, col_iter, red_vars, nr)
        if index_map is not None:
            packed = sch.cache_read(mm, gemm.b_read, "global")
            sch.transform_layout(packed, ("write", 0), index_map)
            if is_weight:
                sch.annotate(packed, _PREPROC, 1)

    # register tile: (batch, column tile, row tile) in parallel; k blocks; mr × nr accumulators
    io, ii = sch.split(rows, [None, mr])
    jo, ji = sch.split(cols, [None, nr])
    ko, ki = sch.split(red, [None, kc])
    outer_loops = [*gemm.unit, *gemm.batch, *gemm.rows[:-1], *gemm.cols[:-1], jo, io]
    sch.reorder(*outer_loops, ko, ki, ii, ji)
    acc = sch.cache_write(mm, 0, "local")
    sch.reverse_compute_at(acc, io, preserve_unit_loops=True)
    leftover = []
    for blk in epilogue:
        if not _try(sch.reverse_compute_inline, blk):
            leftover.append(blk)
    # the batch counts: 12 heads of a 128 × 64 attention product are 98k outputs, not 8k
    work = None if m is None or n is None else m * n
    for lp in [*gemm.batch, *gemm.rows[:-1], *gemm.cols[:-1]]:
        e = _extent(sch, lp)
        work = None if work is None or e is None else work * e
    outer = sch.fuse(*outer_loops)
    if work is None or work >= cfg.min_parallel:
        sch.parallel(outer)
    sch.unroll(ii)
    # vectorize before splitting off the init: the update block alone is not a complete block
    if vec:
        sch.vectorize(ji)
        sch.vectorize(sch.get_loops(acc)[-1])
    else:
        sch.unroll(ji)
    sch.decompose_reduction(mm, ko)
    for blk in leftover:
        _parallel_vectorize(sch, blk, cfg)
    if packed is not None and not is_weight:
        _parallel_vectorize(sch, packed, cfg)
    for blk in prologue:  # those not inlined (their rvs are gone when they were)
        if _try(sch.get, blk):
            _parallel_vectorize(sch, blk, cfg)
    return True


# -- other rules -----------------------------------------------------------------------------
def _schedule_injective(sch: s_tir.Schedule, func: tirx.PrimFunc, cfg: CPUConfig) -> bool:
    blocks = sch.get_child_blocks(get_root_block(sch))
    if not blocks or any(_is_reduction(sch, b) for b in blocks):
        return False
    for blk in _inline_all(sch, blocks):
        _parallel_vectorize(sch, blk, cfg)
    return True


def _vectorize_inner(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Vectorize a block's innermost loop (split to the widest vector dividing it)."""
    loops = sch.get_loops(block)
    if len(loops) <= 1:
        return
    extent = _extent(sch, loops[-1])
    width = _vector_width(extent, lanes)
    if width <= 1:
        return
    if extent > width:
        _, vec = sch.split(loops[-1], [None, width])
        sch.vectorize(vec)
    else:
        sch.vectorize(loops[-1])


def _rfactor_rows(sch: s_tir.Schedule, infos: list, lanes: int) -> set[str]:
    """Split each row reduction ``r = ⊕ x[k]`` into ``lanes`` partial results
    ``r_j = ⊕ x[k·lanes + j]`` (rfactor), combined after the loop: the partials form one vector
    register, so the loop is a vector add/max instead of a chain of scalar ones. Returns the
    names of the partial-result blocks. Rows shorter than two vectors are left alone."""
    partial = set()
    for info in infos:
        if info.is_injective():
            continue
        block = info.block_rv
        stmt = sch.get(block)
        reduce_ivs = [iv for iv in stmt.iter_vars if iv.iter_type != tirx.IterVar.DataPar]
        loops = sch.get_loops(block)
        extent = _extent(sch, loops[-1])
        if (len(reduce_ivs) != 1 or stmt.iter_vars[-1].iter_type == tirx.IterVar.DataPar
                or extent is None or extent % lanes or extent < 2 * lanes):
            continue
        _, lane = sch.split(loops[-1], [None, lanes])
        # the partials innermost in their buffer, so that lane j of the vector is partial j
        rf = sch.rfactor(lane, factor_axis=len(stmt.writes[0].region))
        partial.add(sch.get(rf).name_hint)
    return partial


def _schedule_reduction(sch: s_tir.Schedule, func: tirx.PrimFunc, cfg: CPUConfig) -> bool:
    """Softmax / layer norm / RMS norm: DLight's CPU rule (the leading spatial axes fused and
    run in parallel, every block computed at that loop, injective blocks vectorized) with the
    reductions vectorized by :func:`_rfactor_rows` (DLight leaves them scalar: rfactor needs
    the block alone under its loops, so it runs here before ``compute_at``)."""
    infos = normalize_prim_func(sch)
    if infos is None or len(infos) < 2 or not infos[-1].is_injective() \
            or all(info.is_injective() for info in infos):
        return False
    kinds = [info.dom_kind() for info in infos]
    if any(not k or k[0] != "S" for k in kinds):
        return False
    leading = min(len(k) - len(k.lstrip("S")) for k in kinds)
    partial = _rfactor_rows(sch, infos, cfg.lanes)
    blocks = sch.get_child_blocks(get_root_block(sch))
    loops = sch.get_loops(blocks[-1])
    rows = sch.fuse(*loops[:leading]) if leading > 1 else loops[0]
    sch.parallel(rows)
    _vectorize_inner(sch, blocks[-1], cfg.lanes)
    for block in reversed(blocks[:-1]):
        sch.compute_at(block, rows, preserve_unit_loops=True)
    for block in blocks[:-1]:
        if sch.get(block).name_hint in partial:
            # compute_at made one loop per block iterator, in their order, and rfactor put the
            # lane iterator first: the reduction loop goes outside it, the lanes are the vector
            ivs = list(sch.get(block).iter_vars)
            own = sch.get_loops(block)[-len(ivs):]
            (red,) = [i for i, iv in enumerate(ivs) if iv.iter_type != tirx.IterVar.DataPar]
            sch.reorder(own[red], own[0])
            own = sch.get_loops(block)[-len(ivs):]
            # vectorize before splitting off the init: the update alone is not a complete block
            sch.vectorize(own[-1])
            sch.decompose_reduction(block, own[0])
        elif _is_reduction(sch, block):   # the partials' combination, or a short row
            loops = sch.get_loops(block)
            extent = _extent(sch, loops[-1])
            if extent is None or extent > cfg.lanes:
                _, inner = sch.split(loops[-1], [None, cfg.lanes])
                sch.annotate(inner, "pragma_auto_unroll_max_step", cfg.lanes)
                sch.annotate(inner, "pragma_unroll_explicit", 1)
        else:
            _vectorize_inner(sch, block, cfg.lanes)
    return True


def _schedule_dlight_reduction(func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
    return _DLightReduction().apply(func, target, False)


def _schedule_fallback(sch: s_tir.Schedule, func: tirx.PrimFunc, cfg: CPUConfig) -> bool:
    """Inline the element-wise blocks, run the outer spatial loops of what is left in parallel
    (fused: a leading unit batch loop would leave nothing to split)."""
    blocks = sch.get_child_blocks(get_root_block(sch))
    for blk in blocks:
        if not _is_reduction(sch, blk):
            _try(sch.compute_inline, blk) or _try(sch.reverse_compute_inline, blk)
    done = False
    for blk in sch.get_child_blocks(get_root_block(sch)):
        loops = sch.get_loops(blk)
        iters = sch.get(blk).iter_vars
        if not loops or len(loops) != len(iters):
            continue
        lead = 0
        while lead < len(iters) and iters[lead].iter_type == tirx.IterVar.DataPar:
            lead += 1
        if lead == 0:
            continue
        outer = loops[0] if lead == 1 else sch.fuse(*loops[:lead])
        if (_extent(sch, outer) or 0) > 1 and _try(sch.parallel, outer):
            done = True
    return done


# -- driver ----------------------------------------------------------------------------------
RULES = ("matmul", "reduction", "injective", "fallback")


def _try_rule(rule: Callable, sch: s_tir.Schedule, func: tirx.PrimFunc, cfg: CPUConfig) -> bool:
    try:
        return rule(sch, func, cfg)
    except _REFUSED:
        return False


def default_schedule(mod: tvm.IRModule, target: Target, cfg: CPUConfig | None = None
                     ) -> tuple[s_tir.Schedule | None, str | None]:
    """The schedule of ``mod["main"]`` (a PrimFunc) by the first rule in :data:`RULES` that
    applies, with its trace (tuning seeds its search with it), and the rule's name; (None, None)
    when no rule applies."""
    cfg = cfg or cpu_config(target)
    func = mod["main"]
    for name in RULES:
        sch = s_tir.Schedule(mod)
        try:
            if name == "reduction":
                ok = _try_rule(_schedule_reduction, sch, func, cfg)
                if not ok:   # a shape the vectorized rule does not take: DLight's scalar one
                    sch = _schedule_dlight_reduction(func, target)
                    ok = sch is not None
            else:
                ok = {"matmul": _schedule_matmul, "injective": _schedule_injective,
                      "fallback": _schedule_fallback}[name](sch, func, cfg)
        except _REFUSED:
            # a rule whose primitive refuses this function: the next rule (or none) takes it
            ok = False
        if ok:
            return sch, name
    return None, None


def schedule_primfunc(func: tirx.PrimFunc, target: Target,
                      cfg: CPUConfig | None = None) -> tuple[tirx.PrimFunc, str | None]:
    """Schedule one PrimFunc (see :func:`default_schedule`); returns (function, rule name), the
    function unchanged and ``None`` when no rule applies."""
    named = "global_symbol" in func.attrs
    main = func if named else func.with_attr("global_symbol", "main")
    sch, rule = default_schedule(tvm.IRModule({"main": main}), target, cfg)
    if sch is None:
        return func, None
    out = sch.mod["main"]
    if not named:
        out = out.without_attr("global_symbol")
    return out.with_attrs({"tirx.is_scheduled": True, "op_pattern": _OPAQUE, RULE_ATTR: rule}), rule


def schedule_module(mod: tvm.IRModule, target: Target,
                    config: CPUConfig | None = None) -> tvm.IRModule:
    """Schedule every unscheduled PrimFunc of a legalized module (see :func:`schedule_primfunc`)."""
    cfg = config or cpu_config(target)
    out = mod.shallow_copy() if hasattr(mod, "shallow_copy") else mod
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc):
            continue
        if func.attrs is not None and func.attrs.get("tirx.is_scheduled"):
            continue
        new, _ = schedule_primfunc(func, target, cfg)
        out[gv] = new
    return out


def freeze_scheduled(mod: tvm.IRModule) -> tvm.IRModule:
    """Mark every scheduled PrimFunc opaque, so the build's FuseOps/FuseTIR leave it whole."""
    for gv, func in list(mod.functions_items()):
        if isinstance(func, tirx.PrimFunc) and func.attrs is not None \
                and func.attrs.get("tirx.is_scheduled"):
            mod[gv] = func.with_attr("op_pattern", _OPAQUE)
    return mod


def schedule_report(mod: tvm.IRModule) -> dict[str, str | None]:
    """``{PrimFunc name: rule that scheduled it, or None}`` for a module from
    :func:`apply_default_schedules`."""
    report = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            rule = func.attrs.get(RULE_ATTR) if func.attrs is not None else None
            report[gv.name_hint] = None if rule is None else str(rule)
    return report


# operators that remain after legalization (calls into PrimFuncs, VM builtins)
_LOWERED_OPS = ("relax.call_tir", "relax.call_dps", "relax.builtin", "relax.vm", "relax.memory",
                "relax.null_value", "relax.call_pure", "relax.call_inplace")


def _is_legalized(mod: tvm.IRModule) -> bool:
    """True when no Relax function calls a high-level operator any more."""
    found = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) \
                and not e.op.name.startswith(_LOWERED_OPS):
            found.append(e.op.name)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return not found


def mark_weights(mod: tvm.IRModule) -> tvm.IRModule:
    """Mark which PrimFunc arguments are constant weights (``layout_free_buffers``), the ones a
    schedule may repack at build time. TVM's AttachAttrLayoutFreeBuffers also marks parameters
    past ``num_input``, whose packing would run on every call: only constants are marked here."""
    stripped = {}
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function) and func.attrs is not None \
                and "num_input" in func.attrs:
            stripped[gv] = func.attrs["num_input"]
            mod[gv] = func.without_attr("num_input")
    mod = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
    for gv, n in stripped.items():
        for g2, func in mod.functions_items():
            if g2.name_hint == gv.name_hint:
                mod[g2] = func.with_attr("num_input", n)
    return mod


def legalize(mod: tvm.IRModule, target: Target, *, fast: bool = True) -> tvm.IRModule:
    """TVM's CPU legalization and fusion (LegalizeOps … FuseTIR), with the fast transcendental
    functions of :mod:`.fast_math` when ``fast``."""
    from .fast_math import legalize_map
    custom = legalize_map() if fast else None
    # tvm_native_noise: TVM's "Fast mode segfaults ..." for each gather lowered; slimc checks
    # index inputs at run time and clips computed ones (codegen/bounds.py), see slimc._quiet
    with target, tvm_native_noise():
        return tvm.transform.Sequential([
            relax.transform.LegalizeOps(customize_legalize_map=custom),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ])(mod)


def apply_default_schedules(mod: tvm.IRModule, target, *, fast_math: bool = True,
                            config: CPUConfig | None = None) -> tvm.IRModule:
    """Relax module → Relax module whose CPU kernels are scheduled (see the module docstring).

    Accepts an imported module (it is legalized and fused first, with :mod:`.fast_math` when
    ``fast_math``) or an already legalized one. Weights bound as constants are packed at build
    time (``SplitLayoutRewritePreproc`` + ``FoldConstant``). Non-CPU targets are returned
    unchanged: TVM's default CUDA pipeline applies DLight's GPU schedules itself.
    ``config`` overrides the tile sizes :func:`cpu_config` derives from the target.
    Usable as ``slimc.compile(..., tune=apply_default_schedules)``.
    """
    target = target if isinstance(target, Target) else Target(target)
    if target.kind.name != "llvm":
        return mod
    if not _is_legalized(mod):
        mod = legalize(mod, target, fast=fast_math)
    with target:
        mod = mark_weights(mod)
        mod = schedule_module(mod, target, config)
        mod = relax.transform.SplitLayoutRewritePreproc()(mod)
        mod = relax.transform.FoldConstant()(mod)
        mod = relax.transform.DeadCodeElimination()(mod)
    return mod
