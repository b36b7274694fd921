"""ONNX side of quantize: find MatMul/Gemm nodes, observe their inputs, insert QDQ.

Fake-quant is the QDQ format onnxruntime's own quantizer writes: a ``QuantizeLinear`` →
``DequantizeLinear`` pair on each quantized input, the float weight kept as an initializer
(fold_fake_quant turns it into int8). Dynamic activations use ``DynamicQuantizeLinear``
(asymmetric uint8, onnxruntime's dynamic quantization) or, symmetric, a scale computed in the
graph as max|x| / 127 feeding ``QuantizeLinear``.

The graph helpers it uses (fresh names, topological order, dropping what became dead) live in
:mod:`slimc.ir.surgery`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...errors import OptionError
from ...ir.onnx import _attr, build_view, constants, get_weight
from ...ir.surgery import Namer, drop_unused, toposort  # noqa: F401  (re-exported)
from .. import _calib
from . import _math
from ._math import QParams, Spec, Target

DEQUANTIZE = {"DequantizeLinear"}
_ONNX_TYPE = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8}


def opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 1


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value shape inference can tell."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - best effort; unknown types are treated as float
        inferred = model
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def node_names(model: onnx.ModelProto) -> list[str]:
    """The View's name of each node (``name`` or ``{op_type}_{index}``), by position."""
    return [n.name or f"{n.op_type}_{i}" for i, n in enumerate(model.graph.node)]


def plan(model: onnx.ModelProto, spec: Spec) -> tuple[list[Target], dict[str, str]]:
    view = build_view(model)
    by_name = dict(zip(node_names(model), model.graph.node))
    producers = {o: n for n in model.graph.node for o in n.output}
    consts = constants(model)
    types = elem_types(model)
    targets, skipped = [], {}
    for v in view.nodes:
        if v.op not in ("linear", "matmul"):
            continue
        n = by_name[v.name]
        if v.op not in spec.ops:
            skipped[v.name] = f"{v.op} not in ops="
            continue
        weight = v.attrs.get("weight_value")
        if spec.excluded(v.name, v.attrs.get("weight") or ""):
            skipped[v.name] = "excluded by exclude="
            continue
        if n.op_type == "Gemm" and _attr(n, "transA", 0):
            skipped[v.name] = "Gemm with transA=1"
            continue
        if v.op == "linear":
            acts = [n.input[0]]
            if types.get(consts[weight][0], TensorProto.FLOAT) != TensorProto.FLOAT:
                skipped[v.name] = "weight is not float32"
                continue
            axis = 0 if n.op_type == "Gemm" and _attr(n, "transB", 0) else 1
        else:
            acts = list(n.input[:2])
            if any(a in consts for a in acts):
                skipped[v.name] = "MatMul with a constant operand that is not a 2-D weight"
                continue
            axis = None
        if any(a in producers and producers[a].op_type in DEQUANTIZE for a in acts):
            skipped[v.name] = "already quantized (an input comes from DequantizeLinear)"
            continue
        if any(types.get(a, TensorProto.FLOAT) != TensorProto.FLOAT for a in acts):
            skipped[v.name] = "input is not float32"
            continue
        targets.append(Target(v.name, v.op, tuple(acts), weight, axis))
    return targets, skipped


def weight_array(model: onnx.ModelProto, target: Target) -> np.ndarray:
    """The weight as the node reads it (through Identity / Transpose aliases)."""
    src, transposed = constants(model)[target.weight]
    w = get_weight(model, src)
    return w.T if transposed else w


def observe(model: onnx.ModelProto, values: list[str],
            batches: list[tuple]) -> dict[str, _math.Observer]:
    """Run every batch with the values named added as graph outputs, and record them."""
    observers = {v: _math.Observer() for v in values}
    _calib.run(model, values, batches, lambda v, x: observers[v].update(x))
    return observers


# -- insertion -------------------------------------------------------------------------------
def _scalar(name: str, value, dtype) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _zero_point_array(qp: QParams) -> np.ndarray:
    return qp.zero_point.astype(qp.grid.dtype)


def insert(model: onnx.ModelProto, targets: list[Target], act: dict[str, QParams | None],
           weights: dict[str, QParams], spec: Spec) -> int:
    """Insert QDQ on every target's activations and weight; returns the number of pairs."""
    g = model.graph
    fresh = Namer(model)
    new_nodes, inits = [], []
    act_dq: dict[str, str] = {}
    for value in dict.fromkeys(v for t in targets for v in t.inputs):
        qp = act[value]
        dq = fresh(f"{value}_dequantized")
        q = fresh(f"{value}_quantized")
        if qp is not None:
            s, z = fresh(f"{value}_scale"), fresh(f"{value}_zero_point")
            inits += [_scalar(s, qp.scale, np.float32), _scalar(z, _zero_point_array(qp), None)]
            new_nodes.append(helper.make_node("QuantizeLinear", [value, s, z], [q],
                                              name=fresh(f"{value}_QuantizeLinear")))
        elif not spec.symmetric:
            s, z = fresh(f"{value}_scale"), fresh(f"{value}_zero_point")
            new_nodes.append(helper.make_node("DynamicQuantizeLinear", [value], [q, s, z],
                                              name=fresh(f"{value}_DynamicQuantizeLinear")))
        else:
            s, z = _symmetric_scale(value, fresh, new_nodes, inits)
            new_nodes.append(helper.make_node("QuantizeLinear", [value, s, z], [q],
                                              name=fresh(f"{value}_QuantizeLinear")))
        new_nodes.append(helper.make_node("DequantizeLinear", [q, s, z], [dq],
                                          name=fresh(f"{value}_DequantizeLinear")))
        act_dq[value] = dq
    w_dq: dict[str, str] = {}
    for value in dict.fromkeys(t.weight for t in targets if t.weight is not None):
        qp = weights[value]
        s, z = fresh(f"{value}_scale"), fresh(f"{value}_zero_point")
        q, dq = fresh(f"{value}_quantized"), fresh(f"{value}_dequantized")
        inits += [_scalar(s, qp.scale, np.float32), _scalar(z, _zero_point_array(qp), None)]
        kw = {"axis": qp.axis} if qp.per_channel else {}
        new_nodes += [helper.make_node("QuantizeLinear", [value, s, z], [q],
                                       name=fresh(f"{value}_QuantizeLinear"), **kw),
                      helper.make_node("DequantizeLinear", [q, s, z], [dq],
                                       name=fresh(f"{value}_DequantizeLinear"), **kw)]
        w_dq[value] = dq
    names = node_names(model)
    for t in targets:
        n = g.node[names.index(t.node)]
        for i, x in enumerate(n.input):
            if i < 2 and x in act_dq and x in t.inputs:
                n.input[i] = act_dq[x]
        if t.weight is not None:
            n.input[1] = w_dq[t.weight]
    g.initializer.extend(inits)
    g.node.extend(new_nodes)
    toposort(model)
    return len(act_dq) + len(w_dq)


def _symmetric_scale(value: str, fresh, nodes: list, inits: list) -> tuple[str, str]:
    """s = max(max|x| / 127, tiny) computed in the graph, and a zero point of 0 (int8)."""
    a, m, d, s = (fresh(f"{value}_{k}") for k in ("abs", "absmax", "absmax_127", "scale"))
    c127, tiny, z = (fresh(f"{value}_{k}") for k in ("127", "min_scale", "zero_point"))
    inits += [_scalar(c127, 127.0, np.float32), _scalar(tiny, _math.MIN_SCALE, np.float32),
              _scalar(z, 0, np.int8)]
    nodes += [helper.make_node("Abs", [value], [a], name=fresh(f"{value}_Abs")),
              helper.make_node("ReduceMax", [a], [m], keepdims=0,
                               name=fresh(f"{value}_ReduceMax")),
              helper.make_node("Div", [m, c127], [d], name=fresh(f"{value}_Div")),
              helper.make_node("Max", [d, tiny], [s], name=fresh(f"{value}_Max"))]
    return s, z


def check_opset(model: onnx.ModelProto, spec: Spec) -> None:
    v = opset(model)
    need = 13 if spec.weights == "per_channel" else 11 if spec.activations == "dynamic" else 10
    if v < need:
        raise OptionError(
            f"quantize: this ONNX model uses opset {v}; "
            f"{'per-channel weights' if need == 13 else 'this quantization'} need opset "
            f">= {need}.", "Re-export the model with a newer opset (e.g. opset_version=17)"
            + (", or use weights='per_tensor'." if need == 13 else "."))
