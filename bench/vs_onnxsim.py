"""slimc against onnxsim 0.8.1 at the same settings, on the graph a user exports, in one run.

    .venv/bin/pip install -e .[dev]            # onnxsim==0.8.1 (nothing is installed at run time)
    .venv/bin/python bench/vs_onnxsim.py                   # all-MiniLM-L6-v2, real metrics
    .venv/bin/python bench/vs_onnxsim.py --model bert-base # BERT-base shape, random weights

The model is exported as a new user would: ``torch.onnx.export`` with the TorchScript exporter,
opset 17, dynamic batch and sequence (transformers 5 builds the padding mask with Where/IsNaN).
Both tools get the same ONNX file and the same calibration batches (sentences of gensim's
``lee_background.cor``, never the evaluation sets). Settings: 30 % of attention heads removed;
Wanda at 50 % unstructured and at 2:4; static int8 (W8A8, per-channel weights, minmax) without
and with SmoothQuant (alpha 0.5). For every result the table gives what the tool actually
changed (heads left, zero weights among the MatMul weights, int8 weights), the task metrics on
onnxruntime (MiniLM: WordSim-353 Spearman, 5-fold polarity probe; BERT-base, random weights: the
cosine of the output to the unmodified model's), and the onnxruntime latency (batch 1,
sequence 128, median of interleaved rounds); slimc's results are also compiled with TVM.
A tool that matches nothing is reported as such ("unchanged"), not dropped.
"""

from __future__ import annotations

import argparse
import inspect
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx  # noqa: E402
import torch  # noqa: E402

import slimc  # noqa: E402
from slimc import eval as ev  # noqa: E402
from slimc import passes  # noqa: E402
from slimc.codegen.targets import host_cpu  # noqa: E402

_SETTLE = 0.05


# -- the model as a user exports it ----------------------------------------------------------
def build(name: str):
    """(encoder module, tokenizer or None)."""
    if name == "minilm":
        tok, bert = ev.load_minilm()
        return ev.sentence_encoder(bert), tok
    import transformers
    config = transformers.BertConfig(hidden_size=768, num_hidden_layers=12,
                                     num_attention_heads=12, intermediate_size=3072)
    torch.manual_seed(0)
    bert = transformers.BertModel(config, add_pooling_layer=False).eval()
    return ev.sentence_encoder(bert), None


def export(module, path: Path) -> None:
    ids = torch.ones(2, 16, dtype=torch.int64)
    mask = torch.ones(2, 16, dtype=torch.int64)
    with torch.no_grad():
        torch.onnx.export(module, (ids, mask), str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"],
                          output_names=["embedding"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                        "attention_mask": {0: "batch", 1: "seq"},
                                        "embedding": {0: "batch"}})


def calibration(tok, n: int = 8, batch: int = 8, seq: int = 32, vocab: int = 30522):
    """``n`` batches of (input_ids, attention_mask): real unlabelled text for MiniLM."""
    if tok is None:
        rng = np.random.default_rng(1)
        return [(rng.integers(1000, vocab, (batch, seq)).astype(np.int64),
                 np.ones((batch, seq), np.int64)) for _ in range(n)]
    text = ev.lee_background(n * batch)
    return [ev.tokenize(tok, text[i * batch:(i + 1) * batch], seq) for i in range(n)]


# -- what a result changed --------------------------------------------------------------------
def _matmul_weights(model: onnx.ModelProto) -> list[np.ndarray]:
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 \
                and node.input[1] in inits:
            w = onnx.numpy_helper.to_array(inits[node.input[1]])
            if w.ndim == 2 and w.dtype.kind == "f":
                out.append(w)
    return out


def changes(model: onnx.ModelProto) -> dict:
    inits = [onnx.numpy_helper.to_array(i) for i in model.graph.initializer]
    weights = _matmul_weights(model)
    total = sum(w.size for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    # weights stored as int8, or float weights a QuantizeLinear turns into int8 (QDQ form)
    names = {i.name: i for i in model.graph.initializer}
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    int8 = sum(a.size for a in inits if a.dtype in (np.int8, np.uint8) and a.ndim >= 2) \
        + sum(int(np.prod(names[q].dims)) for q in quantized
              if q in names and len(names[q].dims) >= 2)
    with tempfile.TemporaryDirectory() as d:
        onnx.save(model, f"{d}/m.onnx")
        try:
            blocks = slimc.load(f"{d}/m.onnx").attention_blocks()
        except slimc.SlimcError:
            blocks = []
    return {"heads": sum(b.num_heads for b in blocks) if blocks else None,
            "zero %": 100.0 * zeros / total if total else 0.0,
            "int8 weights": int8, "nodes": len(model.graph.node)}


def same_model(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    if len(a.graph.node) != len(b.graph.node):
        return False
    wa = {i.name: onnx.numpy_helper.to_array(i) for i in a.graph.initializer}
    wb = {i.name: onnx.numpy_helper.to_array(i) for i in b.graph.initializer}
    return wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


# -- metrics ----------------------------------------------------------------------------------
def ort_session(model: onnx.ModelProto):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return lambda ids, mask: sess.run(None, {names[0]: ids, names[1]: mask})[0]


def metrics(fn, tok, reference_fn, probe) -> dict:
    if tok is not None:
        return {"WordSim": ev.wordsim_spearman(fn, tok), "polarity": ev.polarity_accuracy(fn, tok)}
    a, b = fn(*probe), reference_fn(*probe)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return {"cosine": float(np.mean(cos))}


def time_all(runs: dict, n: int) -> dict:
    """Median ms of every callable, timed in interleaved shuffled rounds."""
    times = {k: [] for k in runs}
    order = list(runs)
    rng = random.Random(0)
    for r in range(n + 1):          # round 0 warms up
        rng.shuffle(order)
        for k in order:
            time.sleep(_SETTLE)
            t = time.perf_counter()
            runs[k]()
            if r:
                times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}


# -- the two tools ----------------------------------------------------------------------------
def slimc_variants(path: Path, calib, smoothquant_ok: bool):
    g = slimc.load(path)
    yield "heads 30 %", lambda: passes.prune_heads(g, ratio=0.3, score="magnitude")
    yield "wanda 50 %", lambda: passes.threshold_weights(g, sparsity=0.5, importance="wanda",
                                                         calib=calib)
    yield "wanda 2:4", lambda: passes.threshold_weights(g, pattern="2:4", importance="wanda",
                                                        calib=calib)
    yield "int8 static", lambda: passes.quantize(g, calib=calib, method="minmax")
    if smoothquant_ok:
        # BERT-style post-LayerNorm blocks: the norm's output also feeds the residual, so the
        # factors go into a Mul in front of the Linears (mode "insert") instead of the norm
        yield "int8 static + SmoothQuant", lambda: passes.quantize(
            g, calib=calib, method="minmax", smooth=0.5, smooth_mode="insert")


def onnxsim_variants(path: Path, calib):
    import onnxsim
    model = onnx.load(str(path))
    data = [{"input_ids": a, "attention_mask": b} for a, b in calib]
    yield "heads 30 %", lambda: onnxsim.apply_attention_head_pruning(model, sparsity=0.3)
    yield "wanda 50 %", lambda: onnxsim.apply_wanda_pruning(model, calibration_data=data,
                                                            sparsity=0.5)
    yield "wanda 2:4", lambda: onnxsim.apply_wanda_pruning(model, calibration_data=data,
                                                           n=2, m=4)
    yield "int8 static", lambda: onnxsim.quantize_static(model, calibration_data=data,
                                                         method="minmax", per_channel=True)
    yield "int8 static + SmoothQuant", lambda: onnxsim.quantize_static(
        onnxsim.apply_smoothquant(model, calibration_data=data, alpha=0.5),
        calibration_data=data, method="minmax", per_channel=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="minilm", choices=["minilm", "bert-base"])
    ap.add_argument("--runs", type=int, default=20, help="timed rounds (default 20)")
    ap.add_argument("--seq", type=int, default=128, help="sequence length of the latency run")
    ap.add_argument("--no-tvm", action="store_true", help="skip slimc's TVM builds")
    ap.add_argument("--only", default=None, help="only settings whose name contains this")
    args = ap.parse_args(argv)
    try:
        import onnxsim
    except ImportError:
        print("bench/vs_onnxsim.py needs onnxsim==0.8.1: .venv/bin/pip install -e .[dev]",
              file=sys.stderr)
        return 2

    cpu = host_cpu()
    print(f"CPU (LLVM host): {cpu['cpu']}  cores: {cpu['cores']}; onnxsim {onnxsim.__version__}, "
          f"onnxruntime {__import__('onnxruntime').__version__}, torch {torch.__version__}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    module, tok = build(args.model)
    calib = calibration(tok)
    rng = np.random.default_rng(2)
    probe = (rng.integers(1000, 30000, (4, 64)).astype(np.int64), np.ones((4, 64), np.int64))
    lat_in = (np.full((1, args.seq), 2000, np.int64), np.ones((1, args.seq), np.int64))
    if tok is not None:
        lat_in = ev.tokenize(tok, [" ".join(ev.lee_background(40))], args.seq)

    rows, runs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export(module, path)
        base = onnx.load(str(path))
        base_fn = ort_session(base)
        rows.append({"tool": "-", "setting": "unmodified", **changes(base),
                     **metrics(base_fn, tok, base_fn, probe)})
        runs["unmodified / onnxruntime"] = (lambda f=base_fn: f(*lat_in))

        smooth_ok = "smooth" in inspect.signature(passes.quantize).parameters
        for tool, variants in (("slimc", slimc_variants(path, calib, smooth_ok)),
                               ("onnxsim", onnxsim_variants(path, calib))):
            for setting, make in variants:
                if args.only and args.only not in setting:
                    continue
                row = {"tool": tool, "setting": setting}
                print(f"[{time.strftime('%H:%M:%S')}] {tool}: {setting} ...", flush=True)
                start = time.perf_counter()
                try:
                    result = make()
                except Exception as e:  # a tool's failure is a row of the table, not a crash
                    row["result"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:90]}"
                    if not isinstance(e, slimc.SlimcError) and tool == "slimc":
                        traceback.print_exc()
                    rows.append(row)
                    continue
                row["s"] = time.perf_counter() - start
                model = result.to_onnx() if hasattr(result, "to_onnx") else result
                if same_model(model, base):
                    row["result"] = "unchanged (matched nothing)"
                row.update(changes(model))
                fn = ort_session(model)
                row.update(metrics(fn, tok, base_fn, probe))
                runs[f"{setting} / {tool} / onnxruntime"] = (lambda f=fn: f(*lat_in))
                if tool == "slimc" and not args.no_tvm:
                    model_in, hook = result, "default"
                    if "int8" in setting:   # real int8 kernels: fold the Q/DQ pairs first
                        from slimc.codegen.int8 import int8_schedules
                        model_in, hook = passes.fold_fake_quant(result), int8_schedules
                    art = slimc.compile(model_in, "x86", tune=hook,
                                        input_shapes={"input_ids": lat_in[0].shape,
                                                      "attention_mask": lat_in[1].shape})
                    import tvm
                    from tvm import relax
                    vm = relax.VirtualMachine(art.executable, tvm.cpu())
                    targs = [tvm.runtime.tensor(x) for x in lat_in]
                    main_fn = vm["main"]
                    runs[f"{setting} / slimc / TVM"] = (lambda m=main_fn, a=targs: m(*a))
                rows.append(row)
                # each row as it is measured: a later step that dies (onnxsim's Wanda on
                # BERT-base peaked at 14.6 GB here) does not take the earlier ones with it
                print("   ", {k: round(v, 4) if isinstance(v, float) else v
                              for k, v in row.items()}, flush=True)
        print(f"timing {len(runs)} builds, {args.runs} interleaved rounds ...", flush=True)
        med = time_all(runs, args.runs)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    metric_cols = ["WordSim", "polarity"] if tok is not None else ["cosine"]
    head = ["tool", "setting", "heads", "zero %", "int8 weights", *metric_cols,
            "ORT ms", "TVM ms", "note"]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        key = "unmodified / onnxruntime" if r["setting"] == "unmodified" \
            else f"{r['setting']} / {r['tool']} / onnxruntime"
        cells = [r["tool"], r["setting"],
                 "-" if r.get("heads") is None else str(r["heads"]),
                 f"{r['zero %']:.1f}" if "zero %" in r else "-",
                 f"{r['int8 weights']:,}" if "int8 weights" in r else "-",
                 *[f"{r[c]:.4f}" if c in r else "-" for c in metric_cols],
                 f"{med[key]:.1f}" if key in med else "-",
                 f"{med[k]:.1f}" if (k := f"{r['setting']} / slimc / TVM") in med
                 and r["tool"] == "slimc" else "-",
                 r.get("result", "")]
        print("| " + " | ".join(cells) + " |")
    print(f"\nmodel {args.model}; latency batch 1, sequence {args.seq}, median of {args.runs} "
          "interleaved rounds; metrics on onnxruntime.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
