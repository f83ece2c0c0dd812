"""The plugin path end to end: a fresh virtual environment with kdbench and ``examples/kdbench-plugin-example``
installed (``pip install -e``), a tiny table naming the plugin's method (``nkd``) and model (``cnn_micro``)
through Snakemake, its rows on the leaderboard with the plugin in the provenance; ``kdbench check-method`` passes
on the plugin and fails, in words, on a broken copy of it, which ``kdbench verify`` then refuses to re-run the
table's record with.

The new environment is layered on the test's own by a ``.pth`` file that adds its site-packages (torch and the
other dependencies, as `.ci/run` and the README install them): pip installs kdbench's commands and the plugin in
seconds instead of unpacking a second torch for minutes. The plugin, its entry points and the broken copy live in
the new environment only, and the test's own commands are taken off ``PATH``. The table trains for one epoch on
100 synthetic Fashion-MNIST-format images.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from _helpers_store import tiny_raw, write_config, write_fmnist_idx

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "kdbench-plugin-example"
PACKAGE = "kdbench-plugin-example"

pytestmark = pytest.mark.slow


def _run(cmd: list[str], env: dict | None = None, timeout: int = 3600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv layered on this one (kdbench and its dependencies) with the example plugin, editable."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    assert _run([sys.executable, "-m", "venv", str(root)]).returncode == 0
    python = str(root / "bin" / "python")
    own = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    base = sysconfig.get_paths()["purelib"]
    Path(own, "_kdbench_test_base.pth").write_text(f"import site; site.addsitedir({base!r})\n")
    for args in (["--no-deps", "-e", str(REPO)], ["-e", str(EXAMPLE)]):  # kdbench's commands in this venv's bin too
        out = _run([python, "-m", "pip", "install", "-q", *args])
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    where = _run([python, "-c", "import kdbench_plugin_example, sys; print(kdbench_plugin_example.__file__, sys.prefix)"])
    assert where.stdout.split() == [str(EXAMPLE / "kdbench_plugin_example" / "__init__.py"), str(root)], where
    return root


def _env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    own_bin = str(Path(sys.executable).parent)  # this environment's commands would not see the plugin
    path = [d for d in env.get("PATH", "").split(os.pathsep) if d and d != own_bin]
    return {**env, "PATH": os.pathsep.join([str(venv / "bin"), *path]), "VIRTUAL_ENV": str(venv)}


def _is_commit_of_this_repo(commit: str) -> bool:
    """``commit`` is HEAD or one of its ancestors (a commit made while the test ran is fine)."""
    out = _run(["git", "-C", str(REPO), "merge-base", "--is-ancestor", commit, "HEAD"])
    return len(commit) == 40 and out.returncode == 0


def test_a_plugin_method_and_model_run_through_snakemake_onto_the_leaderboard(venv, tmp_path):
    env = _env(venv)
    python = str(venv / "bin" / "python")
    isolated = _run([python, "-c", "import sys; print(sys.prefix != sys.base_prefix, sys.flags.no_site)"], env)
    assert isolated.stdout.split() == ["True", "0"]

    listed = _run(["kdbench", "methods", "--json"], env)
    assert listed.returncode == 0, listed.stderr
    nkd = next(r for r in json.loads(listed.stdout) if r["name"] == "nkd")
    assert nkd["source"] == {"package": PACKAGE, "version": "0.1.0", "built_in": False,
                             "entry_point": "kdbench.methods: nkd = kdbench_plugin_example.nkd:NKD"}

    check = _run(["kdbench", "check-method", "nkd"], env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "method 'nkd' passes the contract" in check.stdout

    raw = tiny_raw(write_fmnist_idx(tmp_path / "raw"), name="plugin-table",
                   protocol={"epochs": 1}, teachers={"t": {"model": "cnn_s", "train": {"epochs": 1}}},
                   students=["cnn_micro"])
    raw["methods"] = {"baseline": {}, "nkd": {}}  # replaces the helper's methods (a merge would keep its kd)
    config = write_config(tmp_path / "config.yaml", raw)
    work = tmp_path / "work"
    out = _run([python, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
                "--configfile", str(config), "--cores", "2"], env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    board = work / "results" / "plugin-table" / "leaderboard"
    rows = {r["method"]: r for r in csv.DictReader(open(board / "leaderboard.csv"))}
    assert set(rows) == {"baseline", "nkd"} and rows["nkd"]["student"] == "cnn_micro"
    assert 0.0 <= float(rows["nkd"]["top1_mean"]) <= 100.0
    record_path = next((work / "results" / "plugin-table" / "runs").rglob("nkd/seed0/record.json"))
    record = json.loads(record_path.read_text())
    [plugin] = record["provenance"]["plugins"]
    assert plugin["package"] == PACKAGE and plugin["version"] == "0.1.0"
    assert plugin["provides"] == ["method nkd", "model cnn_micro"]
    commit = plugin["git_commit"].removesuffix("+dirty")  # the example is an editable checkout of this repository
    assert _is_commit_of_this_repo(commit)
    runs = {r["method"]: r for r in csv.DictReader(open(board / "runs.csv"))}
    assert runs["nkd"][f"plugin.{PACKAGE}"].startswith(f"0.1.0 (git {commit}")
    assert runs["baseline"][f"plugin.{PACKAGE}"].startswith("0.1.0")  # its student is the plugin's model
    assert f"plugin {PACKAGE}" in (board / "leaderboard.md").read_text()

    # A broken copy of the plugin (a newer version): check-method says what fails; verify refuses the record.
    broken = tmp_path / "broken"
    shutil.copytree(EXAMPLE, broken, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    source = broken / "kdbench_plugin_example" / "nkd.py"
    text = source.read_text()
    text = text.replace("@dataclass(frozen=True)\nclass NKDConfig", "@dataclass\nclass NKDConfig")
    text = text.replace('s = student["logits"]\n', 's = student["logits"] + 0 * student["pre_logits"].sum()\n')
    source.write_text(text)
    (broken / "pyproject.toml").write_text((broken / "pyproject.toml").read_text().replace('"0.1.0"', '"0.2.0"'))
    out = _run([python, "-m", "pip", "install", "-q", "-e", str(broken)], env)
    assert out.returncode == 0, out.stderr[-3000:]
    check = _run(["kdbench", "check-method", "nkd"], env)
    assert check.returncode == 1
    assert "nkd: Config must be a frozen dataclass" in check.stdout
    assert "raised UndeclaredTapError" in check.stdout and "pre_logits" in check.stdout
    assert "method 'nkd' breaks the contract" in check.stdout
    verify = _run(["kdbench", "verify", str(record_path.parent)], env)
    assert verify.returncode == 2
    assert f"plugin {PACKAGE} 0.1.0 made it, but {PACKAGE} 0.2.0 is installed" in verify.stderr
