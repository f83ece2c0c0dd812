"""A data directory's layout: which sample goes into which shard, and which job writes which shards.

::

    <data dir>/train-00000.tar … val-00000.tar … test-00000.tar   # shards, in this global order
    <data dir>/parts/group-00000.json …                             # fan-out only: one per shard group job
    <data dir>/manifest.json                                        # written last

Splits: ``val`` is ``data.val_size`` samples held out (seeded) of the source's training split, ``train`` the
rest (``train_limit`` applies), ``test`` the source's test split (``test_limit`` applies); shard ``i`` of a
split holds its samples ``[i * shard_size, (i + 1) * shard_size)`` in key order. Groups: the global shard list
cut into runs of ``data.shards_per_job`` shards (one group of all shards when unset); the workflow writes one
group per ``data_shards`` job. The plan and the shard writer both read this module, so they agree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from kdbench.config import DATA_READ_KEYS, DataConfig
from kdbench.data.sources import shard_counts, source_sizes, split_sizes

FORMAT_VERSION = 2
"""Of ``manifest.json``: 2 added ``encoding`` and ``native_size`` (version 1 is read as ``pnm``)."""
SPLITS = ("train", "val", "test")
SOURCE_SPLIT = {"train": "train", "val": "train", "test": "test"}
"""Our split -> the source split its samples (and keys) come from."""
PART_NAME = "parts/group-{group}.json"
"""A group's part file in the data directory; ``{group}``: the group's index, 5 digits."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.tar"


def part_file(group: int) -> str:
    return PART_NAME.format(group=f"{group:05d}")


def data_identity(cfg: DataConfig) -> DataConfig:
    """The data config without what only changes how the work is split (``shards_per_job``) or how the shards are
    read (``stream``, ``workers``, ``shuffle_buffer``: in the distill jobs' hash, not in the data's): what names a
    data directory and is recorded in its manifest."""
    read = {f.name: f.default for f in dataclasses.fields(cfg) if f.name in DATA_READ_KEYS}
    return dataclasses.replace(cfg, shards_per_job=None, **read)


def split_indices(cfg: DataConfig, n_train_all: int, n_test: int) -> dict[str, np.ndarray]:
    """The sorted source keys of each split."""
    perm = np.random.default_rng(cfg.split_seed).permutation(n_train_all)
    val = np.sort(perm[: cfg.val_size])
    train = np.sort(perm[cfg.val_size :])
    if cfg.train_limit is not None:
        # A seeded subset of the training split, kept in source order.
        train = np.sort(np.random.default_rng(cfg.split_seed + 1).permutation(train)[: cfg.train_limit])
    test = np.arange(n_test if cfg.test_limit is None else min(n_test, cfg.test_limit))
    return {"train": train, "val": val, "test": test}


@dataclass(frozen=True, eq=False)
class ShardSpec:
    """One shard to write.

    Attributes:
        split: ``train``, ``val`` or ``test``.
        index: The shard's index in its split.
        keys: ``int64 [n]``, the source keys of its samples, ascending.
    """

    split: str
    index: int
    keys: np.ndarray

    @property
    def file(self) -> str:
        return shard_name(self.split, self.index)


def group_count(cfg: DataConfig) -> int:
    """Number of shard groups (``data_shards`` jobs); cheap (counts only)."""
    total = sum(shard_counts(cfg).values())
    return 1 if cfg.shards_per_job is None else -(-total // cfg.shards_per_job)


def shard_groups(cfg: DataConfig) -> list[list[ShardSpec]]:
    """Every shard of the data directory, cut into the groups that one job each writes."""
    split_sizes(cfg)  # checks the config
    idx = split_indices(cfg, *source_sizes(cfg))
    specs = [ShardSpec(split, s, idx[split][start : start + cfg.shard_size])
             for split in SPLITS for s, start in enumerate(range(0, len(idx[split]), cfg.shard_size))]
    per = cfg.shards_per_job or len(specs)
    return [specs[i : i + per] for i in range(0, len(specs), per)]
