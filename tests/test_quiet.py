"""A first run is quiet: the dependencies' messages that say nothing to a slimc user (torch's
LeafSpec FutureWarning, TVM's "Fast mode segfaults ...", onnx-graphsurgeon's "colored module is
not installed") are kept off its output, and slimc's own warnings and the dependencies' other
messages still come through (slimc/_quiet.py)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

from slimc import _quiet

TORCH = "`isinstance(treespec, LeafSpec)` is deprecated"
TVM = "Fast mode segfaults when there are out-of-bounds indices"
GRAPHSURGEON = "colored module is not installed"

# capture -> prune -> compile (FX), and load -> compile (ONNX) of a MatMul whose weight is stored
# negated (2 MiB: onnxscript's folder leaves it, graphsurgeon's folds it and warns about its size,
# the first graphsurgeon message of the process); then one control per message, outside slimc,
# which shows the message is still there to be filtered in these versions
SCRIPT = textwrap.dedent("""
    import copy, sys
    import numpy as np, onnx
    from onnx import helper, numpy_helper
    import slimc, zoo
    from slimc import passes

    module, inputs, _ = zoo.ZOO["bert"]()
    g = passes.prune_heads(slimc.capture(module, inputs), ratio=0.25)
    slimc.compile(g, target="x86")

    w = np.random.default_rng(0).standard_normal((1024, 512)).astype(np.float32)
    nodes = [helper.make_node("Neg", ["w"], ["wt"]),
             helper.make_node("MatMul", ["x", "wt"], ["y"])]
    graph = helper.make_graph(
        nodes, "mm", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1024])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 512])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, sys.argv[1])
    m = slimc.load(sys.argv[1])
    m = passes.prune_heads(m, ratio=0.5, on_no_match="warn")   # slimc's own NoMatchWarning
    slimc.compile(m, target="x86")

    import torch.utils._pytree as pytree
    copy.deepcopy(pytree.tree_flatten([1])[1])            # control: torch's FutureWarning
    from tvm import te, topi
    topi.take(te.placeholder((4, 2)), te.placeholder((3,), "int64"), axis=0)   # control: TVM
    print("slimc-quiet-done")
""")


def test_first_run_prints_no_foreign_noise(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    # every occurrence shown, not the first one per source line, so a control cannot hide
    # slimc's occurrences (or be hidden by them)
    r = subprocess.run([sys.executable, "-W", "always::FutureWarning", "-c", SCRIPT,
                        str(tmp_path / "mm.onnx")],
                       capture_output=True, text=True, env=env, timeout=600, check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "slimc-quiet-done" in r.stdout, out[-3000:]
    assert out.count(TORCH) == 1, out        # the control's only
    assert out.count(TVM) == 1, out          # the control's only
    # graphsurgeon did log (its size warning here), without the line about colours
    assert re.search(r"^\[W\] ", out, re.M), out
    assert importlib.util.find_spec("colored") is not None or GRAPHSURGEON not in out, out
    # slimc's own warnings still come through
    assert "NoMatchWarning" in r.stderr and "prune_heads was asked for a change" in r.stderr


def test_native_filter_drops_only_that_line(capfd):
    with _quiet.tvm_native_noise():
        os.write(2, f"[12:00:00] transform.h:1261: Warning: {TVM}. Make sure ...\n".encode())
        os.write(2, b"kept 1\n")
        with _quiet.tvm_native_noise():   # nested (the build inside compile's legalization)
            os.write(2, b"kept 2, ")
            os.write(2, b"same line\n")
        os.write(2, b"no newline at the end")
    os.write(2, b"\nafter\n")
    assert capfd.readouterr().err == ("kept 1\nkept 2, same line\nno newline at the end\n"
                                      "after\n")


def test_torch_filter_is_narrow():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with _quiet.torch_internal_warnings():
            warnings.warn(f"{TORCH}, use ...", FutureWarning)
            warnings.warn("another FutureWarning", FutureWarning)
            warnings.warn(f"{TORCH} as a DeprecationWarning", DeprecationWarning)
        warnings.warn(f"{TORCH} outside", FutureWarning)
    assert [str(w.message) for w in seen] == [
        "another FutureWarning", f"{TORCH} as a DeprecationWarning", f"{TORCH} outside"]
