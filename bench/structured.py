"""Structured compression of all-MiniLM-L6-v2: heads, FFN neurons, whole layers — compiled.

    .venv/bin/python bench/structured.py [--recover-steps 0 [--hidden]] [--repeat 15] [--seq 128]

Each variant is captured with torch.export at batch 1, the given sequence length, pruned by
magnitude (``prune_heads``, ``prune_ffn``) and block influence on ``lee_background.cor`` sentences
(``drop_layers``), optionally distilled towards the original (``slimc.recover``, the same
sentences, never the evaluation data), cleaned up and compiled for this CPU. Printed: parameters,
TVM latency (medians of interleaved rounds, a 0.3 s pause before each call), the speed-up over
the unpruned build, and the demo's two metrics computed on the compiled artifact (WordSim-353
Spearman; polarity 5-fold probe accuracy). A first measurement for issue 18: no search, no
confidence intervals yet.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

import slimc
from slimc import eval as ev
from slimc import passes, runtime
from slimc.passes.prune_heads.recover import recover

VARIANTS = {
    "dense": [],
    "heads 30%": [("prune_heads", {"ratio": 0.3})],
    "ffn 50%": [("prune_ffn", {"ratio": 0.5, "round_to": 16})],
    "drop 2 layers": [("drop_layers", {"n": 2})],
    "heads 30% + ffn 50%": [("prune_heads", {"ratio": 0.3}),
                            ("prune_ffn", {"ratio": 0.5, "round_to": 16})],
    "drop 2 + ffn 50%": [("drop_layers", {"n": 2}), ("prune_ffn", {"ratio": 0.5, "round_to": 16})],
    "drop 2 + heads 30% + ffn 50%": [("drop_layers", {"n": 2}), ("prune_heads", {"ratio": 0.3}),
                                     ("prune_ffn", {"ratio": 0.5, "round_to": 16})],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--recover-steps", type=int, default=0)
    p.add_argument("--hidden", action="store_true",
                   help="layer-mapped distillation (recover(hidden=True))")
    p.add_argument("--calib", type=int, default=16, help="sentences for block influence")
    args = p.parse_args(argv)

    from slimc.codegen.targets import host_cpu
    cpu = host_cpu()
    print(f"CPU (LLVM host): {cpu['cpu']}  cores: {cpu['cores']}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    tok, bert = ev.load_minilm()
    encoder = ev.sentence_encoder(bert)
    ids, mask = ev.tokenize(tok, ["slimc compiles transformer models ahead of time."], args.seq)
    g = slimc.capture(encoder, (torch.as_tensor(ids), torch.as_tensor(mask)))
    sentences = ev.lee_background(limit=max(args.calib, args.recover_steps))
    calib = [ev.tokenize(tok, [s], args.seq) for s in sentences[:args.calib]]
    data = [ev.tokenize(tok, [s], args.seq) for s in sentences[:args.recover_steps]]

    work = tempfile.mkdtemp(prefix="slimc-structured-")
    models, rows = {}, {}
    for name, steps in VARIANTS.items():
        t = time.perf_counter()
        graph = g
        for pass_name, options in steps:
            extra = {"calib": calib} if pass_name == "drop_layers" else {}
            graph = getattr(passes, pass_name)(graph, **options, **extra)
        if steps and args.recover_steps:
            graph = recover(graph, teacher=g, data=data, steps=args.recover_steps,
                            freeze=("embeddings",), hidden=args.hidden)
        graph = passes.cleanup(graph)
        art = slimc.compile(graph, "x86").save(os.path.join(work, f"v{len(models)}"))
        m = runtime.load(art)
        models[name] = m
        rows[name] = {"params": graph.num_parameters(), "prep_s": time.perf_counter() - t}
        print(f"  built {name}: {rows[name]['params']:,} parameters "
              f"({rows[name]['prep_s']:.0f} s)", flush=True)

    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m(ids, mask)
    order = list(models)
    for r in range(args.repeat):
        for name in (order if r % 2 == 0 else order[::-1]):
            time.sleep(0.3)
            t = time.perf_counter()
            models[name](ids, mask)
            times[name].append((time.perf_counter() - t) * 1e3)
    for name, m in models.items():
        def fn(a, b, m=m):
            return m(a, b)[0]
        rows[name]["ms"] = float(np.median(times[name]))
        # the artifact takes batch 1 at --seq: the metrics tokenize to that shape
        rows[name]["wordsim"] = ev.wordsim_spearman(fn, tok, seq=args.seq, batch=1)
        rows[name]["polarity"] = ev.polarity_accuracy(fn, tok, seq=args.seq, batch=1)
        print(f"  measured {name}", flush=True)

    base = rows["dense"]
    print(f"\nall-MiniLM-L6-v2, batch 1, sequence {args.seq}, fp32, recover steps "
          f"{args.recover_steps}{' (layer-mapped)' if args.hidden else ''}; medians of "
          f"{args.repeat} interleaved rounds")
    print(f"{'variant':32s} {'params':>11s} {'TVM ms':>7s} {'speed-up':>8s} {'WordSim':>8s} "
          f"{'polarity':>8s}")
    for name, r in rows.items():
        print(f"{name:32s} {r['params']:11,d} {r['ms']:7.2f} {base['ms'] / r['ms']:7.2f}x "
              f"{r['wordsim']:8.4f} {r['polarity']:8.4f}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
