"""The results site: a front page over tables and studies, each with its page, all linked.

One code path for both uses of it (:func:`write_site`):

* ``kdbench site`` rebuilds the committed ``results/published/``: every snapshot's page (``index.html``,
  ``leaderboard.md`` / ``.csv``, ``plots/``) from its committed ``runs.csv`` (and ``epochs.csv`` where the
  snapshot has it; a study's from its ``study.csv``), and ``results/published/index.html``;
* the workflow's ``site`` rule writes ``results/site/`` from the leaderboards and the study it just made
  (never a committed path): each table's page rebuilt there from its ``runs.csv``, its files copied beside it.

The front page gives per table or study its question, its setup in one line, its headline result, its wall
time, the commit and the command that made it (from ``SNAPSHOT.md`` and the runs table), and links to its page
and files; then the method × table matrix: each method's paired gain over the student alone in every table
(and student) where it ran, read from the ``leaderboard.csv`` each page was just built with. Every page links
home, to its neighbours and to its files. :func:`stale_pages` finds a page written by older code than its
records need.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Mapping, Sequence

from kdbench._util import atomic_path
from kdbench.report import _format as fmt
from kdbench.report.aggregate import BASELINE, UNTUNED_SUFFIX
from kdbench.report.colors import method_color
from kdbench.report.html_page import PAGE_FORMAT, figure, html_table, page, page_stamp
from kdbench.report.leaderboard import render_leaderboard
from kdbench.report.records import EPOCHS_CSV, read_epochs_csv, read_runs_csv
from kdbench.report.study_view import LEGEND, plot_study, study_table

_logger = logging.getLogger(__name__)

TABLE, STUDY = "table", "study"
SNAPSHOT = "SNAPSHOT.md"
_STUDY_MD = "study.md"


@dataclass
class Entry:
    """A table or a study of the site.

    Attributes:
        name: Its name (the table's config name, the study's name): its folder in the site.
        kind: :data:`TABLE` (``runs.csv`` in ``source``) or :data:`STUDY` (``study.csv``).
        source: The folder its files are read from.
        meta: The folder whose ``SNAPSHOT.md`` gives its question, command and wall time (its snapshot).
        facts: What the front page says of it (filled by :func:`write_site`).
    """

    name: str
    kind: str
    source: Path
    meta: Path | None = None
    facts: dict[str, str] = field(default_factory=dict)


def snapshot_entries(published: Path) -> list[Entry]:
    """Every snapshot under ``published``: a folder with ``runs.csv`` is a table, one with ``study.csv`` a study."""
    out = []
    for folder in sorted(p for p in Path(published).iterdir() if p.is_dir()):
        kind = TABLE if (folder / "runs.csv").is_file() else STUDY if (folder / "study.csv").is_file() else None
        if kind:
            out.append(Entry(folder.name, kind, folder, folder))
    return out


def workflow_entries(tables: Sequence[Path], studies: Sequence[Path], published: Path | None) -> list[Entry]:
    """The site of a workflow run: its leaderboard folders (named by their runs' table) and study folders, each
    with the published snapshot of the same name, if any, for its question."""
    out = []
    for folder in tables:
        rows = read_runs_csv(Path(folder) / "runs.csv")
        out.append(Entry(_majority(rows, "config") or Path(folder).parent.name, TABLE, Path(folder)))
    out += [Entry(Path(folder).name, STUDY, Path(folder)) for folder in studies]
    for e in out:
        if published is not None and (Path(published) / e.name / SNAPSHOT).is_file():
            e.meta = Path(published) / e.name
    return out


# --- facts of an entry ---------------------------------------------------------------------------------------


def _majority(rows: Sequence[Mapping[str, Any]], column: str) -> str:
    values = Counter(str(r[column]) for r in rows if r.get(column) not in (None, ""))
    return values.most_common(1)[0][0] if values else ""


def table_config_hash(rows: Sequence[Mapping[str, Any]]) -> str:
    """The hash of the table's resolved config, as ``kdbench leaderboard`` titles the page: the one in the name of
    the file the runs read (``results/<table>/config-<hash>.resolved.yaml``, kdbench.plan.Layout.RESOLVED; a
    record's ``config_hash`` is its own job's); ``""`` when the rows do not say."""
    found = re.search(r"config-([0-9a-f]+)\.resolved\.yaml$", _majority(rows, "prov.config_file"))
    return found.group(1) if found else ""


def snapshot_facts(text: str) -> dict[str, str]:
    """From a ``SNAPSHOT.md``: ``question`` (its ``- Question:`` line), ``command`` (the first code span of
    ``Made by:``), ``wall_time`` (``<m> min <s> s``), ``date`` and ``commit`` (the first code span of
    ``Code:``); a fact it does not give is absent."""
    flat = re.sub(r"\n[ \t]+", " ", text)  # a list item's continuation lines joined
    out = {}
    for key, pattern in (
        ("question", r"^- Question: (.+)$"),
        ("command", r"^- Made by: [^`]*`([^`]+)`"),
        ("wall_time", r"\*{0,2}(\d+ min \d+ s)\*{0,2}(?: wall time| for all)"),
        ("date", r"(\d{4}-\d{2}-\d{2})"),
        ("commit", r"^- Code: [^`]*`([0-9a-f]{7,40})`"),
    ):
        if m := re.search(pattern, flat, re.MULTILINE):
            out[key] = m.group(1).strip()
    return out


def _gain_text(row: Mapping[str, Any]) -> str:
    """``"+1.87 [+0.93, +2.81]"`` from a ``leaderboard.csv`` row (``""`` without an interval)."""
    if row.get("delta_ci95_low") is None:
        return ""
    return (f"{fmt.num(row['delta_vs_baseline'], 2, True)} [{fmt.num(row['delta_ci95_low'], 2, True)},"
            f" {fmt.num(row['delta_ci95_high'], 2, True)}]")


def _headline(cells: Sequence[Mapping[str, Any]]) -> str:
    """The table's headline: the methods whose paired interval over the student alone is above 0, or the best
    gain when none is; a tuned table's tuned cells first, then its untuned ones."""
    untuned = [c for c in cells if str(c["method"]).endswith(UNTUNED_SUFFIX)]
    if untuned:
        tuned = [c for c in cells if c not in untuned]
        return f"tuned: {_gains(tuned)}. Untuned: {_gains(untuned)}"
    return _gains(cells)


def _gains(cells: Sequence[Mapping[str, Any]]) -> str:
    gains = [c for c in cells if c.get("method_name") != BASELINE and _gain_text(c)]
    if not gains:
        return "no paired gain over the student alone (fewer than 2 seeds)"
    where = (lambda c: f" on {c['student']}") if len({c["student"] for c in cells}) > 1 else (lambda c: "")
    above = sorted((c for c in gains if c["delta_ci95_low"] > 0), key=lambda c: -c["delta_vs_baseline"])
    if above:
        return "beats the student alone (paired 95% interval above 0): " + "; ".join(
            f"{c['method']}{where(c)} {_gain_text(c)}" for c in above
        )
    best = max(gains, key=lambda c: c["delta_vs_baseline"])
    return (f"no method beats the student alone (every paired 95% interval reaches 0 or below); best:"
            f" {best['method']}{where(best)} {_gain_text(best)}")


def _table_setup(rows: Sequence[Mapping[str, Any]]) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    pairs = dict.fromkeys(f"{r['teacher']} → {r['student']}" for r in rows)
    methods = dict.fromkeys(r["method"] for r in rows)
    seeds = sorted({r["seed"] for r in ok})
    epochs = sorted({r["views_epochs"] for r in ok if r.get("views_epochs")})
    views = sorted({r["views_count"] for r in ok if r.get("views_count")})
    tuned = [r for r in ok if r.get("tuned")]
    text = (f"{_majority(rows, 'dataset')}: {', '.join(pairs)}; {len(methods)} methods × {len(seeds)} seeds;"
            f" {'/'.join(map(str, epochs))} epochs over {'/'.join(map(str, views))} cached views")
    if tuned:
        text += f"; every method tuned with {_majority(tuned, 'tuning.trials')} trials on val"
    return text


def _study_setup(rows: Sequence[Mapping[str, Any]]) -> str:
    views = sorted({r["views"] for r in rows if r.get("views")})
    epochs = sorted({r["epochs"] for r in rows if r.get("epochs")})
    policies = list(dict.fromkeys(r["store_policy"] for r in rows if r.get("store_policy")))
    return (f"{len({r['table'] for r in rows})} tables, methods {', '.join(dict.fromkeys(r['method_name'] for r in rows))};"
            f" V ∈ {{{', '.join(map(str, views))}}} stored views, E = {'/'.join(map(str, epochs))} epochs; stores"
            f" {', '.join(policies)}; the live teacher as reference")


def _study_headline(rows: Sequence[Mapping[str, Any]]) -> str:
    paired = [r for r in rows if r.get("gap_ci95_low") is not None]
    off = [r for r in paired if not r["gap_ci95_low"] <= 0 <= r["gap_ci95_high"]]
    text = f"{len(paired) - len(off)} of {len(paired)} cached settings match the live teacher (paired 95% interval of cached − live contains 0)"
    if off:
        text += "; the others: " + "; ".join(
            f"{r['method']} {r['store_policy']} V={r['views']} {fmt.num(r['gap_vs_live'], 2, True)}"
            f" [{fmt.num(r['gap_ci95_low'], 2, True)}, {fmt.num(r['gap_ci95_high'], 2, True)}]" for r in off
        )
    return text


def _commit(rows: Sequence[Mapping[str, Any]], facts: Mapping[str, str]) -> str:
    commits = Counter(str(r["prov.git_commit"]) for r in rows if r.get("prov.git_commit"))
    if not commits:
        return facts.get("commit", "")
    text = ", ".join(f"{c[:7]}{'+dirty' if c.endswith('dirty') else ''}" for c, _ in commits.most_common())
    return text


# --- pages ---------------------------------------------------------------------------------------------------


def _rel(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()


def _files(folder: Path) -> list[tuple[str, str]]:
    """Links to the files of an entry's folder (its page and plots excepted)."""
    return [(p.name, p.name) for p in sorted(folder.iterdir()) if p.is_file() and p.name != "index.html"]


def _copy_inputs(entry: Entry, target: Path) -> None:
    """Copies an entry's own files into its site folder when that is another folder (a workflow's site)."""
    if target.resolve() == entry.source.resolve():
        return
    target.mkdir(parents=True, exist_ok=True)
    names = ["runs.csv", EPOCHS_CSV] if entry.kind == TABLE else ["study.csv", _STUDY_MD]
    for name in names:
        if (entry.source / name).is_file():
            shutil.copyfile(entry.source / name, target / name)
    if entry.kind == TABLE:
        config = _majority(read_runs_csv(entry.source / "runs.csv"), "prov.config_file")
        if config and Path(config).is_file():
            shutil.copyfile(config, target / "config.resolved.yaml")
    if entry.meta is not None and (entry.meta / SNAPSHOT).is_file():
        shutil.copyfile(entry.meta / SNAPSHOT, target / f"published-{SNAPSHOT}")


def _write(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _md_sections(text: str) -> list[tuple[str, list[str]]]:
    """The ``## heading`` sections of a markdown file with their ``- item`` lines (a study's gap and lossless
    check, which need its records)."""
    out: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("## "):
            out.append((line[3:].strip(), []))
        elif line.startswith("- ") and out:
            out[-1][1].append(line[2:].strip())
    return out


def _study_page(entry: Entry, target: Path, nav: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    from kdbench.report.study import read_study_csv

    rows = read_study_csv(target / "study.csv")
    plot = plot_study(rows, entry.name, target / "study.png")
    headers, body = study_table(rows)
    parts = [f"<h1>Study {escape(entry.name)}</h1>", f'<p class="caption">{escape(LEGEND)}</p>',
             html_table(headers, body), figure(plot, "accuracy vs store bytes", href=plot.name)]
    md = target / _STUDY_MD
    for heading, items in _md_sections(md.read_text(encoding="utf-8") if md.is_file() else ""):
        parts.append(f"<h2>{escape(heading)}</h2><ul class=\"notes\">")
        parts += [f"<li>{escape(item)}</li>" for item in items]
        parts.append("</ul>")
    _write(target / "index.html", page(f"Study {entry.name}", parts, [*nav, *_files(target)]))
    return rows


def _nav(entries: Sequence[Entry], i: int, out_dir: Path) -> list[tuple[str, str]]:
    here = out_dir / entries[i].name
    links = [("⌂ all tables", _rel(out_dir / "index.html", here))]
    if i > 0:
        links.append((f"← {entries[i - 1].name}", _rel(out_dir / entries[i - 1].name / "index.html", here)))
    if i + 1 < len(entries):
        links.append((f"{entries[i + 1].name} →", _rel(out_dir / entries[i + 1].name / "index.html", here)))
    return links


def write_site(entries: Sequence[Entry], out_dir: Path) -> list[Entry]:
    """Writes every entry's page into ``out_dir/<name>/`` and the front page ``out_dir/index.html``.

    A table's page is rebuilt by :func:`~kdbench.report.leaderboard.render_leaderboard` from its
    ``runs.csv`` (the folder's ``epochs.csv`` for the curves, if any); a study's from its ``study.csv`` (plot
    and table) and ``study.md`` (its gap and lossless-check sections). When ``out_dir/<name>`` is not the
    entry's own folder, its files are copied there first.

    Returns:
        The entries with their :attr:`Entry.facts`.
    """
    out_dir = Path(out_dir)
    matrix: list[tuple[Entry, list[dict[str, Any]]]] = []
    for i, entry in enumerate(entries):
        target = out_dir / entry.name
        _copy_inputs(entry, target)
        facts = snapshot_facts((entry.meta / SNAPSHOT).read_text(encoding="utf-8")) if entry.meta else {}
        nav = _nav(entries, i, out_dir)
        if entry.kind == TABLE:
            rows = read_runs_csv(target / "runs.csv")
            config = table_config_hash(rows)
            title = f"{entry.name} (config {config})" if config else entry.name
            render_leaderboard(rows, target, title, read_epochs_csv(target / EPOCHS_CSV), nav=nav)
            cells = fmt.read_csv(target / "leaderboard.csv", lambda c: c in _LEADERBOARD_TEXT)
            matrix.append((entry, cells))
            facts |= {"setup": _table_setup(rows), "headline": _headline(cells), "commit": _commit(rows, facts)}
        else:
            rows = _study_page(entry, target, nav)
            facts |= {"setup": _study_setup(rows), "headline": _study_headline(rows)}
        entry.facts = facts
    _write(out_dir / "index.html", front_page(entries, matrix, out_dir))
    _logger.info("site of %d tables and studies written to %s", len(entries), out_dir)
    return list(entries)


_LEADERBOARD_TEXT = frozenset({"dataset", "protocol_hash", "teacher", "teacher_model", "student", "method",
                               "method_name", "params", "status", "seed_list", "notes", "delta_note"})


# --- the front page ------------------------------------------------------------------------------------------

_FACTS = (("question", "Question"), ("setup", "Setup"), ("headline", "Headline"), ("wall_time", "Wall time"),
          ("commit", "Commit"), ("command", "Command"))


def matrix_columns(matrix: Sequence[tuple[Entry, Sequence[Mapping[str, Any]]]]) -> list[tuple[str, str, str]]:
    """The matrix's columns: ``(table, teacher, student)`` in table order."""
    return [(e.name, *key) for e, cells in matrix for key in dict.fromkeys((c["teacher"], c["student"]) for c in cells)]


def matrix_values(
    matrix: Sequence[tuple[Entry, Sequence[Mapping[str, Any]]]],
) -> dict[str, dict[tuple[str, str, str], Mapping[str, Any]]]:
    """Method label -> column (:func:`matrix_columns`) -> its ``leaderboard.csv`` row, for every method but the
    student alone (the reference of every gain)."""
    out: dict[str, dict[tuple[str, str, str], Mapping[str, Any]]] = {}
    for entry, cells in matrix:
        for c in cells:
            if c.get("method_name") != BASELINE:
                out.setdefault(c["method"], {})[(entry.name, c["teacher"], c["student"])] = c
    order = sorted(out, key=lambda m: (next(iter(out[m].values()))["method_name"], m))
    return {m: out[m] for m in order}


def _matrix_cell(c: Mapping[str, Any] | None) -> str:
    if c is None:
        return '<td class="none">·</td>'
    gain = _gain_text(c)
    if not gain:
        note = "skipped" if c.get("status") == "skipped" else "no interval"
        return f'<td class="none" title="{escape(str(c.get("delta_note") or note))}">{note}</td>'
    low, high = c["delta_ci95_low"], c["delta_ci95_high"]
    cls = "up" if low > 0 else "down" if high < 0 else "flat"
    mean, interval = gain.split(" ", 1)
    return (f'<td class="num {cls}" title="{escape(gain)} (n={c.get("delta_n")})">{mean}<br>'
            f"<small>{escape(interval)}</small></td>")


def _matrix_html(matrix: Sequence[tuple[Entry, Sequence[Mapping[str, Any]]]], out_dir: Path) -> str:
    columns = matrix_columns(matrix)
    values = matrix_values(matrix)
    head = "".join(
        f'<th><a href="{escape(name)}/index.html">{escape(name.removeprefix("fashion-mnist-"))}</a><br>'
        f"<small>{escape(student)}</small></th>"
        for name, _, student in columns
    )
    body = []
    for method, cells in values.items():
        swatch = f'<span class="swatch" style="background:{method_color(method)}"></span>'
        row = "".join(_matrix_cell(cells.get(col)) for col in columns)
        body.append(f'<tr><th class="method">{swatch}{escape(method)}</th>{row}</tr>')
    table = f"<table class=\"matrix\"><thead><tr><th>method</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="scroll">{table}</div>'


_FRONT_CSS = """<style>
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .15rem .8rem; font-size: .9rem; }
dl.facts dt { font-weight: 600; } dl.facts dd { margin: 0; }
dl.facts code { white-space: pre-wrap; overflow-wrap: anywhere; }
table.matrix td, table.matrix th { text-align: center; } table.matrix th.method { text-align: left; }
td.up { background: #e3f4e1; } td.down { background: #fbe3e1; } td.none { color: #999; }
@media (max-width: 760px) { dl.facts { grid-template-columns: 1fr; } dl.facts dd { margin-bottom: .3rem; } }
</style>"""


def front_page(entries: Sequence[Entry], matrix: Sequence[tuple[Entry, Sequence[Mapping[str, Any]]]],
               out_dir: Path) -> str:
    """The site's ``index.html``: the entries with their facts and links, then the method × table matrix."""
    parts = [
        _FRONT_CSS,
        "<h1>kdbench results</h1>",
        f"<p>{len([e for e in entries if e.kind == TABLE])} leaderboard tables and"
        f" {len([e for e in entries if e.kind == STUDY])} study, each rebuilt by the current kdbench from its"
        " committed records (<code>runs.csv</code>, <code>study.csv</code>). Every number is explained on its"
        ' page; <a href="#matrix">the method × table matrix</a> is below.</p>',
    ]
    for e in entries:
        files = " · ".join(f'<a href="{escape(e.name)}/{escape(href)}">{escape(text)}</a>'
                           for text, href in _files(out_dir / e.name))
        facts = "".join(f"<dt>{label}</dt><dd>{_fact(key, e.facts.get(key, ''))}</dd>" for key, label in _FACTS)
        parts.append(f'<h2 id="{escape(e.name)}"><a href="{escape(e.name)}/index.html">{escape(e.name)}</a>'
                     f" <small>({e.kind})</small></h2>")
        parts.append(f'<dl class="facts">{facts}<dt>Files</dt><dd>{files}</dd></dl>')
    parts += [
        '<h2 id="matrix">Each method against the student alone, table by table</h2>',
        '<p class="caption">Paired gain in last-epoch test top-1 over the student alone of the same table, teacher'
        " and student (mean over seeds, paired 95% t-interval below it): green when the interval is above 0, red"
        " when below, uncoloured when it contains 0; · where the method did not run. Numbers differ in protocol"
        " from table to table (epochs, data, tuning): compare a method's sign and interval across them, not"
        " its size. A column header links to its table.</p>",
        _matrix_html(matrix, out_dir),
    ]
    return page("kdbench results", parts)


def _fact(key: str, value: str) -> str:
    if not value:
        return "—"
    return f"<code>{escape(value)}</code>" if key in ("command", "commit") else escape(value)


# --- stale pages ---------------------------------------------------------------------------------------------


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def stale_pages(site: Path) -> list[str]:
    """Every page of a site written by older code than it needs, one line each: a page without the stamp, of
    another :data:`~kdbench.report.html_page.PAGE_FORMAT`, or by a kdbench older than one that wrote its
    records (``prov.kdbench_version`` in its ``runs.csv``)."""
    out = []
    for path in sorted([Path(site) / "index.html", *Path(site).glob("*/index.html")]):
        version, page_format = page_stamp(path.read_text(encoding="utf-8"))
        runs = path.parent / "runs.csv"
        needs = max((_version(str(v)) for r in read_runs_csv(runs) if (v := r.get("prov.kdbench_version"))),
                    default=()) if runs.is_file() else ()
        if version is None or page_format is None:
            out.append(f"{path}: no kdbench stamp (written before pages were stamped); run `kdbench site`")
        elif page_format != PAGE_FORMAT:
            out.append(f"{path}: page format {page_format}, this kdbench writes {PAGE_FORMAT}; run `kdbench site`")
        elif _version(version) < needs:
            out.append(f"{path}: written by kdbench {version}, its records by {'.'.join(map(str, needs))};"
                       " run `kdbench site`")
    return out
