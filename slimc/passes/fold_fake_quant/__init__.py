"""``fold_fake_quant``: turn fake-quant graphs (quantize → dequantize around float ops) into
integer compute with int8 weights."""

from __future__ import annotations

import warnings

from ...ir.graph import Graph
from ..registry import Lossy, PassResult, register_pass


class FakeQuantLeftInFloat(UserWarning):
    """fold_fake_quant met fake-quant on an op it cannot make integer; that op stays float
    (its numerics are unchanged)."""


def recognise(g) -> dict:
    """Counts of the quantization a graph holds (QDQ pairs, fake-quant ops, integer ops), for
    an FX or ONNX graph, a ``slimc.Graph`` or a native one."""
    from ..registry import as_graph
    graph, _ = as_graph(g)
    if graph.backend == "fx":
        from .fx import recognise as rec
    else:
        from .onnx import recognise as rec
    return rec(graph.native)


def _warn(left: dict) -> None:
    if not left:
        return
    shown = "; ".join(f"{k}: {v}" for k, v in list(left.items())[:8])
    more = f" (and {len(left) - 8} more)" if len(left) > 8 else ""
    warnings.warn(f"fold_fake_quant left {len(left)} op(s) in float, their numerics unchanged: "
                  f"{shown}{more}. See stats['left_in_float'].", FakeQuantLeftInFloat,
                  stacklevel=4)


@register_pass("fold_fake_quant",
               contract=Lossy(bound="every output element within one quantization step of "
                                    "the fake-quant model it came from: the integer matmuls "
                                    "are exact, the float rescale rounds differently from "
                                    "the float matmul it replaces, and a value that lands on "
                                    "a rounding tie of a later quantizer may move one step"))
def fold_fake_quant(g: Graph, /) -> PassResult:
    """Fold fake-quant into int8 weights and integer matmuls.

    Math: (s_a (A − z_a)) · (s_b (B − z_b)) = s_a s_b · Σ (A − z_a)(B − z_b): the sum runs in
    int32 on the int8 codes (exact), then one float rescale by the constant s_a·s_b (or the
    runtime product for dynamic scales). A quantize of a constant weight is evaluated once and
    stored as int8 codes; dequantize → quantize with equal parameters is the identity.

    Pre: a fake-quant graph: ONNX QuantizeLinear/DequantizeLinear (slimc's quantize,
    onnxruntime's quantize_static QDQ), DynamicQuantizeLinear, MatMulInteger already integer
    (onnxruntime's quantize_dynamic); FX quantized_decomposed quantize/dequantize (slimc's
    quantize, PT2E) and aten.fake_quantize_per_{tensor,channel}_affine /
    fused_moving_avg_obs_fake_quant (torch.ao QAT modules, observers off). 8-bit only.

    Post: ONNX — ``MatMulInteger`` → ``Cast`` → ``Mul`` (→ ``Add`` for Gemm's C) per folded
    MatMul/Gemm; FX — ``aten._int_mm`` on int8 operands for activation × weight (zero points by
    the integer identity in ``_math``) and an int32 ``matmul`` for activation × activation,
    then ``to(float32)`` and one ``mul``; weights as int8 constants with their scales, the
    float copies gone. Fake-quant on any other op stays as it was (the op computes in float)
    and is named in a :class:`FakeQuantLeftInFloat` warning and ``stats["left_in_float"]``.
    stats: ``found`` (what :func:`recognise` counts, before), ``folded`` (node → op),
    ``weights_folded``, ``weight_bytes_int``, ``weight_bytes_float_removed``, ``cancelled``,
    ``left_in_float``.

    Numerics: each folded matmul equals its fake-quant form up to float rounding (the integer
    sum is exact; fp32 summation of the dequantized products and the single rescale round
    differently, far below one output step s_a·s_b). Downstream, a value within that rounding
    of a later quantizer's tie can land one step away. The tests check every output element
    within one quantization step of the output (see tests/test_fold_fake_quant.py); a scale
    of zero / NaN / inf or an out-of-range zero point is an error, never folded.
    """
    stats: dict = {"found": recognise(g), "folded": {}, "weights_folded": 0,
                   "weight_bytes_int": 0, "cancelled": 0, "left_in_float": {},
                   "_float_weights": set()}
    if g.backend == "fx":
        from .fx import fold
    else:
        from .onnx import fold
    fold(g.native, stats)
    stats.pop("_float_weights", None)
    _warn(stats["left_in_float"])
    modified = bool(stats["folded"] or stats["weights_folded"] or stats["cancelled"])
    return PassResult(g, modified, stats)


# ``passes.fold_fake_quant.recognise(g)``: the counts without folding anything
fold_fake_quant.recognise = recognise
