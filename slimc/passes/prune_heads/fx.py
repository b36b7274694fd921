"""Head pruning on a ``torch.fx.GraphModule`` (from ``torch.export``): match + rewire only.

The plan and the shape rules are backend-neutral (``_math.py``, ``_shapes.py``); this module
translates aten nodes into :class:`~._shapes.ShapeOp` records, slices the projection weights,
rewrites the shape arguments the propagation marks as changed (``view``/``reshape`` targets,
``expand`` sizes, ``unflatten`` sizes, ``split`` sizes, ``slice`` bounds), and refreshes
``node.meta["val"]`` with fake-tensor propagation so later passes see the new shapes.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx

from ...errors import PassError, UnsupportedError
from ...ir import fx as ir_fx
from . import _math
from ._shapes import HeadShapeError, ShapeOp, plain_dims, propagate

aten = torch.ops.aten

_RESHAPE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
            aten.unflatten.int, aten.flatten.using_ints, aten.squeeze.dim, aten.squeeze.dims,
            aten.squeeze.default, aten.unsqueeze.default}
_SHAPE_ARG = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
              aten.expand.default}
_MATMUL = {aten.matmul.default, aten.bmm.default, aten.mm.default}
_SDPA = {aten.scaled_dot_product_attention.default,
         aten._scaled_dot_product_flash_attention_for_cpu.default,
         aten._scaled_dot_product_efficient_attention.default}
_SPLIT = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}
_SHAPE_OPS = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int}


def _ints(shape, where: str) -> tuple:
    try:
        return tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise UnsupportedError(f"Head pruning needs static shapes, but {where} has the symbolic "
                               f"shape {tuple(shape)}.",
                               "Capture the model without dynamic_shapes.") from None


def _val_shapes(node: torch.fx.Node) -> dict:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return {node.name: _ints(val.shape, node.name)}
    if isinstance(val, (list, tuple)):
        return {f"{node.name}#{i}": _ints(v.shape, node.name) for i, v in enumerate(val)
                if isinstance(v, torch.Tensor)}
    return {}


def _tensor_inputs(node: torch.fx.Node) -> list:
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, torch.fx.Node):
            out.append(a.name)
        elif isinstance(a, (list, tuple)):
            out.extend(x.name for x in a if isinstance(x, torch.fx.Node))
    return out


def _dim_arg(node, index: int, key: str, default: int = 0) -> int:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(key, default)


def sdpa_args(node: torch.fx.Node) -> dict:
    """The arguments of an SDPA node by schema name, whichever aten variant it is (the mask is
    ``attn_mask`` or ``attn_bias``; unset ones are absent)."""
    names = [a.name for a in node.target._schema.arguments]
    out = dict(zip(names, node.args))
    out.update(node.kwargs)
    if "attn_bias" in out:
        out["attn_mask"] = out.pop("attn_bias")
    return out


def _translate(gm: torch.fx.GraphModule, o_nodes: dict) -> tuple[list, dict]:
    """ShapeOps and value shapes of every node, in graph order."""
    ops, shapes = [], {}
    for n in gm.graph.nodes:
        shapes.update(_val_shapes(n))
        if n.op != "call_function":
            if n.op == "call_module":
                ops.append(ShapeOp(n.name, "sink", _tensor_inputs(n), []))
            continue
        t = n.target
        name = n.name
        outs = [k for k in _val_shapes(n)]
        attrs = {"op": str(t).replace("aten.", "")}
        ins = _tensor_inputs(n)
        if t is operator.getitem:
            ops.append(ShapeOp(name, "identity", [f"{n.args[0].name}#{n.args[1]}"], [name]))
            continue
        if not outs:
            ops.append(ShapeOp(name, "shape" if t in _SHAPE_OPS else "sink", ins, [], attrs))
            continue
        if t in (aten.linear.default, aten.addmm.default) or t in _MATMUL:
            w = n.args[2] if t == aten.addmm.default else n.args[1]
            x = n.args[1] if t == aten.addmm.default else n.args[0]
            const = ir_fx._const_target(gm, w)
            if const is not None or t != aten.matmul.default and t not in _MATMUL:
                layer = o_nodes.get(name)
                attrs.update(o_block=layer[0] if layer else None,
                             in_new=layer[1] if layer else None)
                ops.append(ShapeOp(name, "linear", [x.name], outs, attrs))
            else:
                ops.append(ShapeOp(name, "matmul", [n.args[0].name, n.args[1].name], outs, attrs))
        elif t in _RESHAPE:
            ops.append(ShapeOp(name, "reshape", [n.args[0].name], outs, attrs))
        elif t == aten.transpose.int:
            rank = len(shapes[n.args[0].name])
            perm = list(range(rank))
            a, b = (d % rank for d in n.args[1:3])
            perm[a], perm[b] = perm[b], perm[a]
            ops.append(ShapeOp(name, "permute", [n.args[0].name], outs, dict(attrs, perm=perm)))
        elif t == aten.permute.default:
            ops.append(ShapeOp(name, "permute", [n.args[0].name], outs,
                               dict(attrs, perm=list(n.args[1]))))
        elif t == aten.t.default:
            ops.append(ShapeOp(name, "permute", [n.args[0].name], outs, dict(attrs, perm=[1, 0])))
        elif t == aten.expand.default:
            ops.append(ShapeOp(name, "expand", [n.args[0].name], outs, attrs))
        elif t in _SDPA:
            mask = sdpa_args(n).get("attn_mask")
            qkv = [a.name for a in n.args[:3]]
            ops.append(ShapeOp(name, "sdpa", qkv + [mask.name if isinstance(
                mask, torch.fx.Node) else None], outs, attrs))
        elif t in _SPLIT:
            ops.append(ShapeOp(name, "split", [n.args[0].name], outs,
                               dict(attrs, axis=_dim_arg(n, 2, "dim"))))
        elif t == aten.unbind.int:
            ops.append(ShapeOp(name, "select", [n.args[0].name], outs,
                               dict(attrs, axis=_dim_arg(n, 1, "dim"))))
        elif t == aten.slice.Tensor:
            start, end = _dim_arg(n, 2, "start", None), _dim_arg(n, 3, "end", None)
            size = shapes[n.args[0].name][_dim_arg(n, 1, "dim")]
            bounds = (_dim_arg(n, 1, "dim"), 0 if start is None else start,
                      size if end is None else end, _dim_arg(n, 4, "step", 1))
            ops.append(ShapeOp(name, "slice", [n.args[0].name], outs,
                               dict(attrs, slices=[bounds])))
        elif t == aten.narrow.default:
            axis, start, length = n.args[1], n.args[2], n.args[3]
            ops.append(ShapeOp(name, "slice", [n.args[0].name], outs,
                               dict(attrs, slices=[(axis, start, start + length, 1)])))
        elif t == aten.select.int:
            ops.append(ShapeOp(name, "select", [n.args[0].name], outs,
                               dict(attrs, axis=n.args[1])))
        elif t == aten.cat.default:
            ops.append(ShapeOp(name, "concat", ins, outs, dict(attrs, axis=_dim_arg(n, 1, "dim"))))
        elif t in (aten.clone.default, aten.contiguous.default, aten.alias.default,
                   aten.detach.default) or len(outs) == 1:
            # shape-preserving and broadcasting ops (arithmetic, softmax, dropout, casts, norms):
            # the broadcast rule checks that the output really is the broadcast of the inputs
            ops.append(ShapeOp(name, "pointwise", ins, outs, attrs))
        else:
            ops.append(ShapeOp(name, "opaque", ins, outs, attrs))
    return ops, shapes


def _users_of_target(gm: torch.fx.GraphModule, target: str) -> set:
    users = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target == target:
            for u in n.users:
                if u.op == "call_function" and u.target in (aten.t.default, aten.transpose.int,
                                                            aten.permute.default):
                    users.update(x.name for x in u.users)
                else:
                    users.add(u.name)
    return users


def _check_unshared(gm: torch.fx.GraphModule, edits: list) -> None:
    for e in edits:
        others = _users_of_target(gm, e.name) - {e.node}
        if others:
            raise UnsupportedError(
                f"The weight {e.name!r} of an attention projection is also read by "
                f"{sorted(others)}; slicing it for head pruning would change those too.",
                "Untie the weight in the torch module before capture.")


def _removable(n: torch.fx.Node) -> bool:
    """Pure, or random only (dropout, SDPA's dropout_p): nothing else sees it run."""
    if n.op == "get_attr":
        return True
    if n.op != "call_function":
        return False
    if not n.is_impure():
        return True
    schema = getattr(n.target, "_schema", None)
    return (torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ())
            and schema is not None and not schema.is_mutable)


def _live(gm: torch.fx.GraphModule) -> set:
    """Names of the nodes whose result reaches the output or a side effect."""
    live = set()
    for n in reversed(list(gm.graph.nodes)):
        if n.name in live or n.op in ("output", "placeholder") or not _removable(n):
            live.add(n.name)
            live.update(a.name for a in n.all_input_nodes)
    return live


def _erase_dead(gm: torch.fx.GraphModule, live_before: set) -> None:
    """Remove every computation nobody reads (dead code that reads the heads would otherwise
    need rewriting too), and the weights our edits left without readers; weights that were
    unused before the pass stay, so the parameter count only moves by what pruning removed."""
    dropped = set()
    changed = True
    while changed:
        changed = False
        for n in reversed(list(gm.graph.nodes)):
            if n.users or not _removable(n) or n.op == "get_attr" and n.name not in live_before:
                continue
            if n.op == "get_attr":
                dropped.add(n.target)
            gm.graph.erase_node(n)
            changed = True
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in dropped - used:
        *path, leaf = name.split(".")
        owner = gm
        for part in path:
            owner = getattr(owner, part)
        if leaf in owner._parameters or leaf in owner._buffers:
            delattr(owner, leaf)


def _empty_block(gm: torch.fx.GraphModule, plan) -> None:
    """A block that loses every head outputs its output projection's bias, broadcast."""
    nodes = {n.name: n for n in gm.graph.nodes}
    o = nodes[plan.block.o.node]
    shape = list(_ints(o.meta["val"].shape, o.name))
    bias = None
    if o.target == aten.linear.default and len(o.args) > 2:
        bias = o.args[2]
    elif o.target == aten.addmm.default:
        bias = o.args[0]
    with gm.graph.inserting_before(o):
        if isinstance(bias, torch.fx.Node):
            new = gm.graph.call_function(aten.expand.default, (bias, shape))
        else:
            new = gm.graph.call_function(aten.zeros.default, (shape,),
                                         {"dtype": o.meta["val"].dtype})
    new.meta["val"] = o.meta["val"]
    o.replace_all_uses_with(new)


def _seeds(gm: torch.fx.GraphModule, plans: list, shapes: dict) -> dict:
    seeds = {}
    nodes = {n.name: n for n in gm.graph.nodes}
    for p in plans:
        b = p.block
        if b.fused_qkv and b.k.out_features != b.q.out_features:
            _seed_split(p, nodes[b.q.node], shapes, seeds)  # merged q|k|v under GQA
            continue
        if b.fused_qkv:
            pairs = [(b.q.node, p.fused_atoms())]
        else:
            pairs = [(b.q.node, p.q_atoms()), (b.k.node, p.kv_atoms()), (b.v.node, p.kv_atoms())]
        for node, atoms in pairs:
            shape = shapes[node]
            seeds[node] = plain_dims(shape[:-1]) + [atoms]
    return seeds


def _seed_split(plan, proj: torch.fx.Node, shapes: dict, seeds: dict) -> None:
    """One projection [q | k | v] with fewer key/value heads: no product of head atoms
    describes its output, so the three pieces of its split carry the heads instead."""
    users = list(proj.users)
    if len(users) == 3 and all(u.target == aten.slice.Tensor for u in users) \
            and _seed_slices(plan, proj, users, shapes, seeds):
        return
    split = users[0] if len(users) == 1 else None
    ok = split is not None and split.target in (aten.split_with_sizes.default, aten.split.Tensor)
    if ok:
        rank = len(shapes[proj.name])
        keys = [f"{split.name}#{i}" for i in range(3)]
        ok = _dim_arg(split, 2, "dim") % rank == rank - 1 and all(k in shapes for k in keys) \
            and f"{split.name}#3" not in shapes
    if not ok:
        raise UnsupportedError(
            f"The merged q|k|v projection {proj.name} of layer {plan.layer} (grouped-query "
            "attention) is not read by one split of its last axis; slimc cannot tell its "
            "query, key and value parts apart.",
            "Prune the heads before merging the projections (fuse after prune_heads).")
    for key, atoms in zip(keys, (plan.q_atoms(), plan.kv_atoms(), plan.kv_atoms())):
        seeds[key] = plain_dims(shapes[key][:-1]) + [atoms]


def _seed_slices(plan, proj, users, shapes: dict, seeds: dict) -> bool:
    """Phi-3's form: three slices of the last axis, at the q / k / v section bounds. Each
    slice's output carries the heads; its bounds become the kept sections' (set here: they
    follow from the plan, not from the propagation)."""
    b = plan.block
    rank = len(shapes[proj.name])
    old = [b.q.rows, b.k.rows, b.v.rows]
    nq, nkv = len(plan.keep_q) * b.head_dim, len(plan.keep_kv) * b.head_dim
    new = [(0, nq), (nq, nq + nkv), (nq + nkv, nq + 2 * nkv)]
    found = {}
    for u in users:
        args = list(u.args) + [None] * (5 - len(u.args))
        dim, start, end, step = args[1], args[2] or 0, args[3], args[4] or 1
        total = shapes[proj.name][-1]
        end = total if end is None or end >= total else end
        if dim % rank != rank - 1 or step != 1 or (start, end) not in old:
            return False
        found[old.index((start, end))] = u
    if len(found) != 3:
        return False
    atoms = (plan.q_atoms(), plan.kv_atoms(), plan.kv_atoms())
    for i, u in found.items():
        seeds[u.name] = plain_dims(shapes[u.name][:-1]) + [atoms[i]]
        args = list(u.args) + [None] * (4 - len(u.args))
        args[2], args[3] = new[i]
        u.args = tuple(args)
    return True


def _rewrite(gm: torch.fx.GraphModule, prop, shapes: dict) -> None:
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        t = n.target
        if t in _SHAPE_ARG and prop.changed(n.name):
            new = prop.new_shape(n.name)
            n.args = (n.args[0], [-1 if a == -1 else new[i] for i, a in enumerate(n.args[1])],
                      *n.args[2:])
        elif t == aten.unflatten.int and prop.changed(n.name):
            new = prop.new_shape(n.name)
            dim = n.args[1] % len(shapes[n.args[0].name])
            sizes = [-1 if a == -1 else new[dim + i] for i, a in enumerate(n.args[2])]
            n.args = (n.args[0], n.args[1], sizes)
        elif t in (aten.split.Tensor, aten.split_with_sizes.default) \
                and prop.changed(f"{n.name}#0"):
            axis = _dim_arg(n, 2, "dim") % len(shapes[n.args[0].name])
            sizes = [prop.new_shape(k)[axis] for k in sorted(
                (k for k in shapes if k.startswith(f"{n.name}#")),
                key=lambda k: int(k.split("#")[1]))]
            arg = sizes[0] if t == aten.split.Tensor else sizes
            n.args = (n.args[0], arg, *n.args[2:])
        elif n.name in prop.slices:
            (old_block, new_block), = prop.slices[n.name].values()
            size = shapes[n.args[0].name][_dim_arg(n, 1, "dim") % len(shapes[n.args[0].name])]
            args = list(n.args)
            if t == aten.narrow.default:
                args[2] = args[2] // old_block * new_block
                args[3] = args[3] // old_block * new_block
            else:
                while len(args) < 4:
                    args.append(None)
                start, end = args[2], args[3]
                args[2] = None if start is None else start // old_block * new_block
                args[3] = end if end is None or end >= size else end // old_block * new_block
            n.args = tuple(args)


def prune(gm: torch.fx.GraphModule, plans: list, example_inputs=None) -> None:
    """Apply ``plans`` (one :class:`~._math.BlockPlan` per changed block) to ``gm`` in place."""
    live = [p for p in plans if not p.empty]
    edits = [e for p in live for e in _math.weight_edits(p)]
    _check_unshared(gm, edits)
    live_before = _live(gm)
    for p in plans:
        if p.empty:
            _empty_block(gm, p)
    _erase_dead(gm, live_before)
    o_nodes = {p.block.o.node: (p.layer, len(p.keep_q) * p.block.head_dim) for p in live}
    ops, shapes = _translate(gm, o_nodes)
    sizes, repeat = {}, {}
    for p in live:
        sizes.update(p.sizes())
        repeat.update(p.repeat_symbols())
    try:
        prop = propagate(ops, shapes, _seeds(gm, live, shapes), sizes, repeat)
    except HeadShapeError as e:
        node = next((n for n in gm.graph.nodes if n.name == e.node), None)
        what = node.format_node() if node is not None else e.node
        raise UnsupportedError(f"Cannot prune heads: node {e.node} ({what[:200]}): {e.reason}.",
                               "Prune heads of other layers, or report the model "
                               "architecture.") from None
    for e in edits:
        ir_fx.set_weight(gm, e.name, _math.apply_edit(ir_fx.get_weight(gm, e.name), e))
    _rewrite(gm, prop, shapes)
    ir_fx.refresh_meta(gm, example_inputs, edit="head pruning")
    for n in gm.graph.nodes:
        for key, shape in _val_shapes(n).items():
            want = prop.new_shape(key)
            if want is not None and tuple(shape) != want:
                raise PassError(f"Head pruning predicted shape {want} for {key} but the "
                                f"pruned graph computes {tuple(shape)}.",
                                "This is a slimc bug; please report it with the model.")


# -- analysis helpers for importance scores (slimc.passes.importance) -------------------------

def head_dims(gm: torch.fx.GraphModule, blocks: list) -> tuple[dict, dict]:
    """Head atoms of every value that carries heads in the unpruned graph (where each block's
    head axis is), and the value shapes."""
    plans = [_math.BlockPlan(b, tuple(range(b.num_heads)), tuple(range(b.num_kv_heads)))
             for b in blocks]
    ops, shapes = _translate(gm, {p.block.o.node: (p.layer, None) for p in plans})
    live = _live(gm)
    ops = [op for op in ops if op.name in live]  # dead code does not matter here
    sizes, repeat = {}, {}
    for p in plans:
        sizes.update(p.sizes())
        repeat.update(p.repeat_symbols())
    try:
        return propagate(ops, shapes, _seeds(gm, plans, shapes), sizes, repeat).dims, shapes
    except HeadShapeError as e:
        raise UnsupportedError(f"Cannot locate the heads at node {e.node}: {e.reason}.",
                               "Use score='magnitude'.") from None


def with_head_masks(gm: torch.fx.GraphModule, blocks: list) -> tuple[torch.fx.GraphModule,
                                                                      dict]:
    """A copy of ``gm`` whose output projections read ``context * repeat(mask_l, head_dim)``:
    mask entry h scales head h's context (1 = unchanged). Returns (copy, {layer: mask tensor}),
    the masks requiring grad and every weight frozen."""
    import copy
    gm = copy.deepcopy(gm)
    for p in gm.parameters():
        p.requires_grad_(False)
    nodes = {n.name: n for n in gm.graph.nodes}
    masks = {}
    for b in blocks:
        o = nodes[b.o.node]
        x = o.args[1] if o.target == aten.addmm.default else o.args[0]
        name = f"_slimc_head_mask_{b.layer}"
        gm.register_buffer(name, torch.ones(b.num_heads, requires_grad=True))
        masks[b.layer] = getattr(gm, name)
        with gm.graph.inserting_before(o):
            ga = gm.graph.get_attr(name)
            rep = gm.graph.call_function(aten.repeat_interleave.self_int, (ga, b.head_dim))
            mul = gm.graph.call_function(aten.mul.Tensor, (x, rep))
        o.replace_input_with(x, mul)
    gm.recompile()
    return gm, masks


def record(gm: torch.fx.GraphModule, names: set, batches) -> list:
    """For each batch, {node name: value} of the named nodes (an fx Interpreter run)."""

    class _Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in names:
                seen[n.name] = out.detach() if isinstance(out, torch.Tensor) else out
            return out

    result = []
    with torch.no_grad():
        for batch in batches:
            seen: dict = {}
            _Recorder(gm).run(*[torch.as_tensor(np.ascontiguousarray(x)) for x in batch])
            result.append(seen)
    return result
