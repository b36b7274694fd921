"""Find multi-head attention blocks in a :class:`~slimc.ir.view.View`, whatever the backend.

An attention block is recognised from its core, not from module names:

* decomposed: ``scores = matmul(q, kᵀ)`` → (scale / mask, elementwise) → ``softmax`` →
  ``matmul(probs, v)``; or
* fused: one ``sdpa`` node reading q, k, v; or
* a fused attention operator (``attention_op``): onnxruntime's ``com.microsoft::Attention``
  (input projection inside the op: one merged QKV weight, sections by ``qkv_hidden_sizes``),
  ``com.microsoft::MultiHeadAttention`` / ``GroupQueryAttention`` and the standard
  ``Attention`` (opset 23), which read q, k and v after their projections.

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
from .view import DATA_OPS, SHAPE_OPS, View, VNode, dotted_prefix

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


def _core_heads(core: VNode, qshape: tuple, form: str) -> int | None:
    """The query head count as the attention core sees it, where its shapes tell: q of shape
    [B, H, S, d] at a decomposed / SDPA core, or a fused op's ``num_heads``."""
    if form == "op":
        heads = core.attrs["num_heads"]
        return heads if heads > 1 else None
    if len(qshape) >= 4 and isinstance(qshape[-3], int):
        return qshape[-3]
    return None


def _fused_rows(total: int, head_dim: int, heads: int | None) -> list | None:
    """Row ranges of q, k, v in one merged projection of width ``total``: equal thirds, or
    under grouped-query attention [H·d | Hkv·d | Hkv·d] (Phi-3's qkv_proj, slimc's merge_qkv
    of a LLaMA), which needs the query head count ``heads``."""
    if heads is None or total == 3 * heads * head_dim:
        if total % (3 * head_dim):
            return None
        w = total // 3
        return [(0, w), (w, 2 * w), (2 * w, 3 * w)]
    if total % head_dim:
        return None
    rest = total // head_dim - heads
    kv = rest // 2
    if rest <= 0 or rest % 2 or heads % kv:
        return None
    q, k = heads * head_dim, kv * head_dim
    return [(0, q), (q, q + k), (q + k, q + 2 * k)]


def _op_nodes(node: VNode) -> dict:
    """What a block built on a fused attention op records of it (``AttentionBlock.nodes``)."""
    a = node.attrs
    out = {"op": node.name, "op_type": a["op_type"], "head_inputs": list(a["head_inputs"]),
           "present": list(a.get("present", ()))}
    for key in ("packed_bias", "refuse"):
        if a.get(key):
            out[key] = a[key]
    return out


def _packed_projection(view: View, value: str) -> VNode | None:
    """The linear whose output (plus at most a bias add) is ``value``."""
    node = view.producer.get(value)
    if node is not None and node.op == "elementwise" and len(node.inputs) == 1:
        node = view.producer.get(node.inputs[0])
    return node if node is not None and node.op == "linear" else None


def _packed_block(view: View, node: VNode):
    """One merged QKV projection: inside the op (com.microsoft::Attention's weight input), or
    right before it (GroupQueryAttention reading packed [q | k | v])."""
    a = node.attrs
    heads, kv = a["num_heads"], a["kv_num_heads"]
    if not heads or not kv or heads % kv:
        return None
    if "packed" in a:
        p = a["packed"]
        sizes = p["sizes"]
        proj, weight, bias = node.name, p["weight"], p["bias"]
        layout, in_features = p["layout"], p["in_features"]
        extra = {"packed_weight": True}
        if sizes[0] % heads:
            return None
    else:
        lin = _packed_projection(view, node.inputs[0])
        if lin is None:
            return None
        total = lin.attrs["out_features"]
        if total % (heads + 2 * kv):
            return None
        d = total // (heads + 2 * kv)
        sizes = (heads * d, kv * d, kv * d)
        proj, weight, bias = lin.name, lin.attrs["weight"], lin.attrs.get("bias")
        layout, in_features = lin.attrs["layout"], lin.attrs["in_features"]
        extra = {"packed_input": True}
    head_dim = sizes[0] // heads
    o = _down_to_projection(view, node.outputs[0])
    if o is None:
        return None
    starts = [0, sizes[0], sizes[0] + sizes[1]]
    lins = [Linear(node=proj, weight=weight, bias=bias, layout=layout,
                   in_features=in_features, out_features=size, rows=(st, st + size))
            for st, size in zip(starts, sizes)]
    o_l = _linear(o, None)
    if o_l.in_features != sizes[0]:
        return None
    nodes = dict(_op_nodes(node), q=proj, k=proj, v=proj, o=o.name, **extra)
    return (node.order, *lins, o_l, heads, kv, head_dim, "op", nodes)


def _linear(node: VNode, rows: tuple[int, int] | None) -> Linear:
    a = node.attrs
    out = a["out_features"] if rows is None else rows[1] - rows[0]
    return Linear(node=node.name, weight=a["weight"], bias=a.get("bias"), layout=a["layout"],
                  in_features=a["in_features"], out_features=out, rows=rows)


def _block_name(names: list[str], layer: int) -> str:
    return dotted_prefix([n for n in names if n and "::" not in n]) or f"attention_{layer}"


# Fused attention operators (ONNX op type -> per-op facts). ``heads``: inputs that carry a head
# axis (port -> axis), sliced with the heads; ``past``: key/value cache inputs and ``present``:
# cache outputs (their head axis would change the model's interface, so pruning refuses them).
FUSED_ATTENTION = {
    "Attention": None,  # com.microsoft::Attention or ai.onnx::Attention, told apart by domain
    "MultiHeadAttention": None,
    "GroupQueryAttention": None,
}
_OPS = {
    "com.microsoft::Attention": {"heads": {5: 1}, "past": (4,), "present": (1,)},
    "com.microsoft::MultiHeadAttention": {"heads": {5: 1}, "past": (6, 7), "present": (1, 2, 3)},
    "com.microsoft::GroupQueryAttention": {"heads": {10: 1, 11: 0}, "past": (3, 4),
                                           "present": (1, 2, 3), "refuse": (12, 13)},
    "Attention": {"heads": {3: -3}, "past": (4, 5), "present": (1, 2, 3)},
}


def _onnx_attr(node, name, default=None):
    import onnx
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def fused_attention(name: str, node, consts: dict, shapes: dict,
                    parameters=lambda value: 0) -> VNode:
    """The :class:`VNode` of a fused ONNX attention operator (``op="attention_op"``).

    attrs: ``op_type``; ``num_heads`` / ``kv_num_heads``; ``packed`` (com.microsoft::Attention:
    weight, bias, layout, in_features and the q/k/v widths of its merged projection);
    ``packed_bias`` (MultiHeadAttention's q|k|v bias input); ``rank`` of q (3: [B, S, H·d];
    4: [B, H, S, d]); ``head_inputs`` [(port, axis, constant, parameters per head)] that carry
    a head axis (``parameters(value)``: how many of a constant's elements count as parameters);
    ``refuse``: why pruning this op would be wrong (a key/value cache crosses the model's
    interface); ``unsupported``: why no attention block can be built (packed QKV with no
    projection in sight).
    """
    op_type = (f"{node.domain}::" if node.domain not in ("", "ai.onnx") else "") + node.op_type
    facts = _OPS[op_type]
    ins = list(node.input) + [""] * 16
    heads = int(_onnx_attr(node, "num_heads", 0) or _onnx_attr(node, "q_num_heads", 0) or 0)
    kv = int(_onnx_attr(node, "kv_num_heads", 0) or heads)
    attrs: dict = {"op_type": op_type, "num_heads": heads, "kv_num_heads": kv}
    qshape = shapes.get(ins[0]) or ()
    attrs["rank"] = len(qshape)
    kshape = shapes.get(ins[1]) or ()
    if len(qshape) == 4 and len(kshape) == 4 and not _onnx_attr(node, "q_num_heads"):
        heads, kv = qshape[1], kshape[1]  # [B, H, S, d]: the heads are an axis of q and k
        attrs.update(num_heads=heads, kv_num_heads=kv)
    data = [ins[0]]
    if op_type == "com.microsoft::Attention":
        w = consts.get(ins[1])
        wshape = shapes.get(w[0]) if w else None
        sizes = _onnx_attr(node, "qkv_hidden_sizes")
        if w is None or not wshape or len(wshape) != 2:
            attrs["unsupported"] = (f"{op_type} {name}: its QKV weight is not a constant "
                                    "matrix, so there are no per-head rows to slice")
        else:
            layout = "out_in" if w[1] else "in_out"
            total = wshape[0] if layout == "out_in" else wshape[1]
            sizes = tuple(int(x) for x in sizes) if sizes else (total // 3,) * 3
            b = consts.get(ins[2]) if ins[2] else None
            attrs["packed"] = {"weight": w[0], "bias": b[0] if b else None, "layout": layout,
                               "in_features": int(wshape[1] if layout == "out_in"
                                                  else wshape[0]), "sizes": sizes}
            if sizes[0] != sizes[1] or sizes[0] != sizes[2]:
                attrs["unsupported"] = (f"{op_type} {name}: qkv_hidden_sizes {list(sizes)} give "
                                        "the values another head size than the queries")
    elif op_type == "com.microsoft::GroupQueryAttention" and not ins[1] and not ins[2] \
            and attrs["rank"] == 3:
        attrs["packed_qkv"] = True  # query = one projection's [q | k | v] output
    else:
        if not ins[1] or not ins[2] or attrs["rank"] not in (3, 4):
            attrs["unsupported"] = (
                f"{op_type} {name} reads packed QKV (query of shape {tuple(qshape)}, no separate "
                "key and value): there is no projection per q, k, v whose head rows slimc could "
                "slice")
        data = [ins[0], ins[1], ins[2]]
        if op_type == "com.microsoft::MultiHeadAttention" and ins[3]:
            b = consts.get(ins[3])
            if b is None:
                attrs["unsupported"] = (f"{op_type} {name}: its packed q|k|v bias is computed, "
                                        "not a constant")
            else:
                attrs["packed_bias"] = b[0]
        if op_type == "com.microsoft::MultiHeadAttention" and "unsupported" not in attrs \
                and len(shapes.get(ins[1]) or ()) != 3:
            attrs["unsupported"] = (f"{op_type} {name}: key has shape "
                                    f"{tuple(shapes.get(ins[1]) or ())}; slimc prunes the form "
                                    "with 3-D query, key and value projections")
    head_inputs = []
    for port, axis in facts["heads"].items():
        if ins[port]:
            shape = shapes.get(ins[port]) or ()
            if len(shape) >= (-axis if axis < 0 else axis + 1) and shape[axis] == heads != 1:
                const = ins[port] in consts
                head_inputs.append((port, axis, const,
                                    parameters(ins[port]) // heads if const else 0))
    attrs["head_inputs"] = head_inputs
    past = [ins[p] for p in facts["past"] if ins[p]]
    outs = list(node.output)
    present = [outs[p] for p in facts["present"] if p < len(outs) and outs[p]]
    refuse = [ins[p] for p in facts.get("refuse", ()) if ins[p]]
    if past or refuse:
        attrs["refuse"] = (f"{op_type} {name} reads a key/value cache or quantized cache "
                           f"({', '.join(past + refuse)}) whose head axis comes from outside the "
                           "model")
    attrs["present"] = present
    return VNode(name, "attention_op", [d for d in data if d], outs[:1], attrs)


def find_attention(view: View) -> list[AttentionBlock]:
    cores = []
    packed = []
    for node in view.nodes:
        if node.op == "attention_op":
            if node.attrs.get("unsupported"):
                continue
            if "packed" in node.attrs or node.attrs.get("packed_qkv"):
                packed.append(node)
            elif len(node.inputs) >= 3:
                cores.append((node, node.inputs[0], node.inputs[1], node.inputs[2],
                              node.outputs[0], _op_nodes(node), "op"))
        elif node.op == "sdpa" and len(node.inputs) >= 3:
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

    blocks: list = [b for b in (_packed_block(view, n) for n in packed) if b is not None]
    for core, q, k, v, out, nodes, form in cores:
        qshape = view.shape(q)
        if not qshape or not isinstance(qshape[-1], int):
            continue
        head_dim = qshape[-1]
        if form == "op" and core.attrs["rank"] == 3:  # [B, S, H·d]: the op splits the heads
            if not core.attrs["num_heads"] or qshape[-1] % core.attrs["num_heads"]:
                continue
            head_dim = qshape[-1] // core.attrs["num_heads"]
        found = [_up_to_projection(view, x) for x in (q, k, v)]
        if any(f is None for f in found):
            continue
        o = _down_to_projection(view, out)
        if o is None:
            continue
        (qn, _), (kn, _), (vn, _) = found
        if qn.name == kn.name == vn.name:  # one fused QKV projection
            total = qn.attrs["out_features"]
            rows = _fused_rows(total, head_dim, _core_heads(core, qshape, form))
            if rows is None:
                continue
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
        if form == "op":
            a = core.attrs
            if a["num_heads"] == 1 and num_heads > 1:
                # one head per batch row: the heads were folded into the batch axis before the
                # op (nn.MultiheadAttention's bmm form); the op's attributes do not change
                nodes = dict(nodes, folded_heads=True)
            elif num_heads != a["num_heads"] or a["kv_num_heads"] not in (num_kv, num_heads):
                continue  # (k / v may reach the op already repeated to every query head)
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


def unsupported_attention(view: View) -> list[str]:
    """Why each fused attention op of the view yields no attention block (in words)."""
    return [n.attrs["unsupported"] for n in view.nodes
            if n.op == "attention_op" and n.attrs.get("unsupported")]
