"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning of a Linear by optimal brain surgery
on the layer-wise reconstruction problem  min ‖W X − Ŵ X‖²  subject to the sparsity pattern.

Backend-neutral numpy on the canonical matrix C (rows = output features, columns = the input
features j that X's columns carry), float64 throughout.

With H = 2 XᵀX + λI (λ = ``damp`` · mean diag(2XᵀX); the factor 2 and the token count do not
change the result, only λ's relative size matters) and U the upper Cholesky factor of H⁻¹
(H⁻¹ = UᵀU), columns are processed left to right in blocks of ``blocksize``:

* mask selection (adaptive, per block of columns): the weights with the lowest saliency
  w²/[U]_jj² are pruned — unstructured: the block's share of the layer's count; ``block=(r, c)``:
  the r×c blocks with the lowest summed saliency; N:M: every M columns, the M−N lowest of each
  row's group, chosen when the sweep reaches the group (as in the paper);
* column j: the pruned entries are set to 0 and the error δ = (w_j − ŵ_j) / U_jj is pushed onto
  the not yet processed columns of the block (w_k −= δ · U_jk, k > j); at the end of a block the
  accumulated errors update every later column at once (lazy batch updates).

The kept entries therefore change: they absorb what the pruned ones contributed to W X on the
calibration inputs. Columns whose input was always 0 (diag H = 0) get H_jj = 1 so H stays
invertible; their weights have no effect on the calibration outputs and go first.
"""

from __future__ import annotations

import math

import numpy as np

BLOCKSIZE = 128
DAMP = 0.01


def upper_inverse_cholesky(gram: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """U upper triangular with UᵀU = (H + λI)⁻¹, H = gram (dead columns get H_jj = 1)."""
    h = np.array(gram, dtype=np.float64, copy=True)
    k = h.shape[0]
    diag = np.diag(h).copy()
    dead = diag <= 0
    h[dead, dead] = 1.0
    lam = damp * float(np.mean(np.diag(h)))
    h[np.diag_indices(k)] += lam
    # H⁻¹ from H's Cholesky factor (H = L Lᵀ ⇒ H⁻¹ = L⁻ᵀ L⁻¹), symmetric by construction
    linv = np.linalg.inv(np.linalg.cholesky(h))
    hinv = linv.T @ linv
    return np.linalg.cholesky(hinv).T


def _count(fraction: float, n: int) -> int:
    return min(n, math.floor(fraction * n + 0.5))


def _lowest(score: np.ndarray, tie: np.ndarray, k: int) -> np.ndarray:
    """Exactly ``k`` lowest entries of the flat score; ties to the smaller |w|, then position."""
    out = np.zeros(score.size, dtype=bool)
    if k > 0:
        order = np.lexsort((np.arange(score.size), tie, score))
        out[order[:k]] = True
    return out


def _nm_prune(score: np.ndarray, absw: np.ndarray, n: int, m: int) -> np.ndarray:
    """Prune-mask of one group of ``m`` columns (rows, m): the m−n lowest per row."""
    order = np.lexsort((absw, score), axis=-1)
    prune = np.zeros(score.shape, dtype=bool)
    np.put_along_axis(prune, order[:, : m - n], True, axis=-1)
    return prune


def _block_sums(a: np.ndarray, br: int, bc: int) -> np.ndarray:
    rows, k = a.shape
    return a.reshape(rows // br, br, k // bc, bc).sum(axis=(1, 3))


def prune(c: np.ndarray, gram: np.ndarray, *, sparsity: float | None = None,
          nm: tuple[int, int] | None = None, block: tuple[int, int] | None = None,
          blocksize: int = BLOCKSIZE, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """(Ĉ, keep) for the canonical matrix ``c`` (rows, K) and ``gram`` = Σ xᵀx (K, K).

    Exactly one of: ``sparsity`` (unstructured; the layer loses exactly round(s · rows · K)
    weights, spread over the column blocks), ``nm=(N, M)`` (K divisible by M), or ``block=(r, c)``
    with ``sparsity`` (the rows and K divisible by the block; exactly round(s · #blocks) blocks).
    """
    w = np.array(c, dtype=np.float64, copy=True)
    rows, k = w.shape
    u = upper_inverse_cholesky(gram, damp)
    step = nm[1] if nm else block[1] if block else 1
    bs = max(step, (blocksize // step) * step)  # a column block holds whole groups / blocks
    keep = np.ones((rows, k), dtype=bool)
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        cnt = i2 - i1
        w1 = w[:, i1:i2].copy()
        u1 = u[i1:i2, i1:i2]
        d1 = np.diag(u1)
        prune1 = np.zeros((rows, cnt), dtype=bool)
        if nm is None:
            score = w1 ** 2 / d1[None, :] ** 2
            if block is None:
                need = _count(sparsity, rows * i2) - _count(sparsity, rows * i1)
                prune1 = _lowest(score.ravel(), np.abs(w1).ravel(), need).reshape(rows, cnt)
            else:
                br, bc = block
                nr = rows // br
                need = (_count(sparsity, nr * (i2 // bc)) - _count(sparsity, nr * (i1 // bc)))
                b = _lowest(_block_sums(score, br, bc).ravel(),
                            _block_sums(np.abs(w1), br, bc).ravel(), need)
                b = b.reshape(nr, cnt // bc)
                prune1 = np.repeat(np.repeat(b, br, axis=0), bc, axis=1)
        err1 = np.zeros((rows, cnt))
        q1 = np.zeros((rows, cnt))
        for i in range(cnt):
            if nm is not None and i % nm[1] == 0:
                grp = slice(i, i + nm[1])
                score = w1[:, grp] ** 2 / d1[None, grp] ** 2
                prune1[:, grp] = _nm_prune(score, np.abs(w1[:, grp]), *nm)
            col = w1[:, i]
            q = np.where(prune1[:, i], 0.0, col)
            e = (col - q) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            q1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
        keep[:, i1:i2] = ~prune1
    return w.astype(c.dtype), keep


def relative_error(c: np.ndarray, c_new: np.ndarray, gram: np.ndarray) -> float:
    """‖(C − Ĉ) X‖² / ‖C X‖² on the calibration inputs, from the Gram matrix Σ xᵀx."""
    c = np.asarray(c, np.float64)
    d = c - np.asarray(c_new, np.float64)
    base = float(((c @ gram) * c).sum())  # tr(C H Cᵀ) by a BLAS product, not a triple loop
    return float(((d @ gram) * d).sum()) / base if base > 0 else 0.0
