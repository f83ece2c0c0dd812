"""Renders a :class:`~kdbench.report.display.ReportView` as one self-contained HTML page, and the page
skeleton every page of the results site shares (:func:`page`).

Inline CSS, plots embedded as base64 PNG ``data:`` URIs, no scripts and nothing fetched from elsewhere, so the
file can be mailed, archived or opened offline; its only links are relative ones to the files beside it (the
plot files, ``runs.csv``...) and, in a site, to its other pages. Provenance is in the footer.

Every page is stamped with the kdbench that wrote it and the page format (:data:`PAGE_FORMAT`, raised whenever
what a page shows changes), so a published page made by older code is found (:func:`page_stamp`).

Layout: a table scrolls inside its own box (at most 85% of the window high, so its sticky header row stays in
view), never the page; under 760 px a plot keeps a readable width and scrolls sideways in its own box, and the
provenance table breaks long values only after ``/``, ``-``, ``_``, ``.`` or ``,``.
"""

from __future__ import annotations

import base64
import os
import re
from html import escape
from pathlib import Path
from typing import Sequence

from kdbench import __version__
from kdbench.report.display import PROVENANCE_HEADERS, ReportView

#: The format of the pages (leaderboard, study, front page): raised whenever what they show changes, so that a
#: published page made before is rebuilt (tests/test_site.py checks every published page's stamp).
PAGE_FORMAT = 2

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1500px;
       padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.3rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem;
margin-top: 2.2rem; } h3 { font-size: 1.05rem; margin-bottom: .3rem; }
.warning { background: #fff4e5; border-left: 4px solid #f0a020; padding: .5rem .8rem; margin: .5rem 0; }
.legend { font-size: .85rem; color: #444; background: #f7f7f9; padding: .6rem .8rem; }
.caption { font-size: .9rem; color: #333; margin: .2rem 0 .5rem; }
nav { font-size: .9rem; display: flex; flex-wrap: wrap; gap: .2rem 1rem; padding: .4rem 0;
      border-bottom: 1px solid #ddd; }
nav a { white-space: nowrap; }
.scroll { overflow: auto; max-height: 85vh; margin: .3rem 0 .6rem; }
table { border-collapse: separate; border-spacing: 0; font-size: .8rem; }
th, td { border: 1px solid #d8d8de; border-width: 0 1px 1px 0; padding: .2rem .3rem; text-align: left;
         vertical-align: top; }
tr > :first-child { border-left-width: 1px; } thead tr:first-child > * { border-top-width: 1px; }
th { background: #eef0f4; position: sticky; top: 0; z-index: 1; }
td.method { white-space: nowrap; }
.swatch { display: inline-block; width: .7em; height: .7em; border-radius: 2px; margin-right: .3em; }
tbody tr:nth-child(even) { background: #fafafc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.skipped td { color: #888; font-style: italic; }
ul.notes { font-size: .82rem; color: #444; margin-top: 0; }
figure { margin: .8rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
footer { margin-top: 3rem; font-size: .8rem; color: #333; border-top: 2px solid #ccc; padding-top: 1rem; }
@media (max-width: 760px) {
  body { margin: 1rem auto; padding: 0 .6rem; }
  figure { overflow-x: auto; } figure img { max-width: none; width: 680px; }
  footer table, footer tbody, footer tr, footer td { display: block; } footer thead { display: none; }
  footer tr { border-top: 1px solid #d8d8de; padding: .3rem 0; } footer td { border: 0; padding: .05rem 0; }
  footer td::before { content: attr(data-label) ": "; font-weight: 600; }
}
"""

_NUMERIC = re.compile(r"^[+\-±]?[\d.,]+( ?± ?[\d.,]+)?( \(1 seed\))?( ?[kMGTP]?B?| s| min| h)?$")


def _cell(text: str, header: str = "", breakable: bool = False) -> str:
    cls = ' class="num"' if _NUMERIC.match(text) else ""
    label = f' data-label="{escape(header)}"' if header else ""
    body = re.sub(r"\[([^\]\s]*), ", r"[\1,&nbsp;", escape(text))  # an interval stays on one line
    if breakable:  # a long path or list may wrap after a separator, never inside a word
        body = re.sub(r"\S{21,}", lambda m: re.sub(r"([/\-_.,])", r"\1<wbr>", m.group()), body)
    return f"<td{cls}{label}>{body}</td>"


def html_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], skipped_col: int | None = None, breakable: bool = False
) -> str:
    """An HTML table in its scroll box; rows whose ``skipped_col`` cell starts with ``skipped`` get the
    ``skipped`` class; ``breakable``: long values may wrap after ``/ - _ . ,`` (never inside a word)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        skipped = skipped_col is not None and row[skipped_col].startswith("skipped")
        attr = ' class="skipped"' if skipped else ""
        body.append(f"<tr{attr}>{''.join(_cell(c, h, breakable) for c, h in zip(row, headers))}</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="scroll">{table}</div>'


def figure(path: Path, alt: str, caption: str = "", href: str | None = None) -> str:
    """A plot embedded as a ``data:`` URI, linked to its file (``href``, relative) when given."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    figcaption = f'<figcaption class="caption">{escape(caption)}</figcaption>' if caption else ""
    img = f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'
    if href:
        img = f'<a href="{escape(href)}" title="the plot at full size">{img}</a>'
    return f"<figure>{img}{figcaption}</figure>"


def nav_bar(links: Sequence[tuple[str, str]]) -> str:
    """A row of ``(text, href)`` links (``""`` when there are none)."""
    if not links:
        return ""
    return "<nav>" + "".join(f'<a href="{escape(href)}">{escape(text)}</a>' for text, href in links) + "</nav>"


def page(title: str, body: Sequence[str], nav: Sequence[tuple[str, str]] = ()) -> str:
    """A complete page of the site: its head (stamped with the kdbench version and :data:`PAGE_FORMAT`), the
    links at the top and the bottom, ``body`` between."""
    head = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta name="generator" content="kdbench {__version__}">',
        f'<meta name="kdbench-page-format" content="{PAGE_FORMAT}">',
        '<link rel="icon" href="data:,">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
    ]
    links = nav_bar(nav)
    return "\n".join([*head, links, *body, links, "</body></html>"]) + "\n"


_STAMP = re.compile(r'<meta name="(generator|kdbench-page-format)" content="(?:kdbench )?([^"]+)">')


def page_stamp(html: str) -> tuple[str | None, int | None]:
    """The kdbench version and the page format a page was written by (``None`` for a page without them)."""
    found = dict(_STAMP.findall(html))
    fmt = found.get("kdbench-page-format")
    return found.get("generator"), int(fmt) if fmt and fmt.isdigit() else None


def _inline_markup(text: str) -> str:
    """Escapes ``text`` and turns the legend's ``**bold**``/``*italic*``/`` `code` `` into tags."""
    out = escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    out = re.sub(r"\*(.+?)\*", r"<i>\1</i>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def render_html(
    view: ReportView, nav: Sequence[tuple[str, str]] = (), files: Sequence[tuple[str, str]] = (),
    plot_dir: Path | None = None,
) -> str:
    """The complete HTML page of the report.

    Args:
        view: The report.
        nav: Links to the site's other pages, ``(text, href)``.
        files: Links to the report's files, ``(text, href)``, relative to the page.
        plot_dir: The page's directory: each plot links to its file, relative to it.
    """

    def fig(path: Path, alt: str, caption: str = "") -> str:
        href = Path(os.path.relpath(path, plot_dir)).as_posix() if plot_dir is not None else None
        return figure(path, alt, caption, href)

    parts = [
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
            parts += [fig(f.path, f.alt, f.caption) for f in figures]
        if table.plots:
            parts.append(f"<h3>All groups of {escape(table.heading)}</h3>")
            parts += [fig(p, p.stem) for p in table.plots]
    parts.append("<footer><h2>Provenance</h2><p>Digests are shortened; full values are in runs.csv.</p>")
    parts.append(html_table(PROVENANCE_HEADERS, view.provenance, breakable=True))
    if view.flagged:
        parts.append("<p><b>Runs whose provenance differs from the majority of their scope:</b></p><ul>")
        parts += [f"<li>{escape(line)}</li>" for line in view.flagged]
        parts.append("</ul>")
    parts.append("</footer>")
    return page(view.title, parts, [*nav, *files])
