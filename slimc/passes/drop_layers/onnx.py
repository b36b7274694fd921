"""Layer dropping on an ``onnx.ModelProto``: rewire only.

Every node that reads a dropped layer's output value reads its input value instead; a graph
output keeps its name and becomes an ``Identity`` of the input value. Then the nodes and
initializers left without readers go (``ir.surgery.drop_unused``, walking up from the old
output) and the nodes are put back in topological order.
"""

from __future__ import annotations

import onnx
from onnx import helper

from ...ir.surgery import Namer, drop_unused, toposort


def drop(model: onnx.ModelProto, subs: list[tuple[str, str]]) -> None:
    """Apply ``subs`` (``(output, input)`` value names, last layer first) to ``model`` in
    place."""
    g = model.graph
    fresh = Namer(model)
    outputs = {o.name for o in g.output}
    dead = []
    for out, inp in subs:
        if out in outputs:  # keep the interface: the output is now a copy of the input
            old = fresh(f"{out}_dropped")
            for n in g.node:
                for i, o in enumerate(n.output):
                    if o == out:
                        n.output[i] = old
                for i, v in enumerate(n.input):
                    if v == out:
                        n.input[i] = inp
            g.node.append(helper.make_node("Identity", [inp], [out],
                                           name=fresh(f"{out}_identity")))
            dead.append(old)
        else:
            for n in g.node:
                for i, v in enumerate(n.input):
                    if v == out:
                        n.input[i] = inp
            dead.append(out)
    drop_unused(model, dead)
    toposort(model)


__all__ = ["drop"]
