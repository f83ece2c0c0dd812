"""The grid a config implies, computed from the config alone (no data, no weights): which teachers and
assistants to train, which stores to cache (the union of the taps the methods declare, per teacher), and
one distill cell per (teacher, student, method, seed). The workflow's ``common.smk`` is a thin layer over
this, so ``snakemake -n`` shows exactly the jobs a method adds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from kdbench.cache.store import tap_dirname
from kdbench.config import Config
from kdbench.methods.base import METHODS
from kdbench.models import create_model
from kdbench.taps import normalize_tap


@dataclass(frozen=True)
class Cell:
    """One distill job."""

    teacher: str
    student: str
    method: str
    seed: int

    @property
    def path(self) -> str:
        return f"runs/{self.teacher}/{self.student}/{self.method}/seed{self.seed}"


@functools.lru_cache(maxsize=None)
def _num_stages(model: str) -> int:
    return len(create_model(model, num_classes=10, in_chans=3, img_size=32).feature_info)


class Plan:
    """The jobs of a config. Paths are relative to the config's results directory.

    Teacher keys (``tkey``): a config teacher's name, or ``<teacher>.<method label>`` for the assistant a
    multi-step method (TAKD) distils from that teacher; each key has a teacher directory and stores.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.cells = [
            Cell(t, s, m, seed) for t in cfg.teachers for s in cfg.students for m in cfg.methods for seed in cfg.seeds
        ]

    def _method(self, label: str):
        entry = self.cfg.methods[label]
        cls = METHODS.get(entry.method)
        return cls, cls.make_config(entry.params)

    def assistant(self, label: str) -> str | None:
        cls, mcfg = self._method(label)
        return cls.assistant(mcfg)

    def tkey(self, teacher: str, label: str) -> str | None:
        """The teacher key a cell distils from (``None``: no teacher needed)."""
        cls, mcfg = self._method(label)
        if not cls.teacher_taps(mcfg):
            return None
        return f"{teacher}.{label}" if cls.assistant(mcfg) else teacher

    def teacher_model(self, tkey: str) -> str:
        teacher, _, label = tkey.partition(".")
        return self.assistant(label) if label else self.cfg.teachers[teacher].model

    def teacher_dir(self, tkey: str) -> str:
        teacher, _, label = tkey.partition(".")
        return f"assistants/{teacher}/{label}" if label else f"teachers/{teacher}"

    def assistants(self) -> list[tuple[str, str]]:
        """``(teacher, label)`` of every assistant to train."""
        return sorted({(t, m) for t in self.cfg.teachers for m in self.cfg.methods if self.assistant(m)})

    def cell_stores(self, cell: Cell) -> dict[str, str]:
        """Declared tap -> store directory of a cell (empty for live-teacher methods and the baseline)."""
        cls, mcfg = self._method(cell.method)
        tkey = self.tkey(cell.teacher, cell.method)
        if tkey is None or cls.requirements(mcfg).live_teacher:
            return {}
        n = _num_stages(self.teacher_model(tkey))
        return {tap: f"cache/{tkey}/{tap_dirname(normalize_tap(tap, n))}" for tap in sorted(cls.teacher_taps(mcfg))}

    def stores(self) -> list[str]:
        """Every store directory, deduplicated (one per teacher key and normalised tap)."""
        return sorted({d for cell in self.cells for d in self.cell_stores(cell).values()})

    def assistant_stores(self, teacher: str, label: str) -> dict[str, str]:
        """Stores of the teacher that an assistant is distilled from (the method's own taps)."""
        cls, mcfg = self._method(label)
        n = _num_stages(self.cfg.teachers[teacher].model)
        return {tap: f"cache/{teacher}/{tap_dirname(normalize_tap(tap, n))}" for tap in sorted(cls.teacher_taps(mcfg))}

    def all_stores(self) -> list[str]:
        extra = {d for t, m in self.assistants() for d in self.assistant_stores(t, m).values()}
        return sorted(set(self.stores()) | extra)
