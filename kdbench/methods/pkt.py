"""PKT: Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018
(arXiv 1803.10837).

Each batch defines, per sample, a conditional distribution over the other samples from a cosine-similarity
kernel, ``P[i, j] = K(x_i, x_j) / sum_j K(x_i, x_j)`` with ``K = (cos + 1) / 2``; the student matches the
teacher's distributions in KL divergence:
``ce_weight * CE + weight * mean_{i,j} P_t[i, j] log(P_t[i, j] / P_s[i, j]) [+ kd_weight * KD]``, on the
pooled features (``pre_logits``) of both models. No adapter is needed: the kernel compares samples within one
model, so the two feature widths may differ.

Defaults are RepDistiller's CIFAR-100 recipe (``distiller_zoo/PKT.py``, the author's code;
``--distill pkt -r 1 -a 0 -b 30000``): weight 30000, CE 1, no KD term, penultimate (pooled) features.

Deviations from the paper: none in the loss, which is the authors' cosine-kernel implementation (including its
``mean`` rather than ``sum`` over the ``B x B`` entries and ``eps = 1e-7``).

Search space: weight log-uniform in [3000, 300000] (one decade either side of RepDistiller's 30000);
ce_weight stays 1 and the KD term stays off (tuning kd_weight would add a teacher tap).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch

from kdbench.methods.base import DistillMethod, LossOutput, cross_entropy, register_method
from kdbench.methods.kd import optional_kd_term
from kdbench.space import around


def cosine_kernel_probs(f: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Row-normalised cosine-similarity kernel ``(cos + 1) / 2`` of a batch of features.

    Args:
        f: ``[B, D]``.
        eps: Added to the norms.

    Returns:
        ``[B, B]``, rows summing to 1.
    """
    f = f / (f.norm(dim=1, keepdim=True) + eps)
    k = (f @ f.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """KL divergence between the teacher's and the student's kernel distributions, averaged over all ``B x B``
    entries.

    Args:
        f_s: ``[B, D_s]``.
        f_t: ``[B, D_t]``.
        eps: Stabiliser of the norms and of the log ratio.

    Returns:
        Scalar.
    """
    p_s = cosine_kernel_probs(f_s, eps)
    p_t = cosine_kernel_probs(f_t, eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


@dataclass(frozen=True)
class PKTConfig:
    """Attributes: weight (of the PKT term), ce_weight, kd_weight and tau (optional KD term; 0 = off)."""

    weight: float = 30000.0
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    tau: float = 4.0

    def validate(self) -> None:
        if self.tau <= 0:
            raise ValueError(f"method 'pkt': parameter 'tau' must be > 0, got {self.tau}")


@register_method
class PKT(DistillMethod):
    name = "pkt"
    Config = PKTConfig
    search_space = MappingProxyType({"weight": around(30000.0, 10.0)})
    reference = (
        "Passalis & Tefas 2018, Learning Deep Representations with Probabilistic Knowledge Transfer, "
        "ECCV 2018, "
        "arXiv:1803.10837"
    )

    @classmethod
    def teacher_taps(cls, cfg: PKTConfig) -> frozenset[str]:
        return frozenset({"pre_logits"} | ({"logits"} if cfg.kd_weight > 0 else set()))

    @classmethod
    def student_taps(cls, cfg: PKTConfig) -> frozenset[str]:
        return frozenset({"logits", "pre_logits"})

    def loss(self, student, teacher, targets, ctx) -> LossOutput:
        cfg = self.cfg
        s = student["logits"]
        f_s = student["pre_logits"]
        terms = {
            "ce": cfg.ce_weight * cross_entropy(s, targets),
            "pkt": cfg.weight * pkt_loss(f_s, teacher["pre_logits"].to(f_s.dtype)),
        }
        terms.update(optional_kd_term(s, teacher, cfg.kd_weight, cfg.tau))
        return LossOutput.from_terms(terms)
