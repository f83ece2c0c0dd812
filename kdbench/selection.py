"""A selection: part of a table to run, without editing or copying its config (``select:``).

``--config 'select={pairs: [[resnet56, resnet20]], methods: [kd, crd], seeds: [0]}'`` plans only the table's
jobs of those pairs, method labels and seeds. A selection is not part of the table: it is left out of the
resolved config and of every hash, so each selected job has exactly the path, rerun trigger and inputs it has in
the full table, and a later run of the full table reuses it (:class:`kdbench.plan.Plan` resolves the full table
and then drops the jobs outside the selection). The table's leaderboard says that it shows a selection.

Keys, each optional (a job is kept when it matches every key given):

* ``pairs``: ``[teacher, student]`` pairs of the table's grid (teacher: its name under ``teachers``);
* ``teachers``: teacher names; ``students``: student model names;
* ``methods``: method labels (keys of ``methods``);
* ``seeds``: seeds of the table's ``seeds``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kdbench._util import did_you_mean
from kdbench.config import Config
from kdbench.errors import ConfigError

SELECT_KEYS = ("pairs", "teachers", "students", "methods", "seeds")


@dataclass(frozen=True)
class Selection:
    """The cells and seeds of a table that are planned; ``None`` for a key keeps all of it."""

    pairs: tuple[tuple[str, str], ...] | None = None
    teachers: tuple[str, ...] | None = None
    students: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None
    seeds: tuple[int, ...] | None = None

    def keeps_cell(self, teacher: str, student: str, label: str) -> bool:
        """Whether the (teacher, student, method label) cell is selected."""
        return ((self.pairs is None or (teacher, student) in self.pairs)
                and (self.teachers is None or teacher in self.teachers)
                and (self.students is None or student in self.students)
                and (self.methods is None or label in self.methods))

    def keeps(self, teacher: str, student: str, label: str, seed: int) -> bool:
        """Whether the job is selected."""
        return self.keeps_cell(teacher, student, label) and (self.seeds is None or seed in self.seeds)

    def to_raw(self) -> dict[str, list]:
        """The ``select:`` mapping of the keys given (what :func:`parse_selection` reads back)."""
        return {k: [list(v) if isinstance(v, tuple) else v for v in getattr(self, k)]
                for k in SELECT_KEYS if getattr(self, k) is not None}

    def render(self) -> str:
        """One line for people: ``pairs resnet56/resnet20; methods kd, crd; seeds 0``."""
        parts = []
        for key in SELECT_KEYS:
            value = getattr(self, key)
            if value is not None:
                items = ["/".join(v) if isinstance(v, tuple) else str(v) for v in value]
                parts.append(f"{key} {', '.join(items)}")
        return "; ".join(parts)


def parse_selection(raw: Any, cfg: Config, where: str) -> Selection | None:
    """Checks a ``select:`` mapping against the table it selects from.

    Args:
        raw: The ``select`` value (a mapping; ``None`` or an empty mapping selects everything).
        cfg: The full table's config.
        where: The config files and overrides, for messages.

    Returns:
        The selection, or ``None`` when nothing is left out.

    Raises:
        ConfigError: one line naming ``where``, the key (``select.methods[1]``) and the table's valid names.
    """
    if raw is None or raw == {}:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: key 'select' must be a mapping with any of {', '.join(SELECT_KEYS)}, e.g."
                          " select={pairs: [[resnet56, resnet20]], methods: [kd], seeds: [0]}")
    unknown = [k for k in raw if k not in SELECT_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key 'select.{unknown[0]}'; valid keys of 'select':"
                          f" {', '.join(SELECT_KEYS)}{did_you_mean(unknown[0], SELECT_KEYS)}")
    grid = cfg.grid()
    valid: dict[str, Sequence[Any]] = {
        "teachers": list(cfg.teachers),
        "students": list(dict.fromkeys(s for _, s in grid)),
        "methods": list(cfg.methods),
        "seeds": list(cfg.seeds),
    }
    what = {"teachers": "a teacher name under 'teachers'", "students": "a student of the table",
            "methods": "a method label under 'methods'", "seeds": "one of the table's 'seeds'"}
    out: dict[str, tuple] = {}
    for key, items in raw.items():
        if items is None:
            continue
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{where}: key 'select.{key}' must be a non-empty list")
        if key == "pairs":
            out[key] = tuple(_pair(item, i, cfg, grid, where) for i, item in enumerate(items))
            continue
        for i, item in enumerate(items):
            if item not in valid[key] or isinstance(item, bool):
                choices = ", ".join(str(v) for v in valid[key])
                raise ConfigError(f"{where}: key 'select.{key}[{i}]': {item!r} is not {what[key]}; the table's:"
                                  f" {choices}{did_you_mean(item, valid[key])}")
        out[key] = tuple(dict.fromkeys(items))
    return Selection(**out) if out else None


def _pair(item: Any, i: int, cfg: Config, grid: list[tuple[str, str]], where: str) -> tuple[str, str]:
    key = f"select.pairs[{i}]"
    if not (isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)):
        raise ConfigError(f"{where}: key '{key}' must be [teacher, student] (a teacher's name under 'teachers', a"
                          f" student model), got {item!r}")
    teacher, student = item
    if teacher not in cfg.teachers:
        models = {t.model: name for name, t in cfg.teachers.items()}
        hint = (f"; the teacher of model {teacher!r} is named {models[teacher]!r}" if teacher in models
                else did_you_mean(teacher, cfg.teachers))
        raise ConfigError(f"{where}: key '{key}': {teacher!r} is not a teacher name under 'teachers' (the table's:"
                          f" {', '.join(cfg.teachers)}){hint}")
    if (teacher, student) not in grid:
        students = [s for t, s in grid if t == teacher]
        raise ConfigError(f"{where}: key '{key}': [{teacher}, {student}] is not a pair of the table; teacher"
                          f" {teacher!r} distils into {', '.join(students)}{did_you_mean(student, students)}")
    return teacher, student
