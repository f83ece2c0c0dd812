"""NKD: Yang, Zeng, Li, Zhang, Yuan & Li, "From Knowledge Distillation to Self-Knowledge Distillation: A Unified
Approach with Normalized Loss and Customized Soft Labels", ICCV 2023 (arXiv 2303.13005).

Loss: ``ce_weight * CE(s, y) + nkd_target + nkd_non_target`` with, for the label ``y`` of each image,
``nkd_target = -T_y * log S_y`` (teacher and student probabilities at temperature 1, the teacher's a constant)
and ``nkd_non_target = -gamma * tau^2 * sum_{i != y} N(T_i^tau) * log N(S_i^tau)``, where ``N(.)`` renormalises
the non-target probabilities (a softmax over the non-target logits at temperature ``tau``); both averaged over
the batch. Defaults are the paper's ImageNet values (tau = 1, gamma = 1.5) with the student's own CE at weight 1,
as in the authors' code (yzd-v/cls_KD, ``NKDLoss``).

Deviations from the paper: under mixup the target class is the view's dominant label (``labels`` where
``lam >= 0.5``, else the partner's), as the authors' code takes the arg-max of a mixed label.

Search space: tau uniform in [1, 4] (the paper uses 1 on ImageNet and up to 4 elsewhere) and gamma log-uniform
in [0.375, 6] (a factor 4 either side of 1.5); ce_weight stays 1 (the learning rate sets the overall scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F

from kdbench.methods.base import DistillMethod, LossOutput, cross_entropy
from kdbench.space import Uniform, around


def nkd_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, tau: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """NKD's target and non-target terms, each averaged over the batch.

    Args:
        student_logits: ``[B, C]``.
        teacher_logits: ``[B, C]`` (a constant).
        target: ``int64 [B]``, the class of each image.
        tau: Temperature of the non-target distributions.
        gamma: Weight of the non-target term.

    Returns:
        ``(target_term, non_target_term)``, two scalars.
    """
    b, c = student_logits.shape
    idx = target[:, None]
    t_y = F.softmax(teacher_logits, dim=-1).gather(1, idx).squeeze(1)
    log_s_y = F.log_softmax(student_logits, dim=-1).gather(1, idx).squeeze(1)
    target_term = -(t_y * log_s_y).mean()
    keep = torch.ones_like(student_logits, dtype=torch.bool).scatter_(1, idx, False)
    s_non = student_logits[keep].reshape(b, c - 1)
    t_non = teacher_logits[keep].reshape(b, c - 1)
    cross = (F.softmax(t_non / tau, dim=-1) * F.log_softmax(s_non / tau, dim=-1)).sum(-1).mean()
    return target_term, -gamma * tau**2 * cross


def dominant_label(labels: torch.Tensor, partner_labels: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """The label with the larger mixup weight (``labels`` where ``lam >= 0.5``)."""
    return torch.where(lam >= 0.5, labels, partner_labels)


@dataclass(frozen=True)
class NKDConfig:
    """Attributes: tau (non-target temperature), gamma (non-target weight), ce_weight (the student's CE)."""

    tau: float = 1.0
    gamma: float = 1.5
    ce_weight: float = 1.0

    def validate(self) -> None:
        if self.tau <= 0:
            raise ValueError(f"method 'nkd': parameter 'tau' must be > 0, got {self.tau}")


class NKD(DistillMethod):
    """Registered by this package's ``kdbench.methods`` entry point."""

    name = "nkd"
    Config = NKDConfig
    search_space = MappingProxyType({"tau": Uniform(1.0, 4.0), "gamma": around(1.5, 4.0)})
    reference = "Yang et al. 2023, From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach" \
        " with Normalized Loss and Customized Soft Labels, ICCV 2023, arXiv:2303.13005"

    def loss(self, student, teacher, targets, ctx) -> LossOutput:
        s = student["logits"]
        y = dominant_label(targets.labels, targets.partner_labels, targets.lam)
        target_term, non_target = nkd_terms(s, teacher["logits"].to(s.dtype), y, self.cfg.tau, self.cfg.gamma)
        ce = self.cfg.ce_weight * cross_entropy(s, targets)
        return LossOutput.from_terms({"ce": ce, "nkd_target": target_term, "nkd_non_target": non_target})
