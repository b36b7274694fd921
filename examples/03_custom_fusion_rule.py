"""A fusion rule of your own: a pattern, a check that says why it refuses, a replacement.

The rule folds a scalar scale after a projection into the projection's weights,
(x @ W + b) * s  ->  x @ (W*s) + b*s, as hand-written attention does with q * head_dim**-0.5.
One rule serves FX graphs and ONNX models: patterns use ONNX-style op names (fuse's canonical
ops: Linear, MatMul, Add, Mul, ...).

Run: .venv/bin/python examples/03_custom_fusion_rule.py   (about 15 s)
The CLI loads it as a plugin: slimc --plugin examples/03_custom_fusion_rule.py passes --list
"""

import subprocess
import sys

import numpy as np
import torch

import slimc
from slimc import passes
from slimc.passes.fuse import DEFAULT, Const, Op, Var, register_rule
from slimc.recipe import Recipe

x, w, b = Var("x"), Const("w"), Const("b")
# FX shows torch's linear as one Linear op; ONNX exporters write MatMul + Add
projection = Op("Linear", x, w, b, name="lin") | Op("Add", Op("MatMul", x, w), b)


def _scalar(m) -> str | None:
    # a reason string refuses the match (passes.fuse.explain shows it); None accepts
    s = m.const("s")
    return None if s.size == 1 else f"the factor has shape {s.shape}, not a scalar"


@register_rule(pattern=Op("Mul", projection, Const("s")), check=_scalar)
def fold_scale_into_linear(bld, m):
    """(x @ W + b) * s -> x @ (W*s) + b*s for a constant scalar s."""
    s = m.const("s").reshape(()).astype(m.const("w").dtype)
    w2 = bld.const(m.const("w") * s, "w_scaled")
    b2 = bld.const(m.const("b") * s, "b_scaled")
    if "lin" in m:
        return bld.op("Linear", m["x"], w2, b2, layout=m["lin"].attrs["layout"])
    return bld.op("Add", bld.op("MatMul", m["x"], w2), b2)


class Scores(torch.nn.Module):
    """Attention scores with the query scaled after its projection."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.q, self.k = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)
        self.scale = dim ** -0.5

    def forward(self, h):
        return torch.softmax((self.q(h) * self.scale) @ self.k(h).transpose(-1, -2), dim=-1)


def main() -> None:
    torch.manual_seed(0)
    h = torch.randn(1, 8, 32)
    g = slimc.capture(Scores().eval(), (h,))
    onnx_model = g.to_onnx()   # an onnx.ModelProto: the same rule works on it

    # the rule first: DEFAULT's merge_qkv would otherwise merge q and k before it looks
    rules = fold_scale_into_linear + DEFAULT
    for form, graph in (("FX", g), ("ONNX", onnx_model)):
        result = passes.fuse.run(graph, rules=rules)
        out = result.graph if form == "FX" else slimc.Graph("onnx", result.graph)
        dev = np.abs(out.run(h.numpy())[0] - g.run(h.numpy())[0]).max()
        print(f"{form}: fired {result.stats['fired']}, max |diff| = {dev:.2e}")

    # registered by name: recipes and passes.fuse(rules=[...]) find it, with or without DEFAULT
    recipe = Recipe.from_dict({"passes": [
        {"name": "fuse", "rules": ["fold_scale_into_linear", "DEFAULT"]}]})
    new, _ = recipe.apply(g, check_inputs=[g.example_inputs])
    print(f"recipe: fired {new.last_stats['fired']}")

    # why a rule does not fire: the check's reason, per candidate node
    class VectorScale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.register_buffer("s", torch.rand(4))

        def forward(self, x):
            return self.lin(x) * self.s

    other = slimc.capture(VectorScale().eval(), (torch.randn(2, 4),))
    for why in passes.fuse.explain(other, "fold_scale_into_linear"):
        print(f"explain: {why}")

    # `slimc passes --list` shows it (marked "user") with this file loaded as a plugin
    out = subprocess.run([sys.executable, "-m", "slimc.cli", "--plugin", __file__, "passes"],
                         capture_output=True, text=True, check=True).stdout
    print(next(ln.rstrip() for ln in out.splitlines() if ln.startswith("fold_scale_into_linear")))


if __name__ == "__main__":
    main()
