"""Serving: one loaded artifact called from many threads at once, and the cost of the index check.

    .venv/bin/python bench/serving.py [--threads 8] [--calls 50] [--rounds 3] [--model minilm]

The model (all-MiniLM-L6-v2 by default, batch 1, sequence 128) is captured, compiled for this
CPU and loaded once. Then, in alternating rounds (a 0.3 s pause before each), ``--threads``
threads make ``--calls`` calls each on ONE loaded model, under each way of sharing it:

- ``slimc load()``: the default, one Relax VM run by one worker thread (calls take turns, each
  on every core);
- ``slimc load(concurrency=2)``: two VMs and workers, two calls at a time;
- ``one VM per thread``: each calling thread makes its own VM and runs it itself (the
  alternative not taken: TVM then keeps a thread pool per calling thread);
- ``onnxruntime``: one InferenceSession shared by the threads (its ``run`` is thread-safe).

Every output is compared with the single-threaded one (slimc: bit-equal; onnxruntime: its own
single-threaded output, bit-equal). Printed: calls per second (median of the rounds), per-call
p50 / p99 latency, and wrong outputs. Second, the index check: median latency of the model with
and without the check (interleaved calls), and the check alone, as a share of the latency.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import inputs_for  # noqa: E402
from latency import build_model  # noqa: E402

import slimc  # noqa: E402
from slimc import runtime  # noqa: E402

_SETTLE = 0.3   # TVM's and onnxruntime's pool workers spin after a call (see latency.py)


def _hammer(call, threads: int, calls: int, want: list) -> dict:
    """``calls`` calls from each of ``threads`` threads started together."""
    barrier = threading.Barrier(threads + 1)
    lat: list[float] = []
    wrong = [0]
    errors: list[str] = []

    def work():
        barrier.wait()
        for _ in range(calls):
            t = time.perf_counter()
            try:
                out = call()
            except Exception as e:  # noqa: BLE001 - counted and printed
                errors.append(f"{type(e).__name__}: {e}"[:200])
                continue
            lat.append(time.perf_counter() - t)
            wrong[0] += not all(np.array_equal(o, w) for o, w in zip(out, want))

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    time.sleep(_SETTLE)
    start = time.perf_counter()
    barrier.wait()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - start
    return {"throughput": len(lat) / seconds, "p50": float(np.percentile(lat, 50)) * 1e3,
            "p99": float(np.percentile(lat, 99)) * 1e3, "wrong": wrong[0], "errors": errors}


def _per_thread_vms(m: runtime.Module):
    """A call that runs on a VM of the calling thread's own, in that thread (made on its first
    call): the alternative to the pool's worker threads."""
    local = threading.local()

    def call(ids, mask):
        if not hasattr(local, "main"):
            local.main = m._pool._make()[1]
        args = m._to_device(m._check((ids, mask)))
        return runtime._flatten(local.main(*args))
    return call


def _ort(path: Path):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = runtime.physical_cores()
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _check_cost(m: runtime.Module, ids, mask, repeat: int) -> dict:
    """Median latency with and without the index check (interleaved), and the check alone."""
    ranges = m._ranges
    with_check, without = [], []
    for _ in range(repeat):
        for timings, active in ((with_check, ranges), (without, {})):
            m._ranges = active
            time.sleep(_SETTLE)
            t = time.perf_counter()
            m(ids, mask)
            timings.append(time.perf_counter() - t)
    m._ranges = ranges
    alone = []
    for _ in range(2000):
        t = time.perf_counter()
        runtime.check_index_ranges(ranges, m.input_specs, [ids, mask])
        alone.append(time.perf_counter() - t)
    return {"with": float(np.median(with_check)) * 1e3, "without": float(np.median(without)) * 1e3,
            "alone_us": float(np.median(alone)) * 1e6}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", help="minilm, bert-base or bert-tiny")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--check-repeat", type=int, default=100)
    args = p.parse_args(argv)

    from slimc.codegen.targets import host_cpu
    cpu = host_cpu()
    print(f"CPU (LLVM host): {cpu['cpu']}  cores: {cpu['cores']}  TVM threads per call: "
          f"{os.environ.get('TVM_NUM_THREADS', runtime.physical_cores())}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    module, desc = build_model(args.model, None)
    inputs = inputs_for(1, args.seq)
    ids, mask = (t.numpy() for t in inputs)
    print(f"model: {desc}; batch 1, sequence {args.seq}; {args.threads} threads x "
          f"{args.calls} calls, {args.rounds} rounds")

    work = Path(tempfile.mkdtemp(prefix="slimc-serving-"))
    g = slimc.capture(module, inputs)
    with torch.no_grad():
        art = slimc.compile(g, "x86").save(work / "art")
    g.save(work / "model.onnx")
    m1 = runtime.load(art)
    m2 = runtime.load(art, concurrency=2)
    per_thread = _per_thread_vms(m1)
    sess = _ort(work / "model.onnx")
    feed = {i.name: x for i, x in zip(sess.get_inputs(), (ids, mask))}
    want = m1(ids, mask)
    want_ort = sess.run(None, feed)
    print(f"index ranges: {m1.index_ranges}; max |slimc - onnxruntime| "
          f"{float(np.abs(want[0] - want_ort[0]).max()):.1e}")
    # measured first, on an idle process: after the threaded rounds TVM keeps every calling
    # thread's worker pool alive
    cost = _check_cost(m1, ids, mask, args.check_repeat)
    variants = {
        "slimc load()": (lambda: m1(ids, mask), want),
        "slimc load(concurrency=2)": (lambda: m2(ids, mask), want),
        "one VM per thread": (lambda: per_thread(ids, mask), want),
        "onnxruntime": (lambda: sess.run(None, feed), want_ort),
    }
    single = {}
    for name, (call, _) in variants.items():   # warm-up, and single-thread latency
        for _ in range(3):
            call()
        times = []
        for _ in range(10):
            time.sleep(_SETTLE)
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        single[name] = float(np.median(times)) * 1e3
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            call, expected = variants[name]
            results[name].append(_hammer(call, args.threads, args.calls, expected))
            print(f"  round {r + 1} {name}: {results[name][-1]['throughput']:.1f} calls/s",
                  flush=True)

    base = np.median([x["throughput"] for x in results["onnxruntime"]])
    print(f"\n{'sharing':28s} {'1 thread ms':>11s} {'calls/s':>8s} {'vs ORT':>7s} "
          f"{'p50 ms':>7s} {'p99 ms':>7s} {'wrong':>6s} {'errors':>6s}")
    for name, rounds in results.items():
        tput = float(np.median([x["throughput"] for x in rounds]))
        p50 = float(np.median([x["p50"] for x in rounds]))
        p99 = float(np.median([x["p99"] for x in rounds]))
        wrong = sum(x["wrong"] for x in rounds)
        errors = sum(len(x["errors"]) for x in rounds)
        print(f"{name:28s} {single[name]:11.2f} {tput:8.1f} {tput / base:6.2f}x {p50:7.1f} "
              f"{p99:7.1f} {wrong:6d} {errors:6d}")
        for e in sorted({e for x in rounds for e in x["errors"]})[:3]:
            print(f"    {e}")

    share = (cost["with"] - cost["without"]) / cost["without"] * 100
    print(f"\nindex check: model {cost['with']:.2f} ms with it, {cost['without']:.2f} ms "
          f"without (median of {args.check_repeat} interleaved calls, {share:+.2f} %); the check "
          f"alone {cost['alone_us']:.1f} us = {cost['alone_us'] / 1e3 / cost['without'] * 100:.3f}"
          f" % of the latency")
    bad = ids.copy()
    bad[0, 5] = 10_000_000
    try:
        m1(bad, mask)
        print("out-of-range id: NOT caught")
    except slimc.errors.IndexRangeError as e:
        print(f"out-of-range id: {type(e).__name__}: {e.problem}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
