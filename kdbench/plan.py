"""The resolved plan: config files + ``--config`` overrides -> tables -> every job and every output path.

A config is resolved **once** (:func:`resolve_tables`): the files are merged in order, the overrides are applied
on top (``seeds=[0,1]``, or a dotted key such as ``protocol.epochs=5``), a teacher given as
``{from: other-config.yaml}`` is replaced by that config's teacher (its model, checkpoint, training protocol
and training data, written out in full), and a suite file (``tables: [a.yaml, b.yaml]``) becomes one table per
listed config. Every table's resolved config is written to ``results/<table>/config-<hash>.resolved.yaml`` (a
new file for every distinct config, so a record's config file never changes under it) and every
job of that table reads that file.

:class:`Plan` turns the tables into jobs and is the only place that knows an output path. Upstream work is
content-addressed, so two tables that need the same data, teacher or store share one job:

* data shards:     ``results/data/<source>-<hash of the data config>/``
* teachers:        ``results/teachers/<name>-<hash of model, checkpoint, training protocol, training data>/``
* assistants:      ``results/assistants/<teacher key>.<label>-<hash of table data, protocol, cache, method>/``
* stores:          ``results/cache/<teacher or assistant key>/<hash of data, views, cache policy>/<tap>/``
* runs:            ``results/<table>/runs/<teacher>/<student>/<label>/seed<k>/``
* leaderboards:    ``results/<table>/leaderboard/``; the check against ``results/published/<table>/``:
  ``results/<table>/compare.md``.
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
    Config,
    ConfigError,
    TeacherConfig,
    config_hash,
    parse_config,
    read_config_file,
    to_raw,
)
from kdbench.data.sources import SOURCES, shard_counts
from kdbench.methods import METHODS
from kdbench.models import ModelInfo, create_model, model_info
from kdbench.taps import normalize_tap, tap_dirname

RESULTS = "results"
DEFAULT_CONFIG = "workflow/config/config.yaml"
RESERVED = frozenset({"data", "teachers", "assistants", "cache", "published", "logs"})
_HASH = 8


SHARD_NAME = "shard-{shard}.h5"  # a store's file per data shard; {shard}: the shard's index, 5 digits


def shard_file(index: int) -> str:
    """The file name of a store's shard ``index``."""
    return SHARD_NAME.format(shard=f"{index:05d}")


class Layout:
    """Every output path pattern, with the workflow's wildcards; the ``.smk`` files use these and no others."""

    DATA = f"{RESULTS}/data/{{dkey}}"
    TEACHER = f"{RESULTS}/teachers/{{tkey}}"
    ASSISTANT = f"{RESULTS}/assistants/{{akey}}"
    STORE = f"{RESULTS}/cache/{{key}}/{{spec}}/{{tapdir}}"
    SHARD = f"{STORE}/{SHARD_NAME}"
    TABLE = f"{RESULTS}/{{table}}"
    RESOLVED = f"{TABLE}/config-{{config_hash}}.resolved.yaml"
    RUN = f"{TABLE}/runs/{{teacher}}/{{student}}/{{label}}/seed{{seed}}"
    LEADERBOARD = f"{TABLE}/leaderboard"
    COMPARE = f"{TABLE}/compare.md"
    PUBLISHED = f"{RESULTS}/published/{{table}}"
    LOGS = f"{RESULTS}/logs"
    TABLE_LOGS = f"{TABLE}/logs"


# --- resolving config files + overrides --------------------------------------------------------------------


def deep_update(base: dict, new: Mapping) -> dict:
    """Merges ``new`` into ``base`` in place (mappings recursively, everything else replaced), like Snakemake."""
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def apply_overrides(raw: dict, overrides: Mapping[str, Any]) -> dict:
    """Applies ``--config`` overrides; a dotted key (``protocol.epochs``) reaches into nested mappings."""
    for key, value in overrides.items():
        *parents, last = str(key).split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--config {key}=...: '{p}' is not a mapping in the config")
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
        raw["teachers"][tname] = {"model": t.model, "checkpoint": t.checkpoint, "train": to_jsonable(t.train),
                                  "data": to_jsonable(t.data or other.data)}
    return raw


@dataclass(frozen=True)
class Table:
    """One leaderboard: a resolved config and where it came from.

    Attributes:
        cfg: The parsed config (its ``source`` is the resolved file every job reads).
        origin: The config files and overrides it was resolved from, for the resolved file's header.
    """

    cfg: Config
    origin: str

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


def _table(files: Sequence[Path], overrides: Mapping[str, Any]) -> Table:
    raw = apply_overrides(_merged(files), overrides)
    raw = _expand_teacher_refs(raw, files[-1])
    origin = " + ".join(str(f) for f in files)
    if overrides:
        origin += " + --config " + " ".join(f"{k}={v!r}" for k, v in overrides.items())
    cfg = parse_config(raw, source=origin)  # errors name the files and overrides the user wrote
    if cfg.name in RESERVED:
        raise ConfigError(f"{origin}: key 'name' must not be one of {', '.join(sorted(RESERVED))} (result folders)")
    source = Layout.RESOLVED.format(table=cfg.name, config_hash=config_hash(cfg))
    return Table(cfg=parse_config(to_raw(cfg), source=source), origin=origin)  # as the jobs will read it


def resolve_tables(files: Sequence[str | Path], overrides: Mapping[str, Any] | None = None) -> list[Table]:
    """Resolves config files (or one suite file listing tables) and overrides into tables.

    Args:
        files: Config files merged in order (``--configfile``); empty means the default config.
        overrides: ``--config`` key/value pairs, applied to every table.

    Raises:
        ConfigError: naming the file and the key.
    """
    paths = [Path(f) for f in files] or [Path(DEFAULT_CONFIG)]
    overrides = typed_overrides(overrides or {})
    merged = _merged(paths)
    if "tables" not in merged:
        tables = [_table(paths, overrides)]
    else:
        if set(merged) != {"tables"} or not isinstance(merged["tables"], list) or not merged["tables"]:
            raise ConfigError(f"{paths[-1]}: a suite file has exactly one key, 'tables': a list of config files")
        tables = [_table([paths[-1].parent / str(t)], overrides) for t in merged["tables"]]
    names = [t.name for t in tables]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{paths[-1]}: two tables share the name {dup[0]!r}; give each config its own 'name'")
    return tables


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


@functools.lru_cache(maxsize=None)
def _model_info(model: str, source: str, image_size: int | None) -> ModelInfo:
    """A model's metadata on a data source (built on the CPU, never trained), for compatibility checks."""
    src = SOURCES.get(source)
    size = image_size or src.image_size
    return model_info(create_model(model, src.num_classes, src.in_chans, size), model, src.in_chans, size)


def _h(*parts: Any) -> str:
    return stable_hash(list(parts), length=_HASH)


class Plan:
    """Every job of a set of tables and every output path; the workflow and the CLI read paths only here.

    Args:
        tables: The resolved tables.
    """

    def __init__(self, tables: Sequence[Table]) -> None:
        self.tables: dict[str, Table] = {t.name: t for t in tables}
        self.skipped: dict[tuple[str, str, str, str], str] = {}  # (table, teacher, student, label) -> reason
        self.jobs = []
        for t in tables:
            for teacher in t.cfg.teachers:
                for s in t.cfg.students:
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
        for t in tables:
            for (teacher, label) in self.assistants(t.name):
                ak = self.assistant_key(t.name, teacher, label)
                self.teachers.setdefault(ak.key, ak)
                for sk in self.assistant_stores(t.name, teacher, label).values():
                    self.stores.setdefault(sk.dir, sk)
        for job in self.jobs:
            for sk in self.job_stores(job).values():
                self.stores.setdefault(sk.dir, sk)

    @classmethod
    def of_config(cls, cfg: Config) -> Plan:
        """The plan of one already resolved config (what a job reads)."""
        return cls([Table(cfg=cfg, origin=cfg.source)])

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
        t_model = cls.assistant(mcfg) or cfg.teachers[teacher].model
        t_info = _model_info(t_model, cfg.data.source, cfg.teachers[teacher].train.image_size) if cls.teacher_taps(mcfg) else None
        return cls.compatibility(mcfg, t_info, _model_info(student, cfg.data.source, size))

    def method(self, table: str, label: str):
        """``(method class, built method config)`` of a table's method label."""
        entry = self.tables[table].cfg.methods[label]
        cls = METHODS.get(entry.method)
        return cls, cls.make_config(entry.params)

    def assistant_model(self, table: str, label: str) -> str | None:
        cls, mcfg = self.method(table, label)
        return cls.assistant(mcfg)

    def assistants(self, table: str) -> list[tuple[str, str]]:
        """``(teacher, label)`` of every assistant a table trains."""
        cfg = self.tables[table].cfg
        return sorted((t, m) for t in cfg.teachers for m in cfg.methods if self.assistant_model(table, m))

    # --- keys and directories

    def data_key(self, table: str) -> str:
        data = self.tables[table].cfg.data
        return f"{data.source}-{_h(data)}"

    def _teacher_data_key(self, table: str, teacher: str) -> str:
        cfg = self.tables[table].cfg
        data = cfg.teachers[teacher].data or cfg.data
        return f"{data.source}-{_h(data)}"

    def data_dir(self, key: str) -> str:
        return Layout.DATA.format(dkey=key)

    def teacher_key(self, table: str, teacher: str) -> TeacherKey:
        cfg = self.tables[table].cfg
        t: TeacherConfig = cfg.teachers[teacher]
        key = f"{teacher}-{_h(t.model, t.checkpoint, t.train, self._teacher_data_key(table, teacher))}"
        return self.teachers.get(key) or TeacherKey(key, table, teacher)

    def teacher_data_dir(self, key: str) -> str:
        tk = self.teachers[key]
        if tk.label:  # an assistant learns on its table's data
            return self.data_dir(self.data_key(tk.table))
        return self.data_dir(self._teacher_data_key(tk.table, tk.teacher))

    def assistant_key(self, table: str, teacher: str, label: str) -> TeacherKey:
        cfg = self.tables[table].cfg
        tk = self.teacher_key(table, teacher)
        spec = _h(self.data_key(table), cfg.protocol, cfg.cache, cfg.methods[label])
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

    def _stores_of(self, table: str, tk: TeacherKey, taps: set[str]) -> dict[str, StoreKey]:
        cfg = self.tables[table].cfg
        model = self.assistant_model(tk.table, tk.label) if tk.label else self.tables[tk.table].cfg.teachers[tk.teacher].model
        n = len(_model_info(model, cfg.data.source, None).feature_shapes)
        spec = _h(self.data_key(table), cfg.protocol.views, cfg.cache, cfg.protocol.eval_batch_size)
        return {tap: StoreKey(tk, spec, normalize_tap(tap, n), table) for tap in sorted(taps)}

    def job_stores(self, job: DistillJob) -> dict[str, StoreKey]:
        """Declared tap -> store of a job (empty for live-teacher methods and the student alone)."""
        cls, mcfg = self.method(job.table, job.label)
        tk = self.job_teacher(job)
        if tk is None or cls.requirements(mcfg).live_teacher:
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
        return _h(cfg.protocol, cfg.cache, cfg.data, cfg.methods[job.label], tk.key if tk else None)

    def render(self) -> str:
        """A plain-text summary: per table its resolved file and jobs; the shared data, teachers and stores."""
        lines = []
        for name, table in self.tables.items():
            jobs = [j for j in self.jobs if j.table == name]
            lines += [f"table {name} (config {table.config_hash}) <- {table.origin}",
                      f"  resolved config: {table.resolved_path}",
                      f"  {len(jobs)} distill jobs -> {Layout.TABLE.format(table=name)}/runs/",
                      f"  leaderboard: {self.leaderboard_dir(name)}/"]
        lines += [f"data {self.data_dir(k)}" for k in self.data]
        lines += [f"{'assistant' if t.label else 'teacher'} {t.dir}" for t in self.teachers.values()]
        lines += [f"store {d} ({len(self.store_shards(d))} shards)" for d in self.stores]
        return "\n".join(lines)
