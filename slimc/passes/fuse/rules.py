"""The fusion rules: each a pattern, a check that says why it refuses, and a replacement.

Rule sets (order = priority; combine with ``+``, switch off with ``.without(name)``):

- ``DEFAULT``: standard ops only (torch aten ops on FX, default-domain ONNX ops);
- ``ONNXRUNTIME``: ``com.microsoft`` contrib ops that onnxruntime runs (SkipLayerNormalization,
  BiasGelu, FastGelu, Gelu, MultiHeadAttention); ONNX only — on FX they refuse with a reason;
- ``ORT = ONNXRUNTIME + DEFAULT``: both, the contrib rules first (they absorb the bias adds
  that ``matmul_add`` would otherwise take);
- ``SPLIT_QKV``: the reverse of ``merge_qkv`` (one projection + Split → one projection per part),
  for passes that edit q, k and v separately (head pruning). Never combine it with
  ``merge_qkv``: each undoes the other.

Every rule is exact: the replacement computes the same function (floating-point rounding aside,
see each rule's note). ``CATALOGUE`` maps every rule name to its rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _math
from ._match import Alt, CNode, Const, Match, Op, Rule, RuleSet, Var

# -- layout: Transpose / Reshape chains ---------------------------------------------------------


def _replace_transposes(b, m: Match):
    perm = _math.compose_perms(m["inner"].attrs["perm"], m["outer"].attrs["perm"])
    return m["x"] if _math.is_identity_perm(perm) else b.op("Transpose", m["x"], perm=perm)


cancel_transpose = Rule(
    "cancel_transpose",
    Op("Transpose", Op("Transpose", Var("x"), name="inner"), name="outer"),
    _replace_transposes,
    doc="Transpose(Transpose(x, p), q) -> Transpose(x, p[q]), or x when p[q] is the identity.")


def _check_reshapes(m: Match) -> str | None:
    outer = m["outer"]
    shape, target = outer.attrs.get("shape"), outer.attrs.get("target")
    static = shape is not None and all(isinstance(d, int) for d in shape)
    if not static and target is None:
        return "the outer Reshape's shape is neither static nor a constant"
    if not static and 0 in target and not outer.attrs.get("allowzero", 0):
        return ("the outer Reshape copies a dimension (0) from its input, which the inner "
                "Reshape sets")
    return None


def _replace_reshapes(b, m: Match):
    outer = m["outer"]
    xs, shape = m.shape("x"), outer.attrs.get("shape")
    if shape is not None and xs is not None and tuple(xs) == tuple(shape) and \
            all(isinstance(d, int) for d in shape):
        return m["x"]
    return b.op("Reshape", m["x"], shape=shape, target=outer.attrs.get("target"),
                allowzero=outer.attrs.get("allowzero", 0))


cancel_reshape = Rule(
    "cancel_reshape",
    Op("Reshape", Op("Reshape", Var("x"), name="inner"), name="outer"),
    _replace_reshapes, _check_reshapes,
    doc="Reshape(Reshape(x, s1), s2) -> Reshape(x, s2), or x when s2 is x's shape.")

_LAYOUT_OPS = ("Transpose", "Reshape")
_MAX_CHAIN = 8


def _layout_chain_pattern(host, node: CNode):
    if node.op not in _LAYOUT_OPS:
        return None
    chain = [node]
    while len(chain) < _MAX_CHAIN:
        src = chain[-1].inputs[0]
        p = host.producer(src)
        if p is None or p.op not in _LAYOUT_OPS or len(host.users(src)) != 1 \
                or host.is_graph_output(src):
            break
        chain.append(p)
    if len(chain) < 3:
        return (f"{node.op} {node.name} ends no chain of three or more single-use "
                "Transpose/Reshape ops (pairs are cancel_transpose / cancel_reshape's)")
    chain.reverse()
    reason = "no sub-chain is one Transpose or Reshape"
    for start in range(len(chain) - 1):
        sub = chain[start:]
        x = sub[0].inputs[0]
        in_shape = host.shape(x)
        if in_shape is None or not all(isinstance(d, int) for d in in_shape):
            reason = "the chain's shapes are not static"
            continue
        steps = []
        for c in sub:
            if c.op == "Transpose":
                steps.append(("Transpose", c.attrs["perm"]))
            else:
                s = c.attrs.get("shape")
                if s is None or not all(isinstance(d, int) for d in s):
                    break
                steps.append(("Reshape", tuple(s)))
        else:
            found = _math.layout_chain(tuple(in_shape), steps)
            if found is not None:
                return Match(host, node, {"x": x, "kind": found[0], "arg": found[1]},
                             tuple(sub))
            continue
        reason = "a Reshape in the chain has no static shape"
    return f"{len(chain)} Transpose/Reshape ops end at {node.name}: {reason}"


def _replace_layout_chain(b, m: Match):
    kind, arg = m["kind"], m["arg"]
    if kind == "Identity":
        return m["x"]
    if kind == "Reshape":
        return b.op("Reshape", m["x"], shape=arg, target=None, allowzero=0)
    return b.op("Transpose", m["x"], perm=arg)


collapse_layout = Rule(
    "collapse_layout", _layout_chain_pattern, _replace_layout_chain,
    doc="A chain of 3+ Transpose/Reshape ops that moves data like one Transpose (or one Reshape, "
        "or nothing) -> that op. Static shapes only.")

# -- BatchNorm folding ------------------------------------------------------------------------


def _bn_pattern():
    x, w, cb = Var("x"), Const("w"), Const("b")
    prod = (Op("Conv", x, w, cb, name="conv") | Op("Conv", x, w, name="conv")
            | Op("Linear", x, w, cb, name="lin") | Op("Linear", x, w, name="lin"))
    return Op("BatchNormalization", prod, Const("scale"), Const("shift"), Const("mean"),
              Const("var"), name="bn")


def _check_bn(m: Match) -> str | None:
    w = m.const("w")
    if not np.issubdtype(w.dtype, np.floating):
        return f"the weight is {w.dtype}, not floating point"
    channels = w.shape[0]
    if "lin" in m:
        lin = m["lin"]
        if m.rank(lin.outputs[0]) != 2:
            return ("BatchNorm after a Linear normalises axis 1, which is the features only "
                    f"for 2-D outputs; this output is {m.rank(lin.outputs[0])}-D")
        channels = w.shape[0] if lin.attrs["layout"] == "out_in" else w.shape[1]
    for name in ("scale", "shift", "mean", "var"):
        if m.const(name).size != channels:
            return f"BatchNorm {name} has {m.const(name).size} values for {channels} channels"
    return None


def _replace_bn(b, m: Match):
    bn = m["bn"]
    bias = m.const("b")
    if "conv" in m:
        w2, b2 = _math.fold_batch_norm(m.const("w"), bias, m.const("scale"), m.const("shift"),
                                       m.const("mean"), m.const("var"), bn.attrs["epsilon"], 0)
        return b.op("Conv", m["x"], b.const(w2, "bn_weight"), b.const(b2, "bn_bias"),
                    **m["conv"].attrs)
    layout = m["lin"].attrs["layout"]
    w2, b2 = _math.fold_batch_norm(m.const("w"), bias, m.const("scale"), m.const("shift"),
                                   m.const("mean"), m.const("var"), bn.attrs["epsilon"],
                                   0 if layout == "out_in" else 1)
    return b.op("Linear", m["x"], b.const(w2, "bn_weight"), b.const(b2, "bn_bias"),
                layout=layout)


fold_batchnorm = Rule(
    "fold_batchnorm", _bn_pattern(), _replace_bn, _check_bn,
    doc="BatchNorm(Conv/Linear(x, W, b)) -> Conv/Linear(x, W*s, (b-mean)*s+shift), "
        "s = scale/sqrt(var+eps).")

# -- MatMul + Add -> Linear (Gemm) --------------------------------------------------------------


def _out_features(w: np.ndarray, layout: str) -> int:
    return int(w.shape[0] if layout == "out_in" else w.shape[1])


def _check_matmul_add(m: Match) -> str | None:
    w = m.const("w")
    if w.ndim != 2:
        return f"the weight is {w.ndim}-D; a projection's is 2-D"
    layout = m["mm"].attrs.get("layout", "in_out")
    n = _out_features(w, layout)
    rank = m.rank(m["mm"].outputs[0])
    if rank is None:
        return "the product's rank is unknown"
    if _math.bias_vector(m.const("b"), n, rank) is None:
        return (f"the added constant has shape {tuple(m.const('b').shape)}; a bias of this "
                f"{n}-feature projection is ({n},) (or 1 x ... x {n})")
    return None


def _replace_matmul_add(b, m: Match):
    layout = m["mm"].attrs.get("layout", "in_out")
    w = m.const("w")
    c = m.const("b")
    bias = m["b"] if c.shape == (_out_features(w, layout),) else \
        b.const(_math.bias_vector(c, _out_features(w, layout), c.ndim), "bias")
    return b.op("Linear", m["x"], m["w"], bias, layout=layout)


matmul_add = Rule(
    "matmul_add",
    Op("Add", Op("MatMul", Var("x"), Const("w"), name="mm")
       | Op("Linear", Var("x"), Const("w"), name="mm"), Const("b"), name="add"),
    _replace_matmul_add, _check_matmul_add,
    doc="MatMul(x, W) + b -> Linear (FX aten.linear/addmm; ONNX Gemm, flattened around it "
        "when x has more than 2 dims).")

# -- LayerNorm from its decomposition ----------------------------------------------------------


def _layer_norm_pattern():
    x = Var("x")
    mean = Op("ReduceMean", x, name="mean")
    d = Op("Sub", x, mean, name="centered")
    sq = Op("Pow", d, Const(value=2.0)) | Op("Mul", d, d)
    ve = Op("Add", Op("ReduceMean", sq, name="var"), Const("eps"), name="var_eps")
    normed = (Op("Div", d, Op("Sqrt", ve), name="normed")
              | Op("Mul", d, Op("Rsqrt", ve), name="normed")
              | Op("Mul", d, Op("Reciprocal", Op("Sqrt", ve)), name="normed"))
    scaled = Op("Mul", normed, Var("gamma"), name="scaled")
    return Alt(Op("Add", scaled, Var("beta"), name="shifted"), scaled, normed)


def _ln_axes(m: Match) -> int | str:
    rank = m.rank("x")
    mean, var = m["mean"], m["var"]
    if rank is None:
        return "the input's rank is unknown"
    if mean.attrs["axes"] != var.attrs["axes"]:
        return f"mean over axes {mean.attrs['axes']} but variance over {var.attrs['axes']}"
    if not mean.attrs["keepdims"] or not var.attrs["keepdims"]:
        return "a ReduceMean drops the reduced axes (keepdims=0)"
    k = _math.is_trailing_axes(mean.attrs["axes"], rank)
    if k is None:
        return (f"normalises axes {mean.attrs['axes']} of a {rank}-D input; LayerNorm "
                "normalises the last axes")
    return k


def _affine(m: Match, name: str, norm_shape) -> tuple[object, str | None]:
    """The gamma/beta value as LayerNorm's input (a value, or an array to make a constant)."""
    if name not in m:
        return None, None
    c = m.const(name)
    if c is None:
        if m.shape(name) is not None and tuple(m.shape(name))[-len(norm_shape):] == \
                tuple(norm_shape) and all(d == 1 for d in m.shape(name)[:-len(norm_shape)]):
            return m[name], None
        return None, (f"{name} is computed and its shape {m.shape(name)} is not the "
                      f"normalised shape {tuple(norm_shape)}")
    if c.ndim > m.rank("x"):
        return None, f"{name} has more dims ({c.ndim}) than the input ({m.rank('x')})"
    full = _math.broadcast_to_trailing(c, tuple(norm_shape))
    if full is None:
        return None, (f"{name} of shape {tuple(c.shape)} does not broadcast over the "
                      f"normalised axes {tuple(norm_shape)} only")
    return (m[name] if c.shape == tuple(norm_shape) else full), None


def _check_layer_norm(m: Match) -> str | None:
    k = _ln_axes(m)
    if isinstance(k, str):
        return k
    eps = m.scalar("eps")
    if eps is None or eps < 0:
        return "the epsilon added to the variance is not a non-negative scalar"
    xs = m.shape("x")
    norm = xs[-k:]
    if not all(isinstance(d, int) for d in norm):
        return f"the normalised shape {tuple(norm)} is not static"
    dt = m.host.dtype(m["x"])
    if dt is not None and not np.issubdtype(dt, np.floating):
        return f"the input is {dt}, not floating point"
    for name in ("gamma", "beta"):
        _, reason = _affine(m, name, norm)
        if reason:
            return reason
    return None


def _replace_layer_norm(b, m: Match):
    k = _ln_axes(m)
    norm = tuple(m.shape("x")[-k:])
    dt = m.host.dtype(m["x"]) or np.dtype(np.float32)
    ins = []
    for name in ("gamma", "beta"):
        val, _ = _affine(m, name, norm)
        ins.append(b.const(val, name) if isinstance(val, np.ndarray) else val)
    gamma, beta = ins
    if gamma is None and b.backend == "onnx":  # ONNX LayerNormalization requires a scale
        gamma = b.const(np.ones(norm, dtype=dt), "ones")
    return b.op("LayerNormalization", m["x"], gamma, beta, axis=-k,
                epsilon=float(m.scalar("eps")))


layer_norm = Rule(
    "layer_norm", _layer_norm_pattern(), _replace_layer_norm, _check_layer_norm,
    doc="(x - mean(x)) / sqrt(var(x) + eps) * gamma + beta over the last axes -> "
        "LayerNormalization (Div/Sqrt, Mul/Rsqrt and Mul/Reciprocal/Sqrt forms).")

# -- GELU -------------------------------------------------------------------------------------


def _gelu_outer(x, one_plus):
    half = Const(value=0.5)
    return (Op("Mul", Op("Mul", x, half), one_plus)
            | Op("Mul", Op("Mul", x, one_plus), half)
            | Op("Mul", x, Op("Mul", one_plus, half)))


def gelu_erf(x):
    """The pattern of 0.5 * x * (1 + erf(x / sqrt(2))) for an input pattern ``x``."""
    inner = Op("Erf", Op("Div", x, Const(value=_math.SQRT2))
               | Op("Mul", x, Const(value=1 / _math.SQRT2)), name="erf")
    return _gelu_outer(x, Op("Add", inner, Const(value=1.0)))


def gelu_tanh(x):
    """The pattern of 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))."""
    cube = (Op("Pow", x, Const(value=3.0)) | Op("Mul", x, Op("Mul", x, x))
            | Op("Mul", Op("Mul", x, x), x))
    inner = Op("Add", x, Op("Mul", cube, Const(value=_math.GELU_TANH_COEFF)))
    t = Op("Tanh", Op("Mul", inner, Const(value=_math.SQRT_2_OVER_PI)), name="tanh")
    return _gelu_outer(x, Op("Add", t, Const(value=1.0)))


def _approximate(m: Match) -> str:
    if "tanh" in m:
        return "tanh"
    if "gelu" in m:
        return m["gelu"].attrs.get("approximate", "none")
    return "none"


def _check_float(m: Match) -> str | None:
    dt = m.host.dtype(m["x"])
    if dt is not None and not np.issubdtype(dt, np.floating):
        return f"the input is {dt}, not floating point"
    return None


gelu = Rule(
    "gelu", Alt(gelu_erf(Var("x")), gelu_tanh(Var("x"))),
    lambda b, m: b.op("Gelu", m["x"], approximate=_approximate(m)), _check_float,
    doc="0.5*x*(1+erf(x/sqrt2)) -> Gelu; the tanh form -> Gelu(approximate='tanh') "
        "(ONNX: opset 20).")

# -- parallel projections (QKV) ------------------------------------------------------------------


@dataclass
class _Proj:
    node: CNode        # the Linear or MatMul
    add: CNode | None  # the bias Add after a MatMul
    x: object
    w: object
    b: object
    layout: str
    n_out: int
    out: object        # the value the projection ends with

    @property
    def kind(self) -> tuple:
        return (self.node.op, self.layout, self.b is not None)

    @property
    def nodes(self) -> tuple:
        return (self.node,) + ((self.add,) if self.add is not None else ())


def _bias_add(host, value, n_out: int):
    """The Add of a bias constant right after ``value`` (its only reader), and the bias."""
    users = host.consumers(value)
    if len(users) != 1 or users[0] is None or users[0].op != "Add" or \
            host.is_graph_output(value):
        return None, None
    add = users[0]
    other = add.inputs[1] if host.same(add.inputs[0], value) else add.inputs[0]
    c = host.const(other)
    rank = host.shape(value)
    if c is None or rank is None or _math.bias_vector(c, n_out, len(rank)) is None:
        return None, None
    return add, other


def _projection(host, c: CNode) -> _Proj | None:
    """``c`` as a projection x @ W (+ b) with a constant 2-D W, or None."""
    if c.op not in ("Linear", "MatMul") or len(c.inputs) < 2:
        return None
    w = host.const(c.inputs[1])
    if w is None or w.ndim != 2:
        return None
    if c.op == "Linear":
        b = c.inputs[2] if len(c.inputs) > 2 else None
        if b is not None and host.const(b) is None:
            return None
        layout = c.attrs["layout"]
        return _Proj(c, None, c.inputs[0], c.inputs[1], b, layout, _out_features(w, layout),
                     c.outputs[0])
    n = int(w.shape[1])
    add, b = _bias_add(host, c.outputs[0], n)
    return _Proj(c, add, c.inputs[0], c.inputs[1], b, "in_out", n,
                 add.outputs[0] if add is not None else c.outputs[0])


def _merge_pattern(host, node: CNode):
    me = _projection(host, node)
    if me is None:
        return None
    group: list[_Proj] = []
    for c in host.consumers(me.x):
        p = _projection(host, c) if c is not None else None
        if p is not None and host.same(p.x, me.x) and p.kind == me.kind \
                and host.dtype(p.w) == host.dtype(me.w) \
                and not any(q.node is p.node for q in group):
            group.append(p)
    if len(group) < 2:
        return (f"{node.op} {node.name} is the only {me.node.op} projection of "
                f"{host.describe(me.x)} with {'a' if me.b is not None else 'no'} bias")
    nodes = tuple(n for p in group for n in p.nodes)
    return Match(host, node, {"x": me.x, "projections": group}, nodes)


def _bias_of(host, p: _Proj) -> np.ndarray:
    return _math.bias_vector(host.const(p.b), p.n_out, host.const(p.b).ndim)


def _replace_merge(b, m: Match):
    host, group = m.host, m["projections"]
    first = group[0]
    axis = 0 if first.layout == "out_in" else 1
    w = np.concatenate([host.const(p.w) for p in group], axis=axis)
    bias = (b.const(np.concatenate([_bias_of(host, p) for p in group]), "merged_bias")
            if first.b is not None else None)
    if first.node.op == "Linear":
        y = b.op("Linear", m["x"], b.const(w, "merged_weight"), bias, layout=first.layout)
    else:
        y = b.op("MatMul", m["x"], b.const(w, "merged_weight"))
        if bias is not None:
            y = b.op("Add", y, bias)
    parts = b.op("Split", y, axis=-1, sizes=[p.n_out for p in group], outputs=len(group))
    return [(p.out, part) for p, part in zip(group, parts)]


merge_qkv = Rule(
    "merge_qkv", _merge_pattern, _replace_merge,
    doc="Parallel projections of one input (q/k/v, gate/up) -> one projection with the "
        "weights concatenated, then Split.")


def _split_pattern(host, node: CNode):
    if node.op != "Split":
        return None
    if node.attrs["axis"] != -1:
        return f"splits axis {node.attrs['axis']}, not the feature (last) axis"
    src = node.inputs[0]
    reshape = None
    p = host.producer(src)
    if p is not None and p.op == "Reshape":
        before, after = host.shape(p.inputs[0]), host.shape(src)
        if before is None or after is None or before[-1] != after[-1] or \
                not all(isinstance(d, int) for d in after) or len(host.users(src)) != 1:
            return "the Reshape before the Split changes the feature axis or is not static"
        reshape, src = p, p.inputs[0]
        p = host.producer(src)
    if p is not None and p.op == "Add":
        mm = next((host.producer(i) for i in p.inputs if host.producer(i) is not None
                   and host.producer(i).op == "MatMul"), None)
        proj = _projection(host, mm) if mm is not None else None
        if proj is None or proj.add is not p:
            return "the split value is an Add, not a projection's bias add"
    else:
        proj = _projection(host, p) if p is not None else None
    if proj is None:
        return "the split value is not a projection with a constant 2-D weight"
    if len(host.users(proj.out)) != 1 or host.is_graph_output(proj.out):
        return "the projection's output is also read elsewhere"
    if sum(node.attrs["sizes"]) != proj.n_out:
        return f"split sizes {node.attrs['sizes']} do not add up to {proj.n_out} features"
    nodes = proj.nodes + ((reshape,) if reshape is not None else ()) + (node,)
    return Match(host, node, {"x": proj.x, "proj": proj, "reshape": reshape, "split": node},
                 nodes)


def _replace_split(b, m: Match):
    host, proj, split, reshape = m.host, m["proj"], m["split"], m["reshape"]
    w = host.const(proj.w)
    bias = _bias_of(host, proj) if proj.b is not None else None
    out, lo = [], 0
    for value, size in zip(split.outputs, split.attrs["sizes"]):
        hi = lo + size
        wi = w[lo:hi] if proj.layout == "out_in" else w[:, lo:hi]
        bi = b.const(bias[lo:hi], "bias_part") if bias is not None else None
        if proj.node.op == "Linear":
            y = b.op("Linear", proj.x, b.const(wi, "weight_part"), bi, layout=proj.layout)
        else:
            y = b.op("MatMul", proj.x, b.const(wi, "weight_part"))
            if bi is not None:
                y = b.op("Add", y, bi)
        if reshape is not None:
            shape = tuple(host.shape(reshape.outputs[0])[:-1]) + (size,)
            y = b.op("Reshape", y, shape=shape, target=None, allowzero=0)
        if value is not None:
            out.append((value, y))
        lo = hi
    return out


split_qkv = Rule(
    "split_qkv", _split_pattern, _replace_split,
    doc="One projection followed by a Split of its features -> one projection per part "
        "(the reverse of merge_qkv).")

# -- attention -----------------------------------------------------------------------------


def _attention_pattern():
    q, kt, v = Var("q"), Var("kT"), Var("v")
    qs = Op("Mul", q, Const("cq"), name="q_scale") | q
    ks = Op("Mul", kt, Const("ck"), name="k_scale") | kt
    scores = Op("MatMul", qs, ks, name="qk")
    scaled = (Op("Mul", scores, Const("cs"), name="s_scale")
              | Op("Div", scores, Const("ds"), name="s_div") | scores)
    masked = Op("Add", scaled, Var("mask"), name="mask_add") | scaled
    p = Op("Softmax", masked, name="softmax")
    safe = Op("Where", Op("IsNaN", p), Const(value=0.0), p, name="safe") | p
    return Op("MatMul", safe, v, name="pv")


def _check_attention(m: Match) -> str | None:
    if m["softmax"].attrs.get("axis") != -1:
        return f"softmax over axis {m['softmax'].attrs.get('axis')}, not the keys (last) axis"
    ranks = [m.rank(n) for n in ("q", "kT", "v")]
    if None in ranks or len(set(ranks)) != 1 or ranks[0] < 3:
        return f"q, k^T, v ranks {ranks}: need equal ranks >= 3 ([..., seq, dim])"
    qs, ks, vs = m.shape("q"), m.shape("kT"), m.shape("v")
    for dims in zip(qs[:-2], ks[:-2], vs[:-2]):
        # a fused attention op does not broadcast batch dims; symbolic ones (ONNX shape
        # inference leaves some) are taken as equal: if they differ, the fused op raises
        static = {d for d in dims if isinstance(d, int)}
        if len(static) > 1:
            return f"q, k^T, v batch dims differ: {qs[:-2]}, {ks[:-2]}, {vs[:-2]}"
    if qs[-1] != ks[-2] and isinstance(qs[-1], int) and isinstance(ks[-2], int):
        return f"q's head size {qs[-1]} is not k's {ks[-2]}"
    for name in ("cq", "ck", "cs", "ds"):
        if name in m and m.scalar(name) is None:
            return f"the scale {name} is not a scalar constant"
    if "ds" in m and m.scalar("ds") == 0:
        return "the scores are divided by zero"
    if "mask" in m:
        dt = m.host.dtype(m["mask"])
        if dt is not None and not np.issubdtype(dt, np.floating):
            return f"the mask is {dt}; only an additive (floating-point) mask fuses"
        if m.rank("mask") is None or m.rank("mask") > ranks[0]:
            return "the mask's rank is unknown or larger than the scores'"
    return None


def _scale(m: Match) -> float:
    s = 1.0
    for name in ("cq", "ck", "cs"):
        if name in m:
            s *= m.scalar(name)
    if "ds" in m:
        s /= m.scalar("ds")
    return s


def _swap_last(rank: int) -> tuple[int, ...]:
    return tuple(range(rank - 2)) + (rank - 1, rank - 2)


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def _check_attention_standard(m: Match) -> str | None:
    reason = _check_attention(m)
    if reason:
        return reason
    rank = m.rank("q")
    if rank > 4:
        return f"attention over {rank}-D q/k/v; the fused ops take [batch, heads, seq, dim]"
    if rank == 3 and not all(_static(m.shape(n)) for n in ("q", "kT", "v")):
        return "3-D (per-head) attention needs static shapes to gain a heads axis"
    if rank == 3 and "mask" in m and not _static(m.shape("mask")):
        return "the mask of a 3-D attention needs a static shape"
    return None


def _heads_axis(b, value, shape):
    """``value`` [B', L, E] as [B', 1, L, E]: ONNX Attention reads 3-D inputs as [batch,
    seq, hidden] and TVM imports 4-D (or 2-D) scaled_dot_product_attention only."""
    full = (1,) * (3 - len(shape)) + tuple(shape)
    return b.op("Reshape", value, shape=(full[0], 1) + full[1:], target=None, allowzero=0)


def _replace_attention(b, m: Match):
    rank = m.rank("q")
    q, kt, v = m["q"], m["kT"], m["v"]
    mask = m.get("mask")
    if rank == 3:
        q, kt, v = (_heads_axis(b, m[n], m.shape(n)) for n in ("q", "kT", "v"))
        if mask is not None and m.rank("mask") < 4:
            mask = _heads_axis(b, mask, m.shape("mask"))
    k = b.op("Transpose", kt, perm=_swap_last(4 if rank == 3 else rank))
    ins = [q, k, v] + ([mask] if mask is not None else [])
    out = b.op("Attention", *ins, scale=_scale(m))
    if rank == 3:
        qs, vs = m.shape("q"), m.shape("v")
        out = b.op("Reshape", out, shape=(qs[0], qs[1], vs[2]), target=None, allowzero=0)
    return out


attention = Rule(
    "attention", _attention_pattern(), _replace_attention, _check_attention_standard,
    doc="softmax(q k^T * scale + mask) v -> one attention op (FX: "
        "aten.scaled_dot_product_attention; ONNX: opset-23 Attention).")

# -- onnxruntime contrib ops -----------------------------------------------------------------


def _check_attention_ort(m: Match) -> str | None:
    reason = _check_attention(m)
    if reason:
        return reason
    rank = m.rank("q")
    if rank not in (3, 4):
        return f"MultiHeadAttention takes 3-D or 4-D q/k/v, not {rank}-D"
    qs, ks, vs = m.shape("q"), m.shape("kT"), m.shape("v")
    if not all(isinstance(d, int) for d in (qs[-1], vs[-1]) + ((qs[1],) if rank == 4 else ())):
        return "heads and head sizes must be static"
    if "mask" in m:
        ms = m.shape("mask")
        if len(ms) < 2 or tuple(ms[-2:]) != (qs[-2], ks[-1]):
            return (f"MultiHeadAttention's attention_bias must hold [q_len, kv_len] = "
                    f"{(qs[-2], ks[-1])} in its last dims; the mask is {ms}")
        if not all(isinstance(d, int) for d in ms):
            return "the mask's shape is not static"
    safe = "safe" in m or m["softmax"].attrs.get("safe")
    if safe and "mask" in m:
        c = m.const("mask")
        if c is None:
            return ("the source zeroes fully masked rows (safe softmax) and the mask is computed;"
                    " MultiHeadAttention gives NaN there")
        if np.all(np.isneginf(c), axis=-1).any():
            return ("the constant mask masks a whole row; the source gives 0 there and "
                    "MultiHeadAttention NaN")
    return None


def _replace_attention_ort(b, m: Match):
    q, kt, v = m["q"], m["kT"], m["v"]
    qs, vs = m.shape("q"), m.shape("v")
    mask = m.get("mask")
    if m.rank("q") == 3:  # [batch*heads, seq, dim]: one head per batch entry
        heads = 1
        q3, v3 = q, v
        k3 = b.op("Transpose", kt, perm=(0, 2, 1))
    else:
        heads, e, ev = qs[1], qs[3], vs[3]
        q3 = b.op("Reshape", b.op("Transpose", q, perm=(0, 2, 1, 3)), shape=None,
                  target=(0, 0, heads * e), allowzero=0)
        k3 = b.op("Reshape", b.op("Transpose", kt, perm=(0, 3, 1, 2)), shape=None,
                  target=(0, 0, heads * e), allowzero=0)
        v3 = b.op("Reshape", b.op("Transpose", v, perm=(0, 2, 1, 3)), shape=None,
                  target=(0, 0, heads * ev), allowzero=0)
    if mask is not None and m.rank("mask") != 4:
        ms = tuple(m.shape("mask"))
        full = (1,) * (4 - len(ms)) + ms if m.rank("q") == 4 else (ms[0], 1) + ms[1:] \
            if len(ms) == 3 else (1, 1) + ms
        mask = b.op("Reshape", mask, shape=full, target=None, allowzero=0)
    out = b.op("com.microsoft.MultiHeadAttention", q3, k3, v3, None, None, mask,
               num_heads=int(heads), scale=float(_scale(m)))
    if m.rank("q") == 3:
        return out
    return b.op("Transpose", b.op("Reshape", out, shape=None, target=(0, 0, heads, vs[3]),
                                  allowzero=0), perm=(0, 2, 1, 3))


attention_ort = Rule(
    "attention_ort", _attention_pattern(), _replace_attention_ort, _check_attention_ort,
    doc="softmax(q k^T * scale + mask) v -> com.microsoft.MultiHeadAttention (onnxruntime).")


def _skip_ln_pattern():
    res_bias = Op("Add", Op("Add", Var("h"), Const("bias"), name="bias_add"), Var("skip"),
                  name="res")
    res = Op("Add", Var("h"), Var("skip"), name="res")
    ln = "LayerNormalization"
    return Alt(Op(ln, res_bias, Var("gamma"), Var("beta"), name="ln"),
               Op(ln, res, Var("gamma"), Var("beta"), name="ln"),
               Op(ln, res_bias, Var("gamma"), name="ln"),
               Op(ln, res, Var("gamma"), name="ln"))


def _check_skip_ln(m: Match) -> str | None:
    if m["ln"].attrs.get("axis") != -1:
        return f"LayerNorm over axis {m['ln'].attrs.get('axis')}; SkipLayerNorm normalises -1"
    hs, ss = m.shape("h"), m.shape("skip")
    # dims shape inference left symbolic are taken as equal: if they differ, onnxruntime raises
    if hs is None or ss is None or len(hs) != 3 or len(ss) != 3 or \
            not isinstance(hs[-1], int) or any(isinstance(a, int) and isinstance(b, int)
                                                and a != b for a, b in zip(hs, ss)):
        return (f"SkipLayerNormalization adds two [batch, seq, hidden] tensors of one shape; "
                f"here {hs} and {ss}")
    for name in ("gamma", "beta", "bias"):
        if name in m and tuple(m.shape(name) or ()) != (hs[-1],):
            return f"{name} has shape {m.shape(name)}, not ({hs[-1]},)"
    dt = m.host.dtype(m["h"])
    if dt is not None and dt != np.float32 and dt != np.float16:
        return f"the input is {dt}; SkipLayerNormalization takes float32/float16"
    return None


def _replace_skip_ln(b, m: Match):
    need_sum = m.used_outside(m["res"])
    hidden = m.shape("h")[-1]
    dt = m.host.dtype(m["h"]) or np.dtype(np.float32)
    # beta and bias are optional in onnxruntime; zeros where the source has none (adding 0 is
    # exact) keep the op readable by importers that require them (TVM's ONNX frontend)
    zeros = [m[n] if n in m else b.const(np.zeros(hidden, dt), f"zero_{n}")
             for n in ("beta", "bias")]
    outs = b.op("com.microsoft.SkipLayerNormalization", m["h"], m["skip"], m["gamma"], *zeros,
                outputs=4 if need_sum else 1, epsilon=float(m["ln"].attrs["epsilon"]))
    if not need_sum:
        return outs
    return [(m["ln"].outputs[0], outs[0]), (m["res"].outputs[0], outs[3])]


skip_layer_norm = Rule(
    "skip_layer_norm", _skip_ln_pattern(), _replace_skip_ln, _check_skip_ln,
    doc="LayerNorm(h (+ bias) + skip) -> com.microsoft.SkipLayerNormalization (onnxruntime); "
        "the sum stays available to later residuals.")


def _bias_gelu_pattern():
    xb = Op("Add", Var("x"), Const("bias"), name="bias_add")
    return Alt(Op("Gelu", xb, name="gelu"), gelu_erf(xb), gelu_tanh(xb))


def _check_bias_gelu(m: Match) -> str | None:
    reason = _check_float(m)
    if reason:
        return reason
    xs = m.shape("x")
    c = m.const("bias")
    if xs is None or not isinstance(xs[-1], int) or \
            _math.bias_vector(c, xs[-1], len(xs)) is None or tuple(m.shape(m["bias_add"]
                                                                          .outputs[0])) != xs:
        return f"the added constant {tuple(c.shape)} is not a bias over the last axis of {xs}"
    return None


def _replace_bias_gelu(b, m: Match):
    c = m.const("bias")
    bias = m["bias"] if c.ndim == 1 else b.const(c.reshape(-1), "bias")
    op = "FastGelu" if _approximate(m) == "tanh" else "BiasGelu"
    return b.op(f"com.microsoft.{op}", m["x"], bias)


bias_gelu = Rule(
    "bias_gelu", _bias_gelu_pattern(), _replace_bias_gelu, _check_bias_gelu,
    doc="GELU(x + bias) -> com.microsoft.BiasGelu (erf) / FastGelu with bias (tanh).")


def _replace_gelu_ort(b, m: Match):
    op = "FastGelu" if _approximate(m) == "tanh" else "Gelu"
    return b.op(f"com.microsoft.{op}", m["x"])


gelu_ort = Rule(
    "gelu_ort", Alt(gelu_erf(Var("x")), gelu_tanh(Var("x"))), _replace_gelu_ort, _check_float,
    doc="The erf / tanh GELU decompositions -> com.microsoft.Gelu / FastGelu (any opset).")

# -- rule sets ----------------------------------------------------------------------------------

DEFAULT = RuleSet([cancel_transpose, cancel_reshape, collapse_layout, fold_batchnorm,
                   layer_norm, gelu, merge_qkv, attention, matmul_add])
ONNXRUNTIME = RuleSet([skip_layer_norm, bias_gelu, gelu_ort, attention_ort])
ORT = ONNXRUNTIME + DEFAULT
SPLIT_QKV = RuleSet([split_qkv])
CATALOGUE = {r.name: r for r in (*DEFAULT, *ONNXRUNTIME, *SPLIT_QKV)}

__all__ = ["CATALOGUE", "DEFAULT", "ONNXRUNTIME", "ORT", "SPLIT_QKV", "attention",
           "attention_ort", "bias_gelu", "cancel_reshape", "cancel_transpose", "collapse_layout",
           "fold_batchnorm", "gelu", "gelu_erf", "gelu_ort", "gelu_tanh", "layer_norm",
           "matmul_add", "merge_qkv", "skip_layer_norm", "split_qkv"]
