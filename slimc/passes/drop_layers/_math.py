"""Backend-neutral half of ``drop_layers``: check the request, score layers, pick them, and say
which residual-stream value replaces which.

Dropping layer ``i`` makes it the identity on the residual stream: every reader of its output
value reads its input value instead (:class:`~slimc.ir.structures.TransformerLayer`), and the
nodes nothing reads any more go. Layers are substituted from the last to the first, so when
neighbours both go, the later one's readers end up at the earlier one's input.

Block influence (Men et al. 2024, "ShortGPT"): ``BI_i = 1 − mean_t cos(x_t, y_t)`` over every
calibration token ``t``, ``x`` the hidden state entering layer ``i`` and ``y`` the one leaving
it. A layer that barely turns the hidden state (``BI`` near 0) is the cheapest to drop.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

from ...errors import OptionError
from ...ir.structures import TransformerLayer
from .. import _calib

SCORES = ("block_influence", "last")


def check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise OptionError(f"n must be a whole number of layers, got {n!r}.",
                          "Pass e.g. n=2 to drop the two lowest-scoring layers.")
    return int(n)


def check_range(n: int, layers: list[TransformerLayer]) -> None:
    if not 0 <= n < len(layers):
        raise OptionError(f"n={n} is outside [0, {len(layers)}): the graph has {len(layers)} "
                          "Transformer layer(s) and at least one must stay.",
                          f"Pass n between 0 and {len(layers) - 1}.")


def plan_layers(layers: list[TransformerLayer], chosen) -> list[int]:
    """The sorted layer indices of an explicit ``layers=[i, ...]``."""
    if isinstance(chosen, (str, bytes, dict)) or isinstance(chosen, numbers.Number):
        raise OptionError(f"layers must be a list of layer indices, got {chosen!r}.",
                          "E.g. layers=[1, 3].")
    try:
        items = list(chosen)
    except TypeError:
        raise OptionError(f"layers must be a list of layer indices, got {chosen!r}.",
                          "E.g. layers=[1, 3].") from None
    for i in items:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) \
                or not 0 <= int(i) < len(layers):
            raise OptionError(f"Unknown layer {i!r}: the graph has {len(layers)} Transformer "
                              f"layer(s), 0..{len(layers) - 1}.",
                              "Number layers as graph.transformer_layers() lists them.")
    gone = sorted({int(i) for i in items})
    if gone and len(gone) == len(layers):
        raise OptionError(f"layers={gone} would drop every Transformer layer "
                          f"({len(layers)}).", "Keep at least one layer.")
    return gone


class _Cosine:
    """Σ cos(x_t, y_t) and the token count, in float64."""

    def __init__(self):
        self.total = 0.0
        self.tokens = 0

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        if x.shape != y.shape or x.ndim == 0:
            raise OptionError(f"A layer's input {x.shape} and output {y.shape} differ in shape "
                              "on a calibration batch.", "Give batches shaped like the model's "
                              "example inputs.")
        x = x.reshape(-1, x.shape[-1]).astype(np.float64)
        y = y.reshape(-1, y.shape[-1]).astype(np.float64)
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise OptionError("A calibration batch produces NaN or infinite hidden states.",
                              "Check the calibration inputs; the model must produce finite "
                              "values on them.")
        norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
        dots = np.einsum("ti,ti->t", x, y)
        # a zero hidden state is not turned at all
        cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 1.0)
        self.total += float(cos.sum())
        self.tokens += int(cos.size)


def block_influence(native, layers: list[TransformerLayer],
                    batches: Sequence[tuple]) -> dict[int, float]:
    """``{layer: 1 − mean cos(input, output)}`` over every token of every batch."""
    stats = {la.layer: _Cosine() for la in layers}
    by_output: dict[str, list[TransformerLayer]] = {}
    for la in layers:
        by_output.setdefault(la.output, []).append(la)
    values = [v for la in layers for v in (la.input, la.output)]
    seen: dict[str, np.ndarray] = {}

    def visit(value: str, array: np.ndarray) -> None:
        seen[value] = array
        for la in by_output.get(value, []):  # inputs are visited before outputs
            stats[la.layer].update(seen[la.input], array)

    _calib.run(native, values, batches, visit)
    return {k: 1.0 - s.total / max(s.tokens, 1) for k, s in stats.items()}


def select(layers: list[TransformerLayer], n: int, score: str,
           scores: dict[int, float] | None) -> list[int]:
    """The ``n`` layers to drop: the last ones, or the lowest block influence (ties go to the
    later layer, which feeds fewer others)."""
    if n == 0:
        return []
    if score == "last":
        return [la.layer for la in layers[-n:]]
    order = sorted(layers, key=lambda la: (scores[la.layer], -la.layer))
    return sorted(la.layer for la in order[:n])


def substitutions(layers: list[TransformerLayer], gone: list[int]) -> list[tuple[str, str]]:
    """``(output, input)`` per dropped layer, last layer first."""
    by_index = {la.layer: la for la in layers}
    return [(by_index[i].output, by_index[i].input) for i in sorted(gone, reverse=True)]
