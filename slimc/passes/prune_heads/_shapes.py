"""Which tensor dimensions carry attention heads, and what they become after pruning.

Backend-neutral: adapters translate their graph into :class:`ShapeOp` records (a kind, tensor
inputs and outputs, a few attributes) plus the concrete shape of every value, and
:func:`propagate` tells them the new shape of every value that depends on a head count. The
adapters then rewrite the shape constants (reshape targets, expand sizes, split sizes, slice
bounds) of exactly those nodes, and nothing else.

Math: a dimension is a product of *atoms* ``(size, symbol)``; an atom with a symbol scales with
a head count. Block ``L`` has the symbol ``hL`` (its key/value head count, which is the head
count when there is no grouped-query attention) and, under grouped-query attention, ``rL`` (query
heads per key/value head), so ``num_heads = hL * rL``. A query projection's output width is
``hL * rL * head_dim`` (atoms ``(Hkv, hL) (R, rL) (d, None)``), a fused QKV projection's is
``3 * hL * d``. Atoms flow forward through the graph: reshapes regroup them in order (a head
atom is never split: that would mean a reshape mixes heads with something else), permutes move
them, broadcasting keeps them, ``expand`` of the singleton after a key/value head axis to ``R``
creates the ``rL`` atom (``repeat_kv``). New size of a dimension = product of its atoms with
each symbol replaced by its new value. ``head_dim`` never carries a symbol, so scale factors
(1/sqrt(head_dim)) are untouched.

Anything the rules do not understand that reads a head-carrying value raises
:class:`HeadShapeError` naming the node, so the pass refuses instead of producing a wrong graph.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

Atom = tuple  # (old size: int, symbol: str | None)
Dim = tuple  # tuple of atoms; () is a dimension of size 1


class HeadShapeError(Exception):
    """A node that reads a head-carrying value in a way the rules cannot rewrite."""

    def __init__(self, node: str, reason: str):
        self.node = node
        self.reason = reason
        super().__init__(f"{node}: {reason}")


@dataclass
class ShapeOp:
    """One node as the propagation sees it.

    kinds: ``pointwise`` (output shape = broadcast of the inputs), ``reshape``, ``permute``
    (attrs perm), ``matmul``, ``linear`` (attrs o_block: the pruned block whose output projection
    this is, or None), ``sdpa`` (inputs q, k, v[, mask]), ``attention_op`` (a fused ONNX
    attention op: inputs q, k, v; attrs rank; its per-head side inputs are the adapter's),
    ``expand``, ``split`` / ``select`` /
    ``concat`` (attrs axis), ``slice`` (attrs slices), ``take`` (attrs axis, index_shape),
    ``identity``, ``shape``
    (outputs hold shape data, not head-carrying tensors), ``sink`` (no tensor output) and
    ``opaque`` (anything else: refused if it reads a head-carrying value).
    """

    name: str
    kind: str
    inputs: list
    outputs: list
    attrs: dict = field(default_factory=dict)


def plain(n: int) -> Dim:
    return () if n == 1 else ((int(n), None),)


def old_size(d: Dim) -> int:
    return math.prod(a[0] for a in d)


def new_size(d: Dim, sizes: dict) -> int:
    return math.prod(sizes[s] if s else v for v, s in d)


def is_tagged(d: Dim) -> bool:
    return any(s for _, s in d)


def plain_dims(shape) -> list:
    return [plain(s) for s in shape]


class _Ctx:
    def __init__(self, sizes, repeat_symbols):
        self.sizes = sizes
        self.repeat = repeat_symbols  # kv symbol -> (group symbol, old group size)
        self.slices: dict[str, dict] = {}  # slice op -> {axis: (old block, new block)}


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _merge(op, cands: list, out: int, ctx) -> Dim:
    """The dimension of a broadcast result from its same-axis inputs; refuses when a tensor that
    does not come from the projections has the head count baked into its shape."""
    same = [c for c in cands if old_size(c) == out]
    tagged = [c for c in same if is_tagged(c)]
    chosen = tagged[0] if tagged else plain(out)
    want = new_size(chosen, ctx.sizes)
    for c in same:
        if new_size(c, ctx.sizes) != want:
            raise HeadShapeError(op.name, "an input that does not come from the attention "
                                 f"projections has a dimension of size {out} (a head count) on "
                                 "the same axis as the heads, so it would no longer match")
    return chosen


def _broadcast(op, ins: list, out_shape, ctx) -> list:
    rank = len(out_shape)
    dims = []
    for i in range(rank):
        cands = []
        for d in ins:
            if d is None:
                continue
            j = i - (rank - len(d))
            if j < 0:
                continue
            size = old_size(d[j])
            if size not in (1, out_shape[i]):
                raise HeadShapeError(op.name, "its output is not the broadcast of its inputs")
            cands.append(d[j])
        dims.append(_merge(op, cands, out_shape[i], ctx))
    return dims


def _pointwise(op, ins, outs, ctx):
    if len(outs) != 1:
        raise HeadShapeError(op.name, f"{op.attrs.get('op', 'it')} has several outputs")
    return [_broadcast(op, [d for d in ins if d is not None], outs[0], ctx)]


def _ones_only(in_dims: list, out_shape) -> list | None:
    """A reshape that only inserts or removes size-1 dimensions (unsqueeze / squeeze): every
    other dimension keeps its atoms, aligned from the left, so a head axis of size 1 (one
    key/value head) stays where it was. None for any other reshape."""
    sizes = [old_size(d) for d in in_dims]
    if [x for x in sizes if x != 1] != [x for x in out_shape if x != 1]:
        return None
    if any(v == 1 and sym and size != 1 for d, size in zip(in_dims, sizes) for v, sym in d):
        return None   # a singleton head atom inside a larger dimension may be split off
    out, pending, i = [], [], 0
    for size in out_shape:
        while i < len(in_dims) and sizes[i] != size and sizes[i] == 1:
            pending += in_dims[i]   # a removed singleton: its atoms join the next dimension
            i += 1
        if i < len(in_dims) and sizes[i] == size:
            out.append(tuple(pending) + tuple(in_dims[i]))
            i += 1
        elif size == 1:
            out.append(tuple(pending))
        else:
            return None
        pending = []
    rest = pending + [a for d in in_dims[i:] for a in d]
    if rest and out:
        out[-1] = out[-1] + tuple(rest)
    return out


def _joins(queue: deque, origin: int | None) -> bool:
    """Whether the singleton at the head of ``queue`` belongs to the dimension being filled
    (whose atoms came from input dimension ``origin``; None: a new size-1 dimension so far
    empty). Queue items are (size, symbol, input dimension, marker)."""
    _, sym, j, marker = queue[0]
    if marker or sym:
        if origin is not None:
            return j == origin
        # an empty size-1 dimension takes it, unless a head atom continues a head product
        return marker or not (len(queue) > 1 and queue[1][2] == j and queue[1][1])
    return True


def map_reshape(name: str, in_dims: list, out_shape) -> list:
    """Regroup the atoms of ``in_dims`` (in order) into dimensions of the sizes ``out_shape``.

    Every atom remembers its input dimension, and an input dimension of size 1 leaves a
    marker: a singleton (a head axis with one key/value head, a batch or sequence of 1) fits
    anywhere by size, and goes with its own group rather than the first dimension it fits in."""
    ones = _ones_only(in_dims, out_shape)
    if ones is not None:
        return ones
    queue = deque()
    for j, d in enumerate(in_dims):
        queue.extend((v, sym, j, False) for v, sym in d)
        if not d:
            queue.append((1, None, j, True))
    out = []
    for s in out_shape:
        cur, prod, origin = [], 1, None
        while prod < s:
            if not queue:
                raise HeadShapeError(name, "the reshape does not preserve the element count")
            v, sym, j, marker = queue.popleft()
            if marker:
                continue
            if s % (prod * v) == 0:
                cur.append((v, sym))
                prod *= v
            elif sym is None and s % prod == 0 and v % (s // prod) == 0:
                need = s // prod
                cur.append((need, None))
                queue.appendleft((v // need, None, j, False))
                prod = s
            else:
                raise HeadShapeError(name, "the reshape splits a head axis across dimensions")
            origin = j
        while queue and queue[0][0] == 1 and _joins(queue, origin):
            v, sym, j, marker = queue.popleft()
            if not marker:
                cur.append((v, sym))
            origin = j
        out.append(tuple(cur))
    if any(v != 1 for v, *_ in queue):
        raise HeadShapeError(name, "the reshape does not preserve the element count")
    rest = tuple((v, sym) for v, sym, _, marker in queue if not marker)
    if rest and out:
        out[-1] = out[-1] + rest
    return out


def _reshape(op, ins, outs, ctx):
    return [map_reshape(op.name, ins[0], outs[0])]


def _permute(op, ins, outs, ctx):
    d = ins[0]
    return [[d[_axis(p, len(d))] for p in op.attrs["perm"]]]


def _identity(op, ins, outs, ctx):
    return [list(ins[0])]


def _matmul(op, ins, outs, ctx):
    a, b = ins[0], ins[1]
    if len(a) < 2 or len(b) < 2:
        raise HeadShapeError(op.name, "a matrix-vector product reads a head-carrying value")
    if new_size(a[-1], ctx.sizes) != new_size(b[-2], ctx.sizes):
        raise HeadShapeError(op.name, "it contracts a head axis with a tensor that does not "
                             "come from the attention projections")
    out = outs[0]
    batch = _broadcast(op, [a[:-2], b[:-2]], out[:-2], ctx)
    return [batch + [a[-2], b[-1]]]


def _linear(op, ins, outs, ctx):
    x = ins[0]
    if is_tagged(x[-1]):
        if op.attrs.get("o_block") is None:
            raise HeadShapeError(op.name, "a projection that is not the attention's output "
                                 "projection reads the heads")
        want = op.attrs.get("in_new")
        if want is not None and new_size(x[-1], ctx.sizes) != want:
            raise HeadShapeError(op.name, "the output projection's input width does not match "
                                 "the kept heads")
    return [list(x[:-1]) + [plain(outs[0][-1])]]


def _sdpa(op, ins, outs, ctx):
    q, k, v = ins[0], ins[1], ins[2]
    result = [list(q[:-1]) + [v[-1]]]
    if len(ins) > 3 and ins[3] is not None:  # the mask broadcasts against the scores
        _broadcast(op, [list(q[:-1]) + [k[-2]], ins[3]], tuple(old_size(d) for d in q[:-1])
                   + (old_size(k[-2]),), ctx)
    for shape in outs[1:]:
        n = len(shape)
        if tuple(old_size(d) for d in q[:n]) == tuple(shape):
            result.append(list(q[:n]))
        else:
            result.append(plain_dims(shape))
    return result


def _attention_op(op, ins, outs, ctx):
    """A fused attention op (ONNX MultiHeadAttention, GroupQueryAttention, Attention) reading
    q, k, v: with 3-D inputs ([B, S, H·d]) the output has q's layout (query heads × head size);
    with 4-D inputs ([B, H, S, d]) it is q's shape with v's head size, like SDPA."""
    q, v = ins[0], ins[2]
    if op.attrs.get("rank") == 3:
        return [list(q[:-1]) + [q[-1]]]
    return [list(q[:-1]) + [v[-1]]]


def _expand(op, ins, outs, ctx):
    d, out = ins[0], outs[0]
    rank = len(out)
    dims = []
    for i, size in enumerate(out):
        j = i - (rank - len(d))
        if j >= 0 and old_size(d[j]) == size:
            dims.append(d[j])
            continue
        if j >= 0 and old_size(d[j]) != 1:
            raise HeadShapeError(op.name, "expand changes a dimension that is not a singleton")
        prev = dims[-1] if dims else ()
        syms = {s for _, s in prev if s}
        if len(syms) == 1 and next(iter(syms)) in ctx.repeat:
            rsym, rold = ctx.repeat[next(iter(syms))]
            if size == rold and all(s for _, s in prev):
                dims.append(((size, rsym),))  # repeat_kv: one copy per query head of the group
                continue
        dims.append(plain(size))
    return [dims]


def _split(op, ins, outs, ctx):
    d = ins[0]
    ax = _axis(op.attrs["axis"], len(d))
    if not is_tagged(d[ax]):
        return [[*d[:ax], plain(s[ax]), *d[ax + 1:]] for s in outs]
    sizes = {s[ax] for s in outs}
    first = d[ax][0] if d[ax] else (1, None)
    n = len(outs)
    if len(sizes) != 1 or first[1] is not None or first[0] % n:
        raise HeadShapeError(op.name, "it splits the head axis into unequal parts or between "
                             "heads")
    piece = (plain(first[0] // n)) + d[ax][1:]
    return [[*d[:ax], piece, *d[ax + 1:]] for _ in outs]


def _slice(op, ins, outs, ctx):
    """attrs ``slices``: [(axis, start, end, step)] with concrete bounds (ONNX slices several
    axes at once). Slicing a head axis is allowed on whole blocks of heads only (the q / k / v
    thirds of a fused projection)."""
    dims = list(ins[0])
    out = outs[0]
    for axis, start, end, step in op.attrs["slices"]:
        ax = _axis(axis, len(dims))
        d = dims[ax]
        if not is_tagged(d):
            dims[ax] = plain(out[ax])
            continue
        size = old_size(d)
        start = max(0, min(start + size if start < 0 else start, size))
        end = max(0, min(end + size if end < 0 else end, size))
        rest = d[1:] if d[0][1] is None else d
        block = old_size(rest)
        if step != 1 or start % block or end % block:
            raise HeadShapeError(op.name, "it slices the head axis between heads")
        ctx.slices.setdefault(op.name, {})[ax] = (block, new_size(rest, ctx.sizes))
        dims[ax] = plain((end - start) // block) + tuple(rest)
    return [dims]


def _take(op, ins, outs, ctx):
    """Gather with constant indices of shape attrs ``index_shape`` along attrs ``axis``."""
    d = ins[0]
    ax = _axis(op.attrs["axis"], len(d))
    if is_tagged(d[ax]):
        raise HeadShapeError(op.name, "it gathers indices along a head axis")
    return [[*d[:ax], *plain_dims(op.attrs["index_shape"]), *d[ax + 1:]]]


def _select(op, ins, outs, ctx):
    d = ins[0]
    ax = _axis(op.attrs["axis"], len(d))
    if is_tagged(d[ax]):
        raise HeadShapeError(op.name, "it selects a single index of a head axis")
    return [[*d[:ax], *d[ax + 1:]] for _ in outs]  # unbind: one output per index


def _concat(op, ins, outs, ctx):
    out = outs[0]
    ax = _axis(op.attrs["axis"], len(out))
    ranked = [d for d in ins if d is not None and len(d) == len(out)]
    if any(is_tagged(d[ax]) for d in ranked):
        raise HeadShapeError(op.name, "it concatenates along a head axis")
    dims = []
    for i, size in enumerate(out):
        dims.append(plain(size) if i == ax else _merge(op, [d[i] for d in ranked], size, ctx))
    return [dims]


def _shape(op, ins, outs, ctx):
    return [plain_dims(s) for s in outs]


def _sink(op, ins, outs, ctx):
    return [plain_dims(s) for s in outs]


_RULES = {"pointwise": _pointwise, "reshape": _reshape, "permute": _permute,
          "identity": _identity, "matmul": _matmul, "linear": _linear, "sdpa": _sdpa,
          "attention_op": _attention_op,
          "expand": _expand, "split": _split, "slice": _slice, "select": _select,
          "concat": _concat, "shape": _shape, "sink": _sink, "take": _take}


@dataclass
class Propagation:
    dims: dict  # value -> list of Dim, for every value that carries heads
    sizes: dict  # symbol -> new size
    slices: dict  # slice op -> {axis: (old block, new block)}

    def new_shape(self, value: str) -> tuple | None:
        d = self.dims.get(value)
        return None if d is None else tuple(new_size(x, self.sizes) for x in d)

    def changed(self, value: str) -> bool:
        d = self.dims.get(value)
        return d is not None and any(new_size(x, self.sizes) != old_size(x) for x in d)


def propagate(ops: list, shapes: dict, seeds: dict, sizes: dict,
              repeat_symbols: dict | None = None) -> Propagation:
    """Head atoms of every value reachable from ``seeds`` (value → dims), in the order of
    ``ops`` (topological). ``shapes`` holds the concrete shape of every value; ``sizes`` the
    new value of every symbol."""
    ctx = _Ctx(sizes, repeat_symbols or {})
    dims: dict = dict(seeds)
    for op in ops:
        ins = [dims.get(v) if v is not None else None for v in op.inputs]
        if not any(d is not None and any(is_tagged(x) for x in d) for d in ins):
            continue
        rule = _RULES.get(op.kind)
        if rule is None:
            what = op.attrs.get("op", op.kind)
            raise HeadShapeError(op.name, f"{what} reads a value whose shape depends on the "
                                 "head count, and slimc has no rule to rewrite it")
        full = []
        for v, d in zip(op.inputs, ins):
            if d is None and v is not None and shapes.get(v) is not None:
                d = plain_dims(shapes[v])
            full.append(d)
        outs = [tuple(shapes[o]) for o in op.outputs]
        result = rule(op, full, outs, ctx)
        for o, d, s in zip(op.outputs, result, outs):
            if tuple(old_size(x) for x in d) != tuple(s):
                raise HeadShapeError(op.name, "slimc's shape rule disagrees with the recorded "
                                     f"shape {tuple(s)}")
            if any(is_tagged(x) for x in d):
                dims[o] = d
    return Propagation(dims, sizes, ctx.slices)
