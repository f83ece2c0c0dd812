"""The human-readable leaderboard: captions, headers and text cells shared by markdown and HTML.

Markdown and HTML render exactly the same :class:`DisplayTable` per group, so the two can never disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kdbench import __version__
from kdbench.report import _format as fmt
from kdbench.report.aggregate import (
    HEADLINE,
    PAIRED_METRICS,
    Group,
    LeaderboardCell,
    Table,
    protocols_per_dataset,
)
from kdbench.report.provenance import ProvenanceField
from kdbench.report.published import Published
from kdbench.report.records import DIRTY_FILES, split_dirty_files

TEACHER_FWD = "Teacher fwd (images)"

_LEGEND = (
    (
        "**Top-1 (last epoch)** is the headline: test top-1 (%) of the last epoch, mean ± sample std "
        "(ddof 1) over seeds."
    ),
    (
        "**95% CI** is the half width of the Student-t interval of the mean, t(0.975, n−1)·std/√n (t from a "
        "table for df ≤ 30, 1.960 beyond)."
    ),
    (
        "**Δ vs baseline** is the mean over seeds of the paired difference (method − student alone, same "
        "seed) with its paired 95% t-interval over the seeds both ran; it needs at least 2 such seeds."
    ),
    (
        "**Rank** (within a teacher→student table, over cells with at least 2 seeds): cells are ordered by "
        "mean; walking down, a cell joins the current tier unless its paired difference with some cell "
        "already in the tier (per-seed difference over the seeds both ran, at least 2) has a 95% t-interval "
        "entirely below 0; then it starts a new tier and its note names that cell and the difference. Two "
        "cells with fewer than 2 seeds in common count as not separable. A tier shares the rank "
        "1 + (cells in better tiers), so no cell is paired-below another cell of its rank, and no cell ranks "
        "better than one with a higher mean. A cell with a single seed is not ranked."
    ),
    (
        "**Top-1 @ best-val epoch†** is secondary: the test top-1 at the epoch with the best *validation* "
        "top-1 (model selection never uses test)."
    ),
    (
        "**Agreement**: % of test images where student and teacher argmax agree. Cost columns are means per "
        "run. **Teacher**: how the teacher's outputs reached the student: `cache` = read from the "
        "teacher-output store; `live` = the teacher ran during training, `live (required)` when the method "
        f"needs the teacher module online. **{TEACHER_FWD}**: training images the teacher forwarded during "
        "the student's training, summed over epochs (0 when its outputs came from the store; the teacher's "
        "own training, the store build and evaluation are not counted)."
    ),
)
# Headers of the paired metrics beside the headline (each shown, with its Δ, when a run of the group has it).
METRIC_HEADERS = {"map_cosine": "mAP (cosine)", "map_euclidean": "mAP (Euclidean)"}
_LEGEND_RETRIEVAL = (
    "**mAP (cosine)**, **mAP (Euclidean)**: retrieval mean average precision (%, 11 recall levels, InDistill's "
    "official protocol) of the student's embedding at the protocol's `retrieval_tap` (a feature map globally "
    "average-pooled): the test images query the training images, both whole and un-augmented, ranked by cosine "
    "or Euclidean distance; relevant = same class. Mean ± sample std over seeds; its **Δ** is the paired gain "
    "over the baseline with its 95% t-interval, as for top-1. Top-1 stays the headline and decides the rank."
)
_LEGEND_PUBLISHED = (
    "**Published** numbers (teacher in the caption, methods in the *Published* column) come from their "
    "authors' own protocols and reporting rules; each is marked [n] and its source is footnote [n] under "
    "its table: context, not a target."
)


_LEGEND_TAIL = (
    "**Teacher** `cache + live tail`: the teacher's outputs come from the store, but the method also runs the "
    "teacher's last stage (its *tail*, frozen) live on the student's features (ScaleKD's teacher parameter "
    f"perception). **{TEACHER_FWD}** then also shows the samples through the tail per run (`… tail [n]`; each "
    "pass counts), and footnote [n] gives the tail's parameters and, when the record has the teacher's size, "
    "their share of the teacher's: a rough proxy for the tail's share of a full teacher forward's compute."
)


def legend(tables: Sequence[Table]) -> list[str]:
    """The "How to read these tables" items; those on retrieval, published numbers and live teacher tails only
    when a table shows them."""
    groups = [g for t in tables for g in t.groups]
    shows_published = any(g.teacher_published or any(c.published for c in g.cells) for g in groups)
    shows_retrieval = any(_paired_columns(g) for g in groups)
    shows_tail = any(c.live_teacher_tail for g in groups for c in g.cells)
    return [
        *_LEGEND,
        *[_LEGEND_RETRIEVAL] * shows_retrieval,
        *[_LEGEND_PUBLISHED] * shows_published,
        *[_LEGEND_TAIL] * shows_tail,
    ]


def _paired_columns(group: Group) -> list[str]:
    """The paired metrics beside the headline that some run of ``group`` has (retrieval mAP)."""
    return [m for m in PAIRED_METRICS if m != HEADLINE and any(c.stat(m).n for c in group.cells)]


def _delta(cell: LeaderboardCell, group: Group, column: str) -> str:
    """The paired gain of ``column`` over the baseline as text (``(baseline)`` for the baseline itself)."""
    if cell is group.baseline:
        return "(baseline)"
    return fmt.delta(cell.deltas.get(column)) if cell.stat(column).n else ""


@dataclass
class DisplayTable:
    """One group as text: a caption, a header row, text rows and footnotes.

    Attributes:
        title: Heading (``teacher (model) → student``).
        caption: One-paragraph caption (teacher top-1, student size, views).
        headers: Column titles.
        rows: One list of cell texts per leaderboard cell.
        footnotes: Sources of published numbers and group-level notes.
    """

    title: str
    caption: str
    headers: list[str]
    rows: list[list[str]]
    footnotes: list[str] = field(default_factory=list)


def _method_label(cell: LeaderboardCell) -> str:
    name = cell.method_name
    return cell.method if name in (None, cell.method) else f"{cell.method} ({name})"


def _seeds(cell: LeaderboardCell) -> str:
    return f"{cell.top1.n}" + (f" (+{len(cell.skipped)} skipped)" if cell.skipped else "")


def _footnote(text: str, footnotes: list[str]) -> str:
    """Appends footnote ``text`` to the group's ``footnotes`` and returns its marker ``"[n]"``."""
    footnotes.append(text)
    return f"[{len(footnotes)}]"


def _published(pub: Published, what: str, footnotes: list[str]) -> str:
    """``"73.33 [n]"``; appends footnote ``n`` (what the number is and its source) to ``footnotes``."""
    marker = _footnote(f"Published {what}: {fmt.num(pub.top1)} — {pub.source}", footnotes)
    return f"{fmt.num(pub.top1)} {marker}"


def tail_note(cell: LeaderboardCell) -> str:
    """What a live teacher tail cost, in words: ``"teacher tail: 1.2M samples through 25k of the teacher's 400k
    params (6%) per run ..."``; the tail's parameters alone when the record lacks the teacher's. ``""`` for a
    cell without a live tail."""
    if not cell.live_teacher_tail:
        return ""
    samples, tail, teacher = (
        cell.mean_of("teacher_tail_forward"),
        cell.first("teacher_tail_params"),
        cell.first("teacher_params"),
    )
    if samples is None:
        return (
            "teacher tail ran live; its compute was not recorded (the record has no provenance.method_audit)"
        )
    n = len(cell.by_seed("teacher_tail_forward"))
    seeds = f"mean over {n} seeds" if n > 1 else "1 seed"
    text = f"teacher tail: {fmt.si(samples)} samples"
    if tail is None:
        return f"{text} per run ({seeds})"
    if not teacher:
        return (
            f"{text} through its {fmt.si(tail)} params per run ({seeds}; the teacher's size is not recorded)"
        )
    share = tail / teacher
    pct = f"{share:.0%}" if share >= 0.01 else f"{share:.1%}"
    return (
        f"{text} through {fmt.si(tail)} of the teacher's {fmt.si(teacher)} params ({pct}) per run ({seeds});"
        f" by parameter share about {fmt.si(samples * share)} full teacher forwards"
    )


def _teacher_forward(cell: LeaderboardCell, footnotes: list[str]) -> str:
    """The teacher-forward cell: full teacher forwards, plus ``"<n> tail [k]"`` with footnote ``k``
    (:func:`tail_note`) when the method ran the teacher's tail live."""
    full = fmt.si(cell.mean_of("teacher_forward"))
    if not cell.live_teacher_tail:
        return full
    samples = cell.mean_of("teacher_tail_forward")
    tail = "tail" if samples is None else f"{fmt.si(samples)} tail"
    text = f"{full} + {tail}" if cell.mean_of("teacher_forward") else tail
    return f"{text} {_footnote(f'{cell.method} — {tail_note(cell)}', footnotes)}"


def _caption(group: Group, views: set[str], footnotes: list[str]) -> str:
    teacher = f"Teacher {group.key[2]} ({group.teacher_model}): "
    t = group.teacher_top1
    if t.mean is None:
        teacher += "test top-1 not recorded"
    else:
        spread = " (range over runs; see notes)" if t.std else ""
        teacher += f"test top-1 {fmt.num(t.mean)}%{spread}"
    if group.teacher_published:
        what = f"teacher {group.teacher_model}"
        teacher += f", published {_published(group.teacher_published, what, footnotes)}"
    student_params = next((c.first("student_params") for c in group.cells if c.first("student_params")), None)
    student = f"Student {group.key[3]}" + (f": {fmt.si(student_params)} parameters" if student_params else "")
    parts = [teacher, student]
    if len(views) == 1 and next(iter(views)):
        parts.append(f"Views: {next(iter(views))}")
    return ". ".join(parts) + "."


def group_display(group: Group) -> DisplayTable:
    """The text table of one group."""
    cells = group.cells
    views = {c.views_note for c in cells if c.views_note}
    retrieval = _paired_columns(group)
    show_pub = any(c.published for c in cells)
    headers = [
        "Rank",
        "Method",
        "Seeds",
        "Top-1 (last epoch)",
        "95% CI",
        "Δ vs baseline [95% CI]",
        "Top-1 @ best-val epoch†",
        "Agreement",
    ]
    for m in retrieval:
        headers += [METRIC_HEADERS.get(m, m), f"Δ {METRIC_HEADERS.get(m, m)} [95% CI]"]
    headers += ["Published"] * show_pub
    headers += ["Wall time", TEACHER_FWD, "Cache read", "Extra params", "Teacher", "Notes"]
    footnotes: list[str] = []
    caption = _caption(group, views, footnotes)
    taps = sorted({str(c.first("retrieval_tap")) for c in cells if c.first("retrieval_tap")})
    if retrieval and taps:
        caption += f" Retrieval embedding: {', '.join(taps)}."
    rows = []
    for cell in cells:
        notes = list(cell.notes)
        if len(views) > 1 and cell.views_note:
            notes.append(cell.views_note)
        if cell.mean_of("assistant_time_s") is not None:  # the run's own assistant (TAKD, AMD): its cost too
            searched = cell.first("assistant_candidates")
            notes.append(f"+ {fmt.seconds(cell.mean_of('assistant_time_s'))} for its assistant"
                         + (f" (search of {searched} candidates + fine-tuning)" if searched else ""))
        if cell.top1.n:
            top1 = fmt.mean_std(cell.top1)
            ci = f"±{fmt.num(cell.top1.ci95)}" if cell.top1.ci95 is not None else "n/a (1 seed)"
        else:
            top1, ci = f"skipped: {cell.skip_reason}", ""
        row = [
            str(cell.rank) if cell.rank is not None else fmt.DASH,
            _method_label(cell),
            _seeds(cell),
            top1,
            ci,
            _delta(cell, group, HEADLINE),
            fmt.mean_std(cell.best_val_top1),
            fmt.num(cell.mean_of("teacher_agreement"), 1),
        ]
        for m in retrieval:
            row += [fmt.mean_std(cell.stat(m)), _delta(cell, group, m)]
        if show_pub:
            row.append(_published(cell.published, cell.method, footnotes) if cell.published else "")
        row += [
            fmt.seconds(cell.mean_of("wall_time_s")),
            _teacher_forward(cell, footnotes),
            fmt.si(cell.mean_of("cache_bytes_read"), "B"),
            fmt.si(cell.first("extra_params")),
            fmt.DASH if cell.teacher_source == "none" else cell.teacher_source,
            "; ".join(notes),
        ]
        rows.append(row)
    footnotes = [f"[{i}] {text}" for i, text in enumerate(footnotes, 1)] + group.notes
    return DisplayTable(group.title, caption, headers, rows, footnotes)


def protocol_warnings(tables: Sequence[Table]) -> list[str]:
    """One sentence per dataset whose records come from more than one protocol."""
    out = []
    for dataset, hashes in protocols_per_dataset(tables).items():
        if len(hashes) > 1:
            out.append(
                f"Dataset {dataset} has records from {len(hashes)} different protocols "
                f"({', '.join(hashes)}); each protocol gets its own table and numbers from different tables "
                "must not be compared."
            )
    return out


PROVENANCE_HEADERS = ["Item", "Scope", "Value", "Runs"]
_DIGEST_CHARS = 16


def _label(column: str) -> str:
    if column.startswith("pkg."):
        return f"package {column[4:]}"
    if column.startswith("store."):
        return f"store manifest {column[6:]}"
    return column.removeprefix("prov.")


def _short(value: object) -> str:
    text = str(value)
    is_digest = len(text) > 2 * _DIGEST_CHARS and all(ch in "0123456789abcdef" for ch in text.lower())
    return text[:_DIGEST_CHARS] + "…" if is_digest else text


def provenance_display(fields: Sequence[ProvenanceField]) -> list[list[str]]:
    """Rows of the provenance footer (:data:`PROVENANCE_HEADERS`): one per item and scope, identical values
    collapsed into one, differing values listed with their run counts and flagged ``DIFFERS``.

    Long hex digests are shortened to 16 characters (the full values are in ``runs.csv``).
    """
    rows = []
    for f in fields:
        total = sum(n for _, n in f.values)
        if f.differs:
            value = "DIFFERS: " + "; ".join(f"{_short(v)} ({n} run{'s' * (n != 1)})" for v, n in f.values)
        else:
            value = _short(f.values[0][0])
        rows.append([_label(f.column), " / ".join(f.scope) or "all runs", value, str(total)])
    return rows


def flagged_display(flagged: dict[str, list[str]]) -> list[str]:
    """One line per run whose provenance differs from the majority of its scope."""
    return [f"{record}: {', '.join(_label(c) for c in cols)}" for record, cols in sorted(flagged.items())]


def dirty_warning(fields: Sequence[ProvenanceField]) -> str:
    """The warning on runs made from a checkout with uncommitted changes (``""`` when there are none).

    Names the modified or untracked files the records list (``prov.dirty_files``); records written before
    that key existed only say that files were modified.
    """
    dirty = sum(
        n for f in fields if f.column == "prov.git_commit" for v, n in f.values if str(v).endswith("dirty")
    )
    if not dirty:
        return ""
    files = sorted(
        {p for f in fields if f.column == DIRTY_FILES for v, _ in f.values for p in split_dirty_files(v)}
    )
    listed = f" Uncommitted files: {', '.join(files)}." if files else " The modified files were not recorded."
    return (
        f"{dirty} run(s) were made from a kdbench checkout with uncommitted changes (git commit '+dirty'): "
        f"their code cannot be recovered from the commit alone.{listed}"
    )


@dataclass
class TableView:
    """One (dataset, protocol) table as text, with its plots.

    Attributes:
        heading: ``"<dataset> — protocol <hash>"``.
        groups: The text table of each group and the path of its training-curve plot (or ``None``).
        plots: The table's own plots (accuracy vs size, gain vs baseline).
    """

    heading: str
    groups: list[tuple[DisplayTable, Path | None]]
    plots: list[Path]


@dataclass
class ReportView:
    """Everything the markdown and HTML renderers show.

    Attributes:
        title: Report title.
        summary: One sentence on what the report was built from.
        legend: The "How to read these tables" items (:func:`legend`).
        warnings: Sentences that must stand out (several protocols per dataset, uncommitted changes,
            differing provenance).
        tables: One :class:`TableView` per (dataset, protocol).
        provenance: Rows of the provenance footer (:data:`PROVENANCE_HEADERS`).
        flagged: Runs whose provenance differs, one line each.
    """

    title: str
    summary: str
    legend: list[str]
    warnings: list[str]
    tables: list[TableView]
    provenance: list[list[str]]
    flagged: list[str]


def report_view(
    title: str,
    tables: Sequence[Table],
    plots: dict[str, list[Path]],
    fields: Sequence[ProvenanceField],
    flagged: dict[str, list[str]],
    n_runs: int,
) -> ReportView:
    """Assembles the :class:`ReportView` of a leaderboard.

    Args:
        title: Report title.
        tables: The leaderboard tables.
        plots: Plot paths as returned by :func:`kdbench.report.plots.write_plots`.
        fields: Provenance fields (:func:`kdbench.report.provenance.summarize_provenance`).
        flagged: Runs whose provenance differs, with their columns.
        n_runs: Number of run records read.
    """
    n_skipped = sum(len(c.skipped) for t in tables for c in t.cells)
    summary = (
        f"Built by kdbench {__version__} from {n_runs} run records ({n_skipped} skipped) in {len(tables)} "
        f"table(s), {sum(len(t.groups) for t in tables)} teacher→student group(s)."
    )
    warnings = protocol_warnings(tables)
    dirty = dirty_warning(fields)
    if dirty:
        warnings.append(dirty)
    if flagged:
        warnings.append(
            f"{len(flagged)} run(s) have provenance that differs from the other runs of their scope; "
            "see the provenance section."
        )
    views = []
    for t in tables:
        groups = []
        for g in t.groups:
            curves = plots.get(f"{t.slug}/{g.key[2]}/{g.key[3]}") or [None]
            groups.append((group_display(g), curves[0]))
        views.append(TableView(f"{t.dataset} — protocol {t.protocol_hash}", groups, plots.get(t.slug, [])))
    return ReportView(
        title, summary, legend(tables), warnings, views, provenance_display(fields), flagged_display(flagged)
    )
