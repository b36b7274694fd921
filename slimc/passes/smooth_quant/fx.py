"""FX side of SmoothQuant: the producers whose per-feature parameters can absorb 1/s, and who
reads a value. Smoothing itself only rewrites weights (Graph.set_weight): no graph surgery."""

from __future__ import annotations

import numpy as np
import torch
import torch.fx

from ...ir.fx import _fetch
from ...ir.view import View
from ._math import OUTPUT, Producer

aten = torch.ops.aten


def _const(gm, a) -> str | None:
    """The get_attr target of a tensor constant argument, else None."""
    if isinstance(a, torch.fx.Node) and a.op == "get_attr" \
            and isinstance(_fetch(gm, a.target), torch.Tensor):
        return a.target
    return None


def _features(n: torch.fx.Node) -> int | None:
    val = n.meta.get("val")
    shape = getattr(val, "shape", None)
    return int(shape[-1]) if shape is not None and len(shape) and isinstance(shape[-1], int) \
        else None


def producers(gm: torch.fx.GraphModule, view: View) -> list[Producer]:
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in (aten.layer_norm.default, aten.rms_norm.default):
            shape = n.args[1] if len(n.args) > 1 else None
            gamma = _const(gm, n.args[2]) if len(n.args) > 2 else None
            beta = (_const(gm, n.args[3]) if n.target == aten.layer_norm.default
                    and len(n.args) > 3 else None)
            has_beta = n.target == aten.layer_norm.default and len(n.args) > 3 \
                and n.args[3] is not None
            if (isinstance(shape, (list, tuple)) and len(shape) == 1 and gamma is not None
                    and (beta is not None or not has_beta)):
                out.append(Producer(n.name, "layernorm", n.name, int(shape[0]),
                                    {"gamma": gamma, "beta": beta}, frozenset({n.name})))
        elif n.target == aten.mul.Tensor and len(n.args) == 2:
            feats = _features(n)
            for a, b in (n.args, n.args[::-1]):
                g = _const(gm, a)
                if g is not None and isinstance(b, torch.fx.Node) and b.op != "get_attr" \
                        and _fetch(gm, g).dim() == 1 and _fetch(gm, g).numel() == feats:
                    out.append(Producer(n.name, "scale", n.name, feats, {"gamma": g},
                                        frozenset({n.name})))
                    break
    for v in view.nodes:
        if v.op == "linear":
            out.append(Producer(v.name, "linear", v.outputs[0], int(v.attrs["out_features"]),
                                {"weight": v.attrs["weight"], "bias": v.attrs["bias"],
                                 "layout": v.attrs["layout"]}, frozenset({v.name})))
    return out


def readers(gm: torch.fx.GraphModule):
    nodes = {n.name: n for n in gm.graph.nodes}

    def read(value: str) -> list[str]:
        return [u.name if u.op == "call_function" else OUTPUT for u in nodes[value].users]
    return read


def unshare(gm: torch.fx.GraphModule):
    """``unshare(producer, names)``: give the producer node private copies of the named
    parameters (new buffers beside them, read by new get_attr nodes); None if it cannot."""
    from dataclasses import replace

    from ..quantize.fx import add_buffer, set_meta_const
    nodes = {n.name: n for n in gm.graph.nodes}

    def run(p: Producer, names: list[str]) -> Producer | None:
        if p.kind == "linear":
            return None  # a Linear reads its weight through transposes: leave it alone
        n = nodes[p.node]
        params = dict(p.params)
        for name in names:
            old = [a for a in n.all_input_nodes if a.op == "get_attr" and a.target == name]
            if not old:
                return None
            target = add_buffer(gm, name, "smooth", _fetch(gm, name).detach().clone().numpy())
            with gm.graph.inserting_before(n):
                new = gm.graph.get_attr(target)
            set_meta_const(gm, new, old[0])
            n.replace_input_with(old[0], new)
            params = {k: (target if v == name else v) for k, v in params.items()}
        gm.recompile()
        return replace(p, params=params)
    return run


def insert_scale(gm: torch.fx.GraphModule, value: str, readers: list[str],
                 inv_s: np.ndarray) -> None:
    """y = value · inv_s (a new buffer on the root module), read by ``readers`` instead of
    ``value``."""
    from ..quantize.fx import set_meta, set_meta_const
    nodes = {n.name: n for n in gm.graph.nodes}
    src = nodes[value]
    name, i = "smooth_quant_scale", 0
    while hasattr(gm, f"{name}{i}"):
        i += 1
    gm.register_buffer(f"{name}{i}", torch.from_numpy(np.ascontiguousarray(inv_s)))
    with gm.graph.inserting_after(src):
        attr = gm.graph.get_attr(f"{name}{i}")
    with gm.graph.inserting_after(attr):
        mul = gm.graph.call_function(aten.mul.Tensor, (src, attr))
    set_meta_const(gm, attr, src)
    set_meta(mul)
    for r in readers:
        nodes[r].replace_input_with(src, mul)
    gm.graph.lint()
    gm.recompile()
