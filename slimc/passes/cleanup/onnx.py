"""cleanup on ONNX, with onnx-graphsurgeon: remove no-op nodes, fold constants, drop dead nodes
and unused initializers, in graphsurgeon's way (disconnect, then ``cleanup().toposort()``).

Graph output names never change. What graphsurgeon does not carry through a round trip (node and
graph ``metadata_props``, ``value_info``) is copied back from the input model.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..._quiet import plain_graphsurgeon_logs

# Shape inference runs on an in-memory model, which protobuf caps at 2 GiB.
_INFER_LIMIT = 1_800_000_000
# Their value is drawn at random each run: folding would freeze one draw.
_RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
           "Multinomial", "Bernoulli", "Dropout"}
# Ops that only rearrange or relabel: an unchanged static shape (and dtype) means unchanged data.
_SHAPE_ONLY = {"Reshape", "Expand", "Squeeze", "Unsqueeze", "Flatten", "Tile"}


@contextlib.contextmanager
def _quiet():
    """graphsurgeon logs a warning for every subgraph it cannot evaluate; that is expected here
    (the part stays computation), so only errors get through."""
    plain_graphsurgeon_logs()
    logger = gs.logger.G_LOGGER
    old = logger.severity
    logger.severity = logger.ERROR
    try:
        yield
    finally:
        logger.severity = old


def _static(shape) -> tuple | None:
    if shape is None or any(not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        return None
    return tuple(int(d) for d in shape)


def _np_dtype(d) -> np.dtype | None:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(d) if isinstance(d, int) else d)
    except Exception:  # a type numpy cannot name: do not treat it as equal to anything
        return None


def _same_dtype(a, b) -> bool:
    da, db = _np_dtype(a), _np_dtype(b)
    return da is not None and da == db


def _is_false_constant(t) -> bool:
    return isinstance(t, gs.Constant) and t.values.size == 1 and not bool(t.values.reshape(()))


def _noop_input(graph: gs.Graph, node: gs.Node):
    """The tensor ``node`` passes through unchanged, or None (the node does real work)."""
    if not node.inputs or node.inputs[0].is_empty() or not node.outputs:
        return None
    x, y = node.inputs[0], node.outputs[0]
    if node.op == "Identity":
        return x
    if node.op == "Dropout":
        return x if _dropout_is_identity(graph, node) else None
    if node.op == "Cast":
        return x if _same_dtype(x.dtype, node.attrs.get("to")) else None
    if node.op == "CastLike":
        return x if len(node.inputs) > 1 and _same_dtype(x.dtype, node.inputs[1].dtype) else None
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        return x if perm is not None and list(perm) == list(range(len(perm))) else None
    if node.op in _SHAPE_ONLY:
        same_shape = _static(x.shape) is not None and _static(x.shape) == _static(y.shape)
        return x if same_shape and _same_dtype(x.dtype, y.dtype) else None
    return None


def _dropout_is_identity(graph: gs.Graph, node: gs.Node) -> bool:
    """Dropout is the identity at inference: training_mode absent or a constant false (opset
    12+), ``is_test`` set (opset < 7, where it defaults to training), and its mask unused."""
    if len(node.outputs) > 1:
        mask = node.outputs[1]
        if mask.outputs or mask in graph.outputs:
            return False
    if "is_test" in node.attrs:
        if not node.attrs["is_test"]:
            return False
    elif graph.opset < 7:
        return False
    training = node.inputs[2] if len(node.inputs) > 2 else None
    return training is None or training.is_empty() or _is_false_constant(training)


def _bypass(graph: gs.Graph, node: gs.Node, x: gs.Tensor) -> bool:
    """Make every reader of ``node``'s output read ``x`` instead and disconnect ``node``.

    A graph output keeps its name: ``x`` takes it over. That is refused (the node stays) when
    ``x`` is a graph input, a constant or another graph output, whose names must not change.
    """
    y = node.outputs[0]
    if y in graph.outputs:
        if isinstance(x, gs.Constant) or x in graph.inputs or x in graph.outputs \
                or not x.inputs:
            return False
        index = graph.outputs.index(y)
        x.name = y.name
        x.dtype = x.dtype if x.dtype is not None else y.dtype
        x.shape = x.shape if x.shape is not None else y.shape
        graph.outputs[index] = x
    for reader in list(y.outputs):
        for i, t in enumerate(reader.inputs):
            if t is y:
                reader.inputs[i] = x
    node.inputs.clear()
    node.outputs.clear()
    return True


def remove_noops(graph: gs.Graph) -> Counter:
    removed: Counter = Counter()
    for node in list(graph.nodes):
        x = _noop_input(graph, node)
        if x is not None and _bypass(graph, node, x):
            removed[node.op] += 1
    return removed


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with inferred shapes and types (so shape-only no-ops can be recognised and
    ``Shape`` of static tensors folded), or the model itself where inference fails."""
    from ...ir.onnx import _weightless, copy_except, serialized_size
    if serialized_size(model) > _INFER_LIMIT:
        return model
    try:
        # inference on the model without its large weights (it serializes and parses the model:
        # with them, three transient copies), then the model with the inferred value_info
        inferred = onnx.shape_inference.infer_shapes(_weightless(model), strict_mode=False,
                                                     data_prop=True)
    except Exception:  # noqa: BLE001 - inference is an optimisation only; without it fewer
        # no-ops are found
        return model
    out = onnx.ModelProto()
    copy_except(model, out, {"graph"})
    copy_except(model.graph, out.graph, {"value_info"})
    out.graph.value_info.extend(inferred.graph.value_info)
    return out


def _node_key(n: onnx.NodeProto) -> bytes:
    m = onnx.NodeProto()
    m.CopyFrom(n)
    del m.metadata_props[:]
    return m.SerializeToString()


def _same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Same computation: nodes (metadata aside), weights, inputs and outputs."""
    ga, gb = a.graph, b.graph
    if sorted(map(_node_key, ga.node)) != sorted(map(_node_key, gb.node)):
        return False
    # compared one tensor at a time: serializing all of them at once would copy every weight
    # of both graphs
    ia = {i.name: i for i in ga.initializer}
    ib = {i.name: i for i in gb.initializer}
    if ia.keys() != ib.keys() or any(ia[k].SerializeToString() != ib[k].SerializeToString()
                                     for k in ia):
        return False

    def names(values):
        return [v.name for v in values]

    return names(ga.input) == names(gb.input) and names(ga.output) == names(gb.output)


def _restore_metadata(new: onnx.ModelProto, old: onnx.ModelProto) -> None:
    """Copy back what graphsurgeon drops: node and graph metadata, and the input's value_info
    for the values that still exist (inferred shapes are not added: the model keeps its form)."""
    meta = {n.name: n.metadata_props for n in old.graph.node if n.name and n.metadata_props}
    for n in new.graph.node:
        if n.name in meta and not n.metadata_props:
            n.metadata_props.extend(meta[n.name])
    if not new.graph.metadata_props:
        new.graph.metadata_props.extend(old.graph.metadata_props)
    produced = {o for n in new.graph.node for o in n.output}
    keep = [vi for vi in old.graph.value_info if vi.name in produced]
    del new.graph.value_info[:]
    new.graph.value_info.extend(keep)


def _op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _round(model: onnx.ModelProto, fold: bool, max_fold_bytes: int,
           counts: Counter) -> onnx.ModelProto:
    """One round: no-ops, dead nodes, then folding. Folding can make shapes static, which
    uncovers more no-ops, hence rounds until nothing changes."""
    with _quiet():
        graph = gs.import_onnx(_infer(model))
        noops = remove_noops(graph)
        n0 = len(graph.nodes)
        graph.cleanup().toposort()
        n1 = len(graph.nodes)
        if fold:
            graph.fold_constants(size_threshold=max_fold_bytes, error_ok=True,
                                 should_exclude_node=lambda n: n.op in _RANDOM)
            graph.cleanup().toposort()
        new = gs.export_onnx(graph)
    counts["noops"] += sum(noops.values())
    counts["dead"] += n0 - n1 - sum(noops.values())
    counts["folded"] += n1 - len(graph.nodes)
    _restore_metadata(new, model)
    return new


def cleanup(model: onnx.ModelProto, *, fold: bool, max_fold_bytes: int,
            max_rounds: int = 4) -> tuple[onnx.ModelProto, bool, dict]:
    """Returns (model, modified, stats); ``model`` is the input itself when nothing changed."""
    counts: Counter = Counter()
    current = model
    for _ in range(max_rounds):
        new = _round(current, fold, max_fold_bytes, counts)
        if _same_graph(current, new):
            break
        current = new
    before, after = _op_counts(model), _op_counts(current)
    modified = current is not model
    stats = {"nodes_before": sum(before.values()), "nodes_after": sum(after.values()),
             "removed": dict(sorted((before - after).items())),
             "noops": counts["noops"] if modified else 0,
             "dead": counts["dead"] if modified else 0,
             "folded": counts["folded"] if modified else 0}
    return current, modified, stats
