"""Small real architectures for the tests, built from configs with random weights (no hub).

Each entry: a factory returning (module, example_inputs, expected) where ``expected`` lists
(num_heads, num_kv_heads, head_dim) per attention layer.
"""

from __future__ import annotations

import torch

SEQ = 8


class _HFWrapper(torch.nn.Module):
    """Return only the last hidden state (plain tensors in, tensors out)."""

    def __init__(self, model, key="last_hidden_state"):
        super().__init__()
        self.model = model
        self.key = key
        self.eval()

    def forward(self, *args):
        return self.model(*args)[self.key] if self.key else self.model(*args)[0]


def _ids(vocab=100, batch=1, seq=SEQ, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def bert(attn="sdpa", layers=2, heads=4, hidden=64):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=2 * hidden, vocab_size=100, max_position_embeddings=64)
    m = BertModel._from_config(cfg, attn_implementation=attn).eval()
    return _HFWrapper(m), (_ids(),), [(heads, heads, hidden // heads)] * layers


def distilbert(attn="sdpa"):
    from transformers import DistilBertConfig, DistilBertModel
    torch.manual_seed(0)
    cfg = DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=100,
                           max_position_embeddings=64)
    m = DistilBertModel._from_config(cfg, attn_implementation=attn).eval()
    return _HFWrapper(m), (_ids(),), [(4, 4, 16)] * 2


def gpt2(attn="sdpa"):
    from transformers import GPT2Config, GPT2Model
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                     use_cache=False, bos_token_id=0, eos_token_id=0)
    m = GPT2Model._from_config(cfg, attn_implementation=attn).eval()
    return _HFWrapper(m), (_ids(),), [(4, 4, 16)] * 2


def vit(attn="sdpa"):
    from transformers import ViTConfig, ViTModel
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, image_size=32, patch_size=8, num_channels=3)
    m = ViTModel._from_config(cfg, attn_implementation=attn, add_pooling_layer=False).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return _HFWrapper(m), (x,), [(4, 4, 16)] * 2


def llama(attn="sdpa"):
    from transformers import LlamaConfig, LlamaModel
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, intermediate_size=128, vocab_size=100,
                      max_position_embeddings=64, use_cache=False, head_dim=8)
    m = LlamaModel._from_config(cfg, attn_implementation=attn).eval()
    return _HFWrapper(m), (_ids(),), [(8, 2, 8)] * 2


class _MHA(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(64, 4, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x)[0]


def mha():
    torch.manual_seed(0)
    x = torch.randn(1, SEQ, 64, generator=torch.Generator().manual_seed(0))
    return _MHA().eval(), (x,), [(4, 4, 16)]


def encoder_layer():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0)
    x = torch.randn(1, SEQ, 64, generator=torch.Generator().manual_seed(0))
    return layer.eval(), (x,), [(4, 4, 16)]


ZOO = {
    "mha": mha,
    "encoder_layer": encoder_layer,
    "bert": bert,
    "bert_eager": lambda: bert("eager"),
    "distilbert": distilbert,
    "gpt2": gpt2,
    "gpt2_eager": lambda: gpt2("eager"),
    "vit": vit,
    "llama": llama,
    "llama_eager": lambda: llama("eager"),
}


# Exporters: "dynamo" works on every entry; TorchScript ("ts") only where torch supports the ops.
TS_EXPORTABLE = ("mha", "bert", "bert_eager", "distilbert", "vit")


def to_onnx(name: str, exporter: str = "dynamo"):
    """The zoo model ``name`` exported to an ``onnx.ModelProto`` (cached; callers get a copy)."""
    import onnx
    model = onnx.ModelProto()
    model.CopyFrom(_export_cached(name, exporter))
    return model


_EXPORTS: dict = {}


def _export_cached(name, exporter):
    key = (name, exporter)
    _cache = _EXPORTS
    if key not in _cache:
        import contextlib
        import io

        import onnx
        module, inputs, _ = ZOO[name]()
        fastpath = torch.backends.mha.get_fastpath_enabled()
        # the inference fast path of nn.MultiheadAttention is one opaque op that the TorchScript
        # exporter cannot export; export the decomposed form, as slimc.capture does
        torch.backends.mha.set_fastpath_enabled(False)
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            if exporter == "dynamo":
                proto = torch.onnx.export(module, inputs, dynamo=True, verbose=False).model_proto
            else:
                buf = io.BytesIO()
                torch.onnx.export(module, inputs, buf, dynamo=False, opset_version=17)
                proto = onnx.load_from_string(buf.getvalue())
        torch.backends.mha.set_fastpath_enabled(fastpath)
        _cache[key] = proto
    return _cache[key]
