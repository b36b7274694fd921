"""Which model inputs are indices, and the values they may take.

TVM lowers gathers (``take`` in "fast" mode — what both frontends emit for embeddings and ONNX
``Gather`` —, ``gather_elements``, ``gather_nd``, the scatters) to plain loads with no bounds
check: an out-of-range token id reads outside the table and kills the process (TVM warns
"Fast mode segfaults when there are out-of-bounds indices" at every compile). onnxruntime and
torch raise instead.

:func:`index_ranges` follows each gather's index argument back through value-preserving
operators (casts, reshapes, broadcasts, slices) to the function parameter it comes from and
records the range of values the model defines for it: ``[0, n-1]`` for a table of ``n`` rows,
``[-n, n-1]`` where the graph wraps negative indices first (ONNX ``Gather``: the frontend emits
``where(x < 0, x + n, x)``), shifted by a constant added on the way (``ids + 2``). An input
feeding several gathers takes the intersection. The
runtime checks the inputs against these ranges before every call (``slimc.runtime``): a numpy
min/max over the ids costs microseconds (``bench/serving.py``), and a check inside the library
would need ``relax.assert_op``, which lives in TVM's compiler library, not in the runtime a
deployment has.

A gather whose indices are computed inside the model from an input (arithmetic, a cumulative
sum) cannot be checked this way; they are returned as ``unchecked`` and
:func:`guard_computed_indices` switches them to TVM's "clip" mode, so a value out of range
reads the nearest row instead of memory outside the table.
"""

from __future__ import annotations

import tvm
from tvm import relax

# index operators TVM lowers without a bounds check, and which argument holds the indices
_GATHERS = {"relax.take": 1, "relax.gather_elements": 1, "relax.gather_nd": 1,
            "relax.scatter_elements": 1, "relax.scatter_nd": 1}
# operators whose output holds only values of their first argument
_KEEP_VALUES = {"relax.astype", "relax.reshape", "relax.expand_dims", "relax.squeeze",
                "relax.permute_dims", "relax.broadcast_to", "relax.flatten",
                "relax.strided_slice", "relax.dynamic_strided_slice"}


def _op(expr) -> str | None:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def _scalar(expr, values: dict):
    """The Python value of a constant scalar, or None."""
    expr = values.get(expr, expr)
    if isinstance(expr, tvm.ir.expr.Constant) and expr.value.numpy().size == 1:
        return expr.value.numpy().item()
    return None


def _static(dim) -> int | None:
    return int(dim.value) if isinstance(dim, tvm.tirx.IntImm) else None


def _extent(call, values: dict) -> int | None:
    """Rows the gather may address: the data's size along the gathered axis (gather_nd: its
    first axis), or None where it is not static."""
    data = call.args[0]
    ty = getattr(data, "ty", None) or getattr(data, "struct_info", None)
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    dims = list(shape.values)
    if _op(call) == "relax.gather_nd":
        batch = int(getattr(call.attrs, "batch_dims", 0) or 0)
        return _static(dims[batch]) if batch < len(dims) else None
    if _op(call) == "relax.scatter_nd":
        return _static(dims[0]) if dims else None
    axis = getattr(call.attrs, "axis", 0)
    axis = 0 if axis is None else int(axis)
    return _static(dims[axis]) if -len(dims) <= axis < len(dims) else None


def _unwrap_negative(expr, values: dict):
    """``where(x < 0, x + n, x)`` (how ONNX ``Gather`` wraps negative indices) → x, else None."""
    call = values.get(expr)
    if _op(call) != "relax.where":
        return None
    cond, wrapped = (values.get(a, a) for a in call.args[:2])
    x = call.args[2]
    if _op(cond) != "relax.less" or cond.args[0] != x or _scalar(cond.args[1], values) != 0:
        return None
    if _op(wrapped) != "relax.add" or x not in wrapped.args:
        return None
    return x


def _reads_values(expr, values: dict, params: set, memo: dict) -> bool:
    """Whether ``expr`` depends on the *values* of a parameter (``shape_of`` reads only a
    shape, fixed at compile time or bounded by the input's own size)."""
    if expr in memo:
        return memo[expr]
    memo[expr] = False  # a DAG, but guard against revisits
    if expr in params:
        memo[expr] = True
    elif expr in values:
        memo[expr] = _reads_values(values[expr], values, params, memo)
    elif isinstance(expr, relax.Call):
        memo[expr] = _op(expr) != "relax.shape_of" and any(
            _reads_values(a, values, params, memo) for a in expr.args)
    elif isinstance(expr, relax.Tuple):
        memo[expr] = any(_reads_values(f, values, params, memo) for f in expr.fields)
    elif isinstance(expr, relax.TupleGetItem):
        memo[expr] = _reads_values(expr.tuple_value, values, params, memo)
    return memo[expr]


def _shift(call, values: dict):
    """``x + c`` / ``c + x`` / ``x - c`` with a constant scalar c → (x, offset), else None."""
    op = _op(call)
    if op not in ("relax.add", "relax.subtract"):
        return None
    a, b = call.args
    for x, c, sign in ((a, b, 1), (b, a, 1)) if op == "relax.add" else ((a, b, -1),):
        value = _scalar(c, values)
        if isinstance(value, int) and not isinstance(value, bool):
            return x, sign * value
    return None


def _source(expr, values: dict, params: set, memo: dict):
    """Where the index values in ``expr`` come from: ``("const", ...)`` (constants and
    shapes), ``(parameter, negatives wrapped, offset)`` when every index is one of that
    parameter's values plus ``offset``, or None when they are computed otherwise."""
    if not _reads_values(expr, values, params, memo):
        return "const", False, 0
    wrapped, offset = False, 0
    for _ in range(64):
        if expr in params:
            return expr, wrapped, offset
        inner = _unwrap_negative(expr, values)
        if inner is not None and offset == 0:
            expr, wrapped = inner, True
            continue
        call = values.get(expr)
        if _op(call) in _KEEP_VALUES:
            expr = call.args[0]
            continue
        shifted = _shift(call, values)
        if shifted is not None:
            expr, offset = shifted[0], offset + shifted[1]
            continue
        return None
    return None


def _bindings(func):
    for block in func.body.blocks:
        yield from block.bindings


def index_ranges(mod: tvm.IRModule, names: list[str]) -> tuple[dict, list[str]]:
    """({input name: [lo, hi]}, [unchecked gathers]) for ``mod["main"]``.

    ``names``: the model's input names, in parameter order. An index input's every value must
    lie in ``[lo, hi]``. ``unchecked`` describes gathers whose indices are computed inside the
    model (neither an input's values nor constants).
    """
    func = mod["main"]
    params = list(func.params)
    by_param = dict(zip(params, names))
    values = {b.var: b.value for b in _bindings(func) if isinstance(b, relax.VarBinding)}
    ranges: dict[str, list[int]] = {}
    unchecked: list[str] = []
    memo: dict = {}
    for var, call in values.items():
        op = _op(call)
        if op not in _GATHERS or (op == "relax.take"
                                  and getattr(call.attrs, "mode", "fast") != "fast"):
            continue
        found = _source(call.args[_GATHERS[op]], values, set(params), memo)
        extent = _extent(call, values)
        if found is not None and found[0] == "const":
            continue
        if found is None or extent is None:
            unchecked.append(f"{op.split('.')[1]} -> {var.name}")
            continue
        param, wrapped, offset = found
        lo, hi = (-extent if wrapped else 0) - offset, extent - 1 - offset
        name = by_param[param]
        old = ranges.get(name)
        ranges[name] = [lo, hi] if old is None else [max(old[0], lo), min(old[1], hi)]
    return ranges, unchecked


@relax.expr_functor.mutator
class _ClipTakes(relax.PyExprMutator):
    def __init__(self, mod, targets: set):
        super().__init__(mod)
        self.targets = targets

    def visit_var_binding_(self, binding):
        if binding.var.name in self.targets and _op(binding.value) == "relax.take":
            call = binding.value
            new = self.builder_.normalize(relax.op.take(
                self.visit_expr(call.args[0]), self.visit_expr(call.args[1]),
                axis=call.attrs.axis, mode="clip"))
            self.builder_.emit_normalized(relax.VarBinding(binding.var, new))
            return
        super().visit_var_binding_(binding)


def guard_computed_indices(mod: tvm.IRModule, unchecked: list[str]) -> tvm.IRModule:
    """``mod`` with every unchecked ``take`` in "clip" mode (reads stay inside the table)."""
    targets = {u.split(" -> ")[1] for u in unchecked if u.startswith("take ")}
    if not targets:
        return mod
    mutator = _ClipTakes(mod, targets)
    func = mutator.visit_expr(mod["main"])
    new = mod.shallow_copy() if hasattr(mod, "shallow_copy") else tvm.IRModule(dict(mod.functions))
    new["main"] = func
    return new
