"""FX surgery for low-rank factorisation: one linear-like node becomes two.

``linear(x, M, b)`` → ``linear(linear(x, R), L, b)``; ``mm/matmul(x, M)`` → ``op(op(x, L), R)``;
``addmm(b, x, M)`` → ``addmm(b, mm(x, L), R)`` (same beta / alpha). The original node is edited
in place, so its name, metadata and users stay; the factors are new parameters next to the old
weight, which is deleted once nothing reads it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx

from ...ir.fx import _fetch
from ..threshold_weights.fx import WEIGHT_ARG
from ._math import Factors

aten = torch.ops.aten


def _weight_nodes(n: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
    """(the node passed as weight, the get_attr under it); they differ when the weight is read
    through a transpose."""
    wn = n.args[WEIGHT_ARG[n.target]]
    return wn, (wn if wn.op == "get_attr" else wn.args[0])


def _node(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    for n in gm.graph.nodes:
        if n.name == name:
            return n
    raise KeyError(name)


def weight_matrix(gm: torch.fx.GraphModule, node_name: str) -> np.ndarray:
    """The matrix the node consumes as its weight argument."""
    wn, attr = _weight_nodes(_node(gm, node_name))
    w = _fetch(gm, attr.target).detach().cpu().numpy()
    return w if wn is attr else w.T


def _owner(gm: torch.fx.GraphModule, target: str) -> tuple[torch.nn.Module, str]:
    *path, leaf = target.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    return owner, leaf


def _add_weight(gm: torch.fx.GraphModule, like: str, suffix: str, value: np.ndarray) -> str:
    """A new weight stored like ``like`` (parameter / buffer / attribute), on the same module."""
    owner, leaf = _owner(gm, like)
    old = getattr(owner, leaf)
    name, i = f"{leaf}_{suffix}", 1
    while hasattr(owner, name):
        name, i = f"{leaf}_{suffix}{i}", i + 1
    t = torch.as_tensor(np.ascontiguousarray(value)).to(old.dtype)
    if leaf in owner._parameters:
        owner.register_parameter(name, torch.nn.Parameter(t, requires_grad=old.requires_grad))
    elif leaf in owner._buffers:
        owner.register_buffer(name, t)
    else:
        setattr(owner, name, t)
    prefix = like[: -len(leaf)]
    return prefix + name


def _fake_val(ref: torch.fx.Node, tensor: torch.Tensor):
    val = ref.meta.get("val")
    mode = getattr(val, "fake_mode", None)
    return mode.from_tensor(tensor) if mode is not None else None


def _factorize_node(gm: torch.fx.GraphModule, n: torch.fx.Node, f: Factors) -> None:
    wn, attr = _weight_nodes(n)
    is_linear = n.target == aten.linear.default
    # linear consumes M as (out, in): x Mᵀ = (x Rᵀ) Lᵀ, so R is applied first
    first, second = (f.right, f.left) if is_linear else (f.left, f.right)
    first_op = aten.mm.default if n.target == aten.addmm.default else n.target
    x_idx = 1 if n.target == aten.addmm.default else 0
    x = n.args[x_idx]
    t_first = _add_weight(gm, attr.target, "lr_in", first)
    t_second = _add_weight(gm, attr.target, "lr_out", second)
    g = gm.graph
    with g.inserting_before(n):
        a_first = g.get_attr(t_first)
        a_second = g.get_attr(t_second)
        h = g.call_function(first_op, (x, a_first))
    args = list(n.args)
    args[x_idx] = h
    args[WEIGHT_ARG[n.target]] = a_second
    n.args = tuple(args)
    # shapes for later analyses (the View reads meta["val"])
    for node, target in ((a_first, t_first), (a_second, t_second)):
        val = _fake_val(attr, _fetch(gm, target))
        if val is not None:
            node.meta["val"] = val
    if "val" in a_first.meta and isinstance(x, torch.fx.Node) and "val" in x.meta:
        try:
            h.meta["val"] = first_op(x.meta["val"], a_first.meta["val"])
        except Exception:  # noqa: BLE001, S110 - best effort: the graph is right without it
            pass
    if not wn.users:
        g.erase_node(wn)
    if attr is not wn and not attr.users:
        g.erase_node(attr)
    if not any(m.op == "get_attr" and m.target == attr.target for m in g.nodes):
        owner, leaf = _owner(gm, attr.target)
        delattr(owner, leaf)


def factorize(gm: torch.fx.GraphModule, plan: list[tuple[str, Factors]]) -> None:
    """Rewrite every (node name, factors) of ``plan`` in place."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, f in plan:
        _factorize_node(gm, nodes[name], f)
    gm.graph.lint()
    gm.recompile()
