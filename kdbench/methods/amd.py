"""AMD: Han, Wang, Dianat, Rabbani, Rao, Fang, Guan, Huang & Liu, "AMD: Automatic Multi-step Distillation of
Large-scale Vision Models", ECCV 2024 (arXiv 2407.04208). No official code was found.

AMD distils teacher -> teacher assistant (TA) -> student, where the TA is *searched*: the teacher is pruned
into a grid of candidates between the student's and the teacher's size, the candidates are optimised jointly
with shared weights, and one is selected by the paper's "negative performance-scale derivative" (NPSD)
criterion. The workflow runs the search as rules (:mod:`kdbench.tasearch`: prune + joint training -> select ->
fine-tune the selected TA -> cache the TA -> distil), with an oracle audit of the selection; this class is the
loss of the last two steps and the declarations that plan them.

Loss (TA fine-tuning and TA -> student): ``ce_weight * CE + kd_weight * tau^2 * KL(p_T || p_S) +
feat_weight * MSE(W f_S, f_T)`` on the last feature stage, ``W`` a 1x1 convolution (the student's channels to
the teacher's), spatial sizes matched as FitNet does. The joint search uses the same three terms per
candidate, with ``W`` the selection of the teacher channels the candidate kept (it is the teacher, pruned).

Defaults (all OUR CHOICE, methods.md §1.5: the paper's values were not found): grid step 0.1, sandwich of the
largest candidate plus 2 random ones per step, joint, fine-tune and oracle runs each a third of the protocol's
epochs, 3 oracle seeds per candidate, tau 1, weights 1 / 1 / 1.

Deviations from the paper (its formulas and hyper-parameters could not be verified; methods.md §1.2):
  * Selection is ``npsd-approx`` (:func:`kdbench.tasearch.npsd_approx`, methods.md §1.3: the smallest
    candidate whose accuracy loss per unit of scale, from the next larger candidate, is at most the grid's
    average slope), not the paper's exact NPSD; it is labelled so in every output.
  * Grid: scales ``k * grid_step`` strictly between the table's largest student and the teacher (for a student
    at 10% of the teacher this is the paper's 20%, ..., 90%), one grid per (table, teacher) so that every
    student of the table shares the search.
  * Pruning: L2 group magnitude (``torch-pruning``) with one uniform keep ratio per candidate over every
    channel group; kdbench's staged CNN teachers only (conv channels; no ViT head pruning yet).
  * Joint training: the full teacher is not part of the sandwich (it is the frozen reference); the candidates'
    BatchNorm statistics are recomputed on training views after joint training (as slimmable networks do).
  * The oracle audit is ours (the paper has none): every candidate distilled into each student for the oracle
    epochs on ``oracle_seeds`` seeds (seed k the same init and data order for every candidate: paired), and
    :func:`kdbench.tasearch.audit` names a best candidate only when it beats every other one with a paired 95%
    interval that excludes 0; the selection's stability re-applies ``npsd-approx`` to the joint accuracies
    perturbed by their binomial evaluation noise (:func:`kdbench.tasearch.pick_stability`). ``oracle_seeds``
    and ``oracle_epochs`` change only the audit, so they are left out of every key (``audit_params``).

Search space: kd_weight and feat_weight log-uniform in [0.1, 10] (one decade either side of our 1) and tau
uniform in [1, 4] (around our 1), for the TA -> student step only: the searched assistant is built once with
the configured values, and the grid, sandwich and stage epochs are structural or tied to the epoch count.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.methods.base import SEARCHED_ASSISTANT, DistillMethod, LossOutput, cross_entropy, register_method
from kdbench.methods.fitnet import resize_to
from kdbench.methods.kd import kd_loss
from kdbench.models import STAGED_CNNS, ModelInfo, split_pruned_name
from kdbench.space import Uniform, around
from kdbench.taps import feature_tap

FEATURE = feature_tap(-1)


def amd_terms(
    logits: torch.Tensor,
    feature: torch.Tensor,
    t_logits: torch.Tensor,
    t_feature: torch.Tensor,
    targets,
    cfg: AMDConfig,
) -> dict[str, torch.Tensor]:
    """AMD's three weighted terms for one network, its feature already mapped to the teacher's channels.

    Args:
        logits: ``[B, C]`` of the network trained.
        feature: ``[B, C_t, H, W]``, its last stage in the teacher's channels (projected or selected).
        t_logits: ``[B, C]`` teacher logits.
        t_feature: ``[B, C_t, H', W']`` teacher last stage.
        targets: The batch's :class:`~kdbench.methods.base.Targets`.
        cfg: Weights and temperature.
    """
    t_feature = t_feature.to(feature.dtype)
    return {
        "ce": cfg.ce_weight * cross_entropy(logits, targets),
        "kd": cfg.kd_weight * kd_loss(logits, t_logits.to(logits.dtype), cfg.tau),
        "feat": cfg.feat_weight * F.mse_loss(resize_to(feature, t_feature.shape[-2:]), t_feature),
    }


@dataclass(frozen=True)
class AMDConfig:
    """Attributes: grid_step (candidate scales are its multiples), sandwich (random candidates per joint step
    besides the largest), joint_epochs / finetune_epochs / oracle_epochs (``None``: a third of the protocol's
    epochs, at least 1), oracle_seeds (seeds of each candidate's oracle run; 0: no oracle runs, the audit then
    has the search's numbers and the pick's stability only), bn_batches (training batches that recompute a
    candidate's BatchNorm statistics), tau, ce_weight, kd_weight, feat_weight."""

    grid_step: float = 0.1
    sandwich: int = 2
    joint_epochs: int | None = None
    finetune_epochs: int | None = None
    oracle_epochs: int | None = None
    oracle_seeds: int = 3
    bn_batches: int = 20
    tau: float = 1.0
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    feat_weight: float = 1.0

    def validate(self) -> None:
        if not 0 < self.grid_step < 1:
            raise ValueError(f"method 'amd': parameter 'grid_step' must be in (0, 1), got {self.grid_step}")
        if self.sandwich < 0 or self.bn_batches < 1 or self.tau <= 0 or self.oracle_seeds < 0:
            raise ValueError(
                "method 'amd': parameters 'sandwich' >= 0, 'oracle_seeds' >= 0, 'bn_batches' >= 1 and 'tau' > 0"
                " are required"
            )
        for name in ("joint_epochs", "finetune_epochs", "oracle_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"method 'amd': parameter {name!r} must be >= 1 (or null), got {value}")

    def epochs(self, stage: str, protocol_epochs: int) -> int:
        """Epochs of a search stage (``joint``, ``finetune`` or ``oracle``)."""
        value = getattr(self, f"{stage}_epochs")
        return value if value is not None else max(1, round(protocol_epochs / 3))


@register_method
class AMD(DistillMethod):
    name = "amd"
    Config = AMDConfig
    audit_params = frozenset({"oracle_epochs", "oracle_seeds"})
    search_space = MappingProxyType(
        {"kd_weight": around(1.0, 10.0), "feat_weight": around(1.0, 10.0), "tau": Uniform(1.0, 4.0)}
    )
    reference = "Han et al. 2024, AMD: Automatic Multi-step Distillation of Large-scale Vision Models, ECCV 2024, arXiv:2407.04208"

    @classmethod
    def teacher_taps(cls, cfg: AMDConfig) -> frozenset[str]:
        return frozenset({"logits", FEATURE})

    @classmethod
    def student_taps(cls, cfg: AMDConfig) -> frozenset[str]:
        return frozenset({"logits", FEATURE})

    @classmethod
    def assistant(cls, cfg: AMDConfig) -> str | None:
        return SEARCHED_ASSISTANT

    @classmethod
    def compatibility(cls, cfg: AMDConfig, teacher: ModelInfo | None, student: ModelInfo) -> str | None:
        if teacher is not None and split_pruned_name(teacher.name)[0] not in STAGED_CNNS:
            return (
                f"AMD prunes the teacher's conv channels; {teacher.name} is not one of kdbench's staged CNNs"
                f" ({', '.join(sorted(STAGED_CNNS))})"
            )
        if teacher is not None and student.num_params >= teacher.num_params:
            return f"AMD needs a student smaller than the teacher ({student.num_params} >= {teacher.num_params} params)"
        return None

    def __init__(self, cfg: AMDConfig, *, teacher: ModelInfo | None, student: ModelInfo, data) -> None:
        super().__init__(cfg, teacher=teacher, student=student, data=data)
        c_s, c_t = student.feature_shapes[-1][0], teacher.feature_shapes[-1][0]
        self.proj = nn.Conv2d(c_s, c_t, 1, bias=False)

    def loss(self, student, teacher, targets, ctx) -> LossOutput:
        f = student[FEATURE]
        return LossOutput.from_terms(
            amd_terms(student["logits"], self.proj(f), teacher["logits"], teacher[FEATURE], targets, self.cfg)
        )
