"""The leaderboard: run records -> tidy runs table -> tables, plots, markdown, CSV and HTML.

Everything is derived from the runs table (``runs.csv``) and the runs' epochs (``epochs.csv``): the leaderboard
cells, the plots and the provenance footer, by :func:`render_leaderboard`, which also rebuilds a published
snapshot's page from the two files (:mod:`kdbench.report.site`). Outputs in ``out_dir``:

* ``runs.csv``: one row per run record (identity, ``param.*``, final metrics, cost, provenance);
* ``epochs.csv``: one row per (run, epoch): what the training curves are drawn from;
* ``leaderboard.csv``: one row per (dataset, protocol hash, teacher, student, method label);
* ``pairs.csv``: every two cells of a group compared paired by seed, per metric (:mod:`kdbench.report.pairs`);
* ``leaderboard.md`` and ``index.html`` (self-contained): the same tables for people, with plots;
* ``plots/*.png``.

A tuned table (:mod:`kdbench.tuning`) is given both its untuned and its final tuned run records: every cell
then has two rows, the tuned one (the headline, its label as configured) and ``<label> (untuned)``, each with
gains over the student alone of its own variant; the tuning columns, the "Tuning" paragraph and a plot of the
expected best validation score after k trials come with them (:mod:`kdbench.report.aggregate`).

See :mod:`kdbench.report.aggregate` for the rank rule and :mod:`kdbench.report.stats` for the formulas.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from kdbench._util import atomic_path
from kdbench.report._format import write_csv
from kdbench.report.aggregate import LEADERBOARD_COLUMNS, build_tables, leaderboard_rows
from kdbench.report.display import report_view
from kdbench.report.html_page import render_html
from kdbench.report.markdown import render_markdown
from kdbench.report.pairs import PAIR_COLUMNS, pair_rows
from kdbench.report.plots import epochs_of_run, write_plots
from kdbench.report.provenance import summarize_provenance
from kdbench.report.records import (
    EPOCHS_CSV,
    RecordError,
    epochs_table,
    flatten_record,
    load_runs,
    runs_columns,
    sort_runs,
)

_logger = logging.getLogger(__name__)

__all__ = ["RecordError", "render_leaderboard", "write_leaderboard"]


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_leaderboard(
    record_paths: Sequence[Path], out_dir: Path, title: str, unscheduled: Sequence[Mapping[str, Any]] = (),
    selection: str | None = None,
) -> dict[str, Any]:
    """Builds the whole leaderboard of a set of run records.

    Writes the runs table (``runs.csv``) and every run's epochs (``epochs.csv``), then everything else from
    those rows (:func:`render_leaderboard`, which a published snapshot's page is rebuilt by as well).

    Args:
        record_paths: ``record.json`` files (one per teacher, student, method label and seed; a tuned table's
            final tuned runs beside its untuned ones).
        out_dir: Output directory (created).
        title: Title of the markdown and HTML pages.
        unscheduled: Records (status ``skipped``, with the reason) of the cells the plan did not schedule
            because the method cannot run on the pair; they are listed like skipped runs.
        selection: What part of the table the records are (the config's ``select:``, in words); ``None``: the
            whole table.

    Returns:
        A summary: ``runs`` and ``skipped`` (records), ``cells``, ``tables`` (dataset × protocol),
        ``groups`` (teacher × student), ``provenance_flagged`` (runs whose provenance differs),
        ``protocols`` (hashes per dataset) and ``files`` (every file written, as strings).

    Raises:
        RecordError: A record is not valid JSON or lacks a key (the message names the file and the key),
            or two records are the same run.
        ValueError: No record paths were given.
    """
    if not record_paths:
        raise ValueError("write_leaderboard needs at least one run record")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    rows = load_runs(Path(p) for p in record_paths)
    rows = sort_runs(rows + [flatten_record(r, Path("(not scheduled)")) for r in unscheduled])
    summarize_provenance(rows, runs_columns(rows))  # (marks each row's provenance_differs for runs.csv)
    write_csv(out_dir / "runs.csv", rows, runs_columns(rows))
    epochs = {r["record"]: epochs_of_run(r) for r in rows if r["status"] == "ok"}
    write_csv(out_dir / EPOCHS_CSV, *epochs_table(epochs))
    if selection is not None:  # a run of part of the table (`select:`): the title says which part
        title = f"{title}, a selection of the table: {selection}"
    summary = render_leaderboard(rows, out_dir, title, epochs)
    summary["files"] = {"runs.csv": str(out_dir / "runs.csv"), EPOCHS_CSV: str(out_dir / EPOCHS_CSV)} | summary["files"]
    return summary


def render_leaderboard(
    rows: Sequence[Mapping[str, Any]], out_dir: Path, title: str, epochs: Mapping[str, list[dict]],
    nav: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """Everything of a leaderboard that is derived from its runs table: ``leaderboard.csv``, the plots,
    ``leaderboard.md`` and ``index.html``.

    Args:
        rows: The runs table (:func:`~kdbench.report.records.load_runs` of the records, or
            :func:`~kdbench.report.records.read_runs_csv` of a snapshot's ``runs.csv``).
        out_dir: Output directory (created).
        title: Title of the pages.
        epochs: Each run's epochs by its ``record`` (training curves; a run without is left out of them).
        nav: Links of a site the page belongs to, ``(text, href)`` (:mod:`kdbench.report.site`).

    Returns:
        The summary of :func:`write_leaderboard` (its ``files`` without the runs table).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [dict(r) for r in rows]
    fields, flagged = summarize_provenance(rows, runs_columns(rows))
    tables = build_tables(rows)
    files = {"leaderboard.csv": out_dir / "leaderboard.csv"}
    cells = leaderboard_rows(tables)
    write_csv(files["leaderboard.csv"], cells, LEADERBOARD_COLUMNS)
    files["pairs.csv"] = out_dir / "pairs.csv"
    write_csv(files["pairs.csv"], pair_rows(tables), PAIR_COLUMNS)

    plots = write_plots(tables, out_dir / "plots", lambda run: epochs.get(run["record"], []))
    view = report_view(title, tables, plots, fields, flagged, n_runs=len(rows))
    if not any(epochs.values()):
        view.warnings.append(
            "No per-epoch records (epochs.csv): the training curves are not shown; regenerate the table to see"
            " them."
        )
    files["leaderboard.md"] = out_dir / "leaderboard.md"
    _write_text(files["leaderboard.md"], render_markdown(view, out_dir))
    files["index.html"] = out_dir / "index.html"
    own = [(name, name) for name in ("leaderboard.md", "leaderboard.csv", "pairs.csv", "runs.csv", EPOCHS_CSV)
           if (out_dir / name).exists()]
    _write_text(files["index.html"], render_html(view, nav=nav, files=own, plot_dir=out_dir))

    plot_files = sorted({p for paths in plots.values() for p in paths})
    for w in view.warnings:
        _logger.warning("%s", w)
    _logger.info("leaderboard of %d runs (%d cells) written to %s", len(rows), len(cells), out_dir)
    return {
        "runs": len(rows),
        "skipped": sum(r["status"] == "skipped" for r in rows),
        "cells": len(cells),
        "tables": len(tables),
        "groups": sum(len(t.groups) for t in tables),
        "provenance_flagged": len(flagged),
        "protocols": {
            t.dataset: sorted({u.protocol_hash for u in tables if u.dataset == t.dataset}) for t in tables
        },
        "files": {name: str(path) for name, path in files.items()}
        | {f"plots/{p.name}": str(p) for p in plot_files},
    }
