"""``quantize``: calibrate, then insert fake-quant (quantize → dequantize) on the inputs and
weights of Linear / MatMul nodes. ``fold_fake_quant`` turns the result into integer compute."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from ...errors import OptionError, PassError, UnsupportedError
from ...ir.graph import Graph, check_inputs
from .._no_match import NoMatchWarning, current_policy
from ..registry import Lossy, PassResult, register_pass
from ..smooth_quant import smooth as smooth_channels
from ..smooth_quant._math import check_mode, parse_alpha
from . import _math


def _surgery(g: Graph):
    if g.backend == "fx":
        from . import fx as surgery
    else:
        from . import onnx as surgery
    return surgery


def _smoothed_nothing(stats: dict, mode: str) -> None:
    """smooth= was asked for and found nothing to smooth: an error, or a warning under the
    on_no_match='warn' policy of a PassManager / recipe (no silent no-ops)."""
    why = "; ".join(f"{k}: {r}" for k, r in list(stats["skipped"].items())[:3]) or \
        "no LayerNorm, RMSNorm gamma or Linear feeds a Linear"
    problem = (f"quantize: smooth= found nothing to smooth (mode {mode!r}): {why}.")
    fix = ("For post-norm models (BERT: the LayerNorm output also feeds the residual Add) "
           "use smooth_mode='insert'; or drop smooth=.")
    if current_policy() == "warn":
        warnings.warn(f"{problem} {fix}", NoMatchWarning, stacklevel=4)
        stats["no_match"] = problem
        return
    raise UnsupportedError(problem, fix)


@register_pass("quantize",
               contract=Lossy(bound="each quantized tensor moves by at most half a step "
                                    "(s/2) inside its clip range and is clipped outside it; "
                                    "no setting is exact"))
def quantize(g: Graph, /, *, calib: Sequence | None = None, method: str = "minmax",
             weights: str = "per_channel", activations: str = "static",
             symmetric: bool = True, bits: int = 8, percentile: float = 99.99,
             ops: Sequence[str] = ("linear", "matmul"),
             exclude: Sequence[str] = (), smooth: float | None = None,
             smooth_mode: str = "fold") -> PassResult:
    """Insert fake-quant around the inputs and weights of Linear and MatMul nodes.

    Math: each quantized tensor x is replaced by x̂ = (q − z)·s with
    q = clamp(round(x / s) + z, qmin, qmax) (round half to even). Weights: min/max per output
    channel (``weights="per_channel"``) or per tensor. Activations, ``"static"``: one (s, z) per
    tensor from a clip range the ``method`` picks over the calibration batches ``calib`` —
    ``minmax`` (observed range), ``percentile`` (``percentile`` % of the values), ``entropy``
    (minimum KL divergence between the clipped and the quantized histograms, TensorRT's
    calibrator) or ``mse`` (minimum expected squared error); ``"dynamic"``: (s, z) computed
    from each input at run time (min/max). ``symmetric=True``: int8 with z = 0 and
    s = max|x| / 127 (weights on [-127, 127]); ``False``: uint8 activations on [0, 255] and
    int8 weights with zero points, the range widened to hold 0.

    Pre: FX ``linear``/``addmm``/``mm``/``matmul`` with a float32 2-D weight, and ``matmul``
    /``bmm`` of two activations; ONNX ``MatMul``/``Gemm`` likewise. ``ops`` picks "linear"
    (activation × weight) and/or "matmul" (activation × activation); ``exclude``: glob patterns
    of node or weight names to leave in float. ``calib``: a list of input tuples (one array per
    model input), needed for static activations. Only ``bits=8``.

    ``smooth=α`` (None: off): SmoothQuant first — per-channel factors
    s_j = max|X_j|^α / max|W_j|^(1−α) folded exactly into the producers of the Linears' inputs
    and into the Linears (see :func:`slimc.passes.smooth_quant`), computed on ``calib``; then
    calibration sees the smoothed activations. ``smooth_mode="insert"`` also smooths the
    Linears after post-norm LayerNorms (BERT) with a per-channel Mul. Needs static activations (with dynamic ones the
    per-tensor range is taken per input at run time anyway, and the paper's W8A8 is static).

    Post: FX — ``quantized_decomposed`` quantize/dequantize ops (PT2E's form; scales and zero
    points of per-channel weights as buffers beside the weight); ONNX — QuantizeLinear /
    DequantizeLinear pairs (onnxruntime's QDQ format; ``DynamicQuantizeLinear`` for dynamic
    asymmetric activations). Weights stay float; ``fold_fake_quant`` makes them int8. stats:
    ``quantized`` (node → kind, inputs, weight), ``activations`` (value → scale, zero point,
    clip range, observed range), ``weights`` (weight → scheme, scale range), ``qdq_pairs``,
    ``skipped`` (node → reason); with ``smooth``, ``smooth`` (smooth_quant's stats).

    Numerics: Lossy. Inside its clip range a tensor moves by at most s/2 per element; the
    model's outputs move by the accumulated effect, which the PassManager reports.
    """
    spec = _math.parse_options(method=method, weights=weights, activations=activations,
                               symmetric=symmetric, bits=bits, percentile=percentile, ops=ops,
                               exclude=exclude)
    batches = _math.check_batches(calib, spec)
    if smooth is not None:
        smooth = parse_alpha(smooth, "smooth")
        check_mode(smooth_mode, "smooth_mode")
        if spec.activations != "static":
            raise OptionError("quantize: smooth= (SmoothQuant) goes with static activations.",
                              "Use activations='static' with calib=, or drop smooth=.")
    if batches and (g.example_inputs is not None or g.backend == "onnx"):
        for b in batches:
            check_inputs(g.input_specs(), b)
    smooth_stats = None
    if smooth is not None:
        smooth_stats = smooth_channels(g, smooth, batches, mode=smooth_mode)
        if not smooth_stats["matched"]:
            _smoothed_nothing(smooth_stats, smooth_mode)
    surgery = _surgery(g)
    if g.backend == "onnx":
        surgery.check_opset(g.native, spec)
    targets, skipped = surgery.plan(g.native, spec)
    stats: dict = {"method": spec.method, "activations_mode": spec.activations,
                   "weights_scheme": spec.weights, "symmetric": spec.symmetric,
                   "quantized": {}, "activations": {}, "weights": {}, "skipped": skipped,
                   "qdq_pairs": 0}
    if smooth_stats is not None:
        stats["smooth"] = smooth_stats
    if not targets:
        return PassResult(g, False, stats)
    # non-finite weights would otherwise surface as NaN activations, blamed on the calibration
    bad = {t.weight: int(np.size(w) - np.isfinite(w).sum()) for t in targets
           if t.weight is not None
           for w in [surgery.weight_array(g.native, t)] if not np.isfinite(w).all()}
    if bad:
        raise PassError(f"quantize: weight(s) {', '.join(f'{k!r} ({n})' for k, n in bad.items())} "
                        "hold non-finite values (NaN or infinite); their quantization scales "
                        "would be meaningless.", "Fix the model's weights, or leave them in "
                        "float with exclude=[...].")
    values = list(dict.fromkeys(v for t in targets for v in t.inputs))
    act: dict[str, _math.QParams | None] = dict.fromkeys(values)
    if spec.activations == "static":
        observers = surgery.observe(g.native, values, batches)
        for v, obs in observers.items():
            lo, hi = _math.choose_range(obs, spec.method, spec.act_grid, spec.symmetric,
                                        spec.percentile)
            qp = _math.qparams_from_range(lo, hi, spec.act_grid, spec.symmetric)
            act[v] = qp
            stats["activations"][v] = {"scale": float(qp.scale),
                                       "zero_point": int(qp.zero_point),
                                       "clip": (float(lo), float(hi)),
                                       "observed": (float(obs.min), float(obs.max))}
    else:
        stats["activations"] = {v: {"dynamic": True} for v in values}
    wqp: dict[str, _math.QParams] = {}
    for t in targets:
        if t.weight is None or t.weight in wqp:
            continue
        w = surgery.weight_array(g.native, t)
        axis = t.weight_axis if spec.weights == "per_channel" else None
        qp = _math.weight_qparams(w, axis, spec.symmetric)
        wqp[t.weight] = qp
        err = np.abs(_math.fake_quantize(w, qp) - w).max() if w.size else 0.0
        stats["weights"][t.weight] = {"scheme": spec.weights, "axis": axis,
                                      "scale_min": float(qp.scale.min()),
                                      "scale_max": float(qp.scale.max()),
                                      "max_abs_error": float(err)}
    stats["qdq_pairs"] = surgery.insert(g.native, targets, act, wqp, spec)
    stats["quantized"] = {t.node: {"kind": t.kind, "inputs": list(t.inputs),
                                   "weight": t.weight} for t in targets}
    return PassResult(g, True, stats)
