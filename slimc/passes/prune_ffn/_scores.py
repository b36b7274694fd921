"""Neuron scores for ``prune_ffn``: which data each score needs and where it comes from. The
formulas are in :mod:`._math`; calibration runs go through :mod:`slimc.passes._calib`.

The neurons' activations ``a`` are the value the down-projection reads (after the activation
function, and in the gated form after ``act(gate) * up``): ``y = down · a + b``.
"""

from __future__ import annotations

from ...errors import OptionError
from .. import _calib
from . import _math

SCORES = ("magnitude", "activation", "wanda", "taylor")
CALIBRATED = ("activation", "wanda", "taylor")
ONNX_SCORES = ("magnitude", "activation", "wanda")


def check(graph, score: str, calib, loss, scoring: bool):
    """Refuse options that cannot work before anything runs; return the calibration batches
    (``None`` when nothing is scored, or for magnitude). ``scoring``: neurons are picked by
    score (``ratio > 0``)."""
    if score not in SCORES:
        raise OptionError(f"Unknown FFN neuron score {score!r}.",
                          f"Use one of {', '.join(map(repr, SCORES))}.")
    if not (score == "taylor" or isinstance(loss, str) and loss == "kl"):
        raise OptionError(f"loss= is the objective of score='taylor'; score={score!r} does "
                          "not use it.", "Drop loss=, or use score='taylor'.")
    if not scoring:
        return None
    if score == "magnitude":
        # calib is not refused here (prune_heads refuses it): Recipe.apply hands its shared
        # batches to every pass with a calib option that it does not know to skip
        return None
    if score == "taylor":
        if graph.backend != "fx":
            raise OptionError(
                "score='taylor' needs gradients with respect to the neurons, which slimc "
                "computes with torch autograd on FX graphs; an ONNX graph has none here.",
                f"On ONNX use score={' / '.join(map(repr, ONNX_SCORES))}, or capture the torch "
                "module with slimc.capture() and prune the FX graph.")
        _calib.check_loss(loss)
    if calib is None:
        raise OptionError(f"score={score!r} needs calibration data: calib=[inputs, ...] is "
                          "missing.", "Pass calib= a list of a few input tuples shaped like the "
                          "model's example inputs, or use score='magnitude' (weights only).")
    return _calib.check_batches(graph, calib, f"score={score!r}")


def _reads(graph, blocks) -> dict:
    """{layer: (down node, value it reads)}."""
    sites = {s.node: s.x for s in _calib.linear_sites(graph.native)}
    return {b.layer: (b.down.node, sites[b.down.node]) for b in blocks}


def neuron_scores(graph, blocks: list, score: str, batches, loss="kl") -> dict:
    """{layer: score of each neuron} (higher = keep)."""
    if score == "magnitude":
        return {b.layer: _math.magnitude_scores(b, graph.get_weight) for b in blocks}
    reads = _reads(graph, blocks)
    if score == "taylor":
        from .fx import with_neuron_masks
        gm, masks = with_neuron_masks(graph.native, {
            b.layer: (*reads[b.layer], b.intermediate) for b in blocks})
        return _calib.mask_gradients(gm, masks, batches, loss)
    stats = {b.layer: _math.NeuronStats(b.intermediate) for b in blocks}
    by_value = {reads[b.layer][1]: stats[b.layer] for b in blocks}
    _calib.run(graph.native, list(by_value), batches, lambda v, a: by_value[v].update(a))
    if score == "activation":
        return {b.layer: _math.activation_scores(stats[b.layer]) for b in blocks}
    return {b.layer: _math.wanda_scores(b, stats[b.layer], graph.get_weight) for b in blocks}

