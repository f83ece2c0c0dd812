"""Views of non-square images on every path, against an independent computation (not against each other).

The paths: the in-RAM renderer (:class:`ViewRenderer`, fixed-size images), the streamed training batches
(:meth:`StreamedSplit.train_batches`, variable-size images through :class:`ShardRenderer`) and the cache
builder's rendering (:func:`kdbench.cache.build.encode_view` over the renderer a cache job opens, its teacher
an identity whose "logits" are its input pixels). The expected values are computed here from the definitions
alone, in numpy:

* the crop box: with ``scale = (a, a)`` and ``ratio = (r, r)`` a box covers the pixel area ``a * H * W`` with
  pixel aspect ``width / height = r``, i.e. ``Hb = sqrt(a H W / r)``, ``Wb = r Hb`` pixels (clipped to the
  image), anywhere inside the image;
* the pixels: output pixel ``(i, j)`` of ``S x S`` samples the input bilinearly at the pixel coordinate
  ``x = (left + w u) W - 1/2``, ``u = (j + 1/2) / S`` (``1 - u`` when flipped), ``y = (top + h (i + 1/2) / S) H
  - 1/2``, clamped to the image (border) or zero outside it (pad views); then ``(v / 255 - mean) / std``;
* mixup: ``lam * own view + (1 - lam) * the partner's own view`` (of the partner's own size);
* pad views: whole-pixel shifts of at most ``pad`` pixels in each direction of the image's own size.

A renderer that ignored a per-image size or aspect (invisible on square images) fails here.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from _helpers_stream import write_variable_data
from hypothesis import given
from hypothesis import strategies as st

from kdbench.cache.build import encode_view
from kdbench.config import CachePolicy, DataConfig, ViewRecipe
from kdbench.data.stream import StreamedSplit
from kdbench.data.views import CLEAN_VIEW, ShardRenderer, ViewRenderer, crop_params, eval_box, view_params

S = 12
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
A, R = 0.3, 1.4  # area fraction and pixel aspect ratio of every crop


def _recipe(**kw) -> ViewRecipe:
    base = dict(count=3, seed=5, scale=(A, A), ratio=(R, R), flip=True, mixup=0.0)
    return ViewRecipe(**{**base, **kw})


def expected_hw(h: int, w: int, area: float = A, ratio: float = R) -> tuple[float, float]:
    """Normalised (height, width) of a box of pixel area ``area h w`` and pixel aspect ``ratio``, clipped."""
    hb = math.sqrt(area * h * w / ratio)
    return min(hb / h, 1.0), min(ratio * hb / w, 1.0)


def ref_render(img: np.ndarray, box, flip: bool, size: int, mean, std, padding: str = "border") -> np.ndarray:
    """Bilinear resampling of box ``(top, left, h, w)`` of ``img`` (uint8 ``[C, H, W]``) to ``[C, S, S]``."""
    c, hh, ww = img.shape
    top, left, bh, bw = (float(v) for v in box)
    u = (np.arange(size) + 0.5) / size
    ux = 1.0 - u if flip else u
    xs = (left + bw * ux) * ww - 0.5
    ys = (top + bh * u) * hh - 0.5
    src = img.astype(np.float64) / 255.0

    def taps(coord: np.ndarray, n: int):
        if padding == "border":
            coord = np.clip(coord, 0, n - 1)
        lo = np.floor(coord).astype(int)
        frac = coord - lo
        return lo, lo + 1, frac

    y0, y1, fy = taps(ys, hh)
    x0, x1, fx = taps(xs, ww)

    def at(yi, xi):
        inside = (yi[:, None] >= 0) & (yi[:, None] < hh) & (xi[None, :] >= 0) & (xi[None, :] < ww)
        vals = src[:, np.clip(yi, 0, hh - 1)][:, :, np.clip(xi, 0, ww - 1)]
        return np.where(inside[None], vals, 0.0)

    out = (at(y0, x0) * ((1 - fy)[:, None] * (1 - fx)[None, :]) + at(y0, x1) * ((1 - fy)[:, None] * fx[None, :])
           + at(y1, x0) * (fy[:, None] * (1 - fx)[None, :]) + at(y1, x1) * (fy[:, None] * fx[None, :]))
    m, s = np.asarray(mean)[:, None, None], np.asarray(std)[:, None, None]
    return (out - m) / s


def check_box(box, h: int, w: int) -> None:
    """A crop box of an ``h x w`` image: the recipe's pixel area and aspect, inside the image."""
    eh, ew = expected_hw(h, w)
    assert box[2] == pytest.approx(eh, abs=1e-6) and box[3] == pytest.approx(ew, abs=1e-6), (h, w, box)
    assert -1e-6 <= box[0] <= 1 - box[2] + 1e-6 and -1e-6 <= box[1] <= 1 - box[3] + 1e-6, box


def test_reference_renderer_on_hand_values():
    """The reference itself, on values worked by hand: a 2 x 4 image, the whole box, S = 2."""
    img = np.array([[[0, 51, 102, 153], [204, 255, 0, 51]]], dtype=np.uint8)  # [1, 2, 4]
    # Output pixel (0, 0) samples x = 0.5, y = 0 (clamped): (0 + 51) / 2 / 255 = 0.1.
    out = ref_render(img, (0, 0, 1, 1), False, 2, (0.0,), (1.0,))
    assert out[0, 0, 0] == pytest.approx(0.1) and out[0, 0, 1] == pytest.approx((102 + 153) / 2 / 255)
    assert out[0, 1, 0] == pytest.approx((204 + 255) / 2 / 255)
    flipped = ref_render(img, (0, 0, 1, 1), True, 2, (0.0,), (1.0,))
    assert np.allclose(flipped, out[:, :, ::-1])
    # A box shifted one pixel right with zero fill: the last column samples past the image.
    shifted = ref_render(img, (0, 0.25, 1, 1), False, 2, (0.0,), (1.0,), padding="zeros")
    assert shifted[0, 0, 1] == pytest.approx((153 / 2) / 255)


def test_expected_box_on_hand_values():
    # 20 x 36 pixels, a = 0.3, r = 1.4: 216 px^2, Hb = sqrt(216 / 1.4) = 12.421, Wb = 17.390.
    assert expected_hw(20, 36) == pytest.approx((12.4212 / 20, 17.3897 / 36), abs=1e-4)


# --- in RAM --------------------------------------------------------------------------------------------------


def _images(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8))


@pytest.mark.parametrize("hw", [(20, 36), (36, 20)])
def test_in_ram_views_of_non_square_images(hw):
    h, w = hw
    images = _images(10, 3, h, w)
    renderer = ViewRenderer(_recipe(), images, torch.arange(100, 110), 5, MEAN, STD)
    rows = np.arange(10)
    flips = []
    for v in range(3):
        x, p = renderer.render(v, rows, S)
        for k in rows:
            check_box(p.box[k], h, w)
            want = ref_render(images[k].numpy(), p.box[k], bool(p.flip[k]), S, MEAN, STD)
            assert np.allclose(x[k].numpy(), want, atol=2e-5), (v, k)
        flips += list(p.flip)
    assert any(flips) and not all(flips)


def test_in_ram_mixed_views_blend_each_partners_own_view():
    h, w = 18, 30
    images = _images(8, 3, h, w, seed=1)
    renderer = ViewRenderer(_recipe(mixup=1.0), images, torch.arange(8), 4, MEAN, STD)
    x, p = renderer.render(1, np.arange(8), S)
    assert np.all(p.partner >= 0) and np.all(p.partner // 4 == np.arange(8) // 4)
    for k in range(8):
        j = int(p.partner[k])
        pbox = renderer.params(1, np.array([j])).box[0]  # the partner's own view 1
        check_box(pbox, h, w)
        own = ref_render(images[k].numpy(), p.box[k], bool(p.flip[k]), S, MEAN, STD)
        other = ref_render(images[j].numpy(), pbox, bool(renderer.params(1, np.array([j])).flip[0]), S, MEAN, STD)
        assert np.allclose(x[k].numpy(), p.lam[k] * own + (1 - p.lam[k]) * other, atol=3e-5), k


def test_in_ram_pad_views_shift_by_whole_pixels_of_each_axis():
    h, w, pad = 16, 28, 3
    images = _images(6, 1, h, w, seed=2)
    renderer = ViewRenderer(_recipe(pad=pad, flip=False), images, torch.arange(6), 6, (0.5,), (0.5,))
    shifts = set()
    for v in range(3):
        x, p = renderer.render(v, np.arange(6), w)
        for k in range(6):
            top, left, bh, bw = p.box[k]
            assert (bh, bw) == (1.0, 1.0)
            dy, dx = top * h, left * w
            assert dy == pytest.approx(round(dy), abs=1e-4) and dx == pytest.approx(round(dx), abs=1e-4)
            assert abs(round(dy)) <= pad and abs(round(dx)) <= pad
            shifts.add((round(dy), round(dx)))
            # Rendered at S = W the columns are whole pixels; rows are resampled to S.
            want = ref_render(images[k].numpy(), p.box[k], False, w, (0.5,), (0.5,), padding="zeros")
            assert np.allclose(x[k].numpy(), want, atol=2e-5)
    assert len(shifts) > 3


def test_clean_view_is_the_whole_image_resized():
    images = _images(3, 3, 14, 22)
    renderer = ViewRenderer(_recipe(), images, torch.arange(3), 3, MEAN, STD)
    x, p = renderer.render(CLEAN_VIEW, np.arange(3), S)
    for k in range(3):
        assert np.allclose(x[k].numpy(), ref_render(images[k].numpy(), (0, 0, 1, 1), False, S, MEAN, STD), atol=2e-5)


# --- streamed, variable-size images -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def streamed(tmp_path_factory) -> tuple[StreamedSplit, Path]:
    data_dir = write_variable_data(tmp_path_factory.mktemp("nonsquare") / "data", {"train": 12}, 6, S, 3,
                                   sizes=(14, 40))
    split = StreamedSplit.open(data_dir, "train", DataConfig(stream=True, workers=0))
    return split, data_dir


def _decoded(split: StreamedSplit) -> dict[int, np.ndarray]:
    """Row -> the decoded image (uint8 [C, h, w]) of every sample of the split."""
    out = {}
    for s, entry in enumerate(split.shards):
        shard = split.read(s)
        for i in range(len(shard)):
            out[shard.first + i] = shard.image(i).numpy()
    return out


def test_streamed_training_views_of_variable_size_images(streamed):
    split, _ = streamed
    images = _decoded(split)
    assert sum(im.shape[1] != im.shape[2] for im in images.values()) >= 8  # mostly non-square
    recipe = _recipe(mixup=0.5)
    seen = mixed = 0
    for view in range(2):
        for batch in split.train_batches(recipe, MEAN, STD, 0, view, view, S, 5):
            for k, row in enumerate(batch["rows"].tolist()):
                img = images[row]
                box = batch["box"][k].numpy()
                check_box(box, img.shape[1], img.shape[2])
                want = ref_render(img, box, bool(batch["flip"][k]), S, MEAN, STD)
                j = int(batch["partner"][k])
                if j >= 0:  # the partner's own view, of its own size
                    mixed += 1
                    pimg = images[j]
                    (pbox,), (pflip,) = crop_params(recipe, split.ids.numpy()[[j]], view, pimg.shape[2] / pimg.shape[1],
                                                    (pimg.shape[1], pimg.shape[2]))
                    check_box(pbox, pimg.shape[1], pimg.shape[2])
                    lam = float(batch["lam"][k])
                    want = lam * want + (1 - lam) * ref_render(pimg, pbox, bool(pflip), S, MEAN, STD)
                assert np.allclose(batch["x"][k].numpy(), want, atol=3e-5), (view, row)
                seen += 1
    assert seen == 24 and mixed >= 4


def test_streamed_pad_views_shift_each_image_by_its_own_pixels(streamed):
    split, _ = streamed
    images = _decoded(split)
    pad = 2
    for batch in split.train_batches(_recipe(pad=pad, flip=False), MEAN, STD, 0, 1, 1, S, 12):
        for k, row in enumerate(batch["rows"].tolist()):
            _, h, w = images[row].shape
            top, left, bh, bw = batch["box"][k].numpy()
            assert (bh, bw) == (1.0, 1.0)
            assert top * h == pytest.approx(round(top * h), abs=1e-4) and abs(round(top * h)) <= pad
            assert left * w == pytest.approx(round(left * w), abs=1e-4) and abs(round(left * w)) <= pad
            want = ref_render(images[row], batch["box"][k].numpy(), False, S, MEAN, STD, padding="zeros")
            assert np.allclose(batch["x"][k].numpy(), want, atol=3e-5)


def test_streamed_evaluation_is_the_centre_crop_of_each_image(streamed):
    split, _ = streamed
    images = _decoded(split)
    batches = list(split.eval_inputs(MEAN, STD, S, 5))
    x = torch.cat(batches)
    resized = round(S / 0.875)  # 14: the shorter side is resized to 14, then the centre 12 x 12
    for row, img in images.items():
        _, h, w = img.shape
        short = min(h, w)
        bh, bw = S * short / (resized * h), S * short / (resized * w)
        box = ((1 - bh) / 2, (1 - bw) / 2, bh, bw)
        assert np.allclose(x[row].numpy(), ref_render(img, box, False, S, MEAN, STD), atol=3e-5), row


def test_eval_box_on_hand_values():
    # 30 x 45, S = 28: the shorter side 30 -> 32, so the 28-pixel centre is 28/32 of the height and
    # 28 / (32 * 45 / 30) = 0.58333 of the width.
    assert eval_box(np.array([[30, 45]]), 28)[0] == pytest.approx([0.0625, 0.208333, 0.875, 0.583333], abs=1e-6)
    assert eval_box(np.array([[45, 30]]), 28)[0] == pytest.approx([0.208333, 0.0625, 0.583333, 0.875], abs=1e-6)


# --- the cache builder --------------------------------------------------------------------------------------


class _Pixels(nn.Module):
    """A "teacher" whose logits are its input pixels: what the cache builder stores is what it rendered."""

    feature_info = [{"num_chs": 3, "reduction": 1}]

    def forward_features(self, x):
        return x

    def forward_head(self, x, pre_logits=False):
        return x.flatten(1)

    def get_classifier(self):
        return nn.Identity()


def test_cache_builder_renders_each_streamed_image_by_its_own_size(streamed):
    split, _ = streamed
    images = _decoded(split)
    recipe = _recipe(mixup=1.0)
    one = StreamedSplit.open(split.data_dir, "train", DataConfig(stream=True, workers=0), [1])  # a cache job's shard
    renderer = one.bound_renderer(recipe, MEAN, STD)
    rows = np.arange(len(one))
    for view in range(2):
        stored = encode_view(_Pixels(), renderer, "logits", CachePolicy(logits_dtype="float32"), view, rows, 4, S)
        params = renderer.params(view, rows)
        for k in rows:
            img = images[6 + int(k)]  # shard 1 of 6 samples: rows 6.. of the split
            check_box(params.box[k], img.shape[1], img.shape[2])
            want = ref_render(img, params.box[k], bool(params.flip[k]), S, MEAN, STD)
            j = int(params.partner[k])  # a row of this shard-local split
            assert j >= 0
            pimg = images[6 + j]
            (pbox,), (pflip,) = crop_params(recipe, one.ids.numpy()[[j]], view, pimg.shape[2] / pimg.shape[1],
                                            (pimg.shape[1], pimg.shape[2]))
            check_box(pbox, pimg.shape[1], pimg.shape[2])
            want = params.lam[k] * want + (1 - params.lam[k]) * ref_render(pimg, pbox, bool(pflip), S, MEAN, STD)
            assert np.allclose(stored["values"][k].reshape(3, S, S), want, atol=3e-5), (view, k)


def test_cache_builder_renders_in_ram_non_square_images():
    h, w = 22, 13
    images = _images(8, 3, h, w, seed=3)
    renderer = ViewRenderer(_recipe(), images, torch.arange(8), 8, MEAN, STD)
    rows = np.arange(8)
    stored = encode_view(_Pixels(), renderer, "logits", CachePolicy(logits_dtype="float32"), 2, rows, 3, S)
    params = renderer.params(2, rows)
    for k in rows:
        check_box(params.box[k], h, w)
        want = ref_render(images[k].numpy(), params.box[k], bool(params.flip[k]), S, MEAN, STD)
        assert np.allclose(stored["values"][k].reshape(3, S, S), want, atol=2e-5), k


# --- properties -------------------------------------------------------------------------------------------------


@given(
    h=st.integers(1, 4000), w=st.integers(1, 4000),
    scale=st.tuples(st.floats(0.01, 1.0), st.floats(0.01, 1.0)).map(sorted),
    ratio=st.tuples(st.floats(0.2, 5.0), st.floats(0.2, 5.0)).map(sorted),
    seed=st.integers(0, 2**40), view=st.integers(0, 1000),
)
def test_crop_boxes_lie_inside_the_image_for_any_size_and_ratio(h, w, scale, ratio, seed, view):
    recipe = ViewRecipe(seed=seed, scale=tuple(scale), ratio=tuple(ratio))
    ids = np.arange(16, dtype=np.int64) * 7919
    p = view_params(recipe, ids, np.arange(16), view, 8, 16, (h, w), w / h)
    top, left, bh, bw = p.box.T.astype(np.float64)
    eps = 1e-6
    assert np.all((bh > 0) & (bw > 0) & (bh <= 1) & (bw <= 1))
    assert np.all((top >= -eps) & (left >= -eps) & (top + bh <= 1 + eps) & (left + bw <= 1 + eps))
    # Unclipped boxes have the recipe's pixel area and aspect ratio.
    free = (bh < 1 - eps) & (bw < 1 - eps)
    area, aspect = bh * bw, (bw * w) / (bh * h)
    assert np.all(area[free] >= scale[0] * (1 - 1e-4)) and np.all(area[free] <= scale[1] * (1 + 1e-4))
    assert np.all(aspect[free] >= ratio[0] * (1 - 1e-4)) and np.all(aspect[free] <= ratio[1] * (1 + 1e-4))


@given(h=st.integers(1, 500), w=st.integers(1, 500), pad=st.integers(1, 8), view=st.integers(0, 100))
def test_pad_shifts_are_whole_pixels_within_pad_for_any_size(h, w, pad, view):
    recipe = ViewRecipe(pad=pad)
    box, _ = crop_params(recipe, np.arange(12, dtype=np.int64), view, w / h, (h, w))
    dy, dx = box[:, 0].astype(np.float64) * h, box[:, 1].astype(np.float64) * w
    assert np.allclose(dy, np.round(dy), atol=1e-3) and np.allclose(dx, np.round(dx), atol=1e-3)
    assert np.all(np.abs(np.round(dy)) <= pad) and np.all(np.abs(np.round(dx)) <= pad)
    assert np.all(box[:, 2:] == 1.0)


def test_shard_renderer_params_use_each_images_own_size():
    """:meth:`ShardRenderer.params` (what the cache builder stores for audit) on images of three shapes."""

    class Shard:
        first = 0
        ids = np.array([3, 4, 5], dtype=np.int64)
        shapes = [(20, 36), (36, 20), (25, 25)]

        def image(self, i):
            return torch.zeros(1, *self.shapes[i], dtype=torch.uint8)

        def hw(self, i):
            return self.shapes[i]

    renderer = ShardRenderer(_recipe(), 3, 3, (0.5,), (0.5,), variable_size=True)
    p = renderer.params(0, Shard(), np.arange(3))
    for k, (h, w) in enumerate(Shard.shapes):
        check_box(p.box[k], h, w)
    clean = renderer.params(CLEAN_VIEW, Shard(), np.arange(3), out_size=28)
    # Evaluation's centre crop of each (S = 28: shorter side to 32): 20 x 36 -> height 28/32, width 28 * 20 / (32 * 36).
    assert clean.box[0] == pytest.approx([0.0625, (1 - 0.486111) / 2, 0.875, 0.486111], abs=1e-6)
    assert clean.box[1] == pytest.approx([(1 - 0.486111) / 2, 0.0625, 0.486111, 0.875], abs=1e-6)
    assert clean.box[2] == pytest.approx([0.0625, 0.0625, 0.875, 0.875], abs=1e-6)
