"""FX rules of fold_fake_quant.

Fake-quant comes in three spellings, all read by :func:`describe` into one :class:`FakeQuant`:
``quantized_decomposed.dequantize_*(quantize_*(x))`` (slimc's quantize, PT2E's convert_pt2e),
``aten.fake_quantize_per_{tensor,channel}_affine`` and ``aten.fused_moving_avg_obs_fake_quant``
with its observer off (torch.ao QAT modules). Rules:

1. Linear-like (``linear``/``addmm``/``mm``/``matmul``) of a fake-quant activation and a
   fake-quant constant weight → int8 activation codes (the quantize written with aten ops
   that compute exactly what the fake-quant op computes) → ``aten._int_mm`` with the int8
   weight codes → the integer zero-point terms (``_math``) → ``to(float32)`` → one ``mul``
   (→ ``add`` bias).
2. ``matmul``/``bmm`` of two fake-quant activations → centred int32 codes → int32 ``matmul``.
3. ``quantize(dequantize(c))`` with the same parameters → ``c``.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # registers torch.ops.quantized_decomposed
import torch.fx

from ...errors import PassError
from ...ir.fx import _fetch
from ..quantize import _math as qmath
from ..quantize.fx import _owner, add_buffer, set_meta, set_meta_const
from . import _math

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed

DQ_OPS = {qd.dequantize_per_tensor.default, qd.dequantize_per_tensor.tensor,
          qd.dequantize_per_tensor.tensor2, qd.dequantize_per_channel.default}
Q_OPS = {qd.quantize_per_tensor.default, qd.quantize_per_tensor.tensor,
         qd.quantize_per_tensor.tensor2, qd.quantize_per_channel.default}
FAKE_OPS = {aten.fake_quantize_per_tensor_affine.default,
            aten.fake_quantize_per_tensor_affine.tensor_qparams,
            aten.fake_quantize_per_channel_affine.default,
            aten.fused_moving_avg_obs_fake_quant.default}
CHOOSE_OPS = {qd.choose_qparams.tensor, qd.choose_qparams_symmetric.tensor}
_LINEAR = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}
_ACT_MATMUL = {aten.matmul.default, aten.bmm.default}
_TRANSPOSE = {aten.t.default, aten.transpose.int, aten.permute.default}
_DTYPE_NAME = {torch.int8: "int8", torch.uint8: "uint8", torch.int16: "int16",
               torch.int32: "int32", torch.uint16: "uint16"}


def _short(op) -> str:
    return str(op).replace("quantized_decomposed.", "").replace("aten.", "")


def recognise(gm: torch.fx.GraphModule) -> dict:
    """Counts of quantize / dequantize / fake-quant / integer-matmul ops, and QDQ pairs."""
    counts: Counter = Counter()
    pairs = 0
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in DQ_OPS | Q_OPS | FAKE_OPS | CHOOSE_OPS or n.target == aten._int_mm.default:
            counts[_short(n.target)] += 1
        if n.target in DQ_OPS and isinstance(n.args[0], torch.fx.Node) \
                and n.args[0].target in Q_OPS:
            pairs += 1
    out = {k: int(v) for k, v in sorted(counts.items())}
    out["qdq_pairs"] = pairs
    out["fake_quantize"] = sum(v for k, v in counts.items() if "fake_quant" in k)
    return out


# -- reading fake-quant ----------------------------------------------------------------------
@dataclass
class FakeQuant:
    """x̂ = (q − z)·s with q = clamp(round(x · inv(s)) + z, qmin, qmax).

    ``out`` is the node whose value is x̂. ``source`` is the float x (``None`` when the codes
    come ready-made, e.g. an int8 constant); ``codes`` the quantize node if there is one.
    ``scale``/``zero`` are numpy arrays when constant, nodes when computed at run time.
    ``inv`` says how the op forms 1/s: "double" (quantized_decomposed: float32(1.0 / s) in
    double) or "float" (aten.fake_quantize_*: 1.0f / s in float32)."""

    out: torch.fx.Node
    source: torch.fx.Node | None
    codes: torch.fx.Node | None
    scale: np.ndarray | torch.fx.Node
    zero: np.ndarray | torch.fx.Node
    axis: int | None
    grid: qmath.Grid | None  # None: not an 8-bit grid
    dtype: str
    inv: str

    @property
    def static(self) -> bool:
        return not isinstance(self.scale, torch.fx.Node) and not isinstance(self.zero,
                                                                             torch.fx.Node)


def _value(gm, a):
    """A constant argument as numpy (a literal or a get_attr), or the node itself."""
    if isinstance(a, torch.fx.Node):
        if a.op == "get_attr":
            return _fetch(gm, a.target).detach().cpu().numpy()
        return a
    return np.asarray(a)


def _grid_of(dtype: str, qmin, qmax) -> qmath.Grid | None:
    return _math.grid_of(dtype, int(qmin), int(qmax))


def _fake_dtype(qmin: int, qmax: int) -> str:
    if -128 <= qmin and qmax <= 127:
        return "int8"
    if 0 <= qmin and qmax <= 255:
        return "uint8"
    return f"int[{qmin},{qmax}]"


def describe(gm: torch.fx.GraphModule, n) -> FakeQuant | None:
    """Read ``n`` as fake-quant, or ``None`` if it is not one."""
    if not isinstance(n, torch.fx.Node) or n.op != "call_function":
        return None
    t, a = n.target, n.args
    if t in DQ_OPS:
        per_channel = t == qd.dequantize_per_channel.default
        x, s, z = a[0], a[1], a[2]
        axis = a[3] if per_channel else None
        qmin, qmax, dt = a[4:7] if per_channel else a[3:6]
        dtype = _DTYPE_NAME.get(dt, str(dt))
        source = codes = None
        if isinstance(x, torch.fx.Node) and x.target in Q_OPS:
            codes, source = x, x.args[0]
        s, z = _value(gm, s), (_value(gm, z) if z is not None else np.zeros(1, np.int64))
        return FakeQuant(n, source, codes, s, z, axis, _grid_of(dtype, qmin, qmax), dtype,
                         "double")
    if t in (aten.fake_quantize_per_tensor_affine.default,
             aten.fake_quantize_per_tensor_affine.tensor_qparams):
        x, s, z, qmin, qmax = a[:5]
        dtype = _fake_dtype(qmin, qmax)
        return FakeQuant(n, x, None, _value(gm, s), _value(gm, z), None,
                         _grid_of(dtype, qmin, qmax) if dtype in ("int8", "uint8") else None,
                         dtype, "float")
    if t == aten.fake_quantize_per_channel_affine.default:
        x, s, z, axis, qmin, qmax = a[:6]
        dtype = _fake_dtype(qmin, qmax)
        return FakeQuant(n, x, None, _value(gm, s), _value(gm, z), axis,
                         _grid_of(dtype, qmin, qmax) if dtype in ("int8", "uint8") else None,
                         dtype, "float")
    if t == aten.fused_moving_avg_obs_fake_quant.default:
        x, obs_on, fq_on, _rmin, _rmax, s, z, _avg, qmin, qmax, ch_axis = a[:11]
        per_row = a[11] if len(a) > 11 else n.kwargs.get("per_row_fake_quant", False)
        on, fq = _value(gm, obs_on), _value(gm, fq_on)
        if isinstance(on, torch.fx.Node) or isinstance(fq, torch.fx.Node) or np.any(on) \
                or not np.all(fq):
            return None  # observing (scale changes every call) or switched off
        dtype = _fake_dtype(qmin, qmax)
        return FakeQuant(n, x, None, _value(gm, s), _value(gm, z), ch_axis if per_row else None,
                         _grid_of(dtype, qmin, qmax) if dtype in ("int8", "uint8") else None,
                         dtype, "float")
    return None


def describe_activation(gm: torch.fx.GraphModule, n) -> FakeQuant | None:
    """Like :func:`describe`, also through a ReLU: relu((q − z)·s) = (max(q, z) − z)·s, so a
    ReLU of a per-tensor fake-quant value stays on its grid with qmin raised to z (eager-mode
    QAT places the fake-quant before the ReLU when Linear and ReLU are not fused)."""
    if isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in (
            aten.relu.default,) and len(n.users) >= 1:
        fq = describe(gm, n.args[0])
        if fq is None or not fq.static or fq.axis is not None or fq.grid is None:
            return None
        z = int(np.asarray(fq.zero).reshape(-1)[0])
        if not fq.grid.qmin <= z <= fq.grid.qmax:
            return None
        grid = qmath.Grid(max(fq.grid.qmin, z), fq.grid.qmax, fq.grid.dtype)
        return FakeQuant(n, fq.source, fq.codes, fq.scale, fq.zero, None, grid, fq.dtype, fq.inv)
    return describe(gm, n)


def check(fq: FakeQuant, where: str) -> None:
    """Refuse zero / NaN / inf scales and zero points outside the grid."""
    s = fq.scale if not isinstance(fq.scale, torch.fx.Node) else None
    z = fq.zero if not isinstance(fq.zero, torch.fx.Node) else None
    if s is not None:
        qmath.check_qparams(s, z if fq.grid is not None else None, fq.grid, where)


def _is_fake(n) -> bool:
    return isinstance(n, torch.fx.Node) and n.op == "call_function" and (
        n.target in DQ_OPS or n.target in FAKE_OPS)


# -- evaluating a weight's codes -------------------------------------------------------------
def _params(fq: FakeQuant, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(fq.scale, dtype=np.float64).reshape(-1)
    z = np.asarray(fq.zero, dtype=np.int64).reshape(-1)
    if fq.axis is None:
        return s.reshape(()), z.reshape(())
    shape = [1] * ndim
    shape[fq.axis] = -1
    return s.reshape(shape), z.reshape(shape)


def _inverse(fq: FakeQuant, s: np.ndarray) -> np.ndarray:
    if fq.inv == "float":
        return (np.float32(1.0) / s.astype(np.float32)).astype(np.float32)
    return (1.0 / s).astype(np.float32)


def weight_codes(gm: torch.fx.GraphModule, fq: FakeQuant) -> np.ndarray:
    """The integer codes of a constant weight's fake-quant, checked to dequantize to exactly
    the values the fake-quant op itself produces."""
    if fq.source is not None:
        w = _fetch(gm, fq.source.target).detach().cpu().float().numpy()
        s, z = _params(fq, w.ndim)
        q = np.round(w * _inverse(fq, s)) + z
        codes = np.clip(q, fq.grid.qmin, fq.grid.qmax).astype(np.int64)
    else:
        codes = _fetch(gm, fq.codes.target if fq.codes is not None
                       else fq.out.args[0].target).detach().cpu().numpy().astype(np.int64)
        s, z = _params(fq, codes.ndim)
    want = _evaluate(gm, fq.out)
    got = ((codes - z).astype(np.float32) * s.astype(np.float32)).astype(np.float32)
    if want is not None and not np.array_equal(got, want):
        raise PassError(f"fold_fake_quant computed weight codes for {fq.out.name!r} that do not "
                        "reproduce the fake-quant op's own values "
                        f"(max difference {np.abs(got - want).max():.3g}).",
                        "This is a slimc bug; please report it with the model.")
    return codes


def _evaluate(gm: torch.fx.GraphModule, n: torch.fx.Node) -> np.ndarray | None:
    """Run the sub-graph that computes ``n`` from constants (a weight's fake-quant)."""
    env: dict = {}

    def ev(m):
        if not isinstance(m, torch.fx.Node):
            return m
        if m in env:
            return env[m]
        if m.op == "get_attr":
            v = _fetch(gm, m.target)
        elif m.op == "call_function":
            args = torch.fx.node.map_arg(m.args, ev)
            kwargs = torch.fx.node.map_arg(m.kwargs, ev)
            v = m.target(*args, **kwargs)
        else:
            raise KeyError(m.name)
        env[m] = v
        return v

    try:
        with torch.no_grad():
            v = ev(n)
    except KeyError:
        return None
    return v.detach().cpu().numpy()


# -- emitting integer code -------------------------------------------------------------------
class _Emitter:
    def __init__(self, gm: torch.fx.GraphModule, before: torch.fx.Node):
        self.gm, self.g, self.before = gm, gm.graph, before

    def call(self, op, *args, **kwargs) -> torch.fx.Node:
        with self.g.inserting_before(self.before):
            n = self.g.call_function(op, args, kwargs)
        set_meta(n)
        return n

    def const(self, near: str, suffix: str, value: np.ndarray, like) -> torch.fx.Node:
        target = add_buffer(self.gm, near, suffix, value)
        with self.g.inserting_before(self.before):
            n = self.g.get_attr(target)
        if isinstance(like, torch.fx.Node):
            set_meta_const(self.gm, n, like)
        return n


def _inverse_node(em: _Emitter, fq: FakeQuant):
    """1/s as the fake-quant op forms it: a Python float (static) or a float32 tensor."""
    if not isinstance(fq.scale, torch.fx.Node):
        inv = _inverse(fq, np.asarray(fq.scale, dtype=np.float64).reshape(()))
        return float(inv)
    s = fq.scale
    if fq.inv == "float":
        return em.call(aten.reciprocal.default, em.call(aten.to.dtype, s, torch.float32))
    r = em.call(aten.reciprocal.default, em.call(aten.to.dtype, s, torch.float64))
    return em.call(aten.to.dtype, r, torch.float32)


def emit_codes(em: _Emitter, fq: FakeQuant, shift: int, out_dtype: torch.dtype):
    """q − shift as ``out_dtype``, with q = clamp(round(x · inv) + z, qmin, qmax) computed as
    the fake-quant op computes it (so the codes are the same integers)."""
    x = em.call(aten.mul.Tensor, fq.source, _inverse_node(em, fq))
    r = em.call(aten.round.default, x)
    if isinstance(fq.zero, torch.fx.Node):
        z = em.call(aten.sub.Tensor, fq.zero, shift)
        r = em.call(aten.add.Tensor, r, em.call(aten.to.dtype, z, torch.float32))
    else:
        zs = int(np.asarray(fq.zero).reshape(-1)[0]) - shift
        if zs:
            r = em.call(aten.add.Tensor, r, float(zs))
    c = em.call(aten.clamp.default, r, float(fq.grid.qmin - shift), float(fq.grid.qmax - shift))
    return em.call(aten.to.dtype, c, out_dtype)


def _zero_tensor(em: _Emitter, fq: FakeQuant):
    if isinstance(fq.zero, torch.fx.Node):
        return em.call(aten.to.dtype, fq.zero, torch.int32)
    return int(np.asarray(fq.zero).reshape(-1)[0])


def _act_scale(fq: FakeQuant):
    """The activation's scale: a float32 scalar (static) or the runtime scale node."""
    if isinstance(fq.scale, torch.fx.Node):
        return fq.scale
    return np.float32(np.asarray(fq.scale, dtype=np.float64).reshape(-1)[0])


# -- rule 1: linear --------------------------------------------------------------------------
@dataclass
class _Linear:
    node: torch.fx.Node
    x: FakeQuant
    w: FakeQuant
    b_codes: np.ndarray  # (K, N) int64 codes of the matrix x is multiplied by
    w_zero: np.ndarray  # () or (N,)
    w_scale: np.ndarray  # () or (N,) float32
    bias: torch.fx.Node | None


def _x_index(n) -> int:
    return 1 if n.target == aten.addmm.default else 0


def _w_index(n) -> int:
    return 2 if n.target == aten.addmm.default else 1


def match_linear(gm, n: torch.fx.Node) -> _Linear | str:
    """A linear-like node reading a fake-quant activation and a fake-quant constant weight."""
    if n.target == aten.addmm.default and (n.kwargs.get("beta", 1) != 1
                                           or n.kwargs.get("alpha", 1) != 1):
        return "addmm with beta/alpha != 1"
    x = describe_activation(gm, n.args[_x_index(n)])
    warg = n.args[_w_index(n)]
    transposed = False
    if isinstance(warg, torch.fx.Node) and warg.target in _TRANSPOSE:
        if warg.target == aten.permute.default and list(warg.args[1]) != [1, 0]:
            return "weight read through a permute that is not a 2-D transpose"
        if warg.target == aten.transpose.int and sorted(int(d) % 2 for d in warg.args[1:3]) \
                != [0, 1]:
            return "weight read through a transpose of other axes"
        warg, transposed = warg.args[0], True
    w = describe(gm, warg)
    if w is None:
        return "" if x is None else "only the activation is fake-quant (weight stays float)"
    if x is None:
        return "only the weight is fake-quant (activation float): weight-only, stays float"
    for fq, what in ((x, "activation"), (w, "weight")):
        if fq.grid is None:
            return f"{what} quantized to {fq.dtype} (only 8-bit folds)"
    if x.source is None:
        return "activation codes come from outside the graph"
    if x.axis is not None:
        return "per-channel activation quantization"
    if not w.static:
        return "weight parameters computed at run time"
    codes = weight_codes(gm, w)
    if codes.ndim != 2:
        return f"{codes.ndim}-D weight"
    # the (K, N) matrix x multiplies: linear consumes the weight argument transposed
    arg_codes = codes.T if transposed else codes
    axis = w.axis if not transposed or w.axis is None else 1 - w.axis
    if n.target == aten.linear.default:
        arg_codes, axis = arg_codes.T, (None if axis is None else 1 - axis)
    if axis is not None and axis != 1:
        return "per-channel scales that do not run along the output features"
    s = np.asarray(w.scale, np.float64).reshape(-1).astype(np.float32)
    z = np.asarray(w.zero, np.int64).reshape(-1)
    if axis is None:
        s, z = s.reshape(()), z.reshape(())
    if w.grid.dtype == "uint8":  # _int_mm takes int8: w − z = (w − 128) − (z − 128)
        arg_codes, z = arg_codes - 128, z - 128
    bias = n.args[2] if n.target == aten.linear.default and len(n.args) > 2 else (
        n.args[0] if n.target == aten.addmm.default else None)
    return _Linear(n, x, w, arg_codes, z, s, bias)


def rewrite_linear(gm: torch.fx.GraphModule, m: _Linear, weight_name: str) -> torch.fx.Node:
    n = m.node
    em = _Emitter(gm, n)
    k, cols = m.b_codes.shape
    _math.check_accumulator(k, m.x.grid, qmath.weight_grid(not np.any(m.w_zero)))
    iw = _math.int_weight(m.b_codes.astype(np.int8), m.w_zero)
    o = _math.offset(m.x.grid.dtype)
    xq = emit_codes(em, m.x, o, torch.int8)  # x − o, int8
    out_shape = _shape(n)
    x2 = em.call(aten.reshape.default, xq, [-1, k])
    b = em.const(weight_name, "int8", iw.codes, n)
    acc = em.call(aten._int_mm.default, x2, b)
    # (o − z_x)·(colsum(w) − K z_w): constant for a static zero point
    zx = _zero_tensor(em, m.x)
    if isinstance(zx, int):
        corr = (o - zx) * iw.colsum
        if np.any(corr):
            acc = em.call(aten.add.Tensor, acc,
                          em.const(weight_name, "int8_colsum", corr.astype(np.int32), n))
    else:
        col = em.const(weight_name, "int8_colsum", iw.colsum.astype(np.int32), n)
        d = em.call(aten.rsub.Scalar, zx, o)
        acc = em.call(aten.add.Tensor, acc, em.call(aten.mul.Tensor, col, d))
    if not iw.symmetric:
        rows = em.call(aten.sum.dim_IntList, em.call(aten.to.dtype, x2, torch.int32), [-1], True)
        zw = em.const(weight_name, "int8_zero_point",
                      np.broadcast_to(iw.zero_point, (cols,)).astype(np.int32), n)
        acc = em.call(aten.sub.Tensor, acc, em.call(aten.mul.Tensor, rows, zw))
    y = em.call(aten.to.dtype, acc, torch.float32)
    y = em.call(aten.reshape.default, y, out_shape) if out_shape is not None else y
    sx = _act_scale(m.x)
    if isinstance(sx, torch.fx.Node):
        sw = em.const(weight_name, "int8_scale", m.w_scale.astype(np.float32), n)
        scale = em.call(aten.mul.Tensor, em.call(aten.to.dtype, sx, torch.float32), sw)
    else:
        scale = em.const(weight_name, "int8_scale", _math.combined_scale(sx, m.w_scale), n)
    y = em.call(aten.mul.Tensor, y, scale)
    if m.bias is not None:
        y = em.call(aten.add.Tensor, y, m.bias)
    return y


def _shape(n: torch.fx.Node) -> list[int] | None:
    val = n.meta.get("val")
    shape = getattr(val, "shape", None)
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return [int(d) for d in shape]


# -- rule 2: activation × activation ---------------------------------------------------------
def match_matmul(gm, n: torch.fx.Node) -> tuple[FakeQuant, FakeQuant] | str:
    a, b = describe_activation(gm, n.args[0]), describe_activation(gm, n.args[1])
    if a is None and b is None:
        return ""
    if a is None or b is None:
        return "only one operand is fake-quant"
    for fq in (a, b):
        if fq.grid is None:
            return f"operand quantized to {fq.dtype} (only 8-bit folds)"
        if fq.axis is not None:
            return "per-channel operand"
        if fq.source is None:
            return "operand codes come from outside the graph"
    return a, b


def rewrite_matmul(gm: torch.fx.GraphModule, n: torch.fx.Node, a: FakeQuant,
                   b: FakeQuant) -> torch.fx.Node:
    em = _Emitter(gm, n)
    ops = []
    for fq in (a, b):
        c = emit_codes(em, fq, 0, torch.int32)
        z = _zero_tensor(em, fq)
        ops.append(em.call(aten.sub.Tensor, c, z) if not isinstance(z, int) or z else c)
    acc = em.call(n.target, *ops)
    y = em.call(aten.to.dtype, acc, torch.float32)
    sa, sb = _act_scale(a), _act_scale(b)
    if isinstance(sa, torch.fx.Node) or isinstance(sb, torch.fx.Node):
        fa = em.call(aten.to.dtype, sa, torch.float32) if isinstance(sa, torch.fx.Node) \
            else float(sa)
        fb = em.call(aten.to.dtype, sb, torch.float32) if isinstance(sb, torch.fx.Node) \
            else float(sb)
        scale = em.call(aten.mul.Tensor, fa, fb) if isinstance(fa, torch.fx.Node) \
            else em.call(aten.mul.Tensor, fb, fa)
    else:
        scale = float(_math.combined_scale(sa, sb))
    return em.call(aten.mul.Tensor, y, scale)


# -- rule 3: dequantize → quantize -----------------------------------------------------------
def cancel_dq_q(gm: torch.fx.GraphModule) -> int:
    done = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in Q_OPS:
            continue
        d = n.args[0]
        if not (isinstance(d, torch.fx.Node) and d.target in DQ_OPS):
            continue
        pq = (n.target.overloadpacket.__name__, *n.args[1:])
        pd = (d.target.overloadpacket.__name__.replace("de", "", 1), *d.args[1:])
        if pq == pd:
            n.replace_all_uses_with(d.args[0])
            gm.graph.erase_node(n)
            done += 1
    return done


# -- run-time parameters in aten ops ---------------------------------------------------------
def lower_choose_qparams(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``choose_qparams[_symmetric].tensor`` with the aten ops its reference
    implementation (torch.ao's ``determine_qparams``) runs, in the same order and dtypes, so
    the values are identical and TVM's frontend can import them: scale = max(range /
    (qmax − qmin), eps) in float32, widened to float64; zero point = clamp(qmin −
    round(min⁻ / scale)) (asymmetric) or 0 / 128 (symmetric)."""
    g = gm.graph
    done = 0
    for n in list(g.nodes):
        if n.op != "call_function" or n.target not in CHOOSE_OPS:
            continue
        x, qmin, qmax, eps, dtype = n.args[:5]
        if not all(u.target is operator.getitem for u in n.users):
            continue
        em = _Emitter(gm, n)
        lo = em.call(aten.clamp.default, em.call(aten.min.default, x), None, 0.0)
        hi = em.call(aten.clamp.default, em.call(aten.max.default, x), 0.0, None)
        if n.target == qd.choose_qparams_symmetric.tensor:
            top = em.call(aten.maximum.default, em.call(aten.neg.default, lo), hi)
            scale = em.call(aten.div.Tensor, top, float(qmax - qmin) / 2)
            zero_value = 128 if dtype == torch.uint8 else 0
        else:
            scale = em.call(aten.div.Tensor, em.call(aten.sub.Tensor, hi, lo),
                            float(qmax - qmin))
        scale = em.call(aten.clamp.default, scale, float(np.float32(eps)), None)
        if n.target == qd.choose_qparams_symmetric.tensor:
            zero = em.call(aten.full.default, [1], zero_value, dtype=torch.int64)
        else:
            r = em.call(aten.round.default, em.call(aten.div.Tensor, lo, scale))
            z = em.call(aten.rsub.Scalar, em.call(aten.to.dtype, r, torch.int32), qmin)
            zero = em.call(aten.to.dtype, em.call(aten.clamp.default, z, qmin, qmax),
                           torch.int64)
            zero = em.call(aten.reshape.default, zero, [1])
        scale = em.call(aten.reshape.default, em.call(aten.to.dtype, scale, torch.float64), [1])
        for u in list(n.users):
            u.replace_all_uses_with(scale if u.args[1] == 0 else zero)
            g.erase_node(u)
        g.erase_node(n)
        done += 1
    return done


# -- the pass --------------------------------------------------------------------------------
def _erase_dead(gm: torch.fx.GraphModule, nodes) -> None:
    """Erase ``nodes`` and what fed only them, bottom up; then delete weights no get_attr
    reads any more."""
    g = gm.graph
    todo = list(nodes)
    targets = set()
    while todo:
        n = todo.pop()
        if n.graph is not g or n.users or n.op in ("placeholder", "output"):
            continue
        if n.op == "call_module":
            continue
        ins = [a for a in n.all_input_nodes]
        if n.op == "get_attr":
            targets.add(n.target)
        g.erase_node(n)
        todo.extend(ins)
    live = {n.target for n in g.nodes if n.op == "get_attr"}
    for t in targets - live:
        owner, leaf = _owner(gm, t)
        if hasattr(owner, leaf):
            delattr(owner, leaf)


def _weight_attr(fq: FakeQuant) -> torch.fx.Node:
    if fq.source is not None:
        return fq.source
    return fq.codes if fq.codes is not None else fq.out.args[0]


def fold(gm: torch.fx.GraphModule, stats: dict) -> None:
    g = gm.graph
    for n in g.nodes:
        fq = describe(gm, n)
        if fq is not None:
            check(fq, f"fake-quant node {n.name!r}")
    stats["cancelled"] += cancel_dq_q(gm)
    dead = []
    for n in list(g.nodes):
        if n.op != "call_function":
            continue
        if n.target in _LINEAR and _const_fake(gm, _weight_arg(n)):
            m = match_linear(gm, n)
            if isinstance(m, str):
                stats["left_in_float"][n.name] = f"{_short(n.target)}: {m}"
                continue
            attr = _weight_attr(m.w)
            w = _fetch(gm, attr.target)
            before = int(w.numel() * w.element_size())
            y = rewrite_linear(gm, m, attr.target)
            n.replace_all_uses_with(y)
            dead.append(n)
            stats["folded"][n.name] = _short(n.target)
            stats["weights_folded"] += 1
            stats["weight_bytes_int"] += int(m.b_codes.size)
            stats["_float_weights"].add((attr.target, before))
        elif n.target in _ACT_MATMUL and any(_is_fake(a) for a in n.args[:2]):
            m = match_matmul(gm, n)
            if isinstance(m, str):
                stats["left_in_float"][n.name] = f"{_short(n.target)}: {m}"
                continue
            y = rewrite_matmul(gm, n, *m)
            n.replace_all_uses_with(y)
            dead.append(n)
            stats["folded"][n.name] = _short(n.target)
    if dead:
        # float weights nothing reads (PT2E's convert keeps the originals beside the codes)
        dead += [n for n in g.nodes if n.op == "get_attr" and not n.users]
        stats["lowered"] = lower_choose_qparams(gm)
    _erase_dead(gm, dead)
    live = {n.target for n in g.nodes if n.op == "get_attr"}
    gone = [(t, b) for t, b in stats.pop("_float_weights") if t not in live]
    stats["weight_bytes_float_removed"] = int(sum(b for _, b in gone))
    stats["float_weights_removed"] = len(gone)
    for n in g.nodes:
        if _is_fake(n):
            for u in n.users:
                if u.op == "call_function" and u.name not in stats["folded"]:
                    stats["left_in_float"].setdefault(
                        u.name, f"{_short(u.target)} reads fake-quant {n.name} and stays float")
    g.lint()
    gm.recompile()


def _weight_arg(n: torch.fx.Node):
    """A linear-like node's weight argument, seen through a transpose."""
    i = _w_index(n)
    w = n.args[i] if len(n.args) > i else None
    if isinstance(w, torch.fx.Node) and w.target in _TRANSPOSE:
        w = w.args[0]
    return w


def _const_fake(gm, n) -> bool:
    """Whether ``n`` is fake-quant of a constant (a weight)."""
    fq = describe(gm, n) if _is_fake(n) else None
    return fq is not None and _weight_attr(fq).op == "get_attr"
