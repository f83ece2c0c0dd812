"""Tests of ``kdbench.report.compare``: a regenerated leaderboard against a published one.

The inputs are copies of the committed published snapshot (``results/published/fashion-mnist-default``)
with some values edited, so the tests read the real ``leaderboard.csv`` format.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Callable

import pytest

from kdbench.errors import USER_ERRORS
from kdbench.report.compare import (
    MISSING,
    NEW,
    OUTSIDE,
    REPRODUCED,
    REPRODUCED_EXACTLY,
    LeaderboardError,
    compare_leaderboards,
)

SNAPSHOT = Path(__file__).resolve().parent.parent / "results" / "published" / "fashion-mnist-default"
KD_XS = ("fashion-mnist", "cnn_m", "cnn_xs", "kd")

Rows = list[dict[str, str]]


def _copy(tmp_path: Path, name: str, edit: Callable[[Rows], Rows] | None = None) -> Path:
    """A copy of the snapshot's ``leaderboard.csv`` and ``runs.csv`` with ``edit`` applied to the former."""
    out = tmp_path / name
    out.mkdir()
    shutil.copy(SNAPSHOT / "runs.csv", out / "runs.csv")
    with open(SNAPSHOT / "leaderboard.csv", newline="") as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames, list(reader)
    rows = edit(rows) if edit else rows
    with open(out / "leaderboard.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return out


def _is(row: dict[str, str], key: tuple[str, str, str, str]) -> bool:
    return (row["dataset"], row["teacher"], row["student"], row["method"]) == key


def _set(key: tuple[str, str, str, str], **values: str) -> Callable[[Rows], Rows]:
    def edit(rows: Rows) -> Rows:
        for row in rows:
            if _is(row, key):
                row.update(values)
        return rows

    return edit


def _published_kd() -> tuple[float, float]:
    with open(SNAPSHOT / "leaderboard.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if _is(r, KD_XS))
    return float(row["top1_mean"]), float(row["top1_ci95"])


@pytest.fixture
def published(tmp_path: Path) -> Path:
    return _copy(tmp_path, "published")


def test_identical_leaderboards_reproduce(tmp_path: Path, published: Path) -> None:
    report = compare_leaderboards(_copy(tmp_path, "new"), published)
    assert report.ok
    assert len(report.rows) == 4 and all(r.status == REPRODUCED for r in report.rows)
    assert report.summary() == "4/4 cells reproduced within the published 95% interval"
    kd = next(r for r in report.rows if r.key == KD_XS)
    assert kd.new_top1 == kd.published_top1 and kd.new_delta == kd.published_delta
    text = report.render()
    assert "fashion-mnist: cnn_m → cnn_xs, kd | reproduced |" in text
    assert "+1.87 [+0.93, +2.81] (n=3)" in text  # the paired gain, for context


def test_a_cell_shifted_outside_its_interval_fails(tmp_path: Path, published: Path) -> None:
    mean, ci = _published_kd()
    inside = _copy(tmp_path, "inside", _set(KD_XS, top1_mean=str(mean - 0.9 * ci)))
    assert compare_leaderboards(inside, published).ok
    outside = _copy(tmp_path, "new", _set(KD_XS, top1_mean=str(mean + ci + 0.01)))
    report = compare_leaderboards(outside, published)
    assert not report.ok
    assert {r.key: r.status for r in report.rows}[KD_XS] == OUTSIDE
    assert report.summary() == "3/4 cells reproduced within the published 95% interval; 1 outside"
    assert "| fashion-mnist: cnn_m → cnn_xs, kd | outside the published interval |" in report.render()


def test_a_missing_cell_fails(tmp_path: Path, published: Path) -> None:
    new = _copy(tmp_path, "new", lambda rows: [r for r in rows if not _is(r, KD_XS)])
    report = compare_leaderboards(new, published)
    assert not report.ok
    assert {r.key: r.status for r in report.rows}[KD_XS] == MISSING
    assert report.summary() == "3/4 cells reproduced within the published 95% interval; 1 missing"


def test_a_new_cell_is_listed_but_does_not_fail(tmp_path: Path, published: Path) -> None:
    def add_dkd(rows: Rows) -> Rows:
        return rows + [dict(next(r for r in rows if _is(r, KD_XS)), method="dkd", method_name="dkd")]

    report = compare_leaderboards(_copy(tmp_path, "new", add_dkd), published)
    assert report.ok
    (new,) = [r for r in report.rows if r.status == NEW]
    assert new.key == ("fashion-mnist", "cnn_m", "cnn_xs", "dkd") and new.published_top1 is None
    assert report.summary() == (
        "4/4 cells reproduced within the published 95% interval; 1 new (not published)"
    )


def test_a_different_protocol_hash_is_noted(tmp_path: Path, published: Path) -> None:
    new = _copy(tmp_path, "new", _set(KD_XS, protocol_hash="0123456789ab"))
    report = compare_leaderboards(new, published)
    assert report.ok  # matched on dataset, teacher, student and method, not on the protocol
    kd = next(r for r in report.rows if r.key == KD_XS)
    assert kd.status == REPRODUCED and "protocol hash differs" in "; ".join(kd.notes)
    assert report.summary().endswith("; 1 with a different protocol hash")


def test_a_single_seed_published_cell_is_compared_exactly(tmp_path: Path) -> None:
    one_seed = _set(KD_XS, seeds="1", seed_list="0", top1_mean="84.24", top1_std="", top1_ci95="")
    published = _copy(tmp_path, "published", one_seed)
    same = compare_leaderboards(_copy(tmp_path, "same", one_seed), published)
    kd = next(r for r in same.rows if r.key == KD_XS)
    assert same.ok and kd.status == REPRODUCED_EXACTLY and "compared exactly" in kd.notes[0]
    assert same.summary().endswith("; 1 single-seed compared exactly")
    shifted = _set(KD_XS, seeds="1", seed_list="0", top1_mean="84.25", top1_std="", top1_ci95="")
    assert not compare_leaderboards(_copy(tmp_path, "shifted", shifted), published).ok


def test_a_directory_without_leaderboard_csv_is_a_user_error(tmp_path: Path, published: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LeaderboardError) as err:
        compare_leaderboards(empty, published)
    assert str(empty / "leaderboard.csv") in str(err.value) and "kdbench leaderboard" in str(err.value)
    assert isinstance(err.value, USER_ERRORS)  # the CLI reports it in one line
