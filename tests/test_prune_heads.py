"""prune_heads against its correctness oracle, on every zoo architecture and both backends.

Oracle (issue 3): removing head h gives the same outputs as keeping it with its value-projection
rows and value bias zeroed (its context is then exactly zero, so the output projection adds
nothing for it). Under grouped-query attention a value head serves a whole group, so a query head
removed from a group that keeps other heads is zeroed through its output-projection columns
instead (the same identity, one matmul later). The reference is built on the same backend as the
pruned model, so the comparison is float rounding only (1e-5).
"""

from __future__ import annotations

import contextlib
import io
import zlib

import numpy as np
import onnx
import pytest
import torch
from zoo import ZOO

import slimc
from slimc.errors import OptionError, SlimcError, UnsupportedError
from slimc.passes.prune_heads import prune_heads

TOL = 1e-5
TORCHSCRIPT = ("mha", "bert", "bert_eager", "distilbert", "vit")


def _perturbed(name):
    """The zoo model with every parameter nudged: HF initialises biases to zero and LayerNorm
    to ones, which would hide a bias that is not sliced (and makes exporters share tensors)."""
    m, x, _ = ZOO[name]()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return m, x


def _export(m, x, dynamo: bool) -> onnx.ModelProto:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if dynamo:
            return torch.onnx.export(m, x, dynamo=True).model_proto
        f = io.BytesIO()
        torch.onnx.export(m, x, f, dynamo=False, opset_version=17)
        return onnx.load_from_string(f.getvalue())


_CACHE: dict = {}


def graph_of(name: str, backend: str) -> slimc.Graph:
    """Captured / exported once per session; tests get a copy."""
    key = (name, backend)
    if key not in _CACHE:
        m, x = _perturbed(name)
        if backend == "fx":
            g = slimc.capture(m, x)
        else:
            model = _export(m, x, dynamo=backend == "dynamo")
            g = slimc.Graph("onnx", model, example_inputs=[t.numpy() for t in x])
        _CACHE[key] = g
    return _CACHE[key].copy()


def _zero_rows(g, lin, axis_rows: bool, index, bias: bool = True):
    w = g.get_weight(lin.weight).copy()
    rows_axis = 0 if lin.layout == "out_in" else 1
    axis = rows_axis if axis_rows else 1 - rows_axis
    sl = [slice(None), slice(None)]
    sl[axis] = index
    w[tuple(sl)] = 0
    g.set_weight(lin.weight, w)
    if bias and lin.bias:
        b = g.get_weight(lin.bias).copy()
        b[index] = 0
        g.set_weight(lin.bias, b)


def zeroed(g: slimc.Graph, heads: dict) -> slimc.Graph:
    """The oracle: the same model with the removed heads' value rows and bias set to zero."""
    z = g.copy()
    for b in g.attention_blocks():
        gone = sorted(set(heads.get(b.layer, [])))
        d = b.head_dim
        off = b.v.rows[0] if b.v.rows else 0
        r = b.num_heads // b.num_kv_heads
        whole = [k for k in range(b.num_kv_heads) if all(h in gone for h in range(k * r,
                                                                                   (k + 1) * r))]
        for k in whole:  # a value head whose every query head goes
            _zero_rows(z, b.v, True, slice(off + k * d, off + (k + 1) * d))
        for h in gone:
            if h // r not in whole:  # GQA, the group keeps other heads: zero W_o's columns
                _zero_rows(z, b.o, False, slice(h * d, (h + 1) * d), bias=False)
    return z


def head_sets(g: slimc.Graph, seed: int) -> list[dict]:
    """Random head sets valid for every block, including "all but one head" of a layer."""
    rng = np.random.default_rng(seed)
    blocks = g.attention_blocks()
    sets = []
    for mode in ("random", "all_but_one", "random"):
        heads = {}
        for b in blocks:
            r = b.num_heads // b.num_kv_heads
            if b.gqa:
                if mode == "all_but_one":  # other groups go whole, one group keeps one
                    keep = int(rng.integers(b.num_heads))
                    heads[b.layer] = [h for h in range(b.num_heads) if h != keep]
                else:  # the same number from every group, at random positions
                    n = int(rng.integers(0, r))
                    heads[b.layer] = [g_ * r + int(i) for g_ in range(b.num_kv_heads)
                                      for i in rng.choice(r, n, replace=False)]
            elif mode == "all_but_one" and b.layer == len(blocks) - 1:
                keep = int(rng.integers(b.num_heads))
                heads[b.layer] = [h for h in range(b.num_heads) if h != keep]
            else:
                n = int(rng.integers(1, b.num_heads))
                heads[b.layer] = sorted(int(h) for h in rng.choice(b.num_heads, n,
                                                                    replace=False))
        sets.append(heads)
    return sets


def _max_err(a, b) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def _check_oracle(g: slimc.Graph, heads: dict) -> None:
    res = prune_heads.run(g, heads=heads)
    p = res.graph
    inputs = g.sample_inputs()
    want = zeroed(g, heads).run(*inputs)
    got = p.run(*inputs)
    assert [w.shape for w in want] == [x.shape for x in got]
    assert _max_err(want, got) <= TOL, heads
    # a genuinely smaller model: the new head counts and exactly the removed weights
    before = {b.layer: b for b in g.attention_blocks()}
    after = {b.layer: b for b in p.attention_blocks()}
    assert sorted(after) == sorted(before)
    for layer, b in before.items():
        gone = set(heads.get(layer, []))
        assert after[layer].num_heads == b.num_heads - len(gone)
        assert after[layer].head_dim == b.head_dim
        r = b.num_heads // b.num_kv_heads
        kv_gone = sum(1 for k in range(b.num_kv_heads) if all(h in gone for h in range(
            k * r, (k + 1) * r)))
        assert after[layer].num_kv_heads == b.num_kv_heads - kv_gone
    expected = 0
    for layer, b in before.items():
        n_q = len(set(heads.get(layer, []))) * b.head_dim
        n_kv = (b.num_kv_heads - after[layer].num_kv_heads) * b.head_dim
        expected += n_q * (b.q.in_features + b.o.out_features) + n_kv * (b.k.in_features
                                                                         + b.v.in_features)
        expected += (n_q if b.q.bias else 0) + (n_kv if b.k.bias else 0) \
            + (n_kv if b.v.bias else 0)
    assert g.num_parameters() - p.num_parameters() == expected
    assert res.stats["removed_parameters"] == expected
    if any(heads.values()):
        assert res.stats["flops_after"] < res.stats["flops_before"]


# -- the oracle on every architecture and backend ---------------------------------------------

@pytest.mark.parametrize("name", sorted(ZOO))
def test_oracle_fx(name):
    g = graph_of(name, "fx")
    for heads in head_sets(g, seed=zlib.crc32(name.encode())):
        _check_oracle(g, heads)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ZOO))
def test_oracle_onnx_dynamo(name):
    g = graph_of(name, "dynamo")
    for heads in head_sets(g, seed=zlib.crc32(name.encode())):
        _check_oracle(g, heads)


@pytest.mark.parametrize("name", TORCHSCRIPT)
def test_oracle_onnx_torchscript(name):
    g = graph_of(name, "torchscript")
    for heads in head_sets(g, seed=7):
        _check_oracle(g, heads)


@pytest.mark.parametrize("name,backend", [("bert", "dynamo"), ("llama", "dynamo")])
def test_oracle_onnx_dynamo_fast(name, backend):
    """A quick subset of the dynamo matrix that always runs (the full one is marked slow)."""
    g = graph_of(name, backend)
    _check_oracle(g, head_sets(g, seed=3)[1])


@pytest.mark.parametrize("backend", ["fx", "dynamo"])
def test_no_head_pruned_is_identity(backend):
    g = graph_of("bert", backend)
    for opts in ({"heads": {}}, {"ratio": 0}, {"heads": {0: []}}, {"heads": {}, "ratio": 0}):
        res = prune_heads.run(g, **opts)
        assert not res.modified
        np.testing.assert_array_equal(res.graph.run()[0], g.run()[0])
        assert res.graph.num_parameters() == g.num_parameters()


@pytest.mark.parametrize("name,backend", [("bert", "fx"), ("gpt2", "fx"), ("llama", "fx"),
                                          ("mha", "fx"), ("bert", "dynamo"), ("gpt2", "dynamo"),
                                          ("mha", "torchscript")])
def test_empty_layer_outputs_the_output_bias(name, backend):
    g = graph_of(name, backend)
    b = g.attention_blocks()[0]
    heads = {0: list(range(b.num_heads))}
    with pytest.raises(OptionError, match="without any head"):
        prune_heads(g, heads=heads)
    p = prune_heads(g, heads=heads, allow_empty_layer=True)
    assert _max_err(zeroed(g, heads).run(), p.run()) <= TOL
    assert len(p.attention_blocks()) == len(g.attention_blocks()) - 1
    assert p.num_parameters() < g.num_parameters() - b.o.in_features * b.o.out_features


def test_gqa_whole_group_and_uniform_within_groups():
    g = graph_of("llama", "fx")  # 8 query heads, 2 key/value heads: groups {0..3}, {4..7}
    p = prune_heads(g, heads={0: [4, 5, 6, 7]})
    b = p.attention_blocks()[0]
    assert (b.num_heads, b.num_kv_heads) == (4, 1)
    p = prune_heads(g, heads={1: [0, 6]})
    b = p.attention_blocks()[1]
    assert (b.num_heads, b.num_kv_heads) == (6, 2)
    with pytest.raises(UnsupportedError, match="same number of query heads"):
        prune_heads(g, heads={0: [0]})


def test_pruned_fx_graph_reexports():
    """meta["val"] is refreshed, so the pruned graph goes through torch.export and the ONNX
    exporter again, and the ONNX copy computes the same."""
    g = graph_of("llama", "fx")
    p = prune_heads(g, heads={0: [1, 5], 1: [0, 1, 2, 3]})
    model = p.to_onnx()
    out = slimc.Graph("onnx", model).run(*g.example_inputs)
    assert _max_err(p.run(), out) <= TOL


@pytest.mark.parametrize("name,heads", [("bert", {0: [1, 2], 1: [3]}),
                                        pytest.param("llama", {0: [1, 5]}, marks=pytest.mark.slow),
                                        pytest.param("gpt2", {1: [0]}, marks=pytest.mark.slow)])
def test_dynamic_shape_onnx(name, heads):
    """Batch and sequence symbolic: the exporter computes reshape targets at run time
    (Shape → Concat); the pruned model is right at the export size and at another one."""
    m, x = _perturbed(name)
    b, s = torch.export.Dim("b", max=64), torch.export.Dim("s", max=64)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        model = torch.onnx.export(m, x, dynamo=True, dynamic_shapes=(({0: b, 1: s},),)
                                  ).model_proto
    g = slimc.Graph("onnx", model)
    p = prune_heads(g, heads=heads)
    ref = zeroed(g, heads)
    for inputs in (g.sample_inputs(), g.sample_inputs(seed=1, dims={"b": 2, "s": 5})):
        assert _max_err(ref.run(*inputs), p.run(*inputs)) <= TOL
    assert [b_.num_heads for b_ in p.attention_blocks()] == \
        [b_.num_heads - len(heads.get(b_.layer, [])) for b_ in g.attention_blocks()]
    def dims(graph):
        return [d.dim_param or d.dim_value for d in graph.onnx.graph.input[0].type.tensor_type
                .shape.dim]
    assert dims(p) == dims(g) and "s" in dims(g)  # still dynamic


def test_native_objects_in_native_objects_out():
    g = graph_of("distilbert", "fx")
    gm = prune_heads(g.fx, heads={0: [1]})
    assert isinstance(gm, torch.fx.GraphModule)
    o = graph_of("distilbert", "torchscript")
    model = prune_heads(o.onnx, heads={0: [1]})
    assert isinstance(model, onnx.ModelProto)
    onnx.checker.check_model(model)


# -- bad input: clear errors, input untouched ------------------------------------------------

def _snapshot(g):
    return {k: v.copy() for k, v in g.weights().items()}, (g.fx.code if g.backend == "fx"
                                                           else g.onnx.SerializeToString())


@pytest.mark.parametrize("backend", ["fx", "torchscript"])
@pytest.mark.parametrize("opts,error,match", [
    ({"heads": {0: [4]}}, OptionError, "has 4 heads"),
    ({"heads": {0: [-1]}}, OptionError, "has 4 heads"),
    ({"heads": {7: [0]}}, OptionError, "Unknown attention layer 7"),
    ({"heads": {"0": [0]}}, OptionError, "Unknown attention layer"),
    ({"heads": {0: [0.5]}}, OptionError, "non-integer"),
    ({"heads": [0, 1]}, OptionError, "must be a dict"),
    ({"ratio": 1.0}, OptionError, "outside"),
    ({"ratio": -0.1}, OptionError, "outside"),
    ({"ratio": 1.5}, OptionError, "outside"),
    ({"ratio": "0.3"}, OptionError, "must be a number"),
    ({"heads": {0: [1]}, "ratio": 0.3}, OptionError, "not both"),
    ({}, OptionError, "needs heads"),
    ({"heads": {0: [0, 1, 2, 3]}}, OptionError, "without any head"),
])
def test_bad_options(backend, opts, error, match):
    g = graph_of("bert", backend)
    before = _snapshot(g)
    with pytest.raises(error, match=match):
        prune_heads(g, **opts)
    after = _snapshot(g)
    assert before[1] == after[1]
    assert all(np.array_equal(before[0][k], after[0][k]) for k in before[0])


def test_model_without_attention():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    g = slimc.capture(mlp, (torch.randn(2, 8),))
    with pytest.raises(SlimcError, match="no attention"):
        prune_heads(g, heads={0: [0]})
    with pytest.raises(SlimcError, match="no attention"):
        prune_heads(g, ratio=0.5)


def test_report_table_and_heatmap(tmp_path):
    from slimc.passes.prune_heads.report import table, write_report
    g = graph_of("bert", "fx")
    res = prune_heads.run(g, ratio=0.25, score="magnitude")
    s = res.stats
    text = table(s)
    for layer, heads in s["removed"].items():
        assert f"| {layer} | 4 | {4 - len(heads)} | {', '.join(map(str, heads))} |" in text
    assert "| all | 8 | 6 | 2 (25 %) |" in text
    change = 100 * (s["params_after"] - s["params_before"]) / s["params_before"]
    assert f"{change:+.1f} %" in text
    paths = write_report(s, tmp_path)
    png = paths["heatmap"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    import matplotlib.image
    assert matplotlib.image.imread(paths["heatmap"]).ndim == 3
    assert "heads.png" in paths["table"].read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name,backend", [("bert", "fx"), ("bert", "dynamo"), ("llama", "fx"),
                                          ("mha", "torchscript")])
def test_pruned_graph_compiles_with_tvm(name, backend, tmp_path):
    """The pruned model (smaller matmuls, rewritten shapes) goes through slimc.compile and the
    compiled artifact computes what the pruned graph computes."""
    from slimc import runtime
    g = graph_of(name, backend)
    heads = head_sets(g, seed=5)[0]
    p = prune_heads(g, heads=heads)
    m = runtime.load(slimc.compile(p, "x86").save(tmp_path / "art"))
    assert _max_err(m(*g.sample_inputs()), p.run()) < 1e-4
