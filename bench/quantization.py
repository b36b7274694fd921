"""int8 quantization of the shipped all-MiniLM-L6-v2: accuracy of each calibration method
against fp32, and latency of the int8 builds against onnxruntime and torch, in one run.

    .venv/bin/python bench/quantization.py                 # all methods, latency b1 s128
    .venv/bin/python bench/quantization.py --no-accuracy   # latency only
    .venv/bin/python bench/quantization.py --no-tvm        # skip the TVM builds (minutes)
    .venv/bin/python bench/quantization.py --model bert-base   # latency, BERT-base shape

Accuracy: ``slimc.passes.quantize`` (calibration on ``lee_background.cor`` sentences) then
``fold_fake_quant``, run by onnxruntime; WordSim-353 Spearman and the polarity probe
(``slimc.eval``) against the fp32 model. Latency: batch 1, sequence 128, the same inputs for
every variant, interleaved rounds, medians. Variants: onnxruntime fp32, onnxruntime's own int8
(``quantize_dynamic``; ``quantize_static`` QDQ), slimc's folded int8 graph on onnxruntime,
torch fp32 and torch dynamic int8 (``torch.ao.quantization.quantize_dynamic``), and TVM fp32 /
int8 builds of the ONNX graphs (``slimc.compile`` with the default CPU schedules).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import slimc
from slimc import eval as ev
from slimc import passes

INPUTS = ["input_ids", "attention_mask"]
OUTPUTS = ["sentence_embedding"]


def export_onnx(encoder, seq: int) -> slimc.Graph:
    """The sentence encoder as ONNX with symbolic batch and sequence (one graph for every
    evaluation shape)."""
    import onnx
    ids = torch.ones(2, seq, dtype=torch.int64)
    buf = io.BytesIO()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(encoder, (ids, torch.ones_like(ids)), buf, dynamo=False,
                          opset_version=17, input_names=INPUTS, output_names=OUTPUTS,
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in INPUTS})
    model = onnx.load_from_string(buf.getvalue())
    return slimc.Graph("onnx", model, example_inputs=(ids.numpy(), ids.numpy()))


def export_static(encoder, ids, mask) -> slimc.Graph:
    """The encoder at one fixed shape with torch's dynamo exporter (what TVM compiles: its ONNX
    frontend reads this exporter's constants, not the TorchScript exporter's)."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(encoder, (torch.as_tensor(ids), torch.as_tensor(mask)),
                                 dynamo=True, input_names=INPUTS, output_names=OUTPUTS,
                                 verbose=False)
    return slimc.Graph("onnx", prog.model_proto, example_inputs=(ids, mask))


def ort_session(model, threads: int, optimize: bool = True):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    data = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def ort_embed(sess):
    def fn(ids, mask):
        return sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    return fn


def calibration(tok, n: int, seq: int, batch: int) -> list[tuple]:
    texts = ev.lee_background(limit=n)
    return [ev.tokenize(tok, texts[i:i + batch], seq) for i in range(0, len(texts), batch)]


def metrics(fn, tok) -> tuple[float, float]:
    return ev.wordsim_spearman(fn, tok), ev.polarity_accuracy(fn, tok)


# -- accuracy --------------------------------------------------------------------------------
def accuracy(g: slimc.Graph, tok, calib, threads: int, variants: list[tuple[str, dict]]):
    rows = []
    t = time.perf_counter()
    base = metrics(ort_embed(ort_session(g.onnx, threads)), tok)
    rows.append(("fp32", base, 0.0, time.perf_counter() - t))
    for label, opts in variants:
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = passes.quantize(g, calib=calib if opts.get("activations") != "dynamic" else None,
                                **opts)
            f = passes.fold_fake_quant(q)
        seconds = time.perf_counter() - t
        rows.append((label, metrics(ort_embed(ort_session(f.onnx, threads)), tok), seconds,
                     time.perf_counter() - t))
    print(f"\n{'variant':44s} {'WordSim ρ':>10s} {'Δ':>7s} {'polarity':>9s} {'Δ':>7s} "
          f"{'quantize+fold s':>15s}")
    for label, (ws, pol), qs, _ in rows:
        print(f"{label:44s} {ws:10.4f} {ws - base[0]:+7.4f} {pol:9.4f} {pol - base[1]:+7.4f} "
              f"{qs:15.1f}")
    return rows


# -- latency ---------------------------------------------------------------------------------
def ort_quantized(g: slimc.Graph, calib, workdir: Path):
    """onnxruntime's own int8 models: quantize_dynamic and quantize_static (QDQ)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    src = workdir / "fp32.onnx"
    onnx.save(g.onnx, str(src))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input_ids": a, "attention_mask": b} for a, b in calib])

        def get_next(self):
            return next(self.it, None)

    with contextlib.redirect_stderr(io.StringIO()):
        quantize_dynamic(str(src), str(workdir / "dyn.onnx"), weight_type=QuantType.QInt8)
        quantize_static(str(src), str(workdir / "qdq.onnx"), Reader(),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        op_types_to_quantize=["MatMul", "Gemm"])
    return str(workdir / "dyn.onnx"), str(workdir / "qdq.onnx")


def tvm_build(graph: slimc.Graph, ids, mask, hook):
    import tvm
    from tvm import relax
    start = time.perf_counter()
    art = slimc.compile(graph, "x86", tune=hook)
    seconds = time.perf_counter() - start
    vm = relax.VirtualMachine(art.executable, tvm.cpu())
    args = [tvm.runtime.tensor(ids), tvm.runtime.tensor(mask)]
    main = vm["main"]

    def run():
        out = main(*args)
        return (out[0] if not hasattr(out, "numpy") else out).numpy()
    return run, seconds


def latency(encoder, tok, args):
    ids, mask = ev.tokenize(tok, ["slimc compiles transformer models ahead of time."],
                            args.seq)
    g = export_static(encoder, ids, mask)
    texts = ev.lee_background(limit=args.calib)
    calib = [ev.tokenize(tok, [t], args.seq) for t in texts[:16]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folded = passes.fold_fake_quant(passes.quantize(g, calib=calib, method="minmax",
                                                        symmetric=False))
        folded_dyn = passes.fold_fake_quant(passes.quantize(g, activations="dynamic",
                                                            symmetric=False))
    feed = {"input_ids": ids, "attention_mask": mask}
    t_ids, t_mask = torch.as_tensor(ids), torch.as_tensor(mask)
    variants, notes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        dyn, qdq = ort_quantized(g, calib, Path(tmp))
        for label, model in (("onnxruntime fp32", g.onnx), ("onnxruntime int8 dynamic", dyn),
                             ("onnxruntime int8 static QDQ", qdq),
                             ("slimc int8 static → onnxruntime", folded.onnx),
                             ("slimc int8 dynamic → onnxruntime", folded_dyn.onnx)):
            sess = ort_session(model, args.threads)
            variants[label] = (lambda s=sess: s.run(None, feed)[0])
    with torch.inference_mode():
        reference = encoder(t_ids, t_mask).numpy()
    variants["torch fp32"] = lambda: _torch(encoder, t_ids, t_mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmod = torch.ao.quantization.quantize_dynamic(encoder, {torch.nn.Linear},
                                                      dtype=torch.qint8)
    variants["torch int8 dynamic"] = lambda: _torch(qmod, t_ids, t_mask)
    if args.tvm:
        from slimc.codegen.int8 import int8_schedules
        from slimc.codegen.schedules import apply_default_schedules
        for label, graph, hook in (
                ("tvm fp32", g, apply_default_schedules),
                ("tvm int8 static, int32 matmuls", folded, apply_default_schedules),
                ("tvm int8 static, VNNI", folded, int8_schedules),
                ("tvm int8 dynamic, VNNI", folded_dyn, int8_schedules)):
            try:
                run, secs = tvm_build(graph, ids, mask, hook)
                variants[label] = run
                notes[label] = f"compile {secs:.0f} s"
            except slimc.SlimcError as e:
                notes[label] = f"failed: {e.problem[:120]}"
    errors = {k: float(np.abs(np.asarray(fn()) - reference).max()) for k, fn in variants.items()}
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.runs):
        for k, fn in variants.items():
            # TVM's pool workers spin ~0.2 s after a call (onnxruntime's threads a while too):
            # on 2 cores they would slow whichever variant runs next
            time.sleep(0.3)
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    base = statistics.median(times["onnxruntime fp32"])
    print(f"\nlatency, batch 1, sequence {args.seq}, {args.threads} threads, {args.runs} "
          "interleaved rounds; slimc int8 = quantize(minmax, uint8 activations, int8 "
          "per-channel weights) + fold_fake_quant")
    print(f"{'variant':36s} {'median ms':>10s} {'min ms':>8s} {'vs ORT fp32':>11s} "
          f"{'max |Δemb|':>10s}  notes")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"{k:36s} {med * 1e3:10.2f} {min(ts) * 1e3:8.2f} {med / base:10.2f}x "
              f"{errors[k]:10.1e}  {notes.get(k, '')}")
    for k, note in notes.items():
        if k not in times:
            print(f"{k:36s} {'-':>10s}  {note}")
    return times


def _torch(module, ids, mask):
    with torch.inference_mode():
        return module(ids, mask).numpy()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="minilm", choices=["minilm", "bert-base"],
                    help="bert-base: latency only, on a BERT-base-shaped random encoder")
    ap.add_argument("--seq", type=int, default=128, help="latency sequence length")
    ap.add_argument("--runs", type=int, default=30, help="timed latency rounds")
    ap.add_argument("--calib", type=int, default=64, help="calibration sentences")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-accuracy", dest="accuracy", action="store_false")
    ap.add_argument("--no-latency", dest="latency", action="store_false")
    ap.add_argument("--no-tvm", dest="tvm", action="store_false")
    args = ap.parse_args(argv)

    from slimc.codegen.targets import host_cpu
    cpu = host_cpu()
    print(f"CPU (LLVM host): {cpu['cpu']}, {args.threads} threads; features: "
          f"{', '.join(k for k, v in cpu['features'].items() if v) or '-'}")
    print(f"torch {torch.__version__}; load average {os.getloadavg()[0]:.2f}")
    tok, model = ev.load_minilm()
    encoder = ev.sentence_encoder(model)
    if args.model == "bert-base":  # the standard speed workload; random weights, no accuracy
        from transformers import BertConfig, BertModel
        torch.manual_seed(0)
        cfg = BertConfig(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                         intermediate_size=3072)
        big = ev.sentence_encoder(BertModel._from_config(cfg, attn_implementation="sdpa"))
        print("latency model: BERT-base shape (12 layers, hidden 768, 12 heads, FFN 3072), "
              "random weights")
        latency(big.eval(), tok, args)
        return 0
    g = export_onnx(encoder, 16)
    calib = calibration(tok, args.calib, 64, 16)
    print(f"model: all-MiniLM-L6-v2 sentence encoder (ONNX, opset 17); calibration: "
          f"{args.calib} lee_background sentences, sequence 64")
    methods = [(f"static {m}, uint8 act / int8 per-channel w", {"method": m, "symmetric": False})
               for m in ("minmax", "percentile", "entropy", "mse")]
    methods += [("static minmax, symmetric int8", {"method": "minmax"}),
                ("static mse, per-tensor weights", {"method": "mse", "symmetric": False,
                                                    "weights": "per_tensor"}),
                ("dynamic, uint8 act / int8 per-channel w", {"activations": "dynamic",
                                                             "symmetric": False})]
    if args.accuracy:
        accuracy(g, tok, calib, args.threads, methods)
    if args.latency:
        latency(encoder, tok, args)
    print("\ncommand: .venv/bin/python bench/quantization.py " + " ".join(argv or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
