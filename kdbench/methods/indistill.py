"""InDistill: Sarridis, Koutlis, Kordopatis-Zilos, Kompatsiaris & Papadopoulos, "InDistill: Information
flow-preserving knowledge distillation for model compression", WACV 2025 (arXiv 2205.10003); official code
``gsarridis/InDistill`` (the 2022 version: ``prune.py``, ``kd_from_aux_to_student.py``).

The teacher's intermediate layers are pruned to the student's widths by L1-norm structured channel pruning,
without fine-tuning, and the student learns them one at a time, shallow to deep, with an MSE loss (the
"information flow" warm-up), then its embedding with PKT for the rest of training. Exactly one term is active
at any time:

====================  ======================================================================
phase                 loss
====================  ======================================================================
layer l (0-based)     ``mse_weight * MSE(S_l(x), P_l(x))``, ``a + 1 + l`` epochs each (a = 2: 3, 4, 5)
embedding             ``pkt_weight * PKT(S_emb(x), T_emb(x))`` (:func:`kdbench.methods.pkt.pkt_loss`)
====================  ======================================================================

plus ``ce_weight * CE`` throughout when ``ce_weight > 0`` (0 by default, as the official code).

Pruned targets from the cache. ``P_l`` is the output of the teacher's layer l with its producing conv pruned
(``torch.nn.utils.prune.ln_structured(n=1, dim=0)``, as ``utils/utils.py: prune_model_l1_structured``) down
to the student's width ``c_l``, and the zero channels removed; as in the official code (``get_features`` with
``pruned_layers``) each pruned layer is fed the *unpruned* teacher's previous activations. Let ``K_l`` be the
kept output channels of the pruned conv (sorted). Then ``P_l(x) == feature[l](x)[:, K_l]`` exactly when

1. the pruned conv is the last op producing the tap that mixes channels: everything between its output and
   the tap acts per channel (BN in eval mode with its own statistics, ReLU, pooling), or adds a tensor that
   is indexed with the same ``K_l`` (a ResNet stage's last block: ``relu(bn2(conv2(h)) + shortcut(x))``,
   the official ``PreActBlock.forward(idxs)`` indexes the shortcut the same way); and
2. nothing *after* the tap is pruned for this target (each target only needs its own layer pruned; the
   student never sees the pruned layer's successors), and nothing *before* it is (the previous layer is the
   unpruned teacher's, as in the official code).

Output channel ``c`` of a conv depends only on filter ``c`` (and bias ``c``), so removing other filters
leaves it unchanged; per-channel ops then map the kept channels exactly as before. This holds for every
kdbench conv net (``cnn_*``: the stage ends conv-BN-ReLU; CIFAR ResNets and WRNs: the stage's last block's
``conv2``, its BN and the shortcut sum, then the WRN's final per-channel BN-ReLU), which are the teachers
:meth:`InDistill.compatibility` accepts (``kdbench.models.STAGED_CNNS``); it does not hold in general (a
LayerNorm over channels after the conv, as in ConvNeXt, mixes them). So the method reads the teacher's
ordinary cached ``feature[i]`` taps (shared with FitNet / AT stores) and keeps ``K_l``, computed once, before
training, from the teacher's weights (:meth:`bind_teacher_weights`, which the harness calls whenever the job
loads a teacher; the teacher is not run, so the targets stay cached). ``K_l`` is stored in the buffers
``kept_<l>`` of the method and returned by :meth:`audit` (written to the run record's provenance).

Curriculum length. The official schedule is per epoch on a 70-epoch run (60 at lr 1e-3, 10 at 1e-4): layer 0
in epochs 0-2, layer 1 in 3-6, layer 2 in 7-11, PKT from epoch 12. We keep that fraction of training
(``reference_epochs = 70``): the phase boundaries are at ``sum_{k<=l}(a + 1 + k) * num_epochs /
reference_epochs`` epochs, compared with the fractional epoch ``step / steps_per_epoch``, so that on a
70-epoch protocol the schedule is the official one exactly (integer boundaries 3, 7, 12) and on the 3-epoch
Fashion-MNIST protocol the warm-up still happens (the first ~0.51 epochs). Set ``reference_epochs`` to the
protocol's epochs for the absolute official lengths (methods.md §4.6's alternative).

Deviations from the paper:
  * No auxiliary network: the (pruned) targets come from the benchmark's teacher itself, whose widths must be
    >= the student's. The official code first distils the teacher into an auxiliary of 2x the student's
    widths (PKT, 50 epochs) and prunes that; WACV's auxiliary is optional for large gaps. A TAKD-style
    assistant could provide it; not done here.
  * Pruned BN (OUR CHOICE, methods.md §4.4): the teacher's own BN in eval mode (its gamma, beta and running
    statistics, sliced by ``K_l``), which makes the targets per-sample and cacheable. The official code
    copies only gamma, resets beta and the running statistics, re-initialises the conv bias and never calls
    ``eval()``, so its targets are batch-standardised, batch-dependent maps.
  * PKT: kdbench's PKT (cosine kernel, KL, mean over the B x B entries; :mod:`kdbench.methods.pkt`), not the
    official two-kernel (cosine + ``1 / (1 + euclidean)``) symmetric divergence.
  * Loss weights: the official code weights every term by 1 and trains with Adam, whose steps do not depend
    on a constant loss scale when one term is active. The optimiser belongs to kdbench's protocol (the same
    for every method), where the scale matters, so the PKT term takes kdbench's PKT weight (30000,
    RepDistiller's) and the MSE term 1.
  * The official code re-creates the Adam optimiser every epoch (state reset). kdbench's harness owns the
    optimiser and its schedule and a method cannot re-create it; not followed.
  * No label loss by default (official); ``ce_weight > 0`` adds CE throughout (for a top-1 column; the
    official student's classifier is never trained, it is evaluated by retrieval only).
  * The schedule is scaled to the protocol's length and moves per step, not per epoch (above).
  * Paired layers: the last ``num_layers`` feature stages of both models (``feature[-num_layers]`` ...
    ``feature[-1]``), stage by stage; the official code pairs the three conv blocks of two 3-block CNNs.
  * Spatial sizes (OUR CHOICE): when a paired student and teacher map differ in size, the larger is
    adaptive-average-pooled to the smaller (also covers teacher maps that the cache policy pooled).
  * The official embedding is FC1 after ReLU; ours is each model's ``pre_logits`` (global-average-pooled last
    stage for kdbench's CNNs).

Search space: mse_weight log-uniform in [0.1, 10] and pkt_weight in [3000, 300000] (one decade either side
of 1 and of PKT's 30000). The paired layers and the curriculum (num_layers, a, reference_epochs) are
structural or tied to the epoch count, and ce_weight stays 0 (tuning it would add the student's logits tap).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from kdbench.methods.base import DistillMethod, LossOutput, cross_entropy, register_method
from kdbench.methods.pkt import pkt_loss
from kdbench.models import STAGED_CNNS, ModelInfo
from kdbench.space import around
from kdbench.taps import feature_tap

_logger = logging.getLogger(__name__)


# --- pure functions ---------------------------------------------------------------------------------------


def match_spatial(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pools the larger of two maps to the smaller's size, per side.

    Args:
        a: ``[B, C, H1, W1]``.
        b: ``[B, C, H2, W2]``.

    Returns:
        Both maps at ``(min(H1, H2), min(W1, W2))`` (unchanged where already that size).
    """
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))

    def pool(x: torch.Tensor) -> torch.Tensor:
        return x if tuple(x.shape[-2:]) == size else F.adaptive_avg_pool2d(x, size)

    return pool(a), pool(b)


def layer_mse(student_map: torch.Tensor, teacher_map: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """MSE between a student map and the teacher map's kept channels (the pruned layer's output), spatial
    sizes matched by :func:`match_spatial`, averaged over every element.

    Args:
        student_map: ``[B, c, H, W]``.
        teacher_map: ``[B, C, H', W']`` with ``C >= c``.
        kept: ``int64 [c]``, the teacher channels the pruned layer keeps.

    Returns:
        Scalar.
    """
    s, t = match_spatial(student_map, teacher_map.index_select(1, kept))
    return F.mse_loss(s, t)


def curriculum_phase(
    epoch_pos: float, num_epochs: int, num_layers: int, a: int, reference_epochs: int
) -> int:
    """The active phase at a (fractional) epoch: layer ``l`` in ``[0, num_layers)``, or ``num_layers`` for the
    embedding (PKT) phase.

    Layer ``l`` lasts ``(a + 1 + l) * num_epochs / reference_epochs`` epochs, layers back to back from epoch 0.

    Args:
        epoch_pos: Epochs done, e.g. ``step / steps_per_epoch``.
        num_epochs: The protocol's epochs.
        num_layers: Layers in the warm-up.
        a: The official schedule's ``a`` (2: 3, 4, 5 epochs at the reference length).
        reference_epochs: The training length the official lengths refer to (70).
    """
    scale = num_epochs / reference_epochs
    end = 0.0
    for layer in range(num_layers):
        end += (a + 1 + layer) * scale
        if epoch_pos < end:
            return layer
    return num_layers


def l1_kept_channels(conv: nn.Conv2d, keep: int) -> torch.Tensor:
    """The output channels that L1-norm structured pruning keeps, from PyTorch's own pruning (as the official
    ``prune_model_l1_structured``: ``prune.ln_structured(weight, amount, n=1, dim=0)``), on a copy of ``conv``.

    Args:
        conv: The layer to prune (left unchanged).
        keep: Output channels to keep, ``1 <= keep <= conv.out_channels``.

    Returns:
        ``int64 [keep]``, ascending.
    """
    if not 1 <= keep <= conv.out_channels:
        raise ValueError(f"cannot keep {keep} of {conv.out_channels} channels")
    work = copy.deepcopy(conv).cpu().float()
    prune.ln_structured(work, "weight", amount=conv.out_channels - keep, n=1, dim=0)
    alive = work.weight_mask.flatten(1).abs().sum(1) > 0
    kept = torch.nonzero(alive).flatten()
    if kept.numel() != keep:  # pragma: no cover - PyTorch prunes exactly `amount` channels
        raise RuntimeError(f"pruning kept {kept.numel()} channels, expected {keep}")
    return kept


def prune_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, kept: torch.Tensor) -> tuple[nn.Conv2d, nn.Module]:
    """The pruned layer with its zero channels removed: a conv with only the ``kept`` filters (all input
    channels) and the BN sliced alike (affine parameters and running statistics).

    Args:
        conv: The unpruned conv (groups = 1).
        bn: Its BN, or ``None``.
        kept: ``int64 [c]`` output channels to keep.
    """
    new = nn.Conv2d(conv.in_channels, len(kept), conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None).to(conv.weight.device, conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(conv.weight[kept])
        if conv.bias is not None:
            new.bias.copy_(conv.bias[kept])
    if bn is None:
        return new, nn.Identity()
    nbn = nn.BatchNorm2d(len(kept), eps=bn.eps, momentum=bn.momentum, affine=bn.affine).to(conv.weight.device)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(bn, name)
            if src is not None:
                getattr(nbn, name).copy_(src[kept])
    nbn.train(bn.training)
    return new, nbn


def producing_conv(stage: nn.Module) -> nn.Conv2d:
    """The conv whose output channels the stage's output keeps one for one: the last ``Conv2d`` of the stage
    outside residual shortcuts (kdbench's ``cnn_*``, CIFAR ResNets and WRNs).

    Args:
        stage: A feature stage of a model in ``kdbench.models.STAGED_CNNS``.
    """
    convs = [m for name, m in stage.named_modules() if isinstance(m, nn.Conv2d) and "shortcut" not in name]
    if not convs:
        raise ValueError("the stage has no convolution to prune")
    return convs[-1]


# --- config and method ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InDistillConfig:
    """Attributes: num_layers (paired feature stages, the last ones of both models), a (curriculum: layer
    ``l`` lasts ``a + 1 + l`` epochs at ``reference_epochs``), reference_epochs (the official run's length;
    the schedule is scaled to the protocol's), mse_weight, pkt_weight, ce_weight (0: no label loss)."""

    num_layers: int = 3
    a: int = 2
    reference_epochs: int = 70
    mse_weight: float = 1.0
    pkt_weight: float = 30000.0
    ce_weight: float = 0.0

    def validate(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"method 'indistill': parameter 'num_layers' must be >= 1, got {self.num_layers}")
        if self.a < 0:
            raise ValueError(f"method 'indistill': parameter 'a' must be >= 0, got {self.a}")
        if self.reference_epochs <= 0:
            raise ValueError(
                f"method 'indistill': parameter 'reference_epochs' must be > 0, got {self.reference_epochs}"
            )


@register_method
class InDistill(DistillMethod):
    name = "indistill"
    Config = InDistillConfig
    search_space = MappingProxyType({"mse_weight": around(1.0, 10.0), "pkt_weight": around(30000.0, 10.0)})
    reference = (
        "Sarridis et al. 2025, InDistill: Information flow-preserving knowledge distillation for model "
        "compression, WACV 2025, arXiv:2205.10003"
    )

    @staticmethod
    def _stages(cfg: InDistillConfig) -> list[int]:
        return list(range(-cfg.num_layers, 0))

    @classmethod
    def teacher_taps(cls, cfg: InDistillConfig) -> frozenset[str]:
        return frozenset({"pre_logits"} | {feature_tap(i) for i in cls._stages(cfg)})

    @classmethod
    def student_taps(cls, cfg: InDistillConfig) -> frozenset[str]:
        logits = {"logits"} if cfg.ce_weight > 0 else set()
        return frozenset({"pre_logits"} | logits | {feature_tap(i) for i in cls._stages(cfg)})

    @classmethod
    def compatibility(cls, cfg: InDistillConfig, teacher: ModelInfo | None, student: ModelInfo) -> str | None:
        if teacher is None:
            return "InDistill needs a teacher"
        if teacher.name not in STAGED_CNNS:
            return (f"InDistill's cached pruned targets are exact only for kdbench's staged CNN teachers"
                    f" (cnn_*, CIFAR ResNets, WRNs); teacher {teacher.name} is not one")
        if student.family != "cnn":
            return f"InDistill needs a student with CNN stages; {student.name} is a {student.family}"
        n = cfg.num_layers
        for who, info in (("teacher", teacher), ("student", student)):
            if len(info.feature_shapes) < n:
                return f"{who} {info.name} has {len(info.feature_shapes)} feature stages; InDistill pairs {n}"
        for i in cls._stages(cfg):
            c_s, c_t = student.feature_shapes[i][0], teacher.feature_shapes[i][0]
            if c_s > c_t:
                return (f"stage {i}: student {student.name} has {c_s} channels, more than teacher"
                        f" {teacher.name}'s {c_t}; pruning cannot widen a layer")
        return None

    def __init__(self, cfg: InDistillConfig, *, teacher: ModelInfo | None, student: ModelInfo, data) -> None:
        super().__init__(cfg, teacher=teacher, student=student, data=data)
        reason = self.compatibility(cfg, teacher, student)
        if reason:
            raise ValueError(f"method 'indistill': {reason}")
        for j, i in enumerate(self._stages(cfg)):
            # Filled by bind_teacher_weights; -1 marks "not bound yet".
            self.register_buffer(f"kept_{j}", torch.full((student.feature_shapes[i][0],), -1, dtype=torch.long))
        self._bound = False

    def bind_teacher_weights(self, teacher: nn.Module) -> None:
        """Prunes each paired teacher stage's producing conv to the student's width (L1, no fine-tuning) and
        keeps the indices of the surviving channels. The module is not kept."""
        n = len(teacher.feature_info)
        for j, i in enumerate(self._stages(self.cfg)):
            stage = teacher.get_submodule(teacher.feature_info[i % n]["module"])
            kept_buf = getattr(self, f"kept_{j}")
            kept = l1_kept_channels(producing_conv(stage), kept_buf.numel())
            kept_buf.copy_(kept.to(kept_buf.device))
        self._bound = True
        _logger.info("indistill: kept teacher channels %s", self.audit()["kept_channels"])

    def audit(self) -> dict:
        """The kept teacher channels per paired stage (``feature[i]`` -> indices)."""
        return {"kept_channels": {feature_tap(i): getattr(self, f"kept_{j}").tolist()
                                  for j, i in enumerate(self._stages(self.cfg))}}

    def phase(self, ctx) -> int:
        """The active phase of a step (:func:`curriculum_phase` at ``ctx.step / ctx.steps_per_epoch``)."""
        cfg = self.cfg
        return curriculum_phase(ctx.step / max(1, ctx.steps_per_epoch), ctx.num_epochs, cfg.num_layers, cfg.a,
                                cfg.reference_epochs)

    def loss(self, student, teacher, targets, ctx) -> LossOutput:
        if not self._bound:
            raise RuntimeError("method 'indistill': the pruned channels are unknown; the harness must call "
                               "bind_teacher_weights(teacher) before training")
        cfg = self.cfg
        f_s = student["pre_logits"]
        phase = self.phase(ctx)
        zero = f_s.new_zeros(())
        terms = {"mse": zero, "pkt": zero}  # the same keys every step: the loop averages them per epoch
        if phase < cfg.num_layers:
            tap = feature_tap(self._stages(cfg)[phase])
            s_map = student[tap]
            terms["mse"] = cfg.mse_weight * layer_mse(s_map, teacher[tap].to(s_map.dtype), getattr(self, f"kept_{phase}"))
        else:
            terms["pkt"] = cfg.pkt_weight * pkt_loss(f_s, teacher["pre_logits"].to(f_s.dtype))
        if cfg.ce_weight > 0:
            terms["ce"] = cfg.ce_weight * cross_entropy(student["logits"], targets)
        return LossOutput.from_terms(terms, metrics={"phase": float(phase)})
