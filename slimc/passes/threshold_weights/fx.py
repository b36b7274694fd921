"""FX side of weight thresholding: who uses each weight, and Taylor importance by autograd.

Thresholding only rewrites weight values (through :meth:`slimc.Graph.set_weight`), so there is no
graph surgery here; what is backend-specific is *finding* the uses and computing gradients.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.fx
import torch.utils._pytree as pytree

from ...errors import OptionError
from ...ir.fx import _fetch, build_view
from ...ir.view import View
from ._math import Use

aten = torch.ops.aten

_TRANSPOSE = {aten.t.default, aten.transpose.int, aten.permute.default}
# position of the weight among a linear-like op's arguments
WEIGHT_ARG = {aten.linear.default: 1, aten.addmm.default: 2, aten.mm.default: 1,
              aten.matmul.default: 1}
_CONV = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding,
         aten.conv2d.padding, aten.conv3d.padding}


def _consumers(attr: torch.fx.Node):
    """(user, node the user reads): the weight's users, seen through one transpose (which is how
    the View sees a Linear's weight)."""
    for u in attr.users:
        if u.op == "call_function" and u.target in _TRANSPOSE and u.args[0] is attr:
            if not u.users:
                continue
            for uu in u.users:
                yield uu, u
        else:
            yield u, attr


def _classify(u: torch.fx.Node, via: torch.fx.Node, attr: torch.fx.Node, linear: dict) -> Use:
    if u.op != "call_function":
        return Use("other", u.name)
    lin = linear.get(u.name)
    idx = WEIGHT_ARG.get(u.target)
    if (lin is not None and idx is not None and lin.attrs["weight"] == attr.target
            and idx < len(u.args) and u.args[idx] is via):
        return Use("linear", u.name, lin.attrs["layout"])
    if via is attr and len(u.args) > 1 and u.args[1] is attr:
        if u.target in _CONV:
            return Use("conv", u.name)
        if u.target == aten.convolution.default and len(u.args) > 6 and not u.args[6]:
            return Use("conv", u.name)
    if u.target == aten.embedding.default and u.args[0] is attr and via is attr:
        return Use("embedding", u.name)
    return Use("other", u.name)


def weight_uses(gm: torch.fx.GraphModule, view: View | None = None) -> dict[str, list[Use]]:
    """Every tensor weight (``get_attr`` target) → how each of its users reads it."""
    linear = {n.name: n for n in (view or build_view(gm)).nodes if n.op == "linear"}
    uses: dict[str, list[Use]] = defaultdict(list)
    for a in gm.graph.nodes:
        if a.op != "get_attr" or not isinstance(_fetch(gm, a.target), torch.Tensor):
            continue
        for u, via in _consumers(a):
            uses[a.target].append(_classify(u, via, a, linear))
    return dict(uses)


def _swap(gm: torch.fx.GraphModule, name: str, value: torch.Tensor) -> torch.Tensor:
    """Put ``value`` where weight ``name`` lives; return what was there."""
    *path, leaf = name.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    old = getattr(owner, leaf)
    if leaf in owner._parameters:
        owner._parameters[leaf] = value
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        setattr(owner, leaf, value)
    return old


def taylor_importance(gm: torch.fx.GraphModule, names: Sequence[str],
                      batches: Sequence[tuple[np.ndarray, ...]],
                      loss: Callable | None = None, probes: int = 4,
                      seed: int = 0) -> dict[str, np.ndarray]:
    """I(w) = mean over batches (and probes) of (w · ∂ℓ/∂w)², by torch autograd.

    With ``loss`` (labelled data): ℓ = loss(outputs, batch_index). Without: ℓ = v·y with y the
    float outputs and v a Rademacher probe, so E_v[(∂ℓ/∂w)²] = diag(JᵀJ) and I(w) is the
    Gauss-Newton estimate of what zeroing w alone adds to ½‖y − y_unpruned‖², the MSE to the
    unpruned outputs (whose own gradient is exactly zero at the unpruned weights).
    """
    leaves = {}
    saved = {}
    for name in names:
        t = _fetch(gm, name).detach().clone().requires_grad_(True)
        leaves[name] = t
        saved[name] = _swap(gm, name, t)
    acc = {name: torch.zeros_like(t, dtype=torch.float64) for name, t in leaves.items()}
    params = list(leaves.values())
    count = 0
    gen = torch.Generator().manual_seed(seed)
    try:
        with torch.enable_grad():
            for b, batch in enumerate(batches):
                args = [torch.as_tensor(np.ascontiguousarray(x)) for x in batch]
                outs = [o for o in pytree.tree_leaves(gm(*args))
                        if isinstance(o, torch.Tensor) and o.is_floating_point()
                        and o.requires_grad]
                if loss is not None:
                    val = loss(outs, b)
                    if not isinstance(val, torch.Tensor) or val.numel() != 1:
                        raise OptionError("loss(outputs, batch_index) must return a scalar "
                                          f"tensor, got {type(val).__name__}.",
                                          "Return e.g. torch.nn.functional.cross_entropy(...).")
                    objectives = [val.reshape(())]
                else:
                    objectives = []
                    for _ in range(probes):
                        vs = [torch.randint(0, 2, o.shape, generator=gen).to(o.dtype) * 2 - 1
                              for o in outs]
                        objectives.append(sum((v * o).sum() for v, o in zip(vs, outs)))
                for i, obj in enumerate(objectives):
                    if not isinstance(obj, torch.Tensor) or not obj.requires_grad:
                        continue  # no float output depends on the weights: importance 0
                    grads = torch.autograd.grad(obj, params, allow_unused=True,
                                                retain_graph=i < len(objectives) - 1)
                    for name, g in zip(leaves, grads):
                        if g is not None:
                            acc[name] += (leaves[name].detach().double() * g.double()) ** 2
                    count += 1
    finally:
        for name, old in saved.items():
            _swap(gm, name, old)
    return {name: (a / max(count, 1)).numpy() for name, a in acc.items()}
