"""ONNX side of weight thresholding: who uses each weight (initializer or Constant).

A weight is read either directly or through ``Identity`` / ``Transpose`` aliases (as
:func:`slimc.ir.onnx.constants` resolves them); an alias is not a use, its consumers are.
"""

from __future__ import annotations

from collections import defaultdict

import onnx

from ...ir.onnx import _attr, build_view, constants
from ...ir.view import View
from ._math import Use


def _subgraph_names(node: onnx.NodeProto) -> set[str]:
    """Every value name read inside a node's subgraphs (If / Loop / Scan bodies)."""
    names = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else (
            list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else [])
        for g in graphs:
            for n in g.node:
                names.update(n.input)
                names |= _subgraph_names(n)
    return names


def _is_alias(node: onnx.NodeProto, consts: dict) -> bool:
    return (node.op_type in ("Identity", "Transpose") and len(node.output) == 1
            and node.output[0] in consts and node.input and node.input[0] in consts
            and consts[node.output[0]][0] == consts[node.input[0]][0])


def _classify(node: onnx.NodeProto, name: str, pos: int, value: str, transposed: bool,
              linear: dict) -> Use:
    lin = linear.get(name)
    if lin is not None and pos == 1 and lin.attrs.get("weight_value") == value:
        return Use("linear", name, lin.attrs["layout"])
    if node.op_type == "Conv" and pos == 1 and not transposed:
        return Use("conv", name)
    if (node.op_type == "Gather" and pos == 0 and not transposed
            and _attr(node, "axis", 0) == 0):
        return Use("embedding", name)
    return Use("other", name)


def weight_uses(model: onnx.ModelProto, view: View | None = None) -> dict[str, list[Use]]:
    """Every constant weight → how each node that reads it (through aliases) uses it."""
    linear = {n.name: n for n in (view or build_view(model)).nodes if n.op == "linear"}
    consts = constants(model)
    uses: dict[str, list[Use]] = defaultdict(list)
    g = model.graph
    for idx, n in enumerate(g.node):
        name = n.name or f"{n.op_type}_{idx}"  # the View's naming
        if _is_alias(n, consts):
            continue
        for pos, v in enumerate(n.input):
            if v in consts:
                src, transposed = consts[v]
                uses[src].append(_classify(n, name, pos, v, transposed, linear))
        for v in _subgraph_names(n):
            if v in consts:
                uses[consts[v][0]].append(Use("other", name))
    for o in g.output:
        if o.name in consts:
            uses[consts[o.name][0]].append(Use("other", "graph output " + o.name))
    return dict(uses)
