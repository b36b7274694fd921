"""fuse on FX: a ``torch.fx.GraphModule`` from ``torch.export`` seen as canonical nodes, and plans
written back as aten calls. Edits the module in place (the caller owns the copy).

Canonical ops read here (aten → canonical): add/sub/mul/div/pow → Add/Sub/Mul/Div/Pow (Python
scalars become literal constants); sqrt, rsqrt, reciprocal, erf, tanh, sigmoid, relu, neg, exp,
isnan; mean.dim → ReduceMean; matmul/bmm/mm → MatMul; linear / addmm → Linear (``layout``
out_in / in_out); transpose/permute/t → Transpose(``perm``); view/reshape/(un)squeeze/(un)flatten
→ Reshape(``shape``); softmax/_safe_softmax → Softmax(``axis``, ``safe``); layer_norm →
LayerNormalization; gelu → Gelu; scaled_dot_product_attention → Attention; conv → Conv;
batch_norm (inference) → BatchNormalization; split → Split; cat → Concat; dropout in eval,
clone, contiguous, same-dtype copies → Identity. Anything else keeps its aten name.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx

from ._match import CNode, PConst, Plan, PlanOp, PValue

aten = torch.ops.aten


@dataclass(frozen=True)
class Lit:
    """A literal argument of an aten call (``mul(x, 0.5)``), seen as a constant value."""

    value: Any


_BINARY = {aten.add.Tensor: "Add", aten.add.Scalar: "Add", aten.sub.Tensor: "Sub",
           aten.sub.Scalar: "Sub", aten.mul.Tensor: "Mul", aten.mul.Scalar: "Mul",
           aten.div.Tensor: "Div", aten.div.Scalar: "Div", aten.pow.Tensor_Scalar: "Pow",
           aten.pow.Tensor_Tensor: "Pow"}
_UNARY = {aten.sqrt.default: "Sqrt", aten.rsqrt.default: "Rsqrt",
          aten.reciprocal.default: "Reciprocal", aten.erf.default: "Erf",
          aten.tanh.default: "Tanh", aten.sigmoid.default: "Sigmoid", aten.relu.default: "Relu",
          aten.neg.default: "Neg", aten.exp.default: "Exp", aten.isnan.default: "IsNaN"}
_IDENTITY = {aten.clone.default, aten.contiguous.default, aten.alias.default,
             aten.detach.default, aten.lift_fresh_copy.default}
_DROPOUT = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default}
_COPY = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device}
_MATMUL = {aten.matmul.default, aten.bmm.default, aten.mm.default}
_RESHAPE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
            aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
            aten.flatten.using_ints, aten.unflatten.int}
_EXPLICIT_SHAPE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_CONV = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
         aten.convolution.default}
_SPLIT = {aten.split.Tensor, aten.split_with_sizes.default}
# Checks torch.export leaves on values (dtype, device): they compute nothing, so they do not
# count as readers, and go with the value they check when it is fused away.
_ASSERTS = {aten._assert_tensor_metadata.default}

_EMIT_BINARY = {"Add": aten.add.Tensor, "Sub": aten.sub.Tensor, "Mul": aten.mul.Tensor,
                "Div": aten.div.Tensor, "Pow": aten.pow.Tensor_Tensor}
_EMIT_UNARY = {v: k for k, v in _UNARY.items()}
_EMITTABLE = (set(_EMIT_BINARY) | set(_EMIT_UNARY)
              | {"MatMul", "Linear", "Transpose", "Reshape", "Split", "Concat",
                 "LayerNormalization", "Gelu", "Attention", "Conv", "Identity", "Softmax"})


def _arg(n: torch.fx.Node, i: int, name: str, default=None):
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def _val(n) -> torch.Tensor | None:
    v = n.meta.get("val") if isinstance(n, torch.fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _rank(n) -> int | None:
    v = _val(n)
    return None if v is None else v.dim()


def _neg_axis(axis: int, rank: int | None) -> int | None:
    if rank is None:
        return axis if axis < 0 else None
    return axis - rank if axis >= 0 else axis


def _fetch(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _erased(n: torch.fx.Node) -> bool:
    return bool(getattr(n, "_erased", False))


class FxHost:
    """The canonical view of one GraphModule, and the writer of plans into it."""

    backend = "fx"

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.graph = gm.graph
        self._cache: dict[torch.fx.Node, CNode | None] = {}
        self._consts: dict[str, np.ndarray] = {}
        self._new = 0
        vals = [_val(n) for n in self.graph.nodes if n.op == "placeholder"]
        self.fake_mode = torch._guards.detect_fake_mode([v for v in vals if v is not None])

    # -- reading ---------------------------------------------------------------------------
    def nodes(self) -> list[CNode]:
        out = []
        for n in self.graph.nodes:
            if n.op == "call_function" and n.target is not operator.getitem:
                c = self.canon(n)
                if c is not None:
                    out.append(c)
        return out

    def producer(self, v) -> CNode | None:
        if not isinstance(v, torch.fx.Node) or v.op != "call_function":
            return None
        if v.target is operator.getitem:
            src = v.args[0]
            c = self.canon(src) if isinstance(src, torch.fx.Node) else None
            return c if c is not None and any(o is v for o in c.outputs) else None
        return self.canon(v)

    def const(self, v) -> np.ndarray | None:
        if isinstance(v, Lit):
            return np.asarray(v.value) if isinstance(v.value, (int, float, bool)) else None
        if isinstance(v, torch.fx.Node) and v.op == "get_attr":
            if v.target not in self._consts:
                t = _fetch(self.gm, v.target)
                if not isinstance(t, torch.Tensor):
                    return None
                self._consts[v.target] = t.detach().cpu().numpy()
            return self._consts[v.target]
        return None

    def users(self, v) -> list:
        if not isinstance(v, torch.fx.Node):
            return []
        return [u for u in v.users if not (u.op == "call_function" and u.target in _ASSERTS)]

    def consumers(self, v) -> list[CNode | None]:
        """The canonical nodes reading ``v`` (None for a reader that is not one)."""
        out = []
        for u in self.users(v):
            c = self.canon(u) if u.op == "call_function" and u.target is not operator.getitem \
                else None
            out.append(c)
        return out

    def is_graph_output(self, v) -> bool:
        return isinstance(v, torch.fx.Node) and any(u.op == "output" for u in v.users)

    def shape(self, v) -> tuple | None:
        if isinstance(v, Lit):
            return ()
        t = _val(v)
        if t is None:
            return None
        return tuple(int(d) if isinstance(d, int) else str(d) for d in t.shape)

    def dtype(self, v) -> np.dtype | None:
        t = _val(v)
        if t is None:
            return None
        try:
            return np.dtype(str(t.dtype).removeprefix("torch."))
        except TypeError:  # bfloat16 and other types numpy cannot name
            return None

    def opset(self, domain: str = "") -> int | None:
        return None

    def alive(self, c: CNode) -> bool:
        return not any(_erased(n) for n in c.natives)

    def same(self, a, b) -> bool:
        if isinstance(a, Lit) and isinstance(b, Lit):
            return type(a.value) is type(b.value) and a.value == b.value
        return a is b

    def describe(self, v) -> str:
        if isinstance(v, Lit):
            return f"the literal {v.value!r}"
        if not isinstance(v, torch.fx.Node):
            return repr(v)
        if v.op == "placeholder":
            return f"the graph input {v.name}"
        if v.op == "get_attr":
            return f"the weight {v.target}"
        c = self.producer(v)
        return f"{c.op} {v.name}" if c is not None else f"{v.target} {v.name}"

    def describe_node(self, n) -> str:
        if n.op == "output":
            return "the graph output"
        c = self.canon(n) if n.op == "call_function" else None
        return f"{c.op} {n.name}" if c is not None else f"{n.target} {n.name}"

    # -- canonical nodes -------------------------------------------------------------------
    def canon(self, n: torch.fx.Node) -> CNode | None:
        if n not in self._cache:
            self._cache[n] = self._canon(n)
        return self._cache[n]

    def _canon(self, n: torch.fx.Node) -> CNode | None:
        if n.op != "call_function":
            return None
        t = n.target

        def v(a):
            if a is None or isinstance(a, torch.fx.Node):
                return a
            return Lit(a)

        def node(op, inputs, outputs=None, natives=None, **attrs):
            inputs = list(inputs)
            while inputs and inputs[-1] is None:
                inputs.pop()
            return CNode(op, tuple(inputs), tuple(outputs or (n,)), attrs, n.name,
                         tuple(natives or (n,)))

        a0 = n.args[0] if n.args else None
        rank = _rank(a0) if isinstance(a0, torch.fx.Node) else None
        if t in _BINARY:
            if _arg(n, 2, "alpha", 1) != 1 or n.kwargs.get("rounding_mode") is not None:
                return self._raw(n)
            return node(_BINARY[t], (v(n.args[0]), v(n.args[1])))
        if t == aten.pow.Scalar:
            return node("Pow", (Lit(n.args[0]), v(n.args[1])))
        if t in _UNARY:
            return node(_UNARY[t], (v(a0),))
        if t in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
            return node("Where", (v(n.args[0]), v(n.args[1]), v(n.args[2])))
        if t == aten.mean.dim:
            dims = _arg(n, 1, "dim")
            if dims is None or n.kwargs.get("dtype") is not None or rank is None:
                return self._raw(n)
            axes = tuple(sorted(_neg_axis(d, rank) for d in dims))
            return node("ReduceMean", (a0,), axes=axes,
                        keepdims=int(bool(_arg(n, 2, "keepdim", False))))
        if t in _MATMUL:
            return node("MatMul", (a0, n.args[1]))
        if t == aten.linear.default:
            return node("Linear", (a0, n.args[1], _arg(n, 2, "bias")), layout="out_in")
        if t == aten.addmm.default:
            if n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1:
                return self._raw(n)
            return node("Linear", (n.args[1], n.args[2], n.args[0]), layout="in_out")
        if t == aten.transpose.int and rank is not None:
            d0, d1 = n.args[1] % rank, n.args[2] % rank
            perm = list(range(rank))
            perm[d0], perm[d1] = perm[d1], perm[d0]
            return node("Transpose", (a0,), perm=tuple(perm))
        if t == aten.permute.default and rank is not None:
            return node("Transpose", (a0,), perm=tuple(d % rank for d in n.args[1]))
        if t == aten.t.default and rank is not None:
            if rank < 2:
                return node("Identity", (a0,))
            return node("Transpose", (a0,), perm=(1, 0))
        if t in _RESHAPE:
            return node("Reshape", (a0,), shape=self.shape(n),
                        target=tuple(n.args[1]) if t in _EXPLICIT_SHAPE else None)
        if t in _SOFTMAX:
            dim = n.args[1]
            dtype, vin = _arg(n, 2, "dtype"), _val(a0)
            # softmax(x, dtype=float32) on a float32 x converts nothing
            if (t != aten._softmax.default and dtype is not None
                    and (vin is None or vin.dtype != dtype)) or \
                    (t == aten._softmax.default and n.args[2]):
                return self._raw(n)
            return node("Softmax", (a0,), axis=_neg_axis(dim, rank),
                        safe=t == aten._safe_softmax.default)
        if t in _DROPOUT:
            if not _arg(n, 2, "train", False) or _arg(n, 1, "p", 0.5) == 0:
                return node("Identity", (a0,))
            return self._raw(n)
        if t in _IDENTITY:
            return node("Identity", (a0,))
        if t in _COPY:
            vi, vo = _val(a0), _val(n)
            if vi is not None and vo is not None and vi.dtype == vo.dtype and \
                    vi.device == vo.device:
                return node("Identity", (a0,))
            return self._raw(n)
        if t == aten.layer_norm.default:
            ns = n.args[1]
            return node("LayerNormalization", (a0, v(_arg(n, 2, "weight")), v(_arg(n, 3, "bias"))),
                        axis=-len(ns), epsilon=float(_arg(n, 4, "eps", 1e-5)))
        if t == aten.gelu.default:
            return node("Gelu", (a0,), approximate=n.kwargs.get("approximate", "none"))
        if t == aten.scaled_dot_product_attention.default:
            return node("Attention", (a0, n.args[1], n.args[2], _arg(n, 3, "attn_mask")),
                        scale=n.kwargs.get("scale"), is_causal=bool(_arg(n, 5, "is_causal")),
                        dropout_p=float(_arg(n, 4, "dropout_p", 0.0)))
        if t in _CONV:
            if t == aten.convolution.default and n.args[6]:
                return self._raw(n)  # transposed convolution: weights are [in, out, ...]
            return node("Conv", (a0, n.args[1], _arg(n, 2, "bias")), fx_target=t,
                        fx_rest=tuple(n.args[3:]), fx_kwargs=dict(n.kwargs))
        if t == aten.batch_norm.default:
            if _arg(n, 5, "training"):
                return self._raw(n)
            return node("BatchNormalization", n.args[:5], epsilon=float(_arg(n, 7, "eps")))
        if t == aten._native_batch_norm_legit_no_training.default:
            outs = self._getitems(n, 3)
            if outs is None:
                return self._raw(n)
            return node("BatchNormalization", n.args[:5], outputs=outs,
                        natives=(n, *[o for o in outs if o is not None]),
                        epsilon=float(n.args[6]))
        if t in _SPLIT:
            val = n.meta.get("val")
            if not isinstance(val, (list, tuple)) or rank is None:
                return self._raw(n)
            outs = self._getitems(n, len(val))
            if outs is None:
                return self._raw(n)
            axis = _neg_axis(_arg(n, 2, "dim", 0), rank)
            sizes = tuple(int(x.shape[axis]) for x in val)
            return node("Split", (a0,), outputs=outs,
                        natives=(n, *[o for o in outs if o is not None]), axis=axis,
                        sizes=sizes)
        if t == aten.cat.default:
            tensors = n.args[0]
            r = _rank(tensors[0]) if tensors else None
            return node("Concat", tuple(tensors), axis=_neg_axis(_arg(n, 1, "dim", 0), r))
        return self._raw(n)

    def _raw(self, n: torch.fx.Node) -> CNode:
        ins = tuple(a for a in n.args if isinstance(a, torch.fx.Node))
        return CNode(str(n.target), ins, (n,), {}, n.name, (n,))

    def _getitems(self, n: torch.fx.Node, count: int) -> list | None:
        outs: list = [None] * count
        for u in n.users:
            if u.op != "call_function" or u.target is not operator.getitem:
                return None
            outs[u.args[1]] = u
        return outs

    # -- writing ---------------------------------------------------------------------------
    def check_plan(self, plan: Plan) -> str | None:
        for pop in plan.ops:
            if isinstance(pop.op, torch._ops.OpOverload):
                continue
            if pop.op not in _EMITTABLE:
                if "." in pop.op:
                    return (f"{pop.op} is an onnxruntime operator; an FX graph has no "
                            "equivalent aten op")
                return f"the FX backend cannot write {pop.op}"
        return None

    def commit(self, plan: Plan, mapping: list, match) -> None:
        matched = [nat for c in match.nodes for nat in c.natives]
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        root = max((n for n in matched), key=lambda n: order[n])
        first = min((n for n in matched), key=lambda n: order[n])
        # Insert at the first matched node when every value the plan reads already exists
        # there (replaced values of several roots, e.g. merged projections, are read early);
        # otherwise at the last one, where every input exists.
        reads = [a for pop in plan.ops for a in pop.inputs if isinstance(a, torch.fx.Node)]
        at = first if all(order[a] < order[first] for a in reads) else root
        done: dict[int, list] = {}
        with self.graph.inserting_before(at):
            for pop in plan.ops:
                args = [self._resolve(a, done) for a in pop.inputs]
                done[id(pop)] = self._emit(pop, args, root)
        for old, new in mapping:
            node = self._resolve(new, done)
            if node is not old:
                old.replace_all_uses_with(node)
        self._erase_dead(matched, order, match)
        self._legalize()
        self._cache.clear()

    def _resolve(self, a, done):
        if isinstance(a, PValue):
            return done[id(a.op)][a.index]
        if isinstance(a, PConst):
            return self._const_node(a.array, a.hint)
        if isinstance(a, Lit):
            return a.value
        return a

    def _const_node(self, array: np.ndarray, hint: str) -> torch.fx.Node:
        while True:
            name = f"_fused_{hint}_{self._new}"
            self._new += 1
            if not hasattr(self.gm, name):
                break
        t = torch.from_numpy(np.ascontiguousarray(array).copy())
        self.gm.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
        node = self.graph.get_attr(name)
        if self.fake_mode is not None:
            node.meta["val"] = self.fake_mode.from_tensor(t, static_shapes=True)
        return node

    def _call(self, target, args, kwargs, like: torch.fx.Node) -> torch.fx.Node:
        node = self.graph.call_function(target, tuple(args), kwargs)
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
        if self.fake_mode is not None:
            def fake(a):
                if isinstance(a, torch.fx.Node):
                    return a.meta.get("val")
                if isinstance(a, (list, tuple)):
                    return type(a)(fake(x) for x in a)
                return a
            with self.fake_mode:
                node.meta["val"] = target(*fake(list(args)), **{k: fake(v) for k, v in
                                                                  kwargs.items()})
        return node

    def _emit(self, pop: PlanOp, args: list, like: torch.fx.Node) -> list:
        op, a = pop.op, pop.attrs
        call = lambda target, *xs, **kw: self._call(target, xs, kw, like)
        if isinstance(op, torch._ops.OpOverload):
            return [call(op, *args, **a)]
        if op == "Identity":
            return [args[0]]
        if op in _EMIT_BINARY:
            return [call(_EMIT_BINARY[op], args[0], args[1])]
        if op in _EMIT_UNARY:
            return [call(_EMIT_UNARY[op], args[0])]
        if op == "MatMul":
            return [call(aten.matmul.default, args[0], args[1])]
        if op == "Linear":
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else None
            if a.get("layout", "out_in") == "in_out":
                if b is not None and _rank(x) == 2:
                    return [call(aten.addmm.default, b, x, w)]
                if w.op == "get_attr":
                    w = self._const_node(self.const(w).T, "weight_t")
                else:
                    w = call(aten.t.default, w)
            return [call(aten.linear.default, x, w, b)]
        if op == "Transpose":
            return [call(aten.permute.default, args[0], list(a["perm"]))]
        if op == "Reshape":
            shape = a.get("shape")
            if shape is None or not all(isinstance(d, int) for d in shape):
                shape = a["target"]
            return [call(aten.reshape.default, args[0], list(shape))]
        if op == "Softmax":
            target = aten._safe_softmax.default if a.get("safe") else aten.softmax.int
            return [call(target, args[0], a["axis"])]
        if op == "Split":
            node = call(aten.split_with_sizes.default, args[0], list(a["sizes"]), a["axis"])
            outs = []
            for i in range(len(a["sizes"])):
                item = self.graph.call_function(operator.getitem, (node, i))
                if "val" in node.meta:
                    item.meta["val"] = node.meta["val"][i]
                outs.append(item)
            return outs
        if op == "Concat":
            return [call(aten.cat.default, list(args), a["axis"])]
        if op == "LayerNormalization":
            x = args[0]
            ns = [int(d) for d in _val(x).shape[a["axis"]:]]
            w = args[1] if len(args) > 1 else None
            b = args[2] if len(args) > 2 else None
            return [call(aten.layer_norm.default, x, ns, w, b, float(a["epsilon"]))]
        if op == "Gelu":
            return [call(aten.gelu.default, args[0], approximate=a.get("approximate", "none"))]
        if op == "Attention":
            q, k, v = args[:3]
            mask = args[3] if len(args) > 3 else None
            return [call(aten.scaled_dot_product_attention.default, q, k, v, attn_mask=mask,
                         dropout_p=0.0, is_causal=bool(a.get("is_causal", False)),
                         scale=a.get("scale"))]
        if op == "Conv":
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else None
            return [call(a["fx_target"], x, w, b, *a["fx_rest"], **a["fx_kwargs"])]
        raise AssertionError(f"check_plan let {op} through")

    def _erase_dead(self, matched: list, order: dict, match) -> None:
        weights = [v for v in match.bindings.values()
                   if isinstance(v, torch.fx.Node) and v.op == "get_attr"]
        for n in matched:
            weights.extend(a for a in n.all_input_nodes if a.op == "get_attr")
        for n in matched:
            for u in list(n.users):
                if u.op == "call_function" and u.target in _ASSERTS and not u.users:
                    self.graph.erase_node(u)
        for n in sorted(set(matched), key=lambda n: order[n], reverse=True):
            if not _erased(n) and not n.users:
                self.graph.erase_node(n)
        targets = {w.target for w in weights if not _erased(w) and not w.users}
        for w in set(weights):
            if not _erased(w) and not w.users:
                self.graph.erase_node(w)
        still = {n.target for n in self.graph.nodes if n.op == "get_attr"}
        for target in targets - still:
            *path, leaf = target.split(".")
            owner = _fetch(self.gm, ".".join(path)) if path else self.gm
            delattr(owner, leaf)
            self._consts.pop(target, None)

    def _legalize(self) -> None:
        """Restore topological order if an insertion broke it (a stable depth-first sort)."""
        pos = {n: i for i, n in enumerate(self.graph.nodes)}
        if all(pos[a] < pos[n] for n in self.graph.nodes for a in n.all_input_nodes):
            return
        ordered: list[torch.fx.Node] = []
        seen: set = set()
        for start in list(self.graph.nodes):
            stack = [(start, False)]
            while stack:
                n, expanded = stack.pop()
                if n in seen:
                    continue
                if expanded:
                    seen.add(n)
                    ordered.append(n)
                    continue
                stack.append((n, True))
                for a in sorted(n.all_input_nodes, key=pos.get, reverse=True):
                    if a not in seen:
                        stack.append((a, False))
        root = self.graph._root
        for n in ordered:
            root.prepend(n)

    def finish(self) -> None:
        self.graph.lint()
        self.gm.recompile()
