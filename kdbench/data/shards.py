"""Raw dataset -> webdataset tar shards with a manifest, and shards -> tensors in memory.

Layout of a data directory::

    train-00000.tar … val-00000.tar … test-00000.tar   # webdataset shards: <key>.cls, <key>.pgm|ppm
    manifest.json                                      # written last: counts, shard sha256s, classes, stats

A sample's key is its index in the source's own split (zero-padded), stable across re-runs; ``position`` is
its row in our split (shard ``position // shard_size``). Shards are written with webdataset's ``TarWriter``
and read with its tar iterators, so any webdataset pipeline (``webdataset.WebDataset(url)``) or plain tar
reads them too. Each shard is written to a temporary name and renamed when complete, and the manifest is
written last, so a half-written directory never looks complete.
"""

from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from kdbench._util import atomic_path, read_json, sha256_file, write_json_atomic
from kdbench.config import DataConfig
from kdbench.data.codec import IMAGE_EXTS, ImageDecodeError, decode_image, encode_pnm
from kdbench.data.sources import SOURCES
from kdbench.errors import DatasetError, DataShardError

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.tar"


def _split_indices(cfg: DataConfig, n_train_all: int, n_test: int) -> dict[str, np.ndarray]:
    perm = np.random.default_rng(cfg.split_seed).permutation(n_train_all)
    val = np.sort(perm[: cfg.val_size])
    train = np.sort(perm[cfg.val_size :])
    if cfg.train_limit is not None:
        # A seeded subset of the training split, kept in source order.
        train = np.sort(np.random.default_rng(cfg.split_seed + 1).permutation(train)[: cfg.train_limit])
    test = np.arange(n_test if cfg.test_limit is None else min(n_test, cfg.test_limit))
    return {"train": train, "val": val, "test": test}


def _write_shard(path: Path, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> None:
    """Writes one shard, one webdataset sample per image (``TarWriter`` stores a sample's members sorted by
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


def prepare(cfg: DataConfig, out_dir: str | Path) -> dict:
    """Reads the raw dataset, splits it and writes the shards and ``manifest.json`` into ``out_dir``.

    Returns:
        The manifest.
    """
    out_dir = Path(out_dir)
    raw = SOURCES.get(cfg.source).load(Path(cfg.root))
    idx = _split_indices(cfg, len(raw.train_labels), len(raw.test_labels))
    arrays = {
        "train": (raw.train_images, raw.train_labels),
        "val": (raw.train_images, raw.train_labels),
        "test": (raw.test_images, raw.test_labels),
    }
    splits = {}
    for split in SPLITS:
        images, labels = arrays[split]
        ids = idx[split]
        shards = []
        for s, start in enumerate(range(0, len(ids), cfg.shard_size)):
            part = ids[start : start + cfg.shard_size]
            path = out_dir / shard_name(split, s)
            _write_shard(path, images[part], labels[part], part)
            shards.append({"file": path.name, "count": len(part), "sha256": sha256_file(path)})
            _logger.info("wrote %s (%d samples)", path, len(part))
        splits[split] = {"count": len(ids), "shards": shards}
    train_px = raw.train_images[idx["train"]].astype(np.float64) / 255.0
    h, w, c = raw.train_images.shape[1:]
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": cfg.source,
        "root": str(cfg.root),
        "data_config": cfg,
        "image_size": [h, w],
        "channels": c,
        "num_classes": len(raw.class_names),
        "class_names": list(raw.class_names),
        "mean": train_px.mean(axis=(0, 1, 2)).round(6).tolist(),
        "std": train_px.std(axis=(0, 1, 2)).round(6).tolist(),
        "shard_size": cfg.shard_size,
        "splits": splits,
    }
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest


def _read_shard(path: Path, fix: str) -> tuple[list[np.ndarray], list[int], list[int]]:
    """The images (``uint8 [C, H, W]``), labels and keys of a shard's samples, in file order.

    Iterates with webdataset's tar iterators (``tar_file_expander`` + ``group_by_keys``); any member order
    within a sample is accepted, and members other than the image and ``cls`` are ignored. A truncated or
    malformed archive, or a sample lacking its image or label, raises ``DataShardError`` naming the file.
    """
    images, labels, ids = [], [], []
    with open(path, "rb") as stream:
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
                try:
                    images.append(decode_image(sample[exts[0]], exts[0]))
                except ImageDecodeError as e:
                    raise DataShardError(f"data shard {path}: sample {key!r}: {e}; {fix}") from e
                labels.append(int(sample["cls"]))
                ids.append(int(key))
        except DataShardError:
            raise
        except (tarfile.TarError, ValueError) as e:  # tarfile's ReadError, a duplicate member, a bad payload
            reason = str(e.args[0]).split(" @ ", 1)[0] if e.args else type(e).__name__  # drops " @ <stream>"
            raise DataShardError(f"data shard {path} is truncated or malformed ({reason}); {fix}") from e
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
    """Reads a data manifest; a missing one means the data step did not finish."""
    path = Path(data_dir) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"data manifest not found: {path}; run `kdbench prepare-data` (or the workflow) first")
    return read_json(path, "data manifest")


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
    """
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
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
