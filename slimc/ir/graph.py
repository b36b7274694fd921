"""``slimc.Graph``: one type for a captured FX graph or a loaded ONNX model.

A Graph owns its native object (``Graph.fx``: a ``torch.fx.GraphModule``; ``Graph.onnx``: an
``onnx.ModelProto``), example inputs (numpy) and the history of passes applied. Passes return a new
Graph (:meth:`Graph.copy`) and never edit the one they were given.
"""

from __future__ import annotations

import copy as _copy
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .._quiet import torch_internal_warnings
from ..errors import ShapeError, UnsupportedError
from . import attention as _attention
from . import ffn as _ffn
from . import layers as _layers
from .structures import AttentionBlock, FFNBlock, TransformerLayer


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints, or str for a symbolic dimension
    dtype: str


def _backend(backend: str):
    if backend == "fx":
        from . import fx as mod
    else:
        from . import onnx as mod
    return mod


class Graph:
    """A model graph on one of two backends, ``"fx"`` or ``"onnx"``."""

    def __init__(self, backend: str, native, *, example_inputs=None, input_names=None,
                 output_names=None, history=()):
        if backend not in ("fx", "onnx"):
            raise ValueError(f"unknown backend {backend!r}")
        self.backend = backend
        self.native = native
        self.example_inputs = (tuple(np.asarray(x) for x in example_inputs)
                               if example_inputs is not None else None)
        self._input_names = list(input_names) if input_names else None
        self._output_names = list(output_names) if output_names else None
        self.history = list(history)
        self.last_stats: dict = {}  # what the last pass that made this graph reported

    # -- access to the native object ------------------------------------------------------
    @property
    def fx(self):
        if self.backend != "fx":
            raise UnsupportedError("This graph is ONNX, not FX.",
                                   "Use graph.onnx, or capture the torch module with "
                                   "slimc.capture().")
        return self.native

    @property
    def onnx(self):
        if self.backend != "onnx":
            raise UnsupportedError("This graph is FX, not ONNX.",
                                   "Use graph.to_onnx() to convert it.")
        return self.native

    def copy(self) -> Graph:
        """A deep copy: weights included, so editing the copy never touches this graph."""
        if self.backend == "fx":
            with torch_internal_warnings():  # deep-copying the GraphModule's LeafSpecs
                native = _copy.deepcopy(self.native)
        else:
            import onnx
            native = onnx.ModelProto()
            native.CopyFrom(self.native)
        return Graph(self.backend, native, example_inputs=self.example_inputs,
                     input_names=self._input_names, output_names=self._output_names,
                     history=self.history)

    def __repr__(self) -> str:
        return (f"<slimc.Graph {self.backend}: {self.num_parameters():,} parameters, "
                f"{len(self.attention_blocks())} attention blocks>")

    # -- inputs / outputs -----------------------------------------------------------------
    def input_specs(self) -> list[TensorSpec]:
        if self.backend == "onnx":
            from onnx import helper
            init = {i.name for i in self.native.graph.initializer}
            specs = []
            for vi in self.native.graph.input:
                if vi.name in init:
                    continue
                t = vi.type.tensor_type
                shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                              for d in t.shape.dim)
                dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name
                specs.append(TensorSpec(vi.name, shape, dtype))
            return specs
        names = self.input_names
        if self.example_inputs is not None:
            return [TensorSpec(n, tuple(x.shape), x.dtype.name)
                    for n, x in zip(names, self.example_inputs)]
        # a bare GraphModule: what torch.export recorded on its placeholders
        specs = []
        for node in self.native.graph.nodes:
            if node.op != "placeholder":
                continue
            val = node.meta.get("val")
            if val is None or not hasattr(val, "shape"):
                raise ShapeError(f"The FX graph's input {node.name!r} has no recorded shape.",
                                 "Capture the module with slimc.capture(module, inputs), or "
                                 "pass inputs explicitly.")
            shape = tuple(int(d) if str(d).isdigit() else str(d) for d in val.shape)
            specs.append(TensorSpec(node.name, shape, str(val.dtype).replace("torch.", "")))
        return specs

    @property
    def input_names(self) -> list[str]:
        if self.backend == "onnx":
            return [s.name for s in self.input_specs()]
        if self._input_names:
            return self._input_names
        return [n.name for n in self.native.graph.nodes if n.op == "placeholder"]

    @property
    def output_names(self) -> list[str]:
        if self.backend == "onnx":
            return [o.name for o in self.native.graph.output]
        return self._output_names or [f"output_{i}" for i in range(len(self.run()))]

    def sample_inputs(self, seed: int = 0, dims: dict | None = None) -> tuple[np.ndarray, ...]:
        """Inputs to check numerics with: the example inputs if any, else random ones.

        Symbolic dimensions take ``dims[name]`` or 1 on axis 0 and 16 elsewhere; integer inputs
        are drawn from {0, 1} (valid token ids, token types and masks for any vocabulary).
        """
        if self.example_inputs is not None and not dims:
            return self.example_inputs
        return random_inputs(self.input_specs(), seed, dims)

    # -- execution ------------------------------------------------------------------------
    def run(self, *inputs) -> list[np.ndarray]:
        """Run on the reference executor (torch for FX, onnxruntime for ONNX); flat outputs."""
        if not inputs:
            inputs = self.sample_inputs()
        check_inputs(self.input_specs(), inputs, exact_dtype=self.backend == "onnx")
        if self.backend == "fx":
            from .capture import run_fx
            return run_fx(self.native, inputs)
        from .capture import run_onnx
        return run_onnx(self.native, inputs)

    # -- weights and statistics -----------------------------------------------------------
    def weights(self) -> dict[str, np.ndarray]:
        return _backend(self.backend).weights(self.native)

    def get_weight(self, name: str) -> np.ndarray:
        return _backend(self.backend).get_weight(self.native, name)

    def set_weight(self, name: str, value: np.ndarray) -> None:
        """Replace one weight in place. Passes call this on their own copy only."""
        _backend(self.backend).set_weight(self.native, name, value)

    def iter_weights(self):
        """``(name, array)`` for every weight, one at a time: an ONNX model's are converted as
        they are reached, not all at once as :meth:`weights` does (a 1B-parameter model would
        hold its weights twice)."""
        if self.backend == "onnx":
            from onnx import numpy_helper
            return ((t.name, numpy_helper.to_array(t)) for t in self.native.graph.initializer)
        return iter(self.weights().items())

    def _counted_weights(self):
        """The weights that count as parameters (floats; integer matrices, i.e. int8 weights)."""
        for _, w in self.iter_weights():
            if np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer) \
                    and w.ndim >= 2:
                yield w

    def num_parameters(self) -> int:
        return int(sum(w.size for w in self._counted_weights()))

    def nonzeros(self) -> int:
        return int(sum(np.count_nonzero(w) for w in self._counted_weights()))

    def serialized_size(self) -> int:
        return _backend(self.backend).serialized_size(self.native)

    def op_histogram(self) -> Counter:
        return _backend(self.backend).op_histogram(self.native)

    # -- structure ------------------------------------------------------------------------
    def view(self):
        return _backend(self.backend).build_view(self.native)

    def attention_blocks(self) -> list[AttentionBlock]:
        """Every multi-head attention, in execution order (``layer`` = position)."""
        return _attention.find_attention(self.view())

    def ffn_blocks(self) -> list[FFNBlock]:
        """Every feed-forward block (up → activation → down, or gated), in execution order
        (``layer`` = position); see :mod:`slimc.ir.ffn`."""
        return _ffn.find_ffn(self.view())

    def transformer_layers(self) -> list[TransformerLayer]:
        """Every whole Transformer layer (an attention block and its FFN block with their
        residual adds and norms), in execution order (``layer`` = position); see
        :mod:`slimc.ir.layers`."""
        view = self.view()
        return _layers.find_layers(view, _attention.find_attention(view), _ffn.find_ffn(view))

    # -- conversion -----------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the graph as ONNX (``.onnx``) or a torch.export program (``.pt2``), atomically."""
        from .capture import save
        save(self, path)

    def to_onnx(self):
        """The graph as an ``onnx.ModelProto`` (FX graphs go through torch.onnx's exporter)."""
        if self.backend == "onnx":
            return self.native
        from .capture import fx_to_onnx
        return fx_to_onnx(self)

    def to_torch(self):
        """The graph as a runnable ``torch.nn.Module`` (FX graphs only)."""
        if self.backend == "fx":
            return self.native
        raise UnsupportedError(
            "Converting an ONNX graph back to a torch module is not supported.",
            "Run it with graph.run() (onnxruntime), or capture the original torch module with "
            "slimc.capture() to work on FX.")

    def to_exported_program(self):
        """A fresh ``torch.export.ExportedProgram`` of this FX graph (what TVM's frontend reads)."""
        from .capture import export_program
        return export_program(self)


def random_inputs(specs: list[TensorSpec], seed: int = 0,
                  dims: dict | None = None) -> tuple[np.ndarray, ...]:
    """Random inputs for ``specs``, as :meth:`Graph.sample_inputs` describes."""
    rng = np.random.default_rng(seed)
    out = []
    for spec in specs:
        shape = tuple(d if isinstance(d, int) and d > 0 else
                      (dims or {}).get(d, 1 if i == 0 else 16)
                      for i, d in enumerate(spec.shape))
        if np.issubdtype(np.dtype(spec.dtype), np.integer):
            if "mask" in spec.name:
                out.append(np.ones(shape, dtype=spec.dtype))
            else:
                out.append(rng.integers(0, 2, size=shape).astype(spec.dtype))
        elif spec.dtype == "bool":
            out.append(np.ones(shape, dtype=bool))
        else:
            out.append(rng.standard_normal(shape).astype(spec.dtype))
    return tuple(out)


def _dtype_kind(dtype) -> str | None:
    try:
        kind = np.dtype(dtype).kind
    except TypeError:  # a torch dtype numpy lacks (bfloat16): not checked
        return None
    return "i" if kind == "u" else kind


def check_inputs(specs: list[TensorSpec], inputs, *, exact_dtype: bool = False) -> None:
    """Raise :class:`ShapeError` unless ``inputs`` fit ``specs``: their number, ranks, fixed
    dimensions and element kinds (float / integer / bool); with ``exact_dtype`` (onnxruntime
    accepts nothing else) the exact element type."""
    if len(inputs) != len(specs):
        raise ShapeError(
            f"The model takes {len(specs)} input(s) ({', '.join(s.name for s in specs)}) but "
            f"{len(inputs)} were given.", "Pass one array per model input, in that order.")
    for spec, x in zip(specs, inputs):
        shape = tuple(np.shape(x))
        bad = len(shape) != len(spec.shape) or any(
            isinstance(d, int) and d > 0 and d != s for d, s in zip(spec.shape, shape))
        if bad:
            raise ShapeError(
                f"Input {spec.name!r} has shape {shape}, but the model expects "
                f"{tuple(spec.shape)}.",
                "Reshape the input, or capture/export the model with inputs of this shape.")
        got = np.asarray(x).dtype if not hasattr(x, "detach") else None
        want = _dtype_kind(spec.dtype)
        if got is not None and want is not None and (
                _dtype_kind(got) != want or exact_dtype and got.name != spec.dtype):
            raise ShapeError(f"Input {spec.name!r} has dtype {got.name}, but the model expects "
                             f"{spec.dtype}.", f"Convert it, e.g. x.astype(numpy.{spec.dtype}).")
