"""Vectorizable transcendental functions for CPU builds.

TVM lowers ``erf``, ``exp``, ``tanh`` and ``sigmoid`` on CPU to calls of the C library's scalar
``erff``/``expf``/``tanhf``: a loop that calls them cannot be vectorized, and BERT-base's GELU
alone then costs ~11 ms a layer here. TOPI has polynomial versions built from multiplies, adds
and bit operations (``fast_erf``: Eigen's rational approximation on [-4, 4]; ``fast_exp``: range
reduction to 2^n · p(r), clamped to ±88.38; ``fast_tanh``: a rational approximation on [-9, 9]),
which LLVM vectorizes. :func:`legalize_map` substitutes them when Relax operators are legalized:

``nn.gelu``      ``x · (0.5 + 0.5 · fast_erf(x/√2))``
``nn.gelu_tanh`` ``0.5 · x · (1 + fast_tanh(√(2/π) · (x + 0.044715 x³)))``
``erf``, ``exp``, ``tanh``  their fast versions
``sigmoid``      ``1 / (1 + fast_exp(-x))``; ``nn.silu`` ``x · sigmoid(x)``
``nn.softmax``   TOPI's ``fast_softmax`` (max-subtracted, ``fast_exp``)

float32 only; other dtypes keep TVM's own legalization.

Numerics (measured on 200,001-point grids against float64; ``tests/test_tune.py`` re-measures
them): fast_erf absolute error 3.3e-7 on [-6, 6] (libm erff: 4.9e-8); fast_exp relative error
3.1e-7 on [-87, 88] (libm: 6.0e-8); fast_tanh absolute error 2.7e-7 on [-12, 12] (libm: 8.9e-8).
All far below the 1e-4 a compiled model is held to.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import tvm
from tvm import relax, te, tirx, topi

_F32 = "float32"


def _default(op_name: str) -> Callable:
    return tvm.ir.Op.get(op_name).get_attr("FLegalize")


def _float32_only(op_name: str, fast: Callable) -> Callable:
    """A legalization that uses ``fast`` for float32 and TVM's own otherwise."""
    default = _default(op_name)

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        ty = call.args[0].ty
        if getattr(ty, "dtype", None) != _F32:
            return default(bb, call)
        return fast(bb, call)

    return legalize


def _gelu(x: te.Tensor) -> te.Tensor:
    half = tirx.const(0.5, _F32)
    e = topi.fast_erf(topi.multiply(x, tirx.const(math.sqrt(0.5), _F32)))
    return te.compute(x.shape, lambda *i: x(*i) * (half + half * e(*i)), name="gelu")


def _gelu_tanh(x: te.Tensor) -> te.Tensor:
    c = tirx.const(math.sqrt(2.0 / math.pi), _F32)
    a = tirx.const(0.044715, _F32)
    inner = te.compute(x.shape, lambda *i: c * (x(*i) + a * x(*i) * x(*i) * x(*i)), name="inner")
    t = topi.fast_tanh(inner)
    half = tirx.const(0.5, _F32)
    return te.compute(x.shape, lambda *i: half * x(*i) * (tirx.const(1.0, _F32) + t(*i)),
                      name="gelu_tanh")


def _sigmoid(x: te.Tensor) -> te.Tensor:
    e = topi.fast_exp(topi.negative(x))
    one = tirx.const(1.0, _F32)
    return te.compute(x.shape, lambda *i: one / (one + e(*i)), name="sigmoid")


def _silu(x: te.Tensor) -> te.Tensor:
    s = _sigmoid(x)
    return te.compute(x.shape, lambda *i: x(*i) * s(*i), name="silu")


def _unary(fn: Callable, hint: str) -> Callable:
    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        return bb.call_te(fn, call.args[0], primfunc_name_hint=hint)
    return legalize


def _softmax(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    return bb.call_te(topi.nn.fast_softmax, call.args[0], int(call.attrs.axis),
                      primfunc_name_hint="softmax")


def legalize_map() -> dict[str, Callable]:
    """``{relax op name: legalization}`` for ``relax.transform.LegalizeOps(customize_legalize_map=
    ...)``: the operators above become vectorizable polynomial code."""
    fast = {
        "relax.nn.gelu": _unary(_gelu, "gelu"),
        "relax.nn.gelu_tanh": _unary(_gelu_tanh, "gelu_tanh"),
        "relax.erf": _unary(topi.fast_erf, "erf"),
        "relax.exp": _unary(topi.fast_exp, "exp"),
        "relax.tanh": _unary(topi.fast_tanh, "tanh"),
        "relax.sigmoid": _unary(_sigmoid, "sigmoid"),
        "relax.nn.silu": _unary(_silu, "silu"),
        "relax.nn.softmax": _softmax,
    }
    return {name: _float32_only(name, fn) for name, fn in fast.items()}


def fast_math(mod: tvm.IRModule) -> tvm.IRModule:
    """Legalize ``mod``'s Relax operators with the fast transcendental functions (the rest as TVM
    does). A Relax → Relax pass; run it where ``LegalizeOps`` would run."""
    return relax.transform.LegalizeOps(customize_legalize_map=legalize_map())(mod)
