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


