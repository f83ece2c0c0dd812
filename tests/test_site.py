"""The results site (kdbench.report.site): the front page's facts and matrix, links, colours, the page stamps
and the check that no published page is older than its records need."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from kdbench import __version__
from kdbench.report import _format as fmt
from kdbench.report.colors import BASELINE_COLOR, method_color
from kdbench.report.html_page import PAGE_FORMAT, page_stamp
from kdbench.report.leaderboard import render_leaderboard, write_leaderboard
from kdbench.report.plots import fit_range
from kdbench.report.records import read_epochs_csv, read_runs_csv
from kdbench.report.site import (
    snapshot_entries,
    snapshot_facts,
    stale_pages,
    table_config_hash,
    workflow_entries,
    write_site,
)
from test_report import BASE, KD, make_record

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "results" / "published"
# Two tables (one with two students) and the study: every kind of entry, fast to rebuild.
SOME = ("fashion-mnist-budget-study", "fashion-mnist-default", "fashion-mnist-amd")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of some published snapshots, rebuilt by write_site (as `kdbench site` does in place)."""
    root = tmp_path_factory.mktemp("published")
    for name in SOME:
        shutil.copytree(PUBLISHED / name, root / name)
    write_site(snapshot_entries(root), root)
    return root


class _Page(HTMLParser):
    """The links, the ids and the matrix (header texts, then per row its method and cell texts) of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.ids: set[str] = set()
        self.matrix: list[list[str]] = []
        self._in_matrix = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "href" in a and tag == "a":
            self.hrefs.append(a["href"])
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "table" and a.get("class") == "matrix":
            self._in_matrix = True
        if self._in_matrix and tag == "tr":
            self.matrix.append([])
        if self._in_matrix and tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_matrix = False
        if self._in_matrix and tag in ("td", "th") and self._cell is not None:
            self.matrix[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data + " ")


def _parse(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------- the front page


def test_matrix_values_are_the_leaderboards_numbers(site: Path) -> None:
    """Every matrix cell is its table's paired gain over the student alone, as that table's leaderboard.csv
    gives it; every non-baseline cell of every table is in it; the baseline is not a row."""
    page = _parse(site / "index.html")
    header, *rows = page.matrix
    columns = header[1:]  # "<table short name> <student>"
    expected = {}
    for name in ("fashion-mnist-default", "fashion-mnist-amd"):
        for c in _csv(site / name / "leaderboard.csv"):
            if c["method_name"] == "baseline":
                continue
            g = {k: float(c[k]) for k in ("delta_vs_baseline", "delta_ci95_low", "delta_ci95_high")}
            text = (f"{g['delta_vs_baseline']:+.2f} [{g['delta_ci95_low']:+.2f}, {g['delta_ci95_high']:+.2f}]")
            expected[(c["method"], f"{name.removeprefix('fashion-mnist-')} {c['student']}")] = text
    shown = {}
    for row in rows:
        method, cells = row[0], row[1:]
        assert method != "baseline"
        for col, text in zip(columns, cells):
            if text != "·":
                shown[(method, col)] = text
    assert shown == expected
    assert expected[("kd", "default cnn_xs")] == "+1.87 [+0.93, +2.81]"  # README's table, 0.1.0's numbers


def test_front_page_gives_every_entry_its_facts_and_links(site: Path) -> None:
    text = (site / "index.html").read_text(encoding="utf-8")
    page = _parse(site / "index.html")
    for name in SOME:
        assert f'href="{name}/index.html"' in text
        for f in ("SNAPSHOT.md",):
            assert f"{name}/{f}" in page.hrefs
    for f in ("runs.csv", "config.yaml", "leaderboard.csv"):
        assert f"fashion-mnist-default/{f}" in page.hrefs
    assert "fashion-mnist-budget-study/study.csv" in page.hrefs
    # SNAPSHOT.md's question, command and wall time; the commit from runs.csv; the headline from the table.
    assert "Does Hinton&#x27;s KD from a small CNN teacher" in text
    assert "<code>snakemake --cores 2</code>" in text and "14 min 38 s" in text and "<code>d443898</code>" in text
    assert "kd on cnn_xs +1.87 [+0.93, +2.81]" in text
    assert "12 of 13 cached settings match the live teacher" in text  # the study's headline, from study.csv


def test_every_link_of_every_page_resolves(site: Path) -> None:
    pages = [site / "index.html", *sorted(site.glob("*/index.html"))]
    assert len(pages) == 1 + len(SOME)
    for path in pages:
        page = _parse(path)
        assert page.hrefs, path
        for href in page.hrefs:
            if href == "data:,":
                continue
            assert "://" not in href, f"{path}: {href} leaves the site"
            target, _, anchor = href.partition("#")
            resolved = (path.parent / target).resolve() if target else path
            assert resolved.is_file(), f"{path}: link {href} resolves to nothing"
            if anchor:
                assert anchor in _parse(resolved).ids, f"{path}: no #{anchor} in {resolved}"
    # Neighbours: each page links home and to the next and previous entries in order.
    amd = _parse(site / "fashion-mnist-amd" / "index.html").hrefs
    assert "../index.html" in amd and "../fashion-mnist-budget-study/index.html" in amd
    assert "../fashion-mnist-default/index.html" not in amd  # (not a neighbour of the first entry)


def test_study_page_has_its_redrawn_plot_table_and_checks(site: Path) -> None:
    text = (site / "fashion-mnist-budget-study" / "index.html").read_text(encoding="utf-8")
    assert "Lossless check" in text and "identical (final metrics" in text
    assert text.count("<tr>") == 1 + 18  # header + one row per study.csv row
    assert 'href="study.png"' in text and "data:image/png;base64," in text


ZOO_SNAPSHOT_08E0C7E = """# Published snapshot: fashion-mnist-zoo (the tuned zoo)

- Question: With the same tuning budget for every method, the student alone included, which of the 14 methods
  beats the student alone?
- Made by: `/usr/bin/time -v snakemake --cores 2 --keep-going --configfile workflow/config/fashion-mnist-zoo.yaml`
  in a fresh clone of `08e0c7e` with a new virtual environment, on the 2-core reference machine, 2026-12-07:
  **62 min 56 s** wall time for all 293 jobs (the default's teacher trained first), max RSS 1.4 GB, exit 0.
- Code: commit `08e0c7e` (every record's `prov.git_commit` in `runs.csv`), clean.
"""


def test_snapshot_facts() -> None:
    facts = snapshot_facts(ZOO_SNAPSHOT_08E0C7E)  # the zoo's SNAPSHOT.md as commit 08e0c7e's run wrote it
    assert facts["wall_time"] == "62 min 56 s" and facts["commit"] == "08e0c7e" and facts["date"] == "2026-12-07"
    assert facts["command"].endswith("--configfile workflow/config/fashion-mnist-zoo.yaml")
    assert facts["question"].startswith("With the same tuning budget for every method")
    for entry in snapshot_entries(PUBLISHED):  # every published one gives the facts the front page shows
        facts = snapshot_facts((entry.meta / SNAPSHOT_MD).read_text())
        assert {"question", "command", "commit"} <= set(facts), entry.name


SNAPSHOT_MD = "SNAPSHOT.md"


# --------------------------------------------------------------------- the same code for records and runs.csv


def test_a_leaderboard_rebuilt_from_its_runs_csv_is_the_same(tmp_path: Path) -> None:
    """The workflow's leaderboard (from records) and the page rebuilt from its runs.csv and epochs.csv (a
    snapshot's, a site's) agree cell by cell, curves included."""
    paths, flags = [], {"channels_last": True, "torch_threads": 2}
    for seed, (b, k) in enumerate(zip(BASE, KD)):
        paths += [make_record(tmp_path / "runs", method="baseline", seed=seed, top1=b, provenance=flags),
                  make_record(tmp_path / "runs", method="kd", seed=seed, top1=k, provenance=flags)]
    first = tmp_path / "first"
    write_leaderboard(paths, first, "T")
    again = tmp_path / "again"
    epochs = read_epochs_csv(first / "epochs.csv")
    assert len(epochs) == 6 and [e["epoch"] for e in next(iter(epochs.values()))] == [0, 1, 2, 3]
    render_leaderboard(read_runs_csv(first / "runs.csv"), again, "T", epochs)
    a, b = _csv(first / "leaderboard.csv"), _csv(again / "leaderboard.csv")
    assert [r["method"] for r in a] == [r["method"] for r in b]
    for ra, rb in zip(a, b):
        for key, value in ra.items():
            try:
                assert float(value) == pytest.approx(float(rb[key]), abs=1e-5), key
            except ValueError:
                assert value == rb[key], key
    assert sorted(p.name for p in (again / "plots").glob("*.png")) == sorted(
        p.name for p in (first / "plots").glob("*.png")
    )  # the training curves too
    # the whole page as text: provenance included (a bool from the records reads as runs.csv's `true`)
    assert (again / "leaderboard.md").read_text() == (first / "leaderboard.md").read_text()
    assert "| channels_last | all runs | true |" in (first / "leaderboard.md").read_text()


def test_a_rebuilt_page_is_titled_by_its_tables_config_not_a_jobs() -> None:
    """Each record's ``config_hash`` is its own job's; the table's is in the resolved config file the runs read."""
    rows = [{"prov.config_hash": h, "prov.config_file": "results/t/config-cf26bc50e512.resolved.yaml"}
            for h in ("130e4eb6af48", "1a7d3f75d872", "130e4eb6af48")]
    assert table_config_hash(rows) == "cf26bc50e512"
    assert table_config_hash([{"prov.config_file": "my.yaml"}]) == "" and table_config_hash([]) == ""


def test_workflow_site_copies_its_files_and_names_tables_by_their_runs(tmp_path: Path) -> None:
    paths = [make_record(tmp_path / "runs", method=m, seed=s, top1=t)
             for s in range(2) for m, t in (("baseline", 70.0 + s), ("kd", 72.0 + 2 * s))]
    board = tmp_path / "results" / "t" / "leaderboard"
    write_leaderboard(paths, board, "T")
    entries = write_site(workflow_entries([board], [], PUBLISHED), tmp_path / "site")
    assert [e.name for e in entries] == ["test"]  # the records' table (identity.config)
    folder = tmp_path / "site" / "test"
    assert (folder / "runs.csv").read_text() == (board / "runs.csv").read_text()
    assert {"index.html", "leaderboard.csv", "epochs.csv"} <= {p.name for p in folder.iterdir()}
    assert stale_pages(tmp_path / "site") == []


# ------------------------------------------------------------------------------------------------ colours


def test_a_method_has_one_colour_whatever_else_is_shown_and_in_any_process() -> None:
    assert method_color("kd") == "#1f77b4" and method_color("baseline") == BASELINE_COLOR
    assert method_color("kd (untuned)") == method_color("kd")
    fixed = [method_color(m) for m in ("kd", "dkd", "dist", "funmatch", "fitnet", "at", "rkd", "pkt", "crd",
                                       "takd", "amd", "scalekd", "indistill", "baseline")]
    assert len(set(fixed)) == len(fixed)  # the registered methods are told apart
    # A label without a fixed colour is hashed stably: the same in another process (Python's hash() is salted).
    code = "from kdbench.report.colors import method_color as c; print(c('scalekd_no_tpp'), c('kd_live'))"
    seen = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}).stdout for seed in ("1", "2")}
    assert seen == {f"{method_color('scalekd_no_tpp')} {method_color('kd_live')}\n"}
    assert method_color("scalekd_no_tpp") not in fixed


def test_axis_range_fits_the_points_and_clips_an_outlying_interval() -> None:
    lo, hi = fit_range([70.0, 72.0, 67.5], [1.0, 1.5, 40.0], upper=100.0)
    # The 40-point interval (down to 27.5) does not stretch the axis: it is cut at 2.5 x the median half width.
    assert 67.5 - 2.5 * 1.5 - 1.0 < lo < 67.5 - 2.5 * 1.5 and 73.5 < hi < 75
    lo, hi = fit_range([98.0], [5.0], upper=100.0)
    assert hi <= 100.5  # a top-1 axis stops at 100 %
    lo, hi = fit_range([-1.0, 2.0], [0.5, 0.5], include=[0.0])
    assert lo < -1.5 and hi > 2.5


# ------------------------------------------------------------------------------------------- page stamps


def test_no_published_page_is_older_than_its_records_need() -> None:
    """Every committed page (front page, tables, study) was written by this page format and by a kdbench at least
    as new as the one that wrote its records; `kdbench site` rebuilds them."""
    assert stale_pages(PUBLISHED) == []


def _page_with(stamp: str) -> str:
    return f"<!DOCTYPE html><html><head>{stamp}</head><body></body></html>"


@pytest.mark.parametrize(
    ("stamp", "why"),
    [
        ("", "no kdbench stamp"),
        (f'<meta name="generator" content="kdbench {__version__}"><meta name="kdbench-page-format" content="1">',
         "page format 1"),
        (f'<meta name="generator" content="kdbench 0.1.0"><meta name="kdbench-page-format" content="{PAGE_FORMAT}">',
         "written by kdbench 0.1.0, its records by 0.2.0"),
    ],
)
def test_a_stale_page_is_found(tmp_path: Path, stamp: str, why: str) -> None:
    folder = tmp_path / "fashion-mnist-zoo"
    folder.mkdir()
    shutil.copyfile(PUBLISHED / "fashion-mnist-zoo" / "runs.csv", folder / "runs.csv")  # records of 0.2.0
    (folder / "index.html").write_text(_page_with(stamp))
    (tmp_path / "index.html").write_text((PUBLISHED / "index.html").read_text())
    (stale,) = stale_pages(tmp_path)
    assert str(folder / "index.html") in stale and why in stale


def test_page_stamp_reads_what_page_writes(site: Path) -> None:
    assert page_stamp((site / "index.html").read_text()) == (__version__, PAGE_FORMAT)
    assert page_stamp("<html></html>") == (None, None)


def test_read_csv_keeps_text_columns_as_text(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    fmt.write_csv(path, [{"a": 1.5, "b": "0123", "c": True, "d": None, "e": "1.10"}], list("abcde"))
    (row,) = fmt.read_csv(path, lambda c: c in ("b", "e"))
    assert row == {"a": 1.5, "b": "0123", "c": True, "d": None, "e": "1.10"}
