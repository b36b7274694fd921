"""Hostile and broken inputs: every one gets a SlimcError that names the problem, never a crash,
a hang or a traceback, and the input file is byte-identical afterwards.

The corpus is ``tests/data/bad/``, written by ``scripts/make_bad_corpus.py`` (its ``manifest.json``
says what each file must do; see the script's docstring). The model over 2 GiB is made at test
time with a sparse data file. Entry points: ``slimc.load``, ``inspect``, the passes (Python API)
and ``slimc inspect / optimize / compile`` (CLI: in process for every file, in a subprocess for a
representative subset, where exit code, stderr and the absence of a traceback are checked).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from deadline import deadline

import slimc
from slimc import passes
from slimc.cli import inspect_graph, main
from slimc.errors import CaptureError, InputFileError, SlimcError
from slimc.passes.manager import verify
from slimc.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / "bad"
MANIFEST = json.loads((CORPUS / "manifest.json").read_text())
VALID = CORPUS / "valid.onnx"

_spec = importlib.util.spec_from_file_location("make_bad_corpus",
                                               ROOT / "scripts" / "make_bad_corpus.py")
corpus_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus_script)


def _cases(kind: str, expect: str | None = None) -> list[str]:
    return sorted(n for n, e in MANIFEST.items()
                  if e["kind"] == kind and (expect is None or e["expect"] == expect))


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def _deadline(seconds: int):
    """Fail (instead of hanging the suite) when the block runs longer than ``seconds``."""
    return deadline(seconds, f"no result after {seconds} s: slimc hangs on this input")


@pytest.fixture(autouse=True)
def _corpus_untouched():
    """Every test leaves the corpus folder exactly as it found it: same files, same bytes."""
    before = _digest(CORPUS)
    with _deadline(120):
        yield
    assert _digest(CORPUS) == before


def _names_in(message: str, names) -> None:
    for n in names:
        assert n in message, f"{n!r} not named in: {message}"


def _calib() -> list[tuple[np.ndarray]]:
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((1, 4, corpus_script.HIDDEN)).astype(np.float32),)
            for _ in range(3)]


# -- the corpus is what the script makes ------------------------------------------------------
def test_corpus_matches_script(tmp_path):
    corpus_script.write_corpus(tmp_path)
    assert _digest(tmp_path) == _digest(CORPUS)
    assert len(MANIFEST) >= 40
    assert not any(p.stat().st_size > 64 * 1024 for p in CORPUS.iterdir())


def test_valid_model_is_valid():
    """The control: the model the corpus derives from loads, runs as onnxruntime does."""
    import onnxruntime as ort
    g = slimc.load(VALID)
    x = g.sample_inputs()
    want = ort.InferenceSession(str(VALID), providers=["CPUExecutionProvider"]).run(
        None, {"x": x[0]})
    np.testing.assert_allclose(g.run(*x)[0], want[0], rtol=1e-6, atol=1e-6)


# -- ONNX files that must be refused everywhere ------------------------------------------------
@pytest.mark.parametrize("name", _cases("onnx", "error"))
def test_load_refuses(name):
    with pytest.raises(SlimcError) as info:
        slimc.load(CORPUS / name)
    _names_in(str(info.value), MANIFEST[name]["names"])
    assert info.value.fix  # every refusal says what to do


@pytest.mark.parametrize("name", _cases("onnx", "error"))
@pytest.mark.parametrize("command", ["inspect", "optimize", "compile"])
def test_cli_refuses(name, command, tmp_path, capsys):
    out = tmp_path / ("out.onnx" if command == "optimize" else "artifact")
    args = {"inspect": ["inspect", str(CORPUS / name)],
            "optimize": ["optimize", str(CORPUS / name), "-o", str(out), "--threshold", "0.1"],
            "compile": ["compile", str(CORPUS / name), "-o", str(out)]}[command]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimc: error: ") or "\nslimc: error: " in err
    _names_in(err, MANIFEST[name]["names"])
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind either


# -- valid ONNX that slimc loads, and the passes that must refuse it --------------------------
@pytest.mark.parametrize("name", _cases("onnx", "loads"))
def test_loads_and_inspects(name):
    g = slimc.load(CORPUS / name)
    info = inspect_graph(g)
    assert info["parameters"] == sum(w.size for w in g.weights().values())
    json.dumps(info)  # the --json output is JSON
    if name.startswith(("nan", "inf")):
        assert set(info["nonfinite_weights"]) == {"W1", "W2"}
    else:
        assert info["nonfinite_weights"] == {}


_PASS_CALLS = {
    "quantize": lambda g: passes.quantize(g, calib=_calib()),
    "threshold_weights": lambda g: passes.threshold_weights(g, sparsity=0.5),
    "factorize_low_rank": lambda g: passes.factorize_low_rank(g, rank=2),
    "optimize": lambda g: Recipe([("cleanup", {})]).apply(g, check_inputs=[g.sample_inputs()]),
    "compile": lambda g: slimc.compile(g),
}


@pytest.mark.parametrize("name,entry", [(n, f) for n in _cases("onnx", "loads")
                                        for f in MANIFEST[n]["fails"]])
def test_entry_point_refuses(name, entry):
    g = slimc.load(CORPUS / name)
    with pytest.raises(SlimcError) as info:
        _PASS_CALLS[entry](g)
    names = MANIFEST[name]["names"]
    _names_in(str(info.value), names)


def test_nan_weights_cli(tmp_path, capsys):
    """inspect warns; optimize with a pass that measures weights exits 2 and writes nothing;
    an exact pass (cleanup) keeps the NaN faithfully."""
    path = CORPUS / "nan_weights.onnx"
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "WARNING" in out and "W1 (1)" in out and "W2 (1)" in out
    assert main(["inspect", "--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["nonfinite_weights"] == {"W1": 1, "W2": 1}
    for flags in (["--sparsity", "0.5"], ["--low-rank", "0.9"]):
        assert main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), *flags]) == 2
        err = capsys.readouterr().err
        assert "'W1'" in err or "W1 holds" in err, err
        assert not (tmp_path / "o.onnx").exists()
    assert main(["optimize", str(path), "-o", str(tmp_path / "c.onnx")]) == 0
    w = slimc.load(tmp_path / "c.onnx").get_weight("W1")
    assert np.isnan(w[3, 5]) and np.isfinite(np.delete(w.ravel(), 3 * w.shape[1] + 5)).all()


def test_inf_weights_compile_faithfully(tmp_path):
    """Infinite weights (as in additive -inf masks) compile, and the library computes what
    onnxruntime computes, infinities and NaNs in the same places."""
    import onnxruntime as ort
    path = CORPUS / "inf_weights.onnx"
    g = slimc.load(path)
    x = g.sample_inputs()
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x[0]})[0]
    assert np.isinf(want).any() and np.isnan(want).any()
    got = slimc.runtime.load(slimc.compile(g).save(tmp_path / "art"))(*x)[0]
    np.testing.assert_array_equal(got, want)


def test_nan_weights_prune_heads():
    """Head scores from NaN weights would rank heads arbitrarily: prune_heads by score refuses,
    explicit heads={...} still works."""
    import torch
    from zoo import mha
    module, inputs, _ = mha()
    with torch.no_grad():
        module.attn.in_proj_weight[3, 5] = float("nan")
    g = slimc.capture(module, inputs)
    for scope in ("global", "per_layer"):
        with pytest.raises(SlimcError, match="not finite"):
            passes.prune_heads(g, ratio=0.5, scope=scope)
    assert passes.prune_heads(g, heads={0: [1]}).attention_blocks()[0].num_heads == 3


@pytest.mark.parametrize("command", ["optimize", "compile"])
def test_failed_command_keeps_old_output(command, tmp_path, capsys):
    """A refused run leaves an output that was already there exactly as it was."""
    if command == "optimize":
        out = tmp_path / "model.onnx"
        out.write_bytes(b"the previous model")
        argv = ["optimize", str(CORPUS / "nan_weights.onnx"), "-o", str(out), "--sparsity", "0.5"]
    else:
        out = tmp_path / "artifact"
        out.mkdir()
        (out / "marker").write_text("the previous artifact")
        argv = ["compile", str(CORPUS / "nan_weights.onnx"), "-o", str(out)]
    before = _digest(tmp_path) if out.is_file() else _digest(out)
    assert main(argv) == 2
    assert "NaN" in capsys.readouterr().err
    assert (_digest(tmp_path) if out.is_file() else _digest(out)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


# -- bit flips: onnx + onnxruntime are the oracle ---------------------------------------------
def _oracle(path: Path, x: np.ndarray):
    """onnxruntime's outputs when onnx's checker and onnxruntime accept the file, else None."""
    import onnx
    import onnxruntime as ort
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: x})
    except Exception:  # noqa: BLE001 - any refusal of theirs is "invalid"
        return None


@pytest.mark.parametrize("name", _cases("onnx", "oracle"))
def test_bit_flips_agree_with_onnxruntime(name):
    x = _calib()[0][0]
    want = _oracle(CORPUS / name, x)
    try:
        g = slimc.load(CORPUS / name)
        got = g.run(x)
        inspect_graph(g)
    except SlimcError:
        assert want is None, f"slimc refuses {name}, which onnxruntime runs"
        return
    assert want is not None, f"slimc runs {name}, which onnx/onnxruntime refuse"
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bit_flips_cover_both_outcomes():
    """The seeds give some files onnxruntime still runs and some it refuses: both paths are
    exercised above."""
    x = _calib()[0][0]
    outcomes = {_oracle(CORPUS / n, x) is None for n in _cases("onnx", "oracle")}
    assert outcomes == {True, False}


# -- external data over 2 GiB ------------------------------------------------------------------
def _stats(folder: Path) -> dict:
    """Size, modification time and, for the small files, content of each file (hashing the
    sparse 2 GiB data file would read it all)."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns,
                     hashlib.sha256(p.read_bytes()).hexdigest() if p.suffix == ".onnx" else None)
            for p in sorted(folder.iterdir())}


def test_huge_external_data_short(tmp_path):
    """Declared over 2 GiB, the data file 1 MiB short: refused before anything is read."""
    path = corpus_script.write_huge_external(tmp_path, short=True)
    before = _stats(tmp_path)
    with pytest.raises(InputFileError) as info:
        slimc.load(path)
    _names_in(str(info.value), ["'big'"])
    assert _stats(tmp_path) == before


@pytest.mark.slow
def test_huge_external_data_loads(tmp_path):
    """A valid model over protobuf's 2 GiB limit (sparse data file) loads and inspects (about
    20-90 s and 6.5 GB peak on this machine: slow for its memory)."""
    path = corpus_script.write_huge_external(tmp_path)
    before = _stats(tmp_path)
    g = slimc.load(path)
    info = inspect_graph(g)
    assert info["parameters"] == corpus_script.HUGE_ELEMENTS
    assert info["serialized_bytes"] > 2**31
    assert info["nonzeros"] == 0
    verify(g)   # the pass manager's well-formedness check (protobuf's ByteSize() refused it)
    del g, info
    assert _stats(tmp_path) == before


# -- a torch module torch.export cannot capture ------------------------------------------------
class _DataDependent(__import__("torch").nn.Module):
    def __init__(self):
        import torch
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        if y.sum() > 0:  # data-dependent Python control flow: not traceable
            return y * 2
        return y - 1


def test_capture_refuses_data_dependent_control_flow():
    import torch
    m = _DataDependent()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(CaptureError) as info:
        slimc.capture(m, (torch.randn(2, 8),))
    _names_in(str(info.value), ["_DataDependent", "data-dependent"])
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


# -- recipes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _cases("recipe"))
def test_recipe_refused(name):
    g = slimc.load(VALID)
    with pytest.raises(SlimcError) as info:
        Recipe.load(CORPUS / name).apply(g)
    _names_in(str(info.value), MANIFEST[name]["names"])


@pytest.mark.parametrize("name", _cases("recipe"))
def test_recipe_refused_cli(name, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(VALID), "--recipe", str(CORPUS / name), "-o", str(out)]) == 2
    _names_in(capsys.readouterr().err, MANIFEST[name]["names"])
    assert list(tmp_path.iterdir()) == []


# -- calibration data --------------------------------------------------------------------------
@pytest.mark.parametrize("name", _cases("calib"))
def test_calib_refused_cli(name, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(VALID), "--quantize", "int8", "--calib", str(CORPUS / name),
                 "-o", str(out)]) == 2
    _names_in(capsys.readouterr().err, MANIFEST[name]["names"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", [n for n in _cases("calib")
                                  if n not in ("calib_not_npz.npz", "calib_pickled.npz",
                                               "calib_wrong_name.npz")])
def test_calib_refused_api(name):
    """The same arrays given to quantize directly (per batch along axis 0)."""
    g = slimc.load(VALID)
    with np.load(CORPUS / name) as data:
        arrays = [data[k] for k in data.files]
    batches = [tuple(a[i] for a in arrays) for i in range(len(arrays[0]))]
    with pytest.raises(SlimcError) as info:
        passes.quantize(g, calib=batches)
    _names_in(str(info.value), MANIFEST[name]["names"])


# -- the command in a subprocess: exit code 2, a message, no traceback, no hang ---------------
_SUBPROCESS = [
    ["inspect", "empty.onnx"],
    ["inspect", "external_short.onnx"],
    ["inspect", "bitflip_4.onnx"],
    ["optimize", "cycle.onnx", "-o", "{out}/m.onnx", "--threshold", "0.1"],
    ["optimize", "nan_weights.onnx", "-o", "{out}/m.onnx", "--quantize", "int8", "--calib",
     "{calib}"],
    ["optimize", "valid.onnx", "-o", "{out}/m.onnx", "--recipe", "recipe_wrong_type.toml"],
    ["optimize", "valid.onnx", "-o", "{out}/m.onnx", "--quantize", "int8", "--calib",
     "calib_wrong_dtype.npz"],
    ["compile", "unknown_domain.onnx", "-o", "{out}/art"],
    ["inspect", "zero_dim.onnx"],
]


@pytest.mark.parametrize("argv", _SUBPROCESS, ids=lambda a: f"{a[0]}-{a[1]}")
def test_cli_subprocess(argv, tmp_path):
    calib = tmp_path / "calib" / "good.npz"
    calib.parent.mkdir()
    np.savez(calib, x=np.stack([b[0] for b in _calib()]))
    out = tmp_path / "out"
    out.mkdir()
    args = [a.format(out=out, calib=calib) for a in argv]
    args = [str(CORPUS / a) if (CORPUS / a).is_file() else a for a in args]
    proc = subprocess.run([sys.executable, "-m", "slimc.cli", *args], check=False,
                          capture_output=True,
                          text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "slimc: error: " in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert list(out.iterdir()) == []
