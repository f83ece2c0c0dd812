"""Shards -> tensors in memory, checked against the manifest; the writer is :mod:`kdbench.data.prepare`.

Layout of a data directory (:mod:`kdbench.data.layout`)::

    train-00000.tar … val-00000.tar … test-00000.tar   # webdataset shards: <key>.cls, <key>.<image ext>
    manifest.json                                      # written last: counts, shard sha256s, classes, stats

A sample's key is its index in the source's own split (zero-padded), stable across re-runs; ``position`` is
its row in our split (shard ``position // shard_size``). Shards are written with webdataset's ``TarWriter``
and read with its tar iterators, so any webdataset pipeline (``webdataset.WebDataset(url)``) or plain tar
reads them too. Each shard is written to a temporary name and renamed when complete, and the manifest is
written last, so a half-written directory never looks complete.

Fixed-size datasets (``encoding: pnm``) load whole into memory (:func:`load_split`); datasets of images of
any size (``encoding: original``: ``imagefolder``, ``webdataset``) are streamed instead.
"""

from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import torch
from webdataset.tariterators import group_by_keys, tar_file_expander

from kdbench._util import read_json, sha256_file
from kdbench.data.codec import IMAGE_EXTS, ImageDecodeError, decode_image
from kdbench.data.layout import FORMAT_VERSION
from kdbench.errors import DatasetError, DataShardError

_logger = logging.getLogger(__name__)


def iter_shard_samples(stream: BinaryIO, path: Path, fix: str) -> Iterator[tuple[str, str, bytes, int]]:
    """The ``(key, image extension, encoded image, label)`` of a shard's samples, in file order, read from the
    open ``stream`` of the shard file ``path`` (named in errors, with ``fix``). The one shard reader: the
    in-memory path (:func:`_read_shard`) and the streaming path (:mod:`kdbench.data.stream`) both use it.

    Iterates with webdataset's tar iterators (``tar_file_expander`` + ``group_by_keys``); any member order
    within a sample is accepted, and members other than the image and ``cls`` are ignored. A truncated or
    malformed archive, or a sample lacking its image or label, raises ``DataShardError`` naming the file. A
    tar cut at a member boundary reads as a shorter, valid archive: callers compare the count with the manifest.
    """
    samples = group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}]))
    try:
        for sample in samples:
            key = sample["__key__"]
            exts = sorted(k for k in sample if k in IMAGE_EXTS)
            if len(exts) != 1 or "cls" not in sample:
                members = sorted(k for k in sample if not k.startswith("__"))
                raise DataShardError(
                    f"data shard {path} is truncated or malformed: sample {key!r} has members {members}, expected"
                    f" one image ({', '.join(IMAGE_EXTS)}) and a .cls label; {fix}"
                )
            int(key)  # keys are zero-padded indices: anything else is malformed (the ValueError below)
            yield key, exts[0], sample[exts[0]], int(sample["cls"])
    except DataShardError:
        raise
    except (tarfile.TarError, ValueError) as e:  # tarfile's ReadError, a duplicate member, a bad payload
        reason = str(e.args[0]).split(" @ ", 1)[0] if e.args else type(e).__name__  # drops " @ <stream>"
        raise DataShardError(f"data shard {path} is truncated or malformed ({reason}); {fix}") from e


def _read_shard(path: Path, fix: str) -> tuple[list[np.ndarray], list[int], list[int]]:
    """The images (``uint8 [C, H, W]``), labels and keys of a shard's samples, in file order
    (:func:`iter_shard_samples`, every image decoded)."""
    images, labels, ids = [], [], []
    with open(path, "rb") as stream:
        for key, ext, payload, label in iter_shard_samples(stream, path, fix):
            try:
                images.append(decode_image(payload, ext))
            except ImageDecodeError as e:
                raise DataShardError(f"data shard {path}: sample {key!r}: {e}; {fix}") from e
            labels.append(label)
            ids.append(int(key))
    return images, labels, ids


@dataclass(frozen=True)
class Split:
    """One split in memory.

    Attributes:
        images: ``uint8 [N, C, H, W]``.
        labels: ``int64 [N]``.
        ids: ``int64 [N]``, the stable sample keys.
        shard_size: Samples per shard (a position's shard is ``position // shard_size``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor
    shard_size: int

    def __len__(self) -> int:
        return len(self.labels)


def read_manifest(data_dir: str | Path) -> dict:
    """Reads a data manifest; a missing one means the data step did not finish.

    A version 1 manifest (before ``encoding`` and ``native_size``) is read as the PNM data it describes.

    Raises:
        DataShardError: a manifest of an unknown format version (names the file and the fix).
    """
    path = Path(data_dir) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"data manifest not found: {path}; run `kdbench prepare-data` (or the workflow) first")
    manifest = read_json(path, "data manifest")
    version = manifest.get("format_version")
    if version not in (1, FORMAT_VERSION):
        raise DataShardError(f"data manifest {path} has format_version {version!r}; this kdbench reads 1 and"
                             f" {FORMAT_VERSION}. Fix: delete {path.parent} and rerun the workflow")
    if version == 1:
        manifest = {**manifest, "encoding": "pnm", "native_size": manifest["image_size"]}
    return manifest


def load_split(data_dir: str | Path, split: str, verify: bool = True, shards: list[int] | None = None) -> Split:
    """Loads the shards of a split into memory, checking each shard against the manifest.

    Args:
        data_dir: The data directory.
        split: ``train``, ``val`` or ``test``.
        verify: Check every shard's sha256 against the manifest.
        shards: Load only these shards (rows then count from the first of them); ``None`` loads all.

    Raises:
        DataShardError: a shard's checksum or sample count differs from the manifest, or the shard is
            truncated or malformed (names the shard and the fix).
        DatasetError: the data directory holds images of varying sizes (``native_size`` null), which are
            streamed rather than loaded whole.
    """
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if manifest["native_size"] is None:
        raise DatasetError(
            f"{data_dir} holds images of varying sizes (source {manifest['source']!r}, encoding"
            f" {manifest['encoding']!r}): they are streamed, not loaded whole into memory; read them with"
            " kdbench.data.stream"
        )
    images, labels, ids = [], [], []
    entries = manifest["splits"][split]["shards"]
    for shard in entries if shards is None else [entries[i] for i in shards]:
        path = data_dir / shard["file"]
        if not path.exists():
            raise DatasetError(f"data shard missing: {path}; rerun `kdbench prepare-data` (delete {data_dir})")
        if verify and sha256_file(path) != shard["sha256"]:
            raise DataShardError(
                f"data shard {path} does not match its checksum in {data_dir / 'manifest.json'}: the file is corrupt"
                f" or was changed. Fix: delete {data_dir} and rerun the workflow"
            )
        fix = f"Fix: delete {data_dir} and rerun the workflow"
        shard_images, shard_labels, shard_ids = _read_shard(path, fix)
        if len(shard_ids) != shard["count"]:
            raise DataShardError(
                f"data shard {path} holds {len(shard_ids)} samples, the manifest says {shard['count']}: the file is"
                f" truncated or was changed. {fix}"
            )
        images += shard_images
        labels += shard_labels
        ids += shard_ids
    return Split(
        images=torch.from_numpy(np.stack(images)),
        labels=torch.tensor(labels, dtype=torch.int64),
        ids=torch.tensor(ids, dtype=torch.int64),
        shard_size=manifest["shard_size"],
    )
