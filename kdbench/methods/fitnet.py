"""FitNet: Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015
(arXiv 1412.6550).

A convolutional regressor maps the student's "guided" feature map onto the teacher's "hint" map and the
squared error between them is minimised:
``ce_weight * CE + hint_weight * MSE(r(F_s), F_t) [+ kd_weight * KD]``.

Defaults are RepDistiller's CIFAR-100 recipe (``scripts/run_cifar_distill.sh``:
``--distill hint -r 1 -a 0 -b 100``, ``--hint_layer 2``): CE 1, hint 100, no KD term, one stage.
RepDistiller's ``hint_layer = 2`` of its feature list ``[stem, stage1, stage2, stage3, pooled]`` is the output
of the second of three stages, which is ``feature[-2]`` here (the penultimate stage, for any depth of model).

One stage vs two stages: the paper trains in two stages — first the student up to the guided layer (plus the
regressor) on the hint loss alone, then the whole student with KD. RepDistiller (and mdistiller) add the hint
loss to the classification loss from the first step instead (one stage; its ``--init_epochs`` pre-training is
only used for AB, FT and FSP). The harness owns the training loop, so a method cannot add a stage; we
implement the one-stage form, which is also what the CRD benchmark numbers measure.

Deviations from the paper:
  * One stage, not two (above); the paper's KD stage becomes the optional ``kd_weight`` term (0 by default, as
    RepDistiller's ``-a 0``).
  * Regressor: 3x3 conv (stride 1, no bias: BN follows) + BN + activation, spatial sizes then matched at run
    time — adaptive average pooling when the regressed map is larger than the teacher's, bilinear
    interpolation when smaller — instead of RepDistiller's shape-specific strided / transposed / valid conv.
    Run-time matching also covers teacher maps that the cache policy pooled below the size in ``ModelInfo``.
  * Regressor activation: the paper requires the regressor to have the same non-linearity as the teacher's
    hint layer. ``regressor_act = "auto"`` uses ReLU for CNN teachers (as RepDistiller's ``ConvReg`` always
    does) and none for ViT teachers, whose token maps take negative values a ReLU could never match.

Search space: hint_weight log-uniform in [10, 1000] (one decade either side of RepDistiller's 100). The hint
stage and the regressor are structural, ce_weight stays 1, and the KD term stays off (tuning kd_weight would
add a teacher tap; tau only matters with it).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdbench.methods.base import DistillMethod, LossOutput, cross_entropy, register_method
from kdbench.methods.kd import optional_kd_term
from kdbench.models import ModelInfo
from kdbench.space import around
from kdbench.taps import feature_tap


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resizes feature maps spatially: adaptive average pooling when shrinking (both sides no larger than
    ``x``'s), bilinear interpolation otherwise; ``x`` itself when the size already matches.

    Args:
        x: ``[B, C, H, W]``.
        size: Target ``(h, w)``.

    Returns:
        ``[B, C, h, w]``.
    """
    h, w = int(size[0]), int(size[1])
    if x.shape[-2:] == (h, w):
        return x
    if x.shape[-2] >= h and x.shape[-1] >= w:
        return F.adaptive_avg_pool2d(x, (h, w))
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)


def hint_loss(regressed: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the regressed student map and the teacher's hint map, averaged over every
    element (RepDistiller's ``HintLoss``).

    Args:
        regressed: ``[B, C_t, H, W]``.
        teacher_map: ``[B, C_t, H, W]``.

    Returns:
        Scalar.
    """
    return F.mse_loss(regressed, teacher_map)


@dataclass(frozen=True)
class FitNetConfig:
    """Attributes: hint_stage (feature stage of both models, negative counts from the end), hint_weight,
    ce_weight, kd_weight and tau (optional KD term; 0 = off), regressor_act (``auto``, ``relu`` or
    ``none``)."""

    hint_stage: int = -2
    hint_weight: float = 100.0
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    tau: float = 4.0
    regressor_act: str = "auto"

    def validate(self) -> None:
        if self.regressor_act not in ("auto", "relu", "none"):
            raise ValueError(
                "method 'fitnet': parameter 'regressor_act' must be one of auto, relu, none; "
                f"got {self.regressor_act!r}"
            )
        if self.tau <= 0:
            raise ValueError(f"method 'fitnet': parameter 'tau' must be > 0, got {self.tau}")


def _stage_reason(info: ModelInfo, stage: int, who: str) -> str | None:
    n = len(info.feature_shapes)
    if n == 0:
        return f"{who} {info.name} exposes no feature maps"
    if not -n <= stage < n:
        return f"{who} {info.name} has {n} feature stages; stage {stage} does not exist"
    return None


@register_method
class FitNet(DistillMethod):
    name = "fitnet"
    Config = FitNetConfig
    search_space = MappingProxyType({"hint_weight": around(100.0, 10.0)})
    reference = "Romero et al. 2015, FitNets: Hints for Thin Deep Nets, ICLR 2015, arXiv:1412.6550"

    @classmethod
    def teacher_taps(cls, cfg: FitNetConfig) -> frozenset[str]:
        return frozenset({feature_tap(cfg.hint_stage)} | ({"logits"} if cfg.kd_weight > 0 else set()))

    @classmethod
    def student_taps(cls, cfg: FitNetConfig) -> frozenset[str]:
        return frozenset({"logits", feature_tap(cfg.hint_stage)})

    @classmethod
    def compatibility(cls, cfg: FitNetConfig, teacher: ModelInfo | None, student: ModelInfo) -> str | None:
        if teacher is None:
            return "FitNet needs a teacher"
        return _stage_reason(teacher, cfg.hint_stage, "teacher") or _stage_reason(
            student, cfg.hint_stage, "student"
        )

    def __init__(self, cfg: FitNetConfig, *, teacher: ModelInfo | None, student: ModelInfo, data) -> None:
        super().__init__(cfg, teacher=teacher, student=student, data=data)
        reason = self.compatibility(cfg, teacher, student)
        if reason:
            raise ValueError(f"method 'fitnet': {reason}")
        c_s = student.feature_shapes[cfg.hint_stage][0]
        c_t = teacher.feature_shapes[cfg.hint_stage][0]
        act = cfg.regressor_act
        if act == "auto":
            act = "relu" if teacher.family == "cnn" else "none"
        self.regressor = nn.Sequential(
            nn.Conv2d(c_s, c_t, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(c_t),
            nn.ReLU() if act == "relu" else nn.Identity(),
        )
        self.regressor_act = act

    def loss(self, student, teacher, targets, ctx) -> LossOutput:
        cfg = self.cfg
        tap = feature_tap(cfg.hint_stage)
        s = student["logits"]
        f_s = student[tap]
        f_t = teacher[tap].to(f_s.dtype)
        regressed = resize_to(self.regressor(f_s), f_t.shape[-2:])
        terms = {
            "ce": cfg.ce_weight * cross_entropy(s, targets),
            "hint": cfg.hint_weight * hint_loss(regressed, f_t),
        }
        terms.update(optional_kd_term(s, teacher, cfg.kd_weight, cfg.tau))
        return LossOutput.from_terms(terms)
