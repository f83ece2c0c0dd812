"""The streaming path (:mod:`kdbench.data.stream`): data read shard by shard, never a split in memory.

* Consistency: on variable-size, non-square grey and RGB images, the tensor a student gets in ``fit`` for
  (sample, view) is bit-identical to the one the teacher saw when the real cache builder built the store, with
  the same view parameters; the teacher outputs are served shard by shard (:class:`ShardedTeacherStore`).
* Determinism: two runs give identical batches and records; any worker count visits every sample once per
  epoch, in an order fixed by the worker count.
* Integrity: truncated or changed shards are errors naming the shard and the fix, never a short epoch.
* The in-memory path is untouched: ``stream: true`` on fixed-size data gives its tensors and its store.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from _helpers_store import BASE_RAW, SpyTeacher, build_store, expect_for, merge, setup_world
from _helpers_stream import write_variable_data

import kdbench.train.loop as loop_mod
from kdbench.cache.build import build_shard
from kdbench.cache.check import ROUNDOFF
from kdbench.cache.source import CachedTeacher, LiveTeacher
from kdbench.cache.store import ShardedTeacherStore, TeacherStore, read_store_manifest, read_view_params
from kdbench.config import DataConfig, ViewRecipe, parse_config
from kdbench.data.codec import decode_image
from kdbench.data.shards import load_split, read_manifest
from kdbench.data.stream import StreamedSplit, buffer_order, epoch_rows, streams
from kdbench.data.views import BoundShardRenderer, ShardRenderer, ViewRenderer, eval_box, render, render_each
from kdbench.distill import run_distill
from kdbench.errors import ConfigError, DataShardError
from kdbench.evaluate import predict
from kdbench.meta import data_info
from kdbench.methods.base import create_method
from kdbench.modeldir import load_teacher, save_model_dir
from kdbench.models import create_model, model_info
from kdbench.plan import shard_file
from kdbench.taps import compute_taps
from kdbench.train.loop import fit

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
S, N_TRAIN, SHARD = 24, 100, 40  # shards of 40, 40 and 20 (the last one short)
STREAM_RAW = merge(BASE_RAW, {
    "data": {"shard_size": SHARD, "workers": 2, "shuffle_buffer": 16},
    "protocol": {"epochs": 3, "batch_size": 32, "eval_batch_size": 16, "lr": 0.01,
                 "views": {"count": 3, "seed": 7, "mixup": 0.5}},
    "methods": {"baseline": {}, "kd": {}, "fixed_teacher": {"method": "funmatch", "teacher_view": "clean"}},
})


def _teacher_dir(out: Path, data_dir: Path, model_name: str = "cnn_s") -> Path:
    """A random-weight teacher directory, evaluated on the streamed val and test splits."""
    data = data_info(read_manifest(data_dir))
    torch.manual_seed(0)
    model = create_model(model_name, data.num_classes, data.in_chans, data.image_size)
    with torch.no_grad():
        model.get_classifier().weight.mul_(20.0)
    cfg = DataConfig(workers=0)
    test, val = StreamedSplit.open(data_dir, "test", cfg), StreamedSplit.open(data_dir, "val", cfg)
    save_model_dir(out, model, model_name, test, val, data, data.image_size, 16, CPU, {"teacher": "t"})
    return out


@pytest.fixture(scope="module", params=[1, 3], ids=["grey", "rgb"])
def world(request, tmp_path_factory):
    """Variable-size JPEG/PNG images (18-56 px a side, grey and RGB sources) decoded to ``channels`` channels,
    a cnn_s teacher, and its logits store built by the real per-shard cache jobs while recording, per (view,
    key), the input the teacher saw."""
    channels = request.param
    base = tmp_path_factory.mktemp(f"stream_c{channels}")
    data_dir = write_variable_data(base / "data", {"train": N_TRAIN, "val": 24, "test": 32}, SHARD, S, channels,
                                   seed=channels)
    cfg = parse_config(merge(STREAM_RAW, {"data": {"root": str(base)}}), source="<stream-test>")
    teacher_dir = _teacher_dir(base / "teacher", data_dir)
    seen: dict[tuple[int, int], torch.Tensor] = {}
    render_shard = BoundShardRenderer.render

    def recording(self, view, positions, out_size, device="cpu"):
        x, p = render_shard(self, view, positions, out_size, device)
        for k, pos in enumerate(positions):
            seen[(view, int(self.ids[pos]))] = x[k].clone()
        return x, p

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BoundShardRenderer, "render", recording)
        store_dir = build_store(cfg, teacher_dir, data_dir, "logits", base / "cache")
    data = data_info(read_manifest(data_dir))
    teacher, _ = load_teacher(teacher_dir, data, CPU)
    return SimpleNamespace(base=base, cfg=cfg, data_dir=data_dir, teacher_dir=teacher_dir, store_dir=store_dir,
                           data=data, seen=seen, teacher=teacher, channels=channels)


def _train(world, **over) -> StreamedSplit:
    return StreamedSplit.open(world.data_dir, "train", DataConfig(**{**vars(world.cfg.data), **over}))


def _live(world, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return compute_taps(world.teacher, x.contiguous(memory_format=torch.channels_last), {"logits"})["logits"]


def _fit(world, monkeypatch, method_name: str, source, params: dict | None = None, seed: int = 3, evals=None):
    """``fit`` of a fresh cnn_xs on the streamed training split; returns the result and the student's input of
    every step."""
    student_inputs = []

    def recording_compute_taps(model, x, taps):
        student_inputs.append(x.detach().clone())
        return compute_taps(model, x, taps)

    monkeypatch.setattr(loop_mod, "compute_taps", recording_compute_taps)
    data = world.data
    torch.manual_seed(0)
    student = create_model("cnn_xs", data.num_classes, data.in_chans, data.image_size)
    s_info = model_info(student, "cnn_xs", data.in_chans, data.image_size)
    t_info = model_info(world.teacher, "cnn_s", data.in_chans, data.image_size) if source else None
    method = create_method(method_name, params or {}, teacher=t_info, student=s_info, data=data)
    result = fit(student, method, _train(world), evals or {}, data, world.cfg.protocol, seed=seed, device=CPU,
                 teacher=source)
    return result, student_inputs


def _fp16_close(served: torch.Tensor, live: torch.Tensor) -> bool:
    return bool(torch.all((served - live).abs() <= ROUNDOFF["float16"] * live.abs() * 1.001 + 1e-5))


# --- consistency -----------------------------------------------------------------------------------------

def test_fit_streams_exactly_the_views_the_cache_was_built_from(world, monkeypatch):
    """Through ``fit`` (2 loader workers): every step's input for each row is, bit for bit, what the teacher saw
    for (key, epoch mod V) when the store was built; the served outputs are the store's for those rows and the
    live teacher's on that input up to fp16 rounding; each epoch visits every row once."""
    store = ShardedTeacherStore.open(world.store_dir, expect_for(world.cfg, world.teacher_dir, "logits"),
                                     cache_shards=2)
    spy = SpyTeacher(CachedTeacher({"logits": store}))
    _, student_inputs = _fit(world, monkeypatch, "kd", spy)
    p = world.cfg.protocol
    steps = math.ceil(N_TRAIN / p.batch_size)
    assert len(spy.calls) == len(student_inputs) == p.epochs * steps
    ids = _train(world).ids.numpy()
    reference = TeacherStore.open(world.store_dir, expect_for(world.cfg, world.teacher_dir, "logits"))
    for epoch in range(p.epochs):
        calls = spy.calls[epoch * steps : (epoch + 1) * steps]
        assert sorted(np.concatenate([rows for _, rows, _ in calls]).tolist()) == list(range(N_TRAIN))
    for step, ((view, rows, served), x) in enumerate(zip(spy.calls, student_inputs)):
        assert view == (step // steps) % p.views.count
        assert x.shape[1:] == (world.channels, S, S)
        for k, r in enumerate(rows):
            assert torch.equal(x[k], world.seen[(view, int(ids[r]))]), (step, int(r))
        assert torch.equal(served, reference.fetch(view, torch.from_numpy(rows)))
        assert _fp16_close(served, _live(world, x))
    assert store.shard_reads <= p.epochs * 3 * 2  # each (shard, view) read about once per epoch


def test_streamed_view_params_are_the_stored_ones(world):
    """The stream's crop boxes, flips, mixup partners (rows of the split, in the same shard) and weights equal
    the audit copy the cache builder stored, for every view; crops follow the recipe's pixel aspect ratio."""
    stored = read_view_params(world.store_dir, read_store_manifest(world.store_dir))
    train, recipe = _train(world), world.cfg.protocol.views
    mixed = 0
    for view in range(recipe.count):
        for b in train.train_batches(recipe, world.data.mean, world.data.std, 0, view, view, S, 32):
            r = b["rows"].numpy()
            assert np.array_equal(b["box"].numpy(), stored["box"][view, r])
            assert np.array_equal(b["flip"].numpy(), stored["flip"][view, r].astype(bool))
            assert np.array_equal(b["partner"].numpy(), stored["partner"][view, r])
            assert np.array_equal(b["lam"].numpy(), stored["lam"][view, r])
            partner = b["partner"].numpy()
            on = partner >= 0
            assert np.all(partner[on] // SHARD == r[on] // SHARD) and np.all(partner[on] != r[on])
            mixed += int(on.sum())
    assert mixed > 0
    # Pixel aspect of the crops: (box_w * w) / (box_h * h) lies in the recipe's ratio range unless clipped.
    shard = train.read(0)
    p = train.renderer(recipe, world.data.mean, world.data.std).params(0, shard, np.arange(len(shard)))
    hw = np.array([shard.hw(i) for i in range(len(shard))])
    ratio = (p.box[:, 3] * hw[:, 1]) / (p.box[:, 2] * hw[:, 0])
    free = (p.box[:, 2] < 0.999) & (p.box[:, 3] < 0.999)
    assert free.sum() > 5
    assert np.all((ratio[free] >= recipe.ratio[0] * 0.999) & (ratio[free] <= recipe.ratio[1] * 1.001))


def test_live_teacher_on_the_stream_sees_the_declared_view(world, monkeypatch):
    """A live teacher on the streaming path gets its inputs from the stream: ``same`` = the student's input,
    ``clean`` = the evaluation crop of the whole image (one output per image for the run)."""

    class LiveSpy(SpyTeacher):
        input_size = S

        def outputs(self, view, rows, device, inputs=None):
            out = self.inner.outputs(view, rows, device, inputs=inputs)
            self.calls.append((view, rows.copy(), out["logits"].clone(), inputs))
            return out

    live = LiveSpy(LiveTeacher(world.teacher, frozenset({"logits"}), None, S))
    _, student_inputs = _fit(world, monkeypatch, "funmatch", live, {"teacher_view": "same"})
    for (view, rows, served, inputs), x in zip(live.calls, student_inputs):
        assert torch.equal(inputs, x) and torch.allclose(served, _live(world, x), atol=1e-5)
    live = LiveSpy(LiveTeacher(world.teacher, frozenset({"logits"}), None, S))
    _fit(world, monkeypatch, "funmatch", live, {"teacher_view": "clean"})
    per_image: dict[int, torch.Tensor] = {}
    for view, rows, _, inputs in live.calls:
        assert view == -1
        for k, r in enumerate(rows):
            assert torch.equal(inputs[k], per_image.setdefault(int(r), inputs[k]))
    assert len(per_image) == N_TRAIN


def test_evaluation_streams_the_centre_crop_in_order(world):
    """``predict`` on a streamed split (2 workers, batches that straddle shards) = the model on every image in
    split order, each rendered alone from its shorter-side-resize + centre-crop box."""
    split = StreamedSplit.open(world.data_dir, "test", world.cfg.data)
    got = predict(world.teacher, split, world.data, S, 7, CPU)
    manifest = read_manifest(world.data_dir)
    xs = []
    for entry in manifest["splits"]["test"]["shards"]:
        with tarfile.open(world.data_dir / entry["file"]) as tar:
            for m in tar:
                ext = m.name.split(".", 1)[1]
                if ext != "cls":
                    img = torch.from_numpy(decode_image(tar.extractfile(m).read(), ext, world.channels).copy())
                    box = torch.from_numpy(eval_box(np.array([img.shape[1:]]), S))
                    xs.append(render(img[None], box, None, S, world.data.mean, world.data.std))
    assert len(xs) == len(split) == len(split.labels)
    assert torch.allclose(got, _live(world, torch.cat(xs)), atol=1e-5)


@pytest.mark.parametrize("channels, out_size", [(1, 24), (3, 112), (3, 224)])
def test_render_each_renders_each_image_as_render_does(channels, out_size):
    """Images of different sizes rendered together (one separable grid, one ``grid_sample`` each) are, bit for
    bit, each image rendered alone by :func:`render` (``F.affine_grid``'s grid)."""
    g = torch.Generator().manual_seed(out_size)
    sizes = torch.randint(12, 300, (20, 2), generator=g)
    images = [torch.randint(0, 256, (channels, int(h), int(w)), dtype=torch.uint8, generator=g) for h, w in sizes]
    box = torch.rand(20, 4, generator=g) * 0.5
    box[:, 2:] += 0.3
    flip = torch.rand(20, generator=g) < 0.5
    mean, std = (0.5, 0.4, 0.3)[:channels], (0.2, 0.25, 0.3)[:channels]
    together = render_each(images, box, flip, out_size, mean, std)
    alone = torch.cat([render(im[None], box[k : k + 1], flip[k : k + 1], out_size, mean, std)
                       for k, im in enumerate(images)])
    assert torch.equal(together, alone)


def test_eval_box_is_torchvisions_resize_and_centre_crop():
    """Resize(256) + CenterCrop(224) of a 375 x 500 image keeps rows 0.875 of the height and 224 / 341.3 of
    the width, centred; a square image keeps the centre 0.875."""
    box = eval_box(np.array([[375, 500], [100, 100]]), 224)
    np.testing.assert_allclose(box[0], [0.0625, (1 - 224 / (500 * 256 / 375)) / 2, 0.875, 224 / (500 * 256 / 375)],
                               rtol=1e-6)
    np.testing.assert_allclose(box[1], [0.0625, 0.0625, 0.875, 0.875], rtol=1e-6)


# --- determinism ------------------------------------------------------------------------------------------

def _epoch(split: StreamedSplit, world, epoch: int, seed: int = 0) -> list[dict]:
    recipe = world.cfg.protocol.views
    return list(split.train_batches(recipe, world.data.mean, world.data.std, seed, epoch, epoch % recipe.count, S, 32))


def test_two_runs_give_identical_batches_and_records(world, monkeypatch):
    """Same seed: identical batches (rows, inputs, targets) and identical per-epoch records of ``fit``."""
    a, b = _epoch(_train(world), world, 1), _epoch(_train(world), world, 1)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    evals = {"val": StreamedSplit.open(world.data_dir, "val", world.cfg.data)}
    first, _ = _fit(world, monkeypatch, "baseline", None, evals=evals)
    second, _ = _fit(world, monkeypatch, "baseline", None, evals=evals)
    strip = lambda h: [{k: v for k, v in row.items() if k not in ("time_s", "samples_per_s")} for row in h]
    assert strip(first.history) == strip(second.history)


def test_any_worker_count_visits_every_sample_once_in_a_fixed_order(world):
    """workers 0, 1 and 2: every row once per epoch, ceil(N / B) batches with only the last one short; 0 and 1
    give the same order, 2 another one, the same on every run; another epoch, another order."""
    orders = {}
    for workers in (0, 1, 2, 2):
        batches = _epoch(_train(world, workers=workers), world, 0)
        sizes = [len(b["rows"]) for b in batches]
        assert sizes == [32, 32, 32, 4]
        rows = torch.cat([b["rows"] for b in batches]).numpy()
        assert sorted(rows.tolist()) == list(range(N_TRAIN))
        planned = epoch_rows(_train(world, workers=workers), 0, 0, 32)  # the same order, from the manifest alone
        assert all(np.array_equal(b["rows"].numpy(), r) for b, r in zip(batches, planned, strict=True))
        orders.setdefault(workers, rows)
        assert np.array_equal(orders[workers], rows)
    assert np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[0], orders[2])
    other = torch.cat([b["rows"] for b in _epoch(_train(world, workers=2), world, 1)]).numpy()
    assert not np.array_equal(other, orders[2])


def test_buffer_order_is_a_permutation_bounded_by_the_buffer():
    rng = np.random.default_rng(0)
    for n, buf in [(50, 8), (50, 50), (50, 1000), (7, 1)]:
        order = buffer_order(n, buf, np.random.default_rng(1))
        assert sorted(order.tolist()) == list(range(n))
        # An item leaves the buffer at most ``buf - 1`` items before it was read.
        assert np.all(order[: max(0, n - buf)] <= np.arange(max(0, n - buf)) + buf - 1 + 1)
    assert np.array_equal(buffer_order(7, 1, rng), np.arange(7))


# --- integrity --------------------------------------------------------------------------------------------

def _copy_data(world, tmp_path) -> Path:
    return Path(shutil.copytree(world.data_dir, tmp_path / "data"))


def _member_offset(path: Path, index: int) -> int:
    """Byte offset of the header of the ``index``-th member of a tar file."""
    with tarfile.open(path) as tar:
        return tar.getmembers()[index].offset


@pytest.mark.parametrize("verify", [True, False])
def test_a_shard_cut_at_a_member_boundary_is_an_error_not_a_short_epoch(world, tmp_path, verify):
    """A tar cut between two samples reads as a valid, shorter archive (webdataset yields fewer samples); the
    stream refuses it: the checksum (verify) or the sample count against the manifest."""
    data_dir = _copy_data(world, tmp_path)
    path = data_dir / "train-00001.tar"
    with open(path, "r+b") as f:
        f.truncate(_member_offset(path, 2 * 39))  # the last sample (2 members) and the end blocks cut off
    split = StreamedSplit.open(data_dir, "train", DataConfig(workers=0), verify=verify)
    match = "does not match its checksum" if verify else "holds 39 samples, the manifest says 40"
    with pytest.raises(DataShardError, match=match) as err:
        _epoch(split, world, 0)
    assert str(path) in str(err.value) and f"Fix: delete {data_dir}" in str(err.value)
    assert str(err.value).startswith("data shard")  # its own message, not a DataLoader worker's traceback
    with pytest.raises(DataShardError, match="holds 39 samples, the manifest says 40"):
        split.labels  # noqa: B018


def test_a_shard_cut_inside_a_member_or_changed_is_an_error(world, tmp_path):
    data_dir = _copy_data(world, tmp_path)
    path = data_dir / "train-00002.tar"
    with open(path, "r+b") as f:
        f.truncate(_member_offset(path, 7) + 700)  # inside a member's data
    for verify in (True, False):
        with pytest.raises(DataShardError, match="train-00002.tar") as err:
            _epoch(StreamedSplit.open(data_dir, "train", DataConfig(workers=2), verify=verify), world, 0)
        assert "Fix: delete" in str(err.value) and str(err.value).startswith("data shard")
    evals = StreamedSplit.open(data_dir, "test", DataConfig(workers=0))
    test0 = data_dir / "test-00000.tar"
    data = bytearray(test0.read_bytes())
    data[_member_offset(test0, 3) + 512 + 40] ^= 0xFF  # inside the second sample's image
    test0.write_bytes(bytes(data))
    with pytest.raises(DataShardError, match="test-00000.tar does not match its checksum"):
        predict(world.teacher, evals, world.data, S, 16, CPU)


def test_stream_keys_are_checked(world):
    with pytest.raises(ConfigError, match="data.stream"):
        parse_config(merge(STREAM_RAW, {"data": {"stream": "maybe"}}), source="<t>")
    with pytest.raises(ConfigError, match="data.workers"):
        parse_config(merge(STREAM_RAW, {"data": {"workers": -1}}), source="<t>")
    manifest = read_manifest(world.data_dir)
    with pytest.raises(ConfigError, match="'data.stream' is false.*Fix: set 'data.stream' to auto or true"):
        streams(DataConfig(stream=False), manifest, world.data_dir)
    assert streams(DataConfig(), manifest, world.data_dir)
    assert not streams(DataConfig(), {**manifest, "native_size": [S, S]}, world.data_dir)
    assert streams(DataConfig(stream=True), {**manifest, "native_size": [S, S]}, world.data_dir)


# --- the teacher-output store, shard by shard ---------------------------------------------------------------

def test_sharded_store_serves_what_the_loaded_store_serves(world):
    """Rows from any shards, in any order, with a one-entry cache: the same outputs and bytes as the store
    loaded whole; only a few (shard, view) slices in memory at a time."""
    expect = expect_for(world.cfg, world.teacher_dir, "logits")
    whole = TeacherStore.open(world.store_dir, expect)
    lazy = ShardedTeacherStore.open(world.store_dir, expect, cache_shards=1)
    rng = np.random.default_rng(0)
    for _ in range(12):
        rows = torch.from_numpy(rng.choice(N_TRAIN, 17, replace=False))
        view = int(rng.integers(3))
        assert torch.equal(lazy.fetch(view, rows), whole.fetch(view, rows))
    assert lazy.bytes_read == whole.bytes_read and len(lazy._cache) == 1
    with pytest.raises(IndexError):
        lazy.fetch(3, torch.arange(2))


# --- end to end -------------------------------------------------------------------------------------------

def test_distill_jobs_stream_variable_size_data(world):
    """The distill job on variable-size data streams (stream: auto): ``kd`` reads the store shard by shard,
    ``fixed_teacher`` runs the teacher live on the stream's clean views; both write complete records."""
    stores = {"logits": world.store_dir}
    runs = world.base / "runs"
    kd = run_distill(world.cfg, "t", "cnn_xs", "kd", 0, world.data_dir, world.teacher_dir, stores, runs / "kd")
    fixed = run_distill(world.cfg, "t", "cnn_xs", "fixed_teacher", 0, world.data_dir, world.teacher_dir, stores,
                        runs / "fixed")
    assert kd.status == fixed.status == "ok"
    assert kd.cost.teacher_forward == 0 and kd.cost.cache_bytes_read > 0
    assert fixed.cost.teacher_forward == world.cfg.protocol.epochs * N_TRAIN and fixed.cost.cache_bytes_read == 0
    assert kd.cost.student_forward == world.cfg.protocol.epochs * N_TRAIN
    assert 0 <= kd.final.test_top1 <= 100


def test_a_teacher_trains_on_streamed_data(world, tmp_path):
    """``kdbench train-teacher`` on variable-size data: ``fit`` on the stream (a fresh view per epoch), evaluated
    on the streamed val and test splits."""
    from kdbench.teacher import train_teacher

    over = {"data": {"root": str(world.base)}, "teachers": {"t": {"model": "cnn_xs", "train": {"epochs": 2}}}}
    cfg = parse_config(merge(STREAM_RAW, over), source="<t>")
    metrics = train_teacher(cfg, "t", world.data_dir, tmp_path / "teacher")
    assert metrics["source"] == "trained" and 0 <= metrics["test_top1"] <= 100
    assert (tmp_path / "teacher" / "epochs.jsonl").read_text().count("\n") == 2


# --- the in-memory path is the reference on fixed-size data --------------------------------------------------

@pytest.fixture(scope="module")
def fixed_world(tmp_path_factory):
    base = tmp_path_factory.mktemp("stream_fixed")
    over = {"root": str(base / "raw"), "stream": True, "workers": 2, "shuffle_buffer": 8}
    cfg, _, data_dir, teacher_dir = setup_world(base, data=merge(BASE_RAW["data"], over))
    return SimpleNamespace(base=base, cfg=cfg, data_dir=data_dir, teacher_dir=teacher_dir,
                           data=data_info(read_manifest(data_dir)))


def test_stream_true_on_fixed_size_data_renders_the_in_memory_tensors(fixed_world):
    """``stream: true`` on Fashion-MNIST-format data: every streamed training batch and every evaluation batch
    is, bit for bit, what the in-memory renderer gives for the same rows."""
    w = fixed_world
    recipe = w.cfg.protocol.views
    train = load_split(w.data_dir, "train")
    renderer = ViewRenderer.for_split(recipe, train, w.data)
    streamed = StreamedSplit.open(w.data_dir, "train", w.cfg.data)
    assert torch.equal(streamed.labels, train.labels) and torch.equal(streamed.ids, train.ids)
    for epoch in range(recipe.count):
        for b in streamed.train_batches(recipe, w.data.mean, w.data.std, 0, epoch, epoch, 28, 32):
            rows = b["rows"].numpy()
            x, p = renderer.render(epoch, rows, 28)
            assert torch.equal(b["x"], x) and np.array_equal(b["partner"].numpy(), p.partner)
            assert torch.equal(b["labels"], train.labels[rows])
    test = load_split(w.data_dir, "test")
    streamed_test = StreamedSplit.open(w.data_dir, "test", w.cfg.data)
    got = torch.cat(list(streamed_test.eval_inputs(w.data.mean, w.data.std, 28, 16)))
    assert torch.equal(got, render(test.images, None, None, 28, w.data.mean, w.data.std))


class _InMemoryShard:
    """:class:`~kdbench.data.views.ShardImages` over images in memory (rows ``first …`` of a split)."""

    def __init__(self, images: torch.Tensor, ids: np.ndarray, first: int) -> None:
        self.images, self.ids, self.first = images, ids, first

    def image(self, i: int) -> torch.Tensor:
        return self.images[i]

    def hw(self, i: int) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])


@pytest.mark.parametrize("recipe", [
    ViewRecipe(count=2, seed=3, mixup=0.5), ViewRecipe(count=2, seed=3, pad=4, mixup=0.5),
    ViewRecipe(count=2, seed=3, scale=(0.2, 0.6), ratio=(0.5, 2.0), flip=False),
], ids=["crop-mixup", "pad-mixup", "crop"])
@pytest.mark.parametrize("out_size", [28, 36])
def test_shard_renderer_gives_the_view_renderers_tensors_on_fixed_size_images(recipe, out_size):
    """Every view (and the clean view, at the native and another size) of every row: the shard-by-shard
    renderer gives the in-memory renderer's tensors and parameters, bit for bit."""
    g = torch.Generator().manual_seed(0)
    n, shard_size = 70, 32
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    ids = np.sort(np.random.default_rng(0).choice(10_000, n, replace=False))
    whole = ViewRenderer(recipe, images, torch.from_numpy(ids), shard_size, (0.3,), (0.25,))
    by_shard = ShardRenderer(recipe, shard_size, n, (0.3,), (0.25,), variable_size=False)
    for view in (-1, 0, 1):
        for first in range(0, n, shard_size):
            shard = _InMemoryShard(images[first : first + shard_size], ids[first : first + shard_size], first)
            idx = np.random.default_rng(view + 1).permutation(len(shard.ids))[:20]
            x, p = by_shard.render(view, shard, idx, out_size)
            x_ref, p_ref = whole.render(view, first + idx, out_size)
            assert torch.equal(x, x_ref), (view, first)
            assert all(np.array_equal(getattr(p, f), getattr(p_ref, f)) for f in ("box", "flip", "partner", "lam"))


def test_stream_true_on_fixed_size_data_builds_the_in_memory_store(fixed_world, tmp_path):
    """The cache builder on streamed fixed-size data writes the same arrays as on data loaded into memory."""
    w = fixed_world
    in_memory = parse_config(merge(BASE_RAW, {"data": {"root": w.cfg.data.root, "stream": False}}), source="<t>")
    for cfg, name in ((w.cfg, "streamed"), (in_memory, "loaded")):
        build_shard(cfg, w.teacher_dir, w.data_dir, "logits", 2, tmp_path / name / shard_file(2))
    with h5py.File(tmp_path / "streamed" / shard_file(2)) as a, h5py.File(tmp_path / "loaded" / shard_file(2)) as b:
        assert sorted(a) == sorted(b)
        for k in a:
            assert np.array_equal(a[k][()], b[k][()]), k


# --- memory ---------------------------------------------------------------------------------------------------

_RSS_JOB = textwrap.dedent("""
    import resource, sys, torch
    from kdbench.cache.source import CachedTeacher
    from kdbench.cache.store import ShardedTeacherStore, store_identity
    from kdbench.config import CachePolicy, DataConfig, Protocol, ViewRecipe
    from kdbench.data.shards import read_manifest
    from kdbench.data.stream import StreamedSplit
    from kdbench.meta import data_info
    from kdbench.methods.base import create_method
    from kdbench.models import create_model, model_info
    from kdbench.train.loop import fit
    torch.set_num_threads(1)
    data_dir, store_dir = sys.argv[1], sys.argv[2]
    data = data_info(read_manifest(data_dir))
    train = StreamedSplit.open(data_dir, "train", DataConfig(workers=0, shuffle_buffer=1000))
    recipe = ViewRecipe(count=1)
    store = ShardedTeacherStore.open(store_dir, store_identity("synthetic", "logits", recipe, CachePolicy(), 28))
    torch.manual_seed(0)
    student = create_model("cnn_xs", data.num_classes, data.in_chans, data.image_size)
    info = model_info(student, "cnn_xs", data.in_chans, data.image_size)
    method = create_method("kd", {}, teacher=info, student=info, data=data)
    protocol = Protocol(epochs=1, batch_size=256, views=recipe)
    fit(student, method, train, {}, data, protocol, seed=0, device=torch.device("cpu"),
        teacher=CachedTeacher({"logits": store}))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_dataset(tmp_path):
    """Peak RSS of a streamed KD epoch with cached logits (workers 0: one process; a store of N logits read
    shard by shard) at N = 5,000 and 10 N images of 32-96 px: the ratio stays <= 1.2 (the in-memory path
    would hold 10x the images and the whole store)."""
    from _helpers_store import synthetic_store

    from kdbench.config import CachePolicy

    peaks = {}
    for n in (5_000, 50_000):
        data_dir = write_variable_data(tmp_path / f"d{n}", {"train": n}, 2_000, 32, 3, sizes=(32, 96), exts=("jpg",))
        store_dir = tmp_path / f"s{n}"
        synthetic_store(store_dir, torch.randn(1, n, 5), CachePolicy(), shard_size=2_000)
        out = subprocess.run([sys.executable, "-c", _RSS_JOB, str(data_dir), str(store_dir)], capture_output=True,
                             text=True, check=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        peaks[n] = int(out.stdout.split()[-1])
        shutil.rmtree(data_dir)
        shutil.rmtree(store_dir)
    ratio = peaks[50_000] / peaks[5_000]
    print(f"peak RSS: {peaks[5_000] / 1024:.0f} MiB at N=5,000, {peaks[50_000] / 1024:.0f} MiB at N=50,000 "
          f"(ratio {ratio:.3f})")
    assert ratio <= 1.2


def test_check_cache_on_streamed_data(world):
    """``kdbench check-cache``'s fidelity check on a store of variable-size data: the sampled views are
    re-rendered shard by shard, their parameters equal the stored ones, the live teacher agrees."""
    from kdbench.cache.check import check_store

    report = check_store(world.cfg, world.store_dir, world.teacher_dir, world.data_dir, samples=60)
    assert report.ok and report.samples == 60 and report.param_mismatches == 0


def test_reading_keys_name_the_trained_teacher_not_the_data(tmp_path):
    """``data.workers`` / ``shuffle_buffer`` / ``stream`` change the streamed order a teacher trains in: they
    name the teacher (and the runs), not the data directory; their defaults change no key."""
    from _helpers_store import tiny_raw, write_config, write_fmnist_idx

    from kdbench.plan import Plan

    path = write_config(tmp_path / "grid.yaml", tiny_raw(write_fmnist_idx(tmp_path / "raw")))
    base = Plan.resolve([path], {})
    for key, value in (("data.workers", 4), ("data.shuffle_buffer", 10), ("data.stream", True)):
        other = Plan.resolve([path], {key: value})
        assert set(other.data) == set(base.data) and set(other.teachers) != set(base.teachers), key
    spelled_out = Plan.resolve([path], {"data.workers": 2, "data.shuffle_buffer": 1000, "data.stream": "auto"})
    assert set(spelled_out.teachers) == set(base.teachers) and set(spelled_out.stores) == set(base.stores)
