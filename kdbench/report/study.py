"""A suite's study: the run records of all its tables -> one table, one plot and the cache's lossless check.

The cache-budget study (``workflow/config/fashion-mnist-budget-study.yaml``) derives one table per store
setting from one base config: V stored views per image against E epochs (epochs beyond V replay views), full
logits (fp32, fp16) or the top-k, and the live teacher (``teacher_source: live``: the teacher runs on the same
counter-based views, no store). :func:`write_study` gathers their records into

* ``study.csv`` / ``study.md``: one row per (table, method label): teacher source, store policy, the protocol
  keys in which the row's table differs from the study's other tables (besides V), V, E, store bytes (the
  shard files of the store the runs read, from its manifest) and payload bytes per (sample, view), last-epoch
  test top-1 (mean ± std, 95% t-interval, seeds; :mod:`kdbench.report.stats`), the paired difference to the
  live-teacher run of the same method and protocol (``Δ vs live``), the teacher forwards per run (live) and to
  build the store (once, shared by every run that reads it), and the last epoch's train loss;
* ``study.png``: top-1 (mean, 95% interval) against store bytes (log scale), one line per method, store
  policy and protocol over V; every run without a store (the live teacher, or a method that needs it online)
  is a horizontal reference line labelled with its teacher compute; drawn from ``study.csv`` alone
  (:mod:`kdbench.report.study_view`), so a published study's plot is redrawn by the same code;
* the lossless check: each ``teacher_source: live`` run against the cached run of the same method, protocol
  and seed in the same table at V = E, compared as ``kdbench verify`` compares a re-run
  (:func:`kdbench.verify.compare_runs`: final metrics, every epoch's metrics, the trained weights' digest;
  timings and cost counters excluded): ``identical``, or ``differs`` with the earliest difference.

The cells (statistics over seeds, teacher source) are the leaderboard's (:func:`kdbench.report.aggregate.
build_cells`), built per table: the tables of a study share protocols and method labels by design.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdbench._util import atomic_path, sha256_file, stable_hash
from kdbench.cache.store import StoreError, read_store_manifest
from kdbench.report import _format as fmt
from kdbench.report.aggregate import LeaderboardCell, build_cells
from kdbench.report.markdown import md_table
from kdbench.report.study_view import LEGEND, plot_study, series_label, study_table
from kdbench.report.records import load_runs, read_epochs, read_record
from kdbench.report.stats import PairedDelta, Summary, paired_delta, summarize
from kdbench.verify import compare_runs

_logger = logging.getLogger(__name__)


@dataclass(eq=False)
class StudyRow:
    """One (table, method label) of a study.

    Attributes:
        table: The table (its config's name).
        cell: The leaderboard cell of the label's runs in that table.
        policy: The store policy the runs read (``fp32``, ``fp16``, ``bf16``, ``top-k``); ``""`` without a store.
        store_bytes: Bytes of the store's shard files (manifest); ``None`` without a store or manifest.
        payload_per_view: Stored payload bytes per (sample, view) (the teacher outputs, not the view parameters).
        build_forwards: Teacher forwards that built the store (samples x V).
        variant_key: Hash of the table's protocol without ``views.count``: rows with the same key differ only in V.
        variant: The protocol keys (besides V) in which this row differs from the study's most common protocol.
        train_loss: The last epoch's train loss over the seeds.
        live: The live-teacher row of the same method and protocol this row is compared with.
        gap: Paired difference ``this - live`` of last-epoch test top-1, by seed.
        notes: Remarks (a store changed since the run, ...).
    """

    table: str
    cell: LeaderboardCell
    policy: str = ""
    store_bytes: int | None = None
    payload_per_view: int | None = None
    build_forwards: int | None = None
    variant_key: str = ""
    variant: str = ""
    train_loss: Summary = field(default_factory=Summary.empty)
    live: StudyRow | None = None
    gap: PairedDelta | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.cell.method

    @property
    def source(self) -> str:
        return self.cell.teacher_source

    @property
    def views(self) -> int | None:
        return self.cell.first("views_count")

    @property
    def epochs(self) -> int | None:
        return self.cell.first("views_epochs")

    @property
    def family(self) -> tuple[str, str]:
        """``(method name, parameters)``: a cached run and its live reference share it."""
        return self.cell.method_name, self.cell.params_json()


@dataclass(frozen=True)
class LosslessCheck:
    """A live-teacher run against its cached twin (same table, method, protocol and seed) at V = E."""

    table: str
    live: str
    cached: str
    policy: str
    views: int
    seed: int
    differences: tuple[str, ...]

    @property
    def identical(self) -> bool:
        return not self.differences

    def render(self) -> str:
        head = (
            f"{self.table}: {self.live} (live teacher) vs {self.cached} (cache, {self.policy}, V = E ="
            f" {self.views}), seed {self.seed}:"
        )
        if self.identical:
            return f"{head} identical (final metrics, every epoch's metrics, trained weights)"
        first = next((d for d in self.differences if d.startswith("epochs")), self.differences[0])
        return f"{head} differs ({len(self.differences)} differences; first: {first})"


@dataclass
class Study:
    """Every row of a study and its lossless checks."""

    name: str
    rows: list[StudyRow]
    checks: list[LosslessCheck]


# --- building ------------------------------------------------------------------------------------------------


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        return {k: v for key, value in obj.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: obj}


def _policy(policy: Mapping[str, Any]) -> str:
    if policy.get("topk"):
        return f"top-{policy['topk']}"
    return {"float16": "fp16", "float32": "fp32", "bfloat16": "bf16"}.get(policy.get("logits_dtype"), "?")


def _store_facts(row: StudyRow, record: Mapping[str, Any], record_path: str) -> None:
    """Fills the row's store policy, bytes and build cost from the manifests of the stores its record read."""
    stores = (record.get("inputs") or {}).get("stores") or {}
    digests = (record.get("provenance") or {}).get("store_manifests") or {}
    policies, total, payload, forwards = [], 0, 0, 0
    for tap, store_dir in sorted(stores.items()):
        try:
            manifest = read_store_manifest(store_dir)
        except StoreError as e:
            row.notes.append(f"store bytes unknown: {e}")
            return
        if digests.get(tap) and sha256_file(Path(store_dir) / "manifest.json") != digests[tap]:
            row.notes.append(f"store {store_dir} changed since run {record_path}")
        policies.append(_policy(manifest.get("policy") or {}))
        total += sum(int(s["bytes"]) for s in manifest["shards"])
        payload += sum(
            math.prod(manifest["field_shapes"][f]) * np.dtype(manifest["field_dtypes"][f]).itemsize
            for f in manifest["fields"]
        )
        forwards = max(forwards, int(manifest["num_samples"]) * int(manifest["views"]))
    if stores:
        row.policy, row.store_bytes = "+".join(dict.fromkeys(policies)), total
        row.payload_per_view, row.build_forwards = payload, forwards


def _train_loss(cell: LeaderboardCell) -> Summary:
    last = []
    for run in cell.runs:
        path = Path(run.get("epochs_file") or "")
        if run.get("epochs_file") and path.exists() and (epochs := read_epochs(path)):
            last.append(epochs[-1].get("train_loss"))
    return summarize(last)


def build_study(name: str, record_paths: Sequence[Path]) -> Study:
    """Reads the records of a study's tables into its rows and lossless checks.

    Args:
        name: The study's name.
        record_paths: ``record.json`` files of every table of the study.

    Raises:
        RecordError: A record cannot be read, or two records of one table are the same run.
    """
    records = {str(p): read_record(Path(p)) for p in record_paths}
    by_table: dict[str, list[str]] = {}
    for path, rec in records.items():
        by_table.setdefault(rec["identity"]["config"], []).append(path)
    rows: list[StudyRow] = []
    protocols: dict[str, str] = {}  # variant key -> flattened protocol without V (JSON)
    for table, paths in by_table.items():
        for cell in build_cells(load_runs(Path(p) for p in paths)):
            row = StudyRow(table, cell)
            if cell.runs:
                rec = records[cell.runs[0]["record"]]
                _store_facts(row, rec, cell.runs[0]["record"])
                protocol = {k: v for k, v in _flat(rec["protocol"]).items() if k != "views.count"}
                row.variant_key = stable_hash(protocol)
                protocols[row.variant_key] = json.dumps(protocol, sort_keys=True)
            row.train_loss = _train_loss(cell)
            rows.append(row)
    _describe_variants(rows, protocols)
    _link_live(rows)
    families = _family_labels(rows)
    rows.sort(key=lambda r: _row_order(r, families))
    return Study(name, rows, _lossless_checks(rows))


def _describe_variants(rows: list[StudyRow], protocols: Mapping[str, str]) -> None:
    """Names, for each row, the protocol keys (besides V) that differ from the most common protocol."""
    counts = Counter(r.variant_key for r in rows if r.variant_key)
    if not counts:
        return
    common = json.loads(protocols[counts.most_common(1)[0][0]])
    for r in rows:
        if r.variant_key:
            own = json.loads(protocols[r.variant_key])
            r.variant = ", ".join(
                f"{k}={own.get(k)}" for k in sorted(set(own) | set(common)) if own.get(k) != common.get(k)
            )


def _link_live(rows: list[StudyRow]) -> None:
    """Pairs every cached row with the live-teacher row of the same method and protocol (its own table's first)."""
    lives = [r for r in rows if r.source == "live"]
    for r in rows:
        if r.source != "cache":
            continue
        same = [x for x in lives if x.family == r.family and x.variant_key == r.variant_key]
        if same:
            r.live = next((x for x in same if x.table == r.table), same[0])
            r.gap = paired_delta(r.cell.top1_by_seed, r.live.cell.top1_by_seed, min_pairs=1)


def _family_labels(rows: Sequence[StudyRow]) -> dict[tuple[str, str], str]:
    """``(method name, parameters)`` -> the label of its cached rows (``kd`` for ``kd`` and ``kd_live``)."""
    out: dict[tuple[str, str], str] = {}
    for r in sorted(rows, key=lambda r: r.source != "cache"):
        out.setdefault(r.family, r.method)
    return out


def _row_order(r: StudyRow, families: Mapping[tuple[str, str], str]) -> tuple:
    return (families[r.family], r.variant, r.source != "cache", r.policy, r.views or 0, r.table, r.method)


def _lossless_checks(rows: Sequence[StudyRow]) -> list[LosslessCheck]:
    checks = []
    for r in rows:
        live = r.live
        if live is None or live.table != r.table or r.views != r.epochs:
            continue
        live_runs = {run["seed"]: run for run in live.cell.runs}
        for run in r.cell.runs:
            twin = live_runs.get(run["seed"])
            if twin is None:
                continue
            diffs = compare_runs(Path(twin["record"]).parent, Path(run["record"]).parent, cost=False)
            checks.append(
                LosslessCheck(r.table, live.method, r.method, r.policy, r.views, run["seed"], tuple(diffs))
            )
    return checks


# --- outputs -------------------------------------------------------------------------------------------------

STUDY_COLUMNS = (
    "study", "table", "method", "method_name", "params", "teacher_source", "store_policy", "protocol_variant",
    "views", "epochs", "store_bytes", "payload_bytes_per_view", "top1_mean", "top1_std", "top1_ci95",
    "top1_ci95_low", "top1_ci95_high", "seeds", "live_reference", "gap_vs_live", "gap_ci95_low",
    "gap_ci95_high", "gap_n", "teacher_forward", "store_build_forward", "train_loss_last", "notes",
)  # fmt: skip


def study_rows(study: Study) -> list[dict[str, Any]]:
    """The machine-readable rows of ``study.csv`` (:data:`STUDY_COLUMNS`)."""
    out = []
    for r in study.rows:
        s, g = r.cell.top1, (r.gap.diff if r.gap else Summary.empty())
        out.append({
            "study": study.name, "table": r.table, "method": r.method, "method_name": r.cell.method_name,
            "params": r.cell.params_json(),
            "teacher_source": r.source, "store_policy": r.policy, "protocol_variant": r.variant,
            "views": r.views, "epochs": r.epochs, "store_bytes": r.store_bytes,
            "payload_bytes_per_view": r.payload_per_view, "top1_mean": s.mean, "top1_std": s.std,
            "top1_ci95": s.ci95, "top1_ci95_low": s.low, "top1_ci95_high": s.high, "seeds": s.n,
            "live_reference": f"{r.live.table}/{r.live.method}" if r.live else None, "gap_vs_live": g.mean,
            "gap_ci95_low": g.low, "gap_ci95_high": g.high, "gap_n": g.n if r.gap else None,
            "teacher_forward": r.cell.mean_of("teacher_forward"), "store_build_forward": r.build_forwards,
            "train_loss_last": r.train_loss.mean, "notes": "; ".join([*r.cell.notes, *r.notes]),
        })  # fmt: skip
    return out


_TEXT_COLUMNS = frozenset(
    {"study", "table", "method", "method_name", "params", "teacher_source", "store_policy", "protocol_variant",
     "live_reference", "notes"}
)  # fmt: skip


def read_study_csv(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``study.csv`` (:data:`STUDY_COLUMNS`), numbers parsed: what the plot is drawn from."""
    return fmt.read_csv(path, lambda column: column in _TEXT_COLUMNS)


def gap_closes(study: Study) -> list[str]:
    """Per line of the plot over V with a live reference: the smallest V from which on every cached run's
    paired 95% interval of ``cached - live`` contains 0 (or that it never does). Lines whose points have
    fewer than two paired seeds (no interval) are left out."""
    lines = []
    for key, members in _series(study.rows).items():
        members = [r for r in members if r.gap is not None and r.gap.diff.ci95 is not None and r.views]
        if len(members) < 2:
            continue
        closed = None
        for r in sorted(members, key=lambda r: r.views, reverse=True):
            d = r.gap.diff
            if d.low is None or not d.low <= 0 <= d.high:
                break
            closed = r.views
        label, live = series_label(key), members[0].live
        if closed is None:
            lines.append(
                f"{label}: the gap to the live teacher ({live.method}) does not close: at the largest V"
                f" ({max(r.views for r in members)}) the paired 95% interval excludes 0"
            )
        else:
            lines.append(
                f"{label}: the gap to the live teacher ({live.method}) closes at V = {closed} (the paired"
                f" 95% interval of cached - live contains 0 from V = {closed} on)"
            )
    return lines


def render_study_markdown(study: Study, rows: Sequence[Mapping[str, Any]], plot: Path | None, out_dir: Path) -> str:
    """The markdown page: the table (of ``rows``, the study's ``study.csv``), what it shows about the gap to the
    live teacher, the lossless check."""
    headers, body = study_table(rows)
    lines = [
        f"# Study {study.name}",
        "",
        LEGEND,
        "",
        *md_table(headers, body),
        "",
    ]
    notes = [f"{r.table}/{r.method}: {n}" for r in study.rows for n in [*r.cell.notes, *r.notes]]
    if notes:
        lines += ["Notes:", "", *[f"- {n}" for n in notes], ""]
    closes = gap_closes(study)
    if closes:
        lines += ["## The gap to the live teacher", "", *[f"- {c}" for c in closes], ""]
    lines += ["## Lossless check (live teacher vs cache at V = E)", ""]
    lines += [f"- {c.render()}" for c in study.checks] or [
        "- no live-teacher run has a cached twin (same table, method, protocol and seed) at V = E"
    ]
    if plot is not None:
        lines += ["", f"![accuracy vs store bytes]({Path(os.path.relpath(plot, out_dir)).as_posix()})"]
    return "\n".join(lines).rstrip() + "\n"


def _series(rows: Sequence[StudyRow]) -> dict[tuple[str, str, str], list[StudyRow]]:
    """Rows with a store, by (method family label, store policy, protocol variant): one plotted line each."""
    out: dict[tuple[str, str, str], list[StudyRow]] = {}
    for r in rows:
        if r.store_bytes and r.cell.top1.mean is not None:
            out.setdefault((r.method, r.policy, r.variant), []).append(r)
    return {k: sorted(v, key=lambda r: r.store_bytes) for k, v in out.items()}


def write_study(record_paths: Sequence[Path], out_dir: Path, name: str) -> Study:
    """Writes ``study.csv``, ``study.png`` and ``study.md`` of a study into ``out_dir``.

    Args:
        record_paths: ``record.json`` files of every table of the study.
        out_dir: Output directory (created).
        name: The study's name.

    Raises:
        RecordError: A record cannot be read, or two records of one table are the same run.
        ValueError: No record paths were given.
    """
    if not record_paths:
        raise ValueError("a study needs at least one run record")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study = build_study(name, record_paths)
    fmt.write_csv(out_dir / "study.csv", study_rows(study), STUDY_COLUMNS)
    rows = read_study_csv(out_dir / "study.csv")
    plot = plot_study(rows, name, out_dir / "study.png")
    with atomic_path(out_dir / "study.md") as tmp:
        tmp.write_text(render_study_markdown(study, rows, plot, out_dir), encoding="utf-8")
    _logger.info(
        "study %s: %d rows, %d lossless checks -> %s", name, len(study.rows), len(study.checks), out_dir
    )
    return study
