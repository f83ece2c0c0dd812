"""Helpers shared by the store tests (no conftest): a tiny Fashion-MNIST-format dataset written as IDX gz files,
a config over it, a random-weight teacher directory, and a store built with the real cache builder.

Everything is sized for a 2-core CPU: 100 training images in shards of 40, 40 and 20 (the last one short on
purpose), 3 views with mixup, a ``cnn_s`` teacher.
"""

from __future__ import annotations

import copy
import gzip
import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import yaml

from kdbench.cache.build import build_shard, finalize_store
from kdbench.cache.store import (
    TeacherStore,
    encode_tap,
    identity_attrs,
    store_identity,
    write_manifest,
    write_shard,
)
from kdbench.config import CachePolicy, Config, ViewRecipe, parse_config
from kdbench.data.prepare import prepare
from kdbench.data.shards import load_split, read_manifest
from kdbench.data.views import view_params
from kdbench.meta import data_info
from kdbench.modeldir import read_teacher_metrics, save_model_dir
from kdbench.models import create_model
from kdbench.plan import shard_file
from kdbench.taps import tap_dirname

BASE_RAW: dict[str, Any] = {
    "name": "store-test",
    "data": {"source": "fashion-mnist", "root": "<set by tiny_raw>", "val_size": 24, "shard_size": 40,
             "train_limit": 100, "test_limit": 32},
    "protocol": {"epochs": 4, "batch_size": 32, "eval_batch_size": 16, "lr": 0.01,
                 "views": {"count": 3, "seed": 7, "mixup": 0.5}},
    "cache": {"logits_dtype": "float16"},
    "teachers": {"t": {"model": "cnn_s"}},
    "students": ["cnn_xs"],
    "methods": {"baseline": {}, "kd": {}},
    "seeds": [0],
    "runtime": {"device": "cpu", "threads": 1},
}


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_fmnist_idx(root: Path, n_train: int = 160, n_test: int = 48, seed: int = 0) -> Path:
    """Writes the four gzipped IDX files of a synthetic Fashion-MNIST (``uint8 [n, 28, 28]`` + labels).

    The images are smooth blobs plus noise, so crops, flips and mixup change what a teacher sees.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]

    def images(n: int) -> np.ndarray:
        cy, cx = rng.uniform(4, 24, (2, n, 1, 1))
        r = rng.uniform(3, 10, (n, 1, 1))
        blob = 200.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
        return np.clip(blob + rng.normal(0, 20, (n, 28, 28)) + 30, 0, 255).astype(np.uint8)

    _write_idx(root / "train-images-idx3-ubyte.gz", images(n_train))
    _write_idx(root / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, n_train))
    _write_idx(root / "t10k-images-idx3-ubyte.gz", images(n_test))
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, n_test))
    return root


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict update (``over`` wins) on a deep copy of ``base``."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else copy.deepcopy(v)
    return out


def tiny_raw(raw_root: Path, **over: Any) -> dict[str, Any]:
    """The raw config mapping over the IDX files in ``raw_root``, with sections overridden by ``over``."""
    return merge(BASE_RAW, {"data": {"root": str(raw_root)}, **over})


def tiny_config(raw_root: Path, **over: Any) -> Config:
    return parse_config(tiny_raw(raw_root, **over), source="<tiny>")


def write_config(path: Path, raw: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(raw), sort_keys=False))
    return path


def make_teacher_dir(out: Path, data_dir: Path, model_name: str = "cnn_s", seed: int = 0) -> Path:
    """A teacher directory holding a randomly initialised model (what the cache and the checks need)."""
    data = data_info(read_manifest(data_dir))
    torch.manual_seed(seed)
    model = create_model(model_name, data.num_classes, data.in_chans, data.image_size)
    with torch.no_grad():  # non-trivial BN statistics and a sharper head: logits spread like a trained net's
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        model.get_classifier().weight.mul_(40.0)
    test, val = load_split(data_dir, "test"), load_split(data_dir, "val")
    save_model_dir(out, model, model_name, test, val, data, data.image_size, 64, torch.device("cpu"), {"teacher": "t"})
    return out


def num_train_shards(data_dir: Path) -> int:
    return len(read_manifest(data_dir)["splits"]["train"]["shards"])


def build_store(cfg: Config, teacher_dir: Path, data_dir: Path, tap: str, root: Path) -> Path:
    """Builds the store of ``tap`` with the real per-shard jobs and the gather step; returns its directory."""
    store = root / tap_dirname(tap)
    for i in range(num_train_shards(data_dir)):
        build_shard(cfg, teacher_dir, data_dir, tap, i, store / shard_file(i))
    finalize_store(cfg, teacher_dir, data_dir, tap, store)
    return store


def expect_for(cfg: Config, teacher_dir: Path, tap: str) -> dict:
    """What a run with ``cfg`` and this teacher requires of the store of ``tap``."""
    tmeta = read_teacher_metrics(teacher_dir)
    return store_identity(tmeta["sha256"], tap, cfg.protocol.views, cfg.cache, tmeta["image_size"])


def setup_world(base: Path, **over: Any) -> tuple[Config, Path, Path, Path]:
    """Raw IDX files, config, prepared data directory and teacher directory under ``base``."""
    raw_root = write_fmnist_idx(base / "raw")
    raw = tiny_raw(raw_root, **over)
    cfg_path = write_config(base / "config.yaml", raw)
    cfg = parse_config(raw, source=str(cfg_path))
    data_dir = base / "data"
    prepare(cfg.data, data_dir)
    teacher_dir = make_teacher_dir(base / "teacher", data_dir)
    return cfg, cfg_path, data_dir, teacher_dir


class SpyTeacher:
    """Wraps a teacher source (cached or live) and records every (view, rows, served logits) of ``fit``."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, []

    @property
    def forward_count(self) -> int:
        return self.inner.forward_count

    def outputs(self, view, rows, device):
        out = self.inner.outputs(view, rows, device)
        self.calls.append((view, rows.copy(), out["logits"].clone()))
        return out

    def bytes_read(self) -> int:
        return self.inner.bytes_read()


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Flips one byte of a file in place (the middle one by default)."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def synthetic_store(
    root: Path, outputs: torch.Tensor, policy: CachePolicy, tap: str = "logits", shard_size: int = 10_000
) -> TeacherStore:
    """Writes given teacher outputs ``[V, N, ...]`` as a store with the real writer and opens it.

    Used where the values do not matter (read speed, bytes on disk); the view parameters are real ones of a
    default recipe with ``V`` views.
    """
    num_views, n = outputs.shape[:2]
    recipe = ViewRecipe(count=num_views)
    identity = store_identity("synthetic", tap, recipe, policy, 28)
    ids = np.arange(n)
    starts = range(0, n, shard_size)
    for s, lo in enumerate(starts):
        hi = min(n, lo + shard_size)
        encoded = [encode_tap(tap, outputs[v, lo:hi], policy) for v in range(num_views)]
        fields = {k: np.stack([e[k] for e in encoded]) for k in encoded[0]}
        params = [view_params(recipe, ids[lo:hi], np.arange(lo, hi), v, shard_size, n) for v in range(num_views)]
        attrs = {"first_position": lo, "shard": s, **identity_attrs(identity)}
        write_shard(root / shard_file(s), fields, params, ids[lo:hi], attrs)
    num_classes = outputs.shape[2] if tap == "logits" else None
    write_manifest(root, len(starts), {**identity, "num_classes": num_classes})
    return TeacherStore.open(root, identity)


def trained_world(root: Path, raw: Mapping[str, Any], taps: tuple[str, ...] = ("logits",)):
    """A config file from ``raw`` under ``root``, its data, its teacher ``t`` trained, and a finished store of
    every tap in ``taps`` (under ``root/cache/<tap>``): what the pipeline-level tests start from.

    Returns:
        ``(config path, config, data dir, teacher dir, {tap: store dir})``.
    """
    from kdbench.config import load_config
    from kdbench.data.sources import shard_counts
    from kdbench.teacher import train_teacher

    cfg_path = root / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(dict(raw)))
    cfg = load_config(cfg_path)
    data = root / "data"
    prepare(cfg.data, data)
    teacher = root / "teacher"
    train_teacher(cfg, "t", data, teacher)
    stores = {}
    for tap in taps:
        store = root / "cache" / tap
        for i in range(shard_counts(cfg.data)["train"]):
            build_shard(cfg, teacher, data, tap, i, store / shard_file(i))
        finalize_store(cfg, teacher, data, tap, store)
        stores[tap] = store
    return cfg_path, cfg, data, teacher, stores
