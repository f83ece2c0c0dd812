"""The leaderboard marks and counts a live teacher tail (ScaleKD's ``Requirements.live_teacher_tail``).

Synthetic records from :func:`test_report.make_record`, with the ``provenance.method_audit`` a scalekd run of the
current code writes (``teacher_tail_forward``, ``teacher_tail_params``), go through the real report: runs table,
cells, ``leaderboard.csv``, markdown and HTML. Expected numbers are computed by hand in the comments.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from test_report import make_record

from kdbench.report.aggregate import LeaderboardCell
from kdbench.report.leaderboard import write_leaderboard

# scalekd, seeds 0, 1, 2: 1.1M, 1.2M, 1.3M samples through the tail (mean 1.2M), a 25k-parameter tail of a
# 400k-parameter teacher: 25k / 400k = 6.25% -> "6%"; by that share 1.2M * 0.0625 = 75k full teacher forwards.
TAIL_FORWARD = [1_100_000, 1_200_000, 1_300_000]
TAIL_PARAMS = 25_000
TEACHER_PARAMS = 400_000
NOTE = (
    "teacher tail: 1.2M samples through 25k of the teacher's 400k params (6%) per run (mean over 3 seeds);"
    " by parameter share about 75k full teacher forwards"
)


def _scalekd_record(root: Path, seed: int, audit: dict) -> Path:
    """A scalekd record as the current code writes it: the tail's audit and ``requirements.live_teacher_tail``."""
    path = make_record(
        root, method="scalekd", seed=seed, top1=74.0 + seed, provenance={"method_audit": audit}
    )
    rec = json.loads(path.read_text())
    rec["requirements"]["live_teacher_tail"] = True
    path.write_text(json.dumps(rec, indent=1))
    return path


def _grid(root: Path, teacher_params: int | None = TEACHER_PARAMS) -> list[Path]:
    paths = []
    for seed, tail in enumerate(TAIL_FORWARD):
        audit = {"teacher_tail_forward": tail, "teacher_tail_params": TAIL_PARAMS}
        if teacher_params is not None:
            audit["teacher_params"] = teacher_params
        paths.append(_scalekd_record(root, seed, audit))
        paths.append(make_record(root, method="kd", seed=seed, top1=72.0 + seed))  # no method_audit
        paths.append(make_record(root, method="baseline", seed=seed, top1=70.0 + seed))
    return paths


def _csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {f"{r['method']}/{r.get('seed', '')}": r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    out = tmp_path_factory.mktemp("leaderboard")
    write_leaderboard(_grid(root), out, "Live teacher tail")
    return out


def test_runs_table_has_the_tail_columns_and_older_records_leave_them_empty(board: Path) -> None:
    runs = _csv(board / "runs.csv")
    scalekd = runs["scalekd/1"]
    assert scalekd["teacher_tail_forward"] == "1200000" and scalekd["teacher_tail_params"] == "25000"
    assert scalekd["teacher_params"] == "400000" and scalekd["req.live_teacher_tail"] == "true"
    kd = runs["kd/1"]  # no method_audit, no live_teacher_tail requirement (an older record)
    assert kd["teacher_tail_forward"] == kd["teacher_tail_params"] == kd["teacher_params"] == ""
    assert kd["req.live_teacher_tail"] == ""


def test_leaderboard_csv_marks_the_row_and_keeps_the_numbers_in_their_own_columns(board: Path) -> None:
    cells = _csv(board / "leaderboard.csv")
    scalekd, kd, base = cells["scalekd/"], cells["kd/"], cells["baseline/"]
    assert scalekd["teacher_source"] == "cache + live tail" and scalekd["live_teacher_tail"] == "true"
    assert float(scalekd["teacher_tail_forward"]) == pytest.approx(1_200_000)  # mean over the 3 seeds
    assert scalekd["teacher_tail_params"] == "25000" and scalekd["teacher_params"] == "400000"
    assert float(scalekd["teacher_forward"]) == 0  # the rest of the teacher's outputs came from the store
    assert scalekd["live_teacher"] == "false"
    assert kd["teacher_source"] == "cache" and base["teacher_source"] == "none"
    assert kd["live_teacher_tail"] == base["live_teacher_tail"] == "false"
    assert kd["teacher_tail_forward"] == kd["teacher_tail_params"] == kd["teacher_params"] == ""


def _table_row(md: str, method: str) -> list[str]:
    (line,) = [ln for ln in md.splitlines() if re.match(rf"^\| [^|]* \| {method}( \[\d+\])? \|", ln)]
    return [c.strip() for c in line.strip("|").split(" | ")]


def test_markdown_shows_the_tail_forwards_with_a_footnote(board: Path) -> None:
    md = (board / "leaderboard.md").read_text()
    headers = _table_row(md, "Method")
    scalekd = dict(zip(headers, _table_row(md, "scalekd")))
    kd = dict(zip(headers, _table_row(md, "kd")))
    marker = re.fullmatch(r"1\.2M tail (\[\d+\])", scalekd["Teacher fwd (images)"])
    assert marker, scalekd["Teacher fwd (images)"]
    assert f"- {marker.group(1)} scalekd — {NOTE}" in md
    assert scalekd["Teacher"] == "cache + live tail"
    assert kd["Teacher fwd (images)"] == "0" and kd["Teacher"] == "cache"
    assert sum("tail [" in ln for ln in md.splitlines() if ln.startswith("| ")) == 1  # only the scalekd row
    assert "- **Teacher** `cache + live tail`:" in md  # the legend explains the marking
    html = (board / "index.html").read_text()
    assert "cache + live tail" in html and NOTE.replace("'", "&#x27;") in html


def test_without_the_teachers_size_the_note_gives_the_tail_params_alone(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_leaderboard(_grid(tmp_path / "runs", teacher_params=None), out, "x")
    md = (out / "leaderboard.md").read_text()
    assert (
        "scalekd — teacher tail: 1.2M samples through its 25k params per run (mean over 3 seeds;"
        " the teacher's size is not recorded)"
    ) in md
    assert _csv(out / "leaderboard.csv")["scalekd/"]["teacher_params"] == ""


def test_a_table_without_a_live_tail_has_no_tail_legend(tmp_path: Path) -> None:
    paths = [make_record(tmp_path, method=m, seed=s) for m in ("baseline", "kd") for s in range(2)]
    write_leaderboard(paths, tmp_path / "out", "x")
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "live tail" not in md and "tail [" not in md


def test_teacher_source_of_a_tail_without_a_store() -> None:
    """No store given: the whole teacher ran (teacher_forward > 0) and the tail on top of it."""
    cell = LeaderboardCell(("ds", "p", "t", "s", "scalekd"))
    run = {"seed": 0, "method_name": "scalekd", "teacher_forward": 5000, "cache_bytes_read": 0}
    cell.runs = [{**run, "teacher_tail_forward": 20_000}]
    assert cell.teacher_source == "live + live tail"
    cell.runs = [{**run, "req.live_teacher": True, "teacher_tail_forward": None}]  # older live-teacher record
    assert cell.teacher_source == "live (required)" and not cell.live_teacher_tail
