"""transformer_layers() and drop_layers against their correctness oracle, on every zoo
architecture with whole Transformer layers and every backend it exports to.

Oracle (issue 18): dropping layers L equals running the torch model with every layer of L
replaced by the identity on the residual stream (a forward hook makes the layer return its
input hidden state, in the form the layer returns). FX and ONNX results are both compared with
that torch model (1e-5). Block influence is checked against 1 − cos computed from the torch
model's own layer inputs and outputs.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from test_prune_heads import _export, _perturbed, _snapshot, graph_of
from zoo import TS_EXPORTABLE, ZOO

import slimc
from slimc import passes
from slimc.errors import OptionError, UnsupportedError
from slimc.passes.drop_layers import drop_layers

TOL = 1e-5

# (layers, norm) of every zoo model
EXPECTED = {
    "mha": (0, None),
    "encoder_layer": (1, "post"),
    "bert": (2, "post"),
    "bert_eager": (2, "post"),
    "distilbert": (2, "post"),
    "gpt2": (2, "pre"),
    "gpt2_eager": (2, "pre"),
    "vit": (2, "pre"),
    "llama": (2, "pre"),
    "llama_eager": (2, "pre"),
}
MULTI = sorted(k for k, v in EXPECTED.items() if v[0] > 1)
# every architecture with layers to drop x FX / ONNX dynamo / ONNX TorchScript (where torch
# exports it); the eager-attention twins' dynamo exports differ from the SDPA ones only inside
# the attention (slow)
MATRIX = [(n, "fx") for n in MULTI] + [
    pytest.param(n, "dynamo", marks=[pytest.mark.slow] if n.endswith("_eager") else [])
    for n in MULTI] + [(n, "torchscript") for n in MULTI if n in TS_EXPORTABLE]


def _layer_list(module: torch.nn.Module, count: int) -> torch.nn.ModuleList:
    """The ModuleList that holds the Transformer layers (encoder.layer, h, layers, ...)."""
    for m in module.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == count and count and \
                len({type(c) for c in m}) == 1:
            return m
    raise AssertionError("no layer list")


def _skip(module, args, kwargs, output):
    """Forward hook: the layer returns its input hidden state, in the form it returns."""
    hidden = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


def oracle(module: torch.nn.Module, count: int, dropped, inputs) -> list[np.ndarray]:
    """The torch model with the layers of ``dropped`` made the identity."""
    layers = _layer_list(module, count)
    hooks = [layers[i].register_forward_hook(_skip, with_kwargs=True) for i in dropped]
    try:
        with torch.no_grad():
            out = module(*[torch.as_tensor(np.asarray(x)) for x in inputs])
    finally:
        for h in hooks:
            h.remove()
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().numpy() for o in out]


def _max_err(a, b) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def _layer_params(module, count, dropped) -> int:
    layers = _layer_list(module, count)
    return sum(p.numel() for i in dropped for p in layers[i].parameters())


def _check_oracle(g: slimc.Graph, module, dropped: list[int]) -> slimc.Graph:
    count = len(g.transformer_layers())
    res = drop_layers.run(g, layers=dropped)
    p = res.graph
    x = g.sample_inputs()
    want, got = oracle(module, count, dropped, x), p.run(*x)
    assert [w.shape for w in want] == [y.shape for y in got]
    assert _max_err(want, got) <= TOL, dropped
    assert _max_err(g.run(*x), want) > 1e-3  # the oracle really differs from the model
    assert len({b.layer for b in p.attention_blocks()}) == count - len(dropped)
    assert len(p.ffn_blocks()) == count - len(dropped)
    assert len(p.transformer_layers()) == count - len(dropped)
    removed = _layer_params(module, count, dropped)
    assert g.num_parameters() - p.num_parameters() == removed
    s = res.stats
    assert s["removed_parameters"] == removed and s["params_before"] - s["params_after"] == removed
    assert s["dropped"] == sorted(dropped) and s["layers_after"] == count - len(dropped)
    return p


# -- discovery --------------------------------------------------------------------------------

@pytest.mark.parametrize("name,backend", [(n, "fx") for n in sorted(ZOO)] + [
    (n, "dynamo") for n in ("mha", "encoder_layer", "bert", "gpt2", "llama", "vit")] + [
    (n, "torchscript") for n in ("mha", "distilbert")])
def test_transformer_layers_found(name, backend):
    count, norm = EXPECTED[name]
    g = graph_of(name, backend)
    layers = g.transformer_layers()
    assert [la.layer for la in layers] == list(range(count))
    assert {la.norm for la in layers} <= {norm}
    att, ffn = g.attention_blocks(), g.ffn_blocks()
    for la in layers:
        assert la.attention == att[la.layer] and la.ffn == ffn[la.layer]
    view = g.view()
    for a, b in zip(layers, layers[1:]):  # the residual stream is one chain of layers
        # (LLaMA's RMSNorm casts the stream first; torch.export names the residual by the cast)
        cast = view.producer.get(b.input)
        assert b.input == a.output or cast.op == "identity" and cast.inputs == [a.output]
    if backend == "fx" and count > 1:
        assert [la.name for la in layers] == [f"{layers[0].name[:-1]}{i}" for i in range(count)]


def test_layer_boundaries_are_the_torch_layers():
    """A layer's input and output values are the hidden states entering and leaving the torch
    layer (post-norm BERT: the LayerNorm after the FFN's add is inside)."""
    for name in ("bert", "gpt2"):
        m, x = _perturbed(name)
        g = graph_of(name, "fx")
        seen = {}
        layers = _layer_list(m, 2)
        hooks = [layers[i].register_forward_hook(
            lambda mod, a, kw, out, i=i: seen.__setitem__(i, (a[0] if a else next(
                v for v in kw.values() if torch.is_tensor(v)),
                out[0] if isinstance(out, tuple) else out)), with_kwargs=True)
            for i in range(2)]
        with torch.no_grad():
            m(*x)
        for h in hooks:
            h.remove()
        got = {}
        from slimc.passes import _calib
        found = g.transformer_layers()
        _calib.run(g.fx, [v for la in found for v in (la.input, la.output)], [g.example_inputs],
                   lambda v, arr: got.__setitem__(v, arr))
        for la in found:
            np.testing.assert_allclose(got[la.input], seen[la.layer][0].numpy(), atol=1e-6)
            np.testing.assert_allclose(got[la.output], seen[la.layer][1].numpy(), atol=1e-6)


# -- the oracle on every architecture and backend ---------------------------------------------

@pytest.mark.parametrize("name,backend", MATRIX)
def test_oracle(name, backend):
    g = graph_of(name, backend)
    m, _ = _perturbed(name)
    for dropped in ([0], [1]):
        _check_oracle(g, m, dropped)


def _bert4():
    from zoo import bert
    m, x, _ = bert(layers=4)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return m, x


@pytest.fixture(scope="module")
def bert4():
    m, x = _bert4()
    fx = slimc.capture(m, x)
    ts = slimc.Graph("onnx", _export(m, x, dynamo=False), example_inputs=[t.numpy() for t in x])
    return m, {"fx": fx, "torchscript": ts}


@pytest.mark.parametrize("backend", ["fx", "torchscript"])
def test_neighbours_and_first_and_last(bert4, backend):
    """Adjacent layers (the later one's readers end at the earlier one's input), the first and
    the last layer, and all but one."""
    m, graphs = bert4
    g = graphs[backend]
    for dropped in ([1, 2], [0, 3], [3], [0, 1, 2]):
        p = _check_oracle(g, m, dropped)
        assert p.onnx.graph.output[0].name == g.onnx.graph.output[0].name \
            if backend != "fx" else True


def test_encoder_stack():
    """nn.TransformerEncoder: post-norm layers of nn.TransformerEncoderLayer, batch-first (a
    transpose between the output projection and the residual add)."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    m = torch.nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()
    x = (torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(0)),)
    g = slimc.capture(m, x)
    assert [la.norm for la in g.transformer_layers()] == ["post"] * 3
    for dropped in ([0], [1], [2], [0, 2]):
        _check_oracle(g, m, dropped)


# -- scores -----------------------------------------------------------------------------------

def _calib_batches(n=3, seed=10):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 100, size=(1, 8)).astype(np.int64),) for _ in range(n)]


def _torch_block_influence(module, count, batches) -> list[float]:
    layers = _layer_list(module, count)
    total, tokens = np.zeros(count), 0
    seen = {}

    def hook(i):
        def f(mod, args, kwargs, out):
            x = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
            y = out[0] if isinstance(out, tuple) else out
            seen[i] = torch.nn.functional.cosine_similarity(
                x.double().reshape(-1, x.shape[-1]), y.double().reshape(-1, y.shape[-1]), dim=1)
        return f
    hooks = [layers[i].register_forward_hook(hook(i), with_kwargs=True) for i in range(count)]
    with torch.no_grad():
        for (ids,) in batches:
            module(torch.as_tensor(ids))
            for i in range(count):
                total[i] += float(seen[i].sum())
            tokens += seen[0].numel()
    for h in hooks:
        h.remove()
    return list(1 - total / tokens)


@pytest.mark.parametrize("backend", ["fx", "torchscript"])
def test_block_influence_matches_torch(bert4, backend):
    m, graphs = bert4
    g = graphs[backend]
    batches = _calib_batches()
    want = _torch_block_influence(m, 4, batches)
    res = drop_layers.run(g, n=2, score="block_influence", calib=batches)
    s = res.stats
    got = [s["scores"][i] for i in range(4)]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert s["dropped"] == sorted(np.argsort(want, kind="stable")[:2].tolist())
    assert s["score"] == "block_influence" and s["changed"] == 2
    x = g.sample_inputs()
    assert _max_err(res.graph.run(*x), oracle(m, 4, s["dropped"], x)) <= TOL


def test_block_influence_gpt2_dynamo():
    """Pre-norm, ONNX from the dynamo exporter."""
    m, _ = _perturbed("gpt2")
    g = graph_of("gpt2", "dynamo")
    batches = _calib_batches(2, seed=3)
    want = _torch_block_influence(m, 2, batches)
    s = drop_layers.run(g, n=1, calib=batches).stats
    np.testing.assert_allclose([s["scores"][0], s["scores"][1]], want, atol=1e-5)
    assert s["dropped"] == [int(np.argmin(want))]


def test_last_drops_the_last_n(bert4):
    m, graphs = bert4
    s = drop_layers.run(graphs["fx"], n=2, score="last").stats
    assert s["dropped"] == [2, 3] and "scores" not in s


@pytest.mark.parametrize("backend", ["fx", "dynamo"])
def test_nothing_dropped_is_identity(backend):
    g = graph_of("gpt2", backend)
    for opts in ({"layers": []}, {"n": 0}, {"layers": [], "n": 0}, {"n": 0, "score": "last"}):
        res = drop_layers.run(g, **opts)
        assert not res.modified and res.stats["changed"] == 0 and res.stats["matched"] == 2
        np.testing.assert_array_equal(res.graph.run()[0], g.run()[0])
        assert res.graph.num_parameters() == g.num_parameters()


def test_native_objects_in_native_objects_out():
    import onnx
    g = graph_of("llama", "fx")
    gm = drop_layers(g.fx, layers=[1])
    assert isinstance(gm, torch.fx.GraphModule)
    assert not any(n.target == "model.layers.1.self_attn.q_proj.weight"
                   for n in gm.graph.nodes if n.op == "get_attr")
    o = graph_of("distilbert", "torchscript")
    model = drop_layers(o.onnx, layers=[0])
    assert isinstance(model, onnx.ModelProto)
    onnx.checker.check_model(model)


def test_dropped_fx_graph_reexports():
    g = graph_of("gpt2", "fx")
    p = drop_layers(g, layers=[0])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        model = p.to_onnx()
    assert _max_err(p.run(), slimc.Graph("onnx", model).run(*g.example_inputs)) <= TOL


# -- bad input: clear errors, input untouched ------------------------------------------------

@pytest.mark.parametrize("backend", ["fx", "torchscript"])
@pytest.mark.parametrize("opts,error,match", [
    ({"layers": [2]}, OptionError, "Unknown layer 2"),
    ({"layers": [-1]}, OptionError, "Unknown layer -1"),
    ({"layers": ["0"]}, OptionError, "Unknown layer"),
    ({"layers": [0.0]}, OptionError, "Unknown layer"),
    ({"layers": 0}, OptionError, "must be a list"),
    ({"layers": [0, 1]}, OptionError, "every Transformer layer"),
    ({"n": 2, "score": "last"}, OptionError, "outside"),
    ({"n": -1, "score": "last"}, OptionError, "outside"),
    ({"n": 1.5}, OptionError, "whole number"),
    ({"n": True}, OptionError, "whole number"),
    ({}, OptionError, "needs layers"),
    ({"layers": [0], "n": 1}, OptionError, "not both"),
    ({"n": 1, "score": "taylor"}, OptionError, "Unknown layer score"),
    ({"n": 1}, OptionError, "needs calibration data"),
    ({"n": 1, "calib": []}, OptionError, "calib is empty"),
])
def test_bad_options(backend, opts, error, match):
    g = graph_of("bert", backend)
    before = _snapshot(g)
    with pytest.raises(error, match=match):
        drop_layers(g, **opts)
    after = _snapshot(g)
    assert before[1] == after[1]
    assert all(np.array_equal(before[0][k], after[0][k]) for k in before[0])


@pytest.mark.parametrize("backend", ["fx", "torchscript"])
def test_attention_alone_has_no_layer(backend):
    g = graph_of("mha", backend)
    for opts in ({"layers": [0]}, {"n": 1, "score": "last"}):
        with pytest.raises(UnsupportedError, match="matched nothing.*no whole Transformer"):
            drop_layers(g, **opts)
    with pytest.warns(passes._no_match.NoMatchWarning):
        assert drop_layers(g, layers=[0], on_no_match="warn").num_parameters() == \
            g.num_parameters()


def test_single_layer_cannot_go():
    g = graph_of("encoder_layer", "fx")
    with pytest.raises(OptionError, match="every Transformer layer"):
        drop_layers(g, layers=[0])
    with pytest.raises(OptionError, match=r"outside \[0, 1\)"):
        drop_layers(g, n=1, score="last")


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(32), torch.nn.LayerNorm(32)
        self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc1, self.fc2 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

    def forward(self, x):
        h = self.ln1(x)
        h = x + self.attn(h, h, h, need_weights=False)[0]
        f = self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(h))))
        return h + f, f


class _Tapped(torch.nn.Module):
    """Two pre-norm blocks; the model also returns the first block's FFN output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([_Block(), _Block()])

    def forward(self, x):
        x, tap = self.blocks[0](x)
        x, _ = self.blocks[1](x)
        return x, tap


def test_layer_read_from_outside_is_refused():
    g = slimc.capture(_Tapped().eval(), (torch.randn(1, 6, 32),))
    assert [la.norm for la in g.transformer_layers()] == ["pre", "pre"]
    with pytest.raises(UnsupportedError, match="Layer 0 .* stays partly alive"):
        drop_layers(g, layers=[0])
    p = drop_layers(g, layers=[1])  # the other layer is whole
    assert len(p.transformer_layers()) == 1 and len(p.run()) == 2


# -- TVM --------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name,backend", [("llama", "fx"), ("bert", "torchscript")])
def test_dropped_graph_compiles_with_tvm(name, backend, tmp_path):
    from slimc import runtime
    g = graph_of(name, backend)
    p = drop_layers(g, layers=[0])
    m = runtime.load(slimc.compile(p, "x86").save(tmp_path / "art"))
    assert _max_err(m(*g.sample_inputs()), p.run()) < 1e-4
