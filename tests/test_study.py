"""The cache-budget study: a method entry's ``teacher_source: live``, suite entries that derive tables from one
config (``{config, set, methods}``), the study report (kdbench.report.study) and its lossless check.

The report is tested on synthetic run records written with the record's own dataclasses; expected numbers are
worked out in the comments. The slow test runs a tiny study through the real workflow.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _helpers_store import tiny_raw, write_config, write_fmnist_idx

from kdbench._util import sha256_file, to_jsonable
from kdbench.cache.store import FORMAT_VERSION
from kdbench.config import (
    Protocol,
    ViewRecipe,
    config_hash,
    load_config,
    parse_config,
    read_config_file,
    to_raw,
)
from kdbench.errors import ConfigError
from kdbench.plan import Plan, resolve_study, resolve_tables
from kdbench.record import Cost, Final, Identity, RunRecord, Views, write_record
from kdbench.report.study import build_study, gap_closes, write_study

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "workflow" / "config"
T975_2 = 4.303  # t(0.975, 2): three seeds


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory):
    return write_fmnist_idx(tmp_path_factory.mktemp("raw"))


# --- teacher_source: live ------------------------------------------------------------------------------------


def test_a_live_entry_reads_no_store_and_changes_nothing_else(raw_root, tmp_path):
    raw = tiny_raw(raw_root, methods={"kd": {}, "kd_live": {"method": "kd", "teacher_source": "live"}})
    plan = Plan.resolve([write_config(tmp_path / "grid.yaml", raw)])
    kd, live = (next(j for j in plan.jobs if j.label == label and j.seed == 0) for label in ("kd", "kd_live"))
    assert plan.job_stores(live) == {} and plan.job_stores(kd)
    assert plan.job_teacher(live) == plan.job_teacher(kd)  # the same teacher, run online
    assert set(plan.stores) == {s.dir for s in plan.job_stores(kd).values()}  # no store is built for it
    cfg = plan.tables["store-test"].cfg
    assert cfg.methods["kd_live"].params == cfg.methods["kd"].params  # the method's resolved parameters
    assert (cfg.methods["kd_live"].teacher_source, cfg.methods["kd"].teacher_source) == ("live", "cache")
    assert to_raw(cfg)["methods"]["kd_live"]["teacher_source"] == "live"
    assert "teacher_source" not in to_raw(cfg)["methods"]["kd"]
    assert parse_config(to_raw(cfg), source=cfg.source) == cfg  # round trip through the resolved form
    assert plan.job_hash(live) != plan.job_hash(kd)


def test_the_default_teacher_source_changes_no_hash(raw_root, tmp_path):
    plain = Plan.resolve([write_config(tmp_path / "a.yaml", tiny_raw(raw_root))])
    explicit = Plan.resolve(
        [write_config(tmp_path / "b.yaml", tiny_raw(raw_root, methods={"kd": {"teacher_source": "cache"}}))]
    )
    (a,), (b,) = plain.tables.values(), explicit.tables.values()
    assert a.config_hash == b.config_hash and a.raw == b.raw
    assert [plain.job_hash(j) for j in plain.jobs] == [explicit.job_hash(j) for j in explicit.jobs]
    assert set(plain.stores) == set(explicit.stores)


def test_a_published_resolved_config_keeps_its_hash():
    """A config resolved before ``teacher_source`` existed hashes as it did then (its header says how)."""
    path = REPO / "results" / "published" / "fashion-mnist-funmatch" / "config.resolved.yaml"
    recorded = re.search(r"config hash ([0-9a-f]+)", path.read_text()).group(1)
    assert config_hash(parse_config(read_config_file(path), source=str(path))) == recorded


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"method": "kd", "teacher_source": "online"},
            r"key 'methods.x.teacher_source' must be one of cache, live",
        ),
        (
            {"method": "baseline", "teacher_source": "live"},
            r"'methods.x.teacher_source' is 'live'.*reads no teacher",
        ),
    ],
)
def test_a_bad_teacher_source_names_the_key(raw_root, entry, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(tiny_raw(raw_root, methods={"x": entry}), source="grid.yaml")


def test_a_live_entry_may_sit_in_a_topk_table(raw_root):
    """It reads no store, so a top-k cache does not flatten its teacher; the cached twin is still refused."""
    cfg = parse_config(
        tiny_raw(
            raw_root, cache={"topk": 2}, methods={"fm_live": {"method": "funmatch", "teacher_source": "live"}}
        ),
        source="grid.yaml",
    )
    assert cfg.methods["fm_live"].teacher_source == "live"
    with pytest.raises(ConfigError, match="needs the teacher's full logits"):
        parse_config(tiny_raw(raw_root, cache={"topk": 2}, methods={"fm": {"method": "funmatch"}}))


# --- suite entries ---------------------------------------------------------------------------------------------


def _suite(tmp_path: Path, raw_root: Path, tables: list, **extra) -> Path:
    write_config(tmp_path / "base.yaml", tiny_raw(raw_root, name="base"))
    return write_config(tmp_path / "suite.yaml", {**extra, "tables": tables})


def test_suite_entries_derive_tables_from_one_config(raw_root, tmp_path):
    suite = _suite(
        tmp_path,
        raw_root,
        [
            "base.yaml",
            {"config": "base.yaml", "set": {"name": "base-v1", "protocol.views.count": 1}, "methods": ["kd"]},
        ],
    )
    base, v1 = resolve_tables([suite])
    (alone,) = resolve_tables([tmp_path / "base.yaml"])
    assert base.config_hash == alone.config_hash and base.origin == alone.origin  # a plain entry: as before
    assert (v1.name, v1.cfg.protocol.views.count, list(v1.cfg.methods)) == ("base-v1", 1, ["kd"])
    assert v1.cfg.protocol.epochs == base.cfg.protocol.epochs and v1.cfg.cache == base.cfg.cache
    assert f"{suite}: tables[1].set name='base-v1' protocol.views.count=1" in v1.origin
    assert f"{suite}: tables[1].methods [kd]" in v1.origin
    # The command line's --config applies to every table, after an entry's own `set`.
    base3, v3 = resolve_tables([suite], {"protocol.views.count": 3, "methods.kd.tau": 2.0})
    assert base3.cfg.protocol.views.count == v3.cfg.protocol.views.count == 3
    assert v3.cfg.methods["kd"].params["tau"] == 2.0 and list(v3.cfg.methods) == ["kd"]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"config": "base.yaml", "set": {"protocol.epocs": 3}},
            r"tables\[1\]\.set protocol\.epocs=3.*protocol\.epocs",
        ),
        (
            {"config": "base.yaml", "set": {"seeds.x": 1}},
            r"tables\[1\]\.set: seeds\.x=\.\.\.: 'seeds' is not a mapping",
        ),
        ({"config": "base.yaml", "set": ["name"]}, r"key 'tables\[1\]\.set' must be a mapping"),
        (
            {"config": "base.yaml", "methods": ["dkd"]},
            r"tables\[1\]\.methods: 'dkd' is not a method label.*baseline, kd",
        ),
        ({"config": "base.yaml", "methods": []}, r"key 'tables\[1\]\.methods' must be a non-empty list"),
        (
            {"config": "base.yaml", "name": "x"},
            r"unknown key 'tables\[1\]\.name'; valid keys: config, methods, set",
        ),
        ({"config": "nowhere.yaml"}, r"key 'tables\[1\]\.config': config file not found: .*nowhere\.yaml"),
        ({"set": {"name": "x"}}, r"key 'tables\[1\]' must be a config file name or a mapping with 'config'"),
        ({"config": "base.yaml"}, r"two tables share the name 'base'.*set: \{name: \.\.\.\}"),
    ],
)
def test_a_bad_suite_entry_names_the_suite_file_and_the_key(raw_root, tmp_path, entry, message):
    suite = _suite(tmp_path, raw_root, ["base.yaml", entry])
    with pytest.raises(ConfigError, match=message) as err:
        resolve_tables([suite])
    assert str(suite) in str(err.value)


def test_a_suite_study_names_its_tables_and_must_not_clash(raw_root, tmp_path):
    tables = ["base.yaml", {"config": "base.yaml", "set": {"name": "base-v1", "protocol.views.count": 1}}]
    suite = _suite(tmp_path, raw_root, tables, study={"name": "budget"})
    study = resolve_study([suite], resolve_tables([suite]))
    assert (study.name, study.tables, study.dir) == ("budget", ("base", "base-v1"), "results/budget")
    assert resolve_study([tmp_path / "base.yaml"], resolve_tables([tmp_path / "base.yaml"])) is None
    for bad in ({"name": "base"}, {"name": "cache"}, {"name": "a/b"}, {"title": "x"}):
        suite = _suite(tmp_path, raw_root, tables, study=bad)
        with pytest.raises(ConfigError, match=rf"{re.escape(str(suite))}: key 'study"):
            resolve_study([suite], resolve_tables([suite]))
    with pytest.raises(ConfigError, match="optionally 'study', and no other key"):
        resolve_tables([_suite(tmp_path, raw_root, tables, other=1)])


def test_the_shipped_budget_study_plans_its_rows():
    tables = resolve_tables([CONFIGS / "fashion-mnist-budget-study.yaml"])
    by_name = {t.name: t.cfg for t in tables}
    assert [by_name[f"fashion-mnist-budget-v{v}"].protocol.views.count for v in (1, 2, 4)] == [1, 2, 4]
    base = by_name["fashion-mnist-budget"]
    assert base.protocol.views.count == base.protocol.epochs == 8 and base.cache.logits_dtype == "float32"
    assert [by_name[f"fashion-mnist-budget-top{k}"].cache.topk for k in (1, 2, 5)] == [1, 2, 5]
    assert by_name["fashion-mnist-budget-consistent"].protocol.views.mixup == 0.0
    plan = Plan(tables)
    live = [j for j in plan.jobs if plan.tables[j.table].cfg.methods[j.label].teacher_source == "live"]
    assert {j.label for j in live} == {"kd_live", "funmatch_live"} and all(
        not plan.job_stores(j) for j in live
    )
    assert (
        resolve_study([CONFIGS / "fashion-mnist-budget-study.yaml"], tables).name
        == "fashion-mnist-budget-study"
    )


def test_the_cifar100_budget_study_configures_funmatch_and_topk_5_10_50():
    tables = {t.name: t.cfg for t in resolve_tables([CONFIGS / "cifar100-budget-study.yaml"])}
    assert {k for t in tables.values() for k in [t.cache.topk] if k} == {5, 10, 50}
    assert any("funmatch" in t.methods for t in tables.values())
    (fm,) = resolve_tables([CONFIGS / "cifar100-funmatch.yaml"])
    assert fm.cfg.methods["funmatch"].method == "funmatch" and fm.cfg.protocol.views.mixup == 1.0


# --- the study report on synthetic records -------------------------------------------------------------------

N, E = 1000, 4  # training images, epochs


def _store(root: Path, name: str, nbytes: int, views: int, policy: dict) -> Path:
    """A store directory with only what the report reads: its manifest (shard sizes, fields, policy)."""
    d = root / "cache" / name / "logits"
    d.mkdir(parents=True)
    topk = policy.get("topk")
    fields = (
        {"topk_values": ([topk], "float16"), "topk_indices": ([topk], "int16"), "lse": ([], "float32")}
        if topk
        else {"values": ([10], policy["logits_dtype"])}
    )
    manifest = {
        "format_version": FORMAT_VERSION,
        "tap": "logits",
        "views": views,
        "policy": policy,
        "fields": list(fields),
        "field_shapes": {k: s for k, (s, _) in fields.items()},
        "field_dtypes": {k: t for k, (_, t) in fields.items()},
        "num_samples": N,
        "shards": [{"file": "shard-00000.h5", "count": N, "first_position": 0, "bytes": nbytes}],
    }
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def _run(
    root: Path,
    table: str,
    label: str,
    seed: int,
    top1: float,
    *,
    views: int = E,
    method: str = "kd",
    params: dict | None = None,
    store: Path | None = None,
    mixup: float = 1.0,
    losses: list | None = None,
    weights: str = "w",
) -> Path:
    """One synthetic run (record.json + epochs.jsonl) of ``label`` in ``table``; returns the record's path."""
    out = root / table / "runs" / "t" / "s" / label / f"seed{seed}"
    out.mkdir(parents=True)
    protocol = Protocol(epochs=E, views=ViewRecipe(count=views, mixup=mixup))
    losses = losses or [1.0 / (e + 1) for e in range(E)]
    epochs = [
        {
            "epoch": e,
            "view": e % views,
            "lr": 1e-3,
            "train_loss": loss,
            "terms": {},
            "val_top1": top1,
            "test_top1": top1,
            "time_s": 1.0 + seed,
            "samples_per_s": 9.0,
        }
        for e, loss in enumerate(losses)
    ]
    (out / "epochs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in epochs))
    live = store is None and method != "baseline"
    rec = RunRecord(
        status="ok",
        identity=Identity(
            config=table,
            dataset="fashion-mnist",
            teacher="t",
            teacher_model="cnn_m",
            student="s",
            method=label,
            method_name=method,
            params=params or {},
            seed=seed,
        ),
        protocol=to_jsonable(protocol),
        protocol_hash=protocol.hash(),
        views=Views(views, E, E > views),
        final=Final(
            test_top1=top1,
            test_top5=99.0,
            val_top1=top1,
            best_epoch=E - 1,
            best_val_top1=top1,
            test_top1_at_best_val=top1,
            teacher_agreement=90.0,
        ),
        cost=Cost(
            wall_time_s=10.0 + seed,
            train_time_s=9.0,
            student_params=1000,
            extra_params=0,
            teacher_forward=N * E if live else 0,
            student_forward=N * E,
            cache_bytes_read=0 if store is None else 40 * N * E,
        ),
        requirements={"live_teacher": False, "sample_index": False, "full_logits": False},
        provenance={
            "kdbench_version": "0",
            "git_commit": "c",
            "packages": {},
            "python": "3",
            "device": "cpu",
            "torch_threads": 1,
            "config_hash": "h",
            "data_manifest_sha256": "d",
            "model_sha256": weights,
            "store_manifests": {"logits": sha256_file(store / "manifest.json")} if store else {},
        },
        inputs={"data": "data", "teacher_dir": "t", "stores": {"logits": str(store)} if store else {}},
        epochs_file="epochs.jsonl",
    )
    write_record(out / "record.json", rec)
    return out / "record.json"


@pytest.fixture
def study_records(tmp_path) -> list[Path]:
    """kd over V = 1, 2, 4 (= E) with fp32 stores of 1, 2 and 4 kB; kd_live in the V = E table (seed 2's second
    epoch differs from the cached run's); a top-1 store (0.5 kB); funmatch without mixup in its own table; the
    fixed teacher (live, required)."""
    fp32 = {"logits_dtype": "float32", "topk": None, "feature_pool": None, "feature_dtype": "float16"}
    s1, s2, s4 = (_store(tmp_path, f"v{v}", 1000 * v, v, fp32) for v in (1, 2, 4))
    top1 = _store(tmp_path, "top1", 500, E, {**fp32, "topk": 1})
    nomix = _store(tmp_path, "nomix", 4000, E, fp32)
    live = [75.0, 75.5, 76.0]
    paths = []
    for seed in range(3):
        paths += [
            _run(tmp_path, "b-v1", "kd", seed, [70.0, 71.0, 72.0][seed], views=1, store=s1),
            _run(tmp_path, "b-v2", "kd", seed, [74.9, 75.6, 75.9][seed], views=2, store=s2),
            _run(tmp_path, "b", "kd", seed, live[seed], store=s4),
            _run(
                tmp_path, "b", "kd_live", seed, live[seed], losses=[1.0, 0.6, 0.3, 0.2] if seed == 2 else None
            ),
            _run(tmp_path, "b-top1", "kd", seed, 73.0 + seed, store=top1),
            _run(tmp_path, "b-nomix", "funmatch", seed, 74.0, method="funmatch", store=nomix, mixup=0.0),
            _run(
                tmp_path,
                "b",
                "fixed_teacher",
                seed,
                60.0 + seed,
                method="funmatch",
                params={"teacher_view": "clean"},
            ),
        ]
    return paths


def _rows(path: Path) -> dict[tuple[str, str], dict]:
    return {(r["table"], r["method"]): r for r in csv.DictReader(open(path))}


def test_the_study_table_has_bytes_accuracy_gap_and_teacher_compute(study_records, tmp_path):
    study = write_study(study_records, tmp_path / "out", "budget")
    rows = _rows(tmp_path / "out" / "study.csv")
    assert len(rows) == len(study.rows) == 7
    v1 = rows[("b-v1", "kd")]
    # kd at V = 1: 70, 71, 72 -> mean 71, std 1, t-interval 4.303 * 1 / sqrt(3).
    assert (v1["views"], v1["epochs"], v1["store_bytes"], v1["store_policy"]) == ("1", "4", "1000", "fp32")
    assert float(v1["top1_mean"]) == 71.0 and float(v1["top1_std"]) == 1.0 and v1["seeds"] == "3"
    assert math.isclose(float(v1["top1_ci95"]), T975_2 / math.sqrt(3), rel_tol=1e-5)
    assert (v1["payload_bytes_per_view"], v1["store_build_forward"]) == ("40", str(N))
    # Paired against kd_live (75, 75.5, 76): differences -5, -4.5, -4 -> mean -4.5.
    assert v1["live_reference"] == "b/kd_live" and float(v1["gap_vs_live"]) == -4.5
    assert float(v1["gap_ci95_high"]) < 0
    # V = 2: differences -0.1, +0.1, -0.1: the interval contains 0.
    v2 = rows[("b-v2", "kd")]
    assert float(v2["gap_ci95_low"]) < 0 < float(v2["gap_ci95_high"])
    assert float(rows[("b", "kd")]["gap_vs_live"]) == 0.0
    live = rows[("b", "kd_live")]
    assert (live["teacher_source"], live["store_policy"], live["store_bytes"]) == ("live", "", "")
    assert float(live["teacher_forward"]) == N * E and live["live_reference"] == ""
    top1 = rows[("b-top1", "kd")]
    assert (top1["store_policy"], top1["payload_bytes_per_view"], top1["live_reference"]) == (
        "top-1",
        "8",
        "b/kd_live",
    )
    nomix = rows[("b-nomix", "funmatch")]
    assert nomix["protocol_variant"] == "views.mixup=0.0" and nomix["live_reference"] == ""
    assert (
        rows[("b", "kd")]["protocol_variant"] == ""
        and rows[("b", "fixed_teacher")]["teacher_source"] == "live"
    )
    assert math.isclose(float(rows[("b", "kd")]["train_loss_last"]), 0.25)
    (closes,) = gap_closes(study)
    assert closes == (
        "kd (fp32): the gap to the live teacher (kd_live) closes at V = 2 (the paired 95% interval of cached - live"
        " contains 0 from V = 2 on)"
    )
    png = (tmp_path / "out" / "study.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    md = (tmp_path / "out" / "study.md").read_text()
    assert "| b-v1 | kd | cache | fp32 |  | 1 | 4 | 1 kB | 40 | 71.00 ± 1.00 | ± 2.48 | 3 |" in md
    assert "![accuracy vs store bytes](study.png)" in md


def test_the_lossless_check_says_identical_or_names_the_first_difference(study_records, tmp_path):
    study = build_study("budget", study_records)
    checks = {c.seed: c for c in study.checks}
    assert sorted(checks) == [0, 1, 2] and {(c.live, c.cached, c.table) for c in study.checks} == {
        ("kd_live", "kd", "b")
    }
    assert checks[0].identical and checks[1].identical and not checks[2].identical
    assert checks[0].render() == (
        "b: kd_live (live teacher) vs kd (cache, fp32, V = E = 4), seed 0: identical (final"
        " metrics, every epoch's metrics, trained weights)"
    )
    # Seed 2's live run logged losses 1.0, 0.6, 0.3, 0.2; the cached one 1, 1/2, 1/3, 1/4.
    assert checks[2].render().endswith("differs (3 differences; first: epochs[1].train_loss: 0.6 != 0.5)")
    write_study(study_records, tmp_path / "out", "budget")
    md = (tmp_path / "out" / "study.md").read_text()
    assert md.count(": identical (final metrics") == 2 and "seed 2: differs" in md


def test_the_lossless_check_compares_the_trained_weights(tmp_path):
    fp32 = {"logits_dtype": "float32", "topk": None, "feature_pool": None, "feature_dtype": "float16"}
    store = _store(tmp_path, "v4", 4000, E, fp32)
    paths = [
        _run(tmp_path, "b", "kd", 0, 75.0, store=store),
        _run(tmp_path, "b", "kd_live", 0, 75.0, weights="w2"),
    ]
    (check,) = build_study("s", paths).checks
    assert check.differences == ("provenance.model_sha256: the trained weights differ",)


# --- the whole workflow on a tiny study ------------------------------------------------------------------------

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(
    not (FMNIST / "train-labels-idx1-ubyte.gz").exists(), reason="needs dataset-fashion-mnist"
)
def test_a_tiny_study_runs_end_to_end_and_the_live_teacher_reproduces_the_cache(tmp_path):
    """512 images, E = 2, V in {1, 2}, fp32 logits: the study report exists and the live run is identical."""
    base = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    base.update(
        name="tiny-budget",
        students=["cnn_xs"],
        seeds=[0],
        cache={"logits_dtype": "float32"},
        methods={"kd": {}, "kd_live": {"method": "kd", "teacher_source": "live"}},
    )
    base["protocol"].update(epochs=2, views={"count": 2, "mixup": 0.5})
    base["data"].update(shard_size=512)  # one shard: one cache job per store
    write_config(tmp_path / "tiny-budget.yaml", base)
    suite = write_config(
        tmp_path / "study.yaml",
        {
            "study": {"name": "tiny-study"},
            "tables": [
                {
                    "config": "tiny-budget.yaml",
                    "set": {"name": "tiny-budget-v1", "protocol.views.count": 1},
                    "methods": ["kd"],
                },
                "tiny-budget.yaml",
            ],
        },
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(tmp_path),
        "--configfile",
        str(suite),
        "--cores",
        "2",
    ]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = _rows(tmp_path / "results" / "tiny-study" / "study.csv")
    assert set(rows) == {("tiny-budget-v1", "kd"), ("tiny-budget", "kd"), ("tiny-budget", "kd_live")}
    assert rows[("tiny-budget", "kd_live")]["teacher_source"] == "live"
    assert int(rows[("tiny-budget", "kd")]["store_bytes"]) > int(
        rows[("tiny-budget-v1", "kd")]["store_bytes"]
    )
    md = (tmp_path / "results" / "tiny-study" / "study.md").read_text()
    assert "tiny-budget: kd_live (live teacher) vs kd (cache, fp32, V = E = 2), seed 0: identical" in md, md
    cfg = load_config(next((tmp_path / "results" / "tiny-budget").glob("config-*.resolved.yaml")))
    assert cfg.methods["kd_live"].teacher_source == "live"
