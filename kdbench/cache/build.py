"""Cache builder: run the teacher once over every view of one data shard and store one tap.

One job per (teacher, tap, data shard); :func:`finalize_store` (the gather step) writes the manifest
after every shard exists. The view of (sample, v) is rendered by the same
:class:`kdbench.data.views.ViewRenderer` the student uses, so the student replays exactly what the
teacher saw. A job of N processes (``runtime.processes``, torchrun; :mod:`kdbench.distributed`) splits the
shard's rows into N contiguous runs of whole teacher batches, gathers the outputs in order and rank 0 alone
writes the shard: the same file, bit for bit, as one process writes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from kdbench import distributed
from kdbench.cache.inputs import open_inputs
from kdbench.cache.store import encode_tap, identity_attrs, write_manifest, write_shard
from kdbench.config import CachePolicy, Config
from kdbench.data.shards import read_manifest
from kdbench.data.views import ViewRenderer
from kdbench.numerics import DEFAULT, Numerics
from kdbench.taps import compute_taps

_logger = logging.getLogger(__name__)


def encode_view(
    model: nn.Module,
    renderer: ViewRenderer,
    tap: str,
    policy: CachePolicy,
    view: int,
    rows: np.ndarray,
    batch_size: int,
    image_size: int,
    device: torch.device | str = "cpu",
    numerics: Numerics = DEFAULT,
) -> dict[str, np.ndarray]:
    """Renders view ``view`` of ``rows``, runs the teacher and encodes ``tap`` under ``policy``, in batches.

    Args:
        model: The teacher (eval mode).
        renderer: The renderer of the rows' split (a shard-local one in :func:`build_shard`).
        tap: The (normalised) tap to store.
        policy: The storage policy.
        view: The view index.
        rows: ``int64 [n]`` rows of ``renderer``'s split.
        batch_size: Teacher batch size (does not change the stored values beyond fp32 reordering noise).
        image_size: The teacher's input resolution.
        device: Where the teacher runs.
        numerics: The table protocol's forward numerics; under ``bf16`` the teacher's outputs are cast to
            float32 before they are encoded (:mod:`kdbench.numerics`).

    Returns:
        Field name -> array ``[n, ...]`` (see :func:`kdbench.cache.store.encode_tap`).
    """
    per_batch: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            x, _ = renderer.render(view, rows[start : start + batch_size], image_size, device)
            outs = numerics.run(lambda inputs: compute_taps(model, inputs, {tap}), x)  # float32 under bf16 too
            for k, arr in encode_tap(tap, outs[tap], policy).items():
                per_batch.setdefault(k, []).append(arr)
    return {k: np.concatenate(v) for k, v in per_batch.items()}


def build_shard(cfg: Config, teacher_dir: Path, data_dir: Path, tap: str, shard: int, out: Path) -> dict:
    """Computes ``tap`` of the teacher for every view of data shard ``shard`` and writes ``out`` atomically.

    The shard is rendered on its own (rows and mixup partners are shard-local, which gives the same views as
    the whole split because partners never leave their shard); the audit copy of the view parameters stores
    the partners as rows of the whole split. On streamed data (:mod:`kdbench.data.stream`) only this shard's
    encoded images are read, decoded one at a time and rendered on the CPU by the
    :class:`~kdbench.data.views.ShardRenderer` the student's stream uses: the same tensors, bit for bit.

    Returns:
        Timing and size figures of the job.
    """
    job = open_inputs(cfg, data_dir, teacher_dir)
    model, tmeta, device = job.teacher, job.tmeta, job.device
    split = job.split("train", shards=[shard])
    first = shard * split.shard_size
    recipe = cfg.protocol.views
    renderer = job.renderer(split)
    image_size = tmeta["image_size"]
    n = len(split)
    rows = np.arange(n)
    batch = cfg.protocol.eval_batch_size
    start, stop = distributed.eval_part(n, align=batch)  # whole batches per process: the one-process bits
    fields: dict[str, list[np.ndarray]] = {}
    params = []
    t0 = time.perf_counter()
    for v in range(recipe.count):
        params.append(renderer.params(v, rows))
        mine = rows[start:stop] if stop > start else rows[:1]  # a process with no rows still names every field
        encoded = encode_view(model, renderer, tap, cfg.cache, v, mine, batch, image_size, device, job.numerics)
        encoded = {k: arr[: stop - start] for k, arr in encoded.items()}
        for k, arr in encoded.items():
            fields.setdefault(k, []).append(distributed.gather_array(arr))
    seconds = time.perf_counter() - t0
    if not distributed.is_writer():
        return {"seconds": seconds, "views_per_s": n * recipe.count / seconds}
    for p in params:
        p.partner[p.partner >= 0] += first
    stacked = {k: np.stack(v) for k, v in fields.items()}
    identity = job.store_identity(tap)
    attrs = {"first_position": first, "shard": shard, **identity_attrs(identity)}
    write_shard(out, stacked, params, np.asarray(renderer.ids), attrs)
    _logger.info("cached %s of %d samples x %d views in %.1fs (%.0f views/s) -> %s",
                 tap, n, recipe.count, seconds, n * recipe.count / seconds, out)
    return {"seconds": seconds, "views_per_s": n * recipe.count / seconds}


def finalize_store(cfg: Config, teacher_dir: Path, data_dir: Path, tap: str, store_dir: Path) -> dict:
    """Writes the manifest of a store once all its shards exist (the gather step)."""
    job = open_inputs(cfg, data_dir, teacher_dir, load_model=False)
    manifest = read_manifest(data_dir)
    num_shards = len(manifest["splits"]["train"]["shards"])
    meta = {
        **job.store_identity(tap),
        "teacher_model": job.tmeta["model"],
        "view_recipe": cfg.protocol.views,
        "num_classes": manifest["num_classes"],
        "shard_size": manifest["shard_size"],
        "data_manifest_sha256": job.data_manifest_sha256(),
    }
    return write_manifest(store_dir, num_shards, meta)
