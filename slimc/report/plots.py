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

__all__ = ["heatmap", "line_plot"]


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
