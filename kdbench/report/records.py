"""Reading run records and flattening them into the tidy runs table.

A run record (``record.json``, written by the distill job) is one (teacher, student, method label, seed).
:func:`load_runs` turns a list of them into rows of one flat table (``runs.csv``): identity columns,
``param.<name>`` for every resolved method hyper-parameter, final metrics, cost (with the compute of a live
teacher tail a method reports in ``provenance.method_audit``: :data:`TAIL_COLUMNS`), requirements and
provenance (``prov.*``, ``pkg.<package>``, ``plugin.<package>`` (:func:`plugin_cell`), ``store.<tap>``; the
list ``prov.dirty_files`` becomes one ``"; "``-joined cell, and provenance keys older records lack become empty
cells). Every later table and plot is derived from these rows; nothing downstream reads a record again
(training curves read the ``epochs_file`` a row names).

A final run of a tuned table (:mod:`kdbench.tuning`, a record with a ``tuning`` mapping) has the same
cell key and seed as the untuned run of its cell: its row is marked ``tuned`` (``True``) and carries its
selection in :data:`TUNING_COLUMNS` (``tuning.*``); rows of untuned records have none of these keys, so the
runs table of an untuned table is unchanged. Which label a row shows on the leaderboard (the tuned run is the
headline, the untuned one ``<label> (untuned)``) is decided where rows are grouped into cells
(:func:`kdbench.report.aggregate.build_cells`).

A record that is not valid JSON or lacks a key the report needs raises :class:`RecordError` naming the
file and the dotted key.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kdbench.errors import RecordError
from kdbench.report._format import read_csv
from kdbench.record import SCHEMA_VERSION, optional_keys, required_keys

_logger = logging.getLogger(__name__)

# Keys every record needs, and the keys an "ok" record needs on top (dotted paths), from the record's format.
_REQUIRED = ("schema_version", "status", *required_keys("identity"), "protocol_hash")
_REQUIRED_OK = (
    *required_keys("views"),
    *required_keys("final"),
    *required_keys("cost"),
    "requirements.live_teacher",
    "provenance.kdbench_version",
    "provenance.git_commit",
    "provenance.packages",
    "provenance.python",
    "provenance.device",
    "provenance.torch_threads",
    "provenance.config_hash",
    "provenance.data_manifest_sha256",
)

# Flattened column -> dotted key in the record; the optional ones may be missing or null.
_FINAL = tuple(k.split(".", 1)[1] for k in required_keys("final"))
_FINAL_OPTIONAL = optional_keys("final")
_COST = tuple(k.split(".", 1)[1] for k in required_keys("cost")) + optional_keys("cost")
_REQUIREMENTS = ("live_teacher", "sample_index", "full_logits", "live_teacher_tail")
# The compute of a teacher tail the method ran live (Requirements.live_teacher_tail, e.g. ScaleKD), from the
# method's audit (``provenance.method_audit``): samples through the tail (each pass counts), the tail's
# parameters and, when the method reports it, the whole teacher's. Empty for other methods and older records.
TAIL_COLUMNS = ("teacher_tail_forward", "teacher_tail_params", "teacher_params")
# Optional in a record (older records lack the later keys): missing ones become empty cells.
_PROVENANCE = (
    "kdbench_version",
    "git_commit",
    "dirty_files",
    "python",
    "device",
    "cpu",
    "cpu_capability",
    "torch_threads",
    "config_file",
    "config_hash",
    "teacher_sha256",
    "data_manifest_sha256",
)

IDENTITY_COLUMNS = (
    "dataset",
    "protocol_hash",
    "teacher",
    "teacher_model",
    "student",
    "method",
    "method_name",
    "seed",
)
CELL_KEY = ("dataset", "protocol_hash", "teacher", "student", "method")
# A final tuned run (the record's ``tuning``): ``True``; absent on every other row.
TUNED = "tuned"
# The selection of a tuned run (kdbench.tuning.tuning_summary), flattened; lists and dicts as compact JSON.
TUNING_COLUMNS = (
    "tuning.metric",
    "tuning.rule",
    "tuning.sampler",
    "tuning.trials",
    "tuning.budget_epochs",
    "tuning.budget_seeds",
    "tuning.budget_train_limit",
    "tuning.default",
    "tuning.default_score",
    "tuning.selected_trial",
    "tuning.values",
    "tuning.selected_score",
    "tuning.tuning_time_s",
    "tuning.trial_means",
)
TRAILING_COLUMNS = ("epochs_file", "provenance_differs")
# Files modified or untracked under kdbench/ and workflow/ when the commit is "+dirty", one cell.
DIRTY_FILES = "prov.dirty_files"
_DIRTY_SEP = "; "


def _get(obj: Mapping[str, Any], dotted: str) -> Any:
    """``obj["a"]["b"]`` for ``"a.b"``; raises ``KeyError(dotted)`` when any level is missing."""
    for part in dotted.split("."):
        if not isinstance(obj, Mapping) or part not in obj:
            raise KeyError(dotted)
        obj = obj[part]
    return obj


def _opt(obj: Mapping[str, Any], dotted: str) -> Any:
    try:
        return _get(obj, dotted)
    except KeyError:
        return None


def read_record(path: Path) -> dict[str, Any]:
    """Reads and checks one run record.

    Args:
        path: The ``record.json`` file.

    Returns:
        The parsed record.

    Raises:
        RecordError: The file is missing, not valid JSON, of another schema version, or lacks a key the
            report needs (the message names the file and the dotted key).
    """
    try:
        rec = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RecordError(f"run record {path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecordError(
            f"run record {path}: not valid JSON ({e}); rerun the distill job that writes it"
        ) from e
    if not isinstance(rec, dict):
        raise RecordError(f"run record {path}: expected a JSON object, got {type(rec).__name__}")
    required = _REQUIRED + (_REQUIRED_OK if rec.get("status") == "ok" else ())
    for key in required:
        try:
            _get(rec, key)
        except KeyError:
            raise RecordError(
                f"run record {path}: missing key {key!r}; rerun the distill job that writes it"
            ) from None
    if rec["schema_version"] != SCHEMA_VERSION:
        raise RecordError(
            f"run record {path}: key 'schema_version' is {rec['schema_version']!r}, this report reads "
            f"version {SCHEMA_VERSION}"
        )
    if rec["status"] not in ("ok", "skipped"):
        raise RecordError(f"run record {path}: key 'status' is {rec['status']!r}, expected 'ok' or 'skipped'")
    if rec["status"] == "skipped" and not rec.get("skip_reason"):
        raise RecordError(f"run record {path}: status is 'skipped' but key 'skip_reason' is empty")
    return rec


def _scalar(value: Any) -> Any:
    """Keeps scalars; lists and dicts (e.g. a tuple-valued hyper-parameter) become compact JSON."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def join_dirty_files(files: Any) -> str | None:
    """The record's ``provenance.dirty_files`` list as one runs-table cell: sorted paths joined by ``"; "``.

    Args:
        files: The list of repo-relative paths (a string is kept as it is).

    Returns:
        The joined paths, ``None`` when there are none (a clean or an older record).
    """
    if not files:
        return None
    if isinstance(files, str):
        return files
    return _DIRTY_SEP.join(sorted(str(f) for f in files))


def split_dirty_files(value: Any) -> list[str]:
    """The paths of a :data:`DIRTY_FILES` cell (inverse of :func:`join_dirty_files`)."""
    return [part.strip() for part in str(value or "").split(_DIRTY_SEP.strip()) if part.strip()]


def plugin_cell(entry: Mapping[str, Any]) -> str:
    """A record's ``provenance.plugins`` entry as one runs-table cell (column ``plugin.<package>``): the version,
    then the git commit of an editable checkout and its uncommitted files, e.g. ``0.1.0 (git 3f2a…+dirty: nkd.py)``.
    """
    cell = str(entry.get("version"))
    if entry.get("git_commit"):
        dirty = join_dirty_files(entry.get("dirty_files"))
        cell += f" (git {entry['git_commit']}{': ' + dirty if dirty else ''})"
    return cell


def flatten_record(rec: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """One row of the runs table from a checked record (see :func:`read_record`).

    Args:
        rec: The record.
        path: Where it was read from (kept in the ``record`` column; ``epochs_file`` is resolved from it).

    Returns:
        A flat dict; columns a skipped record does not have are ``None``.
    """
    ident = rec["identity"]
    row: dict[str, Any] = {
        "record": str(path),
        "status": rec["status"],
        "skip_reason": rec.get("skip_reason") or "",
        "config": ident["config"],
        "dataset": ident["dataset"],
        "protocol_hash": rec["protocol_hash"],
        "teacher": ident["teacher"],
        "teacher_model": ident["teacher_model"],
        "student": ident["student"],
        "method": ident["method"],
        "method_name": ident["method_name"],
        "seed": int(ident["seed"]),
    }
    row.update({f"param.{k}": _scalar(v) for k, v in sorted(ident["params"].items())})
    row["views_count"] = _opt(rec, "views.count")
    row["views_epochs"] = _opt(rec, "views.epochs")
    repeats = _opt(rec, "views.repeats")
    if repeats is None and row["views_count"] is not None:
        repeats = row["views_epochs"] > row["views_count"]
    row["views_repeat"] = repeats
    row["retrieval_tap"] = _opt(rec, "protocol.retrieval_tap")  # the embedding of the map_* / p100_* metrics
    row.update({k: _opt(rec, f"final.{k}") for k in _FINAL + _FINAL_OPTIONAL})
    row.update({k: _opt(rec, f"cost.{k}") for k in _COST})
    audit = _opt(rec, "provenance.method_audit")
    row.update({k: audit.get(k) if isinstance(audit, Mapping) else None for k in TAIL_COLUMNS})
    row.update({f"req.{k}": _opt(rec, f"requirements.{k}") for k in _REQUIREMENTS})
    prov = rec.get("provenance") or {}
    row.update({k: prov.get(k) for k in PROVENANCE_NUMBERS})
    row.update({f"prov.{k}": prov.get(k) for k in _PROVENANCE})
    row[DIRTY_FILES] = join_dirty_files(prov.get("dirty_files"))
    # Further scalar provenance (e.g. the student's model digest) is kept too, after the known keys.
    row.update(
        {
            f"prov.{k}": _scalar(v)
            for k, v in sorted(prov.items())
            if k not in _PROVENANCE and k not in PROVENANCE_NUMBERS and k != "plugins" and not isinstance(v, dict)
        }
    )
    row.update({f"plugin.{p['package']}": plugin_cell(p) for p in prov.get("plugins") or ()})
    row.update({f"pkg.{k}": v for k, v in sorted((_opt(rec, "provenance.packages") or {}).items())})
    row.update({f"store.{k}": v for k, v in sorted((_opt(rec, "provenance.store_manifests") or {}).items())})
    tuning = rec.get("tuning")
    if isinstance(tuning, Mapping):
        row.update(_tuning_columns(tuning))
    epochs = rec.get("epochs_file")
    row["epochs_file"] = str(Path(path).parent / epochs) if epochs else ""
    return row


def _tuning_columns(tuning: Mapping[str, Any]) -> dict[str, Any]:
    """:data:`TUNED` and :data:`TUNING_COLUMNS` of a tuned run's ``tuning`` mapping (missing keys empty)."""
    budget = tuning.get("budget") or {}
    seeds = budget.get("seeds")
    flat = {
        "metric": tuning.get("metric"),
        "rule": tuning.get("rule"),
        "sampler": tuning.get("sampler"),
        "trials": tuning.get("trials"),
        "budget_epochs": budget.get("epochs"),
        "budget_seeds": " ".join(str(s) for s in seeds) if seeds is not None else None,
        "budget_train_limit": budget.get("train_limit"),
        "default": tuning.get("default"),
        "default_score": tuning.get("default_score"),
        "selected_trial": tuning.get("selected_trial"),
        "values": tuning.get("values"),
        "selected_score": tuning.get("selected_score"),
        "tuning_time_s": tuning.get("tuning_time_s"),
        "trial_means": tuning.get("trial_means"),
    }
    return {TUNED: True, **{f"tuning.{k}": _scalar(v) for k, v in flat.items()}}


def trial_means(row: Mapping[str, Any]) -> list[float]:
    """The mean validation score of each trial of a tuned run's row (trial order; ``[]`` when absent)."""
    value = row.get("tuning.trial_means")
    if value in (None, ""):
        return []
    return [float(x) for x in (json.loads(value) if isinstance(value, str) else value)]


def run_key(row: Mapping[str, Any]) -> tuple:
    """What makes a run unique: its cell, its seed and whether it is a final tuned run."""
    return (*(row[k] for k in CELL_KEY), row["seed"], bool(row.get(TUNED)))


def load_runs(record_paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Reads every record into rows of the runs table, sorted by cell and seed.

    Args:
        record_paths: ``record.json`` files.

    Returns:
        One row per record.

    Raises:
        RecordError: A record cannot be read, or two records are the same run (same cell and seed).
    """
    rows: list[dict[str, Any]] = []
    seen: dict[tuple, str] = {}
    for path in record_paths:
        row = flatten_record(read_record(Path(path)), Path(path))
        key = run_key(row)
        if key in seen:
            raise RecordError(
                f"run records {seen[key]} and {path} are the same run "
                f"{dict(zip((*CELL_KEY, 'seed'), key))}"
                + (" (both tuned)" if key[-1] else "")
                + "; pass only one of them"
            )
        seen[key] = str(path)
        rows.append(row)
    rows = sort_runs(rows)
    _logger.info("read %d run records (%d skipped)", len(rows), sum(r["status"] == "skipped" for r in rows))
    return rows


def sort_runs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in the runs table's order: by cell, then seed (an untuned run before the tuned one)."""
    return sorted(rows, key=lambda r: tuple(str(r[k]) for k in CELL_KEY) + (r["seed"], bool(r.get(TUNED))))


def runs_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The column order of the runs table over the union of the rows' keys.

    Identity first, then ``param.*`` (sorted), metrics, cost, ``req.*`` and ``prov.*`` in record order,
    then ``pkg.*``, ``plugin.*`` and ``store.*`` (sorted), then :data:`TRAILING_COLUMNS`.
    """
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    head = ("record", "status", "skip_reason", "config") + IDENTITY_COLUMNS
    sections = {"param": 1, "pkg": 3, "plugin": 3, "store": 4}

    def rank(item: tuple[int, str]) -> tuple[int, int, str]:
        pos, name = item
        if name in head:
            return (0, head.index(name), "")
        if name in TRAILING_COLUMNS:
            return (5, TRAILING_COLUMNS.index(name), "")
        section = sections.get(name.split(".", 1)[0]) if "." in name else None
        return (section, 0, name) if section else (2, pos, "")

    return [name for _, name in sorted(enumerate(columns), key=rank)]


# Columns of runs.csv that stay text when it is read back (names, paths, digests, versions, provenance).
_TEXT_COLUMNS = frozenset({"record", "status", "skip_reason", "config", "retrieval_tap", "epochs_file", *IDENTITY_COLUMNS})
_TEXT_PREFIXES = ("prov.", "pkg.", "plugin.", "store.")
#: Provenance that is a number the report reads (a searched assistant's pick stability, kdbench.tasearch): its own
#: runs column, not a ``prov.*`` text one.
PROVENANCE_NUMBERS = ("assistant_pick_share",)


def runs_text_column(column: str) -> bool:
    """Whether a runs-table column holds text (never parsed as a number when ``runs.csv`` is read)."""
    return (column in _TEXT_COLUMNS and column != "seed") or column.startswith(_TEXT_PREFIXES)


def read_runs_csv(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``runs.csv`` (what :func:`load_runs` returned when it was written), values parsed back.

    A published snapshot keeps ``runs.csv`` and not its records: its leaderboard is rebuilt from these rows
    (:func:`kdbench.report.leaderboard.render_leaderboard`). Floats come back with the 6 decimals the file
    keeps; empty cells are ``None`` (a column a row never had is ``None`` too, which every reader treats as
    absent).

    Raises:
        RecordError: The file is missing or lacks an identity column.
    """
    if not Path(path).is_file():
        raise RecordError(f"runs table {path}: file not found; a snapshot needs the runs.csv of its leaderboard")
    rows = read_csv(Path(path), runs_text_column)
    for key in ("record", "status", *IDENTITY_COLUMNS):
        if rows and key not in rows[0]:
            raise RecordError(f"runs table {path}: missing column {key!r}")
    return rows


EPOCHS_CSV = "epochs.csv"


def epochs_table(epochs: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows and columns of ``epochs.csv``: one row per (run record, epoch), its scalar metrics (a nested
    mapping such as the loss ``terms`` flattened to ``terms.<name>``), so that a snapshot's training curves can
    be redrawn without its records."""
    rows: list[dict[str, Any]] = []
    columns: dict[str, None] = dict.fromkeys(("record", "epoch"))
    for record, items in epochs.items():
        for ep in items:
            row = {"record": record}
            for k, v in ep.items():
                if isinstance(v, Mapping):
                    row.update({f"{k}.{kk}": vv for kk, vv in v.items() if not isinstance(vv, (Mapping, list))})
                elif not isinstance(v, list):
                    row[k] = v
            columns.update(dict.fromkeys(row))
            rows.append(row)
    return rows, list(columns)


def read_epochs_csv(path: Path) -> dict[str, list[dict[str, Any]]]:
    """``epochs.csv`` back as run record -> its epochs in order (``{}`` when the file is absent: a snapshot
    published before the file existed has no curves)."""
    if not Path(path).is_file():
        return {}
    out: dict[str, list[dict[str, Any]]] = {}
    for row in read_csv(Path(path), lambda column: column == "record"):
        out.setdefault(row["record"], []).append(row)
    return out


def read_epochs(path: Path) -> list[dict[str, Any]]:
    """Reads an ``epochs.jsonl`` file (one JSON object per epoch).

    Args:
        path: The file.

    Returns:
        The epoch objects in file order.

    Raises:
        RecordError: A line is not valid JSON or lacks ``epoch`` (names the file and line).
    """
    out = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(f"epochs file {path}, line {lineno}: not valid JSON ({e})") from e
        if not isinstance(obj, dict) or "epoch" not in obj:
            raise RecordError(f"epochs file {path}, line {lineno}: missing key 'epoch'")
        out.append(obj)
    return out
