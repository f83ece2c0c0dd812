"""CRD: Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020 (arXiv 1910.10699);
official code ``HobbitLong/RepDistiller`` (``crd/criterion.py``, ``crd/memory.py``).

Linear embeddings map the pooled features (``pre_logits``) of both models to ``feat_dim`` and L2-normalise
them. Two memory banks hold a momentum average of every training sample's student and teacher embedding. With
the teacher embedding of sample ``i`` as anchor, the student memory row of ``i`` is the positive and ``K``
other rows are negatives (and symmetrically with the student as anchor); each side is scored with
``exp(<anchor, row> / nce_t) / Z`` and trained with the NCE objective of the paper's Eq. 18 (noise
distribution uniform over the ``N`` training samples):

``ce_weight * CE + weight * (NCE_student_anchor + NCE_teacher_anchor) [+ kd_weight * KD]``.

Defaults are RepDistiller's CIFAR-100 recipe (``train_student.py``, ``--distill crd -r 1 -a 0 -b 0.8``):
feat_dim 128, nce_k 16384 negatives, nce_t 0.07, memory momentum nce_m 0.5, weight 0.8, CE 1, KD 0
(``kd_weight = 1`` gives RepDistiller's CRD+KD, ``-a 1``).

State and determinism: the memory banks and the normalisation constants ``Z`` (set from the first batch, as in
RepDistiller) are registered buffers, not parameters, so they are saved with the method but are not counted by
:meth:`extra_parameters` (only the two embeddings are). The banks are updated inside :meth:`loss` in training
mode only, out of place (one copy of each bank per step), because the step's scores keep them for backward.
``K`` is clipped to ``num_train - 1``. Negatives are drawn from a ``torch.Generator`` seeded from
``(base seed, ctx.step)``, where the base seed is drawn once from the global RNG when the method is built, so
the run seed fixes every negative and a step can be replayed exactly. ``ctx.index`` (the batch's rows in the
training split, ``Requirements(sample_index=True)``) addresses the banks.

Deviations from the paper:
  * Negatives are drawn uniformly (with replacement) from all other training samples. RepDistiller's default
    ``--mode exact`` draws them from samples of *other classes* through its dataset class; a method here does
    not see the labels of the whole training split (and with mixup a view has two labels).
  * The memory banks are initialised from a generator seeded by the base seed (RepDistiller uses the global
    RNG), with RepDistiller's distribution ``U(-s, s)``, ``s = 1 / sqrt(feat_dim / 3)``.

Search space: weight log-uniform in [0.08, 8] (one decade either side of the paper's 0.8) and nce_t in
[0.035, 0.14] (a factor 2 either side of 0.07: contrastive temperatures are sensitive; OUR CHOICE). feat_dim
and nce_k size the embeddings and the memory, nce_m is the memory's update rule, ce_weight stays 1 and the KD
term stays off (tuning kd_weight would add a teacher tap): none of them is tuned.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdbench.methods.base import (
    DistillMethod,
    LossOutput,
    Requirements,
    cross_entropy,
    register_method,
)
from kdbench.methods.kd import optional_kd_term
from kdbench.models import ModelInfo
from kdbench.space import around

_logger = logging.getLogger(__name__)


def contrast_scores(
    anchor: torch.Tensor, memory: torch.Tensor, rows: torch.Tensor, tau: float
) -> torch.Tensor:
    """Unnormalised NCE scores ``exp(<memory[rows[b, k]], anchor[b]> / tau)``.

    Computed as ``anchor @ memory.T`` then gathered when the bank is small enough (``N <= (K + 1) * D``: less
    memory than RepDistiller's gather of ``[B, K + 1, D]`` rows), else by gathering the rows; same values.

    Args:
        anchor: ``[B, D]`` embeddings (unit norm).
        memory: ``[N, D]`` memory bank (a constant).
        rows: ``int64 [B, K + 1]`` rows of ``memory`` per anchor, the positive first.
        tau: Temperature.

    Returns:
        ``[B, K + 1]``.
    """
    n, d = memory.shape
    if n <= rows.shape[1] * d:
        dots = (anchor @ memory.t()).gather(1, rows)
    else:
        dots = torch.bmm(memory[rows], anchor.unsqueeze(2)).squeeze(2)
    return torch.exp(dots / tau)


def nce_loss(probs: torch.Tensor, num_data: int, eps: float = 1e-7) -> torch.Tensor:
    """The NCE objective of CRD (paper Eq. 18, RepDistiller's ``ContrastLoss``), summed over the positive and
    the ``K`` negatives and averaged over the batch; the noise distribution is uniform,
    ``P_n = 1 / num_data``.

    Args:
        probs: ``[B, K + 1]`` normalised scores, the positive in column 0.
        num_data: Size ``N`` of the training split.
        eps: Stabiliser.

    Returns:
        Scalar.
    """
    m = probs.shape[1] - 1
    noise = m / float(num_data)
    p_pos, p_neg = probs[:, 0], probs[:, 1:]
    log_d1 = torch.log(p_pos / (p_pos + noise + eps))
    log_d0 = torch.log(noise / (p_neg + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / probs.shape[0]


@dataclass(frozen=True)
class CRDConfig:
    """Attributes: feat_dim (embedding width), nce_k (negatives per anchor), nce_t (temperature), nce_m
    (memory momentum), weight (of the CRD term), ce_weight, kd_weight and tau (optional KD term; 0 = off)."""

    feat_dim: int = 128
    nce_k: int = 16384
    nce_t: float = 0.07
    nce_m: float = 0.5
    weight: float = 0.8
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    tau: float = 4.0

    def validate(self) -> None:
        if self.feat_dim < 1:
            raise ValueError(f"method 'crd': parameter 'feat_dim' must be >= 1, got {self.feat_dim}")
        if self.nce_k < 1:
            raise ValueError(f"method 'crd': parameter 'nce_k' must be >= 1, got {self.nce_k}")
        if self.nce_t <= 0:
            raise ValueError(f"method 'crd': parameter 'nce_t' must be > 0, got {self.nce_t}")
        if not 0 <= self.nce_m < 1:
            raise ValueError(f"method 'crd': parameter 'nce_m' must be in [0, 1), got {self.nce_m}")
        if self.tau <= 0:
            raise ValueError(f"method 'crd': parameter 'tau' must be > 0, got {self.tau}")


_SEED_MASK = (1 << 63) - 1


@register_method
class CRD(DistillMethod):
    name = "crd"
    Config = CRDConfig
    search_space = MappingProxyType({"weight": around(0.8, 10.0), "nce_t": around(0.07, 2.0)})
    reference = "Tian et al. 2020, Contrastive Representation Distillation, ICLR 2020, arXiv:1910.10699"

    @classmethod
    def teacher_taps(cls, cfg: CRDConfig) -> frozenset[str]:
        return frozenset({"pre_logits"} | ({"logits"} if cfg.kd_weight > 0 else set()))

    @classmethod
    def student_taps(cls, cfg: CRDConfig) -> frozenset[str]:
        return frozenset({"logits", "pre_logits"})

    @classmethod
    def requirements(cls, cfg: CRDConfig) -> Requirements:
        return Requirements(sample_index=True)

    @classmethod
    def compatibility(cls, cfg: CRDConfig, teacher: ModelInfo | None, student: ModelInfo) -> str | None:
        return "CRD needs a teacher" if teacher is None else None

    def __init__(self, cfg: CRDConfig, *, teacher: ModelInfo | None, student: ModelInfo, data) -> None:
        super().__init__(cfg, teacher=teacher, student=student, data=data)
        if teacher is None:
            raise ValueError("method 'crd': needs a teacher")
        n = int(data.num_train)
        if n < 2:
            raise ValueError(
                f"method 'crd': the training split has {n} samples; the memory bank needs at least 2"
            )
        self.num_data = n
        self.num_negatives = min(cfg.nce_k, n - 1)
        if self.num_negatives < cfg.nce_k:
            _logger.info("crd: nce_k=%d clipped to %d (training split of %d samples)", cfg.nce_k, n - 1, n)
        self.embed_s = nn.Linear(student.num_features, cfg.feat_dim)
        self.embed_t = nn.Linear(teacher.num_features, cfg.feat_dim)
        seed = int(torch.randint(0, 1 << 62, (1,)).item())  # follows the run's global seed
        g = torch.Generator().manual_seed(seed)
        stdv = 1.0 / math.sqrt(cfg.feat_dim / 3)
        self.register_buffer("base_seed", torch.tensor(seed, dtype=torch.int64))
        self.register_buffer("memory_s", torch.rand(n, cfg.feat_dim, generator=g).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("memory_t", torch.rand(n, cfg.feat_dim, generator=g).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("z", torch.full((2,), -1.0))  # Z of the student-anchor and teacher-anchor scores

    def sample_rows(self, index: torch.Tensor, step: int) -> torch.Tensor:
        """The memory rows of a batch: the sample itself, then ``K`` negatives drawn uniformly from the other
        rows by a generator seeded from ``(base seed, step)``.

        Args:
            index: ``int64 [B]`` rows of the batch in the training split.
            step: Global step.

        Returns:
            ``int64 [B, K + 1]`` on ``index``'s device.
        """
        seed = (int(self.base_seed.item()) * 1_000_003 + int(step) * 7_919 + 1) & _SEED_MASK
        g = torch.Generator().manual_seed(seed)
        pos = index.detach().to("cpu", torch.int64)
        r = torch.randint(0, self.num_data - 1, (len(pos), self.num_negatives), generator=g)
        neg = r + (r >= pos[:, None]).long()  # skips the positive: uniform over the other N - 1 rows
        return torch.cat([pos[:, None], neg], dim=1).to(index.device)

    def loss(self, student, teacher, targets, ctx) -> LossOutput:
        cfg = self.cfg
        if ctx.index is None:
            raise ValueError("method 'crd' requires sample_index: the step context carries no ctx.index")
        index = ctx.index.long()
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= self.num_data):
            raise ValueError(
                f"method 'crd': ctx.index must lie in [0, {self.num_data}) (rows of the training split)"
            )
        s = student["logits"]
        dtype = self.memory_s.dtype
        v_s = F.normalize(self.embed_s(student["pre_logits"].to(self.embed_s.weight.dtype)), dim=1).to(dtype)
        v_t = F.normalize(self.embed_t(teacher["pre_logits"].to(self.embed_t.weight.dtype)), dim=1).to(dtype)
        rows = self.sample_rows(index, ctx.step)
        out_s = contrast_scores(v_s, self.memory_t, rows, cfg.nce_t)  # student anchor, teacher memory
        out_t = contrast_scores(v_t, self.memory_s, rows, cfg.nce_t)  # teacher anchor, student memory
        with torch.no_grad():
            first = torch.stack([out_s.mean(), out_t.mean()]) * self.num_data
            self.z.copy_(torch.where(self.z < 0, first, self.z))
            z = self.z.clone()
        crd = nce_loss(out_s / z[0], self.num_data) + nce_loss(out_t / z[1], self.num_data)
        if self.training:
            # Out of place: the scores above saved the banks for their backward pass.
            with torch.no_grad():
                m = cfg.nce_m
                new_s = F.normalize(self.memory_s[index] * m + v_s.detach() * (1 - m), dim=1)
                new_t = F.normalize(self.memory_t[index] * m + v_t.detach() * (1 - m), dim=1)
                self.memory_s = self.memory_s.index_put((index,), new_s)
                self.memory_t = self.memory_t.index_put((index,), new_t)
        terms = {"ce": cfg.ce_weight * cross_entropy(s, targets), "crd": cfg.weight * crd.to(s.dtype)}
        terms.update(optional_kd_term(s, teacher, cfg.kd_weight, cfg.tau))
        return LossOutput.from_terms(terms)
