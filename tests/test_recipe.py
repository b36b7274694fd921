"""Recipes: TOML → validated pass list → PassManager."""

from __future__ import annotations

import numpy as np
import pytest
from zoo import ZOO

import slimc
from slimc.errors import InputFileError, OptionError
from slimc.recipe import Recipe


def _write(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_recipe_runs_passes_in_order(tmp_path):
    p = _write(tmp_path, 'name = "small"\n[[passes]]\nname = "cleanup"\nfold_constants = false\n'
                         '[[passes]]\nname = "cleanup"\n[compile]\ntarget = "x86"\n')
    r = Recipe.load(p)
    assert r.name == "small" and r.compile == {"target": "x86"}
    assert r.passes == [("cleanup", {"fold_constants": False}), ("cleanup", {})]
    module, inputs, _ = ZOO["bert"]()
    g = slimc.capture(module, inputs)
    out, report = r.apply(g, check_inputs=[g.example_inputs])
    assert [row.name for row in report.rows] == ["cleanup", "cleanup"]
    assert out.history[-2:] == ["cleanup", "cleanup"]
    np.testing.assert_allclose(out.run()[0], g.run()[0], atol=1e-5)


@pytest.mark.parametrize("text,match", [
    ('bogus = 1\n', "unknown key.*'bogus'.*Valid top-level keys"),
    ('[[passes]]\nname = "nope"\n', "Unknown pass 'nope'"),
    ('[[passes]]\nname = "cleanup"\nfold = true\n', "no option 'fold'.*fold_constants"),
    ('[[passes]]\nname = "cleanup"\nfold_constants = "yes"\n', "wrong type"),
    ('[[passes]]\nfold_constants = true\n', "has no name"),
    ('[compile]\ntargett = "x86"\n', "unknown \\[compile\\] key.*'targett'"),
    ('passes = 3\n', "array of tables"),
])
def test_recipe_errors_name_the_key(tmp_path, text, match):
    with pytest.raises(OptionError, match=match):
        Recipe.load(_write(tmp_path, text))


def test_recipe_file_errors(tmp_path):
    with pytest.raises(InputFileError, match="No such recipe"):
        Recipe.load(tmp_path / "missing.toml")
    with pytest.raises(InputFileError, match="not valid TOML"):
        Recipe.load(_write(tmp_path, "[[passes]\nname="))


def test_shared_calib_goes_only_to_the_steps_that_read_it():
    from slimc.recipe import _reads_calib
    assert not _reads_calib("prune_ffn", {"ratio": 0.5})
    assert _reads_calib("prune_ffn", {"ratio": 0.5, "score": "wanda"})
    assert not _reads_calib("prune_ffn", {"neurons": {0: [1]}, "score": "wanda"})
    assert _reads_calib("drop_layers", {"n": 1})
    assert not _reads_calib("drop_layers", {"n": 1, "score": "last"})
    assert not _reads_calib("drop_layers", {"layers": [0]})
