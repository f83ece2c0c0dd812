"""Cache builder: run the teacher once over every view of one data shard and store one tap.

One job per (teacher, tap, data shard); :func:`finalize_store` (the gather step) writes the manifest
after every shard exists. The view of (sample, v) is rendered by the same
:class:`kdbench.data.views.ViewRenderer` the student uses, so the student replays exactly what the
teacher saw.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from kdbench._util import sha256_file, stable_hash
from kdbench.cache.store import encode_tap, shard_file, write_manifest, write_shard
from kdbench.config import CachePolicy, Config, ViewRecipe
from kdbench.data.shards import data_info, load_split, read_manifest
from kdbench.data.views import ViewRenderer
from kdbench.runtime import setup
from kdbench.taps import compute_taps
from kdbench.teacher import load_teacher, read_teacher_metrics

_logger = logging.getLogger(__name__)


def store_identity(teacher_sha256: str, tap: str, recipe: ViewRecipe, policy: CachePolicy, image_size: int) -> dict:
    """The manifest fields a reader checks: a store built for anything else is refused."""
    return {
        "teacher_sha256": teacher_sha256,
        "tap": tap,
        "view_recipe_hash": stable_hash(recipe),
        "views": recipe.count,
        "policy": {"logits_dtype": policy.logits_dtype, "topk": policy.topk, "feature_pool": policy.feature_pool,
                   "feature_dtype": policy.feature_dtype},
        "teacher_image_size": image_size,
    }


def build_shard(cfg: Config, teacher_dir: Path, data_dir: Path, tap: str, shard: int, out: Path) -> dict:
    """Computes ``tap`` of the teacher for every view of data shard ``shard`` and writes ``out`` atomically.

    Returns:
        Timing and size figures of the job.
    """
    device = setup(cfg.runtime)
    data = data_info(read_manifest(data_dir))
    model, tmeta = load_teacher(teacher_dir, data, device)
    split = load_split(data_dir, "train", shards=[shard])
    first = shard * split.shard_size
    recipe = cfg.protocol.views
    renderer = ViewRenderer(recipe, split.images, split.ids, split.shard_size, data.mean, data.std)
    image_size = tmeta["image_size"]
    n, bs = len(split), cfg.protocol.eval_batch_size
    fields: dict[str, list] = {}
    params = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for v in range(recipe.count):
            per_view: dict[str, list] = {}
            rows = np.arange(n)
            params.append(renderer.params(v, rows))
            for start in range(0, n, bs):
                x, _ = renderer.render(v, rows[start : start + bs], image_size, device)
                outs = compute_taps(model, x.contiguous(memory_format=torch.channels_last), {tap})
                for k, arr in encode_tap(tap, outs[tap], cfg.cache).items():
                    per_view.setdefault(k, []).append(arr)
            for k, arrs in per_view.items():
                fields.setdefault(k, []).append(np.concatenate(arrs))
    seconds = time.perf_counter() - t0
    # The partner rows are shard-local in `renderer`; store them as rows of the whole split.
    for p in params:
        p.partner[p.partner >= 0] += first
    stacked = {k: np.stack(v) for k, v in fields.items()}
    attrs = {"tap": tap, "first_position": first, "shard": shard, "teacher_sha256": tmeta["sha256"],
             "view_recipe_hash": stable_hash(recipe)}
    write_shard(out, stacked, params, split.ids.numpy(), attrs)
    _logger.info("cached %s of %d samples x %d views in %.1fs (%.0f views/s) -> %s",
                 tap, n, recipe.count, seconds, n * recipe.count / seconds, out)
    return {"seconds": seconds, "views_per_s": n * recipe.count / seconds}


def finalize_store(cfg: Config, teacher_dir: Path, data_dir: Path, tap: str, store_dir: Path) -> dict:
    """Writes the manifest of a store once all its shards exist (the gather step)."""
    manifest = read_manifest(data_dir)
    tmeta = read_teacher_metrics(teacher_dir)
    num_shards = len(manifest["splits"]["train"]["shards"])
    meta = {
        **store_identity(tmeta["sha256"], tap, cfg.protocol.views, cfg.cache, tmeta["image_size"]),
        "teacher_model": tmeta["model"],
        "view_recipe": cfg.protocol.views,
        "num_classes": manifest["num_classes"],
        "shard_size": manifest["shard_size"],
        "data_manifest_sha256": sha256_file(Path(data_dir) / "manifest.json"),
    }
    return write_manifest(store_dir, num_shards, meta)
