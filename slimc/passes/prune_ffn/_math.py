"""Backend-neutral half of ``prune_ffn``: check the request, score neurons, pick them, and say
which rows / columns of which weights go.

Neuron ``j`` of a feed-forward block owns row ``j`` of the first projection(s) (``up``, and
``gate`` in the gated form) with bias element ``j``, and column ``j`` of ``down``. Which array
axis that is depends on the stored layout (:class:`~slimc.ir.structures.Linear`): ``out_in``
stores rows on axis 0, ``in_out`` (GPT-2's Conv1D, ONNX MatMul) on axis 1.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from ...errors import OptionError
from ...ir.structures import FFNBlock, Linear


@dataclass(frozen=True)
class FFNPlan:
    """What to do to one block: keep neurons ``keep`` (sorted), drop ``removed``."""

    block: FFNBlock
    keep: tuple[int, ...]
    removed: tuple[int, ...]

    @property
    def layer(self) -> int:
        return self.block.layer


@dataclass(frozen=True)
class WeightEdit:
    """Keep ``index`` along ``axis`` of weight ``name`` (read by node ``node``)."""

    name: str
    node: str
    axis: int
    index: tuple[int, ...]


def _rows_axis(lin: Linear) -> int:
    return 0 if lin.layout == "out_in" else 1


def weight_edits(plan: FFNPlan) -> list[WeightEdit]:
    b, keep = plan.block, plan.keep
    edits = []
    for lin in b.inputs:
        edits.append(WeightEdit(lin.weight, lin.node, _rows_axis(lin), keep))
        if lin.bias:
            edits.append(WeightEdit(lin.bias, lin.node, -1, keep))
    edits.append(WeightEdit(b.down.weight, b.down.node, 1 - _rows_axis(b.down), keep))
    return edits


def apply_edit(value: np.ndarray, edit: WeightEdit) -> np.ndarray:
    return np.ascontiguousarray(np.take(value, np.asarray(edit.index, dtype=np.int64),
                                        axis=edit.axis))


def removed_parameters(plan: FFNPlan) -> int:
    b, n = plan.block, len(plan.removed)
    per = sum(lin.in_features + (1 if lin.bias else 0) for lin in b.inputs) + b.down.out_features
    return n * per


# -- options ----------------------------------------------------------------------------------

def check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise OptionError(f"ratio must be a number in [0, 1), got {ratio!r}.",
                          "Pass e.g. ratio=0.3 to remove 30 % of each FFN's neurons.")
    if not 0 <= float(ratio) < 1 or math.isnan(float(ratio)):
        raise OptionError(f"ratio={ratio} is outside [0, 1).",
                          "Pass the fraction of intermediate neurons to remove, e.g. 0.3; 1 "
                          "would remove every neuron.")
    return float(ratio)


def check_round_to(round_to) -> int:
    if isinstance(round_to, bool) or not isinstance(round_to, numbers.Integral) or round_to < 1:
        raise OptionError(f"round_to must be a positive integer, got {round_to!r}.",
                          "Pass e.g. round_to=16 to keep a multiple of 16 neurons per layer.")
    return int(round_to)


def plan_neurons(blocks: list[FFNBlock], neurons) -> list[FFNPlan]:
    """Plans for an explicit ``{layer: [neuron, ...]}``; layers without neurons are skipped."""
    if not isinstance(neurons, dict):
        raise OptionError(f"neurons must be a dict {{layer: [neuron, ...]}}, got "
                          f"{type(neurons).__name__}.", "E.g. neurons={0: [1, 5], 3: [0]}.")
    by_layer = {b.layer: b for b in blocks}
    plans = []
    for layer, chosen in neurons.items():
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) \
                or int(layer) not in by_layer:
            raise OptionError(f"Unknown FFN layer {layer!r}: the graph has {len(blocks)} "
                              f"feed-forward block(s), layers 0..{len(blocks) - 1}.",
                              "Number layers as graph.ffn_blocks() lists them.")
        b = by_layer[int(layer)]
        try:
            items = list(chosen)
        except TypeError:
            raise OptionError(f"neurons[{layer}] must be a list of neuron indices, got "
                              f"{chosen!r}.", "E.g. neurons={0: [1, 5]}.") from None
        for j in items:
            if isinstance(j, bool) or not isinstance(j, numbers.Integral):
                raise OptionError(f"neurons[{layer}] holds the non-integer {j!r}.",
                                  "Neurons are integer indices into the intermediate axis.")
            if not 0 <= int(j) < b.intermediate:
                raise OptionError(f"Neuron {j} is out of range: FFN layer {layer} ({b.name}) "
                                  f"has {b.intermediate} neurons (0..{b.intermediate - 1}).",
                                  "Pass indices in that range.")
        gone = sorted({int(j) for j in items})
        if len(gone) == b.intermediate:
            raise OptionError(f"neurons[{layer}] would remove every neuron of FFN layer "
                              f"{layer} ({b.intermediate}).",
                              "Keep at least one neuron; to drop the whole block, remove the "
                              "layer instead.")
        if gone:
            plans.append(_plan(b, gone))
    return sorted(plans, key=lambda p: p.layer)


def _plan(b: FFNBlock, gone) -> FFNPlan:
    gone_set = set(gone)
    keep = tuple(j for j in range(b.intermediate) if j not in gone_set)
    return FFNPlan(b, keep, tuple(sorted(gone_set)))


def magnitude_scores(block: FFNBlock, get_weight) -> np.ndarray:
    """‖in-row j‖ · ‖out-column j‖ per neuron, the in-row holding the bias too; in the gated
    form the gate's and up's in-row norms multiply (the neuron is their product)."""
    score = np.ones(block.intermediate)
    for lin in block.inputs:
        w = np.asarray(get_weight(lin.weight), dtype=np.float64)
        rows = w if lin.layout == "out_in" else w.T
        sq = (rows ** 2).sum(axis=1)
        if lin.bias:
            sq = sq + np.asarray(get_weight(lin.bias), dtype=np.float64).reshape(-1) ** 2
        score *= np.sqrt(sq)
    w = np.asarray(get_weight(block.down.weight), dtype=np.float64)
    cols = w.T if block.down.layout == "out_in" else w
    return score * np.sqrt((cols ** 2).sum(axis=1))


class NeuronStats:
    """Per-neuron statistics of the value ``down`` reads (the neurons' activations ``a``) over
    every calibration token, in float64: ``tokens``, ``abs_sum`` (Σ_t |a_tj|) and ``sq``
    (Σ_t a_tj², ‖a_j‖₂²)."""

    def __init__(self, width: int):
        self.width = width
        self.tokens = 0
        self.abs_sum = np.zeros(width)
        self.sq = np.zeros(width)

    def update(self, a) -> None:
        a = np.asarray(a)
        if a.ndim == 0 or a.shape[-1] != self.width:
            raise OptionError(f"A calibration batch produced FFN activations of shape "
                              f"{a.shape} where {self.width} neurons were expected.",
                              "Give calibration batches shaped like the model's inputs.")
        a = a.reshape(-1, self.width).astype(np.float64)
        if not np.isfinite(a).all():
            raise OptionError("A calibration batch produces NaN or infinite FFN activations.",
                              "Check the calibration inputs; the model must produce finite "
                              "values on them.")
        self.tokens += a.shape[0]
        self.abs_sum += np.abs(a).sum(axis=0)
        self.sq += np.einsum("tj,tj->j", a, a)


def activation_scores(stats: NeuronStats) -> np.ndarray:
    """Mean |a_j| over the calibration tokens."""
    return stats.abs_sum / max(stats.tokens, 1)


def wanda_scores(block: FFNBlock, stats: NeuronStats, get_weight) -> np.ndarray:
    """Σ_i |down_ij| · ‖a_j‖₂: Wanda's weight score |W_ij|·‖X_j‖₂ (Sun et al. 2023) summed over
    the neuron's outgoing weights, column j of ``down``, whose input feature j is a_j."""
    w = np.asarray(get_weight(block.down.weight), dtype=np.float64)
    cols = w.T if block.down.layout == "out_in" else w
    return np.abs(cols).sum(axis=1) * np.sqrt(stats.sq)


def _kept(n: int, remove: int, round_to: int) -> int:
    """How many of ``n`` neurons stay when ``remove`` go, rounded up to a multiple of
    ``round_to`` (never more than ``n``, never fewer than one)."""
    keep = max(1, n - remove)
    return min(n, -(-keep // round_to) * round_to)


def select(blocks: list[FFNBlock], scores: dict, ratio: float, *, global_: bool,
           round_to: int) -> list[FFNPlan]:
    """The lowest-scoring neurons: ``ratio`` of each layer, or (``global_``) of all neurons
    against one threshold; each layer keeps at least one neuron and a multiple of
    ``round_to``. Ties go to the lower index."""
    plans = []
    if global_:
        total = sum(b.intermediate for b in blocks)
        want = int(ratio * total)
        flat = [(float(scores[b.layer][j]), b.layer, j) for b in blocks
                for j in range(b.intermediate)]
        flat.sort()
        counts = {b.layer: 0 for b in blocks}
        cap = {b.layer: b.intermediate - 1 for b in blocks}
        for _, layer, _j in flat:  # past a full layer the threshold moves on to the others
            if want == 0:
                break
            if counts[layer] < cap[layer]:
                counts[layer] += 1
                want -= 1
    else:
        counts = {b.layer: int(ratio * b.intermediate) for b in blocks}
    for b in blocks:
        keep_n = _kept(b.intermediate, counts[b.layer], round_to)
        order = np.lexsort((np.arange(b.intermediate), np.asarray(scores[b.layer])))
        gone = sorted(int(j) for j in order[:b.intermediate - keep_n])
        if gone:
            plans.append(_plan(b, gone))
    return plans
