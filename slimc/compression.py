"""``slimc.compress`` (defined here, in ``slimc.compression``): heads, FFN neurons, whole layers
and int8 searched together for a latency / accuracy budget, every candidate measured *compiled*
on the target.

Usage::

    res = slimc.compress(g, calib=batches, max_drop=0.01, latency=0.5)   # default metric
    res = slimc.compress(g, calib=batches, metrics={"wordsim": fn, ...}, max_drop=0.01)
    print(res.table()); res.chosen.graph; res.chosen.artifact_dir

How (NetAdapt-style, Yang et al. 2018, with the compiled model in the loop):

1. **Sensitivity** (cheap, uncompiled, on the first half of ``calib``): for every layer, the
   deviation from the original (1 − cosine of the outputs) when that layer is dropped, half its
   FFN neurons go, or half its heads go (lowest weight magnitude); and for the whole model
   under int8.
2. **Path**: starting from the original, each step proposes one more cut — one more layer
   dropped (the least sensitive left), ``ffn_step`` more of the FFN neurons or ``heads_step``
   more of the heads (spread over the layers inversely to their sensitivity, each layer's kept
   neurons rounded up to a multiple of 16) — builds each proposal, and takes the one that loses
   the least deviation per multiply-add removed. The step taken is compiled in every requested
   precision (fp32; int8 = ``quantize`` + ``fold_fake_quant`` on the first half of ``calib``),
   its latency measured on this machine and its metrics computed *on the compiled artifact*.
   A step whose every precision loses more than ``max_drop`` stays in the results (it draws
   the front beyond the budget), but the path goes back to where it was and stops cutting that
   structure; it goes on with the others until none is left or after ``max_steps`` steps.
3. **Front**: all candidates are timed again at the end in interleaved rounds (the same run,
   a pause before every call) and the Pareto front of (latency, size on disk, worst relative
   metric drop) is marked. The chosen candidate is the fastest one within ``max_drop`` (and,
   when ``latency`` is given, under it: then the most accurate of those).

Metrics: a metric is a function of a compiled model — ``metric(model) -> float`` (higher is
better), where ``model(*inputs)`` returns the list of output arrays — or an object with
``value``/``lo``/``hi`` (a point estimate with its 95 % interval, e.g. ``slimc.eval.Estimate``).
The relative drop of a metric is ``(base − value) / |base|`` against the original fp32 build.
Without ``metrics``, the metric is ``agreement``: the mean cosine between the candidate's first
output and the original's on the *second* half of ``calib`` (never used for scoring,
quantization or distillation). :func:`minilm_metrics` gives the demo's task metrics.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .errors import BudgetError, OptionError, UnsupportedError

__all__ = ["BudgetError", "Candidate", "CompressResult", "Setting", "Space", "agreement_metric",
           "compress", "minilm_metrics", "parse_fraction", "parse_latency"]

PRECISIONS = ("fp32", "int8")


# ---------------------------------------------------------------------------------------------
# settings, candidates


@dataclasses.dataclass(frozen=True)
class Setting:
    """One point of the structured search space (fractions of the original model)."""
    drop: int = 0       # whole layers dropped, least sensitive first
    ffn: float = 0.0    # fraction of FFN neurons removed, spread by sensitivity
    heads: float = 0.0  # fraction of attention heads removed, spread by sensitivity

    def label(self) -> str:
        parts = []
        if self.drop:
            parts.append(f"drop {self.drop}")
        if self.heads:
            parts.append(f"heads {self.heads:.1%}".replace(".0%", "%"))
        if self.ffn:
            parts.append(f"ffn {self.ffn:.1%}".replace(".0%", "%"))
        return " + ".join(parts) or "original"


@dataclasses.dataclass(frozen=True)
class Space:
    """The search space: how far and in which steps each structure may be cut."""
    max_drop_layers: int | None = None  # default: half the layers (rounded down)
    ffn_step: float = 0.125
    ffn_max: float = 0.75
    heads_step: float = 0.125
    heads_max: float = 0.5
    round_to: int = 16                  # FFN neurons kept per layer: a multiple of this

    def moves(self, s: Setting, layers: int, what: set[str]) -> list[Setting]:
        out = []
        cap = self.max_drop_layers if self.max_drop_layers is not None else layers // 2
        if "layers" in what and s.drop < min(cap, layers - 1):
            out.append(dataclasses.replace(s, drop=s.drop + 1))
        if "ffn" in what and s.ffn + self.ffn_step <= self.ffn_max + 1e-9:
            out.append(dataclasses.replace(s, ffn=round(s.ffn + self.ffn_step, 6)))
        if "heads" in what and s.heads + self.heads_step <= self.heads_max + 1e-9:
            out.append(dataclasses.replace(s, heads=round(s.heads + self.heads_step, 6)))
        return out


@dataclasses.dataclass
class Candidate:
    """One compiled, measured point of the search."""
    setting: Setting
    precision: str
    steps: list            # the passes applied, with the explicit layers / heads / neurons
    params: int
    macs: float            # multiply-adds per call of the linear layers and attention (model)
    size_bytes: int        # the saved artifact's size on disk
    latency_ms: float
    metrics: dict          # name -> value
    intervals: dict        # name -> (lo, hi) or None
    drops: dict            # name -> relative drop against the original fp32 build
    proxy: float           # 1 − cos to the original on the scoring half of calib (uncompiled)
    artifact_dir: str
    graph: object = dataclasses.field(default=None, repr=False)
    front: bool = False
    chosen: bool = False

    @property
    def name(self) -> str:
        return f"{self.setting.label()} · {self.precision}"

    @property
    def worst_drop(self) -> float:
        return max(self.drops.values()) if self.drops else 0.0


@dataclasses.dataclass
class CompressResult:
    base: Candidate                 # the original model, fp32
    candidates: list[Candidate]
    chosen: Candidate | None
    reason: str                     # why this one was chosen, or why none was
    sensitivity: dict               # kind -> [per-layer deviation], "int8" -> float
    max_drop: float
    latency_ms: float | None        # the latency budget in ms (None: none given)
    seconds: float
    cpu: str = ""

    @property
    def front(self) -> list[Candidate]:
        return sorted((c for c in self.candidates if c.front), key=lambda c: c.latency_ms)

    def table(self) -> str:
        names = list(self.base.metrics)
        head = (f"{'candidate':34s} {'ms':>7s} {'speed-up':>8s} {'size MB':>8s} "
                f"{'params':>11s} " + " ".join(f"{n[:18]:>26s}" for n in names)
                + "  front")
        lines = [head, "-" * len(head)]
        for c in sorted(self.candidates, key=lambda c: c.latency_ms):
            cells = []
            for n in names:
                iv = c.intervals.get(n)
                ci = f" [{iv[0]:.3f},{iv[1]:.3f}]" if iv else ""
                cells.append(f"{c.metrics[n]:.4f}{ci} {-c.drops[n]:+.1%}".rjust(26))
            mark = "chosen" if c.chosen else ("*" if c.front else "")
            lines.append(f"{c.name:34s} {c.latency_ms:7.2f} "
                         f"{self.base.latency_ms / c.latency_ms:7.2f}x "
                         f"{c.size_bytes / 1e6:8.1f} {c.params:11,d} " + " ".join(cells)
                         + f"  {mark}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        def cand(c):
            return {"name": c.name, "setting": dataclasses.asdict(c.setting),
                    "precision": c.precision, "steps": c.steps, "params": c.params,
                    "macs": c.macs, "size_bytes": c.size_bytes, "latency_ms": c.latency_ms,
                    "metrics": c.metrics, "intervals": c.intervals, "drops": c.drops,
                    "worst_drop": c.worst_drop, "proxy": c.proxy, "front": c.front,
                    "chosen": c.chosen}
        return {"max_drop": self.max_drop, "latency_ms": self.latency_ms,
                "seconds": self.seconds, "cpu": self.cpu, "reason": self.reason,
                "sensitivity": self.sensitivity,
                "chosen": self.chosen.name if self.chosen else None,
                "candidates": [cand(c) for c in self.candidates]}


# ---------------------------------------------------------------------------------------------
# budgets


def parse_fraction(text, what: str = "--max-drop") -> float:
    """``"1%"``, ``"0.01"`` or ``0.01`` → 0.01; a clear error for anything else."""
    s = str(text).strip()
    try:
        v = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise OptionError(f"{what} {text!r} is not a number or a percentage.",
                          f"Write it like {what} 1% or {what} 0.01.") from None
    return v


def parse_latency(text) -> tuple[float | None, float | None]:
    """``"0.5"`` / ``"0.5x"`` (a fraction of the original build's latency) → (0.5, None);
    ``"12ms"`` → (None, 12.0)."""
    s = str(text).strip().lower()
    try:
        if s.endswith("ms"):
            return None, float(s[:-2])
        return float(s.rstrip("x")), None
    except ValueError:
        raise OptionError(f"--latency {text!r} is neither a fraction nor milliseconds.",
                          "Write --latency 0.5 (half the original build's latency) or "
                          "--latency 12ms.") from None


def _check_budgets(max_drop, latency, latency_ms) -> None:
    if not isinstance(max_drop, (int, float)) or not math.isfinite(max_drop) \
            or not 0 <= max_drop < 1:
        raise OptionError(f"max_drop={max_drop!r} is not a relative drop in [0, 1).",
                          "Give the largest relative metric loss you accept, e.g. 0.01 "
                          "(--max-drop 1%).")
    if latency is not None and latency_ms is not None:
        raise OptionError("latency (a fraction) and latency_ms are alternatives.",
                          "Give one of them.")
    if latency is not None and not (isinstance(latency, (int, float))
                                    and math.isfinite(latency) and 0 < latency <= 1):
        raise OptionError(f"latency={latency!r} is not a fraction in (0, 1] of the original "
                          "build's latency.",
                          "Give e.g. 0.5 for half the original latency, or latency_ms=.")
    if latency_ms is not None and not (isinstance(latency_ms, (int, float))
                                       and math.isfinite(latency_ms) and latency_ms > 0):
        raise OptionError(f"latency_ms={latency_ms!r} is not a positive number of "
                          "milliseconds.", "Give e.g. latency_ms=10.")


# ---------------------------------------------------------------------------------------------
# metrics


def _value(v) -> tuple[float, tuple[float, float] | None]:
    if hasattr(v, "value") and hasattr(v, "lo") and hasattr(v, "hi"):
        return float(v.value), (float(v.lo), float(v.hi))
    v = float(v)
    return v, None


def _cosines(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return float(na == nb)
    return float(a @ b / (na * nb))


def agreement_metric(reference, inputs: Sequence[tuple]) -> Callable:
    """``metric(model)``: mean cosine between ``model``'s first output and ``reference``'s
    (a Graph, or any ``f(*inputs) -> [outputs]``) over ``inputs`` (a list of input tuples).
    1.0 for a model that agrees exactly; a 95 % bootstrap interval over the inputs when there
    are at least 5 of them."""
    run = reference.run if hasattr(reference, "run") else reference
    refs = [np.asarray(run(*x)[0]) for x in inputs]

    def metric(model):
        cos = np.array([_cosines(model(*x)[0], r) for x, r in zip(inputs, refs)])
        if len(cos) < 5:
            return float(cos.mean())
        from .eval import bootstrap_ci
        return bootstrap_ci(lambda idx: cos[idx].mean(-1), len(cos), vectorized=True)
    metric.__name__ = "agreement"
    return metric


def minilm_metrics(seq: int = 128, batch: int = 1, which=("wordsim", "polarity")) -> dict:
    """The demo's task metrics as compress metrics, for a sentence encoder taking
    ``(input_ids, attention_mask)`` of shape ``(batch, seq)`` and returning the embedding first
    (all-MiniLM-L6-v2 as ``slimc.eval.sentence_encoder`` wraps it): WordSim-353 Spearman and
    the polarity probe accuracy, each with its 95 % bootstrap interval where
    :mod:`slimc.eval` gives one."""
    from . import eval as ev
    tok, _ = ev.load_minilm()
    fns = {"wordsim": ev.wordsim_spearman, "polarity": ev.polarity_accuracy}
    unknown = [w for w in which if w not in fns]
    if unknown:
        raise OptionError(f"Unknown MiniLM metric(s) {unknown}.",
                          f"Use some of {', '.join(fns)}.")

    def make(name):
        f = fns[name]

        def metric(model):
            def emb(ids, mask):
                return model(ids, mask)[0]
            return f(emb, tok, seq=seq, batch=batch, ci=True)
        metric.__name__ = name
        return metric
    return {name: make(name) for name in which}


# ---------------------------------------------------------------------------------------------
# the search


def _progress_bar(done: int, total: int, t0: float, text: str) -> None:
    width = 24
    fill = int(width * min(done, total) / max(total, 1))
    print(f"[{'#' * fill}{'.' * (width - fill)}] {done}/{total} candidates, "
          f"{time.perf_counter() - t0:5.0f} s: {text}", file=sys.stderr, flush=True)


def _allocate(sens: Sequence[float], ratio: float, cap: float) -> np.ndarray:
    """Per-layer fractions averaging ``ratio``, larger where the sensitivity is smaller
    (weights 1/√(s + ε)), each at most ``cap``."""
    s = np.maximum(np.asarray(sens, dtype=np.float64), 0)
    w = 1 / np.sqrt(s + 1e-3 * (s.mean() + 1e-12) + 1e-12)
    r = ratio * w / w.mean()
    for _ in range(len(r) + 1):
        over = r > cap
        if not over.any():
            break
        excess = float((r[over] - cap).sum())
        r[over] = cap
        free = r < cap - 1e-12
        if not free.any():
            break
        r[free] += excess * w[free] / w[free].sum()
    return np.minimum(r, cap)


class _Search:
    def __init__(self, graph, calib, metrics, target, input_shapes, precisions, space,
                 recover_steps, recover_data, repeat, workdir, verbose, recover_options=None):
        self.recover_options = dict(recover_options or {})
        self.graph, self.target, self.input_shapes = graph, target, input_shapes
        self.precisions, self.space, self.repeat = precisions, space, repeat
        self.recover_steps, self.verbose = recover_steps, verbose
        half = len(calib) // 2
        self.scoring, self.heldout = list(calib[:half]), list(calib[half:])
        self.recover_data = list(recover_data) if recover_data is not None else self.scoring
        self.metrics = metrics or {"agreement": agreement_metric(graph, self.heldout)}
        self.workdir = workdir
        self.refs = [np.asarray(graph.run(*x)[0]) for x in self.scoring]
        self.L = len(graph.transformer_layers())
        self.what = set()
        if self.L >= 2:
            self.what.add("layers")
        if graph.ffn_blocks():
            self.what.add("ffn")
        if graph.attention_blocks():
            self.what.add("heads")
        shape = np.asarray(self.scoring[0][0]).shape
        self.tokens = int(np.prod(shape[-2:])) if len(shape) >= 2 else 128  # for the MAC model
        self.count = 0

    def say(self, text: str) -> None:
        if self.verbose:
            print(f"slimc compress: {text}", file=sys.stderr, flush=True)

    # -- uncompiled ------------------------------------------------------------------------

    def proxy(self, g) -> float:
        return float(np.mean([1 - _cosines(g.run(*x)[0], r)
                              for x, r in zip(self.scoring, self.refs)]))

    def macs(self, g) -> float:
        t = self.tokens
        total = 0.0
        for b in g.attention_blocks():
            hd = b.num_heads * b.head_dim
            kv = b.num_kv_heads * b.head_dim
            hidden = b.q.in_features if b.q is not None else hd
            total += t * hidden * (2 * hd + 2 * kv) + 2 * b.num_heads * b.head_dim * t * t
        for f in g.ffn_blocks():
            total += t * f.hidden * f.intermediate * (3 if f.gate else 2)
        return total

    def sensitivity(self) -> dict:
        from . import passes
        from .passes.importance import head_scores
        from .passes.prune_ffn._scores import neuron_scores
        sens: dict = {}
        if "layers" in self.what:
            sens["layers"] = [self.proxy(passes.drop_layers(self.graph, layers=[i]))
                              for i in range(self.L)]
        if "ffn" in self.what:
            blocks = sorted(self.graph.ffn_blocks(), key=lambda b: b.layer)
            scores = neuron_scores(self.graph, blocks, "magnitude", None)
            sens["ffn"] = [self.proxy(passes.prune_ffn(self.graph, neurons={
                b.layer: np.argsort(scores[b.layer], kind="stable")[:b.intermediate // 2]
                .tolist()})) for b in blocks]
        if "heads" in self.what:
            blocks = sorted(self.graph.attention_blocks(), key=lambda b: b.layer)
            scores = head_scores(self.graph, "magnitude")
            sens["heads"] = [self.proxy(passes.prune_heads(self.graph, heads={
                b.layer: np.argsort(scores[b.layer], kind="stable")[:b.num_heads // 2]
                .tolist()})) for b in blocks]
        if "int8" in self.precisions:
            sens["int8"] = self.proxy(passes.quantize(self.graph, calib=self.scoring))
        return sens

    def build(self, s: Setting, sens: dict):
        """The structured graph of setting ``s`` and the explicit passes that made it."""
        from . import passes
        from .passes.importance import head_scores
        from .passes.prune_ffn._scores import neuron_scores
        g, steps = self.graph, []
        kept = list(range(self.L))
        if s.drop:
            order = np.argsort(sens["layers"], kind="stable")
            gone = sorted(int(i) for i in order[:s.drop])
            g = passes.drop_layers(g, layers=gone)
            steps.append(("drop_layers", {"layers": gone}))
            kept = [i for i in kept if i not in gone]

        def original(blocks, key):
            # blocks of the dropped graph, in order, are the kept layers in order
            ss = sens.get(key)
            if ss is None or len(ss) != self.L or len(blocks) != len(kept):
                return [1.0] * len(blocks)
            return [ss[i] for i in kept]

        if s.heads:
            blocks = sorted(g.attention_blocks(), key=lambda b: b.layer)
            ratios = _allocate(original(blocks, "heads"), s.heads, cap=0.75)
            scores = head_scores(g, "magnitude")
            heads = {}
            for b, r in zip(blocks, ratios):
                k = min(round(float(r) * b.num_heads), b.num_heads - 1)
                if k:
                    heads[b.layer] = sorted(np.argsort(scores[b.layer], kind="stable")[:k]
                                            .tolist())
            if heads:
                g = passes.prune_heads(g, heads=heads)
                steps.append(("prune_heads", {"heads": heads}))
        if s.ffn:
            blocks = sorted(g.ffn_blocks(), key=lambda b: b.layer)
            ratios = _allocate(original(blocks, "ffn"), s.ffn, cap=0.9)
            scores = neuron_scores(g, blocks, "magnitude", None)
            neurons = {}
            q = max(1, self.space.round_to)
            for b, r in zip(blocks, ratios):
                keep = min(b.intermediate, max(q, math.ceil((1 - r) * b.intermediate / q) * q))
                k = b.intermediate - keep
                if k > 0:
                    neurons[b.layer] = sorted(np.argsort(scores[b.layer], kind="stable")[:k]
                                              .tolist())
            if neurons:
                g = passes.prune_ffn(g, neurons=neurons)
                steps.append(("prune_ffn", {"neurons": neurons}))
        return g, steps

    # -- compiled --------------------------------------------------------------------------

    def compile_and_measure(self, s: Setting, g, steps: list, proxy: float, base) -> list:
        import slimc

        from . import passes, runtime
        if self.recover_steps and s != Setting():
            self.say(f"{s.label()}: distilling ({self.recover_steps} steps) ...")
            opts = {"freeze": ("embeddings",), "hidden": True, "progress": self.verbose,
                    **self.recover_options}
            g = slimc.recover(g, teacher=self.graph, data=self.recover_data,
                              steps=self.recover_steps, **opts)
            steps = steps + [("recover", {"steps": self.recover_steps,
                                          **{k: v for k, v in opts.items()
                                             if k != "progress"}})]
        out = []
        for prec in self.precisions:
            if prec == "int8":
                q = passes.fold_fake_quant(passes.quantize(g, calib=self.scoring))
                built, psteps = passes.cleanup(q), steps + [("quantize", {}),
                                                            ("fold_fake_quant", {})]
            else:
                built, psteps = passes.cleanup(g), list(steps)
            art = slimc.compile(built, self.target, input_shapes=self.input_shapes)
            self.count += 1
            folder = os.path.join(self.workdir, f"c{self.count:02d}")
            art.save(folder)
            m = runtime.load(folder)
            time.sleep(0.3)  # the proxy's torch threads spin after their last call
            lat = m.benchmark(*self.scoring[0], repeat=self.repeat, warmup=2)["median_ms"]
            vals, ivs = {}, {}
            for name, metric in self.metrics.items():
                vals[name], ivs[name] = _value(metric(m))
            drops = {}
            for name, v in vals.items():
                b = base.metrics[name] if base is not None else v
                drops[name] = (b - v) / abs(b) if b else 0.0
            c = Candidate(s, prec, psteps, built.num_parameters(), self.macs(g),
                          _dir_size(folder), lat, vals, ivs, drops, proxy, folder, built)
            c._model = m
            out.append(c)
            if base is None and prec == "fp32":
                base = c
        return out


def _kind(cur: Setting, mv: Setting) -> str:
    """Which structure the move ``cur`` → ``mv`` cuts."""
    return "layers" if mv.drop != cur.drop else ("ffn" if mv.ffn != cur.ffn else "heads")


def _dir_size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


def _interleaved(cands: list[Candidate], inputs, repeat: int) -> None:
    """Time every candidate again in alternating rounds (:func:`slimc.runtime.
    interleaved_medians`: order reversed every other round, a 0.3 s pause before each call)
    and store the medians: one comparison, one run."""
    from .runtime import interleaved_medians
    medians = interleaved_medians({i: (lambda m=c._model: m(*inputs))
                                   for i, c in enumerate(cands)}, repeat, warmup=1)
    for i, c in enumerate(cands):
        c.latency_ms = medians[i]


def _mark_front(cands: list[Candidate]) -> None:
    def key(c):
        return (c.latency_ms, c.size_bytes, c.worst_drop)
    for c in cands:
        kc = key(c)
        c.front = not any(all(a <= b for a, b in zip(key(o), kc)) and key(o) != kc
                          for o in cands if o is not c)


def compress(graph, /, *, calib: Sequence, metrics: Mapping[str, Callable] | None = None,
             max_drop: float = 0.01, latency: float | None = None,
             latency_ms: float | None = None, target="x86",
             input_shapes: dict | None = None, precisions: Sequence[str] = PRECISIONS,
             space: Space | None = None, recover_steps: int = 0, recover_data=None,
             recover_options: Mapping | None = None,
             max_steps: int = 12, repeat: int = 10,
             workdir: str | None = None, verbose: bool = True) -> CompressResult:
    """Search structured cuts (layers, FFN neurons, heads) × precisions for the fastest
    compiled model within ``max_drop`` (see the module docstring for the method).

    ``calib``: input tuples like the model's inputs, at least 4; the first half scores,
    quantizes and (with ``recover_steps``) distills, the second half is held out for the
    default ``agreement`` metric. ``metrics``: ``{name: metric(model)}``. ``max_drop``: the
    largest relative loss of every metric, in [0, 1). ``latency``: a budget as a fraction of
    the original fp32 build's latency (or ``latency_ms`` in milliseconds). ``precisions``:
    some of ``"fp32"``, ``"int8"``. ``recover_steps``: layer-mapped distillation
    (:func:`slimc.recover` with ``hidden=True``, embeddings frozen; ``recover_options`` adds or
    overrides its options, e.g. ``{"loss": "cosine", "lr": 1e-4}``) of every cut before it is
    compiled, on ``recover_data`` (default: the scoring half of ``calib``; give more, e.g.
    :func:`slimc.eval.distill_batches`) — FX graphs only; about 0.15 s a step for a cut MiniLM
    at sequence 128 on 2 cores. ``workdir``: where the
    candidates' artifacts go (default: a new temporary folder, removed except for the chosen
    one's; the caller owns it).

    Returns a :class:`CompressResult`; ``result.chosen`` is None (with ``result.reason``) when
    no candidate met the budget — :func:`compress_or_raise` turns that into a
    :class:`BudgetError`.
    """
    from .ir.graph import Graph
    t0 = time.perf_counter()
    _check_budgets(max_drop, latency, latency_ms)
    if not isinstance(graph, Graph):
        raise OptionError(f"compress takes a slimc.Graph, not {type(graph).__name__}.",
                          "Capture or load the model first: slimc.capture(...) / "
                          "slimc.load('model.onnx').")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise OptionError(f"Unknown precision(s) {bad or precisions!r}.",
                          f"Use some of {', '.join(PRECISIONS)}.")
    # the original fp32 build is the reference: always built, first
    precisions = tuple(p for p in PRECISIONS if p in precisions or p == "fp32")
    calib = list(calib or [])
    if len(calib) < 4:
        raise OptionError(f"compress needs at least 4 calibration batches (got {len(calib)}).",
                          "Give input tuples like the model's example inputs: half score the "
                          "structures and quantize, half are held out for the metric.")
    if recover_steps and graph.backend != "fx":
        raise UnsupportedError("recover_steps distills a torch graph; this graph is ONNX.",
                               "Capture the torch module with slimc.capture(), or give "
                               "recover_steps=0.")
    if not isinstance(max_steps, int) or max_steps < 0:
        raise OptionError(f"max_steps={max_steps!r} is not a count.", "Give e.g. 12.")
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="slimc-compress-")
    os.makedirs(workdir, exist_ok=True)
    try:
        search = _Search(graph, calib, dict(metrics) if metrics else None, target, input_shapes,
                         precisions, space or Space(), recover_steps,
                         recover_data, repeat, workdir, verbose, recover_options)
        if not search.what and precisions == ("fp32",):
            raise UnsupportedError("compress found nothing to cut: no Transformer layers, FFN "
                                   "blocks or attention heads, and no precision but fp32.",
                                   "Check graph.transformer_layers() / ffn_blocks() / "
                                   "attention_blocks(), or add precisions=('fp32', 'int8').")
        from .codegen.targets import host_cpu
        cpu = host_cpu().get("cpu", "") if str(target) == "x86" else str(target)
        total = len(search.precisions) * (1 + max_steps)
        search.say(f"{search.L} layers; cutting {', '.join(sorted(search.what)) or 'nothing'}; "
                   f"precisions {', '.join(search.precisions)}; metrics "
                   f"{', '.join(search.metrics)}; budget: drop ≤ {max_drop:.1%}"
                   + (f", latency ≤ {latency:g}x" if latency else "")
                   + (f", latency ≤ {latency_ms:g} ms" if latency_ms else ""))
        search.say("sensitivity of each layer (uncompiled, 1 − cos to the original) ...")
        sens = search.sensitivity()
        for kind, vals in sens.items():
            text = f"{vals:.4f}" if isinstance(vals, float) else " ".join(f"{v:.4f}" for v in vals)
            search.say(f"  {kind:7s} {text}")

        cands: list[Candidate] = []
        cur = Setting()
        g, steps = search.build(cur, sens)
        cands += search.compile_and_measure(cur, g, steps, 0.0, None)
        base = cands[0]  # fp32 is built first: the int8 original's drops are against it
        _progress_bar(len(cands), total, t0, f"original: {base.latency_ms:.2f} ms")
        cur_proxy, cur_macs = 0.0, search.macs(graph)
        dense_macs = cur_macs
        blocked: set[str] = set()  # kinds of cut that went over the budget from the path's point
        for _ in range(max_steps):
            moves = [mv for mv in search.space.moves(cur, search.L, search.what)
                     if _kind(cur, mv) not in blocked]
            if not moves:
                search.say("nothing left to cut: every kind of cut is exhausted or over the "
                           "budget")
                break
            best = None
            for mv in moves:
                gm, st = search.build(mv, sens)
                p, mc = search.proxy(gm), search.macs(gm)
                gain = max(cur_macs - mc, 1e-9) / dense_macs
                cost = (p - cur_proxy) / gain
                search.say(f"  proposal {mv.label():28s} deviation {p:.4f}, MACs "
                           f"{mc / dense_macs:.0%} of the original")
                if best is None or cost < best[0]:
                    best = (cost, mv, gm, st, p, mc)
            _, mv, g, steps, p, mc = best
            new = search.compile_and_measure(mv, g, steps, p, base)
            cands += new
            worst = min(c.worst_drop for c in new)
            _progress_bar(len(cands), total, t0, " | ".join(
                f"{c.name} {c.latency_ms:.2f} ms, worst drop {c.worst_drop:+.1%}" for c in new))
            if worst > max_drop:
                kind = _kind(cur, mv)
                blocked.add(kind)
                search.say(f"{mv.label()} is over the budget in every precision (worst drop "
                           f"{worst:+.1%}): no more {kind} cuts; back to {cur.label()}")
                continue
            cur, cur_proxy, cur_macs = mv, p, mc

        search.say(f"timing all {len(cands)} candidates again, interleaved ...")
        _interleaved(cands, search.scoring[0], repeat)
        _mark_front(cands)
        budget_ms = latency_ms if latency_ms is not None else (
            latency * base.latency_ms if latency is not None else None)
        ok = [c for c in cands if c.worst_drop <= max_drop
              and (budget_ms is None or c.latency_ms <= budget_ms)]
        if ok:
            if budget_ms is None:
                chosen = min(ok, key=lambda c: (c.latency_ms, c.worst_drop))
                reason = (f"the fastest candidate whose every metric is within {max_drop:.1%} of "
                          "the original")
            else:
                chosen = min(ok, key=lambda c: (c.worst_drop, c.latency_ms))
                reason = (f"the most accurate candidate under {budget_ms:.2f} ms with every "
                          f"metric within {max_drop:.1%}")
            chosen.chosen = True
        else:
            chosen = None
            within = [c for c in cands if c.worst_drop <= max_drop]
            fastest = min(within, key=lambda c: c.latency_ms) if within else None
            under = [c for c in cands if budget_ms is not None and c.latency_ms <= budget_ms]
            best_under = min(under, key=lambda c: c.worst_drop) if under else None
            parts = []
            if fastest:
                parts.append(f"the fastest within {max_drop:.1%} is {fastest.name} at "
                             f"{fastest.latency_ms:.2f} ms ({fastest.latency_ms / base.latency_ms:.2f}"
                             "x the original)")
            if best_under:
                parts.append(f"the most accurate under {budget_ms:.2f} ms is {best_under.name}, "
                             f"worst drop {best_under.worst_drop:.1%}")
            if budget_ms is not None and not under:
                fastest_any = min(cands, key=lambda c: c.latency_ms)
                parts.append(f"no candidate reached {budget_ms:.2f} ms (fastest: "
                             f"{fastest_any.name}, {fastest_any.latency_ms:.2f} ms)")
            reason = "no candidate met the budget: " + "; ".join(parts)
        for c in cands:  # free the runtimes (each holds a VM and its threads)
            c._model = None
        if own:
            for c in cands:
                if not c.chosen:
                    shutil.rmtree(c.artifact_dir, ignore_errors=True)
                    c.artifact_dir = ""
        res = CompressResult(base, cands, chosen, reason, sens, max_drop, budget_ms,
                             time.perf_counter() - t0, cpu)
        search.say(f"done in {res.seconds:.0f} s: {reason}")
        return res
    except BaseException:  # an error or Ctrl-C mid-search: leave no candidates behind
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
        raise


def compress_or_raise(graph, /, **kw) -> CompressResult:
    """:func:`compress`, raising :class:`BudgetError` when no candidate met the budget."""
    res = compress(graph, **kw)
    if res.chosen is None:
        raise BudgetError(res.reason[0].upper() + res.reason[1:] + ".",
                          "Relax max_drop or latency, widen the search (Space, max_steps), "
                          "or distill the cuts (recover_steps).")
    return res
