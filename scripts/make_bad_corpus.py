"""Generate slimc's hostile-input corpus (``tests/data/bad/`` by default).

Every file is derived, deterministically, from one small valid ONNX model built here with
``onnx.helper`` (an MLP block with a residual: MatMul → Add → Relu → MatMul → Add). Running the
script twice gives byte-identical files; ``tests/test_bad_inputs.py`` regenerates the corpus and
compares, so the committed files cannot drift from this script.

``manifest.json`` lists every file with its kind (``onnx``, ``recipe``, ``calib``) and what slimc
must do with it:

* ``"error"``: every entry point (load, inspect, optimize, compile) raises a
  :class:`slimc.errors.SlimcError` whose message contains each string of ``"names"``;
* ``"loads"``: ``slimc.load`` and ``slimc inspect`` succeed (the model is valid ONNX, e.g. a custom
  domain or NaN weights), and the entry points in ``"fails"`` (passes by name, ``optimize``,
  ``compile``) raise a SlimcError naming ``"names"``;
* ``"oracle"`` (bit flips): whatever ``onnx.checker`` + onnxruntime say: a SlimcError when they
  reject the file, a loaded model with onnxruntime's outputs when they accept it.

The model over 2 GiB is not written here (it is made at test time with a sparse data file, see
:func:`write_huge_external`). Usage::

    python scripts/make_bad_corpus.py [OUT_DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
HIDDEN = 8
BIT_FLIP_SEEDS = (1, 2, 3, 4, 5, 6)


# -- the valid model everything derives from ------------------------------------------------
def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W1": rng.standard_normal((HIDDEN, 2 * HIDDEN)).astype(np.float32),
        "b1": rng.standard_normal(2 * HIDDEN).astype(np.float32),
        "W2": rng.standard_normal((2 * HIDDEN, HIDDEN)).astype(np.float32),
        "b2": rng.standard_normal(HIDDEN).astype(np.float32),
    }


def _nodes() -> list[onnx.NodeProto]:
    return [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="act"),
        helper.make_node("MatMul", ["h2", "W2"], ["h3"], name="fc2"),
        helper.make_node("Add", ["h3", "b2"], ["h4"], name="fc2_bias"),
        helper.make_node("Add", ["h4", "x"], ["y"], name="residual"),
    ]


def make_model(nodes=None, weights=None, x_shape=(1, 4, HIDDEN), opset: int = OPSET,
               extra_opsets: dict | None = None, value_info=()) -> onnx.ModelProto:
    weights = _weights() if weights is None else weights
    graph = helper.make_graph(
        _nodes() if nodes is None else nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x_shape))],
        [numpy_helper.from_array(w, n) for n, w in weights.items()],
        value_info=list(value_info))
    opsets = [helper.make_opsetid("", opset)]
    opsets += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="make_bad_corpus")
    model.ir_version = IR_VERSION
    return model


def base_bytes() -> bytes:
    return make_model().SerializeToString()


# -- the cases ------------------------------------------------------------------------------
def _flip_bits(data: bytes, seed: int) -> bytes:
    """Flip ``seed`` bits (1, 2, 3, ... for seeds 1, 2, 3, ...) at seeded random positions."""
    rng = np.random.default_rng(seed)
    buf = bytearray(data)
    for pos in rng.integers(0, len(buf) * 8, size=seed):
        buf[pos // 8] ^= 1 << int(pos % 8)
    return bytes(buf)


def _with_external(model: onnx.ModelProto, name: str, location: str, length: int | None = None):
    """``model`` with initializer ``name`` moved to external data at ``location`` (offset 0,
    ``length`` bytes declared); returns (model, the tensor's raw bytes)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    t = next(i for i in m.graph.initializer if i.name == name)
    raw = numpy_helper.to_array(t).tobytes()
    t.ClearField("float_data")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"),
                       ("length", str(len(raw) if length is None else length))):
        kv = t.external_data.add()
        kv.key, kv.value = key, value
    return m, raw


def onnx_cases() -> dict[str, tuple[bytes, dict]]:
    """File name → (content, manifest entry) for every hostile ONNX file."""
    base = base_bytes()
    cases: dict[str, tuple[bytes, dict]] = {}

    def add(name, content, expect="error", names=(), **extra):
        cases[name] = (content, {"kind": "onnx", "expect": expect, "names": list(names), **extra})

    add("empty.onnx", b"", names=["empty"])
    add("text.onnx", b"This is not a model.\nJust some text that someone saved as .onnx\n",
        names=["not a valid ONNX model"])
    add("truncated_half.onnx", base[:len(base) // 2], names=["not a valid ONNX model"])
    add("truncated_tail.onnx", base[:-3], names=["not a valid ONNX model"])
    add("truncated_head.onnx", base[:16], names=["not a valid ONNX model"])
    for seed in BIT_FLIP_SEEDS:
        add(f"bitflip_{seed}.onnx", _flip_bits(base, seed), expect="oracle")

    # graph structure
    nodes = _nodes()
    # act reads h4 (made later by fc2_bias, which depends on act): a cycle
    nodes[2] = helper.make_node("Relu", ["h4"], ["h2"], name="act")
    add("cycle.onnx", make_model(nodes).SerializeToString(),
        names=["cycle", "'act'", "'fc2'"])
    nodes = _nodes()
    nodes[2] = helper.make_node("Relu", ["nobody_makes_this"], ["h2"], name="act")
    add("dangling_input.onnx", make_model(nodes).SerializeToString(),
        names=["'nobody_makes_this'", "dangling"])
    w = _weights()
    del w["W2"]
    vi = [helper.make_tensor_value_info("W2", TensorProto.FLOAT, [2 * HIDDEN, HIDDEN])]
    add("missing_initializer.onnx", make_model(weights=w, value_info=vi).SerializeToString(),
        names=["'W2'", "missing initializer"])
    nodes = _nodes()
    nodes[2] = helper.make_node("FancyActivation", ["h1"], ["h2"], name="act")
    add("unknown_op.onnx", make_model(nodes).SerializeToString(), names=["FancyActivation"])
    nodes = _nodes()
    nodes[2] = helper.make_node("FancyActivation", ["h1"], ["h2"], name="act",
                                domain="com.example.custom")
    add("unknown_domain.onnx",
        make_model(nodes, extra_opsets={"com.example.custom": 1}).SerializeToString(),
        expect="loads", fails=["optimize", "compile"], names=["FancyActivation"])
    add("opset_too_new.onnx", make_model(opset=999).SerializeToString(), names=["999"])
    m = make_model()
    m.ir_version = 99
    add("ir_version_too_new.onnx", m.SerializeToString(), names=["ir_version 99"])

    # shapes
    add("zero_dim.onnx", make_model(x_shape=(1, 0, HIDDEN)).SerializeToString(),
        names=["'x'", "0"])
    m = make_model()
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = -4
    add("negative_dim.onnx", m.SerializeToString(), names=["'x'", "-4"])

    # non-finite weights: valid ONNX; passes whose maths they would corrupt refuse them
    for label, value in (("nan", np.nan), ("inf", np.inf)):
        w = _weights()
        w["W1"][3, 5] = value
        w["W2"][0, 1] = -value
        # compile refuses NaN only: TVM's kernels drop NaN (max(NaN, 0) = 0), keep inf
        add(f"{label}_weights.onnx", make_model(weights=w).SerializeToString(), expect="loads",
            fails=["quantize", "threshold_weights", "factorize_low_rank"]
            + (["compile"] if label == "nan" else []), names=["W1", "NaN"])

    # external data: the referenced file missing, shorter than declared, outside the folder
    m, raw = _with_external(make_model(), "W1", "missing.bin")
    add("external_missing.onnx", m.SerializeToString(), names=["missing.bin"])
    m, raw = _with_external(make_model(), "W1", "external_short.bin")
    add("external_short.onnx", m.SerializeToString(), names=["W1"],
        data={"external_short.bin": raw[:len(raw) // 2].hex()})
    m, raw = _with_external(make_model(), "W1", "../outside.bin")
    add("external_outside.onnx", m.SerializeToString(), names=["outside.bin"])
    return cases


_RECIPES = {
    "recipe_wrong_type.toml": ('[[passes]]\nname = "cleanup"\nfold_constants = "yes"\n',
                               ["fold_constants", "wrong type"]),
    "recipe_wrong_value.toml": ('[[passes]]\nname = "threshold_weights"\nsparsity = "half"\n',
                                ["sparsity", "'half'"]),
    "recipe_unknown_key.toml": ('passses = []\n\n[[passes]]\nname = "cleanup"\n',
                                ["passses"]),
    "recipe_unknown_option.toml": ('[[passes]]\nname = "threshold_weights"\nsparsityy = 0.5\n',
                                   ["sparsityy"]),
    "recipe_unknown_pass.toml": ('[[passes]]\nname = "prune_head"\nratio = 0.5\n',
                                 ["prune_head"]),
    "recipe_no_name.toml": ('[[passes]]\nratio = 0.5\n', ["no name"]),
    "recipe_passes_not_tables.toml": ('passes = ["cleanup", "fuse"]\n', ["passes"]),
    "recipe_compile_not_table.toml": ('compile = "x86"\n', ["compile"]),
    "recipe_bad_syntax.toml": ('[[passes]\nname = "cleanup"\n', ["not valid TOML"]),
    "recipe_binary.toml": ("\xff\xfe\x00\x01 binary", ["not a text file"]),
    "recipe_out_of_range.toml": ('[[passes]]\nname = "threshold_weights"\nsparsity = 1.5\n',
                                 ["sparsity"]),
    "recipe_data_option.toml": ('[[passes]]\nname = "quantize"\ncalib = [1, 2]\n',
                                ["calib"]),
}


def recipe_cases() -> dict[str, tuple[bytes, dict]]:
    out = {}
    for name, (text, names) in _RECIPES.items():
        out[name] = (text.encode("latin-1"), {"kind": "recipe", "expect": "error", "names": names})
    return out


def _npz_bytes(**arrays) -> bytes:
    """An .npz with fixed member timestamps (numpy.savez stamps the current time)."""
    import io
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(2020, 1, 1, 0, 0, 0))
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arr), allow_pickle=False)
            z.writestr(info, member.getvalue())
    return buf.getvalue()


def calib_cases() -> dict[str, tuple[bytes, dict]]:
    """Calibration files for the base model (input x: float32 (1, 4, 8); an .npz holds N
    batches stacked on axis 0)."""
    rng = np.random.default_rng(0)
    good = rng.standard_normal((3, 1, 4, HIDDEN)).astype(np.float32)

    def case(data, names):
        return data, {"kind": "calib", "expect": "error", "names": names}

    return {
        "calib_wrong_shape.npz": case(_npz_bytes(x=good[:, :, :, :5]), ["'x'", "(1, 4, 5)"]),
        "calib_wrong_rank.npz": case(_npz_bytes(x=good[0]), ["'x'"]),
        "calib_wrong_dtype.npz": case(_npz_bytes(x=good.astype(np.int64)), ["'x'", "int64"]),
        "calib_strings.npz": case(_npz_bytes(x=np.array(["a", "b"])), ["'x'"]),
        "calib_wrong_name.npz": case(_npz_bytes(input_ids=good), ["input_ids"]),
        "calib_not_npz.npz": case(b"x = [1, 2, 3]\n", ["not a readable .npz"]),
        "calib_pickled.npz": case(_pickled_npz(), ["not a readable .npz"]),
    }


def _pickled_npz() -> bytes:
    """An .npz whose member is a pickled object array (never unpickled: allow_pickle=False)."""
    import io
    import zipfile
    member = io.BytesIO()
    np.lib.format.write_array(member, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr(zipfile.ZipInfo("x.npy", date_time=(2020, 1, 1, 0, 0, 0)), member.getvalue())
    return buf.getvalue()


# -- the model over 2 GiB (written at test time, never committed) ---------------------------
HUGE_ELEMENTS = 540_000_000  # float32: 2.16e9 bytes, over protobuf's 2 GiB limit


def write_huge_external(folder: Path, *, short: bool = False) -> Path:
    """A model whose one big initializer (``big``, HUGE_ELEMENTS float32 zeros) lives in a sparse
    external data file: over 2 GiB declared, almost nothing on disk. ``short=True`` makes the data
    file 1 MiB shorter than declared. Returns the .onnx path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    nbytes = HUGE_ELEMENTS * 4
    big = TensorProto(name="big", data_type=TensorProto.FLOAT, dims=[HUGE_ELEMENTS])
    big.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "huge.bin"), ("offset", "0"), ("length", str(nbytes))):
        kv = big.external_data.add()
        kv.key, kv.value = key, value
    nodes = [helper.make_node("ReduceSum", ["big"], ["s"], name="sum", keepdims=1),
             helper.make_node("Add", ["x", "s"], ["y"], name="add")]
    graph = helper.make_graph(
        nodes, "huge", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [big])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    path = folder / "huge.onnx"
    path.write_bytes(model.SerializeToString())
    with open(folder / "huge.bin", "wb") as f:
        f.truncate(nbytes - (1 << 20 if short else 0))  # sparse: no blocks written
    return path


# -- writing --------------------------------------------------------------------------------
def all_cases() -> dict[str, tuple[bytes, dict]]:
    return {**onnx_cases(), **recipe_cases(), **calib_cases()}


def write_corpus(out: Path) -> dict:
    """Write every case and ``manifest.json`` into ``out``; returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, (data, entry) in sorted(all_cases().items()):
        (out / name).write_bytes(data)
        entry = dict(entry)
        extras = entry.pop("data", {})
        for extra, hexdata in extras.items():  # files the case refers to (external data)
            (out / extra).write_bytes(bytes.fromhex(hexdata))
        if extras:
            entry["files"] = sorted(extras)
        manifest[name] = entry
    (out / "valid.onnx").write_bytes(base_bytes())
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "tests" / \
        "data" / "bad"
    manifest = write_corpus(out)
    print(f"wrote {len(manifest)} cases (+ valid.onnx, manifest.json) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
