"""workflow/config/cifar100.yaml, the CRD table's 13 standard pairs, plans and dry-runs on CIFAR-100 files in the
real pickle format (``cifar-100-python/{train,test,meta}``, tiny ones generated here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_data import make_cifar100

from kdbench.models import create_model
from kdbench.plan import Plan
from kdbench.report.published import published_result, published_teacher

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "workflow" / "config" / "cifar100.yaml"
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
# The CRD table (RepDistiller README; anchors.md 11(c)) in kdbench's model names.
CRD_PAIRS = [
    ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("resnet110", "resnet20"),
    ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13_cifar", "vgg8_cifar"),
    ("vgg13_cifar", "mobilenetv2_cifar"), ("resnet50_cifar", "mobilenetv2_cifar"), ("resnet50_cifar", "vgg8_cifar"),
    ("resnet32x4", "shufflev1_cifar"), ("resnet32x4", "shufflev2_cifar"), ("wrn_40_2", "shufflev1_cifar"),
]
DATA = {"val_size": 20, "shard_size": 50}


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar100")
    make_cifar100(root, n_train=120, n_test=30)
    return root


def test_the_crd_config_plans_the_13_standard_pairs_with_every_method_and_seed(cifar_root):
    plan = Plan.resolve([CONFIG], {"data": {"root": str(cifar_root), **DATA}})
    cfg = plan.tables["cifar100-crd"].cfg
    pairs = [(cfg.teachers[t].model, s) for t, s in cfg.grid()]
    assert pairs == CRD_PAIRS
    assert plan.skipped == {}  # every method runs on every pair
    assert len(plan.jobs) == 13 * len(cfg.methods) * 5
    assert {(plan.tables[j.table].cfg.teachers[j.teacher].model, j.student) for j in plan.jobs} == set(CRD_PAIRS)
    assert len([k for k in plan.teachers if not plan.teachers[k].label]) == 6  # one per distinct teacher
    # RepDistiller's learning-rate rule: 0.01 for the MobileNetV2 and ShuffleNet students, 0.05 for the others.
    lrs = {s: cfg.protocol.for_student(s).lr for _, s in CRD_PAIRS}
    assert {s for s, lr in lrs.items() if lr == 0.01} == {"mobilenetv2_cifar", "shufflev1_cifar", "shufflev2_cifar"}
    assert {lr for lr in lrs.values()} == {0.01, 0.05}


def test_every_pair_has_its_published_numbers_beside_ours():
    for t, s in CRD_PAIRS:
        for method in ("kd", "crd"):
            assert published_result("CIFAR-100", t, s, method) is not None, (t, s, method)
        assert published_result("cifar100", t, s, "baseline") is not None, s
        assert published_teacher("cifar100", t) is not None, t
    assert published_result("cifar100", "resnet32x4", "resnet8x4", "dkd").top1 == 76.32
    assert published_result("cifar100", "resnet50_cifar", "vgg8_cifar", "crd").top1 == 74.30


def test_every_model_of_the_table_runs_on_a_cifar_batch():
    import torch

    for name in sorted({m for pair in CRD_PAIRS for m in pair}):
        out = create_model(name, 100, 3, 32).eval()(torch.zeros(2, 3, 32, 32))
        assert out.shape == (2, 100), name


def test_the_crd_config_dry_runs_through_snakemake(cifar_root, tmp_path):
    cmd = [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(REPO / "Snakefile"), "--directory",
           str(tmp_path), "--configfile", str(CONFIG), "--config",
           f"data={{root: {cifar_root}, val_size: {DATA['val_size']}, shard_size: {DATA['shard_size']}}}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = out.stdout.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    counts = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}
    assert counts["distill"] == 13 * 9 * 5 and counts["train_teacher"] == 6 and counts["leaderboard"] == 1
    # 100 training images in shards of 50: two cache jobs per (teacher, stored tap).
    assert counts["cache_shard"] == 2 * counts["cache_manifest"]


def test_the_13_pairs_with_every_registered_method_plan_with_a_reason_for_each_skipped_cell(cifar_root):
    from kdbench.methods import METHODS

    every = REPO / "tests" / "configs" / "cifar100-all-methods.yaml"
    plan = Plan.resolve([CONFIG, every], {"data": {"root": str(cifar_root), **DATA}})
    cfg = plan.tables["cifar100-crd"].cfg
    assert sorted(e.method for e in cfg.methods.values()) == sorted(METHODS.names())
    skipped = {(cfg.teachers[t].model, s, m): why for (_, t, s, m), why in plan.skipped.items()}
    # AMD and InDistill prune kdbench's own staged CNN teachers only; InDistill cannot widen a layer either.
    assert {k for k in skipped if k[2] == "amd"} == {(t, s, "amd") for t, s in CRD_PAIRS
                                                     if t in ("vgg13_cifar", "resnet50_cifar")}
    assert {k[:2] for k in skipped if k[2] == "indistill"} == {p for p in CRD_PAIRS if p[0] in
                                                               ("vgg13_cifar", "resnet50_cifar") or "shuffle" in p[1]}
    assert all("staged CNN" in why or "cannot widen" in why for why in skipped.values())
    assert len(plan.jobs) == (13 * 14 - len(skipped)) * 5
    # Every AMD search belongs to a teacher with at least one AMD cell (none for vgg13 / ResNet50).
    searched = {plan.teachers[k].teacher for k in plan.teachers if plan.teachers[k].label == "amd"}
    assert searched == {"wrn_40_2", "resnet56", "resnet110", "resnet32x4"}
