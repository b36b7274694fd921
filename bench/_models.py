"""The models and inputs the benchmarks share: a Hugging Face encoder returning its last hidden
state, BERT-base-shaped encoders with random weights, and fixed token inputs."""

from __future__ import annotations

import torch


class LastHidden(torch.nn.Module):
    """``model(input_ids, attention_mask).last_hidden_state`` as a plain two-input module."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def bert(layers: int = 12, *, hidden: int = 768, heads: int = 12, ffn: int = 3072,
         attn: str = "sdpa") -> LastHidden:
    """A BERT encoder of the given shape (default BERT-base) with random weights (seed 0)."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                     intermediate_size=ffn)
    return LastHidden(BertModel._from_config(cfg, attn_implementation=attn))


def inputs_for(batch: int, seq: int, vocab: int = 30522) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (seed 0) and an all-ones attention mask."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    return ids, torch.ones(batch, seq, dtype=torch.int64)
