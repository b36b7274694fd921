"""``fuse``: rewrite decomposed subgraphs into the fused ops compilers and runtimes have kernels for.

Rules are listed, switched off and extended in a few lines::

    from slimc import passes
    from slimc.passes.fuse import DEFAULT, ONNXRUNTIME, Op, Rule, Var

    print(DEFAULT)                                    # names and one-line docs, in priority order
    g2 = passes.fuse(g)                               # DEFAULT
    g2 = passes.fuse(g, disable=["merge_qkv"])        # all but one
    g2 = passes.fuse(g, rules=ONNXRUNTIME + DEFAULT)  # onnxruntime's contrib ops first

    # a rule of your own: relu(relu(x)) -> relu(x)
    twice = Rule("relu_twice", Op("Relu", Op("Relu", Var("x"), name="inner")),
                 lambda b, m: m["inner"].outputs[0])
    g2 = passes.fuse(g, rules=DEFAULT + twice)

    # ... or registered by name, for recipes (rules = ["DEFAULT", "relu_twice"]) and
    # `slimc passes --list`
    @register_rule(pattern=Op("Relu", Op("Relu", Var("x"), name="inner")))
    def relu_twice(b, m):
        # relu(relu(x)) -> relu(x): the docstring (or doc=) is its summary
        return m["inner"].outputs[0]

    passes.fuse.run(g).stats["fired"]                 # {"layer_norm": 12, ...}
    for why in passes.fuse.explain(g, "layer_norm"):  # why (not) at each candidate node
        print(why)

For TVM, compile with ``tune=slimc.codegen.fusion.fusion_hook(apply_default_schedules)``: it
turns merge_qkv's Split into slices that TVM fuses into their readers (bench/fusion.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

from ...errors import OptionError
from ..registry import Exact, PassResult, as_graph, register_pass
from . import rules as rules
from ._match import Alt, Builder, Const, Match, Op, Refusal, Rule, RuleSet, Var
from .rules import CATALOGUE, DEFAULT, ONNXRUNTIME, ORT, SPLIT_QKV


def _host(graph):
    if graph.backend == "fx":
        from .fx import FxHost
        return FxHost(graph.native)
    from .onnx import OnnxHost
    return OnnxHost(graph.native)


# the named rule sets a string in ``rules`` may stand for (recipes cannot hold Rule objects)
SETS = {"DEFAULT": DEFAULT, "ONNXRUNTIME": ONNXRUNTIME, "ORT": ORT, "SPLIT_QKV": SPLIT_QKV}
# names registered with register_rule, in order (``slimc passes --list`` marks them)
USER_RULES: list[str] = []


def register_rule(name: str | None = None, *, pattern, check: Callable | None = None,
                  doc: str | None = None) -> Callable[[Callable], Rule]:
    """Decorator: turn ``replace(builder, match)`` into a :class:`Rule` registered by name.

    The rule joins :data:`CATALOGUE`, so ``passes.fuse(g, rules=[..., "name"])``, a recipe's
    ``rules = ["DEFAULT", "name"]`` and ``slimc passes --list`` (which marks it "user") find it;
    the decorated name is the Rule itself, to combine as ``DEFAULT + rule``. It is not added to
    :data:`DEFAULT`: a rule runs only where it is asked for. ``doc`` defaults to the first line
    of the docstring. A name already registered for another rule is an error.
    """

    def wrap(replace: Callable) -> Rule:
        rname = name or replace.__name__
        if rname in CATALOGUE or rname in SETS:
            known = CATALOGUE.get(rname)
            if known is None or known.replace is not replace:
                raise OptionError(f"fuse: a rule named {rname!r} is already registered.",
                                  "Choose another name for your rule.")
        text = doc if doc is not None else (inspect.getdoc(replace) or "").split("\n")[0]
        rule = Rule(rname, pattern, replace, check, text)
        CATALOGUE[rname] = rule
        if rname not in USER_RULES:
            USER_RULES.append(rname)
        return rule

    return wrap


def resolve_rules(rules=None, disable: Iterable[str] = ()) -> RuleSet:
    """The rule set for ``rules`` (a RuleSet, Rules, rule names from :data:`CATALOGUE` or set
    names from :data:`SETS`; None means :data:`DEFAULT`) without the rules named in
    ``disable``."""
    if rules is None:
        rules = DEFAULT
    elif isinstance(rules, (Rule, str)):
        rules = [rules]
    rules = [x for r in rules for x in (SETS[r] if isinstance(r, str) and r in SETS else [r])]
    picked = []
    for r in rules:
        if isinstance(r, str):
            if r not in CATALOGUE:
                raise OptionError(f"fuse: no rule named {r!r}.",
                                  f"Known rules: {', '.join(CATALOGUE)}; sets: "
                                  f"{', '.join(SETS)}.")
            r = CATALOGUE[r]
        if not isinstance(r, Rule):
            raise OptionError(f"fuse: rules must be Rule objects or rule names, got "
                              f"{type(r).__name__}.", "Pass e.g. rules=DEFAULT + [my_rule].")
        picked.append(r)
    try:
        out = RuleSet(picked)
    except ValueError as e:
        raise OptionError(f"fuse: {e}.", "Give each rule a unique name.") from e
    disable = [disable] if isinstance(disable, str) else list(disable)
    unknown = [d for d in disable if d not in out]
    if unknown:
        raise OptionError(f"fuse: cannot disable {', '.join(map(repr, unknown))}: not in the "
                          "rule set.", f"Rules in the set: {', '.join(out.names)}.")
    return out.without(*disable) if disable else out


@register_pass("fuse", contract=Exact(rtol=1e-5, atol=1e-5))
def fuse(graph, /, *, rules=None, disable: Iterable[str] = (),
         max_rounds: int = 10) -> PassResult:
    """Rewrite subgraphs into fused ops, rule by rule, until no rule fires.

    Math:
        Each rule replaces a subgraph by one that computes the same function: Linear(x, W, b) =
        x @ W + b; LayerNorm(x) = (x - E[x]) / sqrt(Var[x] + eps) * gamma + beta over the last
        axes; Gelu(x) = x * Phi(x) (erf) or its tanh approximation, matched with the same
        constants; attention = softmax(q k^T * s + mask) v; BN(conv(x)) = conv(x, W * s) +
        (b - mean) * s + beta with s = gamma / sqrt(var + eps); Transpose/Reshape chains compose
        to the one op that moves the data the same way; parallel projections concatenate.
        ``rules.DEFAULT`` / ``rules.ONNXRUNTIME`` list them (``print(rules.DEFAULT)``).

    Pre:
        An FX graph from ``torch.export`` (node metadata ``val``) or a valid ONNX model; shapes
        are inferred where the model lacks them. Options: ``rules`` (a RuleSet, a list of Rules or
        of rule names; default ``DEFAULT``), ``disable`` (rule names to leave out),
        ``max_rounds`` (passes over the graph before giving up on a fixed point).

    Post:
        Same inputs and outputs (ONNX output names unchanged). Rules are applied in order, each
        wherever it matches (largest match first), repeated until a round changes nothing. Where
        no rule fires the graph is returned unchanged (ONNX: byte-identical serialization; FX:
        same code and weights). ``stats``: ``fired`` (rule -> count), ``refused`` (rule ->
        {reason: count} for candidates that matched the pattern but failed a check), ``rounds``,
        ``converged``, ``nodes_before``, ``nodes_after``.

    Numerics:
        Exact up to floating-point rounding: fused kernels sum in another order (1e-6 relative
        in fp32). Where an attention row is masked entirely (-inf), a source with a plain
        softmax yields NaN; scaled_dot_product_attention and ONNX Attention yield 0 there.
    """
    if not isinstance(max_rounds, int) or isinstance(max_rounds, bool) or max_rounds < 1:
        raise OptionError(f"fuse: max_rounds must be an integer >= 1, got {max_rounds!r}.",
                          "Pass e.g. max_rounds=10.")
    ruleset = resolve_rules(rules, disable)
    before = sum(graph.op_histogram().values())
    host = _host(graph)
    from ._match import rewrite
    report = rewrite(host, ruleset, max_rounds=max_rounds)
    modified = bool(report.fired)
    if modified:
        out = host.finish()
        if graph.backend == "onnx":
            graph.native = out
    stats = {"fired": dict(report.fired),
             "refused": {k: dict(v) for k, v in report.refused.items()},
             "rounds": report.rounds, "converged": report.converged,
             "nodes_before": before,
             "nodes_after": sum(graph.op_histogram().values()) if modified else before}
    return PassResult(graph, modified, stats)


def explain(g, rule: Rule | str) -> list[Refusal | str]:
    """Why ``rule`` does (not) fire at each node of ``g`` where it is worth trying.

    ``g``: a ``slimc.Graph``, ``torch.fx.GraphModule`` or ``onnx.ModelProto`` (not changed).
    Returns one entry per candidate node (a node with the pattern's root op): ``"<rule> at
    <node>: fires"`` or a :class:`Refusal` with its stage (``pattern``, ``check``, ``uses``,
    ``target``) and reason. An empty list means no node has the root op at all.
    """
    from ._match import explain as _explain
    r = resolve_rules([rule])
    graph, _ = as_graph(g)
    return _explain(_host(graph), r.rules[0])  # hosts only read until they commit a plan


fuse.explain = explain
fuse.register_rule = register_rule
fuse.rules = rules
fuse.DEFAULT, fuse.ONNXRUNTIME, fuse.ORT, fuse.SPLIT_QKV = DEFAULT, ONNXRUNTIME, ORT, SPLIT_QKV
fuse.Rule, fuse.RuleSet, fuse.Op, fuse.Var, fuse.Const, fuse.Alt = (Rule, RuleSet, Op, Var, Const,
                                                                    Alt)

__all__ = [
    "CATALOGUE",
    "DEFAULT",
    "ONNXRUNTIME",
    "ORT",
    "SETS",
    "SPLIT_QKV",
    "USER_RULES",
    "Alt",
    "Builder",
    "Const",
    "Match",
    "Op",
    "Refusal",
    "Rule",
    "RuleSet",
    "Var",
    "explain",
    "fuse",
    "register_rule",
    "resolve_rules",
    "rules",
]
