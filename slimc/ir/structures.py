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


@dataclass(frozen=True)
class TransformerLayer:
    """One whole Transformer layer: an attention block and the feed-forward block after it,
    each with its residual add, as a span of the residual stream.

    ``input`` is the residual-stream value entering the layer (the value the attention's
    residual add reads) and ``output`` the value leaving it: the FFN's residual add
    (``norm="pre"``: x → LN → attn → add → LN → FFN → add, GPT-2 / LLaMA / ViT) or the norm
    after it (``norm="post"``: x → attn → add → LN → FFN → add → LN, BERT / DistilBERT /
    ``nn.TransformerEncoderLayer``). Values are named as the backend names them (FX node names,
    ONNX value names). ``nodes`` holds the residual adds (``"attention_add"``, ``"ffn_add"``),
    the output values of the attention's and the FFN's last projections (``"values"``) and,
    post-norm, the nodes of the norm that ends the layer (``"output_norm"``).
    """

    name: str
    layer: int
    input: str
    output: str
    norm: str  # "pre" | "post"
    attention: AttentionBlock
    ffn: FFNBlock
    nodes: dict = field(default_factory=dict, compare=False)
