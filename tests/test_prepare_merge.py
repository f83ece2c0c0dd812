"""kdbench.data.prepare in small: the pixel sums and the statistics against numpy, the manifest field by field
against hand values, the merge's every consistency check with its whole message, the group writer's range check
and log, and a prepare that resumes a partly fanned-out directory."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import re
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _helpers_store import write_fmnist_idx

from kdbench.config import DataConfig
from kdbench.data import prepare as prep
from kdbench.data.codec import ImageDecodeError
from kdbench.data.layout import group_count, part_file, shard_groups
from kdbench.data.prepare import PixelSums, mean_std, merge, prepare, write_group
from kdbench.data.shards import load_split
from kdbench.data.sources import SOURCES
from kdbench.errors import ConfigError, DatasetError, DataShardError

FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]


# --- the pixel sums and the statistics ----------------------------------------------------------------------------


def test_pixel_sums_are_the_exact_integer_sums_of_the_pixels():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 200, (2, 3, 5), dtype=np.uint8)  # [C, H, W]; no pixel reaches 255
    batch = rng.integers(0, 256, (2, 4, 3, 5), dtype=np.uint8)  # [C, N, H, W]
    sums = PixelSums(2)
    assert sums.to_json() == {"pixel_sum": [0, 0], "pixel_sq_sum": [0, 0], "pixel_count": 0}
    sums.add(image)
    sums.add(batch)
    pixels = np.concatenate([image.reshape(2, -1), batch.reshape(2, -1)], axis=1).astype(np.int64)
    assert sums.to_json() == {"pixel_sum": pixels.sum(axis=1).tolist(),
                              "pixel_sq_sum": (pixels**2).sum(axis=1).tolist(), "pixel_count": 15 + 60}
    assert all(type(v) is int for v in [*sums.sum, *sums.sq, sums.count])  # Python ints: exact, JSON as is
    one = PixelSums(1)
    one.add(np.array([[[3]]], dtype=np.uint8))  # a single dark pixel: the histogram is padded to 256 values
    assert one.to_json() == {"pixel_sum": [3], "pixel_sq_sum": [9], "pixel_count": 1}


def test_mean_std_of_the_sums_is_numpys_float64_mean_and_std_rounded_to_6_decimals():
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (3, h, 2), dtype=np.uint8) for h in (1, 2, 3)]  # 2, 4 and 6 pixels
    entries = []
    for img in images:  # one entry (a shard's sums) per image
        sums = PixelSums(3)
        sums.add(img)
        entries.append(sums.to_json())
    pixels = np.concatenate([img.reshape(3, -1) for img in images], axis=1).astype(np.float64) / 255.0
    mean, std = mean_std(iter(entries), 3)
    assert mean == pixels.mean(axis=1).round(6).tolist() and std == pixels.std(axis=1).round(6).tolist()
    # By hand: one pixel 1 (mean 1/255, std 0); pixels 0 and 255 (mean 0.5, std 0.5); 0, 0, 0, 51 (0.05, ~0.0866).
    assert mean_std([{"pixel_sum": [1], "pixel_sq_sum": [1], "pixel_count": 1}], 1) == ([0.003922], [0.0])
    assert mean_std([{"pixel_sum": [0], "pixel_sq_sum": [0], "pixel_count": 1},
                     {"pixel_sum": [255], "pixel_sq_sum": [255 * 255], "pixel_count": 1}], 1) == ([0.5], [0.5])
    assert mean_std([{"pixel_sum": [51], "pixel_sq_sum": [51 * 51], "pixel_count": 4}], 1) == ([0.05], [0.086603])


# --- the merge ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fanned(tmp_path_factory) -> tuple[DataConfig, Path, list[dict]]:
    """A tiny Fashion-MNIST in shards of 40, one shard per group: 3 train, 1 val, 1 test shard (5 groups)."""
    root = tmp_path_factory.mktemp("fanned")
    raw = write_fmnist_idx(root / "raw")
    cfg = DataConfig(root=str(raw), val_size=24, shard_size=40, train_limit=100, test_limit=32, shards_per_job=1)
    out = root / "data"
    assert group_count(cfg) == 5
    return cfg, out, [write_group(cfg, out, g) for g in range(5)]


def fix(out: Path) -> str:
    return f"Fix: delete {out} and rerun `kdbench prepare-data` (or the workflow)"


def test_the_manifest_field_by_field(fanned):
    cfg, out, parts = fanned
    m = merge(cfg, out, copy.deepcopy(parts))
    train = load_split(out, "train")
    pixels = train.images.numpy().astype(np.float64) / 255.0
    shards = {split: [{"file": f"{split}-{i:05d}.tar", "count": n,
                       "sha256": hashlib.sha256((out / f"{split}-{i:05d}.tar").read_bytes()).hexdigest()}
                      for i, n in enumerate(counts)]
              for split, counts in {"train": [40, 40, 20], "val": [24], "test": [32]}.items()}
    assert m == {
        "format_version": 2,
        "source": "fashion-mnist",
        "root": cfg.root,
        "data_config": parts[0]["data_config"],
        "image_size": [28, 28],
        "native_size": [28, 28],
        "encoding": "pnm",
        "channels": 1,
        "num_classes": 10,
        "class_names": FMNIST_CLASSES,
        "mean": [round(float(pixels.mean()), 6)],
        "std": [round(float(pixels.std()), 6)],
        "shard_size": 40,
        "splits": {split: {"count": sum(e["count"] for e in v), "shards": v} for split, v in shards.items()},
    }
    assert list(m) == ["format_version", "source", "root", "data_config", "image_size", "native_size", "encoding",
                       "channels", "num_classes", "class_names", "mean", "std", "shard_size", "splits"]
    assert json.loads((out / "manifest.json").read_text()) == m
    assert m["data_config"]["root"] == cfg.root and "shards_per_job" not in m["data_config"]


def test_a_part_file_holds_what_write_group_returns(fanned):
    cfg, out, parts = fanned
    for g, part in enumerate(parts):
        assert json.loads((out / part_file(g)).read_text()) == part
        assert part["group"] == g and part["format_version"] == 2 and part["source_sizes"] == [160, 48]
    assert [e["split"] for p in parts for e in p["shards"]] == ["train", "train", "train", "val", "test"]
    assert {"pixel_sum", "pixel_sq_sum", "pixel_count"} <= set(parts[0]["shards"][0])
    assert "pixel_sum" not in parts[3]["shards"][0] and "pixel_sum" not in parts[4]["shards"][0]  # train only


def stale_message(out: Path, group: int, fields: str) -> str:
    return (f"{out / part_file(group)} does not belong with this data config or with the other parts (its {fields}"
            f" differ): the config or the raw data changed. {fix(out)}")


@pytest.mark.parametrize("change, fields", [
    (lambda p: p.pop("channels"), "channels"),  # a field missing from a part
    (lambda p: p.update(extra=1), "extra"),  # a field only this part has
    (lambda p: p.update(channels=3, encoding="original", source_sizes=[160, 47]), "source_sizes, channels, encoding"),
])
def test_a_part_that_differs_is_refused_naming_the_file_and_every_field(fanned, change, fields):
    cfg, out, parts = fanned
    changed = copy.deepcopy(parts)
    change(changed[2])
    with pytest.raises(DataShardError) as e:
        merge(cfg, out, changed)
    assert str(e.value) == stale_message(out, 2, fields)


def test_parts_that_do_not_hold_a_splits_shards_are_refused(fanned):
    cfg, out, parts = fanned
    message = f"the parts in {out / 'parts'} do not hold the train split's shards. {fix(out)}"
    gap = copy.deepcopy(parts)
    gap[1]["shards"][0]["index"] = 5  # the counts add up, the indices do not
    short = copy.deepcopy(parts)
    short[2]["shards"][0]["count"] = 19  # the indices are right, a count is not
    swapped = copy.deepcopy([parts[0], parts[2], parts[1], parts[3], parts[4]])  # train-00002 before train-00001
    for changed in (gap, short, swapped):
        for g, part in enumerate(changed):
            part["group"] = g  # each in its place: only the shards are wrong
        with pytest.raises(DataShardError) as e:
            merge(cfg, out, changed)
        assert str(e.value) == message


def test_a_listed_shard_that_is_missing_is_named(fanned):
    cfg, out, parts = fanned
    changed = copy.deepcopy(parts)
    changed[3]["shards"][0]["file"] = "val-00007.tar"
    with pytest.raises(DatasetError) as e:
        merge(cfg, out, changed)
    assert str(e.value) == f"data shard missing: {out / 'val-00007.tar'} (listed in its part file). {fix(out)}"


def test_group_out_of_range_names_the_groups(fanned, tmp_path):
    cfg, _, _ = fanned
    for group in (-1, 5):
        with pytest.raises(ConfigError) as e:
            write_group(cfg, tmp_path, group)
        assert str(e.value) == f"--group {group}: the data config has 5 shard groups (0 to 4; data.shards_per_job=1)"
    assert not list(tmp_path.iterdir())


def test_each_written_shard_is_logged_with_its_count(fanned, tmp_path, caplog):
    cfg, _, _ = fanned
    with caplog.at_level(logging.INFO, logger="kdbench.data.prepare"):
        write_group(dataclasses.replace(cfg, shards_per_job=2), tmp_path, 1)
    assert [r.getMessage() for r in caplog.records if r.name == "kdbench.data.prepare"] == [
        f"wrote {tmp_path / 'train-00002.tar'} (20 samples)", f"wrote {tmp_path / 'val-00000.tar'} (24 samples)"]


# --- prepare -------------------------------------------------------------------------------------------------------


def test_prepare_writes_the_groups_whose_part_is_missing_and_reads_the_others(fanned, tmp_path):
    cfg, out, parts = fanned
    one = prepare(dataclasses.replace(cfg, shards_per_job=None), tmp_path / "one")
    resumed = tmp_path / "resumed"
    write_group(cfg, resumed, 0)
    write_group(cfg, resumed, 3)
    m = prepare(cfg, resumed)
    assert m == one
    assert sorted(p.name for p in (resumed / "parts").iterdir()) == [Path(part_file(g)).name for g in (0, 3)]
    for split in m["splits"].values():
        for s in split["shards"]:
            assert (resumed / s["file"]).read_bytes() == (tmp_path / "one" / s["file"]).read_bytes()
    # The part files are read, not rewritten: a part that differs is refused.
    part = resumed / part_file(3)
    part.write_text(json.dumps({**parts[3], "channels": 2}))
    with pytest.raises(DataShardError) as e:
        prepare(cfg, resumed)
    assert str(e.value) == stale_message(resumed, 3, "channels")
    part.write_text("{")
    with pytest.raises(ValueError, match=rf"^data part file {re.escape(str(part))} is not valid JSON"):
        prepare(cfg, resumed)


# --- the encoded path: what the source gives is checked ------------------------------------------------------------


def test_an_encoded_source_that_gives_fewer_samples_is_refused(tmp_path, monkeypatch):
    from test_imagefolder import folder_cfg, make_folder

    root = make_folder(tmp_path / "raw", n_train=4, n_test=1)
    cfg = folder_cfg(root, val_size=3, shard_size=4)
    source = SOURCES.get("imagefolder")

    def fewer(cfg, split, keys):
        return source.samples(cfg, split, keys[:-1])

    short = dataclasses.replace(source, samples=fewer)
    monkeypatch.setattr(prep, "SOURCES", types.SimpleNamespace(get=lambda name: short))
    out = tmp_path / "data"
    with pytest.raises(DatasetError) as e:
        prepare(cfg, out)
    assert str(e.value) == (f"{out / 'train-00000.tar'}: the imagefolder source gave 3 of its 4 samples; did the"
                            f" source change? Fix: delete {out} and rerun")


def test_encoded_shards_are_deterministic_and_hold_key_and_class_members(tmp_path):
    from test_imagefolder import CLASSES, folder_cfg, image_files, make_folder, members

    root = make_folder(tmp_path / "raw", n_train=4, n_test=1)
    cfg = folder_cfg(root, val_size=3, shard_size=4)
    a, b = prepare(cfg, tmp_path / "a"), prepare(cfg, tmp_path / "b")
    assert a == b
    assert (a["root"], a["image_size"], a["native_size"], a["encoding"]) == (str(root), [32, 32], None, "original")
    files = image_files(root, "val")
    for s in a["splits"]["test"]["shards"]:
        assert (tmp_path / "a" / s["file"]).read_bytes() == (tmp_path / "b" / s["file"]).read_bytes()
        got = members(tmp_path / "a" / s["file"])
        assert sorted(got) == sorted(f"{k:07d}.{e}" for k in range(3) for e in ("cls", files[k].split(".")[1].lower()
                                                                                 .replace("jpeg", "jpg")))
        assert [got[f"{k:07d}.cls"] for k in range(3)] == [str(CLASSES.index(f.split("/")[0])).encode() for f in files]


def test_a_corrupt_image_is_named_with_its_source_split_key_shard_and_the_fix(tmp_path):
    from test_imagefolder import folder_cfg, image_files, make_folder

    root = make_folder(tmp_path / "raw", n_train=4, n_test=1)
    cfg = folder_cfg(root, val_size=3, shard_size=4)
    (val,) = [spec for group in shard_groups(cfg) for spec in group if spec.split == "val"]
    key = int(val.keys[1])
    bad = root / "train" / image_files(root, "train")[key]  # our val split is drawn from the source's train split
    bad.write_bytes(bad.read_bytes()[:150])
    out = tmp_path / "data"
    with pytest.raises(DatasetError) as e:
        prepare(cfg, out)
    assert isinstance(e.value.__cause__, ImageDecodeError)
    assert str(e.value) == (f"{bad}: sample key {key:07d} of the source's train split is not a readable image"
                            f" ({e.value.__cause__}); nothing was written to val-00000.tar. Fix: replace or remove"
                            f" that file, then delete {out} and rerun `kdbench prepare-data` (or the workflow)")
    assert not (out / "val-00000.tar").exists() and (out / "train-00000.tar").exists()


def test_only_the_train_shards_of_an_encoded_source_carry_pixel_sums(tmp_path):
    from test_imagefolder import folder_cfg, make_folder

    root = make_folder(tmp_path / "raw", n_train=4, n_test=1)
    part = write_group(folder_cfg(root, val_size=3, shard_size=4), tmp_path / "data", 0)
    base = {"split", "index", "file", "count", "sha256"}
    assert [(e["split"], set(e)) for e in part["shards"]] == [
        *[("train", base | {"pixel_sum", "pixel_sq_sum", "pixel_count"})] * 3, ("val", base), ("test", base)]
    assert [len(e["pixel_sum"]) for e in part["shards"][:3]] == [3, 3, 3]
