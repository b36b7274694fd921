"""``PassManager``: run passes in order, check each result against its numerics contract, report.

A pass is a registered pass name (``"cleanup"``), a name with options (``("cleanup", {...})``),
a registered pass function (``passes.cleanup``), or any callable ``fn(g) -> PassResult | graph |
None`` (torch.fx style), optionally with options (``(fn, {...})``). A plain callable gets a private
copy of the graph, of the kind given to :meth:`PassManager.run`; it may edit it in place and
return None. Its contract is ``fn.contract`` if it has one, else none: its deviation is reported,
never checked.

The check runs on each pass's *result*: its outputs on the check inputs are compared with the
outputs of the graph the pass was given. An ``Exact(rtol, atol)`` pass must keep every output
element within ``atol + rtol * |reference|``; a ``Lossy`` pass is held to that too when its
options are its identity setting, and otherwise only reported.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OptionError, PassError, SlimcError
from . import _no_match
from .registry import Exact, Instrument, Lossy, PassResult, as_graph, get_pass, global_instruments

# ---------------------------------------------------------------------------------------------
# instruments


def verify(graph) -> None:
    """Check that ``graph`` is well formed: ``onnx.checker`` for ONNX; for FX ``graph.lint()``
    and that the module's code was regenerated after the last graph edit (``recompile``)."""
    if graph.backend == "onnx":
        import onnx
        from ..ir.onnx import serialized_size
        model = graph.native
        # the checker serializes, and protobuf caps a message at 2 GiB (ByteSize() itself
        # refuses such a model): larger ones are checked by onnx's path-based checker only when
        # saved, not here
        if serialized_size(model) < 1_800_000_000:
            onnx.checker.check_model(model)
        return
    gm = graph.native
    gm.graph.lint()
    if gm.code != gm.graph.python_code("self").src:
        raise ValueError("the module's code is stale: the graph was edited without "
                         "gm.recompile()")


class Verify(Instrument):
    """After each pass, :func:`verify` the result; a malformed graph raises :class:`PassError`
    naming the pass (TVM's well-formedness instrument)."""

    def after(self, name: str, graph, result: PassResult) -> None:
        try:
            verify(graph)
        except Exception as e:
            raise PassError(f"Pass {name} produced a malformed {graph.backend.upper()} graph: "
                            f"{str(e).strip().splitlines()[0][:400]}",
                            "This is a bug in the pass; run it alone with the same graph to "
                            "reproduce it.") from e


class Dump(Instrument):
    """After each pass, write the graph to ``folder``: ``NN_name.onnx`` (ONNX) or ``NN_name.py``
    (the FX module's code; cheap, where re-exporting a .pt2 is not)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.count = 0

    def after(self, name: str, graph, result: PassResult) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count += 1
        stem = f"{self.count:02d}_{name}"
        if graph.backend == "onnx":
            (self.folder / f"{stem}.onnx").write_bytes(graph.native.SerializeToString())
        else:
            (self.folder / f"{stem}.py").write_text(graph.native.code)


# ---------------------------------------------------------------------------------------------
# report


@dataclass
class PassRow:
    """One pass in a :class:`Report`. ``max_abs`` / ``cosine`` compare the pass's result with the
    graph it was given (what its contract is about); ``max_abs_total`` / ``cosine_total`` compare
    it with the graph the manager started from. All four are None without check inputs."""

    name: str
    contract: str
    modified: bool
    parameters: int
    nonzeros: int
    bytes: int
    max_abs: float | None
    cosine: float | None
    seconds: float
    stats: dict = field(default_factory=dict)
    checked: bool = False  # whether the contract was enforced on this pass
    max_abs_total: float | None = None
    cosine_total: float | None = None


@dataclass
class Report:
    """What a :meth:`PassManager.run` did: ``baseline`` (the input's parameters, nonzeros, bytes)
    and one :class:`PassRow` per pass, in order."""

    baseline: dict
    rows: list[PassRow]

    def __getitem__(self, key: int | str) -> PassRow:
        if isinstance(key, str):
            for row in self.rows:
                if row.name == key:
                    return row
            raise KeyError(key)
        return self.rows[key]

    def __len__(self) -> int:
        return len(self.rows)

    def to_dict(self) -> dict:
        """JSON-able: plain types only; a non-finite deviation becomes "inf" / "nan"."""
        return {"baseline": _jsonable(self.baseline),
                "passes": [_jsonable(asdict(r)) for r in self.rows]}

    def table(self) -> str:
        head = ("pass", "contract", "modified", "parameters", "nonzeros", "bytes", "max_abs",
                "cosine", "seconds")
        lines = [("(input)", "", "", f"{self.baseline['parameters']:,}",
                  f"{self.baseline['nonzeros']:,}", f"{self.baseline['bytes']:,}", "", "", "")]
        for r in self.rows:
            lines.append((r.name, r.contract + (" *" if r.checked else ""),
                          "yes" if r.modified else "no", f"{r.parameters:,}", f"{r.nonzeros:,}",
                          f"{r.bytes:,}", _fmt(r.max_abs, ".2e"), _fmt(r.cosine, ".6f"),
                          f"{r.seconds:.3f}"))
        widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]

        def fmt(row):  # names and flags left-aligned, figures right-aligned
            return "  ".join(str(x).ljust(w) if i < 3 else str(x).rjust(w)
                             for i, (x, w) in enumerate(zip(row, widths))).rstrip()

        out = [fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(row) for row in lines]
        if any(r.checked for r in self.rows):
            out.append("* contract checked on the check inputs")
        return "\n".join(out)

    __str__ = table


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else str(x)
    if x is None or isinstance(x, str):
        return x
    return str(x)


# ---------------------------------------------------------------------------------------------
# numerics


@dataclass(frozen=True)
class Deviation:
    max_abs: float
    cosine: float
    # the element furthest outside the tolerance, if any: (output index, flat index, got, want)
    worst: tuple | None = None


def _as_float(outputs: list[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(o, dtype=np.float64).ravel() for o in outputs]


def compare(got: list[np.ndarray], want: list[np.ndarray], *, rtol: float | None = None,
            atol: float | None = None) -> Deviation:
    """Element-wise deviation of ``got`` from ``want`` over all outputs, flattened. NaN against
    NaN and an infinity against the same infinity count as equal. With ``rtol``/``atol``,
    ``worst`` names the element that exceeds ``atol + rtol * |want|`` by the most."""
    if len(got) != len(want) or any(np.shape(g) != np.shape(w) for g, w in zip(got, want)):
        raise ValueError(f"outputs changed shape: {[np.shape(w) for w in want]} -> "
                         f"{[np.shape(g) for g in got]}")
    max_abs, dot, ng, nw, worst, worst_excess = 0.0, 0.0, 0.0, 0.0, None, 0.0
    for k, (g, w) in enumerate(zip(_as_float(got), _as_float(want))):
        same = (g == w) | (np.isnan(g) & np.isnan(w))
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.where(same, 0.0, np.abs(g - w))
        diff = np.nan_to_num(diff, nan=np.inf)
        if diff.size:
            max_abs = max(max_abs, float(diff.max()))
        finite = np.isfinite(g) & np.isfinite(w)
        dot += float(g[finite] @ w[finite])
        ng += float(g[finite] @ g[finite])
        nw += float(w[finite] @ w[finite])
        if rtol is not None and diff.size:
            excess = diff - (atol + rtol * np.nan_to_num(np.abs(w), nan=0.0, posinf=0.0))
            i = int(np.argmax(excess))
            if excess[i] > worst_excess:
                worst_excess, worst = float(excess[i]), (k, i, float(g[i]), float(w[i]))
    if ng == 0.0 and nw == 0.0:
        cosine = 1.0
    elif ng == 0.0 or nw == 0.0:
        cosine = 0.0
    else:
        cosine = dot / math.sqrt(ng * nw)
    return Deviation(max_abs, cosine, worst)


# ---------------------------------------------------------------------------------------------
# the manager


@dataclass(frozen=True)
class _Step:
    name: str
    call: Callable  # call(graph: Graph, unwrap) -> PassResult over a Graph
    contract: Exact | Lossy | None
    options: dict
    registered: bool  # the registry already runs the global instruments around it


def _contract_name(contract) -> str:
    if contract is None:
        return "none"
    if isinstance(contract, Exact):
        return f"exact({contract.rtol:g},{contract.atol:g})"
    return "lossy"


class PassManager:
    """Run passes in order with a numerics check and a report per pass.

    ``PassManager([("cleanup", {}), my_fn], instruments=[Verify()])``;
    ``graph, report = pm.run(g, check_inputs=[(x,), ...])``. ``instruments`` run before and after
    every pass, after the ones switched on for all passes (``instrument_all_passes``).
    ``on_no_match``: ``"error"`` (a pass asked for a change that matches nothing raises),
    ``"warn"`` (it warns and the pipeline goes on), or None (the surrounding policy, by default
    ``"error"``); one step may override it with its own ``on_no_match`` option.
    """

    def __init__(self, passes: Sequence, *, instruments: Sequence[Instrument] = (),
                 on_no_match: str | None = None):
        self.steps = [self._resolve(p) for p in passes]
        self.instruments = list(instruments)
        self.on_no_match = None if on_no_match is None else _no_match.check_policy(on_no_match)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    # -- building -----------------------------------------------------------------------------
    @staticmethod
    def _resolve(spec) -> _Step:
        options: dict = {}
        if isinstance(spec, tuple):
            if len(spec) != 2 or not isinstance(spec[1], dict):
                raise OptionError(f"PassManager: {spec!r} is not a pass.",
                                  "Give (name or function, {options}).")
            spec, options = spec
        if isinstance(spec, str):
            info = get_pass(spec)
        elif callable(spec) and hasattr(spec, "info") and hasattr(spec, "run"):
            info = spec.info
        elif callable(spec):
            name = getattr(spec, "__name__", type(spec).__name__)
            return _Step(name, _plain(spec, name, options), getattr(spec, "contract", None),
                         dict(options), registered=False)
        else:
            raise OptionError(f"PassManager: {spec!r} is not a pass.",
                              "Give a registered pass name, a pass function or any callable "
                              "taking a graph.")
        _check_options(info, options)
        opts = dict(options)
        return _Step(info.name, lambda g, unwrap: info.run(g, **opts), info.contract, opts,
                     registered=True)

    # -- running ------------------------------------------------------------------------------
    def run(self, graph, check_inputs: Sequence | None = None):
        """Run every pass on ``graph`` (a slimc.Graph, GraphModule or ModelProto; never edited).

        ``check_inputs``: a list of input tuples (one array per model input) to compare outputs
        on after every pass, or None for no numeric check. Returns ``(graph, Report)``, the graph
        of the kind given.
        """
        g, unwrap = as_graph(graph)
        batches = _batches(check_inputs)
        if g.backend == "fx" and g.example_inputs is None and batches:
            # a bare GraphModule knows no inputs; the check inputs tell what it takes
            from ..ir.graph import Graph
            g = Graph("fx", g.native, example_inputs=batches[0])
        try:
            original = [g.run(*b) for b in batches]
        except SlimcError:
            raise
        except Exception as e:
            raise PassError(f"The input graph does not run on the check inputs: "
                            f"{str(e).strip()[:400]}",
                            "Pass one array per model input, in order, for each check.") from e
        baseline = _measure(g)
        previous, rows, ran = original, [], []
        policy = _no_match.on_no_match(self.on_no_match) if self.on_no_match else \
            contextlib.nullcontext()
        with policy:
            g, rows = self._run_steps(g, unwrap, batches, original, previous, rows, ran)
        return unwrap(g), Report(baseline, rows)

    def _run_steps(self, g, unwrap, batches, original, previous, rows, ran):
        for step in self.steps:
            result, seconds = self._run_step(step, g, ran, unwrap)
            outputs = self._outputs(step, result.graph, batches, ran)
            row = self._check(step, result, seconds, outputs, previous, original, ran)
            rows.append(row)
            ran.append(step.name)
            g, previous = result.graph, outputs
        return g, rows

    def _run_step(self, step: _Step, g, ran: list[str], unwrap):
        instruments = [*(() if step.registered else global_instruments()), *self.instruments]
        for inst in instruments:
            inst.before(step.name, g)
        t0 = time.perf_counter()
        try:
            result = step.call(g, unwrap)
        except SlimcError as e:
            raise _with_context(e, step.name, ran) from e
        except Exception as e:
            raise PassError(f"Pass {step.name} failed{_after(ran)}: {type(e).__name__}: "
                            f"{str(e).strip()[:400]}",
                            "This is a bug in the pass, or a graph it does not support; run "
                            "it alone on the same graph to reproduce it.") from e
        seconds = time.perf_counter() - t0
        for inst in instruments:
            try:
                inst.after(step.name, result.graph, result)
            except SlimcError as e:
                raise _with_context(e, step.name, ran) from e
        return result, seconds

    @staticmethod
    def _outputs(step: _Step, graph, batches, ran):
        try:
            return [graph.run(*b) for b in batches]
        except Exception as e:
            raise PassError(f"The graph made by pass {step.name}{_after(ran)} does not run: "
                            f"{str(e).strip().splitlines()[0][:400]}",
                            "This is a bug in the pass; run it alone on the same graph to "
                            "reproduce it.") from e

    @staticmethod
    def _check(step: _Step, result: PassResult, seconds: float, outputs, previous, original,
               ran) -> PassRow:
        tol = _tolerance(step.contract, step.options)
        dev = total = None
        if outputs:
            try:
                dev = compare(_flat(outputs), _flat(previous),
                              rtol=tol.rtol if tol else None, atol=tol.atol if tol else None)
                total = compare(_flat(outputs), _flat(original))
            except ValueError as e:
                raise PassError(f"Pass {step.name}{_after(ran)} changed the model's outputs: "
                                f"{e}.", "A pass must keep the number and shapes of the "
                                "outputs; this is a bug in the pass.") from e
            if tol is not None and dev.worst is not None:
                _k, _i, got, want = dev.worst
                raise PassError(
                    f"Pass {step.name} ({_contract_name(tol)}) broke its numerics contract"
                    f"{_after(ran)}: max |deviation| {dev.max_abs:.3g}; worst element "
                    f"{got!r} where the graph before it gives {want!r}, outside "
                    f"atol + rtol * |reference| = {tol.atol:g} + {tol.rtol:g} * {abs(want):.3g}.",
                    "The pass is declared exact but changes the outputs: fix the pass, or "
                    "declare it Lossy. Run the pass alone on the same graph to reproduce it.")
        g = result.graph
        return PassRow(step.name, _contract_name(step.contract), bool(result.modified),
                       g.num_parameters(), g.nonzeros(), g.serialized_size(),
                       dev.max_abs if dev else None, dev.cosine if dev else None, seconds,
                       dict(result.stats), tol is not None and bool(outputs),
                       total.max_abs if total else None, total.cosine if total else None)


def _flat(runs: list[list[np.ndarray]]) -> list[np.ndarray]:
    return [o for run in runs for o in run]


def _plain(fn: Callable, name: str, options: dict) -> Callable:
    """A plain callable as a step: it gets a private copy (of the caller's kind) and may edit it,
    return it, return another graph, or return a PassResult."""

    def call(g, unwrap):
        mine = g.copy()
        native = unwrap(mine)
        out = fn(native, **options)
        modified = None
        if isinstance(out, PassResult):
            modified, stats, out = out.modified, dict(out.stats), out.graph
        else:
            stats = {}
        new = _adopt(out, mine, g)
        new.history = list(g.history) + [name]
        new.last_stats = stats
        if modified is None:
            modified = _differs(g, new)
        return PassResult(new, bool(modified), stats)

    return call


def _adopt(out, mine, g):
    """The Graph a plain callable produced: the copy it was given (edited in place, or returned
    as the native object), a Graph it built, or a native graph that inherits ``g``'s inputs."""
    from ..ir.graph import Graph
    if isinstance(out, Graph):
        return out
    if out is None or out is mine.native:
        return mine
    new, _ = as_graph(out)
    same = new.backend == g.backend
    return Graph(new.backend, new.native, example_inputs=g.example_inputs,
                 input_names=g._input_names if same else None,
                 output_names=g._output_names if same else None)


def _differs(a, b) -> bool:
    if a.backend != b.backend:
        return True
    if a.backend == "onnx":
        return a.native.SerializeToString() != b.native.SerializeToString()
    if a.native.code != b.native.code:
        return True
    wa, wb = a.weights(), b.weights()
    return wa.keys() != wb.keys() or any(not np.array_equal(wa[k], wb[k]) for k in wa)


def _check_options(info, options: dict) -> None:
    import inspect
    impl = getattr(info.run, "__wrapped__", None)
    if impl is not None and any(p.kind == inspect.Parameter.VAR_KEYWORD
                                for p in inspect.signature(impl).parameters.values()):
        return
    unknown = sorted(set(options) - set(info.options) - {"on_no_match"})
    if unknown:
        raise OptionError(f"Pass {info.name} has no option {', '.join(map(repr, unknown))}.",
                          f"Its options: {', '.join(info.options) or '(none)'}.")


def _tolerance(contract, options: dict) -> Exact | None:
    """The tolerance to enforce: an Exact contract's own; a Lossy pass's at its identity
    setting (exact there, by its contract); none otherwise."""
    if isinstance(contract, Exact):
        return contract
    if isinstance(contract, Lossy) and contract.identity and all(
            k in options and options[k] == v for k, v in contract.identity.items()):
        return Exact()
    return None


def _batches(check_inputs) -> list[tuple]:
    if check_inputs is None:
        return []
    if isinstance(check_inputs, np.ndarray) or not isinstance(check_inputs, (list, tuple)):
        raise OptionError("check_inputs must be a list of input tuples, e.g. [(x,)], or None.",
                          "Wrap one set of inputs in a list: check_inputs=[(ids, mask)].")
    out = []
    for b in check_inputs:
        if isinstance(b, np.ndarray) or not isinstance(b, (list, tuple)):
            raise OptionError("check_inputs must be a list of input tuples, e.g. [(x,)]; an "
                              f"element is a {type(b).__name__}.",
                              "Give one tuple per check, holding one array per model input.")
        out.append(tuple(x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
                         for x in b))
    return out


def _measure(g) -> dict:
    return {"parameters": g.num_parameters(), "nonzeros": g.nonzeros(),
            "bytes": g.serialized_size()}


def _after(ran: list[str]) -> str:
    return f" (after {', '.join(ran)})" if ran else " (the first pass)"


def _with_context(e: SlimcError, name: str, ran: list[str]) -> SlimcError:
    """The same error, saying which pass raised it and which ran before."""
    try:
        return type(e)(f"In pass {name}{_after(ran)}: {e.problem}", e.fix)
    except TypeError:  # a subclass with another signature
        return PassError(f"In pass {name}{_after(ran)}: {e.problem}", e.fix)
