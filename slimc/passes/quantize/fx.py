"""FX side of quantize: find the Linear/MatMul nodes, observe their inputs, insert fake-quant.

Fake-quant is written with PyTorch's ``quantized_decomposed`` operators, the form PT2E
quantization (``convert_pt2e``) produces and torch.export keeps as is:
static ``dequantize_per_tensor(quantize_per_tensor(x, s, z, qmin, qmax, dtype), ...)`` with the
parameters as literals; dynamic ``choose_qparams`` at run time feeding the ``.tensor`` overloads;
weights ``dequantize_per_channel(quantize_per_channel(W, scales, zero_points, axis, ...), ...)``
(or per tensor) with the parameters as buffers next to the weight.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # registers torch.ops.quantized_decomposed
import torch.fx

from ...ir.fx import _fetch, build_view
from .. import _calib
from ..threshold_weights.fx import WEIGHT_ARG
from . import _math
from ._math import QParams, Spec, Target

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed

_TRANSPOSE = {aten.t.default, aten.transpose.int, aten.permute.default}
_DTYPES = {"int8": torch.int8, "uint8": torch.uint8}
# ops whose output is already dequantized: their consumers are quantized already
DEQUANTIZE = {qd.dequantize_per_tensor.default, qd.dequantize_per_tensor.tensor,
              qd.dequantize_per_tensor.tensor2, qd.dequantize_per_channel.default,
              aten.fake_quantize_per_tensor_affine.default,
              aten.fake_quantize_per_tensor_affine.tensor_qparams,
              aten.fake_quantize_per_channel_affine.default,
              aten.fused_moving_avg_obs_fake_quant.default}


def _float32(n) -> bool:
    val = n.meta.get("val") if isinstance(n, torch.fx.Node) else None
    return val is None or getattr(val, "dtype", None) == torch.float32


def _x_arg(n: torch.fx.Node) -> int:
    return 1 if n.target == aten.addmm.default else 0


def plan(gm: torch.fx.GraphModule, spec: Spec) -> tuple[list[Target], dict[str, str]]:
    """The nodes to quantize, and the ones left alone with the reason."""
    view = build_view(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    targets, skipped = [], {}
    for v in view.nodes:
        if v.op not in ("linear", "matmul"):
            continue
        n = nodes[v.name]
        if v.op not in spec.ops:
            skipped[v.name] = f"{v.op} not in ops="
            continue
        weight = v.attrs.get("weight")
        if spec.excluded(v.name, weight or ""):
            skipped[v.name] = "excluded by exclude="
            continue
        if v.op == "linear":
            acts = [n.args[_x_arg(n)]]
            if not isinstance(acts[0], torch.fx.Node):
                skipped[v.name] = "input is not a tensor"
                continue
            w = _fetch(gm, weight)
            if w.dtype != torch.float32:
                skipped[v.name] = f"weight is {w.dtype}, not float32"
                continue
            axis = 0 if v.attrs["layout"] == "out_in" else 1
        else:
            acts = [a for a in n.args[:2] if isinstance(a, torch.fx.Node)]
            if len(acts) != 2 or any(a.op == "get_attr" for a in acts):
                skipped[v.name] = "matmul with a constant operand that is not a 2-D weight"
                continue
            axis = None
        if any(a.op == "call_function" and a.target in DEQUANTIZE for a in acts):
            skipped[v.name] = "already quantized (an input comes from a dequantize)"
            continue
        if not all(_float32(a) for a in acts):
            skipped[v.name] = "input is not float32"
            continue
        targets.append(Target(v.name, v.op, tuple(a.name for a in acts), weight, axis))
    return targets, skipped


def weight_array(gm: torch.fx.GraphModule, target: Target) -> np.ndarray:
    """The weight as stored (``target.weight_axis`` indexes this array)."""
    return _fetch(gm, target.weight).detach().cpu().numpy()


def observe(gm: torch.fx.GraphModule, values: list[str],
            batches: list[tuple]) -> dict[str, _math.Observer]:
    """Run every batch through the graph and record the values named."""
    observers = {v: _math.Observer() for v in values}
    _calib.run(gm, values, batches, lambda v, x: observers[v].update(x))
    return observers


# -- insertion -------------------------------------------------------------------------------
def _owner(gm: torch.fx.GraphModule, target: str) -> tuple[torch.nn.Module, str]:
    *path, leaf = target.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    return owner, leaf


def add_buffer(gm: torch.fx.GraphModule, near: str, suffix: str, value: np.ndarray) -> str:
    """A new buffer on the module owning ``near``, named ``{leaf}_{suffix}``; its target."""
    owner, leaf = _owner(gm, near)
    name, i = f"{leaf}_{suffix}", 1
    while hasattr(owner, name):
        name, i = f"{leaf}_{suffix}{i}", i + 1
    owner.register_buffer(name, torch.as_tensor(np.ascontiguousarray(value)))
    return near[: -len(leaf)] + name


def set_meta(n: torch.fx.Node) -> None:
    """Shape metadata for a new node, computed on its inputs' fake values (best effort: the
    View reads shapes from it; the graph is right without)."""
    def val(a):
        if isinstance(a, torch.fx.Node):
            if "val" not in a.meta:
                raise KeyError(a.name)
            return a.meta["val"]
        return a
    try:
        args = torch.fx.node.map_aggregate(n.args, val)
        vals = [a for a in torch.utils._pytree.tree_leaves(args)
                if isinstance(a, torch.Tensor)]
        mode = getattr(vals[0], "fake_mode", None) if vals else None
        if mode is None:
            return
        with mode:
            n.meta["val"] = n.target(*args, **n.kwargs)
    except Exception:  # noqa: BLE001, S110 - metadata only
        pass


def _call(g: torch.fx.Graph, op, args: tuple) -> torch.fx.Node:
    n = g.call_function(op, args)
    set_meta(n)
    return n


def _static(g, x, qp: QParams) -> torch.fx.Node:
    s, z = float(qp.scale), int(qp.zero_point)
    dt = _DTYPES[qp.grid.dtype]
    q = _call(g, qd.quantize_per_tensor.default, (x, s, z, qp.grid.qmin, qp.grid.qmax, dt))
    return _call(g, qd.dequantize_per_tensor.default, (q, s, z, qp.grid.qmin, qp.grid.qmax, dt))


def _dynamic(g, x, grid: _math.Grid, symmetric: bool) -> torch.fx.Node:
    choose = qd.choose_qparams_symmetric.tensor if symmetric else qd.choose_qparams.tensor
    eps = float(torch.finfo(torch.float32).eps)
    dt = _DTYPES[grid.dtype]
    params = _call(g, choose, (x, grid.qmin, grid.qmax, eps, dt))
    s = g.call_function(operator.getitem, (params, 0))
    z = g.call_function(operator.getitem, (params, 1))
    q = _call(g, qd.quantize_per_tensor.tensor, (x, s, z, grid.qmin, grid.qmax, dt))
    return _call(g, qd.dequantize_per_tensor.tensor, (q, s, z, grid.qmin, grid.qmax, dt))


def _weight(gm, g, attr: torch.fx.Node, qp: QParams) -> torch.fx.Node:
    dt = _DTYPES[qp.grid.dtype]
    lo, hi = qp.grid.qmin, qp.grid.qmax
    if not qp.per_channel:
        s, z = float(qp.scale), int(qp.zero_point)
        q = _call(g, qd.quantize_per_tensor.default, (attr, s, z, lo, hi, dt))
        return _call(g, qd.dequantize_per_tensor.default, (q, s, z, lo, hi, dt))
    s_attr = g.get_attr(add_buffer(gm, attr.target, "scale", qp.scale.astype(np.float32)))
    z_attr = g.get_attr(add_buffer(gm, attr.target, "zero_point",
                                   qp.zero_point.astype(np.int64)))
    for a in (s_attr, z_attr):
        set_meta_const(gm, a, attr)
    q = _call(g, qd.quantize_per_channel.default, (attr, s_attr, z_attr, qp.axis, lo, hi, dt))
    return _call(g, qd.dequantize_per_channel.default,
                 (q, s_attr, z_attr, qp.axis, lo, hi, dt))


def set_meta_const(gm: torch.fx.GraphModule, n: torch.fx.Node, like: torch.fx.Node) -> None:
    """A get_attr's fake value, made in the fake mode of ``like``'s."""
    mode = getattr(like.meta.get("val"), "fake_mode", None)
    if mode is not None:
        n.meta["val"] = mode.from_tensor(_fetch(gm, n.target))


def insert(gm: torch.fx.GraphModule, targets: list[Target], act: dict[str, QParams | None],
           weights: dict[str, QParams], spec: Spec) -> int:
    """Insert fake-quant on every target's activations and weight; returns the number of
    quantize/dequantize pairs inserted. ``act[value] is None`` means dynamic."""
    g = gm.graph
    nodes = {n.name: n for n in g.nodes}
    pairs = 0
    act_dq: dict[str, torch.fx.Node] = {}
    for value in dict.fromkeys(v for t in targets for v in t.inputs):
        x = nodes[value]
        # right before its first quantized user, so the chain reads in order
        anchor = _first_user(x, {nodes[t.node] for t in targets if value in t.inputs})
        with g.inserting_before(anchor):
            qp = act[value]
            act_dq[value] = (_static(g, x, qp) if qp is not None
                             else _dynamic(g, x, _dynamic_grid(spec), spec.symmetric))
        pairs += 1
    w_dq: dict[str, torch.fx.Node] = {}
    for t in targets:
        n = nodes[t.node]
        for value in dict.fromkeys(t.inputs):
            n.replace_input_with(nodes[value], act_dq[value])
        if t.weight is None:
            continue
        idx = WEIGHT_ARG[n.target]
        warg = n.args[idx]
        attr = warg if warg.op == "get_attr" else warg.args[0]
        if t.weight not in w_dq:
            with g.inserting_before(warg if warg.op != "get_attr" else n):
                w_dq[t.weight] = _weight(gm, g, attr, weights[t.weight])
            pairs += 1
        dq = w_dq[t.weight]
        args = list(n.args)
        if warg.op == "get_attr":
            args[idx] = dq
        else:  # the weight is read through a transpose: transpose the dequantized weight
            with g.inserting_before(n):
                tr = _call(g, warg.target, (dq, *warg.args[1:]))
            args[idx] = tr
        n.args = tuple(args)
        for dead in (warg, attr):
            if not dead.users and dead.op != "placeholder":
                g.erase_node(dead)
    g.lint()
    gm.recompile()
    return pairs


def _dynamic_grid(spec: Spec) -> _math.Grid:
    # torch's symmetric choose_qparams divides max|x| by (qmax − qmin) / 2: [-127, 127] gives
    # max|x| / 127 like the static case
    return _math.WEIGHT_SYMMETRIC if spec.symmetric else _math.ACT_ASYMMETRIC


def _first_user(x: torch.fx.Node, users: set) -> torch.fx.Node:
    for n in x.graph.nodes:
        if n in users:
            return n
    raise KeyError(x.name)
