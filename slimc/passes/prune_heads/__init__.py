"""``prune_heads``: remove attention heads for real — smaller projections, smaller matmuls.

Usage::

    g2 = passes.prune_heads(g, heads={0: [1, 3], 5: [0]})       # explicit heads, by layer
    g2 = passes.prune_heads(g, ratio=0.3, score="taylor", calib=batches)

Works on FX graphs (``torch.export``) and ONNX models, on every attention form
``slimc.ir.attention`` discovers: separate or fused (GPT-2 ``c_attn``, ``nn.MultiheadAttention``
``in_proj``, Phi-3's grouped-query ``qkv_proj``) Q/K/V projections, decomposed or fused (SDPA)
attention cores, grouped-query attention, and the fused ONNX operators onnxruntime's optimizer,
Optimum and opset 23 emit: ``com.microsoft::Attention`` (merged QKV weight inside the op,
``qkv_hidden_sizes``), ``com.microsoft::MultiHeadAttention`` (packed bias input, heads folded
into the batch axis), ``com.microsoft::GroupQueryAttention`` (separate or packed q|k|v, head
sinks) and ``Attention`` (3-D with ``q_num_heads`` / ``kv_num_heads`` or 4-D); their head-count
attributes are rewritten and per-head side inputs (attention bias, masks with a head axis) are
sliced. Refused with :class:`~slimc.errors.UnsupportedError`: 5-D packed QKV (no projection to
slice) and key/value caches that cross the model's interface (past inputs, read present
outputs).
"""

from __future__ import annotations

import numpy as np

from ...errors import OptionError, UnsupportedError
from ..registry import Lossy, PassResult, register_pass
from . import _math

_BOUND = ("removing head h equals keeping it with its value-projection rows and value bias "
          "zeroed (exact, 1e-5); against the unpruned model the change is what those heads "
          "contributed")


def _check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating, np.integer)):
        raise OptionError(f"ratio must be a number in [0, 1), got {ratio!r}.",
                          "Pass e.g. ratio=0.3 to remove 30 % of the heads.")
    if not 0 <= float(ratio) < 1:
        raise OptionError(f"ratio={ratio} is outside [0, 1).",
                          "Pass the fraction of heads to remove, e.g. 0.3; 1 would remove "
                          "every head.")
    return float(ratio)


def _why_no_attention(graph) -> str:
    """Why discovery found nothing, when the graph has attention-like ops at all."""
    from ...ir.attention import unsupported_attention
    refused = unsupported_attention(graph.view())
    if refused:  # fused attention ops it had to pass over, and why
        return "Discovery found no attention block it can prune: " + "; ".join(refused) + "."
    hist = graph.op_histogram()
    cores = {k: v for k, v in hist.items()
             if k.split("::")[-1].split(".")[0] in ("Softmax", "softmax", "_softmax",
                                                   "_safe_softmax", "Attention",
                                                   "MultiHeadAttention", "GroupQueryAttention",
                                                   "scaled_dot_product_attention")}
    if not cores:
        return "Discovery found no attention block: the graph has no softmax or attention op."
    found = ", ".join(f"{k}×{v}" for k, v in cores.items())
    return (f"Discovery found no attention block: the graph has {found}, but none reads "
            "queries, keys and values that come from linear projections (weights that are "
            "graph constants) with an output projection after it.")


def apply_plans(graph, plans: list) -> None:
    """Edit ``graph`` (a private copy) in place so that it keeps only the planned heads."""
    if graph.backend == "fx":
        from . import fx
        fx.prune(graph.native, plans, graph.example_inputs)
    else:
        from . import onnx
        onnx.prune(graph.native, plans, graph.sample_inputs())


@register_pass("prune_heads", contract=Lossy(identity={"heads": {}, "ratio": 0}, bound=_BOUND))
def prune_heads(graph, /, *, heads: dict | None = None, ratio: float | None = None,
                score: str = "magnitude", calib=None, scope: str = "global",
                loss="kl", allow_empty_layer: bool = False) -> PassResult:
    """Remove attention heads: slice Q/K/V rows (and biases) and output-projection columns, and
    rewrite every shape constant that depends on a head count.

    Options: ``heads={layer: [query head, ...]}`` removes exactly those heads (layers numbered
    as ``graph.attention_blocks()`` lists them); or ``ratio`` (in [0, 1)) removes that fraction
    of heads, lowest ``score`` first (``"magnitude"``, ``"taylor"``, ``"attention"``,
    ``"wanda"``, see :mod:`slimc.passes.importance`; ``calib`` is a list of input tuples for
    the data-driven scores), ranked over the whole model (``scope="global"``) or within each layer
    (``"per_layer"``); ``loss`` is the taylor score's objective (``"kl"`` to the unpruned
    model's outputs, ``"mse"``, or ``loss(outputs, batch_index)`` for labelled data). At least
    one head stays per layer unless ``allow_empty_layer=True``; a
    layer without heads then outputs its output projection's bias (which is exactly what the
    attention computes when every head's values are zero).

    Math: with ``d`` the head size, query head ``h`` owns rows ``[h*d, (h+1)*d)`` of W_q, b_q
    and columns ``[h*d, (h+1)*d)`` of W_o; key/value head ``g`` owns the same rows of W_k, W_v,
    b_k, b_v. Attention output = Σ_h softmax(q_h k_hᵀ · s) v_h W_o[:, h] + b_o, so deleting a
    head's rows and columns removes exactly its term. ``s = 1/sqrt(d)`` does not depend on the
    head count and stays.

    Pre: the graph's attention blocks are discoverable (``graph.attention_blocks()``); FX graphs
    have static shapes (ONNX models may have symbolic batch / sequence sizes); every node that
    reads a head-carrying tensor is one the shape rules know (reshapes, permutes, broadcasting
    ops, matmuls, SDPA, split/slice/concat off the head axis, repeat_kv's expand); anything
    else is refused with :class:`~slimc.errors.UnsupportedError` naming the node. Under
    grouped-query attention (H query heads, Hkv key/value heads, groups of R = H/Hkv), every
    kept group must keep the same number of query heads (``repeat_kv`` maps query head j to
    key/value head j // R'); removing all R query heads of a group removes its key/value head.
    Uneven removals are refused with :class:`~slimc.errors.UnsupportedError`.

    Post: ``attention_blocks()`` reports the new head counts; the parameter count drops by
    exactly the removed rows and columns (an emptied layer also loses what only fed it, e.g.
    GPT-2's ln_1); other weights keep their values (an ONNX initializer that other nodes share
    is copied, never edited); code left dead is dropped; FX ``meta["val"]`` and ONNX
    ``value_info`` hold the new shapes.

    Numerics: removing head h equals zeroing its value rows and value bias in the original
    model, to float rounding (1e-5); no head removed is the identity.
    """
    if heads is not None and ratio not in (None, 0):
        raise OptionError("Pass either heads={...} or ratio=..., not both.",
                          "heads names the heads to remove; ratio picks them by score.")
    blocks = graph.attention_blocks()
    if not blocks:  # the registry raises (or warns) naming what the graph has instead
        return PassResult(graph, False, {"matched": 0, "changed": 0,
                                         "no_match_detail": _why_no_attention(graph)})
    scores = None
    if heads is None and ratio is None:
        raise OptionError("prune_heads needs heads={layer: [head, ...]} or ratio=...",
                          "E.g. passes.prune_heads(g, heads={0: [1]}) or ratio=0.3.")
    if heads is not None:
        plans = _math.plan_heads(blocks, heads, allow_empty_layer)
    else:
        ratio = _check_ratio(ratio)
        if scope not in ("global", "per_layer"):
            raise OptionError(f"Unknown scope {scope!r}.", "Use scope='global' or 'per_layer'.")
        if ratio == 0:
            plans = []
        else:
            fused = sorted({b.nodes["op_type"] for b in blocks if b.form == "op"})
            if score == "attention" and fused:
                raise UnsupportedError(
                    f"score='attention' reads the attention probabilities, which the fused "
                    f"operator(s) {', '.join(fused)} compute inside and never expose.",
                    "Use score='magnitude' on this graph, or score the unfused model.")
            inside = sorted({b.nodes["op_type"] for b in blocks if b.nodes.get("packed_weight")})
            if score == "wanda" and inside:
                raise UnsupportedError(
                    f"score='wanda' records each projection's input and output, but the "
                    f"operator(s) {', '.join(inside)} hold their Q/K/V projection inside.",
                    "Use score='magnitude' on this graph, or score the unfused model.")
            from .. import importance
            scores = importance.head_scores(graph, score=score, calib=calib, blocks=blocks,
                                            loss=loss)
            chosen = importance.select_heads(blocks, scores, ratio, scope=scope,
                                             allow_empty_layer=allow_empty_layer)
            plans = _math.plan_heads(blocks, chosen, allow_empty_layer)
    params_before = graph.num_parameters()
    flops_before = None
    stats = {
        "matched": len(blocks),
        "changed": len(plans),
        "heads_before": {b.layer: b.num_heads for b in blocks},
        "removed": {p.layer: list(p.removed) for p in plans},
        "params_before": params_before,
    }
    if plans and graph.backend == "onnx":  # refuse before anything runs the model
        from .onnx import check_attention_ops
        check_attention_ops(graph.native, [p for p in plans if not p.empty])
    if plans:
        from .report import count_flops
        flops_before = count_flops(graph)
        apply_plans(graph, plans)
    after = {b.layer: b.num_heads for b in blocks}
    for p in plans:
        after[p.layer] = len(p.keep_q)
    stats["heads_after"] = after
    stats["params_after"] = graph.num_parameters() if plans else params_before
    stats["removed_parameters"] = sum(_math.removed_parameters(p) for p in plans)
    if plans:
        from .report import count_flops
        stats["flops_before"] = flops_before
        stats["flops_after"] = count_flops(graph)
    if scores is not None:
        stats["score"] = score
        stats["scores"] = {layer: [float(x) for x in s] for layer, s in scores.items()}
    return PassResult(graph, bool(plans), stats)


__all__ = ["apply_plans", "prune_heads"]
