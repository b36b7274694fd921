"""Relax-side help for the fused graphs ``passes.fuse`` writes: what TVM needs to turn them into
fewer kernels. Every TVM import of the fusion work stays here (STYLE: TVM's churn in codegen/).

``split_to_slices``: ``merge_qkv`` leaves one projection followed by ``split``. Relax's ``split``
returns a tuple, and FuseOps never fuses a tuple-producing op into its readers: the split becomes a
kernel of its own that copies the projection's output once more. Each ``split(x)[i]`` is
``strided_slice(x, begin_i, end_i)`` (same elements, same order), an injective op that FuseOps
fuses into whatever reads it (the heads' reshape/transpose): one kernel less per split, no copy.

``fusion_hook(schedules)``: a ``slimc.compile(..., tune=...)`` hook running ``split_to_slices``
before another hook (``apply_default_schedules``, a tuning database's).

``kernel_launches(mod, target)``: the kernels an imported module becomes — TVM's legalization and
default fusion (as :func:`slimc.codegen.schedules.legalize`), then ``RewriteDataflowReshape`` as
``tvm.compile``'s pipeline does (a reshape alone is a view, not a kernel) — counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import tvm
from tvm import relax


@relax.expr_functor.mutator
class _SplitToSlices(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod_ = mod
        self.rewritten = 0

    def transform(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()

    def visit_tuple_getitem_(self, op: relax.TupleGetItem) -> relax.Expr:
        tup = op.tuple_value
        bound = self.lookup_binding(tup) if isinstance(tup, relax.Var) else None
        bounds = _split_bounds(bound)
        if bounds is None:
            return super().visit_tuple_getitem_(op)
        axis, edges = bounds
        i = int(op.index)
        self.rewritten += 1
        return relax.op.strided_slice(self.visit_expr(bound.args[0]), axes=[axis],
                                      begin=[edges[i]], end=[edges[i + 1]])


def _split_bounds(call) -> tuple[int, list[int]] | None:
    """(axis, [0, e1, ..., n]) of a ``relax.split`` call over a static axis, else None."""
    if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)
            and call.op.name == "relax.split"):
        return None
    ty = call.args[0].ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    shape = ty.shape.values
    axis = int(call.attrs.axis) % len(shape)
    if not isinstance(shape[axis], tvm.tirx.IntImm):
        return None
    n = int(shape[axis])
    ios = call.attrs.indices_or_sections
    if isinstance(ios, (int, tvm.tirx.IntImm)):
        k = int(ios)
        size = -(-n // k)
        edges = [min(i * size, n) for i in range(k)] + [n]
    else:
        edges = [0] + [int(i) for i in ios] + [n]
    return axis, edges


def split_to_slices(mod: tvm.IRModule) -> tvm.IRModule:
    """Every ``split(x)[i]`` of a static axis → ``strided_slice(x)``; the splits left unread are
    removed. Exact: the same elements in the same order."""
    mod = _SplitToSlices(mod).transform()
    return relax.transform.DeadCodeElimination()(mod)


def fusion_hook(then: Callable | None = None) -> Callable:
    """A ``tune=`` hook for :func:`slimc.compile`: :func:`split_to_slices`, then ``then`` (e.g.
    ``apply_default_schedules``) if given."""

    def hook(mod: tvm.IRModule, target) -> tvm.IRModule:
        mod = split_to_slices(mod)
        return then(mod, target) if then is not None else mod

    hook.__qualname__ = f"fusion_hook({getattr(then, '__qualname__', then)})"
    return hook


def kernel_launches(mod: tvm.IRModule, target) -> tuple[int, Counter]:
    """(distinct PrimFuncs, ``call_tir`` launches of ``main`` by kernel name, digits dropped) of
    an imported module once legalized and fused for ``target``, ``split_to_slices`` applied."""
    from .schedules import legalize
    low = legalize(split_to_slices(mod), target)
    low = relax.transform.RewriteDataflowReshape()(low)
    low = relax.transform.DeadCodeElimination()(low)
    funcs = sum(isinstance(f, tvm.tirx.PrimFunc) for _, f in low.functions_items())
    calls: Counter = Counter()

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) \
                and e.op.name == "relax.call_tir":
            calls[e.args[0].name_hint.rstrip("0123456789_")] += 1

    relax.analysis.post_order_visit(low["main"], visit)
    return funcs, calls
