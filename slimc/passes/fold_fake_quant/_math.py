"""Backend-neutral arithmetic of folding fake-quant into integer compute.

For a matmul of two dequantized operands

    (s_a (A − z_a)) · (s_b (B − z_b)) = s_a s_b · Σ_k (A_k − z_a)(B_k − z_b)

the sum is computed exactly in int32 and rescaled once. Integer kernels that take only int8
(``torch._int_mm``) need int8 operands without zero points; with A' = A − o (o = 128 when A is
uint8, else 0) and w the int8 weight codes:

    Σ_k (A_k − z_a)(w_k − z_w) = A'·w + (o − z_a)·(colsum(w) − K z_w) − z_w · rowsum(A')

where the middle term is a constant per output column when z_a is static and the last one
vanishes for symmetric weights (z_w = 0). Everything is integer: exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..quantize._math import Grid

# integer types an 8-bit kernel takes: name → (qmin, qmax)
INT8_TYPES = {"int8": (-128, 127), "uint8": (0, 255)}


def grid_of(dtype: str, qmin: int | None = None, qmax: int | None = None) -> Grid | None:
    """The grid of an 8-bit quantized type (a narrower [qmin, qmax] inside it is fine: the
    codes still fit); ``None`` for other widths (int16, int4, float8, ...)."""
    if dtype not in INT8_TYPES:
        return None
    lo, hi = INT8_TYPES[dtype]
    qmin = lo if qmin is None else int(qmin)
    qmax = hi if qmax is None else int(qmax)
    if qmin < lo or qmax > hi or qmin > qmax:
        return None
    return Grid(qmin, qmax, dtype)


def combined_scale(s_a, s_b) -> np.ndarray:
    """s_a · s_b in float32 (one rounding, as the rescale after the integer matmul uses it)."""
    return (np.asarray(s_a, dtype=np.float32) * np.asarray(s_b, dtype=np.float32)).astype(
        np.float32)


@dataclass(frozen=True)
class IntWeight:
    """Weight codes laid out (K, N) for ``A' (M, K) · w (K, N)``, their zero points per column
    (or one), and the constant column term colsum(w) − K·z_w of the identity above."""

    codes: np.ndarray  # int8 (K, N)
    zero_point: np.ndarray  # int64, () or (N,)
    colsum: np.ndarray  # int64 (N,): colsum(w) − K z_w

    @property
    def symmetric(self) -> bool:
        return not np.any(self.zero_point)


def int_weight(codes_kn: np.ndarray, zero_point) -> IntWeight:
    codes = np.ascontiguousarray(codes_kn)
    z = np.asarray(zero_point, dtype=np.int64)
    k = codes.shape[0]
    colsum = codes.astype(np.int64).sum(axis=0) - k * z
    return IntWeight(codes, z, np.broadcast_to(colsum, (codes.shape[1],)).astype(np.int64))


def offset(dtype: str) -> int:
    """o: what to subtract from codes of ``dtype`` to make them int8."""
    return 128 if dtype == "uint8" else 0


def check_accumulator(k: int, a: Grid, b: Grid) -> None:
    """Refuse a reduction long enough to overflow int32 in the worst case (never for
    Transformer sizes: K < 2^31 / 255² ≈ 33 000)."""
    worst = k * (a.qmax - a.qmin) * (b.qmax - b.qmin)
    if worst >= 2 ** 31:
        from ...errors import UnsupportedError
        raise UnsupportedError(
            f"An int8 matmul reduces over K = {k}: its int32 accumulator could overflow.",
            "Split the matmul, or exclude it from quantization.")
