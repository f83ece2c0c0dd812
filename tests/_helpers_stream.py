"""Helpers shared by the streaming tests and benchmarks (no conftest): a data directory of variable-size,
non-square JPEG/PNG images written directly as webdataset shards with a manifest (the format of the
``imagefolder`` / ``webdataset`` sources: ``encoding: original``, ``native_size: null``), and the same images
as a ``torchvision.datasets.ImageFolder`` tree.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image


def _image(rng: np.random.Generator, h: int, w: int, rgb: bool) -> Image.Image:
    """A smooth gradient, a bright blob and noise: crops, flips and mixup change what a model sees."""
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, max(4, min(h, w) / 2))
    blob = 180.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
    base = 40.0 + 60.0 * xx / w + rng.normal(0, 12, (h, w))
    grey = np.clip(base + blob, 0, 255)
    if not rgb:
        return Image.fromarray(grey.astype(np.uint8), "L")
    tint = rng.uniform(0.6, 1.2, 3)
    return Image.fromarray(np.clip(grey[..., None] * tint, 0, 255).astype(np.uint8), "RGB")


def encoded_images(n: int, seed: int, sizes: tuple[int, int], exts: tuple[str, ...] = ("jpg", "png"),
                   num_classes: int = 5) -> list[tuple[str, bytes, int]]:
    """``n`` images ``(ext, bytes, label)`` of random height and width in ``sizes`` (independently, so most are
    non-square), grey or RGB at random, encoded as JPEG (quality 90) or PNG in turn."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
        im = _image(rng, h, w, rgb=bool(rng.random() < 0.5))
        ext = exts[i % len(exts)]
        buf = io.BytesIO()
        im.save(buf, format="JPEG" if ext == "jpg" else "PNG", **({"quality": 90} if ext == "jpg" else {}))
        out.append((ext, buf.getvalue(), int(rng.integers(num_classes))))
    return out


def write_shards(out_dir: Path, split: str, samples: list[tuple[str, bytes, int]], shard_size: int,
                 first_key: int = 0) -> list[dict]:
    """Writes ``samples`` as webdataset shards ``<split>-00000.tar``…; returns their manifest entries."""
    entries = []
    for s, lo in enumerate(range(0, len(samples), shard_size)):
        path = out_dir / f"{split}-{s:05d}.tar"
        with open(path, "wb") as stream, wds.TarWriter(stream, user="", group="", mtime=0, encoder=False) as sink:
            for k, (ext, payload, label) in enumerate(samples[lo : lo + shard_size]):
                sink.write({"__key__": f"{first_key + lo + k:07d}", ext: payload, "cls": str(label).encode()})
        entries.append({"file": path.name, "count": len(samples[lo : lo + shard_size]),
                        "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    return entries


def write_variable_data(out_dir: Path, counts: dict[str, int], shard_size: int, image_size: int, channels: int,
                        sizes: tuple[int, int] = (18, 56), num_classes: int = 5, seed: int = 0,
                        exts: tuple[str, ...] = ("jpg", "png")) -> Path:
    """A data directory of variable-size images (``counts``: samples per split) and its ``manifest.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {}
    for k, (split, n) in enumerate(counts.items()):
        samples = encoded_images(n, seed + k, sizes, exts, num_classes)
        shards = write_shards(out_dir, split, samples, shard_size, first_key=100_000 * k)
        splits[split] = {"count": n, "shards": shards}
    manifest = {
        "format_version": 2, "source": "test-variable", "root": str(out_dir), "data_config": {},
        "encoding": "original", "native_size": None, "image_size": [image_size, image_size], "channels": channels,
        "num_classes": num_classes, "class_names": [f"c{i}" for i in range(num_classes)],
        "mean": [0.45] * channels, "std": [0.25] * channels, "shard_size": shard_size, "splits": splits,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out_dir


def write_image_folder(root: Path, samples: list[tuple[str, bytes, int]]) -> Path:
    """The same encoded images as an ``ImageFolder`` tree ``root/c<label>/<index>.<ext>``."""
    for i, (ext, payload, label) in enumerate(samples):
        d = root / f"c{label}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:07d}.{ext}").write_bytes(payload)
    return root
