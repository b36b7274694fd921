"""Small ONNX graphs with fused attention operators, built by hand with ``onnx.helper``.

Each is one attention layer as onnxruntime's transformer optimizer / Optimum / opset-23
exporters emit it: x → (MatMul projections) → fused attention op → output MatMul (+ bias)
→ y. The weights are random (seeded), so every head contributes and every bias matters.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

B, S, E = 2, 6, 32  # batch, sequence, model width


def _rng(seed):
    return np.random.default_rng(seed)


class _Builder:
    def __init__(self, seed=0):
        self.rng = _rng(seed)
        self.nodes, self.inits, self.inputs = [], [], []

    def const(self, name, arr):
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def rand(self, name, *shape, scale=0.3):
        return self.const(name, (scale * self.rng.standard_normal(shape)).astype(np.float32))

    def node(self, op, ins, outs, domain="", **attrs):
        self.nodes.append(helper.make_node(op, ins, outs, name=outs[0] if outs[0] else op,
                                           domain=domain, **attrs))
        return outs[0]

    def input(self, name, shape, dtype=TensorProto.FLOAT):
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def linear(self, name, x, n_in, n_out, bias=True):
        y = self.node("MatMul", [x, self.rand(f"{name}.weight", n_in, n_out)], [f"{name}.mm"])
        if bias:
            y = self.node("Add", [y, self.rand(f"{name}.bias", n_out)], [f"{name}.out"])
        return y

    def model(self, out, opset=17, ms=False, out_shape=(B, S, E)):
        y = helper.make_tensor_value_info(out, TensorProto.FLOAT, list(out_shape))
        g = helper.make_graph(self.nodes, "attention", self.inputs, [y], self.inits)
        ops = [helper.make_opsetid("", opset)]
        if ms:
            ops.append(helper.make_opsetid("com.microsoft", 1))
        m = helper.make_model(g, opset_imports=ops)
        m.ir_version = 10 if opset >= 21 else 9
        return m


def ms_attention(heads=4, qkv_hidden_sizes=False, attention_bias=None, mask=True, seed=0):
    """com.microsoft::Attention: merged QKV weight [E, 3E] and bias [3E] inside the op.
    ``attention_bias``: None, "const" or "input" ([1, heads, S, S], a head axis)."""
    b = _Builder(seed)
    x = b.input("x", [B, S, E])
    ins = [x, b.rand("qkv.weight", E, 3 * E), b.rand("qkv.bias", 3 * E)]
    ins.append(b.input("mask", [B, S], TensorProto.INT32) if mask else "")
    attrs = {"num_heads": heads}
    if qkv_hidden_sizes:
        attrs["qkv_hidden_sizes"] = [E, E, E]
    if attention_bias:
        ins.append("")  # past
        ins.append(b.rand("attn.bias", 1, heads, S, S) if attention_bias == "const"
                   else b.input("attn_bias", [1, heads, S, S]))
    ctx = b.node("Attention", ins, ["context"], domain="com.microsoft", **attrs)
    y = b.linear("o", ctx, E, E)
    return b.model(y, ms=True)


def ms_mha(heads=4, packed_bias=False, attention_bias=None, key_padding_mask=False, seed=0):
    """com.microsoft::MultiHeadAttention on projected q, k, v ([B, S, E] each); biases in Adds,
    or packed into the op's bias input [3E]."""
    b = _Builder(seed)
    x = b.input("x", [B, S, E])
    q, k, v = (b.linear(n, x, E, E, bias=not packed_bias) for n in ("q", "k", "v"))
    ins = [q, k, v, b.rand("qkv.bias", 3 * E) if packed_bias else ""]
    ins.append(b.input("kpm", [B, S], TensorProto.INT32) if key_padding_mask else "")
    if attention_bias:
        ins.append(b.rand("attn.bias", 1, heads, S, S) if attention_bias == "const"
                   else b.input("attn_bias", [1, heads, S, S]))
    ctx = b.node("MultiHeadAttention", ins, ["context"], domain="com.microsoft",
                 num_heads=heads)
    return b.model(b.linear("o", ctx, E, E), ms=True)


def ms_mha_packed_qkv(heads=4, seed=0):
    """MultiHeadAttention reading packed QKV ([B, S, heads, 3, d]) with no key or value: the
    form slimc refuses (no per-q/k/v projection to slice)."""
    b = _Builder(seed)
    x = b.input("x", [B, S, E])
    qkv = b.linear("qkv", x, E, 3 * E)
    shape = b.const("qkv.shape", np.array([B, S, heads, 3, E // heads], dtype=np.int64))
    packed = b.node("Reshape", [qkv, shape], ["qkv.packed"])
    ctx = b.node("MultiHeadAttention", [packed], ["context"], domain="com.microsoft",
                 num_heads=heads)
    return b.model(b.linear("o", ctx, E, E), ms=True)


def ms_gqa(heads=4, kv_heads=2, head_sink=False, past=False, present_out=False, packed=False,
           seed=0):
    """com.microsoft::GroupQueryAttention (prompt, no past cache): q [B, S, heads·d], k and v
    [B, S, kv_heads·d]; causal, with seqlens_k / total_sequence_length inputs. ``past``: the
    key/value cache comes in as graph inputs; ``present_out``: present_key is a graph output."""
    d = E // heads
    b = _Builder(seed)
    x = b.input("x", [B, S, E])
    if packed:  # one projection, [q | k | v] (onnxruntime-genai / Optimum exports)
        q, k, v = b.linear("qkv", x, E, (heads + 2 * kv_heads) * d), "", ""
    else:
        q = b.linear("q", x, E, heads * d)
        k, v = (b.linear(n, x, E, kv_heads * d) for n in ("k", "v"))
    seqlens = b.const("seqlens_k", np.full(B, S - 1, dtype=np.int32))
    total = b.const("total_len", np.array([S], dtype=np.int32))
    cache = [b.input(n, [B, kv_heads, 0, d]) for n in ("past_key", "past_value")] if past \
        else ["", ""]
    ins = [q, k, v, *cache, seqlens, total]
    if head_sink:
        ins += ["", "", "", "", b.rand("head_sink", heads, scale=1.0)]
    ctx = b.node("GroupQueryAttention", ins, ["context", "present_key", "present_value"],
                 domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads)
    m = b.model(b.linear("o", ctx, heads * d, E), ms=True)
    if present_out:
        m.graph.output.append(helper.make_tensor_value_info("present_key", TensorProto.FLOAT,
                                                            [B, kv_heads, S, d]))
    return m


def onnx_attention(heads=4, kv_heads=None, rank=3, attn_mask=None, seed=0):
    """The standard ``Attention`` (opset 23). rank 3: q/k/v [B, S, H·d] with q_num_heads /
    kv_num_heads; rank 4: [B, H, S, d] after Reshape + Transpose. ``attn_mask``: None,
    "const" or "input", additive [1, heads, S, S] (a head axis)."""
    kv_heads = kv_heads or heads
    d = E // heads
    b = _Builder(seed)
    x = b.input("x", [B, S, E])
    q = b.linear("q", x, E, heads * d)
    k, v = (b.linear(n, x, E, kv_heads * d) for n in ("k", "v"))
    attrs = {}
    if rank == 3:
        attrs = {"q_num_heads": heads, "kv_num_heads": kv_heads}
    else:
        def split(name, t, h):
            shape = b.const(f"{name}.heads", np.array([B, S, h, d], dtype=np.int64))
            r = b.node("Reshape", [t, shape], [f"{name}.r"])
            return b.node("Transpose", [r], [f"{name}.t"], perm=[0, 2, 1, 3])
        q, k, v = split("q", q, heads), split("k", k, kv_heads), split("v", v, kv_heads)
    ins = [q, k, v]
    if attn_mask:
        ins.append(b.rand("attn.mask", 1, heads, S, S) if attn_mask == "const"
                   else b.input("attn_mask", [1, heads, S, S]))
    ctx = b.node("Attention", ins, ["context"], **attrs)
    if rank == 4:
        t = b.node("Transpose", [ctx], ["context.t"], perm=[0, 2, 1, 3])
        ctx = b.node("Reshape", [t, b.const("context.shape", np.array([B, S, heads * d],
                                                                      dtype=np.int64))],
                     ["context.r"])
    return b.model(b.linear("o", ctx, heads * d, E), opset=23)


def reference_attention(q, k, v, heads, kv_heads, bias=None, causal=False):
    """numpy: softmax(q kᵀ / sqrt(d) + bias) v over heads of 3-D q/k/v (query head h reads
    key/value head h // (heads / kv_heads))."""
    bsz, s, _ = q.shape
    d = q.shape[-1] // heads
    qh = q.reshape(bsz, s, heads, d).transpose(0, 2, 1, 3)
    kh = np.repeat(k.reshape(bsz, -1, kv_heads, d).transpose(0, 2, 1, 3), heads // kv_heads, 1)
    vh = np.repeat(v.reshape(bsz, -1, kv_heads, d).transpose(0, 2, 1, 3), heads // kv_heads, 1)
    scores = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(d)
    if bias is not None:
        scores = scores + bias
    if causal:
        scores = np.where(np.tril(np.ones(scores.shape[-2:], dtype=bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ vh).transpose(0, 2, 1, 3).reshape(bsz, s, heads * d)


def check(model: onnx.ModelProto) -> onnx.ModelProto:
    onnx.checker.check_model(model)
    return model
