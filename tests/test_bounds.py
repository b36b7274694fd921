"""Index inputs: the compiler finds the range each one may take, the runtime enforces it.

TVM's gathers read without a bounds check (an out-of-range token id read outside the embedding
table and killed the process). ``codegen/bounds.py`` traces every gather's indices back to a
model input and records the table's range in the artifact; ``slimc.runtime`` checks inputs
against it before each call. The oracles: torch raises IndexError exactly where slimc raises for
an FX model, onnxruntime refuses exactly where slimc refuses for an ONNX model, and inside the
range both agree with slimc's output.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from zoo import TS_EXPORTABLE, ZOO, to_onnx

import slimc
from slimc import runtime
from slimc.codegen.bounds import index_ranges
from slimc.codegen.build import to_relax
from slimc.errors import IndexRangeError

ATOL = 1e-4
VOCAB = 100  # the zoo's vocabulary
EMBEDDING = ("bert", "bert_eager", "distilbert", "gpt2", "gpt2_eager", "llama", "llama_eager")
CASES = [(name, kind) for name in ZOO for kind in ("fx", "dynamo", "ts")
         if kind != "ts" or name in TS_EXPORTABLE]


def _graph(name: str, kind: str) -> slimc.Graph:
    if kind == "fx":
        module, inputs, _ = ZOO[name]()
        return slimc.capture(module, inputs)
    return slimc.Graph("onnx", to_onnx(name, kind))


@pytest.mark.parametrize("name,kind", CASES)
def test_every_gather_of_the_zoo_is_traced_to_its_input(name, kind):
    g = _graph(name, kind)
    mod, inputs, _ = to_relax(g)
    ranges, unchecked = index_ranges(mod, [s["name"] for s in inputs])
    assert unchecked == []
    if name in EMBEDDING:
        # torch.embedding takes [0, n-1]; ONNX Gather also wraps [-n, -1]
        low = 0 if kind == "fx" else -VOCAB
        assert ranges == {inputs[0]["name"]: [low, VOCAB - 1]}
    else:
        assert ranges == {}


class _Shifted(torch.nn.Module):
    """Indices computed from the input: ``ids + 2`` (traced, range shifted) and ``(ids * 3) %
    VOCAB`` (not traced: its gather is clipped)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Embedding(VOCAB, 8)
        self.b = torch.nn.Embedding(VOCAB, 8)

    def forward(self, ids):
        return self.a(ids + 2) + self.b((ids * 3) % VOCAB)


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    ids = torch.arange(8).reshape(1, 8)
    g = slimc.capture(_Shifted().eval(), (ids,))
    return runtime.load(slimc.compile(g).save(tmp_path_factory.mktemp("b") / "shifted")), g


def test_a_constant_offset_shifts_the_range_and_computed_indices_are_clipped(shifted):
    m, g = shifted
    (name,) = m.input_names
    assert m.index_ranges == {name: (-2, VOCAB - 3)}
    assert m.metadata["clipped_indices"] and m.metadata["clipped_indices"][0].startswith("take")
    for ids in (np.array([[-2, 0, 5, 50, 97, 96, 1, -1]]), np.arange(8).reshape(1, 8)):
        np.testing.assert_allclose(m(ids)[0], g.run(ids)[0], atol=ATOL)
    for bad in (VOCAB - 2, -3):
        ids = np.zeros((1, 8), dtype=np.int64)
        ids[0, 5] = bad
        with pytest.raises(IndexError):       # the oracle: torch refuses it too
            g.to_torch()(torch.from_numpy(ids))
        with pytest.raises(IndexRangeError, match=rf"holds {bad} at position \(0, 5\).*"
                                                  rf"from -2 to {VOCAB - 3}"):
            m(ids)


@pytest.fixture(scope="module")
def bert_builds(tmp_path_factory):
    """Tiny BERT compiled from FX and from ONNX (dynamo exporter), with the ONNX file."""
    folder = tmp_path_factory.mktemp("bert")
    fx = _graph("bert", "fx")
    onnx_graph = _graph("bert", "dynamo")
    onnx_graph.save(folder / "bert.onnx")
    return {"fx": (runtime.load(slimc.compile(fx).save(folder / "fx")), fx),
            "fx_dir": folder / "fx", "onnx_file": folder / "bert.onnx",
            "onnx": (runtime.load(slimc.compile(onnx_graph).save(folder / "onnx")),
                     ort.InferenceSession(str(folder / "bert.onnx"),
                                          providers=["CPUExecutionProvider"]))}


def _ids(*values) -> np.ndarray:
    ids = np.arange(8, dtype=np.int64).reshape(1, 8)
    ids[0, :len(values)] = values
    return ids


@pytest.mark.parametrize("value", [VOCAB, -1, -VOCAB, 2**31, 2**32 + 5, np.iinfo(np.int64).max,
                                   np.iinfo(np.int64).min])
def test_fx_refuses_exactly_what_torch_refuses(bert_builds, value):
    m, g = bert_builds["fx"]
    ids = _ids(3, value)
    with pytest.raises(IndexError):
        g.to_torch()(torch.from_numpy(ids))
    # 2**32 + 5 would pass as 5 through the model's int32 cast: the check reads the int64 input
    with pytest.raises(IndexRangeError, match=rf"'{m.input_names[0]}' holds {value} at "
                                              rf"position \(0, 1\).*from 0 to {VOCAB - 1}"):
        m(ids)
    np.testing.assert_allclose(m(_ids(0, VOCAB - 1))[0], g.run(_ids(0, VOCAB - 1))[0], atol=ATOL)


@pytest.mark.parametrize("value", [-1, -VOCAB, VOCAB - 1, VOCAB, -VOCAB - 1, 2**40])
def test_onnx_takes_what_onnxruntime_takes(bert_builds, value):
    m, session = bert_builds["onnx"]
    ids = _ids(value)
    feed = {session.get_inputs()[0].name: ids}
    if -VOCAB <= value < VOCAB:
        np.testing.assert_allclose(m(ids)[0], session.run(None, feed)[0], atol=ATOL)
        return
    with pytest.raises(Exception, match="out of data bounds|indices"):
        session.run(None, feed)
    with pytest.raises(IndexRangeError, match=rf"from {-VOCAB} to {VOCAB - 1}"):
        m(ids)


def test_an_artifact_from_before_the_check_loads_with_a_warning(bert_builds, tmp_path):
    import json
    _, g = bert_builds["fx"]
    src = slimc.compile(g).save(tmp_path / "old")
    meta = json.loads((src / runtime.METADATA_FILE).read_text())
    del meta["index_ranges"]
    (src / runtime.METADATA_FILE).write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="did not record the valid range of index inputs"):
        old = runtime.load(src)
    assert old.index_ranges == {}
    np.testing.assert_allclose(old(_ids(1, 2))[0], g.run(_ids(1, 2))[0], atol=ATOL)



def test_cli_run_refuses_an_out_of_range_id_with_exit_2(bert_builds, tmp_path):
    import subprocess
    import sys
    m, _ = bert_builds["fx"]
    inputs = tmp_path / "bad.npz"
    np.savez(inputs, **{m.input_names[0]: _ids(4, 40_000)})
    r = subprocess.run([sys.executable, "-m", "slimc.cli", "run", str(bert_builds["fx_dir"]),
                        "--inputs", str(inputs)], capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "slimc: error: Input" in r.stderr and "holds 40000 at position (0, 1)" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_compile_names_the_checked_inputs(bert_builds, tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "slimc.cli", "compile",
                        str(bert_builds["onnx_file"]), "--target", "x86", "-o",
                        str(tmp_path / "art")], capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    name = bert_builds["onnx"][0].input_names[0]
    assert f"index inputs checked before each call: {name} in [-{VOCAB}, {VOCAB - 1}]" \
        in r.stderr
