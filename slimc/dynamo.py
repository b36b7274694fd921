"""``torch.compile(model, backend="slimc")``: a TorchDynamo backend that runs slimc's passes and
compiles each captured subgraph with TVM for this CPU.

```python
import torch, slimc.dynamo  # the import registers "slimc" (an installed slimc also registers it
                            # through the torch_dynamo_backends entry point, no import needed)
fast = torch.compile(model, backend="slimc")                   # passes: cleanup
fast = torch.compile(model, backend="slimc", options={"passes": ["fuse", "cleanup"]})
fast = torch.compile(model, backend=slimc.dynamo.backend(passes=["cleanup"], tune=None))
with torch.no_grad():
    y = fast(x)
```

How a subgraph is compiled: dynamo hands over an FX graph whose parameters and buffers are
inputs; they are frozen into a module (as inductor's ``freezing`` does), captured with
``slimc.capture`` (``torch.export``), run through the passes (a :class:`PassManager` that checks
each pass's numerics contract), compiled with ``slimc.compile`` and run on TVM's VM; outputs come
back as torch tensors (shared through DLPack, no copy).

Decisions, each with a warning rather than a wrong answer:

- **Unsupported ops** (TVM has no converter, ``torch.export`` cannot trace the subgraph, the
  subgraph mutates a tensor in place, runs on a non-CPU device...): that subgraph runs eagerly;
  one warning names the operator or the reason. The other subgraphs still run on TVM.
- **Graph breaks**: each subgraph is compiled on its own; the Python between them runs in torch.
- **Dynamic shapes**: TVM libraries here are compiled for static shapes, so a subgraph dynamo
  marks dynamic is compiled again for each new input shape at its first call (at most
  ``max_shapes`` per subgraph, default 8; each compiled shape holds its own copy of the
  weights); past that, new shapes run eagerly (one warning) and the compiled ones stay on TVM.
  Pass ``dynamic=False`` to ``torch.compile`` to have dynamo specialise (and guard) instead.
- **Frozen weights**: the compiled library holds the weights it saw. If a parameter or buffer is
  changed in place afterwards (its version counter moves) or replaced, that subgraph switches to
  eager with one warning; ``torch._dynamo.reset()`` compiles again with the new weights.
- **Verification** (``check=True``, the default): after compiling, the TVM output on the
  subgraph's inputs is compared with the graph after the passes, run by torch; a mismatch beyond
  ``atol + rtol * |reference|`` falls back to eager with a warning naming the deviation.
- **Inference only**: outputs carry no autograd history (one warning when gradients are on and
  an input requires them).
- **Threads**: a compiled module may be called from several threads at once (each call runs on
  a TVM VM of its own, on the VM's worker thread; a new shape met by several threads compiles once), and index inputs out of
  the model's range raise :class:`slimc.errors.IndexRangeError` (an ``IndexError``, as eager
  torch raises) instead of reading outside the table.
"""

from __future__ import annotations

import functools
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .errors import OptionError, SlimcError

BACKEND_NAME = "slimc"
_DEFAULT_PASSES = ("cleanup",)


class SlimcFallbackWarning(UserWarning):
    """A subgraph (or a later call of it) runs in eager torch instead of TVM; the message says
    why."""


@dataclass(frozen=True)
class Settings:
    """The backend's options (``torch.compile(..., options={...})`` or :func:`backend` keywords).

    ``passes``: what slimc runs on each subgraph before compiling: pass names, ``(name,
    {options})`` pairs, pass functions or a :class:`slimc.recipe.Recipe` (its passes; its
    ``[compile]`` table is ignored). ``target``: ``"x86"`` (this CPU) or a TVM target for this
    CPU. ``tune`` / ``db``: schedules, as :func:`slimc.compile` takes them. ``check``: compare
    TVM with torch once per compiled shape (``rtol`` / ``atol``). ``max_shapes``: compiled shapes
    per dynamic subgraph before it falls back to eager.
    """

    passes: tuple = _DEFAULT_PASSES
    target: Any = "x86"
    tune: Any = "default"
    db: Any = None
    check: bool = True
    rtol: float = 1e-4
    atol: float = 1e-5
    max_shapes: int = 8

    @classmethod
    def make(cls, base: Settings | None = None, **options) -> Settings:
        base = base or cls()
        valid = tuple(cls.__dataclass_fields__)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise OptionError(f"slimc backend: unknown option(s) {', '.join(map(repr, unknown))}.",
                              f"Valid options: {', '.join(valid)}.")
        if "passes" in options:
            options["passes"] = _pass_steps(options["passes"])
        out = replace(base, **options)
        if isinstance(out.target, str) and out.target.strip().lower() in ("arm", "cuda"):
            raise OptionError(f"slimc backend: target {out.target!r} does not run in this process "
                              "(torch.compile runs the model here, on the CPU).",
                              "Use target='x86' here; compile for other targets ahead of time "
                              "with slimc.compile(graph, target=...).")
        if not isinstance(out.max_shapes, int) or isinstance(out.max_shapes, bool) \
                or out.max_shapes < 1:
            raise OptionError(f"slimc backend: max_shapes must be an integer >= 1, got "
                              f"{out.max_shapes!r}.", "Pass e.g. max_shapes=8.")
        for key in ("rtol", "atol"):
            value = getattr(out, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise OptionError(f"slimc backend: {key} must be a number >= 0, got {value!r}.",
                                  f"Pass e.g. {key}=1e-4.")
        return out


def _pass_steps(passes) -> tuple:
    from .recipe import Recipe
    if isinstance(passes, Recipe):
        return tuple(passes.passes)
    single_pair = isinstance(passes, tuple) and len(passes) == 2 and isinstance(passes[1], dict)
    if isinstance(passes, str) or callable(passes) or single_pair:
        passes = [passes]
    if not isinstance(passes, (list, tuple)):
        raise OptionError(f"slimc backend: passes must be a list, got {type(passes).__name__}.",
                          "Pass e.g. passes=['fuse', 'cleanup'] or a slimc.recipe.Recipe.")
    from .passes import PassManager
    PassManager(list(passes))  # unknown names and options fail here, not at the first call
    return tuple(passes)


# -- the backend -------------------------------------------------------------------------------
class Backend:
    """A dynamo compiler function with fixed :class:`Settings`; what :func:`backend` returns when
    called with options only."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.__name__ = BACKEND_NAME  # torch.compile names the wrapper after its backend
        # every subgraph this backend compiled, in order (``.passes``, ``.shapes``,
        # ``.eager_reason`` say what happened to each)
        self.subgraphs: list[_CompiledSubgraph] = []

    def __repr__(self) -> str:
        return f"slimc.dynamo.backend({self.settings})"

    def __call__(self, gm, example_inputs, *, options: dict | None = None,
                 mode: str | None = None):
        if mode not in (None, "default"):
            raise OptionError(f"slimc backend: mode={mode!r} is not supported.",
                              "Leave mode out; choose schedules with options={'tune': ...} or "
                              "{'db': 'tuning-db/'}.")
        settings = Settings.make(self.settings, **(options or {}))
        compiled = _CompiledSubgraph(gm, list(example_inputs), settings)
        self.subgraphs.append(compiled)
        return compiled


def backend(gm=None, example_inputs=None, /, *, options: dict | None = None,
            mode: str | None = None, **settings):
    """The ``"slimc"`` dynamo backend, and a factory for one with custom settings.

    ``backend(gm, example_inputs)`` (what ``torch.compile`` calls) compiles one captured
    subgraph with :class:`Settings` from ``options``; ``backend(passes=[...], target="x86",
    tune=..., ...)`` returns a backend with those settings for ``torch.compile(backend=...)``.
    """
    if gm is None:
        if options:
            settings = {**options, **settings}
        return Backend(Settings.make(**settings))
    if settings:
        raise OptionError(f"slimc backend: unexpected keyword(s) {sorted(settings)}.",
                          "Give options through torch.compile(..., options={...}).")
    return Backend(Settings())(gm, example_inputs, options=options, mode=mode)


backend.__name__ = BACKEND_NAME


def register() -> None:
    """Register ``"slimc"`` with TorchDynamo unless it is already known (the entry point of an
    installed slimc, or an earlier call)."""
    from torch._dynamo.backends import registry
    if BACKEND_NAME not in registry._BACKENDS and BACKEND_NAME not in registry._COMPILER_FNS:
        registry.register_backend(backend, name=BACKEND_NAME)


# -- one subgraph --------------------------------------------------------------------------------
def _warn(message: str) -> None:
    warnings.warn(f"slimc: {message}", SlimcFallbackWarning, stacklevel=3)


def _is_weight(x) -> bool:
    import torch
    # dynamo passes parameters and buffers of nn.Modules as graph inputs and marks them static
    return isinstance(x, torch.Tensor) and (isinstance(x, torch.nn.Parameter) or getattr(
        x, "_dynamo_static_input_type", None) is not None)


def _version(t) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors keep no version counter: nothing to compare
        return None


def _is_symbolic(x) -> bool:
    import torch
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return True
    return isinstance(x, torch.Tensor) and any(not isinstance(d, int) for d in x.shape)


_INPLACE_FUNCTIONS = ("setitem", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod",
                      "ipow", "iand", "ior", "ixor", "ilshift", "irshift", "imatmul")
# ops whose result may share memory with their first argument: a write into the result is a
# write into the argument
_VIEWS = ("view", "view_as", "reshape", "reshape_as", "transpose", "permute", "t", "getitem",
          "unsqueeze", "squeeze", "flatten", "unflatten", "narrow", "select", "expand",
          "expand_as", "contiguous", "as_strided", "split", "chunk", "unbind", "movedim",
          "swapaxes", "diagonal", "detach", "real", "imag", "unfold", "__getitem__")


def _writes_in_place(n) -> str | None:
    if n.op == "call_method" and n.target.endswith("_") and not n.target.endswith("__"):
        return f"Tensor.{n.target}"
    if n.op == "call_function":
        name = getattr(n.target, "__name__", "")
        if name in _INPLACE_FUNCTIONS:
            return f"operator.{name}"
        if name.endswith("_") and not name.endswith("__"):
            return name
        if n.kwargs.get("inplace") is True or n.kwargs.get("out") is not None:
            return f"{name}(inplace/out=)"
    return None


def _input_of(node):
    """The graph input ``node`` may share memory with (through views), or None."""
    import torch
    seen = set()
    while isinstance(node, torch.fx.Node) and node not in seen:
        seen.add(node)
        if node.op == "placeholder":
            return node
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if node.op not in ("call_method", "call_function") or name not in _VIEWS \
                or not node.args:
            return None
        node = node.args[0]
    return None


def _mutation(gm) -> str | None:
    """The first in-place write into a graph input (an argument, a weight, or a view of one).
    TVM returns new tensors, so the caller would never see the write. Writes into the
    subgraph's own intermediates (``nn.ReLU(inplace=True)``) are fine: export makes them
    functional."""
    for n in gm.graph.nodes:
        op = _writes_in_place(n)
        if op and n.args and _input_of(n.args[0]) is not None:
            return f"{op} on input {_input_of(n.args[0]).name}"
    return None


def _unsupported_ops(message: str) -> str:
    found = re.search(r"Unsupported function types \[([^\]]*)\]", message)
    if not found:
        return ""
    ops = [o.strip(" '\"") for o in found.group(1).split(",") if o.strip()]
    return ", ".join(ops)


def _flat_args(value) -> list:
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _flat_args(v)]
    return [value]


def _signature(args) -> tuple:
    import torch
    return tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else
                 (type(a).__name__, a) for a in args)


class _Frozen:
    """Builds the nn.Module that ``torch.export`` captures: the dynamo graph with its weights as
    buffers (constants to TVM) and the symbolic sizes of one call baked in."""

    @staticmethod
    def module(gm, kinds: list[str], weights: dict[int, Any], ints: dict[int, int]):
        import torch

        class Frozen(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.graph_module = gm
                for i, w in weights.items():
                    self.register_buffer(f"w{i}", w.detach(), persistent=True)

            def forward(self, *tensors):
                it = iter(tensors)
                args = [getattr(self, f"w{i}") if k == "weight" else ints[i] if k == "int"
                        else next(it) for i, k in enumerate(kinds)]
                return self.graph_module(*args)

        return Frozen().eval()


@dataclass
class _Build:
    """One compiled shape: calls the VM's main function with a call's arguments."""

    run: Callable
    passes: list  # the graph's history: capture, then the passes that ran


@dataclass
class _State:
    builds: dict = field(default_factory=dict)  # signature -> _Build
    # one compile per new shape when several threads meet it at once
    lock: threading.Lock = field(default_factory=threading.Lock)
    eager_reason: str | None = None  # set: the whole subgraph runs in eager torch
    overflow: bool = False  # max_shapes reached: new shapes run eagerly, compiled ones on TVM
    warned_grad: bool = False


class _CompiledSubgraph:
    """What the backend returns for one dynamo subgraph: callable with the subgraph's inputs."""

    def __init__(self, gm, example_inputs: list, settings: Settings):
        import torch
        self.gm = gm
        self.settings = settings
        self.state = _State()
        self.names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        self.kinds = ["weight" if _is_weight(x) else "tensor" if isinstance(x, torch.Tensor)
                      else "int" if isinstance(x, (int, torch.SymInt)) else "other"
                      for x in example_inputs]
        # the weights, by identity and version: a change after compiling means the library is
        # stale (see the module docstring)
        self.weights = {i: (x, _version(x)) for i, x in enumerate(example_inputs)
                        if self.kinds[i] == "weight"}
        self.dynamic = any(_is_symbolic(x) for x in example_inputs)
        reason = self._refusal(example_inputs)
        if reason:
            self._fall_back(reason)
        elif not self.dynamic:
            self._build(example_inputs)  # static: compile now, as dynamo expects

    @property
    def eager_reason(self) -> str | None:
        """Why this subgraph runs in eager torch, or None while it runs on TVM."""
        return self.state.eager_reason

    @property
    def shapes(self) -> list[tuple]:
        """The input signatures compiled so far (one per shape of a dynamic subgraph)."""
        return list(self.state.builds)

    @property
    def passes(self) -> list[str]:
        """The history of the last compiled graph: ``capture`` then the passes run."""
        builds = list(self.state.builds.values())
        return builds[-1].passes if builds else []

    # -- decisions --------------------------------------------------------------------------
    def _refusal(self, example_inputs) -> str | None:
        import torch
        if "other" in self.kinds:
            i = self.kinds.index("other")
            return (f"input {i} is a {type(example_inputs[i]).__name__}; only tensors and "
                    "integers are passed to TVM")
        devices = {x.device.type for x in example_inputs if isinstance(x, torch.Tensor)}
        if devices - {"cpu"}:
            return (f"tensors on {', '.join(sorted(devices - {'cpu'}))}; this backend runs on "
                    "the CPU")
        op = _mutation(self.gm)
        if op:
            return f"the subgraph writes a tensor in place ({op}), which TVM cannot do"
        out = next(n for n in self.gm.graph.nodes if n.op == "output")
        leaves = [a for a in _flat_args(out.args[0])]
        if not all(isinstance(a, torch.fx.Node) and isinstance(
                a.meta.get("example_value"), torch.Tensor) for a in leaves):
            return "the subgraph returns values that are not tensors (sizes, None, ...)"
        return None

    def _fall_back(self, reason: str) -> None:
        self.state.eager_reason = reason
        self.state.builds.clear()
        _warn(f"running a subgraph in eager torch: {reason}.")

    def _weights_changed(self, args) -> str | None:
        for i, (w, version) in self.weights.items():
            name = self.names[i] if i < len(self.names) else f"#{i}"
            if args[i] is not w:
                return f"weight {name} was replaced after compiling"
            if version is not None and _version(w) != version:
                return (f"weight {name} {tuple(w.shape)} was changed in place after compiling; "
                        "call torch._dynamo.reset() to compile with the new weights")
        return None

    # -- calls ------------------------------------------------------------------------------
    def __call__(self, *args):
        if self.state.eager_reason is not None:
            return self.gm(*args)
        changed = self._weights_changed(args)
        if changed:
            self._fall_back(changed)
            return self.gm(*args)
        self._grad_warning(args)
        key = _signature(a for a, k in zip(args, self.kinds) if k != "weight")
        build = self.state.builds.get(key)
        if build is None:
            with self.state.lock:
                build = self._build_once(key, args)
            if build is None:
                return self.gm(*args)
        return build.run(args)

    def _build_once(self, key, args) -> _Build | None:
        """The build for ``key`` (another thread may have made it meanwhile), or None to run
        eagerly."""
        build = self.state.builds.get(key)
        if build is None and self.state.eager_reason is None:
            if len(self.state.builds) >= self.settings.max_shapes:
                if not self.state.overflow:
                    self.state.overflow = True
                    _warn(f"a dynamic subgraph met more than max_shapes="
                          f"{self.settings.max_shapes} input shapes (each is compiled "
                          "separately): new shapes run in eager torch, the compiled ones on "
                          "TVM.")
                return None
            build = self._build(args)
        return build

    def _grad_warning(self, args) -> None:
        import torch
        if self.state.warned_grad or not torch.is_grad_enabled():
            return
        if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            self.state.warned_grad = True
            warnings.warn("slimc: the compiled model's outputs carry no autograd history (the "
                          "backend compiles inference); run it under torch.no_grad() or "
                          "torch.inference_mode().", UserWarning, stacklevel=3)

    # -- compiling --------------------------------------------------------------------------
    def _build(self, args) -> _Build | None:
        """Compile for the shapes of ``args``; on a slimc error fall back (with the warning)."""
        try:
            build = self._compile(args)
        except SlimcError as e:
            ops = _unsupported_ops(str(e))
            self._fall_back(f"TVM has no converter for {ops}" if ops else
                            f"{type(e).__name__}: {e.problem}")
            return None
        key = _signature(a for a, k in zip(args, self.kinds) if k != "weight")
        self.state.builds[key] = build
        return build

    def _compile(self, args) -> _Build:
        import torch

        import slimc

        from .passes import PassManager

        concrete = [int(a) if k == "int" else a for a, k in zip(args, self.kinds)]
        tensors = tuple(a.detach() for a, k in zip(concrete, self.kinds) if k == "tensor")
        module = _Frozen.module(
            self.gm, self.kinds, {i: concrete[i] for i, k in enumerate(self.kinds)
                                  if k == "weight"},
            {i: concrete[i] for i, k in enumerate(self.kinds) if k == "int"})
        graph = slimc.capture(module, tensors)
        example = graph.example_inputs
        if self.settings.passes:
            check = [example] if self.settings.check else None
            graph, _ = PassManager(list(self.settings.passes)).run(graph, check_inputs=check)
        with torch.no_grad():
            art = slimc.compile(graph, target=self.settings.target, tune=self.settings.tune,
                                db=self.settings.db)
        run = _vm_runner(art)
        build = _Build(functools.partial(_call, run, self.kinds), list(graph.history))
        if self.settings.check:
            self._verify(graph, run, tensors)
        return build

    def _verify(self, graph, run, tensors) -> None:
        from .passes.manager import compare
        want = graph.run(*[t.numpy() for t in tensors])
        got = [np.asarray(o) for o in _to_numpy(run(list(tensors)))]
        if len(got) != len(want):
            raise SlimcError(f"TVM returned {len(got)} outputs for a subgraph with "
                             f"{len(want)}.", "This is a slimc bug; please report it.")
        try:
            dev = compare(got, want, rtol=self.settings.rtol, atol=self.settings.atol)
        except ValueError as e:  # shapes differ
            raise SlimcError(f"TVM's outputs do not match torch's: {e}",
                             "Report it with the model; meanwhile the subgraph runs eagerly.") \
                from e
        if dev.worst is not None:
            raise SlimcError(f"TVM's result differs from torch's by {dev.max_abs:.3g} "
                             f"(max abs; allowed atol={self.settings.atol:g} + "
                             f"rtol={self.settings.rtol:g} * |reference|)",
                             "Report it with the model; meanwhile the subgraph runs eagerly.")


def _vm_runner(art) -> Callable:
    """Runs the build: thread-safe (a VM per concurrent call, as slimc.runtime does) and with
    index inputs range-checked first (TVM's gathers do not check; torch raises IndexError)."""
    import tvm

    from .runtime import VMPool, check_index_ranges
    from .ir import TensorSpec
    pool = VMPool(art.executable, tvm.cpu(0))
    specs = [TensorSpec(s["name"], tuple(s["shape"]), s["dtype"]) for s in art.metadata["inputs"]]
    ranges = art.metadata.get("index_ranges", {})
    checked = [i for i, s in enumerate(specs) if s.name in ranges]

    def run(tensors: list):
        if checked:
            check_index_ranges(ranges, [specs[i] for i in checked],
                               [tensors[i].detach().cpu().numpy() for i in checked])
        args = [_to_tvm(t, tvm) for t in tensors]
        return pool.run(lambda vm, main: main(*args))

    return run


def _to_tvm(t, tvm):
    t = t.detach()
    if not t.is_contiguous() or t.data_ptr() % 64:  # TVM wants dense, aligned buffers
        t = t.contiguous().clone()
    return tvm.runtime.from_dlpack(t)


def _leaves(value) -> list:
    if hasattr(value, "shape") and not isinstance(value, (list, tuple)):
        return [value]
    return [leaf for v in value for leaf in _leaves(v)]


def _to_numpy(value) -> list[np.ndarray]:
    return [leaf.numpy() for leaf in _leaves(value)]


def _call(run, kinds: Sequence[str], args) -> tuple:
    import torch
    outs = _leaves(run([a for a, k in zip(args, kinds) if k == "tensor"]))
    # dynamo graphs return a tuple of tensors; DLPack shares the VM's buffers without a copy
    return tuple(torch.from_dlpack(o) for o in outs)


try:
    register()
except ImportError:  # a torch without dynamo: the module still imports, the name is unknown
    pass

__all__ = ["BACKEND_NAME", "Backend", "Settings", "SlimcFallbackWarning", "backend", "register"]
