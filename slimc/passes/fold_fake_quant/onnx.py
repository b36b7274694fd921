"""ONNX rules of fold_fake_quant. Each rule is a match (returning a reason when it refuses) and
a rewrite; ``fold`` applies them in order, then drops what became dead.

1. ``QuantizeLinear(W const)`` → an int8 initializer holding the codes (the float copy goes).
2. ``QuantizeLinear(DequantizeLinear(q))`` with the same parameters → ``q``.
3. ``MatMul(DQ(a), DQ(b))`` → ``MatMulInteger(a, b, z_a, z_b)`` → ``Cast`` → ``Mul(s_a·s_b)``;
   ``Gemm`` likewise, with ``transB``, ``alpha``, ``beta`` and ``C`` kept.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...ir.onnx import _attr, constants, get_weight
from ...ir.surgery import Namer, drop_unused, toposort
from ..quantize import _math as qmath
from ..quantize.onnx import elem_types
from . import _math

QUANT_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
             "QLinearMatMul", "ConvInteger", "QLinearConv", "QGemm", "DynamicQuantizeMatMul",
             "MatMulIntegerToFloat", "QAttention")
_NP = {TensorProto.INT8: "int8", TensorProto.UINT8: "uint8", TensorProto.INT16: "int16",
       TensorProto.UINT16: "uint16", TensorProto.INT32: "int32", TensorProto.INT4: "int4",
       TensorProto.UINT4: "uint4", TensorProto.FLOAT8E4M3FN: "float8e4m3fn"}


def recognise(model: onnx.ModelProto) -> dict:
    """What quantization a model holds: counts of the quantization ops, QDQ pairs (a
    QuantizeLinear read by a DequantizeLinear), int8 weights (a constant read by a
    DequantizeLinear) and dynamic quantizations."""
    g = model.graph
    counts = Counter(n.op_type for n in g.node if n.op_type in QUANT_OPS)
    producer = {o: n for n in g.node for o in n.output}
    consts = constants(model)
    pairs = sum(1 for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in producer
                and producer[n.input[0]].op_type in ("QuantizeLinear", "DynamicQuantizeLinear"))
    int_weights = sum(1 for n in g.node if n.op_type == "DequantizeLinear"
                      and n.input[0] in consts)
    out = {k: int(v) for k, v in sorted(counts.items())}
    out.update(qdq_pairs=pairs, int_weights=int_weights)
    return out


@dataclass(frozen=True)
class _DQ:
    """A value produced by ``DequantizeLinear``: x̂ = (q − z)·s."""

    node: onnx.NodeProto
    q: str
    scale: str
    zero_point: str  # "" when absent (0)
    scale_value: np.ndarray | None  # when constant
    zero_value: np.ndarray | None
    axis: int | None  # None: per tensor
    dtype: str


class _Ctx:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.refresh()
        self.fresh = Namer(model)

    def refresh(self) -> None:
        g = self.model.graph
        self.consts = constants(self.model)
        self.types = elem_types(self.model)
        self.producer = {o: n for n in g.node for o in n.output}

    def const(self, value: str) -> np.ndarray | None:
        if not value or value not in self.consts:
            return None
        src, transposed = self.consts[value]
        w = get_weight(self.model, src)
        return w.T if transposed else w

    def dtype(self, value: str, zero_point: str = "") -> str | None:
        if self.types.get(value):
            return _NP.get(self.types[value], str(self.types[value]))
        zp = self.const(zero_point)
        if zp is not None:
            return zp.dtype.name
        return None

    def rank(self, value: str) -> int | None:
        c = self.const(value)
        return c.ndim if c is not None else None

    def dq(self, value: str) -> _DQ | None:
        n = self.producer.get(value)
        if n is None or n.op_type != "DequantizeLinear":
            return None
        q, s = n.input[0], n.input[1]
        z = n.input[2] if len(n.input) > 2 else ""
        sv, zv = self.const(s), self.const(z)
        per_axis = sv is not None and sv.ndim == 1 and sv.size > 1
        axis = _attr(n, "axis", 1) if per_axis else None
        if axis is not None and axis < 0:
            r = self.rank(q)
            axis = axis + r if r is not None else axis
        return _DQ(n, q, s, z, sv, zv, axis, self.dtype(q, z) or "uint8")


def _node_name(n: onnx.NodeProto, i: int) -> str:
    return n.name or f"{n.op_type}_{i}"


# -- validation ------------------------------------------------------------------------------
def validate(ctx: _Ctx) -> None:
    """Every constant scale must be finite and positive; zero points must fit their type."""
    for i, n in enumerate(ctx.model.graph.node):
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(n.input) < 2:
            continue
        s = ctx.const(n.input[1])
        where = f"{n.op_type} node {_node_name(n, i)!r}"
        if s is not None:
            qmath.check_qparams(s, None, None, where)
        if len(n.input) > 2 and n.input[2]:
            z = ctx.const(n.input[2])
            grid = _math.grid_of(z.dtype.name) if z is not None else None
            if z is not None and grid is not None:
                qmath.check_qparams(s if s is not None else 1.0, z, grid, where)


# -- rule 1: quantize constant weights --------------------------------------------------------
def _weight_quantize(ctx: _Ctx, n: onnx.NodeProto) -> str | np.ndarray:
    """The int codes of ``QuantizeLinear(W)`` for a constant W, or why not."""
    w, s = ctx.const(n.input[0]), ctx.const(n.input[1])
    z = ctx.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
    if w is None or s is None or (len(n.input) > 2 and n.input[2] and z is None):
        return "not a constant weight with constant parameters"
    if _attr(n, "block_size", 0):
        return "blocked quantization"
    out = _attr(n, "output_dtype", 0)
    dtype = _NP.get(out) if out else (z.dtype.name if z is not None else "uint8")
    grid = _math.grid_of(dtype)
    if grid is None:
        return f"{dtype} quantization (only 8-bit folds)"
    if not np.issubdtype(w.dtype, np.floating):
        return f"weight is {w.dtype}"
    axis = None
    if s.ndim == 1 and s.size > 1:
        axis = _attr(n, "axis", 1)
        axis = axis + w.ndim if axis < 0 else axis
    zero = (np.zeros_like(s, dtype=np.int64) if z is None else z.astype(np.int64))
    qp = qmath.QParams(s.astype(np.float32).reshape(s.shape if axis is not None else ()),
                       zero.reshape(zero.shape if axis is not None else ()), grid, axis)
    return qmath.quantize(w.astype(np.float32), qp)


def fold_weight_quantize(ctx: _Ctx, stats: dict) -> list[str]:
    g = ctx.model.graph
    dead, keep = [], []
    for n in list(g.node):
        if n.op_type != "QuantizeLinear":
            keep.append(n)
            continue
        codes = _weight_quantize(ctx, n)
        if isinstance(codes, str):
            keep.append(n)
            continue
        g.initializer.append(numpy_helper.from_array(codes, n.output[0]))
        stats["weights_folded"] += 1
        stats["weight_bytes_int"] += codes.nbytes
        src = ctx.consts[n.input[0]][0]
        stats["_float_weights"].add(src)
        dead.extend(n.input)
    del g.node[:]
    g.node.extend(keep)
    ctx.refresh()
    return dead


# -- rule 2: DQ → Q with the same parameters -------------------------------------------------
def _same(ctx: _Ctx, a: str, b: str) -> bool:
    if a == b:
        return True
    va, vb = ctx.const(a), ctx.const(b)
    return va is not None and vb is not None and va.dtype == vb.dtype and np.array_equal(va, vb)


def cancel_dq_q(ctx: _Ctx, stats: dict) -> list[str]:
    g = ctx.model.graph
    outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}
    dead = []
    for n in g.node:
        if n.op_type != "QuantizeLinear" or n.output[0] in outputs:
            continue
        d = ctx.dq(n.input[0])
        if d is None:
            continue
        zq = n.input[2] if len(n.input) > 2 else ""
        same_axis = _attr(n, "axis", 1) == _attr(d.node, "axis", 1) or d.axis is None
        if (_same(ctx, n.input[1], d.scale) and _same(ctx, zq, d.zero_point) and same_axis
                and not _attr(n, "output_dtype", 0) and ctx.dtype(d.q, d.zero_point)
                == (ctx.dtype(n.output[0], zq) or ctx.dtype(d.q, d.zero_point))):
            rename[n.output[0]] = d.q
            dead.append(n.output[0])
            stats["cancelled"] += 1
    for n in g.node:
        for i, v in enumerate(n.input):
            if v in rename:
                n.input[i] = rename[v]
    ctx.refresh()
    return dead


# -- rule 3: integer matmul ------------------------------------------------------------------
def _match_matmul(ctx: _Ctx, n: onnx.NodeProto) -> str | tuple[_DQ, _DQ]:
    if n.op_type == "Gemm" and _attr(n, "transA", 0):
        return "Gemm with transA=1"
    a, b = ctx.dq(n.input[0]), ctx.dq(n.input[1])
    if a is None and b is None:
        return ""  # not quantized at all: nothing to say
    if a is None or b is None:
        return "only one operand is dequantized (weight-only quantization stays float)"
    for d in (a, b):
        if d.dtype not in _math.INT8_TYPES:
            return f"{d.dtype} operand (MatMulInteger takes 8-bit operands)"
        if d.scale_value is None and d.axis is None and ctx.rank(d.scale) not in (None, 0, 1):
            return "scale that is not per tensor"
    if a.axis is not None:
        return "per-channel quantized left operand (one scale per row of the reduction)"
    if b.axis is not None:
        rank = ctx.rank(b.q)
        trans_b = n.op_type == "Gemm" and _attr(n, "transB", 0)
        if rank != 2 or b.axis != (0 if trans_b else 1):
            return "per-channel scales that do not run along the output columns"
    return a, b


def _zero_input(ctx: _Ctx, d: _DQ) -> str:
    """The zero point to give MatMulInteger: "" when it is absent or all zeros."""
    if not d.zero_point:
        return ""
    v = ctx.const(d.zero_point)
    return "" if v is not None and not np.any(v) else d.zero_point


def _scale_input(ctx: _Ctx, a: _DQ, b: _DQ, alpha: float, nodes: list, inits: list,
                 base: str) -> str:
    if a.scale_value is not None and b.scale_value is not None:
        s = _math.combined_scale(a.scale_value, b.scale_value)
        if alpha != 1.0:
            s = (s * np.float32(alpha)).astype(np.float32)
        name = ctx.fresh(f"{base}_rescale")
        inits.append(numpy_helper.from_array(s, name))
        return name
    name = ctx.fresh(f"{base}_rescale")
    nodes.append(helper.make_node("Mul", [a.scale, b.scale], [name],
                                  name=ctx.fresh(f"{base}_rescale_Mul")))
    if alpha != 1.0:
        c = ctx.fresh(f"{base}_alpha")
        inits.append(numpy_helper.from_array(np.asarray(alpha, np.float32), c))
        scaled = ctx.fresh(f"{base}_rescale_alpha")
        nodes.append(helper.make_node("Mul", [name, c], [scaled],
                                      name=ctx.fresh(f"{base}_alpha_Mul")))
        name = scaled
    return name


def _rewrite_matmul(ctx: _Ctx, n: onnx.NodeProto, a: _DQ, b: _DQ) -> list[onnx.NodeProto]:
    base = n.name or n.output[0]
    nodes, inits = [], []
    qb = b.q
    if n.op_type == "Gemm" and _attr(n, "transB", 0):
        codes = ctx.const(qb)
        if codes is not None:
            qb = ctx.fresh(f"{b.q}_transposed")
            inits.append(numpy_helper.from_array(np.ascontiguousarray(codes.T), qb))
        else:
            t = ctx.fresh(f"{b.q}_transposed")
            nodes.append(helper.make_node("Transpose", [b.q], [t], perm=[1, 0],
                                          name=ctx.fresh(f"{base}_Transpose")))
            qb = t
    za, zb = _zero_input(ctx, a), _zero_input(ctx, b)
    ins = [a.q, qb, za, zb]
    while ins[-1] == "":
        ins.pop()
    acc, accf = ctx.fresh(f"{base}_int32"), ctx.fresh(f"{base}_float")
    nodes.append(helper.make_node("MatMulInteger", ins, [acc],
                                  name=ctx.fresh(f"{base}_MatMulInteger")))
    nodes.append(helper.make_node("Cast", [acc], [accf], to=TensorProto.FLOAT,
                                  name=ctx.fresh(f"{base}_Cast")))
    alpha = float(_attr(n, "alpha", 1.0)) if n.op_type == "Gemm" else 1.0
    scale = _scale_input(ctx, a, b, alpha, nodes, inits, base)
    bias = n.input[2] if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2] else ""
    out = n.output[0]
    scaled = ctx.fresh(f"{base}_scaled") if bias else out
    nodes.append(helper.make_node("Mul", [accf, scale], [scaled],
                                  name=ctx.fresh(f"{base}_rescale_out")))
    if bias:
        beta = float(_attr(n, "beta", 1.0))
        if beta != 1.0:
            c = ctx.fresh(f"{base}_beta")
            inits.append(numpy_helper.from_array(np.asarray(beta, np.float32), c))
            b2 = ctx.fresh(f"{base}_bias_beta")
            nodes.append(helper.make_node("Mul", [bias, c], [b2],
                                          name=ctx.fresh(f"{base}_beta_Mul")))
            bias = b2
        nodes.append(helper.make_node("Add", [scaled, bias], [out],
                                      name=ctx.fresh(f"{base}_bias")))
    ctx.model.graph.initializer.extend(inits)
    return nodes


def fold_matmuls(ctx: _Ctx, stats: dict) -> list[str]:
    g = ctx.model.graph
    dead, new_nodes = [], []
    for i, n in enumerate(g.node):
        if n.op_type not in ("MatMul", "Gemm"):
            new_nodes.append(n)
            continue
        m = _match_matmul(ctx, n)
        if isinstance(m, str):
            if m:
                stats["left_in_float"][_node_name(n, i)] = m
            new_nodes.append(n)
            continue
        new_nodes.extend(_rewrite_matmul(ctx, n, *m))
        stats["folded"][_node_name(n, i)] = n.op_type
        dead.extend(n.input[:2])
    del g.node[:]
    g.node.extend(new_nodes)
    ctx.refresh()
    return dead


def _leftovers(ctx: _Ctx, stats: dict) -> None:
    """Fake-quant pairs still in the graph: their consumers stay float (numerics unchanged)."""
    consumers: dict[str, list[tuple[int, onnx.NodeProto]]] = {}
    for i, n in enumerate(ctx.model.graph.node):
        for v in n.input:
            consumers.setdefault(v, []).append((i, n))
    for n in ctx.model.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        p = ctx.producer.get(n.input[0])
        if p is not None and p.op_type in ("QuantizeLinear", "DynamicQuantizeLinear"):
            why = "reads a fake-quant value and has no integer form here"
        elif n.input[0] in ctx.consts:
            why = "reads an integer constant through DequantizeLinear and computes in float"
        else:
            continue
        for i, c in consumers.get(n.output[0], []):
            stats["left_in_float"].setdefault(_node_name(c, i), f"{c.op_type} {why}")


def fold(model: onnx.ModelProto, stats: dict) -> None:
    ctx = _Ctx(model)
    validate(ctx)
    before = {i.name: i for i in model.graph.initializer}
    dead = fold_weight_quantize(ctx, stats)
    dead += cancel_dq_q(ctx, stats)
    dead += fold_matmuls(ctx, stats)
    if dead:
        drop_unused(model, dead)
        toposort(model)
        ctx.refresh()
    _leftovers(ctx, stats)
    now = {i.name for i in model.graph.initializer}
    gone = [before[k] for k in stats.pop("_float_weights") if k in before and k not in now]
    stats["weight_bytes_float_removed"] = int(sum(
        numpy_helper.to_array(t).nbytes for t in gone))
    stats["float_weights_removed"] = len(gone)
