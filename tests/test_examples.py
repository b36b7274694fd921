"""Every script in examples/ runs (a subprocess with this interpreter) and prints what it claims:
a broken example fails here, not in a user's hands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NUM = r"([0-9.]+e[+-][0-9]+)"

# per example: (regex, bound) pairs: each regex must match a line of stdout, and its number (if
# it captures one) must be <= bound; plus whether it is slow (a TVM build or more)
CASES = {
    "01_compress_and_compile.py": ([
        (r"compressed: heads per layer \[3, 3\]", None),
        (r"compressed vs original model: max \|diff\| = " + NUM, 1.0),
        (r"compiled vs compressed graph in torch: max \|diff\| = " + NUM, 1e-4)], True),
    "02_custom_pass.py": ([
        (r"on a plain GraphModule: GraphModule", None),
        (r"^round_weights\s+lossy\s+yes", None),
        (r"round_weights\(mantissa_bits=7\) output change: max \|diff\| = " + NUM, 1e-2),
        (r"^round_weights\s+lossy\s+mantissa_bits\s+Round every float32 weight", None)], False),
    "03_custom_fusion_rule.py": ([
        (r"^FX: fired \{'fold_scale_into_linear': 1.*max \|diff\| = " + NUM, 1e-5),
        (r"^ONNX: fired \{'fold_scale_into_linear': 1.*max \|diff\| = " + NUM, 1e-5),
        (r"^recipe: fired \{'fold_scale_into_linear': 1", None),
        (r"explain: .*the factor has shape \(4,\), not a scalar", None),
        (r"^fold_scale_into_linear\s+user\s+\(x @ W \+ b\) \* s", None)], False),
    "04_torch_compile_backend.py": ([
        (r"BERT seq 16: max \|slimc - eager\| = " + NUM, 1e-5),
        (r"BERT seq 24: max \|slimc - eager\| = " + NUM, 1e-5),
        (r"subgraph 0: TVM$", None),
        (r"subgraph 1: eager \(TVM has no converter for i0", None),
        (r"graph break \+ unsupported op: max \|slimc - eager\| = " + NUM, 1e-5)], True),
    "05_onnx_model.py": ([
        (r"fuse: max \|diff\| in onnxruntime = " + NUM, 1e-5),
        (r"pruned vs original \(onnxruntime\): max \|diff\| = " + NUM, 1.0),
        (r"TVM vs onnxruntime on the optimized model: max \|diff\| = " + NUM, 1e-4)], True),
    "06_relax_irmodule.py": ([
        (r"BSR kernels: \{'bsr_matmul", None),
        (r"Relax module with slimc transforms vs torch: max \|diff\| = " + NUM, 1e-4)], True),
}


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(CASES)


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if slow else [])
                                  for n, (_, slow) in CASES.items()])
def test_example_runs_and_prints_its_claims(name):
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True,
                          text=True, timeout=600, check=False, cwd=EXAMPLES.parent)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for pattern, bound in CASES[name][0]:
        found = re.search(pattern, proc.stdout, re.MULTILINE)
        assert found, f"{name}: no line matches {pattern!r} in:\n{proc.stdout}"
        if bound is not None:
            assert float(found.group(1)) <= bound, f"{name}: {found.group(0)} (bound {bound})"
