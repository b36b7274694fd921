"""Backend-neutral maths of low-rank factorisation: options, rank choice, truncated SVD.

A Linear applies a matrix M (as its op consumes it: (out, in) for ``linear``, (in, out) for
``matmul`` / ``Gemm``). With M = U Σ Vᵀ, the rank-r factors are L = U_r Σ_r^½ and
R = Σ_r^½ V_rᵀ, so M ≈ L R; splitting Σ evenly keeps both factors on the same scale (which
later quantisation appreciates). SVD is computed in float64 and the factors stored in the
weight's dtype.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...errors import OptionError


@dataclass(frozen=True)
class Spec:
    rank: int | None
    energy: float | None
    exclude: tuple[str, ...]
    only_if_smaller: bool


@dataclass(frozen=True)
class Factors:
    left: np.ndarray  # (p, r)
    right: np.ndarray  # (r, q)
    rank: int
    energy: float  # fraction of Σσ² kept
    relative_error: float  # ‖M − L R‖_F / ‖M‖_F, from the discarded singular values


def parse_options(*, rank=None, energy=None, exclude=(), only_if_smaller=True) -> Spec:
    if (rank is None) == (energy is None):
        raise OptionError(
            "factorize_low_rank needs exactly one of rank= and energy="
            + (" (both were given)." if rank is not None else "."),
            "Pass rank=R (the same rank for every Linear) or energy=E in (0, 1] (per layer, "
            "the smallest rank keeping that fraction of the squared singular values).")
    if rank is not None and (not isinstance(rank, numbers.Integral) or isinstance(rank, bool)
                             or rank < 1):
        raise OptionError(f"rank={rank!r} must be an integer >= 1.",
                          "Pass e.g. rank=16, or use energy= to choose it per layer.")
    if energy is not None and (not isinstance(energy, numbers.Real) or isinstance(energy, bool)
                               or not 0 < energy <= 1):
        raise OptionError(f"energy={energy!r} must be a number in (0, 1].",
                          "It is the fraction of squared singular values kept, e.g. 0.9; 1.0 "
                          "keeps the full rank.")
    if isinstance(exclude, str):
        exclude = (exclude,)
    if not isinstance(exclude, Sequence) or not all(isinstance(e, str) for e in exclude):
        raise OptionError(f"exclude={exclude!r} is not a sequence of glob patterns.",
                          "Pass e.g. exclude=('*.query.weight',).")
    if not isinstance(only_if_smaller, bool):
        raise OptionError(f"only_if_smaller={only_if_smaller!r} must be True or False.",
                          "Leave it True unless you want to test the rewrite at full rank.")
    return Spec(int(rank) if rank is not None else None,
                float(energy) if energy is not None else None, tuple(exclude), only_if_smaller)


def excluded(name: str, spec: Spec) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in spec.exclude)


def choose_rank(s: np.ndarray, spec: Spec) -> int:
    """The rank for singular values ``s`` (descending): ``rank`` clipped to len(s), or the
    smallest r with Σ_{i<r} σᵢ² ≥ energy · Σ σᵢ² (energy 1 is the full rank, whatever the
    rounding of the cumulative sum)."""
    full = len(s)
    if spec.rank is not None:
        return min(spec.rank, full)
    if spec.energy >= 1.0:
        return full
    e = np.cumsum(np.square(s.astype(np.float64)))
    return min(full, int(np.searchsorted(e, spec.energy * e[-1], side="left")) + 1)


def saves(p: int, q: int, r: int) -> bool:
    """Two factors (p×r, r×q) hold fewer parameters — and cost fewer multiply-adds — than the
    p×q matrix."""
    return r * (p + q) < p * q


def factorize(m: np.ndarray, spec: Spec) -> Factors | None:
    """Truncated SVD factors of ``m``, or ``None`` when ``m`` is all zeros (no rank to keep)."""
    u, s, vt = np.linalg.svd(m.astype(np.float64), full_matrices=False)
    total = float(np.square(s).sum())
    if total == 0.0:
        return None
    r = choose_rank(s, spec)
    root = np.sqrt(s[:r])
    left = (u[:, :r] * root).astype(m.dtype)
    right = (root[:, None] * vt[:r]).astype(m.dtype)
    kept = float(np.square(s[:r]).sum()) / total
    return Factors(left, right, r, kept, math.sqrt(max(0.0, 1.0 - kept)))
