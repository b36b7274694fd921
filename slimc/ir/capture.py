"""Getting graphs in and out: torch.export capture, ONNX load/save, reference execution."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from .._quiet import torch_internal_warnings
from ..errors import CaptureError, InputFileError, ShapeError, SlimcError, UnsupportedError
from .graph import Graph

# ONNX protobufs cannot exceed 2 GiB; above this we save weights as external data.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _size(model) -> int:
    from .onnx import serialized_size  # ByteSize() raises over 2 GiB
    return serialized_size(model)


def _to_numpy_inputs(example_inputs) -> tuple[np.ndarray, ...]:
    import torch
    out = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            out.append(x.detach().cpu().numpy())
        else:
            out.append(np.asarray(x))
    return tuple(out)


@contextlib.contextmanager
def _no_mha_fastpath():
    """nn.MultiheadAttention / TransformerEncoderLayer have an inference fast path that is one
    opaque op; capture the decomposed form so passes can see the heads."""
    import torch
    backends = getattr(torch.backends, "mha", None)
    if backends is None:
        yield
        return
    old = backends.get_fastpath_enabled()
    backends.set_fastpath_enabled(False)
    try:
        yield
    finally:
        backends.set_fastpath_enabled(old)


def capture(module, example_inputs, *, dynamic_shapes=None, strict: bool = False) -> Graph:
    """Capture ``module(*example_inputs)`` with ``torch.export`` into an FX :class:`Graph`.

    The module is deep-copied first and put in eval mode on the copy, so passes on the graph can
    never change the user's weights.
    """
    import torch
    if not isinstance(module, torch.nn.Module):
        raise CaptureError(f"slimc.capture() needs a torch.nn.Module, got {type(module).__name__}.",
                           "Wrap your function in a torch.nn.Module.")
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    example_inputs = tuple(torch.as_tensor(x) if isinstance(x, np.ndarray) else x
                           for x in example_inputs)
    try:
        mod = copy.deepcopy(module).eval()
    except Exception as e:
        raise CaptureError(f"Could not copy the module before capture: {e}",
                           "slimc copies the module so it never edits your weights; make the "
                           "module deep-copyable.") from e
    try:
        with _no_mha_fastpath(), torch.no_grad():
            ep = torch.export.export(mod, example_inputs, dynamic_shapes=dynamic_shapes,
                                     strict=strict)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ("If it is a transformers model returning a cache, pass use_cache=False in its "
                "config. " if "Cache" in str(e) else "")
        raise CaptureError(
            f"torch.export could not capture {type(module).__name__}: {msg[:400]}",
            f"{hint}Make the forward traceable (no data-dependent Python control flow, "
            "no unsupported outputs), or export it to ONNX yourself and use slimc.load().") from e
    gm = ep.module()
    names = [spec.arg.name for spec in ep.graph_signature.input_specs
             if spec.kind.name == "USER_INPUT"]
    n_out = len(ep.graph_signature.user_outputs)
    return Graph("fx", gm, example_inputs=_to_numpy_inputs(example_inputs), input_names=names,
                 output_names=[f"output_{i}" for i in range(n_out)], history=["capture"])


def run_fx(gm, inputs) -> list[np.ndarray]:
    import torch
    import torch.utils._pytree as pytree
    args = [torch.as_tensor(np.ascontiguousarray(x)) for x in inputs]
    with torch.no_grad():
        out = gm(*args)
    leaves = pytree.tree_leaves(out)
    return [t.detach().cpu().numpy() for t in leaves if isinstance(t, torch.Tensor)]


def _ort_session(model):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    if _size(model) < _EXTERNAL_DATA_THRESHOLD:
        return ort.InferenceSession(model.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.onnx")
        _save_onnx(model, path)
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run_onnx(model, inputs) -> list[np.ndarray]:
    try:
        sess = _ort_session(model)
    except Exception as e:
        raise UnsupportedError(f"onnxruntime cannot run this model: {str(e).strip()[:400]}",
                               "Check the model with `slimc inspect`; unsupported ops or "
                               "domains must be removed or replaced.") from e
    names = [i.name for i in sess.get_inputs()]
    feeds = {n: np.ascontiguousarray(x) for n, x in zip(names, inputs)}
    try:
        return [np.asarray(o) for o in sess.run(None, feeds)]
    except Exception as e:  # onnxruntime's own exception types; the message says what
        text = " ".join(str(e).split())[:400]
        if "INVALID_ARGUMENT" in text:
            raise ShapeError(f"onnxruntime rejects the inputs: {text}",
                             "Give one array per model input with the shape and dtype of "
                             "graph.input_specs().") from e
        raise UnsupportedError(f"onnxruntime failed running this model: {text}",
                               "Check the model with `slimc inspect`; a node may be invalid "
                               "for the shapes it gets.") from e


def load(path) -> Graph:
    """Load a model file into a :class:`Graph`.

    ``.onnx``: an ONNX model (external data next to it is loaded too) → ONNX backend.
    ``.pt2``: a ``torch.export.save``-d program (with its example inputs) → FX backend.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"No such file: {path}.", "Check the path to the model file.")
    if path.is_dir():
        raise InputFileError(f"{path} is a directory, not a model file.",
                             "Pass the path of the .onnx (or .pt2) file inside it.")
    if path.suffix == ".pt2":
        return _load_pt2(path)
    return _load_onnx(path)


def _load_pt2(path: Path) -> Graph:
    import torch
    try:
        ep = torch.export.load(str(path))
    except Exception as e:
        raise InputFileError(f"{path} is not a loadable torch.export program: "
                             f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else e!r}",
                             "Re-save it with torch.export.save() or slimc's graph.save('x.pt2'). "
                             "The file may be truncated or from an incompatible torch "
                             "version.") from e
    args = ep.example_inputs[0] if ep.example_inputs else None
    if args is None:
        raise InputFileError(f"{path} holds no example inputs.",
                             "Export with torch.export.export(module, example_args) so the "
                             "program records them.")
    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    n_out = len(ep.graph_signature.user_outputs)
    return Graph("fx", ep.module(), example_inputs=_to_numpy_inputs(args), input_names=names,
                 output_names=[f"output_{i}" for i in range(n_out)], history=["load"])


def _load_onnx(path: Path) -> Graph:
    import onnx
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputFileError(f"Cannot read {path}: {e.strerror}.", "Check its permissions.") from e
    if not data:
        raise InputFileError(f"{path} is empty (0 bytes).", "Re-export the model.")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:
        raise InputFileError(
            f"{path} is not a valid ONNX model: the protobuf does not parse "
            f"({type(e).__name__}). The file is probably truncated or corrupt.",
            "Re-export or re-download the model.") from e
    if not model.graph.node and not model.graph.output:
        raise InputFileError(f"{path} parses but holds no graph (no nodes, no outputs): it is "
                             "not an ONNX model or it is corrupt.", "Re-export the model.")
    _check_names(model.graph, path)
    _check_opset(model, path)
    _check_structure(model, path)
    _check_input_dims(model, path)
    _check_initializer_sizes(model, path)  # the inline ones; external data is checked below
    _check_shape_constants(model, path)
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data
    external = any(uses_external_data(t) for t in model.graph.initializer)
    if external:
        _check_external_files(model, path)
    try:
        # before the external data is read: the checker on the file checks the references
        # (files exist, stay inside the model's folder) without holding the weights twice
        onnx.checker.check_model(str(path) if external else model)
    except Exception as e:
        raise InputFileError(
            f"{path} is not a valid ONNX model: {' '.join(str(e).split())[:400]}",
            "Fix the model (onnx.checker.check_model names the offending node) or re-export "
            "it.") from e
    if external:
        try:
            load_external_data_for_model(model, str(path.parent))
        except Exception as e:  # OSError, or onnx's ValidationError for a missing/odd file
            raise InputFileError(
                f"{path} refers to external weight data that cannot be read: {e}.",
                "Keep the .onnx file next to its external data file(s), with their original "
                "names.") from e
        _check_initializer_sizes(model, path)
    if not model.graph.output:
        raise InputFileError(f"{path} has no graph outputs.", "Re-export the model.")
    return Graph("onnx", model, history=["load"])


def _check_external_files(model, path: Path) -> None:
    """Each external weight's file exists inside the model's folder and holds its bytes."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    base = path.parent.resolve()
    fix = ("Keep the .onnx file next to its external data file(s), with their original "
           "names.")
    for t in model.graph.initializer:
        if not uses_external_data(t):
            continue
        info = ExternalDataInfo(t)
        loc = info.location or ""
        where = path.parent / loc
        problem = f"{path} refers to external weight data that cannot be read: weight {t.name!r}"
        if not loc or os.path.isabs(loc) or not where.resolve().is_relative_to(base):
            raise InputFileError(f"{problem} is stored at {loc!r}, outside the model's folder.",
                                 "slimc reads external data from the model's folder only; "
                                 "move the file next to the model and fix its location.")
        if not where.is_file():
            raise InputFileError(f"{problem} is stored in {loc!r}, which does not exist.", fix)
        size, offset = where.stat().st_size, int(info.offset or 0)
        end = offset + (int(info.length) if info.length is not None else 0)
        if offset > size or end > size:
            raise InputFileError(f"{problem} needs bytes {offset}..{end} of {loc!r}, which has "
                                 f"{size}.", f"The data file is truncated or from another "
                                 f"export. {fix}")


def _check_names(graph, path: Path) -> None:
    """Names must be text: protobuf hands back a corrupt (non-UTF-8) string as bytes, which every
    tool after it (graphsurgeon, onnx.helper) chokes on."""
    named = [*graph.input, *graph.output, *graph.value_info, *graph.initializer]
    for k, n in enumerate(graph.node):
        texts = [n.name, n.op_type, n.domain, *n.input, *n.output, *(a.name for a in n.attribute)]
        bad = next((t for t in texts if isinstance(t, bytes)), None)
        if bad is not None:
            raise InputFileError(f"{path}: node #{k} holds the name {bad!r}, which is not valid "
                                 "UTF-8 text.", "The file is corrupt; re-export it.")
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _check_names(sub, path)
    bad = next((v.name for v in named if isinstance(v.name, bytes)), None)
    if bad is not None:
        raise InputFileError(f"{path}: the value {bad!r} has a name that is not valid UTF-8 "
                             "text.", "The file is corrupt; re-export it.")


def _check_opset(model, path: Path) -> None:
    import onnx
    newest = onnx.defs.onnx_opset_version()
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version > newest:
            raise UnsupportedError(
                f"{path} uses ONNX opset {op.version}, newer than the newest this onnx "
                f"{onnx.__version__} knows ({newest}).",
                f"Re-export the model with opset_version <= {newest}.")


def _check_structure(model, path: Path) -> None:
    """Every value a node reads is made somewhere, and the nodes form no cycle (the checker
    says only "not topologically sorted" for both)."""
    g = model.graph
    known = {v.name for v in g.input} | {t.name for t in g.initializer} | {""}
    known |= {t.values.name for t in g.sparse_initializer}
    producer = {out: k for k, n in enumerate(g.node) for out in n.output if out}
    for k, n in enumerate(g.node):
        for name in n.input:
            if name not in known and name not in producer:
                raise InputFileError(
                    f"{path}: node {n.name or k!r} ({n.op_type}) reads {name!r}, which no node, "
                    "graph input or initializer produces (a dangling input or a missing "
                    "initializer).", "Re-export the model; a tool that removed nodes or "
                    "initializers left the graph broken.")
    for out in g.output:
        if out.name not in known and out.name not in producer:
            raise InputFileError(f"{path}: graph output {out.name!r} is made by no node.",
                                 "Re-export the model.")
    deps = [{producer[i] for i in n.input if i in producer} for n in g.node]
    users: dict[int, list[int]] = {}
    for k, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(k)
    waiting = [len(d) for d in deps]
    ready = [k for k, w in enumerate(waiting) if w == 0]
    done = 0
    while ready:
        k = ready.pop()
        done += 1
        for u in users.get(k, ()):
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    if done < len(g.node):
        stuck = [g.node[k].name or f"#{k} {g.node[k].op_type}" for k, w in enumerate(waiting)
                 if w > 0]
        raise InputFileError(
            f"{path}: the graph has a cycle: nodes {', '.join(map(repr, stuck[:6]))}"
            f"{' ...' if len(stuck) > 6 else ''} wait on each other's outputs.",
            "An ONNX graph must be acyclic; re-export the model.")


_SHAPE_INPUT = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0, "Tile": 1}
# ops through which onnx's shape inference propagates values (data_prop), from Shape outputs
_SHAPE_MATH = {"Shape", "Gather", "Concat", "Unsqueeze", "Squeeze", "Slice", "Mod", "Add", "Sub",
               "Mul", "Div", "Cast", "Reshape", "Identity", "Size"}


def _check_shape_constants(model, path: Path) -> None:
    """Constant shapes no tensor can have. A corrupt one is not harmless: onnx's shape inference
    with data propagation (which slimc's passes use) builds a vector of that many entries when it
    reshapes a shape computation, and runs out of memory (a flipped byte turned a [1] into
    [200111116255233] in the fuzz)."""
    from onnx import TensorProto, numpy_helper
    const = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value" and a.HasField("t"):
                    const[n.output[0]] = a.t
    producer = {o: n for n in model.graph.node for o in n.output}

    def small_ints(t) -> bool:
        return t.data_type in (TensorProto.INT64, TensorProto.INT32) and len(t.dims) <= 1 \
            and (not t.dims or t.dims[0] <= 64) and t.data_location != TensorProto.EXTERNAL

    memo: dict[str, bool] = {}

    def shape_derived(name: str, depth: int = 0) -> bool:
        """Computed from Shape outputs and small integer constants only (what data
        propagation follows)."""
        if name in const:
            return small_ints(const[name])
        if name not in memo:
            n = producer.get(name)
            if n is None or depth > 32 or n.op_type not in _SHAPE_MATH:
                memo[name] = False
            elif n.op_type in ("Shape", "Size"):
                memo[name] = True
            else:
                ins = [i for i in n.input if i]
                memo[name] = bool(ins) and all(shape_derived(i, depth + 1) for i in ins)
        return memo[name]

    for n in model.graph.node:
        k = _SHAPE_INPUT.get(n.op_type)
        if k is None or len(n.input) <= k or n.input[k] not in const:
            continue
        t = const[n.input[k]]
        if not small_ints(t):
            continue  # not a shape vector: the checker and onnxruntime judge it
        values = numpy_helper.to_array(t).ravel().tolist()
        big = [v for v in values if v > 2**31 - 1]
        elements = int(np.prod([v for v in values if v > 0], dtype=np.float64))
        if big or n.op_type == "Reshape" and shape_derived(n.input[0]) and elements > 2**16:
            what = "a dimension over 2^31" if big else f"{elements} values of a shape computation"
            raise ShapeError(
                f"{path}: node {n.name or n.op_type!r} ({n.op_type}) asks for the shape "
                f"{values} ({what}), which no tensor can have: the file is corrupt.",
                "Re-export the model.")


def _check_input_dims(model, path: Path) -> None:
    from onnx import helper
    init = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        if vi.type.WhichOneof("value") != "tensor_type":
            raise UnsupportedError(f"{path}: input {vi.name!r} is not a tensor "
                                   f"({vi.type.WhichOneof('value')}).",
                                   "slimc handles models whose inputs are tensors.")
        try:
            np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
        except Exception as e:  # UNDEFINED, or a number no ONNX version defines
            raise InputFileError(f"{path}: input {vi.name!r} has no valid element type "
                                 f"({vi.type.tensor_type.elem_type}).",
                                 "The file is corrupt; re-export it.") from e
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value <= 0:
                raise ShapeError(
                    f"{path}: input {vi.name!r} has dimension {d.dim_value} on axis {axis}; "
                    "slimc needs every fixed dimension to be positive (a 0-sized input holds no "
                    "data to check, calibrate or compile with).",
                    "Re-export the model with a positive size there, or a symbolic "
                    "dimension.")


def _check_initializer_sizes(model, path: Path) -> None:
    """Raw weight bytes must match the declared shape (a corrupt file can declare anything)."""
    import onnx
    from onnx import helper
    tensors = list(model.graph.initializer) + [
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
        if a.HasField("t")]
    for t in tensors:
        if any(d < 0 for d in t.dims):
            raise InputFileError(f"{path}: weight {t.name!r} has a negative dimension "
                                 f"{list(t.dims)}.", "The file is corrupt; re-export it.")
        if not t.HasField("raw_data"):
            continue
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        except Exception as e:  # an unknown or undefined element type
            raise InputFileError(f"{path}: weight {t.name!r} has an unknown element type "
                                 f"({t.data_type}).", "The file is corrupt; re-export it.") \
                from e
        if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
                           onnx.TensorProto.FLOAT4E2M1):
            continue  # packed two to a byte
        want = int(np.prod(t.dims, dtype=np.int64)) * itemsize
        if len(t.raw_data) != want:
            raise InputFileError(
                f"{path}: weight {t.name!r} declares shape {list(t.dims)} ({want} bytes) but "
                f"holds {len(t.raw_data)} bytes.", "The file is truncated or corrupt; "
                "re-export it.")


def _atomic_target(path: Path) -> Path:
    from .._atomic import temp_file
    return temp_file(path)


def _save_onnx(model, path) -> None:
    """Save atomically: a temporary file in the same folder, renamed into place."""
    from .._atomic import replace_file
    path = Path(path)
    tmp, tmp_data = _atomic_target(path), None
    try:
        if _size(model) < _EXTERNAL_DATA_THRESHOLD:
            tmp.write_bytes(model.SerializeToString())
            replace_file(tmp, path)
            _remove_old_data(path, keep=None)
            return
        # the weights go to a data file named after its content (same weights, same name), so
        # the model already at ``path`` keeps its own data until the model file is replaced;
        # then the old data files go
        tmp_data = _atomic_target(path.parent / (path.name + ".data"))
        m, digest = _external_copy(model, tmp_data)
        data_name = f"{path.name}.{digest}.data"
        for t in m.graph.initializer:   # the model refers to the data file by its final name
            for kv in t.external_data:
                if kv.key == "location":
                    kv.value = data_name
        tmp.write_bytes(m.SerializeToString())
        replace_file(tmp_data, path.parent / data_name)
        replace_file(tmp, path)
        _remove_old_data(path, keep=data_name)
    finally:
        for p in (tmp, tmp_data):
            if p is not None and p.exists():
                p.unlink()


def _external_copy(model, data_path: Path):
    """``model`` with every initializer over 1 KiB moved to the file ``data_path`` (ONNX external
    data); returns (that model, a digest of the data). The weights are written one tensor at a
    time from ``model`` itself: no second copy of them in memory (onnx.save_model's external
    data conversion edits the model it is given, which would need a full copy first)."""
    import onnx

    from .onnx import copy_except
    m = onnx.ModelProto()
    copy_except(model, m, {"graph"})
    copy_except(model.graph, m.graph, {"initializer"})
    digest = hashlib.blake2b()
    with open(data_path, "wb") as f:
        for t in model.graph.initializer:
            if not t.HasField("raw_data") or t.ByteSize() <= 1024:
                m.graph.initializer.append(t)
                continue
            raw = t.raw_data
            stub = m.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims,
                                            data_location=onnx.TensorProto.EXTERNAL)
            for key, value in (("location", data_path.name), ("offset", str(f.tell())),
                               ("length", str(len(raw)))):
                stub.external_data.add(key=key, value=value)
            f.write(raw)
            digest.update(raw)
            del raw
    return m, digest.hexdigest()[:8]


def _remove_old_data(path: Path, keep: str | None) -> None:
    """Delete the external-data files of the model ``path`` replaced (``<name>.data`` or
    ``<name>.<8 hex>.data``), all but ``keep``."""
    old = re.compile(rf"{re.escape(path.name)}(\.[0-9a-f]{{8}})?\.data")
    for p in path.parent.iterdir():
        if p.name != keep and old.fullmatch(p.name):
            p.unlink(missing_ok=True)


def save(graph: Graph, path) -> None:
    path = Path(path)
    if path.suffix == ".pt2":
        import torch
        ep = export_program(graph)
        tmp = _atomic_target(path)
        try:
            # node provenance ("from_node") records Python object ids (graph_id): drop it, or the
            # same program gives different bytes in every process
            for node in ep.graph.nodes:
                node.meta.pop("from_node", None)
            # to a file object: given a path, the archive's root folder takes the file's name,
            # here a random temporary one
            with open(tmp, "wb") as f:
                torch.export.save(ep, f)
            from .._atomic import replace_file
            replace_file(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return
    if path.suffix != ".onnx":
        raise SlimcError(f"Cannot save to {path}: unknown extension {path.suffix!r}.",
                         "Use .onnx (ONNX) or .pt2 (torch.export program).")
    _save_onnx(graph.to_onnx(), path)


def export_program(graph: Graph):
    """Re-export the FX graph module into a fresh ExportedProgram."""
    import torch
    if graph.backend != "fx":
        raise UnsupportedError("Only FX graphs can become a torch.export program.",
                               "Use graph.save('model.onnx') for ONNX graphs.")
    args = tuple(torch.as_tensor(x) for x in graph.example_inputs)
    try:
        with torch.no_grad():
            return torch.export.export(graph.native, args, strict=False)
    except Exception as e:
        raise CaptureError(f"Re-exporting the FX graph failed: {str(e).splitlines()[0][:400]}",
                           "This is a slimc bug if a pass produced the graph; please report "
                           "it with the pass list.") from e


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx's exporter logs progress and warnings (missing torchvision, optimizer
    retries) that are noise to a slimc user; keep only errors."""
    import logging
    names = ("torch.onnx", "onnxscript", "onnx_ir", "torch.onnx._internal.exporter")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), torch_internal_warnings():
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def fx_to_onnx(graph: Graph):
    import torch
    ep = export_program(graph)
    try:
        with _quiet_exporter():
            prog = torch.onnx.export(ep, tuple(torch.as_tensor(x) for x in graph.example_inputs),
                                     dynamo=True, verbose=False, input_names=graph.input_names,
                                     external_data=False)
    except Exception as e:
        raise UnsupportedError(f"torch.onnx could not export this graph: "
                               f"{str(e).strip().splitlines()[0][:400]}",
                               "Export the original module with torch.onnx.export yourself and "
                               "use slimc.load().") from e
    return prog.model_proto
