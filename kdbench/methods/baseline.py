"""The student alone: cross-entropy on the protocol's views, no teacher.

Reference: the "student (w/o KD)" rows of every KD paper; trained on exactly the same views as every
KD method, so gains over it are due to the teacher alone.

Deviations from the paper: none.

Search space: empty (no hyper-parameters of its own; the learning rate and weight decay are the
protocol's shared knobs, tuned by the harness for every method alike).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from kdbench.methods.base import DistillMethod, LossOutput, cross_entropy, register_method


@dataclass(frozen=True)
class BaselineConfig:
    """No hyper-parameters."""


@register_method
class Baseline(DistillMethod):
    name = "baseline"
    Config = BaselineConfig
    reference = "Student trained alone with cross-entropy (the reference row of every table)."
    search_space = MappingProxyType({})

    @classmethod
    def teacher_taps(cls, cfg: BaselineConfig) -> frozenset[str]:
        return frozenset()

    def loss(self, student, teacher, targets, ctx) -> LossOutput:
        return LossOutput.from_terms({"ce": cross_entropy(student["logits"], targets)})
