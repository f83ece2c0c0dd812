"""Integrity and fidelity check of a teacher-output store (``kdbench check-cache``).

1. Every shard's sha256 against the store manifest (all shards are hashed; every bad one is reported).
2. The store's identity against the config, the teacher and the data (teacher digest, view recipe, tap,
   policy, data manifest): a store built for anything else is refused, naming the field.
3. The live teacher re-run on a random sample of stored (view, row) pairs, re-rendered by
   :class:`~kdbench.data.views.ViewRenderer` on rows of the *whole* training split (the student's path, while
   the builder rendered each shard on its own), compared with what the store serves; the stored view
   parameters are compared with :meth:`ViewRenderer.params` exactly. On streamed data (variable-size images)
   each sampled row's data shard is read alone and rendered by the student's
   :class:`~kdbench.data.views.ShardRenderer`, and the store is read shard by shard.

Tolerance: a stored value ``s`` of a live value ``x`` passes when

    |s - x| <= (u + COMPUTE_RTOL) * max(1, |x|)

where ``u`` is the unit roundoff of the stored dtype (the largest relative rounding error: ``2**-11`` for
float16, ``2**-8`` for bfloat16, ``2**-24`` for float32) and ``COMPUTE_RTOL = 1e-3`` allows for the teacher's
own float32 non-determinism between the build and the check (another batch composition or convolution
algorithm, TF32 on a GPU). For fp16 logits that is ``|Δ| <= 1.49e-3 * max(1, |logit|)``. The ``max(1, .)``
makes it absolute for values below 1 (fp16 subnormals, small features). A top-k store is checked on what it
holds: the k fp16 values at the stored classes, the float32 logsumexp, and that the stored classes are a
top-k of the live logits (within the same tolerance, so near-ties may swap). KL(live || served) and top-1
agreement are reported for logits; for a top-k store they measure the truncation (what
:func:`~kdbench.cache.store.reconstruct_topk` rebuilds), which is a property of the policy, not a failure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdbench.cache.inputs import open_inputs
from kdbench.cache.store import (
    ShardedTeacherStore,
    TeacherStore,
    pool_tap,
    read_store_manifest,
    read_view_params,
    shard_problems,
)
from kdbench.config import CachePolicy, Config
from kdbench.data.views import ViewParams

_logger = logging.getLogger(__name__)

#: Unit roundoff (largest relative rounding error) of each stored dtype.
ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
#: Relative allowance for the teacher's own float32 non-determinism between build and check.
COMPUTE_RTOL = 1e-3


def stored_dtype(tap: str, policy: CachePolicy) -> str:
    """The dtype a policy stores ``tap``'s values in (top-k values are float16)."""
    if tap == "logits":
        return "float16" if policy.topk else policy.logits_dtype
    return policy.feature_dtype


def tolerance(dtype: str) -> float:
    """Relative tolerance of a stored value of ``dtype`` (see the module docstring)."""
    return ROUNDOFF[dtype] + COMPUTE_RTOL


@dataclass
class CheckReport:
    """What :func:`check_store` found.

    Attributes:
        store: The store directory.
        tap: The stored tap.
        dtype: The stored dtype of its values.
        shards: Number of shards checked.
        checksum_problems: One message per missing or corrupt shard (the live check is skipped if any).
        samples: (view, row) pairs re-run through the live teacher.
        max_abs_diff: Largest ``|stored - live|`` over the compared values.
        worst_ratio: Largest ``|stored - live| / allowed``; at most 1 passes.
        tolerance: The relative tolerance of ``dtype``.
        mean_kl: Mean KL(live || served) over the samples (logits only).
        top1_agreement: Fraction of samples whose served top-1 class is the live one (logits only).
        param_mismatches: Sampled views whose stored view parameters differ from the renderer's.
    """

    store: str
    tap: str
    dtype: str
    shards: int
    checksum_problems: list[str] = field(default_factory=list)
    samples: int = 0
    max_abs_diff: float = 0.0
    worst_ratio: float = 0.0
    tolerance: float = 0.0
    mean_kl: float | None = None
    top1_agreement: float | None = None
    param_mismatches: int = 0

    @property
    def ok(self) -> bool:
        return not self.checksum_problems and self.param_mismatches == 0 and self.worst_ratio <= 1.0

    def render(self) -> str:
        """A short human-readable report."""
        lines = [f"store   {self.store} (tap {self.tap}, {self.dtype})"]
        bad = len(self.checksum_problems)
        lines.append(f"sha256  {self.shards - bad}/{self.shards} shards match the manifest")
        lines += [f"        BAD: {p}" for p in self.checksum_problems]
        if self.samples:
            what = "logit" if self.tap == "logits" else "value"
            live = (
                f"live    {self.samples} stored views re-run: max |Δ{what}| {self.max_abs_diff:.3g}"
                f" ({self.worst_ratio:.3g} x the tolerance {self.tolerance:.3g}*max(1,|x|))"
            )
            if self.mean_kl is not None:
                live += f", mean KL {self.mean_kl:.3g}, top-1 agreement {100 * self.top1_agreement:.2f}%"
            lines.append(live)
            lines.append(f"params  {self.samples - self.param_mismatches}/{self.samples} view parameters match")
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)

    def failure(self) -> str | None:
        """The error message of a failed check (file and fix), ``None`` if it passed."""
        if self.checksum_problems:
            return "; ".join(self.checksum_problems)
        fix = f"Fix: delete {self.store} and rerun the workflow (its cache steps)"
        if self.param_mismatches:
            return (
                f"store {self.store}: the stored view parameters differ from the view renderer's for"
                f" {self.param_mismatches} of {self.samples} sampled views (other data or view code). {fix}"
            )
        if self.worst_ratio > 1.0:
            return (
                f"store {self.store}: stored outputs differ from the live teacher by up to {self.max_abs_diff:.3g}"
                f" ({self.worst_ratio:.3g} x what {self.dtype} storage explains, {self.tolerance:.3g}*max(1,|x|))."
                f" {fix}"
            )
        return None


def _ratio(stored: torch.Tensor, live: torch.Tensor, rtol: float) -> tuple[float, float]:
    """``(max |stored - live|, max |stored - live| / (rtol * max(1, |live|)))``."""
    diff = (stored.float() - live.float()).abs()
    allowed = rtol * live.float().abs().clamp(min=1.0)
    return float(diff.max()), float((diff / allowed).max())


def _compare(live: torch.Tensor, store: TeacherStore | ShardedTeacherStore, view: int, rows: torch.Tensor,
             rtol: float) -> tuple[float, float]:
    """Compares what the store holds for (view, rows) with the live outputs ``[n, ...]`` (already pooled)."""
    if "topk_values" not in store.manifest["fields"]:
        return _ratio(store.fetch(view, rows), live, rtol)
    raw = store.fetch_raw(view, rows)
    at = live.gather(1, raw["topk_indices"].long())
    checks = [
        _ratio(raw["topk_values"], at, rtol),
        _ratio(raw["lse"], torch.logsumexp(live, dim=1), tolerance("float32")),
        # The stored classes are a top-k of the live logits (ties within the tolerance may swap).
        _ratio(at.sort(dim=1, descending=True).values, live.topk(at.shape[1], dim=1).values, rtol),
    ]
    return max(c[0] for c in checks), max(c[1] for c in checks)


def _param_mismatches(params: ViewParams, stored: dict[str, np.ndarray], view: int, rows: np.ndarray) -> int:
    """Rows whose stored view parameters differ (bitwise) from the renderer's."""
    bad = ~np.all(stored["box"][view, rows] == params.box, axis=1)
    bad |= stored["flip"][view, rows].astype(bool) != params.flip
    bad |= stored["partner"][view, rows] != params.partner
    bad |= stored["lam"][view, rows] != params.lam
    return int(bad.sum())


def _streamed_renderer(job, manifest: dict):
    """``render(view, rows, out_size, device) -> (x, params)`` over rows of the whole training split of streamed
    data: each data shard the rows fall in is read alone and rendered by its bound
    :class:`~kdbench.data.views.ShardRenderer` (partners shifted to rows of the split, as the builder stores them)."""
    firsts = np.array([s["first_position"] for s in manifest["shards"]], dtype=np.int64)

    def render(view: int, rows: np.ndarray, out_size: int, device) -> tuple[torch.Tensor, ViewParams]:
        owner = np.searchsorted(firsts, rows, side="right") - 1
        xs, parts = [], []
        for s in np.unique(owner):  # rows are sorted, so the shards' parts come in row order
            renderer = job.renderer(job.split("train", shards=[int(s)]))
            x, p = renderer.render(view, rows[owner == s] - firsts[s], out_size, device)
            xs.append(x)
            parts.append(ViewParams(p.box, p.flip, np.where(p.partner >= 0, p.partner + firsts[s], -1), p.lam))
        fields = ("box", "flip", "partner", "lam")
        params = ViewParams(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))
        return torch.cat(xs), params

    return render


def check_store(
    cfg: Config, store_dir: Path, teacher_dir: Path, data_dir: Path, samples: int = 256, seed: int = 0
) -> CheckReport:
    """Checks a store's checksums, identity and fidelity (see the module docstring).

    Args:
        cfg: The config the store was built with (view recipe, cache policy, runtime).
        store_dir: The store directory.
        teacher_dir: The teacher directory it must have been built from.
        data_dir: The data directory.
        samples: (view, row) pairs to re-run through the live teacher (capped at rows x views).
        seed: Seed of the sample.

    Returns:
        The report; ``report.ok`` is the verdict.

    Raises:
        StoreError: the store is unreadable or was built for another teacher, view recipe, policy or data
            (naming the field and the fix).
    """
    store_dir = Path(store_dir)
    manifest = read_store_manifest(store_dir)
    tap = manifest["tap"]
    dtype = stored_dtype(tap, cfg.cache)
    report = CheckReport(str(store_dir), tap, dtype, len(manifest["shards"]), tolerance=tolerance(dtype))
    report.checksum_problems = shard_problems(store_dir, manifest, verify=True)
    if report.checksum_problems:
        return report
    job = open_inputs(cfg, data_dir, teacher_dir)
    model, tmeta, device = job.teacher, job.tmeta, job.device
    expect = {**job.store_identity(tap), "data_manifest_sha256": job.data_manifest_sha256()}
    if job.streaming:  # rendered shard by shard, as the builder and the student's stream do
        store = ShardedTeacherStore.open(store_dir, expect, verify=False)
        render_rows = _streamed_renderer(job, manifest)
    else:
        store = TeacherStore.open(store_dir, expect, verify=False)
        renderer = job.renderer(job.split("train"))
        render_rows = renderer.render
    stored_params = read_view_params(store_dir, manifest)

    rng = np.random.default_rng(seed)
    n = len(store)
    picks = rng.choice(n * store.views, size=min(samples, n * store.views), replace=False)
    views, rows = np.divmod(picks, n)
    kl_sum, agree = 0.0, 0
    for v in np.unique(views):
        r = np.sort(rows[views == v])
        x, params = render_rows(int(v), r, tmeta["image_size"], device)
        report.param_mismatches += _param_mismatches(params, stored_params, int(v), r)
        with torch.inference_mode():
            live = job.numerics.taps(model, x, {tap})[tap]
        live = pool_tap(tap, live, cfg.cache).cpu()
        idx = torch.from_numpy(r)
        diff, ratio = _compare(live, store, int(v), idx, report.tolerance)
        report.max_abs_diff = max(report.max_abs_diff, diff)
        report.worst_ratio = max(report.worst_ratio, ratio)
        if tap == "logits":
            served = store.fetch(int(v), idx)
            p, q = F.log_softmax(live, dim=1), F.log_softmax(served, dim=1)
            kl_sum += float((p.exp() * (p - q)).sum())
            agree += int((live.argmax(1) == served.argmax(1)).sum())
    report.samples = len(picks)
    if tap == "logits":
        report.mean_kl, report.top1_agreement = kl_sum / len(picks), agree / len(picks)
    _logger.info("checked %s: %s", store_dir, "ok" if report.ok else report.failure())
    return report

