"""The teacher-output store on a real (tiny) dataset, teacher and cache build.

* Consistency: the tensor the student gets in ``fit`` for (sample, epoch) is bit-identical to the one the
  teacher saw when the store was built, and the stored logits are the teacher's on it up to fp16 rounding.
* Taps and policies: logits fp16/fp32, top-k, pre_logits, feature maps whole / pooled / bf16.
* Integrity: ``kdbench check-cache``, corrupt / truncated / stale / foreign stores, a killed writer.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers_store import (
    SpyTeacher,
    build_store,
    expect_for,
    flip_byte,
    make_teacher_dir,
    setup_world,
    synthetic_store,
    tiny_config,
)

import kdbench.cache.build as build_mod
import kdbench.cache.inputs as inputs_mod
import kdbench.train.loop as loop_mod
from kdbench.cache.build import build_shard, finalize_store
from kdbench.cache.check import ROUNDOFF, check_store
from kdbench.cache.source import CachedTeacher
from kdbench._util import sha256_file, stable_hash, write_json_atomic
from kdbench.cache.store import (
    IDENTITY_KEYS,
    VIEW_PARAM_FIELDS,
    ShardedTeacherStore,
    StoreError,
    TeacherStore,
    bytes_per_view,
    encode_tap,
    identity_attrs,
    read_store_manifest,
    read_view_params,
    reconstruct_topk,
    record_bytes,
    write_manifest,
    write_shard,
)
from kdbench.cli import main as cli_main
from kdbench.config import CachePolicy, ViewRecipe
from kdbench.data.shards import load_split, read_manifest
from kdbench.data.views import ViewRenderer, view_params
from kdbench.meta import data_info
from kdbench.methods.base import create_method
from kdbench.modeldir import load_teacher
from kdbench.models import create_model, model_info
from kdbench.plan import shard_file
from kdbench.taps import compute_taps
from kdbench.train.loop import fit

_logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]



class BuildRecorder:
    """Records, per (view, sample key), the input tensor and the fp32 logits the teacher produced while the
    real :func:`build_shard` ran (it patches the builder's renderer class and ``compute_taps``)."""

    def __init__(self) -> None:
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}
        self.logits: dict[tuple[int, int], torch.Tensor] = {}
        self._last: tuple[int, np.ndarray] | None = None

    def renderer_class(self) -> type:
        rec = self

        class RecordingRenderer(ViewRenderer):
            def render(self, view, positions, out_size, device="cpu"):
                x, p = super().render(view, positions, out_size, device)
                rec._last = (view, self.ids[np.asarray(positions)])
                for k, sid in enumerate(rec._last[1]):
                    rec.inputs[(view, int(sid))] = x[k].clone()
                return x, p

        return RecordingRenderer

    def compute_taps(self, model, x, taps):
        out = compute_taps(model, x, taps)
        view, sids = self._last
        for k, sid in enumerate(sids):
            self.logits[(view, int(sid))] = out["logits"][k].float().clone()
        return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny data (100 training images in shards of 40/40/20, 3 views, mixup 0.5), a cnn_s teacher, and its
    logits store built by the real per-shard jobs while recording what the teacher saw."""
    base = tmp_path_factory.mktemp("store")
    cfg, cfg_path, data_dir, teacher_dir = setup_world(base)
    rec = BuildRecorder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inputs_mod, "ViewRenderer", rec.renderer_class())
        mp.setattr(build_mod, "compute_taps", rec.compute_taps)
        store = build_store(cfg, teacher_dir, data_dir, "logits", base / "cache")
    return {"base": base, "cfg": cfg, "cfg_path": cfg_path, "data": data_dir, "teacher": teacher_dir,
            "store": store, "rec": rec, "raw_root": Path(cfg.data.root)}


@pytest.fixture()
def store_copy(world, tmp_path):
    """A private copy of the logits store, for tests that damage it."""
    return Path(shutil.copytree(world["store"], tmp_path / "logits"))


def _global_renderer(world) -> tuple[ViewRenderer, object, object]:
    data = data_info(read_manifest(world["data"]))
    train = load_split(world["data"], "train")
    return ViewRenderer.for_split(world["cfg"].protocol.views, train, data), train, data


def _check_cli(world, store: Path, *extra: str) -> list[str]:
    return ["check-cache", "--store", str(store), "--config", str(world["cfg_path"]), "--teacher-dir", str(world["teacher"]),
            "--data", str(world["data"]), *extra]


# --- consistency -----------------------------------------------------------------------------------------


def test_build_covers_every_sample_and_view_in_shards_with_a_short_last_one(world):
    manifest = TeacherStore.open(world["store"], expect_for(world["cfg"], world["teacher"], "logits")).manifest
    assert [s["count"] for s in manifest["shards"]] == [40, 40, 20]
    assert [s["first_position"] for s in manifest["shards"]] == [0, 40, 80]
    assert len(world["rec"].inputs) == 100 * 3 == len(world["rec"].logits)


def test_stored_view_params_equal_the_renderers_on_global_rows(world):
    renderer, train, _ = _global_renderer(world)
    manifest = TeacherStore.open(world["store"], expect_for(world["cfg"], world["teacher"], "logits")).manifest
    stored = read_view_params(world["store"], manifest)
    rows = np.arange(len(train))
    mixed_pairs = 0
    for v in range(3):
        p = renderer.params(v, rows)
        assert np.array_equal(stored["box"][v], p.box)
        assert np.array_equal(stored["flip"][v].astype(bool), p.flip)
        assert np.array_equal(stored["partner"][v], p.partner)
        assert np.array_equal(stored["lam"][v], p.lam)
        m = p.partner >= 0
        mixed_pairs += m.sum()
        assert np.all(p.partner[m] // 40 == rows[m] // 40) and np.all(p.partner[m] != rows[m])
        assert np.all((p.lam[m] >= 0.5) & (p.lam[m] <= 1))
    assert mixed_pairs > 100  # about half of the 300 views are mixed


def test_teacher_inputs_at_build_equal_the_global_renderers(world):
    renderer, train, _ = _global_renderer(world)
    ids = train.ids.numpy()
    for v in range(3):
        x, _ = renderer.render(v, np.arange(len(train)), 28)
        for row in range(len(train)):
            assert torch.equal(x[row], world["rec"].inputs[(v, int(ids[row]))]), (v, row)


def test_fit_replays_the_exact_views_the_teacher_saw(world, monkeypatch):
    """In ``fit``'s own path (view = epoch mod V, rows of shuffled batches, mixup partners' own view), the
    student's input for every (sample, epoch) is the teacher's input at build time, bit for bit, and the
    served logits are the build-time fp32 logits rounded to fp16, bit for bit."""
    cfg, rec = world["cfg"], world["rec"]
    _, train, data = _global_renderer(world)
    teacher, _ = load_teacher(world["teacher"], data, torch.device("cpu"))
    store = TeacherStore.open(world["store"], expect_for(cfg, world["teacher"], "logits"))
    spy = SpyTeacher(CachedTeacher({"logits": store}))
    student_inputs = []

    def recording_compute_taps(model, x, taps):
        student_inputs.append(x.detach().clone())
        return compute_taps(model, x, taps)

    monkeypatch.setattr(loop_mod, "compute_taps", recording_compute_taps)
    torch.manual_seed(0)
    student = create_model("cnn_xs", data.num_classes, data.in_chans, data.image_size)
    s_info = model_info(student, "cnn_xs", data.in_chans, data.image_size)
    t_info = model_info(teacher, "cnn_s", data.in_chans, data.image_size)
    method = create_method("kd", {}, teacher=t_info, student=s_info, data=data)
    val = load_split(world["data"], "val")
    fit(student, method, train, {"val": val}, data, cfg.protocol, seed=3, device=torch.device("cpu"), teacher=spy)

    steps = math.ceil(len(train) / cfg.protocol.batch_size)
    assert len(spy.calls) == len(student_inputs) == cfg.protocol.epochs * steps == 16
    ids = train.ids.numpy()
    for step, ((view, rows, served), x) in enumerate(zip(spy.calls, student_inputs)):
        epoch = step // steps
        assert view == epoch % 3  # epoch 3 replays view 0
        for k, row in enumerate(rows):
            key = (view, int(ids[row]))
            assert torch.equal(x[k], rec.inputs[key]), (epoch, row)
            assert torch.equal(served[k], rec.logits[key].half().float()), (epoch, row)
        with torch.inference_mode():
            live = compute_taps(teacher, x.contiguous(memory_format=torch.channels_last), {"logits"})["logits"]
        build = torch.stack([rec.logits[(view, int(ids[r]))] for r in rows])
        # Another batch composition only reorders float32 sums; fp16 storage adds at most half an ulp.
        assert torch.allclose(live, build, rtol=1e-5, atol=1e-5)
        assert torch.all((served - live).abs() <= ROUNDOFF["float16"] * live.abs() * 1.001 + 1e-5)
    seen = {(v, int(r)) for v, rows, _ in spy.calls for r in rows}
    assert len(seen) == 300  # every stored (view, sample) was replayed
    assert spy.bytes_read() == sum(len(r) for _, r, _ in spy.calls) * 10 * 2  # fp16 logits, 10 classes


# --- taps and storage policies -----------------------------------------------------------------------------


POLICIES = [
    # (tap, cache policy, expected fields: name -> (dtype, per-record shape), stored dtype for the tolerance)
    ("logits", {"logits_dtype": "float32"}, {"values": ("float32", [10])}, "float32"),
    ("logits", {"topk": 3}, {"lse": ("float32", []), "topk_indices": ("int16", [3]), "topk_values": ("float16", [3])},
     "float16"),
    ("pre_logits", {}, {"values": ("float16", [64])}, "float16"),
    ("feature[1]", {}, {"values": ("float16", [32, 14, 14])}, "float16"),
    ("feature[1]", {"feature_pool": 2}, {"values": ("float16", [32, 2, 2])}, "float16"),
    ("feature[2]", {"feature_dtype": "bfloat16"}, {"values_bf16": ("int16", [64, 7, 7])}, "bfloat16"),
    ("feature[0]", {"feature_dtype": "bfloat16", "feature_pool": 4}, {"values_bf16": ("int16", [16, 4, 4])},
     "bfloat16"),
]


@pytest.mark.parametrize("tap, policy, fields, dtype", POLICIES, ids=[f"{p[0]}-{p[1]}" for p in POLICIES])
def test_store_holds_the_tap_under_the_policy(world, tmp_path, tap, policy, fields, dtype):
    cfg = tiny_config(world["raw_root"], cache=policy)
    store_dir = build_store(cfg, world["teacher"], world["data"], tap, tmp_path)
    store = TeacherStore.open(store_dir, expect_for(cfg, world["teacher"], tap))
    m = store.manifest
    assert {k: (m["field_dtypes"][k], m["field_shapes"][k]) for k in m["fields"]} == fields
    assert m["tap"] == tap and m["policy"]["topk"] == policy.get("topk")

    # The live teacher on the student's (whole-split) views, encoded by hand, matches what is served.
    renderer, train, data = _global_renderer(world)
    teacher, _ = load_teacher(world["teacher"], data, torch.device("cpu"))
    v, rows = 2, np.arange(len(train))
    x, _ = renderer.render(v, rows, 28)
    with torch.inference_mode():
        live = compute_taps(teacher, x.contiguous(memory_format=torch.channels_last), {tap})[tap]
    full_shape = tuple(live.shape[1:])
    assert store.bytes_per_record() == record_bytes(full_shape, cfg.cache, tap)
    # The size estimate (resources, the study) is what the shards' datasets hold, per (sample, view).
    stored = 0
    for shard in m["shards"]:
        with h5py.File(store_dir / shard["file"], "r") as f:
            stored += sum(f[k].nbytes for k in f)
    per_view = bytes_per_view(full_shape, cfg.cache, tap, m["views"])
    assert stored == pytest.approx(per_view * m["num_samples"] * m["views"], rel=1e-12)
    served = store.fetch(v, torch.from_numpy(rows))
    if policy.get("feature_pool"):
        live = F.adaptive_avg_pool2d(live, policy["feature_pool"])
    if policy.get("topk"):
        k = policy["topk"]
        p_live, p_served = live.softmax(1), served.softmax(1)
        top = live.topk(k, dim=1).indices
        # Softmax equal to the teacher's on its top-k classes (fp16 values: relative error <= 2^-11 |logit|).
        err = (p_served.gather(1, top) - p_live.gather(1, top)).abs()
        assert torch.all(err <= p_live.gather(1, top) * (2 * ROUNDOFF["float16"] * live.abs().amax(1, keepdim=True)) + 1e-6)
        assert torch.allclose(p_served.sum(1), torch.ones(len(rows)), atol=1e-5)
        kl = (p_live * (p_live.log() - p_served.log())).sum(1).mean()
        _logger.info("top-%d of %d classes: mean KL(teacher || rebuilt) = %.4g", k, live.shape[1], kl)
        assert 0 <= kl < 0.5
    else:
        assert served.shape == live.shape
        assert torch.all((served - live).abs() <= ROUNDOFF[dtype] * live.abs() * 1.001 + 1e-5)

    report = check_store(cfg, store_dir, world["teacher"], world["data"], samples=300)
    assert report.ok, report.render()
    assert report.samples == 300 and report.param_mismatches == 0
    assert report.worst_ratio < 1.0
    assert (report.mean_kl is not None) == (tap == "logits")


def test_encode_tap_policies_on_synthetic_outputs():
    from kdbench.config import CachePolicy

    g = torch.Generator().manual_seed(0)
    feat = torch.randn(5, 8, 6, 6, generator=g) * 300  # beyond fp16's precision, inside bf16's range
    bf = encode_tap("feature[1]", feat, CachePolicy(feature_dtype="bfloat16"))["values_bf16"]
    assert bf.dtype == np.int16
    assert torch.equal(torch.from_numpy(bf).view(torch.bfloat16).float(), feat.bfloat16().float())
    pooled = encode_tap("feature[1]", feat, CachePolicy(feature_pool=3, feature_dtype="float32"))["values"]
    assert np.array_equal(pooled, F.adaptive_avg_pool2d(feat, 3).numpy())
    pre = encode_tap("pre_logits", feat.flatten(1), CachePolicy(feature_pool=3))["values"]  # pooling is for maps
    assert pre.shape == (5, 288) and pre.dtype == np.float16


@pytest.mark.parametrize("num_classes", [100, 1000])
def test_reconstruct_topk_keeps_the_teachers_softmax_on_the_top_k(num_classes):
    from kdbench.config import CachePolicy

    g = torch.Generator().manual_seed(num_classes)
    logits = torch.randn(256, num_classes, generator=g) * 2.0
    logits[torch.arange(256), torch.randint(0, num_classes, (256,), generator=g)] += 8.0  # a confident top-1
    p = logits.softmax(1)
    kls = []
    for k in (1, 5, 10, 50):
        enc = {n: torch.from_numpy(a) for n, a in encode_tap("logits", logits, CachePolicy(topk=k)).items()}
        rebuilt = reconstruct_topk(enc["topk_values"], enc["topk_indices"], enc["lse"], num_classes)
        q = rebuilt.softmax(1)
        idx = enc["topk_indices"].long()
        rel = (q.gather(1, idx) / p.gather(1, idx) - 1).abs()
        assert rel.max() <= 2 * ROUNDOFF["float16"] * logits.abs().max()  # fp16 rounding of the logits only
        # The top-k keep the stored mass (at most 1: fp16 rounding may push it just above), and the other
        # classes share the rest equally.
        top_mass = torch.exp(enc["topk_values"].float() - enc["lse"][:, None]).sum(1).clamp(max=1.0)
        assert torch.allclose(q.gather(1, idx).sum(1), top_mass, atol=1e-5)
        others = q[torch.ones_like(q, dtype=torch.bool).scatter(1, idx, False)].view(len(q), -1)
        assert torch.allclose(others, others[:, :1].expand_as(others), rtol=1e-5)
        kls.append(float((p * (p.log() - q.log())).sum(1).mean()))
    _logger.info("C=%d: mean KL(teacher || top-k rebuilt) for k=1,5,10,50: %s", num_classes, kls)
    assert kls == sorted(kls, reverse=True) and kls[-1] < kls[0]
    full = encode_tap("logits", logits, CachePolicy(topk=num_classes))
    rebuilt = reconstruct_topk(*(torch.from_numpy(full[n]) for n in ("topk_values", "topk_indices", "lse")), num_classes)
    assert torch.equal(rebuilt, logits.half().float())  # k = C keeps every logit (fp16)


# --- integrity ---------------------------------------------------------------------------------------------


def test_check_cache_passes_an_intact_store(world, capsys):
    assert cli_main(_check_cli(world, world["store"], "--samples", "64")) == 0
    out = capsys.readouterr().out
    assert "3/3 shards match" in out and "max |Δlogit|" in out and "mean KL" in out
    assert "top-1 agreement" in out and "64/64 view parameters match" in out and out.strip().endswith("OK")


def test_flipped_byte_is_caught_by_check_cache_and_open(world, store_copy, capsys):
    flip_byte(store_copy / shard_file(1))
    assert cli_main(_check_cli(world, store_copy)) == 2
    captured = capsys.readouterr()
    assert "BAD" in captured.out and "FAILED" in captured.out
    assert str(store_copy / shard_file(1)) in captured.err and "sha256" in captured.err and "Fix" in captured.err
    with pytest.raises(StoreError, match=r"shard-00001\.h5 does not match its sha256.*Fix: delete"):
        TeacherStore.open(store_copy, expect_for(world["cfg"], world["teacher"], "logits"), verify=True)


def test_truncated_shard_gives_a_clear_store_error(world, store_copy):
    path = store_copy / shard_file(0)
    os.truncate(path, path.stat().st_size // 2)
    expect = expect_for(world["cfg"], world["teacher"], "logits")
    with pytest.raises(StoreError, match=r"shard-00000\.h5 cannot be read .*truncated or corrupt.*Fix: delete"):
        TeacherStore.open(store_copy, expect, verify=False)
    with pytest.raises(StoreError, match=r"shard-00000\.h5 does not match its sha256"):
        TeacherStore.open(store_copy, expect, verify=True)
    with pytest.raises(StoreError, match=r"shard-00000\.h5 cannot be read.*rerun the cache step for shard 0"):
        finalize_store(world["cfg"], world["teacher"], world["data"], "logits", store_copy)


def test_store_of_another_teacher_is_refused_naming_the_field(world, tmp_path, capsys):
    other = make_teacher_dir(tmp_path / "other_teacher", world["data"], seed=1)
    with pytest.raises(StoreError, match="field 'teacher_sha256'.*Fix: delete"):
        TeacherStore.open(world["store"], expect_for(world["cfg"], other, "logits"))
    args = _check_cli(world, world["store"])
    args[args.index("--teacher-dir") + 1] = str(other)
    assert cli_main(args) == 2
    assert "teacher_sha256" in capsys.readouterr().err


@pytest.mark.parametrize(
    "over, field",
    [({"protocol": {"views": {"seed": 8}}}, "view_recipe_hash"),
     ({"protocol": {"views": {"count": 4}}}, "view_recipe_hash"),
     ({"cache": {"logits_dtype": "float32"}}, "policy")],
)
def test_store_of_another_recipe_or_policy_is_refused_naming_the_field(world, over, field):
    cfg = tiny_config(world["raw_root"], **over)
    with pytest.raises(StoreError, match=f"field '{field}'"):
        TeacherStore.open(world["store"], expect_for(cfg, world["teacher"], "logits"))
    with pytest.raises(StoreError, match=f"field '{field}'"):
        check_store(cfg, world["store"], world["teacher"], world["data"], samples=8)


def test_stale_shard_of_another_teacher_is_refused_by_the_manifest_step(world, store_copy, tmp_path):
    other = make_teacher_dir(tmp_path / "other_teacher", world["data"], seed=1)
    build_shard(world["cfg"], other, world["data"], "logits", 1, store_copy / shard_file(1))
    with pytest.raises(StoreError, match=r"shard-00001\.h5: attribute 'teacher_sha256'.*shard 1"):
        finalize_store(world["cfg"], world["teacher"], world["data"], "logits", store_copy)


def test_values_changed_beyond_fp16_rounding_fail_the_check(world, store_copy, capsys):
    with h5py.File(store_copy / shard_file(2), "r+") as f:
        f["values"][1, 3] = f["values"][1, 3] + np.float16(0.05)
    finalize_store(world["cfg"], world["teacher"], world["data"], "logits", store_copy)  # checksums agree again
    report = check_store(world["cfg"], store_copy, world["teacher"], world["data"], samples=300)
    assert not report.ok and report.worst_ratio > 1 and not report.checksum_problems
    assert "differ from the live teacher" in report.failure()
    assert cli_main(_check_cli(world, store_copy, "--samples", "300")) == 2
    assert "Fix: delete" in capsys.readouterr().err


def test_changed_view_parameters_fail_the_check(world, store_copy):
    with h5py.File(store_copy / shard_file(0), "r+") as f:
        f["lam"][0, :] = 0.75
    finalize_store(world["cfg"], world["teacher"], world["data"], "logits", store_copy)
    report = check_store(world["cfg"], store_copy, world["teacher"], world["data"], samples=300)
    assert not report.ok and report.param_mismatches > 0
    assert "view parameters differ" in report.failure()


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import h5py, torch
    torch.set_num_threads(1)
    create = h5py.Group.create_dataset
    def stall(self, *args, **kwargs):  # the first dataset is written, then the job hangs mid-file
        ds = create(self, *args, **kwargs)
        self.file.flush()
        print("WRITING", flush=True)
        time.sleep(300)
        return ds
    h5py.Group.create_dataset = stall
    from kdbench.config import load_config
    from kdbench.cache.build import build_shard
    build_shard(load_config(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), "logits", 1, Path(sys.argv[4]))
    """
)


def test_shard_killed_mid_write_leaves_no_file_under_the_final_name(world, tmp_path):
    store = tmp_path / "logits"
    store.mkdir()
    for i in (0, 2):
        shutil.copy(world["store"] / shard_file(i), store / shard_file(i))
    final = store / shard_file(1)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(world["cfg_path"]), str(world["teacher"]), str(world["data"]),
         str(final)],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    partial = list(store.glob(f"{shard_file(1)}.tmp-*"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # it was killed while writing
    assert not final.exists()
    with pytest.raises(StoreError, match=r"store shard missing: .*shard-00001\.h5; rerun the cache step for shard 1"):
        finalize_store(world["cfg"], world["teacher"], world["data"], "logits", store)
    # A rerun publishes the shard; the leftover temporary file is never part of the store.
    build_shard(world["cfg"], world["teacher"], world["data"], "logits", 1, final)
    manifest = finalize_store(world["cfg"], world["teacher"], world["data"], "logits", store)
    assert [s["file"] for s in manifest["shards"]] == [shard_file(i) for i in range(3)]
    TeacherStore.open(store, expect_for(world["cfg"], world["teacher"], "logits"))


def test_exception_while_writing_leaves_neither_final_nor_temporary_file(world, tmp_path, monkeypatch):
    create = h5py.Group.create_dataset

    def fail_on_lam(self, name, *args, **kwargs):
        if name == "lam":
            raise OSError("disk full (simulated)")
        return create(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", fail_on_lam)
    final = tmp_path / "logits" / shard_file(0)
    with pytest.raises(OSError, match="disk full"):
        build_shard(world["cfg"], world["teacher"], world["data"], "logits", 0, final)
    assert list(final.parent.iterdir()) == []


# --- the store layer's own rules, on synthetic stores written by the real writer ----------------------------------


def _synthetic(root: Path, views: int = 2, n: int = 25, classes: int = 10, shard_size: int = 10, **policy):
    g = torch.Generator().manual_seed(5)
    return synthetic_store(root, torch.randn(views, n, classes, generator=g), CachePolicy(**policy),
                           shard_size=shard_size)


@pytest.mark.parametrize(("classes", "dtype"), [(32767, np.int16), (32768, np.int32), (40000, np.int32)])
def test_top_k_class_indices_fit_their_dtype_up_to_the_last_class(classes, dtype):
    logits = torch.zeros(2, classes)
    logits[0, classes - 1], logits[1, 0] = 9.0, 9.0  # the last class and the first on top
    enc = encode_tap("logits", logits, CachePolicy(topk=2))
    assert enc["topk_indices"].dtype == dtype and enc["topk_indices"][:, 0].tolist() == [classes - 1, 0]
    rebuilt = reconstruct_topk(*(torch.from_numpy(enc[k]) for k in ("topk_values", "topk_indices", "lse")), classes)
    assert rebuilt.argmax(1).tolist() == [classes - 1, 0]


@pytest.mark.parametrize(("tap", "shape", "policy"), [
    ("logits", (10,), {}), ("logits", (10,), {"logits_dtype": "float32", "feature_dtype": "float16"}),
    ("logits", (100,), {"topk": 5}), ("logits", (40000,), {"topk": 3}), ("logits", (4,), {"topk": 9}),
    ("feature[1]", (8, 6, 6), {"logits_dtype": "float32"}), ("feature[1]", (8, 6, 6), {"feature_dtype": "float32"}),
    ("feature[1]", (8, 6, 6), {"feature_dtype": "bfloat16", "feature_pool": 2}), ("pre_logits", (12,), {}),
])
def test_record_bytes_is_what_encode_tap_stores_per_sample(tap, shape, policy):
    policy = CachePolicy(**policy)
    encoded = encode_tap(tap, torch.randn(3, *shape), policy)
    assert record_bytes(shape, policy, tap) == sum(a.nbytes for a in encoded.values()) / 3


def test_identity_attrs_keep_scalars_hash_mappings_and_drop_the_rest():
    policy = {"logits_dtype": "float16", "topk": None}
    identity = {"teacher_sha256": "ab", "tap": "logits", "view_recipe_hash": "cd", "views": 3, "policy": policy,
                "teacher_image_size": 28, "teacher_numerics": {"precision": "bf16"}, "num_classes": 10}
    assert identity_attrs(identity) == {
        "teacher_sha256": "ab", "tap": "logits", "view_recipe_hash": "cd", "views": 3, "policy": stable_hash(policy),
        "teacher_image_size": 28, "teacher_numerics": stable_hash({"precision": "bf16"})}
    assert identity_attrs({**identity, "policy": {**policy, "topk": 5}})["policy"] != stable_hash(policy)


def _expect(store) -> dict:
    return {k: v for k, v in store.manifest.items() if k in IDENTITY_KEYS}


def _rewrite_shard(store_dir: Path, index: int, **changes) -> None:
    """Rewrites shard ``index`` in place with ``changes``: ``attrs`` updated, or ``field`` -> a new array."""
    path = store_dir / shard_file(index)
    with h5py.File(path, "r") as f:
        data = {k: f[k][()] for k in f}
        attrs = dict(f.attrs)
    attrs.update(changes.pop("attrs", {}))
    data.update(changes)
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v)
        f.attrs.update(attrs)


def test_the_manifest_step_names_a_stale_shards_attribute_with_both_values(tmp_path):
    store = _synthetic(tmp_path)
    _rewrite_shard(tmp_path, 2, attrs={"teacher_image_size": 32})
    with pytest.raises(StoreError) as error:
        write_manifest(tmp_path, 3, read_store_manifest(tmp_path))
    path = tmp_path / shard_file(2)
    assert str(error.value) == (
        f"store shard {path}: attribute 'teacher_image_size' is 32 but the store is for 28 (a stale shard built for"
        f" another teacher/view recipe/policy). Fix: delete {path} and rerun the cache step for shard 2")
    assert store.views == 2


def test_the_manifest_step_refuses_a_shard_laid_out_unlike_the_first(tmp_path):
    _synthetic(tmp_path)
    with h5py.File(tmp_path / shard_file(2), "r") as f:
        values = f["values"][()]
    _rewrite_shard(tmp_path, 2, values=values.astype(np.float32))
    with pytest.raises(StoreError) as error:
        write_manifest(tmp_path, 3, read_store_manifest(tmp_path))
    assert str(error.value) == (
        f"store shard {tmp_path / shard_file(2)} holds {{'values': ('float32', (10,))}} but {shard_file(0)} holds"
        f" {{'values': ('float16', (10,))}}. Fix: delete {tmp_path} and rerun the cache steps")


def test_the_manifest_lists_each_shards_rows_first_row_size_and_digest(tmp_path):
    manifest = _synthetic(tmp_path, n=25, shard_size=10).manifest
    assert [(s["file"], s["count"], s["first_position"]) for s in manifest["shards"]] == [
        (shard_file(0), 10, 0), (shard_file(1), 10, 10), (shard_file(2), 5, 20)]
    for s in manifest["shards"]:
        path = tmp_path / s["file"]
        assert (s["bytes"], s["sha256"]) == (path.stat().st_size, sha256_file(path))
    with h5py.File(tmp_path / shard_file(2), "r") as f:  # the writer's dtypes, whatever it was given
        assert f["ids"].dtype == np.int64 and f["ids"][()].tolist() == list(range(20, 25))
        assert {k: f[k].dtype for k in VIEW_PARAM_FIELDS} == {k: np.dtype(d) for k, (d, _) in VIEW_PARAM_FIELDS.items()}


@pytest.mark.parametrize("reader", ["memory", "sharded"])
def test_both_readers_refuse_a_manifest_whose_shards_do_not_follow_one_another(tmp_path, reader):
    store = _synthetic(tmp_path)
    manifest = dict(store.manifest)
    manifest["shards"] = [dict(s) for s in manifest["shards"]]
    manifest["shards"][2]["first_position"] = 19
    write_json_atomic(tmp_path / "manifest.json", manifest)
    opener = TeacherStore if reader == "memory" else ShardedTeacherStore
    with pytest.raises(StoreError) as error:
        opener.open(tmp_path, _expect(store), verify=False)
    assert str(error.value) == (f"{tmp_path / 'manifest.json'}: shard {shard_file(2)} starts at row 19, expected 20;"
                                f" delete {tmp_path} and rerun the workflow")


@pytest.mark.parametrize("reader", ["memory", "sharded"])
def test_both_readers_refuse_a_shard_with_other_row_counts_than_its_manifest(tmp_path, reader):
    store = _synthetic(tmp_path)
    with h5py.File(tmp_path / shard_file(1), "r") as f:
        values = f["values"][()]
    _rewrite_shard(tmp_path, 1, values=values[:, :7])
    path = tmp_path / shard_file(1)
    message = (f"{path}: field 'values' has 7 rows, {tmp_path / 'manifest.json'} says 10. Fix: delete {path} and"
               f" {tmp_path / 'manifest.json'} and rerun the workflow")
    with pytest.raises(StoreError) as error:
        if reader == "memory":
            TeacherStore.open(tmp_path, _expect(store), verify=False)
        else:
            ShardedTeacherStore.open(tmp_path, _expect(store), verify=False).fetch(0, torch.tensor([12]))
    assert str(error.value) == message


def test_a_view_outside_the_store_is_an_index_error(tmp_path):
    store = _synthetic(tmp_path, views=3)
    for served in (store, ShardedTeacherStore.open(tmp_path, _expect(store))):
        assert served.fetch(2, torch.tensor([0])).shape == (1, 10)
        for view in (3, -1):
            with pytest.raises(IndexError, match=rf"^view {view} out of range: the store holds 3 views$"):
                served.fetch(view, torch.tensor([0]))


def test_shards_are_read_while_another_process_holds_one_open(tmp_path):
    """Reading takes no HDF5 lock: a shard another process has open (check-cache, a copy) is still read."""
    store = _synthetic(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, h5py; f = h5py.File(sys.argv[1], 'r+'); print('open', flush=True);"
         " sys.stdin.read()", str(tmp_path / shard_file(1))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        assert write_manifest(tmp_path, 3, read_store_manifest(tmp_path))["num_samples"] == 25
        assert torch.equal(TeacherStore.open(tmp_path, _expect(store)).fetch(1, torch.tensor([12])),
                           store.fetch(1, torch.tensor([12])))
        sharded = ShardedTeacherStore.open(tmp_path, _expect(store))
        assert torch.equal(sharded.fetch(1, torch.tensor([12])), store.fetch(1, torch.tensor([12])))
    finally:
        holder.communicate("")


@pytest.mark.parametrize("reader", [TeacherStore, ShardedTeacherStore])
def test_an_opened_store_states_its_tap_classes_views_and_samples(tmp_path, reader):
    top = _synthetic(tmp_path / "top", views=3, classes=12, topk=4)
    served = reader.open(tmp_path / "top", _expect(top))
    assert (served.tap, served.num_classes, served.views, len(served)) == ("logits", 12, 3, 25)
    rebuilt = served.fetch(1, torch.tensor([3, 24, 11]))  # full logits rebuilt from the top-4 record
    assert rebuilt.shape == (3, 12) and torch.equal(rebuilt, top.fetch(1, torch.tensor([3, 24, 11])))


@pytest.mark.parametrize("reader", [TeacherStore, ShardedTeacherStore])
def test_opening_a_store_verifies_its_shards_unless_told_not_to(tmp_path, reader):
    store = _synthetic(tmp_path)
    flip_byte(tmp_path / shard_file(1))
    mpath = tmp_path / "manifest.json"
    with pytest.raises(StoreError) as error:
        reader.open(tmp_path, _expect(store))
    assert str(error.value) == (
        f"store shard {tmp_path / shard_file(1)} does not match its sha256 in {mpath}: the file is corrupt or was"
        f" changed. Fix: delete {tmp_path / shard_file(1)} and {mpath} and rerun the workflow (cache step for shard"
        f" 1, then the manifest)")
    reader.open(tmp_path, _expect(store), verify=False)  # (check-cache compares the values itself)


def test_missing_shards_are_named_first_with_a_count_of_the_others(tmp_path):
    store = _synthetic(tmp_path)
    (tmp_path / shard_file(2)).unlink()
    fix = "Fix: rerun the cache step for shard {i}, then the manifest step"
    with pytest.raises(StoreError) as error:
        TeacherStore.open(tmp_path, _expect(store))
    assert str(error.value) == f"store shard missing: {tmp_path / shard_file(2)}. {fix.format(i=2)}"
    (tmp_path / shard_file(0)).unlink()
    with pytest.raises(StoreError) as error:
        TeacherStore.open(tmp_path, _expect(store))
    assert str(error.value) == f"store shard missing: {tmp_path / shard_file(0)}. {fix.format(i=0)} (and 1 more shards)"


def test_a_store_of_another_policy_is_refused_with_both_values_and_the_fix(tmp_path):
    store = _synthetic(tmp_path)
    expect = {**_expect(store), "policy": {**store.manifest["policy"], "logits_dtype": "float32"}}
    with pytest.raises(StoreError) as error:
        TeacherStore.open(tmp_path, expect)
    assert str(error.value) == (
        f"{tmp_path / 'manifest.json'}: field 'policy' is {store.manifest['policy']!r} but this run expects"
        f" {expect['policy']!r}: the store was built for another teacher/view recipe/policy. Fix: delete {tmp_path}"
        f" and rerun the workflow")


def test_a_missing_corrupt_or_other_format_manifest_is_refused_naming_it(tmp_path):
    store = _synthetic(tmp_path)
    mpath = tmp_path / "manifest.json"
    text = mpath.read_text()
    mpath.write_text(text[:40])
    with pytest.raises(StoreError, match=rf"^store manifest {re.escape(str(mpath))} is not valid JSON \(.*\); delete"
                                         r" it and rerun the step that writes it$"):
        read_store_manifest(tmp_path)
    mpath.write_text(text.replace('"format_version": 1', '"format_version": 0'))
    with pytest.raises(StoreError) as error:
        read_store_manifest(tmp_path)
    assert str(error.value) == f"{mpath}: format_version 0 != 1; rebuild the store"
    mpath.unlink()
    with pytest.raises(StoreError) as error:
        TeacherStore.open(tmp_path, _expect(store))
    assert str(error.value) == (f"store manifest not found: {mpath}; the cache step did not finish — rerun the"
                                " workflow")


def test_the_sharded_reader_keeps_the_most_recently_used_slices_and_counts_its_reads(tmp_path):
    store = _synthetic(tmp_path, n=30, shard_size=10)
    sharded = ShardedTeacherStore.open(tmp_path, _expect(store), cache_shards=2)
    assert sharded.shard_reads == 0
    reads = []
    for row in (0, 10, 20, 20, 10, 0, 5):  # shards 0, 1, 2, 2 (kept), 1 (kept), 0 (evicted at 2), 0 (kept)
        assert torch.equal(sharded.fetch(0, torch.tensor([row])), store.fetch(0, torch.tensor([row])))
        reads.append(sharded.shard_reads)
    assert reads == [1, 2, 3, 3, 3, 4, 4]


def test_the_sharded_reader_refuses_rows_outside_the_store(tmp_path):
    store = _synthetic(tmp_path)
    sharded = ShardedTeacherStore.open(tmp_path, _expect(store))
    assert sharded.fetch(0, torch.tensor([24, 0])).shape == (2, 10)
    for rows in ([25], [-1], [3, 25], [-1, 3]):
        with pytest.raises(IndexError, match=r"^rows out of range: the store holds 25 samples$"):
            sharded.fetch(0, torch.tensor(rows))


def test_the_shard_writer_stores_int64_keys_whatever_it_is_given(tmp_path):
    recipe = ViewRecipe(count=1)
    params = [view_params(recipe, np.arange(3), np.arange(3), 0, 3, 3)]
    write_shard(tmp_path / "s.h5", {"values": np.zeros((1, 3, 2), np.float16)}, params,
                np.array([7, 8, 9], dtype=np.int32), {"first_position": 0})
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert f["ids"].dtype == np.int64 and f["ids"][()].tolist() == [7, 8, 9]
        assert f.attrs["first_position"] == 0
