"""slimc's code-generation transforms on a plain Relax IRModule.

A compiler writer with their own TVM flow can take slimc's Relax-level pieces without slimc's
build: each is a function IRModule -> IRModule (with the target where it matters):

    slimc.codegen.fusion.split_to_slices(mod)                 Split -> strided slices (exact)
    slimc.codegen.sparse.lower_sparse(mod, target, ...)       block-sparse matmuls -> BSR kernels
    slimc.codegen.fast_math.fast_math(mod)                    legalize with vectorizable exp/erf/tanh
    slimc.codegen.schedules.apply_default_schedules(mod, target)   tiled, vectorized CPU kernels

Graph-level passes (prune_heads, fuse, ...) run before import, on the torch.fx / ONNX graph; they
have no Relax form. Here: block-sparse weights from threshold_weights, TVM's own PyTorch
frontend, then slimc's Relax transforms, then tvm.compile.

Run: .venv/bin/python examples/06_relax_irmodule.py   (about 20 s)
"""

import numpy as np
import torch
import tvm
import tvm.relax.frontend.torch as tvm_torch
from tvm import relax

import slimc
from slimc import passes
from slimc.codegen import resolve_target
from slimc.codegen.fusion import split_to_slices
from slimc.codegen.schedules import apply_default_schedules
from slimc.codegen.sparse import lower_sparse, sparse_report


def main() -> None:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(),
                              torch.nn.Linear(512, 256)).eval()
    x = torch.randn(32, 256)

    # graph level (FX): zero 90 % of the 1x16 weight blocks
    g = passes.threshold_weights(slimc.capture(mlp, (x,)), sparsity=0.9, block=(1, 16))

    # a plain Relax IRModule from TVM's frontend: nothing slimc-specific about it
    mod = tvm_torch.from_exported_program(g.to_exported_program())
    target = resolve_target("x86")                  # tvm.target.Target for this CPU

    mod = split_to_slices(mod)                      # no Split in this model: a no-op here
    mod = lower_sparse(mod, target, threshold=0.8, block=(1, 16))
    print(f"BSR kernels: {sparse_report(mod)}")
    mod = apply_default_schedules(mod, target)      # legalize (fast math) + CPU schedules

    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()  # the frontend returns a tuple
    want = g.run(x.numpy())[0]                       # the sparse graph, run by torch
    print(f"Relax module with slimc transforms vs torch: max |diff| = "
          f"{np.abs(got - want).max():.2e}")


if __name__ == "__main__":
    main()
