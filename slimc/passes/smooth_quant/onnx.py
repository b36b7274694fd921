"""ONNX side of SmoothQuant: the producers whose per-feature parameters can absorb 1/s, and who
reads a value. Smoothing itself only rewrites initializers (Graph.set_weight)."""

from __future__ import annotations

import numpy as np
import onnx

from ...ir.onnx import _attr, constants, get_weight
from ...ir.view import View
from ..quantize.onnx import node_names
from ._math import OUTPUT, Producer


def _vector(model, consts, value: str) -> str | None:
    """The source of a 1-D constant (read directly, not transposed), else None."""
    if value not in consts or consts[value][1]:
        return None
    src = consts[value][0]
    return src if np.ndim(get_weight(model, src)) == 1 else None


def producers(model: onnx.ModelProto, view: View) -> list[Producer]:
    consts = constants(model)
    names = node_names(model)
    out = []
    for name, n in zip(names, model.graph.node):
        if n.op_type in ("LayerNormalization", "RMSNormalization") and len(n.input) >= 2:
            gamma = _vector(model, consts, n.input[1])
            beta = _vector(model, consts, n.input[2]) if len(n.input) > 2 and n.input[2] \
                else None
            has_beta = len(n.input) > 2 and bool(n.input[2])
            shape = view.shape(n.input[0])
            axis = _attr(n, "axis", -1)
            last = axis == -1 or (shape is not None and axis == len(shape) - 1)
            if gamma is not None and (beta is not None or not has_beta) and last:
                feats = int(np.size(get_weight(model, gamma)))
                out.append(Producer(name, "layernorm", n.output[0], feats,
                                    {"gamma": gamma, "beta": beta}, frozenset({name})))
        elif n.op_type == "Mul" and len(n.input) == 2:
            shape = view.shape(n.output[0])
            feats = shape[-1] if shape and isinstance(shape[-1], int) else None
            for a, b in (n.input, n.input[::-1]):
                g = _vector(model, consts, a)
                if g is not None and b not in consts \
                        and np.size(get_weight(model, g)) == feats:
                    out.append(Producer(name, "scale", n.output[0], feats, {"gamma": g},
                                        frozenset({name})))
                    break
    by_name = dict(zip(names, model.graph.node))
    readers_ = _reader_map(model)
    for v in view.nodes:
        if v.op != "linear":
            continue
        node, out_value, nodes = by_name[v.name], v.outputs[0], {v.name}
        bias = v.attrs["bias"]
        if bias is not None and node.op_type != "Gemm":
            # the bias arrives by an Add right after the MatMul: its output is what is read
            adds = [r for r in readers_.get(out_value, []) if by_name[r].op_type == "Add"]
            if len(adds) != 1 or len(readers_[out_value]) != 1:
                continue
            nodes.add(adds[0])
            out_value = by_name[adds[0]].output[0]
        out.append(Producer(v.name, "linear", out_value, int(v.attrs["out_features"]),
                            {"weight": v.attrs["weight"], "bias": bias,
                             "layout": v.attrs["layout"]}, frozenset(nodes)))
    return out


def _reader_map(model: onnx.ModelProto) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, n in zip(node_names(model), model.graph.node):
        for v in dict.fromkeys(n.input):
            if v:
                out.setdefault(v, []).append(name)
    return out


def readers(model: onnx.ModelProto):
    from ..threshold_weights.onnx import _subgraph_names
    direct = _reader_map(model)
    hidden = {o.name for o in model.graph.output}
    for n in model.graph.node:
        hidden |= _subgraph_names(n)

    def read(value: str) -> list[str]:
        return direct.get(value, []) + ([OUTPUT] if value in hidden else [])
    return read


def unshare(model: onnx.ModelProto):
    """``unshare(producer, names)``: give the producer private copies of the named initializers
    (read directly, not through aliases); None if it cannot."""
    from dataclasses import replace

    from onnx import numpy_helper

    from ...ir.surgery import Namer
    by_name = dict(zip(node_names(model), model.graph.node))

    def run(p: Producer, names: list[str]) -> Producer | None:
        if p.kind == "linear":
            return None
        n = by_name[p.node]
        inits = {i.name for i in model.graph.initializer}
        consts = constants(model)  # the node may read the initializer through Identity

        def reads(name):
            return [i for i, v in enumerate(n.input) if consts.get(v) == (name, False)]
        if any(name not in inits or not reads(name) for name in names):
            return None
        fresh = Namer(model)
        params = dict(p.params)
        for name in names:
            new = fresh(f"{name}_{p.node.strip('/').replace('/', '_')}")
            model.graph.initializer.append(numpy_helper.from_array(get_weight(model, name), new))
            for i in reads(name):
                n.input[i] = new
            params = {k: (new if v == name else v) for k, v in params.items()}
        return replace(p, params=params)
    return run


def insert_scale(model: onnx.ModelProto, value: str, readers: list[str],
                 inv_s: np.ndarray) -> None:
    """y = Mul(value, inv_s) (a new initializer), read by ``readers`` instead of ``value``."""
    from onnx import helper, numpy_helper

    from ...ir.surgery import Namer, toposort
    fresh = Namer(model)
    by_name = dict(zip(node_names(model), model.graph.node))
    scale, out = fresh(f"{value}_smooth_scale"), fresh(f"{value}_smoothed")
    model.graph.initializer.append(numpy_helper.from_array(inv_s.astype(np.float32), scale))
    for r in readers:
        n = by_name[r]
        for i, v in enumerate(n.input):
            if v == value:
                n.input[i] = out
    model.graph.node.append(helper.make_node("Mul", [value, scale], [out],
                                             name=fresh(f"{value}_SmoothQuant_Mul")))
    toposort(model)
