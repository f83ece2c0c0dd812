"""The stages as functions on a tiny Fashion-MNIST slice: teacher, cache, distill records, verify, bad input;
retrieval mAP at the end of a distill job on generated data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

import pytest
import torch
import yaml
from _helpers_store import tiny_raw as generated_raw
from _helpers_store import trained_world
from _helpers_store import write_fmnist_idx

from kdbench.config import parse_config
from kdbench.data.prepare import prepare
from kdbench.data.shards import load_split, read_manifest
from kdbench.data.views import render
from kdbench.distill import run_distill
from kdbench.errors import CheckpointError, ConfigError, NonFiniteLossError
from kdbench.evaluate import embed
from kdbench.meta import data_info
from kdbench.models import create_model
from kdbench.retrieval import retrieval_map
from kdbench.teacher import train_teacher
from kdbench.verify import compare_runs, verify

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def tiny_raw(**over) -> dict:
    raw = {
        "name": "unit",
        "data": {"val_size": 128, "shard_size": 128, "train_limit": 256, "test_limit": 128},
        "protocol": {"epochs": 2, "batch_size": 64, "eval_batch_size": 128, "views": {"count": 2, "mixup": 0.5}},
        "teachers": {"t": {"model": "cnn_xs", "train": {"epochs": 1}}},
        "students": ["cnn_xs"],
        "methods": {"baseline": {}, "kd": {}},
        "seeds": [0, 1],
        "runtime": {"device": "cpu", "threads": 1},
    }
    raw.update(over)
    return raw


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    if not (FMNIST / "train-labels-idx1-ubyte.gz").exists():
        pytest.skip("needs dataset-fashion-mnist")
    root = tmp_path_factory.mktemp("pipeline")
    _, cfg, data, teacher, stores = trained_world(root, tiny_raw())
    return cfg, data, teacher, stores, root


def test_a_teacher_evaluated_on_more_test_images_is_compared_on_the_jobs_own(pipeline, tmp_path):
    """A teacher shared from a table without ``test_limit`` predicted more test images than the job sees:
    agreement and the teacher's top-1 are taken on the job's test images (a prefix of the teacher's)."""
    cfg, data, teacher, stores, root = pipeline
    shared = tmp_path / "teacher"
    shutil.copytree(teacher, shared)
    pred = np.load(teacher / "predictions.npy")
    np.save(shared / "predictions.npy", np.concatenate([pred, (pred + 1) % 10]))  # 128 more, none agreeing
    a = run_distill(cfg, "t", "cnn_xs", "kd", 0, data, teacher, stores, tmp_path / "a")
    b = run_distill(cfg, "t", "cnn_xs", "kd", 0, data, shared, stores, tmp_path / "b")
    assert b.final.teacher_agreement == a.final.teacher_agreement
    assert b.final.teacher_test_top1 == pytest.approx(a.final.teacher_test_top1, abs=1e-4)


def test_same_seed_gives_identical_records_apart_from_timings(pipeline):
    cfg, data, teacher, stores, root = pipeline
    a = run_distill(cfg, "t", "cnn_xs", "kd", 0, data, teacher, stores, root / "run_a")
    b = run_distill(cfg, "t", "cnn_xs", "kd", 0, data, teacher, stores, root / "run_b")
    c = run_distill(cfg, "t", "cnn_xs", "kd", 1, data, teacher, stores, root / "run_c")
    assert compare_runs(root / "run_a", root / "run_b") == []
    assert compare_runs(root / "run_a", root / "run_c") != []  # the check can fail: another seed differs
    assert a.status == "ok" and a.cost.teacher_forward == 0 and a.cost.cache_bytes_read > 0
    assert a.final.teacher_agreement is not None and a.views.repeats is False
    assert a.identity.params == {"tau": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
    lines = (root / "run_a" / "epochs.jsonl").read_text().splitlines()
    assert [json.loads(x)["view"] for x in lines] == [0, 1]
    assert c.identity.seed == 1 and b.provenance["store_manifests"] == a.provenance["store_manifests"]


def test_verify_reruns_a_cell_bit_for_bit(pipeline):
    cfg, data, teacher, stores, root = pipeline
    run_distill(cfg, "t", "cnn_xs", "baseline", 0, data, None, {}, root / "run_v")
    report = verify(root / "run_v", Path(cfg.source))
    assert report.status == "identical", report.differences


def test_live_teacher_gives_the_cached_result_up_to_fp16(pipeline):
    cfg, data, teacher, stores, root = pipeline
    live = run_distill(cfg, "t", "cnn_xs", "kd", 0, data, teacher, {}, root / "run_live")
    if not (root / "run_a").exists():
        run_distill(cfg, "t", "cnn_xs", "kd", 0, data, teacher, stores, root / "run_a")
    cached = json.loads((root / "run_a" / "record.json").read_text())
    assert live.cost.teacher_forward == 2 * 256 and live.cost.cache_bytes_read == 0
    assert abs(live.final.test_top1 - cached["final"]["test_top1"]) <= 5.0


def test_nan_loss_stops_the_run_and_writes_no_record(pipeline):
    cfg, data, teacher, stores, root = pipeline
    bad = parse_config(tiny_raw(protocol={"epochs": 1, "lr": 1.0e30, "batch_size": 64}), source="nan.yaml")
    with pytest.raises(NonFiniteLossError, match="lower the learning rate"):
        run_distill(bad, "t", "cnn_xs", "baseline", 0, data, None, {}, root / "run_nan")
    assert not (root / "run_nan" / "record.json").exists()


def test_store_for_another_protocol_is_refused(pipeline):
    cfg, data, teacher, stores, root = pipeline
    other = parse_config(tiny_raw(protocol={"epochs": 2, "views": {"count": 2, "seed": 7}}), source="other.yaml")
    with pytest.raises(Exception, match="view_recipe_hash"):
        run_distill(other, "t", "cnn_xs", "kd", 0, data, teacher, stores, root / "run_other")


def test_teacher_checkpoint_that_does_not_match_names_keys_and_fix(pipeline, tmp_path):
    cfg, data, teacher, stores, root = pipeline
    ckpt = tmp_path / "wrong.pt"
    torch.save({"stages.0.0.weight": torch.zeros(3)}, ckpt)
    bad = parse_config(tiny_raw(teachers={"t": {"model": "cnn_xs", "checkpoint": str(ckpt)}}), source="ck.yaml")
    with pytest.raises(CheckpointError, match=r"wrong\.pt.*missing keys.*Fix"):
        train_teacher(bad, "t", data, tmp_path / "t")
    assert not (tmp_path / "t" / "metrics.json").exists()


def test_teacher_loaded_from_a_local_checkpoint_records_its_digest(pipeline, tmp_path):
    cfg, data, teacher, stores, root = pipeline
    good = parse_config(tiny_raw(teachers={"t": {"model": "cnn_xs", "checkpoint": str(teacher / "model.pt")}}))
    metrics = train_teacher(good, "t", data, tmp_path / "t")
    trained = json.loads((teacher / "metrics.json").read_text())
    assert metrics["source"] == "checkpoint" and metrics["checkpoint_sha256"] == trained["sha256"]
    assert metrics["test_top1"] == trained["test_top1"]


# --- retrieval mAP as a protocol metric (generated data: blobs with random labels) -------------------------


@pytest.fixture(scope="module")
def retrieval_runs(tmp_path_factory):
    """One baseline run (1 epoch, 100 training images, 32 test images) with ``retrieval_tap: pre_logits`` and
    the same run without it."""
    root = tmp_path_factory.mktemp("retrieval")
    raw = generated_raw(write_fmnist_idx(root / "raw"), protocol={"epochs": 1})
    off = parse_config(raw, source="off.yaml")
    on = parse_config({**raw, "protocol": {**raw["protocol"], "retrieval_tap": "pre_logits"}}, source="on.yaml")
    data = root / "data"
    prepare(on.data, data)
    runs = {name: run_distill(cfg, "t", "cnn_xs", "baseline", 0, data, None, {}, root / name)
            for name, cfg in (("on", on), ("off", off))}
    return on, data, runs, root


def _student_embeddings(run_dir, data_dir, batch_size: int):
    """pre_logits of the saved student on whole, un-augmented images: (train, test) embeddings and splits."""
    info = data_info(read_manifest(data_dir))
    model = create_model("cnn_xs", info.num_classes, info.in_chans, info.image_size)
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    model.eval()
    out = []
    for name in ("train", "test"):
        split = load_split(data_dir, name)
        with torch.no_grad():
            emb = torch.cat([
                model.forward_head(model.forward_features(
                    render(split.images[i : i + batch_size], None, None, info.image_size, info.mean, info.std)
                ), pre_logits=True)
                for i in range(0, len(split), batch_size)
            ])
        out.append((emb, split))
    return model, info, out


def test_retrieval_tap_records_both_maps_as_retrieval_map_computes_them(retrieval_runs):
    cfg, data, runs, root = retrieval_runs
    final, cost = runs["on"].final, runs["on"].cost
    for metric in ("cosine", "euclidean"):
        assert 0.0 <= getattr(final, f"map_{metric}") <= 100.0
        assert 0.0 <= getattr(final, f"p100_{metric}") <= 100.0  # the database has exactly 100 images
    assert 0.0 < cost.retrieval_time_s < cost.wall_time_s
    _, _, ((db, train), (queries, test)) = _student_embeddings(root / "on", data, cfg.protocol.eval_batch_size)
    assert len(train) == 100 and len(test) == 32
    for metric in ("cosine", "euclidean"):
        direct = retrieval_map(queries, test.labels, db, train.labels, metric=metric)
        assert getattr(final, f"map_{metric}") == pytest.approx(direct.map, rel=1e-12)
        assert getattr(final, f"p100_{metric}") == pytest.approx(direct.precision_at_k, rel=1e-12)
    record = json.loads((root / "on" / "record.json").read_text())
    assert record["protocol"]["retrieval_tap"] == "pre_logits"
    assert list(record["final"])[-5:] == ["teacher_test_top1", "map_cosine", "map_euclidean", "p100_cosine",
                                          "p100_euclidean"]


def test_without_retrieval_tap_the_record_has_none_and_the_protocol_hash_is_unchanged(retrieval_runs):
    cfg, data, runs, root = retrieval_runs
    off, on = runs["off"], runs["on"]
    assert (off.final.map_cosine, off.final.map_euclidean, off.final.p100_cosine, off.final.p100_euclidean) == (
        None, None, None, None)
    assert off.cost.retrieval_time_s is None
    assert "retrieval_tap" not in json.loads((root / "off" / "record.json").read_text())["protocol"]
    assert off.final.test_top1 == on.final.test_top1  # measuring retrieval changes no other number
    assert off.protocol_hash != on.protocol_hash  # ... but tables with and without it are not mixed


def test_embed_pools_feature_maps_and_refuses_a_missing_stage(retrieval_runs):
    cfg, data, runs, root = retrieval_runs
    model, info, ((db, train), _) = _student_embeddings(root / "on", data, 16)
    pre = embed(model, train, info, info.image_size, 16, torch.device("cpu"), "pre_logits")
    assert torch.equal(pre, db)
    # cnn_xs's pre_logits is the global average pool of its last stage.
    last = embed(model, train, info, info.image_size, 16, torch.device("cpu"), "feature[-1]")
    assert torch.allclose(last, pre, atol=1e-6)
    model.train()
    first = embed(model, train, info, info.image_size, 50, torch.device("cpu"), "feature[0]")
    assert first.shape == (100, 8) and model.training  # evaluated in eval mode, then restored
    model.eval()
    with pytest.raises(ValueError, match="out of range"):
        embed(model, train, info, info.image_size, 16, torch.device("cpu"), "feature[3]")


def test_a_retrieval_tap_the_student_lacks_fails_before_training(retrieval_runs, tmp_path):
    cfg, data, runs, root = retrieval_runs
    bad = parse_config(generated_raw(Path(cfg.data.root), protocol={"epochs": 1, "retrieval_tap": "feature[5]"}),
                       source="bad.yaml")
    with pytest.raises(ConfigError, match=r"bad\.yaml: key 'protocol\.retrieval_tap'.*out of range.*cnn_xs"):
        run_distill(bad, "t", "cnn_xs", "baseline", 0, data, None, {}, tmp_path / "run")
    assert not (tmp_path / "run").exists()
