"""Does a regenerated leaderboard reproduce a published one? A cell-by-cell check of ``leaderboard.csv``.

Cells are matched on (dataset, teacher, student, method label), not on the protocol hash: a re-run on
another machine may differ in provenance only. When the matched cells' protocol hashes differ, the row
and the summary say so. For every cell of the *published* table:

* the regenerated mean top-1 must lie in the published 95% interval ``[top1_mean - top1_ci95,
  top1_mean + top1_ci95]`` (ends included) to count as *reproduced*;
* a published cell with a single seed has no interval: it is compared exactly (up to the 6 decimals
  ``leaderboard.csv`` keeps) and flagged;
* a published cell missing from the new table (or without a finished seed there) is *missing*;
* a published cell without a finished seed itself is not compared.

Both paired gains over the baseline are shown for context; they do not decide anything. Cells of the
new table that the published one lacks are listed as *new (not published)* and do not fail the check.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from kdbench.report import _format as fmt
from kdbench.report.aggregate import DELTA_COLUMNS, TOP1_COLUMNS
from kdbench.report.markdown import md_table
from kdbench.report.records import RecordError
from kdbench.report.stats import PairedDelta, Summary

_logger = logging.getLogger(__name__)

LEADERBOARD_CSV = "leaderboard.csv"
# Columns of leaderboard.csv the comparison reads (a subset of LEADERBOARD_COLUMNS, so that a snapshot
# written before later columns were added can still be compared).
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
# leaderboard.csv keeps 6 decimals: a single-seed cell is "exact" within half of the last one.
_EXACT_TOLERANCE = 5e-7

REPRODUCED = "reproduced"
REPRODUCED_EXACTLY = "reproduced exactly (1 seed)"
OUTSIDE = "outside the published interval"
DIFFERS = "differs (1 seed, compared exactly)"
MISSING = "missing"
NOT_COMPARED = "not compared (no finished seed in published)"
NEW = "new (not published)"
_FAILING = (OUTSIDE, DIFFERS, MISSING)


class LeaderboardError(RecordError):
    """A leaderboard directory that cannot be compared; the message names the path and the fix."""


@dataclass(frozen=True)
class _Entry:
    """One row of a ``leaderboard.csv``, parsed."""

    key: tuple[str, str, str, str]
    protocol_hash: str
    seed_list: str
    top1: Summary
    delta: PairedDelta


@dataclass(frozen=True)
class CompareRow:
    """The comparison of one cell.

    Attributes:
        key: ``(dataset, teacher, student, method label)``.
        status: One of :data:`REPRODUCED`, :data:`REPRODUCED_EXACTLY`, :data:`OUTSIDE`, :data:`DIFFERS`,
            :data:`MISSING`, :data:`NOT_COMPARED`, :data:`NEW`.
        new_top1: The regenerated top-1 over seeds (``None`` when the cell is missing from the new table).
        published_top1: The published top-1 (``None`` for a new cell); its ``ci95`` is the half width of the
            interval the new mean is checked against.
        new_delta: The regenerated paired gain over the baseline (context only). ``leaderboard.csv`` keeps
            the number of paired seeds, not the seeds, so ``seeds`` is empty.
        published_delta: The published paired gain over the baseline (context only), likewise.
        notes: Remarks: differing protocol hash or seeds, single-seed comparison, ...
    """

    key: tuple[str, str, str, str]
    status: str
    new_top1: Summary | None
    published_top1: Summary | None
    new_delta: PairedDelta | None
    published_delta: PairedDelta | None
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether the cell does not fail the check."""
        return self.status not in _FAILING

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
    """

    new: Path
    published: Path
    rows: tuple[CompareRow, ...]

    @property
    def ok(self) -> bool:
        """False when a published cell is missing or outside its interval (differs, with a single seed)."""
        return all(r.ok for r in self.rows)

    def _count(self, *statuses: str) -> int:
        return sum(r.status in statuses for r in self.rows)

    def summary(self) -> str:
        """``"4/4 cells reproduced within the published 95% interval"`` and what else happened."""
        compared = [r for r in self.rows if r.status not in (NOT_COMPARED, NEW)]
        reproduced = self._count(REPRODUCED, REPRODUCED_EXACTLY)
        parts = [f"{reproduced}/{len(compared)} cells reproduced within the published 95% interval"]
        counts = (
            (self._count(MISSING), "missing"),
            (self._count(OUTSIDE), "outside"),
            (self._count(REPRODUCED_EXACTLY, DIFFERS), "single-seed compared exactly"),
            (sum(r.protocol_differs for r in self.rows), "with a different protocol hash"),
            (self._count(NOT_COMPARED), "not compared (no finished seed in published)"),
            (self._count(NEW), "new (not published)"),
        )
        parts += [f"{n} {what}" for n, what in counts if n]
        return "; ".join(parts)

    def render(self) -> str:
        """A markdown table of every row, under the two directories compared."""
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
                _top1_text(r.new_top1),
                _published_text(r.published_top1),
                fmt.delta(r.new_delta),
                fmt.delta(r.published_delta),
                "; ".join(r.notes),
            ]
            for r in self.rows
        ]
        lines = [f"New:       {self.new}", f"Published: {self.published}", ""]
        return "\n".join(lines + md_table(headers, rows)) + "\n"


def _top1_text(s: Summary | None) -> str:
    return "" if s is None or s.mean is None else f"{fmt.num(s.mean)} (n={s.n})"


def _published_text(s: Summary | None) -> str:
    if s is None or s.mean is None:
        return ""
    if s.ci95 is None:
        return f"{fmt.num(s.mean)} (n={s.n}, no interval)"
    return f"{fmt.num(s.mean)} ± {fmt.num(s.ci95)} [{fmt.num(s.low)}, {fmt.num(s.high)}] (n={s.n})"


def _float(text: str) -> float | None:
    return float(text) if text not in ("", None) else None


def _entry(row: Mapping[str, str]) -> _Entry:
    low, high = _float(row["delta_ci95_low"]), _float(row["delta_ci95_high"])
    half = (high - low) / 2 if low is not None and high is not None else None
    delta_n = int(row["delta_n"]) if row["delta_n"] else 0
    return _Entry(
        key=(row["dataset"], row["teacher"], row["student"], row["method"]),
        protocol_hash=row["protocol_hash"],
        seed_list=row["seed_list"],
        top1=Summary(
            int(row["seeds"] or 0),
            _float(row["top1_mean"]),
            _float(row["top1_std"]),
            _float(row["top1_ci95"]),
        ),
        delta=PairedDelta(
            (), Summary(delta_n, _float(row["delta_vs_baseline"]), None, half), row["delta_note"]
        ),
    )


def _read_leaderboard(directory: Path) -> list[_Entry]:
    """The cells of a leaderboard directory's ``leaderboard.csv``.

    Args:
        directory: A directory written by ``kdbench leaderboard``.

    Returns:
        One entry per row, in file order.

    Raises:
        LeaderboardError: The directory or its ``leaderboard.csv`` is missing, or a column the comparison
            reads is absent (the message names the path and the fix).
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


def _verdict(new: Summary, published: Summary) -> tuple[str, list[str]]:
    """The status of a cell both tables have results for, and notes."""
    if published.ci95 is None:
        exact = abs(new.mean - published.mean) <= _EXACT_TOLERANCE
        note = "published has 1 seed (no interval): compared exactly"
        return (REPRODUCED_EXACTLY if exact else DIFFERS), [note]
    inside = published.low <= new.mean <= published.high
    return (REPRODUCED if inside else OUTSIDE), []


def _compare_row(published: _Entry, candidates: Sequence[_Entry]) -> CompareRow:
    """The comparison of one published cell with the new cells of the same key.

    Args:
        published: The published cell.
        candidates: The new table's cells with the same (dataset, teacher, student, method label).
    """
    new, notes = _match(published, candidates)
    if published.top1.mean is None:
        status = NOT_COMPARED
    elif new is None or new.top1.mean is None:
        status = MISSING
        if new is not None:
            notes.append("no finished seed in the new table")
    else:
        status, more = _verdict(new.top1, published.top1)
        notes += more
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
    )


def compare_leaderboards(new: Path, published: Path) -> CompareReport:
    """Checks that a regenerated leaderboard reproduces a published one, cell by cell.

    Args:
        new: The regenerated leaderboard directory (holding ``leaderboard.csv``).
        published: The published leaderboard directory.

    Returns:
        The :class:`CompareReport`; its ``ok`` is False when a published cell is missing or its new mean
        falls outside the published 95% interval (differs, for a single-seed cell).

    Raises:
        LeaderboardError: A directory lacks ``leaderboard.csv`` or a column of it.
    """
    new, published = Path(new), Path(published)
    new_entries, published_entries = _read_leaderboard(new), _read_leaderboard(published)
    by_key: dict[tuple[str, str, str, str], list[_Entry]] = {}
    for entry in new_entries:
        by_key.setdefault(entry.key, []).append(entry)
    rows = [_compare_row(p, by_key.get(p.key, [])) for p in published_entries]
    published_keys = {p.key for p in published_entries}
    unpublished = [e for e in new_entries if e.key not in published_keys]
    rows += [CompareRow(e.key, NEW, e.top1, None, e.delta, None) for e in unpublished]
    report = CompareReport(new, published, tuple(rows))
    _logger.info("%s vs %s: %s", new, published, report.summary())
    return report
