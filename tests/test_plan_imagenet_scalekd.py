"""workflow/config/imagenet-scalekd.yaml plans on a synthetic image folder in the ImageNet layout.

Planning never reads the teacher checkpoint (the teacher job loads it strictly), so a placeholder file stands in
for the ViT-B/16 state dict.
"""

from __future__ import annotations

from pathlib import Path

from test_imagefolder import make_folder

from kdbench.methods.scalekd import ScaleKD
from kdbench.plan import Plan

CONFIG = Path(__file__).resolve().parents[1] / "workflow" / "config" / "imagenet-scalekd.yaml"
LABELS = {"baseline", "kd", "dist", "scalekd", "scalekd_no_tpp", "scalekd_no_alt"}


def test_the_imagenet_scalekd_config_plans_every_cell_with_a_live_teacher_for_scalekd(tmp_path):
    root = make_folder(tmp_path / "imagenet", n_train=8, n_test=2)
    checkpoint = tmp_path / "vit_b16.pth"
    checkpoint.write_bytes(b"a state dict")
    overrides = {"data": {"root": str(root), "val_size": 4, "shard_size": 4, "shards_per_job": 2},
                 "teachers": {"vit_b16": {"checkpoint": str(checkpoint)}}}
    plan = Plan.resolve([CONFIG], overrides)

    assert plan.skipped == {}  # both CNN students are compatible with every scalekd entry
    # An image folder may hold images of any size, so its jobs may stream: a CPU per loader worker (2) as well.
    (dkey,) = plan.data
    assert (plan.job_threads(dkey), plan.job_threads(dkey, 4)) == (3, 4)
    assert {j.label for j in plan.jobs} == LABELS and len(plan.jobs) == 6 * 2
    # Only the logits are stored (kd, dist); every scalekd entry runs the whole teacher online, so no 14x14x768
    # feature store (385 GB per view at ImageNet scale) is ever planned.
    assert {s.tap for s in plan.stores.values()} == {"logits"}
    for job in plan.jobs:
        cls, mcfg = plan.method(job.table, job.label)
        if cls is ScaleKD:
            assert plan.job_stores(job) == {} and cls.requirements(mcfg).live_teacher_tail == mcfg.tpp
            assert mcfg.teacher_stage == -4  # a 12-block ViT's stage n-1 is feature[8]
        elif job.label != "baseline":
            assert set(plan.job_stores(job)) == {"logits"}


def test_an_unset_topk_is_top10_from_1000_classes_unless_a_method_reads_full_logits(tmp_path):
    """The store policy's class-count default: top-10 from ``cache.topk_min_classes`` classes (1000 unless set)
    for a table whose methods accept a top-k store; every logit when a method reads full logits from the store
    (here dist), below the class count, or when the config says ``topk`` itself."""
    root = make_folder(tmp_path / "imagenet", n_train=8, n_test=2)
    checkpoint = tmp_path / "vit_b16.pth"
    checkpoint.write_bytes(b"a state dict")
    unset = tmp_path / "imagenet-scalekd-unset-topk.yaml"  # the shipped file without its `topk: null` line
    unset.write_text("".join(line for line in CONFIG.read_text().splitlines(keepends=True)
                             if not line.lstrip().startswith("topk:")))
    base = {"data": {"root": str(root), "val_size": 4, "shard_size": 4},
            "teachers": {"vit_b16": {"checkpoint": str(checkpoint)}}}

    def topk(config=unset, **overrides):
        return Plan.resolve([config], {**base, **overrides}).tables["imagenet-scalekd"].cfg.cache.topk

    live_dist = {"dist": {"teacher_source": "live"}}  # then no method reads full logits from the store
    assert topk(methods=live_dist) is None  # 3 class folders, far below the default threshold of 1000
    assert topk(methods=live_dist, cache={"topk_min_classes": 3}) == 10
    assert topk(methods=live_dist, cache={"topk_min_classes": 4}) is None
    assert topk(cache={"topk_min_classes": 3}) is None  # dist reads full logits from the store
    assert topk(methods=live_dist, cache={"topk_min_classes": 3, "topk": 5}) == 5  # said in the config
    assert topk(CONFIG, methods=live_dist, cache={"topk_min_classes": 3}) is None  # the shipped file says null
