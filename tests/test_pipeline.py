"""The stages as functions on a tiny Fashion-MNIST slice: teacher, cache, distill records, verify, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kdbench.cache.build import build_shard, finalize_store
from kdbench.config import parse_config
from kdbench.data.shards import prepare
from kdbench.data.sources import shard_counts
from kdbench.distill import run_distill
from kdbench.errors import CheckpointError, NonFiniteLossError
from kdbench.teacher import train_teacher
from kdbench.verify import compare_runs, verify

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not (FMNIST / "train-labels-idx1-ubyte.gz").exists(), reason="needs dataset-fashion-mnist")


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
    root = tmp_path_factory.mktemp("pipeline")
    cfg_path = root / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_raw()))
    from kdbench.config import load_config

    cfg = load_config(cfg_path)
    data = root / "data"
    prepare(cfg.data, data)
    teacher = root / "teacher"
    train_teacher(cfg, "t", data, teacher)
    store = root / "cache" / "logits"
    for i in range(shard_counts(cfg.data)["train"]):
        build_shard(cfg, teacher, data, "logits", i, store / f"shard-{i:05d}.h5")
    finalize_store(cfg, teacher, data, "logits", store)
    return cfg, data, teacher, {"logits": store}, root


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
