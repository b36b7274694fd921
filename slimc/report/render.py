"""The report's content as sections, and the two ways of writing it: HTML and Markdown.

A :class:`Section` holds paragraphs, tables and pictures, already formatted as text; the renderers
only lay them out, so the page and the Markdown file cannot disagree. The HTML page is
self-contained (inline CSS, no scripts, nothing fetched from the network): it shows the same in a
browser on a machine without internet, and the PNGs it names sit beside it.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

MISSING = "Not measured in this run."

_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; color: #222; max-width: 1100px;
       margin: 24px auto; padding: 0 16px; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { font-size: 19px; margin-top: 28px;
     border-bottom: 1px solid #ddd; padding-bottom: 3px; }
p.meta { color: #666; margin-top: 0; } p.missing { color: #888; font-style: italic; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; } th { background: #f2f2f2; }
td.r { text-align: right; font-variant-numeric: tabular-nums; }
caption { text-align: left; color: #555; padding-bottom: 3px; }
img { max-width: 100%; display: block; margin: 8px 0; }
"""


@dataclass
class Table:
    """Cells as text; ``right`` marks the columns to right-align (figures)."""

    header: list[str]
    rows: list[list[str]]
    right: set[int] = field(default_factory=set)
    caption: str = ""
    id: str = ""


@dataclass
class Section:
    """One part of the report. ``measured`` False renders the title and :data:`MISSING` only."""

    key: str
    title: str
    measured: bool = True
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    images: list[tuple[str, str]] = field(default_factory=list)  # (file beside the page, alt)


def _e(s: str) -> str:
    return html.escape(str(s), quote=True)


def _html_table(t: Table) -> str:
    out = [f'<table id="{_e(t.id)}">' if t.id else "<table>"]
    if t.caption:
        out.append(f"<caption>{_e(t.caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in t.header) + "</tr></thead>")
    out.append("<tbody>")
    for row in t.rows:
        out.append("<tr>" + "".join(
            f'<td class="r">{_e(c)}</td>' if i in t.right else f"<td>{_e(c)}</td>"
            for i, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def to_html(title: str, meta: str, sections: list[Section]) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{_e(title)}</title>", f"<style>{_CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1>", f'<p class="meta">{_e(meta)}</p>']
    for s in sections:
        parts.append(f'<section id="{_e(s.key)}"><h2>{_e(s.title)}</h2>')
        if not s.measured:
            parts.append(f'<p class="missing">{_e(MISSING)}</p></section>')
            continue
        parts += [f"<p>{_e(p)}</p>" for p in s.text]
        parts += [f'<img src="{_e(src)}" alt="{_e(alt)}">' for src, alt in s.images]
        parts += [_html_table(t) for t in s.tables]
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    out = [f"*{t.caption}*", ""] if t.caption else []
    out.append("| " + " | ".join(_md_cell(h) for h in t.header) + " |")
    out.append("|" + "|".join("---:" if i in t.right else "---" for i in range(len(t.header)))
               + "|")
    out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(out)


def to_markdown(title: str, meta: str, sections: list[Section]) -> str:
    parts = [f"# {title}", "", meta, ""]
    for s in sections:
        parts += [f"## {s.title}", ""]
        if not s.measured:
            parts += [MISSING, ""]
            continue
        for p in s.text:
            parts += [p, ""]
        for src, alt in s.images:
            parts += [f"![{alt}]({src})", ""]
        for t in s.tables:
            parts += [_md_table(t), ""]
    return "\n".join(parts).rstrip() + "\n"
