"""Teachers people can trust (issue 15): a checkpoint teacher states its sha256 and its expected test top-1,
the loader refuses another file, and ``verify_teacher`` stops the workflow before anything uses a checkpoint whose
accuracy is off by more than ``top1_tolerance``.

Data: a tiny synthetic Fashion-MNIST (``_helpers_store``); the checkpoint is a randomly initialised ``cnn_s``
(a teacher directory's ``model.pt``), so its accuracy is whatever it is and the tests state it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers_store import make_teacher_dir, tiny_raw, write_config, write_fmnist_idx
from snakemake.utils import validate

from kdbench.cli import main
from kdbench.config import config_hash, load_config, parse_config, read_config_file, to_raw
from kdbench.data.prepare import prepare
from kdbench.errors import CheckpointError, ConfigError
from kdbench.plan import Layout, Plan, resolve_tables
from kdbench.teacher import train_teacher, verify_teacher

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
SHA = "0123456789abcdef" * 4


def with_teacher(raw_root: Path, **teacher) -> dict:
    """The tiny config with one teacher ``t`` (``cnn_s``) given by ``teacher``'s keys."""
    raw = tiny_raw(raw_root)
    raw["teachers"] = {"t": {"model": "cnn_s", **teacher}}
    return raw


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory):
    return write_fmnist_idx(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def checkpoint(raw_root, tmp_path_factory):
    """``(data dir, checkpoint file, its test top-1 as the teacher job measures it)``."""
    root = tmp_path_factory.mktemp("ckpt")
    data = root / "data"
    prepare(parse_config(tiny_raw(raw_root)).data, data)
    ckpt = make_teacher_dir(root / "random", data) / "model.pt"
    cfg = parse_config(with_teacher(raw_root, checkpoint=str(ckpt)), source="loaded.yaml")
    measured = train_teacher(cfg, "t", data, root / "loaded")["test_top1"]
    return data, ckpt, measured


# --- config -------------------------------------------------------------------------------------------------


def test_the_new_keys_change_no_existing_config_hash():
    """Hashes computed before the keys existed (a new key is left out of every hash while unset)."""
    default = REPO / "workflow" / "config" / "config.yaml"
    before = REPO / "tests" / "configs" / "cifar100-before-teacher-claims.yaml"  # the live file's grid moves on
    pinned = {default: "6e1920b52e16", before: "8e0b395c84c7"}
    got = {path: config_hash(parse_config(read_config_file(path), source=str(path))) for path in pinned}
    assert got == pinned, "a config key changed existing hashes: mark it OMIT_WHEN_DEFAULT"
    assert [t.config_hash for t in resolve_tables([default])] == [pinned[default]]  # as the workflow resolves it


def test_the_keys_round_trip_and_appear_only_when_set(raw_root):
    raw = with_teacher(raw_root, checkpoint="w.pt", sha256=SHA.upper(), expected_top1=74, top1_tolerance=0.5)
    cfg = parse_config(raw, source="c.yaml")
    t = cfg.teachers["t"]
    assert (t.sha256, t.expected_top1, t.top1_tolerance) == (SHA, 74.0, 0.5)  # digest lower-case, numbers float
    again = parse_config(to_raw(cfg), source="resolved.yaml")
    assert again.teachers == cfg.teachers and to_raw(again) == to_raw(cfg)
    assert {k: to_raw(cfg)["teachers"]["t"][k] for k in ("sha256", "expected_top1", "top1_tolerance")} == {
        "sha256": SHA, "expected_top1": 74.0, "top1_tolerance": 0.5}
    plain = to_raw(parse_config(with_teacher(raw_root, checkpoint="w.pt"), source="p.yaml"))["teachers"]["t"]
    assert set(plain) == {"model", "checkpoint", "train", "data"}
    validate(to_raw(cfg), str(SCHEMA))  # the schema takes what kdbench takes ...
    bad = to_raw(cfg)
    bad["teachers"]["t"]["sha256"] = "abc"
    with pytest.raises(Exception, match="sha256"):  # ... and refuses what it refuses
        validate(bad, str(SCHEMA))


@pytest.mark.parametrize(
    ("teacher", "message"),
    [
        ({"expected_top1": 74.3}, r"key 'teachers\.t\.expected_top1' states .* no 'checkpoint'.*Fix: set"),
        ({"sha256": SHA}, r"key 'teachers\.t\.sha256' states .* no 'checkpoint'"),
        ({"checkpoint": "w.pt", "expected_top1": 0}, r"key 'teachers\.t\.expected_top1' must be .* \(0, 100\]"),
        ({"checkpoint": "w.pt", "expected_top1": 100.5}, r"key 'teachers\.t\.expected_top1' must be .* \(0, 100\]"),
        ({"checkpoint": "w.pt", "expected_top1": "74%"}, r"key 'teachers\.t\.expected_top1' must be a number"),
        ({"checkpoint": "w.pt", "expected_top1": True}, r"key 'teachers\.t\.expected_top1' must be a number"),
        ({"checkpoint": "w.pt", "expected_top1": 74.3, "top1_tolerance": 0},
         r"key 'teachers\.t\.top1_tolerance' must be > 0"),
        ({"checkpoint": "w.pt", "top1_tolerance": 2.0},
         r"key 'teachers\.t\.top1_tolerance' is set, but 'teachers\.t\.expected_top1' is not"),
        ({"checkpoint": "w.pt", "sha256": SHA[:-1]}, r"key 'teachers\.t\.sha256' must be .* 64 hex digits"),
        ({"checkpoint": "w.pt", "sha256": SHA[:-1] + "g"}, r"key 'teachers\.t\.sha256' must be .* 64 hex digits"),
        ({"checkpoint": "w.pt", "expected_top": 74.3}, r"unknown key 'teachers\.t\.expected_top'.*expected_top1"),
    ],
)
def test_a_bad_teacher_claim_names_the_file_and_key(raw_root, tmp_path, teacher, message):
    path = write_config(tmp_path / "grid.yaml", with_teacher(raw_root, **teacher))
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ")


# --- the plan -----------------------------------------------------------------------------------------------


def test_only_a_checkpoint_that_states_its_accuracy_is_verified(raw_root, tmp_path):
    def plan(name: str, **teacher) -> Plan:
        raw = {**with_teacher(raw_root, **teacher), "name": name}
        return Plan.resolve([write_config(tmp_path / f"{name}.yaml", raw)])

    loaded, claimed = plan("a", checkpoint="w.pt"), plan("b", checkpoint="w.pt", expected_top1=70.0)
    key = next(iter(claimed.teachers))
    assert claimed.teacher_verification(key) == Layout.TEACHER_VERIFIED.format(tkey=key)
    assert claimed.teacher_verification(key) == f"{claimed.teachers[key].dir}/verified.json"
    assert loaded.teacher_verification(next(iter(loaded.teachers))) is None  # states nothing: no job
    assert plan("c").teacher_verification(next(iter(plan("c").teachers))) is None  # trained
    # The expectation is checked, not part of the teacher: same key, same teacher job and stores ...
    assert set(claimed.teachers) == set(loaded.teachers) and set(claimed.stores) == set(loaded.stores)
    assert "verify teacher " + claimed.teacher_verification(key) in claimed.render()
    # ... but a new expectation is a new check (the rule's rerun trigger), and a stated sha256 names the weights.
    tighter = plan("d", checkpoint="w.pt", expected_top1=70.0, top1_tolerance=0.5)
    assert tighter.verification_spec(key) != claimed.verification_spec(key)
    assert set(plan("e", checkpoint="w.pt", sha256=SHA).teachers).isdisjoint(loaded.teachers)


def test_two_tables_sharing_a_checkpoint_must_state_the_same_accuracy(raw_root, tmp_path):
    a = write_config(tmp_path / "a.yaml", {**with_teacher(raw_root, checkpoint="w.pt", expected_top1=70.0), "name": "a"})
    b = write_config(tmp_path / "b.yaml", {**with_teacher(raw_root, checkpoint="w.pt", expected_top1=71.0), "name": "b"})
    same = write_config(tmp_path / "c.yaml", {**with_teacher(raw_root, checkpoint="w.pt", expected_top1=70.0), "name": "c"})
    Plan(resolve_tables([a]) + resolve_tables([same]))  # agree: one teacher, one check
    with pytest.raises(ConfigError, match=r"'teachers\.t\.expected_top1' says 71\.0 ± 1\.0, but table 'a'.*70\.0 ± 1\.0"
                       r".*Fix: state the same"):
        Plan(resolve_tables([a]) + resolve_tables([b]))


# --- loading and verifying a checkpoint ----------------------------------------------------------------------


def test_a_checkpoint_with_another_sha256_is_refused(raw_root, checkpoint, tmp_path):
    data, ckpt, _ = checkpoint
    from kdbench._util import sha256_file

    digest = sha256_file(ckpt)
    wrong = parse_config(with_teacher(raw_root, checkpoint=str(ckpt), sha256=SHA), source="wrong.yaml")
    for load in (lambda: train_teacher(wrong, "t", data, tmp_path / "t"),
                 lambda: verify_teacher(parse_config(with_teacher(raw_root, checkpoint=str(ckpt), sha256=SHA,
                                                                  expected_top1=50.0), source="wrong.yaml"),
                                        "t", data, tmp_path / "verified.json")):
        with pytest.raises(CheckpointError) as err:
            load()
        msg = str(err.value)
        assert msg.startswith("wrong.yaml: ") and str(ckpt) in msg and digest in msg and SHA in msg
        assert f"Fix: make sure {ckpt} is the intended file" in msg and f"set 'teachers.t.sha256' to {digest}" in msg
    assert not (tmp_path / "t" / "metrics.json").exists() and not (tmp_path / "verified.json").exists()
    right = parse_config(with_teacher(raw_root, checkpoint=str(ckpt), sha256=digest.upper()), source="right.yaml")
    assert train_teacher(right, "t", data, tmp_path / "t")["checkpoint_sha256"] == digest


def test_verify_passes_at_the_teachers_own_accuracy_and_writes_the_check(raw_root, checkpoint, tmp_path):
    data, ckpt, measured = checkpoint
    cfg = parse_config(with_teacher(raw_root, checkpoint=str(ckpt), expected_top1=measured), source="ok.yaml")
    out = tmp_path / "verified.json"
    v = verify_teacher(cfg, "t", data, out)
    assert v["measured_top1"] == measured  # the very number the teacher job records
    assert json.loads(out.read_text()) == json.loads(json.dumps(v))
    assert {k: v[k] for k in ("teacher", "verdict", "expected_top1", "top1_tolerance", "difference", "test_images")} \
        == {"teacher": "t", "verdict": "passed", "expected_top1": measured, "top1_tolerance": 1.0, "difference": 0.0,
            "test_images": 32}
    assert v["checkpoint"] == str(ckpt) and len(v["checkpoint_sha256"]) == 64 and "torch" in json.dumps(v["provenance"])
    # Exactly the tolerance still passes.
    edge = parse_config(with_teacher(raw_root, checkpoint=str(ckpt), expected_top1=measured + 3.125,
                                     top1_tolerance=3.125), source="edge.yaml")
    assert verify_teacher(edge, "t", data, tmp_path / "edge.json")["verdict"] == "passed"


def test_verify_fails_20_points_off_naming_teacher_file_numbers_and_fix(raw_root, checkpoint, tmp_path, capsys):
    data, ckpt, measured = checkpoint
    expected = measured - 20 if measured > 50 else measured + 20
    path = write_config(tmp_path / "off.yaml", with_teacher(raw_root, checkpoint=str(ckpt), expected_top1=expected))
    out = tmp_path / "verified.json"
    with pytest.raises(CheckpointError) as err:
        verify_teacher(load_config(path), "t", data, out)
    msg = str(err.value)
    assert msg.startswith(f"{path}: teacher 't' (cnn_s) from checkpoint {ckpt}")
    assert f"measures test top-1 {measured:.2f}% on 32 test images" in msg
    assert f"'teachers.t.expected_top1' is {expected:.2f}%" in msg and f"off by {measured - expected:+.2f} points" in msg
    assert "'teachers.t.top1_tolerance' (1.00)" in msg and "Fix: check the checkpoint" in msg
    assert "correct 'teachers.t.expected_top1'" in msg
    assert not out.exists()  # nothing that looks like a passed check
    # The command: exit 2, the message on one line in stderr; and 0 with the verdict once the number is right.
    args = ["verify-teacher", "--config", str(path), "--teacher", "t", "--data", str(data), "--out", str(out)]
    assert main(args) == 2
    assert "kdbench: error: " + msg.replace("\n", " ") in capsys.readouterr().err and not out.exists()
    write_config(path, with_teacher(raw_root, checkpoint=str(ckpt), expected_top1=measured))
    assert main(args) == 0
    assert f"test top-1 {measured:.2f}%, expected {measured:.2f}% ± 1.00: passed -> {out}" in capsys.readouterr().out
    assert json.loads(out.read_text())["verdict"] == "passed"


# --- the workflow -------------------------------------------------------------------------------------------


def snakemake(workdir: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(config), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=ENV)


def planned(stdout: str) -> dict[str, int]:
    table = stdout.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_the_teacher_job_waits_for_the_check_and_only_a_claim_adds_one(raw_root, checkpoint, tmp_path):
    _, ckpt, _ = checkpoint
    claimed = write_config(tmp_path / "a.yaml", with_teacher(raw_root, checkpoint=str(ckpt), expected_top1=50.0))
    out = snakemake(tmp_path / "a", claimed, "-n", "--forceall")
    assert out.returncode == 0, out.stdout + out.stderr
    assert planned(out.stdout)["verify_teacher"] == 1 and planned(out.stdout)["train_teacher"] == 1
    key = next(iter(Plan.resolve([claimed]).teachers))
    teacher_job = out.stdout.split("rule train_teacher:", 1)[1].split("\n\n", 1)[0]
    assert f"results/teachers/{key}/verified.json" in teacher_job  # so every store and run of it waits too
    plain = write_config(tmp_path / "b.yaml", with_teacher(raw_root, checkpoint=str(ckpt)))
    out = snakemake(tmp_path / "b", plain, "-n")
    assert out.returncode == 0, out.stderr
    assert "verify_teacher" not in planned(out.stdout)


@pytest.mark.slow
def test_a_wrong_expected_top1_stops_the_workflow_before_the_teacher_is_used(raw_root, checkpoint, tmp_path):
    _, ckpt, measured = checkpoint
    over = {"protocol": {"epochs": 1}, "methods": {"baseline": {}, "kd": {}}}
    wrong = measured - 20 if measured > 50 else measured + 20
    config = write_config(tmp_path / "c.yaml", tiny_raw(raw_root, **over, teachers={
        "t": {"model": "cnn_s", "checkpoint": str(ckpt), "expected_top1": wrong}}))
    work = tmp_path / "work"
    out = snakemake(work, config, "--cores", "2")
    assert out.returncode != 0
    assert re.search(r"Error in rule verify_teacher", out.stdout + out.stderr), out.stderr[-3000:]
    key = next(iter(Plan.resolve([config]).teachers))
    log = (work / Layout.LOGS / "teachers" / f"{key}.verify.log").read_text()
    assert f"measures test top-1 {measured:.2f}%" in log and "'teachers.t.expected_top1'" in log
    results = work / "results"
    assert not (results / "teachers" / key / "metrics.json").exists()  # the teacher job never ran ...
    assert not (results / "teachers" / key / "verified.json").exists()
    assert not list(results.glob("cache/**/*.h5")) and not list(results.glob("cache/**/manifest.json"))  # ... no store
    assert not list(results.glob("*/runs/t/*/kd/**/record.json"))  # ... no run that reads the teacher
    # Corrected, the same workflow goes through to the leaderboard.
    write_config(config, tiny_raw(raw_root, **over, teachers={
        "t": {"model": "cnn_s", "checkpoint": str(ckpt), "expected_top1": measured}}))
    out = snakemake(work, config, "--cores", "2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    check = json.loads((results / "teachers" / key / "verified.json").read_text())
    assert check["verdict"] == "passed" and check["measured_top1"] == measured
    assert list(results.glob("*/runs/t/cnn_xs/kd/seed0/record.json"))
    # A new expectation re-runs the check alone: the teacher, its stores and runs stay.
    write_config(config, tiny_raw(raw_root, **over, teachers={
        "t": {"model": "cnn_s", "checkpoint": str(ckpt), "expected_top1": measured, "top1_tolerance": 0.5}}))
    again = snakemake(work, config, "-n")
    assert again.returncode == 0, again.stderr
    assert planned(again.stdout).get("verify_teacher") == 1
    assert {k for k in planned(again.stdout) if k not in ("total", "all")} <= {"verify_teacher", "leaderboard", "site"}, \
        again.stdout
