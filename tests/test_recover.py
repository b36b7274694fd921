"""slimc.recover: knowledge distillation of a pruned FX graph towards the unpruned model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_importance import _calib
from test_prune_heads import graph_of

import slimc
from slimc import passes
from slimc.errors import OptionError, ShapeError, UnsupportedError


def _gap(student, teacher, batches) -> float:
    """Mean squared distance between the two models' outputs on ``batches``."""
    return float(np.mean([np.mean((student.run(*x)[0] - teacher.run(*x)[0]) ** 2)
                          for x in batches]))


@pytest.fixture(scope="module")
def setup():
    g = graph_of("bert", "fx")
    pruned = passes.prune_heads(g, heads={0: [0, 1], 1: [2, 3]})
    return g, pruned, _calib(g, n=6), _calib(g, n=4, seed=11)


def test_distillation_closes_the_gap_on_held_out_data(setup):
    g, pruned, data, held_out = setup
    w_teacher = {k: v.copy() for k, v in g.weights().items()}
    w_pruned = {k: v.copy() for k, v in pruned.weights().items()}
    r = slimc.recover(pruned, teacher=g, data=data, steps=40, lr=1e-3)
    assert r is not pruned and r.backend == "fx"
    assert r.history[-2:] == ["prune_heads", "recover"]
    assert r.last_stats["loss_last"] < 0.5 * r.last_stats["loss_first"]
    assert _gap(r, g, held_out) < 0.5 * _gap(pruned, g, held_out)
    # the result keeps the pruned architecture; teacher and input are untouched
    assert [b.num_heads for b in r.attention_blocks()] == [2, 2]
    assert r.num_parameters() == pruned.num_parameters()
    assert all(np.array_equal(w_teacher[k], v) for k, v in g.weights().items())
    assert all(np.array_equal(w_pruned[k], v) for k, v in pruned.weights().items())


def test_onnx_teacher_and_kl_loss(setup):
    _, pruned, data, _ = setup
    teacher = graph_of("bert", "dynamo")  # same weights, run by onnxruntime
    r = slimc.recover(pruned, teacher=teacher, data=data, steps=15, lr=1e-3, loss="kl",
                      temperature=2.0)
    assert r.last_stats["loss_last"] < r.last_stats["loss_first"]


def test_frozen_parameters_stay(setup):
    g, pruned, data, _ = setup
    r = slimc.recover(pruned, teacher=g, data=data, steps=3, lr=1e-3,
                      freeze=("embeddings", "attention"))
    for name, w in pruned.weights().items():
        same = np.array_equal(w, r.get_weight(name))
        if "embeddings" in name or "attention" in name:
            assert same, name
        elif name.endswith("intermediate.dense.weight"):
            assert not same, name
    with pytest.raises(OptionError, match="leaves no parameter"):
        slimc.recover(pruned, teacher=g, data=data, steps=1, freeze=("",))


def test_zero_steps_is_a_copy(setup):
    g, pruned, data, _ = setup
    r = slimc.recover(pruned, teacher=g, data=data, steps=0)
    np.testing.assert_array_equal(r.run()[0], pruned.run()[0])


def test_bad_input(setup):
    g, pruned, data, _ = setup
    with pytest.raises(UnsupportedError, match="ONNX"):
        slimc.recover(graph_of("bert", "dynamo"), teacher=g, data=data)
    for opts, match in (({"steps": -1}, "steps"), ({"lr": 0}, "lr"), ({"loss": "l1"}, "loss"),
                        ({"temperature": 0}, "temperature"), ({"data": []}, "no data")):
        kw = {"teacher": g, "data": data, **opts}
        with pytest.raises(OptionError, match=match):
            slimc.recover(pruned, **kw)
    with pytest.raises(ShapeError):
        slimc.recover(pruned, teacher=g, data=[(np.zeros((1, 3), dtype=np.int64),)], steps=1)
    with pytest.raises(ShapeError, match="teacher"):  # a torch module teacher, wrong width
        slimc.recover(pruned, teacher=torch.nn.Embedding(100, 32), data=data, steps=1)
    with pytest.raises(OptionError, match="teacher must be"):
        slimc.recover(pruned, teacher="bert", data=data, steps=1)
