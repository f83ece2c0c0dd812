"""Published reference numbers (test top-1, %) shown beside our own, for context only.

Keyed by ``(dataset, teacher_model, student, method_name)`` in kdbench's names (timm model names,
registered method names); a ``teacher_model`` of ``None`` matches any teacher (students trained alone).
Teachers' own numbers are keyed by ``(dataset, teacher_model)``.

Numbers are CIFAR-100 under the CRD/RepDistiller protocol (240 epochs, SGD, batch 64; see
``research/anchors.md`` §11(c)). They were produced under their authors' protocols and reporting rules
(RepDistiller: last epoch, one run; mdistiller: best epoch *selected on test*, mean of several runs), so
they are a sanity anchor, not a target: they are shown wherever dataset, models and method match,
whatever the protocol of the table, each with its source in a footnote. ``kd_dot`` (mdistiller's KD+DOT)
assumes that registered name.
"""

from __future__ import annotations

from typing import NamedTuple

_REPDISTILLER = "RepDistiller README (CRD paper; last epoch)"
_MDISTILLER = "mdistiller README (DKD paper; best epoch on test, mean of runs)"


class Published(NamedTuple):
    """A published top-1 (%) and where it comes from."""

    top1: float
    source: str


# The CRD table's rows (RepDistiller README; kdbench's model names): (teacher, student) -> method -> top-1. The
# cross-architecture rows publish KD and CRD only. Methods kdbench does not implement (SP, CC, VID, AB, FT, FSP,
# NST) are left out.
_REPDISTILLER_ROWS: dict[tuple[str, str], dict[str, float]] = {
    ("wrn_40_2", "wrn_16_2"): dict(kd=74.92, fitnet=73.58, at=74.08, rkd=73.35, pkt=74.54, crd=75.48),
    ("wrn_40_2", "wrn_40_1"): dict(kd=73.54, fitnet=72.24, at=72.77, rkd=72.22, pkt=73.45, crd=74.14),
    ("resnet56", "resnet20"): dict(kd=70.66, fitnet=69.21, at=70.55, rkd=69.61, pkt=70.34, crd=71.16),
    ("resnet110", "resnet20"): dict(kd=70.67, fitnet=68.99, at=70.22, rkd=69.25, pkt=70.25, crd=71.46),
    ("resnet110", "resnet32"): dict(kd=73.08, fitnet=71.06, at=72.31, rkd=71.82, pkt=72.61, crd=73.48),
    ("resnet32x4", "resnet8x4"): dict(kd=73.33, fitnet=73.50, at=73.44, rkd=71.90, pkt=73.64, crd=75.51),
    ("vgg13_cifar", "vgg8_cifar"): dict(kd=72.98, fitnet=71.02, at=71.43, rkd=71.48, pkt=72.88, crd=73.94),
    ("vgg13_cifar", "mobilenetv2_cifar"): dict(kd=67.37, crd=69.73),
    ("resnet50_cifar", "mobilenetv2_cifar"): dict(kd=67.35, crd=69.11),
    ("resnet50_cifar", "vgg8_cifar"): dict(kd=73.81, crd=74.30),
    ("resnet32x4", "shufflev1_cifar"): dict(kd=74.07, crd=75.11),
    ("resnet32x4", "shufflev2_cifar"): dict(kd=74.45, crd=75.65),
    ("wrn_40_2", "shufflev1_cifar"): dict(kd=74.83, crd=76.05),
}

# mdistiller README (the DKD paper): DKD on 11 of the 13 pairs, KD+DOT (``kd_dot``, assuming that registered name)
# on three. Its KD column is CRD's (mdistiller #34), so it is not repeated.
_MDISTILLER_ROWS: dict[tuple[str, str], dict[str, float]] = {
    ("resnet56", "resnet20"): dict(dkd=71.97),
    ("resnet110", "resnet32"): dict(dkd=74.11),
    ("resnet32x4", "resnet8x4"): dict(dkd=76.32, kd_dot=75.12),
    ("wrn_40_2", "wrn_16_2"): dict(dkd=76.23),
    ("wrn_40_2", "wrn_40_1"): dict(dkd=74.81),
    ("vgg13_cifar", "vgg8_cifar"): dict(dkd=74.68, kd_dot=73.77),
    ("resnet32x4", "shufflev1_cifar"): dict(dkd=76.45),
    ("wrn_40_2", "shufflev1_cifar"): dict(dkd=76.70),
    ("vgg13_cifar", "mobilenetv2_cifar"): dict(dkd=69.71),
    ("resnet50_cifar", "mobilenetv2_cifar"): dict(dkd=70.35),
    ("resnet32x4", "shufflev2_cifar"): dict(dkd=77.07, kd_dot=75.55),
}

# Notes on single cells, appended to their source.
_NOTES = {("resnet32x4", "resnet8x4", "dkd"): "re-runs give 75.8-76.5 (mdistiller #7)",
          ("resnet32x4", "resnet8x4", "kd"): "same in " + _MDISTILLER}

# Students trained alone and teachers (RepDistiller README, "student" / "teacher" columns).
_STUDENTS = {"wrn_16_2": 73.26, "wrn_40_1": 71.98, "resnet20": 69.06, "resnet32": 71.14, "resnet8x4": 72.50,
             "vgg8_cifar": 70.36, "mobilenetv2_cifar": 64.60, "shufflev1_cifar": 70.50, "shufflev2_cifar": 71.82}
_TEACHER_TOP1 = {"wrn_40_2": 75.61, "resnet56": 72.34, "resnet110": 74.31, "resnet32x4": 79.42, "vgg13_cifar": 74.64,
                 "resnet50_cifar": 79.34}


def _method_table() -> dict[tuple[str, str | None, str, str], Published]:
    table: dict[tuple[str, str | None, str, str], Published] = {
        ("cifar100", None, s, "baseline"): Published(top1, _REPDISTILLER) for s, top1 in _STUDENTS.items()
    }
    for rows, source in ((_REPDISTILLER_ROWS, _REPDISTILLER), (_MDISTILLER_ROWS, _MDISTILLER)):
        for (t, s), methods in rows.items():
            for m, top1 in methods.items():
                note = _NOTES.get((t, s, m))
                table[("cifar100", t, s, m)] = Published(top1, source + ("; " + note if note else ""))
    return table


_METHODS = _method_table()
_TEACHERS = {("cifar100", t): Published(top1, _REPDISTILLER) for t, top1 in _TEACHER_TOP1.items()}


def _dataset_key(dataset: str) -> str:
    """``CIFAR-100``, ``cifar_100`` and ``cifar100`` are the same dataset."""
    return dataset.lower().replace("-", "").replace("_", "")


def published_result(dataset: str, teacher_model: str, student: str, method_name: str) -> Published | None:
    """The published top-1 of a (teacher, student, method) cell, or ``None`` when none is known."""
    ds = _dataset_key(dataset)
    return _METHODS.get((ds, teacher_model, student, method_name)) or _METHODS.get(
        (ds, None, student, method_name)
    )


def published_teacher(dataset: str, teacher_model: str) -> Published | None:
    """The published top-1 of a teacher, or ``None`` when none is known."""
    return _TEACHERS.get((_dataset_key(dataset), teacher_model))
