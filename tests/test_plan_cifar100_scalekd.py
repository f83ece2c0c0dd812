"""workflow/config/cifar100-scalekd.yaml plans on CIFAR-100 pickles and a teacher checkpoint in the real formats.

The checkpoint is the state dict of the model the config names, created as the teacher job creates it (32 px);
planning never reads it, the teacher job loads it strictly (:func:`kdbench.modeldir.load_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from test_data import make_cifar100

from kdbench.methods.scalekd import ScaleKD
from kdbench.modeldir import load_checkpoint
from kdbench.models import create_model
from kdbench.plan import Plan

CONFIG = Path(__file__).resolve().parents[1] / "workflow" / "config" / "cifar100-scalekd.yaml"
LABELS = {"baseline", "kd", "dist", "scalekd", "scalekd_no_tpp", "scalekd_no_alt"}


def test_the_cifar100_scalekd_config_plans_every_cell_on_files_in_the_real_format(tmp_path):
    make_cifar100(tmp_path / "cifar100", n_train=600, n_test=200)
    teacher = create_model("vit_small_patch8_224", 100, 3, 32)  # as the teacher job creates it
    assert teacher.pos_embed.shape == (1, 17, 384)  # the shape the config's header documents
    checkpoint = tmp_path / "vit_s8.pth"
    torch.save(teacher.state_dict(), checkpoint)
    overrides = {
        "data": {"root": str(tmp_path / "cifar100"), "val_size": 100},
        "teachers": {"vit_s8": {"checkpoint": str(checkpoint)}},
    }
    plan = Plan.resolve([CONFIG], overrides)

    cfg = plan.tables["cifar100-scalekd"].cfg
    assert cfg.teachers["vit_s8"].checkpoint == str(checkpoint)
    # Every (student, method) pair is compatible: no scalekd cell is skipped.
    assert plan.skipped == {}
    assert {j.label for j in plan.jobs} == LABELS and len(plan.jobs) == 6 * 3 * 3
    assert {j.student for j in plan.jobs} == {"resnet8x4", "vit_nano_patch4", "wrn_16_2"}
    # Stores: logits and the final tokens (feature[11]) for all, stage n-1 (feature[8]) for scalekd_no_tpp.
    assert {s.tap for s in plan.stores.values()} == {"logits", "feature[11]", "feature[8]"}
    assert all(len(plan.store_shards(d)) == 1 for d in plan.stores)  # 500 training images, shards of 5000
    # scalekd runs the teacher's tail live but still reads its declared taps from the stores.
    job = next(j for j in plan.jobs if j.label == "scalekd")
    cls, mcfg = plan.method(job.table, job.label)
    assert cls is ScaleKD and cls.requirements(mcfg).live_teacher_tail
    assert set(plan.job_stores(job)) == {"logits", "feature[-1]"}

    load_checkpoint(create_model("vit_small_patch8_224", 100, 3, 32), checkpoint, "vit_small_patch8_224")
