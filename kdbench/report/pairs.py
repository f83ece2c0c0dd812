"""Every pair of cells of a group, paired by seed: ``pairs.csv`` beside the leaderboard.

The leaderboard states each method's gain over the student alone; a reader who asks "is A better than B?"
(a paper's claimed direction, an ablation) needs the same paired statistics between any two cells. For every
two cells of one (dataset, protocol, teacher, student) group and every :data:`~kdbench.report.aggregate.
PAIRED_METRICS` column both have: the per-seed difference ``a - b`` over the seeds both have, its mean and 95%
t-interval (:func:`kdbench.report.stats.paired_delta`), and the verdict: ``a > b`` or ``a < b`` when the
interval excludes 0, ``not separable`` when it does not, ``fewer than 2 paired seeds`` when it cannot be
computed. Each unordered pair appears once, ``a`` the cell listed first in the leaderboard.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from kdbench.report.aggregate import PAIRED_METRICS, Table
from kdbench.report.stats import paired_delta

PAIR_COLUMNS = (
    "dataset", "protocol_hash", "teacher", "student", "a", "b", "metric", "n", "delta", "ci95_low", "ci95_high",
    "verdict",
)  # fmt: skip
NOT_SEPARABLE = "not separable"


def verdict(low: float | None, high: float | None) -> str:
    """The direction a paired 95% interval of ``a - b`` supports."""
    if low is None or high is None:
        return "fewer than 2 paired seeds"
    return "a > b" if low > 0 else "a < b" if high < 0 else NOT_SEPARABLE


def pair_rows(tables: Sequence[Table]) -> list[dict[str, Any]]:
    """One row per (group, unordered pair of its cells, metric both cells have), in leaderboard order."""
    rows = []
    for table in tables:
        for group in table.groups:
            dataset, protocol_hash, teacher, student = group.key
            for a, b in itertools.combinations([c for c in group.cells if c.runs], 2):
                for metric, column in PAIRED_METRICS.items():
                    x, y = a.by_seed(metric), b.by_seed(metric)
                    if not x or not y:
                        continue
                    d = paired_delta(x, y).diff
                    rows.append({
                        "dataset": dataset, "protocol_hash": protocol_hash, "teacher": teacher, "student": student,
                        "a": a.method, "b": b.method, "metric": column, "n": d.n, "delta": d.mean,
                        "ci95_low": d.low, "ci95_high": d.high, "verdict": verdict(d.low, d.high),
                    })
    return rows
