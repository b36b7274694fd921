"""Find feed-forward blocks in a :class:`~slimc.ir.view.View`, whatever the backend.

A feed-forward block is recognised from its computation, not from module names. From every
projection ``down`` (a ``linear`` whose weight is a constant) we walk *up* from its input through
per-element ops only: activations (GELU, ReLU, SiLU, ... and their decompositions: Erf, Tanh,
Pow, Sigmoid), elementwise arithmetic with constants (bias adds, GELU's 0.5 / 1 / 0.044715),
casts, eval-mode dropout, and reshapes that keep the last axis (GPT-2's Conv1D flattens to 2-D
around its ``addmm``). The walk must end at one or two projections whose output width equals
``down``'s input width:

* one: ``down(act(up(x)))`` (``form="mlp"``: BERT, DistilBERT, ViT, GPT-2's Conv1D,
  ``nn.TransformerEncoderLayer``), including fused activation ops that read the bias
  (``com.microsoft::BiasGelu`` / ``FastGelu``);
* two reading the same input: ``down(act(gate(x)) * up(x))`` (``form="gated"``: LLaMA's SwiGLU);
  ``gate`` is the one read by the activation.

Every value inside must carry the intermediate width on its last axis, be read only inside the
block (removing a neuron must change nothing else) and the block must hold at least one
nonlinear op (two projections in a row are a factorized linear, not an FFN).
"""

from __future__ import annotations

from .structures import FFNBlock, Linear
from .view import View, VNode, dotted_prefix

# Per-element ops by ``attrs["fn"]`` (aten op names and ONNX op types). Binary ones may read
# constants (broadcast on the last axis) or other values of the same block.
_NONLINEAR = frozenset({
    "gelu", "relu", "silu", "sigmoid", "tanh", "erf", "erfc", "pow", "exp", "hardtanh",
    "relu6", "leaky_relu", "elu", "selu", "celu", "clamp", "clamp_min", "clamp_max",
    "hardswish", "hardsigmoid", "mish", "softplus", "abs", "sqrt", "square",
    "Gelu", "Relu", "Sigmoid", "Tanh", "Erf", "Pow", "Exp", "Elu", "Selu", "Celu", "LeakyRelu",
    "HardSigmoid", "HardSwish", "Mish", "Softplus", "Clip", "Abs", "Sqrt", "Max", "Min",
    "com.microsoft::Gelu", "com.microsoft::BiasGelu", "com.microsoft::FastGelu",
    "com.microsoft::QuickGelu",
})
# Nodes that only check a value (torch.export's dtype/shape assertions): not a use of it.
_CHECKS = frozenset({"_assert_tensor_metadata", "_assert_scalar"})
_MAX_NODES = 64


def _per_element(node: VNode) -> bool:
    if node.op in ("elementwise", "identity", "reshape"):
        return True
    return node.op == "other" and node.attrs.get("fn") in _NONLINEAR


def _last(view: View, value: str):
    shape = view.shape(value)
    return shape[-1] if shape else None


def _region(view: View, down: VNode):
    """The block that ends at ``down``: (leaves, inner nodes), or None."""
    width = down.attrs["in_features"]
    leaves: dict[str, VNode] = {}
    inner: dict[str, VNode] = {}
    values: set[str] = set()
    stack, seen = [down.inputs[0]], set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        node = view.producer.get(v)
        if node is None or len(node.outputs) != 1:
            return None
        last = _last(view, v)
        # a per-element op keeps its input's width and a projection's is out_features; shape
        # inference may not know an op (com.microsoft::Gelu, SkipLayerNormalization upstream),
        # so an unknown width passes (a reshape's target is then checked when it is rewritten)
        if last is not None and last != width:
            return None
        values.add(v)
        if node.op == "linear":
            if node.attrs["out_features"] != width:
                return None
            leaves[node.name] = node
            continue
        if not _per_element(node) or not node.inputs or len(inner) >= _MAX_NODES:
            return None
        inner[node.name] = node
        stack.extend(node.inputs)
    if not 1 <= len(leaves) <= 2 or not any(
            n.attrs.get("fn") in _NONLINEAR for n in inner.values()):
        return None
    inside = set(inner) | {down.name}
    for v in values:
        for c in view.consumers.get(v, []):
            if c.name not in inside and c.attrs.get("fn") not in _CHECKS:
                return None
    if len(leaves) == 2 and len({n.inputs[0] for n in leaves.values()}) != 1:
        return None
    return leaves, inner


def _activation(fns: set, gated: bool) -> str:
    low = {f.split("::")[-1].lower() for f in fns}
    if "fastgelu" in low or "tanh" in low and "pow" in low:
        return "gelu_tanh"
    if low & {"gelu", "biasgelu", "erf"}:
        return "gelu"
    if "silu" in low or "sigmoid" in low and gated:
        return "silu"
    for name in ("relu", "quickgelu", "sigmoid", "tanh"):
        if name in low:
            return name
    return sorted(low & {f.lower() for f in _NONLINEAR})[0]


def _linear(node: VNode) -> Linear:
    a = node.attrs
    return Linear(node=node.name, weight=a["weight"], bias=a.get("bias"), layout=a["layout"],
                  in_features=a["in_features"], out_features=a["out_features"])


def _name(names: list[str], layer: int) -> str:
    return dotted_prefix([n for n in names if n and "::" not in n and "." in n]) \
        or f"ffn_{layer}"


def find_ffn(view: View) -> list[FFNBlock]:
    found = []
    for down in view.nodes:
        if down.op != "linear" or not down.inputs:
            continue
        region = _region(view, down)
        if region is None:
            continue
        leaves, inner = region
        ordered = sorted(leaves.values(), key=lambda n: n.order)
        gate = None
        if len(ordered) == 2:  # the gate is the projection an activation reads
            acts = [any(c.name in inner and c.attrs.get("fn") in _NONLINEAR
                        for c in view.consumers.get(n.outputs[0], [])) for n in ordered]
            if acts == [False, True]:
                ordered.reverse()
            gate, up = ordered
        else:
            up = ordered[0]
        fns = {n.attrs.get("fn", "") for n in inner.values()}
        found.append((up.order if gate is None else min(up.order, gate.order), up, gate, down,
                      sorted(inner.values(), key=lambda n: n.order), fns))
    found.sort(key=lambda f: f[0])
    blocks = []
    for layer, (_, up, gate, down, inner, fns) in enumerate(found):
        lins = [_linear(n) for n in (up, down) + ((gate,) if gate else ())]
        names = [x for lin in lins for x in (lin.weight, lin.bias) if x]
        blocks.append(FFNBlock(
            name=_name(names, layer), layer=layer, hidden=lins[0].in_features,
            intermediate=lins[0].out_features, form="gated" if gate else "mlp", up=lins[0],
            down=lins[1], gate=lins[2] if gate else None,
            activation=_activation(fns, gate is not None),
            nodes={"up": up.name, "down": down.name, "gate": gate.name if gate else None,
                   "inner": [n.name for n in inner]}))
    return blocks
