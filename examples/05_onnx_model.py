"""An ONNX file in, passes on the plain onnx.ModelProto, compiled with TVM, checked against
onnxruntime.

Every slimc pass takes an onnx.ModelProto (or a torch.fx.GraphModule) and returns a new one of
the same kind, so slimc's passes can sit inside an ONNX pipeline that never uses slimc.Graph.

Run: .venv/bin/python examples/05_onnx_model.py   (about 20 s)
"""

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from transformers import BertConfig, BertModel

import slimc
from slimc import passes


class Encoder(torch.nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids):
        return self.bert(input_ids).last_hidden_state


def write_onnx_file(path: Path) -> np.ndarray:
    """Stand-in for the ONNX file you already have: a small BERT, TorchScript exporter."""
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, vocab_size=100, max_position_embeddings=64)
    model = Encoder(BertModel._from_config(cfg, attn_implementation="eager").eval()).eval()
    ids = torch.randint(0, 100, (1, 16))
    torch.onnx.export(model, (ids,), str(path), input_names=["input_ids"],
                      output_names=["hidden"], dynamo=False, opset_version=17)
    return ids.numpy()


def onnxruntime_run(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids})[0]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bert.onnx"
        ids = write_onnx_file(path)
        model = onnx.load(str(path))                    # a plain onnx.ModelProto

        # passes on the ModelProto: each returns a new ModelProto, the input stays as it was
        pruned = passes.prune_heads(model, heads={0: [1], 1: [0, 3]})   # by layer index
        fused = passes.fuse(pruned)        # the DEFAULT fusion rules (exact)
        clean = passes.cleanup(fused)
        before = [n.op_type for n in model.graph.node]
        after = [n.op_type for n in clean.graph.node]
        print(f"nodes: {len(before)} -> {len(after)}; "
              f"fused ops now: {sorted(set(after) - set(before))}")
        fuse_dev = np.abs(onnxruntime_run(fused, ids) - onnxruntime_run(pruned, ids)).max()
        print(f"fuse: max |diff| in onnxruntime = {fuse_dev:.2e}")

        art = slimc.compile(clean, target="x86")        # compile takes the ModelProto too
        compiled = slimc.runtime.load(art.save(Path(tmp) / "artifact"))
        got = compiled(ids)[0]

    want = onnxruntime_run(clean, ids)
    print(f"pruned vs original (onnxruntime): max |diff| = "
          f"{np.abs(want - onnxruntime_run(model, ids)).max():.2e} (3 of 8 heads removed)")
    print(f"TVM vs onnxruntime on the optimized model: max |diff| = {np.abs(got - want).max():.2e}")


if __name__ == "__main__":
    main()
