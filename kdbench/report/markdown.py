"""Renders a :class:`~kdbench.report.display.ReportView` as GitHub-flavoured markdown."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from kdbench.report.display import PROVENANCE_HEADERS, ReportView


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown pipe table (cells escaped)."""
    lines = ["| " + " | ".join(_escape(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_escape(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(view: ReportView, out_dir: Path) -> str:
    """The markdown text of the report; plots are linked relative to ``out_dir``."""

    def image(path: Path, alt: str) -> str:
        return f"![{alt}]({Path(os.path.relpath(path, out_dir)).as_posix()})"

    lines = [f"# {view.title}", "", view.summary, ""]
    lines += [f"> **Warning:** {w}" for w in view.warnings]
    lines += ["", "## How to read these tables", ""] + [f"- {item}" for item in view.legend] + [""]
    for table in view.tables:
        lines += [f"## {table.heading}", ""]
        if table.tuning:
            lines += ["### Tuning", ""] + [f"{_escape(p)}" for p in table.tuning[:1]] + [""]
            lines += [f"- {_escape(p)}" for p in table.tuning[1:]] + [""] * (len(table.tuning) > 1)
        for disp, figures in table.groups:
            lines += [f"### {disp.title}", "", disp.caption, ""]
            lines += md_table(disp.headers, disp.rows) + [""]
            lines += [f"- {note}" for note in disp.footnotes]
            if disp.footnotes:
                lines.append("")
            for fig in figures:
                lines += [fig.caption, ""] * bool(fig.caption) + [image(fig.path, fig.alt), ""]
        if table.plots:
            lines += (
                [f"### All groups of {table.heading}", ""] + [image(p, p.stem) for p in table.plots] + [""]
            )
    lines += ["## Provenance", "", "Digests are shortened; full values are in `runs.csv`.", ""]
    lines += md_table(PROVENANCE_HEADERS, view.provenance) + [""]
    if view.flagged:
        lines += ["Runs whose provenance differs from the majority of their scope:", ""]
        lines += [f"- {_escape(line)}" for line in view.flagged] + [""]
    return "\n".join(lines).rstrip() + "\n"
