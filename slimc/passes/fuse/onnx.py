"""fuse on ONNX, with onnx-graphsurgeon: the model seen as canonical nodes, and plans written in
graphsurgeon's way (insert the new nodes, disconnect the old ones, ``cleanup().toposort()``).

The replaced node's output tensor is handed to its replacement, so tensor names read by others
— graph outputs included — never change. Canonical ops read here: the node's own op type
(``domain.Op`` outside the default domain), with these normalised: Softmax(``axis``, ``safe``
False), ReduceMean(``axes`` from attribute or input), Transpose(``perm``), Reshape / Squeeze /
Unsqueeze / Flatten → Reshape(``shape``, ``target``), Gemm (alpha = beta = 1, no transA, no 2-D
C) → Linear(``layout``), Identity / inference Dropout / same-type Cast → Identity, Split(``axis``,
``sizes``). Axes are negative (counted from the end).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..._quiet import plain_graphsurgeon_logs
from ._match import CNode, PConst, Plan, PlanOp, PValue

# Shape inference and graphsurgeon export work on an in-memory proto, which protobuf caps at 2 GiB.
_INFER_LIMIT = 1_800_000_000
# Minimum default-domain opset of the standard ops a plan may write.
_MIN_OPSET = {"LayerNormalization": 17, "Gelu": 20, "Attention": 23, "Split": 13}
# Ops whose first output has the shape of their first input (the only new shapes we record;
# the rest are left to the runtime's inference rather than guessed).
_SAME_SHAPE = {"Gelu", "LayerNormalization", "com.microsoft.Gelu",
               "com.microsoft.FastGelu", "com.microsoft.BiasGelu",
               "com.microsoft.SkipLayerNormalization"}


def _broadcast(a, b) -> list | None:
    """numpy broadcasting of two shapes, or None where it is not decidable statically."""
    if a is None or b is None:
        return None
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        da = a[-i] if i <= len(a) else 1
        db = b[-i] if i <= len(b) else 1
        if da == db or db == 1:
            out.append(da)
        elif da == 1:
            out.append(db)
        else:
            return None
    return out[::-1]


def _reshape_out(xs, target, allowzero: int) -> list | None:
    """The output shape of ONNX Reshape(x, target) when x's shape is static."""
    if xs is None or not all(isinstance(d, int) for d in xs):
        return None
    out = [xs[i] if d == 0 and not allowzero else d for i, d in enumerate(target)]
    if out.count(-1) == 1:
        known = math.prod(d for d in out if d != -1)
        if known == 0:
            return None
        out[out.index(-1)] = math.prod(xs) // known
    return out if math.prod(out) == math.prod(xs) and -1 not in out else None


def _matmul_shape(a, b) -> list | None:
    if a is None or b is None or len(a) < 2 or len(b) < 2:
        return None
    batch = _broadcast(a[:-2], b[:-2])
    return None if batch is None else batch + [a[-2], b[-1]]


def _empty(t) -> bool:
    return t is None or (isinstance(t, gs.Variable) and t.is_empty())


def _neg_axis(axis, rank):
    if axis is None:
        return None
    if rank is None:
        return axis if axis < 0 else None
    return axis - rank if axis >= 0 else axis


class OnnxHost:
    """The canonical view of one ONNX model (through graphsurgeon) and the writer of plans."""

    backend = "onnx"

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        source = model
        if model.ByteSize() < _INFER_LIMIT:
            try:
                source = onnx.shape_inference.infer_shapes(model, strict_mode=False,
                                                           data_prop=True)
            except Exception:  # noqa: BLE001 - shapes only refine matching; go on without
                source = model
        plain_graphsurgeon_logs()
        self.graph = gs.import_onnx(source)
        self._cache: dict[int, CNode | None] = {}
        self._consts: dict[int, np.ndarray | None] = {}
        self._names = set(self.graph.tensors().keys()) | {n.name for n in self.graph.nodes}

    # -- reading ---------------------------------------------------------------------------
    def nodes(self) -> list[CNode]:
        self.graph.toposort()
        out = []
        for n in self.graph.nodes:
            if not n.outputs:
                continue
            c = self.canon(n)
            if c is not None:
                out.append(c)
        return out

    def producer(self, v) -> CNode | None:
        if not isinstance(v, gs.Variable) or not v.inputs:
            return None
        return self.canon(v.inputs[0])

    def const(self, v) -> np.ndarray | None:
        if v is None:
            return None
        key = id(v)
        if key not in self._consts:
            self._consts[key] = self._const(v)
        return self._consts[key]

    def _const(self, v) -> np.ndarray | None:
        if isinstance(v, gs.Constant):
            return np.asarray(v.values)
        if not v.inputs:
            return None
        p = v.inputs[0]
        if p.op == "Constant":
            for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
                if key in p.attrs:
                    val = p.attrs[key]
                    if isinstance(val, gs.Constant):
                        return np.asarray(val.values)
                    dtype = np.float32 if "float" in key else np.int64
                    return np.asarray(val, dtype=dtype)
            return None
        if p.op == "Identity" and p.inputs:
            return self.const(p.inputs[0])
        return None

    def users(self, v) -> list:
        return list(v.outputs) if isinstance(v, gs.Tensor) else []

    def consumers(self, v) -> list[CNode | None]:
        """The canonical nodes reading ``v`` (None for a reader that is not one)."""
        return [self.canon(u) for u in self.users(v)]

    def is_graph_output(self, v) -> bool:
        return any(o is v for o in self.graph.outputs)

    def shape(self, v) -> tuple | None:
        if v is None:
            return None
        if isinstance(v, gs.Constant):
            return tuple(v.shape)
        if v.shape is None:
            c = self.const(v)
            return None if c is None else tuple(c.shape)
        return tuple(int(d) if isinstance(d, (int, np.integer)) and d >= 0 else str(d)
                     for d in v.shape)

    def static_shape(self, v) -> tuple[int, ...] | None:
        s = self.shape(v)
        return s if s is not None and all(isinstance(d, int) for d in s) else None

    def dtype(self, v) -> np.dtype | None:
        d = getattr(v, "dtype", None)
        if d is None:
            return None
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(d) if isinstance(d, int) else d)
        except Exception:  # noqa: BLE001 - a type numpy cannot name
            return None

    def opset(self, domain: str = "") -> int | None:
        if domain in ("", "ai.onnx"):
            return int(self.graph.opset)
        for o in self.graph.import_domains or ():
            if o.domain == domain:
                return int(o.version)
        return None

    def alive(self, c: CNode) -> bool:
        return all(n.outputs for n in c.natives)

    def same(self, a, b) -> bool:
        return a is b

    def describe(self, v) -> str:
        if isinstance(v, gs.Constant):
            return f"the constant {v.name}"
        if any(i is v for i in self.graph.inputs):
            return f"the graph input {v.name}"
        c = self.producer(v)
        if c is None:
            return f"the value {v.name}"
        return f"{c.op} {c.name}" if c.op != "Constant" else f"the constant {v.name}"

    def describe_node(self, n) -> str:
        return f"{n.op} {n.name}"

    # -- canonical nodes -------------------------------------------------------------------
    def canon(self, n: gs.Node) -> CNode | None:
        key = id(n)
        if key not in self._cache:
            self._cache[key] = self._canon(n)
        return self._cache[key]

    def _canon(self, n: gs.Node) -> CNode | None:
        if n.op == "Constant":
            return None
        domain = n.domain or ""
        op = n.op if domain in ("", "ai.onnx") else f"{domain}.{n.op}"
        ins = [None if _empty(t) else t for t in n.inputs]
        a = dict(n.attrs)
        x = ins[0] if ins else None
        xs = self.shape(x)
        rank = None if xs is None else len(xs)
        opset = self.opset("")

        def node(op, inputs, **attrs):
            inputs = list(inputs)
            while inputs and inputs[-1] is None:
                inputs.pop()
            return CNode(op, tuple(inputs), tuple(n.outputs), attrs, n.name or op, (n,))

        if op == "Softmax":
            axis = a.get("axis", -1 if opset >= 13 else 1)
            if opset < 13 and (rank is None or axis % rank != rank - 1):
                return node("Softmax(2-D)", ins, **a)  # coerces to 2-D: another function
            return node("Softmax", ins, axis=_neg_axis(axis, rank), safe=False)
        if op == "ReduceMean":
            axes = a.get("axes")
            if axes is None and len(ins) > 1 and ins[1] is not None:
                c = self.const(ins[1])
                axes = None if c is None else [int(v) for v in c.reshape(-1)]
            if axes is None or a.get("noop_with_empty_axes", 0):
                return node("ReduceMean(all)", ins, **a)
            return node("ReduceMean", ins[:1], keepdims=int(a.get("keepdims", 1)),
                        axes=tuple(sorted(_neg_axis(int(v), rank) for v in axes)))
        if op == "Transpose":
            perm = a.get("perm")
            if perm is None:
                if rank is None:
                    return node("Transpose(?)", ins)
                perm = list(reversed(range(rank)))
            return node("Transpose", ins, perm=tuple(int(p) for p in perm))
        if op == "Reshape":
            c = self.const(ins[1]) if len(ins) > 1 else None
            return node("Reshape", ins[:1], shape=self.static_shape(n.outputs[0]),
                        target=None if c is None else tuple(int(d) for d in c.reshape(-1)),
                        allowzero=int(a.get("allowzero", 0)))
        if op in ("Squeeze", "Unsqueeze", "Flatten"):
            out = self.static_shape(n.outputs[0])
            if out is not None:
                return node("Reshape", ins[:1], shape=out, target=None, allowzero=0)
            return node(op, ins, **a)
        if op == "Gemm":
            ws = self.shape(ins[1]) if len(ins) > 1 else None
            cs = self.shape(ins[2]) if len(ins) > 2 and ins[2] is not None else None
            if (a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0
                    and not a.get("transA", 0) and ws is not None and len(ws) == 2
                    and (len(ins) < 3 or ins[2] is None or (cs is not None and len(cs) == 1))):
                return node("Linear", ins, layout="out_in" if a.get("transB", 0) else "in_out")
            return node("Gemm", ins, **a)
        if op == "Identity":
            return node("Identity", ins)
        if op == "Dropout":
            training = self.const(ins[2]) if len(ins) > 2 else np.asarray(False)
            mask_used = len(n.outputs) > 1 and (n.outputs[1].outputs
                                                  or self.is_graph_output(n.outputs[1]))
            if training is not None and not bool(training) and not mask_used:
                return node("Identity", ins[:1])
            return node("Dropout", ins, **a)
        if op == "Cast":
            if x is not None and self.dtype(x) is not None and \
                    self.dtype(x) == self.dtype(n.outputs[0]):
                return node("Identity", ins[:1])
            return node("Cast", ins, **a)
        if op == "LayerNormalization":
            return node("LayerNormalization", ins, axis=_neg_axis(a.get("axis", -1), rank),
                        epsilon=float(a.get("epsilon", 1e-5)))
        if op == "Gelu":
            approx = a.get("approximate", "none")
            return node("Gelu", ins, approximate=approx.decode() if isinstance(approx, bytes)
                        else approx)
        if op == "Split":
            axis = _neg_axis(a.get("axis", 0), rank)
            sizes = None
            if len(ins) > 1 and ins[1] is not None:
                c = self.const(ins[1])
                sizes = None if c is None else tuple(int(s) for s in c.reshape(-1))
            elif "split" in a:
                sizes = tuple(int(s) for s in a["split"])
            else:
                shapes = [self.static_shape(o) for o in n.outputs]
                if axis is not None and all(s is not None for s in shapes):
                    sizes = tuple(s[axis] for s in shapes)
            if sizes is None or axis is None:
                return node("Split(?)", ins, **a)
            return node("Split", ins[:1], axis=axis, sizes=sizes)
        if op == "BatchNormalization":
            if a.get("training_mode", 0):
                return node("BatchNormalization(training)", ins, **a)
            return node("BatchNormalization", ins, epsilon=float(a.get("epsilon", 1e-5)))
        if op == "Concat":
            return node("Concat", ins, axis=_neg_axis(a.get("axis"), rank))
        return node(op, ins, **a)

    # -- writing ---------------------------------------------------------------------------
    def check_plan(self, plan: Plan) -> str | None:
        opset = self.opset("")
        for pop in plan.ops:
            need = _MIN_OPSET.get(pop.op)
            if need is not None and opset < need:
                hint = {"Gelu": "; rules.ONNXRUNTIME writes com.microsoft Gelu/BiasGelu/FastGelu",
                        "Attention": "; rules.ONNXRUNTIME writes com.microsoft "
                                     "MultiHeadAttention"}.get(pop.op, "")
                return (f"{pop.op} needs ONNX opset {need}; the model imports opset {opset} "
                        f"(upgrade it with onnx.version_converter.convert_version{hint})")
            if pop.op == "Linear":
                reason = self._linear_reason(pop)
                if reason:
                    return reason
            if pop.op == "Reshape" and pop.attrs.get("shape") is None \
                    and pop.attrs.get("target") is None:
                return "the new Reshape's shape is unknown"
        return None

    def _linear_reason(self, pop: PlanOp) -> str | None:
        x = pop.inputs[0]
        xs = None if isinstance(x, (PValue, PConst)) else self.shape(x)
        if xs is None:
            return "Gemm needs the rank of its input, which shape inference did not give"
        if len(xs) < 2:
            return f"Gemm is 2-D and its input is {len(xs)}-D"
        if len(xs) > 2 and not all(isinstance(d, int) for d in xs[:-1]):
            return (f"Gemm is 2-D; the {len(xs)}-D input {tuple(xs)} has dynamic leading "
                    "dimensions, so the output cannot be reshaped back with constants")
        return None

    def _fresh(self, base: str) -> str:
        base = base or "fused"
        name, k = base, 0
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    def _const_tensor(self, array: np.ndarray, hint: str) -> gs.Constant:
        return gs.Constant(self._fresh(f"fused_{hint}"), np.ascontiguousarray(array))

    def _var(self, base: str, dtype, shape) -> gs.Variable:
        return gs.Variable(self._fresh(base), dtype=dtype, shape=shape)

    def _node(self, op: str, inputs: list, n_out: int, base: str, dtype=None, shapes=None,
              domain: str | None = None, **attrs) -> list[gs.Variable]:
        outs = [self._var(f"{base}_out{i}" if n_out > 1 else f"{base}_out", dtype,
                          None if shapes is None else shapes[i]) for i in range(n_out)]
        ins = [gs.Variable.empty() if t is None else t for t in inputs]
        node = gs.Node(op, self._fresh(base), attrs={k: v for k, v in attrs.items()
                                                       if v is not None},
                       inputs=ins, outputs=outs, domain=domain)
        self.graph.nodes.append(node)
        return outs

    def _resolve(self, a, done):
        if isinstance(a, PValue):
            return done[id(a.op)][a.index]
        if isinstance(a, PConst):
            return self._const_tensor(a.array, a.hint)
        return a

    def commit(self, plan: Plan, mapping: list, match) -> None:
        base = match.root.name
        done: dict[int, list] = {}
        fresh: set[int] = set()
        for pop in plan.ops:
            args = [self._resolve(a, done) for a in pop.inputs]
            outs = self._emit(pop, args, base)
            done[id(pop)] = outs
            fresh.update(id(o) for o in outs if not any(o is t for t in args))
        for old, new in mapping:
            t = self._resolve(new, done)
            if t is old:
                continue
            # Hand the old tensor (its name, its readers) to the new value's producer when that
            # loses nothing: a value this plan made, or a graph output's replacement that is no
            # graph output, input or constant itself.
            handable = isinstance(t, gs.Variable) and t.inputs and (
                id(t) in fresh or (self.is_graph_output(old) and not self.is_graph_output(t)))
            if handable:
                fresh.discard(id(t))
                producer = t.inputs[0]
                idx = next(i for i, o in enumerate(producer.outputs) if o is t)
                readers = list(t.outputs)
                old.inputs.clear()
                producer.outputs[idx] = old
                for r in readers:
                    for i, inp in enumerate(r.inputs):
                        if inp is t:
                            r.inputs[i] = old
                continue
            for r in list(old.outputs):
                for i, inp in enumerate(r.inputs):
                    if inp is old:
                        r.inputs[i] = t
            if self.is_graph_output(old):
                old.inputs.clear()
                self.graph.nodes.append(gs.Node("Identity", self._fresh(f"{base}_id"),
                                                inputs=[t], outputs=[old]))
        natives = [nat for c in match.nodes for nat in c.natives]
        changed = True
        while changed:
            changed = False
            for nat in natives:
                if (nat.inputs or nat.outputs) and all(
                        not o.outputs and not self.is_graph_output(o) for o in nat.outputs):
                    nat.inputs.clear()
                    nat.outputs.clear()
                    changed = True
        self._cache.clear()

    def _emit(self, pop: PlanOp, args: list, base: str) -> list:
        op, a = pop.op, dict(pop.attrs)
        x = args[0] if args else None
        dtype = getattr(x, "dtype", None)
        xs = self.shape(x) if x is not None else None
        if op == "Identity":
            return [x]
        if op == "Linear":
            return self._emit_linear(args, a, base, dtype, xs)
        if op == "Reshape":
            shape = a.get("shape")
            if shape is not None and all(isinstance(d, int) for d in shape):
                target, allowzero = list(shape), int(0 in shape)
            else:
                target, allowzero = list(a["target"]), int(a.get("allowzero", 0))
                shape = _reshape_out(xs, target, allowzero)
            return self._node("Reshape", [x, gs.Constant(self._fresh(f"{base}_shape"),
                                                          np.asarray(target, np.int64))],
                              1, f"{base}_reshape", dtype, [shape], allowzero=allowzero)
        if op == "Transpose":
            perm = [int(p) for p in a["perm"]]
            shape = [xs[p] for p in perm] if xs is not None else None
            return self._node("Transpose", [x], 1, f"{base}_transpose", dtype, [shape],
                              perm=perm)
        if op == "Split":
            sizes = [int(s) for s in a["sizes"]]
            shapes = None
            if xs is not None:
                shapes = []
                for s in sizes:
                    d = list(xs)
                    d[a["axis"]] = s
                    shapes.append(d)
            return self._node("Split", [x, gs.Constant(self._fresh(f"{base}_split"),
                                                        np.asarray(sizes, np.int64))],
                              len(sizes), f"{base}_split", dtype, shapes, axis=int(a["axis"]))
        if op == "Attention":
            q, v = args[0], args[2]
            qs, vs = self.shape(q), self.shape(v)
            shape = None if qs is None or vs is None else list(qs[:-1]) + [vs[-1]]
            return self._node("Attention", args, 1, f"{base}_attention", dtype, [shape],
                              scale=float(a["scale"]))
        domain, op_type = (op.rsplit(".", 1) if "." in op else (None, op))
        n_out = pop.n_outputs
        attrs = {k: (float(v) if isinstance(v, (float, np.floating)) else v)
                 for k, v in a.items()}
        shapes = [None] * n_out
        if op in _SAME_SHAPE and xs is not None:
            shapes[0] = list(xs)
        elif op_type in ("Add", "Sub", "Mul", "Div") and len(args) == 2:
            shapes[0] = _broadcast(xs, self.shape(args[1]))
        elif op_type == "MatMul" and len(args) == 2:
            shapes[0] = _matmul_shape(xs, self.shape(args[1]))
        return self._node(op_type, args, n_out, f"{base}_{op_type.lower()}", dtype, shapes,
                          domain=domain, **attrs)

    def _emit_linear(self, args, a, base, dtype, xs) -> list:
        x, w = args[0], args[1]
        b = args[2] if len(args) > 2 else None
        trans_b = int(a.get("layout", "out_in") == "out_in")
        ws = self.shape(w)
        n_out = ws[0] if trans_b else ws[1]
        k = ws[1] if trans_b else ws[0]
        ins = [x, w] + ([b] if b is not None else [])
        if len(xs) == 2:
            return self._node("Gemm", ins, 1, f"{base}_gemm", dtype, [[xs[0], n_out]],
                              transB=trans_b)
        m = math.prod(xs[:-1])
        flat = self._node("Reshape", [x, gs.Constant(self._fresh(f"{base}_flat"),
                                                      np.asarray([m, k], np.int64))],
                          1, f"{base}_flatten", dtype, [[m, k]])[0]
        ins[0] = flat
        y = self._node("Gemm", ins, 1, f"{base}_gemm", dtype, [[m, n_out]], transB=trans_b)[0]
        out_shape = list(xs[:-1]) + [n_out]
        return self._node("Reshape", [y, gs.Constant(self._fresh(f"{base}_unflat"),
                                                      np.asarray(out_shape, np.int64))],
                          1, f"{base}_unflatten", dtype, [out_shape])

    def finish(self) -> onnx.ModelProto:
        self.graph.cleanup().toposort()
        model = gs.export_onnx(self.graph, do_type_check=False)
        src = self.model
        model.ir_version = src.ir_version
        model.producer_name = src.producer_name
        model.producer_version = src.producer_version
        model.domain = src.domain
        model.model_version = src.model_version
        model.doc_string = src.doc_string
        del model.metadata_props[:]
        model.metadata_props.extend(src.metadata_props)
        # graph outputs keep their names; keep their declarations too (types, shapes, docs)
        declared = {o.name: o for o in src.graph.output}
        for o in model.graph.output:
            if o.name in declared:
                o.CopyFrom(declared[o.name])
        # a value_info without a shape says nothing and the checker rejects it
        keep = [vi for vi in model.graph.value_info if vi.type.tensor_type.HasField("shape")]
        del model.graph.value_info[:]
        model.graph.value_info.extend(keep)
        meta = {n.name: n.metadata_props for n in src.graph.node if n.name and n.metadata_props}
        for n in model.graph.node:
            if n.name in meta and not n.metadata_props:
                n.metadata_props.extend(meta[n.name])
        return model
