"""Compress a small BERT and compile it for this CPU.

capture (torch.export) -> prune attention heads -> zero small weights -> cleanup -> TVM build
-> save the artifact -> load it with slimc.runtime -> compare with torch.

Run: .venv/bin/python examples/01_compress_and_compile.py   (no downloads; about 20 s)
"""

import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertModel

import slimc
from slimc import passes


class Encoder(torch.nn.Module):
    """BERT returning its last hidden state: plain tensors in and out, as torch.export wants."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids):
        return self.bert(input_ids).last_hidden_state


def main() -> None:
    # a BERT-shaped model from a config: random weights, no hub download
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, vocab_size=100, max_position_embeddings=64)
    model = Encoder(BertModel(cfg).eval()).eval()
    ids = torch.randint(0, 100, (1, 16))

    g = slimc.capture(model, (ids,))
    print(f"captured: {len(g.attention_blocks())} attention blocks, "
          f"{g.num_parameters():,} parameters")

    # each pass returns a new graph; g itself (and the torch model) are never changed
    small = passes.prune_heads(g, ratio=0.25, score="magnitude")   # 1 of 4 heads per layer
    small = passes.threshold_weights(small, sparsity=0.5)          # half the Linear weights -> 0
    small = passes.cleanup(small)
    heads = [b.num_heads for b in small.attention_blocks()]
    print(f"compressed: heads per layer {heads}, {small.num_parameters():,} parameters, "
          f"{small.nonzeros():,} non-zero; passes {small.history}")

    art = slimc.compile(small, target="x86")  # this CPU, slimc's default schedules
    with tempfile.TemporaryDirectory() as tmp:
        path = art.save(Path(tmp) / "bert-small")
        compiled = slimc.runtime.load(path)    # needs only TVM's runtime and numpy
        got = compiled(ids.numpy())[0]
        ms = compiled.benchmark(ids.numpy(), repeat=10, warmup=2)["median_ms"]

    want = small.run(ids.numpy())[0]           # the compressed graph, run by torch
    with torch.no_grad():
        original = model(ids).numpy()
    print(f"latency (TVM, this CPU): {ms:.2f} ms")
    print(f"compressed vs original model: max |diff| = {np.abs(want - original).max():.2e} "
          "(the price of pruning)")
    print(f"compiled vs compressed graph in torch: max |diff| = {np.abs(got - want).max():.2e}")


if __name__ == "__main__":
    main()
