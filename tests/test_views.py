"""Counter-based views: determinism, independence from batch composition, the mixup partner rules, and the
equivalence of a shard-local renderer (the cache builder's) with the whole-split one (the student's).

The end-to-end proof on a real store (the student's tensors in ``fit`` are the teacher's, bit for bit) is in
``tests/test_store.py::test_fit_replays_the_exact_views_the_teacher_saw``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kdbench.config import ViewRecipe
from kdbench.data.views import ViewRenderer, counter_uniform, crop_params, render, view_params

N, SHARD = 1000, 128  # 8 shards, the last one short (104 rows)
MEAN, STD = (0.3,), (0.25,)
RECIPE = ViewRecipe(count=4, seed=11, scale=(0.3, 1.0), ratio=(0.75, 1.3333333), flip=True, mixup=0.5)



@pytest.fixture(scope="module")
def split():
    """``uint8 [N, 1, 28, 28]`` images with non-contiguous stable keys."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, 1, 28, 28), dtype=torch.uint8, generator=g)
    ids = torch.from_numpy(np.sort(np.random.default_rng(0).choice(60_000, N, replace=False)))
    return images, ids


def _params(ids: np.ndarray, view: int, recipe: ViewRecipe = RECIPE, positions: np.ndarray | None = None):
    positions = np.arange(len(ids)) if positions is None else positions
    return view_params(recipe, ids[positions], positions, view, SHARD, len(ids))


def _same(a, b) -> bool:
    return all(np.array_equal(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))


def test_counter_uniform_is_deterministic_keyed_and_uniform():
    ids = np.arange(50_000)
    u = counter_uniform(3, ids, 2, 5)
    assert u.dtype == np.float64 and u.shape == ids.shape
    assert np.array_equal(u, counter_uniform(3, ids, 2, 5))
    assert 0.0 <= u.min() and u.max() < 1.0
    # A pure function of (seed, id, view, stream): the order or company of the ids does not matter.
    perm = np.random.default_rng(1).permutation(ids)
    assert np.array_equal(counter_uniform(3, perm, 2, 5), u[perm])
    assert np.array_equal(counter_uniform(3, ids[7:8], 2, 5), u[7:8])
    for other in (counter_uniform(4, ids, 2, 5), counter_uniform(3, ids, 3, 5), counter_uniform(3, ids, 2, 6)):
        assert np.abs(np.corrcoef(u, other)[0, 1]) < 0.02
    hist = np.histogram(u, bins=10, range=(0, 1))[0]
    assert np.all(np.abs(hist - 5000) < 5 * np.sqrt(5000))  # ~5 sigma: uniform


def test_view_params_do_not_depend_on_batch_composition(split):
    ids = split[1].numpy()
    rng = np.random.default_rng(2)
    for view in range(RECIPE.count):
        whole = _params(ids, view)
        for _ in range(3):
            rows = rng.choice(N, 77, replace=False)  # unsorted, like any batch
            part = _params(ids, view, positions=rows)
            assert _same(part, dataclasses.replace(
                whole, box=whole.box[rows], flip=whole.flip[rows], partner=whole.partner[rows], lam=whole.lam[rows]))
        again = _params(ids, view)
        assert _same(whole, again)
    assert not np.array_equal(_params(ids, 0).box, _params(ids, 1).box)


def test_mixup_partner_is_in_the_same_shard_and_never_the_sample(split):
    ids = split[1].numpy()
    rows = np.arange(N)
    mixed_total = 0
    for view in range(RECIPE.count):
        p = _params(ids, view)
        mixed = p.partner >= 0
        mixed_total += mixed.sum()
        assert np.all(p.partner[mixed] // SHARD == rows[mixed] // SHARD)
        assert np.all(p.partner[mixed] != rows[mixed])
        assert np.all(p.partner[mixed] < N)
        assert np.all((p.lam[mixed] >= 0.5) & (p.lam[mixed] <= 1.0))
        assert np.all(p.lam[~mixed] == 1.0) and np.all(p.partner[~mixed] == -1)
        # Partners are spread over the shard, not stuck to neighbours.
        assert len(np.unique(p.partner[mixed] - rows[mixed])) > 50
    assert abs(mixed_total / (N * RECIPE.count) - RECIPE.mixup) < 0.05


def test_a_shard_of_one_sample_is_never_mixed():
    ids = np.arange(2 * SHARD + 1)  # the last shard holds one row
    p = view_params(RECIPE, ids, np.arange(len(ids)), 0, SHARD, len(ids))
    assert p.partner[-1] == -1 and p.lam[-1] == 1.0


def test_no_mixup_recipe_never_mixes(split):
    p = _params(split[1].numpy(), 0, dataclasses.replace(RECIPE, mixup=0.0))
    assert np.all(p.partner == -1) and np.all(p.lam == 1.0)


def test_crop_box_lies_in_the_unit_square_with_the_recipes_area(split):
    ids = split[1].numpy()
    for view in range(RECIPE.count):
        box, flip = crop_params(RECIPE, ids, view)
        top, left, h, w = box.T.astype(np.float64)
        assert box.dtype == np.float32 and flip.dtype == bool
        assert np.all(top >= 0) and np.all(left >= 0) and np.all(h > 0) and np.all(w > 0)
        assert np.all(top + h <= 1 + 1e-6) and np.all(left + w <= 1 + 1e-6)
        area = h * w
        assert np.all(area <= RECIPE.scale[1] + 1e-6)
        unclipped = (h < 1) & (w < 1)
        assert np.all(area[unclipped] >= RECIPE.scale[0] - 1e-6)
        assert 0.4 < flip.mean() < 0.6


def test_render_does_not_depend_on_batch_composition(split):
    images, ids = split
    r = ViewRenderer(RECIPE, images, ids, SHARD, MEAN, STD)
    rows = np.arange(0, N, 3)
    for view in range(2):
        whole, _ = r.render(view, rows, 28)
        for i in (0, 5, len(rows) - 1):
            one, _ = r.render(view, rows[i : i + 1], 28)
            assert torch.equal(one[0], whole[i])
        sub = np.sort(np.random.default_rng(view).choice(len(rows), 64, replace=False))
        part, _ = r.render(view, rows[sub], 28)
        assert torch.equal(part, whole[sub])


def test_mixed_view_blends_the_partners_own_view(split):
    images, ids = split
    r = ViewRenderer(RECIPE, images, ids, SHARD, MEAN, STD)
    view = 1
    x, p = r.render(view, np.arange(SHARD), 28)
    i = int(np.flatnonzero(p.partner >= 0)[0])
    j = int(p.partner[i])
    own = render(images[i : i + 1], torch.from_numpy(p.box[i : i + 1]), torch.from_numpy(p.flip[i : i + 1]), 28, MEAN, STD)
    pbox, pflip = crop_params(RECIPE, ids.numpy()[[j]], view)  # the partner's view `view`, not its row's params
    other = render(images[j : j + 1], torch.from_numpy(pbox), torch.from_numpy(pflip), 28, MEAN, STD)
    lam = float(p.lam[i])
    assert torch.equal(x[i], (lam * own + (1 - lam) * other)[0])
    unmixed = int(np.flatnonzero(p.partner < 0)[0])
    assert torch.equal(x[unmixed], render(images[[unmixed]], torch.from_numpy(p.box[[unmixed]]),
                                          torch.from_numpy(p.flip[[unmixed]]), 28, MEAN, STD)[0])


def test_shard_local_renderer_gives_the_whole_splits_views(split):
    """The cache builder renders one shard with shard-local rows; the student renders rows of the whole split."""
    images, ids = split
    whole = ViewRenderer(RECIPE, images, ids, SHARD, MEAN, STD)
    for shard in (2, N // SHARD):  # a full shard and the short last one
        lo, hi = shard * SHARD, min(N, (shard + 1) * SHARD)
        local = ViewRenderer(RECIPE, images[lo:hi], ids[lo:hi], SHARD, MEAN, STD)
        for view in range(RECIPE.count):
            xl, pl = local.render(view, np.arange(hi - lo), 28)
            xg, pg = whole.render(view, np.arange(lo, hi), 28)
            assert torch.equal(xl, xg)
            assert np.array_equal(np.where(pl.partner >= 0, pl.partner + lo, -1), pg.partner)
            assert np.array_equal(pl.box, pg.box) and np.array_equal(pl.flip, pg.flip)
            assert np.array_equal(pl.lam, pg.lam)


def test_pad_views_are_whole_pixel_shifts_with_zero_fill():
    """``views.pad`` reproduces RandomCrop(size, padding=pad) exactly: a zero-padded image cropped back."""
    import torch

    from kdbench.config import ViewRecipe

    imgs = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    renderer = ViewRenderer(ViewRecipe(pad=4), imgs, torch.arange(16), 16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    x, p = renderer.render(3, np.arange(16), 32)
    shifts = np.rint(p.box[:, :2] * 32).astype(int)
    assert np.abs(shifts).max() <= 4 and len({tuple(s) for s in shifts}) > 1
    assert np.all(p.box[:, 2:] == 1.0)
    for i, (dy, dx) in enumerate(shifts):
        padded = torch.zeros(3, 40, 40)
        padded[:, 4:36, 4:36] = imgs[i].float() / 255
        want = padded[:, 4 + dy : 36 + dy, 4 + dx : 36 + dx]
        if p.flip[i]:
            want = want.flip(-1)
        assert torch.allclose(x[i], want, atol=1e-6)
