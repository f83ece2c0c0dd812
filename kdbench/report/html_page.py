"""Renders a :class:`~kdbench.report.display.ReportView` as one self-contained HTML page.

Inline CSS, plots embedded as base64 PNG ``data:`` URIs, no scripts and no external ``src``/``href``, so
the file can be mailed, archived or opened offline. Provenance is in the footer.
"""

from __future__ import annotations

import base64
import re
from html import escape
from pathlib import Path
from typing import Sequence

from kdbench.report.display import PROVENANCE_HEADERS, ReportView

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1500px;
       padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.3rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem;
margin-top: 2.2rem; } h3 { font-size: 1.05rem; margin-bottom: .3rem; }
.warning { background: #fff4e5; border-left: 4px solid #f0a020; padding: .5rem .8rem; margin: .5rem 0; }
.legend { font-size: .85rem; color: #444; background: #f7f7f9; padding: .6rem .8rem; }
.caption { font-size: .9rem; color: #333; margin: .2rem 0 .5rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: .82rem; margin: .3rem 0 .6rem; }
th, td { border: 1px solid #d8d8de; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #eef0f4; position: sticky; top: 0; }
tbody tr:nth-child(even) { background: #fafafc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.skipped td { color: #888; font-style: italic; }
ul.notes { font-size: .82rem; color: #444; margin-top: 0; }
figure { margin: .8rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
footer { margin-top: 3rem; font-size: .8rem; color: #333; border-top: 2px solid #ccc; padding-top: 1rem; }
footer td { word-break: break-all; }
"""

_NUMERIC = re.compile(r"^[+\-±]?[\d.,]+( ?± ?[\d.,]+)?( \(1 seed\))?( ?[kMGTP]?B?| s| min| h)?$")


def _cell(text: str) -> str:
    cls = ' class="num"' if _NUMERIC.match(text) else ""
    return f"<td{cls}>{escape(text)}</td>"


def html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], skipped_col: int | None = None) -> str:
    """An HTML table; rows whose ``skipped_col`` cell starts with ``skipped`` get the ``skipped`` class."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        skipped = skipped_col is not None and row[skipped_col].startswith("skipped")
        attr = ' class="skipped"' if skipped else ""
        body.append(f"<tr{attr}>{''.join(_cell(c) for c in row)}</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="scroll">{table}</div>'


def _figure(path: Path, alt: str, caption: str = "") -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    figcaption = f'<figcaption class="caption">{escape(caption)}</figcaption>' if caption else ""
    return f'<figure><img alt="{escape(alt)}" src="data:image/png;base64,{data}">{figcaption}</figure>'


def _inline_markup(text: str) -> str:
    """Escapes ``text`` and turns the legend's ``**bold**``/``*italic*``/`` `code` `` into tags."""
    out = escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    out = re.sub(r"\*(.+?)\*", r"<i>\1</i>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def render_html(view: ReportView) -> str:
    """The complete HTML page of the report."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(view.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(view.title)}</h1>",
        f"<p>{escape(view.summary)}</p>",
    ]
    parts += [f'<div class="warning"><b>Warning:</b> {escape(w)}</div>' for w in view.warnings]
    items = "".join(f"<li>{_inline_markup(item)}</li>" for item in view.legend)
    parts.append(
        f'<details open><summary>How to read these tables</summary><ul class="legend">{items}</ul></details>'
    )
    for table in view.tables:
        parts.append(f"<h2>{escape(table.heading)}</h2>")
        if table.tuning:
            parts.append(f'<h3>Tuning</h3><p class="caption">{_inline_markup(table.tuning[0])}</p>')
            if len(table.tuning) > 1:
                items = "".join(f"<li>{escape(t)}</li>" for t in table.tuning[1:])
                parts.append(f'<ul class="notes">{items}</ul>')
        for disp, figures in table.groups:
            parts.append(f"<h3>{escape(disp.title)}</h3>")
            parts.append(f'<p class="caption">{escape(disp.caption)}</p>')
            top1_col = disp.headers.index("Top-1 (last epoch)")
            parts.append(html_table(disp.headers, disp.rows, skipped_col=top1_col))
            if disp.footnotes:
                parts.append(
                    '<ul class="notes">' + "".join(f"<li>{escape(n)}</li>" for n in disp.footnotes) + "</ul>"
                )
            parts += [_figure(fig.path, fig.alt, fig.caption) for fig in figures]
        if table.plots:
            parts.append(f"<h3>All groups of {escape(table.heading)}</h3>")
            parts += [_figure(p, p.stem) for p in table.plots]
    parts.append("<footer><h2>Provenance</h2><p>Digests are shortened; full values are in runs.csv.</p>")
    parts.append(html_table(PROVENANCE_HEADERS, view.provenance))
    if view.flagged:
        parts.append("<p><b>Runs whose provenance differs from the majority of their scope:</b></p><ul>")
        parts += [f"<li>{escape(line)}</li>" for line in view.flagged]
        parts.append("</ul>")
    parts.append("</footer></body></html>")
    return "\n".join(parts) + "\n"
