"""Seeded, counter-based augmented views: the same function serves the cache builder and the student.

A view ``v`` of the sample with stable key ``id`` at row ``position`` is fully determined by
``(recipe.seed, id, v)``: no state is carried between calls, so any view can be recomputed anywhere (a cache
job, a student's training step, an audit) and is bit-identical. Parameters:

* a random-resized-crop box in normalised coordinates ``(top, left, height, width)`` (so a teacher can see
  the same box at another resolution), area fraction in ``recipe.scale``, aspect ratio (log-uniform) in
  ``recipe.ratio``, clipped to the image;
* a horizontal flip with probability 1/2 if ``recipe.flip``;
* with probability ``recipe.mixup``, a mixup partner drawn uniformly from the *same data shard* (another
  row) and ``lam = max(a, 1 - a)``, ``a ~ U(0, 1)`` (FunMatch's rule); the partner contributes its own view
  ``v``. Unmixed views have ``partner = -1`` and ``lam = 1``.

The uniforms come from a splitmix64 hash of ``(seed, id, view, stream)``, vectorised in numpy.

The view index :data:`CLEAN_VIEW` is the un-augmented image (whole image, no flip, no mixup, rendered as for
evaluation): what a "fixed teacher" sees (``teacher_view: clean`` in :mod:`kdbench.methods.base`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kdbench.config import ViewRecipe

CLEAN_VIEW = -1
"""The view index of the un-augmented training image: whole image, no flip, no mixup."""

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_STREAMS = {"scale": 1, "ratio": 2, "top": 3, "left": 4, "flip": 5, "mix": 6, "partner": 7, "lam": 8}


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def counter_uniform(seed: int, ids: np.ndarray, view: int, stream: int) -> np.ndarray:
    """Uniforms in [0, 1) keyed by ``(seed, id, view, stream)``; float64 ``[len(ids)]``."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + np.uint64(stream) * np.uint64(0xD1B54A32D192ED03))
        key = _splitmix64(key ^ np.uint64(view & 0xFFFFFFFF) * np.uint64(0x8CB92BA72F3D8DD7))
        h = _splitmix64(key ^ _splitmix64(np.asarray(ids, dtype=np.uint64)))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class ViewParams:
    """Parameters of one view for a set of samples.

    Attributes:
        box: ``float32 [n, 4]``: top, left, height, width, in [0, 1] of the image.
        flip: ``bool [n]``.
        partner: ``int64 [n]``: the partner's row (position) in the split, ``-1`` if not mixed.
        lam: ``float32 [n]``: weight of the sample itself (1 if not mixed).
    """

    box: np.ndarray
    flip: np.ndarray
    partner: np.ndarray
    lam: np.ndarray


def crop_params(
    recipe: ViewRecipe, ids: np.ndarray, view: int, aspect: float = 1.0, image_hw: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Crop boxes and flips only (what a mixup partner contributes).

    With ``recipe.pad`` the box is the whole image shifted by a whole number of pixels in
    ``[-pad, pad]`` (``image_hw`` is then required); otherwise a random-resized crop.
    """
    u = lambda s: counter_uniform(recipe.seed, ids, view, _STREAMS[s])  # noqa: E731
    flip = (u("flip") < 0.5) if recipe.flip else np.zeros(len(ids), dtype=bool)
    if recipe.pad:
        if image_hw is None:
            raise ValueError("views.pad needs the image size")
        shift = lambda s: np.floor(u(s) * (2 * recipe.pad + 1)) - recipe.pad  # noqa: E731
        top, left = shift("top") / image_hw[0], shift("left") / image_hw[1]
        ones = np.ones(len(ids))
        return np.stack([top, left, ones, ones], axis=1).astype(np.float32), flip
    area = recipe.scale[0] + (recipe.scale[1] - recipe.scale[0]) * u("scale")
    lo, hi = np.log(recipe.ratio[0]), np.log(recipe.ratio[1])
    ratio = np.exp(lo + (hi - lo) * u("ratio"))
    # Normalised width/height of a box with that pixel area fraction and pixel aspect ratio (w/h).
    w = np.minimum(np.sqrt(area * ratio / aspect), 1.0)
    h = np.minimum(np.sqrt(area / ratio * aspect), 1.0)
    top = (1.0 - h) * u("top")
    left = (1.0 - w) * u("left")
    box = np.stack([top, left, h, w], axis=1).astype(np.float32)
    return box, flip


def view_params(
    recipe: ViewRecipe,
    ids: np.ndarray,
    positions: np.ndarray,
    view: int,
    shard_size: int,
    num_samples: int,
    image_hw: tuple[int, int] | None = None,
) -> ViewParams:
    """Parameters of view ``view`` for the samples with keys ``ids`` at rows ``positions`` of a split.

    Args:
        recipe: The view recipe.
        ids: ``int64 [n]`` stable sample keys.
        positions: ``int64 [n]`` rows in the split (partners are drawn within ``position``'s shard).
        view: View index (``epoch mod V`` for a student).
        shard_size: Samples per data shard.
        num_samples: Rows in the split (the last shard may be short).
        image_hw: Source image size (needed by ``recipe.pad``).
    """
    ids = np.asarray(ids, dtype=np.int64)
    positions = np.asarray(positions, dtype=np.int64)
    box, flip = crop_params(recipe, ids, view, image_hw=image_hw)
    n = len(ids)
    partner = np.full(n, -1, dtype=np.int64)
    lam = np.ones(n, dtype=np.float32)
    if recipe.mixup > 0:
        start = positions // shard_size * shard_size
        length = np.minimum(shard_size, num_samples - start)
        draw = counter_uniform(recipe.seed, ids, view, _STREAMS["partner"])
        other = start + np.floor(draw * np.maximum(length - 1, 1)).astype(np.int64)
        other = np.where(other >= positions, other + 1, other)  # never the sample itself
        mixed = (counter_uniform(recipe.seed, ids, view, _STREAMS["mix"]) < recipe.mixup) & (length > 1)
        a = counter_uniform(recipe.seed, ids, view, _STREAMS["lam"])
        partner = np.where(mixed, other, -1)
        lam = np.where(mixed, np.maximum(a, 1.0 - a), 1.0).astype(np.float32)
    return ViewParams(box=box, flip=flip, partner=partner, lam=lam)


def render(
    images: torch.Tensor,
    box: torch.Tensor | None,
    flip: torch.Tensor | None,
    out_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    padding: str = "border",
) -> torch.Tensor:
    """Crops, resizes (bilinear), flips and normalises a batch in one ``grid_sample``.

    Every output pixel depends only on its own sample, so the result for a sample does not depend on the
    batch it is rendered in (the cache builder and the student batch differently and get the same bits).

    Args:
        images: ``uint8 [n, C, H, W]`` on the target device.
        box: ``float32 [n, 4]`` (top, left, h, w); ``None`` = the whole image.
        flip: ``bool [n]``; ``None`` = no flip.
        out_size: Output resolution.
        mean, std: Per-channel normalisation.
        padding: ``grid_sample`` padding outside the image: ``border`` (crops), ``zeros`` (shifted views).

    Returns:
        ``float32 [n, C, out_size, out_size]``.
    """
    n, c, h, w = images.shape
    x = images.float().div_(255.0)
    if box is not None or flip is not None or out_size != h or out_size != w:
        theta = torch.zeros(n, 2, 3, device=images.device)
        if box is None:
            box = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=images.device).expand(n, 4)
        top, left, bh, bw = box.to(images.device, torch.float32).unbind(1)
        sign = 1.0 - 2.0 * flip.to(images.device, torch.float32) if flip is not None else 1.0
        theta[:, 0, 0] = bw * sign
        theta[:, 0, 2] = 2 * left + bw - 1
        theta[:, 1, 1] = bh
        theta[:, 1, 2] = 2 * top + bh - 1
        grid = F.affine_grid(theta, [n, c, out_size, out_size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


class ViewRenderer:
    """Renders training views of one split for any (view, rows): the one place that turns view parameters
    into input tensors, shared by the cache builder, the student's loop and the audit tools.

    Args:
        recipe: The view recipe.
        images: ``uint8 [N, C, H, W]`` of the split (CPU).
        ids: ``int64 [N]`` stable keys.
        shard_size: Samples per data shard.
        mean, std: Normalisation.
    """

    def __init__(self, recipe: ViewRecipe, images: torch.Tensor, ids: torch.Tensor, shard_size: int, mean, std):
        self.recipe, self.images, self.ids = recipe, images, ids.numpy()
        self.shard_size, self.mean, self.std = shard_size, tuple(mean), tuple(std)
        self.image_hw = tuple(images.shape[-2:])
        self.padding = "zeros" if recipe.pad else "border"

    @classmethod
    def for_split(cls, recipe: ViewRecipe, split, data) -> "ViewRenderer":
        """The renderer of a loaded split (``images``, ``ids``, ``shard_size``) with the data's normalisation."""
        return cls(recipe, split.images, split.ids, split.shard_size, data.mean, data.std)

    def params(self, view: int, positions: np.ndarray) -> ViewParams:
        """Parameters of view ``view`` (or :data:`CLEAN_VIEW`) of rows ``positions``."""
        if view == CLEAN_VIEW:
            n = len(positions)
            box = np.tile(np.array([0.0, 0.0, 1.0, 1.0], dtype=np.float32), (n, 1))
            no_partner = np.full(n, -1, dtype=np.int64)
            return ViewParams(box, np.zeros(n, dtype=bool), no_partner, np.ones(n, dtype=np.float32))
        return view_params(
            self.recipe, self.ids[positions], positions, view, self.shard_size, len(self.ids), self.image_hw
        )

    def render(
        self, view: int, positions: np.ndarray, out_size: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, ViewParams]:
        """Returns ``(inputs [n, C, S, S], params)`` of view ``view`` for rows ``positions``.

        ``view = CLEAN_VIEW`` renders the whole images unflipped and unmixed, exactly as evaluation does.
        """
        positions = np.asarray(positions, dtype=np.int64)
        p = self.params(view, positions)
        if view == CLEAN_VIEW:
            return render(self.images[positions].to(device), None, None, out_size, self.mean, self.std), p
        x = render(
            self.images[positions].to(device),
            torch.from_numpy(p.box),
            torch.from_numpy(p.flip),
            out_size,
            self.mean,
            self.std,
            self.padding,
        )
        mixed = np.flatnonzero(p.partner >= 0)
        if len(mixed):
            partners = p.partner[mixed]
            pbox, pflip = crop_params(self.recipe, self.ids[partners], view, image_hw=self.image_hw)
            xp = render(
                self.images[partners].to(device), torch.from_numpy(pbox), torch.from_numpy(pflip), out_size,
                self.mean, self.std, self.padding,
            )
            lam = torch.from_numpy(p.lam[mixed]).to(x.device).view(-1, 1, 1, 1)
            idx = torch.from_numpy(mixed).to(x.device)
            x[idx] = lam * x[idx] + (1.0 - lam) * xp
        return x, p
