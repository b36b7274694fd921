"""ONNX surgery for low-rank factorisation: ``MatMul(x, M)`` → ``MatMul(MatMul(x, L), R)``;
``Gemm(x, B, C)`` → ``Gemm(MatMul(x, L), R, C)`` with transB=0 and alpha/beta kept.

The original node keeps its place, name and output; the new MatMul goes right before it (so the
node list stays topologically sorted). The old weight, and any Identity / Transpose alias that
only fed it, are removed once nothing reads them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...ir.onnx import _attr, constants, get_weight
from ..threshold_weights.onnx import _subgraph_names
from ._math import Factors


def _index(model: onnx.ModelProto, names: set[str]) -> dict[str, int]:
    """Node positions by the View's name (``name`` or ``{op_type}_{index}``)."""
    return {(n.name or f"{n.op_type}_{i}"): i for i, n in enumerate(model.graph.node)
            if (n.name or f"{n.op_type}_{i}") in names}


def _consumed(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    """The (in, out) matrix the node multiplies its input by."""
    src, transposed = constants(model)[node.input[1]]
    w = get_weight(model, src)
    w = w.T if transposed else w
    if node.op_type == "Gemm" and _attr(node, "transB", 0):
        w = w.T
    return w


def weight_matrix(model: onnx.ModelProto, node_name: str) -> np.ndarray:
    return _consumed(model, model.graph.node[_index(model, {node_name})[node_name]])


def _taken(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    names = {i.name for i in g.initializer} | {i.name for i in g.input}
    for n in g.node:
        names.update(n.output)
        names.add(n.name)
    return names


def _fresh(base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}{i}", i + 1
    taken.add(name)
    return name


def _drop_if_unused(model: onnx.ModelProto, value: str) -> None:
    """Remove ``value``'s producer (an alias or Constant) or initializer if nothing reads it,
    and walk up through aliases."""
    g = model.graph
    if (any(value in n.input for n in g.node) or any(o.name == value for o in g.output)
            or any(value in _subgraph_names(n) for n in g.node)):
        return
    for i, vi in enumerate(g.value_info):
        if vi.name == value:
            del g.value_info[i]
            break
    for i, n in enumerate(g.node):
        if value in n.output:
            if n.op_type in ("Identity", "Transpose", "Constant"):
                del g.node[i]
                for up in n.input:
                    _drop_if_unused(model, up)
            return
    for seq in (g.initializer, g.input):
        for i, t in enumerate(seq):
            if t.name == value:
                del seq[i]
                break


def _factorize_node(model: onnx.ModelProto, pos: int, f: Factors, taken: set[str]) -> str:
    """Rewrite the node at ``pos``; return the weight value it no longer reads."""
    g = model.graph
    node = g.node[pos]
    src = constants(model)[node.input[1]][0]
    old_value = node.input[1]
    n_left = _fresh(f"{src}_lr_in", taken)
    n_right = _fresh(f"{src}_lr_out", taken)
    g.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(f.left), n_left),
                          numpy_helper.from_array(np.ascontiguousarray(f.right), n_right)])
    hidden = _fresh(f"{node.output[0]}_lr", taken)
    first = helper.make_node("MatMul", [node.input[0], n_left], [hidden],
                             name=_fresh(f"{node.name or node.op_type}_lr_in", taken))
    node.input[0] = hidden
    node.input[1] = n_right
    if node.op_type == "Gemm":
        for a in node.attribute:
            if a.name == "transB":
                a.i = 0
    g.node.insert(pos, first)
    return old_value


def factorize(model: onnx.ModelProto, plan: list[tuple[str, Factors]]) -> None:
    """Rewrite every (node name, factors) of ``plan`` in place. Nodes are resolved to positions
    first and rewritten from the last one back, so an insertion never shifts a node still to be
    rewritten."""
    pos = _index(model, {name for name, _ in plan})
    taken = _taken(model)
    old = [_factorize_node(model, pos[name], f, taken)
           for name, f in sorted(plan, key=lambda p: -pos[p[0]])]
    # only now: removing dead aliases shifts positions
    for value in old:
        _drop_if_unused(model, value)
