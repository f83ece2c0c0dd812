"""Raw dataset -> webdataset tar shards with a manifest, and shards -> tensors in memory.

Layout of a data directory::

    train-00000.tar … val-00000.tar … test-00000.tar   # webdataset shards: <key>.pgm|ppm, <key>.cls
    manifest.json                                      # written last: counts, shard sha256s, classes, stats

A sample's key is its index in the source's own split (zero-padded), stable across re-runs; ``position`` is
its row in our split (shard ``position // shard_size``). Each shard is written to a temporary name and
renamed when complete, and the manifest is written last, so a half-written directory never looks complete.
"""

from __future__ import annotations

import io
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdbench._util import atomic_path, read_json, sha256_file, write_json_atomic
from kdbench.config import DataConfig
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


def encode_pnm(img: np.ndarray) -> tuple[str, bytes]:
    """Encodes ``uint8 [H, W, C]`` as binary PGM (C = 1) or PPM (C = 3): standard, lossless, and decoded with
    no codec (webdataset's image decoder and PIL read both)."""
    h, w, c = img.shape
    ext, magic = ("pgm", b"P5") if c == 1 else ("ppm", b"P6")
    return ext, magic + f"\n{w} {h}\n255\n".encode() + np.ascontiguousarray(img).tobytes()


def decode_pnm(payload: bytes) -> np.ndarray:
    """Decodes what :func:`encode_pnm` wrote into ``uint8 [C, H, W]``."""
    magic, size, maxval, data = payload.split(b"\n", 3)
    if magic not in (b"P5", b"P6") or maxval != b"255":
        raise ValueError(f"not a binary 8-bit PGM/PPM image (header {payload[:16]!r})")
    w, h = (int(v) for v in size.split())
    c = 1 if magic == b"P5" else 3
    return np.frombuffer(data, dtype=np.uint8, count=h * w * c).reshape(h, w, c).transpose(2, 0, 1)


def _write_shard(path: Path, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> None:
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for img, label, sid in zip(images, labels, ids):
            key = f"{int(sid):07d}"
            for ext, payload in (encode_pnm(img), ("cls", str(int(label)).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o444
                tar.addfile(info, io.BytesIO(payload))


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
        splits[split] = {"count": int(len(ids)), "shards": shards}
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


def _tar_members(path: Path):
    """Yields ``(name, payload)`` of a tar file's regular members.

    A plain USTAR walk over the file's bytes (10x faster than :mod:`tarfile` for small members); a
    truncated or malformed archive raises ``DataShardError`` naming the file.
    """
    buf = memoryview(path.read_bytes())
    pos = 0
    while pos + 512 <= len(buf):
        header = bytes(buf[pos : pos + 512])
        if header == b"\0" * 512:
            return
        try:
            name = header[:100].split(b"\0", 1)[0].decode()
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError as e:
            raise ValueError(f"{path}: malformed tar header at byte {pos}") from e
        typeflag = header[156:157]
        start, pos = pos + 512, pos + 512 + -(-size // 512) * 512
        if start + size > len(buf):
            raise DataShardError(f"{path} is truncated (member {name!r} ends past the end of the file); delete its data directory and rerun the workflow")
        if typeflag in (b"0", b"\0"):
            yield name, bytes(buf[start : start + size])
    raise DataShardError(f"{path} is truncated (no end-of-archive marker); delete its data directory and rerun the workflow")


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
        ValueError: a shard's checksum or sample count differs from the manifest (names the shard and fix).
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
        n = 0
        for name, payload in _tar_members(path):
            key, ext = name.rsplit(".", 1)
            if ext in ("pgm", "ppm"):
                images.append(decode_pnm(payload))
                ids.append(int(key))
                n += 1
            elif ext == "cls":
                labels.append(int(payload))
        if n != shard["count"] or len(labels) != len(images):
            raise ValueError(f"data shard {path} holds {n} samples, the manifest says {shard['count']}; delete {data_dir}")
    return Split(
        images=torch.from_numpy(np.stack(images)),
        labels=torch.tensor(labels, dtype=torch.int64),
        ids=torch.tensor(ids, dtype=torch.int64),
        shard_size=manifest["shard_size"],
    )
