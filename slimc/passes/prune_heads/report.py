"""What head pruning did, for people: FLOPs, a table of removed heads, an importance heatmap."""

from __future__ import annotations

import math


def _numel(shape) -> int | None:
    if shape is None or any(not isinstance(d, int) for d in shape):
        return None
    return math.prod(shape)


def _live_nodes(graph, view) -> list:
    """View nodes whose results reach a graph output (dead code costs nothing at run time)."""
    if graph.backend == "fx":
        out = next(n for n in graph.native.graph.nodes if n.op == "output")
        need = {a.name for a in out.all_input_nodes}
    else:
        need = {o.name for o in graph.native.graph.output}
    live = []
    for n in reversed(view.nodes):
        if any(o in need for o in n.outputs):
            live.append(n)
            need.update(n.inputs)
            need.update(v for k, v in n.attrs.items() if k in ("weight_value",))
    return live[::-1]


def count_flops(graph) -> int:
    """Multiply-accumulate work of the projections and matmuls, as 2·M·N·K FLOPs per product
    (elementwise ops, softmax and norms are left out: they are a few % of a Transformer)."""
    view = graph.view()
    if graph.backend == "onnx":  # exporters leave value_info partial; measure every shape
        from .onnx import probe_shapes
        view.shapes.update(probe_shapes(graph.native, graph.sample_inputs())[0])
    total = 0
    for n in _live_nodes(graph, view):
        if n.op == "linear":
            rows = _numel((view.shape(n.outputs[0]) or (None,))[:-1])
            if rows is not None:
                total += 2 * rows * n.attrs["in_features"] * n.attrs["out_features"]
        elif n.op == "matmul" and len(n.inputs) >= 2:
            out, a = view.shape(n.outputs[0]), view.shape(n.inputs[0])
            if _numel(out) is not None and a and isinstance(a[-1], int):
                total += 2 * _numel(out) * a[-1]
        elif n.op == "sdpa" and len(n.inputs) >= 3:
            q, k = view.shape(n.inputs[0]), view.shape(n.inputs[1])
            v = view.shape(n.inputs[2])
            if _numel(q) is not None and k and v and isinstance(k[-2], int):
                total += 2 * _numel(q) * k[-2] + 2 * _numel(q[:-1]) * k[-2] * v[-1]
    return int(total)
