"""ONNX backend adapter: an ``onnx.ModelProto`` seen by slimc.

Weights are initializers (and ``Constant`` node values), named by their tensor name.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from .attention import FUSED_ATTENTION, fused_attention
from .view import View, VNode

_RESHAPE = {"Reshape", "Squeeze", "Unsqueeze", "Flatten"}
_IDENTITY = {"Identity", "Dropout", "Cast", "CastLike"}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Where", "Neg", "Pow", "Sqrt", "Max", "Min"}


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def constants(model: onnx.ModelProto) -> dict[str, tuple[str, bool]]:
    """Value name → (source weight name, transposed?) for every value that is a constant:
    initializers, Constant nodes, and Identity/Transpose of those (TorchScript exports alias
    shared weights through Identity; some exporters store a Linear weight pre-transposed)."""
    g = model.graph
    consts: dict[str, tuple[str, bool]] = {i.name: (i.name, False) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.output:
            consts[n.output[0]] = (n.output[0], False)
        elif n.op_type == "Identity" and n.input and n.input[0] in consts:
            consts[n.output[0]] = consts[n.input[0]]
        elif n.op_type == "Transpose" and n.input and n.input[0] in consts:
            src, tr = consts[n.input[0]]
            perm = _attr(n, "perm")
            if not tr and (perm is None or list(perm) == [1, 0]):
                consts[n.output[0]] = (src, True)
    return consts


def copy_except(src, dst, skip: frozenset | set = frozenset()) -> None:
    """Copy the fields of protobuf message ``src`` into ``dst``, all but those in ``skip`` (a
    model without its weights, without copying the weights first)."""
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.cpp_type == fd.CPPTYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


_STUB_BYTES = 1 << 16   # initializers above this lose their values in shape inference's copy


def _weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its large initializers reduced to name, type and shape: what shape
    inference reads of them. Small ones (shape tensors, scalars) keep their values, which
    Reshape/Expand inference needs. Shape inference serializes the model and parses it back;
    with the weights that is three copies of them (a 1B-parameter model: ~13 GB)."""
    shell = onnx.ModelProto()
    copy_except(model, shell, {"graph"})
    copy_except(model.graph, shell.graph, {"initializer"})
    for t in model.graph.initializer:
        try:
            small = t.ByteSize() <= _STUB_BYTES
        except Exception:  # noqa: BLE001 - protobuf refuses to size a tensor over 2 GiB
            small = False
        if small:
            shell.graph.initializer.append(t)
        else:
            shell.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
    return shell


def _infer_shapes(model: onnx.ModelProto) -> dict[str, tuple | None]:
    try:
        # data_prop: exports with dynamic axes compute reshape targets from Shape ops; only
        # propagating those values gives q its [B, H, S, head_dim] shape (discovery needs d)
        inferred = onnx.shape_inference.infer_shapes(_weightless(model), strict_mode=False,
                                                    data_prop=True)
    except Exception:  # noqa: BLE001 - shape inference is best effort here
        inferred = model
    shapes = {}
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                for d in t.shape.dim)
    for init in g.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def build_view(model: onnx.ModelProto) -> View:
    g = model.graph
    consts = constants(model)
    shapes = _infer_shapes(model)
    dims = {name: shapes.get(name) for name in consts}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    nodes: list[VNode] = []
    for idx, n in enumerate(g.node):
        name = n.name or f"{n.op_type}_{idx}"
        op_type = n.op_type
        data = [i for i in n.input if i and i not in consts]
        if op_type in ("MatMul", "Gemm") and len(n.input) >= 2 and n.input[1] in consts \
                and n.input[0] not in consts and (op_type == "MatMul" or not _attr(n, "transA", 0)):
            src, transposed = consts[n.input[1]]
            wshape = dims.get(src) or shapes.get(src)
            if wshape and len(wshape) == 2:
                layout = "in_out"
                if op_type == "Gemm" and _attr(n, "transB", 0):
                    layout = "out_in"
                if transposed:
                    layout = "out_in" if layout == "in_out" else "in_out"
                out_f, in_f = (wshape[0], wshape[1]) if layout == "out_in" else (wshape[1],
                                                                                   wshape[0])
                bias = None
                if op_type == "Gemm" and len(n.input) > 2 and n.input[2] in consts:
                    bias = consts[n.input[2]][0]
                else:
                    bias = _bias_add(n.output[0], consts, shapes, out_f, consumers)
                nodes.append(VNode(name, "linear", [n.input[0]], list(n.output),
                                   {"weight": src, "bias": bias, "layout": layout,
                                    "in_features": int(in_f), "out_features": int(out_f),
                                    "weight_value": n.input[1]}))
                continue
        if n.op_type in FUSED_ATTENTION and n.domain in ("com.microsoft", "", "ai.onnx"):
            nodes.append(fused_attention(name, n, consts, shapes,
                                         lambda v: _parameters(model, consts[v][0])))
            continue
        if op_type in ("MatMul", "Gemm"):
            op = "matmul"
        elif op_type == "Softmax":
            op = "softmax"
        elif op_type in _RESHAPE:
            op, data = "reshape", n.input[:1]
        elif op_type == "Transpose":
            op, data = "transpose", n.input[:1]
        elif op_type in ("Expand", "Tile"):
            op, data = "expand", n.input[:1]
        elif op_type in _IDENTITY:
            op, data = "identity", n.input[:1]
        elif op_type in _ELEMENTWISE:
            op = "elementwise"
            if op_type == "Where":
                data = [i for i in n.input[1:] if i and i not in consts]
        elif op_type == "Split":
            op, data = "split", n.input[:1]
        elif op_type == "Slice":
            op, data = "slice", n.input[:1]
        elif op_type == "Gather" and len(n.input) > 1 and n.input[1] in consts:
            op, data = "select", n.input[:1]
        elif op_type == "Concat":
            op = "concat"
        else:
            op = "other"
        # fn: the op type, with its domain when not the default one (``com.microsoft::BiasGelu``)
        fn = (f"{n.domain}::" if n.domain not in ("", "ai.onnx") else "") + op_type
        nodes.append(VNode(name, op, [d for d in data if d], list(n.output), {"fn": fn}))
    return View(nodes, shapes)


def _parameters(model: onnx.ModelProto, name: str) -> int:
    """How many elements of a constant ``slimc.Graph.num_parameters`` counts."""
    w = get_weight(model, name)
    counted = np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer) \
        and w.ndim >= 2
    return int(w.size) if counted else 0


def _bias_add(value, consts, shapes, out_f, consumers) -> str | None:
    """The bias of the Add right after a MatMul: its other input, a 1-D constant of the output
    width."""
    users = consumers.get(value, [])
    if len(users) != 1 or users[0].op_type != "Add":
        return None
    n = users[0]
    other = n.input[1] if n.input[0] == value else n.input[0]
    if other in consts:
        src = consts[other][0]
        if tuple(shapes.get(src) or ()) == (out_f,):
            return src
    return None


def _const_nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.output[0]: n for n in model.graph.node if n.op_type == "Constant" and n.output}


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def get_weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    for i in model.graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    node = _const_nodes(model).get(name)
    if node is not None:
        return numpy_helper.to_array(_attr(node, "value"))
    raise KeyError(name)


def set_weight(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for i in model.graph.initializer:
        if i.name == name:
            i.CopyFrom(numpy_helper.from_array(np.asarray(value, dtype=numpy_helper.to_array(
                i).dtype), name))
            return
    node = _const_nodes(model).get(name)
    if node is None:
        raise KeyError(name)
    for a in node.attribute:
        if a.name == "value":
            old = numpy_helper.to_array(a.t)
            a.t.CopyFrom(numpy_helper.from_array(np.asarray(value, dtype=old.dtype)))


def op_histogram(model: onnx.ModelProto) -> Counter:
    return Counter((f"{n.domain}::" if n.domain not in ("", "ai.onnx") else "") + n.op_type
                   for n in model.graph.node)


def serialized_size(model: onnx.ModelProto) -> int:
    """``len(model.SerializeToString())``, summed per initializer: protobuf's ``ByteSize()``
    serializes the message (a transient copy of every weight) and refuses one over 2 GiB."""
    shell, graph = onnx.ModelProto(), onnx.GraphProto()
    copy_except(model, shell, {"graph"})
    copy_except(model.graph, graph, {"initializer"})
    # a length-delimited field: 1 tag byte (field numbers < 16) + varint length + payload
    size = graph.ByteSize() + sum(_field(_tensor_size(t)) for t in model.graph.initializer)
    return shell.ByteSize() + (_field(size) if model.HasField("graph") else 0)


def _field(n: int) -> int:
    return 1 + max(1, (n.bit_length() + 6) // 7) + n


def _tensor_size(t: onnx.TensorProto) -> int:
    try:
        return t.ByteSize()
    except Exception:  # noqa: BLE001 - one tensor over 2 GiB: its bytes dominate
        return len(t.raw_data) + 16 + 8 * len(t.dims) + len(t.name)
