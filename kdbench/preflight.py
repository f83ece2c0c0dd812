"""Checks a whole plan before the workflow builds its DAG: a config that cannot be planned fails every command.

Snakemake calls the workflow's input functions and params only for the jobs it has to look at, and a job whose
outputs exist may never be looked at: an error raised there (a data root that does not exist, a ``val_size``
larger than the training set) would be swallowed by an old output (``Nothing to be done``, exit 0), or shown as
an ``InputFunctionException`` with a traceback. So the workflow (``workflow/rules/common.smk``) and
``kdbench plan`` call :func:`check` right after resolving the plan: it computes what every input function and
param computes, for every data directory, teacher, assistant, store, cell and tuned cell of the plan (each once:
the hashes and inputs of a cell's seeds differ only by the seed), and every error names the config file and the
dotted key. The DAG then finds each result in the plan's caches (model metadata, AMD's grids, tuning proposals).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from kdbench import tuning
from kdbench.data.sources import location_key, split_sizes
from kdbench.errors import USER_ERRORS, ConfigError
from kdbench.methods.base import METHODS
from kdbench.plan import Plan


@contextlib.contextmanager
def _named(origin: str, key: str | None = None) -> Iterator[None]:
    """Re-raises a user error inside with the config's files and overrides in front (and ``key``, when the message
    names no key), unless it names them already."""
    try:
        yield
    except USER_ERRORS as e:
        text = str(e)
        if text.startswith(origin):
            raise
        prefix = f"{origin}: key '{key}': " if key and "key '" not in text else f"{origin}: "
        raise type(e)(prefix + text) from None


def check(plan: Plan) -> None:
    """Computes every input and param the workflow derives from ``plan``, so that any user error raises now.

    Raises:
        KdbenchError, FileNotFoundError: one line naming the config file, the dotted key and the fix.
    """
    for key, (table, teacher) in plan.data.items():
        where = f"teachers.{teacher}.data" if teacher else "data"
        data = plan.data_config(key)
        with _named(plan.tables[table].origin, f"{where}.{location_key(data)}"):
            split_sizes(data, where)  # the raw data is there, and the split sizes fit it
            plan.data_parts(key)
            plan.job_threads(key)
    for key, tk in plan.teachers.items():
        t = plan.tables[tk.table]
        with _named(t.origin):
            plan.teacher_data_dir(key)
            if plan.teacher_verification(key):
                plan.verification_spec(key)
            if tk.label:
                plan.assistant_stores(tk.table, tk.teacher, tk.label)
                if plan.searched(tk.table, tk.label):
                    plan.oracle_runs(key)  # AMD's grid of candidates
        checkpoint = None if tk.label else t.cfg.teachers[tk.teacher].checkpoint
        if checkpoint and not Path(checkpoint).is_file():
            relative = "" if Path(checkpoint).is_absolute() else f" (relative to the working directory {Path.cwd()})"
            raise ConfigError(f"{t.origin}: key 'teachers.{tk.teacher}.checkpoint': file not found: {checkpoint}"
                              f"{relative}. Fix: give the path of the checkpoint file, or remove the key to train the"
                              " teacher")
    for d, sk in plan.stores.items():
        with _named(plan.tables[sk.table].origin):
            plan.store_shards(d)
    cells = {}
    for job in plan.jobs:  # one job per cell: its seeds share inputs, stores and hash
        cells.setdefault((job.table, job.teacher, job.student, job.label), job)
    for (table, teacher, student, label), job in cells.items():
        with _named(plan.tables[table].origin, f"methods.{label}"):
            plan.job_stores(job)
            plan.job_hash(job)
    for name, t in plan.tables.items():
        _check_processes(t)
        if t.cfg.tune is not None and t.cfg.tune.budget.train_limit and plan.may_stream(plan.data_key(name)):
            raise ConfigError(f"{t.origin}: key 'tune.budget.train_limit': a trial's training subset needs the data"
                              " in memory, and this table streams it (data.stream). Fix: remove the key (trials then"
                              " train on the whole training split; shorten them with 'tune.budget.epochs')")
        with _named(t.origin, "tune" if t.cfg.tune is not None else None):
            for teacher, student, label in tuning.cells(plan, name):
                tuning.trial_files(plan, name, teacher, student, label)
                tuning.selection_hash(plan, name, teacher, student, label)
                tuning.trial_hash(plan, name, teacher, student, label, 0)  # the cell's proposals: all its trials'
            plan.audits(name)


def _check_processes(table) -> None:
    """Refuses, in a table whose distill jobs run in several processes (``runtime.processes``), a method that
    indexes samples (``requirements.sample_index``: CRD's memory bank, which each process would update with its own
    rows only; :func:`kdbench.train.loop._data_parallel` refuses it too, at run time)."""
    cfg = table.cfg
    if cfg.runtime.processes <= 1:
        return
    for label, entry in cfg.methods.items():
        method = METHODS.get(entry.method)
        if method.requirements(method.make_config(entry.params)).sample_index:
            raise ConfigError(f"{table.origin}: key 'runtime.processes' ({cfg.runtime.processes}): method"
                              f" '{label}' ({entry.method}) indexes samples (a memory bank each process would update"
                              " with its own rows only), so its jobs run in one process. Fix: runtime.processes: 1,"
                              f" or leave '{label}' out of this table")
