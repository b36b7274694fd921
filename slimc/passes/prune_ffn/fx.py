"""FFN neuron pruning on a ``torch.fx.GraphModule`` (from ``torch.export``): rewire only.

Slices the planned weights, the constants the block's inner nodes broadcast along the
intermediate axis, and the last entry of ``view`` / ``reshape`` targets inside the block (GPT-2's
Conv1D flattens to 2-D around ``addmm``); drops torch.export's shape assertions on the block's
values; refreshes ``meta["val"]``.
"""

from __future__ import annotations

import torch
import torch.fx

from ...errors import UnsupportedError
from ...ir import fx as ir_fx
from . import _math

aten = torch.ops.aten

_TRANSPOSE = (aten.t.default, aten.transpose.int, aten.permute.default)
_SHAPE_ARG = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_CHECKS = {"_assert_tensor_metadata", "_assert_scalar"}


def _readers(gm: torch.fx.GraphModule, target: str) -> set:
    """Nodes that read weight ``target`` (through a transpose, as ``addmm`` weights are)."""
    out = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target == target:
            for u in n.users:
                if u.op == "call_function" and u.target in _TRANSPOSE:
                    out.update(x.name for x in u.users)
                else:
                    out.add(u.name)
    return out


def _unshared(gm, name: str, node: str) -> None:
    others = _readers(gm, name) - {node}
    if others:
        raise UnsupportedError(
            f"The weight {name!r} of a feed-forward block is also read by {sorted(others)}; "
            "slicing it for FFN pruning would change those too.",
            "Untie the weight in the torch module before capture.")


def prune(gm: torch.fx.GraphModule, plans: list, example_inputs=None) -> None:
    """Apply ``plans`` (one :class:`~._math.FFNPlan` per changed block) to ``gm`` in place."""
    nodes = {n.name: n for n in gm.graph.nodes}
    edits = [e for p in plans for e in _math.weight_edits(p)]
    for e in edits:
        _unshared(gm, e.name, e.node)
    side = []  # (target, node) constants that inner nodes broadcast along the neurons
    for p in plans:
        b, width, new = p.block, p.block.intermediate, len(p.keep)
        values = {b.up.node} | ({b.gate.node} if b.gate else set()) | set(b.nodes["inner"])
        for v in values:
            for u in list(nodes[v].users):
                if u.op == "output":
                    raise UnsupportedError(f"The FFN value {v} of {b.name} is a graph output; "
                                           "its width would change the model's interface.",
                                           "Prune the other layers.")
                if u.op == "call_function" and getattr(u.target, "_opname", "") in _CHECKS:
                    gm.graph.erase_node(u)  # a dtype/shape assertion of the unpruned width
        for name in b.nodes["inner"]:
            n = nodes[name]
            for a in n.all_input_nodes:
                if a.op == "get_attr":
                    w = ir_fx.get_weight(gm, a.target)
                    if w.ndim and w.shape[-1] == width and w.size > 1:
                        _unshared(gm, a.target, n.name)
                        side.append(_math.WeightEdit(a.target, n.name, -1, p.keep))
            if n.target in _SHAPE_ARG:
                shape = list(n.args[1])
                if shape and shape[-1] == width:
                    shape[-1] = new
                    n.args = (n.args[0], shape, *n.args[2:])
            elif n.target == aten.expand.default:
                raise UnsupportedError(f"Cannot prune FFN neurons through {n.format_node()}.",
                                       "Report the model architecture.")
    for e in edits + side:
        ir_fx.set_weight(gm, e.name, _math.apply_edit(ir_fx.get_weight(gm, e.name), e))
    ir_fx.refresh_meta(gm, example_inputs, edit="FFN pruning")


# -- analysis helper for score="taylor" -------------------------------------------------------

def with_neuron_masks(gm: torch.fx.GraphModule, reads: dict) -> tuple[torch.fx.GraphModule,
                                                                      dict]:
    """A copy of ``gm`` whose FFN down-projections read ``a * mask_l``: ``reads`` maps each
    layer to (down node, the node it reads as ``a``, width); mask entry j scales neuron j
    (1 = unchanged). Returns (copy, {layer: mask tensor}), the masks requiring grad and every
    weight frozen."""
    import copy
    gm = copy.deepcopy(gm)
    for p in gm.parameters():
        p.requires_grad_(False)
    nodes = {n.name: n for n in gm.graph.nodes}
    masks = {}
    for layer, (down, x, width) in reads.items():
        name = f"_slimc_neuron_mask_{layer}"
        gm.register_buffer(name, torch.ones(width, requires_grad=True))
        masks[layer] = getattr(gm, name)
        with gm.graph.inserting_before(nodes[down]):
            mask = gm.graph.get_attr(name)
            mul = gm.graph.call_function(aten.mul.Tensor, (nodes[x], mask))
        nodes[down].replace_input_with(nodes[x], mul)
    gm.recompile()
    return gm, masks
