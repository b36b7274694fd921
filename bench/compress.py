"""`slimc.compress` on all-MiniLM-L6-v2: the budgeted search, its Pareto front, the chosen build.

    .venv/bin/python bench/compress.py [--max-drop 0.01] [--latency 0.5] [--max-steps 12]
                                       [--recover-steps 0] [--seq 128] [--report DIR]

The real model at batch 1 and the given sequence length, captured with torch.export; the budget
is on the demo's task metrics computed on each *compiled* candidate (WordSim-353 Spearman and
the polarity probe, each with its 95 % bootstrap interval); calibration (scoring,
quantization) reads the first 16 sentences of ``lee_background.cor``; distillation
(``--recover-steps``) spans of the Wikipedia text in gensim's test data; never the evaluation data.
Printed: the sensitivity, every candidate (latency re-measured in interleaved rounds in the
same run, size of the artifact on disk, parameters, metrics), the chosen one, the speed-up over
the unpruned fp32 and int8 builds, and the agreement of the chosen model with the original on
held-out sentences (gensim's ``lee.cor``).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import slimc
from slimc import eval as ev
from slimc import runtime
from slimc.compression import minilm_metrics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", choices=["minilm", "bert-base"],
                   help="bert-base: the BERT-base-shaped encoder with random weights; metric "
                   "= agreement (cosine to the dense output on held-out random inputs)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--max-drop", type=float, default=0.01)
    p.add_argument("--latency", type=float, default=None)
    p.add_argument("--max-steps", type=int, default=12)
    p.add_argument("--recover-steps", type=int, default=0,
                   help="layer-mapped distillation steps for every cut, on Wikipedia text "
                   "(slimc.eval.distill_batches)")
    p.add_argument("--recover-loss", default="mse", choices=["mse", "cosine"])
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--calib", type=int, default=16)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--report", default=None)
    args = p.parse_args(argv)

    from slimc.codegen.targets import host_cpu
    cpu = host_cpu()
    print(f"CPU (LLVM host): {cpu['cpu']}  cores: {cpu['cores']}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    t0 = time.perf_counter()
    if args.model == "bert-base":
        return bert_base(args, cpu, t0)
    tok, bert = ev.load_minilm()
    encoder = ev.sentence_encoder(bert)
    ids, mask = ev.tokenize(tok, ["slimc compiles transformer models ahead of time."], args.seq)
    g = slimc.capture(encoder, (torch.as_tensor(ids), torch.as_tensor(mask)))
    calib = [ev.tokenize(tok, [s], args.seq) for s in ev.lee_background(limit=args.calib)]
    metrics = minilm_metrics(seq=args.seq, batch=1)
    res = slimc.compress(g, calib=calib, metrics=metrics, max_drop=args.max_drop,
                         latency=args.latency, max_steps=args.max_steps,
                         recover_steps=args.recover_steps, repeat=args.repeat,
                         recover_data=(ev.distill_batches(tok, args.seq, args.recover_steps)
                                       if args.recover_steps else None),
                         recover_options={"loss": args.recover_loss, "lr": args.lr})
    print(f"\nall-MiniLM-L6-v2, batch 1, sequence {args.seq}; budget: every metric within "
          f"{args.max_drop:.1%}" + (f", latency ≤ {args.latency:g}x" if args.latency else "")
          + f"; recover steps {args.recover_steps}; CPU {cpu['cpu']} ({cpu['cores']} cores)")
    print("sensitivity (1 − cos to the original, uncompiled, per layer):")
    for kind, vals in res.sensitivity.items():
        print(f"  {kind:7s} " + (f"{vals:.4f}" if isinstance(vals, float)
                                 else " ".join(f"{v:.4f}" for v in vals)))
    print()
    print(res.table())
    base8 = next((c for c in res.candidates if c.precision == "int8"
                  and c.setting == res.base.setting), None)
    print(f"\n{res.reason}")
    c = res.chosen
    if c is not None:
        print(f"chosen: {c.name}: {c.latency_ms:.2f} ms = {res.base.latency_ms / c.latency_ms:.2f}x "
              "the unpruned fp32 build"
              + (f", {base8.latency_ms / c.latency_ms:.2f}x the unpruned int8 build"
                 if base8 else ""))
        m = runtime.load(c.artifact_dir)

        def fn(a, b):
            return m(a, b)[0]

        def ref(a, b):
            with torch.no_grad():
                return encoder(torch.as_tensor(a), torch.as_tensor(b)).numpy()
        agree = ev.teacher_agreement(fn, ref, tok, seq=args.seq, batch=1, ci=True)
        print(f"agreement of the chosen build with the original on held-out sentences: {agree}")
    fastest8 = min((x for x in res.candidates if x.precision == "int8"),
                   key=lambda x: x.latency_ms, default=None)
    if base8 and fastest8:
        print(f"fastest int8 candidate: {fastest8.name}: {base8.latency_ms / fastest8.latency_ms:.2f}x "
              f"the unpruned int8 build, worst drop {fastest8.worst_drop:+.1%}")
    if args.report:
        from slimc.report import write_report
        write_report(args.report, model="all-MiniLM-L6-v2", front=res, target=cpu)
        print(f"report: {args.report}/index.html")
    print(f"total {time.perf_counter() - t0:.0f} s; load average at end: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def bert_base(args, cpu, t0) -> int:
    import numpy as np
    from _models import bert

    gen = np.random.default_rng(0)

    def batch():
        return (gen.integers(1000, 30522, (1, args.seq)).astype(np.int64),
                np.ones((1, args.seq), dtype=np.int64))
    ex = batch()
    g = slimc.capture(bert(), tuple(torch.as_tensor(x) for x in ex))
    calib = [batch() for _ in range(args.calib)]
    res = slimc.compress(g, calib=calib, max_drop=args.max_drop, latency=args.latency,
                         max_steps=args.max_steps, repeat=args.repeat)
    print(f"\nBERT-base shape (12 layers, hidden 768, FFN 3072, random weights), batch 1, "
          f"sequence {args.seq}; metric: agreement = mean cosine to the dense fp32 output on "
          f"{args.calib - args.calib // 2} held-out random inputs; CPU {cpu['cpu']} "
          f"({cpu['cores']} cores)")
    print(res.table())
    print(f"\n{res.reason}")
    front = res.front
    print("Pareto front (latency, speed-up over dense fp32, agreement):")
    for c in front:
        print(f"  {c.name:40s} {c.latency_ms:8.2f} ms {res.base.latency_ms / c.latency_ms:5.2f}x "
              f"cos {c.metrics['agreement']:.4f}")
    two = [c for c in res.candidates if res.base.latency_ms / c.latency_ms >= 2]
    if two:
        best = max(two, key=lambda c: c.metrics["agreement"])
        print(f"best cosine at ≥ 2x: {best.name}: {res.base.latency_ms / best.latency_ms:.2f}x, "
              f"cos {best.metrics['agreement']:.4f}")
    if args.report:
        from slimc.report import write_report
        write_report(args.report, model="BERT-base shape (random weights)", front=res,
                     target=cpu)
    print(f"total {time.perf_counter() - t0:.0f} s; load average at end: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
