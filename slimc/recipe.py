"""Recipes: an ordered list of passes with their options, and a target, in a TOML file.

```toml
name = "minilm-small"

[[passes]]
name = "prune_heads"
ratio = 0.3
score = "magnitude"

[[passes]]
name = "cleanup"

[compile]
target = "x86"
```

``Recipe.load(path).apply(graph)`` runs the passes through a :class:`PassManager` and returns the
new graph and the per-pass report; ``slimc optimize MODEL --recipe recipe.toml`` does the same from
the command line. Every option of every registered pass is reachable; an unknown key is an error
that names the key and the valid ones.
"""

from __future__ import annotations

import inspect
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputFileError, OptionError

_TOP_KEYS = ("name", "description", "passes", "compile", "on_no_match")
_COMPILE_KEYS = ("target", "db", "trials", "seconds", "input_shapes")
# options that carry data, not configuration: given to apply(), never written in a recipe
_DATA_OPTIONS = ("calib", "data", "teacher")


@dataclass
class Recipe:
    passes: list[tuple[str, dict]]
    compile: dict = field(default_factory=dict)
    name: str = "recipe"
    description: str = ""
    # "error": a pass asked for a change that matches nothing stops the recipe; "warn": it warns
    on_no_match: str = "error"

    @classmethod
    def load(cls, path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise InputFileError(f"No such recipe file: {path}.", "Check the path.")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise InputFileError(f"{path} is not valid TOML: {e}.", "Fix the recipe's syntax.") \
                from None
        except UnicodeDecodeError:
            raise InputFileError(f"{path} is not a text file.", "A recipe is TOML text.") \
                from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "recipe") -> Recipe:
        from . import passes as passes_mod
        unknown = sorted(set(data) - set(_TOP_KEYS))
        if unknown:
            raise OptionError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}.",
                              f"Valid top-level keys: {', '.join(_TOP_KEYS)}.")
        steps = data.get("passes", [])
        if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
            raise OptionError(f"{source}: 'passes' must be an array of tables ([[passes]]).",
                              "Write each pass as a [[passes]] table with a name = \"...\" key.")
        out = []
        for i, step in enumerate(steps):
            step = dict(step)
            pname = step.pop("name", None)
            if not isinstance(pname, str):
                raise OptionError(f"{source}: pass #{i + 1} has no name.",
                                  "Add name = \"<pass>\"; `slimc passes --list` shows them.")
            info = passes_mod.get_pass(pname)
            _check_step(source, i, info, step)
            out.append((pname, step))
        comp = data.get("compile", {})
        if not isinstance(comp, dict):
            raise OptionError(f"{source}: 'compile' must be a table ([compile]).",
                              f"Valid keys: {', '.join(_COMPILE_KEYS)}.")
        bad = sorted(set(comp) - set(_COMPILE_KEYS))
        if bad:
            raise OptionError(f"{source}: unknown [compile] key(s) {', '.join(map(repr, bad))}.",
                              f"Valid keys: {', '.join(_COMPILE_KEYS)}.")
        name = data.get("name", Path(source).stem)
        if not isinstance(name, str):
            raise OptionError(f"{source}: 'name' must be a string.", "Quote it.")
        from .passes._no_match import check_policy
        policy = check_policy(data.get("on_no_match", "error"))
        return cls(out, comp, name, str(data.get("description", "")), policy)

    def apply(self, graph, *, calib=None, check_inputs=None, instruments=()):
        """Run the passes; returns ``(graph, report)``. ``calib`` is handed to every pass that
        takes calibration batches; ``check_inputs`` turns on the per-pass numeric check."""
        from .passes import PassManager, get_pass
        steps = []
        for pname, options in self.passes:
            opts = dict(options)
            if calib is not None and "calib" in get_pass(pname).options \
                    and _reads_calib(pname, opts):
                opts.setdefault("calib", calib)
            steps.append((pname, opts))
        return PassManager(steps, instruments=instruments, on_no_match=self.on_no_match).run(
            graph, check_inputs=check_inputs)


def _reads_calib(pname: str, opts: dict) -> bool:
    """Whether the pass reads calibration data with these options. A data-free importance
    (magnitude) refuses calib= as a likely mistake, so the shared batches go only where used."""
    if pname == "threshold_weights":
        from .passes.threshold_weights._math import CALIBRATED
        return opts.get("importance", "magnitude") in CALIBRATED and opts.get("tau") is None
    if pname == "prune_heads":
        return opts.get("score", "magnitude") != "magnitude" and opts.get("heads") is None
    if pname == "prune_ffn":
        return opts.get("score", "magnitude") != "magnitude" and opts.get("neurons") is None
    if pname == "drop_layers":
        return opts.get("score", "block_influence") == "block_influence" \
            and opts.get("layers") is None
    return True


def _check_step(source: str, index: int, info, options: dict) -> None:
    valid = [o for o in info.options if o not in _DATA_OPTIONS]
    for key, value in options.items():
        if key == "on_no_match":  # every pass takes it (slimc.passes._no_match)
            continue
        if key in _DATA_OPTIONS and key in info.options:
            raise OptionError(f"{source}: pass {info.name} option {key!r} carries data and "
                              "cannot be written in a recipe.",
                              f"Give it to Recipe.apply({key}=...) or the CLI's --calib.")
        if key not in info.options:
            raise OptionError(f"{source}: pass #{index + 1} ({info.name}) has no option {key!r}.",
                              f"Valid options of {info.name}: {', '.join(valid) or '(none)'}.")
        default = _default(info, key)
        if default is not None and default is not inspect.Parameter.empty \
                and not _same_kind(value, default):
            raise OptionError(
                f"{source}: pass {info.name} option {key!r} = {value!r} has the wrong type "
                f"({type(value).__name__}; expected {type(default).__name__} like the default "
                f"{default!r}).", "Fix the value's type in the recipe.")


def _default(info, key):
    impl = getattr(info.run, "__wrapped__", info.run)
    p = inspect.signature(impl).parameters.get(key)
    return None if p is None else p.default


def _same_kind(value, default) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))
