"""Does a regenerated leaderboard reproduce a published one? A cell-by-cell, metric-by-metric check of
``leaderboard.csv``.

Cells are matched on (dataset, teacher, student, method label), not on the protocol hash: a re-run on
another machine may differ in provenance only. When the matched cells' protocol hashes differ, the row
and the summary say so.

A published cell *claims* every metric of :data:`METRICS` that its ``leaderboard.csv`` row has a mean for:
top-1 always (the headline), each retrieval mAP (cosine, Euclidean) where the protocol measured it (a table
without retrieval leaves those columns empty, and a snapshot written before they existed lacks them: then
the metric is not claimed). For every claimed metric of every cell of the *published* table:

* the regenerated mean must lie in the *published* 95% interval ``[mean - ci95, mean + ci95]`` (ends
  included) to count as *reproduced*; the new table's own interval plays no part;
* a published cell with a single seed has no interval: it is compared exactly (up to the 6 decimals
  ``leaderboard.csv`` keeps) and flagged;
* a metric the new table has no value for (its cell is absent, has no finished seed, or lacks that
  metric) is *missing*.

Across platforms the interval is the wrong yardstick: its width is the published mean's uncertainty, not a
rerun's, and a rerun on another device or CPU kind (another ``prov.device``, ``prov.cpu`` or
``prov.cpu_capability`` in the two ``runs.csv``) takes other floating-point paths from the first step (another
teacher, other stores, other picks). Then each claimed metric is tested against the published *seeds*: Welch's
t test of the two means (:func:`kdbench.report.stats.two_sample_p`; a single-seed side borrows the other's
variance), the p-values of the whole table adjusted by Holm's method (:func:`kdbench.report.stats.holm`), and
a metric *differs* when its adjusted p is below :data:`ALPHA`: at most a 5% chance that a faithful rerun shows any
"differs". Both sides with one seed are compared exactly. Where either ``runs.csv`` is missing or predates those
columns, the platforms are unknown and the interval rule applies.

A cell is reproduced only when every metric it claims is; its status is the worst of its metrics' (missing,
then outside, then differs). A published cell without a finished seed itself is not compared.

The paired gains over the baseline are shown for context; they do not decide anything. Cells of the new
table that the published one lacks are listed as *new (not published)* and do not fail the check.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from kdbench.report import _format as fmt
from kdbench.report.aggregate import (
    DELTA_COLUMNS,
    HEADLINE,
    PAIRED_METRICS,
    TOP1_COLUMNS,
    delta_columns,
    summary_columns,
)
from kdbench.report.markdown import md_table
from kdbench.report.records import RecordError
from kdbench.report.stats import PairedDelta, Summary, holm, two_sample_p

_logger = logging.getLogger(__name__)

LEADERBOARD_CSV = "leaderboard.csv"
# Columns of leaderboard.csv the comparison needs (a subset of LEADERBOARD_COLUMNS, so that a snapshot
# written before later columns were added can still be compared). The other metrics' columns are optional:
# a file without them does not claim (published) or does not have (new) that metric.
_COLUMNS = (
    "dataset",
    "protocol_hash",
    "teacher",
    "student",
    "method",
    "seeds",
    "seed_list",
    *TOP1_COLUMNS,
    *DELTA_COLUMNS,
)
# The provenance columns of runs.csv that decide which floating-point paths a run took.
PLATFORM_COLUMNS = ("prov.device", "prov.cpu", "prov.cpu_capability")
RUNS_CSV = "runs.csv"
#: Family-wise error rate of the test across platforms.
ALPHA = 0.05
# leaderboard.csv keeps 6 decimals: a single-seed cell is "exact" within half of the last one.
_EXACT_TOLERANCE = 5e-7


@dataclass(frozen=True)
class Metric:
    """A metric the comparison checks: a :data:`kdbench.report.aggregate.PAIRED_METRICS` column.

    Attributes:
        name: Its name in ``leaderboard.csv`` (``top1``, ``map_cosine``, ``map_euclidean``).
        label: Its name in the report (``top-1``, ``mAP cosine``, ``mAP Euclidean``).
        columns: Its ``leaderboard.csv`` columns of mean, std and 95% half width.
        delta_columns: Its paired-gain columns (mean, interval ends, paired seeds, note).
    """

    name: str
    label: str
    columns: tuple[str, str, str]
    delta_columns: tuple[str, str, str, str, str]


_LABELS = {HEADLINE: "top-1", "map_cosine": "mAP cosine", "map_euclidean": "mAP Euclidean"}
#: Every metric checked, the headline (top-1) first.
METRICS = tuple(
    Metric(PAIRED_METRICS[c], _LABELS.get(c, PAIRED_METRICS[c]), summary_columns(c), delta_columns(c))
    for c in PAIRED_METRICS
)
TOP1 = METRICS[0].name

REPRODUCED = "reproduced"
REPRODUCED_EXACTLY = "reproduced exactly (1 seed)"
OUTSIDE = "outside the published interval"
DIFFERS_SEEDS = "differs from the published seeds"
DIFFERS = "differs (1 seed, compared exactly)"
MISSING = "missing"
NOT_COMPARED = "not compared (no finished seed in published)"
NEW = "new (not published)"
_FAILING = (OUTSIDE, DIFFERS_SEEDS, DIFFERS, MISSING)
# A cell's status is the first of these that one of its metrics has.
_PRECEDENCE = (MISSING, OUTSIDE, DIFFERS_SEEDS, DIFFERS, REPRODUCED_EXACTLY, REPRODUCED)


class LeaderboardError(RecordError):
    """A leaderboard directory that cannot be compared; the message names the path and the fix."""


@dataclass(frozen=True)
class _Entry:
    """One row of a ``leaderboard.csv``, parsed."""

    key: tuple[str, str, str, str]
    protocol_hash: str
    seed_list: str
    stats: Mapping[str, Summary]
    deltas: Mapping[str, PairedDelta]

    @property
    def top1(self) -> Summary:
        return self.stats[TOP1]

    @property
    def delta(self) -> PairedDelta:
        return self.deltas[TOP1]


@dataclass(frozen=True)
class MetricCheck:
    """The comparison of one metric of one cell.

    Attributes:
        metric: The metric's ``leaderboard.csv`` name (:attr:`Metric.name`).
        label: Its name in the report.
        status: :data:`REPRODUCED`, :data:`REPRODUCED_EXACTLY`, :data:`OUTSIDE`, :data:`DIFFERS_SEEDS`,
            :data:`DIFFERS`, :data:`MISSING` or (for a cell the published table lacks) :data:`NEW`.
        new: The regenerated value over seeds (``None`` when missing).
        published: The published value (``None`` for a new cell); its ``ci95`` is the half width of the
            interval the new mean is checked against.
        new_delta: The regenerated paired gain over the baseline (context only).
        published_delta: The published one (context only).
        p: Across platforms, the Holm-adjusted p-value of the test against the published seeds (else ``None``).
    """

    metric: str
    label: str
    status: str
    new: Summary | None
    published: Summary | None
    new_delta: PairedDelta | None = None
    published_delta: PairedDelta | None = None
    p: float | None = None

    @property
    def ok(self) -> bool:
        return self.status not in _FAILING


@dataclass(frozen=True)
class CompareRow:
    """The comparison of one cell.

    Attributes:
        key: ``(dataset, teacher, student, method label)``.
        status: One of :data:`REPRODUCED`, :data:`REPRODUCED_EXACTLY`, :data:`OUTSIDE`, :data:`DIFFERS`,
            :data:`MISSING`, :data:`NOT_COMPARED`, :data:`NEW`: the worst of its metrics' statuses.
        new_top1: The regenerated top-1 over seeds (``None`` when the cell is missing from the new table).
        published_top1: The published top-1 (``None`` for a new cell); its ``ci95`` is the half width of the
            interval the new mean is checked against.
        new_delta: The regenerated paired gain over the baseline (context only). ``leaderboard.csv`` keeps
            the number of paired seeds, not the seeds, so ``seeds`` is empty.
        published_delta: The published paired gain over the baseline (context only), likewise.
        notes: Remarks: differing protocol hash or seeds, single-seed comparison, ...
        checks: One per metric the published cell claims (top-1 first); for a new cell, one per metric it
            has; none for a cell not compared.
    """

    key: tuple[str, str, str, str]
    status: str
    new_top1: Summary | None
    published_top1: Summary | None
    new_delta: PairedDelta | None
    published_delta: PairedDelta | None
    notes: tuple[str, ...] = ()
    checks: tuple[MetricCheck, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether the cell does not fail the check."""
        return self.status not in _FAILING

    @property
    def failing(self) -> tuple[str, ...]:
        """The labels of the metrics that fail the check (``("mAP cosine",)``)."""
        return tuple(c.label for c in self.checks if not c.ok)

    def check(self, metric: str) -> MetricCheck | None:
        """The check of ``metric`` (a name or a label), ``None`` when the cell has none."""
        return next((c for c in self.checks if metric in (c.metric, c.label)), None)

    @property
    def protocol_differs(self) -> bool:
        return any(n.startswith("protocol hash differs") for n in self.notes)

    @property
    def label(self) -> str:
        dataset, teacher, student, method = self.key
        return f"{dataset}: {teacher} → {student}, {method}"


@dataclass(frozen=True)
class CompareReport:
    """The cell-by-cell comparison of a new leaderboard with a published one.

    Attributes:
        new: The new leaderboard directory.
        published: The published leaderboard directory.
        rows: One per published cell (in the published order), then one per new cell it lacks.
        platforms: Across platforms, ``(published, new)``: each side's platforms (``device, CPU, capability``
            joined by ``/``); ``None`` when they are the same or unknown (the interval rule).
    """

    new: Path
    published: Path
    rows: tuple[CompareRow, ...]
    platforms: tuple[str, str] | None = None

    @property
    def ok(self) -> bool:
        """False when a metric of a published cell is missing or outside its interval (differs, with a
        single seed)."""
        return all(r.ok for r in self.rows)

    def _count(self, *statuses: str) -> int:
        return sum(r.status in statuses for r in self.rows)

    @property
    def _compared(self) -> list[CompareRow]:
        return [r for r in self.rows if r.status not in (NOT_COMPARED, NEW)]

    @property
    def multi_metric(self) -> bool:
        """Whether a row checks (or, new, has) a metric besides top-1: the report then lists each metric."""
        return any(c.metric != TOP1 for r in self.rows for c in r.checks)

    def metric_counts(self) -> list[tuple[str, int, int]]:
        """``(label, reproduced, claimed)`` per metric a compared cell claims, in :data:`METRICS` order."""
        out = []
        for metric in METRICS:
            checks = [c for r in self._compared if (c := r.check(metric.name)) is not None]
            if checks:
                reproduced = sum(c.status in (REPRODUCED, REPRODUCED_EXACTLY) for c in checks)
                out.append((metric.label, reproduced, len(checks)))
        return out

    def summary(self) -> str:
        """``"4/4 cells reproduced within the published 95% interval"`` and what else happened.

        A table with retrieval counts each metric too: ``"4/5 cells reproduced within the published 95%
        interval of every metric (top-1 5/5, mAP cosine 4/5, mAP Euclidean 5/5); 1 outside"``.
        """
        compared = self._compared
        reproduced = self._count(REPRODUCED, REPRODUCED_EXACTLY)
        where = "within the published 95% interval" if self.platforms is None else "on another platform"
        head = f"{reproduced}/{len(compared)} cells reproduced {where}"
        counts = self.metric_counts()
        if any(label != METRICS[0].label for label, _, _ in counts):
            per_metric = ", ".join(f"{label} {k}/{n}" for label, k, n in counts)
            head += f" of every metric ({per_metric})"
        parts = [head]
        counts = (
            (self._count(MISSING), "missing"),
            (self._count(OUTSIDE), "outside"),
            (self._count(DIFFERS_SEEDS), "differing from the published seeds"),
            (self._count(REPRODUCED_EXACTLY, DIFFERS), "single-seed compared exactly"),
            (sum(r.protocol_differs for r in self.rows), "with a different protocol hash"),
            (self._count(NOT_COMPARED), "not compared (no finished seed in published)"),
            (self._count(NEW), "new (not published)"),
        )
        parts += [f"{n} {what}" for n, what in counts if n]
        if self.platforms is not None:
            tested = sum(c.p is not None for r in compared for c in r.checks)
            parts.append(
                f"published on {self.platforms[0]}, new on {self.platforms[1]}: each mean tested against the "
                f"published seeds (Welch's t, Holm over {tested} metrics, {ALPHA:.0%} family-wise)"
            )
        return "; ".join(parts)

    def render(self) -> str:
        """A markdown table of every row, under the two directories compared.

        A table with top-1 alone has one line per cell; a table with retrieval has one line per (cell,
        metric), with the cell's status (the worst of its metrics') beside the metric's.
        """
        lines = [f"New:       {self.new}", f"Published: {self.published}", ""]
        if self.multi_metric:
            table = self._render_metrics()
        else:
            table = self._render_top1()
        return "\n".join(lines + table) + "\n"

    def _render_top1(self) -> list[str]:
        headers = [
            "Cell",
            "Status",
            "New top-1",
            "Published top-1 ± 95% CI [interval]",
            "New Δ vs baseline",
            "Published Δ vs baseline",
            "Notes",
        ]
        rows = [
            [
                r.label,
                r.status,
                _top1_text(r.new_top1, c.p if (c := r.check(TOP1)) else None),
                _published_text(r.published_top1),
                fmt.delta(r.new_delta),
                fmt.delta(r.published_delta),
                "; ".join(r.notes),
            ]
            for r in self.rows
        ]
        return md_table(headers, rows)

    def _render_metrics(self) -> list[str]:
        headers = [
            "Cell",
            "Cell status",
            "Metric",
            "Metric status",
            "New",
            "Published ± 95% CI [interval]",
            "New Δ vs baseline",
            "Published Δ vs baseline",
            "Notes",
        ]
        rows = []
        for r in self.rows:
            checks = r.checks or (
                MetricCheck(TOP1, METRICS[0].label, r.status, r.new_top1, r.published_top1),
            )
            for i, c in enumerate(checks):
                rows.append(
                    [
                        r.label,
                        r.status,
                        c.label,
                        c.status,
                        _top1_text(c.new, c.p),
                        _published_text(c.published),
                        fmt.delta(c.new_delta),
                        fmt.delta(c.published_delta),
                        "; ".join(r.notes) if i == 0 else "",
                    ]
                )
        return md_table(headers, rows)


def _top1_text(s: Summary | None, p: float | None = None) -> str:
    if s is None or s.mean is None:
        return ""
    return f"{fmt.num(s.mean)} (n={s.n}" + ("" if p is None else f", Holm p {p:.3g}") + ")"


def _published_text(s: Summary | None) -> str:
    if s is None or s.mean is None:
        return ""
    if s.ci95 is None:
        return f"{fmt.num(s.mean)} (n={s.n}, no interval)"
    return f"{fmt.num(s.mean)} ± {fmt.num(s.ci95)} [{fmt.num(s.low)}, {fmt.num(s.high)}] (n={s.n})"


def _float(text: str | None) -> float | None:
    return float(text) if text not in ("", None) else None


def _paired_delta(row: Mapping[str, str], columns: Sequence[str]) -> PairedDelta:
    mean, low, high, n, note = (row.get(c) or "" for c in columns)
    low, high = _float(low), _float(high)
    half = (high - low) / 2 if low is not None and high is not None else None
    return PairedDelta((), Summary(int(n) if n else 0, _float(mean), None, half), note)


def _entry(row: Mapping[str, str]) -> _Entry:
    seeds = int(row["seeds"] or 0)
    return _Entry(
        key=(row["dataset"], row["teacher"], row["student"], row["method"]),
        protocol_hash=row["protocol_hash"],
        seed_list=row["seed_list"],
        # A metric whose columns the file lacks (written before they existed) reads as empty: mean None.
        stats={m.name: Summary(seeds, *(_float(row.get(c)) for c in m.columns)) for m in METRICS},
        deltas={m.name: _paired_delta(row, m.delta_columns) for m in METRICS},
    )


def _read_leaderboard(directory: Path) -> list[_Entry]:
    """The cells of a leaderboard directory's ``leaderboard.csv``.

    Args:
        directory: A directory written by ``kdbench leaderboard``.

    Returns:
        One entry per row, in file order (a metric whose columns the file lacks is empty).

    Raises:
        LeaderboardError: The directory or its ``leaderboard.csv`` is missing, or a column the comparison
            needs is absent (the message names the path and the fix).
    """
    path = Path(directory) / LEADERBOARD_CSV
    fix = "pass a directory written by `kdbench leaderboard --out DIR` (with leaderboard.csv and runs.csv)"
    if not path.is_file():
        raise LeaderboardError(f"{path}: no such file; {fix}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise LeaderboardError(
                f"{path}: missing column(s) {', '.join(missing)}; regenerate it with this kdbench version "
                "(`kdbench leaderboard`)"
            )
        return [_entry(row) for row in reader]


def _match(published: _Entry, candidates: Sequence[_Entry]) -> tuple[_Entry | None, list[str]]:
    """The new cell compared with a published one (same protocol hash first) and notes on the match."""
    same = [c for c in candidates if c.protocol_hash == published.protocol_hash]
    if same:
        return same[0], []
    if len(candidates) == 1:
        new = candidates[0]
        return new, [f"protocol hash differs: published {published.protocol_hash}, new {new.protocol_hash}"]
    if candidates:
        hashes = ", ".join(c.protocol_hash for c in candidates)
        return None, [f"new has this cell under protocols {hashes}, none of them the published one"]
    return None, []


def _verdict(new: Summary | None, published: Summary, p: float | None = None) -> str:
    """The status of one metric of a cell: against the *published* interval only, or across platforms from
    the Holm-adjusted ``p`` of its test against the published seeds."""
    if new is None or new.mean is None:
        return MISSING
    if p is not None:
        return REPRODUCED if p >= ALPHA else DIFFERS_SEEDS
    if published.ci95 is None:
        exact = abs(new.mean - published.mean) <= _EXACT_TOLERANCE
        return REPRODUCED_EXACTLY if exact else DIFFERS
    inside = published.low <= new.mean <= published.high
    return REPRODUCED if inside else OUTSIDE


def _claimed(published: _Entry) -> list[Metric]:
    """The metrics a published cell claims (a mean in its row), top-1 first."""
    return [m for m in METRICS if published.stats[m.name].mean is not None]


def _compare_row(
    published: _Entry, new: _Entry | None, notes: list[str], p_values: Mapping[str, float]
) -> CompareRow:
    """The comparison of one published cell with its new cell.

    Args:
        published: The published cell.
        new: The new cell :func:`_match` chose (``None``: none).
        notes: :func:`_match`'s notes on the match; the row's other notes are appended.
        p_values: Across platforms, the Holm-adjusted p-value per metric name tested against the published
            seeds (a metric without one: the interval or exact rule).
    """
    claimed = _claimed(published)
    checks: list[MetricCheck] = []
    if published.top1.mean is None or not claimed:
        status = NOT_COMPARED
    else:
        if new is not None and new.top1.mean is None:
            notes.append("no finished seed in the new table")
        for m in claimed:
            pub, fresh = published.stats[m.name], (new.stats[m.name] if new else None)
            p = p_values.get(m.name)
            checks.append(
                MetricCheck(
                    m.name,
                    m.label,
                    _verdict(fresh, pub, p),
                    fresh if fresh is not None and fresh.mean is not None else None,
                    pub,
                    new.deltas[m.name] if new else None,
                    published.deltas[m.name],
                    p,
                )
            )
        if any(c.new is None for c in checks) and new is not None and new.top1.mean is not None:
            absent = ", ".join(c.label for c in checks if c.new is None)
            notes.append(f"the new table has no {absent}")
        status = next(s for s in _PRECEDENCE if any(c.status == s for c in checks))
        if any(c.status in (REPRODUCED_EXACTLY, DIFFERS) for c in checks):
            notes.append("published has 1 seed (no interval): compared exactly")
        failing = [c.label for c in checks if not c.ok]
        if failing and len(checks) > 1:
            notes.append(f"failing: {', '.join(failing)}")
    if new is not None and new.seed_list != published.seed_list:
        seeds = f"new {new.seed_list or 'none'}, published {published.seed_list or 'none'}"
        notes.append(f"seeds differ: {seeds}")
    return CompareRow(
        published.key,
        status,
        new.top1 if new else None,
        published.top1,
        new.delta if new else None,
        published.delta,
        tuple(notes),
        tuple(checks),
    )


def _new_row(entry: _Entry) -> CompareRow:
    """The row of a cell the published table lacks (listed, never failing)."""
    checks = tuple(
        MetricCheck(m.name, m.label, NEW, entry.stats[m.name], None, entry.deltas[m.name], None)
        for m in METRICS
        if m.name == TOP1 or entry.stats[m.name].mean is not None
    )
    return CompareRow(entry.key, NEW, entry.top1, None, entry.delta, None, (), checks)


def _platforms(directory: Path) -> tuple[str, ...] | None:
    """The platforms (``device / CPU / capability``, sorted) of the runs in ``directory``'s ``runs.csv``;
    ``None`` when the file is missing, has no run or lacks a :data:`PLATFORM_COLUMNS` column (written before
    them)."""
    path = Path(directory) / RUNS_CSV
    if not path.is_file():
        return None
    rows = fmt.read_csv(path, PLATFORM_COLUMNS.__contains__)
    if not rows or any(c not in rows[0] for c in PLATFORM_COLUMNS):
        return None
    return tuple(sorted({" / ".join(row[c] for c in PLATFORM_COLUMNS) for row in rows}))


def _tests_against_seeds(
    published_entries: Sequence[_Entry], new_entries: Sequence[_Entry | None]
) -> list[dict[str, float]]:
    """Per published cell, the Holm-adjusted p-value of each claimed metric that can be tested against the
    published seeds (the adjustment over every such metric of the table), by metric name."""
    tested: list[tuple[int, str]] = []
    raw: list[float] = []
    for index, (published, new) in enumerate(zip(published_entries, new_entries)):
        for m in _claimed(published) if new is not None else ():
            p = two_sample_p(new.stats[m.name], published.stats[m.name])
            if p is not None:
                tested.append((index, m.name))
                raw.append(p)
    adjusted: list[dict[str, float]] = [{} for _ in published_entries]
    for (index, name), q in zip(tested, holm(raw)):
        adjusted[index][name] = q
    return adjusted


def compare_leaderboards(new: Path, published: Path) -> CompareReport:
    """Checks that a regenerated leaderboard reproduces a published one, cell by cell and metric by metric.

    Args:
        new: The regenerated leaderboard directory (holding ``leaderboard.csv``).
        published: The published leaderboard directory.

    Returns:
        The :class:`CompareReport`; its ``ok`` is False when a metric a published cell claims (top-1, each
        retrieval mAP it has) is missing from the new table or its new mean falls outside the published 95%
        interval (differs, for a single-seed cell), or, across platforms, differs from the published seeds.

    Raises:
        LeaderboardError: A directory lacks ``leaderboard.csv`` or a column of it the comparison needs.
    """
    new, published = Path(new), Path(published)
    new_entries, published_entries = _read_leaderboard(new), _read_leaderboard(published)
    by_key: dict[tuple[str, str, str, str], list[_Entry]] = {}
    for entry in new_entries:
        by_key.setdefault(entry.key, []).append(entry)
    matches = [_match(p, by_key.get(p.key, [])) for p in published_entries]
    platforms = _platforms(published), _platforms(new)
    across = None not in platforms and platforms[0] != platforms[1]
    if across:
        p_values = _tests_against_seeds(published_entries, [m for m, _ in matches])
    else:
        p_values = [{} for _ in published_entries]
    rows = [
        _compare_row(p, match, notes, q) for p, (match, notes), q in zip(published_entries, matches, p_values)
    ]
    published_keys = {p.key for p in published_entries}
    rows += [_new_row(e) for e in new_entries if e.key not in published_keys]
    shown = (", ".join(platforms[0]), ", ".join(platforms[1])) if across else None  # type: ignore[arg-type]
    report = CompareReport(new, published, tuple(rows), shown)
    _logger.info("%s vs %s: %s", new, published, report.summary())
    return report
