"""Data sources in their standard formats (generated small), shards, manifests and their failure modes."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from kdbench.config import DataConfig
from kdbench.data.codec import decode_pnm, encode_pnm
from kdbench.data.prepare import prepare
from kdbench.data.shards import load_split
from kdbench.data.sources import SOURCES, shard_counts, split_sizes
from kdbench.errors import DatasetError, DataShardError


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
    # Cut inside a member, after a whole sample (a cls then a pgm: 2560 bytes), after a sample's cls only.
    for cut in (5000, 2560, 1024):
        shard.write_bytes(bytes(blob[:cut]))
        with pytest.raises(DataShardError, match=r"train-00000\.tar .*truncated.*Fix: delete"):
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


@pytest.mark.parametrize("source", ["fashion-mnist", "cifar100"])
def test_shards_are_plain_webdataset_and_load_the_source_bytes(tmp_path, source):
    """kdbench's shards are ordinary webdataset tars (read by ``wds.WebDataset`` and ``tarfile``), and
    ``load_split`` returns the source's pixels, labels and ids byte for byte."""
    if source == "cifar100":
        make_cifar100(tmp_path / "raw")
    else:
        make_fmnist(tmp_path / "raw")
    cfg = DataConfig(source=source, root=str(tmp_path / "raw"), val_size=20, shard_size=32)
    manifest = prepare(cfg, tmp_path / "data")
    raw = SOURCES.get(source).load(tmp_path / "raw")
    ext, spec = ("pgm", "l8") if raw.train_images.shape[3] == 1 else ("ppm", "rgb8")
    ids_all = []
    for split, (images, labels) in {
        "train": (raw.train_images, raw.train_labels),
        "val": (raw.train_images, raw.train_labels),
        "test": (raw.test_images, raw.test_labels),
    }.items():
        got = load_split(tmp_path / "data", split)
        ids = got.ids.numpy()
        ids_all.append(ids)
        want = np.ascontiguousarray(images[ids].transpose(0, 3, 1, 2))
        assert got.images.dtype == torch.uint8 and got.images.numpy().tobytes() == want.tobytes()
        assert got.labels.numpy().tobytes() == labels[ids].astype(np.int64).tobytes()
        urls = [str(tmp_path / "data" / s["file"]) for s in manifest["splits"][split]["shards"]]
        # webdataset's own pipeline, with its own PNM decoder (PIL), sees the same samples in the same order.
        samples = list(wds.WebDataset(urls, shardshuffle=False).decode(spec).to_tuple("__key__", ext, "cls"))
        assert [int(key) for key, _, _ in samples] == ids.tolist()
        decoded = np.stack([img.reshape(*img.shape[:2], -1) for _, img, _ in samples])  # l8 drops the channel axis
        assert decoded.tobytes() == images[ids].tobytes()
        assert [cls for _, _, cls in samples] == labels[ids].tolist()
        # Plain tarfile: one <key>.cls and one <key>.<ext> per sample, nothing else.
        with tarfile.open(urls[0]) as tar:
            names = tar.getnames()
            assert names == [f"{k:07d}.{e}" for k in ids[: len(names) // 2] for e in ("cls", ext)]
            payload = tar.extractfile(names[1]).read()
            assert np.array_equal(decode_pnm(payload), want[0])
    # val is held out of train, and the three splits' ids index the source.
    assert not set(ids_all[0]) & set(ids_all[1]) and ids_all[2].tolist() == list(range(len(raw.test_labels)))
    assert sorted(np.concatenate(ids_all[:2]).tolist()) == list(range(len(raw.train_labels)))


def test_member_order_within_a_sample_does_not_matter(tmp_path):
    """Shards whose samples store the image before the label (kdbench before webdataset's TarWriter) load
    the same arrays as those written today."""
    make_fmnist(tmp_path / "raw")
    prepare(DataConfig(root=str(tmp_path / "raw"), val_size=60, shard_size=100), tmp_path / "data")
    want = load_split(tmp_path / "data", "train")
    shard = tmp_path / "data" / "train-00000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert [m.name[-3:] for m, _ in members[:2]] == ["cls", "pgm"]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(0, len(members), 2):
            for info, payload in (members[i + 1], members[i]):  # <key>.pgm, then <key>.cls
                tar.addfile(info, io.BytesIO(payload))
    got = load_split(tmp_path / "data", "train", verify=False)
    for field in ("images", "labels", "ids"):
        assert getattr(got, field).numpy().tobytes() == getattr(want, field).numpy().tobytes()
