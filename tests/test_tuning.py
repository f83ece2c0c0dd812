"""Equal tuning budget (kdbench.tuning): proposals, the tune section, trials on val only, the selection, the
final runs' values; the workflow's trial / select / tuned jobs on tiny generated data."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml
from _helpers_store import tiny_raw, write_fmnist_idx

from kdbench import tuning
from kdbench.config import TUNE_KNOBS, ConfigError, TuneBudget, parse_config, to_raw
from kdbench.data.prepare import prepare
from kdbench.distill import run_distill, run_trial
from kdbench.methods import METHODS
from kdbench.plan import Plan, Table

TUNE = {"trials": 4, "seed": 3, "budget": {"epochs": 1, "seeds": [0]}}


def _cfg(tune=TUNE, **over):
    raw = tiny_raw(Path("/nonexistent"), tune=tune, **over)
    return parse_config(raw, source="tuned.yaml")


def _with_tune(cfg, **fields):
    return dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, **fields))


# --- proposals ---------------------------------------------------------------------------------------------


def test_trial_0_is_the_configured_values_and_the_rest_lie_in_the_space():
    cfg = _cfg()
    trials = tuning.proposals(cfg, "t", "cnn_xs", "kd")
    kd = METHODS.get("kd").Config()
    assert trials[0] == {"lr": 0.01, "weight_decay": 5e-4,
                         **{f"method.{k}": getattr(kd, k) for k in METHODS.get("kd").search_space}}
    space = tuning.space(cfg, "cnn_xs", "kd")
    assert set(space) == set(trials[0])
    for values in trials[1:]:
        assert all(space[k].contains(v) for k, v in values.items()), values
    assert len({json.dumps(t, sort_keys=True) for t in trials}) == len(trials)  # distinct draws


def test_the_same_config_proposes_the_same_trials_and_a_cell_its_own():
    cfg = _cfg()
    again = _cfg()
    tuning._proposals.cache_clear()
    first = tuning.proposals(cfg, "t", "cnn_xs", "kd")
    tuning._proposals.cache_clear()
    assert tuning.proposals(again, "t", "cnn_xs", "kd") == first
    assert tuning.proposals(cfg, "t", "cnn_xs", "baseline")[1]["lr"] != first[1]["lr"]  # seeded per cell
    assert tuning.proposals(_with_tune(cfg, seed=4), "t", "cnn_xs", "kd")[1] != first[1]


def test_proposals_are_golden_on_any_machine():
    """The values of the random sampler for one fixed cell (Optuna 5's RandomSampler, seeded per cell)."""
    cfg = _cfg(tune={"trials": 3, "seed": 0, "knobs": ["lr", "weight_decay"]})
    trials = tuning.proposals(cfg, "t", "cnn_xs", "baseline")
    assert tuning.sampler_seed(cfg, "t", "cnn_xs", "baseline") == GOLDEN_SEED
    assert [[round(v, 12) for v in t.values()] for t in trials] == GOLDEN_TRIALS


GOLDEN_SEED = 3629053983
GOLDEN_TRIALS = [[0.01, 0.0005], [0.004282440234, 0.000955338871], [0.008925738373, 0.000316897746]]


@pytest.mark.parametrize("sampler", ["random", "qmc"])
def test_raising_k_keeps_every_earlier_trial_and_its_rerun_trigger(sampler, tmp_path):
    cfg = _cfg(tune={**TUNE, "sampler": sampler})
    more = _with_tune(cfg, trials=9)
    assert tuning.proposals(more, "t", "cnn_xs", "kd")[:4] == tuning.proposals(cfg, "t", "cnn_xs", "kd")
    plans = [Plan([Table(cfg=c, origin="x")]) for c in (cfg, more)]
    hashes = [[tuning.trial_hash(p, c.name, "t", "cnn_xs", "kd", k) for k in range(4)] for p, c in zip(plans, (cfg, more))]
    assert hashes[0] == hashes[1]
    assert len(tuning.trial_files(plans[1], cfg.name, "t", "cnn_xs", "kd")) == 9


def test_knobs_are_the_tables_choice():
    cfg = _cfg(tune={**TUNE, "knobs": ["method"]})
    assert set(tuning.space(cfg, "cnn_xs", "kd")) == {f"method.{k}" for k in METHODS.get("kd").search_space}
    assert tuning.space(cfg, "cnn_xs", "baseline") == {}
    lr_only = _cfg(tune={**TUNE, "knobs": ["lr"], "lr_range": [0.001, 0.1]})
    space = tuning.space(lr_only, "cnn_xs", "baseline")
    assert list(space) == ["lr"] and (space["lr"].low, space["lr"].high) == (0.001, 0.1)


def test_the_baseline_gets_the_same_k_over_the_shared_knobs():
    cfg = _cfg()
    trials = tuning.proposals(cfg, "t", "cnn_xs", "baseline")
    assert len(trials) == len(tuning.proposals(cfg, "t", "cnn_xs", "kd")) == 4
    assert set(trials[0]) == {"lr", "weight_decay"}


def test_a_student_lr_is_tuned_around_the_students_own_lr():
    cfg = _cfg(protocol={**tiny_raw(Path("/x"))["protocol"], "student_lr": {"cnn_xs": 0.002}})
    trials = tuning.proposals(cfg, "t", "cnn_xs", "baseline")
    assert trials[0]["lr"] == 0.002
    tuned = tuning.with_values(cfg, "cnn_xs", "baseline", {"lr": 0.004, "weight_decay": 1e-4})
    assert tuned.protocol.for_student("cnn_xs").lr == 0.004 and tuned.protocol.lr == cfg.protocol.lr


# --- the tune section --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tune, key", [
    ({"trials": 0}, "tune.trials"),
    ({"sampler": "tpe"}, "tune.sampler"),
    ({"knobs": ["lr", "momentum"]}, "tune.knobs"),
    ({"knobs": ["lr", "lr"]}, "tune.knobs"),
    ({"budget": {"epochs": 0}}, "tune.budget.epochs"),
    ({"budget": {"seeds": []}}, "tune.budget.seeds"),
    ({"budget": {"sedes": [0]}}, "tune.budget.sedes"),
    ({"budget": {"train_limit": 0}}, "tune.budget.train_limit"),
    ({"metric": "test_top1"}, "tune.metric"),
    ({"metric": "val_map_cosine"}, "tune.metric"),  # no retrieval_tap
    ({"rule": "best_epoch"}, "tune.rule"),
    ({"lr_range": [0.1, 0.01]}, "tune.lr_range"),
    ({"trails": 8}, "tune.trails"),
    ("eight", "tune"),
])
def test_a_malformed_tune_section_is_one_line_naming_the_file_and_key(tune, key):
    with pytest.raises(ConfigError) as e:
        _cfg(tune=tune)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("tuned.yaml: ") and f"'{key}" in msg, msg


def test_the_tune_section_round_trips_and_is_absent_from_untuned_configs():
    cfg = _cfg()
    assert parse_config(to_raw(cfg), source="r").tune == cfg.tune
    assert "tune" not in to_raw(_cfg(tune=None))
    assert set(TUNE_KNOBS) == {"lr", "weight_decay", "method"}


# --- selection ---------------------------------------------------------------------------------------------


def _trials(cfg, scores, label="kd", seeds=(0,)):
    props = tuning.proposals(cfg, "t", "cnn_xs", label)
    return [{"teacher": "t", "student": "cnn_xs", "label": label, "trial": k, "seed": s, "values": props[k],
             "metric": cfg.tune.metric, "score": scores[k][i] if isinstance(scores[k], list) else scores[k],
             "wall_time_s": 10.0} for k in range(len(scores)) for i, s in enumerate(seeds)]


def test_a_tie_selects_the_configured_values():
    cfg = _cfg()
    sel = tuning.select(cfg, "t", "cnn_xs", "kd", _trials(cfg, [70.0, 70.0, 69.0, 70.0]))
    assert sel["selected_trial"] == 0 and sel["values"] == sel["default"]


def test_the_best_mean_over_the_budgets_seeds_wins():
    cfg = _cfg(tune={**TUNE, "budget": {"epochs": 1, "seeds": [0, 1]}})
    scores = [[70, 70], [80, 60], [72, 71], [69, 90]]  # means 70, 70, 71.5, 79.5
    sel = tuning.select(cfg, "t", "cnn_xs", "kd", _trials(cfg, scores, seeds=(0, 1)))
    assert sel["selected_trial"] == 3 and sel["selected_score"] == 79.5 and sel["default_score"] == 70
    assert [r["mean"] for r in sel["rows"]] == [70, 70, 71.5, 79.5]
    assert sel["tuning_time_s"] == 80.0
    assert sel["values"] == tuning.proposals(cfg, "t", "cnn_xs", "kd")[3]


def test_a_stale_or_missing_trial_is_refused():
    cfg = _cfg()
    trials = _trials(cfg, [70, 71, 72, 73])
    with pytest.raises(ConfigError, match="no record for seed 0"):
        tuning.select(cfg, "t", "cnn_xs", "kd", trials[:3])
    stale = [dict(t) for t in trials]
    stale[2]["values"] = {**stale[2]["values"], "lr": 0.5}
    with pytest.raises(ConfigError, match="delete its trial directory"):
        tuning.select(cfg, "t", "cnn_xs", "kd", stale)


def test_the_study_journal_holds_every_trial(tmp_path):
    import optuna

    cfg = _cfg()
    sel = tuning.select(cfg, "t", "cnn_xs", "kd", _trials(cfg, [70, 75, 72, 73]))
    tuning.write_study(tmp_path / "study.journal", cfg, sel)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.journal")))
    study = optuna.load_study(study_name="store-test/t/cnn_xs/kd", storage=storage)
    assert [t.value for t in study.trials] == [70, 75, 72, 73]
    assert study.best_trial.params == sel["values"] and study.user_attrs["selected_trial"] == 1


def test_the_final_runs_use_exactly_the_selected_values(tmp_path):
    cfg = _cfg()
    sel = tuning.select(cfg, "t", "cnn_xs", "kd", _trials(cfg, [70, 75, 72, 73]))
    (tmp_path / "selected.json").write_text(json.dumps(sel))
    tuned, summary = tuning.apply_selection(cfg, "t", "cnn_xs", "kd", tmp_path / "selected.json")
    chosen = sel["values"]
    assert tuned.protocol.lr == chosen["lr"] and tuned.protocol.weight_decay == chosen["weight_decay"]
    built = METHODS.get("kd").make_config(tuned.methods["kd"].params)
    for k, v in chosen.items():
        if k.startswith("method."):
            assert getattr(built, k[len("method."):]) == v
    assert tuned.protocol.epochs == cfg.protocol.epochs  # the budget's epochs are the trials' only
    assert summary["selected_trial"] == 1 and summary["protocol_hash"] == cfg.protocol.hash()
    with pytest.raises(ConfigError, match="not of t/cnn_xs/baseline"):
        tuning.apply_selection(cfg, "t", "cnn_xs", "baseline", tmp_path / "selected.json")


# --- a trial job on tiny data: val only --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuning")
    raw = tiny_raw(write_fmnist_idx(root / "raw"), protocol={"epochs": 2, "batch_size": 32, "lr": 0.01,
                                                              "views": {"count": 2}}, tune=TUNE)
    cfg = parse_config(raw, source=str(root / "tuned.yaml"))
    data = root / "data"
    prepare(cfg.data, data)
    return cfg, data, root


def test_a_trial_never_opens_the_test_split_and_scores_val(tiny, monkeypatch, tmp_path):
    from kdbench.cache.inputs import JobInputs

    cfg, data, _ = tiny
    split = JobInputs.split

    def no_test(self, name, *a, **k):
        assert name != "test", "a trial read the test split"
        return split(self, name, *a, **k)

    monkeypatch.setattr(JobInputs, "split", no_test)
    record = run_trial(cfg, "t", "cnn_xs", "baseline", 2, 0, data, None, {}, tmp_path / "trial")
    assert record["values"] == tuning.proposals(cfg, "t", "cnn_xs", "baseline")[2]
    assert record["epochs"] == 1 and len(record["history"]) == 1
    assert record["score"] == record["history"][-1]["val_top1"]
    assert not any(k.startswith("test") for row in record["history"] for k in row)
    assert json.loads((tmp_path / "trial" / "trial.json").read_text())["score"] == record["score"]
    assert record["history"][0]["lr"] <= record["values"]["lr"]  # trained with the trial's lr
    assert record["provenance"]["plugins"] == []  # built-in method and models (a plugin's: tests/test_plugins.py)


def test_a_trials_training_subset_is_seeded_by_the_table_alone_and_sorted():
    cfg = _with_tune(_cfg(), budget=TuneBudget(epochs=1, seeds=(0,), train_limit=40))
    rows = tuning.trial_rows(cfg.tune, 100)
    assert len(rows) == len(set(rows.tolist())) == 40 and list(rows) == sorted(rows) and 0 <= rows.min() <= rows.max() < 100
    assert list(tuning.trial_rows(cfg.tune, 100)) == list(rows)  # the same images for every trial of the table
    other = tuning.trial_rows(dataclasses.replace(cfg.tune, seed=cfg.tune.seed + 1), 100)
    assert list(other) != list(rows)  # drawn with tune.seed
    assert list(rows[:5]) != list(range(5))  # a random subset, not the first images (an image folder is sorted by class)
    assert tuning.trial_rows(cfg.tune, 40) is None and tuning.trial_rows(cfg.tune, 30) is None
    assert tuning.trial_rows(_cfg().tune, 100) is None


def test_a_trial_with_a_training_subset_trains_on_exactly_those_rows(tiny, monkeypatch, tmp_path):
    from kdbench.train import loop

    cfg, data, _ = tiny
    limit = 40
    cfg = _with_tune(cfg, budget=TuneBudget(epochs=1, seeds=(0,), train_limit=limit))
    seen = []
    epoch = loop._SplitBatches.epoch

    def spy(self, *a, **k):
        for batch in epoch(self, *a, **k):
            seen.extend(batch.rows.tolist())
            yield batch

    monkeypatch.setattr(loop._SplitBatches, "epoch", spy)
    record = run_trial(cfg, "t", "cnn_xs", "baseline", 1, 0, data, None, {}, tmp_path / "trial")
    assert sorted(seen) == list(tuning.trial_rows(cfg.tune, _n_train(data)))  # each subset row once, no other
    assert record["train_images"] == limit < _n_train(data)


def _n_train(data: Path) -> int:
    return json.loads((data / "manifest.json").read_text())["splits"]["train"]["count"]


def test_the_test_split_guard_catches_a_distill_job(tiny, monkeypatch, tmp_path):
    """The guard of the test above is real: a distill job (which evaluates test) trips it."""
    from kdbench.cache.inputs import JobInputs

    cfg, data, _ = tiny
    split = JobInputs.split
    monkeypatch.setattr(JobInputs, "split", lambda self, name, *a, **k: (
        (_ for _ in ()).throw(AssertionError("test read")) if name == "test" else split(self, name, *a, **k)))
    with pytest.raises(AssertionError, match="test read"):
        run_distill(cfg, "t", "cnn_xs", "baseline", 0, data, None, {}, tmp_path / "run")


def test_a_tuned_run_records_its_selection_under_the_tables_protocol_hash(tiny, tmp_path):
    cfg, data, _ = tiny
    sel = tuning.select(cfg, "t", "cnn_xs", "baseline", _trials(cfg, [60, 61, 65, 62], label="baseline"))
    (tmp_path / "selected.json").write_text(json.dumps(sel))
    tuned, summary = tuning.apply_selection(cfg, "t", "cnn_xs", "baseline", tmp_path / "selected.json")
    record = run_distill(tuned, "t", "cnn_xs", "baseline", 0, data, None, {}, tmp_path / "run", tuning=summary)
    assert record.protocol_hash == cfg.protocol.hash() != tuned.protocol.hash()
    assert record.protocol.lr == sel["values"]["lr"] and record.tuning["selected_trial"] == 2
    assert record.tuning["trial_means"] == [60, 61, 65, 62]


# --- the workflow: trials, selection, final runs, raising K ------------------------------------------------


def _tuned_workflow_config(root: Path) -> Path:
    raw = tiny_raw(write_fmnist_idx(root / "raw", n_train=200, n_test=48),
                   name="tuned-tiny", protocol={"epochs": 2, "batch_size": 32, "lr": 0.01, "views": {"count": 2}},
                   teachers={"t": {"model": "cnn_s", "train": {"epochs": 1}}}, seeds=[0, 1],
                   tune={"trials": 3, "seed": 0, "budget": {"epochs": 1, "seeds": [0]}})
    path = root / "tuned.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.slow
def test_the_workflow_tunes_on_val_then_runs_the_winner_and_raising_k_runs_only_new_trials(tmp_path):
    from test_workflow import job_counts, snakemake

    config = _tuned_workflow_config(tmp_path)
    out = snakemake(tmp_path, config, "--cores", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    table = tmp_path / "results" / "tuned-tiny"
    for label in ("baseline", "kd"):
        cell = table / "tune" / "t" / "cnn_xs" / label
        sel = json.loads((cell / "selected.json").read_text())
        trials = [json.loads((cell / f"trial{k}" / "seed0" / "trial.json").read_text()) for k in range(3)]
        assert [t["score"] for t in trials] == [r["mean"] for r in sel["rows"]]
        assert all(not any(key.startswith("test") for key in t) for t in trials)
        assert (cell / "study.journal").stat().st_size > 0
        for seed in (0, 1):
            tuned = json.loads((table / "tuned" / "t" / "cnn_xs" / label / f"seed{seed}" / "record.json").read_text())
            untuned = json.loads((table / "runs" / "t" / "cnn_xs" / label / f"seed{seed}" / "record.json").read_text())
            assert tuned["tuning"]["values"] == sel["values"] and tuned["tuning"]["trials"] == 3
            assert tuned["protocol"]["lr"] == sel["values"]["lr"]
            assert tuned["protocol"]["weight_decay"] == sel["values"]["weight_decay"]
            assert tuned["protocol_hash"] == untuned["protocol_hash"] and untuned.get("tuning") is None
            assert untuned["protocol"]["lr"] == 0.01
            for k, v in sel["values"].items():
                if k.startswith("method."):
                    assert tuned["identity"]["params"][k[len("method."):]] == v
    assert (table / "leaderboard" / "leaderboard.md").exists()

    more = snakemake(tmp_path, config, "-n", "--config", "tune={trials: 5}")
    assert more.returncode == 0, more.stderr[-3000:]
    counts = job_counts(more.stdout)
    assert counts["trial"] == 4  # trials 3 and 4 of two cells; trials 0-2 are done and unchanged
    assert "distill" not in counts and "train_teacher" not in counts
    printed = more.stdout + more.stderr  # snakemake prints the job list on stderr, the stats on stdout
    planned = re.findall(r"output: \S*/trial(\d)/seed0/trial\.json", printed)
    assert sorted(planned) == ["3", "3", "4", "4"], printed[-3000:]


def test_plan_and_estimate_count_the_trials(tiny):
    from kdbench.estimate import estimate

    cfg, _, _ = tiny
    plan = Plan([Table(cfg=cfg, origin="x")])
    assert "2 cells x 4 trials x 1 seed(s) = 8 trial jobs (1 epochs each" in tuning.render_tuning(plan, cfg.name)
    stages = {s.name: s for s in estimate(plan)[cfg.name]}
    assert stages["trials"].jobs == 8 and stages["tuned"].jobs == stages["distill"].jobs == 2
    # a trial is 1 of the protocol's 2 epochs and evaluates val only: less than half a distill job each
    assert 0 < stages["trials"].flops / 8 < stages["distill"].flops / 2 / 2
    subset = _with_tune(cfg, budget=dataclasses.replace(cfg.tune.budget, train_limit=10))
    plan = Plan([Table(cfg=subset, origin="x")])
    assert "(1 epochs each on 10 training images" in tuning.render_tuning(plan, cfg.name)
    assert 0 < {s.name: s for s in estimate(plan)[cfg.name]}["trials"].flops < stages["trials"].flops


def test_a_trials_step_schedule_is_the_protocols_compressed():
    cfg = _cfg(protocol={**tiny_raw(Path("/x"))["protocol"], "epochs": 240, "schedule": "step",
                         "milestones": [150, 180, 210]}, tune={**TUNE, "budget": {"epochs": 60}})
    tcfg, _ = tuning.trial_config(cfg, "t", "cnn_xs", "kd", 1)
    assert tcfg.protocol.epochs == 60 and tcfg.protocol.milestones == (38, 45, 52)
    with pytest.raises(ConfigError, match="trial 4 of t/cnn_xs/kd does not exist"):
        tuning.trial_config(cfg, "t", "cnn_xs", "kd", 4)


def test_a_training_subset_on_streamed_data_is_refused_before_the_dag(tiny):
    from kdbench import preflight

    cfg, _, _ = tiny
    streamed = dataclasses.replace(_with_tune(cfg, budget=TuneBudget(epochs=1, seeds=(0,), train_limit=10)),
                                   data=dataclasses.replace(cfg.data, stream=True))
    with pytest.raises(ConfigError) as e:
        preflight.check(Plan([Table(cfg=streamed, origin="tuned.yaml")]))
    assert str(e.value).startswith("tuned.yaml: key 'tune.budget.train_limit'") and "\n" not in str(e.value)
    preflight.check(Plan([Table(cfg=dataclasses.replace(streamed, data=cfg.data), origin="tuned.yaml")]))
