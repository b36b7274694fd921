"""``smooth_quant``: SmoothQuant's per-channel smoothing (Xiao et al. 2023), alone.

Moves activation outliers into the weights before W8A8 quantization, exactly in fp32: the
factors are folded into the parameters of what produces a Linear's input (LayerNorm, an RMSNorm's
gamma, a preceding Linear) and into the Linear's weight. ``quantize(g, smooth=α, calib=...)``
runs it before calibrating; on its own it is a semantics-preserving pass.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import numpy as np

from ...ir.graph import Graph
from .. import _calib
from ..registry import Exact, PassResult, register_pass
from . import _math


def _adapters(g: Graph):
    if g.backend == "fx":
        from ..threshold_weights import fx as uses_mod
        from . import fx as mod
    else:
        from ..threshold_weights import onnx as uses_mod
        from . import onnx as mod
    return mod, uses_mod


def smooth(g: Graph, alpha: float, batches: list, exclude: Sequence[str] = (),
           mode: str = "fold") -> dict:
    """Smooth ``g`` in place (a pass's private copy); returns the stats (see smooth_quant)."""
    mod, uses_mod = _adapters(g)
    view = g.view()
    producers = [p for p in mod.producers(g.native, view)
                 if not any(fnmatch.fnmatchcase(p.node, pat) for pat in exclude)]
    groups, skipped = _math.plan(view, producers, mod.readers(g.native),
                                 uses_mod.weight_uses(g.native, view), mod.unshare(g.native),
                                 mode)
    # a Linear whose output feeds no Linear is no candidate worth listing
    skipped = {k: r for k, r in skipped.items()
               if not any(p.node == k and p.kind == "linear" for p in producers)}
    stats: dict = {"alpha": alpha, "mode": mode, "groups": {}, "skipped": skipped, "matched": len(groups),
                   "changed": 0}
    if not groups:
        return stats
    seen = {grp.producer.out: _calib.FeatureStats(grp.producer.features) for grp in groups}
    _calib.run(g.native, list(seen), batches, lambda v, x: seen[v].update(x))
    for grp in groups:
        ws = [g.get_weight(c.weight) for c in grp.consumers]
        w_absmax = _math.weight_absmax(ws, [c.layout for c in grp.consumers])
        x_absmax = seen[grp.producer.out].absmax
        s = _math.factors(x_absmax, w_absmax, alpha)
        _math.fold(g.get_weight, g.set_weight, grp, s)
        inv = (1.0 / s).astype(np.float32)
        for value, readers in grp.inserts:
            mod.insert_scale(g.native, value, list(readers), inv)
        p = grp.producer
        stats["groups"][p.node] = {
            "kind": p.kind, "consumers": [c.node for c in grp.consumers],
            "folded": not grp.inserts, "inserted_on": [v for v, _ in grp.inserts],
            "scale_min": float(s.min()), "scale_max": float(s.max()),
            # the activation range a per-tensor quantizer sees, before and after
            "act_absmax_before": float(x_absmax.max()),
            "act_absmax_after": float((x_absmax / s).max())}
    stats["changed"] = len(groups)
    return stats


@register_pass("smooth_quant", contract=Exact(rtol=1e-5, atol=1e-5))
def smooth_quant(g: Graph, /, *, alpha: float = 0.5, calib: Sequence | None = None,
                 mode: str = "fold", exclude: Sequence[str] = ()) -> PassResult:
    """Fold SmoothQuant's per-channel factors into producers and consuming Linears.

    Math: for every value X read only by Linears (directly or through reshapes that keep the
    feature axis last), with s_j = max_t|X_tj|^α / max_i|W_ij|^(1−α) (X over every token of
    ``calib``; W the consumers' canonical (out, in) weights stacked, so Q, K and V after one
    LayerNorm share s; s clamped to ≥ 1e-5, 1 on channels that are zero in X or W):
    the producer's per-feature parameters are divided by s — LayerNorm gamma and beta, an
    RMSNorm-style ``x · gamma``'s gamma, a preceding Linear's output rows and bias — and every
    consumer's input columns multiplied by s: (X/s)(W·s)ᵀ = XWᵀ.

    Pre: ``alpha`` in [0, 1]; ``calib`` a list of input tuples shaped like the model's inputs.
    A producer is smoothed only if every reader of its output is a Linear, its parameters are
    read by nothing else, and no consumer's weight is shared with a Linear outside the group
    (stats["skipped"] says which rule refused). ``exclude``: glob patterns of producer node
    names to leave alone.

    ``mode="insert"``: where a norm's output also reaches something other than Linears
    (post-norm models such as BERT: the residual Add), no fold is exact; there a new
    ``x · (1/s)`` (one elementwise Mul, which the int8 quantizer after it absorbs) is placed in
    front of the Linears and only their weights change. ``"fold"`` (default) never changes
    the graph's ops.

    Post: same graph, only weight values change (insert mode: plus one Mul per inserted
    site). stats["groups"][producer] gives its kind,
    consumers, the range of s and the activations' max |x| before and after;
    stats["matched"] / stats["changed"] count the groups.

    Numerics: Exact — outputs equal in real arithmetic; in fp32 within rounding (1e-5
    relative). The int8 model that ``quantize`` makes afterwards is where the gain is.
    """
    alpha = _math.parse_alpha(alpha)
    _math.check_mode(mode)
    batches = _calib.check_batches(g, calib, "smooth_quant")
    if isinstance(exclude, str):
        exclude = (exclude,)
    stats = smooth(g, alpha, batches, tuple(exclude), mode)
    return PassResult(g, stats["changed"] > 0, stats)


__all__ = ["smooth", "smooth_quant"]
