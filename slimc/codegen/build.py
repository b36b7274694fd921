"""Graph → Relax IRModule → TVM executable.

``to_relax`` imports a slimc Graph with TVM's own frontends (``from_exported_program`` for FX,
``from_onnx`` for ONNX) and fixes input shapes; ``compile`` runs the schedule hook, then
``tvm.compile`` with the target's default Relax pipeline, and returns an :class:`Artifact`.

Weights are bound into the module as constants (both frontends' default), so the library is
self-contained: one ``lib.so``, no parameter file to keep next to it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Callable

import tvm
from tvm import relax

from .. import __version__
from .._quiet import plain_graphsurgeon_logs, torch_internal_warnings, tvm_native_noise
from ..errors import OptionError, ShapeError, SlimcError, UnsupportedError
from ..ir import Graph, TensorSpec
from ..runtime import use_physical_cores
from .bounds import guard_computed_indices, index_ranges
from .cuda import keep_source as keep_cuda_source
from .cuda import precompile as precompile_cuda
from .export import Artifact
from .int8 import TORCH_CONVERTERS as INT8_TORCH_CONVERTERS
from .schedules import apply_default_schedules
from .select import count_matmuls, kernel_counts, select_kernels, warn_slow_int8
from .targets import device_kind, host_cpu, isa_features, resolve_target, target_triple

ScheduleHook = Callable[[tvm.IRModule, tvm.target.Target], tvm.IRModule]


# -- import ----------------------------------------------------------------------------------
def _torch_cumsum(node, importer):
    # TVM's converter keeps the input dtype when none is given; torch sums bool and integer
    # tensors in int64. transformers' GPT-2 and Llama masks take cumsum of a bool tensor
    # (packed-sequence detection), which otherwise fails to build ("MatchesCode(kDLFloat)").
    x = importer.env[node.args[0]]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dtype = node.kwargs.get("dtype")
    if dtype is not None:
        dtype = importer._convert_data_type(str(dtype), importer.env)
    elif x.ty.dtype == "bool" or x.ty.dtype.startswith(("int", "uint")):
        dtype = "int64"
    return importer.block_builder.emit(relax.op.cumsum(x, dim, dtype))


# aten._int_mm comes from fold_fake_quant's integer matmuls on FX graphs
_TORCH_CONVERTERS = {"cumsum.default": _torch_cumsum, **INT8_TORCH_CONVERTERS}


def _last_line(e: Exception) -> str:
    # TVM's messages carry a C++ backtrace first; the error itself is the last line
    text = str(e).strip()
    return (text.splitlines()[-1] if text else type(e).__name__)[:400]


def _import_fx(graph: Graph) -> tvm.IRModule:
    import tvm.relax.frontend.torch as tvm_torch
    ep = graph.to_exported_program()
    try:
        with torch_internal_warnings():  # its run_decompositions deep-copies LeafSpecs
            return tvm_torch.from_exported_program(ep, custom_convert_map=_TORCH_CONVERTERS)
    except Exception as e:
        raise UnsupportedError(
            f"TVM's PyTorch frontend cannot import this graph: {_last_line(e)}",
            "The message names the operator TVM lacks; replace it in the model, or export the "
            "model to ONNX and compile that (slimc.load).") from e


def _import_onnx(graph: Graph) -> tvm.IRModule:
    import tvm.relax.frontend.onnx as tvm_onnx
    said = io.StringIO()  # the frontend prints which operator failed; it belongs in the error
    try:
        with contextlib.redirect_stdout(said):
            return tvm_onnx.from_onnx(graph.onnx, keep_params_in_input=False)
    except Exception as e:
        where = next((line.split(",")[0] for line in said.getvalue().splitlines()
                      if line.startswith("Error converting operator")), "")
        where = f" ({where[len('Error converting '):]})" if where else ""
        specs = graph.input_specs()
        dynamic = sorted({d for s in specs for d in s.shape if isinstance(d, str)})
        if dynamic:
            example = {s.name: tuple(d if isinstance(d, int) else 1 if i == 0 else 128
                                     for i, d in enumerate(s.shape)) for s in specs}
            fix = (f"The model has symbolic dimensions {dynamic}, which TVM's ONNX frontend "
                   f"handles only in part: fix them, e.g. input_shapes={example} (CLI: "
                   "--input-shape NAME=1x128).")
        else:
            fix = ("If it names an operator, replace it or export the model with another "
                   "opset.")
        raise UnsupportedError(f"TVM's ONNX frontend cannot import this model{where}: "
                               f"{_last_line(e)}", fix) from e


def _refuse_nan_weights(graph: Graph) -> None:
    """NaN weights compile into a library that silently computes something else: TVM's kernels
    do not carry NaN through the way onnxruntime and torch do (a fused max(x, 0) turns it into
    0). Infinite weights (additive masks of -inf) keep their meaning and are allowed."""
    import numpy as np
    bad = {name: int(np.isnan(w).sum()) for name, w in graph.weights().items()
           if np.issubdtype(w.dtype, np.floating) and np.isnan(w).any()}
    if bad:
        listed = ", ".join(f"{k!r} ({n})" for k, n in list(bad.items())[:8])
        raise UnsupportedError(
            f"The model's weights hold NaN values: {listed}{' ...' if len(bad) > 8 else ''}. "
            "TVM's kernels do not propagate NaN as onnxruntime and torch do, so the compiled "
            "library would silently differ from the model.",
            "Fix the weights first (slimc inspect lists every non-finite weight).")


def _as_graph(graph) -> Graph:
    if isinstance(graph, Graph):
        return graph
    if type(graph).__module__.startswith("onnx") and type(graph).__name__ == "ModelProto":
        return Graph("onnx", graph)
    raise UnsupportedError(f"slimc.compile() takes a slimc.Graph, not {type(graph).__name__}.",
                           "Make one with slimc.capture(module, inputs) or slimc.load(path).")


# -- shapes ----------------------------------------------------------------------------------
def _dim(d) -> int | str:
    return int(d.value) if isinstance(d, tvm.tirx.IntImm) else str(d)


def _leaves(ty) -> list:
    """A Relax (nested) tuple type flattened in order; any other type is its own leaf."""
    if isinstance(ty, relax.TupleType):
        return [leaf for f in ty.fields for leaf in _leaves(f)]
    return [ty]


def _spec(name: str, ty) -> dict:
    if not (isinstance(ty, relax.TensorType) and ty.shape is not None):
        raise UnsupportedError(f"Model value {name!r} has type {ty}, which slimc cannot pass as "
                               "an array.", "Use tensors of known rank as model inputs and "
                               "outputs (tuples of them are fine as outputs).")
    return {"name": name, "shape": [_dim(d) for d in ty.shape.values], "dtype": str(ty.dtype)}


def resolve_input_shapes(specs: list[TensorSpec], input_shapes: dict) -> dict[str, tuple]:
    """Every input's shape once ``input_shapes`` ({input name: shape}) is applied.

    A symbolic dimension shared by several inputs (``batch``, ``seq``) takes one size in all of
    them; unnamed ones (``"?"``) only where given. Dimensions left symbolic stay their names.
    Static dimensions cannot change.
    """
    names = [s.name for s in specs]
    unknown = sorted(set(input_shapes) - set(names))
    if unknown:
        raise OptionError(f"input_shapes names {unknown}, which are not model inputs.",
                          f"The model's inputs are {names}.")
    sizes: dict[str, int] = {}
    for spec in specs:
        if spec.name not in input_shapes:
            continue
        want = tuple(int(d) for d in input_shapes[spec.name])
        if len(want) != len(spec.shape) or any(d <= 0 for d in want):
            raise ShapeError(f"input_shapes gives {spec.name!r} the shape {want}, but the input "
                             f"has shape {spec.shape}.",
                             f"Give {len(spec.shape)} positive dimensions.")
        for d, w in zip(spec.shape, want):
            if isinstance(d, int) and d != w:
                raise ShapeError(
                    f"input_shapes gives {spec.name!r} the shape {want}, but the model fixes it "
                    f"to {spec.shape}.", "Only symbolic dimensions can be set; capture (FX) or "
                    "export (ONNX) the model again with inputs of the shape you need.")
            if isinstance(d, str) and d != "?" and sizes.setdefault(d, w) != w:
                raise ShapeError(f"input_shapes gives the dimension {d!r} two sizes: "
                                 f"{sizes[d]} and {w}.",
                                 f"Inputs sharing {d!r} need the same size there.")
    return {s.name: tuple(int(d) for d in input_shapes[s.name]) if s.name in input_shapes
            else tuple(sizes.get(d, d) if isinstance(d, str) else d for d in s.shape)
            for s in specs}


def static_onnx(model, shapes: dict[str, tuple]):
    """A copy of the ONNX ``model`` with the input dimensions in ``shapes`` made static and the
    shape arithmetic that depended on them folded into constants.

    TVM's ONNX frontend follows symbolic shape arithmetic only part of the way (BERT with an
    attention mask fails in Reshape); with constants it takes the simple path.
    """
    import onnx
    from onnxscript import optimizer
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        for d, size in zip(vi.type.tensor_type.shape.dim, shapes.get(vi.name, ())):
            if isinstance(size, int):
                d.Clear()
                d.dim_value = size
    # intermediate and output shapes were inferred for symbolic inputs: infer them again
    del m.graph.value_info[:]
    for vi in m.graph.output:
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
    quiet = logging.getLogger("onnxscript")  # it logs every fold it tries and skips
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        optimizer.fold_constants(m)
        optimizer.remove_unused_nodes(m)
    finally:
        quiet.setLevel(level)
    # onnxscript's folder skips some Shape-derived arithmetic (e.g. a Mul on a sliced Shape);
    # onnx-graphsurgeon's folder evaluates it with onnxruntime
    import onnx_graphsurgeon as gs
    plain_graphsurgeon_logs()
    try:  # Shape ops fold only where the shapes are known
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # noqa: BLE001 - best effort: without shapes, less folds
        pass
    graph = gs.import_onnx(m)
    graph.fold_constants(error_ok=True).cleanup()
    folded = gs.export_onnx(graph)
    folded.ClearField("metadata_props")
    folded.metadata_props.extend(m.metadata_props)
    return folded


def to_relax(graph, input_shapes: dict | None = None) -> tuple[tvm.IRModule, list, list]:
    """Import ``graph`` into a Relax IRModule; returns (module, input specs, output specs).

    Specs are dicts ``{"name", "shape", "dtype"}``; a dimension left symbolic is its name.
    """
    graph = _as_graph(graph)
    specs = graph.input_specs()
    if input_shapes:
        shapes = resolve_input_shapes(specs, input_shapes)
        if graph.backend == "onnx" and any(shapes[s.name] != s.shape for s in specs):
            graph = Graph("onnx", static_onnx(graph.onnx, shapes), history=graph.history)
    elif graph.backend == "onnx" and all(isinstance(d, int) for s in specs for d in s.shape):
        # static inputs: fold Shape-derived arithmetic (exporters and passes such as
        # prune_heads leave it) into constants, which TVM's ONNX frontend imports reliably
        graph = Graph("onnx", static_onnx(graph.onnx, {s.name: s.shape for s in specs}),
                      history=graph.history)
    mod = _import_fx(graph) if graph.backend == "fx" else _import_onnx(graph)
    names = list(graph.input_names)
    main = mod["main"]
    if len(main.params) != len(names):
        raise SlimcError(f"TVM imported {len(main.params)} inputs for a model with "
                         f"{len(names)} ({names}).",
                         "This is a slimc bug; please report it with the model.")
    inputs = [_spec(n, p.ty) for n, p in zip(names, main.params)]
    results = _leaves(main.ret_ty)
    out_names = list(graph.output_names)
    if len(out_names) != len(results):  # e.g. nested outputs: name the leaves by position
        out_names = [f"output_{i}" for i in range(len(results))]
    outputs = [_spec(n, t) for n, t in zip(out_names, results)]
    return mod, inputs, outputs


# -- schedules and build ---------------------------------------------------------------------
def schedule_hook(tune, db=None) -> ScheduleHook | None:
    """What ``compile(..., tune=..., db=...)`` runs between import and lowering.

    ``tune="default"`` (the default): on CPU targets, the kernels picked for what the graph
    holds (:func:`.select.select_kernels`): int8 matmuls on the VNNI kernels where the target
    has AVX512-VNNI, block-sparse weights past the measured crossover on the BSR kernels, the
    rest on slimc's default CPU schedules (:func:`.schedules.apply_default_schedules`: tiled,
    vectorised, parallel matmuls with packed weights, vectorised fast math); on CUDA, TVM's
    default pipeline with DLight's GPU schedules. With ``db`` (a tuning database from ``slimc tune``), its records are applied
    and the default schedules fill the gaps. ``tune=None``: TVM's stock pipeline with no
    schedules (slow on CPU: for comparison only). A callable ``(mod, target) -> mod`` is run as
    given instead of the selection (e.g. ``slimc.codegen.int8.int8_schedules``).
    """
    if db is not None:
        if tune not in ("default", None):
            raise OptionError("db= and a custom tune= hook are alternatives.",
                              "Pass db= alone (its records plus default schedules), or wrap "
                              "slimc.codegen.tune.apply_database in your hook.")
        from .tune import database_hook
        return database_hook(db)
    if tune == "default":
        return select_kernels
    if tune is None:
        return None
    if callable(tune):
        return tune
    raise OptionError(f"tune={tune!r} is not a schedule choice.",
                      "Pass 'default', None (TVM's stock pipeline) or a callable "
                      "(mod, target) -> mod.")


def _describe(hook, device: str) -> str | None:
    """What scheduled the build, for metadata.json."""
    if hook is None:
        return None
    if device == "cuda" and hook in (apply_default_schedules, select_kernels):
        return "DLight (TVM's default CUDA pipeline)"   # the hook leaves CUDA modules alone
    return getattr(hook, "__qualname__", None) or repr(hook)


def compile(graph, target="x86", *, input_shapes: dict | None = None, tune="default",
            db=None, target_options: dict | None = None) -> Artifact:
    """Compile ``graph`` (a :class:`slimc.Graph`) for ``target`` into an :class:`Artifact`.

    ``target``: ``"x86"`` (this CPU), ``"arm"``, ``"cuda"`` or a TVM target (see
    :func:`slimc.codegen.targets.resolve_target`; ``target_options`` go to it).
    ``input_shapes``: ``{input name: shape}`` for inputs with symbolic dimensions (ONNX models
    exported with dynamic axes); dimensions left symbolic stay dynamic in the library.
    ``tune`` / ``db``: schedules, see :func:`schedule_hook` (default: slimc's default CPU
    schedules; ``db``: a tuning database directory written by ``slimc tune``).
    ``metadata["kernels"]`` counts the matmuls by the kernel each got (VNNI, int32 loops, BSR,
    dense; :func:`.select.kernel_counts`); integer matmuls left as int32 loops on a CPU
    without AVX512-VNNI warn (:class:`.select.SlowInt8Warning`).
    """
    tgt = resolve_target(target, **(target_options or {}))
    device = device_kind(tgt)
    hook = schedule_hook(tune, db)
    # the executable is run in this process, right after, more often than not: TVM's thread
    # pool must be sized before its first parallel kernel (see use_physical_cores)
    use_physical_cores()
    graph = _as_graph(graph)
    _refuse_nan_weights(graph)
    start = time.perf_counter()
    mod, inputs, outputs = to_relax(graph, input_shapes)
    # index inputs are range-checked by the runtime before each call; gathers of computed
    # indices read clipped (codegen/bounds.py)
    ranges, unchecked = index_ranges(mod, [s["name"] for s in inputs])
    mod = guard_computed_indices(mod, unchecked)
    matmuls = count_matmuls(mod)
    if hook is not None:
        mod = hook(mod, tgt)
    kernels = kernel_counts(matmuls, mod)
    if device == "cpu":
        warn_slow_int8(kernels, tgt)
    try:
        # tvm_native_noise: TVM's warning about gathers in "fast" mode, which slimc's checks
        # make moot (codegen/bounds.py), printed where TVM legalizes (here unless hook did)
        with keep_cuda_source() if device == "cuda" else contextlib.nullcontext(), \
                tvm_native_noise():
            executable = tvm.compile(mod, target=tgt, relax_pipeline="default")
    except Exception as e:
        dynamic = sorted({d for s in inputs for d in s["shape"] if isinstance(d, str)})
        hint = (f"The model has symbolic dimensions {dynamic}; fixing them with "
                "input_shapes={...} often helps. " if dynamic else "")
        raise UnsupportedError(f"TVM could not build the model for {tgt.kind.name}: "
                               f"{_last_line(e)}",
                               f"{hint}Otherwise report it with the model and target.") from e
    # CUDA: check that every kernel runs on the GPU and compile the kernels here (nvcc), so the
    # deployment machine needs no CUDA compiler (codegen/cuda.py)
    device_code = precompile_cuda(executable, tgt) if device == "cuda" else None
    seconds = time.perf_counter() - start
    name = target if isinstance(target, str) else None
    metadata = {
        "slimc_version": __version__,
        "tvm_version": tvm.__version__,
        "target": {"name": name, "tvm": str(tgt), "device": device,
                   "triple": target_triple(tgt), "isa": isa_features(tgt)},
        "build_host": host_cpu(),
        "inputs": inputs,
        "outputs": outputs,
        "index_ranges": ranges,
        "source": graph.backend,
        "passes": list(graph.history),
        "relax_pipeline": "default",
        "schedules": _describe(hook, device),
        "kernels": kernels,
        "weights": "bound",
    }
    if unchecked:
        metadata["clipped_indices"] = unchecked
    if device_code is not None:
        metadata["cuda"] = device_code.summary()
    art = Artifact(executable, metadata, device_code=device_code)
    # a measurement, kept out of metadata.json: the same build writes the same file
    art.compile_seconds = round(seconds, 3)
    return art
