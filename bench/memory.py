"""Peak memory of slimc on a 1B-parameter-shaped Transformer: inspect, load and each pass.

    .venv/bin/python bench/memory.py                      # 1.2 B parameters (~4.8 GB fp32)
    .venv/bin/python bench/memory.py --layers 2 --hidden 512 --ffn 1408 --vocab 4096   # quick

The model is a LLaMA-shaped decoder built directly as ONNX (no torch, no exporter): token
embedding (Gather), per layer LayerNorm → Q/K/V MatMuls → multi-head attention (MatMul, scale,
Softmax, MatMul) → output MatMul → residual, LayerNorm → SwiGLU FFN (gate/up/down MatMuls) →
residual; final LayerNorm and LM head. Its weights are never held in memory at once while it is
built: each initializer is streamed, a block of rows at a time, into one external-data file
(``model.onnx.data``), and ``model.onnx`` holds only references. The values are random
(N(0, 0.02²), seeded) so that magnitude scores and thresholds have real work to do.

Every step runs in its own process (a fresh interpreter, as a user's ``slimc`` command does);
its peak resident set size is the kernel's high-water mark of that process (``VmHWM``), and a
watchdog polls the RSS and kills a step that goes over ``--cap-gb`` (the machine is shared), which
the table then reports as "killed at the cap" rather than a figure. The table is printed and
written to ``bench/memory.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Config:
    layers: int = 16
    hidden: int = 2048
    heads: int = 16
    ffn: int = 8192
    vocab: int = 32000
    seq: int = 8

    @property
    def parameters(self) -> int:
        h, f = self.hidden, self.ffn
        per_layer = 4 * h * h + 3 * h * f + 2 * h      # Q, K, V, O; gate, up, down; 2 norms
        return self.layers * per_layer + 2 * self.vocab * h + h


# -- building the model without holding its weights ------------------------------------------
def build_model(path, cfg: Config, *, seed: int = 0, chunk_bytes: int = 64 << 20) -> int:
    """Write a LLaMA-shaped ONNX model to ``path`` with its weights in ``path.data``; return the
    number of parameters. Peak memory: the graph proto plus one ``chunk_bytes`` block."""
    import onnx
    from onnx import TensorProto, helper

    path = Path(path)
    data_name = path.name + ".data"
    rng = np.random.default_rng(seed)
    h, nh, f, s = cfg.hidden, cfg.heads, cfg.ffn, cfg.seq
    hd = h // nh
    inits: list[TensorProto] = []
    nodes: list = []
    total = 0

    with open(path.parent / data_name, "wb") as data:
        def weight(name: str, shape: tuple[int, ...], kind: str = "normal") -> str:
            nonlocal total
            n = int(np.prod(shape))
            offset = data.tell()
            rows_per_chunk = max(1, chunk_bytes // (4 * int(np.prod(shape[1:], dtype=np.int64))))
            for r in range(0, shape[0], rows_per_chunk):
                rows = min(rows_per_chunk, shape[0] - r)
                block_shape = (rows, *shape[1:])
                if kind == "ones":
                    block = np.ones(block_shape, np.float32)
                else:
                    block = (rng.standard_normal(block_shape, dtype=np.float32) * 0.02)
                data.write(block.tobytes())
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)),
                         ("length", str(4 * n))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
            inits.append(t)
            total += n
            return name

        def const(name: str, values, dtype=np.int64) -> str:
            inits.append(onnx.numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
            return name

        def node(op: str, inputs: list[str], name: str, **attrs) -> str:
            nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
            return name

        heads_shape = const("shape_heads", [1, s, nh, hd])
        flat_shape = const("shape_flat", [1, s, h])
        scale = const("scale", np.float32(np.sqrt(hd)), np.float32)
        x = node("Gather", [weight("embed.weight", (cfg.vocab, h)), "input_ids"], "embed")
        for i in range(cfg.layers):
            p = f"layers.{i}"
            n1 = node("LayerNormalization", [x, weight(f"{p}.norm1.weight", (h,), "ones")],
                      f"{p}.norm1", axis=-1, epsilon=1e-5)
            qkv = {}
            for c in "qkv":
                lin = node("MatMul", [n1, weight(f"{p}.attn.{c}.weight", (h, h))], f"{p}.attn.{c}")
                r = node("Reshape", [lin, heads_shape], f"{p}.attn.{c}_heads")
                perm = [0, 2, 3, 1] if c == "k" else [0, 2, 1, 3]
                qkv[c] = node("Transpose", [r], f"{p}.attn.{c}_t", perm=perm)
            scores = node("MatMul", [qkv["q"], qkv["k"]], f"{p}.attn.scores")
            scaled = node("Div", [scores, scale], f"{p}.attn.scaled")
            probs = node("Softmax", [scaled], f"{p}.attn.probs", axis=-1)
            ctx = node("MatMul", [probs, qkv["v"]], f"{p}.attn.ctx")
            ctx_t = node("Transpose", [ctx], f"{p}.attn.ctx_t", perm=[0, 2, 1, 3])
            ctx_f = node("Reshape", [ctx_t, flat_shape], f"{p}.attn.ctx_flat")
            o = node("MatMul", [ctx_f, weight(f"{p}.attn.o.weight", (h, h))], f"{p}.attn.o")
            x = node("Add", [x, o], f"{p}.res1")
            n2 = node("LayerNormalization", [x, weight(f"{p}.norm2.weight", (h,), "ones")],
                      f"{p}.norm2", axis=-1, epsilon=1e-5)
            gate = node("MatMul", [n2, weight(f"{p}.mlp.gate.weight", (h, f))], f"{p}.mlp.gate")
            up = node("MatMul", [n2, weight(f"{p}.mlp.up.weight", (h, f))], f"{p}.mlp.up")
            sig = node("Sigmoid", [gate], f"{p}.mlp.sigmoid")
            silu = node("Mul", [gate, sig], f"{p}.mlp.silu")
            prod = node("Mul", [silu, up], f"{p}.mlp.prod")
            down = node("MatMul", [prod, weight(f"{p}.mlp.down.weight", (f, h))],
                        f"{p}.mlp.down")
            x = node("Add", [x, down], f"{p}.res2")
        xn = node("LayerNormalization", [x, weight("norm.weight", (h,), "ones")], "norm",
                  axis=-1, epsilon=1e-5)
        node("MatMul", [xn, weight("lm_head.weight", (h, cfg.vocab))], "logits")

    graph = helper.make_graph(
        nodes, "llama_shaped",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, s])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, s, cfg.vocab])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="slimc-bench-memory")
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return total


# -- measuring a step in its own process -----------------------------------------------------
@dataclass
class Step:
    name: str
    command: str          # what the step runs, as shown in the table
    argv: list[str]
    peak_mb: float | None = None     # the step's peak resident set (VmHWM)
    seconds: float = 0.0
    status: str = "ok"


# Runs a step (argv after the interpreter: -m MODULE ... or -c CODE ...) and, at exit, writes
# the process's VmHWM (peak resident set of its own address space, KiB) to $BENCH_HWM_FILE. Not
# ru_maxrss: Linux carries the parent's high-water mark into a forked child across exec, so a
# step started from a large process (a pytest session that imported torch) would report that.
_WRAP = textwrap.dedent("""\
    import atexit, os, runpy, sys
    def report(path=os.environ["BENCH_HWM_FILE"]):
        with open("/proc/self/status") as f:
            hwm = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
        with open(path, "w") as f:
            f.write(hwm)
    atexit.register(report)
    kind, target, *rest = sys.argv[1:]
    if kind == "-m":
        sys.argv = [target, *rest]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["-c", *rest]
        exec(compile(target, "<step>", "exec"), {"__name__": "__main__"})
""")


def measure(argv: list[str], *, cap_bytes: int | None = None, env: dict | None = None,
            timeout: float = 3600) -> tuple[float, float, str]:
    """Run ``argv`` (``[python, "-m" | "-c", ...]``); return (peak RSS in MB, seconds, status).
    The peak is the process's VmHWM from the kernel; a watchdog polling the RSS kills the process
    (status "killed at the cap", peak: the last RSS polled) when it exceeds ``cap_bytes``."""
    import psutil
    start = time.monotonic()
    fd, hwm_file = tempfile.mkstemp(prefix="bench-hwm-")
    os.close(fd)
    proc = subprocess.Popen([argv[0], "-c", _WRAP, *argv[1:]], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, **(env or {}), "BENCH_HWM_FILE": hwm_file})
    watched = psutil.Process(proc.pid)
    status = "ok"
    polled = 0
    out_chunks: list[bytes] = []
    os.set_blocking(proc.stdout.fileno(), False)
    while proc.poll() is None:
        chunk = proc.stdout.read()
        if chunk:
            out_chunks.append(chunk)
        try:
            rss = watched.memory_info().rss
        except psutil.NoSuchProcess:
            rss = 0
        polled = max(polled, rss)
        if cap_bytes is not None and rss > cap_bytes:
            status = f"killed at the {cap_bytes / 2**30:.0f} GiB cap"
            os.kill(proc.pid, signal.SIGKILL)
        elif time.monotonic() - start > timeout:
            status = "timed out"
            os.kill(proc.pid, signal.SIGKILL)
        time.sleep(0.05)
    out_chunks.append(proc.stdout.read() or b"")
    proc.stdout.close()
    seconds = time.monotonic() - start
    text = Path(hwm_file).read_text().strip()
    os.unlink(hwm_file)
    peak_mb = int(text) / 1024 if text else polled / 2**20
    if status == "ok" and proc.returncode != 0:
        lines = b"".join(out_chunks).decode(errors="replace").strip().splitlines()
        status = f"failed ({proc.returncode}): {lines[-1][:120] if lines else ''}"
    return peak_mb, seconds, status


_PASS_SCRIPT = textwrap.dedent("""\
    import json, sys
    import numpy as np
    import slimc
    from slimc import passes
    model, name, options, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    g = slimc.load(model)
    if options.pop("calib", None):
        rng = np.random.default_rng(0)
        spec = g.input_specs()[0]
        options["calib"] = [(rng.integers(0, 100, size=spec.shape).astype(spec.dtype),)]
    result = getattr(passes, name).run(g, **options)
    del g
    if out != "-":
        result.graph.save(out)
    print(json.dumps({k: v for k, v in result.stats.items()
                      if isinstance(v, (int, float, str))})[:400])
""")


def steps_for(model: Path, work: Path) -> list[Step]:
    """The measured steps: import, inspect, load, each pass (load + pass + save), optimize."""
    py = sys.executable
    slimc = [py, "-m", "slimc.cli"]
    out = str(work / "out.onnx")
    steps = [
        Step("import", "python -c 'import slimc, onnx, onnxruntime'",
             [py, "-c", "import slimc, slimc.passes, onnx, onnxruntime"]),
        Step("inspect", f"slimc inspect {model.name} --json",
             [*slimc, "inspect", str(model), "--json"]),
        Step("load", f"slimc.load('{model.name}')",
             [py, "-c", f"import slimc; slimc.load({str(model)!r})"]),
    ]
    for name, options in [("cleanup", {}),
                          ("prune_heads", {"ratio": 0.25, "score": "magnitude"}),
                          ("threshold_weights", {"sparsity": 0.5}),
                          ("quantize", {"method": "minmax", "calib": True})]:
        steps.append(Step(name, f"load + passes.{name}({_fmt(options)}) + save",
                          [py, "-c", _PASS_SCRIPT, str(model), name, json.dumps(options), out]))
    steps.append(Step("optimize", f"slimc optimize {model.name} -o out.onnx --prune-heads 0.25 "
                      "--sparsity 0.5 --no-check",
                      [*slimc, "optimize", str(model), "-o", out, "--prune-heads", "0.25",
                       "--sparsity", "0.5", "--no-check"]))
    return steps


def _fmt(options: dict) -> str:
    return ", ".join(f"{k}={'batches' if k == 'calib' else repr(v)}" for k, v in options.items())


def run(cfg: Config, work: Path, *, cap_bytes: int | None, only: list[str] | None = None,
        log=print) -> tuple[list[Step], int, int]:
    """Build the model in ``work`` and measure every step; returns (steps, params, weight
    bytes)."""
    model = work / "model.onnx"
    made = work / "config.json"   # what the model in ``work`` was built with (reused if equal)
    t0 = time.monotonic()
    if made.exists() and json.loads(made.read_text()) == asdict(cfg):
        params = cfg.parameters
    else:
        params = build_model(model, cfg)
        made.write_text(json.dumps(asdict(cfg)))
    weight_bytes = (model.parent / (model.name + ".data")).stat().st_size
    log(f"model {model} ({params:,} parameters, {weight_bytes / 2**30:.2f} GiB of weights) in "
        f"{time.monotonic() - t0:.0f} s")
    steps = [s for s in steps_for(model, work) if not only or s.name in only]
    for step in steps:
        step.peak_mb, step.seconds, step.status = measure(step.argv, cap_bytes=cap_bytes)
        for p in (work / "out.onnx", work / "out.onnx.data"):
            p.unlink(missing_ok=True)
        log(f"{step.name:18s} peak {step.peak_mb:9.0f} MB  {step.seconds:6.1f} s  {step.status}")
    return steps, params, weight_bytes


def table(steps: list[Step], weight_bytes: int) -> str:
    base = next((s.peak_mb for s in steps if s.name == "import"), 0.0)
    wmb = weight_bytes / 2**20
    rows = ["| step | command | peak RSS (MB) | (peak - import) / weights | seconds | status |",
            "|---|---|---:|---:|---:|---|"]
    for s in steps:
        ratio = "" if s.name == "import" else f"{(s.peak_mb - base) / wmb:.2f}x"
        rows.append(f"| {s.name} | `{s.command}` | {s.peak_mb:,.0f} | {ratio} | "
                    f"{s.seconds:.1f} | {s.status} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for k, v in asdict(Config()).items():
        p.add_argument(f"--{k}", type=int, default=v)
    p.add_argument("--cap-gb", type=float, default=16.0,
                   help="kill a step whose RSS passes this (the machine is shared)")
    p.add_argument("--only", nargs="*", help="measure only these steps")
    p.add_argument("--workdir", help="where to keep the model (reused by a later run with the "
                   "same shape); default: a temporary folder")
    p.add_argument("--out", default=str(ROOT / "bench" / "memory.md"))
    p.add_argument("--append", action="store_true", help="add this run's table to --out")
    args = p.parse_args(argv)
    cfg = Config(**{k: getattr(args, k) for k in asdict(Config())})
    with contextlib.ExitStack() as stack:
        # --workdir: the model stays there and is reused by the next run with the same shape
        work = Path(args.workdir) if args.workdir else Path(
            stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        steps, params, weight_bytes = run(cfg, work, cap_bytes=int(args.cap_gb * 2**30),
                                          only=args.only)
    text = (f"# Peak memory (bench/memory.py)\n\n"
            f"Model: LLaMA-shaped ONNX decoder, {cfg.layers} layers, hidden {cfg.hidden}, "
            f"{cfg.heads} heads, SwiGLU FFN {cfg.ffn}, vocab {cfg.vocab}, sequence {cfg.seq}: "
            f"**{params:,} parameters, {weight_bytes / 2**30:.2f} GiB of fp32 weights** "
            f"(external data).\n"
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
            f"{_total_memory() / 2**30:.0f} GiB; each step in a fresh process; peak RSS = the "
            f"process's VmHWM.\n"
            f"Command: `.venv/bin/python bench/memory.py "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
            + table(steps, weight_bytes) + "\n")
    ok = [st for st in steps if st.status == "ok" and st.name != "import"]
    base = next((st.peak_mb for st in steps if st.name == "import"), 0.0)
    if ok:
        worst = max(ok, key=lambda st: st.peak_mb)
        k = (worst.peak_mb - base) / (weight_bytes / 2**20)
        fits = (_total_memory() / 2**20 - base) / k * 2**20 / 4
        text += (f"\nLargest step here: {worst.name}, import + {k:.2f} x the weights; at that "
                 f"rate this machine's {_total_memory() / 2**30:.0f} GiB hold the step for up to "
                 f"~{fits / 1e6:,.0f} M fp32 parameters (nothing else running).\n")
    print(text)
    out = Path(args.out)
    if args.append and out.exists():
        text = out.read_text() + "\n" + text.replace("# Peak memory (bench/memory.py)\n\n", "")
    out.write_text(text)
    return 0 if all(s.status == "ok" for s in steps) else 1


def _total_memory() -> int:
    import psutil
    return psutil.virtual_memory().total


if __name__ == "__main__":
    sys.exit(main())
