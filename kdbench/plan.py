"""The resolved plan: config files + ``--config`` overrides -> tables -> every job and every output path.

A config is resolved **once** (:func:`resolve_tables`): the files are merged in order, the overrides are applied
on top (``seeds=[0,1]``, or a dotted key such as ``protocol.epochs=5``), a teacher given as
``{from: other-config.yaml}`` is replaced by that config's teacher (its model, checkpoint, training protocol
and training data, written out in full), and a suite file (``tables: [a.yaml, b.yaml]``) becomes one table per
listed config (or derived from one: ``{config: a.yaml, set: {...}, methods: [...]}``), with an optional
``study`` over all of them (:func:`resolve_study`). Every table's resolved config is written to
``results/<table>/config-<hash>.resolved.yaml`` (a new file for every distinct config, so a record's config
file never changes under it) and every job of that table reads that file. A ``select:`` (:mod:`kdbench.selection`)
is not part of the table: :class:`Plan` plans the full table and keeps the selected jobs.

:class:`Plan` turns the tables into jobs and is the only place that knows an output path. Upstream work is
content-addressed, so two tables that need the same data, teacher or store share one job:

* data shards:     ``results/data/<source>-<hash of the data config>/`` (``data.shards_per_job`` left out of the
  hash); with ``shards_per_job`` set, one ``data_shards`` job per shard group writes ``parts/group-<g>.json``
  and the ``prepare_data`` job merges the parts into the manifest
* teachers:        ``results/teachers/<name>-<hash of model, checkpoint, training protocol, training data>/``
  (and the checkpoint's stated sha256, when set); a checkpoint teacher with ``expected_top1``: its check
  ``verified.json`` there (``verify_teacher``), which the teacher job waits for
* assistants:      ``results/assistants/<teacher key>.<label>-<hash of table data, protocol, cache, method>/``
* stores:          ``results/cache/<teacher or assistant key>/<hash of data, views, cache policy>/<tap>/``
* runs:            ``results/<table>/runs/<teacher>/<student>/<label>/seed<k>/``
* tuning (a table with ``tune:``, :mod:`kdbench.tuning`): ``results/<table>/tune/<teacher>/<student>/<label>/``
  (``trial<k>/seed<s>/``, ``selected.json``, ``study.journal``) and the final tuned runs
  ``results/<table>/tuned/<teacher>/<student>/<label>/seed<k>/``
* leaderboards:    ``results/<table>/leaderboard/``; the check against ``results/published/<table>/``:
  ``results/<table>/compare.md``.
* studies:         ``results/<study>/study.{md,csv,png}``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from kdbench._util import atomic_path, stable_hash, to_jsonable
from kdbench.config import (
    DATA_READ_KEYS,
    DEFAULT_TOPK,
    Config,
    ConfigError,
    DataConfig,
    TeacherConfig,
    config_hash,
    hashed_entry,
    parse_config,
    read_config_file,
    reads_full_logits_from_store,
    to_raw,
)
from kdbench.data.layout import PART_NAME, data_identity, group_count
from kdbench.data.sources import check_data_config, is_encoded, location_key, shard_counts, source_info
from kdbench.errors import DatasetError
from kdbench.methods import METHODS
from kdbench.methods.base import SEARCHED_ASSISTANT
from kdbench.models import ModelInfo, create_model, model_info
from kdbench.numerics import Numerics
from kdbench.prune import Candidate, assistant_grid
from kdbench.selection import Selection, parse_selection
from kdbench.taps import normalize_tap, parse_tap, tap_dirname

RESULTS = "results"
DEFAULT_CONFIG = "workflow/config/config.yaml"
RESERVED = frozenset({"data", "teachers", "assistants", "cache", "published", "logs", "site"})
_HASH = 8


SHARD_NAME = "shard-{shard}.h5"  # a store's file per data shard; {shard}: the shard's index, 5 digits


def shard_file(index: int) -> str:
    """The file name of a store's shard ``index``."""
    return SHARD_NAME.format(shard=f"{index:05d}")


class Layout:
    """Every output path pattern, with the workflow's wildcards; the ``.smk`` files use these and no others."""

    DATA = f"{RESULTS}/data/{{dkey}}"
    DATA_PART = f"{DATA}/{PART_NAME}"  # one shard group's part file (data.shards_per_job set); {group}: 5 digits
    TEACHER = f"{RESULTS}/teachers/{{tkey}}"
    TEACHER_VERIFIED = f"{TEACHER}/verified.json"  # a checkpoint teacher's test top-1 checked (expected_top1)
    ASSISTANT = f"{RESULTS}/assistants/{{akey}}"
    SEARCH = f"{ASSISTANT}/search"  # AMD's search: candidates.json, selection.json, candidates/<k>/
    ORACLE = f"{ASSISTANT}/oracle/{{student}}/c{{cand}}/seed{{seed}}"  # AMD's audit: candidate k -> student
    STORE = f"{RESULTS}/cache/{{key}}/{{spec}}/{{tapdir}}"
    SHARD = f"{STORE}/{SHARD_NAME}"
    TABLE = f"{RESULTS}/{{table}}"
    RESOLVED = f"{TABLE}/config-{{config_hash}}.resolved.yaml"
    RUN = f"{TABLE}/runs/{{teacher}}/{{student}}/{{label}}/seed{{seed}}"
    TUNE = f"{TABLE}/tune/{{teacher}}/{{student}}/{{label}}"  # a tuned cell: selected.json, study.journal
    TRIAL = f"{TUNE}/trial{{trial}}/seed{{seed}}"  # one trial of a cell (kdbench.tuning), scored on val
    TUNED_RUN = f"{TABLE}/tuned/{{teacher}}/{{student}}/{{label}}/seed{{seed}}"  # a final run, selected values
    LEADERBOARD = f"{TABLE}/leaderboard"
    COMPARE = f"{TABLE}/compare.md"
    AUDIT = f"{TABLE}/audit/{{teacher}}/{{label}}"  # the audit of a searched assistant: .md and .json
    PUBLISHED = f"{RESULTS}/published/{{table}}"
    LOGS = f"{RESULTS}/logs"
    TABLE_LOGS = f"{TABLE}/logs"
    STUDY = f"{RESULTS}/{{study}}"  # a suite's study report (study.md / .csv / .png), over all its tables
    STUDY_LOGS = f"{STUDY}/logs"
    SITE = f"{RESULTS}/site"  # the run's results site: a page per table and study, a front page (never committed)


# --- resolving config files + overrides --------------------------------------------------------------------


def deep_update(base: dict, new: Mapping) -> dict:
    """Merges ``new`` into ``base`` in place (mappings recursively, everything else replaced), like Snakemake."""
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def apply_overrides(raw: dict, overrides: Mapping[str, Any], where: str = "--config") -> dict:
    """Applies ``--config`` overrides; a dotted key (``protocol.epochs``) reaches into nested mappings.

    ``where`` names the overrides in errors (a suite entry's ``set`` passes its file and key).
    """
    for key, value in overrides.items():
        *parents, last = str(key).split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where} {key}=...: '{p}' is not a mapping in the config")
        if isinstance(value, Mapping) and isinstance(node.get(last), dict):
            deep_update(node[last], value)
        else:
            node[last] = copy.deepcopy(value)
    return raw


def typed_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``--config`` values as YAML types: Snakemake reads ``seeds=[0,1]`` with YAML's base loader, which leaves
    every item a string (``['0', '1']``); each string inside is read again as YAML (``[0, 1]``)."""

    def typed(value: Any) -> Any:
        if isinstance(value, str):
            try:
                return yaml.safe_load(value) if value.strip() else value
            except yaml.YAMLError:
                return value
        if isinstance(value, Mapping):
            return {k: typed(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [typed(v) for v in value]
        return value

    return {k: typed(v) for k, v in overrides.items()}


def _merged(files: Sequence[Path]) -> dict:
    raw: dict = {}
    for f in files:
        deep_update(raw, read_config_file(f))
    return raw


def _expand_teacher_refs(raw: dict, source: Path) -> dict:
    """Replaces every ``teachers.<t>: {from: FILE[, teacher: NAME]}`` by that config's teacher, in full."""
    for tname, traw in (raw.get("teachers") or {}).items():
        if not isinstance(traw, Mapping) or "from" not in traw:
            continue
        extra = sorted(set(traw) - {"from", "teacher"})
        if extra:
            raise ConfigError(f"{source}: key 'teachers.{tname}.{extra[0]}': a teacher given with 'from' takes only"
                              " 'from' and 'teacher' (the referenced config defines the rest)")
        ref = (source.parent / str(traw["from"])).resolve()
        if not ref.exists():
            raise ConfigError(f"{source}: key 'teachers.{tname}.from': config file not found: {ref}")
        other = parse_config(_expand_teacher_refs(_merged([ref]), ref), source=str(ref))
        name = str(traw.get("teacher", tname))
        if name not in other.teachers:
            raise ConfigError(f"{source}: key 'teachers.{tname}': {ref} has no teacher {name!r};"
                              f" its teachers: {', '.join(other.teachers)}")
        t = other.teachers[name]
        raw["teachers"][tname] = {**to_jsonable(t), "data": to_jsonable(t.data or other.data)}  # sha256 etc. too
    return raw


def default_topk(cfg: Config) -> int | None:
    """The logits store's top-k when the config leaves ``cache.topk`` unset: :data:`DEFAULT_TOPK` for a dataset of
    at least ``cache.topk_min_classes`` classes, unless a method of the table reads full logits from the store
    (DKD, DIST, FunMatch: they would be refused a top-k store); ``None`` (every logit) otherwise."""
    if source_info(cfg.data).num_classes < cfg.cache.topk_min_classes:
        return None
    if any(reads_full_logits_from_store(entry) for entry in cfg.methods.values()):
        return None
    return DEFAULT_TOPK


@dataclass(frozen=True)
class Table:
    """One leaderboard: a resolved config and where it came from.

    Attributes:
        cfg: The parsed config (its ``source`` is the resolved file every job reads).
        origin: The config files and overrides it was resolved from, for the resolved file's header.
        selection: The part of the table to plan (``select:``, :mod:`kdbench.selection`); ``None``: all of it.
            Not part of the table: ``cfg``, the resolved file and every hash are the full table's.
    """

    cfg: Config
    origin: str
    selection: Selection | None = None

    @property
    def raw(self) -> dict[str, Any]:
        """The resolved mapping, every value explicit: what :func:`write_resolved` writes."""
        return to_raw(self.cfg)

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def resolved_path(self) -> str:
        return self.cfg.source

    @property
    def config_hash(self) -> str:
        """Hash of everything that defines the table (runtime settings excluded)."""
        return config_hash(self.cfg)


@dataclass(frozen=True)
class SuiteEntry:
    """One entry of a suite file's ``tables`` list (see :func:`resolve_tables`).

    Attributes:
        config: The config file (relative to the suite file).
        overrides: Its ``set``: overrides of that config, keys and values as ``--config`` takes them (dotted
            keys, e.g. ``protocol.views.count: 1``; ``name: ...`` names the table); applied before the command
            line's.
        methods: Keep only these method labels (after every override); ``None`` keeps all.
        where: ``<suite file>: tables[<i>]``, for messages and the resolved file's header.
    """

    config: Path
    overrides: Mapping[str, Any]
    methods: tuple[str, ...] | None
    where: str


def _suite_entry(suite: Path, i: int, item: Any) -> SuiteEntry:
    """A suite's ``tables[i]``: a config file name, or ``{config: FILE, set: {KEY: VALUE}, methods: [LABEL]}``."""
    where = f"{suite}: tables[{i}]"
    if isinstance(item, str):
        item = {"config": item}
    if not isinstance(item, Mapping) or not isinstance(item.get("config"), str):
        raise ConfigError(f"{suite}: key 'tables[{i}]' must be a config file name or a mapping with 'config' (a file"
                          " name) and optionally 'set' (overrides) and 'methods' (labels to keep)")
    unknown = sorted(set(item) - {"config", "set", "methods"})
    if unknown:
        raise ConfigError(f"{suite}: unknown key 'tables[{i}].{unknown[0]}'; valid keys: config, methods, set")
    config = suite.parent / item["config"]
    if not config.is_file():
        raise ConfigError(f"{suite}: key 'tables[{i}].config': config file not found: {config}")
    sets = item.get("set") or {}
    if not isinstance(sets, Mapping):
        raise ConfigError(f"{suite}: key 'tables[{i}].set' must be a mapping of config keys (dotted, as --config"
                          " takes them) to values")
    methods = item.get("methods")
    if methods is not None and (not isinstance(methods, list) or not methods
                                or not all(isinstance(m, str) for m in methods)):
        raise ConfigError(f"{suite}: key 'tables[{i}].methods' must be a non-empty list of method labels")
    return SuiteEntry(config, dict(sets), tuple(methods) if methods is not None else None, where)


def _defining(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The overrides that define the table: all but a selection (``select``, ``select.<key>``), which is not part
    of the table (nor of its resolved file's header, so a selection rewrites no file of the full table)."""
    return {k: v for k, v in overrides.items() if str(k).split(".")[0] != "select"}


def _table(files: Sequence[Path], overrides: Mapping[str, Any], entry: SuiteEntry | None = None) -> Table:
    raw = _merged(files)
    origin = " + ".join(str(f) for f in files)
    if entry is not None and entry.overrides:
        raw = apply_overrides(raw, entry.overrides, where=f"{entry.where}.set:")
        if _defining(entry.overrides):
            origin += f" + {entry.where}.set " + " ".join(f"{k}={v!r}" for k, v in _defining(entry.overrides).items())
    raw = apply_overrides(raw, overrides)
    if _defining(overrides):
        origin += " + --config " + " ".join(f"{k}={v!r}" for k, v in _defining(overrides).items())
    select = raw.pop("select", None)  # applied to the resolved table's jobs (Plan), never part of the table
    selected_by = origin  # (for the selection's messages: with the overrides that select)
    for where, given in [(f"{entry.where}.set", entry.overrides) if entry else ("", {}), ("--config", overrides)]:
        chosen = {k: v for k, v in given.items() if k not in _defining(given)}
        if chosen:
            selected_by += f" + {where} " + " ".join(f"{k}={v!r}" for k, v in chosen.items())
    if entry is not None and entry.methods is not None:
        labels = raw.get("methods") if isinstance(raw.get("methods"), Mapping) else {}
        missing = [m for m in entry.methods if m not in labels]
        if missing:
            raise ConfigError(f"{entry.where}.methods: {missing[0]!r} is not a method label of {origin}; its labels:"
                              f" {', '.join(labels)}")
        raw["methods"] = {m: labels[m] for m in entry.methods}
        origin += f" + {entry.where}.methods [{', '.join(entry.methods)}]"
    raw = _expand_teacher_refs(raw, files[-1])
    cfg = parse_config(raw, source=origin)  # errors name the files and overrides the user wrote
    if "topk" not in (raw.get("cache") or {}):
        try:
            topk = default_topk(cfg)
        except ConfigError as e:  # a data key the source needs (the class count comes from the source)
            raise ConfigError(f"{origin}: {e}") from None
        except DatasetError as e:  # an image folder or shards that are not there
            raise DatasetError(f"{origin}: key 'data.{location_key(cfg.data)}': {e}") from None
        cfg = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, topk=topk))
    if cfg.name in RESERVED:
        raise ConfigError(f"{origin}: key 'name' must not be one of {', '.join(sorted(RESERVED))} (result folders)")
    source = Layout.RESOLVED.format(table=cfg.name, config_hash=config_hash(cfg))
    resolved = parse_config(to_raw(cfg), source=source)  # as the jobs will read it
    return Table(cfg=resolved, origin=origin, selection=parse_selection(select, resolved, selected_by))


def resolve_tables(files: Sequence[str | Path], overrides: Mapping[str, Any] | None = None) -> list[Table]:
    """Resolves config files (or one suite file listing tables) and overrides into tables.

    A suite file has the key ``tables``, a list whose items are config files (relative to the suite) or
    :class:`SuiteEntry` mappings that derive a table from a config: ``{config: base.yaml, set: {name: base-v1,
    protocol.views.count: 1}, methods: [kd]}``; and optionally ``study: {name: NAME}`` (:func:`resolve_study`).

    Args:
        files: Config files merged in order (``--configfile``); empty means the default config.
        overrides: ``--config`` key/value pairs, applied to every table (after a suite entry's ``set``).

    Raises:
        ConfigError: naming the file and the key.
    """
    paths = [Path(f) for f in files] or [Path(DEFAULT_CONFIG)]
    overrides = typed_overrides(overrides or {})
    merged = _merged(paths)
    if "tables" not in merged:
        tables = [_table(paths, overrides)]
    else:
        suite = paths[-1]
        if set(merged) - {"tables", "study"} or not isinstance(merged["tables"], list) or not merged["tables"]:
            raise ConfigError(f"{suite}: a suite file has the key 'tables' (a list of config files or {{config, set,"
                              " methods}} entries) and optionally 'study', and no other key")
        entries = [_suite_entry(suite, i, item) for i, item in enumerate(merged["tables"])]
        tables = [_table([e.config], overrides, e) for e in entries]
    names = [t.name for t in tables]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{paths[-1]}: two tables share the name {dup[0]!r}; give each config its own 'name'"
                          " (a suite entry: set: {name: ...})")
    return tables


@dataclass(frozen=True)
class Study:
    """A suite's study: one report over the run records of all its tables (``kdbench study``).

    Attributes:
        name: The study's result folder, ``results/<name>/``.
        tables: The suite's tables, in order.
    """

    name: str
    tables: tuple[str, ...]

    @property
    def dir(self) -> str:
        return Layout.STUDY.format(study=self.name)


def resolve_study(files: Sequence[str | Path], tables: Sequence[Table]) -> Study | None:
    """The study of a suite file (``study: {name: NAME}`` next to ``tables``), or ``None``.

    Args:
        files: The files given to :func:`resolve_tables`.
        tables: What they resolved to.

    Raises:
        ConfigError: naming the file and the key.
    """
    paths = [Path(f) for f in files] or [Path(DEFAULT_CONFIG)]
    merged = _merged(paths)
    if "tables" not in merged or "study" not in merged:
        return None
    raw, suite = merged["study"], paths[-1]
    if not isinstance(raw, Mapping) or set(raw) != {"name"}:
        raise ConfigError(f"{suite}: key 'study' must be a mapping with the single key 'name' (its result folder)")
    name, names = raw["name"], [t.name for t in tables]
    if not isinstance(name, str) or not name or "/" in name or name in RESERVED or name in names:
        raise ConfigError(f"{suite}: key 'study.name' must be a non-empty string without '/' that is neither a"
                          f" table's name nor one of {', '.join(sorted(RESERVED))} (result folders); got {name!r}")
    return Study(name, tuple(names))


def write_resolved(table: Table) -> Path:
    """Writes the table's resolved config (only when it changed, atomically) and returns its path."""
    path = Path(table.resolved_path)
    text = (f"# Resolved by kdbench from {table.origin}\n# config hash {table.config_hash}; written by the workflow,"
            " do not edit (edit the source file).\n" + yaml.safe_dump(to_jsonable(table.raw), sort_keys=False))
    if not path.exists() or path.read_text() != text:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return path


# --- the jobs ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillJob:
    """One (teacher, student, method label, seed) distillation job of a table."""

    table: str
    teacher: str
    student: str
    label: str
    seed: int

    @property
    def run_dir(self) -> str:
        return Layout.RUN.format(**dataclasses.asdict(self))


@dataclass(frozen=True)
class TeacherKey:
    """A teacher (or a multi-step method's assistant) as the workflow knows it.

    Attributes:
        key: The content-addressed directory name (``cnn_m-1a2b3c4d`` or ``cnn_m-1a2b3c4d.takd-5e6f7a8b``).
        table: The table whose resolved config defines it (the first that needs it).
        teacher: The teacher's name in that table.
        label: The method label whose assistant this is; ``None`` for a teacher.
    """

    key: str
    table: str
    teacher: str
    label: str | None = None

    @property
    def dir(self) -> str:
        return Layout.ASSISTANT.format(akey=self.key) if self.label else Layout.TEACHER.format(tkey=self.key)


@dataclass(frozen=True)
class StoreKey:
    """One teacher-output store: a teacher key's outputs of one tap over one table's data and views."""

    teacher: TeacherKey
    spec: str
    tap: str
    table: str

    @property
    def dir(self) -> str:
        return Layout.STORE.format(key=self.teacher.key, spec=self.spec, tapdir=tap_dirname(self.tap))


def _assistant_model(declared: str | None, teacher_model: str) -> str | None:
    """The model of a declared assistant: a timm name as is, a searched one the teacher's (pruned)."""
    return teacher_model if declared == SEARCHED_ASSISTANT else declared


@functools.lru_cache(maxsize=None)
def _built_info(model: str, num_classes: int, in_chans: int, image_size: int) -> ModelInfo:
    return model_info(create_model(model, num_classes, in_chans, image_size), model, in_chans, image_size)


def _model_info(model: str, data: DataConfig, image_size: int | None) -> ModelInfo:
    """A model's metadata on a dataset (built on the CPU, never trained), for compatibility checks."""
    src = source_info(data)
    return _built_info(model, src.num_classes, src.in_chans, image_size or src.image_size)


def _h(*parts: Any) -> str:
    return stable_hash(list(parts), length=_HASH)


def _reading(data: DataConfig) -> list[dict]:
    """How jobs read the data (``data.stream``, ``workers``, ``shuffle_buffer``) where it differs from the
    defaults: not part of the data's identity (:func:`~kdbench.data.layout.data_identity`), but a model trained
    on streamed data depends on it (the stream's order). Empty while default, so existing keys stay."""
    default = DataConfig()
    changed = {k: getattr(data, k) for k in DATA_READ_KEYS if getattr(data, k) != getattr(default, k)}
    return [changed] if changed else []


def _check_data(table: Table) -> None:
    """The data configs of a table (its own and its teachers') have the keys their sources need, and the table's
    source tells its classes (an image folder's are listed; every model of the table is built for them)."""
    cfg = table.cfg
    datas = [("data", cfg.data)] + [(f"teachers.{n}.data", t.data) for n, t in cfg.teachers.items() if t.data]
    for where, data in datas:
        try:
            check_data_config(data, where)
        except ConfigError as e:
            raise ConfigError(f"{table.origin}: {e}") from None
    try:
        source_info(cfg.data)
    except DatasetError as e:  # an image folder or shards that are not there
        raise DatasetError(f"{table.origin}: key 'data.{location_key(cfg.data)}': {e}") from None


class Plan:
    """Every job of a set of tables and every output path; the workflow and the CLI read paths only here.

    Args:
        tables: The resolved tables.
    """

    def __init__(self, tables: Sequence[Table]) -> None:
        for t in tables:
            _check_data(t)
        self.tables: dict[str, Table] = {t.name: t for t in tables}
        self.skipped: dict[tuple[str, str, str, str], str] = {}  # (table, teacher, student, label) -> reason
        self.jobs = []
        for t in tables:
            for teacher, s in t.cfg.grid():
                for m in t.cfg.methods:
                    reason = self.incompatibility(t.cfg, teacher, s, m)
                    if reason:
                        self.skipped[(t.name, teacher, s, m)] = reason
                        continue
                    self.jobs += [DistillJob(t.name, teacher, s, m, seed) for seed in t.cfg.seeds]
        self.data: dict[str, tuple[str, str | None]] = {}  # data key -> (table, teacher whose data, or None)
        self.teachers: dict[str, TeacherKey] = {}
        self.stores: dict[str, StoreKey] = {}
        for t in tables:
            self.data.setdefault(self.data_key(t.name), (t.name, None))
        for t in tables:
            for teacher in t.cfg.teachers:
                self.data.setdefault(self._teacher_data_key(t.name, teacher), (t.name, teacher))
                tk = self.teacher_key(t.name, teacher)
                self.teachers.setdefault(tk.key, tk)
                self._check_expectation(tk, t.name, teacher)
        for t in tables:
            for (teacher, label) in self.assistants(t.name):
                ak = self.assistant_key(t.name, teacher, label)
                self.teachers.setdefault(ak.key, ak)
                for sk in self.assistant_stores(t.name, teacher, label).values():
                    self.stores.setdefault(sk.dir, sk)
        for job in self.jobs:
            for sk in self.job_stores(job).values():
                self.stores.setdefault(sk.dir, sk)
        if any(t.selection for t in tables):
            self._select()

    def _select(self) -> None:
        """Keeps the jobs of each table's selection and what they need (data, teachers, assistants, stores).

        Everything was first planned for the full tables, so each kept job, key and path, and the table that
        defines each shared job (whose resolved file its command reads), is the full plan's.
        """
        def kept(table: str, teacher: str, student: str, label: str, seed: int | None = None) -> bool:
            sel = self.tables[table].selection
            return sel is None or (sel.keeps_cell(teacher, student, label) if seed is None
                                   else sel.keeps(teacher, student, label, seed))

        self.jobs = [j for j in self.jobs if kept(j.table, j.teacher, j.student, j.label, j.seed)]
        self.skipped = {k: why for k, why in self.skipped.items() if kept(*k)}
        for name, t in self.tables.items():
            if t.selection is not None and not any(j.table == name for j in self.jobs):
                skipped = sum(1 for k in self.skipped if k[0] == name)
                raise ConfigError(f"{t.origin}: key 'select' ({t.selection.render()}) keeps no job of table {name!r}"
                                  + (f": its {skipped} selected cells cannot run (see 'kdbench plan')" if skipped
                                     else ": no pair, method and seed of the table matches every key given"))
        teachers = {tk.key for j in self.jobs if (tk := self.job_teacher(j))}
        stores = {sk.dir for j in self.jobs for sk in self.job_stores(j).values()}
        for name, t in self.tables.items():
            if t.selection is None:  # a table without a selection keeps all its teachers, as before
                teachers |= {self.teacher_key(name, teacher).key for teacher in t.cfg.teachers}
            for teacher, label in self.assistants(name):
                teachers |= {self.teacher_key(name, teacher).key, self.assistant_key(name, teacher, label).key}
                stores |= {sk.dir for sk in self.assistant_stores(name, teacher, label).values()}
        data = {self.data_key(name) for name in self.tables} | {self.teacher_data_key(k) for k in teachers}
        self.teachers = {k: tk for k, tk in self.teachers.items() if k in teachers}
        self.stores = {d: sk for d, sk in self.stores.items() if d in stores}
        self.data = {k: v for k, v in self.data.items() if k in data}

    @classmethod
    def of_config(cls, cfg: Config, selection: Selection | None = None) -> Plan:
        """The plan of one already resolved config (what a job reads), or of a selection of its jobs."""
        return cls([Table(cfg=cfg, origin=cfg.source, selection=selection)])

    @classmethod
    def resolve(cls, files: Sequence[str | Path], overrides: Mapping[str, Any] | None = None) -> Plan:
        return cls(resolve_tables(files, overrides))

    # --- methods of a table

    @staticmethod
    def incompatibility(cfg: Config, teacher: str, student: str, label: str) -> str | None:
        """Why a (teacher, student, method) cell cannot run (the method's own check), or ``None``."""
        entry = cfg.methods[label]
        cls = METHODS.get(entry.method)
        mcfg = cls.make_config(entry.params)
        size = cfg.protocol.image_size
        t_model = _assistant_model(cls.assistant(mcfg), cfg.teachers[teacher].model) or cfg.teachers[teacher].model
        t_size = cfg.teachers[teacher].train.image_size
        t_info = _model_info(t_model, cfg.data, t_size) if cls.teacher_taps(mcfg) else None
        return cls.compatibility(mcfg, t_info, _model_info(student, cfg.data, size))

    def method(self, table: str, label: str):
        """``(method class, built method config)`` of a table's method label."""
        entry = self.tables[table].cfg.methods[label]
        cls = METHODS.get(entry.method)
        return cls, cls.make_config(entry.params)

    def assistant_model(self, table: str, teacher: str, label: str) -> str | None:
        """The model of a method's assistant (a searched one is the teacher's model, pruned: same stages)."""
        cls, mcfg = self.method(table, label)
        return _assistant_model(cls.assistant(mcfg), self.tables[table].cfg.teachers[teacher].model)

    def searched(self, table: str, label: str) -> bool:
        """Whether the label's assistant is searched (AMD) rather than distilled (TAKD)."""
        cls, mcfg = self.method(table, label)
        return cls.assistant(mcfg) == SEARCHED_ASSISTANT

    def assistants(self, table: str) -> list[tuple[str, str]]:
        """``(teacher, label)`` of every assistant a table trains: of a teacher with at least one planned job of
        the label (an assistant whose every student is skipped is not trained)."""
        planned = {(j.teacher, j.label) for j in self.jobs if j.table == table}
        return sorted((t, m) for t, m in planned if self.assistant_model(table, t, m))

    def search_grid(self, akey: str) -> list[Candidate]:
        """A searched assistant's candidates (:func:`kdbench.prune.assistant_grid`), known before anything runs."""
        ak = self.teachers[akey]
        cfg = self.tables[ak.table].cfg
        src = source_info(cfg.data)
        _, mcfg = self.method(ak.table, ak.label)
        return assistant_grid(cfg.teachers[ak.teacher].model, list(cfg.students_of(ak.teacher)), src.num_classes,
                              src.in_chans, cfg.protocol.image_size or src.image_size, mcfg.grid_step)

    def search_dir(self, akey: str) -> str:
        return Layout.SEARCH.format(akey=akey)

    def oracle_runs(self, akey: str) -> dict[str, list[str]]:
        """Student -> the oracle run directories, candidate-major (every seed of candidate 0, then of candidate 1,
        ...: the order the audit reads); empty with ``oracle_seeds: 0``."""
        ak = self.teachers[akey]
        _, mcfg = self.method(ak.table, ak.label)
        n = len(self.search_grid(akey))
        return {s: [Layout.ORACLE.format(akey=akey, student=s, cand=k, seed=i)
                    for k in range(n) for i in range(mcfg.oracle_seeds)]
                for s in self.tables[ak.table].cfg.students_of(ak.teacher)} if mcfg.oracle_seeds else {}

    def audit_file(self, table: str, teacher: str, label: str) -> str:
        return Layout.AUDIT.format(table=table, teacher=teacher, label=label) + ".md"

    def audits(self, table: str) -> list[str]:
        """The audit files of a table's searched assistants."""
        return [self.audit_file(table, t, m) for t, m in self.assistants(table) if self.searched(table, m)]

    # --- keys and directories

    def data_key(self, table: str) -> str:
        data = self.tables[table].cfg.data
        return f"{data.source}-{_h(data_identity(data))}"

    def _teacher_data_key(self, table: str, teacher: str) -> str:
        cfg = self.tables[table].cfg
        data = cfg.teachers[teacher].data or cfg.data
        return f"{data.source}-{_h(data_identity(data))}"

    def data_dir(self, key: str) -> str:
        return Layout.DATA.format(dkey=key)

    def data_config(self, key: str) -> DataConfig:
        """The data config of a data directory (of the table or teacher that defines it)."""
        table, teacher = self.data[key]
        cfg = self.tables[table].cfg
        return (cfg.teachers[teacher].data if teacher else None) or cfg.data

    def job_threads(self, key: str, threads: int = 1) -> int:
        """CPUs (the rule's ``threads``) of a job that reads data directory ``key`` and asks for ``threads``: on
        data its jobs may stream (``data.stream`` true, or ``auto`` on a source whose images may differ in size,
        which only its manifest tells), at least one per ``data.workers`` loader worker plus the main process."""
        return max(threads, self.data_config(key).workers + 1) if self.may_stream(key) else threads

    def may_stream(self, key: str) -> bool:
        """Whether jobs may stream data directory ``key`` (``data.stream`` true, or ``auto`` on encoded images)
        rather than hold it in memory."""
        data = self.data_config(key)
        return data.stream is True or (data.stream == "auto" and is_encoded(data))

    def tap_shape(self, sk: StoreKey) -> tuple[int, ...]:
        """The shape of one sample's output at a store's tap (logits, pre-logits or a ``(C, H, W)`` feature map)."""
        info = _model_info(self.teacher_model(sk.teacher), self.tables[sk.table].cfg.data, None)
        kind, index = parse_tap(sk.tap)
        if kind == "feature":
            return info.feature_shapes[index]
        return (info.num_features,) if kind == "pre_logits" else (info.num_classes,)

    def teacher_data_key(self, key: str) -> str:
        """The data key of the data a teacher (or an assistant: its table's) learns on."""
        tk = self.teachers[key]
        return self.data_key(tk.table) if tk.label else self._teacher_data_key(tk.table, tk.teacher)

    def data_parts(self, key: str) -> list[str]:
        """The part file of every shard group of a data directory (one ``data_shards`` job each); empty when
        ``data.shards_per_job`` is unset (``prepare_data`` then writes every shard itself)."""
        data = self.data_config(key)
        if data.shards_per_job is None:
            return []
        return [Layout.DATA_PART.format(dkey=key, group=f"{g:05d}") for g in range(group_count(data))]

    def teacher_key(self, table: str, teacher: str) -> TeacherKey:
        cfg = self.tables[table].cfg
        t: TeacherConfig = cfg.teachers[teacher]
        reading = [] if t.checkpoint else _reading(t.data or cfg.data)  # a loaded teacher reads no training data
        digest = [t.sha256] if t.sha256 else []  # a stated sha256 names the weights (absent: keys as before)
        key = f"{teacher}-{_h(t.model, t.checkpoint, t.train, self._teacher_data_key(table, teacher), *reading, *digest)}"
        return self.teachers.get(key) or TeacherKey(key, table, teacher)

    def _expectation(self, table: str, teacher: str) -> tuple[float, float] | None:
        """``(expected_top1, top1_tolerance)`` of a checkpoint teacher that states its accuracy, else ``None``."""
        t = self.tables[table].cfg.teachers[teacher]
        return (t.expected_top1, t.top1_tolerance) if t.checkpoint and t.expected_top1 is not None else None

    def _check_expectation(self, tk: TeacherKey, table: str, teacher: str) -> None:
        """Two tables that share a teacher (one key, one checkpoint) state the same accuracy for it."""
        mine, first = self._expectation(table, teacher), self._expectation(tk.table, tk.teacher)
        if mine != first:
            def said(e: tuple[float, float] | None) -> str:
                return f"{e[0]} ± {e[1]}" if e else "nothing"

            raise ConfigError(
                f"{self.tables[table].origin}: key 'teachers.{teacher}.expected_top1' says {said(mine)}, but table"
                f" {tk.table!r} loads the same checkpoint (teacher {tk.key}) as 'teachers.{tk.teacher}' and says"
                f" {said(first)}. Fix: state the same 'expected_top1' and 'top1_tolerance' in both (one checkpoint"
                " has one accuracy)"
            )

    def teacher_verification(self, key: str) -> str | None:
        """The ``verified.json`` of a teacher whose checkpoint states ``expected_top1`` (its ``verify_teacher``
        job, which its teacher job waits for); ``None`` for any other teacher and for assistants."""
        tk = self.teachers[key]
        if tk.label or self._expectation(tk.table, tk.teacher) is None:
            return None
        return Layout.TEACHER_VERIFIED.format(tkey=key)

    def verification_spec(self, key: str) -> str:
        """Rerun trigger of a teacher's verification: the accuracy it checks against (the sha256 is in the key)."""
        tk = self.teachers[key]
        return _h(self._expectation(tk.table, tk.teacher))

    def teacher_data_dir(self, key: str) -> str:
        return self.data_dir(self.teacher_data_key(key))

    def assistant_key(self, table: str, teacher: str, label: str) -> TeacherKey:
        cfg = self.tables[table].cfg
        tk = self.teacher_key(table, teacher)
        spec = _h(self.data_key(table), cfg.protocol, cfg.cache, hashed_entry(cfg.methods[label]), *_reading(cfg.data))
        key = f"{tk.key}.{label}-{spec}"
        return self.teachers.get(key) or TeacherKey(key, table, teacher, label)

    def job_teacher(self, job: DistillJob) -> TeacherKey | None:
        """The teacher (or assistant) a job distils from; ``None`` when the method reads no teacher."""
        cls, mcfg = self.method(job.table, job.label)
        if not cls.teacher_taps(mcfg):
            return None
        if cls.assistant(mcfg):
            return self.assistant_key(job.table, job.teacher, job.label)
        return self.teacher_key(job.table, job.teacher)

    def teacher_model(self, tk: TeacherKey) -> str:
        """The timm model of a teacher key: the teacher's, or its assistant's (a searched one: the teacher's, pruned)."""
        if tk.label:
            return self.assistant_model(tk.table, tk.teacher, tk.label)
        return self.tables[tk.table].cfg.teachers[tk.teacher].model

    def _stores_of(self, table: str, tk: TeacherKey, taps: set[str]) -> dict[str, StoreKey]:
        cfg = self.tables[table].cfg
        n = len(_model_info(self.teacher_model(tk), cfg.data, None).feature_shapes)
        numerics = Numerics.of(cfg.protocol).delta()  # the teacher's forward (bf16, memory format); {} by default
        spec = _h(self.data_key(table), cfg.protocol.views, cfg.cache, cfg.protocol.eval_batch_size,
                  *([numerics] if numerics else []))
        return {tap: StoreKey(tk, spec, normalize_tap(tap, n), table) for tap in sorted(taps)}

    def job_stores(self, job: DistillJob) -> dict[str, StoreKey]:
        """Declared tap -> store of a job (empty for live-teacher methods, for an entry with ``teacher_source:
        live`` and for the student alone: the distill job then runs the teacher online)."""
        cls, mcfg = self.method(job.table, job.label)
        tk = self.job_teacher(job)
        live = self.tables[job.table].cfg.methods[job.label].teacher_source == "live"
        if tk is None or live or cls.requirements(mcfg).live_teacher:
            return {}
        return self._stores_of(job.table, tk, cls.teacher_taps(mcfg))

    def assistant_stores(self, table: str, teacher: str, label: str) -> dict[str, StoreKey]:
        """Stores of the teacher that an assistant is distilled from (the method's own taps)."""
        cls, mcfg = self.method(table, label)
        return self._stores_of(table, self.teacher_key(table, teacher), cls.teacher_taps(mcfg))

    def store_shards(self, store_dir: str) -> list[str]:
        sk = self.stores[store_dir]
        n = shard_counts(self.tables[sk.table].cfg.data)["train"]
        return [f"{store_dir}/{shard_file(i)}" for i in range(n)]

    # --- per-table outputs

    def leaderboard_dir(self, table: str) -> str:
        return Layout.LEADERBOARD.format(table=table)

    def published_dir(self, table: str) -> str:
        return Layout.PUBLISHED.format(table=table)

    def compare_file(self, table: str) -> str:
        return Layout.COMPARE.format(table=table)

    def store(self, key: str, spec: str, tapdir: str) -> StoreKey:
        """The store of the workflow's ``{key}/{spec}/{tapdir}`` wildcards."""
        return self.stores[Layout.STORE.format(key=key, spec=spec, tapdir=tapdir)]

    def records(self, table: str) -> list[str]:
        return [f"{j.run_dir}/record.json" for j in self.jobs if j.table == table]

    def table_hash(self, table: str) -> str:
        """Rerun trigger of a leaderboard: everything that defines the table (name, protocol, grid)."""
        return self.tables[table].config_hash

    def job(self, table: str, teacher: str, student: str, label: str, seed: int | str) -> DistillJob:
        return DistillJob(table, teacher, student, label, int(seed))

    def job_hash(self, job: DistillJob) -> str:
        """Rerun trigger of a job: protocol, cache policy, data, its method entry and its teacher.

        (Data, teachers, assistants and stores need none: their paths are hashes of what defines them.)
        """
        cfg = self.tables[job.table].cfg
        tk = self.job_teacher(job)
        data = dataclasses.replace(cfg.data, shards_per_job=None)  # how the data jobs are split changes no run
        return _h(cfg.protocol, cfg.cache, data, hashed_entry(cfg.methods[job.label]), tk.key if tk else None)

    def render(self) -> str:
        """A plain-text summary: per table its resolved file and jobs; the shared data, teachers and stores."""
        lines = []
        for name, table in self.tables.items():
            jobs = [j for j in self.jobs if j.table == name]
            selected = f" of a selection ({table.selection.render()})" if table.selection else ""
            lines += [f"table {name} (config {table.config_hash}) <- {table.origin}",
                      f"  resolved config: {table.resolved_path}",
                      f"  {len(jobs)} distill jobs{selected} -> {Layout.TABLE.format(table=name)}/runs/",
                      f"  leaderboard: {self.leaderboard_dir(name)}/"]
        lines += [f"data {self.data_dir(k)}" for k in self.data]
        lines += [f"{'assistant' if t.label else 'teacher'} {t.dir}" for t in self.teachers.values()]
        lines += [f"verify teacher {v}" for k in self.teachers if (v := self.teacher_verification(k))]
        lines += [f"store {d} ({len(self.store_shards(d))} shards)" for d in self.stores]
        return "\n".join(lines)
