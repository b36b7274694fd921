"""A pass of your own: register it with a decorator, run it alone, in a Recipe, and see it in
`slimc passes --list`.

The pass rounds every floating-point weight to fewer mantissa bits (float32 storage, bf16-like
precision when mantissa_bits=7): a lossy pass, exact at its identity setting mantissa_bits=23.

Run: .venv/bin/python examples/02_custom_pass.py   (about 10 s)
The CLI loads it as a plugin: slimc --plugin examples/02_custom_pass.py passes --list
"""

import subprocess
import sys

import numpy as np
import torch

import slimc
from slimc.passes import Lossy, PassResult, register_pass
from slimc.recipe import Recipe


@register_pass("round_weights", contract=Lossy(identity={"mantissa_bits": 23},
                                               bound="relative weight change <= 2^-(bits+1)"))
def round_weights(graph, /, *, mantissa_bits: int = 7) -> PassResult:
    """Round every float32 weight to `mantissa_bits` mantissa bits (round to nearest even).

    Math: w' = m' * 2^e where m' is w's mantissa rounded to `mantissa_bits` bits.
    Pre: any graph; only float32 weights of two or more elements change.
    Post: same graph and shapes; stats["weights"] counts the rounded tensors.
    Numerics: |w' - w| <= 2^-(mantissa_bits+1) |w|; exact at mantissa_bits=23.
    """
    # `graph` is a private copy of the caller's graph (a slimc.Graph, whatever they passed in):
    # edit it in place and return it in a PassResult
    drop = 23 - mantissa_bits
    count = 0
    for name, w in graph.weights().items():
        if w.dtype != np.float32 or w.size < 2 or drop <= 0:
            continue
        bits = w.view(np.uint32).astype(np.uint64)
        half, lsb = np.uint64(1 << (drop - 1)), (bits >> np.uint64(drop)) & np.uint64(1)
        bits = ((bits + half - np.uint64(1) + lsb) >> np.uint64(drop)) << np.uint64(drop)
        graph.set_weight(name, bits.astype(np.uint32).view(np.float32))
        count += 1
    return PassResult(graph, count > 0, {"weights": count})


def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    g = slimc.capture(model.eval(), (torch.randn(4, 32),))

    # 1. alone, on a slimc.Graph or the plain torch.fx.GraphModule
    gm = round_weights(g.fx, mantissa_bits=7)
    print(f"on a plain GraphModule: {type(gm).__name__}")

    # 2. in a recipe (the TOML a user writes; here as the dict it parses to), with a numeric
    #    check after every pass
    recipe = Recipe.from_dict({"name": "bf16-like", "passes": [
        {"name": "round_weights", "mantissa_bits": 7},
        {"name": "cleanup"}]})
    new, report = recipe.apply(g, check_inputs=[g.example_inputs])
    print(report.table())
    dev = np.abs(new.run(*g.example_inputs)[0] - g.run(*g.example_inputs)[0]).max()
    print(f"round_weights(mantissa_bits=7) output change: max |diff| = {dev:.2e}")

    # 3. the CLI lists it when this file is loaded as a plugin (main() does not run then: the
    #    module's name is not "__main__")
    out = subprocess.run([sys.executable, "-m", "slimc.cli", "--plugin", __file__, "passes",
                          "--list"], capture_output=True, text=True, check=True).stdout
    print(next(line.rstrip() for line in out.splitlines() if line.startswith("round_weights")))


if __name__ == "__main__":
    main()
