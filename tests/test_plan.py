"""The resolved plan: config files + overrides -> tables -> jobs and paths (kdbench.plan)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml
from _helpers_store import tiny_raw, write_config, write_fmnist_idx

from kdbench.config import load_config, parse_config, to_raw
from kdbench.errors import ConfigError
from kdbench.plan import DistillJob, Layout, Plan, apply_overrides, resolve_tables, write_resolved

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "workflow" / "config"


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory):
    return write_fmnist_idx(tmp_path_factory.mktemp("raw"))


def test_overrides_replace_values_and_reach_nested_keys_with_dots():
    raw = {"seeds": [0], "protocol": {"epochs": 3, "lr": 0.1}}
    apply_overrides(raw, {"seeds": [0, 1, 2], "protocol.epochs": 5, "protocol": {"batch_size": 64}})
    assert raw == {"seeds": [0, 1, 2], "protocol": {"epochs": 5, "lr": 0.1, "batch_size": 64}}


def test_default_config_resolves_with_overrides_and_every_value_explicit():
    (table,) = resolve_tables([], {"seeds": [0, 1, 2, 3, 4], "protocol.epochs": 4})
    assert table.name == "fashion-mnist-default" and table.cfg.seeds == (0, 1, 2, 3, 4)
    assert table.cfg.protocol.epochs == 4
    assert table.raw["protocol"]["warmup_epochs"] == 0  # a default, written out
    assert table.raw["methods"]["kd"] == {"method": "kd", "tau": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
    assert table.cfg.source == f"results/fashion-mnist-default/config-{table.config_hash}.resolved.yaml"
    (plain,) = resolve_tables([CONFIGS / "config.yaml"])
    assert plain.config_hash != table.config_hash  # two different configs never share one tag


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")) + [REPO / "tests" / "configs" / "tiny.yaml"],
                         ids=lambda p: p.name)
def test_every_shipped_config_round_trips_through_its_resolved_form(path):
    for table in resolve_tables([path]):
        assert parse_config(to_raw(table.cfg), source=table.cfg.source) == table.cfg


def test_resolved_config_is_written_once_and_read_back_identically(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (table,) = resolve_tables([CONFIGS / "config.yaml"], {"seeds": [3]})
    path = write_resolved(table)
    mtime = path.stat().st_mtime_ns
    assert write_resolved(table).stat().st_mtime_ns == mtime  # unchanged content: not rewritten
    assert load_config(path) == table.cfg
    assert "--config seeds=[3]" in path.read_text().splitlines()[0]


def test_a_teacher_from_another_config_is_the_same_teacher_job():
    tables = resolve_tables([CONFIGS / "all-tables.yaml"])
    plan = Plan(tables)
    assert [t.name for t in tables][:2] == ["fashion-mnist-default", "fashion-mnist-zoo"]
    default = plan.teacher_key("fashion-mnist-default", "cnn_m")
    zoo = plan.teacher_key("fashion-mnist-zoo", "cnn_m")
    assert zoo == default and default.table == "fashion-mnist-default"
    assert len([k for k in plan.teachers.values() if not k.label]) == 1  # trained once for both tables
    # The zoo trains on a subset; its teacher still learns on the default's data (one data job each).
    assert plan.data_key("fashion-mnist-zoo") != plan.data_key("fashion-mnist-default")
    assert plan.teacher_data_dir(zoo.key) == plan.data_dir(plan.data_key("fashion-mnist-default"))
    # Loading the zoo alone plans the very same teacher directory (its data job defined by the zoo's teacher).
    alone = Plan(resolve_tables([CONFIGS / "fashion-mnist-zoo.yaml"]))
    assert alone.teacher_key("fashion-mnist-zoo", "cnn_m").dir == default.dir
    assert alone.data[plan.data_key("fashion-mnist-default")] == ("fashion-mnist-zoo", "cnn_m")


def _plan(tmp_path: Path, raw: dict, name: str = "grid.yaml", **overrides) -> Plan:
    return Plan.resolve([write_config(tmp_path / name, raw)], overrides)


def test_teacher_and_store_keys_change_exactly_with_what_defines_them(raw_root, tmp_path):
    raw = tiny_raw(raw_root, methods={"baseline": {}, "kd": {}})
    plan = _plan(tmp_path, raw)
    (teacher,) = plan.teachers
    (store,) = plan.stores
    seeds = _plan(tmp_path, raw, seeds=[0, 1, 2])
    assert set(seeds.teachers) == {teacher} and set(seeds.stores) == {store}
    epochs = _plan(tmp_path, raw, **{"teachers.t.train.epochs": 2})
    assert set(epochs.teachers) != {teacher}
    views = _plan(tmp_path, raw, **{"cache.logits_dtype": "float32"})
    assert set(views.teachers) == {teacher} and set(views.stores) != {store}


def test_jobs_on_streamed_data_ask_for_a_cpu_per_loader_worker(raw_root, tmp_path):
    """A job's threads (its CPUs on SLURM): the rule's own, or on data its jobs may stream, at least one per
    ``data.workers`` loader worker plus the main process."""
    raw = tiny_raw(raw_root, methods={"baseline": {}, "kd": {}})
    plan = _plan(tmp_path, raw)  # fashion-mnist, stream auto: fixed-size images, read into memory
    (dkey,), (tkey,) = plan.data, plan.teachers
    assert plan.teacher_data_key(tkey) == dkey
    assert (plan.job_threads(dkey), plan.job_threads(dkey, 2)) == (1, 2)
    streamed = _plan(tmp_path, raw, **{"data.stream": True, "data.workers": 3})
    (skey,) = streamed.data
    assert skey == dkey and (streamed.job_threads(skey), streamed.job_threads(skey, 5)) == (4, 5)
    in_main = _plan(tmp_path, raw, **{"data.stream": True, "data.workers": 0})
    assert (in_main.job_threads(dkey), in_main.job_threads(dkey, 2)) == (1, 2)
    in_memory = _plan(tmp_path, raw, **{"data.stream": False, "data.workers": 3})
    assert in_memory.job_threads(dkey) == 1


def test_name_clashes_and_bad_references_name_the_file_and_key(raw_root, tmp_path):
    with pytest.raises(ConfigError, match=r"key 'name' must not be one of"):
        _plan(tmp_path, tiny_raw(raw_root, name="cache"))
    raw = tiny_raw(raw_root)
    raw["teachers"] = {"t": {"from": "nowhere.yaml"}}
    with pytest.raises(ConfigError, match=r"grid.yaml: key 'teachers.t.from': config file not found"):
        _plan(tmp_path, raw)
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(tiny_raw(raw_root)))
    raw["teachers"] = {"t": {"from": "a.yaml", "model": "cnn_m"}}
    with pytest.raises(ConfigError, match=r"key 'teachers.t.model': a teacher given with 'from'"):
        _plan(tmp_path, raw)
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"tables": ["a.yaml", "a.yaml"]}))
    with pytest.raises(ConfigError, match="two tables share the name"):
        resolve_tables([tmp_path / "suite.yaml"])


def test_a_bad_override_names_the_config_file_and_the_override(raw_root, tmp_path):
    with pytest.raises(ConfigError) as err:
        _plan(tmp_path, tiny_raw(raw_root), **{"protocol.epocs": 3})
    assert "grid.yaml + --config protocol.epocs=3" in str(err.value) and "protocol.epocs" in str(err.value)


def _string_literals(path: Path) -> list[str]:
    """The string literals of a .smk file's Python parts (docstrings and comments excluded)."""
    text = path.read_text()
    strings = re.findall(r'(?<![\w"])f?"((?:[^"\\\n]|\\.)*)"', text)
    docstrings = set(re.findall(r'"""(.*?)"""', text, re.S))
    return [s for s in strings if s not in docstrings]


def test_workflow_files_build_no_path_of_their_own():
    """Every output path comes from kdbench.plan (Layout / Plan); a .smk that spells one out fails here."""
    files = sorted((REPO / "workflow" / "rules").glob("*.smk")) + [REPO / "Snakefile"]
    offenders = [(f.name, s) for f in files for s in _string_literals(f) if "results/" in s or "shard-" in s]
    assert offenders == []
    used = {m for f in files for m in re.findall(r"\bL\.([A-Z_]+)", f.read_text())}
    assert used <= {k for k in vars(Layout) if k.isupper()}
    assert {"DATA", "TEACHER", "ASSISTANT", "STORE", "RUN", "LEADERBOARD", "COMPARE"} <= used


def test_plan_module_imports_no_stage():
    """The plan sits below the stages: it never imports training, caching, distillation or reporting code."""
    tree = ast.parse((REPO / "kdbench" / "plan.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    banned = ("kdbench.train", "kdbench.distill", "kdbench.teacher", "kdbench.report", "kdbench.cache.build",
              "kdbench.cli")
    assert not [m for m in imported if m.startswith(banned)]


def test_an_incompatible_cell_is_not_scheduled_and_the_leaderboard_lists_its_reason(raw_root, tmp_path):
    from kdbench import cli

    raw = tiny_raw(raw_root, methods={"baseline": {}, "at": {"num_stages": 9}}, seeds=[0, 1])
    plan = _plan(tmp_path, raw)
    assert "at" in plan.tables[raw["name"]].cfg.methods and "at" not in {j.label for j in plan.jobs}
    assert {key[1:] for key in plan.skipped} == {("t", s, "at") for s in raw["students"]}
    assert all("num_stages" in reason for reason in plan.skipped.values())
    assert not any("feature" in d for d in plan.stores)  # and no cache job for its feature maps either

    # The leaderboard (from the baseline's records only) still shows the cell, with the reason.
    from kdbench.distill import run_identity
    from kdbench.record import Cost, Final, RunRecord, Views, write_record

    cfg = plan.tables[raw["name"]].cfg
    runs = []
    for seed in cfg.seeds:
        path = tmp_path / f"run{seed}" / "record.json"
        write_record(path, RunRecord(
            status="ok", identity=run_identity(cfg, "t", cfg.students[0], "baseline", seed), protocol=cfg.protocol,
            protocol_hash=cfg.protocol.hash(), views=Views(1, 1, False),
            final=Final(80.0 + seed, 99.0, 80.0, 0, 80.0, 80.0), cost=Cost(1.0, 1.0, 10, 0, 0, 10, 0),
            requirements={"live_teacher": False}, provenance={
                "kdbench_version": "0", "git_commit": "x", "packages": {}, "python": "3", "device": "cpu",
                "torch_threads": 1, "config_hash": "h", "data_manifest_sha256": "d"}))
        runs.append(str(path))
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(yaml.safe_dump(to_raw(cfg)))
    assert cli.main(["leaderboard", "--config", str(resolved), "--runs", *runs, "--out", str(tmp_path / "lb")]) == 0
    board = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "num_stages" in board and re.search(r"\| at( \[\d+\])? \|", board)  # its row, a footnote marker


def test_snakemake_config_values_are_read_as_yaml():
    """Snakemake parses `--config seeds=[0,1]` with YAML's base loader: every item is a string."""
    (table,) = resolve_tables([CONFIGS / "config.yaml"], {"seeds": ["0", "1"], "protocol": {"epochs": "4", "lr": "5e-2"}})
    assert table.cfg.seeds == (0, 1) and table.cfg.protocol.epochs == 4 and table.cfg.protocol.lr == 0.05


def _write_cifar10(root: Path, n_train: int = 600, n_test: int = 200) -> Path:
    """CIFAR-10's python pickles (five training batches, the test batch, batches.meta), tiny."""
    import pickle

    import numpy as np

    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = [(f"data_batch_{i}", n_train // 5) for i in range(1, 6)] + [("test_batch", n_test)]
    for name, n in batches:
        blob = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        (d / name).write_bytes(pickle.dumps(blob))
    (d / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return root


def test_the_cifar10_indistill_config_plans_on_files_in_the_real_format(tmp_path):
    root = _write_cifar10(tmp_path / "cifar10")
    plan = Plan.resolve([CONFIGS / "cifar10-indistill.yaml"], {"data": {"root": str(root), "val_size": 100}})
    assert {j.label for j in plan.jobs} == {"baseline", "kd", "pkt", "indistill", "indistill_ce"} and not plan.skipped
    assert len(plan.jobs) == 15 and {s.tap for s in plan.stores.values()} >= {"feature[0]", "feature[2]", "pre_logits"}
    assert all(len(plan.store_shards(d)) == 1 for d in plan.stores)  # 500 training images, shards of 5000


def test_the_zoos_keys_are_golden():
    """The keys name the directories of every data, teacher, assistant and store job and trigger every rerun:
    a change of any of them silently orphans a user's results (and retrains or re-caches everything)."""
    plan = Plan(resolve_tables([CONFIGS / "fashion-mnist-zoo.yaml"]))
    table = "fashion-mnist-zoo"
    assert plan.data_key(table) == "fashion-mnist-037f6a05"
    assert plan.teacher_key(table, "cnn_m").key == "cnn_m-7622cfdd"
    assert plan.assistant_key(table, "cnn_m", "takd").key == "cnn_m-7622cfdd.takd-9beacfaa"
    store = "results/cache/cnn_m-7622cfdd/7c1ac220/{}"
    expected = {"baseline": ("1934afb9", []), "kd": ("e6bd35ee", [store.format("logits")]),
                "fitnet": ("83d45212", [store.format("feature_1")]),
                "takd": ("abfac092", ["results/cache/cnn_m-7622cfdd.takd-9beacfaa/7c1ac220/logits"])}
    for label, (job_hash, stores) in expected.items():
        job = DistillJob(table, "cnn_m", "cnn_xs", label, 0)
        assert (plan.job_hash(job), sorted(sk.dir for sk in plan.job_stores(job).values())) == (job_hash, stores), label
    assert [sk.dir for sk in plan.assistant_stores(table, "cnn_m", "takd").values()] == [store.format("logits")]


def test_two_tables_with_the_same_assistant_share_its_job_under_the_first_table(raw_root, tmp_path):
    raw = tiny_raw(raw_root, methods={"kd": {}, "takd": {"assistant": "cnn_xs"}})
    write_config(tmp_path / "a.yaml", {**raw, "name": "first"})
    write_config(tmp_path / "b.yaml", {**raw, "name": "second", "seeds": [1, 2]})
    (tmp_path / "suite.yaml").write_text("tables: [a.yaml, b.yaml]\n")
    plan = Plan.resolve([tmp_path / "suite.yaml"], {})
    first, second = plan.assistant_key("first", "t", "takd"), plan.assistant_key("second", "t", "takd")
    assert first == second and second.table == "first" and second.label == "takd"
    assert re.fullmatch(r"t-[0-9a-f]{8}\.takd-[0-9a-f]{8}", second.key) and second.key.startswith(
        plan.teacher_key("first", "t").key + ".")
    assert len([k for k in plan.teachers.values() if k.label]) == 1


def test_a_job_reads_stores_unless_it_runs_its_teacher_live_or_has_none(raw_root, tmp_path):
    methods = {"baseline": {}, "kd": {}, "kd_live": {"method": "kd", "teacher_source": "live"},
               "fixed_teacher": {"method": "funmatch", "teacher_view": "clean"}, "funmatch": {}}
    plan = _plan(tmp_path, tiny_raw(raw_root, methods=methods))
    stores = {label: sorted(plan.job_stores(DistillJob("store-test", "t", "cnn_xs", label, 0))) for label in methods}
    assert stores == {"baseline": [], "kd": ["logits"], "kd_live": [], "fixed_teacher": [], "funmatch": ["logits"]}
