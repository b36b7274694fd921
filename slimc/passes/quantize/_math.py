"""Backend-neutral quantization math: integer grids, the affine map, observers and the choice of
a clip range from calibration statistics.

The affine map (ONNX QuantizeLinear, PyTorch's quantize_per_tensor/per_channel):

    q = clamp(round(x / s) + z, qmin, qmax)        (round half to even)
    x̂ = (q − z) · s

A tensor is quantized on a :class:`Grid` (its integer range and storage type) with
:class:`QParams` (scale ``s`` > 0 and zero point ``z`` in the grid, one pair per tensor or per
channel). Nothing here knows about FX or ONNX; fold_fake_quant reuses the same functions.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...errors import OptionError, UnsupportedError

METHODS = ("minmax", "percentile", "entropy", "mse")
WEIGHT_SCHEMES = ("per_channel", "per_tensor")
ACTIVATION_MODES = ("static", "dynamic")
OPS = ("linear", "matmul")
BITS = (8,)

# the smallest scale we hand out: a positive normal float32, so 1/s is finite
MIN_SCALE = float(np.finfo(np.float32).tiny)


# -- grids and parameters --------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """The integers a quantized tensor may hold and the type that stores them."""

    qmin: int
    qmax: int
    dtype: str  # "int8" | "uint8"

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1


# Symmetric weights use the restricted range [-127, 127] (PyTorch's and onnxruntime's choice):
# then −q is always representable and an int8 × int8 product never reaches 2^15.
WEIGHT_SYMMETRIC = Grid(-127, 127, "int8")
WEIGHT_ASYMMETRIC = Grid(-128, 127, "int8")
ACT_SYMMETRIC = Grid(-128, 127, "int8")
ACT_ASYMMETRIC = Grid(0, 255, "uint8")

_TYPE_RANGE = {"int8": (-128, 127), "uint8": (0, 255)}


def activation_grid(symmetric: bool) -> Grid:
    return ACT_SYMMETRIC if symmetric else ACT_ASYMMETRIC


def weight_grid(symmetric: bool) -> Grid:
    return WEIGHT_SYMMETRIC if symmetric else WEIGHT_ASYMMETRIC


@dataclass(frozen=True)
class QParams:
    """Scale(s) and zero point(s) on a grid. ``axis`` is the channel axis of a per-channel
    tensor (``scale.shape == (channels,)``), ``None`` for per-tensor (``scale.shape == ()``)."""

    scale: np.ndarray  # float32
    zero_point: np.ndarray  # int64, same shape as scale
    grid: Grid
    axis: int | None = None

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def broadcast(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        """(scale, zero point) shaped to broadcast against a tensor of rank ``ndim``."""
        if self.axis is None:
            return self.scale, self.zero_point
        shape = [1] * ndim
        shape[self.axis] = -1
        return self.scale.reshape(shape), self.zero_point.reshape(shape)


def qparams_from_range(lo, hi, grid: Grid, symmetric: bool, axis: int | None = None) -> QParams:
    """Scale and zero point that map the clip range [lo, hi] onto ``grid``.

    Symmetric: s = max(|lo|, |hi|) / qmax, z = 0 (so max|x| / 127 on int8).
    Asymmetric: the range is widened to hold 0 (so zero padding is exact), then
    s = (hi − lo) / (qmax − qmin) and z = qmin − round(lo / s), clamped to the grid.
    An empty range (all zeros) gets s = 1: every value maps to z and back to 0 exactly.
    ``lo``/``hi`` are scalars or one value per channel.
    """
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise OptionError("A tensor to quantize holds NaN or infinite values, so it has no "
                          "finite range.", "Check the calibration data and the weights; "
                          "remove NaN/inf before quantizing.")
    if symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        scale = amax / grid.qmax
        zero = np.zeros_like(scale, dtype=np.int64)
    else:
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        scale = (hi - lo) / (grid.qmax - grid.qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero = np.clip(grid.qmin - np.round(lo / safe), grid.qmin, grid.qmax).astype(np.int64)
    scale = np.where(scale > 0, np.maximum(scale, MIN_SCALE), 1.0).astype(np.float32)
    return QParams(scale, np.asarray(zero, dtype=np.int64), grid, axis)


def check_qparams(scale, zero_point, grid: Grid | None, where: str) -> None:
    """Refuse parameters no correct quantizer has: a scale that is zero, negative, NaN or
    infinite (x / s is undefined), or a zero point outside the integer range."""
    s = np.asarray(scale, dtype=np.float64)
    if s.size == 0 or not np.all(np.isfinite(s)) or not np.all(s > 0):
        bad = s[~(np.isfinite(s) & (s > 0))] if s.size else s
        raise UnsupportedError(
            f"{where} has quantization scale {bad.ravel()[:4].tolist()}: a scale must be a "
            "finite positive number (x / scale is undefined otherwise).",
            "Re-run calibration or quantization for this model; a zero scale usually means a "
            "tensor that was constant during calibration.")
    if zero_point is not None and grid is not None:
        z = np.asarray(zero_point)
        if z.size and (z.min() < grid.qmin or z.max() > grid.qmax
                       or not np.all(np.equal(np.round(z), z))):
            raise UnsupportedError(
                f"{where} has zero point {z.ravel()[:4].tolist()} outside its integer range "
                f"[{grid.qmin}, {grid.qmax}].",
                "A zero point must be an integer of the quantized type; re-quantize the model.")


# -- the affine map --------------------------------------------------------------------------
def quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """q = clamp(round(x / s) + z, qmin, qmax), in float32 as onnxruntime computes it."""
    x = np.asarray(x, dtype=np.float32)
    s, z = qp.broadcast(x.ndim)
    q = np.round(x / s.astype(np.float32)) + z
    return np.clip(q, qp.grid.qmin, qp.grid.qmax).astype(qp.grid.dtype)


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    """x̂ = (q − z) · s in float32."""
    q = np.asarray(q)
    s, z = qp.broadcast(q.ndim)
    return ((q.astype(np.int64) - z).astype(np.float32) * s.astype(np.float32)).astype(
        np.float32)


def fake_quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    return dequantize(quantize(x, qp), qp)


def weight_qparams(w: np.ndarray, axis: int | None, symmetric: bool) -> QParams:
    """Min/max parameters of a weight: per channel along ``axis`` or per tensor (``None``).

    Weights are known exactly, so their range is their min and max: clipping a weight would
    move every output that reads it."""
    w = np.asarray(w, dtype=np.float64)
    if axis is None:
        lo, hi = w.min(), w.max()
    else:
        red = tuple(i for i in range(w.ndim) if i != axis)
        lo, hi = w.min(axis=red), w.max(axis=red)
    return qparams_from_range(lo, hi, weight_grid(symmetric), symmetric, axis)


# -- observers -------------------------------------------------------------------------------
class Observer:
    """Statistics of one tensor over calibration batches: exact min and max, and histograms of
    the positive values and of the magnitudes of the negative ones over [0, R).

    ``bins`` is a power of two. When a batch exceeds R, R doubles as often as needed and 2^k
    old bins merge into one, so the histogram stays exact (no re-binning by interpolation) and
    keeps at least ``bins / 2`` bins over the range actually seen.
    """

    def __init__(self, bins: int = 4096):
        if bins < 256 or bins & (bins - 1):
            raise ValueError("bins must be a power of two >= 256")
        self.bins = bins
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.limit = 0.0  # R; 0 until a non-zero value was seen
        self.pos = np.zeros(bins, dtype=np.float64)  # x >= 0, by value
        self.neg = np.zeros(bins, dtype=np.float64)  # x < 0, by |x|

    def update(self, x) -> None:
        x = np.asarray(x, dtype=np.float32).ravel()
        if x.size == 0:
            return
        if not np.all(np.isfinite(x)):
            raise OptionError("A calibration batch produces NaN or infinite values in a tensor "
                              "to quantize.", "Check the calibration inputs (scale, dtype, "
                              "masks); the model must produce finite values on them.")
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        self.count += x.size
        amax = max(-self.min, self.max)
        if amax <= 0.0:
            self.pos[0] += x.size  # all zeros so far
            return
        if self.limit == 0.0:
            self.limit = amax
        while self.limit < amax:
            self._grow()
        width = self.limit / self.bins
        a = np.abs(x.astype(np.float64))
        idx = np.minimum((a / width).astype(np.int64), self.bins - 1)
        neg = x < 0
        self.pos += np.bincount(idx[~neg], minlength=self.bins)
        self.neg += np.bincount(idx[neg], minlength=self.bins)

    def _grow(self) -> None:
        for h in (self.pos, self.neg):
            merged = h.reshape(-1, 2).sum(axis=1)
            h[:] = 0.0
            h[: merged.size] = merged
        self.limit *= 2.0

    @property
    def width(self) -> float:
        return self.limit / self.bins

    def magnitudes(self) -> np.ndarray:
        """Histogram of |x| over [0, R)."""
        return self.pos + self.neg

    def signed(self) -> tuple[np.ndarray, np.ndarray]:
        """(counts, bin centres) of x over [−R, R), negative bins first."""
        counts = np.concatenate([self.neg[::-1], self.pos])
        w = self.width
        centres = (np.arange(-self.bins, self.bins) + 0.5) * w
        return counts, centres


def choose_range(obs: Observer, method: str, grid: Grid, symmetric: bool,
                 percentile: float = 99.99) -> tuple[float, float]:
    """The clip range [lo, hi] ``method`` picks from what ``obs`` saw.

    minmax: the observed min and max. percentile: the range holding ``percentile`` % of the
    values (of |x| when symmetric; an equal share cut from each tail otherwise). entropy: the
    threshold minimising KL(P‖Q) between the clipped histogram P and its quantized version Q
    (TensorRT's calibrator). mse: the threshold minimising the expected squared error of
    quantize-dequantize over the histogram. Every method's clip lies within the min/max.
    """
    if obs.count == 0:
        raise OptionError("A tensor to quantize saw no values during calibration.",
                          "Give calibration batches that reach every quantized layer.")
    lo, hi = min(obs.min, 0.0), max(obs.max, 0.0)
    amax = max(-lo, hi)
    if method == "minmax" or obs.limit == 0.0:
        return (-amax, amax) if symmetric else (lo, hi)
    if symmetric:
        if method == "percentile":
            t = _percentile_threshold(obs.magnitudes(), obs.width, percentile / 100.0)
        elif method == "entropy":
            t = _entropy_threshold(obs.magnitudes(), obs.width, amax, grid.qmax + 1)
        else:
            t = _mse_threshold(obs, amax, grid)
        t = min(max(t, obs.width), amax)
        return (-t, t)
    if method == "percentile":
        counts, _ = obs.signed()
        tail = (1.0 - percentile / 100.0) / 2.0
        cdf = np.cumsum(counts) / counts.sum()
        w = obs.width
        lo_p = -obs.limit + w * float(np.searchsorted(cdf, tail, side="left"))
        hi_p = -obs.limit + w * float(np.searchsorted(cdf, 1.0 - tail, side="left") + 1)
        return (max(min(lo_p, 0.0), lo), min(max(hi_p, 0.0), hi))
    alpha = (_entropy_alpha(obs, lo, hi, grid) if method == "entropy"
             else _mse_alpha(obs, lo, hi, grid))
    return (alpha * lo, alpha * hi)


def _percentile_threshold(hist: np.ndarray, width: float, p: float) -> float:
    total = hist.sum()
    cdf = np.cumsum(hist)
    i = int(np.searchsorted(cdf, p * total, side="left"))
    i = min(i, hist.size - 1)
    below = cdf[i - 1] if i > 0 else 0.0
    frac = (p * total - below) / hist[i] if hist[i] > 0 else 1.0
    return width * (i + min(max(frac, 0.0), 1.0))


def _candidates(start: int, stop: int, most: int = 256) -> np.ndarray:
    """Up to ``most`` integers in [start, stop], always including ``stop``."""
    if stop <= start:
        return np.array([stop])
    step = max(1, (stop - start) // most)
    c = np.arange(start, stop + 1, step)
    return c if c[-1] == stop else np.append(c, stop)


def _kl(ref: np.ndarray, inside: np.ndarray, levels: int) -> float:
    """KL(P‖Q) of TensorRT's entropy calibration. P is ``ref``: the histogram inside the clip
    range with the clipped values added to its end bins. Q is the same range quantized: the
    bins of ``inside`` (the histogram without the clipped values) in ``levels`` equal groups,
    each group's mass spread evenly over its non-empty bins. Clipping too much piles mass into
    P's end bins that Q lacks; clipping too little leaves too few levels for the bulk."""
    n = ref.size
    group = (np.arange(n) * levels) // n
    nonzero = inside > 0
    mass = np.bincount(group, weights=inside, minlength=levels)
    filled = np.bincount(group, weights=nonzero.astype(np.float64), minlength=levels)
    q = np.where(nonzero, mass[group] / np.maximum(filled[group], 1.0), 0.0)
    p = ref / ref.sum()
    q = q / q.sum() if q.sum() > 0 else q
    m = p > 0
    return float(np.sum(p[m] * np.log(p[m] / np.maximum(q[m], 1e-12))))


def _entropy_threshold(hist: np.ndarray, width: float, amax: float, levels: int) -> float:
    used = min(hist.size, max(levels, math.ceil(amax / width)))
    hist = hist[:used]
    best, best_i = math.inf, used
    for i in _candidates(levels, used):
        ref = hist[:i].copy()
        ref[-1] += hist[i:].sum()
        d = _kl(ref, hist[:i], levels)
        if d < best:
            best, best_i = d, int(i)
    return best_i * width


def _entropy_alpha(obs: Observer, lo: float, hi: float, grid: Grid) -> float:
    """The α in (0, 1] whose clip range [α·lo, α·hi] minimises KL(P‖Q) on the signed
    histogram (the asymmetric form of :func:`_entropy_threshold`)."""
    counts, _ = obs.signed()
    w, nb = obs.width, obs.bins
    nneg = min(nb, math.ceil(-lo / w))  # bins below zero that hold values
    npos = min(nb, math.ceil(hi / w))
    span = nneg + npos
    best, best_a = math.inf, 1.0
    for k in _candidates(min(grid.levels, span), span):
        alpha = k / span
        a, b = nb - round(nneg * alpha), nb + round(npos * alpha)
        if b - a < 2:
            continue
        ref = counts[a:b].copy()
        ref[0] += counts[:a].sum()  # clipped values land in the end levels
        ref[-1] += counts[b:].sum()
        d = _kl(ref, counts[a:b], grid.levels)
        if d < best:
            best, best_a = d, alpha
    return best_a


def _qdq_error(centres: np.ndarray, counts: np.ndarray, scale: np.ndarray, zero: np.ndarray,
               grid: Grid) -> np.ndarray:
    """Σ counts · (c − x̂(c))² for each candidate (scale, zero) (rows) over bin centres."""
    q = np.clip(np.round(centres[None, :] / scale[:, None]) + zero[:, None], grid.qmin,
                grid.qmax)
    err = centres[None, :] - (q - zero[:, None]) * scale[:, None]
    return (err * err) @ counts


def _mse_threshold(obs: Observer, amax: float, grid: Grid) -> float:
    counts, centres = obs.signed()
    keep = counts > 0
    counts, centres = counts[keep], centres[keep]
    ts = amax * _candidates(1, 512, 512) / 512.0
    err = _qdq_error(centres, counts, ts / grid.qmax, np.zeros_like(ts), grid)
    return float(ts[int(np.argmin(err))])


def _mse_alpha(obs: Observer, lo: float, hi: float, grid: Grid) -> float:
    counts, centres = obs.signed()
    keep = counts > 0
    counts, centres = counts[keep], centres[keep]
    alphas = _candidates(1, 512, 512) / 512.0
    scale = np.maximum((hi - lo) * alphas / (grid.qmax - grid.qmin), MIN_SCALE)
    zero = np.clip(grid.qmin - np.round(alphas * lo / scale), grid.qmin, grid.qmax)
    err = _qdq_error(centres, counts, scale, zero, grid)
    return float(alphas[int(np.argmin(err))])


# -- plans -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A node to quantize. ``inputs``: the activation values it reads (FX node names / ONNX
    value names); ``weight``: its constant weight (FX get_attr target / ONNX value it reads),
    whose output channels run along ``weight_axis`` of the array the adapter returns."""

    node: str
    kind: str  # "linear" | "matmul"
    inputs: tuple[str, ...]
    weight: str | None = None
    weight_axis: int | None = None


# -- options ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """Checked options of :func:`slimc.passes.quantize`."""

    method: str
    weights: str
    activations: str
    symmetric: bool
    bits: int
    percentile: float
    ops: frozenset
    exclude: tuple[str, ...]

    @property
    def act_grid(self) -> Grid:
        return activation_grid(self.symmetric)

    def excluded(self, *names: str) -> bool:
        return any(fnmatch.fnmatchcase(n, pat) for n in names if n for pat in self.exclude)


def parse_options(*, method, weights, activations, symmetric, bits, percentile, ops,
                  exclude) -> Spec:
    def one_of(name, value, allowed):
        if value not in allowed:
            raise OptionError(f"quantize: {name}={value!r} is not supported.",
                              f"Use one of {', '.join(map(repr, allowed))}.")

    one_of("method", method, METHODS)
    one_of("weights", weights, WEIGHT_SCHEMES)
    one_of("activations", activations, ACTIVATION_MODES)
    if not isinstance(symmetric, (bool, np.bool_)):
        raise OptionError(f"quantize: symmetric={symmetric!r} must be True or False.",
                          "True: int8 with zero point 0; False: uint8 activations and int8 "
                          "weights with zero points.")
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or bits not in BITS:
        raise OptionError(f"quantize: bits={bits!r} is not supported; slimc quantizes to 8 "
                          "bits.", "Use bits=8: it is what ONNX QDQ, MatMulInteger, "
                          "PyTorch's int8 kernels and the CPU's int8 dot products compute.")
    if (isinstance(percentile, bool) or not isinstance(percentile, numbers.Real)
            or not 50.0 < float(percentile) <= 100.0):
        raise OptionError(f"quantize: percentile={percentile!r} must be a number in (50, 100].",
                          "A typical value is 99.99 (keep all but 0.01 % of the values).")
    if isinstance(ops, str):
        ops = (ops,)
    ops = frozenset(ops)
    if not ops or not ops <= set(OPS):
        raise OptionError(f"quantize: ops={sorted(ops)!r} is not supported.",
                          f"Choose among {', '.join(map(repr, OPS))}.")
    if isinstance(exclude, str):
        exclude = (exclude,)
    return Spec(method, weights, activations, bool(symmetric), int(bits), float(percentile),
                ops, tuple(exclude))


def check_batches(calib, spec: Spec) -> list[tuple]:
    """The calibration batches as tuples of numpy arrays (static activations need some)."""
    if calib is None:
        if spec.activations == "static":
            raise OptionError("quantize: activations='static' needs calibration data (calib=).",
                              "Pass calib=[(input, ...), ...] (a few batches of real inputs), "
                              "or use activations='dynamic'.")
        return []
    if isinstance(calib, np.ndarray) or not isinstance(calib, Sequence) or isinstance(calib,
                                                                                         str):
        raise OptionError("quantize: calib must be a list of input tuples, e.g. [(x,), ...].",
                          "Wrap each batch in a tuple holding one array per model input.")
    out = []
    for b in calib:
        if isinstance(b, np.ndarray) or hasattr(b, "detach"):
            b = (b,)
        if not isinstance(b, (tuple, list)):
            raise OptionError("quantize: each calib element must be a tuple of arrays, got "
                              f"{type(b).__name__}.", "Give one array per model input.")
        out.append(tuple(np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)
                         for x in b))
    if spec.activations == "static" and not out:
        raise OptionError("quantize: calib is empty.", "Give at least one calibration batch.")
    return out
