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

Two renderers turn parameters into input tensors, with the same parameters and the same bilinear resampling
(:func:`render`; :func:`render_each` for images of different sizes): :class:`ViewRenderer` over a split held
in memory (``uint8 [N, C, H, W]``, fixed-size images), and :class:`ShardRenderer` over the samples of one data
shard read image by image (the streaming path, :mod:`kdbench.data.stream`, and the cache builder on streamed
data; fixed- or variable-size images). The crop box keeps the recipe's *pixel* aspect ratio on any image
(``aspect`` = the image's width / height). A variable-size image is evaluated (and seen as :data:`CLEAN_VIEW`)
as torchvision's ``Resize(round(S / 0.875))`` + ``CenterCrop(S)`` evaluation sees it: the centre box
:func:`eval_box`, resampled to ``S x S`` bilinearly like the training views (unlike torchvision: without
antialiasing, and with a sub-pixel centre instead of torchvision's whole-pixel sizes). Fixed-size images are
evaluated whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kdbench.config import ViewRecipe

CLEAN_VIEW = -1
"""The view index of the un-augmented training image: whole image, no flip, no mixup."""

EVAL_CROP = 0.875
"""Evaluation of variable-size images: the centre crop is this fraction of the resized shorter side."""

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
    recipe: ViewRecipe,
    ids: np.ndarray,
    view: int,
    aspect: float | np.ndarray = 1.0,
    image_hw: tuple[int, int] | tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop boxes and flips only (what a mixup partner contributes).

    With ``recipe.pad`` the box is the whole image shifted by a whole number of pixels in
    ``[-pad, pad]`` (``image_hw`` is then required); otherwise a random-resized crop whose pixel aspect ratio
    (width / height) follows the recipe on an image of pixel aspect ``aspect`` (width / height).

    Args:
        recipe: The view recipe.
        ids: ``int64 [n]`` stable sample keys.
        view: View index.
        aspect: Width / height of the images: one number, or ``float64 [n]`` (one per image).
        image_hw: Image height and width: two numbers, or two ``int64 [n]`` (one per image).
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
    image_hw: tuple[int, int] | tuple[np.ndarray, np.ndarray] | None = None,
    aspect: float | np.ndarray = 1.0,
) -> ViewParams:
    """Parameters of view ``view`` for the samples with keys ``ids`` at rows ``positions`` of a split.

    Args:
        recipe: The view recipe.
        ids: ``int64 [n]`` stable sample keys.
        positions: ``int64 [n]`` rows in the split (partners are drawn within ``position``'s shard).
        view: View index (``epoch mod V`` for a student).
        shard_size: Samples per data shard.
        num_samples: Rows in the split (the last shard may be short).
        image_hw: Source image size (needed by ``recipe.pad``): two numbers, or two ``int64 [n]``.
        aspect: Width / height of the source images (see :func:`crop_params`).
    """
    ids = np.asarray(ids, dtype=np.int64)
    positions = np.asarray(positions, dtype=np.int64)
    box, flip = crop_params(recipe, ids, view, aspect=aspect, image_hw=image_hw)
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


def eval_box(hw: np.ndarray, out_size: int) -> np.ndarray:
    """The evaluation crop of variable-size images as normalised boxes: the shorter side resized to
    ``round(out_size / EVAL_CROP)`` (256 for 224), then the centre ``out_size x out_size`` square.

    Args:
        hw: ``int [n, 2]`` image heights and widths.
        out_size: S, the model's input size.

    Returns:
        ``float32 [n, 4]`` (top, left, height, width) in [0, 1].
    """
    hw = np.asarray(hw, dtype=np.float64).reshape(-1, 2)
    short = hw.min(axis=1)
    resized = round(out_size / EVAL_CROP)
    bh = np.minimum(out_size * short / (resized * hw[:, 0]), 1.0)
    bw = np.minimum(out_size * short / (resized * hw[:, 1]), 1.0)
    return np.stack([(1.0 - bh) / 2, (1.0 - bw) / 2, bh, bw], axis=1).astype(np.float32)


def _mix(x: torch.Tensor, p: ViewParams, mixed: np.ndarray, xp: torch.Tensor) -> None:
    """Blends the partners' views ``xp`` into rows ``mixed`` of ``x`` in place, with weights ``p.lam``."""
    lam = torch.from_numpy(p.lam[mixed]).to(x.device).view(-1, 1, 1, 1)
    idx = torch.from_numpy(mixed).to(x.device)
    x[idx] = lam * x[idx] + (1.0 - lam) * xp


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
        grid = _sampling_grid(n, c, box, flip, out_size, images.device)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    return _normalise(x, mean, std)


def _sampling_grid(
    n: int, c: int, box: torch.Tensor | None, flip: torch.Tensor | None, out_size: int, device: torch.device
) -> torch.Tensor:
    """``grid_sample``'s grid ``[n, S, S, 2]`` of boxes and flips (it depends on the output size only, not on
    the images' sizes)."""
    theta = torch.zeros(n, 2, 3, device=device)
    if box is None:
        box = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=device).expand(n, 4)
    top, left, bh, bw = box.to(device, torch.float32).unbind(1)
    sign = 1.0 - 2.0 * flip.to(device, torch.float32) if flip is not None else 1.0
    theta[:, 0, 0] = bw * sign
    theta[:, 0, 2] = 2 * left + bw - 1
    theta[:, 1, 1] = bh
    theta[:, 1, 2] = 2 * top + bh - 1
    return F.affine_grid(theta, [n, c, out_size, out_size], align_corners=False)


def _normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def _separable_grid(box: torch.Tensor, flip: torch.Tensor | None, out_size: int) -> torch.Tensor:
    """:func:`_sampling_grid` of axis-aligned boxes built separably, ``[n, S, S, 2]``: for such boxes the
    affine grid is ``x * a + c`` along the width and ``y * b + d`` along the height, on the base grid
    ``linspace(-1, 1, S) * (S - 1) / S`` that ``F.affine_grid`` uses. It is ~15x faster than ``affine_grid``'s
    batched matrix product, and bit-identical to it where that product rounds after each term (x86 MKL
    builds: checked by the tests); in any case it is the one grid variable-size images are rendered with,
    by the cache builder and the student alike."""
    lin = torch.linspace(-1, 1, out_size) * (out_size - 1) / out_size
    top, left, bh, bw = box.to(torch.float32).unbind(1)
    sign = 1.0 - 2.0 * flip.to(torch.float32) if flip is not None else 1.0
    gx = lin[None, None, :] * (bw * sign)[:, None, None] + (2 * left + bw - 1)[:, None, None]
    gy = lin[None, :, None] * bh[:, None, None] + (2 * top + bh - 1)[:, None, None]
    n = len(box)
    return torch.stack((gx.expand(n, out_size, out_size), gy.expand(n, out_size, out_size)), dim=-1)


def render_each(
    images: Sequence[torch.Tensor],
    box: torch.Tensor,
    flip: torch.Tensor | None,
    out_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    padding: str = "border",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`render` of images of different sizes (on the CPU): one sampling grid for all (it does not depend
    on the image size; :func:`_separable_grid`), one ``grid_sample`` per image, one normalisation for all,
    in place. Every output pixel depends only on its own image.

    Args:
        images: ``n`` tensors ``uint8 [C, h_i, w_i]``.
        box: ``float32 [n, 4]`` (top, left, h, w).
        flip: ``bool [n]``; ``None`` = no flip.
        out_size, mean, std, padding: As for :func:`render`.
        out: ``float32 [n, C, S, S]`` to write into (e.g. a slice of a batch); ``None``: a new tensor.

    Returns:
        ``out``, ``float32 [n, C, out_size, out_size]``.
    """
    grid = _separable_grid(box, flip, out_size)
    sampled = [
        F.grid_sample(im[None].float().div_(255.0), grid[k : k + 1], mode="bilinear", padding_mode=padding,
                      align_corners=False)
        for k, im in enumerate(images)
    ]
    out = torch.cat(sampled, out=out) if out is not None else torch.cat(sampled)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return out.sub_(m).div_(s)  # the same two roundings as render's (x - m) / s


class ViewRenderer:
    """Renders training views of one split for any (view, rows): the one place that turns view parameters
    into input tensors for a split held in memory, shared by the cache builder, the student's loop and the
    audit tools (:class:`ShardRenderer` is its counterpart for streamed shards, with the same tensors on
    fixed-size images).

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
        self.aspect = self.image_hw[1] / self.image_hw[0]  # 1.0 for square images: the same bits as no aspect
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
            self.recipe, self.ids[positions], positions, view, self.shard_size, len(self.ids), self.image_hw,
            self.aspect,
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
            pbox, pflip = crop_params(self.recipe, self.ids[partners], view, self.aspect, self.image_hw)
            xp = render(
                self.images[partners].to(device), torch.from_numpy(pbox), torch.from_numpy(pflip), out_size,
                self.mean, self.std, self.padding,
            )
            _mix(x, p, mixed, xp)
        return x, p


RENDER_CHUNK = 16
"""Images :class:`ShardRenderer` renders per call of :func:`render` / :func:`render_each`."""


class ShardImages(Protocol):
    """The samples of one data shard, images read on demand (what :class:`ShardRenderer` renders).

    Attributes:
        first: Row (position) of the shard's first sample in its split.
        ids: ``int64 [n]`` stable sample keys, in shard order.
    """

    first: int
    ids: np.ndarray

    def image(self, i: int) -> torch.Tensor:
        """``uint8 [C, h, w]`` of the ``i``-th sample (CPU)."""
        ...

    def hw(self, i: int) -> tuple[int, int]:
        """Height and width of the ``i``-th sample's image."""
        ...


class ShardRenderer:
    """Renders views of the samples of one data shard at a time, image by image: the streaming path's renderer
    (:mod:`kdbench.data.stream`), shared by the student's stream, its evaluation and the cache builder.

    Each image is rendered from its own size into ``S x S``: images of one size stacked through :func:`render`
    (fixed-size data: exactly :class:`ViewRenderer`'s tensors), images of different sizes through
    :func:`render_each`; both are per-sample deterministic, so how samples are batched changes no bit. A
    variable-size image is evaluated through :func:`eval_box`. Rendering happens on the CPU (the loader's
    workers hold the images), so every job that uses this renderer gets the same bits on any device.

    Args:
        recipe: The view recipe.
        shard_size: Samples per data shard.
        num_samples: Rows in the split (the last shard may be short).
        mean, std: Normalisation.
        variable_size: The split's images differ in size (evaluation crops :func:`eval_box`); ``False``:
            evaluation renders whole images, as :class:`ViewRenderer` does.
    """

    def __init__(self, recipe: ViewRecipe, shard_size: int, num_samples: int, mean, std, variable_size: bool) -> None:
        self.recipe, self.shard_size, self.num_samples = recipe, shard_size, num_samples
        self.mean, self.std, self.variable_size = tuple(mean), tuple(std), variable_size
        self.padding = "zeros" if recipe.pad else "border"

    def _params(self, view: int, shard: ShardImages, idx: np.ndarray, hw: np.ndarray,
                out_size: int | None) -> ViewParams:
        n = len(idx)
        if view == CLEAN_VIEW:
            whole = np.tile(np.array([0.0, 0.0, 1.0, 1.0], dtype=np.float32), (n, 1))
            box = eval_box(hw, out_size) if self.variable_size else whole
            no_partner = np.full(n, -1, dtype=np.int64)
            return ViewParams(box, np.zeros(n, dtype=bool), no_partner, np.ones(n, dtype=np.float32))
        return view_params(self.recipe, shard.ids[idx], shard.first + idx, view, self.shard_size, self.num_samples,
                           (hw[:, 0], hw[:, 1]), hw[:, 1] / hw[:, 0])

    def params(self, view: int, shard: ShardImages, idx: np.ndarray, out_size: int | None = None) -> ViewParams:
        """Parameters of view ``view`` (or :data:`CLEAN_VIEW`, which needs ``out_size`` on variable-size
        images) of the samples ``idx`` (indices in the shard); partners are rows of the split."""
        if view == CLEAN_VIEW and self.variable_size and out_size is None:
            raise ValueError("the clean view of variable-size images needs out_size (evaluation crops to it)")
        idx = np.asarray(idx, dtype=np.int64)
        hw = np.array([shard.hw(int(i)) for i in idx], dtype=np.int64).reshape(-1, 2)
        return self._params(view, shard, idx, hw, out_size)

    def _render_each(
        self, images: Sequence[torch.Tensor], box: np.ndarray | None, flip: np.ndarray | None, out_size: int,
        padding: str,
    ) -> torch.Tensor:
        """Renders images that may differ in size into one ``float32 [n, C, S, S]``: :func:`render` of the
        stacked images when they share one size (fixed-size data: exactly :class:`ViewRenderer`'s tensors),
        else :func:`render_each`.

        Works :data:`RENDER_CHUNK` images at a time into the output: the temporaries (sampling grid, resampled
        images) stay small enough for the allocator to reuse instead of mapping fresh pages for every batch.
        """
        out = None
        for lo in range(0, len(images), RENDER_CHUNK):
            ims = images[lo : lo + RENDER_CHUNK]
            t_box = None if box is None else torch.from_numpy(box[lo : lo + RENDER_CHUNK])
            t_flip = None if flip is None else torch.from_numpy(flip[lo : lo + RENDER_CHUNK])
            if out is None:
                out = torch.empty(len(images), ims[0].shape[0], out_size, out_size)
            if box is None or all(im.shape == ims[0].shape for im in ims):
                out[lo : lo + len(ims)] = render(torch.stack(list(ims)), t_box, t_flip, out_size, self.mean,
                                                 self.std, padding)
            else:
                render_each(ims, t_box, t_flip, out_size, self.mean, self.std, padding,
                            out=out[lo : lo + len(ims)])
        return out

    def render(self, view: int, shard: ShardImages, idx: np.ndarray, out_size: int) -> tuple[torch.Tensor, ViewParams]:
        """Returns ``(inputs float32 [n, C, S, S] on CPU, params)`` of view ``view`` (or :data:`CLEAN_VIEW`) for
        the samples ``idx`` (indices in ``shard``); each image and each mixup partner is decoded once."""
        idx = np.asarray(idx, dtype=np.int64)
        images = [shard.image(int(i)) for i in idx]
        hw = np.array([im.shape[-2:] for im in images], dtype=np.int64).reshape(-1, 2)
        p = self._params(view, shard, idx, hw, out_size)
        if view == CLEAN_VIEW:
            # Evaluation's rendering, whatever the recipe's padding (as ViewRenderer and evaluate render it).
            return self._render_each(images, p.box if self.variable_size else None, None, out_size, "border"), p
        x = self._render_each(images, p.box, p.flip, out_size, self.padding)
        mixed = np.flatnonzero(p.partner >= 0)
        if len(mixed):
            local = p.partner[mixed] - shard.first
            partners = [shard.image(int(j)) for j in local]
            phw = np.array([im.shape[-2:] for im in partners], dtype=np.int64)
            pbox, pflip = crop_params(self.recipe, shard.ids[local], view, phw[:, 1] / phw[:, 0],
                                      (phw[:, 0], phw[:, 1]))
            _mix(x, p, mixed, self._render_each(partners, pbox, pflip, out_size, self.padding))
        return x, p

    def bind(self, shard: ShardImages) -> "BoundShardRenderer":
        """The renderer of ``shard`` alone, with :class:`ViewRenderer`'s interface (what the cache builder uses)."""
        return BoundShardRenderer(self, shard)


class BoundShardRenderer:
    """A :class:`ShardRenderer` bound to one shard, with :class:`ViewRenderer`'s interface: ``positions`` are
    indices in the shard, ``ids`` its keys. Renders on the CPU and moves the result to ``device``."""

    def __init__(self, renderer: ShardRenderer, shard: ShardImages) -> None:
        self.renderer, self.shard, self.ids = renderer, shard, shard.ids

    def params(self, view: int, positions: np.ndarray, out_size: int | None = None) -> ViewParams:
        return self.renderer.params(view, self.shard, positions, out_size)

    def render(
        self, view: int, positions: np.ndarray, out_size: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, ViewParams]:
        x, p = self.renderer.render(view, self.shard, positions, out_size)
        return x.to(device), p
