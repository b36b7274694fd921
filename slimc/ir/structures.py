"""Backend-neutral descriptions of the structures passes work on.

These name weights by their handle in the graph (an FX ``get_attr`` target or an ONNX initializer
name), so a pass can read and write them through :meth:`slimc.Graph.get_weight` /
:meth:`slimc.Graph.set_weight` without knowing the backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Linear:
    """A projection y = x @ W^T + b (``layout="out_in"``) or y = x @ W + b (``layout="in_out"``).

    ``rows`` is the half-open range of output features that belong to this projection when the
    weight is shared with others (GPT-2's fused ``c_attn``, ``nn.MultiheadAttention.in_proj``);
    ``None`` means the whole weight.
    """

    node: str
    weight: str
    bias: str | None
    layout: str
    in_features: int
    out_features: int
    rows: tuple[int, int] | None = None

    @property
    def fused(self) -> bool:
        return self.rows is not None


@dataclass(frozen=True)
class AttentionBlock:
    """One multi-head attention: projections, head geometry and the nodes that make it up.

    ``num_kv_heads < num_heads`` means grouped-query attention: query head ``h`` reads key/value
    head ``h // (num_heads // num_kv_heads)``.
    """

    name: str
    layer: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    form: str  # "softmax" (MatMul/Softmax/MatMul), "sdpa" (one fused op), "op" (ONNX Attention ops)
    nodes: dict = field(default_factory=dict, compare=False)

    @property
    def fused_qkv(self) -> bool:
        return self.q.node == self.k.node == self.v.node

    @property
    def gqa(self) -> bool:
        return self.num_kv_heads != self.num_heads


@dataclass(frozen=True)
class FFNBlock:
    """One feed-forward block: ``down(act(up(x)))`` (``form="mlp"``) or the gated form
    ``down(act(gate(x)) * up(x))`` (``form="gated"``: SwiGLU / GeGLU).

    Intermediate neuron ``j`` owns output row ``j`` of ``up`` (and ``gate``) with its bias, and
    input column ``j`` of ``down``. ``activation`` names the nonlinearity as far as discovery
    can tell (``"gelu"``, ``"gelu_tanh"``, ``"relu"``, ``"silu"``, ..., or the op's own name).
    ``nodes["inner"]`` lists the nodes between the projections (activation, bias adds, casts,
    last-axis-keeping reshapes): every one of them carries the intermediate axis last.
    """

    name: str
    layer: int
    hidden: int
    intermediate: int
    form: str  # "mlp" | "gated"
    up: Linear
    down: Linear
    gate: Linear | None = None
    activation: str = ""
    nodes: dict = field(default_factory=dict, compare=False)

    @property
    def inputs(self) -> tuple[Linear, ...]:
        """The projections whose rows are the intermediate neurons (gate first, then up)."""
        return (self.gate, self.up) if self.gate is not None else (self.up,)
