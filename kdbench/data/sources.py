"""Raw dataset sources, each reading one standard on-disk format.

Fixed-size sources, read whole into memory (:class:`Source`), written as PNM shards:

* ``fashion-mnist``: the IDX files (``train-images-idx3-ubyte[.gz]`` …) of Zalando's Fashion-MNIST, as
  installed by Debian's ``dataset-fashion-mnist`` under ``/usr/share/datasets/fashion-mnist``;
* ``cifar10`` / ``cifar100``: the "python version" pickles (``cifar-10-batches-py/`` or
  ``cifar-100-python/``), as distributed by the dataset's authors.

Sources of encoded images of any size, listed cheaply and read one sample at a time
(:class:`kdbench.data.encoded.EncodedSource`), whose shards hold the original bytes:

* ``imagefolder``: ``root/train/<class>/<file>`` and ``root/val/<class>/<file>`` (:mod:`.imagefolder`);
* ``webdataset``: existing webdataset tar shards (:mod:`.wds_source`).

:func:`check_data_config` checks the keys each kind needs; :func:`source_info` gives what a model needs before
any data exists.
"""

from __future__ import annotations

import functools
import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from kdbench.config import DataConfig
from kdbench.data import imagefolder, wds_source
from kdbench.data.encoded import EncodedSource
from kdbench.errors import ConfigError, DatasetError
from kdbench.registry import Registry


@dataclass(frozen=True)
class RawDataset:
    """A dataset held in memory.

    Attributes:
        train_images: ``uint8 [N, H, W, C]``.
        train_labels: ``int64 [N]``.
        test_images: ``uint8 [M, H, W, C]``.
        test_labels: ``int64 [M]``.
        class_names: One name per class.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class Source:
    """A registered source: ``load(root)`` reads everything, ``sizes(root)`` only counts (cheap, at parse time);
    ``num_classes``, ``in_chans`` and ``image_size`` let the plan build models before any data exists."""

    load: Callable[[Path], RawDataset]
    sizes: Callable[[Path], tuple[int, int]]
    fix: str
    num_classes: int
    in_chans: int
    image_size: int


SOURCES: Registry[Source | EncodedSource] = Registry("data source")

def _need(path: Path, fix: str) -> Path:
    if not path.exists():
        raise DatasetError(f"dataset file not found: {path}. Fix: {fix}")
    return path


def _find(root: Path, stem: str, fix: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).exists():
            return root / name
    return _need(root / (stem + ".gz"), fix)


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _idx_header(path: Path) -> tuple[int, tuple[int, ...]]:
    with _open(path) as f:
        magic = f.read(4)
        if len(magic) < 4 or magic[:2] != b"\x00\x00" or magic[2] != 0x08:
            raise DatasetError(f"{path} is not an IDX file of unsigned bytes (magic {magic!r})")
        ndim = magic[3]
        dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
    return ndim, dims


def read_idx(path: Path) -> np.ndarray:
    """Reads an IDX file (optionally gzipped) of unsigned bytes into an array of its shape."""
    ndim, dims = _idx_header(path)
    with _open(path) as f:
        f.seek(4 + 4 * ndim)
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(dims)):
        raise DatasetError(f"{path} is truncated: header says {dims}, found {data.size} bytes of data")
    return data.reshape(dims)


_FMNIST_FIX = "install the Debian package 'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist) or set data.root"
_FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _fmnist_load(root: Path) -> RawDataset:
    f = lambda stem: _find(root, stem, _FMNIST_FIX)  # noqa: E731
    return RawDataset(
        train_images=read_idx(f("train-images-idx3-ubyte"))[..., None],
        train_labels=read_idx(f("train-labels-idx1-ubyte")).astype(np.int64),
        test_images=read_idx(f("t10k-images-idx3-ubyte"))[..., None],
        test_labels=read_idx(f("t10k-labels-idx1-ubyte")).astype(np.int64),
        class_names=_FMNIST_CLASSES,
    )


def _fmnist_sizes(root: Path) -> tuple[int, int]:
    return (
        _idx_header(_find(root, "train-labels-idx1-ubyte", _FMNIST_FIX))[1][0],
        _idx_header(_find(root, "t10k-labels-idx1-ubyte", _FMNIST_FIX))[1][0],
    )


SOURCES.register("fashion-mnist")(Source(_fmnist_load, _fmnist_sizes, _FMNIST_FIX, 10, 1, 28))


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _label_count(path: Path, key: str) -> int:
    """The number of labels in a CIFAR pickle, read once per file version (planning asks for it per store)."""
    st = path.stat()
    return _label_count_of(str(path), key, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _label_count_of(path: str, key: str, mtime_ns: int, size: int) -> int:
    del mtime_ns, size  # only part of the cache key
    return len(_unpickle(Path(path))[key])


def _cifar_source(variant: str) -> Source:
    folder = "cifar-10-batches-py" if variant == "cifar10" else "cifar-100-python"
    fix = f"unpack the python version of {variant.upper()} so that <data.root>/{folder}/ exists, or set data.root"
    label_key = "labels" if variant == "cifar10" else "fine_labels"
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if variant == "cifar10" else ["train"]
    test_files = ["test_batch"] if variant == "cifar10" else ["test"]
    meta_file, names_key = ("batches.meta", "label_names") if variant == "cifar10" else ("meta", "fine_label_names")

    def base(root: Path) -> Path:
        # Accept both <root>/<folder>/ and the folder itself as root.
        return root if (root / meta_file).exists() else _need(root / folder, fix)

    def read(root: Path, files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = [_unpickle(_need(base(root) / name, fix)) for name in files]
        images = np.concatenate([np.asarray(p["data"], dtype=np.uint8) for p in parts]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([np.asarray(p[label_key], dtype=np.int64) for p in parts])
        return images.transpose(0, 2, 3, 1).copy(), labels

    def load(root: Path) -> RawDataset:
        tr, trl = read(root, train_files)
        te, tel = read(root, test_files)
        names = tuple(_unpickle(_need(base(root) / meta_file, fix))[names_key])
        return RawDataset(tr, trl, te, tel, names)

    def sizes(root: Path) -> tuple[int, int]:
        count = lambda files: sum(_label_count(_need(base(root) / n, fix), label_key) for n in files)  # noqa: E731
        return count(train_files), count(test_files)

    return Source(load, sizes, fix, 10 if variant == "cifar10" else 100, 3, 32)


SOURCES.register("cifar10")(_cifar_source("cifar10"))
SOURCES.register("cifar100")(_cifar_source("cifar100"))
SOURCES.register("imagefolder")(imagefolder.SOURCE)
SOURCES.register("webdataset")(wds_source.SOURCE)

#: Keys only the sources of encoded images take (and which of them each needs).
_ENCODED_KEYS = {
    "imagefolder": {"required": ("image_size",), "allowed": ("image_size", "channels")},
    "webdataset": {"required": ("image_size", "train_shards", "test_shards", "num_classes"),
                   "allowed": ("image_size", "channels", "train_shards", "test_shards", "num_classes")},
}


def check_data_config(cfg: DataConfig, where: str = "data") -> None:
    """Checks the keys a data config's source needs and those it must not have.

    Args:
        cfg: The data config.
        where: Its dotted key in the config (``data`` or ``teachers.<name>.data``), for messages.

    Raises:
        ConfigError: naming the key and the fix (callers prefix the config file).
    """
    if cfg.source not in SOURCES:
        raise ConfigError(f"key '{where}.source': unknown data source {cfg.source!r}; valid choices:"
                          f" {', '.join(SOURCES.names())}")
    keys = _ENCODED_KEYS.get(cfg.source, {"required": (), "allowed": ()})
    for key in _ENCODED_KEYS["webdataset"]["allowed"]:
        value = getattr(cfg, key)
        if value is None and key in keys["required"]:
            hint = " (the model input resolution S: images of any size are rendered S x S, e.g. 224)"
            raise ConfigError(f"key '{where}.{key}' is required for data source {cfg.source!r}"
                              + (hint if key == "image_size" else ""))
        if value is not None and key not in keys["allowed"]:
            why = ("it is the model input resolution of a variable-size source, and this source's images all have one"
                   " size (set 'protocol.image_size' to train at another resolution)" if key == "image_size"
                   else "this source does not use it")
            raise ConfigError(f"key '{where}.{key}' must be unset for data source {cfg.source!r}: {why}")
    checks = [
        (cfg.image_size is None or cfg.image_size >= 8, "image_size", "must be >= 8"),
        (cfg.channels in (None, 1, 3), "channels", "must be 1 (grey) or 3 (RGB)"),
        (cfg.num_classes is None or cfg.num_classes >= 1, "num_classes", "must be >= 1"),
        (cfg.shards_per_job is None or cfg.shards_per_job >= 1, "shards_per_job", "must be >= 1 (or null: one job)"),
        (cfg.shard_size >= 1, "shard_size", "must be >= 1"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"key '{where}.{key}' {msg}")


@dataclass(frozen=True)
class SourceInfo:
    """What a model needs to know of a dataset before any data exists.

    Attributes:
        num_classes: Classes.
        in_chans: Channels of the model input.
        image_size: The model input resolution (the fixed size, or ``data.image_size``).
    """

    num_classes: int
    in_chans: int
    image_size: int


def is_encoded(cfg: DataConfig) -> bool:
    """Whether the source holds encoded images of any size (``imagefolder``, ``webdataset``), not fixed-size
    arrays."""
    return isinstance(SOURCES.get(cfg.source), EncodedSource)


def location_key(cfg: DataConfig) -> str:
    """The data key that says where the source's raw data is: ``train_shards`` for ``webdataset``, else ``root``
    (what a missing dataset's error names)."""
    return "train_shards" if cfg.source == "webdataset" else "root"


def source_info(cfg: DataConfig) -> SourceInfo:
    """The :class:`SourceInfo` of a data config (cheap: an image folder's class folders are listed, no file)."""
    check_data_config(cfg)
    src = SOURCES.get(cfg.source)
    if isinstance(src, EncodedSource):
        return SourceInfo(len(src.classes(cfg)), cfg.channels or 3, cfg.image_size)
    return SourceInfo(src.num_classes, src.in_chans, src.image_size)


def source_sizes(cfg: DataConfig) -> tuple[int, int]:
    """Sample counts of the source's own train and test splits, without reading the images."""
    src = SOURCES.get(cfg.source)
    return src.sizes(cfg) if isinstance(src, EncodedSource) else src.sizes(Path(cfg.root))


def split_sizes(cfg: DataConfig, where: str = "data") -> dict[str, int]:
    """Sample counts of train / val / test implied by the config, without reading the images.

    ``where`` names the data config in errors (``teachers.<t>.data`` for a teacher's own).
    """
    check_data_config(cfg, where)
    n_train_all, n_test = source_sizes(cfg)
    if not 0 < cfg.val_size < n_train_all:
        raise ConfigError(f"key '{where}.val_size' is {cfg.val_size}, but the {cfg.source} training set has"
                          f" {n_train_all} images. Fix: set '{where}.val_size' between 1 and {n_train_all - 1}")
    n_train = n_train_all - cfg.val_size
    if cfg.train_limit is not None:
        n_train = min(n_train, cfg.train_limit)
    if cfg.test_limit is not None:
        n_test = min(n_test, cfg.test_limit)
    return {"train": n_train, "val": cfg.val_size, "test": n_test}


def shard_counts(cfg: DataConfig) -> dict[str, int]:
    """Number of shards per split (what the workflow fans cache jobs over)."""
    return {k: -(-n // cfg.shard_size) for k, n in split_sizes(cfg).items()}
