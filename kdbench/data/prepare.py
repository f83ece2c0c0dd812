"""Raw dataset -> webdataset tar shards + ``manifest.json``: in one job, or one job per shard group and a merge.

Two encodings of a sample's image member (``manifest["encoding"]``):

* ``pnm``: the fixed-size sources held in memory (Fashion-MNIST, CIFAR) are written as binary PGM / PPM
  (``<key>.pgm|ppm``): lossless, decoded with no codec;
* ``original``: the sources of encoded images (``imagefolder``, ``webdataset``) keep every file's own bytes
  (``<key>.<ext>``, ``ext`` in lower case, ``jpeg`` as ``jpg``); nothing is re-encoded, and the images keep
  their own sizes (``native_size`` is ``null``; ``image_size`` is the model input size ``data.image_size``).

Either way a sample is ``<key>.cls`` + its image, written with webdataset's ``TarWriter`` with a fixed owner
and mtime (the bytes are a function of the data alone), every shard under a temporary name renamed once it is
complete (:func:`kdbench._util.atomic_path`). Every image of an encoded source is decoded once while it is
written, to check it: a corrupt one stops the job with an error naming the source file and the sample key,
and leaves no partial shard.

Fan-out (:mod:`kdbench.data.layout`): :func:`write_group` writes one group of shards and its part file
(``parts/group-<g>.json``: per shard its file, count and sha256, and for a train shard the per-channel sums of
its uint8 pixel values: sum, sum of squares, count). :func:`prepare` writes every group whose part file is
missing (keeping the part in memory: a one-job run leaves no part file) and merges all parts into
``manifest.json``, written last. The normalisation statistics are computed from these sums in one streaming
pass, with no array of the whole split: the sums are exact integers, so no grouping or order changes them, and
the mean and std equal the float64 ones of the whole training split that kdbench computed before (checked to
full precision on Fashion-MNIST: the manifest of the embedded default is unchanged).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import webdataset as wds

from kdbench._util import atomic_path, read_json, sha256_file, to_jsonable, write_json_atomic
from kdbench.config import DataConfig
from kdbench.data.codec import ImageDecodeError, decode_image, encode_pnm
from kdbench.data.encoded import EncodedSample, EncodedSource, sample_key
from kdbench.data.layout import (
    FORMAT_VERSION,
    SOURCE_SPLIT,
    SPLITS,
    ShardSpec,
    data_identity,
    group_count,
    part_file,
    shard_groups,
)
from kdbench.data.sources import SOURCES, RawDataset, is_encoded, source_sizes, split_sizes
from kdbench.errors import ConfigError, DatasetError, DataShardError

_logger = logging.getLogger(__name__)

_VALUES = np.arange(256, dtype=np.int64)


class PixelSums:
    """Exact per-channel sums of uint8 pixel values: sum, sum of squares and pixel count (Python integers)."""

    def __init__(self, channels: int) -> None:
        self.sum = [0] * channels
        self.sq = [0] * channels
        self.count = 0

    def add(self, planes: np.ndarray) -> None:
        """Adds ``uint8 [C, ...]`` (channel first: one image ``[C, H, W]`` or a batch ``[C, N, H, W]``)."""
        for c, plane in enumerate(planes):
            hist = np.bincount(plane.ravel(), minlength=256)  # intp: with _VALUES (int64), exact int64 sums
            self.sum[c] += int(hist @ _VALUES)
            self.sq[c] += int(hist @ (_VALUES * _VALUES))
        self.count += planes[0].size

    def to_json(self) -> dict:
        return {"pixel_sum": self.sum, "pixel_sq_sum": self.sq, "pixel_count": self.count}


def mean_std(entries: Iterable[dict], channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of pixel values / 255 from the sums of :class:`PixelSums`,
    rounded to 6 decimals as numpy rounds."""
    s, q, n = [0] * channels, [0] * channels, 0
    for e in entries:
        s = [a + b for a, b in zip(s, e["pixel_sum"])]
        q = [a + b for a, b in zip(q, e["pixel_sq_sum"])]
        n += e["pixel_count"]
    mean = [si / (255 * n) for si in s]  # int / int: the correctly rounded float of the exact ratio
    std = [math.sqrt((n * qi - si * si) / (255 * 255 * n * n)) for si, qi in zip(s, q)]
    return np.array(mean).round(6).tolist(), np.array(std).round(6).tolist()


def _write_shard(path: Path, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> None:
    """Writes one PNM shard, one webdataset sample per image (``TarWriter`` stores a sample's members sorted by
    extension: ``<key>.cls`` then ``<key>.pgm|ppm``). A fixed owner and mtime make the bytes a function of
    the data alone; ``atomic_path`` publishes the file only once it is complete and synced."""
    with (
        atomic_path(path) as tmp,
        open(tmp, "wb") as stream,
        wds.TarWriter(stream, user="", group="", mtime=0, encoder=False) as sink,
    ):
        for img, label, sid in zip(images, labels, ids):
            ext, payload = encode_pnm(img)
            sink.write({"__key__": f"{int(sid):07d}", ext: payload, "cls": str(int(label)).encode()})


def _write_encoded_shard(path: Path, samples: Iterable[EncodedSample], channels: int, split: str,
                         sums: PixelSums | None) -> int:
    """Writes one shard of original image bytes (``<key>.cls`` + ``<key>.<ext>``), decoding every image once to
    check it (and to add it to ``sums``). Returns the sample count.

    Raises:
        DatasetError: a corrupt image, naming the source file, the sample key and the fix; the shard is not written.
    """
    n = 0
    with (
        atomic_path(path) as tmp,
        open(tmp, "wb") as stream,
        wds.TarWriter(stream, user="", group="", mtime=0, encoder=False) as sink,
    ):
        for s in samples:
            try:
                img = decode_image(s.payload, s.ext, channels)
            except ImageDecodeError as e:
                raise DatasetError(
                    f"{s.origin}: sample key {sample_key(s.key)} of the source's {split} split is not a readable image"
                    f" ({e}); nothing was written to {path.name}. Fix: replace or remove that file, then delete"
                    f" {path.parent} and rerun `kdbench prepare-data` (or the workflow)"
                ) from e
            if sums is not None:
                sums.add(img)
            sink.write({"__key__": sample_key(s.key), s.ext: s.payload, "cls": str(s.label).encode()})
            n += 1
    return n


class _GroupWriter:
    """Writes shard groups of one data config, loading a fixed-size source into memory once."""

    def __init__(self, cfg: DataConfig, out_dir: Path) -> None:
        self.cfg, self.out_dir = cfg, out_dir
        self.groups = shard_groups(cfg)
        self.source = SOURCES.get(cfg.source)
        self._raw: RawDataset | None = None

    def part(self, group: int) -> dict:
        """Writes group ``group``'s shards and returns its part (what :func:`write_group` writes)."""
        if not 0 <= group < len(self.groups):
            raise ConfigError(f"--group {group}: the data config has {len(self.groups)} shard groups (0 to"
                              f" {len(self.groups) - 1}; data.shards_per_job={self.cfg.shards_per_job})")
        entries = []
        for spec in self.groups[group]:
            entry, meta = self._encoded(spec) if isinstance(self.source, EncodedSource) else self._pnm(spec)
            entries.append(entry)
            _logger.info("wrote %s (%d samples)", self.out_dir / spec.file, entry["count"])
        return {"format_version": FORMAT_VERSION, "group": group, "data_config": to_jsonable(data_identity(self.cfg)),
                "source_sizes": list(source_sizes(self.cfg)), **meta, "shards": entries}

    def _entry(self, spec: ShardSpec, count: int, sums: PixelSums | None) -> dict:
        path = self.out_dir / spec.file
        entry = {"split": spec.split, "index": spec.index, "file": spec.file, "count": count,
                 "sha256": sha256_file(path)}
        return {**entry, **sums.to_json()} if sums is not None else entry

    def _pnm(self, spec: ShardSpec) -> tuple[dict, dict]:
        if self._raw is None:
            self._raw = self.source.load(Path(self.cfg.root))
        raw = self._raw
        images, labels = ((raw.test_images, raw.test_labels) if SOURCE_SPLIT[spec.split] == "test"
                          else (raw.train_images, raw.train_labels))
        _write_shard(self.out_dir / spec.file, images[spec.keys], labels[spec.keys], spec.keys)
        h, w, c = raw.train_images.shape[1:]
        sums = None
        if spec.split == "train":
            sums = PixelSums(c)
            sums.add(np.moveaxis(images[spec.keys], -1, 0))
        meta = {"encoding": "pnm", "native_size": [h, w], "channels": c, "class_names": list(raw.class_names)}
        return self._entry(spec, len(spec.keys), sums), meta

    def _encoded(self, spec: ShardSpec) -> tuple[dict, dict]:
        channels = self.cfg.channels or 3
        sums = PixelSums(channels) if spec.split == "train" else None
        samples = self.source.samples(self.cfg, SOURCE_SPLIT[spec.split], spec.keys)
        n = _write_encoded_shard(self.out_dir / spec.file, samples, channels, SOURCE_SPLIT[spec.split], sums)
        if n != len(spec.keys):
            raise DatasetError(f"{self.out_dir / spec.file}: the {self.cfg.source} source gave {n} of its"
                               f" {len(spec.keys)} samples; did the source change? Fix: delete {self.out_dir} and"
                               " rerun")
        meta = {"encoding": "original", "native_size": None, "channels": channels,
                "class_names": list(self.source.classes(self.cfg))}
        return self._entry(spec, n, sums), meta


def write_group(cfg: DataConfig, out_dir: str | Path, group: int) -> dict:
    """Writes one shard group (``kdbench prepare-data --group K``): its shards, then its part file.

    Returns:
        The part.
    """
    out_dir = Path(out_dir)
    part = _GroupWriter(cfg, out_dir).part(group)
    write_json_atomic(out_dir / part_file(group), part)
    return part


def prepare(cfg: DataConfig, out_dir: str | Path) -> dict:
    """Writes the shards of every group that has no part file yet, then merges all parts into ``manifest.json``.

    Without ``data.shards_per_job`` (one group) and in a fresh directory this writes everything in one go; in
    the fan-out workflow every part exists and this only merges.

    Returns:
        The manifest.
    """
    out_dir = Path(out_dir)
    writer: _GroupWriter | None = None
    parts = []
    for group in range(group_count(cfg)):
        path = out_dir / part_file(group)
        if path.exists():
            parts.append(read_json(path, "data part file"))
            continue
        writer = writer or _GroupWriter(cfg, out_dir)
        parts.append(writer.part(group))
    return merge(cfg, out_dir, parts)


def merge(cfg: DataConfig, out_dir: Path, parts: list[dict]) -> dict:
    """Checks the parts against the config and each other, and writes ``manifest.json`` (last, atomically).

    Raises:
        DataShardError: a part written for another config or another listing of the source, or a missing shard.
    """
    fix = f"Fix: delete {out_dir} and rerun `kdbench prepare-data` (or the workflow)"
    want = {"format_version": FORMAT_VERSION, "data_config": to_jsonable(data_identity(cfg)),
            "source_sizes": list(source_sizes(cfg))}
    for group, part in enumerate(parts):
        expected = {**want, "group": group}
        stale = [k for k, v in expected.items() if part.get(k) != v]
        # every other field of a part (its data's encoding, sizes, channels, classes, ...) agrees across the parts
        stale += sorted(k for k in part.keys() | parts[0].keys()
                        if k not in expected and k != "shards" and part.get(k) != parts[0].get(k))
        if stale:
            raise DataShardError(f"{out_dir / part_file(group)} does not belong with this data config or with the other"
                                 f" parts (its {', '.join(stale)} differ): the config or the raw data changed. {fix}")
    entries = [e for part in parts for e in part["shards"]]
    sizes = split_sizes(cfg)
    splits = {}
    for split in SPLITS:
        shards = [e for e in entries if e["split"] == split]
        if [e["index"] for e in shards] != list(range(len(shards))) or sum(e["count"] for e in shards) != sizes[split]:
            raise DataShardError(f"the parts in {out_dir / 'parts'} do not hold the {split} split's shards. {fix}")
        for e in shards:
            if not (out_dir / e["file"]).exists():
                raise DatasetError(f"data shard missing: {out_dir / e['file']} (listed in its part file). {fix}")
        splits[split] = {"count": sizes[split],
                         "shards": [{"file": e["file"], "count": e["count"], "sha256": e["sha256"]} for e in shards]}
    first = parts[0]
    encoded = is_encoded(cfg)
    mean, std = mean_std((e for e in entries if e["split"] == "train"), first["channels"])
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": cfg.source,
        "root": str(cfg.root) if not encoded or SOURCES.get(cfg.source).uses_root else None,
        "data_config": first["data_config"],
        "image_size": [cfg.image_size] * 2 if encoded else first["native_size"],
        "native_size": first["native_size"],
        "encoding": first["encoding"],
        "channels": first["channels"],
        "num_classes": len(first["class_names"]),
        "class_names": first["class_names"],
        "mean": mean,
        "std": std,
        "shard_size": cfg.shard_size,
        "splits": splits,
    }
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest
