"""A real end-to-end run of the Snakemake workflow on a tiny slice of Fashion-MNIST."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"
FMNIST = Path("/usr/share/datasets/fashion-mnist")

needs_data = pytest.mark.skipif(
    not (FMNIST / "train-labels-idx1-ubyte.gz").exists(),
    reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
)


# The workflow's jobs run the `kdbench` command of this interpreter's environment, activated or not.
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def snakemake(workdir: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(config), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=ENV)


def write_config(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load(TINY.read_text())
    for key, value in changes.items():
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def job_counts(stdout: str) -> dict[str, int]:
    """The job-count table that ``snakemake -n`` prints."""
    table = stdout.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


@needs_data
def test_dry_run_shows_one_distill_job_per_cell(tmp_path):
    out = snakemake(tmp_path, TINY, "-n")
    assert out.returncode == 0, out.stderr
    counts = job_counts(out.stdout)
    raw = yaml.safe_load(TINY.read_text())
    cells = len(raw["teachers"]) * len(raw["students"]) * len(raw["methods"]) * len(raw["seeds"])
    assert int(counts["distill"]) == cells
    assert int(counts["train_teacher"]) == 1
    assert int(counts["cache_shard"]) == 2  # 512 training images in shards of 256, one tap (logits)


@needs_data
def test_bad_config_fails_dry_run_naming_the_key_and_file(tmp_path):
    out = snakemake(tmp_path, write_config(tmp_path, **{"protocol.epocs": 3}), "-n")
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "protocol.epocs" in text and str(tmp_path / "config.yaml") in text


@needs_data
def test_missing_dataset_names_path_and_fix(tmp_path):
    out = snakemake(tmp_path, write_config(tmp_path, **{"data.root": str(tmp_path / "nowhere")}), "-n")
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert str(tmp_path / "nowhere") in text and "dataset-fashion-mnist" in text


@pytest.mark.slow
@needs_data
def test_end_to_end_workflow_builds_the_leaderboard(tmp_path):
    out = snakemake(tmp_path, TINY, "--cores", "2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    raw = yaml.safe_load(TINY.read_text())
    board = tmp_path / "results" / raw["name"] / "leaderboard"
    rows = list(csv.DictReader(open(board / "leaderboard.csv")))
    got = {(r["teacher"], r["student"], r["method"]) for r in rows}
    want = {(t, s, m) for t in raw["teachers"] for s in raw["students"] for m in raw["methods"]}
    assert got == want
    for r in rows:
        assert int(r["seeds"]) == len(raw["seeds"])
        assert 0.0 <= float(r["top1_mean"]) <= 100.0
    records = sorted((tmp_path / "results" / raw["name"] / "runs").rglob("record.json"))
    assert len(records) == len(want) * len(raw["seeds"])
    kd = json.loads(next(p for p in records if "/kd/" in str(p)).read_text())
    assert kd["status"] == "ok" and kd["cost"]["teacher_forward"] == 0 and kd["cost"]["cache_bytes_read"] > 0
    assert kd["views"] == {"count": 2, "epochs": 1, "repeats": False}
    assert len(re.findall(r"\| kd( \[\d+\])? \|", (board / "leaderboard.md").read_text())) == len(raw["students"])
    # The run's results site: the table's page rebuilt from its runs.csv, linked from the front page.
    site = tmp_path / "results" / "site"
    name = raw["name"]
    assert f'href="{name}/index.html"' in (site / "index.html").read_text()
    assert (site / raw["name"] / "runs.csv").read_text() == (board / "runs.csv").read_text()
    # A second run has nothing to do: every output is complete and up to date.
    again = snakemake(tmp_path, TINY, "--cores", "2", "-n")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    # One more seed through --config reruns exactly the new seed's jobs, the leaderboard and the site.
    more = snakemake(tmp_path, TINY, "-n", "--config", f"seeds={raw['seeds'] + [7]}")
    assert more.returncode == 0, more.stderr
    assert job_counts(more.stdout) == {"distill": len(want), "leaderboard": 1, "site": 1, "all": 1,
                                       "total": len(want) + 3}
    planned = set(re.findall(r"^\s+output: (\S+)", more.stdout, re.M))
    assert {p for p in planned if p.endswith("record.json")} == {
        f"results/{raw['name']}/runs/{t}/{s}/{m}/seed7/record.json" for t, s, m in want}
    # A cache job killed mid-write leaves only a temporary file and no manifest: the rerun finishes the
    # store (and redoes what depends on it), and no reader ever took the temporary file for a shard.
    shard = next((tmp_path / "results" / "cache").rglob("shard-00000.h5"))
    shard.rename(shard.with_name(shard.name + ".tmp-12345"))
    (shard.parent / "manifest.json").unlink()
    for run in (tmp_path / "results" / raw["name"] / "runs").glob("*/*/kd"):  # nothing downstream existed yet
        shutil.rmtree(run)
    shutil.rmtree(board)
    redo = snakemake(tmp_path, TINY, "--cores", "2")
    assert redo.returncode == 0, redo.stderr[-3000:]
    assert shard.exists() and (shard.parent / "manifest.json").exists()
    assert len(list(csv.DictReader(open(board / "leaderboard.csv")))) == len(want)
    # Published as a snapshot, the table is checked against it as the workflow's last step (`kdbench compare`).
    shutil.copytree(board, tmp_path / "results" / "published" / raw["name"])
    check = snakemake(tmp_path, TINY, "--cores", "2")
    assert check.returncode == 0, check.stderr[-3000:]
    summary = (tmp_path / "results" / raw["name"] / "compare.md").read_text().strip().splitlines()[-1]
    assert summary == f"{len(want)}/{len(want)} cells reproduced within the published 95% interval"
    assert f"{raw['name']}: {summary}" in check.stdout
    shutil.rmtree(tmp_path / ".snakemake", ignore_errors=True)


@needs_data
def test_lint_has_nothing_but_the_justified_software_environment_note(tmp_path):
    """`snakemake --lint`: the one remaining lint (no conda/container per rule) is justified in the Snakefile."""
    out = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--snakefile", str(REPO / "Snakefile"),
                          "--directory", str(tmp_path)], capture_output=True, text=True, timeout=300)
    lints = re.findall(r"^    \* (.+?):?$", out.stdout + out.stderr, re.M)
    assert lints and set(lints) == {"Specify a conda environment or container for each rule."}
    assert "conda environment or container" in (REPO / "Snakefile").read_text()


@pytest.mark.slow
@needs_data
def test_a_fresh_clone_plans_every_job_of_the_default(tmp_path):
    """No committed file sits at an output path: a fresh clone of what is committed plans the whole default."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=300)
    out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "2"], cwd=clone, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    raw = yaml.safe_load((clone / "workflow" / "config" / "config.yaml").read_text())
    cells = len(raw["teachers"]) * len(raw["students"]) * len(raw["methods"]) * len(raw["seeds"])
    counts = job_counts(out.stdout)
    assert counts["distill"] == cells and counts["train_teacher"] == len(raw["teachers"])
    assert counts["prepare_data"] == 1 and counts["leaderboard"] == 1 and counts["compare"] == 1
