"""FX backend adapter: a ``torch.fx.GraphModule`` (from ``torch.export``) seen by slimc.

Weights are the module's parameters and buffers, named by their dotted ``get_attr`` target.
"""

from __future__ import annotations

import io
import operator
from collections import Counter

import numpy as np
import torch
import torch.fx

from ..errors import PassError, UnsupportedError
from .view import View, VNode

aten = torch.ops.aten

_IDENTITY = {aten.dropout.default, aten.contiguous.default, aten.clone.default, aten.alias.default,
             aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
             aten.detach.default, aten.type_as.default}
_RESHAPE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
            aten.unflatten.int, aten.flatten.using_ints, aten.squeeze.dim, aten.squeeze.dims,
            aten.squeeze.default, aten.unsqueeze.default}
_TRANSPOSE = {aten.transpose.int, aten.permute.default, aten.t.default}
_EXPAND = {aten.expand.default, aten.repeat.default, aten.repeat_interleave.self_int}
_ELEMENTWISE = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
                aten.mul.Scalar, aten.div.Scalar, aten.add.Scalar, aten.neg.default,
                aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self,
                aten.where.ScalarOther, aten.where.ScalarSelf}
_MATMUL = {aten.matmul.default, aten.bmm.default, aten.mm.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_SDPA = {aten.scaled_dot_product_attention.default,
         aten._scaled_dot_product_flash_attention_for_cpu.default,
         aten._scaled_dot_product_efficient_attention.default}


def _is_tensor_node(a) -> bool:
    return isinstance(a, torch.fx.Node)


def _const_target(gm: torch.fx.GraphModule, a) -> tuple[str, bool] | None:
    """(get_attr target, transposed?) if ``a`` is a weight, seen through t()/transpose()."""
    if not isinstance(a, torch.fx.Node):
        return None
    if a.op == "get_attr":
        return a.target, False
    if a.op == "call_function" and a.target in (aten.t.default, aten.transpose.int,
                                                  aten.permute.default):
        inner = _const_target(gm, a.args[0])
        if inner is not None and not inner[1]:
            return inner[0], True
    return None


def _shape(n: torch.fx.Node):
    val = n.meta.get("val", n.meta.get("tensor_meta"))
    shape = getattr(val, "shape", None)
    if shape is None:
        return None
    return tuple(int(d) if isinstance(d, int) or str(d).isdigit() else str(d) for d in shape)


def build_view(gm: torch.fx.GraphModule) -> View:
    nodes: list[VNode] = []
    shapes = {}
    attrs = {n.name for n in gm.graph.nodes if n.op == "get_attr"}
    for n in gm.graph.nodes:
        shapes[n.name] = _shape(n)
        if n.op != "call_function":
            continue
        t = n.target
        tensor_args = [a.name for a in n.args if _is_tensor_node(a)]
        if t is operator.getitem:
            nodes.append(VNode(n.name, "select", [n.args[0].name], [n.name],
                               {"index": n.args[1]}))
            continue
        if t == aten.linear.default or t in (aten.addmm.default,) or t in _MATMUL:
            if t == aten.linear.default:
                x, w, b = n.args[0], n.args[1], (n.args[2] if len(n.args) > 2 else None)
                layout = "out_in"
            elif t == aten.addmm.default:
                b, x, w = n.args[0], n.args[1], n.args[2]
                layout = "in_out"
            else:
                x, w, b = n.args[0], n.args[1], None
                layout = "in_out"
            wc = _const_target(gm, w)
            bc = _const_target(gm, b) if b is not None else None
            if wc is not None and _fetch(gm, wc[0]).dim() == 2:
                name, transposed = wc
                if transposed:
                    layout = "in_out" if layout == "out_in" else "out_in"
                stored = _fetch(gm, name).shape
                out_f, in_f = (stored[0], stored[1]) if layout == "out_in" else (stored[1],
                                                                                   stored[0])
                nodes.append(VNode(n.name, "linear", [x.name], [n.name],
                                   {"weight": name, "bias": bc[0] if bc else None,
                                    "layout": layout, "in_features": int(in_f),
                                    "out_features": int(out_f)}))
                continue
            if t != aten.linear.default and t != aten.addmm.default:
                nodes.append(VNode(n.name, "matmul", tensor_args, [n.name]))
                continue
            nodes.append(VNode(n.name, "other", tensor_args, [n.name]))
            continue
        if t in _SOFTMAX:
            op = "softmax"
        elif t in _SDPA:
            op = "sdpa"
        elif t in _IDENTITY:
            op = "identity"
        elif t in _RESHAPE:
            op = "reshape"
        elif t in _TRANSPOSE:
            op = "transpose"
        elif t in _EXPAND:
            op = "expand"
        elif t in _ELEMENTWISE:
            op = "elementwise"
        elif t in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
                   aten.unbind.int):
            op = "split"
        elif t in (aten.slice.Tensor, aten.narrow.default):
            op = "slice"
        elif t == aten.select.int:
            op = "select"
        elif t == aten.cat.default:
            op = "concat"
            tensor_args = [a.name for a in n.args[0] if _is_tensor_node(a)]
        else:
            op = "other"
        if op == "elementwise":
            tensor_args = [a for a in tensor_args if a not in attrs]
        # fn: the aten op's name (``gelu``, ``mul``, ...), for rules that care which op it is
        nodes.append(VNode(n.name, op, tensor_args, [n.name],
                           {"fn": getattr(t, "_opname", str(t))}))
    return View(nodes, shapes)


def _fetch(gm: torch.fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def weights(gm: torch.fx.GraphModule) -> dict[str, np.ndarray]:
    out = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            t = _fetch(gm, n.target)
            if isinstance(t, torch.Tensor):
                out[n.target] = t.detach().cpu().numpy()
    return out


def get_weight(gm: torch.fx.GraphModule, name: str) -> np.ndarray:
    return _fetch(gm, name).detach().cpu().numpy()


def set_weight(gm: torch.fx.GraphModule, name: str, value: np.ndarray) -> None:
    """Replace a weight (a new tensor object, so nothing that shared the old one changes)."""
    *path, leaf = name.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    old = getattr(owner, leaf)
    new = torch.as_tensor(np.ascontiguousarray(value)).to(old.dtype)
    if isinstance(old, torch.nn.Parameter):
        setattr(owner, leaf, torch.nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        owner.register_buffer(leaf, new) if leaf in owner._buffers else setattr(owner, leaf, new)


def op_histogram(gm: torch.fx.GraphModule) -> Counter:
    return Counter(str(n.target).replace("aten.", "") for n in gm.graph.nodes
                   if n.op == "call_function")


def serialized_size(gm: torch.fx.GraphModule) -> int:
    buf = io.BytesIO()
    torch.save({k: v for k, v in gm.state_dict().items()}, buf)
    return buf.tell() + len(gm.code.encode())


# -- surgery helpers shared by passes that change shapes ---------------------------------------

def static_shape(shape, where: str) -> tuple:
    """``shape`` as ints; :class:`~slimc.errors.UnsupportedError` naming ``where`` if symbolic."""
    try:
        return tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise UnsupportedError(f"This pass needs static shapes, but {where} has the symbolic "
                               f"shape {tuple(shape)}.",
                               "Capture the model without dynamic_shapes.") from None


def example_args(gm: torch.fx.GraphModule, example_inputs) -> list:
    if example_inputs is not None:
        return [torch.as_tensor(np.ascontiguousarray(x)) for x in example_inputs]
    args = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            val = n.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise UnsupportedError(f"Input {n.name!r} of the GraphModule has no recorded "
                                       "shape.", "Pass a slimc.Graph from slimc.capture(), or a "
                                       "GraphModule from torch.export(...).module().")
            args.append(torch.zeros(static_shape(val.shape, n.name), dtype=val.dtype))
    return args


def refresh_meta(gm: torch.fx.GraphModule, example_inputs=None, *, edit: str) -> None:
    """Recompute ``node.meta["val"]`` (fake tensors) after a shape-changing ``edit`` (named in
    the error: "head pruning"); a graph the edit left inconsistent raises PassError."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    gm.recompile()
    args = example_args(gm, example_inputs)
    try:
        FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*args)
    except Exception as e:
        raise PassError(f"The graph is inconsistent after {edit}: "
                        f"{str(e).strip().splitlines()[0][:300]}",
                        "This is a slimc bug; please report it with the model.") from e
