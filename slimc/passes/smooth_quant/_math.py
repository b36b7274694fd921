"""Backend-neutral maths of SmoothQuant: which channels can be smoothed, the factors, the fold.

A *group* is one producer of a value X whose every reader is a Linear (possibly through
reshapes that keep the last axis, the features): a LayerNormalization (gamma, beta), a
per-channel scale (an RMSNorm's gamma: ``x · g`` with a 1-D constant g) or a Linear (its output
rows and bias). With s_j > 0 per feature j,

    X' = X / s  (the producer's per-feature parameters divided by s)
    W'[:, j] = W[:, j] · s_j  for every consuming Linear (canonical (out, in) matrices)

gives X' W'ᵀ = X Wᵀ exactly in real arithmetic. SmoothQuant (Xiao et al. 2023) picks

    s_j = max_t |X_tj|^α / max_i |W_ij|^(1−α)

(max over calibration tokens for X; over the output rows of all consumers' weights at once for
W — Q, K and V share one LayerNorm and so one s), which moves the activation outliers into the
weights: α = 1 divides X by its own range, α = 0 multiplies W to unit column range.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from ...errors import OptionError

MIN_SCALE = 1e-5  # the reference implementation's clamp: a tiny factor would blow W up


@dataclass(frozen=True)
class Producer:
    """A node whose output's per-feature parameters can absorb 1/s.

    ``kind``: "layernorm" (``params`` gamma, beta — beta may be None), "scale" (gamma) or
    "linear" (weight, bias — bias may be None — and layout). ``out``: the value its readers
    read (for an ONNX MatMul + Add, the Add's output). ``nodes``: the nodes that may read the
    parameters (the producer, and the bias Add)."""

    node: str
    kind: str
    out: str
    features: int
    params: dict
    nodes: frozenset = field(default_factory=frozenset)


@dataclass(frozen=True)
class Consumer:
    node: str
    weight: str
    layout: str  # "out_in" | "in_out", relative to the stored weight


@dataclass(frozen=True)
class Group:
    """Consumers of one producer. ``inserts`` (insert mode): (value, Linear nodes) pairs that
    get a new per-channel ``x · (1/s)`` on that value instead of a fold into the producer."""

    producer: Producer
    consumers: tuple[Consumer, ...]
    inserts: tuple = ()


def parse_alpha(alpha, option: str = "alpha") -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) \
            or not math.isfinite(alpha) or not 0.0 <= alpha <= 1.0:
        raise OptionError(f"{option}={alpha!r} must be a number in [0, 1].",
                          "It is SmoothQuant's migration strength α: 0.5 (the paper's default "
                          "for most models) splits the difficulty between activations and "
                          "weights; larger moves more of it into the weights.")
    return float(alpha)


OUTPUT = "<graph output>"  # what ``readers`` lists for a graph output or a subgraph read
MODES = ("fold", "insert")


def check_mode(mode, option: str = "mode") -> str:
    if mode not in MODES:
        raise OptionError(f"{option}={mode!r} is not a SmoothQuant mode.",
                          "Use 'fold' (fold the factors into the producers: exact, no new ops) "
                          "or 'insert' (also smooth post-norm Linears with a new per-channel "
                          "Mul where no fold exists).")
    return mode


def plan(view, producers: list[Producer], readers, uses: dict, unshare=None,
         mode: str = "fold") -> tuple[list[Group], dict]:
    """The groups to smooth, and why each other producer is left alone.

    ``readers(value)``: the names of the nodes reading ``value`` (:data:`OUTPUT` for a graph
    output or a read inside a subgraph). ``uses``: threshold_weights' {weight: [Use]} — a weight
    may be edited only if every reader of it belongs to the group. A producer parameter read
    elsewhere too (exporters merge equal initializers, e.g. the LayerNorm gammas of a freshly
    initialised model) is given a private copy by ``unshare(producer, names) -> Producer |
    None`` when the backend can.

    ``mode="insert"``: a norm whose output also reaches something other than Linears (post-norm
    models: the residual Add) is smoothed by a new ``x · (1/s)`` in front of its Linears
    (``Group.inserts``: value → the Linears rewired to read the scaled copy) instead of a fold.
    """
    groups, skipped = [], {}
    for p in producers:
        consumers, reads, blockers = _consumers(view, p, readers)
        reason = blockers[0] if blockers else None
        if not consumers and reason is None:
            reason = "nothing reads its output"
        if consumers:
            weight_reason = _shared_weights(consumers, uses)
            if weight_reason is not None:
                skipped[p.node] = weight_reason
                continue
        if reason is None:
            shared = _shared_params(p, uses)
            private = unshare(p, shared) if shared and unshare is not None else None
            if private is not None:
                p, shared = private, []
            if shared:
                reason = f"its parameter {shared[0]} is also read by another node"
        if reason is None:
            groups.append(Group(p, tuple(consumers)))
        elif mode == "insert" and consumers and p.kind != "linear":
            groups.append(Group(p, tuple(consumers),
                                tuple((v, tuple(ns)) for v, ns in reads.items())))
        else:
            skipped[p.node] = reason
    return groups, skipped


def _consumers(view, p: Producer, readers) -> tuple[list[Consumer], dict, list[str]]:
    """The Linears reading the producer's output (through reshapes / identities that keep the
    features last), {value: [Linear nodes reading it]}, and why it cannot be folded."""
    out, reads, blockers = [], {}, []
    frontier, seen = [p.out], set()
    while frontier:
        v = frontier.pop()
        if v in seen:
            continue
        seen.add(v)
        for name in readers(v):
            n = view.by_name.get(name)
            if name == OUTPUT or n is None:
                blockers.append(f"its output {v} is a graph output or read inside a subgraph"
                                if name == OUTPUT else
                                f"its output is read by {name}, which is not a Linear")
            elif n.op == "linear" and n.inputs and n.inputs[0] == v:
                out.append(Consumer(n.name, n.attrs["weight"], n.attrs["layout"]))
                reads.setdefault(v, []).append(n.name)
            elif n.op in ("reshape", "identity") and n.inputs[:1] == [v] \
                    and _last(view.shape(v)) == p.features \
                    and _last(view.shape(n.outputs[0])) == p.features:
                frontier.extend(n.outputs[:1])  # the features stay on the last axis
            else:
                blockers.append(f"its output is read by {name} ({n.op}), which is not a Linear")
    return out, reads, blockers


def _last(shape) -> int | None:
    return shape[-1] if shape and isinstance(shape[-1], int) else None


def _shared_weights(consumers: list[Consumer], uses: dict) -> str | None:
    mine = {c.node for c in consumers}
    for c in consumers:
        others = [u.node for u in uses.get(c.weight, []) if u.node not in mine]
        if others:
            return f"the weight {c.weight} of {c.node} is also read by {others[0]}"
    return None


def _shared_params(p: Producer, uses: dict) -> list[str]:
    """The producer's parameters that nodes outside it read too."""
    return [name for k, name in p.params.items() if k != "layout" and name is not None
            and any(u.node not in p.nodes for u in uses.get(name, []))]


def canonical(w: np.ndarray, layout: str) -> np.ndarray:
    """(out, in) view of a stored Linear weight."""
    return w if layout == "out_in" else w.T


def factors(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^α / max|W_j|^(1−α), clamped to ≥ MIN_SCALE; 1 where a channel is zero in
    the activations or in every weight (nothing to balance)."""
    x = np.asarray(x_absmax, dtype=np.float64)
    w = np.asarray(w_absmax, dtype=np.float64)
    ok = (x > 0) & (w > 0)
    s = np.ones_like(x)
    s[ok] = x[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return np.maximum(s, MIN_SCALE)


def weight_absmax(weights: list[np.ndarray], layouts: list[str]) -> np.ndarray:
    """max_i |W_ij| over the output rows of every consumer (their canonical matrices stacked)."""
    return np.max(np.stack([np.abs(canonical(w, lay).astype(np.float64)).max(axis=0)
                            for w, lay in zip(weights, layouts)]), axis=0)


def fold(get, set_, group: Group, s: np.ndarray) -> None:
    """Divide the producer's per-feature parameters by s (fold mode; insert mode leaves them
    and the caller inserts the 1/s), multiply the consumers' input columns by s (through
    ``get(name)`` / ``set_(name, array)``)."""
    p = group.producer
    if not group.inserts:
        _fold_producer(get, set_, p, s)
    for name in dict.fromkeys(c.weight for c in group.consumers):
        layout = next(c.layout for c in group.consumers if c.weight == name)
        w = get(name)
        c = canonical(w.astype(np.float64), layout) * s[None, :]
        set_(name, canonical(c, layout).astype(w.dtype))


def _fold_producer(get, set_, p: Producer, s: np.ndarray) -> None:
    if p.kind in ("layernorm", "scale"):
        for key in ("gamma", "beta"):
            name = p.params.get(key)
            if name is not None:
                v = get(name)
                set_(name, (v.astype(np.float64) / s.reshape(v.shape)).astype(v.dtype))
        return
    w = get(p.params["weight"])
    c = canonical(w.astype(np.float64), p.params["layout"]) / s[:, None]
    set_(p.params["weight"], canonical(c, p.params["layout"]).astype(w.dtype))
    if p.params.get("bias") is not None:
        b = get(p.params["bias"])
        set_(p.params["bias"], (b.astype(np.float64) / s.reshape(b.shape)).astype(b.dtype))
