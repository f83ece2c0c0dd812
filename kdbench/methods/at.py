"""AT: Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of Convolutional
Neural Networks via Attention Transfer", ICLR 2017 (arXiv 1612.03928).

The spatial attention map of a feature map ``A [C, H, W]`` is ``Q = mean_c |A_c|^p`` flattened to ``H * W``
and L2-normalised; the student matches the teacher's maps at several stages:
``ce_weight * CE + beta * sum_stages mean_{batch, positions} (Q_s - Q_t)^2 [+ kd_weight * KD]``.

Defaults are RepDistiller's CIFAR-100 recipe (``distiller_zoo/AT.py``;
``--distill attention -r 1 -a 0 -b 1000``): p = 2, beta = 1000, CE 1, no KD term, over every stage of the
CIFAR ResNets (RepDistiller's ``feat[1:-1]``: three stages). Stages are paired by index from the end:
``feature[-1]`` with ``feature[-1]``, ``feature[-2]`` with ``feature[-2]``, ... for ``num_stages`` stages, so
a 4-block ViT and a 3-stage CNN pair their last three maps. Where the two maps of a pair differ in size, the
larger is adaptive-average-pooled to the smaller before the attention maps are taken (RepDistiller does the
same, for square maps); sizes are read at run time, so teacher maps pooled by the cache policy work too. ViT
token grids arrive as NCHW maps, so a ViT on either side works.

Deviations from the paper:
  * The loss form is RepDistiller's: the squared difference of the normalised maps averaged over batch and
    positions, times beta = 1000. The paper writes ``beta / 2 * || Q_s/|Q_s| - Q_t/|Q_t| ||_p`` with beta =
    1000 divided by the number of map elements and the batch size; RepDistiller's constant was tuned for its
    form, which we keep so that the CRD-protocol numbers are comparable.
  * ``mean`` over channels instead of ``sum`` (identical after normalisation), and ``|A|^p`` for any ``p``
    (identical to RepDistiller's ``A^p`` for the default p = 2).

Search space: beta log-uniform in [100, 10000] (one decade either side of the paper's 1000). The stages are
structural, p selects the attention function (the paper's ablation; p = 2 its choice), ce_weight stays 1
and the KD term stays off (tuning kd_weight would add a teacher tap), so none of them is tuned.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F

from kdbench.methods.base import DistillMethod, LossOutput, cross_entropy, register_method
from kdbench.methods.kd import optional_kd_term
from kdbench.models import ModelInfo
from kdbench.space import around
from kdbench.taps import feature_tap


def attention_map(f: torch.Tensor, p: float) -> torch.Tensor:
    """The L2-normalised spatial attention map ``mean_c |f_c|^p``.

    Args:
        f: ``[B, C, H, W]``.
        p: Exponent.

    Returns:
        ``[B, H * W]``, unit L2 norm per sample.
    """
    return F.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1)


def at_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float) -> torch.Tensor:
    """Attention-transfer loss of one pair of maps: the mean squared difference of the attention maps, after
    adaptive-average-pooling the larger map (per side) to the smaller size.

    Args:
        f_s: ``[B, C_s, H_s, W_s]``.
        f_t: ``[B, C_t, H_t, W_t]``.
        p: Exponent of :func:`attention_map`.

    Returns:
        Scalar.
    """
    h, w = min(f_s.shape[-2], f_t.shape[-2]), min(f_s.shape[-1], f_t.shape[-1])
    if f_s.shape[-2:] != (h, w):
        f_s = F.adaptive_avg_pool2d(f_s, (h, w))
    if f_t.shape[-2:] != (h, w):
        f_t = F.adaptive_avg_pool2d(f_t, (h, w))
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


@dataclass(frozen=True)
class ATConfig:
    """Attributes: num_stages (pairs ``feature[-1]`` ... ``feature[-num_stages]``), p (exponent), beta
    (weight of the summed stage losses), ce_weight, kd_weight and tau (optional KD term; 0 = off)."""

    num_stages: int = 3
    p: float = 2.0
    beta: float = 1000.0
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    tau: float = 4.0

    def validate(self) -> None:
        if self.num_stages < 1:
            raise ValueError(f"method 'at': parameter 'num_stages' must be >= 1, got {self.num_stages}")
        if self.p <= 0:
            raise ValueError(f"method 'at': parameter 'p' must be > 0, got {self.p}")
        if self.tau <= 0:
            raise ValueError(f"method 'at': parameter 'tau' must be > 0, got {self.tau}")


def _stage_taps(cfg: ATConfig) -> list[str]:
    return [feature_tap(-i) for i in range(1, cfg.num_stages + 1)]


@register_method
class AT(DistillMethod):
    name = "at"
    Config = ATConfig
    search_space = MappingProxyType({"beta": around(1000.0, 10.0)})
    reference = "Zagoruyko & Komodakis 2017, Paying More Attention to Attention, ICLR 2017, arXiv:1612.03928"

    @classmethod
    def teacher_taps(cls, cfg: ATConfig) -> frozenset[str]:
        return frozenset(_stage_taps(cfg)) | ({"logits"} if cfg.kd_weight > 0 else frozenset())

    @classmethod
    def student_taps(cls, cfg: ATConfig) -> frozenset[str]:
        return frozenset(_stage_taps(cfg)) | {"logits"}

    @classmethod
    def compatibility(cls, cfg: ATConfig, teacher: ModelInfo | None, student: ModelInfo) -> str | None:
        if teacher is None:
            return "AT needs a teacher"
        for who, info in (("teacher", teacher), ("student", student)):
            n = len(info.feature_shapes)
            if n < cfg.num_stages:
                return (
                    f"AT pairs the last {cfg.num_stages} spatial feature maps, but {who} {info.name} has "
                    f"only {n} feature stages (lower num_stages)"
                )
        return None

    def loss(self, student, teacher, targets, ctx) -> LossOutput:
        cfg = self.cfg
        s = student["logits"]
        stage_losses = []
        for tap in _stage_taps(cfg):
            f_s = student[tap]
            stage_losses.append(at_loss(f_s, teacher[tap].to(f_s.dtype), cfg.p))
        terms = {
            "ce": cfg.ce_weight * cross_entropy(s, targets),
            "at": cfg.beta * torch.stack(stage_losses).sum(),
        }
        terms.update(optional_kd_term(s, teacher, cfg.kd_weight, cfg.tau))
        return LossOutput.from_terms(terms)
