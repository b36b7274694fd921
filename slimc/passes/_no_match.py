"""No silent no-ops: a pass asked for a change that finds nothing to change says so.

Every registered pass reports ``stats["matched"]`` (the sites it found that it could work on:
attention blocks, eligible weights, Linear / MatMul nodes, rule candidates) and
``stats["changed"]`` (how many of them it changed). When the options ask for a change and
``matched`` is 0, the registry raises :class:`~slimc.errors.UnsupportedError` naming what the
pass looked for and what the graph has instead (its most frequent ops), or, under the policy
``on_no_match="warn"``, warns with :class:`NoMatchWarning` and returns the graph unchanged.

The policy comes from, in order: the ``on_no_match=`` keyword of one call
(``passes.prune_heads(g, ratio=0.3, on_no_match="warn")``), the ``PassManager`` /
``Recipe`` running the pass, and the default ``"error"``.

A pass declares how to read its options and stats with an :class:`Expect` here (passes whose
stats carry ``matched`` / ``changed`` themselves need only ``asks`` and ``looked_for``).
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import OptionError, UnsupportedError

POLICIES = ("error", "warn")

_POLICY: contextvars.ContextVar[str] = contextvars.ContextVar("slimc_on_no_match",
                                                               default="error")


class NoMatchWarning(UserWarning):
    """A pass asked for a change matched nothing and, by the ``on_no_match="warn"`` policy,
    returned the graph unchanged."""


def check_policy(policy) -> str:
    if policy not in POLICIES:
        raise OptionError(f"on_no_match={policy!r} is not a policy.",
                          "Use on_no_match='error' (the default: a pass that matches nothing "
                          "raises) or 'warn' (it warns and returns the graph unchanged).")
    return policy


@contextlib.contextmanager
def on_no_match(policy: str):
    """Within the block, passes asked for a change that match nothing follow ``policy``."""
    token = _POLICY.set(check_policy(policy))
    try:
        yield
    finally:
        _POLICY.reset(token)


def current_policy() -> str:
    return _POLICY.get()


@dataclass(frozen=True)
class Expect:
    """How one pass tells that it was asked for a change and what it matched.

    ``asks(options)``: the options ask for a change (not the pass's identity setting).
    ``matched(stats)`` / ``changed(stats)``: counts read from the pass's stats (used only where
    the stats lack ``matched`` / ``changed``): every candidate site the pass found, refused or
    not, and the sites it changed. ``refused(stats)``: {site: reason} of the candidates it left
    alone. ``looked_for(options)``: what the pass searched the graph for, in words.
    ``excuse(graph)``: a reason why matching nothing is expected on this graph (e.g. it is
    already quantized), which makes it a warning instead of an error.
    """

    asks: Callable[[dict], bool]
    looked_for: Callable[[dict], str]
    matched: Callable[[dict], int] | None = None
    changed: Callable[[dict], int] | None = None
    refused: Callable[[dict], dict] = lambda s: {}
    excuse: Callable[[object], str | None] = lambda g: None


def _nonzero(x) -> bool:
    return x is not None and x is not False and x != 0


def _threshold_asks(o: dict) -> bool:
    return any(_nonzero(o.get(k)) for k in ("tau", "sparsity")) or o.get("pattern") is not None


def _threshold_changed(s: dict) -> int:
    return sum(1 for v in (s.get("layers") or {}).values()
               if isinstance(v, dict) and v.get("sparsity") != v.get("sparsity_before"))


def _fuse_matched(s: dict) -> int:
    fired = sum((s.get("fired") or {}).values())
    refused = sum(sum(c.values()) for c in (s.get("refused") or {}).values())
    return fired + refused


def _fuse_refused(s: dict) -> dict:
    return {f"{rule}: {why}": n for rule, c in (s.get("refused") or {}).items()
            for why, n in c.items()}


def _edited_and_skipped(key: str) -> Callable[[dict], int]:
    return lambda s: len(s.get(key) or {}) + len(s.get("skipped") or {})


def _skipped(s: dict) -> dict:
    return dict(s.get("skipped") or {})


def _already_quantized(graph) -> str | None:
    ops = [k for k in graph.op_histogram() if "quantize" in k.lower()]
    if ops:
        return (f"The graph is already quantized ({', '.join(sorted(ops)[:4])}): quantizing "
                "again finds nothing new.")
    return None


def _quantize_looked_for(o: dict) -> str:
    ops = o.get("ops", ("linear", "matmul"))
    ops = (ops,) if isinstance(ops, str) else tuple(ops)
    kinds = {"linear": "Linear nodes (FX linear/addmm/mm/matmul, ONNX MatMul/Gemm with a "
                       "constant 2-D float weight)",
             "matmul": "MatMul nodes of two activations"}
    return " and ".join(kinds.get(k, repr(k)) for k in ops)


EXPECT: dict[str, Expect] = {
    "prune_heads": Expect(
        asks=lambda o: True,
        looked_for=lambda o: ("attention blocks: softmax(q·kᵀ)·v, scaled_dot_product_attention "
                              "or an Attention / MultiHeadAttention / GroupQueryAttention op, "
                              "fed by Q/K/V projections")),
    "prune_ffn": Expect(
        asks=lambda o: True,
        looked_for=lambda o: ("feed-forward blocks: a projection reading, through an activation "
                              "and per-element ops, one projection (Linear → act → Linear) or "
                              "two (gated: act(gate(x)) * up(x))")),
    "drop_layers": Expect(
        asks=lambda o: True,
        looked_for=lambda o: ("whole Transformer layers: an attention block whose residual add "
                              "(x + attn(...)) feeds, directly or through a norm, the residual "
                              "add of a feed-forward block")),
    "threshold_weights": Expect(
        asks=_threshold_asks,
        looked_for=lambda o: ("float weights used only as the weight of Linear / MatMul / Gemm "
                              "/ Conv nodes"),
        matched=_edited_and_skipped("layers"),
        changed=_threshold_changed,
        refused=_skipped),
    "quantize": Expect(
        asks=lambda o: True,
        looked_for=_quantize_looked_for,
        matched=_edited_and_skipped("quantized"),
        changed=lambda s: len(s.get("quantized") or {}),
        refused=_skipped,
        excuse=_already_quantized),
    "fuse": Expect(
        asks=lambda o: _names_rules(o.get("rules")),
        looked_for=lambda o: f"the subgraphs of the rules {_rule_names(o.get('rules'))}",
        matched=_fuse_matched,
        changed=lambda s: sum((s.get("fired") or {}).values()),
        refused=_fuse_refused),
    "factorize_low_rank": Expect(
        asks=lambda o: o.get("rank") is not None or (o.get("energy") is not None
                                                     and o.get("energy") != 1),
        looked_for=lambda o: "Linear nodes with an unshared floating-point 2-D weight",
        matched=_edited_and_skipped("layers"),
        changed=lambda s: len(s.get("layers") or {}),
        refused=_skipped),
    "smooth_quant": Expect(
        asks=lambda o: True,
        looked_for=lambda o: ("LayerNorm / RMSNorm / Linear outputs read only by Linears"
                              if o.get("mode", "fold") == "fold" else
                              "values read by Linears (mode='insert')")
        + " (post-norm models such as BERT need mode='insert')"),
    # passes whose options never ask for a change: counts only, never an error
    "cleanup": Expect(
        asks=lambda o: False,
        looked_for=lambda o: "no-op nodes, dead code and constant subgraphs",
        matched=lambda s: sum(int(s.get(k) or 0) for k in ("noops", "dead", "folded")),
        changed=lambda s: sum(int(s.get(k) or 0) for k in ("noops", "dead", "folded"))),
    "fold_fake_quant": Expect(
        asks=lambda o: False,
        looked_for=lambda o: "quantize / dequantize pairs around weights and activations",
        matched=lambda s: (len(s.get("folded") or {}) + len(s.get("left_in_float") or {})
                           + int(s.get("cancelled") or 0)),
        changed=lambda s: len(s.get("folded") or {}) + int(s.get("cancelled") or 0)),
}


def _names_rules(rules) -> bool:
    """A targeted request: rules named one by one (``rules=["layer_norm"]``). A rule set such
    as ``DEFAULT`` asks for whatever of it applies, so a model it leaves alone is no error."""
    if isinstance(rules, str):
        return True
    return isinstance(rules, (list, tuple)) and any(isinstance(r, str) for r in rules)


def _rule_names(rules) -> str:
    try:
        names = list(getattr(rules, "names", None) or [getattr(r, "name", r) for r in rules])
    except TypeError:
        names = [rules]
    shown = ", ".join(map(str, names[:8]))
    return shown + (f", … ({len(names)} rules)" if len(names) > 8 else "")


def describe_graph(graph, top: int = 10) -> str:
    """The graph's most frequent ops, e.g. ``MatMul×48, Add×40, …``."""
    try:
        hist = graph.op_histogram()
    except Exception:  # noqa: BLE001 - a description must not fail the error it belongs to
        return "(its ops could not be listed)"
    if not hist:
        return "no ops at all"
    items = hist.most_common(top)
    rest = len(hist) - len(items)
    return ", ".join(f"{k}×{v}" for k, v in items) + (f", and {rest} more kinds" if rest else "")


def _refused_all(name: str, expect: Expect, stats: dict) -> str | None:
    """Warn when the pass found candidates but refused every one of them (the stats hold the
    reasons; a warning makes sure they are seen)."""
    refused = expect.refused(stats)
    count = sum(v if isinstance(v, int) else 1 for v in refused.values())  # fuse: counts
    if stats.get("changed", 1) != 0 or not refused or count < stats.get("matched", 0):
        return None
    shown = "; ".join(f"{k}: {v}" for k, v in list(refused.items())[:5])
    more = f"; and {len(refused) - 5} more" if len(refused) > 5 else ""
    text = (f"Pass {name} found {stats['matched']} candidate(s) but changed none: "
            f"{shown}{more}.")
    warnings.warn(text, NoMatchWarning, stacklevel=4)
    return text


def check(name: str, options: dict, stats: dict, graph_before, policy: str | None) -> str | None:
    """Fill ``stats["matched"]`` / ``stats["changed"]``; raise (or warn) when ``options`` ask
    for a change and nothing matched. Returns the warning's text when one was given."""
    expect = EXPECT.get(name)
    if expect is None:
        return None
    if "matched" not in stats and expect.matched is not None:
        stats["matched"] = int(expect.matched(stats))
    if "changed" not in stats and expect.changed is not None:
        stats["changed"] = int(expect.changed(stats))
    if not expect.asks(options):
        return None
    if stats.get("matched", 1) != 0:
        return _refused_all(name, expect, stats)
    problem = (f"Pass {name} was asked for a change but matched nothing: it looked for "
               f"{expect.looked_for(options)}, and the graph has {describe_graph(graph_before)}.")
    detail = stats.get("no_match_detail")
    if detail:
        problem += f" {detail}"
    policy = check_policy(policy or current_policy())
    excuse = expect.excuse(graph_before)
    if excuse:
        problem += f" {excuse}"
    if policy == "warn" or excuse:
        warnings.warn(problem + " The graph is returned unchanged.", NoMatchWarning,
                      stacklevel=4)
        stats["no_match"] = problem
        return problem
    raise UnsupportedError(problem, f"Check that {name} applies to this model "
                           "(graph.op_histogram() lists its ops), or pass on_no_match='warn' "
                           "(to the pass, a PassManager or a recipe) to accept an unchanged "
                           "graph.")


__all__ = [
    "EXPECT",
    "POLICIES",
    "Expect",
    "NoMatchWarning",
    "check",
    "check_policy",
    "current_policy",
    "describe_graph",
    "on_no_match",
]
