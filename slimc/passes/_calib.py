"""Calibration activations, shared by the passes that look at data (quantize, threshold_weights'
Wanda and SparseGPT, smooth_quant, the Wanda head score).

:func:`run` pushes calibration batches through a graph and hands every value asked for to a
callback: on FX by a ``torch.fx.Interpreter`` (values are node names), on ONNX by onnxruntime with
the values added as extra graph outputs (values are ONNX value names). :func:`linear_sites` says
which value is the input ``X`` of every Linear (the View's ``linear`` nodes), and
:func:`input_stats` reduces those inputs to per-feature statistics over all calibration tokens:

    tokens = number of rows of X (X reshaped to (-1, in_features))
    sq_j   = Σ_t X_tj²            (‖X_j‖₂², Wanda)
    absmax_j = max_t |X_tj|       (SmoothQuant)
    gram   = Σ_t X_tᵀ X_t         (XᵀX, the Hessian of SparseGPT up to a factor 2), on request

Statistics are accumulated in float64, batch by batch, so no activation is kept in memory.

:func:`mask_gradients` is the first-order (Taylor) importance that prune_heads and prune_ffn
share: the caller inserts masks ``m`` (ones) that scale units (heads, neurons) of an FX graph,
and it returns E_batches |∂L/∂m_u| for a loss ``L`` picked by :func:`check_loss`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import OptionError, UnsupportedError
from ..ir.graph import check_inputs


@dataclass(frozen=True)
class LinearSite:
    """A Linear as calibration sees it: the node, the value it multiplies (``x``), its weight
    (FX get_attr target / ONNX initializer) and the weight's layout ("out_in" / "in_out")."""

    node: str
    x: str
    weight: str
    layout: str
    in_features: int


class FeatureStats:
    """Per-feature statistics of one value (see the module docstring)."""

    def __init__(self, features: int, gram: bool = False):
        self.features = features
        self.tokens = 0
        self.sq = np.zeros(features, dtype=np.float64)
        self.absmax = np.zeros(features, dtype=np.float64)
        self.gram = np.zeros((features, features), dtype=np.float64) if gram else None

    def update(self, x) -> None:
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[-1] != self.features:
            raise OptionError(f"A calibration batch produced an activation of shape {x.shape} "
                              f"where {self.features} features were expected.",
                              "Give calibration batches shaped like the model's inputs.")
        x = x.reshape(-1, self.features).astype(np.float64)
        if not np.all(np.isfinite(x)):
            raise OptionError("A calibration batch produces NaN or infinite activations.",
                              "Check the calibration inputs; the model must produce finite "
                              "values on them.")
        self.tokens += x.shape[0]
        self.sq += np.einsum("ti,ti->i", x, x)
        if x.shape[0]:
            np.maximum(self.absmax, np.abs(x).max(axis=0), out=self.absmax)
        if self.gram is not None:
            self.gram += x.T @ x

    @property
    def norm(self) -> np.ndarray:
        """‖X_j‖₂ over every calibration token."""
        return np.sqrt(self.sq)


def check_batches(graph, calib, who: str) -> list[tuple[np.ndarray, ...]]:
    """``calib`` as a list of input tuples (numpy), each checked against the model's inputs
    (a bare GraphModule records none; torch checks them when it runs). ``who`` names the option
    that needs the data, for the error message."""
    if calib is None:
        raise OptionError(f"{who} needs calibration data: calib=[inputs, ...] is missing.",
                          "Pass calib= a list of a few input tuples shaped like the model's "
                          "example inputs (one array per model input).")
    if isinstance(calib, (str, bytes, np.ndarray)) or hasattr(calib, "detach"):
        calib = [calib]
    try:
        items = list(calib)
    except TypeError:
        raise OptionError(f"calib must be a list of input tuples, got {type(calib).__name__}.",
                          "Pass e.g. calib=[(ids,), (ids2,)].") from None
    if not items:
        raise OptionError(f"{who}: calib is empty.", "Pass at least one batch of inputs.")
    specs = graph.input_specs() if graph.backend == "onnx" or graph.example_inputs is not None \
        else None
    out = []
    for batch in items:
        batch = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        try:
            batch = tuple(np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)
                          for x in batch)
        except (TypeError, ValueError):
            raise OptionError("A calibration batch holds something that is not an array.",
                              "Give one numeric array per model input.") from None
        if specs is not None:
            check_inputs(specs, batch)
        out.append(batch)
    return out


def run(native, values: Iterable[str], batches: Sequence[tuple],
        visit: Callable[[str, np.ndarray], None]) -> None:
    """Run every batch through ``native`` (GraphModule or ModelProto) and call
    ``visit(value, array)`` for each value named, batch by batch."""
    values = list(dict.fromkeys(values))
    if not values:
        return
    if hasattr(native, "graph") and hasattr(native.graph, "nodes"):
        _run_fx(native, values, batches, visit)
    else:
        _run_onnx(native, values, batches, visit)


def _run_fx(gm, values: list[str], batches, visit) -> None:
    import torch
    import torch.fx

    wanted = set(values)

    class _Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in wanted and isinstance(out, torch.Tensor):
                visit(n.name, out.detach().cpu().numpy())
            return out

    rec = _Recorder(gm)
    with torch.no_grad():
        for batch in batches:
            rec.run(*[torch.as_tensor(np.ascontiguousarray(x)) for x in batch])


def _run_onnx(model, values: list[str], batches, visit) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inputs = [i.name for i in m.graph.input
              if i.name not in {t.name for t in m.graph.initializer}]
    outputs = {o.name for o in m.graph.output}
    for v in values:
        if v not in outputs and v not in inputs:
            m.graph.output.append(helper.make_tensor_value_info(v, TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    # basic optimisations only: fusions must not make the values we read disappear
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types (unknown op, bad node)
        raise UnsupportedError(f"onnxruntime cannot run this model to calibrate it: "
                               f"{' '.join(str(e).split())[:400]}",
                               "Check the model with `slimc inspect`; unsupported ops or "
                               "domains must be removed or replaced.") from e
    names = [o.name for o in sess.get_outputs()]
    for batch in batches:
        if len(batch) != len(inputs):
            raise OptionError(f"A calibration batch has {len(batch)} arrays; the model takes "
                              f"{len(inputs)} ({', '.join(inputs)}).",
                              "Give one array per model input, in order.")
        feeds = {n: np.ascontiguousarray(x) for n, x in zip(inputs, batch)}
        got = dict(zip(names, sess.run(None, feeds)))
        got.update(feeds)
        for v in values:
            visit(v, got[v])


def linear_sites(native) -> list[LinearSite]:
    """Every Linear with a constant 2-D weight, in graph order (from the backend's View)."""
    if hasattr(native, "graph") and hasattr(native.graph, "nodes"):
        from ..ir.fx import build_view
    else:
        from ..ir.onnx import build_view
    out = []
    for n in build_view(native).nodes:
        if n.op == "linear" and n.inputs:
            out.append(LinearSite(n.name, n.inputs[0], n.attrs["weight"], n.attrs["layout"],
                                  int(n.attrs["in_features"])))
    return out


def input_stats(native, sites: Sequence[LinearSite], batches: Sequence[tuple],
                gram: bool = False) -> dict[str, FeatureStats]:
    """{value: FeatureStats} of the inputs ``x`` of the Linears in ``sites`` (Linears that share
    an input share one entry), over all calibration batches."""
    stats: dict[str, FeatureStats] = {}
    for s in sites:
        stats.setdefault(s.x, FeatureStats(s.in_features, gram))
    run(native, list(stats), batches, lambda v, x: stats[v].update(x))
    return stats


# -- first-order importance through masks (torch autograd, FX graphs) ---------------------------

LOSSES = ("kl", "mse")


def check_loss(loss) -> None:
    if not (callable(loss) or loss in LOSSES):
        raise OptionError(f"Unknown loss {loss!r} for score='taylor'.",
                          "Use loss='kl' (default), 'mse', or a callable "
                          "loss(outputs, batch_index) -> scalar tensor.")


def mask_gradients(gm, masks: dict, batches: Sequence[tuple], loss="kl", probes: int = 4,
                   seed: int = 0) -> dict:
    """{key: E_batches |∂L/∂m|} for every mask tensor in ``masks`` (leaf tensors of ones that
    ``gm`` reads, requiring grad; every weight frozen).

    ``loss``: a callable ``loss(outputs, batch_index) -> scalar tensor`` (labelled data);
    ``"kl"``: KL(teacher ‖ model) over the last axis of every float output taken as logits, the
    teacher being the unmasked model itself; at m = 1 the KL and its gradient are exactly zero,
    so L is its sampled form −log q(ŷ) with ŷ drawn from the teacher; ``"mse"``: ‖∂y/∂m‖, the
    first-order size of the output change, estimated with ``probes`` Rademacher vectors v
    (E_v[(v·∂y/∂m)²] = ‖∂y/∂m‖²)."""
    check_loss(loss)
    import torch
    import torch.utils._pytree as pytree

    keys = list(masks)
    acc = {k: torch.zeros(masks[k].shape, dtype=torch.float64) for k in keys}
    gen = torch.Generator().manual_seed(seed)
    count = 0
    with torch.enable_grad():
        for i, batch in enumerate(batches):
            args = [torch.as_tensor(np.ascontiguousarray(x)) for x in batch]
            outs = [o for o in pytree.tree_leaves(gm(*args))
                    if isinstance(o, torch.Tensor) and o.is_floating_point()]
            if callable(loss):
                objectives = [loss(outs, i)]
                if not isinstance(objectives[0], torch.Tensor) or objectives[0].numel() != 1:
                    raise OptionError("loss(outputs, batch_index) must return a scalar tensor.",
                                      "Return e.g. torch.nn.functional.cross_entropy(...).")
            elif loss == "kl":
                objectives = [sum(_sampled_kl(o, gen) for o in outs)]
            else:
                objectives = [sum((torch.randint(0, 2, o.shape, generator=gen).to(o.dtype) * 2
                                   - 1).mul(o).sum() for o in outs) for _ in range(probes)]
            for j, obj in enumerate(objectives):
                grads = torch.autograd.grad(obj, [masks[k] for k in keys], allow_unused=True,
                                            retain_graph=j < len(objectives) - 1)
                for k, g in zip(keys, grads):
                    if g is not None:
                        acc[k] += g.double().abs() if loss != "mse" else g.double() ** 2
                count += 1
    scale = max(count, 1)
    return {k: (np.sqrt(a.numpy() / scale) if loss == "mse" else a.numpy() / scale)
            for k, a in acc.items()}


def _sampled_kl(logits, gen):
    """−log q(ŷ) with ŷ drawn from the (detached) teacher distribution softmax(logits)."""
    import torch
    flat = logits.reshape(-1, logits.shape[-1]) if logits.dim() > 0 else logits.reshape(1, 1)
    probs = torch.softmax(flat.detach().double(), dim=-1)
    target = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    return torch.nn.functional.cross_entropy(flat, target)


__all__ = ["FeatureStats", "LOSSES", "LinearSite", "check_batches", "check_loss",
           "input_stats", "linear_sites", "mask_gradients", "run"]
