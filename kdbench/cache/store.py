"""The teacher-output store: one h5py file per data shard, a manifest written last.

Layout of a store (one per teacher, view recipe and tap)::

    shard-00000.h5 …     # datasets [V, n, ...]: the tap (or its top-k), and the view parameters for audit
    manifest.json        # written last: what was stored, how, from which teacher, and every shard's sha256

A shard file is written under a temporary name, fsynced and renamed, so a killed job leaves no file that
looks complete; the reader checks the manifest against what the run expects (teacher digest, view recipe,
tap, V, dtype, top-k, pooling) and, with verification on, every shard's sha256 before reading a byte.

Storage policy (global, :class:`kdbench.config.CachePolicy`): logits as fp16 (default) or fp32; or the
top-k logits (fp16) + their class indices (int16, int32 beyond 32767 classes) + the logsumexp (fp32) of the
full logits, from which :func:`reconstruct_topk` rebuilds full logits whose softmax puts the true top-k
probabilities on the top-k classes and spreads the remaining mass uniformly over the others; feature maps
optionally average-pooled to ``feature_pool`` x ``feature_pool``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from kdbench._util import atomic_path, read_json, sha256_file, write_json_atomic
from kdbench.config import CachePolicy
from kdbench.data.views import ViewParams

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": None}


class StoreError(ValueError):
    """A store that is missing, corrupt, or built for something else; the message names file, field and fix."""


def tap_dirname(tap: str) -> str:
    """Directory name of a (normalised) tap's store: ``feature[2]`` -> ``feature_2``."""
    return tap.replace("[", "_").replace("]", "")


def tap_from_dirname(name: str) -> str:
    """Inverse of :func:`tap_dirname`."""
    if name.startswith("feature_"):
        return f"feature[{name[len('feature_'):]}]"
    return name


def shard_file(index: int) -> str:
    return f"shard-{index:05d}.h5"


def encode_tap(tap: str, out: torch.Tensor, policy: CachePolicy) -> dict[str, np.ndarray]:
    """Turns one batch of a tap's outputs into the arrays stored for it.

    Args:
        tap: Tap name.
        out: ``[n, ...]`` float32 teacher outputs.
        policy: The storage policy.

    Returns:
        Field name -> array ``[n, ...]``.
    """
    out = out.detach().float()
    if tap == "logits" and policy.topk:
        k = min(policy.topk, out.shape[1])
        values, indices = out.topk(k, dim=1)
        idx_dtype = np.int16 if out.shape[1] <= 32767 else np.int32
        return {
            "topk_values": values.cpu().numpy().astype(np.float16),
            "topk_indices": indices.cpu().numpy().astype(idx_dtype),
            "lse": torch.logsumexp(out, dim=1).cpu().numpy().astype(np.float32),
        }
    if tap.startswith("feature") and policy.feature_pool and out.ndim == 4:
        out = F.adaptive_avg_pool2d(out, policy.feature_pool)
    dtype = policy.logits_dtype if tap == "logits" else policy.feature_dtype
    if dtype == "bfloat16":  # stored as raw 16-bit words (h5py has no bf16)
        return {"values_bf16": out.to(torch.bfloat16).view(torch.int16).cpu().numpy()}
    return {"values": out.cpu().numpy().astype(_DTYPES[dtype])}


def reconstruct_topk(values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Full logits from a top-k record.

    The top-k classes keep their logits; the other ``C - k`` classes share the residual probability mass
    ``r = 1 - sum_k exp(v_k - lse)`` equally, i.e. each gets the logit ``lse + log(r / (C - k))``. The softmax
    of the result equals the teacher's on the top-k classes (up to fp16 rounding).

    Args:
        values: ``[n, k]`` top-k logits.
        indices: ``[n, k]`` their classes.
        lse: ``[n]`` logsumexp of the full logits.
        num_classes: C.
    """
    values, lse = values.float(), lse.float()
    k = values.shape[1]
    if k >= num_classes:
        return torch.zeros(values.shape[0], num_classes, device=values.device).scatter(1, indices.long(), values)
    top_mass = torch.exp(values - lse[:, None]).sum(1).clamp(max=1.0)
    residual = (1.0 - top_mass).clamp(min=1e-12)
    fill = lse + torch.log(residual / (num_classes - k))
    out = fill[:, None].expand(-1, num_classes).clone()
    return out.scatter(1, indices.long(), values)


def write_shard(
    path: str | Path,
    fields: Mapping[str, np.ndarray],
    params: list[ViewParams],
    ids: np.ndarray,
    attrs: Mapping[str, Any],
) -> None:
    """Writes one shard atomically.

    Args:
        path: Final path of the ``.h5`` file.
        fields: Field -> array ``[V, n, ...]``.
        params: The view parameters of each view (audit copy of what the teacher saw).
        ids: ``int64 [n]`` sample keys.
        attrs: Scalar attributes (tap, teacher digest, recipe hash, ...).
    """
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, arr in fields.items():
                f.create_dataset(name, data=arr)  # contiguous, uncompressed: see research/stores.md
            f.create_dataset("ids", data=np.asarray(ids, dtype=np.int64))
            f.create_dataset("box", data=np.stack([p.box for p in params]))
            f.create_dataset("flip", data=np.stack([p.flip for p in params]).astype(np.uint8))
            f.create_dataset("partner", data=np.stack([p.partner for p in params]))
            f.create_dataset("lam", data=np.stack([p.lam for p in params]))
            for k, v in attrs.items():
                f.attrs[k] = v


def write_manifest(store_dir: str | Path, num_shards: int, meta: Mapping[str, Any]) -> dict:
    """Checks that every shard of a store is present and complete, then writes ``manifest.json`` last.

    Args:
        store_dir: The store directory.
        num_shards: Shards the store must have.
        meta: What the store holds (teacher, tap, recipe, policy...), copied into the manifest.
    """
    store_dir = Path(store_dir)
    shards = []
    for i in range(num_shards):
        path = store_dir / shard_file(i)
        if not path.exists():
            raise StoreError(f"store shard missing: {path}; rerun the cache step for shard {i}")
        with h5py.File(path, "r") as f:
            fields = sorted(k for k in f.keys() if k not in ("ids", "box", "flip", "partner", "lam"))
            count = int(f["ids"].shape[0])
            first = int(f.attrs["first_position"])
            shapes = {k: list(f[k].shape[2:]) for k in fields}
            dtypes = {k: str(f[k].dtype) for k in fields}
        shards.append(
            {"file": path.name, "count": count, "first_position": first, "bytes": path.stat().st_size,
             "sha256": sha256_file(path)}
        )
    manifest = {
        "format_version": FORMAT_VERSION,
        **meta,
        "fields": fields,
        "field_shapes": shapes,
        "field_dtypes": dtypes,
        "num_samples": sum(s["count"] for s in shards),
        "shards": shards,
    }
    write_json_atomic(store_dir / "manifest.json", manifest)
    return manifest


@dataclass
class TeacherStore:
    """A store loaded into memory, serving ``[n, ...]`` float32 outputs for (view, rows).

    Use :meth:`open`. ``bytes_read`` counts the stored bytes served so far.
    """

    tap: str
    manifest: dict
    fields: dict[str, torch.Tensor]
    num_classes: int | None
    bytes_read: int = 0

    @classmethod
    def open(cls, store_dir: str | Path, expect: Mapping[str, Any], verify: bool = True) -> "TeacherStore":
        """Opens a store, refusing one that was built for something else.

        Args:
            store_dir: The store directory.
            expect: Manifest fields the run requires (e.g. ``teacher_sha256``, ``view_recipe_hash``, ``tap``,
                ``views``, ``policy``); any difference is an error naming the field.
            verify: Re-hash every shard against the manifest first.
        """
        store_dir = Path(store_dir)
        mpath = store_dir / "manifest.json"
        if not mpath.exists():
            raise StoreError(f"store manifest not found: {mpath}; the cache step did not finish — rerun the workflow")
        manifest = read_json(mpath, "store manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{mpath}: format_version {manifest.get('format_version')} != {FORMAT_VERSION}; rebuild the store")
        for key, want in expect.items():
            have = manifest.get(key)
            if have != want:
                raise StoreError(
                    f"{mpath}: field '{key}' is {have!r} but this run expects {want!r}: the store was built for another"
                    f" teacher/view recipe/policy. Fix: delete {store_dir} and rerun the workflow"
                )
        parts: dict[str, list[np.ndarray]] = {k: [] for k in manifest["fields"]}
        expected_first = 0
        for shard in manifest["shards"]:
            path = store_dir / shard["file"]
            if not path.exists():
                raise StoreError(f"store shard missing: {path}; delete {store_dir} and rerun the workflow")
            if verify and sha256_file(path) != shard["sha256"]:
                raise StoreError(
                    f"store shard {path} does not match its sha256 in {mpath}: the file is corrupt. "
                    f"Fix: delete {path} (and the manifest) and rerun the workflow"
                )
            if shard["first_position"] != expected_first:
                raise StoreError(f"{mpath}: shard {shard['file']} starts at row {shard['first_position']}, expected {expected_first}")
            try:
                with h5py.File(path, "r", locking=False) as f:
                    for k in parts:
                        arr = f[k][()]
                        if arr.shape[1] != shard["count"]:
                            raise StoreError(f"{path}: field '{k}' has {arr.shape[1]} rows, manifest says {shard['count']}")
                        parts[k].append(arr)
            except OSError as e:
                raise StoreError(f"store shard {path} cannot be read ({e}); delete it and rerun the workflow") from e
            expected_first += shard["count"]
        fields = {k: torch.from_numpy(np.ascontiguousarray(np.concatenate(v, axis=1))) for k, v in parts.items()}
        return cls(tap=manifest["tap"], manifest=manifest, fields=fields, num_classes=manifest.get("num_classes"))

    @property
    def views(self) -> int:
        return int(self.manifest["views"])

    def __len__(self) -> int:
        return int(self.manifest["num_samples"])

    def fetch(self, view: int, rows: torch.Tensor) -> torch.Tensor:
        """Teacher outputs of view ``view`` for rows ``rows`` (``int64 [n]``), as float32 ``[n, ...]``."""
        if not 0 <= view < self.views:
            raise IndexError(f"view {view} out of range: the store holds {self.views} views")
        got = {k: v[view].index_select(0, rows) for k, v in self.fields.items()}
        self.bytes_read += sum(t.numel() * t.element_size() for t in got.values())
        if "topk_values" in got:
            return reconstruct_topk(got["topk_values"], got["topk_indices"], got["lse"], self.num_classes)
        if "values_bf16" in got:
            return got["values_bf16"].view(torch.bfloat16).float()
        return got["values"].float()

    def bytes_per_record(self) -> int:
        """Stored bytes per (sample, view), payload only."""
        return sum(v[0, 0].numel() * v.element_size() for v in self.fields.values())


def record_bytes(tap_shape: tuple[int, ...], policy: CachePolicy, tap: str) -> int:
    """Payload bytes per (sample, view) a policy stores for a tap of shape ``tap_shape`` (no view params)."""
    if tap == "logits" and policy.topk:
        c = tap_shape[0]
        k = min(policy.topk, c)
        return k * 2 + k * (2 if c <= 32767 else 4) + 4
    if tap.startswith("feature") and policy.feature_pool and len(tap_shape) == 3:
        tap_shape = (tap_shape[0], policy.feature_pool, policy.feature_pool)
    dtype = policy.logits_dtype if tap == "logits" else policy.feature_dtype
    return math.prod(tap_shape) * (4 if dtype == "float32" else 2)
