"""``threshold_weights``: zero small or unimportant weights of Linear / MatMul / Gemm / Conv.

The result has the same graph and the same shapes; only weight values change. Zeros in a dense
matrix save nothing by themselves: the codegen's sparse lowering is what turns them into speed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ...errors import PassError, UnsupportedError
from ...ir.graph import Graph, check_inputs
from .. import _calib
from ..registry import Lossy, PassResult, register_pass
from . import _math, _sparsegpt


def _uses(g: Graph) -> dict[str, list[_math.Use]]:
    if g.backend == "fx":
        from .fx import weight_uses
    else:
        from .onnx import weight_uses
    return weight_uses(g.native)


def _batches(g: Graph, calib) -> list[tuple[np.ndarray, ...]]:
    """Calibration batches as tuples of arrays, checked against the model's inputs (a bare
    GraphModule records none: torch checks them when it runs)."""
    specs = g.input_specs() if g.example_inputs is not None else None
    out = []
    for batch in calib:
        batch = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        batch = tuple(np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)
                      for x in batch)
        if specs is not None:
            check_inputs(specs, batch)
        out.append(batch)
    return out


def _input_stats(g: Graph, targets, calib, spec, gram: bool) -> dict[str, np.ndarray]:
    """{weight: Σ over its Linears of ‖X_j‖₂² (or of XᵀX with ``gram``)} on ``calib``."""
    batches = _calib.check_batches(g, calib, f"importance={spec.importance!r}")
    names = {t.name for t in targets}
    sites = [s for s in _calib.linear_sites(g.native) if s.weight in names]
    stats = _calib.input_stats(g.native, sites, batches, gram=gram)
    out: dict[str, np.ndarray] = {}
    for s in sites:
        v = stats[s.x].gram if gram else stats[s.x].sq
        out[s.weight] = out[s.weight] + v if s.weight in out else v.copy()
    return out


def _importance(g: Graph, targets, weights, spec, calib, loss) -> dict[str, np.ndarray]:
    if spec.importance == "magnitude" or spec.mode == "tau":
        return {t.name: _math.magnitude_importance(weights[t.name]) for t in targets}
    if spec.importance == "wanda":
        sq = _input_stats(g, targets, calib, spec, gram=False)
        out = {}
        for t in targets:
            w = weights[t.name]
            c = _math.to_matrix(w, t.orientation)
            norm = np.sqrt(sq.get(t.name, np.zeros(c.shape[1])))
            out[t.name] = _math.from_matrix(_math.wanda_importance(c, norm), t.orientation,
                                            w.shape)
        return out
    if g.backend != "fx":
        raise UnsupportedError(
            "importance='taylor' needs gradients of the model's outputs with respect to its "
            "weights; slimc computes them with torch autograd, which an ONNX graph does not "
            "have here.",
            "Capture the torch module with slimc.capture() and threshold the FX graph, or use "
            "importance='magnitude' on the ONNX graph.")
    from .fx import taylor_importance
    return taylor_importance(g.native, [t.name for t in targets], _batches(g, calib), loss)


@register_pass("threshold_weights",
               contract=Lossy(identity={"tau": 0},
                              bound="output change grows with the fraction of weight energy "
                                    "removed; exact at tau=0 and sparsity=0"))
def threshold_weights(g: Graph, /, *, tau: float | None = None, sparsity: float | None = None,
                      scope: str | None = None, importance: str = "magnitude",
                      pattern: str | None = None, block: tuple[int, int] | None = None,
                      calib: Sequence | None = None, loss: Callable | None = None,
                      include: Sequence[str] = (),
                      exclude: Sequence[str] = ()) -> PassResult:
    """Zero weights of Linear / MatMul / Gemm / Conv by magnitude or importance.

    Math (C is a weight's canonical matrix: rows = output features, columns = the reduction
    axis; a Conv weight is reshaped to (out, in·kh·kw)):

    * ``tau``: W'ᵢⱼ = Wᵢⱼ if |Wᵢⱼ| > tau else 0 (compared as real numbers).
    * ``sparsity=s``: zero the round(s·n) least important weights, per layer
      (``scope="per_layer"``, the default) or over all thresholded weights at once
      (``scope="global"``). Importance is w² (``importance="magnitude"``) or the Taylor score
      (``importance="taylor"``).
    * ``pattern="N:M"``: in every group of M consecutive weights along the reduction axis keep
      the N most important.
    * ``block=(r, c)`` with ``sparsity=s``: zero the round(s·b) r×c blocks of C with the lowest
      summed importance (for magnitude: the lowest L2 norm), per layer or global.
    * Taylor score (FX only): I(w) = mean over ``calib`` batches of (w·∂ℓ/∂w)², with
      ℓ = ``loss(outputs, batch_index)`` if given, else ℓ = v·y with Rademacher probes v, which
      makes I(w) the Gauss-Newton estimate of the MSE to the unpruned outputs that zeroing w
      causes (the first-order term of that MSE is zero at the unpruned weights).
    * Wanda (``importance="wanda"``, Sun et al. 2023): S_ij = |C_ij|·‖X_j‖₂, X the Linear's
      input over every token of ``calib`` (summed over the Linears sharing the weight).
      Compared per output row: with ``sparsity=s`` every row loses round(s·K) weights (floor
      or ceil, so the layer loses exactly round(s·n)); ``block=`` compares the summed scores of
      the blocks of one row of blocks; ``pattern`` keeps the N highest of each group.
    * SparseGPT (``importance="sparsegpt"``, Frantar & Alistarh 2023): one-shot optimal brain
      surgery on min ‖CX − ĈX‖² with H = 2XᵀX + λI (λ = 1 % of mean diag), U = chol(H⁻¹)
      upper, columns in blocks of 128: masks chosen per block by the saliency w²/U_jj²
      (N:M: per group of M as the sweep reaches it), each pruned column's error δ = (w−ŵ)/U_jj
      pushed onto the later columns (w_k −= δ·U_jk), so the **kept weights change** too.
      See :mod:`._sparsegpt`. Both use the dense model's activations for every layer (no
      layer-by-layer propagation of the pruned inputs).

    Ties go to the smaller |w|, then to the earlier position, so the result is deterministic
    and an N:M group never keeps a zero while dropping a non-zero.

    Pre: weights to edit are floating point and finite. A weight is edited only if every use
    of it is an editable kind: the weight of a Linear (FX ``linear``/``addmm``/``mm``/
    ``matmul``, ONNX ``MatMul``/``Gemm``) or Conv, or an embedding table when
    ``include=("embedding",)``. Biases, norms and weights shared with any other op are never
    touched; ``exclude`` takes glob patterns of weight names to leave alone. For ``pattern``,
    the reduction dimension must be divisible by M; for ``block``, C's shape by the block.

    Wanda and SparseGPT edit Linear weights only (other kinds are skipped with the reason) and
    need ``calib`` (one tuple of arrays per batch, shaped like the model's inputs); they refuse
    ``scope="global"``.

    Post: same graph, same shapes; stats["layers"][weight] gives each edited weight's kind,
    shape, sparsity before and after (SparseGPT adds ``output_error``, the relative
    ‖(C−Ĉ)X‖²/‖CX‖² on ``calib``); stats["sparsity"] the overall fraction of zeros in the
    edited weights; stats["skipped"] why candidates were left alone.

    Numerics: exact at tau=0 (and sparsity=0). Otherwise a deliberate change, to be measured
    against the unpruned model.
    """
    spec = _math.parse_options(tau=tau, sparsity=sparsity, scope=scope, importance=importance,
                               pattern=pattern, block=block, calib=calib, loss=loss,
                               include=include, exclude=exclude)
    uses = _uses(g)
    weights = {name: g.get_weight(name) for name, us in uses.items()
               if any(u.kind in _math.KINDS for u in us)}
    targets, skipped = _math.select(uses, weights, spec)
    errors: dict[str, float] = {}
    if spec.importance == "sparsegpt":
        new_weights = _sparsegpt_weights(g, targets, weights, spec, calib, errors)
    else:
        importance_ = _importance(g, targets, weights, spec, calib, loss)
        keep = _math.keep_masks(targets, weights, importance_, spec)
        new_weights = {t.name: _math.apply(weights[t.name], keep[t.name]) for t in targets}

    layers, modified = {}, False
    total = zeros = 0
    for t in targets:
        w = weights[t.name]
        new = new_weights[t.name]
        before = int(w.size - np.count_nonzero(w))
        after = int(new.size - np.count_nonzero(new))
        if not np.array_equal(new, w):
            g.set_weight(t.name, new)
            modified = True
        layers[t.name] = {"kind": t.kind, "shape": tuple(w.shape), "size": int(w.size),
                          "sparsity_before": before / w.size, "sparsity": after / w.size}
        if t.name in errors:
            layers[t.name]["output_error"] = errors[t.name]
        total += w.size
        zeros += after
    stats = {"mode": spec.mode, "importance": spec.importance, "layers": layers,
             "sparsity": zeros / total if total else 0.0, "zeros": zeros, "size": total,
             "skipped": skipped}
    if spec.mode in ("sparsity", "block"):
        stats["scope"] = spec.scope
    return PassResult(g, modified, stats)


def _sparsegpt_weights(g: Graph, targets, weights, spec, calib,
                       errors: dict) -> dict[str, np.ndarray]:
    """New weights by SparseGPT; ``errors[weight]`` = its relative output error on ``calib``.
    Every check runs before any weight is computed, so a bad layer leaves nothing half done."""
    mats = {}
    for t in targets:
        w = weights[t.name]
        if not np.isfinite(w).all():
            raise PassError(f"{t.name} holds NaN or infinite values; pruning it has no "
                            "meaning.", "Fix the model's weights, or exclude it with exclude=.")
        mats[t.name] = _math.to_matrix(w, t.orientation)
        _math.check_divisible(t.name, mats[t.name], spec)
    grams = _input_stats(g, targets, calib, spec, gram=True)
    out = {}
    for t in targets:
        c = mats[t.name]
        gram = grams.get(t.name, np.zeros((c.shape[1], c.shape[1])))
        new, _ = _sparsegpt.prune(
            c, gram, sparsity=spec.sparsity, nm=(spec.n, spec.m) if spec.mode == "pattern"
            else None, block=spec.block if spec.mode == "block" else None)
        errors[t.name] = _sparsegpt.relative_error(c, new, gram)
        out[t.name] = _math.from_matrix(new, t.orientation, weights[t.name].shape)
    return out
