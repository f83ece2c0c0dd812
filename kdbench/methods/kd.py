"""KD: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NIPS DL workshop 2015
(arXiv 1503.02531).

Loss: ``ce_weight * CE(student, y) + kd_weight * tau^2 * KL(softmax(t / tau) || softmax(s / tau))``, with the
KL averaged over the batch. Defaults are the CRD / RepDistiller CIFAR-100 protocol (tau = 4, weights 0.1 /
0.9).

Deviations from the paper: none (the paper fixes no weights; we take RepDistiller's).

Search space: tau uniform in [1, 8] (around RepDistiller's 4) and kd_weight log-uniform in [0.09, 9] (one
decade either side of 0.9); ce_weight stays 0.1, since kd_weight sets the KD/CE balance and the learning rate
(a shared knob) the overall scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import torch
import torch.nn.functional as F

from kdbench.methods.base import DistillMethod, LossOutput, cross_entropy, register_method
from kdbench.space import Uniform, around


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """``tau^2 * KL(p_t || p_s)`` at temperature ``tau``, averaged over the batch.

    Args:
        student_logits: ``[B, C]``.
        teacher_logits: ``[B, C]``.
        tau: Temperature.
    """
    log_ps = F.log_softmax(student_logits / tau, dim=-1)
    log_pt = F.log_softmax(teacher_logits / tau, dim=-1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * tau**2


def optional_kd_term(
    student_logits: torch.Tensor, teacher: Mapping[str, torch.Tensor], weight: float, tau: float
) -> dict[str, torch.Tensor]:
    """The optional logit-KD term of a method whose main loss is elsewhere (feature methods):
    ``{"kd": weight * kd_loss(student, teacher["logits"], tau)}`` (:func:`kd_loss`, the
    teacher's logits cast to the student's dtype) when ``weight > 0``, else ``{}`` without reading
    ``teacher["logits"]`` (so the method declares that tap only when ``weight > 0``).

    Args:
        student_logits: ``[B, C]``.
        teacher: The teacher taps.
        weight: Weight of the KD term (``0``: off).
        tau: Temperature.
    """
    if not weight > 0:
        return {}
    return {"kd": weight * kd_loss(student_logits, teacher["logits"].to(student_logits.dtype), tau)}


@dataclass(frozen=True)
class KDConfig:
    """Attributes: tau (temperature), ce_weight, kd_weight."""

    tau: float = 4.0
    ce_weight: float = 0.1
    kd_weight: float = 0.9

    def validate(self) -> None:
        if self.tau <= 0:
            raise ValueError(f"method 'kd': parameter 'tau' must be > 0, got {self.tau}")


@register_method
class KD(DistillMethod):
    name = "kd"
    Config = KDConfig
    search_space = MappingProxyType({"tau": Uniform(1.0, 8.0), "kd_weight": around(0.9, 10.0)})
    reference = "Hinton et al. 2015, Distilling the Knowledge in a Neural Network, arXiv:1503.02531"

    def loss(self, student, teacher, targets, ctx) -> LossOutput:
        s = student["logits"]
        return LossOutput.from_terms(
            {
                "ce": self.cfg.ce_weight * cross_entropy(s, targets),
                "kd": self.cfg.kd_weight * kd_loss(s, teacher["logits"], self.cfg.tau),
            }
        )
