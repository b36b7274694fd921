"""The `slimc` command: output of inspect, exit codes and error messages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from zoo import to_onnx

from slimc.cli import main


def _slimc(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "slimc.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300, check=False)


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "bert.onnx"
    path.write_bytes(to_onnx("bert").SerializeToString())
    return path


def test_inspect_table(bert_onnx, capsys):
    assert main(["inspect", str(bert_onnx)]) == 0
    out = capsys.readouterr().out
    assert "attention   2 blocks, 8 heads" in out
    assert "MatMul" in out and "parameters" in out


def test_inspect_json(bert_onnx, capsys):
    assert main(["inspect", str(bert_onnx), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [a["heads"] for a in info["attention"]] == [4, 4]
    assert info["inputs"][0]["dtype"] == "int64"
    assert 0.0 <= info["sparsity"] < 0.05


@pytest.mark.parametrize("content", [None, b"", b"\x08\x01garbage-not-onnx" * 10])
def test_bad_model_exit_2_without_traceback(tmp_path, content):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    r = _slimc("inspect", path)
    assert r.returncode == 2
    assert "slimc: error:" in r.stderr and str(path) in r.stderr
    assert "Traceback" not in r.stderr
    if content is not None:
        assert path.read_bytes() == content


def test_debug_shows_traceback(tmp_path):
    r = _slimc("--debug", "inspect", tmp_path / "missing.onnx")
    assert r.returncode != 0 and "Traceback" in r.stderr and "InputFileError" in r.stderr


def test_bad_input_shape_option():
    from slimc.cli import _parse_shapes
    from slimc.errors import OptionError
    assert _parse_shapes(["input_ids=1x128"]) == {"input_ids": (1, 128)}
    for bad in ["input_ids=1xA", "=1x2", "x=0x3"]:
        with pytest.raises(OptionError):
            _parse_shapes([bad])




def test_optimize_sparsity_writes_model_and_report(bert_onnx, tmp_path, capsys):
    out = tmp_path / "s.onnx"
    before = bert_onnx.read_bytes()
    assert main(["optimize", str(bert_onnx), "-o", str(out), "--sparsity", "0.5",
                 "--report", str(tmp_path / "rep")]) == 0
    table = capsys.readouterr().out
    assert "threshold_weights" in table and "cleanup" in table
    info = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [r["name"] for r in info["passes"]["passes"]] == ["threshold_weights", "cleanup"]
    assert bert_onnx.read_bytes() == before
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sparsity"] > 0.4


@pytest.mark.parametrize("flags,match", [
    (["--pattern", "2:4", "--sparsity", "0.5"], "fixes the sparsity"),
    (["--threshold", "0.1", "--sparsity", "0.5"], "alternatives"),
    (["--block", "1x8"], "needs --sparsity"),
    (["--sparsity", "0.5", "--block", "1by8"], "not ROWSxCOLS"),
    (["--sparsity", "1.5"], "sparsity"),
])
def test_optimize_bad_flags(bert_onnx, tmp_path, flags, match):
    out = tmp_path / "o.onnx"
    r = _slimc("optimize", bert_onnx, "-o", out, *flags)
    assert r.returncode == 2, r.stderr
    assert match in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
