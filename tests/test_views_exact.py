"""Views against exact, independently computed values: the documented generator (splitmix64 and the
counter-based uniforms, checked on the published splitmix64 sequence and a pure-Python re-implementation),
the documented formulas of the crop box, the pad shift, the flip, the mixup partner and its weight (including
the boundaries of every threshold), the dtypes the docstrings promise, and the renderers' pixels in the
corner cases the other view tests do not reach (identity resampling, upsampling at the border, whole-pixel
shifts of mixup partners, fixed-size images through :class:`ShardRenderer`).

Expected pixels come from the numpy reference renderer of ``test_views_nonsquare.py`` (bilinear sampling
written from the definition), not from the renderer under test.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from test_views_nonsquare import ref_render

from kdbench.config import ViewRecipe
from kdbench.data import views
from kdbench.data.shards import Split
from kdbench.data.views import (
    CLEAN_VIEW,
    RENDER_CHUNK,
    ShardRenderer,
    ViewRenderer,
    counter_uniform,
    crop_params,
    eval_box,
    render,
    render_each,
    view_params,
)
from kdbench.meta import DataInfo

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
STREAM_MUL, VIEW_MUL = 0xD1B54A32D192ED03, 0x8CB92BA72F3D8DD7
STREAM = {"scale": 1, "ratio": 2, "top": 3, "left": 4, "flip": 5, "mix": 6, "partner": 7, "lam": 8}
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


# --- a pure-Python reference of the generator -------------------------------------------------------------


def sm64(x: int) -> int:
    """splitmix64's output for state ``x`` (Vigna's reference: ``z = x + golden``, then two mixing rounds)."""
    z = (x + GOLDEN) & M64
    z = ((z ^ (z >> 30)) * MIX1) & M64
    z = ((z ^ (z >> 27)) * MIX2) & M64
    return z ^ (z >> 31)


def sm64_inverse(z: int) -> int:
    """The state whose splitmix64 output is ``z`` (each step of the mix is a bijection of 64-bit words)."""

    def unshift(y: int, s: int) -> int:
        x = y
        for _ in range(64 // s + 1):
            x = y ^ (x >> s)
        return x

    z = unshift(z, 31)
    z = (z * pow(MIX2, -1, 1 << 64)) & M64
    z = unshift(z, 27)
    z = (z * pow(MIX1, -1, 1 << 64)) & M64
    z = unshift(z, 30)
    return (z - GOLDEN) & M64


def key_of(seed: int, view: int, stream: int) -> int:
    key = sm64(((seed & M64) + stream * STREAM_MUL) & M64)
    return sm64(key ^ (((view & 0xFFFFFFFF) * VIEW_MUL) & M64))


def ref_uniform(seed: int, i: int, view: int, stream: int) -> float:
    """The documented uniform of ``(seed, id, view, stream)``: the top 53 bits of the final hash, / 2^53."""
    h = sm64(key_of(seed, view, stream) ^ sm64(i & M64))
    return (h >> 11) / 2.0**53


def id_with_uniform(seed: int, view: int, stream: int, u53: int) -> int:
    """A sample key whose uniform of ``(seed, view, stream)`` is exactly ``u53 / 2^53``."""
    return sm64_inverse(sm64_inverse(u53 << 11) ^ key_of(seed, view, stream))


def test_reference_generator_inverse_round_trips():
    for x in (0, 1, 12345, GOLDEN, M64, 1 << 63):
        assert sm64(sm64_inverse(x)) == x and sm64_inverse(sm64(x)) == x
    i = id_with_uniform(3, 1, 5, 1 << 52)
    assert ref_uniform(3, i, 1, 5) == 0.5


def test_splitmix64_is_the_published_sequence():
    # splitmix64 seeded with 1234567: its outputs are _splitmix64(seed + k * golden), k = 0, 1, ...
    states = np.array([(1234567 + k * GOLDEN) & M64 for k in range(5)], dtype=np.uint64)
    out = [int(v) for v in views._splitmix64(states)]
    assert out == [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431,
                   16408922859458223821]
    assert int(views._splitmix64(np.array([0], dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF
    edge = [0, 1, 2**31, 2**32 + 7, 2**63, M64 - GOLDEN, M64, 0x0123456789ABCDEF]
    assert [int(v) for v in views._splitmix64(np.array(edge, dtype=np.uint64))] == [sm64(x) for x in edge]


def test_counter_uniform_is_the_documented_hash_exactly():
    ids = np.array([0, 1, 7, 123456789, 2**40 + 3, 2**62 + 11])
    keys = [(0, 0, 1), (11, 3, 6), (2**40 + 5, CLEAN_VIEW, 8), (-1, 7, 5), (5, 2**33 + 1, 2)]
    for seed, view, stream in keys:
        u = counter_uniform(seed, ids, view, stream)
        assert u.dtype == np.float64
        assert u.tolist() == [ref_uniform(seed, int(i), view, stream) for i in ids], (seed, view, stream)
    # Golden values (seed 0, view 0, the scale stream; seed 11, view 3, the mix stream).
    golden_ids = np.array([0, 7, 123456789, 2**40 + 3])
    assert counter_uniform(0, golden_ids, 0, 1).tolist() == [
        0.9710374769597387, 0.26070783640850603, 0.8347711796777779, 0.8230535379839458]
    assert counter_uniform(11, golden_ids, 3, 6).tolist() == [
        0.1884950705807934, 0.9715117475299729, 0.11740207849417905, 0.17962360215700002]


def test_counter_uniform_wraps_silently():
    """The 64-bit arithmetic wraps by design: no overflow warning (a strict filter would raise it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        u = counter_uniform(2**63 + 5, np.arange(4), 2**31 + 3, 8)
    assert u.tolist() == [ref_uniform(2**63 + 5, i, 2**31 + 3, 8) for i in range(4)]


# --- crop boxes and flips ---------------------------------------------------------------------------------


def _ref_box(recipe: ViewRecipe, i: int, view: int, aspect: float) -> list[float]:
    u = lambda s: ref_uniform(recipe.seed, i, view, STREAM[s])  # noqa: E731
    area = recipe.scale[0] + (recipe.scale[1] - recipe.scale[0]) * u("scale")
    lo, hi = math.log(recipe.ratio[0]), math.log(recipe.ratio[1])
    ratio = math.exp(lo + (hi - lo) * u("ratio"))
    w = min(math.sqrt(area * ratio / aspect), 1.0)
    h = min(math.sqrt(area / ratio * aspect), 1.0)
    return [(1 - h) * u("top"), (1 - w) * u("left"), h, w]


@pytest.mark.parametrize("aspect", [1.0, 0.6, 1.8])
def test_crop_box_is_the_documented_draw(aspect):
    recipe = ViewRecipe(seed=9, scale=(0.2, 0.9), ratio=(0.5, 2.0))
    ids = np.arange(40) * 31 + 5
    for view in (0, 3):
        box, flip = crop_params(recipe, ids, view, aspect=aspect)
        assert box.dtype == np.float32 and flip.dtype == bool
        for k, i in enumerate(ids):
            want = _ref_box(recipe, int(i), view, aspect)
            assert box[k].tolist() == pytest.approx(want, abs=1e-6), (view, k)
            assert flip[k] == (ref_uniform(recipe.seed, int(i), view, STREAM["flip"]) < 0.5)
    # The draws span the recipe's ranges (a box stuck at one end of scale or ratio would not).
    box, _ = crop_params(recipe, np.arange(2000), 0)
    area = box[:, 2].astype(np.float64) * box[:, 3]
    free = (box[:, 2] < 1) & (box[:, 3] < 1)
    assert area[free].min() < 0.25 and area[free].max() > 0.6
    assert (box[free, 3] / box[free, 2]).min() < 0.6 and (box[free, 3] / box[free, 2]).max() > 1.6


def test_view_params_default_aspect_is_square():
    recipe = ViewRecipe(seed=4, scale=(0.2, 0.8), ratio=(0.5, 2.0))
    ids = np.arange(30)
    p = view_params(recipe, ids, np.arange(30), 1, 10, 30)
    for k in range(30):
        assert p.box[k].tolist() == pytest.approx(_ref_box(recipe, k, 1, 1.0), abs=1e-6)


def test_flip_is_strictly_below_one_half():
    """A flip has probability exactly 1/2: of the 2^53 uniforms, those below 0.5 flip; 0.5 itself does not."""
    recipe = ViewRecipe(seed=21, flip=True)
    half = id_with_uniform(21, 2, STREAM["flip"], 1 << 52)  # uniform exactly 0.5
    below = id_with_uniform(21, 2, STREAM["flip"], (1 << 52) - 1)
    _, flip = crop_params(recipe, np.array([half, below], dtype=np.uint64), 2)
    assert flip.tolist() == [False, True]


def test_no_flip_recipe_gives_boolean_false_flips():
    _, flip = crop_params(ViewRecipe(flip=False), np.arange(5), 0)
    assert flip.dtype == bool and not flip.any() and flip.shape == (5,)


def test_pad_shift_is_the_documented_draw_over_the_whole_range():
    pad, h, w = 3, 20, 36
    recipe = ViewRecipe(seed=2, pad=pad)
    ids = np.arange(400)
    box, flip = crop_params(recipe, ids, 5, w / h, (h, w))
    assert box.dtype == np.float32 and flip.dtype == bool
    dy = np.floor(np.array([ref_uniform(2, int(i), 5, STREAM["top"]) for i in ids]) * (2 * pad + 1)) - pad
    dx = np.floor(np.array([ref_uniform(2, int(i), 5, STREAM["left"]) for i in ids]) * (2 * pad + 1)) - pad
    assert np.allclose(box[:, 0], dy / h, atol=1e-7) and np.allclose(box[:, 1], dx / w, atol=1e-7)
    assert np.all(box[:, 2:] == 1.0)
    # Every shift in [-pad, pad] occurs, on each axis.
    assert set(np.rint(box[:, 0] * h).astype(int)) == set(range(-pad, pad + 1))
    assert set(np.rint(box[:, 1] * w).astype(int)) == set(range(-pad, pad + 1))


def test_pad_without_image_size_is_an_error():
    with pytest.raises(ValueError) as e:
        crop_params(ViewRecipe(pad=4), np.arange(3), 0)
    assert str(e.value) == "views.pad needs the image size"


# --- mixup partners and weights ---------------------------------------------------------------------------


def _ref_mix(recipe: ViewRecipe, i: int, pos: int, view: int, shard: int, n: int) -> tuple[int, float]:
    """The documented partner (a uniform other row of the shard) and weight max(a, 1 - a) of one sample."""
    start = pos // shard * shard
    length = min(shard, n - start)
    if not (ref_uniform(recipe.seed, i, view, STREAM["mix"]) < recipe.mixup and length > 1):
        return -1, 1.0
    other = start + math.floor(ref_uniform(recipe.seed, i, view, STREAM["partner"]) * (length - 1))
    other += other >= pos
    a = ref_uniform(recipe.seed, i, view, STREAM["lam"])
    return other, float(np.float32(max(a, 1 - a)))


@pytest.mark.parametrize("n, shard", [(37, 8), (34, 8), (33, 8)])  # last shards of 5, 2 and 1 rows
def test_mixup_partner_and_weight_are_the_documented_draws(n, shard):
    recipe = ViewRecipe(seed=13, mixup=0.6)
    ids = np.arange(n) * 7 + 100
    for view in range(4):
        p = view_params(recipe, ids, np.arange(n), view, shard, n)
        assert p.partner.dtype == np.int64 and p.lam.dtype == np.float32
        got = list(zip(p.partner.tolist(), p.lam.tolist()))
        assert got == [_ref_mix(recipe, int(ids[k]), k, view, shard, n) for k in range(n)], view


def test_mixup_always_mixes_except_alone_and_partners_cover_the_shard():
    recipe = ViewRecipe(seed=3, mixup=1.0)
    n, shard = 18, 8  # shards of 8, 8 and 2 rows
    seen = {k: set() for k in range(n)}
    for view in range(300):
        p = view_params(recipe, np.arange(n), np.arange(n), view, shard, n)
        assert np.all(p.partner >= 0) and np.all(p.lam < 1) and np.all(p.lam >= 0.5)
        for k, j in enumerate(p.partner.tolist()):
            seen[k].add(j)
    for k in range(n):
        start = k // shard * shard
        assert seen[k] == set(range(start, min(start + shard, n))) - {k}, k
    alone = view_params(recipe, np.arange(17), np.arange(17), 0, 8, 17)  # the last shard holds one row
    assert alone.partner[-1] == -1 and alone.lam[-1] == 1.0


def test_mixup_probability_is_strict():
    """A view is mixed when its uniform is *below* ``mixup``: a mixup equal to the uniform does not mix."""
    ids, pos = np.arange(10), np.arange(10)
    u = counter_uniform(8, ids, 0, STREAM["mix"])
    k = int(np.argmax(u))
    p = view_params(ViewRecipe(seed=8, mixup=float(u[k])), ids, pos, 0, 10, 10)
    assert p.partner[k] == -1 and p.lam[k] == 1.0
    assert np.all(p.partner[u < u[k]] >= 0)


def test_unmixed_params_have_the_documented_dtypes():
    p = view_params(ViewRecipe(mixup=0.0), np.arange(6), np.arange(6), 1, 3, 6)
    assert p.partner.dtype == np.int64 and p.lam.dtype == np.float32 and p.box.dtype == np.float32
    assert p.partner.tolist() == [-1] * 6 and p.lam.tolist() == [1.0] * 6


@pytest.mark.parametrize("dtype", [np.uint64, np.uint32, np.int32])
def test_view_params_take_keys_and_rows_of_any_integer_type(dtype):
    recipe = ViewRecipe(seed=6, mixup=0.7)
    ids, pos = np.arange(20) + 1000, np.arange(20)
    want = view_params(recipe, ids, pos, 2, 8, 20)
    got = view_params(recipe, ids.astype(dtype), pos.astype(dtype), 2, 8, 20)
    for f in ("box", "flip", "partner", "lam"):
        a, b = getattr(want, f), getattr(got, f)
        assert a.dtype == b.dtype and np.array_equal(a, b), f


# --- evaluation boxes -------------------------------------------------------------------------------------


def test_eval_box_is_float32_and_exact_for_narrow_integer_sizes():
    hw = np.array([[2000, 3000], [3000, 2000], [480, 640]])
    want = eval_box(hw, 224)
    assert want.dtype == np.float32
    # 2000 x 3000 at S = 224: the shorter side 2000 -> 256, the centre 224 is 224/256 of the height.
    bw = 0.875 * 2 / 3
    assert want[0].tolist() == pytest.approx([0.0625, (1 - bw) / 2, 0.875, bw], abs=1e-6)
    assert np.array_equal(eval_box(hw.astype(np.int16), 224), want)  # no overflow in 16-bit sizes
    assert np.array_equal(eval_box([480, 640], 224), want[2:])  # one image as a flat pair


# --- the in-RAM renderer ----------------------------------------------------------------------------------


def _images(n, c, h, w, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8))


def test_for_split_is_the_renderer_of_the_splits_arrays():
    images = _images(12, 3, 10, 14)
    split = Split(images, torch.zeros(12, dtype=torch.int64), torch.arange(50, 62), shard_size=4)
    data = DataInfo(num_classes=2, in_chans=3, image_size=10, num_train=12, mean=MEAN, std=STD)
    recipe = ViewRecipe(seed=1, mixup=0.5)
    got = ViewRenderer.for_split(recipe, split, data)
    want = ViewRenderer(recipe, images, torch.arange(50, 62), 4, MEAN, STD)
    assert got.recipe is recipe and got.images is images and got.shard_size == 4
    assert np.array_equal(got.ids, np.arange(50, 62)) and (got.mean, got.std) == (MEAN, STD)
    assert (got.image_hw, got.aspect, got.padding) == ((10, 14), 1.4, "border")
    for view in (CLEAN_VIEW, 0, 2):
        x, p = got.render(view, np.arange(12), 8)
        y, q = want.render(view, np.arange(12), 8)
        assert torch.equal(x, y) and np.array_equal(p.partner, q.partner)


def test_clean_view_params_are_the_whole_image_unflipped_unmixed():
    renderer = ViewRenderer(ViewRecipe(mixup=1.0), _images(5, 1, 6, 9), torch.arange(5), 5, (0.5,), (0.5,))
    p = renderer.params(CLEAN_VIEW, np.array([4, 0, 2]))
    assert p.box.dtype == np.float32 and p.box.tolist() == [[0.0, 0.0, 1.0, 1.0]] * 3
    assert p.flip.dtype == bool and p.flip.tolist() == [False] * 3
    assert p.partner.dtype == np.int64 and p.partner.tolist() == [-1] * 3
    assert p.lam.dtype == np.float32 and p.lam.tolist() == [1.0] * 3
    _, q = renderer.render(CLEAN_VIEW, [4, 0, 2], 6)
    assert all(np.array_equal(getattr(p, f), getattr(q, f)) for f in ("box", "flip", "partner", "lam"))


@pytest.mark.parametrize("rows", [[3, 1, 4], np.array([3, 1, 4], np.uint8), np.array([3, 1, 4], np.int32)])
def test_renderer_takes_rows_of_any_integer_type(rows):
    recipe = ViewRecipe(seed=2, mixup=0.5)
    renderer = ViewRenderer(recipe, _images(6, 1, 8, 8), torch.arange(6), 3, (0.5,), (0.5,))
    want_x, want_p = renderer.render(1, np.array([3, 1, 4]), 8)
    x, p = renderer.render(1, rows, 8)
    assert torch.equal(x, want_x)
    assert np.array_equal(p.box, want_p.box) and np.array_equal(p.partner, want_p.partner)


def test_in_ram_pad_views_of_mixed_samples_shift_the_partner_too():
    """Mixup over pad views: each partner is its own whole-pixel shift with zero fill (non-square images)."""
    h, w = 10, 16
    images = _images(8, 3, h, w, seed=4)
    recipe = ViewRecipe(seed=3, pad=2, flip=True, mixup=1.0)
    renderer = ViewRenderer(recipe, images, torch.arange(8), 4, MEAN, STD)
    x, p = renderer.render(0, np.arange(8), w)
    assert np.all(p.partner >= 0)
    for k in range(8):
        j = int(p.partner[k])
        (pbox,), (pflip,) = crop_params(recipe, np.array([j]), 0, w / h, (h, w))
        own = ref_render(images[k].numpy(), p.box[k], bool(p.flip[k]), w, MEAN, STD, padding="zeros")
        other = ref_render(images[j].numpy(), pbox, bool(pflip), w, MEAN, STD, padding="zeros")
        assert np.allclose(x[k].numpy(), p.lam[k] * own + (1 - p.lam[k]) * other, atol=3e-5), k


# --- render / render_each in their corner cases -------------------------------------------------------------


def _exact_normalised(images: torch.Tensor, mean, std) -> torch.Tensor:
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def test_render_at_the_images_size_is_the_normalised_image_bit_for_bit():
    images = _images(4, 3, 9, 9, seed=5)
    assert torch.equal(render(images, None, None, 9, MEAN, STD), _exact_normalised(images, MEAN, STD))


@pytest.mark.parametrize("hw, size", [((9, 15), 9), ((15, 9), 9), ((9, 15), 15), ((15, 9), 15)])
def test_render_of_whole_non_square_images_resizes_both_axes(hw, size):
    images = _images(3, 3, *hw, seed=6)
    x = render(images, None, None, size, MEAN, STD)
    assert x.shape == (3, 3, size, size)
    for k in range(3):
        want = ref_render(images[k].numpy(), (0, 0, 1, 1), False, size, MEAN, STD)
        assert np.allclose(x[k].numpy(), want, atol=2e-5)


def test_render_at_the_images_size_applies_a_flip_alone_and_a_box_alone():
    images = _images(4, 3, 10, 10, seed=7)
    flip = torch.tensor([True, False, True, False])
    x = render(images, None, flip, 10, MEAN, STD)
    for k in range(4):
        want = ref_render(images[k].numpy(), (0, 0, 1, 1), bool(flip[k]), 10, MEAN, STD)
        assert np.allclose(x[k].numpy(), want, atol=2e-5)
    assert torch.allclose(x[0], _exact_normalised(images[:1], MEAN, STD)[0].flip(-1), atol=2e-5)
    box = torch.tensor([[0.1, 0.2, 0.5, 0.6]] * 4)
    y = render(images, box, None, 10, MEAN, STD)
    for k in range(4):
        want = ref_render(images[k].numpy(), box[k], False, 10, MEAN, STD)
        assert np.allclose(y[k].numpy(), want, atol=2e-5)


def test_render_upsampling_clamps_to_the_border_by_default():
    """An upsampled whole image samples past the outer pixel centres: ``border`` repeats the edge pixels."""
    images = _images(2, 3, 5, 7, seed=8)
    x = render(images, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2), None, 16, MEAN, STD)
    y = render_each(list(images), torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2), None, 16, MEAN, STD)  # no `out`
    for k in range(2):
        want = ref_render(images[k].numpy(), (0, 0, 1, 1), False, 16, MEAN, STD)
        assert np.allclose(x[k].numpy(), want, atol=2e-5) and np.allclose(y[k].numpy(), want, atol=2e-5)


def test_rendering_emits_no_warnings():
    images = _images(3, 3, 8, 12, seed=9)
    box = torch.tensor([[0.1, 0.1, 0.5, 0.7]] * 3)
    flip = torch.tensor([True, False, True])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        render(images, box, flip, 6, MEAN, STD)
        render_each(list(images), box, flip, 6, MEAN, STD, out=torch.empty(3, 3, 6, 6))


def test_float64_boxes_are_rounded_to_float32_first():
    """A float64 box gives the grid and pixels of that box rounded to float32 (the documented box dtype)."""
    rng = np.random.default_rng(10)
    box64 = rng.random((256, 4)) * 0.5
    box64[:, 2:] += 0.3
    box32 = torch.from_numpy(box64.astype(np.float32))
    cpu = torch.device("cpu")
    flip = torch.from_numpy(rng.random(256) < 0.5)
    want = views._sampling_grid(256, 1, box32, flip, 12, cpu)
    assert torch.equal(views._sampling_grid(256, 1, torch.from_numpy(box64), flip, 12, cpu), want)
    images = list(_images(4, 1, 9, 13, seed=11))
    want = render_each(images, box32[:4], flip[:4], 12, (0.5,), (0.5,))
    assert torch.equal(render_each(images, torch.from_numpy(box64[:4]), flip[:4], 12, (0.5,), (0.5,)), want)


# --- the shard renderer on fixed-size images --------------------------------------------------------------


class _Shard:
    """One data shard of in-memory images (any sizes), as the stream presents it."""

    def __init__(self, images, first: int, ids):
        self.images, self.first, self.ids = list(images), first, np.asarray(ids, dtype=np.int64)

    def image(self, i):
        return self.images[i]

    def hw(self, i):
        return tuple(self.images[i].shape[-2:])


def _fixed(recipe: ViewRecipe, n=8, h=10, w=16, seed=12, first=0):
    images = _images(n, 3, h, w, seed=seed)
    shard = _Shard(images, first, np.arange(first, first + n) + 500)
    return images, shard, ShardRenderer(recipe, n, first + n, MEAN, STD, variable_size=False)


def test_shard_renderer_crops_fixed_size_images_flipped_and_clamped():
    recipe = ViewRecipe(seed=4, scale=(0.05, 0.2), ratio=(0.5, 2.0), flip=True)
    images, shard, renderer = _fixed(recipe)
    x, p = renderer.render(1, shard, np.arange(8), 24)  # small boxes upsampled: samples reach past the border
    assert p.flip.any() and not p.flip.all()
    for k in range(8):
        want = ref_render(images[k].numpy(), p.box[k], bool(p.flip[k]), 24, MEAN, STD)
        assert np.allclose(x[k].numpy(), want, atol=3e-5), k


def test_shard_renderer_pad_views_with_mixup_on_fixed_size_images():
    h, w = 10, 16
    recipe = ViewRecipe(seed=5, pad=3, flip=True, mixup=1.0)
    images, shard, renderer = _fixed(recipe, h=h, w=w, first=16)
    x, p = renderer.render(2, shard, np.arange(8), w)
    for k in range(8):
        j = int(p.partner[k]) - 16
        assert 0 <= j < 8
        (pbox,), (pflip,) = crop_params(recipe, shard.ids[[j]], 2, w / h, (h, w))
        assert abs(pbox[0] * h - round(pbox[0] * h)) < 1e-4  # whole pixels of the partner's own height
        own = ref_render(images[k].numpy(), p.box[k], bool(p.flip[k]), w, MEAN, STD, padding="zeros")
        other = ref_render(images[j].numpy(), pbox, bool(pflip), w, MEAN, STD, padding="zeros")
        assert np.allclose(x[k].numpy(), p.lam[k] * own + (1 - p.lam[k]) * other, atol=3e-5), k


def test_shard_renderer_clean_view_of_fixed_size_images_is_evaluations():
    images, shard, renderer = _fixed(ViewRecipe(seed=1, mixup=1.0, pad=2), h=12, w=12)
    x, p = renderer.render(CLEAN_VIEW, shard, np.arange(8), 12)
    assert torch.equal(x, _exact_normalised(images, MEAN, STD))  # the whole image, no resampling
    q = renderer.params(CLEAN_VIEW, shard, np.arange(8), 12)
    for params in (p, q):
        assert params.box.dtype == np.float32 and params.box.tolist() == [[0.0, 0.0, 1.0, 1.0]] * 8
        assert params.flip.dtype == bool and not params.flip.any()
        assert params.partner.dtype == np.int64 and params.partner.tolist() == [-1] * 8
        assert params.lam.dtype == np.float32 and params.lam.tolist() == [1.0] * 8


def test_shard_renderer_takes_indices_of_any_integer_type():
    recipe = ViewRecipe(seed=2, mixup=0.5)
    _, shard, renderer = _fixed(recipe, first=300)
    idx = np.array([5, 0, 7])
    want_x, want_p = renderer.render(1, shard, idx, 8)
    for narrow in (idx.astype(np.uint8), idx.astype(np.uint16), idx.tolist()):
        x, p = renderer.render(1, shard, narrow, 8)
        assert torch.equal(x, want_x) and np.array_equal(p.partner, want_p.partner)
        q = renderer.params(1, shard, narrow)
        assert np.array_equal(q.box, want_p.box) and np.array_equal(q.partner, want_p.partner)


def test_shard_renderer_works_in_chunks_and_stacks_same_size_images(monkeypatch):
    """RENDER_CHUNK images per call; a chunk of one size goes through render (ViewRenderer's tensors), a
    chunk of mixed sizes through render_each."""
    calls = []
    real_render, real_each = views.render, views.render_each
    monkeypatch.setattr(views, "render", lambda images, *a, **k: calls.append(("render", len(images)))
                        or real_render(images, *a, **k))
    monkeypatch.setattr(views, "render_each", lambda images, *a, **k: calls.append(("each", len(images)))
                        or real_each(images, *a, **k))
    n = 2 * RENDER_CHUNK + 3
    recipe = ViewRecipe(seed=7, mixup=0.0)
    images = [img for img in _images(n, 1, 6, 10, seed=13)]
    images[RENDER_CHUNK + 2] = torch.zeros(1, 9, 7, dtype=torch.uint8)  # the second chunk mixes sizes
    shard = _Shard(images, 0, np.arange(n))
    renderer = ShardRenderer(recipe, n, n, (0.5,), (0.5,), variable_size=True)
    x, p = renderer.render(0, shard, np.arange(n), 8)
    assert calls == [("render", RENDER_CHUNK), ("each", RENDER_CHUNK), ("render", 3)]
    for k in (0, RENDER_CHUNK + 1, RENDER_CHUNK + 2, n - 1):
        want = ref_render(images[k].numpy(), p.box[k], bool(p.flip[k]), 8, (0.5,), (0.5,))
        assert np.allclose(x[k].numpy(), want, atol=3e-5), k


def test_bound_shard_renderer_passes_the_output_size_and_renders_on_the_cpu_by_default():
    images = [torch.zeros(1, 20, 36, dtype=torch.uint8), torch.full((1, 36, 20), 255, dtype=torch.uint8)]
    shard = _Shard(images, 0, [1, 2])
    bound = ShardRenderer(ViewRecipe(), 2, 2, (0.5,), (0.5,), variable_size=True).bind(shard)
    p = bound.params(CLEAN_VIEW, np.arange(2), out_size=28)
    assert np.array_equal(p.box, eval_box(np.array([[20, 36], [36, 20]]), 28))
    x, q = bound.render(CLEAN_VIEW, np.arange(2), 28)
    assert x.device.type == "cpu" and x.shape == (2, 1, 28, 28)
    assert torch.equal(x[0], torch.full((1, 28, 28), -1.0))
    assert torch.equal(x[1], torch.full((1, 28, 28), 1.0))
    assert np.array_equal(q.box, p.box)


def test_the_clean_view_of_variable_size_images_needs_the_output_size():
    images = [torch.zeros(1, 20, 36, dtype=torch.uint8), torch.zeros(1, 36, 20, dtype=torch.uint8)]
    shard = _Shard(images, 0, [1, 2])
    variable = ShardRenderer(ViewRecipe(), 2, 2, (0.5,), (0.5,), variable_size=True)
    with pytest.raises(ValueError, match=r"^the clean view of variable-size images needs out_size \(evaluation crops"
                                         r" to it\)$"):
        variable.params(CLEAN_VIEW, shard, np.arange(2))
    assert variable.params(0, shard, np.arange(2)).box.shape == (2, 4)  # a training view does not
    fixed = ShardRenderer(ViewRecipe(), 2, 2, (0.5,), (0.5,), variable_size=False)
    assert np.array_equal(fixed.params(CLEAN_VIEW, shard, np.arange(2)).box, np.tile([0.0, 0.0, 1.0, 1.0], (2, 1)))


def test_flips_of_any_zero_one_type_give_the_same_pixels():
    images = list(_images(4, 1, 9, 13, seed=14))
    box = torch.tensor([[0.1, 0.2, 0.6, 0.5]] * 4)
    flip = torch.tensor([True, False, False, True])
    want = render_each(images, box, flip, 10, (0.5,), (0.5,))
    for other in (flip.to(torch.float64), flip.to(torch.uint8)):
        assert torch.equal(render_each(images, box, other, 10, (0.5,), (0.5,)), want)
        assert torch.equal(render(torch.stack(images), box, other, 10, (0.5,), (0.5,)),
                           render(torch.stack(images), box, flip, 10, (0.5,), (0.5,)))


def test_renderers_return_tensors_on_the_requested_device():
    """Rendering happens where the tensors are asked for (a GPU in training; the meta device here, which
    checks the placement of every intermediate without a GPU)."""
    meta = torch.device("meta")
    recipe = ViewRecipe(seed=1, mixup=1.0)
    renderer = ViewRenderer(recipe, _images(4, 1, 6, 6), torch.arange(4), 4, (0.5,), (0.5,))
    for view in (CLEAN_VIEW, 0):
        x, p = renderer.render(view, np.arange(4), 8, device=meta)
        assert x.device == meta and x.shape == (4, 1, 8, 8)
    assert np.all(p.partner >= 0)
    shard = _Shard(_images(2, 1, 6, 9), 0, [1, 2])
    bound = ShardRenderer(ViewRecipe(mixup=1.0), 2, 2, (0.5,), (0.5,), variable_size=False).bind(shard)
    x, _ = bound.render(0, np.arange(2), 8, device=meta)
    assert x.device == meta and x.shape == (2, 1, 8, 8)
