"""Find multi-head attention blocks in a :class:`~slimc.ir.view.View`, whatever the backend.

An attention block is recognised from its core, not from module names:

* decomposed: ``scores = matmul(q, kᵀ)`` → (scale / mask, elementwise) → ``softmax`` →
  ``matmul(probs, v)``; or
* fused: one ``sdpa`` node reading q, k, v.

From q, k and v we walk *up* through data-preserving ops (reshape, transpose, RoPE's
elementwise arithmetic, repeat_kv's expand) to the first projection (``linear``); from the
attention output we walk *down* through shape ops to the output projection. The head size is the
last dimension of q at the core; head counts follow from the projection widths, so grouped-query
attention (fewer k/v rows) and fused QKV projections (one weight, three row ranges) come out of
the same rule.
"""

from __future__ import annotations

from collections import deque

from .structures import AttentionBlock, Linear
from .view import DATA_OPS, SHAPE_OPS, View, VNode

_MAX_DEPTH = 40


def _up_to_projection(view: View, value: str) -> tuple[VNode, list[VNode]] | None:
    """Breadth-first walk from ``value`` towards the inputs; the unique linear reached, and the
    split/slice/select nodes seen on the way (they tell which part of a fused weight is used)."""
    found: dict[str, tuple[VNode, list[VNode]]] = {}
    seen = {value}
    queue = deque([(value, [], 0)])
    while queue:
        v, path, depth = queue.popleft()
        node = view.producer.get(v)
        if node is None or depth > _MAX_DEPTH:
            continue
        if node.op == "linear":
            found.setdefault(node.name, (node, path))
            continue
        if node.op not in DATA_OPS:
            continue
        sel = path + [node] if node.op in ("split", "slice", "select") else path
        for u in node.inputs:
            if u not in seen:
                seen.add(u)
                queue.append((u, sel, depth + 1))
    if len(found) != 1:
        return None
    return next(iter(found.values()))


def _down_to_projection(view: View, value: str) -> VNode | None:
    """Walk from the attention output through shape ops to the output projection."""
    seen = {value}
    queue = deque([(value, 0)])
    while queue:
        v, depth = queue.popleft()
        for node in view.consumers.get(v, []):
            if node.op == "linear" and node.inputs[0] == v:
                return node
            if node.op in SHAPE_OPS and depth < _MAX_DEPTH:
                for o in node.outputs:
                    if o not in seen:
                        seen.add(o)
                        queue.append((o, depth + 1))
    return None


def _through_elementwise_down(view: View, value: str) -> VNode | None:
    """From the softmax output to the matmul that applies it to v (through dropout / casts)."""
    seen = {value}
    queue = deque([(value, 0)])
    while queue:
        v, depth = queue.popleft()
        for node in view.consumers.get(v, []):
            if node.op == "matmul" and node.inputs and node.inputs[0] == v:
                return node
            if node.op in ("identity", "elementwise", "reshape", "expand") and depth < 8:
                for o in node.outputs:
                    if o not in seen:
                        seen.add(o)
                        queue.append((o, depth + 1))
    return None


def _through_elementwise_up(view: View, value: str) -> VNode | None:
    """From the softmax input up to the q·kᵀ matmul (through scale, mask, casts)."""
    seen = {value}
    queue = deque([(value, 0)])
    while queue:
        v, depth = queue.popleft()
        node = view.producer.get(v)
        if node is None:
            continue
        if node.op == "matmul":
            return node
        if node.op in ("identity", "elementwise", "reshape") and depth < 8:
            for u in node.inputs:
                if u not in seen:
                    seen.add(u)
                    queue.append((u, depth + 1))
    return None


def _linear(node: VNode, rows: tuple[int, int] | None) -> Linear:
    a = node.attrs
    out = a["out_features"] if rows is None else rows[1] - rows[0]
    return Linear(node=node.name, weight=a["weight"], bias=a.get("bias"), layout=a["layout"],
                  in_features=a["in_features"], out_features=out, rows=rows)


def _block_name(names: list[str], layer: int) -> str:
    parts = [n.split(".") for n in names if n and "::" not in n]
    if len(parts) >= 2:
        common = []
        for seg in zip(*parts):
            if len(set(seg)) != 1:
                break
            common.append(seg[0])
        if common:
            return ".".join(common)
    return f"attention_{layer}"


def find_attention(view: View) -> list[AttentionBlock]:
    cores = []
    for node in view.nodes:
        if node.op == "sdpa" and len(node.inputs) >= 3:
            cores.append((node, node.inputs[0], node.inputs[1], node.inputs[2], node.outputs[0],
                          {"sdpa": node.name}, "sdpa"))
        elif node.op == "softmax":
            qk = _through_elementwise_up(view, node.inputs[0])
            av = _through_elementwise_down(view, node.outputs[0])
            if qk is None or av is None or len(qk.inputs) < 2 or len(av.inputs) < 2:
                continue
            cores.append((node, qk.inputs[0], qk.inputs[1], av.inputs[1], av.outputs[0],
                          {"scores": qk.name, "softmax": node.name, "context": av.name},
                          "softmax"))

    blocks: list[AttentionBlock] = []
    for core, q, k, v, out, nodes, form in cores:
        qshape = view.shape(q)
        if not qshape or not isinstance(qshape[-1], int):
            continue
        head_dim = qshape[-1]
        found = [_up_to_projection(view, x) for x in (q, k, v)]
        if any(f is None for f in found):
            continue
        o = _down_to_projection(view, out)
        if o is None:
            continue
        (qn, _), (kn, _), (vn, _) = found
        if qn.name == kn.name == vn.name:  # one fused QKV projection
            total = qn.attrs["out_features"]
            if total % (3 * head_dim):
                continue
            width = total // 3
            rows = [(0, width), (width, 2 * width), (2 * width, 3 * width)]
            q_l, k_l, v_l = (_linear(qn, r) for r in rows)
        elif len({qn.name, kn.name, vn.name}) == 3:
            q_l, k_l, v_l = _linear(qn, None), _linear(kn, None), _linear(vn, None)
        else:
            continue
        if q_l.out_features % head_dim or k_l.out_features % head_dim:
            continue
        num_heads = q_l.out_features // head_dim
        num_kv = k_l.out_features // head_dim
        if num_kv == 0 or num_heads % num_kv or v_l.out_features != k_l.out_features:
            continue
        o_l = _linear(o, None)
        if o_l.in_features != q_l.out_features:
            continue
        nodes = dict(nodes, q=qn.name, k=kn.name, v=vn.name, o=o.name)
        blocks.append((core.order, q_l, k_l, v_l, o_l, num_heads, num_kv, head_dim, form, nodes))

    blocks.sort(key=lambda b: b[0])
    result = []
    for layer, (_, q_l, k_l, v_l, o_l, h, hkv, d, form, nodes) in enumerate(blocks):
        names = [q_l.weight, k_l.weight, v_l.weight, o_l.weight, q_l.bias or "", o_l.bias or ""]
        name = _block_name([n for n in names if n], layer)
        result.append(AttentionBlock(name=name, layer=layer, num_heads=h, num_kv_heads=hkv,
                                     head_dim=d, q=q_l, k=k_l, v=v_l, o=o_l, form=form,
                                     nodes=nodes))
    return result
