"""A small read-only view of a graph that analyses share across backends.

Adapters (``ir/fx.py``, ``ir/onnx.py``) translate their graph into :class:`View`: nodes with a
canonical op name, the values they read and write, and what is known of each value (constant
weight, shape). Structure finding (``ir/attention.py``) is written once against this view.

Canonical ops: ``linear`` (inputs x; attrs weight, bias, layout, in_features, out_features),
``matmul``, ``softmax``, ``sdpa`` (inputs q, k, v, ...), ``attention_op`` (a fused ONNX
attention operator: com.microsoft Attention / MultiHeadAttention / GroupQueryAttention,
opset-23 Attention; attrs from :func:`slimc.ir.attention.fused_attention`), shape ops that keep
data (``reshape``, ``transpose``, ``expand``, ``identity``), ``split`` / ``slice`` / ``select``
(attrs index), ``concat``, ``elementwise`` and ``other``. Every node that is not a ``linear``
or an ``attention_op`` also carries ``attrs["fn"]``: the backend's own name of the op (an aten
op name such as ``gelu``, or an ONNX op type such as ``Erf`` / ``com.microsoft::BiasGelu``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

# Ops a value passes through unchanged in meaning while we trace a projection to its attention.
SHAPE_OPS = frozenset({"reshape", "transpose", "expand", "identity", "split", "slice", "select"})
DATA_OPS = SHAPE_OPS | {"elementwise", "concat"}


@dataclass
class VNode:
    name: str
    op: str
    inputs: list[str]  # data inputs only (not shape tensors, not weights of a linear)
    outputs: list[str]
    attrs: dict = field(default_factory=dict)
    order: int = 0


class View:
    def __init__(self, nodes: list[VNode], shapes: dict[str, tuple | None]):
        self.nodes = nodes
        self.shapes = shapes
        self.producer: dict[str, VNode] = {}
        self.consumers: dict[str, list[VNode]] = defaultdict(list)
        for i, n in enumerate(nodes):
            n.order = i
            for o in n.outputs:
                self.producer[o] = n
            for v in n.inputs:
                self.consumers[v].append(n)
        self.by_name = {n.name: n for n in nodes}

    def shape(self, value: str) -> tuple | None:
        return self.shapes.get(value)


def dotted_prefix(names: list[str]) -> str:
    """The dotted segments all of ``names`` (two or more) start with, e.g. ``encoder.layer.0``
    for ``encoder.layer.0.attention.query`` and ``encoder.layer.0.output.dense``; "" when there
    are fewer than two names or nothing in common. Discovery names blocks with it."""
    if len(names) < 2:
        return ""
    common = []
    for seg in zip(*(n.split(".") for n in names)):
        if len(set(seg)) != 1:
            break
        common.append(seg[0])
    return ".".join(common)
