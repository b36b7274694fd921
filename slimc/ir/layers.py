"""Find whole Transformer layers in a :class:`~slimc.ir.view.View`, whatever the backend.

A layer is recognised from the residual stream, anchored on the blocks discovery already
finds (:mod:`slimc.ir.attention`, :mod:`slimc.ir.ffn`):

1. From an attention block's output projection we walk *down* through ops that read one value
   (bias add, dropout, casts, reshapes) to the first ``add`` of two values: the attention's
   residual add ``r1 = x + attn(...)``. Its other operand ``x`` is the layer's input.
2. The same walk from an FFN block's down projection gives its residual add ``r2 = res +
   ffn(...)``. The FFN belongs to the attention when ``res`` is ``r1`` itself (pre-norm: x →
   LN → attn → add → LN → FFN → add; GPT-2, LLaMA, ViT) or the output of a norm that only
   ``r1`` feeds (post-norm: x → attn → add → LN → FFN → add → LN; BERT, DistilBERT,
   ``nn.TransformerEncoderLayer``). Casts between ``r1`` and ``res`` (LLaMA's RMSNorm casts
   the stream first, and torch.export names the residual by that cast) are no norm.
3. The layer's output is ``r2`` (pre-norm), or (post-norm) the output of the norm after
   ``r2``: the next layer's input when a self-contained region leads there from ``r2``, else
   (the last layer) the first value below ``r2`` reached by a self-contained region of the same
   ops as the norm after ``r1``.

A region between two values is *self-contained* when every op reading a value inside it (its
start included) is inside it, so replacing its end by its start leaves none of it alive.
Checks: the attention's q/k/v inputs are computed from the layer's input, the FFN's input from
``r1``. An attention whose input is another attention's residual (a decoder layer's
cross-attention) does not start a layer of its own; such layers are not listed.
"""

from __future__ import annotations

from collections import deque

from .structures import AttentionBlock, FFNBlock, TransformerLayer
from .view import View, VNode, dotted_prefix

# Nodes that only check a value (torch.export's dtype/shape assertions): not a use of it.
_CHECKS = frozenset({"_assert_tensor_metadata", "_assert_scalar"})
_ADD = frozenset({"add", "Add"})
_MAX_WALK = 16      # ops between a projection and its residual add
_MAX_REGION = 48    # nodes of a norm (decomposed RMSNorm / LayerNorm: ~10)
_MAX_REACH = 96     # nodes searched between a layer input and its projections


def _users(view: View, value: str) -> list[VNode]:
    return [c for c in view.consumers.get(value, []) if c.attrs.get("fn") not in _CHECKS]


def _residual_add(view: View, value: str) -> tuple[VNode, str] | None:
    """From a projection's output down to the add of two values: (add node, other operand)."""
    v = value
    for _ in range(_MAX_WALK):
        users = _users(view, v)
        if len(users) != 1 or len(users[0].outputs) != 1:
            return None
        n = users[0]
        if n.op == "elementwise" and n.attrs.get("fn") in _ADD and len(n.inputs) == 2 \
                and v in n.inputs and n.inputs[0] != n.inputs[1]:
            other = n.inputs[1] if n.inputs[0] == v else n.inputs[0]
            a, b = view.shape(other), view.shape(n.outputs[0])
            if a is not None and b is not None and len(a) != len(b):
                return None  # a broadcast add, not the residual stream
            return n, other
        if n.op in ("identity", "reshape", "transpose") \
                or n.op == "elementwise" and len(n.inputs) == 1:
            v = n.outputs[0]
            continue
        return None
    return None


def _reaches(view: View, start: str, targets: set[str]) -> bool:
    """Whether some value of ``targets`` is computed from ``start`` (a bounded forward walk)."""
    if start in targets:
        return True
    seen, queue = {start}, deque([start])
    while queue and len(seen) < _MAX_REACH:
        for n in _users(view, queue.popleft()):
            for o in n.outputs:
                if o in targets:
                    return True
                if o not in seen:
                    seen.add(o)
                    queue.append(o)
    return False


def _region(view: View, start: str, end: str) -> list[VNode] | None:
    """The self-contained region of nodes computing ``end`` from ``start`` (see the module
    docstring), in order; None if there is none or it holds a projection."""
    if start == end or end not in view.producer:
        return None
    inside: dict[str, VNode] = {}
    stack = [view.producer[end]]
    while stack:  # walk up from end to start
        n = stack.pop()
        if n.name in inside:
            continue
        if n.op in ("linear", "matmul", "softmax", "sdpa", "attention_op") \
                or len(inside) >= _MAX_REGION:
            return None
        inside[n.name] = n
        for v in n.inputs:
            if v != start and v in view.producer:
                stack.append(view.producer[v])
    if not any(start in n.inputs for n in inside.values()):
        return None
    # every value read inside comes from start or from outside the layer's stream: constants
    # and values the region computes; anything else computed is a value of another branch
    made = {o for n in inside.values() for o in n.outputs}
    for n in inside.values():
        for v in n.inputs:
            if v != start and v not in made and v in view.producer \
                    and _depends(view, v, start):
                return None
    for v in [start] + [o for o in made if o != end]:
        if any(c.name not in inside for c in _users(view, v)):
            return None
    return sorted(inside.values(), key=lambda n: n.order)


def _depends(view: View, value: str, start: str) -> bool:
    """Whether ``value`` is computed from ``start`` (a bounded walk up)."""
    seen, stack = {value}, [value]
    while stack and len(seen) < _MAX_REACH:
        n = view.producer.get(stack.pop())
        if n is None:
            continue
        for v in n.inputs:
            if v == start:
                return True
            if v not in seen:
                seen.add(v)
                stack.append(v)
    return False


def _signature(nodes: list[VNode]) -> tuple:
    return tuple(sorted((n.op, str(n.attrs.get("fn", ""))) for n in nodes))


def _mirror(view: View, start: str, signature: tuple) -> tuple[str, list[VNode]] | None:
    """The first value below ``start`` reached by a self-contained region whose ops are
    ``signature``."""
    seen, queue, order = {start}, deque([start]), []
    while queue and len(order) < 2 * len(signature) + 8:
        for n in _users(view, queue.popleft()):
            if len(n.outputs) == 1 and n.outputs[0] not in seen:
                seen.add(n.outputs[0])
                queue.append(n.outputs[0])
                order.append(n)
    for n in sorted(order, key=lambda n: n.order):
        region = _region(view, start, n.outputs[0])
        if region is not None and _signature(region) == signature:
            return n.outputs[0], region
    return None


def _linear_input(view: View, node: str) -> str | None:
    n = view.by_name.get(node)
    return n.inputs[0] if n is not None and n.inputs else None


def _common_name(a: str, b: str, layer: int) -> str:
    return ("::" not in a and dotted_prefix([a, b])) or f"layer_{layer}"


def find_layers(view: View, attention: list[AttentionBlock],
                ffn: list[FFNBlock]) -> list[TransformerLayer]:
    ffn_adds = {}  # residual operand of an FFN's residual add -> (ffn, add node)
    for f in ffn:
        found = _residual_add(view, view.by_name[f.nodes["down"]].outputs[0]) \
            if f.nodes.get("down") in view.by_name else None
        if found is not None:
            ffn_adds.setdefault(found[1], (f, found[0]))
    spans = []  # (attention, x, r1, attention add, ffn, ffn add, norm, norm region)
    attention_stream = set()
    for a in attention:
        o = view.by_name.get(a.o.node)
        found = _residual_add(view, o.outputs[0]) if o is not None else None
        if found is None:
            continue
        add1, x = found
        r1 = add1.outputs[0]
        attention_stream.add(r1)
        if r1 in ffn_adds:
            spans.append((a, x, r1, add1, *ffn_adds[r1], "pre", None))
            continue
        for res, (f, add2) in ffn_adds.items():
            region = _region(view, r1, res)
            if region is not None:
                attention_stream.add(res)
                # casts alone (LLaMA's RMSNorm casts the stream it then reads as the
                # residual; export names the residual by the cast) are no norm
                norm = "pre" if all(n.op == "identity" for n in region) else "post"
                spans.append((a, x, r1, add1, f, add2, norm, region))
                break
    layers: list[TransformerLayer] = []
    for i, (a, x, r1, add1, f, add2, norm, region) in enumerate(spans):
        if x in attention_stream:  # this attention reads another attention's residual
            continue
        qkv = {_linear_input(view, lin.node) for lin in (a.q, a.k, a.v)} - {None}
        up = _linear_input(view, f.nodes["gate"] or f.nodes["up"])
        if not qkv or not _reaches(view, x, qkv) or up is None or not _reaches(view, r1, {up}):
            continue
        r2 = add2.outputs[0]
        nodes = {"attention_add": add1.name, "ffn_add": add2.name,
                 "values": [view.by_name[a.o.node].outputs[0],
                            view.by_name[f.nodes["down"]].outputs[0]]}
        out = r2
        if norm == "post":
            end = None
            nxt = spans[i + 1][1] if i + 1 < len(spans) else None
            if nxt is not None:
                tail = _region(view, r2, nxt)
                if tail is not None:
                    end = (nxt, tail)
            end = end or _mirror(view, r2, _signature(region))
            if end is None:
                continue
            out = end[0]
            nodes["output_norm"] = [n.name for n in end[1]]
        layers.append(TransformerLayer(
            name=_common_name(a.name, f.name, len(layers)), layer=len(layers), input=x,
            output=out, norm=norm, attention=a, ffn=f, nodes=nodes))
    return layers
