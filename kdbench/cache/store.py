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
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from kdbench._util import atomic_path, read_json, sha256_file, stable_hash, write_json_atomic
from kdbench.config import CachePolicy, ViewRecipe
from kdbench.data.views import ViewParams
from kdbench.errors import StoreError
from kdbench.plan import shard_file

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": None}
#: Audit copy of the view parameters, stored per (sample, view): field -> (dtype, values per record).
VIEW_PARAM_FIELDS: dict[str, tuple[type, int]] = {
    "box": (np.float32, 4),
    "flip": (np.uint8, 1),
    "partner": (np.int64, 1),
    "lam": (np.float32, 1),
}
_AUDIT_FIELDS = ("ids", *VIEW_PARAM_FIELDS)
POLICY_NOT_STORED = {
    "topk_min_classes": "resolved into topk before any store is built (kdbench.plan.default_topk)",
    "verify": "how a reader checks the shards it opens, not what they hold",
}
"""The cache policy's fields that are not in a store's identity, and why: every other field is (a field added to
:class:`~kdbench.config.CachePolicy` is part of the identity unless it is listed here)."""
#: Manifest fields that identify what a store holds (kept in sync with ``kdbench.cache.build.store_identity``).
#: Identity fields present only while they differ from their default (``teacher_numerics``: the forward numerics
#: of a ``bf16`` or contiguous-format protocol, :meth:`kdbench.numerics.Numerics.delta`), so stores built before
#: they existed keep their identity; every check compares them both ways (absent = the default).
OPTIONAL_IDENTITY_KEYS = ("teacher_numerics",)
IDENTITY_KEYS = ("teacher_sha256", "tap", "view_recipe_hash", "views", "policy", "teacher_image_size",
                 *OPTIONAL_IDENTITY_KEYS)


def _identity_fields(want: Mapping[str, Any], have: Mapping[str, Any]) -> list[str]:
    """The identity fields to compare: every wanted one, and an optional one ``have`` has although unwanted."""
    return [*want, *(k for k in OPTIONAL_IDENTITY_KEYS if k in have and k not in want)]



def _index_dtype(num_classes: int) -> type:
    """Class indices of a top-k record: int16 up to 32767 classes, int32 beyond."""
    return np.int16 if num_classes <= 32767 else np.int32


def pool_tap(tap: str, out: torch.Tensor, policy: CachePolicy) -> torch.Tensor:
    """Applies the policy's feature pooling: ``[n, C, H, W]`` -> ``[n, C, p, p]`` for ``feature[i]`` taps when
    ``policy.feature_pool`` is set; anything else is returned as is (float32)."""
    out = out.detach().float()
    if tap.startswith("feature") and policy.feature_pool and out.ndim == 4:
        out = F.adaptive_avg_pool2d(out, policy.feature_pool)
    return out


def encode_tap(tap: str, out: torch.Tensor, policy: CachePolicy) -> dict[str, np.ndarray]:
    """Turns one batch of a tap's outputs into the arrays stored for it.

    Args:
        tap: Tap name.
        out: ``[n, ...]`` float32 teacher outputs.
        policy: The storage policy.

    Returns:
        Field name -> array ``[n, ...]``.
    """
    out = pool_tap(tap, out, policy)
    if tap == "logits" and policy.topk:
        k = min(policy.topk, out.shape[1])
        values, indices = out.topk(k, dim=1)
        return {
            "topk_values": values.cpu().numpy().astype(np.float16),
            "topk_indices": indices.cpu().numpy().astype(_index_dtype(out.shape[1])),
            "lse": torch.logsumexp(out, dim=1).cpu().numpy().astype(np.float32),
        }
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
    top_mass = torch.exp(values - lse[:, None]).sum(1)  # fp16 rounding may push it just above 1
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
            for name, (dtype, _) in VIEW_PARAM_FIELDS.items():
                f.create_dataset(name, data=np.stack([getattr(p, name) for p in params]).astype(dtype))
            for k, v in attrs.items():
                f.attrs[k] = v


def identity_attrs(identity: Mapping[str, Any]) -> dict[str, Any]:
    """The store identity (see :func:`kdbench.cache.build.store_identity`) as HDF5 attributes of a shard:
    scalars as they are, mappings as their stable hash. Only the keys of :data:`IDENTITY_KEYS` are kept."""
    return {
        k: v if isinstance(v, (str, int, float)) else stable_hash(v) for k, v in identity.items() if k in IDENTITY_KEYS
    }


def _open_shard(path: Path) -> h5py.File:
    """A shard opened for reading without HDF5's file lock: a shard is only read once its writer has renamed it
    into place, and a lock would refuse readers while another process holds the file open (and fails outright
    on file systems without locks)."""
    return h5py.File(path, "r", locking=False)


def _read_shard(path: Path, names: list[str], count: int, view: int | None = None) -> dict[str, np.ndarray]:
    """Datasets ``names`` of a shard listed in its store's manifest, ``[V, n, ...]`` each (or ``[n, ...]`` of one
    ``view``), refused unless each holds the manifest's ``count`` rows."""
    manifest = path.parent / "manifest.json"
    try:
        with _open_shard(path) as f:
            got = {k: f[k][()] if view is None else f[k][view] for k in names}
    except (OSError, KeyError) as e:
        raise StoreError(
            f"store shard {path} cannot be read ({e}): it is truncated or corrupt. "
            f"Fix: delete it and {manifest} and rerun the workflow"
        ) from e
    for k, v in got.items():
        rows = v.shape[1 if view is None else 0]
        if rows != count:
            raise StoreError(f"{path}: field '{k}' has {rows} rows, {manifest} says {count}. Fix: delete {path}"
                             f" and {manifest} and rerun the workflow")
    return got


def _inspect_shard(path: Path, index: int) -> tuple[dict[str, Any], dict[str, tuple], int]:
    """Reads a shard's attributes, field layout (name -> (dtype, row shape)) and row count."""
    try:
        with _open_shard(path) as f:
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
            layout = {k: (str(f[k].dtype), tuple(f[k].shape[2:])) for k in sorted(f.keys()) if k not in _AUDIT_FIELDS}
            count = int(f["ids"].shape[0])
    except (OSError, KeyError) as e:
        raise StoreError(
            f"store shard {path} cannot be read ({e}): it is truncated or corrupt. "
            f"Fix: delete it and rerun the cache step for shard {index}"
        ) from e
    return attrs, layout, count


def write_manifest(store_dir: str | Path, num_shards: int, meta: Mapping[str, Any]) -> dict:
    """Checks that every shard of a store is present, readable and built for this store, then writes
    ``manifest.json`` last.

    Args:
        store_dir: The store directory.
        num_shards: Shards the store must have.
        meta: What the store holds (its identity: teacher, tap, recipe, policy..., and extra facts), copied into
            the manifest. Every shard's identity attributes must match it.

    Raises:
        StoreError: a shard is missing, unreadable, stale (built for another identity) or laid out differently
            from the others; the message names the shard, the field and the fix.
    """
    store_dir = Path(store_dir)
    want = identity_attrs(meta)
    shards, layout = [], None
    for i in range(num_shards):
        path = store_dir / shard_file(i)
        if not path.exists():
            raise StoreError(f"store shard missing: {path}; rerun the cache step for shard {i}")
        attrs, shard_layout, count = _inspect_shard(path, i)
        for key in _identity_fields(want, attrs):
            value = want.get(key)
            if attrs.get(key) != value:
                raise StoreError(
                    f"store shard {path}: attribute '{key}' is {attrs.get(key)!r} but the store is for {value!r}"
                    f" (a stale shard built for another teacher/view recipe/policy). Fix: delete {path} and rerun"
                    f" the cache step for shard {i}"
                )
        if layout is not None and shard_layout != layout:
            raise StoreError(
                f"store shard {path} holds {shard_layout} but {shard_file(0)} holds {layout}. "
                f"Fix: delete {store_dir} and rerun the cache steps"
            )
        layout = shard_layout
        shards.append(
            {"file": path.name, "count": count, "first_position": int(attrs["first_position"]),
             "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        )
    layout = layout or {}
    manifest = {
        "format_version": FORMAT_VERSION,
        **meta,
        "fields": list(layout),
        "field_shapes": {k: list(shape) for k, (_, shape) in layout.items()},
        "field_dtypes": {k: dtype for k, (dtype, _) in layout.items()},
        "num_samples": sum(s["count"] for s in shards),
        "shards": shards,
    }
    write_json_atomic(store_dir / "manifest.json", manifest)
    return manifest


def read_store_manifest(store_dir: str | Path) -> dict:
    """Reads a store's ``manifest.json``, refusing a missing one or another format version."""
    mpath = Path(store_dir) / "manifest.json"
    if not mpath.exists():
        raise StoreError(f"store manifest not found: {mpath}; the cache step did not finish — rerun the workflow")
    try:
        manifest = read_json(mpath, "store manifest")
    except ValueError as e:
        raise StoreError(str(e)) from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{mpath}: format_version {manifest.get('format_version')} != {FORMAT_VERSION}; rebuild the store")
    return manifest


def check_identity(store_dir: str | Path, manifest: Mapping[str, Any], expect: Mapping[str, Any]) -> None:
    """Refuses a store whose manifest differs from ``expect`` in any field (the message names the field)."""
    for key in _identity_fields(expect, manifest):
        have, want = manifest.get(key), expect.get(key)
        if have != want:
            raise StoreError(
                f"{Path(store_dir) / 'manifest.json'}: field '{key}' is {have!r} but this run expects {want!r}: the"
                f" store was built for another teacher/view recipe/policy. Fix: delete {store_dir} and rerun the workflow"
            )


def shard_problems(store_dir: str | Path, manifest: Mapping[str, Any], verify: bool) -> list[str]:
    """Every shard of the manifest that is missing or (``verify``) differs from its sha256; one message each,
    naming the file and the fix. Empty when the store is intact."""
    store_dir = Path(store_dir)
    mpath = store_dir / "manifest.json"
    problems = []
    for i, shard in enumerate(manifest["shards"]):
        path = store_dir / shard["file"]
        if not path.exists():
            problems.append(f"store shard missing: {path}. Fix: rerun the cache step for shard {i}, then the manifest step")
        elif verify and sha256_file(path) != shard["sha256"]:
            problems.append(
                f"store shard {path} does not match its sha256 in {mpath}: the file is corrupt or was changed. "
                f"Fix: delete {path} and {mpath} and rerun the workflow (cache step for shard {i}, then the manifest)"
            )
    return problems


def _check_positions(store_dir: Path, manifest: Mapping[str, Any]) -> None:
    """Refuses a manifest whose shards do not follow one another (each starts at the row the one before ends)."""
    expected = 0
    for shard in manifest["shards"]:
        if shard["first_position"] != expected:
            raise StoreError(
                f"{store_dir / 'manifest.json'}: shard {shard['file']} starts at row {shard['first_position']}, "
                f"expected {expected}; delete {store_dir} and rerun the workflow"
            )
        expected += shard["count"]


def _read_fields(store_dir: Path, manifest: Mapping[str, Any], names: list[str]) -> dict[str, np.ndarray]:
    """Reads datasets ``names`` (``[V, n, ...]``) of every shard and concatenates them along the rows."""
    _check_positions(store_dir, manifest)
    parts = [_read_shard(store_dir / shard["file"], names, shard["count"]) for shard in manifest["shards"]]
    return {k: np.ascontiguousarray(np.concatenate([part[k] for part in parts], axis=1)) for k in names}


def read_view_params(store_dir: str | Path, manifest: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The audit copy of the view parameters the teacher saw: ``box [V, N, 4]``, ``flip [V, N]`` (uint8),
    ``partner [V, N]`` (rows of the whole split) and ``lam [V, N]``."""
    return _read_fields(Path(store_dir), manifest, list(VIEW_PARAM_FIELDS))


def _open_checked(store_dir: Path, expect: Mapping[str, Any], verify: bool) -> dict:
    """A store's manifest, once the store is known to be built for ``expect`` and (``verify``) intact."""
    manifest = read_store_manifest(store_dir)
    check_identity(store_dir, manifest, expect)
    problems = shard_problems(store_dir, manifest, verify)
    if problems:
        raise StoreError(problems[0] + (f" (and {len(problems) - 1} more shards)" if len(problems) > 1 else ""))
    return manifest


class _Served:
    """What both store readers serve, from their ``fetch_raw``: decoded outputs, the view count, the size."""

    manifest: dict
    num_classes: int | None

    @property
    def views(self) -> int:
        return int(self.manifest["views"])

    def __len__(self) -> int:
        return int(self.manifest["num_samples"])

    def fetch_raw(self, view: int, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def fetch(self, view: int, rows: torch.Tensor) -> torch.Tensor:
        """Teacher outputs of view ``view`` for rows ``rows`` (``int64 [n]``), as float32 ``[n, ...]`` (full
        logits rebuilt by :func:`reconstruct_topk` for a top-k store)."""
        got = self.fetch_raw(view, rows)
        if "topk_values" in got:
            return reconstruct_topk(got["topk_values"], got["topk_indices"], got["lse"], self.num_classes)
        if "values_bf16" in got:
            return got["values_bf16"].view(torch.bfloat16).float()
        return got["values"].float()

    def _check_view(self, view: int) -> None:
        if not 0 <= view < self.views:
            raise IndexError(f"view {view} out of range: the store holds {self.views} views")


@dataclass
class TeacherStore(_Served):
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
        """Opens a store, refusing one that was built for something else or is damaged.

        Args:
            store_dir: The store directory.
            expect: Manifest fields the run requires (e.g. ``teacher_sha256``, ``view_recipe_hash``, ``tap``,
                ``views``, ``policy``); any difference is an error naming the field.
            verify: Re-hash every shard against the manifest first.

        Raises:
            StoreError: naming the file, the field and the fix.
        """
        store_dir = Path(store_dir)
        manifest = _open_checked(store_dir, expect, verify)
        arrays = _read_fields(store_dir, manifest, list(manifest["fields"]))
        fields = {k: torch.from_numpy(v) for k, v in arrays.items()}
        return cls(tap=manifest["tap"], manifest=manifest, fields=fields, num_classes=manifest.get("num_classes"))

    def fetch_raw(self, view: int, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored fields of view ``view`` for rows ``rows`` (``int64 [n]``), as stored (field -> ``[n, ...]``)."""
        self._check_view(view)
        got = {k: v[view].index_select(0, rows) for k, v in self.fields.items()}
        self.bytes_read += sum(t.numel() * t.element_size() for t in got.values())
        return got

    def bytes_per_record(self) -> int:
        """Stored bytes per (sample, view), payload only."""
        return sum(math.prod(v.shape[2:]) * v.element_size() for v in self.fields.values())


class ShardedTeacherStore(_Served):
    """A store read one (shard, view) at a time, for the streaming path: it keeps the fields of the last
    ``cache_shards`` (data shard, view) pairs in memory, never the whole store. A streamed batch's rows come
    from one or two data shards (the ones the loader's workers are reading), so each (shard, view) is read
    from disk about once per epoch: one contiguous slice per field (the layout is ``[V, n, ...]``).

    Use :meth:`open`. Files are opened only while a slice is read, in the process that reads (never in a
    ``DataLoader`` worker). ``bytes_read`` counts the stored bytes served so far.
    """

    def __init__(self, store_dir: Path, manifest: dict, cache_shards: int) -> None:
        self.store_dir, self.manifest, self.tap = store_dir, manifest, manifest["tap"]
        self.num_classes = manifest.get("num_classes")
        self.cache_shards = max(1, cache_shards)
        self.bytes_read = 0
        self.shard_reads = 0
        self._fields = list(manifest["fields"])
        _check_positions(store_dir, manifest)
        self._starts = np.array([s["first_position"] for s in manifest["shards"]], dtype=np.int64)
        self._cache: OrderedDict[tuple[int, int], dict[str, torch.Tensor]] = OrderedDict()

    @classmethod
    def open(cls, store_dir: str | Path, expect: Mapping[str, Any], verify: bool = True,
             cache_shards: int = 4) -> "ShardedTeacherStore":
        """Opens a store like :meth:`TeacherStore.open` (same checks, same errors) without reading its fields.

        Args:
            store_dir: The store directory.
            expect: Manifest fields the run requires.
            verify: Re-hash every shard against the manifest first (reads each file once, keeps nothing).
            cache_shards: (data shard, view) pairs kept in memory.
        """
        store_dir = Path(store_dir)
        return cls(store_dir, _open_checked(store_dir, expect, verify), cache_shards)

    def _slice(self, shard: int, view: int) -> dict[str, torch.Tensor]:
        """The fields of view ``view`` of shard ``shard`` (``[n, ...]`` each), from the cache or the file."""
        key = (shard, view)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        entry = self.manifest["shards"][shard]
        path = self.store_dir / entry["file"]
        got = {k: torch.from_numpy(v) for k, v in _read_shard(path, self._fields, entry["count"], view).items()}
        self.shard_reads += 1
        self._cache[key] = got
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return got

    def fetch_raw(self, view: int, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored fields of view ``view`` for rows ``rows`` (``int64 [n]``, rows of the whole split), as
        stored (field -> ``[n, ...]``)."""
        self._check_view(view)
        r = rows.numpy()
        if len(r) and (r.min() < 0 or r.max() >= len(self)):
            raise IndexError(f"rows out of range: the store holds {len(self)} samples")
        owner = np.searchsorted(self._starts, r, side="right") - 1
        shards = np.unique(owner)
        if len(shards) == 1:  # the common case: the batch comes from one data shard
            s = int(shards[0])
            local = rows - int(self._starts[s])
            got = {k: v.index_select(0, local) for k, v in self._slice(s, view).items()}
        else:
            got = {}
            for s in shards:
                mask = torch.from_numpy(owner == s)
                part = self._slice(int(s), view)
                local = rows[mask] - int(self._starts[s])
                for k, v in part.items():
                    if k not in got:
                        got[k] = v.new_empty((len(r), *v.shape[1:]))
                    got[k][mask] = v.index_select(0, local)
        self.bytes_read += sum(t.numel() * t.element_size() for t in got.values())
        return got


def record_bytes(tap_shape: tuple[int, ...], policy: CachePolicy, tap: str) -> int:
    """Payload bytes per (sample, view) a policy stores for a tap of shape ``tap_shape`` (no view params)."""
    if tap == "logits" and policy.topk:
        c = tap_shape[0]
        k = min(policy.topk, c)
        return k * 2 + k * np.dtype(_index_dtype(c)).itemsize + 4
    if tap.startswith("feature") and policy.feature_pool and len(tap_shape) == 3:
        tap_shape = (tap_shape[0], policy.feature_pool, policy.feature_pool)
    dtype = policy.logits_dtype if tap == "logits" else policy.feature_dtype
    return math.prod(tap_shape) * (4 if dtype == "float32" else 2)


def view_param_bytes() -> int:
    """Bytes of the audit copy of one view's parameters (box, flip, partner, lam) per (sample, view)."""
    return sum(np.dtype(dtype).itemsize * n for dtype, n in VIEW_PARAM_FIELDS.values())


def bytes_per_view(tap_shape: tuple[int, ...], policy: CachePolicy, tap: str, views: int) -> float:
    """Stored bytes per (sample, view): the payload, the view parameters and the sample key (8 B per sample,
    shared by its ``views`` views). HDF5's own overhead (a few KB per shard file) is not counted."""
    return record_bytes(tap_shape, policy, tap) + view_param_bytes() + np.dtype(np.int64).itemsize / views


def store_identity(teacher_sha256: str, tap: str, recipe: ViewRecipe, policy: CachePolicy, image_size: int,
                   numerics: Mapping[str, Any] | None = None) -> dict:
    """The manifest fields a reader checks: a store built for anything else is refused. ``numerics``: how the
    teacher's forward differs from the default numerics (:meth:`kdbench.numerics.Numerics.delta`), a field only
    when not empty."""
    return {
        "teacher_sha256": teacher_sha256,
        "tap": tap,
        "view_recipe_hash": stable_hash(recipe),
        "views": recipe.count,
        "policy": {f.name: getattr(policy, f.name) for f in fields(policy) if f.name not in POLICY_NOT_STORED},
        "teacher_image_size": image_size,
        **({"teacher_numerics": dict(numerics)} if numerics else {}),
    }
