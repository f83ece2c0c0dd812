"""What a cache, check or distill job opens: the device, the data's metadata and splits, the teacher (module
and metrics), the view renderer and the identity a store of this teacher must have. One helper, so that the
builder, the checker and the student open them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from kdbench._util import sha256_file
from kdbench.cache.store import store_identity
from kdbench.config import Config
from kdbench.data.shards import Split, load_split, read_manifest
from kdbench.data.stream import StreamedSplit, streams
from kdbench.data.views import BoundShardRenderer, ViewRenderer
from kdbench.meta import DataInfo, data_info
from kdbench.modeldir import load_teacher, read_teacher_metrics
from kdbench.numerics import Numerics
from kdbench.runtime import setup


@dataclass(frozen=True)
class JobInputs:
    """A job's opened inputs.

    Attributes:
        cfg: The (resolved) config.
        data_dir: The data directory.
        device: Where the job computes.
        data: The dataset's metadata.
        teacher: The frozen teacher in eval mode, or ``None`` (no teacher, or only its metrics were read).
        tmeta: The teacher directory's ``metrics.json``, or ``None`` without a teacher.
        streaming: The job streams the data (``data.stream``, :func:`kdbench.data.stream.streams`).
    """

    cfg: Config
    data_dir: Path
    device: torch.device
    data: DataInfo
    teacher: nn.Module | None
    tmeta: dict | None
    streaming: bool = False
    _loaded: dict = field(default_factory=dict, repr=False, compare=False)

    def split(self, name: str, shards: list[int] | None = None) -> Split | StreamedSplit:
        """Split ``name`` (``shards``: only those), loaded into memory or streamed as the job reads data. A split
        in memory is read (and its shards checked) once per job, however often the job asks for it."""
        if self.streaming:
            return StreamedSplit.open(self.data_dir, name, self.cfg.data, shards)
        key = (name, None if shards is None else tuple(shards))
        if key not in self._loaded:
            self._loaded[key] = load_split(self.data_dir, name, shards=shards)
        return self._loaded[key]

    def renderer(self, split: Split | StreamedSplit) -> ViewRenderer | BoundShardRenderer:
        """The renderer of the protocol's view recipe over ``split`` (a streamed split: one shard of it)."""
        if isinstance(split, StreamedSplit):
            return split.bound_renderer(self.cfg.protocol.views, self.data.mean, self.data.std)
        return ViewRenderer.for_split(self.cfg.protocol.views, split, self.data)

    @property
    def numerics(self) -> Numerics:
        """The forward numerics of the table's protocol: the students' and the teacher's outputs for them."""
        return Numerics.of(self.cfg.protocol)

    def store_identity(self, tap: str) -> dict:
        """The manifest fields a store of ``tap`` of this teacher, views and cache policy must carry."""
        return store_identity(self.tmeta["sha256"], tap, self.cfg.protocol.views, self.cfg.cache,
                              self.tmeta["image_size"], self.numerics.delta())

    def data_manifest_sha256(self) -> str:
        return sha256_file(self.data_dir / "manifest.json")


def open_inputs(cfg: Config, data_dir: Path, teacher_dir: Path | None = None, load_model: bool = True) -> JobInputs:
    """Opens a job's inputs; the teacher module is loaded only when ``teacher_dir`` and ``load_model`` are set.

    Raises:
        FileNotFoundError, CheckpointError: A missing data manifest or a teacher that does not match its digest.
    """
    data_dir = Path(data_dir)
    device = setup(cfg.runtime)
    manifest = read_manifest(data_dir)
    data = data_info(manifest)
    teacher, tmeta = None, None
    if teacher_dir is not None:
        if load_model:
            teacher, tmeta = load_teacher(Path(teacher_dir), data, device, Numerics.of(cfg.protocol))
        else:
            tmeta = read_teacher_metrics(Path(teacher_dir))
    return JobInputs(cfg, data_dir, device, data, teacher, tmeta, streams(cfg.data, manifest, data_dir))
