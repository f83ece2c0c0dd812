"""The ``kdbench`` command: one-line user errors, help texts, the store syntax and its deprecated forms,
``methods``, ``compare``, ``verify``'s report, and the provenance of the checkout and the machine."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import kdbench
from kdbench import cli
from kdbench.config import parse_config
from kdbench.errors import ConfigError, StoreError
from kdbench.runtime import cpu_capability, cpu_model, git_commit, git_state, provenance
from kdbench.verify import VerifyReport, compare_runs, machine_differences

RAW = {
    "name": "t",
    "teachers": {"t": {"model": "cnn_m"}},
    "students": ["cnn_xs"],
    "methods": {"baseline": {}, "kd": {}, "fitnet": {}, "at": {}},
    "seeds": [0],
}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# --- user errors -------------------------------------------------------------------------------------------


@pytest.fixture()
def empty_config(tmp_path) -> Path:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    return path


@pytest.mark.parametrize("text", ["", "name: x\n  bad: [\n", "name: t\nprotocol: {lr: fast}\n"])
def test_a_user_error_is_one_line_without_traceback(tmp_path, capsys, caplog, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    assert cli.main(["prepare-data", "--config", str(path), "--out", str(tmp_path / "data")]) == 2
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"kdbench: error: {path}: ")
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # no duplicate logger line


def test_a_multi_line_user_error_is_joined_into_one_line(capsys, monkeypatch):
    def fail(args):
        raise StoreError("shard-00001.h5: sha256 differs\n  expected abc\n  found def")

    monkeypatch.setattr(cli, "cmd_methods", fail)
    assert cli.main(["methods"]) == 2
    assert _stderr_lines(capsys) == ["kdbench: error: shard-00001.h5: sha256 differs expected abc found def"]


def test_debug_shows_the_traceback(empty_config):
    with pytest.raises(ConfigError, match="empty"):
        cli.main(["--debug", "prepare-data", "--config", str(empty_config), "--out", "x"])


def test_the_installed_command_prints_exactly_one_line(empty_config):
    proc = subprocess.run(
        [sys.executable, "-m", "kdbench.cli", "prepare-data", "--config", str(empty_config), "--out", "x"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"kdbench: error: {empty_config}: the config file is empty (no YAML content); write the experiment matrix"
        " into it (e.g. start from a copy of workflow/config/config.yaml)"
    ]


def test_a_closed_pipe_exits_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "kdbench.cli", "methods", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader goes away before anything is written, like `| head -0`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141
    assert err == ""


def test_a_broken_pipe_inside_a_command_is_quiet(monkeypatch, capsys):
    def write_to_closed_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "cmd_methods", write_to_closed_pipe)
    assert cli.main(["methods"]) == 141
    assert capsys.readouterr().err == ""


# --- help and version --------------------------------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"kdbench {kdbench.__version__}"


def test_every_option_has_help_and_no_help_has_rst_markup():
    parser = cli.build_parser()
    subs = _subparsers(parser)
    assert {"cache", "cache-manifest", "check-cache", "distill", "compare", "methods", "verify"} <= set(subs)
    for name, sub in [("kdbench", parser), *subs.items()]:
        for action in sub._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
        text = sub.format_help()
        assert "``" not in text and ":func:" not in text and ":class:" not in text, name


# --- the store syntax and the deprecated forms ---------------------------------------------------------------


@pytest.fixture()
def calls(monkeypatch):
    """Replaces the config loading and the commands' work functions with recorders."""
    seen: dict[str, tuple] = {}
    cfg = parse_config(RAW, source="cfg.yaml")
    monkeypatch.setattr(cli, "_config", lambda args: cfg)

    def recorder(name, result=None):
        def record(*a, **kw):
            seen.setdefault(name, a)
            return result

        return record

    import kdbench.cache.build as build
    import kdbench.distill as distill

    monkeypatch.setattr(build, "build_shard", recorder("build_shard", {"seconds": 1.0, "views_per_s": 9.0}))
    monkeypatch.setattr(build, "finalize_store", recorder("finalize_store"))
    record = SimpleNamespace(status="ok", final=SimpleNamespace(test_top1=50.0), cost=SimpleNamespace(wall_time_s=2.0))
    monkeypatch.setattr(distill, "run_distill", recorder("run_distill", record))
    return seen


COMMON = ["--config", "cfg.yaml", "--teacher-dir", "teachers/t", "--data", "data"]


def test_cache_takes_the_store_and_shard(calls, capsys):
    assert cli.main(["cache", *COMMON, "--store", "cache/t/abc/feature_1", "--shard", "3"]) == 0
    _, _, _, tap, shard, out = calls["build_shard"]
    assert (tap, shard, out) == ("feature[1]", 3, Path("cache/t/abc/feature_1/shard-00003.h5"))
    assert _stderr_lines(capsys) == []


def test_cache_old_form_still_works_with_a_warning(calls, capsys):
    assert cli.main(["cache", *COMMON, "--tap", "logits", "--shard", "0", "--out", "somewhere/s0.h5"]) == 0
    assert calls["build_shard"][3:] == ("logits", 0, Path("somewhere/s0.h5"))
    lines = _stderr_lines(capsys)
    assert len(lines) == 2 and all(line.startswith("kdbench: warning: ") and "deprecated" in line for line in lines)


def test_cache_manifest_derives_the_tap_from_the_store(calls, capsys):
    assert cli.main(["cache-manifest", *COMMON, "--store", "cache/t/abc/pre_logits"]) == 0
    assert calls["finalize_store"][3:] == ("pre_logits", Path("cache/t/abc/pre_logits"))
    assert _stderr_lines(capsys) == []


def test_cache_manifest_tap_is_deprecated(calls, capsys):
    assert cli.main(["cache-manifest", *COMMON, "--tap", "logits", "--store", "cache/t/abc/logits"]) == 0
    assert calls["finalize_store"][3] == "logits"
    (line,) = _stderr_lines(capsys)
    assert line.startswith("kdbench: warning: --tap is deprecated")


def test_a_store_name_that_is_not_a_tap_is_a_user_error(calls, capsys):
    assert cli.main(["cache-manifest", *COMMON, "--store", "cache/t/abc/"]) == 2
    (line,) = _stderr_lines(capsys)
    assert line.startswith("kdbench: error: --store cache/t/abc: 'abc' is not a store's directory name")


def _check_cache_args(argv: list[str]) -> argparse.Namespace:
    return cli.build_parser().parse_args(["check-cache", *COMMON, *argv])


def test_check_cache_takes_store_and_the_old_positional_with_a_warning(capsys):
    assert _check_cache_args(["--store", "cache/t/logits"]).store == "cache/t/logits"
    assert _stderr_lines(capsys) == []
    assert _check_cache_args(["cache/t/logits"]).store == "cache/t/logits"
    (line,) = _stderr_lines(capsys)
    assert "deprecated" in line and "--store DIR" in line
    with pytest.raises(SystemExit):
        _check_cache_args([])
    with pytest.raises(SystemExit):
        _check_cache_args(["--store", "a/logits", "b/logits"])


DISTILL = ["distill", "--config", "cfg.yaml", "--teacher", "t", "--student", "cnn_xs", "--seed", "0", "--data", "d",
           "--out", "o"]


def test_distill_method_label_and_its_deprecated_alias(calls, capsys):
    assert cli.main([*DISTILL, "--method-label", "kd"]) == 0
    assert calls.pop("run_distill")[3] == "kd" and _stderr_lines(capsys) == []
    assert cli.main([*DISTILL, "--method", "kd"]) == 0
    assert calls["run_distill"][3] == "kd"
    (line,) = _stderr_lines(capsys)
    assert line.startswith("kdbench: warning: --method is deprecated") and "--method-label" in line
    with pytest.raises(SystemExit):
        cli.main(DISTILL)


def test_distill_unknown_label_is_a_user_error(calls, capsys):
    assert cli.main([*DISTILL, "--method-label", "kdd"]) == 2
    (line,) = _stderr_lines(capsys)
    assert "--method-label 'kdd' is not in the config" in line and "kd" in line


def test_distill_stores_new_and_old_form(calls, capsys, tmp_path):
    store = tmp_path / "cache" / "t" / "abc" / "logits"
    assert cli.main([*DISTILL, "--method-label", "kd", "--teacher-dir", "t", "--store", str(store)]) == 0
    assert calls.pop("run_distill")[7] == {"logits": store}
    assert _stderr_lines(capsys) == []
    assert cli.main([*DISTILL, "--method-label", "kd", "--teacher-dir", "t", "--store", f"logits={tmp_path}/x"]) == 0
    assert calls["run_distill"][7] == {"logits": tmp_path / "x"}
    (line,) = _stderr_lines(capsys)
    assert "--store logits=DIR is deprecated" in line


def test_distill_stores_are_keyed_by_the_tap_their_directory_names(calls, tmp_path):
    """The run matches them to the declared taps (``feature[-2]`` is ``feature[1]`` of a 3-stage teacher)."""
    stores = [tmp_path / "cache" / f"feature_{i}" for i in range(3)]
    argv = [*DISTILL, "--method-label", "at", "--teacher-dir", str(tmp_path / "teacher")]
    assert cli.main([*argv, *(x for s in stores for x in ("--store", str(s)))]) == 0
    assert calls["run_distill"][7] == {"feature[0]": stores[0], "feature[1]": stores[1], "feature[2]": stores[2]}


def test_distill_same_tap_twice_is_a_user_error(calls, capsys):
    assert cli.main([*DISTILL, "--method-label", "kd", "--store", "a/logits", "--store", "b/logits"]) == 2
    assert "two stores of tap 'logits'" in _stderr_lines(capsys)[0]


# --- methods -----------------------------------------------------------------------------------------------


def test_methods_table_and_json_agree(capsys):
    from kdbench.methods import METHODS

    assert cli.main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == METHODS.names()
    kd = next(r for r in rows if r["name"] == "kd")
    assert kd["parameters"] == json.loads(json.dumps(dataclasses.asdict(METHODS.get("kd").Config())))
    assert kd["teacher_taps"] == ["logits"] and kd["reference"] == METHODS.get("kd").reference
    assert cli.main(["methods"]) == 0
    text = capsys.readouterr().out
    for r in rows:
        assert f"\n{r['name']}\n" in f"\n{text}\n" and r["reference"] in text
        for key, value in r["parameters"].items():
            assert f"{key}={json.dumps(value)}" in text
    assert "teacher taps  feature[-1], feature[-2], feature[-3]" in text


# --- compare -----------------------------------------------------------------------------------------------


@pytest.fixture()
def fake_compare(monkeypatch):
    """A stand-in for ``kdbench.report.compare`` whose verdict the test sets."""
    state = {"ok": True, "args": None}

    class Report:
        @property
        def ok(self):
            return state["ok"]

        def render(self):
            return "| cell | new | published |\n| kd | 80.0 | 80.1 |\n"

        def summary(self):
            return "1 cell compared: " + ("all within tolerance" if state["ok"] else "1 outside tolerance")

    def compare_leaderboards(new, published):
        state["args"] = (new, published)
        return Report()

    module = types.ModuleType("kdbench.report.compare")
    module.compare_leaderboards = compare_leaderboards
    monkeypatch.setitem(sys.modules, "kdbench.report.compare", module)
    return state


def test_compare_prints_writes_and_sets_the_exit_code(fake_compare, tmp_path, capsys):
    out = tmp_path / "sub" / "compare.md"
    assert cli.main(["compare", "new.csv", "published.csv", "--out", str(out)]) == 0
    assert fake_compare["args"] == (Path("new.csv"), Path("published.csv"))
    printed = capsys.readouterr().out
    assert printed == "| cell | new | published |\n| kd | 80.0 | 80.1 |\n1 cell compared: all within tolerance\n"
    assert out.read_text() == printed
    fake_compare["ok"] = False
    assert cli.main(["compare", "new.csv", "published.csv"]) == 1
    assert "1 outside tolerance" in capsys.readouterr().out
    assert cli.main(["compare", "new.csv", "published.csv", "--exit-zero"]) == 0


# --- verify ------------------------------------------------------------------------------------------------


def test_machine_differences():
    here = {"cpu": "CPU B", "cpu_capability": "AVX2"}
    assert machine_differences({"cpu": "CPU B", "cpu_capability": "AVX2"}, here) == []
    assert machine_differences({"device": "cpu (x86_64)"}, here) == []  # a record from before cpu was recorded
    diff = machine_differences({"cpu": "CPU A", "cpu_capability": "AVX512"}, here)
    assert diff == ["cpu: 'CPU A' in the record, 'CPU B' here", "cpu_capability: 'AVX512' in the record, 'AVX2' here"]


def test_verify_report_explains_a_difference_across_machines():
    report = VerifyReport("differs", "cpu (x86_64)", ["final.test_top1: 80.0 != 80.1"], ["cpu: 'A' in the record, 'B' here"])
    text = report.render(Path("runs/x"))
    assert text.startswith("DIFFERS: runs/x re-ran on cpu (x86_64) with 1 differences")
    assert "another machine (cpu: 'A' in the record, 'B' here)" in text
    assert "same CPU model and ISA" in text and "kdbench compare" in text
    same = VerifyReport("differs", "cpu (x86_64)", ["final.test_top1: 80.0 != 80.1"]).render(Path("runs/x"))
    assert "another machine" not in same
    assert VerifyReport("identical", "cpu (x86_64)").render(Path("r")).startswith("identical: r re-ran bit for bit")


def _run_dir(path: Path, provenance: dict) -> Path:
    path.mkdir(parents=True)
    record = {"final": {"test_top1": 80.0}, "cost": {"wall_time_s": 1.0, "student_params": 10},
              "provenance": {"model_sha256": "ab", **provenance}}
    (path / "record.json").write_text(json.dumps(record))
    (path / "epochs.jsonl").write_text(json.dumps({"epoch": 0, "val_top1": 70.0, "time_s": 3.0}) + "\n")
    return path


def test_compare_runs_ignores_provenance_other_than_the_weights(tmp_path):
    a = _run_dir(tmp_path / "a", {"cpu": "A", "cpu_capability": "AVX512", "dirty_files": [], "git_commit": "1"})
    b = _run_dir(tmp_path / "b", {"cpu": "B", "cpu_capability": "AVX2", "dirty_files": ["kdbench/x.py"],
                                  "git_commit": "1+dirty"})
    assert compare_runs(a, b) == []


# --- provenance --------------------------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> None:
    identity = ["-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "-C", str(repo), *identity, *args], check=True, capture_output=True)


@pytest.fixture()
def repo(tmp_path) -> Path:
    """A git repository with a committed ``kdbench/`` and ``workflow/``, and ``*.pyc`` ignored."""
    (tmp_path / "kdbench").mkdir()
    (tmp_path / "kdbench" / "a.py").write_text("A = 1\n")
    (tmp_path / "workflow").mkdir()
    (tmp_path / "workflow" / "rules.smk").write_text("# rules\n")
    (tmp_path / ".gitignore").write_text("*.pyc\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "init")
    return tmp_path


def test_clean_checkout_is_not_dirty(repo):
    commit, files = git_state(repo)
    assert len(commit) == 40 and "+dirty" not in commit and files == []
    (repo / "kdbench" / "a.cpython-311.pyc").write_text("ignored")
    (repo / "notes.txt").write_text("outside kdbench/ and workflow/")
    assert git_state(repo) == (commit, [])


def test_untracked_method_file_makes_the_commit_dirty(repo):
    (repo / "kdbench" / "methods").mkdir()
    (repo / "kdbench" / "methods" / "new.py").write_text("# a new method\n")
    commit, files = git_state(repo)
    assert commit.endswith("+dirty") and files == ["kdbench/methods/new.py"]
    assert git_commit(repo) == commit


def test_modified_files_under_kdbench_and_workflow_are_listed(repo):
    (repo / "workflow" / "rules.smk").write_text("# changed\n")
    (repo / "kdbench" / "a.py").write_text("A = 2\n")
    commit, files = git_state(repo)
    assert commit.endswith("+dirty") and files == ["kdbench/a.py", "workflow/rules.smk"]


def test_outside_git_is_unknown(tmp_path):
    assert git_state(tmp_path / "nowhere") == ("unknown", [])


def test_provenance_records_dirty_files_and_the_cpu():
    import torch

    prov = provenance(torch.device("cpu"))
    assert isinstance(prov["dirty_files"], list) and prov["dirty_files"] == sorted(prov["dirty_files"])
    assert prov["git_commit"].endswith("+dirty") == bool(prov["dirty_files"]) or prov["git_commit"] == "unknown"
    assert prov["cpu"] == cpu_model() and prov["cpu"]
    assert prov["cpu_capability"] == cpu_capability() == str(torch.backends.cpu.get_cpu_capability())
    assert prov["device"].startswith("cpu")
    yaml.safe_dump(prov)  # plain types only
