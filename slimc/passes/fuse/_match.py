"""The one rule mechanism of ``fuse``: patterns, matching, rules, rule sets and the driver.

Written once for both backends. A backend adapter (``fx.py``, ``onnx.py``) shows its graph as
*canonical nodes* (:class:`CNode`: an op named as in ONNX — ``Add``, ``MatMul``, ``Softmax``,
``LayerNormalization``, … — with inputs, outputs and normalised attributes) and turns a
backend-neutral :class:`Plan` back into native nodes. A :class:`Rule` is a pattern, a check that
returns the reason it refuses (or None) and a replacement that writes a plan with a
:class:`Builder` (onnxscript's ``RewriteRule(pattern, replacement, condition)``). Rule sets
compose by ``+`` (tinygrad's ``PatternMatcher``).

Pattern language (tinygrad's ``UPat`` / onnxscript's pattern builder, reduced):

- ``Var("x")``: any value; a name used twice must bind the same value;
- ``Const("w")``: a constant (weight, literal, ``Constant`` node); ``Const(value=0.5)`` also
  requires that scalar value (relative tolerance 1e-6: exporters round constants to fp32);
- ``Op("Add", a, b, name="add", axis=-1)``: a node with that op (or one of a tuple of ops),
  exactly those inputs, and attributes equal to the values given (or accepted by a callable);
  ``Add``/``Mul`` match either input order;
- ``p1 | p2`` (:class:`Alt`): the first alternative that matches, in order.

Canonical ``Identity`` nodes (ONNX Identity / inference Dropout, FX dropout in eval / clone /
contiguous) are looked through while matching an ``Op``; they become part of the match.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

# -- canonical graph ---------------------------------------------------------------------------


@dataclass(eq=False)
class CNode:
    """One canonical node. ``natives`` are the backend nodes it stands for (FX ``getitem``s of a
    multi-output op are included); ``outputs`` lists every value read by others."""

    op: str
    inputs: tuple
    outputs: tuple
    attrs: dict
    name: str
    natives: tuple

    def __repr__(self) -> str:
        return f"<{self.op} {self.name}>"


# Ops whose inputs can be swapped without changing the result (floating-point addition and
# multiplication are commutative, though not associative).
COMMUTATIVE = frozenset({"Add", "Mul", "Max", "Min"})


class Host(Protocol):
    """What a backend adapter offers the matcher, checks and function patterns (``fx.FxHost``,
    ``onnx.OnnxHost``). Values are the backend's own (an ``fx.Node`` or literal, a graphsurgeon
    tensor); compare them with :meth:`same`, never ``==``."""

    backend: str  # "fx" | "onnx"

    def nodes(self) -> list[CNode]: ...  # canonical nodes, topological order
    def producer(self, v) -> CNode | None: ...  # None for inputs and constants
    def consumers(self, v) -> list[CNode | None]: ...  # None: a reader with no canonical form
    def users(self, v) -> list: ...  # native readers
    def is_graph_output(self, v) -> bool: ...
    def const(self, v) -> np.ndarray | None: ...  # the value of a constant, else None
    def shape(self, v) -> tuple | None: ...  # ints, or str for a symbolic dimension
    def dtype(self, v) -> np.dtype | None: ...
    def opset(self, domain: str = "") -> int | None: ...  # ONNX only
    def same(self, a, b) -> bool: ...
    def describe(self, v) -> str: ...
    def describe_node(self, native) -> str: ...
    def alive(self, c: CNode) -> bool: ...
    def check_plan(self, plan: Plan) -> str | None: ...  # why the backend cannot write it
    def commit(self, plan: Plan, mapping: list, match: Match) -> None: ...
    def finish(self): ...

# -- patterns ----------------------------------------------------------------------------------


class Pattern:
    def __or__(self, other: Pattern) -> Alt:
        return Alt(self, other)

    def root_ops(self) -> frozenset[str] | None:
        """The ops a node must have to be worth trying as the root (None: any node)."""
        return None


@dataclass(frozen=True, eq=False)
class Var(Pattern):
    name: str


@dataclass(frozen=True, eq=False)
class Const(Pattern):
    name: str | None = None
    value: float | None = None

    def __repr__(self) -> str:
        return f"Const({self.value})" if self.value is not None else f"Const({self.name!r})"


class Op(Pattern):
    def __init__(self, op: str | tuple[str, ...], *inputs: Pattern, name: str | None = None,
                 commutative: bool | None = None, **attrs: Any):
        self.ops = (op,) if isinstance(op, str) else tuple(op)
        self.inputs = inputs
        self.name = name
        self.commutative = (all(o in COMMUTATIVE for o in self.ops) if commutative is None
                            else commutative) and len(inputs) == 2
        self.attrs = attrs

    def root_ops(self) -> frozenset[str]:
        return frozenset(self.ops)

    def __repr__(self) -> str:
        return "|".join(self.ops)


class Alt(Pattern):
    def __init__(self, *alternatives: Pattern):
        flat: list[Pattern] = []
        for a in alternatives:
            flat.extend(a.alternatives if isinstance(a, Alt) else [a])
        self.alternatives = tuple(flat)

    def root_ops(self) -> frozenset[str] | None:
        ops: set[str] = set()
        for a in self.alternatives:
            r = a.root_ops()
            if r is None:
                return None
            ops |= r
        return frozenset(ops)

    def __repr__(self) -> str:
        return " | ".join(repr(a) for a in self.alternatives)


# -- match results -----------------------------------------------------------------------------


class Match:
    """What a pattern bound: values by ``Var``/``Const`` name, canonical nodes by ``Op`` name."""

    def __init__(self, host, root: CNode, bindings: dict, nodes: tuple[CNode, ...]):
        self.host = host
        self.root = root
        self.bindings = bindings
        self.nodes = nodes  # every matched canonical node, root included

    def __getitem__(self, name: str):
        return self.bindings[name]

    def __contains__(self, name: str) -> bool:
        return name in self.bindings

    def get(self, name: str, default=None):
        return self.bindings.get(name, default)

    def const(self, name: str) -> np.ndarray | None:
        return self.host.const(self.bindings[name]) if name in self.bindings else None

    def scalar(self, name: str) -> float | None:
        c = self.const(name)
        return float(c.reshape(-1)[0]) if c is not None and c.size == 1 else None

    def shape(self, name_or_value) -> tuple | None:
        v = self.bindings.get(name_or_value, name_or_value) if isinstance(name_or_value,
                                                                          str) else name_or_value
        return self.host.shape(v)

    def rank(self, name_or_value) -> int | None:
        s = self.shape(name_or_value)
        return None if s is None else len(s)

    def used_outside(self, node: CNode) -> bool:
        """Whether an output of ``node`` is read by a node outside the match (or is a graph
        output): a replacement must then provide that value too."""
        inside = {id(nat) for n in self.nodes for nat in n.natives}
        for out in node.outputs:
            if out is None:
                continue
            if self.host.is_graph_output(out) or any(id(u) not in inside
                                                     for u in self.host.users(out)):
                return True
        return False


@dataclass(frozen=True)
class Refusal:
    """Why a rule did not fire at a node. ``stage``: ``pattern`` (the graph does not have the
    shape of the pattern), ``check`` (it does, but the rule's check refused), ``uses`` (an
    intermediate value is read outside the pattern), ``target`` (the backend cannot express the
    replacement)."""

    rule: str
    node: str
    stage: str
    reason: str

    def __str__(self) -> str:
        return f"{self.rule} at {self.node}: {self.reason} [{self.stage}]"


class _Failure:
    """The failure of the match attempt that got furthest, as its reason."""

    def __init__(self):
        self.depth = -1
        self.reason = "no match"

    def note(self, depth: int, reason: str) -> None:
        if depth > self.depth:
            self.depth, self.reason = depth, reason


def _same(host, a, b) -> bool:
    return host.same(a, b)


def _attr_ok(expected, actual) -> bool:
    if callable(expected):
        try:
            return bool(expected(actual))
        except Exception:  # noqa: BLE001 - a predicate that cannot judge a value rejects it
            return False
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        return list(expected) == list(actual)
    return expected == actual


def _scalar_is(c: np.ndarray, value: float) -> bool:
    if c.size != 1 or not np.issubdtype(c.dtype, np.number):
        return False
    x = float(c.reshape(-1)[0])
    return abs(x - value) <= 1e-6 * max(abs(value), 1e-30) or x == value


class _Matcher:
    def __init__(self, host):
        self.host = host
        self.failure = _Failure()

    def value(self, p: Pattern, v, b: dict, depth: int, where: str) -> Iterator[dict]:
        host = self.host
        if isinstance(p, Alt):
            for alt in p.alternatives:
                yield from self.value(alt, v, b, depth, where)
            return
        if v is None:
            self.failure.note(depth, f"{where}: the input is absent")
            return
        if isinstance(p, Var):
            if p.name in b:
                if _same(host, b[p.name], v):
                    yield b
                else:
                    self.failure.note(depth, f"{where}: {host.describe(v)} should be the same "
                                             f"value as {p.name!r} ({host.describe(b[p.name])})")
                return
            yield {**b, p.name: v}
            return
        if isinstance(p, Const):
            c = host.const(v)
            if c is None:
                self.failure.note(depth, f"{where}: expected a constant, found "
                                         f"{host.describe(v)}")
                return
            if p.value is not None and not _scalar_is(c, p.value):
                shown = c.reshape(-1)[0] if c.size == 1 else f"an array of shape {c.shape}"
                self.failure.note(depth, f"{where}: expected the constant {p.value:g}, found "
                                         f"{shown}")
                return
            if p.name is None:
                yield b
            elif p.name in b:
                if _same(host, b[p.name], v):
                    yield b
                else:
                    self.failure.note(depth, f"{where}: constant differs from {p.name!r}")
            else:
                yield {**b, p.name: v}
            return
        assert isinstance(p, Op), p
        node = host.producer(v)
        skipped: list[CNode] = []
        while node is not None and node.op == "Identity" and "Identity" not in p.ops:
            skipped.append(node)
            node = host.producer(node.inputs[0]) if node.inputs else None
        if node is None:
            self.failure.note(depth, f"{where}: expected {p!r}, found {host.describe(v)}")
            return
        for bb in self.node(p, node, b, depth, where):
            yield {**bb, "__nodes__": bb["__nodes__"] + tuple(skipped)} if skipped else bb

    def node(self, p: Op, n: CNode, b: dict, depth: int, where: str) -> Iterator[dict]:
        if p.name is not None and p.name in b:  # the same sub-pattern seen again (Mul(d, d))
            if b[p.name] is n:
                yield b
            else:
                self.failure.note(depth, f"{where}: {n.op} {n.name} should be the node "
                                         f"bound to {p.name!r} ({b[p.name].name})")
            return
        if n.op not in p.ops:
            self.failure.note(depth, f"{where}: expected {p!r}, found {n.op} ({n.name})")
            return
        for key, expected in p.attrs.items():
            actual = n.attrs.get(key)
            if not _attr_ok(expected, actual):
                shown = getattr(expected, "__name__", expected)
                self.failure.note(depth + 1, f"{n.op} {n.name}: attribute {key}={actual!r} "
                                             f"does not satisfy {shown}")
                return
        inputs = n.inputs
        if len(inputs) != len(p.inputs):
            self.failure.note(depth + 1, f"{n.op} {n.name} has {len(inputs)} inputs, the "
                                         f"pattern {len(p.inputs)}")
            return
        if not any(node is n for node in b["__nodes__"]):
            b = {**b, "__nodes__": b["__nodes__"] + (n,)}
        if p.name is not None:
            b = {**b, p.name: n}
        orders = [tuple(range(len(inputs)))]
        if p.commutative:
            orders.append((1, 0))
        for order in orders:
            yield from self._inputs(p, n, [inputs[i] for i in order], b, depth + 1)

    def _inputs(self, p: Op, n: CNode, inputs: list, b: dict, depth: int) -> Iterator[dict]:
        def rec(i: int, bb: dict) -> Iterator[dict]:
            if i == len(inputs):
                yield bb
                return
            where = f"{n.op} {n.name} input {i}"
            for b2 in self.value(p.inputs[i], inputs[i], bb, depth + i, where):
                yield from rec(i + 1, b2)
        yield from rec(0, b)


def match_pattern(pattern: Pattern, host, node: CNode) -> Iterator[Match] | str:
    """Match ``pattern`` with ``node`` as its root: the matches (first the one the pattern's
    order prefers), or the reason there is none."""
    m = _Matcher(host)
    start = {"__nodes__": ()}
    if isinstance(pattern, Alt):
        gens = (m.node(a, node, start, 0, "root") if isinstance(a, Op)
                else m.value(a, node.outputs[0], start, 0, "root")
                for a in pattern.alternatives)
        found = itertools.chain.from_iterable(gens)
    elif isinstance(pattern, Op):
        found = m.node(pattern, node, start, 0, "root")
    else:
        raise TypeError(f"a rule's pattern must be an Op or an Alt of Ops, not {pattern!r}")
    def matches(first: dict) -> Iterator[Match]:
        for b in itertools.chain([first], found):
            nodes: list[CNode] = []
            for n in b.pop("__nodes__"):
                if not any(n is k for k in nodes):
                    nodes.append(n)
            yield Match(host, node, b, tuple(nodes))
    first = next(found, None)
    return m.failure.reason if first is None else matches(first)


# -- replacements ------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PConst:
    """A new constant the replacement needs (folded weights, concatenated projections)."""

    array: np.ndarray
    hint: str = "const"


@dataclass(frozen=True, eq=False)
class PValue:
    """Output ``index`` of plan op ``op``."""

    op: PlanOp
    index: int = 0


@dataclass(eq=False)
class PlanOp:
    op: str
    inputs: tuple
    attrs: dict
    n_outputs: int = 1


@dataclass
class Plan:
    ops: list[PlanOp] = field(default_factory=list)


class Builder:
    """What a replacement writes with: canonical ops over matched values and new constants.

    ``b.op("LayerNormalization", x, gamma, beta, axis=-1, epsilon=1e-5)`` returns the new value
    (a list of values when ``outputs`` > 1). Inputs may be values from the match, earlier
    ``b.op`` results, ``b.const(array)`` or None (an absent optional input). Nothing touches the
    graph until every check has passed and the backend has accepted the whole plan.
    """

    def __init__(self, host):
        self.host = host
        self.plan = Plan()

    @property
    def backend(self) -> str:
        return self.host.backend

    def op(self, op: str, *inputs, outputs: int = 1, **attrs):
        pop = PlanOp(op, tuple(inputs), attrs, outputs)
        self.plan.ops.append(pop)
        if outputs == 1:
            return PValue(pop, 0)
        return [PValue(pop, i) for i in range(outputs)]

    def const(self, array, hint: str = "const") -> PConst:
        return PConst(np.ascontiguousarray(array), hint)


# -- rules -------------------------------------------------------------------------------------

Check = Callable[[Match], "str | None"]
Replace = Callable[[Builder, Match], Any]


@dataclass(frozen=True, eq=False)
class Rule:
    """A rewrite rule: ``pattern`` (an :class:`Op`/:class:`Alt`, or a function
    ``(host, cnode) -> Match | str | None`` for shapes a tree cannot say, e.g. several consumers
    of one value), ``check(match) -> reason | None``, ``replace(builder, match)``.

    ``replace`` returns the value that takes the place of the root's first output, or a list of
    ``(old value, new value)`` pairs when several values are replaced (ONNX tensors are not
    hashable, so not a dict), or a string: the reason it refuses after all.
    """

    name: str
    pattern: Pattern | Callable
    replace: Replace
    check: Check | None = None
    doc: str = ""

    def __add__(self, other) -> RuleSet:
        return RuleSet([self]) + other

    def __radd__(self, other) -> RuleSet:
        return RuleSet(other) + self

    def __repr__(self) -> str:
        return f"Rule({self.name!r})"

    def match(self, host, node: CNode) -> Iterator[Match] | str | None:
        """The matches rooted at ``node`` (in order of preference), the reason there is none,
        or None when ``node`` is not a candidate."""
        if isinstance(self.pattern, Pattern):
            ops = self.pattern.root_ops()
            if ops is not None and node.op not in ops:
                return None
            return match_pattern(self.pattern, host, node)
        found = self.pattern(host, node)
        return iter([found]) if isinstance(found, Match) else found


class RuleSet:
    """An ordered set of rules (order = priority). ``a + b`` concatenates, ``without("x")``
    switches rules off, ``set["name"]`` finds one; names are unique."""

    def __init__(self, rules: Iterable[Rule] = ()):
        rules = tuple(rules.rules if isinstance(rules, RuleSet) else rules)
        seen: set[str] = set()
        for r in rules:
            if not isinstance(r, Rule):
                raise TypeError(f"a RuleSet holds Rule objects, not {type(r).__name__}")
            if r.name in seen:
                raise ValueError(f"two rules named {r.name!r} in one rule set")
            seen.add(r.name)
        self.rules = rules

    def __add__(self, other) -> RuleSet:
        if isinstance(other, Rule):
            other = [other]
        return RuleSet(self.rules + tuple(RuleSet(other).rules))

    def __radd__(self, other) -> RuleSet:
        return RuleSet(other) + self

    def without(self, *names: str) -> RuleSet:
        unknown = set(names) - set(self.names)
        if unknown:
            raise KeyError(f"no rule named {', '.join(sorted(unknown))}; rules: "
                           f"{', '.join(self.names)}")
        return RuleSet(r for r in self.rules if r.name not in names)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rules]

    def __getitem__(self, name: str) -> Rule:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(f"no rule named {name!r}; rules: {', '.join(self.names)}")

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __iter__(self):
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __repr__(self) -> str:
        width = max((len(n) for n in self.names), default=0)
        lines = [f"  {r.name:<{width}}  {r.doc.strip().splitlines()[0] if r.doc else ''}"
                 for r in self.rules]
        return "RuleSet(\n" + "\n".join(lines) + "\n)"


# -- the driver --------------------------------------------------------------------------------


@dataclass
class Attempt:
    """One rule tried at one node: either a ready plan or a refusal."""

    rule: Rule
    node: CNode
    refusal: Refusal | None = None
    match: Match | None = None
    plan: Plan | None = None
    mapping: list | None = None  # (old value, new value) pairs

    @property
    def fires(self) -> bool:
        return self.refusal is None


def _outputs_used_outside(host, m: Match, mapping: list) -> str | None:
    inside = {id(nat) for n in m.nodes for nat in n.natives}
    replaced = [k for k, _ in mapping]
    for n in m.nodes:
        for out in n.outputs:
            if out is None or any(host.same(out, k) for k in replaced):
                continue
            outside = [u for u in host.users(out) if id(u) not in inside]
            if outside or host.is_graph_output(out):
                who = "a graph output" if not outside else host.describe_node(outside[0])
                return (f"{n.op} {n.name} is also read outside the pattern (by {who}); fusing "
                        "would compute it twice")
    return None


def attempt(host, rule: Rule, node: CNode) -> Attempt | None:
    """Try ``rule`` at ``node`` without changing the graph (None: not a candidate)."""
    found = rule.match(host, node)
    if found is None:
        return None
    if isinstance(found, str):
        return Attempt(rule, node, Refusal(rule.name, node.name, "pattern", found))
    first: Attempt | None = None
    # A pattern may match in several ways (alternatives, input orders); the first way the
    # rule accepts wins, and if none does, the refusal of the preferred one is the answer.
    for m in itertools.islice(found, _MAX_MATCHES):
        a = _attempt_match(host, rule, node, m)
        if a.fires:
            return a
        first = first or a
    return first


# How many ways of matching one node a rule considers before giving up on it.
_MAX_MATCHES = 16


def _attempt_match(host, rule: Rule, node: CNode, m: Match) -> Attempt:
    reason = rule.check(m) if rule.check is not None else None
    if reason:
        return Attempt(rule, node, Refusal(rule.name, node.name, "check", reason), m)
    b = Builder(host)
    out = rule.replace(b, m)
    if isinstance(out, str):  # a replacement may still refuse once it has worked out the plan
        return Attempt(rule, node, Refusal(rule.name, node.name, "check", out), m)
    if isinstance(out, dict):
        mapping = list(out.items())
    elif isinstance(out, list):
        mapping = [tuple(pair) for pair in out]
    else:
        mapping = [(m.root.outputs[0], out)]
    reason = _outputs_used_outside(host, m, mapping)
    if reason:
        return Attempt(rule, node, Refusal(rule.name, node.name, "uses", reason), m)
    reason = host.check_plan(b.plan)
    if reason:
        return Attempt(rule, node, Refusal(rule.name, node.name, "target", reason), m)
    return Attempt(rule, node, None, m, b.plan, mapping)


def _dead(host, node: CNode) -> bool:
    """Nothing reads the node's outputs: fusing it would only count work cleanup removes."""
    return not any(o is not None and (host.users(o) or host.is_graph_output(o))
                   for o in node.outputs)


@dataclass
class Report:
    fired: Counter = field(default_factory=Counter)
    refused: dict = field(default_factory=dict)  # rule -> Counter(reason)
    rounds: int = 0
    converged: bool = True


def rewrite(host, rules: RuleSet, *, max_rounds: int = 10) -> Report:
    """Apply ``rules`` in order, each wherever it matches, and repeat until nothing fires.

    Nodes are visited from the graph's end, so the largest match (the outermost root) wins over a
    part of it. Refusals are those of the last round (the graph as returned), ``pattern``-stage
    refusals left out: every node of the root's op that is not the pattern would be one.
    """
    report = Report()
    for rnd in range(max_rounds):
        changed = False
        refused: dict[str, Counter] = {}
        for rule in rules:
            for node in reversed(host.nodes()):
                if not host.alive(node) or _dead(host, node):
                    continue
                a = attempt(host, rule, node)
                if a is None:
                    continue
                if a.fires:
                    host.commit(a.plan, a.mapping, a.match)
                    report.fired[rule.name] += 1
                    changed = True
                elif a.refusal.stage != "pattern":
                    refused.setdefault(rule.name, Counter())[a.refusal.reason] += 1
        report.rounds = rnd + 1
        report.refused = refused
        if not changed:
            return report
    report.converged = False
    return report


def explain(host, rule: Rule) -> list[Refusal | str]:
    """Every node where ``rule`` is worth trying, and what happens there (nothing changes)."""
    out: list = []
    for node in reversed(host.nodes()):
        if _dead(host, node):
            continue
        a = attempt(host, rule, node)
        if a is None:
            continue
        out.append(a.refusal if a.refusal else f"{rule.name} at {node.name}: fires")
    return out
