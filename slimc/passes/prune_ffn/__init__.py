"""``prune_ffn``: remove intermediate neurons of feed-forward blocks for real — smaller weights,
smaller matmuls, no masks.

Usage::

    g2 = passes.prune_ffn(g, neurons={0: [1, 5], 3: [0]})      # explicit neurons, by layer
    g2 = passes.prune_ffn(g, ratio=0.5)                         # lowest magnitude, every layer
    g2 = passes.prune_ffn(g, ratio=0.5, scope="global", round_to=16)
    g2 = passes.prune_ffn(g, ratio=0.3, score="wanda", calib=[(ids,), (ids2,)])

Works on FX graphs (``torch.export``) and ONNX models (both torch exporters, static or dynamic
axes), on every block ``graph.ffn_blocks()`` finds: Linear → GELU / ReLU / ... → Linear (BERT,
DistilBERT, ViT, MiniLM, ``nn.TransformerEncoderLayer``), GPT-2's Conv1D (``addmm`` on a
``[in, out]`` weight, reshaped to 2-D and back), the gated SwiGLU MLP of LLaMA-style models (gate
and up pruned together), ONNX MatMul + Add chains and Gemm, and activation ops that read the
bias themselves (``com.microsoft::BiasGelu`` / ``FastGelu`` from onnxruntime's optimizer).
"""

from __future__ import annotations

import numpy as np

from ...errors import OptionError, UnsupportedError
from ..registry import Lossy, PassResult, register_pass
from . import _math, _scores

_BOUND = ("removing neuron j equals keeping it with row j of the first projection(s) and its "
          "bias zeroed, and column j of the second projection zeroed (exact, 1e-5); against "
          "the unpruned model the change is what those neurons contributed")

SCORES = _scores.SCORES


def _why_no_ffn(graph) -> str:
    hist = graph.op_histogram()
    lin = sum(v for k, v in hist.items() if k.split(".")[0] in ("linear", "addmm", "MatMul",
                                                                "Gemm", "mm"))
    if not lin:
        return "Discovery found no feed-forward block: the graph has no linear projection."
    return (f"Discovery found no feed-forward block: of its {lin} matmul-like ops, none reads "
            "(through an activation and per-element ops only) the output of one or two "
            "projections of its input width that nothing else reads.")


@register_pass("prune_ffn", contract=Lossy(identity={"neurons": {}, "ratio": 0}, bound=_BOUND))
def prune_ffn(graph, /, *, neurons: dict | None = None, ratio: float | None = None,
              score: str = "magnitude", calib=None, loss="kl", scope: str = "per_layer",
              round_to: int = 1) -> PassResult:
    """Remove intermediate neurons of feed-forward blocks: slice rows of the first
    projection(s) and their biases and columns of the second projection.

    Options: ``neurons={layer: [neuron, ...]}`` removes exactly those neurons (layers numbered
    as ``graph.ffn_blocks()`` lists them); or ``ratio`` (in [0, 1)) removes that fraction of
    the neurons with the lowest ``score``: the same fraction of every layer
    (``scope="per_layer"``), or the lowest across all layers against one threshold
    (``scope="global"``). ``round_to=r`` rounds each layer's kept count up to a multiple of
    ``r`` (never past the layer's width). Every layer keeps at least one neuron.

    Scores (``a_j`` is neuron j's activation, the value ``down`` reads: after the activation
    function, and in the gated form after ``act(gate) * up``; ``calib`` is a list of input
    tuples, as for ``prune_heads``, read by the last three scores only; t runs over every
    calibration token):

    * ``"magnitude"`` (no data): ‖in-row j‖ · ‖out-column j‖ (the in-row with its bias; gated
      blocks multiply the gate's and up's row norms).
    * ``"activation"``: mean_t |a_tj|.
    * ``"wanda"``: ‖a_j‖₂ · Σ_i |down_ij|, Wanda's |W|·‖X‖ summed over the neuron's outgoing
      weights (Sun et al. 2023).
    * ``"taylor"`` (FX only: torch autograd): E_batches |∂L/∂m_j| = E_batches |Σ_t a_tj ·
      ∂L/∂a_tj|, m a mask of ones scaling a: the first-order change of L when neuron j goes
      (Molchanov et al. 2017). ``loss`` picks L as for ``prune_heads``: ``"kl"`` (default) to
      the unpruned model's outputs, ``"mse"``, or ``loss(outputs, batch_index)``.

    Math: an FFN computes ``down(act(up(x)))`` (or ``down(act(gate(x)) * up(x))``); the
    activation and every op between the projections act per element, so neuron j's value
    depends only on row j of up (gate) and its bias, and reaches the output only through
    column j of down: ``y = Σ_j down[:, j] · h_j(x) + b_down``. Deleting row j and column j
    removes exactly term j.

    Pre: the blocks are discoverable (``graph.ffn_blocks()``): between the projections only
    per-element ops, casts and reshapes that keep the last axis; nothing outside the block
    reads its inner values. FX weights are not shared with other nodes (ONNX initializers that
    are shared are copied).

    Post: ``ffn_blocks()`` reports the new widths; the parameter count drops by exactly the
    removed rows and columns; other weights keep their values; FX ``meta["val"]`` and ONNX
    ``value_info`` hold the new shapes.

    Numerics: removing neuron j equals zeroing its up (gate) row and bias and its down column
    in the original model, to float rounding (1e-5); no neuron removed (``neurons={}``,
    ``ratio=0``) is the identity.
    """
    if neurons is not None and ratio not in (None, 0):
        raise OptionError("Pass either neurons={...} or ratio=..., not both.",
                          "neurons names the neurons to remove; ratio picks them by score.")
    if neurons is None and ratio is None:
        raise OptionError("prune_ffn needs neurons={layer: [neuron, ...]} or ratio=...",
                          "E.g. passes.prune_ffn(g, neurons={0: [1]}) or ratio=0.3.")
    round_to = _math.check_round_to(round_to)
    if scope not in ("per_layer", "global"):
        raise OptionError(f"Unknown scope {scope!r}.", "Use scope='per_layer' (the same "
                          "fraction of every layer) or 'global' (one threshold for all).")
    if ratio is not None:
        ratio = _math.check_ratio(ratio)
    batches = _scores.check(graph, score, calib, loss, scoring=bool(ratio))
    blocks = graph.ffn_blocks()
    if not blocks:  # the registry raises (or warns) naming what the graph has instead
        return PassResult(graph, False, {"matched": 0, "changed": 0,
                                         "no_match_detail": _why_no_ffn(graph)})
    scores = None
    if neurons is not None:
        if round_to != 1:
            raise OptionError("round_to applies to ratio=..., not to explicit neurons.",
                              "Choose the neurons so that the kept count is the multiple you "
                              "want, or use ratio=... with round_to.")
        plans = _math.plan_neurons(blocks, neurons)
    elif ratio == 0:
        plans = []
    else:
        scores = _scores.neuron_scores(graph, blocks, score, batches, loss)
        bad = [b.name for b in blocks if not np.isfinite(scores[b.layer]).all()]
        if bad:
            why = "weights" if score == "magnitude" else "weights or calibration activations"
            raise UnsupportedError(f"FFN neuron {score} scores of {', '.join(bad)} are not "
                                   f"finite (NaN or infinite {why}): a ranking would be "
                                   "arbitrary.",
                                   "Fix the weights, or pass neurons={...} explicitly.")
        plans = _math.select(blocks, scores, ratio, global_=scope == "global",
                              round_to=round_to)
    params_before = graph.num_parameters()
    if plans:
        if graph.backend == "fx":
            from . import fx
            fx.prune(graph.native, plans, graph.example_inputs)
        else:
            from . import onnx
            onnx.prune(graph.native, plans)
    after = {b.layer: b.intermediate for b in blocks}
    for p in plans:
        after[p.layer] = len(p.keep)
    stats = {
        "matched": len(blocks),
        "changed": len(plans),
        "neurons_before": {b.layer: b.intermediate for b in blocks},
        "neurons_after": after,
        "removed": {p.layer: list(p.removed) for p in plans},
        "params_before": params_before,
        "params_after": graph.num_parameters() if plans else params_before,
        "removed_parameters": sum(_math.removed_parameters(p) for p in plans),
    }
    if scores is not None:
        stats["score"] = score
        stats["scores"] = {layer: [float(x) for x in s] for layer, s in scores.items()}
        if score == "taylor":
            stats["loss"] = loss if isinstance(loss, str) else "callable"
    return PassResult(graph, bool(plans), stats)


__all__ = ["prune_ffn"]
