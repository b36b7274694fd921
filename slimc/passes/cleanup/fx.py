"""cleanup on FX: no-op removal, constant folding and dead-code elimination on a
``torch.fx.GraphModule`` from ``torch.export``, edited in place (the caller owns the copy).

Every decision reads the fake-tensor metadata (``node.meta["val"]``) torch.export leaves on each
node; a node without it is left alone.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx
import torch.utils._pytree as pytree

aten = torch.ops.aten

# Ops whose result is a view of their first argument: same shape, strides and storage offset
# means the result *is* the argument.
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
          aten.slice.Tensor, aten.narrow.default, aten.transpose.int, aten.permute.default,
          aten.t.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
          aten.unsqueeze.default, aten.flatten.using_ints, aten.unflatten.int, aten.alias.default,
          aten.detach.default, aten.view_as.default, aten.expand_as.default,
          aten.as_strided.default}
# Ops that copy (or convert) their first argument: same shape, dtype, device and strides means
# the copy holds the argument's values in the argument's layout.
_COPIES = {aten.clone.default, aten.contiguous.default, aten.to.dtype, aten.to.dtype_layout,
           aten.to.device, aten.to.other, aten._to_copy.default, aten.type_as.default,
           aten.lift_fresh_copy.default, aten.repeat.default}
# Dropout is the identity when not training (or dropping nothing).
_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
             aten.feature_alpha_dropout.default}
# x + 0, x - 0, x * 1, x / 1 (scalar second operand)
_NEUTRAL = {aten.add.Tensor: 0, aten.sub.Tensor: 0, aten.add.Scalar: 0, aten.sub.Scalar: 0,
            aten.mul.Tensor: 1, aten.div.Tensor: 1, aten.mul.Scalar: 1, aten.div.Scalar: 1}
# Values that are not determined by their arguments: never fold them.
_UNDEFINED = {aten.empty.memory_format, aten.empty_like.default, aten.new_empty.default,
              aten.empty_strided.default, aten.new_empty_strided.default}


def _val(a):
    v = a.meta.get("val") if isinstance(a, torch.fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _layout(t: torch.Tensor, *, offset: bool) -> tuple:
    """What two tensors must share to be interchangeable. Symbolic sizes compare by their
    expression: equal expressions are equal sizes, and comparing them never adds a shape guard."""
    return (tuple(str(d) for d in t.shape), tuple(str(d) for d in t.stride()),
            str(t.storage_offset()) if offset else "", t.dtype, t.device)


def _same_tensor_meta(a: torch.Tensor, b: torch.Tensor, *, offset: bool) -> bool:
    return _layout(a, offset=offset) == _layout(b, offset=offset)


def _noop_source(node: torch.fx.Node) -> torch.fx.Node | None:
    """The node ``node`` is the identity of, or None (it does real work, or its metadata cannot
    show that it does not)."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    src, t = node.args[0], node.target
    out, inp = _val(node), _val(src)
    if out is None or inp is None:
        return None
    if t in _VIEWS:
        return src if _same_tensor_meta(out, inp, offset=True) else None
    if t in _COPIES:
        return src if _same_tensor_meta(out, inp, offset=False) else None
    if t in _DROPOUTS:
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p")
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
        if (train is False or p == 0) and _same_tensor_meta(out, inp, offset=False):
            return src
        return None
    if t in _NEUTRAL and len(node.args) == 2 and not isinstance(node.args[1], torch.fx.Node):
        other = node.args[1]
        if (isinstance(other, (int, float)) and not isinstance(other, bool)
                and other == _NEUTRAL[t] and node.kwargs.get("alpha", 1) == 1
                and _same_tensor_meta(out, inp, offset=False)):
            return src
    return None


def _assert_holds(node: torch.fx.Node) -> bool:
    """``_assert_tensor_metadata(a, size, stride, dtype, device=, layout=)`` checks properties
    torch.export already fixed in ``a``'s metadata; where they match, the check can never fail."""
    if node.target != aten._assert_tensor_metadata.default:
        return False
    a = _val(node.args[0]) if node.args else None
    if a is None:
        return False
    want = dict(zip(("size", "stride", "dtype"), node.args[1:]))
    want.update(node.kwargs)
    have = {"size": tuple(str(d) for d in a.shape), "stride": tuple(str(d) for d in a.stride()),
            "dtype": a.dtype, "device": a.device, "layout": a.layout}
    for key, value in want.items():
        if value is None:
            continue
        if key in ("size", "stride"):
            if any(isinstance(d, torch.fx.Node) for d in value):
                return False
            value = tuple(str(d) for d in value)
        if key not in have or value != have[key]:
            return False
    return True


def _has_mutation(graph: torch.fx.Graph) -> bool:
    """Removing a copy is only safe when nothing writes to the copy or to its source."""
    for n in graph.nodes:
        schema = getattr(n.target, "_schema", None)
        if n.op == "call_function" and schema is not None and schema.is_mutable:
            return True
    return False


def remove_noops(gm: torch.fx.GraphModule) -> Counter:
    """Replace every no-op by its input; erase always-true metadata asserts. Returns the kinds
    removed."""
    removed: Counter = Counter()
    if _has_mutation(gm.graph):
        return removed
    for node in list(gm.graph.nodes):
        if _assert_holds(node):
            removed[_kind(node)] += 1
            gm.graph.erase_node(node)
            continue
        src = _noop_source(node)
        if src is None:
            continue
        # returning a graph input itself would make an output alias an input, which
        # torch.export refuses on re-export
        if src.op == "placeholder" and any(u.op == "output" for u in node.users):
            continue
        node.replace_all_uses_with(src)
        removed[_kind(node)] += 1
        gm.graph.erase_node(node)
    return removed


def _kind(node: torch.fx.Node) -> str:
    return str(node.target).replace("aten.", "")


def _is_foldable(node: torch.fx.Node, const: dict) -> bool:
    if node.op != "call_function" or node.target in _UNDEFINED:
        return False
    if isinstance(node.target, torch._ops.HigherOrderOperator):
        return False
    if isinstance(node.target, torch._ops.OpOverload) and \
            torch.Tag.nondeterministic_seeded in node.target.tags:
        return False
    if node.is_impure():
        return False
    leaves = pytree.arg_tree_leaves(*node.args, **node.kwargs)
    if any(isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)) for x in leaves):
        return False
    return all(x in const for x in leaves if isinstance(x, torch.fx.Node))


def _fetch(gm: torch.fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def fold_constants(gm: torch.fx.GraphModule, max_bytes: int) -> int:
    """Evaluate every node that depends only on weights and literals, and replace each such node
    that a non-constant node reads by a new weight holding its value. Returns how many.

    A folded value larger than ``max_bytes`` is kept as computation unless it replaces weights
    used nowhere else (folding ``transpose(W)`` is a win whatever W's size; materialising
    ``expand(mask)`` to a big tensor is not). Constructors whose arguments hold no tensor
    (``arange(8)`` read by a live op) are left: folding them saves no computation.
    """
    const: dict[torch.fx.Node, object] = {}
    sources: dict[torch.fx.Node, set] = {}  # constant node -> get_attr nodes it derives from
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                value = _fetch(gm, node.target)
                if isinstance(value, torch.Tensor):
                    const[node] = value
                    sources[node] = {node}
                continue
            if not _is_foldable(node, const):
                continue
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: const[a])
            try:
                const[node] = node.target(*args, **kwargs)
            except Exception:  # an op that cannot run eagerly here stays computation
                continue
            ins = [a for a in node.all_input_nodes]
            sources[node] = set().union(*(sources[a] for a in ins)) if ins else set()
    folded = 0
    for node, value in const.items():
        if node.op == "get_attr" or not isinstance(value, torch.Tensor):
            continue
        if all(u in const for u in node.users) or not node.all_input_nodes:
            continue
        exclusive = sum(_nbytes(const[s]) for s in sources[node]
                        if all(u in const for u in s.users))
        if _nbytes(value) > max(max_bytes, exclusive):
            continue
        _replace_with_constant(gm, node, value)
        folded += 1
    return folded


def _replace_with_constant(gm: torch.fx.GraphModule, node: torch.fx.Node,
                           value: torch.Tensor) -> None:
    name = f"_folded_{node.name}"
    i = 0
    while hasattr(gm, name):
        i += 1
        name = f"_folded_{node.name}_{i}"
    # clone: a view would keep (and serialize) its whole source storage alive
    gm.register_buffer(name, value.detach().clone())
    with gm.graph.inserting_before(node):
        attr = gm.graph.get_attr(name)
    attr.meta.update(node.meta)
    node.replace_all_uses_with(attr)


def eliminate_dead_code(gm: torch.fx.GraphModule) -> Counter:
    """Erase nodes nothing reads. Modules are kept: the input guards torch.export adds are a
    ``call_module`` whose result is unused by design."""
    before = _op_counts(gm)
    gm.graph.eliminate_dead_code(
        is_impure_node=lambda n: n.op == "call_module" or n.is_impure())
    return before - _op_counts(gm)


def delete_unused_weights(gm: torch.fx.GraphModule, targets_before: set[str]) -> int:
    """Delete the weights the graph read before the pass and reads no more, so they stop counting
    in state_dict, parameters and size."""
    now = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    deleted = 0
    for target in sorted(targets_before - now):
        *path, leaf = target.split(".")
        owner = gm
        for part in path:
            owner = getattr(owner, part)
        if hasattr(owner, leaf):
            delattr(owner, leaf)
            deleted += 1
    return deleted


def _op_counts(gm: torch.fx.GraphModule) -> Counter:
    return Counter(_kind(n) for n in gm.graph.nodes
                   if n.op in ("call_function", "call_method", "call_module"))


def cleanup(gm: torch.fx.GraphModule, *, fold: bool, max_fold_bytes: int) -> tuple[bool, dict]:
    """Run the whole cleanup on ``gm`` in place; returns (modified, stats)."""
    before = _op_counts(gm)
    targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    noops = remove_noops(gm)
    dead = eliminate_dead_code(gm)
    n_folded = fold_constants(gm, max_fold_bytes) if fold else 0
    folded = eliminate_dead_code(gm) if n_folded else Counter()
    deleted = delete_unused_weights(gm, targets)
    after = _op_counts(gm)
    modified = bool(noops or dead or n_folded or deleted)
    if modified:
        gm.graph.lint()
        gm.recompile()
    stats = {"nodes_before": sum(before.values()), "nodes_after": sum(after.values()),
             "removed": dict(sorted((before - after).items())),
             "noops": sum(noops.values()), "dead": sum(dead.values()),
             "folded": sum(folded.values()), "constants_folded": n_folded,
             "weights_deleted": deleted}
    return modified, stats
