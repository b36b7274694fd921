"""``drop_layers``: remove whole Transformer layers — the residual stream passes through.

Usage::

    g2 = passes.drop_layers(g, layers=[4])                                   # explicit
    g2 = passes.drop_layers(g, n=2, score="block_influence", calib=batches)  # ShortGPT
    g2 = passes.drop_layers(g, n=2, score="last")                            # the last two

Works on FX graphs (``torch.export``) and ONNX models (both torch exporters), on every layer
``graph.transformer_layers()`` finds: an attention block and the FFN block after it with their
residual adds, pre-norm (GPT-2, LLaMA, ViT) or post-norm (BERT, DistilBERT, MiniLM,
``nn.TransformerEncoderLayer``; the norm after the FFN's residual add goes with the layer).
"""

from __future__ import annotations

from ...errors import OptionError, UnsupportedError
from .. import _calib
from ..registry import Lossy, PassResult, register_pass
from . import _math

_BOUND = ("dropping layer i equals running the model with layer i replaced by the identity on "
          "the residual stream (its output := its input; exact, 1e-5); against the full model "
          "the change is what those layers contributed (block influence measures it)")


def _why_no_layer(graph) -> str:
    att, ffn = len(graph.attention_blocks()), len(graph.ffn_blocks())
    if not att or not ffn:
        return (f"Discovery found no whole Transformer layer: the graph has {att} attention "
                f"block(s) and {ffn} feed-forward block(s), and a layer needs both.")
    return (f"Discovery found no whole Transformer layer: of its {att} attention and {ffn} "
            "feed-forward blocks, no attention's residual add (x + attn(...)) feeds, directly "
            "or through a norm, the residual add of a feed-forward block.")


@register_pass("drop_layers", contract=Lossy(identity={"layers": [], "n": 0}, bound=_BOUND))
def drop_layers(graph, /, *, layers=None, n: int | None = None,
                score: str = "block_influence", calib=None) -> PassResult:
    """Remove whole Transformer layers: the residual stream skips them, and every node only
    they used (norms, attention, FFN, their weights) goes.

    Options: ``layers=[i, ...]`` drops exactly those layers (numbered as
    ``graph.transformer_layers()`` lists them); or ``n`` (in [0, number of layers)) drops the
    ``n`` layers with the lowest ``score``: ``"block_influence"`` (1 − cos(input, output) of
    the layer's hidden states, averaged over every token of the calibration batches ``calib``,
    a list of input tuples) or ``"last"`` (the last ``n`` layers; no data needed). At least
    one layer stays.

    Math: layer i maps the residual stream ``x`` to ``y = F_i(x)``. Dropping it sets
    ``y := x``: every reader of ``y`` reads ``x``. Block influence (Men et al. 2024):
    ``BI_i = 1 − E_t[x_t·y_t / (‖x_t‖ ‖y_t‖)]``; a layer that barely turns the hidden state
    contributes least.

    Pre: the layers are discoverable (``graph.transformer_layers()``): each attention's
    residual add feeds, directly (pre-norm) or through a norm only it feeds (post-norm), the
    residual add of an FFN. Nothing outside a dropped layer reads its inner values (an
    output of attention weights would keep the layer alive: refused).

    Post: ``transformer_layers()``, ``attention_blocks()`` and ``ffn_blocks()`` list the
    remaining layers (renumbered from 0); the parameter count drops by exactly the dropped
    layers' weights; the model's inputs and outputs keep their names and shapes.

    Numerics: the result equals the original model with the dropped layers' outputs replaced
    by their inputs, to float rounding (1e-5); no layer dropped (``layers=[]``, ``n=0``) is
    the identity.
    """
    if layers is None and n is None:
        raise OptionError("drop_layers needs layers=[i, ...] or n=...",
                          "E.g. passes.drop_layers(g, layers=[3]) or n=2, "
                          "score='block_influence', calib=batches.")
    if n is not None:
        n = _math.check_n(n)
    if layers is not None and n:
        raise OptionError("Pass either layers=[...] or n=..., not both.",
                          "layers names the layers to drop; n picks them by score.")
    if score not in _math.SCORES:
        raise OptionError(f"Unknown layer score {score!r}.",
                          "Use score='block_influence' (needs calib=) or score='last'.")
    found = graph.transformer_layers()
    if not found:  # the registry raises (or warns) naming what the graph has instead
        return PassResult(graph, False, {"matched": 0, "changed": 0,
                                         "no_match_detail": _why_no_layer(graph)})
    scores = None
    if layers is not None:
        gone = _math.plan_layers(found, layers)
    else:
        _math.check_range(n, found)
        if n and score == "block_influence":
            batches = _calib.check_batches(graph, calib, "score='block_influence'")
            scores = _math.block_influence(graph.native, found, batches)
        gone = _math.select(found, n, score, scores)
    params_before = graph.num_parameters()
    if gone:
        subs = _math.substitutions(found, gone)
        if graph.backend == "fx":
            from . import fx
            fx.drop(graph.native, subs)
        else:
            from . import onnx
            onnx.drop(graph.native, subs)
        _check_gone(graph, [la for la in found if la.layer in gone])
    params_after = graph.num_parameters() if gone else params_before
    stats = {
        "matched": len(found),
        "changed": len(gone),
        "layers_before": len(found),
        "layers_after": len(found) - len(gone),
        "dropped": gone,
        "dropped_names": [found[i].name for i in gone],
        "params_before": params_before,
        "params_after": params_after,
        "removed_parameters": params_before - params_after,
    }
    if scores is not None:
        stats["score"] = score
        stats["scores"] = scores
    return PassResult(graph, bool(gone), stats)


def _check_gone(graph, dropped) -> None:
    """Each dropped layer's attention and FFN outputs must be gone: a value of the layer read
    from outside it (attention weights as a model output) keeps it alive."""
    producer = graph.view().producer
    for la in dropped:
        alive = [v for v in la.nodes["values"] if v in producer]
        if alive:
            raise UnsupportedError(
                f"Layer {la.layer} ({la.name}) stays partly alive after dropping it: its "
                f"values {alive} are read from outside the layer (e.g. attention weights "
                "returned as a model output).",
                "Drop other layers, or capture the model without those extra outputs.")


__all__ = ["drop_layers"]
