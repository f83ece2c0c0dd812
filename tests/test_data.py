"""Data sources in their standard formats (generated small), shards, manifests and their failure modes."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from kdbench.config import DataConfig
from kdbench.data.shards import decode_pnm, encode_pnm, load_split, prepare
from kdbench.data.sources import SOURCES, shard_counts, split_sizes
from kdbench.errors import DatasetError


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = b"\x00\x00\x08" + bytes([arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def make_fmnist(root: Path, n_train: int = 300, n_test: int = 50) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        write_idx(root / name, arr)
    return arrays


def make_cifar100(root: Path, n_train: int = 120, n_test: int = 30) -> None:
    rng = np.random.default_rng(1)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        batch = {"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), "fine_labels": rng.integers(0, 100, n).tolist(),
                 "coarse_labels": rng.integers(0, 20, n).tolist(), "filenames": [f"{i}.png" for i in range(n)]}
        (d / name).write_bytes(pickle.dumps(batch))
    (d / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)],
                                          "coarse_label_names": [f"s{i}" for i in range(20)]}))


def test_fashion_mnist_idx_round_trip(tmp_path):
    arrays = make_fmnist(tmp_path / "raw")
    cfg = DataConfig(root=str(tmp_path / "raw"), val_size=60, shard_size=100, train_limit=200)
    assert split_sizes(cfg) == {"train": 200, "val": 60, "test": 50}
    assert shard_counts(cfg) == {"train": 2, "val": 1, "test": 1}
    manifest = prepare(cfg, tmp_path / "data")
    assert manifest["splits"]["train"]["count"] == 200 and manifest["num_classes"] == 10
    train, val, test = (load_split(tmp_path / "data", s) for s in ("train", "val", "test"))
    images = arrays["train-images-idx3-ubyte.gz"]
    labels = arrays["train-labels-idx1-ubyte.gz"]
    for split in (train, val):
        ids = split.ids.numpy()
        assert np.array_equal(split.images[:, 0].numpy(), images[ids])
        assert np.array_equal(split.labels.numpy(), labels[ids])
    assert not set(train.ids.tolist()) & set(val.ids.tolist())  # val is held out of train
    assert np.array_equal(test.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte.gz"])
    again = prepare(cfg, tmp_path / "data2")  # deterministic: same split, same bytes
    assert [s["sha256"] for s in again["splits"]["train"]["shards"]] == [s["sha256"] for s in manifest["splits"]["train"]["shards"]]


def test_cifar100_python_pickles(tmp_path):
    make_cifar100(tmp_path)
    cfg = DataConfig(source="cifar100", root=str(tmp_path), val_size=20, shard_size=64)
    assert split_sizes(cfg) == {"train": 100, "val": 20, "test": 30}
    raw = SOURCES.get("cifar100").load(tmp_path)
    assert raw.train_images.shape == (120, 32, 32, 3) and len(raw.class_names) == 100
    prepare(cfg, tmp_path / "data")
    train = load_split(tmp_path / "data", "train")
    assert train.images.shape == (100, 3, 32, 32)
    ids = train.ids.numpy()
    assert np.array_equal(train.images.numpy(), raw.train_images[ids].transpose(0, 3, 1, 2))


def test_missing_dataset_names_path_and_fix(tmp_path):
    with pytest.raises(DatasetError, match=r"nowhere.*apt-get install dataset-fashion-mnist"):
        split_sizes(DataConfig(root=str(tmp_path / "nowhere")))
    with pytest.raises(DatasetError, match=r"cifar-100-python.*data\.root"):
        split_sizes(DataConfig(source="cifar100", root=str(tmp_path)))


def test_truncated_idx_is_an_error(tmp_path):
    make_fmnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(DatasetError, match="truncated"):
        SOURCES.get("fashion-mnist").load(tmp_path)


def test_corrupt_or_truncated_data_shard_is_detected(tmp_path):
    make_fmnist(tmp_path / "raw")
    cfg = DataConfig(root=str(tmp_path / "raw"), val_size=60, shard_size=100)
    prepare(cfg, tmp_path / "data")
    shard = tmp_path / "data" / "train-00000.tar"
    blob = bytearray(shard.read_bytes())
    blob[2000] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"train-00000\.tar does not match its checksum.*Fix"):
        load_split(tmp_path / "data", "train")
    shard.write_bytes(bytes(blob[:5000]))
    with pytest.raises(ValueError, match="truncated"):
        load_split(tmp_path / "data", "train", verify=False)


def test_missing_manifest_means_unfinished(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        load_split(tmp_path, "train")


@pytest.mark.parametrize("shape", [(5, 7, 1), (4, 3, 3)])
def test_pnm_round_trip(shape):
    img = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    ext, payload = encode_pnm(img)
    assert ext == ("pgm" if shape[2] == 1 else "ppm")
    assert np.array_equal(decode_pnm(payload), img.transpose(2, 0, 1))
