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
from . import _math
from ._shapes import HeadShapeError, ShapeOp, plain_dims, propagate

_RESHAPE = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
_SHAPE = {"Shape", "Size"}


def _node_names(model: onnx.ModelProto) -> dict:
    """The names ``ir.onnx.build_view`` gives nodes (``name`` or ``OpType_index``)."""
    return {(n.name or f"{n.op_type}_{i}"): n for i, n in enumerate(model.graph.node)}


def probe_shapes(model: onnx.ModelProto, inputs) -> dict:
    """The concrete shape of every value on ``inputs`` (one onnxruntime run)."""
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
    values = sess.run(None, feeds)
    shapes = {o.name: tuple(np.shape(v)) for o, v in zip(sess.get_outputs(), values)}
    for k, x in feeds.items():
        shapes[k] = tuple(np.shape(x))
    for init in model.graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    return shapes, dict(zip((o.name for o in sess.get_outputs()), values))


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
        if t in _RESHAPE:
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
        pairs = [(b.q, p.fused_atoms())] if b.fused_qkv else \
            [(b.q, p.q_atoms()), (b.k, p.kv_atoms()), (b.v, p.kv_atoms())]
        for lin, atoms in pairs:
            node = names[lin.node]
            out = node.output[0]
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
            seeds[add[0].input[idx]] = [atoms]
            bias_sites.append((add[0], idx, lin))
    return seeds, bias_sites


def _slice_weights(model, editor: _Editor, plans, names: dict, consts: dict, bias_sites):
    for p in plans:
        for e in _math.weight_edits(p):
            node = names[e.node]
            if e.bias and node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
                idx = 2
            elif e.bias:
                site = next(s for s in bias_sites if s[2].node == e.node)
                node, idx = site[0], site[1]
            else:
                idx = 1
            src, transposed = consts[node.input[idx]]
            if e.bias:  # _seeds gave the bias a private initializer in the consumed layout
                transposed = False
            new = _math.apply_edit(ir_onnx.get_weight(model, src), e)
            if transposed:
                new = np.ascontiguousarray(new.T)
            editor.set_input(node, idx, new, f"{src}.pruned")


def _shape_input(model, editor, consts, node, index: int, new: list, old_out, static: bool,
                 keep_special: bool):
    """Give ``node.input[index]`` (a 1-D int64 shape) the value ``new``; -1 and 0 entries of a
    constant shape are kept (they infer / copy and stay right)."""
    value = node.input[index]
    if value in consts:
        old = _const_value(model, consts, value)
        arr = np.array([o if keep_special and o in (-1, 0) else n for o, n in zip(old, new)],
                       dtype=np.int64)
    elif static:
        arr = np.array(new, dtype=np.int64)
    else:
        raise UnsupportedError(
            f"Node {node.name or node.op_type} computes its target shape at run time from "
            "dynamic input sizes; slimc cannot rewrite the head count inside it.",
            "Export the model with static input shapes (no dynamic_axes).")
    editor.set_input(node, index, arr, f"{node.name or node.op_type}.pruned_shape")


def _rewrite(model, editor, prop, shapes: dict, consts: dict, names: dict, static: bool):
    for name, n in names.items():
        t = n.op_type
        outs = [o for o in n.output if o]
        if t in ("Reshape", "Expand") and prop.changed(outs[0]):
            _shape_input(model, editor, consts, n, 1, list(prop.new_shape(outs[0])),
                         shapes[outs[0]], static, keep_special=True)
        elif t == "Split" and any(prop.changed(o) for o in outs):
            axis = _attr(n, "axis", 0) % len(shapes[n.input[0]])
            sizes = [prop.new_shape(o)[axis] for o in outs]
            if len(n.input) > 1 and n.input[1]:
                _shape_input(model, editor, consts, n, 1, sizes, None, static,
                             keep_special=False)
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


def _refresh_value_info(model) -> None:
    del model.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except (onnx.shape_inference.InferenceError, ValueError):
        return  # value_info is optional; leaving it empty is valid ONNX
    model.graph.value_info.extend(inferred.graph.value_info)


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes the names discovery used for them, so they stay findable while
    nodes are added and removed."""
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"


def prune(model: onnx.ModelProto, plans: list, inputs) -> None:
    """Apply ``plans`` to ``model`` in place; ``inputs`` feed the shape probe."""
    _name_nodes(model)
    shapes, _ = probe_shapes(model, inputs)
    _, before_values = _live(model)
    static = all(d.HasField("dim_value") for vi in model.graph.input
                 for d in vi.type.tensor_type.shape.dim)
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
    _rewrite(model, editor, prop, shapes, consts, names, static)
    for out in model.graph.output:
        new = prop.new_shape(out.name)
        if new is not None:
            for d, size in zip(out.type.tensor_type.shape.dim, new):
                if d.HasField("dim_value"):
                    d.dim_value = size
    _drop_dead(model, before_values)
    _refresh_value_info(model)
    _verify(model, inputs, prop)


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
    out = []
    for batch in batches:
        _, vals = probe_shapes(model, batch)
        out.append({k: v for k, v in vals.items() if k in values})
    return out
