"""torch.compile(model, backend="slimc"): slimc's passes and a TVM build per captured subgraph.

The backend freezes the weights into the library (inference only), compiles each subgraph
dynamo captures, compiles a dynamic subgraph once per new input shape (up to max_shapes), and
runs a subgraph it cannot compile (an op TVM lacks, an in-place write...) in eager torch with
one warning saying why: never a silent wrong answer. See slimc/dynamo.py.

Run: .venv/bin/python examples/04_torch_compile_backend.py   (about 40 s)
"""

import warnings

import torch
from transformers import BertConfig, BertModel

import slimc.dynamo  # registers "slimc" (an installed slimc also does it through an entry point)


class Encoder(torch.nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids):
        return self.bert(input_ids).last_hidden_state


class Odd(torch.nn.Module):
    """A graph break, and an op TVM has no converter for (i0, the Bessel function)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.a(x))
        print("python in the middle of forward: dynamo breaks the graph here")
        return torch.special.i0(self.b(h))


def main() -> None:
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, vocab_size=100, max_position_embeddings=64)
    model = Encoder(BertModel(cfg).eval()).eval()

    # by name, with options: fuse then cleanup on each subgraph before TVM
    fast = torch.compile(model, backend="slimc", options={"passes": ["fuse", "cleanup"]})
    with torch.no_grad():
        for seq in (16, 24):   # the second length: dynamo marks it dynamic, slimc compiles again
            ids = torch.randint(0, 100, (1, seq))
            dev = (fast(ids) - model(ids)).abs().max().item()
            print(f"BERT seq {seq}: max |slimc - eager| = {dev:.2e}")

    # a backend object with custom settings shows what happened to each subgraph
    backend = slimc.dynamo.backend(passes=["cleanup"])
    odd = Odd().eval()
    x = torch.randn(2, 8)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", slimc.dynamo.SlimcFallbackWarning)
        dev = (torch.compile(odd, backend=backend)(x) - odd(x)).abs().max().item()
    for i, sub in enumerate(backend.subgraphs):
        where = "TVM" if sub.eager_reason is None else f"eager ({sub.eager_reason})"
        print(f"subgraph {i}: {where}")
    for w in caught:
        if issubclass(w.category, slimc.dynamo.SlimcFallbackWarning):
            print(f"warning: {w.message}")
    print(f"graph break + unsupported op: max |slimc - eager| = {dev:.2e}")


if __name__ == "__main__":
    main()
