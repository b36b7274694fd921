"""``slimc.report``: what a slimc run did, as a page people read and a file programs read.

``write_report(folder, model=..., report=..., head_scores=..., accuracy=..., latency=...,
target=..., tuning=..., before_after=...)`` writes into ``folder``:

- ``index.html``: a self-contained page (inline CSS, no scripts, nothing from the network) with
  the tables and ``<img>`` tags of the PNGs beside it;
- ``report.md``: the same content in Markdown (same sections, same tables, same pictures);
- ``report.json``: the same data, machine-readable, including the numbers behind every plot;
- ``heads.png`` (head-importance heatmap), ``accuracy.png`` (metrics vs compression),
  ``latency.png`` (latency vs sparsity or compression): matplotlib, Agg renderer.

A section without data is kept with the one line "Not measured in this run." and nothing else:
no figure in a report is made up. Files are written under temporary names and renamed into
place (``os.replace``), pictures first and ``index.html`` last, so an interrupted run never
leaves a truncated file, and a page never names a picture that is not there.

Row tables (``accuracy``, ``latency``): a list of dicts, one per measured setting, whose first
key is the x axis (a number, e.g. ``{"compression": 0.2, "wordsim": 0.74, "polarity": 0.73}``),
or a mapping ``{x: {name: value}}``. Every other numeric key is one plotted series; text values
(e.g. ``"setting": "prune 20 %"``) are shown in the table only; a None value is "not measured"
for that point.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OptionError
from .render import MISSING, Section, Table, to_html, to_markdown

__all__ = ["MISSING", "PICTURES", "write_report"]

# the pictures a report may hold; a rewrite removes those it no longer makes
PICTURES = {"heads": "heads.png", "accuracy": "accuracy.png", "latency": "latency.png",
            "front": "front.png"}


def write_report(folder: str | os.PathLike, *, model: str, report=None, head_scores=None,
                 removed_heads: Mapping | None = None, score: str | None = None,
                 accuracy=None, latency=None, target=None, tuning=None,
                 before_after: Sequence[Mapping] | None = None, front=None,
                 title: str | None = None) -> dict[str, Path]:
    """Write ``index.html``, ``report.md``, ``report.json`` and the PNGs into ``folder``
    (created if needed; files of an earlier report there are replaced).

    ``model``: what the report is about (a path or a name). ``report``: the PassManager's
    :class:`~slimc.passes.manager.Report` (per-pass table). ``head_scores``: importance per head,
    a layers × heads array or ``{layer: [score per head]}``, with ``removed_heads``
    (``{layer: [head, ...]}``) crossed out and ``score`` naming the score; when None and
    ``report`` holds a ``prune_heads`` pass that ranked heads by score, its scores are used.
    ``accuracy`` / ``latency``: row tables (see the module docstring). ``target``: a dict such as
    :func:`slimc.codegen.host_cpu` returns, or a TVM Target. ``tuning``: a
    :class:`~slimc.codegen.tune.TuneSummary` (or its ``summary_json`` dict). ``before_after``:
    rows (dicts, the keys of the first are the columns) of a before/after comparison.
    ``front``: a :class:`slimc.compress.CompressResult` (or its ``to_json()`` dict): every
    candidate of the search in a table, and ``front.png``, latency against the worst relative
    metric drop with the Pareto front joined and the chosen candidate ringed.

    Returns the paths written: ``{"html", "markdown", "json", <picture key>: png}``.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OptionError(f"The report folder {folder} is a file.",
                          "Give the name of a folder (new or existing) for the report.")
    folder.mkdir(parents=True, exist_ok=True)
    if head_scores is None and report is not None:
        head_scores, removed_heads, score = _scores_from_report(report, removed_heads, score)
    staged: dict[str, Path] = {}  # final file name -> temporary file holding it
    try:
        sections, data = [], {"model": model, "generated": _now()}

        def stage(name: str) -> Path:
            # a private name in the same folder (os.replace is atomic within one filesystem);
            # not mkstemp, whose 0600 mode the renamed file would keep
            staged[name] = folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            return staged[name]

        _before_after(before_after, sections, data)
        _passes(report, sections, data)
        _heads(head_scores, removed_heads, score, stage, sections, data)
        _rows("accuracy", "Accuracy vs compression", "compression", "metric", accuracy, stage,
              sections, data)
        _rows("latency", "Latency vs sparsity", "sparsity", "latency (ms)", latency, stage,
              sections, data)
        _front(front, stage, sections, data)
        _target(target, sections, data)
        _tuning(tuning, sections, data)
        data["not_measured"] = [s.key for s in sections if not s.measured]

        title = title or f"slimc report: {model}"
        meta = f"Generated {data['generated']} by slimc {_version()}."
        text = json.dumps(_jsonable(data), indent=2) + "\n"
        stage("report.json").write_text(text, encoding="utf-8")
        stage("report.md").write_text(to_markdown(title, meta, sections), encoding="utf-8")
        stage("index.html").write_text(to_html(title, meta, sections), encoding="utf-8")
        order = sorted(staged, key=lambda n: (n == "index.html", n.endswith((".md", ".json"))))
        for name in order:
            os.replace(staged.pop(name), folder / name)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    made = {key for key, png in PICTURES.items() if (data.get(key) or {}).get("file") == png}
    for key, png in PICTURES.items():
        if key not in made:
            (folder / png).unlink(missing_ok=True)  # from an earlier report; no longer shown
    out = {"html": folder / "index.html", "markdown": folder / "report.md",
           "json": folder / "report.json"}
    out.update({key: folder / PICTURES[key] for key in sorted(made)})
    return out


# ---------------------------------------------------------------------------------------------
# sections


def _missing(key: str, title: str, sections: list[Section], data: dict) -> None:
    sections.append(Section(key, title, measured=False))
    data[key] = None


def _before_after(rows, sections, data) -> None:
    if not rows:
        return _missing("before_after", "Before and after", sections, data)
    rows = [dict(r) for r in rows]
    columns = list(rows[0])
    table = Table([str(c) for c in columns],
                  [[_cell(r.get(c)) for c in columns] for r in rows],
                  right=set(range(1, len(columns))), id="before-after-table")
    sections.append(Section("before_after", "Before and after", tables=[table]))
    data["before_after"] = rows


def _passes(report, sections, data) -> None:
    if report is None:
        return _missing("passes", "Passes", sections, data)
    base = report.baseline
    rows = [["(input)", "", "", _cell(base["parameters"]), _cell(base["nonzeros"]),
             _cell(base["bytes"]), "", "", "", ""]]
    for r in report.rows:
        rows.append([r.name, r.contract + (" *" if r.checked else ""),
                     "yes" if r.modified else "no", _cell(r.parameters), _cell(r.nonzeros),
                     _cell(r.bytes), _cell(r.max_abs), _cell(r.cosine, ".6f"),
                     _cell(r.max_abs_total), f"{r.seconds:.3f}"])
    table = Table(["pass", "contract", "modified", "parameters", "nonzeros", "bytes",
                   "max |Δ| vs previous", "cosine vs previous", "max |Δ| vs input", "seconds"],
                  rows, right=set(range(3, 10)), id="passes-table")
    text = []
    if report.rows:
        last = report.rows[-1]
        text.append(f"{len(report.rows)} pass(es): "
                    + " → ".join(r.name for r in report.rows)
                    + f". Parameters {_cell(base['parameters'])} → {_cell(last.parameters)} "
                    f"({_change(base['parameters'], last.parameters)}), serialized size "
                    f"{_cell(base['bytes'])} → {_cell(last.bytes)} bytes "
                    f"({_change(base['bytes'], last.bytes)}).")
    if any(r.checked for r in report.rows):
        text.append("Contracts marked * were checked on the check inputs.")
    if report.rows and all(r.max_abs is None for r in report.rows):
        text.append("Deviations were not measured (no check inputs).")
    stats = [[r.name, k, _cell(v)] for r in report.rows for k, v in r.stats.items()
             if v is None or isinstance(v, (str, bool, int, float, np.integer, np.floating))]
    tables = [table]
    if stats:
        tables.append(Table(["pass", "statistic", "value"], stats, right={2},
                            caption="Statistics the passes reported", id="pass-stats-table"))
    sections.append(Section("passes", "Passes", text=text, tables=tables))
    data["passes"] = report.to_dict()


def _scores_from_report(report, removed, score):
    for row in reversed(report.rows):  # the last pruning is the one the result shows
        if row.name == "prune_heads" and row.stats.get("scores"):
            return (row.stats["scores"], removed or row.stats.get("removed"),
                    score or row.stats.get("score"))
    return None, removed, score


def _score_grid(head_scores) -> dict[int, list[float]]:
    """{layer: [score per head]} from a mapping or a layers × heads array."""
    if isinstance(head_scores, Mapping):
        items = list(head_scores.items())
    else:
        arr = np.asarray(head_scores, dtype=float)
        if arr.ndim != 2:
            raise OptionError(f"head_scores has shape {arr.shape}; it must be layers × heads.",
                              "Give a 2-D array or {layer: [score per head]}.")
        items = list(enumerate(arr))
    grid = {}
    for layer, row in items:
        try:
            layer = int(layer)
            vals = [float(x) for x in row]
        except (TypeError, ValueError):
            raise OptionError(f"head_scores[{layer!r}] is not a list of numbers.",
                              "Give {layer: [score per head]} with integer layers.") from None
        if not vals:
            raise OptionError(f"head_scores[{layer}] is empty.", "Give one score per head.")
        grid[layer] = vals
    if not grid:
        raise OptionError("head_scores is empty.", "Give one row of scores per layer, or None.")
    return dict(sorted(grid.items()))


def _heads(head_scores, removed, score, stage, sections, data) -> None:
    key, title = "heads", "Head importance"
    if head_scores is None:
        return _missing(key, title, sections, data)
    from .plots import heatmap
    grid = _score_grid(head_scores)
    removed = {int(k): sorted(int(h) for h in v) for k, v in (removed or {}).items()}
    name = f"{score} importance" if score else "importance"
    heatmap(grid, stage(PICTURES[key]), removed, title=f"{name} (× = removed)")
    width = max(len(v) for v in grid.values())
    rows = [[str(layer)] + [_cell(s, ".4g") + (" ×" if h in removed.get(layer, ()) else "")
                            for h, s in enumerate(vals)] + [""] * (width - len(vals))
            for layer, vals in grid.items()]
    n_removed = sum(len(v) for v in removed.values())
    total = sum(len(v) for v in grid.values())
    text = [(f"{len(grid)} layers × {width} heads, scored by {name}; "
             f"{n_removed} of {total} heads removed (× in the picture and the table).")]
    sections.append(Section(key, title, text=text, images=[(PICTURES[key], f"{name} heatmap")],
                            tables=[Table(["layer"] + [f"head {h}" for h in range(width)], rows,
                                          right=set(range(1, width + 1)), id="heads-table")]))
    data[key] = {"file": PICTURES[key], "score": score, "layers": list(grid),
                 "scores": [grid[layer] for layer in grid],
                 "removed": {str(k): v for k, v in removed.items()}}


def _row_table(rows, default_x: str) -> tuple[str, list[dict]]:
    """Normalise a row table to (x key, [dict]) sorted by x; see the module docstring."""
    if isinstance(rows, Mapping):
        rows = [{default_x: x, **dict(vals)} for x, vals in rows.items()]
    rows = [dict(r) for r in rows]
    if not rows or not rows[0]:
        raise OptionError("A row table is empty.", "Give None for a section not measured.")
    x = next(iter(rows[0]))
    for r in rows:
        v = r.get(x)
        if not _is_number(v):
            raise OptionError(f"Row {r!r}: the x value {x!r} = {v!r} is not a number.",
                              f"Make {x!r} (the first key of each row) a number, e.g. the "
                              "fraction removed.")
    return x, sorted(rows, key=lambda r: float(r[x]))


def _rows(key, title, default_x, y_label, rows, stage, sections, data) -> None:
    if not rows:
        return _missing(key, title, sections, data)
    from .plots import line_plot
    x, rows = _row_table(rows, default_x)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    names = [c for c in columns if c != x
             and any(_is_number(r.get(c)) for r in rows)
             and all(r.get(c) is None or _is_number(r.get(c)) for r in rows)]
    if not names:
        raise OptionError(f"The {key} rows have no numeric column besides {x!r}.",
                          "Give each row its measured values, e.g. {'wordsim': 0.74}.")
    series = {n: ([float(r[x]) for r in rows if _is_number(r.get(n))],
                  [float(r[n]) for r in rows if _is_number(r.get(n))]) for n in names}
    title = f"{title.split(' vs ')[0]} vs {x}"
    line_plot(stage(PICTURES[key]), series, x_label=x, y_label=y_label, title=title)
    table = Table([str(c) for c in columns], [[_cell(r.get(c)) for c in columns] for r in rows],
                  right={i for i, c in enumerate(columns) if c == x or c in names},
                  id=f"{key}-table")
    sections.append(Section(key, title, images=[(PICTURES[key], title)], tables=[table]))
    data[key] = {"file": PICTURES[key], "x": x, "rows": rows,
                 "series": {n: {"x": xs, "y": ys} for n, (xs, ys) in series.items()}}


def _front(front, stage, sections, data) -> None:
    key, title = "front", "Compression search: latency, size and accuracy"
    if front is None:
        return _missing(key, title, sections, data)
    info = front.to_json() if hasattr(front, "to_json") else dict(front)
    cands = info.get("candidates") or []
    if not cands:
        raise OptionError("The compression result holds no candidate.",
                          "Give the result of slimc.compress (it measures at least the "
                          "original).")
    from .plots import front_plot
    base = next((c for c in cands if not any(c["setting"].values())
                 and c["precision"] == "fp32"), cands[0])
    names = list(cands[0]["metrics"])
    header = ["candidate", "latency (ms)", "speed-up", "size (MB)", "parameters",
              *[f"{n} (drop)" for n in names], "front"]
    rows = []
    for c in sorted(cands, key=lambda c: c["latency_ms"]):
        cells = []
        for n in names:
            iv = (c.get("intervals") or {}).get(n)
            ci = f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else ""
            cells.append(f"{c['metrics'][n]:.4f}{ci} ({-c['drops'][n]:+.1%})")
        rows.append([c["name"], f"{c['latency_ms']:.2f}",
                     f"{base['latency_ms'] / c['latency_ms']:.2f}x",
                     f"{c['size_bytes'] / 1e6:.1f}", _cell(c["params"]), *cells,
                     "chosen" if c["chosen"] else ("yes" if c["front"] else "")])
    front_plot(stage(PICTURES[key]), cands, max_drop=info.get("max_drop"),
               latency_ms=info.get("latency_ms"))
    text = [f"Budget: every metric within {info['max_drop']:.1%} of the original"
            + (f", latency at most {info['latency_ms']:.2f} ms" if info.get("latency_ms")
               else "") + f". Result: {info['reason']}."
            + (f" Search time {info['seconds']:.0f} s" if info.get("seconds") else "")
            + (f" on {info['cpu']}." if info.get("cpu") else "")]
    sections.append(Section(key, title, text=text, images=[(PICTURES[key], title)],
                            tables=[Table(header, rows, right=set(range(1, len(header) - 1)),
                                          id="front-table")]))
    data[key] = dict(info, file=PICTURES[key])


def _target(target, sections, data) -> None:
    key, title = "target", "Target"
    if target is None:
        return _missing(key, title, sections, data)
    if isinstance(target, Mapping):
        info = dict(target)
    else:  # a TVM Target: its string is its full description (kind, triple, mcpu, attributes)
        info = {"target": str(target)}
    rows = []
    for k, v in info.items():
        if isinstance(v, Mapping):
            v = ", ".join(f"{fk}: {_cell(fv)}" for fk, fv in v.items()) or "-"
        rows.append([str(k), _cell(v)])
    sections.append(Section(key, title, tables=[Table(["", "value"], rows, id="target-table")]))
    data[key] = info


def _tuning(tuning, sections, data) -> None:
    key, title = "tuning", "Tuning"
    if tuning is None:
        return _missing(key, title, sections, data)
    if dataclasses.is_dataclass(tuning):
        info = dataclasses.asdict(tuning)
        reach = getattr(tuning, "seconds_to_reach", None)
        info["seconds_to_90_percent"] = reach(0.9) if reach else None
    elif isinstance(tuning, Mapping):
        info = dict(tuning)
    else:
        raise OptionError(f"tuning is a {type(tuning).__name__}.",
                          "Give the TuneSummary that slimc.codegen.tune returned, or None.")
    scalars = [[k, _cell(v)] for k, v in info.items()
               if k not in ("per_task", "history") and not isinstance(v, (list, dict))]
    tables = [Table(["", "value"], scalars, right={1}, id="tuning-table")]
    tasks = sorted(info.get("per_task") or [],
                   key=lambda t: -max(float(t.get("flops") or 0), 1.0) * int(t.get("weight", 1)))
    if tasks:
        shown = tasks[:20]
        caption = "Tasks, most expensive first" + (
            f" (20 of {len(tasks)}; all in report.json)" if len(tasks) > 20 else "")
        tables.append(Table(
            ["task", "×", "MFLOP", "trials", "best ms"],
            [[str(t.get("name")), _cell(t.get("weight")),
              _cell(None if t.get("flops") is None else t["flops"] / 1e6, ".2f"),
              _cell(t.get("trials")), _cell(t.get("best_ms"), ".4f")] for t in shown],
            right={1, 2, 3, 4}, caption=caption, id="tuning-tasks-table"))
    sections.append(Section(key, title, tables=tables))
    data[key] = info


# ---------------------------------------------------------------------------------------------
# formatting


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) \
        and math.isfinite(float(v))


def _cell(v, spec: str | None = None) -> str:
    if v is None:
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not math.isfinite(v):
            return str(v)
        if spec:
            return format(v, spec)
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.2e}"
        return f"{v:,.1f}" if abs(v) >= 1000 else f"{v:.6g}"
    return str(v)


def _change(before, after) -> str:
    return f"{(after - before) / before:+.1%}" if before else "-"


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, np.ndarray)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else str(x)
    if x is None or isinstance(x, str):
        return x
    return str(x)


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def _version() -> str:
    from .. import __version__
    return __version__
