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


_METHODS: dict[tuple[str, str | None, str, str], Published] = {
    # Students trained alone (RepDistiller README, "student" column).
    ("cifar100", None, "wrn_16_2", "baseline"): Published(73.26, _REPDISTILLER),
    ("cifar100", None, "wrn_40_1", "baseline"): Published(71.98, _REPDISTILLER),
    ("cifar100", None, "resnet20", "baseline"): Published(69.06, _REPDISTILLER),
    ("cifar100", None, "resnet32", "baseline"): Published(71.14, _REPDISTILLER),
    ("cifar100", None, "resnet8x4", "baseline"): Published(72.50, _REPDISTILLER),
    # resnet32x4 -> resnet8x4, the pair with the most published re-runs.
    ("cifar100", "resnet32x4", "resnet8x4", "kd"): Published(
        73.33, _REPDISTILLER + "; same in " + _MDISTILLER
    ),
    ("cifar100", "resnet32x4", "resnet8x4", "crd"): Published(75.51, _REPDISTILLER),
    ("cifar100", "resnet32x4", "resnet8x4", "dkd"): Published(
        76.32, _MDISTILLER + "; re-runs give 75.8-76.5 (mdistiller #7)"
    ),
    ("cifar100", "resnet32x4", "resnet8x4", "kd_dot"): Published(75.12, _MDISTILLER),
}

_TEACHERS: dict[tuple[str, str], Published] = {
    ("cifar100", "wrn_40_2"): Published(75.61, _REPDISTILLER),
    ("cifar100", "resnet56"): Published(72.34, _REPDISTILLER),
    ("cifar100", "resnet110"): Published(74.31, _REPDISTILLER),
    ("cifar100", "resnet32x4"): Published(79.42, _REPDISTILLER),
}


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
