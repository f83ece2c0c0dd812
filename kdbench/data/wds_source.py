"""The ``webdataset`` source: existing webdataset tar shards of encoded images with integer labels.

For datasets already held as webdataset shards (e.g. ImageNet as ``/data/in1k/train-{000000..000146}.tar``):
``data.train_shards`` and ``data.test_shards`` are brace patterns, directories of ``.tar`` files, or shard
indices in the ``wids`` format (a ``.json`` file: ``{"shardlist": [{"url": "train-000000.tar", "nsamples":
8752}, …]}``, urls relative to the file), and ``data.num_classes`` is the class count (``cls`` ranges over
``[0, num_classes)``; it is not derived from the data, which would mean reading every shard). A sample holds
one image member (``jpg``, ``jpeg``, ``png``, ``webp`` …, :data:`kdbench.data.codec.ENCODED_EXTS`) and ``cls``,
an integer as text; other members are ignored. Samples are read with webdataset's tar iterators
(``tar_file_expander`` + ``group_by_keys``) in the order of the shard list sorted by name, then in-shard order;
a sample's key is its index in that sequence.

The shards are not used as they are but re-sharded: kdbench's own split (val held out of the training shards,
seeded), keys and shard size decide which of our shards holds a sample, and the teacher-output stores are keyed
by that layout. The image bytes are copied unchanged (no re-encoding).

Cost: planning needs every shard's sample count. A ``wids`` index lists them; otherwise they are read from the
tar headers (seeking past the members' data, nothing is decoded), once per process and shard file: ~0.6 s per
10,000 samples from a local disk's page cache, ~1 min for ImageNet's 1.28M at every ``snakemake`` run. On a
network filesystem, readahead makes that scan read the shards through: give a ``wids`` index there. Writing
reads whole source shards (webdataset streams them), only those that can hold the requested keys; a group of
our shards that includes val shards reads every training shard, since the held-out samples are spread over the
whole split.
"""

from __future__ import annotations

import functools
import json
import re
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, meta_prefix, meta_suffix, tar_file_expander

from kdbench.config import DataConfig
from kdbench.data.codec import ENCODED_EXTS
from kdbench.data.encoded import EncodedSample, EncodedSource, member_ext, sample_key
from kdbench.errors import DatasetError

FIX = ("set data.train_shards and data.test_shards to brace patterns (/data/in1k/train-{000000..000146}.tar),"
       " directories of .tar files or wids shard indices (.json) of webdataset samples (<key>.jpg|png|… + <key>.cls)")
_KEYS = {"train": "train_shards", "test": "test_shards"}
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # what webdataset's tar_file_iterator skips by default


def _index(path: Path, key: str) -> dict[Path, int]:
    """Shard -> sample count of a ``wids`` shard index."""
    try:
        listed = json.loads(path.read_text())["shardlist"]
        return {path.parent / str(s["url"]): int(s["nsamples"]) for s in listed}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"data.{key}: {path} is not a wids shard index ({type(e).__name__}: {e}); expected"
                           ' {"shardlist": [{"url": ..., "nsamples": ...}, ...]}. Fix: ' + FIX) from e


@functools.lru_cache(maxsize=8)
def _indexed(path: str, mtime_ns: int, key: str) -> dict[Path, int]:
    del mtime_ns  # only part of the cache key
    return _index(Path(path), key)


def _listed(cfg: DataConfig, split: str) -> dict[Path, int | None]:
    """Shard -> its sample count when a ``wids`` index gives it, else ``None``."""
    key = _KEYS[split]
    spec = str(getattr(cfg, key))
    if spec.endswith(".json") and Path(spec).is_file():
        return dict(_indexed(spec, Path(spec).stat().st_mtime_ns, key))
    if Path(spec).is_dir():
        return {p: None for p in Path(spec).iterdir() if p.suffix == ".tar" and p.is_file()}
    return {Path(u): None for u in expand_urls(spec)}




def _sample_prefix(member: tarfile.TarInfo) -> str | None:
    """The sample key of a tar member as webdataset groups it, or ``None`` for a member it skips."""
    name = member.name
    if not member.isreg() or _SKIP_META.match(name) or ("/" not in name and name.startswith(meta_prefix)
                                                         and name.endswith(meta_suffix)):
        return None
    return base_plus_ext(name)[0]


@functools.lru_cache(maxsize=None)
def _count(path: str, size: int, mtime_ns: int) -> int:
    del size, mtime_ns  # only part of the cache key
    n, last = 0, None
    try:
        with tarfile.open(path, "r:") as tar:  # a seekable file: reads the headers, seeks past the data
            for member in tar:
                prefix = _sample_prefix(member)
                if prefix is not None and prefix != last:
                    n, last = n + 1, prefix
    except (tarfile.TarError, OSError) as e:
        raise DatasetError(f"data shard {path} is not a readable tar file ({e}). Fix: {FIX}") from e
    return n


def sample_count(path: Path) -> int:
    """Samples in one shard, read from its tar headers (cached while the file is unchanged)."""
    st = path.stat()
    return _count(str(path), st.st_size, st.st_mtime_ns)


def shard_counts(cfg: DataConfig, split: str) -> list[tuple[Path, int]]:
    """``(shard, sample count)`` of the shards of source split ``train`` or ``test``, sorted by path (key order).

    Raises:
        DatasetError: the pattern matches nothing, or a listed shard does not exist (names the key).
    """
    key = _KEYS[split]
    spec = str(getattr(cfg, key))
    listed = _listed(cfg, split)
    paths = sorted(listed, key=str)
    if not paths:
        raise DatasetError(f"data.{key}={spec!r} matches no .tar file. Fix: {FIX}")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(f"data shard not found: {missing[0]} ({len(missing)} of the {len(paths)} shards of"
                           f" data.{key}={spec!r} are missing). Fix: {FIX}")
    return [(p, listed[p] if listed[p] is not None else sample_count(p)) for p in paths]


def sizes(cfg: DataConfig) -> tuple[int, int]:
    return sum(n for _, n in shard_counts(cfg, "train")), sum(n for _, n in shard_counts(cfg, "test"))


def classes(cfg: DataConfig) -> tuple[str, ...]:
    return tuple(str(c) for c in range(cfg.num_classes or 0))


def _encoded(cfg: DataConfig, path: Path, key: int, sample: dict) -> EncodedSample:
    where = f"{path}: sample {sample['__key__']!r} (key {sample_key(key)})"
    images = sorted(k for k in sample if k in ENCODED_EXTS)
    if len(images) != 1 or "cls" not in sample:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise DatasetError(f"{where} has members {members}; the webdataset source needs exactly one image"
                           f" ({', '.join(ENCODED_EXTS)}) and a 'cls' label. Fix: {FIX}")
    try:
        label = int(sample["cls"])
    except ValueError:
        raise DatasetError(f"{where}: 'cls' is {sample['cls'][:20]!r}, not an integer. Fix: {FIX}") from None
    if not 0 <= label < (cfg.num_classes or 0):
        raise DatasetError(f"{where}: class {label} is outside [0, data.num_classes={cfg.num_classes}). Fix: set"
                           " data.num_classes to the number of classes")
    return EncodedSample(key, label, member_ext(images[0]), sample[images[0]], where)


def samples(cfg: DataConfig, split: str, keys: np.ndarray) -> Iterator[EncodedSample]:
    """The samples of ``keys`` (ascending), reading only the shards that hold them."""
    keys = np.asarray(keys, dtype=np.int64)
    first = 0
    for path, count in shard_counts(cfg, split):
        wanted = keys[(keys >= first) & (keys < first + count)]
        if len(wanted):
            want, seen = set(wanted.tolist()), 0
            with open(path, "rb") as stream:
                try:
                    samples = group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}]))
                    for i, sample in enumerate(samples):
                        seen = i + 1
                        if first + i in want:
                            yield _encoded(cfg, path, first + i, sample)
                except (tarfile.TarError, ValueError) as e:  # a truncated archive, a duplicate member
                    reason = str(e.args[0]).split(" @ ", 1)[0] if e.args else type(e).__name__
                    raise DatasetError(f"data shard {path} is truncated or malformed ({reason}). Fix: {FIX}") from e
            if seen != count:
                raise DatasetError(f"data shard {path} holds {seen} samples, but {count} were counted (from its wids"
                                   " index or its tar headers, when planning). Fix: correct the index, or leave the"
                                   " source shards unchanged while kdbench reads them")
        first += count


SOURCE = EncodedSource(sizes=sizes, classes=classes, samples=samples, fix=FIX, uses_root=False)
