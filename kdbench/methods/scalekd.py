"""ScaleKD: Fan, Li, Liu & Yao, "ScaleKD: Strong Vision Transformers Could Be Excellent Teachers", NeurIPS 2024
(arXiv 2411.06786). Official code: ``deep-optimization/ScaleKD`` (an mmcls fork).

Three components, on the student's last two stages (``n - 1`` and ``n``):

* **Cross-attention projector (CAP)**: a student feature map ``[B, C_s, H, W]`` -> a conv stem
  (``Conv kxk -> BN -> ReLU``) plus a learned positional embedding -> multi-head cross-attention whose
  queries are either learned (``L_q = H_q * W_q`` embeddings of width ``C_t``) or supplied from outside, and
  whose keys/values are the stem's tokens -> ``y = LN(a) + MLP(LN(a))``. The output ``[B, L_q, C_t]`` lives in
  the teacher's token space; the query grid sets the output resolution.
* **Dual-view feature mimicking (DFM)**: per view its own CAP; the direct view compares channel-wise
  L2-normalised maps, ``alpha0 / B * sum (s_hat - t_hat)^2``; the alternative view does the same after removing
  every channel's spatial mean (the official code zeroes the (0, 0) coefficient of the 2-D DCT and inverts it,
  which is the same thing: :func:`remove_spatial_mean`).
* **Teacher parameter perception (TPP)**: the student's stage ``n - 1`` -> CAP (learned queries, the teacher's
  stage ``n - 1`` grid and width) -> the FROZEN teacher's last stage (its *tail*) -> compared (DFM) with the
  teacher's final features; the tail's outputs are the queries of the stage-``n`` CAPs, which are compared
  (DFM) with the teacher's final features too.
* Logit KD at tau = 1 with weights 0.5 (label CE) / 0.5 (KD).

Total: ``0.5 CE + 0.5 KD + [tpp_dir + tpp_alt] + [s4_dir + s4_alt]`` with ``alpha = (0.08, 0.06)`` for both
stages (methods.md §3.6).

Stage mapping (from model metadata, never from model names), :func:`stage_indices`:

* CNNs: the timm ``feature_info`` stages (kdbench's ``feature[i]`` taps); stage ``n`` = ``feature[-1]``,
  stage ``n - 1`` = ``feature[-2]``; the tail is the last stage module (``model.stages[-1]``, which starts
  with its downsampling) and the target is ``feature[-1]`` as is.
* Plain ViTs (timm ``VisionTransformer``, whose ``feature[i]`` is the output of block ``i``): the stages are the
  outputs of blocks ``ceil(D * k / 4) - 1`` for ``k = 1..4`` (duplicates dropped), i.e. the official
  ``[2, 5, 8, 11]`` for ``D = 12``, generalised by depth (``D = 6``: ``[1, 2, 4, 5]``; ``D = 4``: ``[0, 1, 2, 3]``;
  ``D = 3``: ``[0, 1, 2]``). The tail is every block after stage ``n - 1`` plus the final norm (``D = 12``:
  blocks 9-11 + norm), run on the patch tokens; the target is the teacher's final normed tokens, i.e. the
  final norm applied to the stored ``feature[-1]``.
* Taps are declared before any model exists, so the stage-``n - 1`` tap of each side is a parameter
  (``student_stage``, ``teacher_stage``; default ``-2``, right for every CNN and for kdbench's ViTs of depth
  3, 4 and 6); :meth:`ScaleKD.compatibility` refuses a model whose mapping disagrees and names the value to set
  (e.g. ``-4`` for a 12-block ViT).

The teacher's tail runs live (:func:`teacher_tail`): the method declares ``Requirements(live_teacher_tail=True)``,
so the harness hands it the teacher module while the declared teacher taps (logits, ``feature[-1]``, and
``feature[teacher_stage]`` without TPP) still come from the stores. The tail is frozen (``requires_grad``
False), kept in eval mode and never registered as a submodule (no optimiser, ``state_dict`` or ``.train()``
reaches it); gradients flow through it into the stage-``n - 1`` CAP and the student.

Deviations from the paper:
  * Teacher tail in eval mode: the official distiller leaves the teacher in train mode, so Swin's drop-path
    (0.1) is active in the targets and in the TPP tail; we need deterministic, cacheable targets.
  * ViT tails run on the patch tokens only (no class/register tokens); the official BEiT/ViT code paths are
    not reproduced token for token.
  * CAP query projection: the official ``Conv1x1 + ReLU`` on the query grid is written as the equivalent
    per-token ``Linear + ReLU``. Heads: ``C_t // head_dim`` rounded down to a divisor of ``C_t`` (at least 1),
    with ``head_dim = 64`` (the Swin-B/L value) instead of a per-teacher table.
  * The official code uses two FMD loss versions (v1 for ViT students, v2 for CNN students); we use v2 (the
    description above) for every student.
  * When the cache pooled the teacher's final map below its grid, the CAP/tail outputs are pooled to match,
    and for ViT teachers the final norm is applied to the pooled map.
  * Ablations: ``tpp = False`` gives the stage-``n - 1`` CAP learned queries against the teacher's stage
    ``n - 1`` (``feature[teacher_stage]``) and the stage-``n`` CAP learned queries; ``alt_view = False`` drops
    the alternative view (and its CAPs).

Search space: alpha_dir, alpha_alt and kd_weight log-uniform one decade either side of the paper's 0.08,
0.06 and 0.5, tau uniform in [1, 4] (around its 1); ce_weight stays 0.5, and the CAP's sizes and softmax
scale, the stages and the tpp / alt_view variants are structural, never tuned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from kdbench.methods.base import DistillMethod, LossOutput, Requirements, cross_entropy, register_method
from kdbench.methods.fitnet import resize_to
from kdbench.methods.kd import kd_loss
from kdbench.models import ModelInfo
from kdbench.space import Uniform, around
from kdbench.taps import feature_tap

# --- pure functions --------------------------------------------------------------------------------------


def remove_spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """Subtracts every channel's spatial mean: the same as zeroing the (0, 0) coefficient of the orthonormal
    2-D DCT-II over ``(H, W)`` and inverting it (the official "frequency" view).

    Args:
        x: ``[B, C, H, W]``.
    """
    return x - x.mean(dim=(-2, -1), keepdim=True)


def dfm_direct_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared distance of the channel-wise L2-normalised maps, summed and divided by the batch size
    (``= (1/B) * sum_{b,h,w} 2 (1 - cos)``), without the weight ``alpha0``.

    Args:
        student: ``[B, C, H, W]``.
        teacher: ``[B, C, H, W]``.
    """
    s = F.normalize(student, dim=1)
    t = F.normalize(teacher, dim=1)
    return (s - t).pow(2).sum() / student.shape[0]


def dfm_alt_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """:func:`dfm_direct_loss` of both maps with their spatial means removed (without the weight ``alpha1``)."""
    return dfm_direct_loss(remove_spatial_mean(student), remove_spatial_mean(teacher))


def tokens_to_map(tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """``[B, L, C]`` tokens -> ``[B, C, H, W]`` map (``L = H * W``)."""
    b, n, c = tokens.shape
    if n != hw[0] * hw[1]:
        raise ValueError(f"{n} tokens do not fill a {hw[0]}x{hw[1]} grid")
    return tokens.transpose(1, 2).reshape(b, c, hw[0], hw[1])


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` map -> ``[B, H * W, C]`` tokens."""
    return x.flatten(2).transpose(1, 2)


def _heads(width: int, head_dim: int) -> int:
    """The most heads of at least ``head_dim`` channels that divide ``width`` (at least 1)."""
    best = 1
    for h in range(1, width + 1):
        if width % h == 0 and width // h >= head_dim:
            best = h
    return best


# --- stage mapping and the teacher's tail ------------------------------------------------------------------


def stage_indices(info: ModelInfo) -> list[int]:
    """The stages ScaleKD distils from, as non-negative ``feature[i]`` indices of the model (see the module
    docstring): every feature stage for CNNs; blocks ``ceil(D * k / 4) - 1``, ``k = 1..4``, for ViTs."""
    n = len(info.feature_shapes)
    if info.family == "vit":
        return sorted({math.ceil(n * k / 4) - 1 for k in range(1, 5)}) if n else []
    return list(range(n))


def prev_stage_tap_index(info: ModelInfo) -> int | None:
    """Stage ``n - 1`` as a negative ``feature[i]`` index, or ``None`` with fewer than two stages."""
    stages = stage_indices(info)
    if len(stages) < 2:
        return None
    return stages[-2] - len(info.feature_shapes)


class TeacherTail:
    """The teacher's last stage as a frozen, eval-mode callable (not an ``nn.Module``: it must not be registered
    in the method, so no optimiser, ``state_dict`` or ``.train()`` ever reaches it).

    Attributes:
        kind: ``cnn`` or ``vit``.
        stages: ``feature[i]`` indices of the stages (non-negative).
        prev_tap: Tap of stage ``n - 1`` (the tail's input), negative index.
        final_tap: ``feature[-1]`` (the tail's output, before :meth:`finalize`).
    """

    def __init__(self, kind: str, modules: list[nn.Module], norm: nn.Module | None, stages: list[int],
                 num_features: int) -> None:
        self.kind = kind
        self._modules = modules
        self._norm = norm
        self.stages = tuple(stages)
        self.prev_tap = feature_tap(stages[-2] - num_features)
        self.final_tap = feature_tap(-1)
        for m in self.modules():
            m.eval()
            m.requires_grad_(False)

    def modules(self) -> list[nn.Module]:
        return self._modules + ([self._norm] if self._norm is not None else [])

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules() for p in m.parameters()]

    def _ensure_eval(self) -> None:
        for m in self.modules():
            if m.training:
                m.eval()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Runs the tail on a stage-``n - 1``-shaped map ``[B, C, H, W]`` and returns the final (normed) map.
        Gradients flow to ``x``; the tail's parameters never get any."""
        self._ensure_eval()
        if self.kind == "vit":
            hw = x.shape[-2:]
            t = map_to_tokens(x)
            for blk in self._modules:
                t = blk(t)
            return tokens_to_map(self._norm(t), (int(hw[0]), int(hw[1])))
        for m in self._modules:
            x = m(x)
        return x

    def finalize(self, final_map: torch.Tensor) -> torch.Tensor:
        """The teacher's final features from its ``feature[-1]`` tap: the final norm for ViTs (the stored tap is
        the last block's output), the map itself for CNNs."""
        if self.kind == "vit" and self._norm is not None:
            self._ensure_eval()
            with torch.no_grad():
                return tokens_to_map(self._norm(map_to_tokens(final_map)), tuple(final_map.shape[-2:]))
        return final_map


def teacher_tail(teacher: nn.Module) -> TeacherTail:
    """The tail of a teacher module and its taps (frozen and in eval mode; see :class:`TeacherTail`).

    Supports timm ``VisionTransformer`` (blocks after stage ``n - 1`` + ``norm``) and kdbench's staged CNNs
    (``stages[-1]``, one ``feature_info`` entry per stage).
    """
    if isinstance(teacher, VisionTransformer):
        depth = len(teacher.blocks)
        info = ModelInfo("teacher", "vit", 0, 0, tuple((0, 0, 0) for _ in range(depth)), 0)
        stages = stage_indices(info)
        if len(stages) < 2:
            raise ValueError(f"ScaleKD: a ViT teacher needs at least 2 blocks, this one has {depth}")
        return TeacherTail("vit", list(teacher.blocks[stages[-2] + 1 :]), teacher.norm, stages, depth)
    stages_mod = getattr(teacher, "stages", None)
    feature_info = getattr(teacher, "feature_info", None)
    if isinstance(stages_mod, nn.ModuleList) and isinstance(feature_info, list) and len(feature_info) == len(stages_mod):
        n = len(stages_mod)
        if n < 2:
            raise ValueError("ScaleKD: a CNN teacher needs at least 2 feature stages")
        return TeacherTail("cnn", [stages_mod[-1]], None, list(range(n)), n)
    raise ValueError(
        f"ScaleKD cannot find the last stage of a {type(teacher).__name__} teacher; supported: timm "
        "VisionTransformer and kdbench's staged CNNs (a 'stages' ModuleList matching 'feature_info')"
    )


# --- modules -----------------------------------------------------------------------------------------------


class CrossAttentionProjector(nn.Module):
    """CAP: a student map ``[B, C_s, H, W]`` -> teacher-space tokens ``[B, L_q, C_t]``.

    Args:
        in_chans: ``C_s``.
        in_hw: ``(H, W)`` of the student map (size of the positional embedding; resized at run time).
        out_chans: ``C_t``.
        query_hw: ``(H_q, W_q)`` of the learned queries, or ``None`` when queries are always supplied.
        head_dim: Channels per head (heads = :func:`_heads`).
        softmax_scale: Extra factor on the attention logits (official 5).
        stem_kernel: Kernel of the stem conv (official 3).
    """

    def __init__(self, in_chans: int, in_hw: tuple[int, int], out_chans: int, query_hw: tuple[int, int] | None,
                 head_dim: int = 64, softmax_scale: float = 5.0, stem_kernel: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, in_chans, stem_kernel, padding=stem_kernel // 2, bias=False),
            nn.BatchNorm2d(in_chans),
            nn.ReLU(),
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, in_chans, *in_hw))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.query_hw = query_hw
        self.queries = nn.Embedding(query_hw[0] * query_hw[1], out_chans) if query_hw is not None else None
        self.query_proj = nn.Linear(out_chans, out_chans)
        self.num_heads = _heads(out_chans, head_dim)
        self.scale = (out_chans // self.num_heads) ** -0.5 * softmax_scale
        self.q = nn.Linear(out_chans, out_chans)
        self.k = nn.Linear(in_chans, out_chans)
        self.v = nn.Linear(in_chans, out_chans)
        self.proj = nn.Linear(out_chans, out_chans)
        self.norm = nn.LayerNorm(out_chans)
        self.mlp = nn.Sequential(nn.Linear(out_chans, 4 * out_chans), nn.ReLU(), nn.Linear(4 * out_chans, out_chans))

    def forward(self, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """Args: x ``[B, C_s, H, W]``; queries ``[B, L_q, C_t]`` (input-dependent) or ``None`` (learned).

        Returns: ``[B, L_q, C_t]``."""
        b = x.shape[0]
        pos = self.pos_embed
        if pos.shape[-2:] != x.shape[-2:]:
            pos = F.interpolate(pos, size=x.shape[-2:], mode="bilinear", align_corners=False)
        kv = map_to_tokens(self.stem(x) + pos)  # [B, HW, C_s]
        if queries is None:
            if self.queries is None:
                raise ValueError("this CAP has no learned queries; pass queries")
            queries = self.queries.weight.unsqueeze(0).expand(b, -1, -1)
        q0 = F.relu(self.query_proj(queries))
        h = self.num_heads
        q = self.q(q0).unflatten(-1, (h, -1)).transpose(1, 2)  # [B, h, L_q, d]
        k = self.k(kv).unflatten(-1, (h, -1)).transpose(1, 2)  # [B, h, HW, d]
        v = self.v(kv).unflatten(-1, (h, -1)).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        a = self.proj((attn @ v).transpose(1, 2).flatten(2))  # [B, L_q, C_t], no residual (official)
        y = self.norm(a)
        return y + self.mlp(y)


# --- the method --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleKDConfig:
    """Attributes: alpha_dir / alpha_alt (DFM weights of both stages), ce_weight, kd_weight, tau (logit KD),
    tpp (teacher parameter perception; False: learned queries against the teacher's stage ``n - 1``),
    alt_view (the alternative DFM view), softmax_scale, head_dim, stem_kernel (CAP), student_stage and
    teacher_stage (the ``feature[i]`` tap of stage ``n - 1``; see the stage mapping)."""

    alpha_dir: float = 0.08
    alpha_alt: float = 0.06
    ce_weight: float = 0.5
    kd_weight: float = 0.5
    tau: float = 1.0
    tpp: bool = True
    alt_view: bool = True
    softmax_scale: float = 5.0
    head_dim: int = 64
    stem_kernel: int = 3
    student_stage: int = -2
    teacher_stage: int = -2

    def validate(self) -> None:
        if self.tau <= 0:
            raise ValueError(f"method 'scalekd': parameter 'tau' must be > 0, got {self.tau}")
        if self.head_dim < 1:
            raise ValueError(f"method 'scalekd': parameter 'head_dim' must be >= 1, got {self.head_dim}")
        if self.stem_kernel < 1 or self.stem_kernel % 2 == 0:
            raise ValueError(f"method 'scalekd': parameter 'stem_kernel' must be odd, got {self.stem_kernel}")
        for k in ("student_stage", "teacher_stage"):
            if getattr(self, k) >= -1:
                raise ValueError(f"method 'scalekd': parameter {k!r} must be <= -2 (a stage before the last)")


def _stage_reason(info: ModelInfo, stage: int, key: str, who: str) -> str | None:
    prev = prev_stage_tap_index(info)
    if prev is None:
        return f"ScaleKD needs at least 2 feature stages; {who} {info.name} has {len(stage_indices(info))}"
    if prev != stage:
        return (f"ScaleKD's stage n-1 of {who} {info.name} ({info.family}, {len(info.feature_shapes)} feature taps)"
                f" is feature[{prev}], not feature[{stage}]; set parameter {key}: {prev}")
    return None


@register_method
class ScaleKD(DistillMethod):
    name = "scalekd"
    Config = ScaleKDConfig
    search_space = MappingProxyType({
        "alpha_dir": around(0.08, 10.0),
        "alpha_alt": around(0.06, 10.0),
        "kd_weight": around(0.5, 10.0),
        "tau": Uniform(1.0, 4.0),
    })
    reference = ("Fan et al. 2024, ScaleKD: Strong Vision Transformers Could Be Excellent Teachers, NeurIPS 2024, "
                 "arXiv:2411.06786")

    @classmethod
    def teacher_taps(cls, cfg: ScaleKDConfig) -> frozenset[str]:
        taps = {"logits", feature_tap(-1)}
        if not cfg.tpp:
            taps.add(feature_tap(cfg.teacher_stage))
        return frozenset(taps)

    @classmethod
    def student_taps(cls, cfg: ScaleKDConfig) -> frozenset[str]:
        return frozenset({"logits", feature_tap(cfg.student_stage), feature_tap(-1)})

    @classmethod
    def requirements(cls, cfg: ScaleKDConfig) -> Requirements:
        return Requirements(live_teacher_tail=cfg.tpp)

    @classmethod
    def compatibility(cls, cfg: ScaleKDConfig, teacher: ModelInfo | None, student: ModelInfo) -> str | None:
        if teacher is None:
            return "ScaleKD needs a teacher"
        return _stage_reason(teacher, cfg.teacher_stage, "teacher_stage", "teacher") or _stage_reason(
            student, cfg.student_stage, "student_stage", "student"
        )

    def __init__(self, cfg: ScaleKDConfig, *, teacher: ModelInfo | None, student: ModelInfo, data) -> None:
        super().__init__(cfg, teacher=teacher, student=student, data=data)
        reason = self.compatibility(cfg, teacher, student)
        if reason:
            raise ValueError(f"method 'scalekd': {reason}")
        s3, s4 = student.feature_shapes[cfg.student_stage], student.feature_shapes[-1]
        t3, t4 = teacher.feature_shapes[cfg.teacher_stage], teacher.feature_shapes[-1]
        self.t3_hw, self.t4_hw = (t3[1], t3[2]), (t4[1], t4[2])
        views = ("dir", "alt") if cfg.alt_view else ("dir",)
        kw = dict(head_dim=cfg.head_dim, softmax_scale=cfg.softmax_scale, stem_kernel=cfg.stem_kernel)
        self.cap3 = nn.ModuleDict({v: CrossAttentionProjector(s3[0], s3[1:], t3[0], self.t3_hw, **kw) for v in views})
        q4 = None if cfg.tpp else self.t4_hw  # with TPP the stage-n queries come from the tail
        self.cap4 = nn.ModuleDict({v: CrossAttentionProjector(s4[0], s4[1:], t4[0], q4, **kw) for v in views})
        self._tail: list[TeacherTail] = []  # a list: never registered as a submodule
        self.tail_forward = 0  # samples the teacher's tail processed (each view counts)

    def live_teacher_module(self, teacher: nn.Module) -> None:
        self._tail[:] = [teacher_tail(teacher)]
        self.teacher_params = sum(p.numel() for p in teacher.parameters())

    def audit(self) -> dict:
        """The teacher tail's compute, for the run record (``provenance.method_audit``): samples it processed
        (each DFM view counts), its parameter count and the whole teacher's."""
        if not self._tail:
            return {}
        return {"teacher_tail_forward": self.tail_forward,
                "teacher_tail_params": sum(p.numel() for p in self._tail[0].parameters()),
                "teacher_params": self.teacher_params}

    @property
    def tail(self) -> TeacherTail:
        if not self._tail:
            raise RuntimeError("method 'scalekd' with tpp needs the teacher module (Requirements.live_teacher_tail)"
                               " but the harness did not hand it over")
        return self._tail[0]

    def loss(self, student, teacher, targets, ctx) -> LossOutput:
        cfg = self.cfg
        z_s = student["logits"]
        f3, f4 = student[feature_tap(cfg.student_stage)], student[feature_tap(-1)]
        t4 = teacher[feature_tap(-1)].to(f4.dtype)
        if cfg.tpp:
            t4 = self.tail.finalize(t4)
        terms = {
            "ce": cfg.ce_weight * cross_entropy(z_s, targets),
            "kd": cfg.kd_weight * kd_loss(z_s, teacher["logits"].to(z_s.dtype), cfg.tau),
        }
        dfm: dict[str, Callable] = {"dir": dfm_direct_loss, "alt": dfm_alt_loss}
        alpha = {"dir": cfg.alpha_dir, "alt": cfg.alpha_alt}
        for view, cap3 in self.cap3.items():
            u = tokens_to_map(cap3(f3), self.t3_hw)  # [B, C_t3, H_t3, W_t3]
            if cfg.tpp:
                g = self.tail(u)  # [B, C_t4, H_t4, W_t4], grads flow into cap3 and the student
                self.tail_forward += g.shape[0]
                terms[f"tpp_{view}"] = alpha[view] * dfm[view](resize_to(g, t4.shape[-2:]), t4)
                v = self.cap4[view](f4, map_to_tokens(g))
                v = tokens_to_map(v, tuple(g.shape[-2:]))
            else:
                t3 = teacher[feature_tap(cfg.teacher_stage)].to(f3.dtype)
                terms[f"s3_{view}"] = alpha[view] * dfm[view](resize_to(u, t3.shape[-2:]), t3)
                v = tokens_to_map(self.cap4[view](f4), self.t4_hw)
            terms[f"s4_{view}"] = alpha[view] * dfm[view](resize_to(v, t4.shape[-2:]), t4)
        return LossOutput.from_terms(terms)
