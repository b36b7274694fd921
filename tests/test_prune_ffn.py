"""ffn_blocks() and prune_ffn against their correctness oracle, on every zoo architecture with a
feed-forward block and every backend it exports to.

Oracle (issue 18): removing intermediate neuron j gives the same outputs as keeping it with row
j of the first projection(s) (gate and up in the gated form) and its bias zeroed and column j of
the second projection zeroed: the neuron then adds exactly nothing. The reference is built on
the same backend as the pruned model, so the comparison is float rounding only (1e-5).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import zlib

import numpy as np
import onnx
import pytest
import torch
from test_prune_heads import _max_err, _perturbed, _snapshot, graph_of
from zoo import TS_EXPORTABLE, ZOO

import slimc
from slimc import passes
from slimc.errors import OptionError, ShapeError, SlimcError, UnsupportedError
from slimc.passes.prune_ffn import prune_ffn

TOL = 1e-5

# (blocks, hidden, intermediate, form) of every zoo model
EXPECTED = {
    "mha": (0, 64, 0, None),
    "encoder_layer": (1, 64, 128, "mlp"),
    "bert": (2, 64, 128, "mlp"),
    "bert_eager": (2, 64, 128, "mlp"),
    "distilbert": (2, 64, 128, "mlp"),
    "gpt2": (2, 64, 256, "mlp"),
    "gpt2_eager": (2, 64, 256, "mlp"),
    "vit": (2, 64, 128, "mlp"),
    "llama": (2, 64, 128, "gated"),
    "llama_eager": (2, 64, 128, "gated"),
}
WITH_FFN = sorted(k for k, v in EXPECTED.items() if v[0])
# every architecture x FX / ONNX dynamo / ONNX TorchScript (where torch exports it)
# (the eager-attention twins' dynamo exports have the same FFN ops as the SDPA ones: slow)
MATRIX = [(n, "fx") for n in WITH_FFN] + [
    pytest.param(n, "dynamo", marks=[pytest.mark.slow] if n.endswith("_eager") else [])
    for n in WITH_FFN] + [(n, "torchscript") for n in WITH_FFN if n in TS_EXPORTABLE]


def _zero(g, lin, index, rows: bool, bias: bool) -> None:
    w = g.get_weight(lin.weight).copy()
    axis = (0 if lin.layout == "out_in" else 1) if rows else (1 if lin.layout == "out_in" else 0)
    sl = [slice(None), slice(None)]
    sl[axis] = index
    w[tuple(sl)] = 0
    g.set_weight(lin.weight, w)
    if bias and lin.bias:
        b = g.get_weight(lin.bias).copy()
        b[..., index] = 0
        g.set_weight(lin.bias, b)


def zeroed(g: slimc.Graph, neurons: dict) -> slimc.Graph:
    """The oracle: the removed neurons' up (and gate) rows and biases and down columns zeroed.
    (A weight an exporter shares between layers is zeroed for all of them: the zoo models are
    perturbed so that none is shared.)"""
    z = g.copy()
    for b in g.ffn_blocks():
        gone = sorted(set(neurons.get(b.layer, [])))
        if not gone:
            continue
        for lin in b.inputs:
            _zero(z, lin, gone, rows=True, bias=True)
        _zero(z, b.down, gone, rows=False, bias=False)
    return z


def neuron_sets(g: slimc.Graph, seed: int) -> list[dict]:
    """Random neuron sets: a few per layer, and all but one neuron of the last layer."""
    rng = np.random.default_rng(seed)
    blocks = g.ffn_blocks()
    sets = []
    for mode in ("random", "all_but_one"):
        neurons = {}
        for b in blocks:
            if mode == "all_but_one" and b.layer == len(blocks) - 1:
                keep = int(rng.integers(b.intermediate))
                neurons[b.layer] = [j for j in range(b.intermediate) if j != keep]
            else:
                n = int(rng.integers(1, b.intermediate // 2))
                neurons[b.layer] = sorted(int(j) for j in rng.choice(b.intermediate, n,
                                                                      replace=False))
        sets.append(neurons)
    return sets


def _shapes(g: slimc.Graph, b) -> dict:
    return {lin.weight: g.get_weight(lin.weight).shape for lin in (*b.inputs, b.down)}


def _check_oracle(g: slimc.Graph, neurons: dict, inputs=None) -> slimc.Graph:
    res = prune_ffn.run(g, neurons=neurons)
    p = res.graph
    inputs = inputs if inputs is not None else g.sample_inputs()
    ref = zeroed(g, neurons)
    want, got = ref.run(*inputs), p.run(*inputs)
    assert [w.shape for w in want] == [x.shape for x in got]
    assert _max_err(want, got) <= TOL, neurons
    assert _max_err(g.run(*inputs), want) > 1e-4  # the oracle really differs from the model
    before, after = g.ffn_blocks(), p.ffn_blocks()
    assert [b.layer for b in after] == [b.layer for b in before]
    expected = 0
    for b, a in zip(before, after):
        n = len(set(neurons.get(b.layer, [])))
        assert a.intermediate == b.intermediate - n and a.hidden == b.hidden and a.form == b.form
        old, new = _shapes(g, b), _shapes(p, a)
        for lin in a.inputs:  # the weights really shrink: rows of up/gate, columns of down
            assert new[lin.weight][0 if lin.layout == "out_in" else 1] == a.intermediate
        assert new[a.down.weight][1 if a.down.layout == "out_in" else 0] == a.intermediate
        assert sum(int(np.prod(s)) for s in new.values()) == \
            sum(int(np.prod(s)) for s in old.values()) - n * (
                sum(lin.in_features for lin in b.inputs) + b.down.out_features)
        expected += n * (sum(lin.in_features + (1 if lin.bias else 0) for lin in b.inputs)
                         + b.down.out_features)
    assert g.num_parameters() - p.num_parameters() == expected
    assert res.stats["removed_parameters"] == expected
    assert res.stats["params_before"] - res.stats["params_after"] == expected
    assert res.stats["removed"] == {k: sorted(set(v)) for k, v in neurons.items() if v}
    return p


# -- discovery --------------------------------------------------------------------------------

@pytest.mark.parametrize("name,backend", [(n, "fx") for n in sorted(ZOO)] + [
    (n, "dynamo") for n in ("mha", "gpt2", "llama", "vit")] + [
    (n, "torchscript") for n in ("mha", "bert", "distilbert")])
def test_ffn_blocks_found(name, backend):
    count, hidden, inter, form = EXPECTED[name]
    blocks = graph_of(name, backend).ffn_blocks()
    assert len(blocks) == count
    assert [b.layer for b in blocks] == list(range(count))
    for b in blocks:
        assert (b.hidden, b.intermediate, b.form) == (hidden, inter, form)
        assert (b.gate is not None) == (form == "gated")
        assert b.down.in_features == inter and b.down.out_features == hidden
    if name.startswith("llama"):
        assert {b.activation for b in blocks} == {"silu"}
    if name.startswith("gpt2"):
        assert {b.activation for b in blocks} == {"gelu_tanh"}
        assert {b.up.layout for b in blocks} == {"in_out"}  # Conv1D: [in, out]


def test_no_ffn_in_attention_only_or_stacked_linears():
    lin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8))  # no activation
    assert slimc.capture(lin, (torch.randn(2, 8),)).ffn_blocks() == []
    # the hidden value also leaves the block: removing a neuron would change that output too
    class Leak(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h), h.sum(-1)
    assert slimc.capture(Leak(), (torch.randn(2, 8),)).ffn_blocks() == []


# -- the oracle on every architecture and backend ---------------------------------------------

@pytest.mark.parametrize("name,backend", MATRIX)
def test_oracle(name, backend):
    g = graph_of(name, backend)
    for neurons in neuron_sets(g, seed=zlib.crc32(f"{name}/{backend}".encode())):
        _check_oracle(g, neurons)


def test_dynamic_axes_onnx_bert():
    """Batch and sequence symbolic: right at the export size and at another one, still
    dynamic."""
    m, x = _perturbed("bert")
    b, s = torch.export.Dim("b", max=64), torch.export.Dim("s", max=64)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        model = torch.onnx.export(m, x, dynamo=True, dynamic_shapes=(({0: b, 1: s},),)
                                  ).model_proto
    g = slimc.Graph("onnx", model)
    neurons = {0: [0, 7, 100], 1: list(range(0, 128, 3))}
    p = prune_ffn(g, neurons=neurons)
    ref = zeroed(g, neurons)
    for inputs in (g.sample_inputs(), g.sample_inputs(seed=1, dims={"b": 2, "s": 5})):
        assert _max_err(ref.run(*inputs), p.run(*inputs)) <= TOL
    dims = [d.dim_param or d.dim_value for d in p.onnx.graph.input[0].type.tensor_type.shape.dim]
    assert "s" in dims


@pytest.mark.parametrize("level,op", [(0, "BiasGelu"), (None, "Gelu")])
def test_onnxruntime_optimizer_forms(level, op):
    """onnxruntime's transformer optimizer on the TorchScript export: at opt_level 0 it fuses
    the bias add into com.microsoft::BiasGelu (the bias is an input of the activation op, sliced
    with it); by default MatMul + Add become a 2-D Gemm between Reshapes around
    com.microsoft::Gelu, with no shapes recorded for them."""
    from onnxruntime.transformers.optimizer import optimize_model
    g = graph_of("bert", "torchscript")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bert.onnx")
        onnx.save(g.onnx, path)
        with contextlib.redirect_stdout(io.StringIO()):
            model = optimize_model(path, model_type="bert", num_heads=4, hidden_size=64,
                                   **({} if level is None else {"opt_level": level})).model
    if "com.microsoft" not in {o.domain for o in model.opset_import}:  # the optimizer omits it
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    opt = slimc.Graph("onnx", model, example_inputs=g.example_inputs)
    assert opt.op_histogram()[f"com.microsoft::{op}"] == 2
    blocks = opt.ffn_blocks()
    assert [(b.intermediate, b.activation) for b in blocks] == [(128, "gelu")] * 2
    neurons = {0: [3, 4, 50], 1: [0, 127]}
    p = prune_ffn(opt, neurons=neurons)
    x = opt.sample_inputs()
    # BiasGelu's bias input is not a projection's bias: the oracle zeroes it too
    z = zeroed(opt, neurons)
    nodes = {n.name: n for n in z.onnx.graph.node}
    for b in blocks:
        gelu = [nodes[k] for k in b.nodes["inner"] if nodes[k].op_type == "BiasGelu"]
        if op == "Gelu":  # the bias is Gemm's C, a projection bias the oracle zeroes already
            assert not gelu and b.up.bias is not None
            continue
        assert len(gelu) == 1 and b.up.bias is None
        bias = z.get_weight(gelu[0].input[1]).copy()
        bias[neurons[b.layer]] = 0
        z.set_weight(gelu[0].input[1], bias)
    assert _max_err(p.run(*x), z.run(*x)) <= TOL
    assert [b.intermediate for b in p.ffn_blocks()] == [125, 126]


def test_pruned_fx_graph_reexports():
    """meta["val"] is refreshed: the pruned GPT-2 (Conv1D reshapes rewritten) exports to ONNX
    again and computes the same."""
    g = graph_of("gpt2", "fx")
    p = prune_ffn(g, neurons={0: [1, 2, 3], 1: list(range(100))})
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        model = p.to_onnx()
    out = slimc.Graph("onnx", model).run(*g.example_inputs)
    assert _max_err(p.run(), out) <= TOL


def test_native_objects_in_native_objects_out():
    g = graph_of("llama", "fx")
    gm = prune_ffn(g.fx, neurons={0: [1]})
    assert isinstance(gm, torch.fx.GraphModule)
    o = graph_of("distilbert", "torchscript")
    model = prune_ffn(o.onnx, neurons={0: [1]})
    assert isinstance(model, onnx.ModelProto)
    onnx.checker.check_model(model)


# -- identity, ratio, scores, rounding --------------------------------------------------------

@pytest.mark.parametrize("backend", ["fx", "dynamo"])
def test_nothing_removed_is_identity(backend):
    g = graph_of("bert", backend)
    for opts in ({"neurons": {}}, {"ratio": 0}, {"neurons": {0: []}}, {"neurons": {}, "ratio": 0}):
        res = prune_ffn.run(g, **opts)
        assert not res.modified and res.stats["changed"] == 0
        np.testing.assert_array_equal(res.graph.run()[0], g.run()[0])
        assert res.graph.num_parameters() == g.num_parameters()


def test_ratio_removes_lowest_magnitude_per_layer():
    g = graph_of("llama", "fx")
    res = prune_ffn.run(g, ratio=0.25)
    s = res.stats
    assert s["neurons_after"] == {0: 96, 1: 96} and s["matched"] == s["changed"] == 2
    for b in g.ffn_blocks():
        gate, up = (g.get_weight(lin.weight) for lin in (b.gate, b.up))
        down = g.get_weight(b.down.weight)
        score = (np.linalg.norm(gate, axis=1) * np.linalg.norm(up, axis=1)
                 * np.linalg.norm(down, axis=0))
        np.testing.assert_allclose(s["scores"][b.layer], score, rtol=1e-5)
        assert s["removed"][b.layer] == sorted(np.argsort(score, kind="stable")[:32].tolist())
    _check_oracle(g, s["removed"])


def test_global_scope_one_threshold():
    g = graph_of("bert", "fx")
    # make layer 1's neurons small: a global threshold takes most of them from there
    w = g.get_weight(g.ffn_blocks()[1].down.weight)
    g.set_weight(g.ffn_blocks()[1].down.weight, w * 0.01)
    s = prune_ffn.run(g, ratio=0.5, scope="global").stats
    assert sum(len(v) for v in s["removed"].values()) == 128
    assert len(s["removed"][1]) == 127  # every neuron of layer 1 but one (it must keep one)
    kept0 = [x for j, x in enumerate(s["scores"][0]) if j not in s["removed"][0]]
    assert max(s["scores"][0][j] for j in s["removed"][0]) <= min(kept0)
    s = prune_ffn.run(g, ratio=0.3, scope="global").stats  # one threshold over all neurons
    flat = sorted(x for layer in s["scores"].values() for x in layer)
    for layer, gone in s["removed"].items():
        assert all(s["scores"][layer][j] <= flat[int(0.3 * 256) - 1] for j in gone)


def test_round_to_keeps_a_multiple():
    g = graph_of("gpt2", "dynamo")
    p = prune_ffn(g, ratio=0.3, round_to=16)  # 256 - 76 = 180 -> 192
    assert [b.intermediate for b in p.ffn_blocks()] == [192, 192]
    p = prune_ffn(g, ratio=0.99, round_to=16)  # at least one multiple stays
    assert [b.intermediate for b in p.ffn_blocks()] == [16, 16]
    x = g.sample_inputs()
    assert all(np.isfinite(y).all() for y in p.run(*x))


# -- calibration scores against the torch model's own activations ---------------------------

# the down-projection modules of the zoo models, in layer order, and their weight as (out, in)
DOWN = {
    "bert": (lambda m: [lay.output.dense for lay in m.model.encoder.layer], lambda w: w),
    "gpt2": (lambda m: [blk.mlp.c_proj for blk in m.model.h], lambda w: w.T),  # Conv1D [in, out]
    "llama": (lambda m: [lay.mlp.down_proj for lay in m.model.layers], lambda w: w),
}


def _calib(g, n=3, seed=0) -> list:
    rng = np.random.default_rng(seed)
    return [tuple(rng.integers(0, 100, x.shape).astype(x.dtype) for x in g.example_inputs)
            for _ in range(n)]


def _taylor_loss(outs, i):
    return sum((o.double() ** 2).mean() for o in outs)


def _direct_scores(name: str, score: str, calib: list) -> dict:
    """The scores computed on the (perturbed) torch model itself, the neurons' activations a
    captured by a forward pre-hook on each down-projection module (for taylor with a.grad
    retained): mean |a|, ‖a‖₂ · Σ|down column|, mean over batches of |Σ_t a · ∂L/∂a|."""
    m, _ = _perturbed(name)
    modules, as_out_in = DOWN[name]
    seen: dict = {}

    def hook(layer):
        def record(mod, args):
            a = args[0]
            if score == "taylor":
                a.retain_grad()
            seen[layer] = a
        return record

    handles = [mod.register_forward_pre_hook(hook(i)) for i, mod in enumerate(modules(m))]
    acc: dict = {}
    tokens = 0
    for batch in calib:
        x = [torch.from_numpy(v) for v in batch]
        if score == "taylor":
            m.zero_grad()
            _taylor_loss([m(*x)], 0).backward()
        else:
            with torch.no_grad():
                m(*x)
        for layer, a in seen.items():
            width = a.shape[-1]
            flat = a.detach().reshape(-1, width).double()
            if score == "taylor":
                val = (flat * a.grad.reshape(-1, width).double()).sum(0).abs()
            elif score == "activation":
                val = flat.abs().sum(0)
            else:
                val = (flat ** 2).sum(0)
            acc[layer] = acc.get(layer, 0) + val
        tokens += flat.shape[0]
    for h in handles:
        h.remove()
    out = {}
    for layer, mod in enumerate(modules(m)):
        if score == "taylor":
            out[layer] = (acc[layer] / len(calib)).numpy()
        elif score == "activation":
            out[layer] = (acc[layer] / tokens).numpy()
        else:
            w = as_out_in(mod.weight.detach().double())
            out[layer] = (w.abs().sum(0) * acc[layer].sqrt()).numpy()
    return out


def _lowest(s, k: int) -> list:
    return sorted(np.lexsort((np.arange(len(s)), np.asarray(s)))[:k].tolist())


# each score on FX and (but taylor) ONNX, over Linear, Conv1D and gated blocks; the rest of the
# grid (same code paths, other forms) is marked slow
_SLOW = [pytest.mark.slow]
SCORE_CASES = [
    ("activation", "gpt2", "dynamo"), ("activation", "llama", "fx"),
    ("wanda", "bert", "dynamo"), ("wanda", "llama", "fx"), ("taylor", "llama", "fx"),
    pytest.param("activation", "bert", "fx", marks=_SLOW),
    pytest.param("activation", "llama", "dynamo", marks=_SLOW),
    pytest.param("wanda", "gpt2", "fx", marks=_SLOW),
    pytest.param("wanda", "llama", "dynamo", marks=_SLOW),
    pytest.param("taylor", "bert", "fx", marks=_SLOW),
    pytest.param("taylor", "gpt2", "fx", marks=_SLOW),
]


@pytest.mark.parametrize("score,name,backend", SCORE_CASES)
def test_calibration_score_equals_torch_hooks(score, name, backend):
    """Each score, and so the neurons ratio= removes, equals the computation on the torch model
    (Linear / GPT-2 Conv1D / gated SwiGLU; FX and onnxruntime on the dynamo export)."""
    g = graph_of(name, backend)
    calib = _calib(g)
    want = _direct_scores(name, score, calib)
    opts = {"loss": _taylor_loss} if score == "taylor" else {}
    res = prune_ffn.run(g, ratio=0.25, score=score, calib=calib, **opts)
    s = res.stats
    assert s["score"] == score and set(s["scores"]) == set(want)
    # taylor: the graph's gradients against eager torch's (float32 sums in another order)
    rtol = 1e-4 if score == "taylor" else 1e-5
    for layer, w in want.items():
        np.testing.assert_allclose(s["scores"][layer], w, rtol=rtol, atol=1e-9)
        assert np.ptp(w) > 0  # a real ranking, not ties
        assert s["removed"][layer] == _lowest(w, len(w) // 4)
    if score == "taylor":
        assert s["loss"] == "callable"


@pytest.mark.parametrize("score,name,backend", [
    ("activation", "gpt2", "dynamo"), ("wanda", "llama", "fx"), ("taylor", "bert", "fx")])
def test_calibration_score_pruning_keeps_the_oracle(score, name, backend):
    g = graph_of(name, backend)
    res = prune_ffn.run(g, ratio=0.3, score=score, calib=_calib(g, n=2))
    removed = res.stats["removed"]
    assert sum(map(len, removed.values())) == sum(int(0.3 * b.intermediate)
                                                    for b in g.ffn_blocks())
    x = g.sample_inputs()
    assert _max_err(zeroed(g, removed).run(*x), res.graph.run(*x)) <= TOL
    _check_oracle(g, removed)


def test_taylor_default_losses():
    """kl (sampled, seeded) and mse (Rademacher probes) give finite, distinct, repeatable
    rankings; global scope compares layers on them."""
    g = graph_of("bert", "fx")
    calib = _calib(g, n=1)
    got = {}
    for loss in ("kl", "mse"):
        s = prune_ffn.run(g, ratio=0.25, score="taylor", calib=calib, loss=loss).stats
        again = prune_ffn.run(g, ratio=0.25, score="taylor", calib=calib, loss=loss).stats
        assert s["scores"] == again["scores"] and s["loss"] == loss
        for v in s["scores"].values():
            assert np.all(np.isfinite(v)) and np.ptp(v) > 0
        got[loss] = s["scores"]
    assert got["kl"][0] != got["mse"][0]
    s = prune_ffn.run(g, ratio=0.25, score="taylor", calib=calib, scope="global").stats
    assert sum(map(len, s["removed"].values())) == 64


@pytest.mark.parametrize("backend", ["fx", "torchscript"])
def test_calibration_score_options(backend):
    g = graph_of("bert", backend)
    before = _snapshot(g)
    calib = _calib(g, n=1)
    onnx_g = backend != "fx"
    for score in ("activation", "wanda") + (() if onnx_g else ("taylor",)):
        with pytest.raises(OptionError, match=f"score='{score}' needs calibration data.*"
                           "calib="):
            prune_ffn(g, ratio=0.3, score=score)
        with pytest.raises(ShapeError):
            prune_ffn(g, ratio=0.3, score=score, calib=[(np.zeros((1, 5), dtype=np.int64),)])
        with pytest.raises(OptionError, match="calib is empty"):
            prune_ffn(g, ratio=0.3, score=score, calib=[])
    if onnx_g:  # refused before calib is even looked at, naming the scores that work
        for c in (None, calib):
            with pytest.raises(OptionError, match="taylor.*FX graphs.*'activation' / 'wanda'"):
                prune_ffn(g, ratio=0.3, score="taylor", calib=c)
    else:
        with pytest.raises(OptionError, match="Unknown loss"):
            prune_ffn(g, ratio=0.3, score="taylor", calib=calib, loss="l1")
    with pytest.raises(OptionError, match="score='wanda' does not use it"):
        prune_ffn(g, ratio=0.3, score="wanda", calib=calib, loss="mse")
    after = _snapshot(g)
    assert before[1] == after[1]
    assert all(np.array_equal(before[0][k], after[0][k]) for k in before[0])
    # nothing is scored: no calibration data needed
    assert not prune_ffn.run(g, ratio=0, score="wanda").modified
    assert prune_ffn.run(g, neurons={0: [1]}, score="activation").stats["removed"] == {0: [1]}


def test_recipe_hands_calib_to_calibration_scores():
    """Recipe.apply(calib=...) gives its batches to every pass with a calib option: a wanda step
    scores on them, a magnitude step (weights only) ignores them."""
    from slimc.recipe import Recipe
    g = graph_of("bert", "fx")
    calib = _calib(g, n=2)
    want = {"magnitude": prune_ffn.run(g, ratio=0.3).stats["removed"],
            "wanda": prune_ffn.run(g, ratio=0.3, score="wanda", calib=calib).stats["removed"]}
    assert want["magnitude"] != want["wanda"]
    for score, removed in want.items():
        r = Recipe.from_dict({"passes": [{"name": "prune_ffn", "ratio": 0.3, "score": score}]})
        out, _ = r.apply(g, calib=calib)
        p = prune_ffn(g, neurons=removed)
        x = g.sample_inputs()
        np.testing.assert_array_equal(out.run(*x)[0], p.run(*x)[0])


# -- bad input: clear errors, input untouched ------------------------------------------------

@pytest.mark.parametrize("backend", ["fx", "torchscript"])
@pytest.mark.parametrize("opts,error,match", [
    ({"neurons": {0: [128]}}, OptionError, "has 128 neurons"),
    ({"neurons": {0: [-1]}}, OptionError, "out of range"),
    ({"neurons": {7: [0]}}, OptionError, "Unknown FFN layer 7"),
    ({"neurons": {"0": [0]}}, OptionError, "Unknown FFN layer"),
    ({"neurons": {0: [0.5]}}, OptionError, "non-integer"),
    ({"neurons": [0, 1]}, OptionError, "must be a dict"),
    ({"neurons": {0: list(range(128))}}, OptionError, "every neuron"),
    ({"ratio": 1.0}, OptionError, "outside"),
    ({"ratio": -0.1}, OptionError, "outside"),
    ({"ratio": float("nan")}, OptionError, "outside"),
    ({"ratio": "0.3"}, OptionError, "must be a number"),
    ({"neurons": {0: [1]}, "ratio": 0.3}, OptionError, "not both"),
    ({}, OptionError, "needs neurons"),
    ({"ratio": 0.3, "score": "fisher"}, OptionError, "Unknown FFN neuron score"),
    ({"ratio": 0.3, "scope": "layer"}, OptionError, "Unknown scope"),
    ({"ratio": 0.3, "round_to": 0}, OptionError, "positive integer"),
    ({"neurons": {0: [1]}, "round_to": 16}, OptionError, "round_to applies to ratio"),
])
def test_bad_options(backend, opts, error, match):
    g = graph_of("bert", backend)
    before = _snapshot(g)
    with pytest.raises(error, match=match):
        prune_ffn(g, **opts)
    after = _snapshot(g)
    assert before[1] == after[1]
    assert all(np.array_equal(before[0][k], after[0][k]) for k in before[0])


@pytest.mark.parametrize("backend", ["fx", "torchscript"])
def test_model_without_ffn(backend):
    g = graph_of("mha", backend)
    for opts in ({"neurons": {0: [0]}}, {"ratio": 0.5}):
        with pytest.raises(UnsupportedError, match="matched nothing.*no feed-forward block"):
            prune_ffn(g, **opts)
    with pytest.warns(passes._no_match.NoMatchWarning):
        assert prune_ffn(g, ratio=0.5, on_no_match="warn").num_parameters() == \
            g.num_parameters()


def test_tied_fx_weight_refused():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
            self.other = torch.nn.Linear(8, 16)
            self.other.weight = self.up.weight

        def forward(self, x):
            return self.down(torch.relu(self.up(x))) + self.other(x).sum(-1, keepdim=True)
    g = slimc.capture(Tied(), (torch.randn(2, 8),))
    assert len(g.ffn_blocks()) == 1
    with pytest.raises(SlimcError, match="also read by"):
        prune_ffn(g, neurons={0: [1]})
