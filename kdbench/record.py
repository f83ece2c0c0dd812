"""The run record: what one distill job writes (``record.json``) and what the report reads (a leaf module).

One definition of the format: the distill job builds a :class:`RunRecord`, :func:`write_record` writes it,
and :mod:`kdbench.report.records` derives the keys it requires from these dataclasses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from kdbench._util import write_json_atomic

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Identity:
    """Which run: the table, the (teacher, student, method label, seed) cell and the method's parameters."""

    config: str
    dataset: str
    teacher: str
    teacher_model: str
    student: str
    method: str
    method_name: str
    params: Mapping[str, Any]
    seed: int


@dataclass(frozen=True)
class Final:
    """Final metrics; the last-epoch test top-1 is the headline, the best epoch is selected on val only.

    ``map_*`` and ``p100_*`` are the retrieval scores of the student's embedding at the protocol's
    ``retrieval_tap`` (in percent: 11-point mAP and top-100 precision, InDistill's official protocol, database =
    the training split, queries = the test split; :func:`kdbench.retrieval.retrieval_map`) with cosine and
    Euclidean distance; ``None`` when the protocol does not measure retrieval (``p100_*`` also when the
    database has fewer than 100 images).
    """

    test_top1: float
    test_top5: float
    val_top1: float
    best_epoch: int
    best_val_top1: float
    test_top1_at_best_val: float
    teacher_agreement: float | None = None
    teacher_test_top1: float | None = None
    map_cosine: float | None = None
    map_euclidean: float | None = None
    p100_cosine: float | None = None
    p100_euclidean: float | None = None


@dataclass(frozen=True)
class Cost:
    """What the run cost: time, forwards (in images), cache bytes read, extra parameters.

    ``assistant_time_s`` is the run's own assistant's cost (TAKD: its distillation; AMD: its search and
    fine-tuning), ``assistant_candidates`` how many candidates AMD's search trained (``None`` otherwise).
    ``retrieval_time_s`` is the retrieval step's share of ``wall_time_s`` (embedding both splits and both
    metrics), ``None`` when the protocol does not measure retrieval.
    """

    wall_time_s: float
    train_time_s: float
    student_params: int
    extra_params: int
    teacher_forward: int
    student_forward: int
    cache_bytes_read: int
    assistant_time_s: float | None = None
    retrieval_time_s: float | None = None
    assistant_candidates: int | None = None


@dataclass(frozen=True)
class Views:
    """V stored views against E epochs (epoch e replays view e mod V)."""

    count: int
    epochs: int
    repeats: bool | None = None  # (records before it existed: derived from count and epochs)


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """One run record; a skipped run (incompatible pair) has only identity, protocol and the reason."""

    schema_version: int = SCHEMA_VERSION
    status: str
    skip_reason: str | None = None
    identity: Identity
    protocol: Any
    protocol_hash: str
    views: Views | None = None
    final: Final | None = None
    cost: Cost | None = None
    requirements: Mapping[str, bool] | None = None
    declarations: Mapping[str, Any] | None = None
    provenance: Mapping[str, Any] | None = None
    inputs: Mapping[str, Any] | None = None
    epochs_file: str | None = None
    tuning: Mapping[str, Any] | None = None
    """A final run of a tuned table (:mod:`kdbench.tuning`): the selection it ran with (trials K, the selected
    trial and values, the configured values, their val scores, every trial's mean, the tuning time); ``None``
    for a run with the configured values."""


def required_keys(section: str) -> tuple[str, ...]:
    """Dotted keys a record must have in ``section`` (``identity``, ``final``, ``cost``, ``views``)."""
    cls = {"identity": Identity, "final": Final, "cost": Cost, "views": Views}[section]
    return tuple(f"{section}.{f.name}" for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING)


def optional_keys(section: str) -> tuple[str, ...]:
    """The field names of ``section`` that a record may leave null."""
    cls = {"final": Final, "cost": Cost}[section]
    return tuple(f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING)


def write_record(path: str | Path, record: RunRecord) -> None:
    """Writes ``record.json`` atomically (the job's last write: a present record means a finished run)."""
    write_json_atomic(path, record)


