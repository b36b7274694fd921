"""``slimc.recover``: a short knowledge-distillation fine-tune after pruning.

The pruned FX graph is the student (its parameters train), the unpruned model the teacher (any
slimc Graph, FX or ONNX, or a torch module: only its outputs are used). Loss per batch, over
every float output:

* ``"mse"`` (default): mean squared error to the teacher's output (hidden states,
  embeddings);
* ``"kl"``: KL(softmax(t/T) ‖ softmax(s/T)) · T² over the last axis (logits, Hinton et al.);
* ``"cosine"``: mean of 1 − cos(s, t) over the last axis (embeddings compared by cosine, e.g.
  L2-normalised sentence embeddings, whose squared errors are tiny whatever the angle).

With ``hidden=True`` (layer-mapped distillation, TinyBERT / MiniLM style) the student also
learns the teacher's hidden states: the output of each of its Transformer layers
(``Graph.transformer_layers()``) is matched, by mean squared error weighted ``hidden_weight``
and averaged over layers, to the output of the teacher's layer of the same name. Layer names are
module paths (``encoder.layer.3``), which pruning heads or FFN neurons and dropping other
layers keep, so a student with layers 1 and 4 dropped learns layer 2's output from the
teacher's layer 2 and so on. The teacher must then be the FX graph the student came from.

Adam, a fixed learning rate, gradient norm clipped to 1. Neither the teacher nor the graph
passed in is modified: the student is a deep copy, the result a new Graph.
"""

from __future__ import annotations

import math

import numpy as np

from ...errors import OptionError, ShapeError, UnsupportedError
from ...ir.graph import Graph, check_inputs


def _batches(student: Graph, data) -> list:
    if data is None:
        raise OptionError("recover needs data=[inputs, ...] to distil on.",
                          "Pass a list of input tuples shaped like the model's example inputs.")
    if isinstance(data, np.ndarray) or hasattr(data, "detach"):
        data = [data]
    out = []
    for batch in data:
        batch = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        batch = tuple(np.asarray(x.detach().cpu() if hasattr(x, "detach") else x) for x in batch)
        if student.example_inputs is not None:
            check_inputs(student.input_specs(), batch)
        out.append(batch)
    if not out:
        raise OptionError("recover got no data (an empty list).", "Pass at least one batch.")
    return out


def _teacher_outputs(teacher, batch) -> list:
    import torch
    import torch.utils._pytree as pytree
    if isinstance(teacher, Graph):
        return [np.asarray(o) for o in teacher.run(*batch)]
    if isinstance(teacher, torch.nn.Module):
        with torch.no_grad():
            outs = teacher(*[torch.as_tensor(np.ascontiguousarray(x)) for x in batch])
        return [o.detach().cpu().numpy() for o in pytree.tree_leaves(outs)
                if isinstance(o, torch.Tensor)]
    raise OptionError(f"teacher must be a slimc.Graph or a torch.nn.Module, got "
                      f"{type(teacher).__name__}.", "Pass the unpruned graph, e.g. "
                      "teacher=original.")


def _distill_loss(s, t, loss: str, temperature: float):
    import torch
    if loss == "mse":
        return torch.nn.functional.mse_loss(s, t)
    if loss == "cosine":
        return (1 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-12)).mean()
    log_p = torch.log_softmax(s / temperature, dim=-1)
    q = torch.softmax(t / temperature, dim=-1)
    return torch.nn.functional.kl_div(log_p.reshape(-1, s.shape[-1]), q.reshape(-1, s.shape[-1]),
                                      reduction="batchmean") * temperature ** 2


def _progress_reporter(progress, steps: int):
    """``progress`` as a function of (step, losses so far), or None."""
    if not progress:
        return None
    import sys
    import time
    every = max(1, steps // 10)
    state = {"last": 0, "t0": time.perf_counter()}

    def report(step: int, losses: list) -> None:
        if step % every and step != steps:
            return
        recent = losses[state["last"]:step]
        mean = float(np.mean(recent)) if recent else float("nan")
        state["last"] = step
        if callable(progress):
            progress(step, steps, mean)
        else:
            print(f"      recover: step {step}/{steps}, loss {mean:.4g}, "
                  f"{time.perf_counter() - state['t0']:.0f} s", file=sys.stderr, flush=True)
    return report


def _hidden_pairs(student: Graph, teacher) -> list[tuple[str, str]]:
    """(student value, teacher value) of each Transformer layer's output, matched by name."""
    if not isinstance(teacher, Graph) or teacher.backend != "fx":
        raise OptionError("recover(hidden=True) matches hidden states by layer name and needs "
                          "the teacher as the FX slimc.Graph the student was pruned from.",
                          "Pass teacher=<the captured graph>, or hidden=False.")
    theirs = {layer.name: layer.output for layer in teacher.transformer_layers()}
    pairs = [(layer.output, theirs[layer.name]) for layer in student.transformer_layers()
             if layer.name in theirs]
    if not pairs:
        raise UnsupportedError("recover(hidden=True): no Transformer layer of the student has "
                               "a namesake in the teacher (or neither has layers slimc finds).",
                               "Use hidden=False (output distillation only).")
    return pairs


def _with_hidden_outputs(gm, values: list[str]):
    """A GraphModule sharing ``gm``'s parameters that returns ``(outputs, [values...])``."""
    import torch.fx
    graph = torch.fx.Graph()
    env = {}
    out = None
    for node in gm.graph.nodes:
        if node.op == "output":
            out = node
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    by_name = {n.name: env[n] for n in env}
    graph.output((torch.fx.map_arg(out.args[0], lambda n: env[n]),
                  [by_name[v] for v in values]))
    return torch.fx.GraphModule(gm, graph)   # get_attr targets are shared, not copied


def _teacher_hidden(teacher: Graph, values: list[str], batches) -> list[list]:
    """Per batch, the teacher's arrays of ``values`` (in order)."""
    from .._calib import run
    got: dict[str, list] = {v: [] for v in values}
    run(teacher.native, values, batches, lambda v, a: got[v].append(a))
    return [[got[v][i] for v in values] for i in range(len(batches))]


def recover(pruned, /, *, teacher, data, steps: int = 100, lr: float = 1e-4,
            loss: str = "mse", temperature: float = 1.0, freeze=(), seed: int = 0,
            hidden: bool = False, hidden_weight: float = 1.0, progress=False) -> Graph:
    """Fine-tune ``pruned`` (an FX :class:`slimc.Graph` or ``torch.fx.GraphModule``) to match
    ``teacher``'s outputs on ``data`` for ``steps`` Adam steps (cycling through the batches).
    Parameters whose name contains one of the ``freeze`` strings (e.g. ``("embeddings",)``)
    stay as they are.

    ``hidden=True``: also match each Transformer layer's output to the teacher's layer of the
    same name (see the module docstring), weighted ``hidden_weight``.

    ``progress``: True prints the step, the mean loss of the last tenth and the time to stderr
    ten times in a run; a callable gets ``(step, steps, mean loss of the steps since its last
    call)`` instead.

    Returns a new Graph (``history`` gains ``"recover"``; ``last_stats`` holds the first and last
    distillation loss and the per-step losses, and with ``hidden`` the layers matched). Raises :class:`~slimc.errors.UnsupportedError`
    for ONNX students (there is nothing to train them with here), ``OptionError`` for bad
    settings, ``ShapeError`` for data or teacher outputs that do not match the student.
    """
    import torch
    import torch.utils._pytree as pytree

    from ..registry import as_graph
    student_in, unwrap = as_graph(pruned)
    if student_in.backend != "fx":
        raise UnsupportedError(
            "recover fine-tunes a torch graph; this graph is ONNX.",
            "Capture the torch module with slimc.capture(), prune the FX graph, recover it, "
            "then export it with graph.save('model.onnx').")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise OptionError(f"steps must be a non-negative integer, got {steps!r}.",
                          "Pass e.g. steps=200.")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0 \
            or not math.isfinite(lr):
        raise OptionError(f"lr must be a positive number, got {lr!r}.", "Pass e.g. lr=1e-4.")
    if loss not in ("mse", "kl", "cosine"):
        raise OptionError(f"Unknown distillation loss {loss!r}.",
                          "Use loss='mse' (hidden states), 'kl' (logits) or 'cosine' "
                          "(embeddings).")
    if not temperature > 0:
        raise OptionError(f"temperature must be positive, got {temperature!r}.",
                          "Pass e.g. temperature=2.0.")
    if not isinstance(hidden_weight, (int, float)) or isinstance(hidden_weight, bool) \
            or not hidden_weight >= 0 or not math.isfinite(hidden_weight):
        raise OptionError(f"hidden_weight must be a number >= 0, got {hidden_weight!r}.",
                          "Pass e.g. hidden_weight=1.0.")
    batches = _batches(student_in, data)
    targets = [[torch.as_tensor(np.ascontiguousarray(t)) for t in _teacher_outputs(teacher, b)]
               for b in batches]
    result = student_in.copy()
    gm = result.native
    pairs = _hidden_pairs(result, teacher) if hidden else []
    if pairs:
        hidden_targets = [[torch.as_tensor(np.ascontiguousarray(a)) for a in per_batch]
                          for per_batch in _teacher_hidden(teacher, [t for _, t in pairs],
                                                           batches)]
        forward = _with_hidden_outputs(gm, [s for s, _ in pairs])
    else:
        forward = gm
    if isinstance(freeze, str):
        freeze = (freeze,)
    params = [p for name, p in gm.named_parameters()
              if p.is_floating_point() and not any(f in name for f in freeze)]
    if not params:
        raise OptionError(f"freeze={tuple(freeze)!r} leaves no parameter to train.",
                          "Freeze fewer parameters.")
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=float(lr))
    torch.manual_seed(seed)
    losses = []
    report = _progress_reporter(progress, int(steps))
    with torch.enable_grad():
        for step in range(int(steps)):
            i = step % len(batches)
            args = [torch.as_tensor(np.ascontiguousarray(x)) for x in batches[i]]
            result_i = forward(*args)
            states = []
            if pairs:
                result_i, states = result_i
            outs = [o for o in pytree.tree_leaves(result_i) if isinstance(o, torch.Tensor)]
            floats = [(s, t) for s, t in zip(outs, targets[i]) if s.is_floating_point()]
            if len(outs) != len(targets[i]) or any(s.shape != t.shape for s, t in floats):
                raise ShapeError(
                    f"The teacher's outputs {[tuple(t.shape) for t in targets[i]]} do not match "
                    f"the student's {[tuple(o.shape) for o in outs]}.",
                    "Pass the unpruned version of the same model as teacher=.")
            value = sum(_distill_loss(s, t.to(s.dtype), loss, temperature) for s, t in floats)
            if states:
                value = value + hidden_weight * sum(
                    torch.nn.functional.mse_loss(s, t.to(s.dtype))
                    for s, t in zip(states, hidden_targets[i])) / len(states)
            opt.zero_grad()
            value.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(value.detach()))
            if report is not None:
                report(step + 1, losses)
    for p in params:
        p.requires_grad_(False)
    result.history = list(student_in.history) + ["recover"]
    result.last_stats = {"steps": int(steps), "loss_first": losses[0] if losses else None,
                         "loss_last": losses[-1] if losses else None, "losses": losses,
                         "hidden_layers": len(pairs)}
    return unwrap(result)


__all__ = ["recover"]
