"""Issue 25: a config that cannot be planned fails every command with one line, whatever is on disk; a selection
(``select:``) runs part of a table as exactly the full table's jobs.

Data: a tiny synthetic Fashion-MNIST (``_helpers_store``) and tiny CIFAR-100 pickles (``test_data``), so no real
dataset is needed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _helpers_store import tiny_raw, write_fmnist_idx
from test_data import make_cifar100
from test_workflow import ENV, REPO, job_counts

from kdbench import cli, tuning
from kdbench.config import parse_config
from kdbench.errors import ConfigError
from kdbench.plan import Plan, resolve_tables

CIFAR100 = REPO / "workflow" / "config" / "cifar100.yaml"
SLURM = REPO / "workflow" / "profiles" / "slurm"
PILOT = {"pairs": [["resnet56", "resnet20"]], "methods": ["kd", "crd"], "seeds": [0]}  # the example


def snakemake(workdir: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(config), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV, check=False)


def one_error_line(out: subprocess.CompletedProcess) -> str:
    """The failed command's only output (but Snakemake's note of a profile): one ``kdbench: error:`` line, no
    traceback."""
    assert out.returncode != 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = [ln for ln in (out.stdout + out.stderr).splitlines()
             if ln.strip() and not ln.startswith("Using workflow specific profile ")]
    assert len(lines) == 1 and lines[0].startswith("kdbench: error: "), lines
    assert "Traceback" not in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> Path:
    return write_fmnist_idx(tmp_path_factory.mktemp("fmnist"))


def config(path: Path, root: Path, **over) -> Path:
    """The store tests' tiny table (``name: pe``) over ``root``, with sections replaced by ``over``."""
    if "data" in over:
        over["data"] = {"root": str(root), **over["data"]}
    raw = tiny_raw(root, name="pe", **over)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# --- 1. an error hidden by an old output --------------------------------------------------------------------


@pytest.mark.parametrize("args", [("-n",), ("--cores", "1"), ("-n", "--workflow-profile", str(SLURM))],
                         ids=["dry-run", "run", "slurm-profile"])
def test_a_broken_config_fails_although_its_table_is_finished_on_disk(fmnist, tmp_path, args):
    # A finished table of this name: its leaderboard is on disk and up to date (what a shrunk run leaves).
    board = tmp_path / "work" / "results" / "pe" / "leaderboard"
    board.mkdir(parents=True)
    for name in ("leaderboard.md", "leaderboard.csv", "index.html"):
        (board / name).write_text("done\n")
    # The full config, same name, with a data root that does not exist.
    broken = config(tmp_path / "full.yaml", tmp_path / "nowhere")
    line = one_error_line(snakemake(tmp_path / "work", broken, *args))
    assert f"{broken}: key 'data.root': dataset file not found: {tmp_path / 'nowhere'}" in line


def test_a_val_size_larger_than_the_training_set_is_one_line_naming_file_and_key(fmnist, tmp_path):
    path = config(tmp_path / "c.yaml", fmnist, data={"val_size": 1000})
    line = one_error_line(snakemake(tmp_path, path, "-n"))
    assert f"{path}: key 'data.val_size' is 1000, but the fashion-mnist training set has 160 images" in line
    assert "between 1 and 159" in line


# --- 4. one line, and 'did you mean', for every user error under Snakemake ---------------------------------


@pytest.mark.parametrize("over, key, hint", [
    ({"methods": {"baseline": {}, "kdd": {}}}, "methods.kdd", "unknown method 'kdd'; valid choices: "),
    ({"students": ["cnn_xss"]}, "students[0]", "unknown timm model 'cnn_xss'; did you mean 'cnn_xs'"),
    ({"protocol": {"epocs": 1}}, "protocol.epocs", "valid keys of 'protocol'"),
    ({"methods": {"kd": {"kd_wieght": 2.0}}}, "methods.kd", "has no parameter 'kd_wieght'"),
], ids=["method", "model", "protocol-key", "method-parameter"])
def test_a_misspelt_name_is_one_line_with_did_you_mean(fmnist, tmp_path, over, key, hint):
    path = config(tmp_path / "c.yaml", fmnist, **over)
    line = one_error_line(snakemake(tmp_path, path, "-n"))
    assert f"{path}: " in line and f"'{key}'" in line and hint in line and "did you mean" in line


@pytest.mark.parametrize("over, message", [
    ({"methods": {"dkdd": {}}}, "c.yaml: key 'methods.dkdd': unknown method 'dkdd'; valid choices: amd, "),
    ({"students": ["resnt20"]}, "c.yaml: key 'students[0]': unknown timm model 'resnt20'; did you mean 'resnet20'"),
    ({"teachers": {"resnet56": {"model": "resnet56"}}, "students": None, "pairs": [["resnet65", "resnet20"]]},
     ("c.yaml: key 'pairs[0]': teacher 'resnet65' is not under 'teachers' (resnet56); add it there or fix the name;"
      " did you mean 'resnet56'?")),
    ({"selct": {}}, "c.yaml: unknown top-level key 'selct'; valid keys: "),
], ids=["method", "model", "pair-teacher", "top-level-key"])
def test_did_you_mean_for_methods_models_keys_and_teachers_in_pairs(over, message):
    raw = {k: v for k, v in {**tiny_raw(Path("/nowhere")), **over}.items() if v is not None}
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        parse_config(raw, source="c.yaml")
    assert "did you mean" in str(e.value) and "\n" not in str(e.value)


def test_a_dry_run_writes_no_resolved_config(fmnist, tmp_path):
    out = snakemake(tmp_path, config(tmp_path / "c.yaml", fmnist), "-n")
    assert out.returncode == 0, out.stderr[-3000:]
    assert job_counts(out.stdout)["distill"] == 2
    assert not list(tmp_path.glob("results/**/*.resolved.yaml"))


def test_the_estimate_says_how_many_images_it_assumes(fmnist, tmp_path, capsys):
    path = config(tmp_path / "c.yaml", fmnist)
    assert cli.main(["plan", "--configfile", str(path), "--estimate"]) == 0
    # 160 training images minus 24 for val, then train_limit 100; test_limit 32 of the 48 test images.
    assert (f"assumes 100 training, 24 val and 32 test images of fashion-mnist at {fmnist} (28 px, train_limit 100,"
            " test_limit 32), 4 epochs, 3 views per image") in capsys.readouterr().out


def test_kdbench_plan_refuses_what_the_workflow_refuses(fmnist, tmp_path, capsys):
    path = config(tmp_path / "c.yaml", fmnist, data={"val_size": 500})
    assert cli.main(["plan", "--configfile", str(path)]) == 2
    assert f"{path}: key 'data.val_size' is 500" in capsys.readouterr().err
    missing = tmp_path / "t.pth"
    path = config(tmp_path / "c.yaml", fmnist, teachers={"t": {"model": "cnn_s", "checkpoint": str(missing)}})
    assert cli.main(["plan", "--configfile", str(path)]) == 2
    assert capsys.readouterr().err == (f"kdbench: error: {path}: key 'teachers.t.checkpoint': file not found:"
                                       f" {missing}. Fix: give the path of the checkpoint file, or remove the key to"
                                       " train the teacher\n")


# --- 2. selections from the command line --------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar100")
    make_cifar100(root, n_train=120, n_test=30)
    return root


@pytest.fixture(scope="module")
def cifar_full(cifar_root) -> Plan:
    return Plan(resolve_tables([CIFAR100], {"data": {"root": str(cifar_root), "val_size": 20, "shard_size": 50}}))


def test_a_selection_plans_exactly_the_full_tables_jobs(cifar_root, cifar_full):
    data = {"root": str(cifar_root), "val_size": 20, "shard_size": 50}
    pilot = Plan(resolve_tables([CIFAR100], {"data": data, "select": PILOT}))
    full, name = cifar_full, "cifar100-crd"
    # The same table: resolved config, its file and its hash; the selection is not part of it.
    assert pilot.tables[name].cfg == full.tables[name].cfg
    assert pilot.tables[name].resolved_path == full.tables[name].resolved_path
    assert pilot.table_hash(name) == full.table_hash(name)
    assert pilot.tables[name].origin == full.tables[name].origin  # (the resolved file's header)
    # Exactly the full table's jobs of the pair, the two methods and the seed: same paths, hashes and inputs.
    want = [j for j in full.jobs if (j.teacher, j.student) == ("resnet56", "resnet20") and j.label in ("kd", "crd")
            and j.seed == 0]
    assert pilot.jobs == want and len(want) == 2
    for job in pilot.jobs:
        assert job.run_dir == f"results/{name}/runs/resnet56/resnet20/{job.label}/seed0"
        assert pilot.job_hash(job) == full.job_hash(job)
        assert pilot.job_teacher(job) == full.job_teacher(job)
        assert pilot.job_stores(job) == full.job_stores(job)
    # Only what those jobs need: their teacher, its stores, the table's data.
    assert {tk.teacher for tk in pilot.teachers.values()} == {"resnet56"}
    assert set(pilot.stores) == {sk.dir for j in pilot.jobs for sk in pilot.job_stores(j).values()}
    assert all(pilot.stores[d] == full.stores[d] for d in pilot.stores)
    assert all(full.teachers[k] == tk for k, tk in pilot.teachers.items())
    assert list(pilot.data) == [pilot.data_key(name)]
    assert all(pilot.store_shards(d) == full.store_shards(d) for d in pilot.stores)
    # Tuning follows the selection: its cells, trials, selections and tuned runs are the full table's.
    cells = tuning.cells(pilot, name)
    assert cells == [("resnet56", "resnet20", "kd"), ("resnet56", "resnet20", "crd")]
    for cell in cells:
        assert tuning.trial_files(pilot, name, *cell) == tuning.trial_files(full, name, *cell)
        assert tuning.trial_hash(pilot, name, *cell, 3) == tuning.trial_hash(full, name, *cell, 3)
        assert tuning.selection_hash(pilot, name, *cell) == tuning.selection_hash(full, name, *cell)
    assert tuning.tuned_records(pilot, name) == [
        f"results/{name}/tuned/resnet56/resnet20/{m}/seed0/record.json" for m in ("kd", "crd")]
    assert set(tuning.tuned_records(pilot, name)) < set(tuning.tuned_records(full, name))
    assert "2 distill jobs of a selection (pairs resnet56/resnet20; methods kd, crd; seeds 0)" in pilot.render()


def test_selection_keys_combine_and_dotted_overrides_work(cifar_root, cifar_full):
    data = {"root": str(cifar_root), "val_size": 20, "shard_size": 50}
    plan = Plan(resolve_tables([CIFAR100], {"data": data, "select.teachers": ["resnet32x4"],
                                            "select.students": ["shufflev1_cifar", "shufflev2_cifar", "wrn_16_2"],
                                            "select.seeds": "[1, 3]"}))
    want = [j for j in cifar_full.jobs if j.teacher == "resnet32x4" and "shuffle" in j.student and j.seed in (1, 3)]
    assert plan.jobs == want and len(want) == 2 * 9 * 2


@pytest.mark.parametrize("select, message", [
    ({"methods": ["kd", "crdd"]}, ("key 'select.methods[1]': 'crdd' is not a method label under 'methods'; the"
                                   " table's: baseline, kd, dkd, dist, fitnet, at, pkt, rkd, crd; did you mean 'crd'?")),
    ({"pairs": [["vgg13_cifar", "vgg8_cifar"]]}, ("key 'select.pairs[0]': 'vgg13_cifar' is not a teacher name under"
                                                  " 'teachers' (the table's: wrn_40_2, resnet56, resnet110, resnet32x4,"
                                                  " vgg13, ResNet50); the teacher of model 'vgg13_cifar' is named"
                                                  " 'vgg13'")),
    ({"pairs": [["resnet56", "resnet32"]]}, ("key 'select.pairs[0]': [resnet56, resnet32] is not a pair of the"
                                             " table; teacher 'resnet56' distils into resnet20")),
    ({"seeds": [7]}, "key 'select.seeds[0]': 7 is not one of the table's 'seeds'; the table's: 0, 1, 2, 3, 4"),
    ({"student": ["resnet20"]}, ("unknown key 'select.student'; valid keys of 'select': pairs, teachers, students,"
                                 " methods, seeds; did you mean 'students'?")),
    ({"teachers": ["resnet56"], "students": ["wrn_16_2"]}, ("key 'select' (teachers resnet56; students wrn_16_2)"
                                                            " keeps no job of table 'cifar100-crd'")),
    ({"methods": "kd"}, "key 'select.methods' must be a non-empty list"),
])
def test_a_wrong_selection_is_one_error_naming_the_file_and_key(cifar_root, select, message):
    data = {"root": str(cifar_root), "val_size": 20, "shard_size": 50}
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        Plan(resolve_tables([CIFAR100], {"data": data, "select": select}))
    assert str(e.value).startswith(f"{CIFAR100} + --config ") and "\n" not in str(e.value)


def test_a_selection_under_snakemake_plans_its_jobs_and_tells_the_leaderboard(fmnist, tmp_path):
    path = config(tmp_path / "c.yaml", fmnist, students=["cnn_xs", "cnn_s"], seeds=[0, 1])
    out = snakemake(tmp_path, path, "-n", "-p", "--config", "select={students: [cnn_s], methods: [kd], seeds: [1]}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert job_counts(out.stdout)["distill"] == 1
    planned = set(re.findall(r"^\s+output: (\S+)", out.stdout, re.MULTILINE))
    assert {p for p in planned if p.endswith("record.json")} == {"results/pe/runs/t/cnn_s/kd/seed1/record.json"}
    command = next(ln for ln in out.stdout.splitlines() if "kdbench leaderboard" in ln)
    selection = json.dumps({"students": ["cnn_s"], "methods": ["kd"], "seeds": [1]})
    assert f"--selection '{selection}'" in command
    wrong = snakemake(tmp_path, path, "-n", "--config", "select={methods: [kdd]}")
    assert one_error_line(wrong) == (
        f"kdbench: error: {path} + --config select={{'methods': ['kdd']}}: key 'select.methods[0]': 'kdd' is not a"
        " method label under 'methods'; the table's: baseline, kd; did you mean 'kd'?")


def test_the_leaderboard_command_passes_the_selection_only_when_there_is_one(fmnist, tmp_path, monkeypatch):
    from kdbench.plan import write_resolved
    from kdbench.report import leaderboard

    (table,) = resolve_tables([config(tmp_path / "c.yaml", fmnist, students=["cnn_xs", "cnn_s"])])
    monkeypatch.chdir(tmp_path)
    resolved = write_resolved(table)
    calls = []
    monkeypatch.setattr(leaderboard, "write_leaderboard",
                        lambda runs, out, **kw: calls.append(kw) or {"cells": 0, "runs": len(runs)})
    base = ["leaderboard", "--config", str(resolved), "--runs", "r.json", "--out", "board"]
    assert cli.main(base) == 0
    assert cli.main(base + ["--selection", '{"students": ["cnn_s"], "methods": ["kd"]}']) == 0
    assert "selection" not in calls[0]
    assert calls[1]["selection"] == "students cnn_s; methods kd"
    assert cli.main(base + ["--selection", "{methods: [kdd]}"]) == 2


@pytest.mark.slow
def test_a_pilot_selection_is_reused_by_the_full_run(fmnist, tmp_path):
    path = config(tmp_path / "c.yaml", fmnist, protocol={"epochs": 1, "batch_size": 32, "eval_batch_size": 16,
                                                         "views": {"count": 1}},
                  teachers={"t": {"model": "cnn_s", "train": {"epochs": 1}}}, seeds=[0, 1])
    pilot = snakemake(tmp_path, path, "--cores", "2", "--config", "select={methods: [kd], seeds: [0]}")
    assert pilot.returncode == 0, pilot.stdout[-3000:] + pilot.stderr[-3000:]
    runs = tmp_path / "results" / "pe" / "runs" / "t" / "cnn_xs"
    assert (runs / "kd" / "seed0" / "record.json").exists()
    assert not (runs / "kd" / "seed1").exists() and not (runs / "baseline").exists()
    board = (tmp_path / "results" / "pe" / "leaderboard" / "leaderboard.md").read_text()
    assert "a selection of the table: methods kd; seeds 0" in board.splitlines()[0]
    full = snakemake(tmp_path, path, "-n")
    assert full.returncode == 0, full.stderr[-3000:]
    # Everything the pilot ran is reused: only the other three runs, the leaderboard and the site are left.
    assert job_counts(full.stdout) == {"distill": 3, "leaderboard": 1, "site": 1, "all": 1, "total": 6}
