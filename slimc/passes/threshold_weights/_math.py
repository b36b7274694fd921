"""Backend-neutral maths of weight thresholding: option checking, which weights qualify, the
importance of each weight, and the keep-masks for every sparsity mode.

Every mode works on a weight's *canonical matrix* ``C`` (rows, K), K being the reduction axis:
a Linear stored ``out_in`` is ``W`` itself, one stored ``in_out`` is ``Wᵀ``, a Conv weight
(out, in/groups, kh, kw) is ``W.reshape(out, -1)`` (reduction over in, kh, kw in that order), an
embedding table (vocab, dim) is itself (groups run along dim). Masks are computed on ``C`` and
mapped back to the stored shape, so nothing here knows about FX or ONNX.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...errors import OptionError, PassError

# Kinds of weight use a pass may edit; "other" (LayerNorm, bias, add, an op we do not model) never.
KINDS = ("linear", "conv", "embedding")
DEFAULT_KINDS = frozenset({"linear", "conv"})
IMPORTANCES = ("magnitude", "taylor", "wanda", "sparsegpt")
# importances computed from calibration batches; the last two read the inputs X of Linears
CALIBRATED = ("taylor", "wanda", "sparsegpt")
ACTIVATION_BASED = ("wanda", "sparsegpt")
SCOPES = ("per_layer", "global")


@dataclass(frozen=True)
class Use:
    """One consumer of a weight. ``layout`` is the Linear layout ("out_in" / "in_out") as seen
    from the stored array; ``None`` for other kinds."""

    kind: str  # "linear" | "conv" | "embedding" | "other"
    node: str
    layout: str | None = None

    @property
    def orientation(self) -> str | None:
        """"rows" when the canonical matrix is the stored array (reshaped to 2-D), "cols" when it
        is its transpose; ``None`` for uses we never edit."""
        if self.kind == "linear":
            return "rows" if self.layout == "out_in" else "cols"
        if self.kind in ("conv", "embedding"):
            return "rows"
        return None


@dataclass(frozen=True)
class Spec:
    """Checked options. ``mode`` is one of "tau", "sparsity", "pattern", "block"."""

    mode: str
    tau: float | None = None
    sparsity: float | None = None
    n: int = 0
    m: int = 0
    block: tuple[int, int] | None = None
    scope: str = "per_layer"
    importance: str = "magnitude"
    kinds: frozenset = DEFAULT_KINDS
    exclude: tuple[str, ...] = ()

    @property
    def structured(self) -> bool:
        return self.mode in ("pattern", "block")


@dataclass(frozen=True)
class Target:
    """A weight the pass edits, with its canonical orientation."""

    name: str
    kind: str
    orientation: str  # "rows" | "cols"


# -- options ----------------------------------------------------------------------------------
def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def parse_pattern(pattern) -> tuple[int, int]:
    """``"N:M"`` → (N, M) with 1 ≤ N < M."""
    bad = OptionError(f"pattern={pattern!r} is not an N:M pattern with 1 <= N < M.",
                      'Write it as a string "N:M", e.g. pattern="2:4" (keep the 2 largest of '
                      "every 4 weights along the reduction axis).")
    if not isinstance(pattern, str) or pattern.count(":") != 1:
        raise bad
    a, b = (s.strip() for s in pattern.split(":"))
    if not (a.isdigit() and b.isdigit()):
        raise bad
    n, m = int(a), int(b)
    if not 1 <= n < m:
        raise bad
    return n, m


def _parse_block(block) -> tuple[int, int]:
    ok = (isinstance(block, (tuple, list)) and len(block) == 2
          and all(isinstance(b, numbers.Integral) and not isinstance(b, bool) and b >= 1
                  for b in block))
    if not ok:
        raise OptionError(f"block={block!r} is not a block shape.",
                          "Pass two positive integers (rows, columns), e.g. block=(1, 8); rows "
                          "run along the output features, columns along the reduction axis.")
    return int(block[0]), int(block[1])


def _as_names(value, option: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise OptionError(f"{option}={value!r} is not a string or a sequence of strings.",
                      f"Pass e.g. {option}=('name',).")


def parse_options(*, tau=None, sparsity=None, scope=None, importance="magnitude", pattern=None,
                  block=None, calib=None, loss=None, include=(), exclude=()) -> Spec:
    """Check the options together and say which mode they ask for; every bad combination is an
    :class:`OptionError` naming the conflict."""
    given = [k for k, v in (("tau", tau), ("sparsity", sparsity), ("pattern", pattern))
             if v is not None]
    if len(given) > 1:
        raise OptionError(f"{' and '.join(given)} were given together; they are alternative "
                          "ways to say how much to remove.",
                          "Pass exactly one of tau=, sparsity= or pattern= (block= goes with "
                          "sparsity=).")
    if not given:
        raise OptionError("threshold_weights needs to know how much to remove.",
                          "Pass tau= (zero |w| <= tau), sparsity= (a fraction, optionally with "
                          'block=) or pattern="N:M".')
    if importance not in IMPORTANCES:
        raise OptionError(f"importance={importance!r} is unknown.",
                          f"Use one of {', '.join(map(repr, IMPORTANCES))}.")
    if scope is not None and scope not in SCOPES:
        raise OptionError(f"scope={scope!r} is unknown.",
                          f"Use one of {', '.join(map(repr, SCOPES))}.")
    if importance in CALIBRATED and (calib is None or (hasattr(calib, "__len__")
                                                       and len(calib) == 0)):
        raise OptionError(f"importance={importance!r} needs calibration batches (calib= is "
                          f"{'empty' if calib is not None else 'missing'}).",
                          "Pass calib=[batch, ...], each batch one array per model input.")
    if importance not in CALIBRATED and calib is not None:
        raise OptionError("calib= is only used by importance='taylor', 'wanda' or "
                          "'sparsegpt'.", "Add one of those importances, or drop calib=.")
    if importance != "taylor" and loss is not None:
        raise OptionError("loss= is only used by importance='taylor'.",
                          "Add importance='taylor', or drop loss=.")
    if importance in ACTIVATION_BASED and scope == "global":
        raise OptionError(f"importance={importance!r} compares weights within a layer (Wanda "
                          "per output row, SparseGPT per block of columns); scope='global' "
                          "has no meaning for it.", "Drop scope= (per_layer is the default).")
    if loss is not None and not callable(loss):
        raise OptionError("loss= must be a callable loss(outputs, batch_index) -> scalar.",
                          "Pass a function of the list of output tensors, or drop loss= to "
                          "measure importance against the unpruned outputs.")
    kinds = set(DEFAULT_KINDS)
    for k in _as_names(include, "include"):
        if k not in KINDS:
            raise OptionError(f"include={k!r} is not a kind of weight use.",
                              f"Use some of {', '.join(map(repr, KINDS))}.")
        kinds.add(k)
    common = {"importance": importance, "kinds": frozenset(kinds),
              "exclude": _as_names(exclude, "exclude")}

    if tau is not None:
        if not _is_real(tau) or not math.isfinite(tau) or tau < 0:
            raise OptionError(f"tau={tau!r} must be a finite number >= 0.",
                              "tau is a magnitude: weights with |w| <= tau become zero.")
        if importance != "magnitude":
            raise OptionError("tau= thresholds magnitudes; it cannot be combined with "
                              f"importance={importance!r}.",
                              f"Use sparsity= (or pattern=) with importance={importance!r}.")
        conflicts = [k for k, v in (("block", block), ("scope", scope)) if v is not None]
        if conflicts:
            raise OptionError(f"tau= cannot be combined with {' / '.join(conflicts)}=.",
                              "block= and scope= go with sparsity=.")
        return Spec("tau", tau=float(tau), **common)

    if pattern is not None:
        n, m = parse_pattern(pattern)
        conflicts = [k for k, v in (("block", block), ("scope", scope)) if v is not None]
        if conflicts:
            raise OptionError(f"pattern= cannot be combined with {' / '.join(conflicts)}=.",
                              "An N:M pattern fixes the sparsity of every group of M; use "
                              "block= with sparsity= for block sparsity.")
        return Spec("pattern", n=n, m=m, **common)

    if not _is_real(sparsity) or not 0 <= sparsity < 1:
        raise OptionError(f"sparsity={sparsity!r} must be a number in [0, 1).",
                          "It is the fraction of weights (or blocks) to zero, e.g. 0.5.")
    scope = scope or "per_layer"
    if block is not None:
        return Spec("block", sparsity=float(sparsity), block=_parse_block(block), scope=scope,
                    **common)
    return Spec("sparsity", sparsity=float(sparsity), scope=scope, **common)


# -- which weights ----------------------------------------------------------------------------
def select(uses: dict[str, list[Use]], weights: dict[str, np.ndarray],
           spec: Spec) -> tuple[list[Target], dict[str, str]]:
    """The weights to edit, and why each candidate that has an editable use is left alone.

    A weight qualifies only if *every* use of it is of a kind the pass may edit, so a weight that
    a Linear shares with a LayerNorm, an add or an op we do not model is never touched. The
    structured modes also need every use to agree on the reduction axis.
    """
    targets, skipped = [], {}
    for name, us in uses.items():
        kinds = {u.kind for u in us}
        if not kinds & set(KINDS):
            continue  # a bias, a norm, a constant: not a candidate at all
        w = weights[name]
        if any(fnmatch.fnmatchcase(name, pat) for pat in spec.exclude):
            skipped[name] = "excluded by exclude="
            continue
        if not np.issubdtype(w.dtype, np.floating):
            skipped[name] = f"not floating point ({w.dtype})"
            continue
        others = sorted((u for u in us if u.kind not in spec.kinds),
                        key=lambda u: u.kind != "other")  # a use that can never change first
        if others:
            u = others[0]
            if u.kind == "embedding":
                skipped[name] = "embedding table (pass include=('embedding',) to threshold it)"
            else:
                skipped[name] = f"also used by {u.node} ({u.kind}), which must not change"
            continue
        orients = {u.orientation for u in us}
        if spec.structured and len(orients) > 1:
            skipped[name] = "used with different reduction axes by " + ", ".join(
                sorted({u.node for u in us}))
            continue
        if spec.importance in ACTIVATION_BASED and kinds != {"linear"}:
            skipped[name] = (f"importance={spec.importance!r} needs the inputs of a Linear; "
                             f"{', '.join(sorted(kinds - {'linear'}))} weights are left alone")
            continue
        kind = "linear" if "linear" in kinds else min(kinds)
        targets.append(Target(name, kind, orients.pop()))
    return targets, skipped


# -- canonical matrices ---------------------------------------------------------------------
def to_matrix(w: np.ndarray, orientation: str) -> np.ndarray:
    return w.reshape(w.shape[0], -1) if orientation == "rows" else w.T


def from_matrix(c: np.ndarray, orientation: str, shape: tuple) -> np.ndarray:
    return c.reshape(shape) if orientation == "rows" else c.T.reshape(shape)


# -- importance and masks ---------------------------------------------------------------------
def magnitude_importance(w: np.ndarray) -> np.ndarray:
    """w² in float64: ranks as |w| does, and adds up over a block to its squared L2 norm."""
    return np.square(w.astype(np.float64))


def wanda_importance(c: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """Wanda's score on a canonical matrix: S_ij = |C_ij| · ‖X_j‖₂ (float64), X the Linear's
    input over every calibration token (Sun et al. 2023)."""
    return np.abs(c.astype(np.float64)) * np.asarray(norm, dtype=np.float64)[None, :]


def spread(fraction: float, n_units: int, per_unit: int) -> list[int]:
    """How many to remove from each of ``n_units`` equal groups of ``per_unit`` so that the total
    is exactly ``count_for(fraction, n_units · per_unit)``: group u gets
    count_for(f, (u+1)·p) − count_for(f, u·p), i.e. floor or ceil of f·p, never more than p."""
    return [count_for(fraction, (u + 1) * per_unit) - count_for(fraction, u * per_unit)
            for u in range(n_units)]


def per_row_drop(imp: np.ndarray, tie: np.ndarray, fraction: float) -> np.ndarray:
    """Drop-mask of ``imp`` (rows, cols) comparing only within each row (Wanda's per-output
    comparison group); the rows share the layer's count exactly (see :func:`spread`)."""
    rows, cols = imp.shape
    drop = np.zeros(imp.shape, dtype=bool)
    for r, k in enumerate(spread(fraction, rows, cols)):
        drop[r] = lowest(imp[r], tie[r], k)
    return drop


def tau_keep(w: np.ndarray, tau: float) -> np.ndarray:
    """|w| > tau, compared as real numbers (float64), so a float32 weight is not rounded to the
    precision of tau or vice versa."""
    return np.abs(w.astype(np.float64)) > tau


def lowest(imp: np.ndarray, tie: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of exactly ``k`` entries of the flat ``imp`` with the lowest importance; ties
    broken by ``tie`` (lower first), then by position. O(n), not a full sort."""
    n = imp.size
    out = np.zeros(n, dtype=bool)
    if k <= 0:
        return out
    if k >= n:
        out[:] = True
        return out
    kth = np.partition(imp, k - 1)[k - 1]
    below = imp < kth
    out |= below
    need = k - int(below.sum())
    tied = np.flatnonzero(imp == kth)
    order = np.lexsort((tied, tie[tied]))
    out[tied[order[:need]]] = True
    return out


def count_for(fraction: float, n: int) -> int:
    """How many of ``n`` to remove for ``fraction``: the nearest integer (halves round up)."""
    return min(n, math.floor(fraction * n + 0.5))


def nm_keep(imp: np.ndarray, absw: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the ``n`` most important of every ``m`` consecutive entries along axis 1 of the
    canonical matrices ``imp`` / ``absw`` (K divisible by m). Ties prefer the larger |w|, so a
    group never keeps a zero while dropping a non-zero: non-zeros after = min(n, non-zeros
    before) in every group."""
    rows, k = imp.shape
    gi = imp.reshape(rows, k // m, m)
    ga = absw.reshape(rows, k // m, m)
    order = np.lexsort((ga, gi), axis=-1)  # ascending importance, then |w|
    keep = np.zeros(gi.shape, dtype=bool)
    np.put_along_axis(keep, order[..., m - n:], True, axis=-1)
    return keep.reshape(rows, k)


def block_sums(c: np.ndarray, br: int, bc: int) -> np.ndarray:
    rows, k = c.shape
    return c.reshape(rows // br, br, k // bc, bc).sum(axis=(1, 3))


def expand_blocks(bmask: np.ndarray, br: int, bc: int) -> np.ndarray:
    return np.repeat(np.repeat(bmask, br, axis=0), bc, axis=1)


def check_divisible(name: str, c: np.ndarray, spec: Spec) -> None:
    rows, k = c.shape
    what = "pattern" if spec.mode == "pattern" else "block shape"
    fix = f"Exclude it with exclude=({name!r},), or choose a {what} that divides it."
    if spec.mode == "pattern" and k % spec.m:
        raise OptionError(f"{name}: its reduction dimension {k} is not divisible by M={spec.m} "
                          f"of pattern {spec.n}:{spec.m}.", fix)
    if spec.mode == "block":
        br, bc = spec.block
        if rows % br or k % bc:
            raise OptionError(f"{name}: its canonical shape (out={rows}, reduction={k}) is not "
                              f"divisible by block={spec.block}.", fix)


def keep_masks(targets: list[Target], weights: dict[str, np.ndarray],
               importance: dict[str, np.ndarray], spec: Spec) -> dict[str, np.ndarray]:
    """The keep-mask of every target, in its stored shape. Raises before anything is edited."""
    mats, imps = {}, {}
    for t in targets:
        w = weights[t.name]
        if not np.isfinite(w).all():
            raise PassError(f"{t.name} holds NaN or infinite values; thresholding it has no "
                            "meaning.", "Fix the model's weights, or exclude it with exclude=.")
        mats[t.name] = to_matrix(w, t.orientation)
        imps[t.name] = to_matrix(importance[t.name], t.orientation)
        check_divisible(t.name, mats[t.name], spec)

    keep: dict[str, np.ndarray] = {}
    if spec.mode == "tau":
        for t in targets:
            keep[t.name] = tau_keep(weights[t.name], spec.tau)
        return keep
    if spec.mode == "pattern":
        for t in targets:
            c = nm_keep(imps[t.name], np.abs(mats[t.name]), spec.n, spec.m)
            keep[t.name] = from_matrix(c, t.orientation, weights[t.name].shape)
        return keep

    # sparsity / block: score units (weights or blocks), then drop the lowest per layer or
    # across all layers at once
    if spec.mode == "block":
        br, bc = spec.block
        units = {t.name: (block_sums(imps[t.name], br, bc),
                          block_sums(np.abs(mats[t.name]).astype(np.float64), br, bc))
                 for t in targets}
    else:
        units = {t.name: (imps[t.name], np.abs(mats[t.name])) for t in targets}
    if spec.importance == "wanda":
        # Wanda compares within an output row (a row of blocks for block sparsity)
        for t in targets:
            imp, tie = units[t.name]
            c = ~per_row_drop(imp, tie, spec.sparsity)
            if spec.mode == "block":
                c = expand_blocks(c, *spec.block)
            keep[t.name] = from_matrix(c, t.orientation, weights[t.name].shape)
        return keep
    groups = [[t] for t in targets] if spec.scope == "per_layer" else [targets]
    for group in groups:
        if not group:
            continue
        imp = np.concatenate([units[t.name][0].ravel() for t in group])
        tie = np.concatenate([units[t.name][1].ravel() for t in group])
        drop = lowest(imp, tie, count_for(spec.sparsity, imp.size))
        start = 0
        for t in group:
            shape = units[t.name][0].shape
            size = int(np.prod(shape))
            c = ~drop[start:start + size].reshape(shape)
            start += size
            if spec.mode == "block":
                c = expand_blocks(c, *spec.block)
            keep[t.name] = from_matrix(c, t.orientation, weights[t.name].shape)
    return keep


def apply(w: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """W' = W where kept, else 0 (same dtype)."""
    return np.where(keep, w, np.zeros((), dtype=w.dtype)).astype(w.dtype, copy=False)
