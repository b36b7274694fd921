"""Pass registration: every pass is a plain function with a declared numerics contract.

A pass takes a :class:`slimc.Graph` (or a native ``torch.fx.GraphModule`` / ``onnx.ModelProto``,
see :func:`as_graph`) and keyword options, and returns a :class:`PassResult`. Registered passes are
listed by ``slimc passes --list`` and reachable from recipes by name.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import OptionError, SlimcError
from . import _no_match


@dataclass(frozen=True)
class Exact:
    """The pass preserves semantics: outputs equal within ``rtol`` / ``atol``."""

    rtol: float = 1e-5
    atol: float = 1e-5

    @property
    def exact(self) -> bool:
        return True


@dataclass(frozen=True)
class Lossy:
    """The pass changes the model on purpose. ``identity`` names the option setting at which it
    must be exact (e.g. ``{"ratio": 0}``); ``bound`` documents the expected deviation."""

    identity: dict = field(default_factory=dict)
    bound: str = ""

    @property
    def exact(self) -> bool:
        return False


@dataclass
class PassResult:
    """What a pass returns (torch.fx's ``PassResult`` plus statistics)."""

    graph: Any
    modified: bool
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PassInfo:
    name: str
    run: Callable  # run(g, **options) -> PassResult
    contract: Exact | Lossy
    doc: str
    options: tuple[str, ...]


_REGISTRY: dict[str, PassInfo] = {}


class Instrument:
    """Callbacks around a pass (TVM's ``pass_instrument``): override ``before``, ``after`` or
    both. ``graph`` is always a :class:`slimc.Graph`; an instrument must not edit it."""

    def before(self, name: str, graph) -> None:
        pass

    def after(self, name: str, graph, result: PassResult) -> None:
        pass


# Instruments run around every registered pass, wherever it is called from (the tests switch
# verification on here for every pass in every test; see tests/conftest.py).
_INSTRUMENTS: list[Instrument] = []


@contextlib.contextmanager
def instrument_all_passes(*instruments: Instrument):
    """Run ``instruments`` around every pass called while the ``with`` block is open."""
    _INSTRUMENTS.extend(instruments)
    try:
        yield
    finally:
        for inst in instruments:
            _INSTRUMENTS.remove(inst)


def global_instruments() -> tuple[Instrument, ...]:
    return tuple(_INSTRUMENTS)


def register_pass(name: str | None = None, *, contract: Exact | Lossy):
    """Turn ``impl(graph, **options) -> PassResult`` into a registered pass.

    ``impl`` receives a private copy of the caller's graph as a :class:`slimc.Graph` (so it may
    edit it in place) and returns a :class:`PassResult` over it. The public function returned by
    the decorator accepts a ``slimc.Graph``, a ``torch.fx.GraphModule`` or an ``onnx.ModelProto``
    and returns a new graph of the same kind; ``public.run(g, **options)`` returns the full
    :class:`PassResult` (stats included). Registering a second pass under a taken name is an
    error, not a warning.
    """

    def wrap(impl):
        pname = name or impl.__name__

        @functools.wraps(impl)
        def run(g, /, **options) -> PassResult:
            # on_no_match: what to do when the options ask for a change that matches nothing
            policy = options.pop("on_no_match", None)
            if policy is not None:
                _no_match.check_policy(policy)
            graph, unwrap = as_graph(g)
            for inst in tuple(_INSTRUMENTS):
                inst.before(pname, graph)
            result = impl(graph.copy(), **options)
            if not isinstance(result, PassResult):
                raise SlimcError(f"Pass {pname} returned {type(result).__name__}, not a "
                                 "PassResult.", "Return PassResult(graph, modified, stats).")
            _no_match.check(pname, options, result.stats, graph, policy)
            result.graph.history = list(graph.history) + [pname]
            result.graph.last_stats = dict(result.stats)
            for inst in tuple(_INSTRUMENTS):
                inst.after(pname, result.graph, result)
            result.graph = unwrap(result.graph)
            return result

        @functools.wraps(impl)
        def public(g, /, **options):
            return run(g, **options).graph

        if pname in _REGISTRY and _REGISTRY[pname].run.__wrapped__ is not impl:
            raise SlimcError(f"A pass named {pname!r} is already registered "
                             f"({_REGISTRY[pname].run.__module__}).",
                             "Choose another name for your pass.")
        opts = tuple(p.name for p in inspect.signature(impl).parameters.values()
                     if p.kind == inspect.Parameter.KEYWORD_ONLY)
        info = PassInfo(pname, run, contract, inspect.getdoc(impl) or "", opts)
        _REGISTRY[pname] = info
        public.run = run
        public.info = info
        return public

    return wrap


def get_pass(name: str) -> PassInfo:
    if name not in _REGISTRY:
        raise OptionError(f"Unknown pass {name!r}.",
                          f"Known passes: {', '.join(sorted(_REGISTRY)) or '(none)'}.")
    return _REGISTRY[name]


def list_passes() -> list[PassInfo]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def as_graph(g):
    """Wrap a native graph in a :class:`slimc.Graph` so every pass accepts all three forms.

    Returns ``(graph, unwrap)``: ``unwrap(result_graph)`` turns the result back into the kind of
    object the caller passed.
    """
    from ..ir.graph import Graph
    if isinstance(g, Graph):
        return g, (lambda r: r)
    mod = type(g).__module__
    if mod.startswith("onnx"):
        import onnx
        if isinstance(g, onnx.ModelProto):
            return Graph("onnx", g), (lambda r: r.native)
    if mod.startswith("torch"):
        import torch.fx
        if isinstance(g, torch.fx.GraphModule):
            return Graph("fx", g), (lambda r: r.native)
    raise SlimcError(f"A pass got a {type(g).__name__}, not a graph.",
                     "Pass a slimc.Graph, a torch.fx.GraphModule or an onnx.ModelProto.")
