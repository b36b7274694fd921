"""Head pruning on an ``onnx.ModelProto``: match + rewire only.

Concrete shapes come from one onnxruntime run with every value exposed (exporters often leave
``value_info`` partial); :mod:`._shapes` says which values carry heads. Then: slice the
projection weights and biases, give every changed ``Reshape`` / ``Expand`` / ``Split`` /
``Slice`` a new shape constant, drop what became dead, and re-infer ``value_info``.

Exporters share initializers between nodes (the dynamo exporter stores one tensor for equal
biases, one shape constant for every layer's reshape); an initializer that something else
still reads is never edited in place: the node gets a new one (copy on write).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...errors import PassError, UnsupportedError
from ...ir import onnx as ir_onnx
from ...ir.attention import FUSED_ATTENTION
from . import _math
from ._shapes import HeadShapeError, ShapeOp, plain_dims, propagate

_RESHAPE = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
_SHAPE = {"Shape", "Size"}


def _node_names(model: onnx.ModelProto) -> dict:
    """The names ``ir.onnx.build_view`` gives nodes (``name`` or ``OpType_index``)."""
    return {(n.name or f"{n.op_type}_{i}"): n for i, n in enumerate(model.graph.node)}


def _small_ints(name: str, value: np.ndarray) -> bool:
    return value.ndim <= 1 and value.size <= 16 and np.issubdtype(value.dtype, np.integer)


def probe_shapes(model: onnx.ModelProto, inputs, keep=_small_ints) -> tuple[dict, dict]:
    """The concrete shape of every value on ``inputs`` (one onnxruntime run), and the values
    ``keep(name, array)`` selects (by default the small integer vectors: run-time shapes)."""
    from ...ir.capture import _ort_session
    m = onnx.ModelProto()
    m.CopyFrom(model)
    seen = {o.name for o in m.graph.output}
    for n in m.graph.node:
        for o in n.output:
            if o and o not in seen:
                m.graph.output.append(onnx.ValueInfoProto(name=o))
                seen.add(o)
    sess = _ort_session(m)
    names = [i.name for i in sess.get_inputs()]
    feeds = {k: np.ascontiguousarray(x) for k, x in zip(names, inputs)}
    shapes, kept = {}, {}
    for o, v in zip(sess.get_outputs(), sess.run(None, feeds)):
        v = np.asarray(v)
        shapes[o.name] = tuple(v.shape)
        if keep(o.name, v):
            kept[o.name] = v
    for k, x in feeds.items():
        shapes[k] = tuple(np.shape(x))
    for init in model.graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    return shapes, kept


def _const_value(model, consts, value):
    if value not in consts:
        return None
    src, transposed = consts[value]
    arr = ir_onnx.get_weight(model, src)
    return arr.T if transposed else arr


def _attr(node, name, default=None):
    return ir_onnx._attr(node, name, default)


def _translate(model, shapes: dict, consts: dict, o_nodes: dict) -> list:
    ops = []
    for i, n in enumerate(model.graph.node):
        name = n.name or f"{n.op_type}_{i}"
        t = n.op_type
        ins = [x for x in n.input if x]
        outs = [o for o in n.output if o]
        attrs = {"op": t}
        data = n.input[0] if n.input else None
        if _fused_attention(n):
            inside = t == "Attention" and n.domain == "com.microsoft"  # projections inside
            packed = not (len(n.input) > 2 and n.input[1] and n.input[2])  # [q | k | v] in one
            if inside or packed:  # the adapter seeds the op's output; its input has no heads
                ops.append(ShapeOp(name, "opaque", [data], outs[:1], attrs))
            else:  # q, k, v after their projections; side inputs are handled by _attention_ops
                ops.append(ShapeOp(name, "attention_op", ins[:3], outs[:1],
                                   dict(attrs, rank=len(shapes[data]))))
        elif t in _RESHAPE:
            ops.append(ShapeOp(name, "reshape", [data], outs, attrs))
        elif t == "Transpose":
            perm = _attr(n, "perm") or list(reversed(range(len(shapes[data]))))
            ops.append(ShapeOp(name, "permute", [data], outs, dict(attrs, perm=list(perm))))
        elif t in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in consts \
                and len(shapes.get(n.input[1], ())) == 2 and n.input[0] not in consts:
            layer = o_nodes.get(name)
            ops.append(ShapeOp(name, "linear", [data], outs, dict(
                attrs, o_block=layer[0] if layer else None, in_new=layer[1] if layer else None)))
        elif t == "MatMul":
            ops.append(ShapeOp(name, "matmul", ins[:2], outs, attrs))
        elif t == "Expand":
            ops.append(ShapeOp(name, "expand", [data], outs, attrs))
        elif t == "Split":
            ops.append(ShapeOp(name, "split", [data], outs, dict(attrs, axis=_attr(n, "axis", 0))))
        elif t == "Slice":
            vals = [_const_value(model, consts, x) if x else None for x in
                    list(n.input[1:5]) + [""] * (5 - len(n.input))]
            starts, ends, axes, steps = vals[:4]
            if starts is None or ends is None or (len(n.input) > 3 and n.input[3]
                                                  and axes is None):
                ops.append(ShapeOp(name, "opaque", [data], outs, attrs))
                continue
            axes = list(range(len(starts))) if axes is None else list(axes)
            steps = [1] * len(starts) if steps is None else list(steps)
            bounds = [(int(a), int(s), int(e), int(st))
                      for a, s, e, st in zip(axes, starts, ends, steps)]
            ops.append(ShapeOp(name, "slice", [data], outs, dict(attrs, slices=bounds)))
        elif t == "Gather" and len(n.input) > 1 and n.input[1] in consts:
            idx = _const_value(model, consts, n.input[1])
            kind = "select" if np.ndim(idx) == 0 else "take"
            ops.append(ShapeOp(name, kind, [data], outs, dict(
                attrs, axis=_attr(n, "axis", 0), index_shape=tuple(np.shape(idx)))))
        elif t == "Concat":
            ops.append(ShapeOp(name, "concat", ins, outs, dict(attrs, axis=_attr(n, "axis"))))
        elif t in _SHAPE:
            ops.append(ShapeOp(name, "shape", ins, outs, attrs))
        elif t in ("Identity", "Dropout") and len(outs) >= 1:
            ops.append(ShapeOp(name, "identity", [data], outs[:1], attrs))
        elif len(outs) == 1:
            ops.append(ShapeOp(name, "pointwise", ins, outs, attrs))
        else:
            ops.append(ShapeOp(name, "opaque", ins, outs, attrs))
    return ops


class _Editor:
    """Copy-on-write edits of initializers and node inputs."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {i.name: i for i in model.graph.initializer}
        self.taken = set(self.inits) | {o for n in model.graph.node for o in n.output} \
            | {i.name for i in model.graph.input}

    def readers(self, value: str) -> int:
        n = sum(1 for node in self.model.graph.node for x in node.input if x == value)
        return n + sum(1 for o in self.model.graph.output if o.name == value)

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name

    def set_input(self, node, index: int, array: np.ndarray, base: str) -> None:
        """Make ``node.input[index]`` the constant ``array``: in place when only this node
        reads that initializer, else a new initializer."""
        value = node.input[index]
        if value in self.inits and self.readers(value) == 1:
            self.inits[value].CopyFrom(numpy_helper.from_array(array, value))
            return
        name = self.fresh(base)
        init = numpy_helper.from_array(array, name)
        self.model.graph.initializer.append(init)
        self.inits[name] = self.model.graph.initializer[-1]
        node.input[index] = name


def _seeds(plans, names: dict, shapes: dict, consts: dict, editor: _Editor):
    """Head atoms of each q/k/v projection output and bias, and the (Add node, input index,
    projection) of every bias added by a separate Add. Such a bias gets a private initializer
    first: exporters share equal constants, and only this Add's copy carries heads."""
    seeds, bias_sites = {}, []
    consumers: dict = {}
    for n in names.values():
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    for p in plans:
        b = p.block
        if b.nodes.get("packed_weight") or b.nodes.get("packed_input"):
            # the op's output is the first value with whole heads on one axis ([q | k | v] of
            # unequal widths under GQA is no product of head atoms; it only feeds the op)
            out = names[b.nodes["op"]].output[0]
            seeds[out] = plain_dims(shapes[out][:-1]) + [p.q_atoms()]
            if b.nodes.get("packed_weight"):
                continue
        if b.nodes.get("packed_input") or _merged_gqa(b):
            pairs = [(b.q, None)]
            if _merged_gqa(b):
                _seed_split(p, names[b.q.node], consumers, shapes, seeds, editor)
        elif b.fused_qkv:
            pairs = [(b.q, p.fused_atoms())]
        else:
            pairs = [(b.q, p.q_atoms()), (b.k, p.kv_atoms()), (b.v, p.kv_atoms())]
        for lin, atoms in pairs:
            node = names[lin.node]
            out = node.output[0]
            if atoms is not None:
                seeds[out] = plain_dims(shapes[out][:-1]) + [atoms]
            if not lin.bias or node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
                continue
            add = [a for a in consumers.get(out, []) if a.op_type == "Add"]
            if len(add) != 1:
                raise UnsupportedError(f"Cannot find the bias Add of projection {lin.node}.",
                                       "Report the model; slimc expects MatMul followed by Add.")
            idx = 1 if add[0].input[0] == out else 0
            value = add[0].input[idx]
            src, transposed = consts[value]
            arr = ir_onnx.get_weight(editor.model, src)
            editor.set_input(add[0], idx, arr.T if transposed else arr, f"{src}.pruned")
            shapes[add[0].input[idx]] = tuple(np.shape(arr))
            if atoms is not None:
                seeds[add[0].input[idx]] = [atoms]
            bias_sites.append((add[0], idx, lin))
    return seeds, bias_sites


def _merged_gqa(block) -> bool:
    """One projection [q | k | v] with fewer key/value heads: no product of head atoms
    describes its output, so the pieces after its Split carry the heads instead."""
    return block.fused_qkv and block.k.out_features != block.q.out_features \
        and not block.nodes.get("packed_weight") and not block.nodes.get("packed_input")


def _seed_slices(plan, readers, shapes: dict, seeds: dict, editor: _Editor) -> bool:
    """Phi-3's form: three Slices of the last axis at the q / k / v section bounds. Each
    output carries the heads; its bounds become the kept sections' (they follow from the plan,
    not from the propagation)."""
    b = plan.block
    model = editor.model
    consts = ir_onnx.constants(model)
    old = [b.q.rows, b.k.rows, b.v.rows]
    nq, nkv = len(plan.keep_q) * b.head_dim, len(plan.keep_kv) * b.head_dim
    new = [(0, nq), (nq, nq + nkv), (nq + nkv, nq + 2 * nkv)]
    found = {}
    for n in readers:
        vals = [_const_value(model, consts, x) if x else None
                for x in list(n.input[1:5]) + [""] * (5 - len(n.input))]
        starts, ends, axes, steps = vals[:4]
        rank = len(shapes[n.input[0]])
        total = shapes[n.input[0]][-1]
        if starts is None or ends is None or np.size(starts) != 1 or (
                len(n.input) > 3 and n.input[3] and axes is None):
            return False
        axis = int(np.ravel(axes)[0]) if axes is not None else 0
        step = int(np.ravel(steps)[0]) if steps is not None else 1
        start, end = int(np.ravel(starts)[0]), min(int(np.ravel(ends)[0]), total)
        if axis % rank != rank - 1 or step != 1 or (start, end) not in old:
            return False
        found[old.index((start, end))] = n
    if len(found) != 3:
        return False
    atoms = (plan.q_atoms(), plan.kv_atoms(), plan.kv_atoms())
    for i, n in found.items():
        seeds[n.output[0]] = plain_dims(shapes[n.output[0]][:-1]) + [atoms[i]]
        for port, bound in ((1, new[i][0]), (2, new[i][1])):
            editor.set_input(n, port, np.array([bound], dtype=np.int64),
                             f"{n.name}.pruned_{'starts' if port == 1 else 'ends'}")
    return True


def _seed_split(plan, proj, consumers: dict, shapes: dict, seeds: dict, editor) -> None:
    value = proj.output[0]
    adds = [n for n in consumers.get(value, []) if n.op_type == "Add"]
    if len(adds) == 1:
        value = adds[0].output[0]
    readers = consumers.get(value, [])
    if len(readers) == 3 and all(n.op_type == "Slice" for n in readers) \
            and _seed_slices(plan, readers, shapes, seeds, editor):
        return
    splits = [n for n in consumers.get(value, []) if n.op_type == "Split"
              and len([o for o in n.output if o]) == 3]
    rank = len(shapes[value])
    if len(splits) != 1 or len(consumers.get(value, [])) != 1 \
            or _attr(splits[0], "axis", 0) % rank != rank - 1:
        raise UnsupportedError(
            f"The merged q|k|v projection {proj.name} of layer {plan.layer} (grouped-query "
            "attention) is not read by one Split of its last axis; slimc cannot tell its "
            "query, key and value parts apart.",
            "Prune the heads before merging the projections (fuse after prune_heads).")
    for out, atoms in zip(splits[0].output, (plan.q_atoms(), plan.kv_atoms(), plan.kv_atoms())):
        seeds[out] = plain_dims(shapes[out][:-1]) + [atoms]


def _slice_weights(model, editor: _Editor, plans, names: dict, consts: dict, bias_sites):
    for p in plans:
        for e in _math.weight_edits(p):
            node = names[e.node]
            if e.port is not None:  # an input of a fused attention op
                idx = e.port
            elif e.bias and node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
                idx = 2
            elif e.bias:
                site = next(s for s in bias_sites if s[2].node == e.node)
                node, idx = site[0], site[1]
            else:
                idx = 1
            src, transposed = consts[node.input[idx]]
            if e.bias and e.port is None:  # _seeds gave it a private initializer already
                transposed = False
            new = _math.apply_edit(ir_onnx.get_weight(model, src), e)
            if transposed:
                new = np.ascontiguousarray(new.T)
            editor.set_input(node, idx, new, f"{src}.pruned")


def shape_provenance(model: onnx.ModelProto, consts: dict, values: dict) -> dict:
    """Where each entry of each run-time shape vector comes from: ``"c"`` a constant, ``"a"``
    a ``Shape`` of some tensor (it follows that tensor's size, pruned or not, by itself), ``"x"``
    arithmetic mixing the two (slimc cannot rewrite it)."""
    tags: dict = {}

    def known(v):
        return _const_value(model, consts, v) if v in consts else values.get(v)

    def of(v):
        if v in tags:
            return tags[v]
        if v in consts:
            return ["c"] * max(1, int(np.size(_const_value(model, consts, v))))
        return None

    for n in model.graph.node:
        if not n.output or n.output[0] not in values:
            continue
        out = n.output[0]
        size = max(1, int(np.size(values[out])))
        ins = [of(x) if x else None for x in n.input]
        t = n.op_type
        if t == "Shape":
            tags[out] = ["a"] * size
        elif t in ("Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape", "Flatten") and ins \
                and ins[0] is not None:
            tags[out] = list(ins[0])
        elif t == "Concat" and all(i is not None for i in ins):
            tags[out] = [tag for i in ins for tag in i]
        elif t in ("Gather", "Slice") and ins and ins[0] is not None \
                and all(known(x) is not None for x in n.input[1:] if x):
            # indices and bounds are fixed for a given rank, whatever the input sizes
            src = np.arange(len(ins[0]))
            args = [np.atleast_1d(known(x)) if x else None for x in n.input[1:5]]
            if t == "Gather":
                picked = np.take(src, known(n.input[1]))
            else:
                step = int(args[3][0]) if len(args) > 3 and args[3] is not None else 1
                picked = src[slice(int(args[0][0]), int(args[1][0]), step)]
            tags[out] = [ins[0][i] for i in np.atleast_1d(picked)]
        elif all(i is not None and set(i) == {"c"} for i in ins):
            tags[out] = ["c"] * size
        else:
            tags[out] = ["x"] * size
    return tags


def _shape_input(model, editor, consts, node, index: int, new: list, values: dict,
                 special: set, provenance: dict):
    """Make ``node.input[index]`` (a 1-D int64 shape) hold ``new`` where the head count
    changed it. Entries in ``special`` stay: Reshape's -1 (infer) and 0 (copy), Expand's 1
    (broadcast) come out right by themselves. A constant gets a new constant; a shape computed
    at run time (dynamic input sizes) is scaled in place, ``shape * new // old`` per entry,
    which is exact because a head-carrying size is a multiple of its old head count."""
    value = node.input[index]
    old = _const_value(model, consts, value) if value in consts else values.get(value)
    if old is None:
        raise UnsupportedError(
            f"Node {node.name or node.op_type} reads a target shape slimc cannot evaluate.",
            "Export the model with static input shapes.")
    old = np.asarray(old, dtype=np.int64).reshape(-1)
    want = np.array([o if int(o) in special else n for o, n in zip(old, new)], dtype=np.int64)
    if np.array_equal(want, old):
        return
    if value in consts:
        editor.set_input(node, index, want, f"{node.name or node.op_type}.pruned_shape")
        return
    tags = provenance.get(value, ["x"] * len(old))
    change = [n != o and tag != "a" for o, n, tag in zip(old, want, tags)]
    if any(c and tag == "x" for c, tag in zip(change, tags)):
        raise UnsupportedError(
            f"Node {node.name or node.op_type} computes its target shape {old.tolist()} at run "
            "time with arithmetic on the head count; slimc cannot rewrite that.",
            "Export the model with static input shapes, or with a constant head count in "
            "its reshapes.")
    if not any(change):
        return  # every changed entry follows a pruned tensor's size by itself
    num = np.array([n if c else 1 for n, c in zip(want, change)], dtype=np.int64)
    den = np.array([o if c else 1 for o, c in zip(old, change)], dtype=np.int64)
    base = f"{node.name or node.op_type}.pruned_shape"
    num_name, den_name = editor.fresh(f"{base}_num"), editor.fresh(f"{base}_den")
    mul_out, div_out = editor.fresh(f"{base}_mul"), editor.fresh(base)
    model.graph.initializer.extend([numpy_helper.from_array(num, num_name),
                                    numpy_helper.from_array(den, den_name)])
    nodes = [helper.make_node("Mul", [value, num_name], [mul_out], name=mul_out),
             helper.make_node("Div", [mul_out, den_name], [div_out], name=div_out)]
    pos = next(i for i, n in enumerate(model.graph.node) if n.name == node.name)
    for k, n in enumerate(nodes):
        model.graph.node.insert(pos + k, n)
    node = next(n for n in model.graph.node if n.name == node.name)
    node.input[index] = div_out


def _rewrite(model, editor, prop, shapes: dict, consts: dict, names: list, values: dict):
    provenance = shape_provenance(model, consts, values)
    for name in names:
        n = next(x for x in model.graph.node if x.name == name)
        t = n.op_type
        outs = [o for o in n.output if o]
        if t in ("Reshape", "Expand") and prop.changed(outs[0]):
            special = {1} if t == "Expand" else {-1} if _attr(n, "allowzero", 0) else {-1, 0}
            _shape_input(model, editor, consts, n, 1, list(prop.new_shape(outs[0])), values,
                         special, provenance)
        elif t == "Split" and any(prop.changed(o) for o in outs):
            axis = _attr(n, "axis", 0) % len(shapes[n.input[0]])
            sizes = [prop.new_shape(o)[axis] for o in outs]
            if len(n.input) > 1 and n.input[1]:
                _shape_input(model, editor, consts, n, 1, sizes, values, set(), provenance)
            elif _attr(n, "split") is not None:
                for a in n.attribute:
                    if a.name == "split":
                        a.CopyFrom(helper.make_attribute("split", sizes))
        elif name in prop.slices:
            axes_val = _const_value(model, consts, n.input[3]) if len(n.input) > 3 \
                and n.input[3] else None
            starts = _const_value(model, consts, n.input[1])
            axes = list(range(len(starts))) if axes_val is None else list(axes_val)
            rank = len(shapes[n.input[0]])
            for idx in (1, 2):
                vals = _const_value(model, consts, n.input[idx]).astype(np.int64).copy()
                for j, ax in enumerate(axes):
                    ax = int(ax) % rank
                    if ax not in prop.slices[name]:
                        continue
                    old_block, new_block = prop.slices[name][ax]
                    size = shapes[n.input[0]][ax]
                    v = int(vals[j]) + (size if vals[j] < 0 else 0)
                    if idx == 1 or v < size:
                        vals[j] = v // old_block * new_block
                editor.set_input(n, idx, vals, f"{name}.pruned_{'starts' if idx == 1 else 'ends'}")


def _empty_block(model, editor, plan, names, shapes):
    """Replace the output projection (and its bias Add) by its bias broadcast to the output
    shape: what the attention computes when every head's values are zero."""
    b = plan.block
    o = names[b.o.node]
    out = o.output[0]
    bias_value, last = None, o
    if o.op_type == "Gemm" and len(o.input) > 2 and o.input[2]:
        bias_value = o.input[2]
    elif b.o.bias:
        for n in model.graph.node:
            if n.op_type == "Add" and out in n.input:
                bias_value = n.input[1] if n.input[0] == out else n.input[0]
                last = n
                break
    target = last.output[0]
    shape = np.array(shapes[target], dtype=np.int64)
    if bias_value is None:
        bias_value = editor.fresh(f"{b.o.weight}.zero_bias")
        width = int(shapes[target][-1])
        model.graph.initializer.append(numpy_helper.from_array(
            np.zeros(width, dtype=np.float32), bias_value))
    shape_name = editor.fresh(f"{b.name}.empty_shape")
    model.graph.initializer.append(numpy_helper.from_array(shape, shape_name))
    expand = helper.make_node("Expand", [bias_value, shape_name], [target],
                              name=editor.fresh(f"{b.name}.empty"))
    nodes = list(model.graph.node)
    pos = nodes.index(last)
    del model.graph.node[pos]
    model.graph.node.insert(pos, expand)


def _live(model) -> tuple[set, set]:
    """Positions of the nodes that reach a graph output, and the values they read or write."""
    need = {o.name for o in model.graph.output}
    live = set()
    nodes = list(model.graph.node)
    for i in range(len(nodes) - 1, -1, -1):
        n = nodes[i]
        if any(o in need for o in n.output if o):
            live.add(i)
            need.update(x for x in n.input if x)
    return live, need


def _drop_dead(model, before_values: set) -> None:
    """Remove every node nobody reads (dead code that reads the heads would otherwise need
    rewriting too), and the initializers our edits left without readers; initializers that
    were unused before the pass stay."""
    live, _ = _live(model)
    for i in range(len(model.graph.node) - 1, -1, -1):
        if i not in live:
            del model.graph.node[i]
    used = {x for n in model.graph.node for x in n.input} | {o.name for o in model.graph.output}
    for i in range(len(model.graph.initializer) - 1, -1, -1):
        name = model.graph.initializer[i].name
        if name not in used and name in before_values:
            del model.graph.initializer[i]


def _refresh_value_info(model, prop) -> None:
    """Keep the exporter's ``value_info`` (its symbolic dimensions are worth keeping: shape
    inference cannot always recover them), with head-carrying sizes updated; drop entries of
    values that are gone; then let shape inference fill in what is missing."""
    alive = {o for n in model.graph.node for o in n.output}
    keep = []
    for vi in model.graph.value_info:
        if vi.name not in alive:
            continue
        new = prop.new_shape(vi.name)
        dims = vi.type.tensor_type.shape.dim
        if new is not None and len(dims) == len(new):
            for d, size in zip(dims, new):
                if d.HasField("dim_value"):
                    d.dim_value = size
        keep.append(vi)
    kept = [onnx.ValueInfoProto() for _ in keep]
    for k, vi in zip(kept, keep):
        k.CopyFrom(vi)
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except (onnx.shape_inference.InferenceError, ValueError):
        return  # value_info is optional
    have = {vi.name for vi in model.graph.value_info}
    model.graph.value_info.extend(vi for vi in inferred.graph.value_info if vi.name not in have)


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes the names discovery used for them, so they stay findable while
    nodes are added and removed."""
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"


def prune(model: onnx.ModelProto, plans: list, inputs) -> None:
    """Apply ``plans`` to ``model`` in place; ``inputs`` feed the shape probe."""
    _name_nodes(model)
    check_attention_ops(model, [p for p in plans if not p.empty])
    shapes, values = probe_shapes(model, inputs)
    _, before_values = _live(model)
    editor = _Editor(model)
    names = _node_names(model)
    for p in plans:
        if p.empty:
            _empty_block(model, editor, p, names, shapes)
    _drop_dead(model, before_values)
    live = [p for p in plans if not p.empty]
    names = _node_names(model)
    editor = _Editor(model)
    seeds, bias_sites = _seeds(live, names, shapes, ir_onnx.constants(model), editor)
    consts = ir_onnx.constants(model)
    o_nodes = {p.block.o.node: (p.layer, len(p.keep_q) * p.block.head_dim) for p in live}
    ops = _translate(model, shapes, consts, o_nodes)
    sizes, repeat = {}, {}
    for p in live:
        sizes.update(p.sizes())
        repeat.update(p.repeat_symbols())
    try:
        prop = propagate(ops, shapes, seeds, sizes, repeat)
    except HeadShapeError as e:
        n = names.get(e.node)
        what = f"{n.op_type}({', '.join(n.input)})" if n is not None else e.node
        raise UnsupportedError(f"Cannot prune heads: node {e.node} ({what[:200]}): {e.reason}.",
                               "Prune heads of other layers, or report the model "
                               "architecture.") from None
    _slice_weights(model, editor, live, names, consts, bias_sites)
    _rewrite(model, editor, prop, shapes, consts, list(names), values)
    _attention_ops(model, editor, live, consts)
    for out in model.graph.output:
        new = prop.new_shape(out.name)
        if new is not None:
            for d, size in zip(out.type.tensor_type.shape.dim, new):
                if d.HasField("dim_value"):
                    d.dim_value = size
    _drop_dead(model, before_values)
    _refresh_value_info(model, prop)
    _verify(model, inputs, prop)


def _fused_attention(n) -> bool:
    return n.op_type in FUSED_ATTENTION and n.domain in ("", "ai.onnx", "com.microsoft")


def check_attention_ops(model, plans) -> None:
    """Refuse fused attention ops whose head count crosses the model's interface: a key/value
    cache fed from outside, or a present cache / attention-probability output that is read."""
    read = {x for n in model.graph.node for x in n.input} | {o.name for o in model.graph.output}
    for p in plans:
        nodes = p.block.nodes
        if "op" not in nodes:
            continue
        what = f"{nodes['op_type']} {nodes['op']} (layer {p.layer})"
        if nodes.get("refuse"):
            raise UnsupportedError(f"Cannot prune heads of {what}: {nodes['refuse']}; "
                                   "pruning would change the cache the caller feeds.",
                                   "Export the model without a key/value cache (no past "
                                   "inputs) to prune its heads.")
        used = [o for o in nodes.get("present", ()) if o in read]
        if used:
            raise UnsupportedError(f"Cannot prune heads of {what}: its outputs {used} (the "
                                   "key/value cache or the attention scores) carry the head "
                                   "count and are read.",
                                   "Export the model without present/qk outputs to prune its "
                                   "heads.")


_HEAD_ATTRS = {"com.microsoft::Attention": ("num_heads",),
               "com.microsoft::MultiHeadAttention": ("num_heads",),
               "com.microsoft::GroupQueryAttention": ("num_heads", "kv_num_heads"),
               "Attention": ("q_num_heads", "kv_num_heads")}


def _attention_ops(model, editor: _Editor, plans, consts) -> None:
    """Give each pruned fused attention op its new head counts (attributes, the merged
    projection's ``qkv_hidden_sizes``) and slice its per-head side inputs (attention bias,
    masks with a head axis, head sinks): constants in place, computed ones through a
    ``Gather`` on the head axis."""
    for p in plans:
        nodes = p.block.nodes
        if "op" not in nodes:
            continue
        node = next(n for n in model.graph.node if n.name == nodes["op"])
        d = p.block.head_dim
        new = {"num_heads": len(p.keep_q), "q_num_heads": len(p.keep_q),
               "kv_num_heads": len(p.keep_kv)}
        for a in node.attribute:
            if nodes.get("folded_heads"):  # heads live in the batch axis: one per batch row
                break
            if a.name in _HEAD_ATTRS[nodes["op_type"]]:
                a.i = new[a.name]
            elif a.name == "qkv_hidden_sizes":
                del a.ints[:]
                a.ints.extend([len(p.keep_q) * d, len(p.keep_kv) * d, len(p.keep_kv) * d])
        keep = np.asarray(p.keep_q, dtype=np.int64)
        for port, axis, *_ in nodes.get("head_inputs", ()):
            value = node.input[port]
            if value in consts and (value in editor.inits or consts[value][0] == value):
                arr = _const_value(model, consts, value)
                editor.set_input(node, port, np.ascontiguousarray(np.take(arr, keep, axis)),
                                 f"{value}.pruned")
                continue
            idx = editor.fresh(f"{node.name}.kept_heads_{port}")
            out = editor.fresh(f"{value}.kept_heads")
            model.graph.initializer.append(numpy_helper.from_array(keep, idx))
            gather = helper.make_node("Gather", [value, idx], [out], axis=axis, name=out)
            pos = next(i for i, n in enumerate(model.graph.node) if n.name == node.name)
            model.graph.node.insert(pos, gather)
            node = model.graph.node[pos + 1]
            node.input[port] = out


def _verify(model, inputs, prop) -> None:
    try:
        onnx.checker.check_model(model)
        shapes, _ = probe_shapes(model, inputs)
    except Exception as e:
        raise PassError(f"The ONNX model is invalid after head pruning: "
                        f"{str(e).strip().splitlines()[0][:300]}",
                        "This is a slimc bug; please report it with the model.") from e
    for value, shape in shapes.items():
        want = prop.new_shape(value)
        if want is not None and tuple(shape) != want:
            raise PassError(f"Head pruning predicted shape {want} for {value} but the pruned "
                            f"model computes {tuple(shape)}.",
                            "This is a slimc bug; please report it with the model.")


# -- analysis helpers for importance scores (slimc.passes.importance) -------------------------

def head_dims(model: onnx.ModelProto, blocks: list, inputs) -> tuple[dict, dict]:
    """Head atoms of every value that carries heads in the unpruned model, and value shapes."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    _name_nodes(m)
    shapes, _ = probe_shapes(m, inputs)
    plans = [_math.BlockPlan(b, tuple(range(b.num_heads)), tuple(range(b.num_kv_heads)))
             for b in blocks]
    names = _node_names(m)
    seeds, _ = _seeds(plans, names, shapes, ir_onnx.constants(m), _Editor(m))
    ops = _translate(m, shapes, ir_onnx.constants(m),
                     {p.block.o.node: (p.layer, None) for p in plans})
    sizes, repeat = {}, {}
    for p in plans:
        sizes.update(p.sizes())
        repeat.update(p.repeat_symbols())
    try:
        return propagate(ops, shapes, seeds, sizes, repeat).dims, shapes
    except HeadShapeError as e:
        raise UnsupportedError(f"Cannot locate the heads at node {e.node}: {e.reason}.",
                               "Use score='magnitude'.") from None


def node_output(model: onnx.ModelProto, node: str) -> str:
    """The first output of the node discovery calls ``node``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    _name_nodes(m)
    return _node_names(m)[node].output[0]


def record(model: onnx.ModelProto, values: set, batches) -> list:
    """For each batch, {value: array} of the named values (onnxruntime)."""
    return [probe_shapes(model, batch, keep=lambda name, _: name in values)[1]
            for batch in batches]
