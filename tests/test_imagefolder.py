"""ImageNet-scale data (issue 14, part A): the imagefolder and webdataset sources, shards of original bytes, the
fan-out of the data step over shard groups, and the unchanged PNM path of the fixed-size sources."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import yaml
from _helpers_store import write_fmnist_idx
from PIL import Image

from kdbench.config import DataConfig
from kdbench.data.codec import decode_image
from kdbench.data.layout import SPLITS, group_count, part_file, shard_groups
from kdbench.data.prepare import prepare, write_group
from kdbench.data.shards import load_split
from kdbench.data.sources import check_data_config, split_sizes
from kdbench.errors import ConfigError, DatasetError, DataShardError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny-imagefolder.yaml"
CLASSES = ("n01", "n02", "n03")
FORMATS = [("JPEG", ".JPEG"), ("JPEG", ".jpg"), ("PNG", ".png")]


def make_folder(root: Path, n_train: int = 12, n_test: int = 2, seed: int = 0) -> Path:
    """``root/train/<class>/`` and ``root/val/<class>/``: JPEG (.JPEG / .jpg) and PNG files of varying, mostly
    non-square sizes, grey and RGB, plus a file that is not an image (ignored)."""
    rng = np.random.default_rng(seed)
    for folder, n in (("train", n_train), ("val", n_test)):
        for c in CLASSES:
            d = root / folder / c
            d.mkdir(parents=True)
            for i in range(n):
                h, w = (13, 31) if i == 0 else rng.integers(9, 40, 2)
                shape = (h, w) if i % 2 == 0 else (h, w, 3)  # grey and RGB
                fmt, ext = FORMATS[i % 3]
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"img{i:02d}{ext}", format=fmt)
    (root / "train" / CLASSES[0] / "notes.txt").write_text("not an image")
    return root


def image_files(root: Path, folder: str) -> list[str]:
    """The relative paths of the images of ``root/folder``, sorted: index = sample key."""
    return sorted(f"{c}/{p.name}" for c in CLASSES for p in (root / folder / c).iterdir()
                  if p.suffix.lower() in (".jpeg", ".jpg", ".png"))


def folder_cfg(root: Path, **changes) -> DataConfig:
    return DataConfig(**{"source": "imagefolder", "root": str(root), "image_size": 32, "val_size": 6,
                         "shard_size": 8, **changes})


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            assert (m.mtime, m.uname, m.gname) == (0, "", "")  # fixed owner and mtime: bytes from the data alone
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_shards_hold_the_original_bytes_for_tarfile_and_webdataset(tmp_path):
    root = make_folder(tmp_path / "raw")
    cfg = folder_cfg(root)
    assert split_sizes(cfg) == {"train": 30, "val": 6, "test": 6}
    m = prepare(cfg, tmp_path / "data")
    assert (m["encoding"], m["native_size"], m["image_size"], m["channels"]) == ("original", None, [32, 32], 3)
    assert m["class_names"] == list(CLASSES) and m["num_classes"] == 3 and m["format_version"] == 2
    keys = {}
    for split in SPLITS:
        folder = "val" if split == "test" else "train"
        files = image_files(root, folder)
        keys[split] = []
        for shard in m["splits"][split]["shards"]:
            path = tmp_path / "data" / shard["file"]
            got = members(path)
            shard_keys = sorted({name.split(".")[0] for name in got})
            assert len(got) == 2 * len(shard_keys) == 2 * shard["count"]
            samples = list(wds.WebDataset(str(path), shardshuffle=False))  # plain webdataset, no kdbench code
            assert [s["__key__"] for s in samples] == shard_keys
            for key, sample in zip(shard_keys, samples):
                rel = files[int(key)]
                ext = "png" if rel.endswith(".png") else "jpg"  # lower case, .JPEG -> jpg
                original = (root / folder / rel).read_bytes()
                assert got[f"{key}.{ext}"] == sample[ext] == original
                assert int(got[f"{key}.cls"]) == int(sample["cls"]) == CLASSES.index(rel.split("/")[0])
            keys[split] += [int(k) for k in shard_keys]
    n_train = len(image_files(root, "train"))
    assert sorted(keys["train"] + keys["val"]) == list(range(n_train))
    assert not set(keys["train"]) & set(keys["val"])
    assert keys["test"] == list(range(len(image_files(root, "val"))))
    # The statistics: float64 mean / std of every training image's pixels (grey ones as RGB), as numpy has them.
    train_files = image_files(root, "train")
    pixels = np.concatenate([decode_image((root / "train" / train_files[k]).read_bytes(), "jpg", 3).reshape(3, -1)
                             for k in keys["train"]], axis=1).astype(np.float64) / 255.0
    assert m["mean"] == pixels.mean(axis=1).round(6).tolist() and m["std"] == pixels.std(axis=1).round(6).tolist()


def test_grey_images_as_one_channel(tmp_path):
    root = make_folder(tmp_path / "raw", n_train=4, n_test=1)
    m = prepare(folder_cfg(root, channels=1, val_size=3), tmp_path / "data")
    assert m["channels"] == 1 and len(m["mean"]) == len(m["std"]) == 1


def test_a_corrupt_image_is_named_with_its_key_and_leaves_no_partial_shard(tmp_path):
    root = make_folder(tmp_path / "raw")
    bad = root / "train" / "n02" / "img04.jpg"
    bad.write_bytes(bad.read_bytes()[:150])  # a truncated JPEG
    key = image_files(root, "train").index("n02/img04.jpg")
    cfg = folder_cfg(root)
    shard = next(s.file for g in shard_groups(cfg) for s in g if s.split != "test" and key in s.keys.tolist())
    with pytest.raises(DatasetError, match=rf"{re.escape(str(bad))}: sample key {key:07d} .*not a readable image"
                                           rf".*Fix: replace or remove that file"):
        prepare(cfg, tmp_path / "data")
    assert not (tmp_path / "data" / shard).exists() and not (tmp_path / "data" / "manifest.json").exists()
    assert not [p for p in (tmp_path / "data").iterdir() if ".tmp-" in p.name]  # nothing half-written is left


def test_fanned_out_groups_and_their_merge_give_the_one_job_manifest(tmp_path):
    root = make_folder(tmp_path / "raw")
    one = prepare(folder_cfg(root), tmp_path / "one")
    fanned = folder_cfg(root, shards_per_job=2)
    assert group_count(fanned) == 3 and group_count(folder_cfg(root)) == 1
    # The workflow's way: `kdbench prepare-data --group K` per group, then `kdbench prepare-data` merges.
    from kdbench import cli

    raw = yaml.safe_load(TINY.read_text())
    raw["data"]["root"] = str(root)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    for g in range(3):
        args = ["prepare-data", "--config", str(config), "--out", str(tmp_path / "fan"), "--group", str(g)]
        assert cli.main(args) == 0
        assert (tmp_path / "fan" / part_file(g)).exists() and not (tmp_path / "fan" / "manifest.json").exists()
    assert cli.main(["prepare-data", "--config", str(config), "--out", str(tmp_path / "fan")]) == 0
    assert (tmp_path / "fan" / "manifest.json").read_bytes() == (tmp_path / "one" / "manifest.json").read_bytes()
    for shard in (s["file"] for split in one["splits"].values() for s in split["shards"]):
        assert (tmp_path / "fan" / shard).read_bytes() == (tmp_path / "one" / shard).read_bytes()
    # A part written for another config (or another listing of the folder) is refused, naming the part file.
    part = tmp_path / "fan" / part_file(1)
    stale = json.loads(part.read_text())
    stale["source_sizes"][0] += 1
    part.write_text(json.dumps(stale))
    with pytest.raises(DataShardError, match=rf"{re.escape(str(part))} does not belong.*source_sizes.*Fix:"):
        prepare(fanned, tmp_path / "fan")


def test_the_plan_schedules_one_data_shards_job_per_group(tmp_path):
    from kdbench.plan import Layout, Plan

    root = make_folder(tmp_path / "raw")
    plan = Plan.resolve([TINY], {"data": {"root": str(root)}})
    (key,) = plan.data
    assert plan.data_parts(key) == [Layout.DATA_PART.format(dkey=key, group=f"{g:05d}") for g in range(3)]
    # shards_per_job only splits the work: same data directory, no part files without it.
    one = Plan.resolve([TINY], {"data": {"root": str(root), "shards_per_job": None}})
    assert list(one.data) == [key] and one.data_parts(key) == []
    assert len(plan.store_shards(next(iter(plan.stores)))) == 4  # 30 training images in shards of 8


def write_wds_shards(root: Path, out: Path) -> None:
    """The image folder as webdataset shards of their own: ``train/`` in two shards (the second written first),
    ``val/`` in one; sample keys of their own, ``jpeg`` / ``png`` members, an extra ``json`` member. In sorted
    shard order, the samples follow the folder's sorted files (the webdataset keys are the folder's keys)."""
    for folder, count in (("train", 2), ("val", 1)):
        files = image_files(root, folder)
        d = out / ("test" if folder == "val" else "train")
        d.mkdir(parents=True)
        for s in reversed(range(count)):
            with open(d / f"{d.name}-{s:06d}.tar", "wb") as f, wds.TarWriter(f, encoder=False) as sink:
                for rel in files[s * len(files) // count : (s + 1) * len(files) // count]:
                    ext = "png" if rel.endswith(".png") else "jpeg"
                    sink.write({"__key__": rel.replace("/", "_").split(".")[0], ext: (root / folder / rel).read_bytes(),
                                "cls": str(CLASSES.index(rel.split("/")[0])).encode(), "json": b"{}"})


def test_webdataset_source_round_trip(tmp_path):
    root = make_folder(tmp_path / "raw")
    write_wds_shards(root, tmp_path / "wds")
    train_bytes = [(root / "train" / rel).read_bytes() for rel in image_files(root, "train")]
    cfg = DataConfig(source="webdataset", train_shards=str(tmp_path / "wds/train/train-{000000..000001}.tar"),
                     test_shards=str(tmp_path / "wds/test"), num_classes=3, image_size=32, val_size=6,
                     shard_size=8)
    m = prepare(cfg, tmp_path / "data")
    assert m["encoding"] == "original" and m["splits"]["test"]["count"] == 6 and m["root"] is None
    seen = []
    for split in ("train", "val"):
        for shard in m["splits"][split]["shards"]:
            got = members(tmp_path / "data" / shard["file"])
            for name, payload in got.items():
                key, ext = name.split(".")
                if ext != "cls":
                    assert ext in ("jpg", "png")  # jpeg -> jpg
                    assert payload == train_bytes[int(key)]  # the original bytes
                    seen.append(int(key))
    assert sorted(seen) == list(range(len(train_bytes)))
    # The same data from the image folder: same split, same bytes in every shard, same statistics.
    folder = prepare(folder_cfg(root), tmp_path / "folder")
    assert folder["splits"] == m["splits"]
    assert (folder["mean"], folder["std"]) == (m["mean"], m["std"])
    # A wids shard index gives the counts without reading the tar headers.
    index = tmp_path / "wds" / "train" / "index.json"
    index.write_text(json.dumps({"__kind__": "wids-shard-index-v1", "shardlist": [
        {"url": f"train-00000{i}.tar", "nsamples": 18} for i in (1, 0)]}))
    indexed = prepare(dataclasses.replace(cfg, train_shards=str(index)), tmp_path / "indexed")
    assert indexed["splits"] == m["splits"]


def test_source_errors_name_the_folder_or_key_and_the_fix(tmp_path):
    root = make_folder(tmp_path / "raw", n_train=3, n_test=1)
    (root / "val" / "n04").mkdir()
    val = re.escape(str(root / "val"))
    with pytest.raises(DatasetError, match=rf"class folders of {val} differ.*only in .*val: n04"):
        split_sizes(folder_cfg(root, val_size=2))
    with pytest.raises(DatasetError, match=r"image folder not found: .*nowhere/train.*Fix"):
        split_sizes(folder_cfg(tmp_path / "nowhere"))


@pytest.mark.parametrize("changes, pattern", [
    ({"source": "fashion-mnist", "image_size": 32},
     r"'data\.image_size' must be unset for data source 'fashion-mnist'"),
    ({"source": "cifar100", "channels": 3}, r"'data\.channels' must be unset"),
    ({"source": "imagefolder"}, r"'data\.image_size' is required for data source 'imagefolder'"),
    ({"source": "imagefolder", "image_size": 32, "num_classes": 3}, r"'data\.num_classes' must be unset"),
    ({"source": "webdataset", "image_size": 32, "train_shards": "a.tar", "test_shards": "b.tar"},
     r"'data\.num_classes' is required for data source 'webdataset'"),
    ({"source": "imagefolder", "image_size": 32, "channels": 2}, r"'data\.channels' must be 1 \(grey\) or 3"),
    ({"source": "imagenet"}, r"unknown data source 'imagenet'; valid choices: .*imagefolder"),
])
def test_data_keys_are_checked_per_source(changes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        check_data_config(DataConfig(**changes))


def test_a_bad_data_key_names_the_config_file(tmp_path):
    from kdbench.plan import Plan

    with pytest.raises(ConfigError, match=rf"{re.escape(str(TINY))}.*'data\.image_size' is required"):
        Plan.resolve([TINY], {"data": {"root": str(tmp_path), "image_size": None}})


def test_load_split_refuses_images_of_varying_sizes(tmp_path):
    root = make_folder(tmp_path / "raw", n_train=4, n_test=1)
    prepare(folder_cfg(root, val_size=3), tmp_path / "data")
    with pytest.raises(DatasetError, match=r"varying sizes.*streamed.*kdbench\.data\.stream"):
        load_split(tmp_path / "data", "val")


# --- the fixed-size sources keep their PNM shards, byte for byte -------------------------------------------

# Written by kdbench before this change (PNM encoding, format_version 1) for write_fmnist_idx's tiny dataset.
PINNED_TINY = {
    "train": ["659764143acd6e9929c1b8b7ead3072ae1cfb07a4d057ce80b57f35d2087519f",
              "6eefb442492e1b7c0e10bb78622823aff88124ececb378d2d205741099fb8454",
              "8819edd41ad59c26f30dd9536dc026b363c35e6ccd4e43562e8de23e0fb9c75c"],
    "val": ["17003f4b0f3b74ed4b78d1be9a669b58f40179485729f85c4ef5ef59d2778d40"],
    "test": ["df803431c59bbe1034f57ebdda6d8cf50894a624b200824ddafbcdb91e042623"],
}


@pytest.mark.parametrize("shards_per_job", [None, 2])
def test_fixed_size_shards_and_statistics_are_unchanged(tmp_path, shards_per_job):
    root = write_fmnist_idx(tmp_path / "raw")
    cfg = DataConfig(root=str(root), val_size=24, shard_size=40, train_limit=100, test_limit=32,
                     shards_per_job=shards_per_job)
    for g in range(group_count(cfg) if shards_per_job else 0):
        write_group(cfg, tmp_path / "data", g)
    m = prepare(cfg, tmp_path / "data")
    assert {s: [e["sha256"] for e in v["shards"]] for s, v in m["splits"].items()} == PINNED_TINY
    assert (m["mean"], m["std"], m["image_size"], m["channels"]) == ([0.329143], [0.241109], [28, 28], 1)
    assert (m["encoding"], m["native_size"]) == ("pnm", [28, 28])
    assert "shards_per_job" not in m["data_config"]


FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not (FMNIST / "train-labels-idx1-ubyte.gz").exists(), reason="needs dataset-fashion-mnist")
def test_the_embedded_defaults_manifest_is_unchanged(tmp_path):
    """The default's manifest is the one kdbench wrote before (sha256 pinned) plus the format version 2 keys."""
    from kdbench.config import load_config

    m = prepare(load_config(REPO / "workflow" / "config" / "config.yaml").data, tmp_path)
    text = (tmp_path / "manifest.json").read_text()
    old = {k: v for k, v in {**json.loads(text), "format_version": 1}.items()
           if k not in ("native_size", "encoding")}
    old_sha256 = hashlib.sha256((json.dumps(old, indent=2) + "\n").encode()).hexdigest()
    assert old_sha256 == "9a28e68cd19386fb86b930c536ebc1ee69136ea64f4911fa5848119c420abb2b"  # before this change
    assert (m["encoding"], m["native_size"]) == ("pnm", [28, 28])


# --- the ImageNet config plans on a synthetic folder -------------------------------------------------------

ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def test_the_imagenet_config_dry_runs_on_a_synthetic_folder(tmp_path):
    root = make_folder(tmp_path / "imagenet", n_train=8, n_test=2)
    # The teachers' checkpoints only need to exist to plan; train-teacher checks them against the model.
    ckpt = {t: tmp_path / f"{t}.pth" for t in ("resnet34", "resnet50")}
    for path in ckpt.values():
        path.write_bytes(b"a state dict")
    teachers = "{" + ", ".join(f"{t}: {{checkpoint: {p}}}" for t, p in ckpt.items()) + "}"
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "-n", "--configfile", str(REPO / "workflow" / "config" / "imagenet.yaml"), "--config",
           f"data={{root: {root}, val_size: 4, shard_size: 4, shards_per_job: 2}}", f"teachers={teachers}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = out.stdout.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    counts = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}
    # 24 training images - 4 val = 5 train shards of 4, 1 val, 2 test: 8 shards in 4 groups; 2 teachers x 2
    # students x 4 methods x 1 seed.
    assert counts["data_shards"] == 4 and counts["prepare_data"] == 1 and counts["train_teacher"] == 2
    assert counts["cache_shard"] == 2 * 5 and counts["cache_manifest"] == 2 and counts["distill"] == 16
    assert str(ckpt["resnet50"]) in out.stdout


@pytest.mark.slow
def test_the_tiny_image_folder_table_runs_end_to_end_through_snakemake_and_reruns_nothing(tmp_path):
    """The ImageNet path in small: variable-size grey and RGB JPEG/PNG files -> fanned-out data shards of the
    original bytes -> a teacher trained on the stream -> its per-view store -> streamed distill jobs -> the
    leaderboard; the same command again plans nothing, and a second workdir gives identical records."""
    root = make_folder(tmp_path / "folder", n_train=12, n_test=2)
    records = {}

    def command(run: str) -> list[str]:
        return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                str(tmp_path / run), "--cores", "1", "--configfile", str(TINY), "--config", f"data={{root: {root}}}"]

    # The two workdirs at once, one core each (the jobs are mostly process start-up: half the wall time).
    procs = {run: subprocess.Popen(command(run), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
             for run in ("a", "b")}
    for run, proc in procs.items():
        output, _ = proc.communicate(timeout=1500)
        assert proc.returncode == 0, output[-6000:]
        work = tmp_path / run
        board = work / "results" / "tiny-imagefolder" / "leaderboard" / "leaderboard.csv"
        rows = board.read_text().splitlines()
        assert len(rows) == 1 + 2  # header + baseline and kd
        runs = sorted((work / "results" / "tiny-imagefolder" / "runs").rglob("record.json"))
        assert len(runs) == 2
        records[run] = {p.relative_to(work).as_posix(): json.loads(p.read_text())["final"] for p in runs}
        manifest = json.loads(next((work / "results" / "data").glob("*/manifest.json")).read_text())
        assert manifest["encoding"] == "original" and manifest["native_size"] is None
    assert records["a"] == records["b"]
    again = subprocess.run(command("b") + ["-n"], capture_output=True, text=True, timeout=600, env=ENV)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
