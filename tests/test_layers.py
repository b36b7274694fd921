"""The import rules of ARCHITECTURE.md, read from the code (every ``import`` in ``slimc/``, lazy
ones inside functions included, parsed with ``ast``).

Rules: ``ir/`` imports only ``ir/`` and the leaves; ``runtime/`` only itself, the leaves and
``ir.graph``; ``passes/`` never imports ``codegen/``, ``runtime/`` or a front end; ``codegen/``
never imports ``passes/``, a front end or the package face; a pass's folder never imports
another pass's folder. The places where the code breaks a rule today are listed in
ARCHITECTURE.md ("Where the code breaks these rules today", issue 17) and here, exactly: a new
break fails, and so does a listed one that is gone (remove it from both lists).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "slimc"
LEAVES = ("slimc.errors", "slimc._atomic", "slimc._quiet")
FRONT = ("slimc.cli", "slimc.demo", "slimc.report", "slimc.compression", "slimc.eval",
         "slimc.recipe", "slimc.dynamo")
SHARED = {"registry", "manager", "importance", "_calib", "_no_match"}

# (importer, imported) at the granularity of the rule; each one is named in ARCHITECTURE.md
KNOWN = {
    ("pass factorize_low_rank", "pass threshold_weights"),
    ("pass fold_fake_quant", "pass quantize"),
    ("pass quantize", "pass smooth_quant"),
    ("pass quantize", "pass threshold_weights"),
    ("pass smooth_quant", "pass quantize"),
    ("pass smooth_quant", "pass threshold_weights"),
    ("passes.importance", "pass prune_heads"),
    ("slimc.codegen.build", "slimc"),
}


def _module(path: Path) -> tuple[str, str]:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    mod = ".".join(parts)
    return mod, mod if is_pkg else mod.rsplit(".", 1)[0]


def imports() -> set[tuple[str, str]]:
    """(importing module, imported module) for every slimc-internal import."""
    out = set()
    for f in ROOT.rglob("*.py"):
        mod, pkg = _module(f)
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[:len(pkg.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target == "slimc" or target.startswith("slimc."):
                    out.add((mod, target))
                    # `from . import x` / `from ..passes import quantize` name modules too
                    out.update((mod, f"{target}.{a.name}") for a in node.names
                               if (ROOT.parent / f"{target}.{a.name}".replace(".", "/")).exists()
                               or (ROOT.parent / (f"{target}.{a.name}".replace(".", "/")
                                                  + ".py")).exists())
            elif isinstance(node, ast.Import):
                out.update((mod, a.name) for a in node.names if a.name.startswith("slimc"))
    return out


def _pass(mod: str) -> str | None:
    p = mod.split(".")
    if len(p) > 2 and p[1] == "passes" and p[2] not in SHARED:
        return p[2]
    return None


def breaks() -> set[tuple[str, str]]:
    out = set()
    for a, b in imports():
        pa, pb = _pass(a), _pass(b)
        if pa and pb and pa != pb:
            out.add((f"pass {pa}", f"pass {pb}"))
        elif pb and a.startswith("slimc.passes.") and not pa:
            out.add((a.removeprefix("slimc."), f"pass {pb}"))
        if a.startswith("slimc.ir") and not b.startswith(("slimc.ir", *LEAVES)):
            out.add((a, b))
        if a.startswith("slimc.runtime") and not b.startswith(
                ("slimc.runtime", "slimc.ir.graph", *LEAVES)) and b != "slimc.ir":
            out.add((a, b))
        if a.startswith("slimc.passes") and b.startswith(("slimc.codegen", "slimc.runtime",
                                                          *FRONT)):
            out.add((a, b))
        if a.startswith("slimc.codegen") and (b == "slimc" or b.startswith(("slimc.passes",
                                                                           *FRONT))):
            out.add((a, b))
    return out


def test_the_parser_sees_lazy_and_relative_imports():
    got = imports()
    # relative, at module level
    assert ("slimc.passes.prune_ffn", "slimc.passes.registry") in got
    # lazy, inside a function, two levels up
    assert ("slimc.passes.prune_ffn.fx", "slimc.ir.fx") in got
    assert ("slimc.compression", "slimc.passes.importance") in got


def test_import_rules_hold_except_the_listed_breaks():
    found = breaks()
    new = found - KNOWN
    gone = KNOWN - found
    assert not new, (f"new imports against ARCHITECTURE.md's rules: {sorted(new)}; move the "
                     "shared code into ir/ (or the pass's own folder)")
    assert not gone, (f"listed breaks no longer in the code: {sorted(gone)}; remove them from "
                      "KNOWN here and from ARCHITECTURE.md")


def test_architecture_names_every_listed_break():
    text = (ROOT.parent / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text[text.index("## Where the code breaks these rules today"):]
    for a, b in KNOWN:
        for side in (a, b):
            name = side.removeprefix("pass ").removeprefix("slimc.").split(".")[-1]
            if name != "slimc":
                assert f"`{name}" in section or name in section, (side, "not in ARCHITECTURE.md")
