"""factorize_low_rank: full rank reproduces the model, the rank follows the energy rule on known
singular values, parameters drop by exactly what the factors save, the reported deviation is the
measured one, and bad options fail clearly — on FX and ONNX."""

from __future__ import annotations

import io
import math

import numpy as np
import onnx
import pytest
import torch
from zoo import ZOO, to_onnx

import slimc
from slimc import passes
from slimc.errors import OptionError, SlimcError
from slimc.passes import Lossy, get_pass


class _Forms(torch.nn.Module):
    """x @ A (matmul, in_out), x @ Bᵀ (a transposed read) and a Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(8, 6))
        self.b = torch.nn.Parameter(torch.randn(10, 12))
        self.c = torch.nn.Linear(16, 6)

    def forward(self, x):
        return self.c(torch.cat([x[:, :8] @ self.a, x @ self.b.t()], dim=-1))


class _Shared(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.relu(self.fc(x)))))


def _ts_onnx(module, inputs) -> slimc.Graph:
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, inputs, buf, dynamo=False, opset_version=17)
    return slimc.Graph("onnx", onnx.load_from_string(buf.getvalue()),
                       example_inputs=tuple(x.numpy() for x in inputs))


@pytest.fixture(scope="module")
def bert_fx():
    module, inputs, _ = ZOO["bert"]()
    return slimc.capture(module, inputs)


@pytest.fixture(scope="module")
def bert_onnx():
    _, inputs, _ = ZOO["bert"]()
    return slimc.Graph("onnx", to_onnx("bert"), example_inputs=tuple(x.numpy() for x in inputs))


def _graph(name: str, backend: str, bert_fx, bert_onnx) -> slimc.Graph:
    if name == "bert":
        return bert_fx if backend == "fx" else bert_onnx
    if name == "forms":
        inputs = (torch.randn(3, 12, generator=torch.Generator().manual_seed(1)),)
        return slimc.capture(_Forms(), inputs) if backend == "fx" else _ts_onnx(_Forms(), inputs)
    module, inputs, _ = ZOO[name]()
    if backend == "fx":
        return slimc.capture(module, inputs)
    return slimc.Graph("onnx", to_onnx(name), example_inputs=tuple(x.numpy() for x in inputs))


def _linears(g: slimc.Graph) -> dict[str, tuple]:
    return {n.attrs["weight"]: (n.attrs["out_features"], n.attrs["in_features"])
            for n in g.view().nodes if n.op == "linear"}


def _max_abs(a: list, b: list) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


# -- full rank ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, backend", [("bert", "fx"), ("bert", "onnx"), ("gpt2", "fx"),
                                           ("mha", "onnx"), ("forms", "fx"), ("forms", "onnx")])
def test_full_rank_reproduces_the_model(name, backend, bert_fx, bert_onnx):
    g = _graph(name, backend, bert_fx, bert_onnx)
    lin = _linears(g)
    x = g.sample_inputs()
    ref = g.run(*x)
    r = passes.factorize_low_rank.run(g, energy=1.0, only_if_smaller=False)
    assert r.modified and set(r.stats["layers"]) == set(lin)
    for w, row in r.stats["layers"].items():
        assert row["rank"] == min(lin[w]) and row["energy"] == pytest.approx(1.0, abs=1e-12)
        assert w not in r.graph.weights()  # the old weight is gone
    out = r.graph.run(*x)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert r.stats["output_deviation"]["max_abs"] == pytest.approx(_max_abs(out, ref), abs=1e-7)
    # two matmuls per Linear now
    assert len(_linears(r.graph)) == 2 * len(lin)


@pytest.mark.parametrize("backend", ["fx", "onnx"])
def test_identity_setting_changes_nothing(backend, bert_fx, bert_onnx):
    g = bert_fx if backend == "fx" else bert_onnx
    r = passes.factorize_low_rank.run(g, energy=1.0)
    assert not r.modified and not r.stats["layers"]
    assert all("would not save" in why for why in r.stats["skipped"].values())
    assert r.stats["parameters_after"] == r.stats["parameters_before"] == g.num_parameters()
    x = g.sample_inputs()
    np.testing.assert_array_equal(r.graph.run(*x)[0], g.run(*x)[0])


# -- below full rank ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["fx", "onnx"])
def test_energy_reduces_parameters_and_reports_deviation(backend, bert_fx, bert_onnx):
    g = bert_fx if backend == "fx" else bert_onnx
    before = g.weights()
    r = passes.factorize_low_rank.run(g, energy=0.5)
    assert r.stats["layers"]
    saved = 0
    after = r.graph.weights()
    for w, row in r.stats["layers"].items():
        p, q = row["shape"]
        rank = row["rank"]
        assert rank * (p + q) < p * q
        assert (row["params_before"], row["params_after"]) == (p * q, rank * (p + q))
        saved += p * q - rank * (p + q)
        # the rank is the smallest that keeps half the energy
        s2 = np.linalg.svd(before[w].astype(np.float64), compute_uv=False) ** 2
        assert s2[:rank].sum() >= 0.5 * s2.sum() > s2[:rank - 1].sum()
        assert row["energy"] == pytest.approx(s2[:rank].sum() / s2.sum(), rel=1e-9)
        # the factors in the graph multiply back to the truncated weight
        lr_in, lr_out = (after[k] for k in sorted(k for k in after if k.startswith(w + "_lr_")))
        prod = lr_out @ lr_in if backend == "fx" else lr_in @ lr_out  # linear vs MatMul
        assert prod.shape == before[w].shape
        err = np.linalg.norm(prod - before[w]) / np.linalg.norm(before[w])
        assert err == pytest.approx(row["relative_error"], rel=1e-3)
        assert row["relative_error"] == pytest.approx(math.sqrt(1 - row["energy"]), rel=1e-9)
    assert r.stats["parameters_before"] == g.num_parameters()
    assert r.stats["parameters_after"] == g.num_parameters() - saved == r.graph.num_parameters()
    x = g.sample_inputs()
    dev = _max_abs(r.graph.run(*x), g.run(*x))
    assert dev > 1e-3  # a real change, and the stats say how much
    assert r.stats["output_deviation"]["max_abs"] == pytest.approx(dev, rel=1e-6)


def _known_linear() -> tuple[torch.nn.Linear, np.ndarray, np.ndarray]:
    """Linear(12 → 10) with distinct singular values s (so every truncation is unique)."""
    s = np.array([3, 2, 1.2, 1, 0.9, 0.5, 0.4, 0.3, 0.1, 0.05])
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    v, _ = np.linalg.qr(rng.standard_normal((12, 10)))
    w = (u * s) @ v.T
    lin = torch.nn.Linear(12, 10)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
    return lin, w, s


@pytest.mark.parametrize("opts, rank", [({"energy": 0.5}, 1), ({"energy": 0.8}, 3),
                                        ({"energy": 0.9}, 4), ({"energy": 0.95}, 5),
                                        ({"rank": 3}, 3)])
def test_rank_from_known_singular_values(opts, rank):
    lin, _, s = _known_linear()
    # cumulative σ²: 9, 13, 14.44, 15.44, 16.25 of 16.7625 → 0.537, 0.776, 0.861, 0.921, 0.969
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
    g = slimc.capture(lin, (x,))
    r = passes.factorize_low_rank.run(g, **opts)
    row = r.stats["layers"]["weight"]
    assert row["rank"] == rank
    tail = float(np.square(s[rank:]).sum() / np.square(s).sum())
    # the stored float32 weight moves the singular values by ~1e-8
    assert row["relative_error"] == pytest.approx(math.sqrt(tail), rel=1e-6)
    u, sv, vt = np.linalg.svd(lin.weight.detach().double().numpy())
    w_r = (u[:, :rank] * sv[:rank]) @ vt[:rank]
    ref = x.numpy() @ w_r.T + lin.bias.detach().numpy()
    np.testing.assert_allclose(r.graph.run(x.numpy())[0], ref, rtol=1e-5, atol=1e-5)


def test_only_where_it_saves():
    lin, _, _ = _known_linear()  # 10 × 12: rank r saves only if 22 r < 120, i.e. r <= 5
    g = slimc.capture(lin, (torch.randn(2, 12),))
    r = passes.factorize_low_rank.run(g, rank=6)
    assert not r.modified and "6·(10+12) >= 10·12" in r.stats["skipped"]["weight"]
    r = passes.factorize_low_rank.run(g, rank=5)
    assert r.modified and r.stats["parameters_after"] == r.stats["parameters_before"] - 10
    r = passes.factorize_low_rank.run(g, rank=6, only_if_smaller=False)
    assert r.modified and r.stats["parameters_after"] == r.stats["parameters_before"] + 12


@pytest.mark.parametrize("backend", ["fx", "onnx"])
def test_shared_weight_and_exclude(backend):
    inputs = (torch.randn(2, 8),)
    g = slimc.capture(_Shared(), inputs) if backend == "fx" else _ts_onnx(_Shared(), inputs)
    r = passes.factorize_low_rank.run(g, energy=1.0, only_if_smaller=False)
    shared = [w for w, why in r.stats["skipped"].items() if why.startswith("shared by")]
    assert len(shared) == 1 and len(r.stats["layers"]) == 1
    np.testing.assert_array_equal(r.graph.get_weight(shared[0]), g.get_weight(shared[0]))
    (done,) = r.stats["layers"]
    r = passes.factorize_low_rank.run(g, energy=1.0, only_if_smaller=False, exclude=[done])
    assert not r.modified and r.stats["skipped"][done].startswith("excluded")


def test_native_kinds_and_input_untouched():
    module = _Forms()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(3, 12)
    g = slimc.capture(module, (x,))
    code, weights = g.fx.code, g.weights()
    gm = passes.low_rank(g.fx, energy=0.5)
    assert isinstance(gm, torch.fx.GraphModule) and gm.code != code
    assert g.fx.code == code and g.weights().keys() == weights.keys()
    for k, w in weights.items():
        np.testing.assert_array_equal(g.get_weight(k), w)
    for k, v in module.state_dict().items():
        assert torch.equal(v, state[k])
    out = passes.low_rank(g, energy=0.5)
    assert isinstance(out, slimc.Graph) and out.history[-1] == "factorize_low_rank"
    proto = _ts_onnx(module, (x,)).onnx
    raw = proto.SerializeToString()
    res = passes.low_rank(proto, energy=0.5)
    assert isinstance(res, onnx.ModelProto) and proto.SerializeToString() == raw
    onnx.checker.check_model(res)
    assert len(res.graph.initializer) > len(proto.graph.initializer)


def test_factorized_fx_exports_to_onnx():
    x = torch.randn(3, 12)
    g = slimc.capture(_Forms(), (x,))
    r = passes.factorize_low_rank(g, energy=0.8)
    model = r.to_onnx()
    np.testing.assert_allclose(slimc.Graph("onnx", model).run(x.numpy())[0],
                               r.run(x.numpy())[0], rtol=1e-5, atol=1e-5)


def test_registered_with_its_contract_and_alias():
    assert passes.low_rank is passes.factorize_low_rank
    info = get_pass("factorize_low_rank")
    assert info.contract == Lossy(identity={"energy": 1.0}, bound=info.contract.bound)
    assert set(info.options) == {"rank", "energy", "exclude", "only_if_smaller"}


@pytest.mark.parametrize("opts, match", [
    ({}, "exactly one"),
    ({"rank": 4, "energy": 0.9}, "both"),
    ({"rank": 0}, "rank"),
    ({"rank": 2.5}, "rank"),
    ({"rank": True}, "rank"),
    ({"energy": 0}, "energy"),
    ({"energy": 1.2}, "energy"),
    ({"energy": "0.9"}, "energy"),
    ({"energy": 0.9, "exclude": 3}, "exclude"),
    ({"energy": 0.9, "only_if_smaller": "no"}, "only_if_smaller"),
])
def test_bad_options(opts, match):
    g = slimc.capture(_Forms(), (torch.randn(3, 12),))
    with pytest.raises(OptionError, match=match) as e:
        passes.factorize_low_rank(g, **opts)
    assert isinstance(e.value, SlimcError) and e.value.fix
