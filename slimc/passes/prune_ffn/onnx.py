"""FFN neuron pruning on an ``onnx.ModelProto``: rewire only.

For every planned block: the projections' weights (a MatMul / Gemm ``B`` as that node reads it,
through the exporter's Transpose if any) and Gemm's ``C``; every constant an inner node
broadcasts along the intermediate axis (bias adds, ``BiasGelu`` / ``FastGelu`` bias inputs);
the last entry of every inner ``Reshape`` target (a constant, or the last constant input of the
``Concat`` that builds it under dynamic axes); and the last dimension of the block's values in
``value_info``. Exporters share initializers (equal biases, one shape constant for every
layer): a constant something else still reads is copied, never edited in place.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ...errors import UnsupportedError
from ...ir import onnx as ir_onnx
from ...ir.surgery import Namer, drop_unused
from . import _math


def _names(model: onnx.ModelProto) -> dict:
    """The names ``ir.onnx.build_view`` gives nodes (``name`` or ``OpType_index``)."""
    return {(n.name or f"{n.op_type}_{i}"): n for i, n in enumerate(model.graph.node)}


class _Editor:
    """Replace the constant that input ``port`` of ``node`` reads, copying it when shared."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.fresh = Namer(model)
        self.consts = ir_onnx.constants(model)
        self.dropped: list[str] = []

    def value(self, node, port: int) -> np.ndarray | None:
        src = self.consts.get(node.input[port])
        if src is None:
            return None
        arr = ir_onnx.get_weight(self.model, src[0])
        return arr.T if src[1] else arr

    def _readers(self, value: str) -> int:
        return sum(1 for n in self.model.graph.node for v in n.input if v == value) + sum(
            1 for o in self.model.graph.output if o.name == value)

    def replace(self, node, port: int, new: np.ndarray) -> None:
        value = node.input[port]
        src, transposed = self.consts[value]
        if value == src and self._readers(value) == 1:
            ir_onnx.set_weight(self.model, src, new)
            return
        name = self.fresh(f"{src}_pruned")
        dtype = ir_onnx.get_weight(self.model, src).dtype
        self.model.graph.initializer.append(numpy_helper.from_array(new.astype(dtype), name))
        node.input[port] = name
        self.consts[name] = (name, False)
        self.dropped.append(value)


def _linear_axis(node, rows: bool) -> int:
    """The axis of ``B`` (as the node reads it) that holds output features (``rows``) or input
    features."""
    trans_b = node.op_type == "Gemm" and ir_onnx._attr(node, "transB", 0)
    out_axis = 0 if trans_b else 1
    return out_axis if rows else 1 - out_axis


def _keep(arr: np.ndarray, axis: int, keep) -> np.ndarray:
    return np.ascontiguousarray(np.take(arr, np.asarray(keep, dtype=np.int64), axis=axis))


def _reshape_target(model, editor: _Editor, node, width: int, new: int) -> None:
    shape = editor.value(node, 1)
    if shape is not None:
        if shape.size and int(shape[-1]) == width:
            shape = shape.copy()
            shape[-1] = new
            editor.replace(node, 1, shape)
            return
        if shape.size and int(shape[-1]) == -1 and (shape > 0).sum() == shape.size - 1:
            return  # the other dimensions are fixed: the last follows the new width
        raise UnsupportedError(f"Cannot prune FFN neurons through Reshape {node.name!r}: its "
                               f"target {shape.tolist()} does not keep the intermediate axis "
                               f"({width}) last.", "Report the model architecture.")
    producer = next((n for n in model.graph.node if node.input[1] in n.output), None)
    if producer is not None and producer.op_type == "Concat":
        last = editor.value(producer, len(producer.input) - 1)
        if last is not None:
            if last.size == 1 and int(last.reshape(-1)[0]) == width:
                editor.replace(producer, len(producer.input) - 1,
                               np.full_like(last, new))
            return
    raise UnsupportedError(f"Cannot prune FFN neurons through Reshape {node.name!r}: its target "
                           "shape is computed in a way slimc does not follow.",
                           "Export the model with static shapes, or report the model.")


def prune(model: onnx.ModelProto, plans: list) -> None:
    """Apply ``plans`` (one :class:`~._math.FFNPlan` per changed block) to ``model`` in place."""
    names = _names(model)
    editor = _Editor(model)
    outputs = {o.name for o in model.graph.output}
    resized: dict[str, tuple[int, int]] = {}
    for p in plans:
        b, keep, width = p.block, p.keep, p.block.intermediate
        for lin in b.inputs:
            node = names[lin.node]
            w = editor.value(node, 1)
            editor.replace(node, 1, _keep(w, _linear_axis(node, True), keep))
            if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
                c = editor.value(node, 2)
                if c is not None and c.ndim and c.shape[-1] == width:
                    editor.replace(node, 2, _keep(c, -1, keep))
            resized[node.output[0]] = (width, len(keep))
        down = names[b.down.node]
        editor.replace(down, 1, _keep(editor.value(down, 1), _linear_axis(down, False), keep))
        for name in b.nodes["inner"]:
            node = names[name]
            if node.op_type == "Reshape":
                _reshape_target(model, editor, node, width, len(keep))
            else:
                for port in range(len(node.input)):
                    c = editor.value(node, port) if node.input[port] else None
                    if c is not None and c.ndim and c.shape[-1] == width and c.size > 1:
                        editor.replace(node, port, _keep(c, -1, keep))
            for o in node.output:
                resized[o] = (width, len(keep))
    bad = sorted(set(resized) & outputs)
    if bad:
        raise UnsupportedError(f"The FFN value(s) {bad} are graph outputs; their width would "
                               "change the model's interface.", "Prune the other layers.")
    drop_unused(model, editor.dropped)
    for vi in model.graph.value_info:
        if vi.name in resized:
            dims = vi.type.tensor_type.shape.dim
            old, new = resized[vi.name]
            if len(dims) and dims[-1].HasField("dim_value") and dims[-1].dim_value == old:
                dims[-1].dim_value = new
