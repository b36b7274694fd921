"""Head importance scores (slimc.passes.importance) and ratio-based head pruning.

Each score is checked against an independent computation: magnitude against numpy on the
projection weights, taylor against a finite difference of the loss when one head's output
columns are scaled, attention against the probabilities transformers itself returns
(``output_attentions=True``) and across backends.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_prune_heads import _perturbed, graph_of

from slimc import passes
from slimc.errors import OptionError, ShapeError, UnsupportedError
from slimc.passes import importance


def _calib(g, n=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        out.append(tuple(rng.integers(0, 100, x.shape).astype(x.dtype) if x.dtype.kind == "i"
                         else rng.standard_normal(x.shape).astype(x.dtype)
                         for x in g.example_inputs))
    return out


def test_normalised_per_layer_to_unit_l2():
    g = graph_of("bert", "fx")
    for score, calib in (("magnitude", None), ("attention", _calib(g)), ("taylor", _calib(g))):
        s = importance.head_scores(g, score=score, calib=calib)
        for v in s.values():
            assert abs(np.linalg.norm(v) - 1) < 1e-9


@pytest.mark.parametrize("backend", ["fx", "dynamo"])
def test_magnitude_is_the_norm_of_the_heads_weights(backend):
    g = graph_of("llama", backend)  # GQA: heads of a group share their key/value rows
    b = g.attention_blocks()[0]
    w = {k: g.get_weight(getattr(b, k).weight) for k in "qkvo"}
    if b.q.layout == "in_out":
        w = {k: v.T for k, v in w.items()}  # as (out, in)
    d, r = b.head_dim, b.num_heads // b.num_kv_heads
    want = [np.sqrt(np.sum(w["q"][h * d:(h + 1) * d] ** 2)
                    + np.sum(w["k"][h // r * d:(h // r + 1) * d] ** 2)
                    + np.sum(w["v"][h // r * d:(h // r + 1) * d] ** 2)
                    + np.sum(w["o"][:, h * d:(h + 1) * d] ** 2)) for h in range(b.num_heads)]
    got = importance.head_scores(g, score="magnitude", normalize=False)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_taylor_matches_a_finite_difference(name):
    """|∂L/∂m_h| with m scaling head h's context = the derivative of L when head h's output
    projection columns are scaled by (1 + ε)."""
    g = graph_of(name, "fx")
    calib = _calib(g, n=1)

    def loss(outs, i):
        return sum((o.double() ** 2).mean() for o in outs)

    got = importance.head_scores(g, score="taylor", calib=calib, loss=loss, normalize=False)
    eps = 0.05  # central difference: truncation O(eps²), float32 noise ~1e-7 / eps
    for b in g.attention_blocks():
        for h in (0, b.num_heads - 1):
            vals = []
            for sign in (1, -1):
                p = g.copy()
                w = p.get_weight(b.o.weight).copy()
                cols = slice(h * b.head_dim, (h + 1) * b.head_dim)
                if b.o.layout == "out_in":
                    w[:, cols] *= 1 + sign * eps
                else:
                    w[cols] *= 1 + sign * eps
                p.set_weight(b.o.weight, w)
                outs = [torch.as_tensor(o) for o in p.run(*calib[0])]
                vals.append(float(loss(outs, 0)))
            fd = abs(vals[0] - vals[1]) / (2 * eps)
            assert got[b.layer][h] == pytest.approx(fd, rel=1e-2, abs=1e-6), (b.layer, h)


def test_taylor_kl_and_mse_are_finite_and_differ_between_heads():
    g = graph_of("bert", "fx")
    for loss in ("kl", "mse"):
        s = importance.head_scores(g, score="taylor", calib=_calib(g), loss=loss)
        for v in s.values():
            assert np.all(np.isfinite(v)) and np.ptp(v) > 1e-3


def test_taylor_needs_fx():
    g = graph_of("bert", "dynamo")
    with pytest.raises(UnsupportedError, match="taylor.*FX graphs"):
        importance.head_scores(g, score="taylor", calib=_calib(g))
    with pytest.raises(UnsupportedError, match="taylor"):
        passes.prune_heads(g, ratio=0.3, score="taylor", calib=_calib(g))


def test_attention_confidence_matches_transformers():
    """Against the probabilities BERT (eager attention) returns with output_attentions."""
    m, x = _perturbed("bert_eager")  # the weights graph_of captured
    ids = x[0]
    with torch.no_grad():
        atts = m.model(ids, output_attentions=True).attentions
    want = {layer: a[0].max(-1).values.mean(-1).double().numpy() for layer, a in
            enumerate(atts)}
    for backend in ("fx", "dynamo"):
        g = graph_of("bert_eager", backend)
        got = importance.head_scores(g, score="attention", calib=[(ids.numpy(),)],
                                     normalize=False)
        for layer, value in want.items():
            np.testing.assert_allclose(got[layer], value, rtol=1e-5)


@pytest.mark.parametrize("name", ["bert", "llama", "mha"])
def test_attention_scores_agree_across_backends(name):
    """SDPA on FX (probabilities recomputed from q, k, mask) vs the decomposed ONNX softmax."""
    fx, onnx_g = graph_of(name, "fx"), graph_of(name, "dynamo")
    calib = _calib(fx)
    a = importance.head_scores(fx, score="attention", calib=calib)
    b = importance.head_scores(onnx_g, score="attention", calib=calib)
    for layer in a:
        np.testing.assert_allclose(a[layer], b[layer], rtol=1e-5)


def _blocks(g):
    return g.attention_blocks()


def test_select_global_per_layer_and_at_least_one_head():
    g = graph_of("bert", "fx")  # 2 layers x 4 heads
    blocks = _blocks(g)
    scores = {0: np.array([0.1, 0.2, 0.3, 0.4]), 1: np.array([0.9, 0.8, 0.05, 0.7])}
    assert importance.select_heads(blocks, scores, 0.25) == {0: [0], 1: [2]}
    assert importance.select_heads(blocks, scores, 0.5) == {0: [0, 1, 2], 1: [2]}
    assert importance.select_heads(blocks, scores, 0.5, scope="per_layer") == \
        {0: [0, 1], 1: [2, 3]}
    # 7 of 8 would empty a layer: each keeps its most important head
    assert importance.select_heads(blocks, scores, 0.875) == {0: [0, 1, 2], 1: [1, 2, 3]}
    got = importance.select_heads(blocks, scores, 0.875, allow_empty_layer=True)
    assert got[0] == [0, 1, 2, 3]
    with pytest.raises(OptionError, match="scope"):
        importance.select_heads(blocks, scores, 0.5, scope="layer")


def test_select_keeps_gqa_groups_even():
    g = graph_of("llama", "fx")  # 8 query heads in 2 groups of 4, per layer
    blocks = _blocks(g)
    rng = np.random.default_rng(0)
    scores = {b.layer: rng.random(8) for b in blocks}
    for ratio in (0.1, 0.25, 0.5, 0.7):
        chosen = importance.select_heads(blocks, scores, ratio)
        for layer, heads in chosen.items():
            per_group = [sum(1 for h in heads if h // 4 == grp) for grp in range(2)]
            assert per_group[0] == per_group[1]
            # within a group, the least important heads go first
            for grp in range(2):
                mine = sorted(range(grp * 4, grp * 4 + 4), key=lambda h: scores[layer][h])
                assert {h for h in heads if h // 4 == grp} == set(mine[:per_group[grp]])
        passes.prune_heads(g, heads=chosen)  # a valid plan


@pytest.mark.parametrize("backend", ["fx", "dynamo"])
def test_prune_by_ratio_removes_the_lowest_scores(backend):
    g = graph_of("bert", backend)
    res = passes.prune_heads.run(g, ratio=0.3, score="attention", calib=_calib(g))
    scores = res.stats["scores"]
    assert res.stats["score"] == "attention"
    removed = res.stats["removed"]
    assert sum(len(h) for h in removed.values()) == round(0.3 * 8)
    flat = sorted((s, layer, h) for layer, v in scores.items() for h, s in enumerate(v))
    assert {(layer, h) for _, layer, h in flat[:2]} == \
        {(layer, h) for layer, hs in removed.items() for h in hs}
    assert [b.num_heads for b in res.graph.attention_blocks()] == \
        [4 - len(removed.get(i, [])) for i in range(2)]


def test_bad_calibration_input_untouched():
    g = graph_of("bert", "fx")
    before = g.fx.code
    with pytest.raises(OptionError, match="calibration data"):
        passes.prune_heads(g, ratio=0.3, score="taylor")
    with pytest.raises(ShapeError):
        passes.prune_heads(g, ratio=0.3, score="attention",
                           calib=[(np.zeros((1, 5), dtype=np.int64),)])
    with pytest.raises(OptionError, match="Unknown head importance score"):
        passes.prune_heads(g, ratio=0.3, score="random")
    with pytest.raises(OptionError, match="Unknown loss"):
        passes.prune_heads(g, ratio=0.3, score="taylor", calib=_calib(g), loss="l1")
    with pytest.raises(OptionError, match="calib is not used"):
        passes.prune_heads(g, ratio=0.3, score="magnitude", calib=_calib(g))
    assert g.fx.code == before
