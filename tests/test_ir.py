"""Capture, load/save round trips and attention discovery on every zoo architecture."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from zoo import TS_EXPORTABLE, ZOO, to_onnx

import slimc
from slimc.errors import CaptureError, InputFileError, ShapeError, UnsupportedError


def _heads(g):
    return [(b.num_heads, b.num_kv_heads, b.head_dim) for b in g.attention_blocks()]


@pytest.mark.parametrize("name", list(ZOO))
def test_discovery_fx(name):
    module, inputs, expected = ZOO[name]()
    g = slimc.capture(module, inputs)
    assert _heads(g) == expected
    blocks = g.attention_blocks()
    assert [b.layer for b in blocks] == list(range(len(expected)))
    for b in blocks:
        # the weights it names are real and have the stated geometry
        for lin in (b.q, b.k, b.v, b.o):
            w = g.get_weight(lin.weight)
            assert w.ndim == 2
            out_dim = w.shape[0] if lin.layout == "out_in" else w.shape[1]
            lo, hi = lin.rows or (0, out_dim)
            assert hi - lo == lin.out_features
        assert b.q.out_features == b.num_heads * b.head_dim
        assert b.k.out_features == b.num_kv_heads * b.head_dim
        assert b.o.in_features == b.num_heads * b.head_dim


@pytest.mark.parametrize("exporter,name", [("dynamo", n) for n in ZOO]
                         + [("ts", n) for n in TS_EXPORTABLE])
def test_discovery_onnx(exporter, name):
    _, _, expected = ZOO[name]()
    g = slimc.Graph("onnx", to_onnx(name, exporter))
    assert _heads(g) == expected
    for b in g.attention_blocks():
        assert g.get_weight(b.q.weight).ndim == 2


def test_fused_qkv_rows_gpt2():
    module, inputs, _ = ZOO["gpt2"]()
    g = slimc.capture(module, inputs)
    b = g.attention_blocks()[0]
    assert b.fused_qkv
    assert (b.q.rows, b.k.rows, b.v.rows) == ((0, 64), (64, 128), (128, 192))
    assert b.q.weight.endswith("c_attn.weight") and b.q.layout == "in_out"


def test_no_attention_in_mlp():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    g = slimc.capture(mlp, (torch.randn(2, 8),))
    assert g.attention_blocks() == []


def test_capture_runs_like_torch_and_never_shares_weights():
    module, inputs, _ = ZOO["bert"]()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    g = slimc.capture(module, inputs)
    with torch.no_grad():
        ref = module(*inputs).numpy()
    np.testing.assert_allclose(g.run()[0], ref, rtol=1e-5, atol=1e-5)
    # edit every weight of the graph: the user's module must not change
    for name, w in g.weights().items():
        g.set_weight(name, np.zeros_like(w))
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_copy_is_deep():
    module, inputs, _ = ZOO["bert"]()
    g = slimc.capture(module, inputs)
    h = g.copy()
    name = g.attention_blocks()[0].q.weight
    h.set_weight(name, np.zeros_like(h.get_weight(name)))
    assert np.count_nonzero(g.get_weight(name)) > 0


def test_capture_error_is_slimc_error():
    class Bad(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x * 2
            return x

    with pytest.raises(CaptureError, match="torch.export could not capture Bad"):
        slimc.capture(Bad(), (torch.randn(3),))
    with pytest.raises(CaptureError, match="needs a torch.nn.Module"):
        slimc.capture(lambda x: x, (torch.randn(3),))


def test_wrong_input_shape():
    module, inputs, _ = ZOO["bert"]()
    g = slimc.capture(module, inputs)
    with pytest.raises(ShapeError, match="expects"):
        g.run(np.zeros((1, 5), dtype=np.int64))
    with pytest.raises(ShapeError, match="takes 1 input"):
        g.run(inputs[0].numpy(), inputs[0].numpy())


def test_onnx_round_trip_and_fx_to_onnx(tmp_path):
    module, inputs, expected = ZOO["bert"]()
    g = slimc.capture(module, inputs)
    path = tmp_path / "bert.onnx"
    g.save(path)
    h = slimc.load(path)
    assert h.backend == "onnx" and _heads(h) == expected
    np.testing.assert_allclose(h.run(inputs[0].numpy())[0], g.run()[0], rtol=1e-4, atol=1e-5)
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary left behind


def test_pt2_round_trip(tmp_path):
    module, inputs, expected = ZOO["gpt2"]()
    g = slimc.capture(module, inputs)
    g.save(tmp_path / "m.pt2")
    h = slimc.load(tmp_path / "m.pt2")
    assert h.backend == "fx" and _heads(h) == expected
    np.testing.assert_allclose(h.run()[0], g.run()[0], rtol=1e-6, atol=1e-6)


def test_external_data_load(tmp_path):
    proto = to_onnx("bert")
    path = tmp_path / "ext.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    assert (tmp_path / "ext.onnx.data").stat().st_size > 0
    g = slimc.load(path)
    assert _heads(g) == ZOO["bert"]()[2]
    assert g.num_parameters() == slimc.Graph("onnx", to_onnx("bert")).num_parameters()
    (tmp_path / "ext.onnx.data").rename(tmp_path / "moved.data")
    with pytest.raises(InputFileError, match="external weight data"):
        slimc.load(path)


def test_onnx_to_torch_is_a_clear_error():
    g = slimc.Graph("onnx", to_onnx("mha"))
    with pytest.raises(UnsupportedError, match="not supported"):
        g.to_torch()


@pytest.mark.parametrize("kind", ["missing", "dir", "empty", "truncated", "garbage", "invalid"])
def test_load_bad_files(tmp_path, kind):
    good = to_onnx("mha").SerializeToString()
    path = tmp_path / "m.onnx"
    if kind == "dir":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "garbage":
        path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    elif kind == "invalid":
        m = to_onnx("mha")
        m.graph.node[3].input[0] = "does_not_exist"
        path.write_bytes(m.SerializeToString())
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(InputFileError) as info:
        slimc.load(path)
    assert str(path) in str(info.value)
    if before is not None:
        assert path.read_bytes() == before  # the input is never modified
