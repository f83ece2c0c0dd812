"""Equal tuning budget: every method of a table, the student alone included, gets the same K trials on val.

A table with a ``tune:`` section (:class:`~kdbench.config.TuneConfig`) adds, per (teacher, student, method
label) cell of its grid:

1. **Proposals**, known before anything runs (:func:`proposals`): Optuna's seeded, non-adaptive
   ``RandomSampler`` (or ``QMCSampler``) asked K times through ask-and-tell, the configured (paper) values
   enqueued as trial 0. The sampler's seed is derived from ``tune.seed`` and the cell, so the same config
   proposes the same trials on any machine; both samplers draw a sequence, so raising K from 8 to 16 keeps
   trials 0-7 as they were and adds 8 (their jobs are not rerun).
2. **Trials** (rule ``trial``, :func:`kdbench.distill.run_trial`): the cell's job with the trial's values and
   the budget's epochs and seeds, trained on the training split (train minus val; with ``budget.train_limit``
   a seeded subset of it, the same for every trial of the table: :func:`trial_rows`) and scored on val only:
   a trial never loads the test split.
3. **Selection** (rule ``tune_select``, :func:`select`): the highest mean val score over the budget's seeds;
   a tie goes to the lowest trial, so the configured values win ties and tuning never looks worse than the
   default on val. It writes ``selected.json`` and the Optuna study (``study.journal``, a
   ``JournalStorage`` file: only this step writes it, so no lock is ever contended).
4. **Final runs** (rule ``distill_tuned``): every seed of the table with the frozen winner, on test, under
   ``results/<table>/tuned/``. The untuned runs (the configured values) stay where an untuned table has them,
   so adding ``tune:`` to a table reruns none of them, and the leaderboard shows both.

What a knob is: ``lr`` and ``weight_decay`` are the protocol's (the student's learning rate: ``student_lr``
where the protocol lists the student), tuned for every method alike; ``method`` stands for every parameter of
the method's own ``search_space`` (:mod:`kdbench.space`). A method's tunable parameters never change what it
declares (taps, requirements, assistant), so a trial reads the same stores and the same assistant as the
untuned runs of its cell: a multi-step method (TAKD, AMD) tunes its student stage; its assistant is built once,
with the configured values.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from kdbench._util import read_json, stable_hash, write_json_atomic
from kdbench.config import Config, ConfigError, TuneConfig
from kdbench.methods import METHODS
from kdbench.plan import Layout, Plan
from kdbench.space import Choice, Distribution, IntUniform, LogUniform, Uniform, around, check_distribution

_logger = logging.getLogger(__name__)

METHOD_PREFIX = "method."
"""Trial parameters of the method's own ``search_space`` are named ``method.<param>``; the protocol's shared
knobs are named as the protocol key (``lr``, ``weight_decay``)."""

STUDY_FILE = "study.journal"
SELECTED_FILE = "selected.json"
TRIAL_FILE = "trial.json"


# --- the knobs of a cell -------------------------------------------------------------------------------------


def _tune(cfg: Config) -> TuneConfig:
    if cfg.tune is None:
        raise ConfigError(f"{cfg.source}: the table has no 'tune' section; add one to tune its methods")
    return cfg.tune


def space(cfg: Config, student: str, label: str) -> dict[str, Distribution]:
    """The distributions of a cell's tuned knobs, sorted by name (the order the sampler draws them in)."""
    tune = _tune(cfg)
    protocol = cfg.protocol.for_student(student)
    out: dict[str, Distribution] = {}
    if "lr" in tune.knobs:
        out["lr"] = LogUniform(*tune.lr_range) if tune.lr_range else around(protocol.lr, 3.0)
    if "weight_decay" in tune.knobs:
        r = tune.weight_decay_range
        out["weight_decay"] = LogUniform(*r) if r else around(protocol.weight_decay, 10.0)
    if "method" in tune.knobs:
        cls = METHODS.get(cfg.methods[label].method)
        for name, dist in cls.search_space.items():
            out[METHOD_PREFIX + name] = dist
    for name, dist in out.items():
        check_distribution(name, dist)
    return dict(sorted(out.items()))


def defaults(cfg: Config, student: str, label: str) -> dict[str, Any]:
    """Trial 0: the cell's configured values of its tuned knobs (the paper's, unless the table set others)."""
    entry = cfg.methods[label]
    built = METHODS.get(entry.method).make_config(entry.params)
    protocol = cfg.protocol.for_student(student)
    values = {}
    for name in space(cfg, student, label):
        if name.startswith(METHOD_PREFIX):
            values[name] = getattr(built, name[len(METHOD_PREFIX):])
        else:
            values[name] = getattr(protocol, name)
    return values


def sampler_seed(cfg: Config, teacher: str, student: str, label: str) -> int:
    """The seed of a cell's sampler: ``tune.seed`` and the cell (not the table's name: renaming keeps trials)."""
    return int(stable_hash([_tune(cfg).seed, cfg.teachers[teacher].model, student, label], length=8), 16)


def proposals(cfg: Config, teacher: str, student: str, label: str) -> list[dict[str, Any]]:
    """The K trials of a cell: trial 0 the configured values, then the sampler's draws (see the module doc)."""
    tune = _tune(cfg)
    dists = space(cfg, student, label)
    key = json.dumps([tune.sampler, sampler_seed(cfg, teacher, student, label), tune.trials,
                      {k: [type(d).__name__, dataclasses.asdict(d)] for k, d in dists.items()},
                      defaults(cfg, student, label)], sort_keys=True, default=str)
    return [dict(p) for p in _proposals(key)]


@functools.lru_cache(maxsize=None)
def _proposals(key: str) -> tuple[tuple[tuple[str, Any], ...], ...]:
    sampler_name, seed, trials, raw_dists, default = json.loads(key)
    dists = {k: _distribution(kind, fields) for k, (kind, fields) in raw_dists.items()}
    optuna = _optuna()
    if sampler_name == "qmc":
        sampler = optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed,
                                             warn_independent_sampling=False, warn_asynchronous_seeding=False)
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.enqueue_trial(default)
    out = []
    ods = {k: _to_optuna(d) for k, d in dists.items()}
    for _ in range(trials):
        trial = study.ask(fixed_distributions=ods)
        out.append(tuple((k, _plain(trial.params[k])) for k in dists))
        study.tell(trial, 0.0)  # complete (QMC's search space is fixed from the first complete trial)
    return tuple(out)


def _distribution(kind: str, fields: Mapping[str, Any]) -> Distribution:
    cls = {"Uniform": Uniform, "LogUniform": LogUniform, "IntUniform": IntUniform, "Choice": Choice}[kind]
    if cls is Choice:
        return Choice(tuple(fields["values"]))
    return cls(**fields)


def _optuna():
    import optuna  # imported on use: the workflow imports this module to plan, and Optuna is slow to import

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _to_optuna(d: Distribution):
    dist = _optuna().distributions
    if isinstance(d, LogUniform):
        return dist.FloatDistribution(d.low, d.high, log=True)
    if isinstance(d, Uniform):
        return dist.FloatDistribution(d.low, d.high)
    if isinstance(d, IntUniform):
        return dist.IntDistribution(d.low, d.high)
    return dist.CategoricalDistribution(list(d.values))


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


# --- configs a trial and a tuned run train under -------------------------------------------------------------


def with_values(cfg: Config, student: str, label: str, values: Mapping[str, Any], epochs: int | None = None) -> Config:
    """``cfg`` with a cell's knobs set to ``values`` (and the protocol's epochs to ``epochs``, a trial's budget:
    a step schedule's milestones are scaled with the epochs, so a 60-epoch trial of a 240-epoch protocol decays
    at 38, 45 and 52 as the protocol does at 150, 180 and 210; a cosine schedule spans the trial's epochs).

    The learning rate is the student's: where ``protocol.student_lr`` lists the student, that entry is set.
    """
    entry = cfg.methods[label]
    method = {k[len(METHOD_PREFIX):]: v for k, v in values.items() if k.startswith(METHOD_PREFIX)}
    protocol = cfg.protocol
    shared = {k: v for k, v in values.items() if not k.startswith(METHOD_PREFIX)}
    if "lr" in shared and student in protocol.student_lr:
        protocol = dataclasses.replace(protocol, student_lr={**protocol.student_lr, student: shared.pop("lr")})
    if epochs and epochs != protocol.epochs:  # a trial's budget: the schedule compressed to its epochs
        scale = epochs / protocol.epochs
        shared.update(epochs=epochs, milestones=tuple(max(1, round(m * scale)) for m in protocol.milestones),
                      warmup_epochs=min(protocol.warmup_epochs, epochs - 1))
    protocol = dataclasses.replace(protocol, **shared)
    entry = dataclasses.replace(entry, params={**entry.params, **method})
    METHODS.get(entry.method).make_config(entry.params)  # a value its Config refuses fails here, named
    return dataclasses.replace(cfg, protocol=protocol, methods={**cfg.methods, label: entry})


def trial_config(cfg: Config, teacher: str, student: str, label: str, trial: int) -> tuple[Config, dict[str, Any]]:
    """``(config, values)`` of trial ``trial`` of a cell (its values, the budget's epochs).

    Raises:
        ConfigError: ``trial`` is not one of the table's ``tune.trials``.
    """
    values = proposals(cfg, teacher, student, label)
    if not 0 <= trial < len(values):
        raise ConfigError(f"{cfg.source}: trial {trial} of {teacher}/{student}/{label} does not exist: key"
                          f" 'tune.trials' is {len(values)} (trials 0 to {len(values) - 1})")
    return with_values(cfg, student, label, values[trial], _tune(cfg).budget.epochs), values[trial]


def trial_rows(tune: TuneConfig, n_train: int) -> np.ndarray | None:
    """The training rows a trial trains on: ``budget.train_limit`` of the ``n_train`` rows of the training split,
    drawn with ``tune.seed`` alone (so every trial, method and cell of a table trains on the same images), sorted;
    ``None``: all of them (no limit, or a limit of at least ``n_train``)."""
    limit = tune.budget.train_limit
    if limit is None or limit >= n_train:
        return None
    return np.sort(np.random.default_rng([tune.seed, 0x7E57]).permutation(n_train)[:limit])


# --- the workflow's jobs -------------------------------------------------------------------------------------


def cells(plan: Plan, table: str) -> list[tuple[str, str, str]]:
    """``(teacher, student, label)`` of every planned cell of a tuned table (none for an untuned one)."""
    if plan.tables[table].cfg.tune is None:
        return []
    return list(dict.fromkeys((j.teacher, j.student, j.label) for j in plan.jobs if j.table == table))


def tune_dir(table: str, teacher: str, student: str, label: str) -> str:
    return Layout.TUNE.format(table=table, teacher=teacher, student=student, label=label)


def trial_files(plan: Plan, table: str, teacher: str, student: str, label: str) -> list[str]:
    """Every trial file of a cell: K trials x the budget's seeds."""
    tune = _tune(plan.tables[table].cfg)
    return [Layout.TRIAL.format(table=table, teacher=teacher, student=student, label=label, trial=k, seed=s)
            + f"/{TRIAL_FILE}" for k in range(tune.trials) for s in tune.budget.seeds]


def selected_file(table: str, teacher: str, student: str, label: str) -> str:
    return f"{tune_dir(table, teacher, student, label)}/{SELECTED_FILE}"


def tuned_run_dir(table: str, teacher: str, student: str, label: str, seed: int) -> str:
    return Layout.TUNED_RUN.format(table=table, teacher=teacher, student=student, label=label, seed=seed)


def tuned_records(plan: Plan, table: str) -> list[str]:
    """The record of every final tuned run of a table: one per planned job (every seed of every cell, or of the
    table's selection)."""
    if plan.tables[table].cfg.tune is None:
        return []
    return [f"{tuned_run_dir(table, j.teacher, j.student, j.label, j.seed)}/record.json"
            for j in plan.jobs if j.table == table]


def trial_hash(plan: Plan, table: str, teacher: str, student: str, label: str, trial: int) -> str:
    """Rerun trigger of a trial: its cell's job (protocol, cache, data, method, teacher), its values, budget and
    metric. Trial k's values do not change when K grows, so neither does its hash."""
    cfg = plan.tables[table].cfg
    job = plan.job(table, teacher, student, label, cfg.seeds[0])
    values = proposals(cfg, teacher, student, label)[trial]
    return stable_hash([plan.job_hash(job), values, cfg.tune.budget, cfg.tune.metric], length=8)


def selection_hash(plan: Plan, table: str, teacher: str, student: str, label: str) -> str:
    """Rerun trigger of a selection: the tune section and the cell's job (the trials are its inputs)."""
    cfg = plan.tables[table].cfg
    job = plan.job(table, teacher, student, label, cfg.seeds[0])
    return stable_hash([plan.job_hash(job), cfg.tune], length=8)


# --- selection -----------------------------------------------------------------------------------------------


def read_trials(paths: Sequence[str | Path]) -> list[dict]:
    """The trial files of one cell (:func:`kdbench.distill.run_trial` writes them)."""
    return [read_json(p, "trial record") for p in paths]


def select(cfg: Config, teacher: str, student: str, label: str, trials: Sequence[Mapping[str, Any]]) -> dict:
    """The frozen winner of a cell from its trial records (rule ``best_mean``; ties go to the lowest trial).

    Args:
        cfg: The table's resolved config.
        teacher, student, label: The cell.
        trials: Its trial records, every trial x every budget seed.

    Returns:
        The content of ``selected.json``: the winner's values, every trial's scores, the tuning cost.

    Raises:
        ConfigError: a trial is missing, belongs to another cell, or ran with other values than the config
            proposes now (a stale trial).
    """
    tune = _tune(cfg)
    expected = proposals(cfg, teacher, student, label)
    scores: dict[int, dict[int, float]] = {k: {} for k in range(tune.trials)}
    seconds = 0.0
    for t in trials:
        k, seed = int(t["trial"]), int(t["seed"])
        where = f"trial {k} seed {seed} of {teacher}/{student}/{label}"
        if (t["teacher"], t["student"], t["label"]) != (teacher, student, label) or k not in scores:
            raise ConfigError(f"{cfg.source}: {where} is not a trial of this cell (tune.trials {tune.trials})")
        if t["values"] != expected[k] or t["metric"] != tune.metric:
            raise ConfigError(f"{cfg.source}: {where} ran with {t['values']} scored on {t['metric']}, but the config"
                              f" proposes {expected[k]} scored on {tune.metric}. Fix: delete its trial directory"
                              " and rerun the workflow")
        scores[k][seed] = float(t["score"])
        seconds += float(t["wall_time_s"])
    rows = []
    for k in range(tune.trials):
        missing = [s for s in tune.budget.seeds if s not in scores[k]]
        if missing:
            raise ConfigError(f"{cfg.source}: trial {k} of {teacher}/{student}/{label} has no record for seed"
                              f" {missing[0]}; run its trial job first")
        values = [scores[k][s] for s in tune.budget.seeds]
        rows.append({"trial": k, "values": expected[k], "scores": values, "mean": sum(values) / len(values)})
    best = max(rows, key=lambda r: (r["mean"], -r["trial"]))  # ties: the lowest trial (0, the configured values)
    return {
        "table": cfg.name, "teacher": teacher, "student": student, "label": label,
        "method": cfg.methods[label].method, "metric": tune.metric, "rule": tune.rule, "sampler": tune.sampler,
        "sampler_seed": sampler_seed(cfg, teacher, student, label), "trials": tune.trials,
        "budget": dataclasses.asdict(tune.budget),
        "space": {k: {"distribution": type(d).__name__, **dataclasses.asdict(d)}
                  for k, d in space(cfg, student, label).items()},
        "default": expected[0], "default_score": rows[0]["mean"],
        "selected_trial": best["trial"], "values": best["values"], "selected_score": best["mean"],
        "rows": rows, "tuning_time_s": seconds,
    }


def write_study(path: str | Path, cfg: Config, selection: Mapping[str, Any]) -> None:
    """The cell's Optuna study, every trial with its values and mean score, in a fresh ``JournalStorage`` file
    (written whole by the select step, the only writer, then renamed into place)."""
    optuna = _optuna()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp)))
    name = f"{selection['table']}/{selection['teacher']}/{selection['student']}/{selection['label']}"
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    dists = {k: _to_optuna(_distribution(d["distribution"], {f: v for f, v in d.items() if f != "distribution"}))
             for k, d in selection["space"].items()}
    for row in selection["rows"]:
        study.add_trial(optuna.trial.create_trial(params=row["values"], distributions=dists, value=row["mean"],
                                                  user_attrs={"trial": row["trial"], "scores": row["scores"]}))
    study.set_user_attr("metric", selection["metric"])
    study.set_user_attr("selected_trial", selection["selected_trial"])
    del storage
    os.replace(tmp, path)


def select_cell(cfg: Config, teacher: str, student: str, label: str, trial_paths: Sequence[str | Path],
                out_dir: str | Path) -> dict:
    """``kdbench tune-select``: reads a cell's trials, writes ``study.journal`` and then ``selected.json``."""
    selection = select(cfg, teacher, student, label, read_trials(trial_paths))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_study(out_dir / STUDY_FILE, cfg, selection)
    write_json_atomic(out_dir / SELECTED_FILE, selection)
    _logger.info("%s/%s/%s: trial %d of %d selected (%s %.2f; the configured values %.2f): %s", teacher, student,
                 label, selection["selected_trial"], selection["trials"], selection["metric"],
                 selection["selected_score"], selection["default_score"], selection["values"])
    return selection


def read_selection(path: str | Path) -> dict:
    return read_json(path, "tuning selection")


def tuning_summary(selection: Mapping[str, Any]) -> dict:
    """What a final tuned run records of its selection (the record's ``tuning``; the leaderboard reads it)."""
    keys = ("metric", "rule", "sampler", "trials", "budget", "default", "default_score", "selected_trial", "values",
            "selected_score", "tuning_time_s")
    return {**{k: selection[k] for k in keys}, "trial_means": [r["mean"] for r in selection["rows"]]}


def apply_selection(cfg: Config, teacher: str, student: str, label: str, path: str | Path) -> tuple[Config, dict]:
    """``(config with the cell's selected values, the record's tuning summary)`` for a final tuned run.

    Raises:
        ConfigError: the selection belongs to another cell or to another tune section (stale).
    """
    selection = read_selection(path)
    if (selection["teacher"], selection["student"], selection["label"]) != (teacher, student, label):
        raise ConfigError(f"{path}: the selection of {selection['teacher']}/{selection['student']}/"
                          f"{selection['label']}, not of {teacher}/{student}/{label}; pass the cell's own selected.json")
    if selection["default"] != defaults(cfg, student, label) or selection["trials"] != _tune(cfg).trials:
        raise ConfigError(f"{path}: selected under another tune section or other configured values than"
                          f" {cfg.source}; rerun the workflow (its tune_select job rewrites it)")
    summary = {**tuning_summary(selection), "protocol_hash": cfg.protocol.hash()}
    return with_values(cfg, student, label, selection["values"]), summary


def _images_text(tune: TuneConfig) -> str:
    limit = tune.budget.train_limit
    return "" if limit is None else f" on {limit} training images"


def render_tuning(plan: Plan, table: str) -> str:
    """``kdbench plan``'s lines of a tuned table: the budget and its jobs."""
    tune = _tune(plan.tables[table].cfg)
    n = len(cells(plan, table))
    seeds = len(tune.budget.seeds)
    epochs = tune.budget.epochs or plan.tables[table].cfg.protocol.epochs
    return (f"  tuning: {n} cells x {tune.trials} trials x {seeds} seed(s) = {n * tune.trials * seeds} trial jobs"
            f" ({epochs} epochs each{_images_text(tune)}, {tune.sampler} sampler, seed {tune.seed}, knobs {', '.join(tune.knobs)},"
            f" scored on {tune.metric}) -> {Layout.TABLE.format(table=table)}/tune/; {n} selections;"
            f" {len(tuned_records(plan, table))} tuned runs -> {Layout.TABLE.format(table=table)}/tuned/")
