"""The report's pictures, written as PNG with matplotlib's Agg renderer (no display needed).

The head-importance heatmap is :func:`slimc.passes.prune_heads.report.heatmap` (one picture of
that kind in slimc); the line plots are drawn here on a bare ``Figure``, so no pyplot state is
touched and nothing depends on the backend the caller's process chose.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..passes.prune_heads.report import heatmap

__all__ = ["front_plot", "heatmap", "line_plot"]


def line_plot(path: str | Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
              *, x_label: str, y_label: str, title: str) -> None:
    """One line (with markers) per ``series`` entry ``name: (xs, ys)``; points whose y is None
    or NaN are left out. Values spanning more than 20x get a log y axis. An x axis entirely
    inside [0, 1] is shown in percent (fractions of heads or weights removed)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter
    fig = Figure(figsize=(6.4, 3.8), dpi=100)
    ax = fig.add_subplot()
    all_x, all_y = [], []
    for name, (xs, ys) in series.items():
        pts = [(float(x), float(y)) for x, y in zip(xs, ys)
               if y is not None and math.isfinite(float(y))]
        if not pts:
            continue
        pts.sort()
        all_x += [x for x, _ in pts]
        all_y += [y for _, y in pts]
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=name, linewidth=1.8,
                markersize=5)
    if all_x and min(all_x) >= 0 and max(all_x) <= 1:
        ax.xaxis.set_major_formatter(PercentFormatter(xmax=1))
    if all_y and min(all_y) > 0 and max(all_y) / min(all_y) > 20:
        ax.set_yscale("log")  # e.g. torch eager next to compiled code: keep both lines readable
    else:
        ax.ticklabel_format(axis="y", useOffset=False)  # values as they are, not "+1" offsets
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")


def front_plot(path: str | Path, candidates: Sequence[Mapping], *, max_drop: float | None = None,
               latency_ms: float | None = None) -> None:
    """The compression search: latency (x) against the worst relative metric drop (y), one
    marker per precision, the Pareto front joined, the chosen candidate ringed, the budgets as
    dashed lines."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.add_subplot()
    for prec, marker in (("fp32", "o"), ("int8", "s")):
        pts = [c for c in candidates if c["precision"] == prec]
        if pts:
            ax.scatter([c["latency_ms"] for c in pts], [c["worst_drop"] for c in pts],
                       marker=marker, s=28, alpha=0.75, label=prec)
    front = sorted((c for c in candidates if c["front"]), key=lambda c: c["latency_ms"])
    if front:
        ax.plot([c["latency_ms"] for c in front], [c["worst_drop"] for c in front], "-",
                color="0.4", linewidth=1, label="Pareto front")
    for c in candidates:
        if c.get("chosen"):
            ax.scatter([c["latency_ms"]], [c["worst_drop"]], s=160, facecolors="none",
                       edgecolors="red", linewidths=1.6, label=f"chosen: {c['name']}")
    if max_drop is not None:
        ax.axhline(max_drop, color="red", linestyle="--", linewidth=0.8, alpha=0.6)
    if latency_ms:
        ax.axvline(latency_ms, color="red", linestyle="--", linewidth=0.8, alpha=0.6)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
    ax.set_xlabel("latency (ms, compiled, this machine)")
    ax.set_ylabel("worst relative metric drop")
    ax.set_title("Compression search", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
