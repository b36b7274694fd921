"""``threshold_weights``: zero small or unimportant weights of Linear / MatMul / Gemm / Conv.

The result has the same graph and the same shapes; only weight values change. Zeros in a dense
matrix save nothing by themselves: the codegen's sparse lowering is what turns them into speed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ...errors import UnsupportedError
from ...ir.graph import Graph, check_inputs
from ..registry import Lossy, PassResult, register_pass
from . import _math


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


def _importance(g: Graph, targets, weights, spec, calib, loss) -> dict[str, np.ndarray]:
    if spec.importance == "magnitude" or spec.mode == "tau":
        return {t.name: _math.magnitude_importance(weights[t.name]) for t in targets}
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

    Ties go to the smaller |w|, then to the earlier position, so the result is deterministic
    and an N:M group never keeps a zero while dropping a non-zero.

    Pre: weights to edit are floating point and finite. A weight is edited only if every use
    of it is an editable kind: the weight of a Linear (FX ``linear``/``addmm``/``mm``/
    ``matmul``, ONNX ``MatMul``/``Gemm``) or Conv, or an embedding table when
    ``include=("embedding",)``. Biases, norms and weights shared with any other op are never
    touched; ``exclude`` takes glob patterns of weight names to leave alone. For ``pattern``,
    the reduction dimension must be divisible by M; for ``block``, C's shape by the block.

    Post: same graph, same shapes; stats["layers"][weight] gives each edited weight's kind,
    shape, sparsity before and after; stats["sparsity"] the overall fraction of zeros in the
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
    importance_ = _importance(g, targets, weights, spec, calib, loss)
    keep = _math.keep_masks(targets, weights, importance_, spec)

    layers, modified = {}, False
    total = zeros = 0
    for t in targets:
        w = weights[t.name]
        new = _math.apply(w, keep[t.name])
        before = int(w.size - np.count_nonzero(w))
        after = int(new.size - np.count_nonzero(new))
        if not np.array_equal(new, w):
            g.set_weight(t.name, new)
            modified = True
        layers[t.name] = {"kind": t.kind, "shape": tuple(w.shape), "size": int(w.size),
                          "sparsity_before": before / w.size, "sparsity": after / w.size}
        total += w.size
        zeros += after
    stats = {"mode": spec.mode, "importance": spec.importance, "layers": layers,
             "sparsity": zeros / total if total else 0.0, "zeros": zeros, "size": total,
             "skipped": skipped}
    if spec.mode in ("sparsity", "block"):
        stats["scope"] = spec.scope
    return PassResult(g, modified, stats)
