"""Fuzzing: generated Transformer configs through capture → every pass → compile, and mutated ONNX
protobufs through ``slimc.load`` + ``passes.cleanup``.

(a) hypothesis draws small Transformers — torch ``nn.TransformerEncoderLayer`` stacks (1-2 layers,
hidden 16-64, 1-4 heads, with/without biases, pre/post LayerNorm) and transformers' Llama (GQA:
query heads in groups over fewer key/value heads) — and checks the passes' invariants: exact
passes keep the outputs (atol 1e-4), ``prune_heads`` leaves the head counts it was asked for
(``attention_blocks()``), ``threshold_weights`` zeroes exactly round(s·n) weights per layer,
``factorize_low_rank`` keeps the outputs at energy 1 and gives the rank asked for, ``quantize``
inserts fake-quant and stays close; the cleaned-up graph compiled by TVM computes what torch does.

(b) seeded mutations of a small valid ONNX model (byte flips, deleted nodes, renamed inputs,
changed element types and dimensions, duplicated outputs): every outcome is a SlimcError or a
graph whose outputs (after cleanup) equal onnxruntime's on the mutated file where onnxruntime
accepts it — never another exception, never a hang.

CI runs a bounded, derandomized number of examples (a few seconds each). A longer run::

    SLIMC_FUZZ_EXAMPLES=500 .venv/bin/pytest tests/test_fuzz.py

scales every hypothesis test to that many examples and the ONNX mutation loop to that many seeds.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from deadline import deadline
from hypothesis import strategies as st

import slimc
from slimc import passes
from slimc.errors import SlimcError, UnsupportedError

LONG = int(os.environ.get("SLIMC_FUZZ_EXAMPLES", "0"))
ATOL = 1e-4


def _examples(ci: int) -> int:
    return LONG or ci


def _fuzz_settings(ci: int):
    return settings(max_examples=_examples(ci), deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


def _deadline(seconds: int, what: str):
    return deadline(seconds, f"{what}: no result after {seconds} s (a hang)")


# -- (a) generated Transformers --------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    family: str          # "encoder" (torch nn) or "llama" (transformers, GQA)
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    seq: int
    bias: bool
    pre_norm: bool
    seed: int

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


@st.composite
def configs(draw, family: str | None = None) -> Config:
    family = family or draw(st.sampled_from(["encoder", "llama"]))
    heads = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([d for d in (4, 8, 16) if 16 <= heads * d <= 64]))
    kv = heads if family == "encoder" else draw(st.sampled_from(
        [k for k in range(1, heads + 1) if heads % k == 0]))
    return Config(family, draw(st.integers(1, 2)), heads, kv, head_dim, draw(st.integers(1, 16)),
                  draw(st.booleans()), True if family == "llama" else draw(st.booleans()),
                  draw(st.integers(0, 2**16)))


class _Encoder(torch.nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(c.hidden, c.heads, 2 * c.hidden, dropout=0.0,
                                             batch_first=True, norm_first=c.pre_norm,
                                             bias=c.bias)
            for _ in range(c.layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class _Llama(torch.nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel
        cfg = LlamaConfig(hidden_size=c.hidden, num_hidden_layers=c.layers,
                          num_attention_heads=c.heads, num_key_value_heads=c.kv_heads,
                          head_dim=c.head_dim, intermediate_size=2 * c.hidden, vocab_size=64,
                          max_position_embeddings=32, use_cache=False, attention_bias=c.bias,
                          mlp_bias=c.bias)
        self.model = LlamaModel._from_config(cfg, attn_implementation="sdpa").eval()

    def forward(self, ids):
        return self.model(ids)["last_hidden_state"]


def build(c: Config):
    torch.manual_seed(c.seed)
    gen = torch.Generator().manual_seed(c.seed)
    if c.family == "encoder":
        return _Encoder(c).eval(), (torch.randn(1, c.seq, c.hidden, generator=gen),)
    return _Llama(c).eval(), (torch.randint(0, 64, (1, c.seq), generator=gen),)


def _close(got, want, atol=ATOL):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)


def _heads_to_remove(c: Config, rnd) -> tuple[dict, list[tuple[int, int]]]:
    """A random removal that prune_heads must accept, and the (heads, kv heads) it leaves per
    layer. GQA: the same number of query heads from every group, or whole groups."""
    plan, left = {}, []
    group = c.heads // c.kv_heads
    for layer in range(c.layers):
        if c.heads == 1 or rnd.random() < 0.25:
            left.append((c.heads, c.kv_heads))
            continue
        if c.kv_heads == c.heads:  # plain multi-head: any proper subset
            n = int(rnd.integers(1, c.heads))
            plan[layer] = sorted(int(h) for h in rnd.choice(c.heads, n, replace=False))
            left.append((c.heads - n, c.kv_heads - n))
        elif c.kv_heads == 1 or rnd.random() < 0.5:
            r = int(rnd.integers(1, group))  # r query heads out of every group
            plan[layer] = sorted(g * group + int(j) for g in range(c.kv_heads)
                                 for j in rnd.choice(group, r, replace=False))
            left.append((c.heads - r * c.kv_heads, c.kv_heads))
        else:  # whole groups, not all of them
            n = int(rnd.integers(1, c.kv_heads))
            groups = rnd.choice(c.kv_heads, n, replace=False)
            plan[layer] = sorted(int(g) * group + j for g in groups for j in range(group))
            left.append((c.heads - n * group, c.kv_heads - n))
    return plan, left


def _check_passes(c: Config) -> None:
    module, inputs = build(c)
    with torch.no_grad():
        want = [module(*inputs).numpy()]
    g = slimc.capture(module, inputs)
    _close(g.run(), want)
    blocks = g.attention_blocks()
    assert [(b.num_heads, b.num_kv_heads, b.head_dim) for b in blocks] == \
        [(c.heads, c.kv_heads, c.head_dim)] * c.layers

    for exact in (passes.cleanup, passes.fuse):
        _close(exact(g).run(), want)

    rnd = np.random.default_rng(c.seed)
    plan, left = _heads_to_remove(c, rnd)
    pruned = passes.prune_heads(g, heads=plan)
    assert [(b.num_heads, b.num_kv_heads) for b in pruned.attention_blocks()] == left
    assert pruned.run()[0].shape == want[0].shape

    s = float(rnd.choice([0.25, 0.5, 0.75]))
    res = passes.threshold_weights.run(g, sparsity=s)
    assert res.stats["layers"], "threshold_weights edited nothing"
    for name in res.stats["layers"]:
        w = res.graph.get_weight(name)
        assert abs(int(np.count_nonzero(w == 0)) - s * w.size) <= 0.5, (name, s, w.shape)

    _close(passes.factorize_low_rank(g, energy=1.0).run(), want)
    rank = int(rnd.integers(1, c.hidden // 2 + 1))
    res = passes.factorize_low_rank.run(g, rank=rank, only_if_smaller=False)
    assert res.stats["layers"] and all(v["rank"] == min(rank, *v["shape"])
                                       for v in res.stats["layers"].values())

    q = passes.quantize.run(g, calib=[tuple(x.numpy() for x in inputs)])
    assert q.stats["qdq_pairs"] > 0
    out = q.graph.run()[0]
    assert np.isfinite(out).all()
    # int8 fake-quant of a small random model: within a tenth of the output's scale
    assert np.abs(out - want[0]).max() <= 0.1 * np.abs(want[0]).max() + 1e-3


@_fuzz_settings(3)
@given(configs("encoder"))
def test_fuzz_encoder_passes(c):
    with _deadline(120, str(c)):
        _check_passes(c)


@_fuzz_settings(2)
@given(configs("llama"))
def test_fuzz_llama_gqa_passes(c):
    with _deadline(120, str(c)):
        _check_passes(c)


def test_prune_heads_multi_query_attention():
    c = Config("llama", 1, 2, 1, 8, 4, False, True, 0)
    module, inputs = build(c)
    """Found by test_fuzz_llama_gqa_passes: with one key/value head the head axis has size 1,
    which the reshape rules attached to the sequence axis."""
    from test_prune_heads import zeroed
    g = slimc.capture(module, inputs)
    pruned = passes.prune_heads(g, heads={0: [1]})
    assert [(b.num_heads, b.num_kv_heads) for b in pruned.attention_blocks()] == [(1, 1)]
    want = zeroed(g, {0: [1]}).run(*g.example_inputs)[0]
    np.testing.assert_allclose(pruned.run(*g.example_inputs)[0], want, rtol=1e-5, atol=1e-5)


@_fuzz_settings(1)
@given(configs())
def test_fuzz_compile_matches_torch(tmp_path_factory, c):
    module, inputs = build(c)
    with torch.no_grad():
        want = module(*inputs).numpy()
    g = passes.cleanup(slimc.capture(module, inputs))
    with _deadline(300, str(c)):
        art = slimc.compile(g, target="x86")
    path = art.save(tmp_path_factory.mktemp("art") / "a")
    got = slimc.runtime.load(path)(*[x.numpy() for x in inputs])
    np.testing.assert_allclose(got[0], want, rtol=0, atol=ATOL)


# -- (b) mutated ONNX protobufs --------------------------------------------------------------
def _base_model() -> onnx.ModelProto:
    """nn.MultiheadAttention + a residual, exported by TorchScript (opset 17): attention
    structure, shape arithmetic, initializers and Constants to mutate."""
    import io

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(self.attn(x, x, x)[0]) + x

    torch.manual_seed(0)
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    buf = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on MHA's shape checks
            torch.onnx.export(Block().eval(), (torch.randn(1, 4, 16),), buf, dynamo=False,
                              opset_version=17, input_names=["x"], output_names=["y"])
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return onnx.load_from_string(buf.getvalue())


_DTYPES = [onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64,
           onnx.TensorProto.FLOAT16, onnx.TensorProto.BOOL, onnx.TensorProto.UNDEFINED, 999]


def mutate(model: onnx.ModelProto, seed: int) -> bytes:
    """One seeded mutation of ``model``, serialized (byte flips work on the bytes)."""
    rnd = np.random.default_rng(seed)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    kind = seed % 8
    pick = lambda seq: seq[int(rnd.integers(len(seq)))]
    if kind == 0:  # flip bytes
        data = bytearray(m.SerializeToString())
        for pos in rnd.integers(0, len(data), size=int(rnd.integers(1, 8))):
            data[pos] ^= int(rnd.integers(1, 256))
        return bytes(data)
    if kind == 1:  # delete a node
        del g.node[int(rnd.integers(len(g.node)))]
    elif kind == 2:  # rename a node input: to another value, or to nothing known
        node = pick(g.node)
        if node.input:
            i = int(rnd.integers(len(node.input)))
            values = [o for n in g.node for o in n.output] + [t.name for t in g.initializer]
            node.input[i] = pick(values) if rnd.random() < 0.7 else "renamed_away"
    elif kind == 3:  # change an initializer's element type
        pick(g.initializer).data_type = pick(_DTYPES)
    elif kind == 4:  # change an initializer's dims
        t = pick(g.initializer)
        if t.dims:
            t.dims[int(rnd.integers(len(t.dims)))] = int(rnd.integers(0, 40))
        else:
            t.dims.append(int(rnd.integers(0, 4)))
    elif kind == 5:  # change the input's element type or a dimension
        dims = g.input[0].type.tensor_type.shape.dim
        if rnd.random() < 0.5:
            g.input[0].type.tensor_type.elem_type = pick(_DTYPES)
        else:
            dims[int(rnd.integers(len(dims)))].dim_value = int(rnd.integers(-2, 20))
    elif kind == 6:  # duplicate an output: a second graph output, or a second producer
        if rnd.random() < 0.5:
            g.output.append(g.output[0])
        else:
            a, b = rnd.choice(len(g.node), 2, replace=False)
            if g.node[b].output:
                g.node[b].output[0] = g.node[a].output[0]
    else:  # swap two nodes (order) or change an attribute value
        a, b = (int(i) for i in rnd.choice(len(g.node), 2, replace=False))
        na, nb = onnx.NodeProto(), onnx.NodeProto()
        na.CopyFrom(g.node[a])
        nb.CopyFrom(g.node[b])
        g.node[a].CopyFrom(nb)
        g.node[b].CopyFrom(na)
    return m.SerializeToString()


def _ort(path: Path, x: np.ndarray):
    """onnxruntime's outputs on the file, or None where onnx's checker or onnxruntime refuse."""
    import onnxruntime as ort
    try:
        onnx.checker.check_model(onnx.load(str(path)))
        so = ort.SessionOptions()
        so.log_severity_level = 4
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: x})
    except Exception:  # noqa: BLE001 - any refusal counts as "invalid"
        return None


@pytest.fixture(scope="module")
def base_onnx():
    return _base_model()


N_MUTATIONS = _examples(48)


def test_mutation_fuzz(base_onnx, tmp_path):
    x = np.random.default_rng(0).standard_normal((1, 4, 16)).astype(np.float32)
    outcomes = {"refused": 0, "matched": 0}
    for seed in range(N_MUTATIONS):
        path = tmp_path / f"m{seed}.onnx"
        data = mutate(base_onnx, seed)
        path.write_bytes(data)
        want = _ort(path, x)
        with _deadline(60, f"mutation seed {seed}"):
            try:
                g = slimc.load(path)
                got = passes.cleanup(g).run(x)
            except SlimcError:
                outcomes["refused"] += 1
                assert path.read_bytes() == data
                continue
            except Exception as e:  # any other type is a slimc bug: name the seed
                raise AssertionError(f"mutation seed {seed}: {type(e).__name__}: {e}") from e
        assert path.read_bytes() == data
        assert want is not None, f"seed {seed}: slimc runs a model onnxruntime refuses"
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"seed {seed}")
        outcomes["matched"] += 1
    assert outcomes["refused"] and outcomes["matched"], outcomes


def test_input_without_element_type(tmp_path):
    """Minimal reproducer of mutation seed 61: an input whose element type is UNDEFINED passed
    onnx's checker and crashed input_specs() with a KeyError."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "make_bad_corpus", Path(__file__).resolve().parents[1] / "scripts" / "make_bad_corpus.py")
    corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corpus)
    m = corpus.make_model()
    m.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.UNDEFINED
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    with pytest.raises(SlimcError, match="'x' has no valid element type"):
        slimc.load(path)


@pytest.mark.parametrize("size", [1, 10**8, 200111116255233])
def test_reshape_of_shape_data_to_absurd_size(base_onnx, tmp_path, size):
    """Minimal reproducer of mutation seed 1040: a flipped byte turned the [1] a shape computation
    is reshaped to into [200111116255233]; onnx's shape inference with data propagation (which
    cleanup runs) then grew without bound (20 GB, killed). load refuses such shapes; [1] is the
    exported original and loads."""
    from onnx import numpy_helper
    m = onnx.ModelProto()
    m.CopyFrom(base_onnx)
    const = {n.output[0]: n for n in m.graph.node if n.op_type == "Constant"}
    target = next(const[n.input[1]] for n in m.graph.node if n.op_type == "Reshape"
                  and n.input[1] in const
                  and numpy_helper.to_array(const[n.input[1]].attribute[0].t).tolist() == [1])
    target.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array([size], np.int64)))
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    if size == 1:
        assert passes.cleanup(slimc.load(path)).run()[0].shape == (1, 4, 16)
        return
    with pytest.raises(SlimcError, match=f"asks for the shape \\[{size}\\]"):
        slimc.load(path)


def test_name_not_utf8(base_onnx, tmp_path):
    """Minimal reproducer of mutation seeds 2088 / 2192: one flipped bit in a node name makes it
    invalid UTF-8; protobuf hands it back as bytes, the checker accepts it, and cleanup crashed
    in onnx-graphsurgeon with a UnicodeDecodeError."""
    data = base_onnx.SerializeToString()
    name = b"/attn/Transpose_2"
    field = bytes([0x1A, len(name)]) + name  # NodeProto.name: field 3, length-delimited
    assert data.count(field) == 1
    path = tmp_path / "m.onnx"
    path.write_bytes(data.replace(field, field.replace(b"Tra", b"Tr\xa3")))
    with pytest.raises(SlimcError, match="not valid UTF-8"):
        slimc.load(path)
