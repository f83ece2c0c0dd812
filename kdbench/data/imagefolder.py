"""The ``imagefolder`` source: image files in the standard ImageNet layout, one folder per class.

::

    <data.root>/train/<class>/<file>    # the training images: our train and val splits are drawn from them
    <data.root>/val/<class>/<file>      # the held-out images: our test split

Classes are the sorted folder names of ``train/``; ``val/`` must have the same folders (one may be empty). A
file's label is its folder's index. Every file directly inside a class folder whose extension Pillow reads
(:data:`kdbench.data.codec.ENCODED_EXTS`, any case: ``.JPEG``, ``.jpg``, ``.png`` …) is a sample, of any size,
aspect ratio and colour mode; other files, hidden files and subfolders are ignored. A sample's key is its
index in the sorted list of relative paths (``<class>/<file>``) of its folder, stable as long as the files are.

Listing opens no file. It is cached per process for as long as no class folder changes (the cache is keyed
by the folders' modification times), so planning a workflow lists ImageNet's 1.28M files once (seconds on a
local disk).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from kdbench.config import DataConfig
from kdbench.data.encoded import EncodedSample, EncodedSource, member_ext, sample_key
from kdbench.errors import DatasetError

FIX = ("put the images under <data.root>/train/<class>/<file> and <data.root>/val/<class>/<file> (the standard"
       " ImageNet layout), or set data.root")
_FOLDERS = {"train": "train", "test": "val"}  # source split -> folder


def _class_folders(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise DatasetError(f"image folder not found: {folder}. Fix: {FIX}")
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise DatasetError(f"image folder {folder} has no class folders (expected {folder}/<class>/<file>). Fix: {FIX}")
    return names


def classes(cfg: DataConfig) -> tuple[str, ...]:
    """The class names: the sorted folder names of ``train/``, which ``val/`` must repeat.

    Raises:
        DatasetError: a missing folder, or ``val/`` with other class folders than ``train/`` (names both).
    """
    root = Path(cfg.root)
    train, val = _class_folders(root / "train"), _class_folders(root / "val")
    if train != val:
        only = [f"only in {root / d}: {', '.join(sorted(set(a) - set(b))[:5])}"
                for d, a, b in (("train", train, val), ("val", val, train)) if set(a) - set(b)]
        raise DatasetError(f"the class folders of {root / 'val'} differ from those of {root / 'train'}"
                           f" ({'; '.join(only)}). Fix: give val/ one folder per class of train/ (an empty folder is"
                           " allowed)")
    return tuple(train)


@functools.lru_cache(maxsize=4)
def _listing_of(folder: str, names: tuple[str, ...], stamp: tuple[int, ...]) -> tuple[tuple[str, ...], np.ndarray]:
    del stamp  # only part of the cache key
    entries = []
    for label, name in enumerate(names):
        with os.scandir(os.path.join(folder, name)) as files:
            entries += [(f"{name}/{f.name}", label) for f in files
                        if not f.name.startswith(".") and member_ext(os.path.splitext(f.name)[1][1:]) and f.is_file()]
    entries.sort()
    return tuple(p for p, _ in entries), np.array([label for _, label in entries], dtype=np.int64)


def listing(cfg: DataConfig, split: str) -> tuple[tuple[str, ...], np.ndarray]:
    """The relative paths (sorted: index = key) and labels of source split ``train`` or ``test`` (folder ``val/``).

    Raises:
        DatasetError: the folder holds no image file.
    """
    names = classes(cfg)
    folder = Path(cfg.root) / _FOLDERS[split]
    stamp = tuple(os.stat(folder / n).st_mtime_ns for n in names)
    paths, labels = _listing_of(str(folder), names, stamp)
    if not paths:
        raise DatasetError(f"image folder {folder} holds no image files in its class folders. Fix: {FIX}")
    return paths, labels


def sizes(cfg: DataConfig) -> tuple[int, int]:
    return len(listing(cfg, "train")[0]), len(listing(cfg, "test")[0])


def samples(cfg: DataConfig, split: str, keys: np.ndarray) -> Iterator[EncodedSample]:
    """The files of ``keys`` (indices into :func:`listing`) with their own bytes."""
    paths, labels = listing(cfg, split)
    folder = Path(cfg.root) / _FOLDERS[split]
    for key in keys:
        rel = paths[key]
        path = folder / rel
        try:
            payload = path.read_bytes()
        except OSError as e:
            raise DatasetError(f"cannot read image {path} (sample key {sample_key(key)}): {e.strerror or e}. Fix: make"
                               " the file readable, or remove it and delete the data directory before rerunning") from e
        yield EncodedSample(int(key), int(labels[key]), member_ext(os.path.splitext(rel)[1][1:]), payload, str(path))


SOURCE = EncodedSource(sizes=sizes, classes=classes, samples=samples, fix=FIX)
