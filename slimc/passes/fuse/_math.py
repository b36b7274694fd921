"""Backend-neutral arithmetic of the fusion rules: new weights and layout algebra.

Nothing here knows about FX or ONNX; every function takes and returns numpy arrays or tuples.
"""

from __future__ import annotations

import math

import numpy as np

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_TANH_COEFF = 0.044715

# The index algebra of a layout chain materialises one integer per element: above this many
# elements we refuse rather than allocate (the graphs this runs on have activations far smaller).
MAX_LAYOUT_ELEMENTS = 1 << 24


def compose_perms(first: tuple[int, ...], then: tuple[int, ...]) -> tuple[int, ...]:
    """The one permutation equal to ``transpose(transpose(x, first), then)``.

    Math: ``y = transpose(x, p)`` has ``y.shape[i] = x.shape[p[i]]``; so
    ``transpose(y, q).shape[i] = x.shape[p[q[i]]]``: the composite is ``p[q]``.
    """
    return tuple(first[i] for i in then)


def is_identity_perm(perm) -> bool:
    return list(perm) == list(range(len(perm)))


def bias_vector(bias: np.ndarray, out_features: int, out_rank: int) -> np.ndarray | None:
    """``bias`` as a vector of ``out_features`` if adding it to a projection's output [..., N]
    neither broadcasts along another axis nor grows the output's rank; else None."""
    if bias.ndim > out_rank or bias.size != out_features:
        return None
    if bias.ndim == 0 or bias.shape[-1] != out_features:
        return None
    return bias.reshape(out_features)


def fold_batch_norm(w: np.ndarray, b: np.ndarray | None, scale: np.ndarray, shift: np.ndarray,
                    mean: np.ndarray, var: np.ndarray, eps: float,
                    out_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``BN(conv(x, w) + b)`` into ``conv(x, w') + b'`` (also for a linear layer).

    Math: ``s = scale / sqrt(var + eps)``; ``w' = w * s`` along the output-channel axis
    ``out_axis`` of ``w``; ``b' = (b - mean) * s + shift`` (``b = 0`` when absent).
    Computed in float64 and rounded once to ``w``'s dtype.
    """
    s = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + float(eps))
    shape = [1] * w.ndim
    shape[out_axis] = -1
    w2 = w.astype(np.float64) * s.reshape(shape)
    b0 = np.zeros_like(s) if b is None else b.astype(np.float64)
    b2 = (b0 - mean.astype(np.float64)) * s + shift.astype(np.float64)
    return w2.astype(w.dtype), b2.astype(w.dtype)


def layout_chain(in_shape: tuple[int, ...], steps: list[tuple[str, tuple[int, ...]]]):
    """The single op equal to a chain of ``("Transpose", perm)`` / ``("Reshape", shape)`` steps
    applied to a tensor of ``in_shape``: ``("Identity", ())``, ``("Reshape", out_shape)``,
    ``("Transpose", perm)`` or None when one op cannot express it.

    Math: number the input's elements 0..n-1 in row-major order and apply the chain to the
    numbers; the chain is a reshape iff the result, read in row-major order, is 0..n-1, and is
    ``transpose(p)`` iff it equals ``arange(n).reshape(in_shape).transpose(p)``. Both tests are
    exact (integers), so the answer is exact for every tensor of that shape.
    """
    n = math.prod(in_shape)
    if n > MAX_LAYOUT_ELEMENTS:
        return None
    idx = np.arange(n, dtype=np.int64).reshape(in_shape)
    out = idx
    for kind, arg in steps:
        out = out.transpose(arg) if kind == "Transpose" else out.reshape(arg)
    flat_in_order = np.array_equal(out.reshape(-1), np.arange(n))
    if flat_in_order:
        if tuple(out.shape) == tuple(in_shape):
            return ("Identity", ())
        return ("Reshape", tuple(out.shape))
    perm = _perm_of(idx, out)
    if perm is not None:
        return ("Transpose", perm)
    return None


def _perm_of(idx: np.ndarray, out: np.ndarray) -> tuple[int, ...] | None:
    """The permutation p with ``idx.transpose(p) == out``, if there is one."""
    if out.ndim != idx.ndim or sorted(out.shape) != sorted(idx.shape):
        return None
    in_strides = [s // idx.itemsize for s in idx.strides]
    free = list(range(idx.ndim))
    perm: list[int | None] = [None] * out.ndim
    origin = out.reshape(-1)[0] if out.size else 0
    for i in range(out.ndim):  # axes of extent > 1: their step in element numbers names them
        if out.shape[i] <= 1:
            continue
        step = int(out[(0,) * i + (1,) + (0,) * (out.ndim - i - 1)] - origin)
        cands = [a for a in free if in_strides[a] == step and idx.shape[a] == out.shape[i]]
        if not cands:
            return None
        perm[i] = cands[0]
        free.remove(cands[0])
    for i in range(out.ndim):  # extent-1 axes carry no data: give them the unused axes in order
        if perm[i] is None:
            ones = [a for a in free if idx.shape[a] == out.shape[i]]
            if not ones:
                return None
            perm[i] = ones[0]
            free.remove(ones[0])
    p = tuple(int(a) for a in perm)
    return p if np.array_equal(idx.transpose(p), out) else None


def is_trailing_axes(axes, rank: int) -> int | None:
    """k if ``axes`` are exactly the last k axes of a rank-``rank`` tensor, else None."""
    if axes is None or rank is None:
        return None
    norm = sorted(a % rank if a < 0 else a for a in axes)
    k = len(norm)
    return k if k > 0 and norm == list(range(rank - k, rank)) else None


def broadcast_to_trailing(c: np.ndarray, norm_shape: tuple[int, ...]) -> np.ndarray | None:
    """``c`` as an array of ``norm_shape`` if multiplying/adding it over the normalised (last)
    axes of x broadcasts only within them (leading axes of size 1); else None."""
    k = len(norm_shape)
    if c.ndim > k:
        if any(d != 1 for d in c.shape[:c.ndim - k]):
            return None
        c = c.reshape(c.shape[c.ndim - k:])
    try:
        return np.ascontiguousarray(np.broadcast_to(c, norm_shape))
    except ValueError:
        return None
