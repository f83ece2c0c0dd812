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
