"""``factorize_low_rank`` (alias ``low_rank``): replace a Linear's weight by two thin ones from a
truncated SVD where that saves parameters and multiply-adds."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ...errors import PassError, SlimcError, UnsupportedError
from ...ir.graph import Graph
from ..registry import Lossy, PassResult, register_pass
from . import _math


def _adapters(g: Graph):
    if g.backend == "fx":
        from ..threshold_weights.fx import weight_uses
        from . import fx as surgery
    else:
        from ..threshold_weights.onnx import weight_uses
        from . import onnx as surgery
    return weight_uses, surgery


def _check_inputs(g: Graph) -> tuple[np.ndarray, ...]:
    """Inputs to measure the deviation on. A bare ``torch.fx.GraphModule`` comes without example
    inputs; its placeholders' recorded shapes and dtypes stand in for them."""
    if g.backend == "onnx" or g.example_inputs is not None:
        return g.sample_inputs()
    rng = np.random.default_rng(0)
    out = []
    for n in g.native.graph.nodes:
        if n.op != "placeholder":
            continue
        val = n.meta.get("val")
        shape = tuple(getattr(val, "shape", None) or ())
        if val is None or not all(isinstance(d, int) for d in shape):
            raise UnsupportedError(f"Input {n.name!r} of the FX graph has no static shape "
                                   "recorded.", "Pass a slimc.Graph from slimc.capture().")
        dtype = str(val.dtype).replace("torch.", "")
        if val.dtype.is_floating_point:
            out.append(rng.standard_normal(shape).astype(dtype))
        elif dtype == "bool":
            out.append(np.ones(shape, dtype=bool))
        else:
            out.append(rng.integers(0, 2, size=shape).astype(dtype))
    return tuple(out)


def _deviation(ref: list[np.ndarray], out: list[np.ndarray]) -> dict:
    """Largest absolute output change, and the same relative to the largest reference value."""
    diff = max((float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(ref, out)
                if a.size and np.issubdtype(a.dtype, np.floating)), default=0.0)
    scale = max((float(np.max(np.abs(a))) for a in ref
                 if a.size and np.issubdtype(a.dtype, np.floating)), default=0.0)
    return {"max_abs": diff, "max_rel": diff / scale if scale else diff}


@register_pass("factorize_low_rank",
               contract=Lossy(identity={"energy": 1.0},
                              bound="relative weight error per layer = sqrt(1 - kept energy); "
                                    "the output change follows"))
def factorize_low_rank(g: Graph, /, *, rank: int | None = None, energy: float | None = None,
                       exclude: Sequence[str] = (), only_if_smaller: bool = True) -> PassResult:
    """Factorise Linear weights by truncated SVD: one p×q matmul becomes p×r then r×q.

    Math: the matrix M a Linear consumes is factorised M = U Σ Vᵀ ≈ L R with
    L = U_r Σ_r^½ (p×r) and R = Σ_r^½ V_rᵀ (r×q); the node computes x·(L R) as (x·L)·R (for
    ``linear``, which consumes Mᵀ, the mirror image). The rank is ``rank`` for every layer, or
    per layer the smallest r with Σ_{i<r} σᵢ² ≥ ``energy`` · Σ σᵢ² (energy 1 = full rank). A
    layer is rewritten only where r(p+q) < pq, i.e. where it saves parameters and FLOPs
    (``only_if_smaller=False`` rewrites every layer anyway: for testing the rewrite).

    Pre: Linear nodes of the View (FX ``linear``/``addmm``/``mm``/``matmul``, ONNX ``MatMul``
    /``Gemm``) whose floating-point weight has no other use; a weight shared with another node
    is skipped (factorising it per use would duplicate it). ``exclude``: glob patterns of weight
    names to leave alone.

    Post: each rewritten Linear reads two new weights ``<weight>_lr_in`` / ``<weight>_lr_out``
    and the old weight is gone. stats: ``layers[weight]`` = node, shape, rank, kept energy,
    relative weight error, parameters before/after; ``parameters_before`` /
    ``parameters_after`` for the whole graph; ``output_deviation`` (max_abs, max_rel) on
    ``g.sample_inputs()``; ``skipped`` with reasons.

    Numerics: at full rank the factors reproduce M to float rounding (SVD in float64), so the
    model matches within 1e-5; otherwise ‖M − L R‖_F / ‖M‖_F = sqrt(1 − kept energy).
    """
    spec = _math.parse_options(rank=rank, energy=energy, exclude=exclude,
                               only_if_smaller=only_if_smaller)
    weight_uses, surgery = _adapters(g)
    view = g.view()
    uses = weight_uses(g.native, view)
    plan, layers, skipped = [], {}, {}
    for node in view.nodes:
        if node.op != "linear":
            continue
        wname = node.attrs["weight"]
        us = uses.get(wname, [])
        if _math.excluded(wname, spec):
            skipped[wname] = "excluded by exclude="
            continue
        if len(us) != 1 or us[0].kind != "linear" or us[0].node != node.name:
            skipped[wname] = "shared by " + ", ".join(sorted({u.node for u in us}))
            continue
        m = surgery.weight_matrix(g.native, node.name)
        if not np.issubdtype(m.dtype, np.floating):
            skipped[wname] = f"not floating point ({m.dtype})"
            continue
        if not np.isfinite(m).all():  # LAPACK fails on NaN and returns garbage for inf
            raise PassError(f"factorize_low_rank: weight {wname!r} holds "
                            f"{int(np.size(m) - np.isfinite(m).sum())} non-finite value(s) "
                            "(NaN or infinite); its SVD has no meaning.",
                            "Fix the model's weights, or leave this one alone with "
                            "exclude=[...].")
        f = _math.factorize(m, spec)
        if f is None:
            skipped[wname] = "all zeros"
            continue
        p, q = m.shape
        if spec.only_if_smaller and not _math.saves(p, q, f.rank):
            skipped[wname] = (f"rank {f.rank} would not save anything: "
                              f"{f.rank}·({p}+{q}) >= {p}·{q}")
            continue
        plan.append((node.name, f))
        layers[wname] = {"node": node.name, "shape": (p, q), "rank": f.rank,
                         "energy": f.energy, "relative_error": f.relative_error,
                         "params_before": p * q, "params_after": f.rank * (p + q)}

    before = g.num_parameters()
    stats = {"layers": layers, "skipped": skipped, "parameters_before": before}
    if not plan:
        stats.update(parameters_after=before, output_deviation={"max_abs": 0.0, "max_rel": 0.0})
        return PassResult(g, False, stats)
    try:
        inputs = _check_inputs(g)
        ref = g.run(*inputs)
    except SlimcError as e:  # a model we cannot run on made-up inputs: report, do not fail
        inputs, ref = None, None
        stats["output_deviation_error"] = e.problem
    surgery.factorize(g.native, plan)
    stats["parameters_after"] = g.num_parameters()
    stats["output_deviation"] = _deviation(ref, g.run(*inputs)) if ref is not None else None
    return PassResult(g, True, stats)


low_rank = factorize_low_rank
