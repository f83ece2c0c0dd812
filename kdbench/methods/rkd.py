"""RKD: Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019 (arXiv 1904.05068).

The student matches the teacher's *structure* of a batch of embeddings rather than the embeddings: pairwise
distances normalised by their mean (distance-wise loss) and the cosines of the angles formed by every triplet
(angle-wise loss), both compared with the Huber (smooth-L1) loss:
``ce_weight * CE + weight * (distance_weight * L_D + angle_weight * L_A) [+ kd_weight * KD]`` on
``pre_logits``. No adapter is needed (relations within one model are compared), so feature widths may differ.

Defaults are RepDistiller's CIFAR-100 recipe (``distiller_zoo/RKD.py``, ``RKDLoss(w_d=25, w_a=50)``;
``--distill rkd -r 1 -a 0 -b 1``): distance 25, angle 50, weight 1, CE 1, no KD term.

Deviations from the paper: the weights are RepDistiller's (25 / 50); the paper's metric-learning experiments
use lambda_D = 1, lambda_A = 2 (same 1 : 2 ratio), and its classification tables also report RKD combined with
KD (our optional ``kd_weight``, off by default as RepDistiller's ``-a 0``). The paper's classification weights
were not re-checked here; we keep RepDistiller's so that the numbers are comparable with the CRD benchmark.

Search space: distance_weight log-uniform in [2.5, 250] and angle_weight in [5, 500] (one decade either side
of RepDistiller's 25 / 50, independently, so the ratio varies too); ``weight`` only multiplies both and is not
tuned, ce_weight stays 1 and the KD term stays off (tuning kd_weight would add a teacher tap).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F

from kdbench.methods.base import DistillMethod, LossOutput, cross_entropy, register_method
from kdbench.methods.kd import optional_kd_term
from kdbench.space import around


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between all rows, with exact zeros on the diagonal.

    Args:
        e: ``[B, D]``.
        eps: Floor of the squared distances (keeps the square root differentiable).

    Returns:
        ``[B, B]``.
    """
    sq = e.pow(2).sum(dim=1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def rkd_distance_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Distance-wise RKD: smooth-L1 between the pairwise distances, each normalised by its mean off-diagonal
    (non-zero) distance.

    Args:
        f_s: ``[B, D_s]``.
        f_t: ``[B, D_t]``.

    Returns:
        Scalar.
    """
    d_t = pairwise_distances(f_t.flatten(1))
    d_t = d_t / d_t[d_t > 0].mean()
    d_s = pairwise_distances(f_s.flatten(1))
    d_s = d_s / d_s[d_s > 0].mean()
    return F.smooth_l1_loss(d_s, d_t)


def triplet_angles(e: torch.Tensor) -> torch.Tensor:
    """Cosines of the angles ``angle(e_i - e_j, e_k - e_j)`` for every ``(j, i, k)``.

    Args:
        e: ``[B, D]``.

    Returns:
        ``[B * B * B]``.
    """
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # [j, i, D]: e_i - e_j
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def rkd_angle_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Angle-wise RKD: smooth-L1 between the triplet-angle cosines.

    Args:
        f_s: ``[B, D_s]``.
        f_t: ``[B, D_t]``.

    Returns:
        Scalar.
    """
    return F.smooth_l1_loss(triplet_angles(f_s.flatten(1)), triplet_angles(f_t.flatten(1)))


@dataclass(frozen=True)
class RKDConfig:
    """Attributes: distance_weight, angle_weight, weight (of their sum), ce_weight, kd_weight and tau
    (optional KD term; 0 = off)."""

    distance_weight: float = 25.0
    angle_weight: float = 50.0
    weight: float = 1.0
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    tau: float = 4.0

    def validate(self) -> None:
        if self.tau <= 0:
            raise ValueError(f"method 'rkd': parameter 'tau' must be > 0, got {self.tau}")


@register_method
class RKD(DistillMethod):
    name = "rkd"
    Config = RKDConfig
    search_space = MappingProxyType(
        {"distance_weight": around(25.0, 10.0), "angle_weight": around(50.0, 10.0)}
    )
    reference = "Park et al. 2019, Relational Knowledge Distillation, CVPR 2019, arXiv:1904.05068"

    @classmethod
    def teacher_taps(cls, cfg: RKDConfig) -> frozenset[str]:
        return frozenset({"pre_logits"} | ({"logits"} if cfg.kd_weight > 0 else set()))

    @classmethod
    def student_taps(cls, cfg: RKDConfig) -> frozenset[str]:
        return frozenset({"logits", "pre_logits"})

    def loss(self, student, teacher, targets, ctx) -> LossOutput:
        cfg = self.cfg
        s = student["logits"]
        f_s = student["pre_logits"]
        f_t = teacher["pre_logits"].to(f_s.dtype)
        terms = {
            "ce": cfg.ce_weight * cross_entropy(s, targets),
            "distance": cfg.weight * cfg.distance_weight * rkd_distance_loss(f_s, f_t),
            "angle": cfg.weight * cfg.angle_weight * rkd_angle_loss(f_s, f_t),
        }
        terms.update(optional_kd_term(s, teacher, cfg.kd_weight, cfg.tau))
        return LossOutput.from_terms(terms)
