"""FunMatch: Beyer, Zhai, Royer, Markeeva, Anil & Kolesnikov, "Knowledge distillation: A good teacher is
patient and consistent", CVPR 2022 (arXiv 2106.05237); official code ``google-research/big_vision``
(``configs/proj/distill/``, ``trainers/proj/distill/distill.py``).

Distillation as function matching: the student reproduces the teacher's whole output distribution on exactly
the (augmented, mixed) image the teacher sees. The only loss is

``tau^2 * KL(softmax(t / tau) || softmax(s / tau))``, averaged over the batch (``kd.kd_loss``),

with no label term: the labels are not used (their cross-entropy is returned as the metric ``ce`` only, as
big_vision logs it; the loop does not write method metrics to the epoch log yet). The paper's two principles
split between the method and the harness: *consistency* is what this method declares
(:meth:`FunMatch.teacher_view`); *patience* (very long schedules, AdamW with decoupled weight decay, gradient
clipping, warm-up + cosine) and function matching's mixup are the protocol of a table (``protocol.epochs``,
``optimizer: adamw``, ``decoupled_weight_decay``, ``weight_decay_exclude_1d``, ``grad_clip_norm``,
``warmup_epochs``, ``views.mixup: 1.0``), applied to every method of that table; see
``workflow/config/fashion-mnist-funmatch.yaml``.

The paper's consistency ablation is the parameter ``teacher_view``:

* ``same`` (default; "function matching", and "consistent teaching" in a table without mixup): the teacher's
  outputs on exactly the view the student sees, served from the per-view cache.
* ``other`` ("independent noise"): the teacher's outputs on another stored view of the same image, view
  ``(v + 1) mod V`` for the student's view ``v`` (its own crop, flip and mixup partner/lambda); needs
  ``protocol.views.count >= 2`` (the config check says so). Served from the same cache.
* ``clean`` ("fixed teacher"): one teacher output per image, on the un-augmented image (whole image, no flip,
  no mixup, rendered as for evaluation), while the student trains on augmented views. No store holds that
  view, so this variant runs the teacher live (``Requirements(live_teacher=True)``; its compute is counted).

"Consistent teaching" without mixup cannot share a table with FunMatch: mixup is the protocol's
(``views.mixup``, owned by the harness) and applies to every method of a table. It is ``funmatch`` with the
default ``teacher_view: same`` in a table whose protocol has ``views.mixup: 0``.

Deviations from the paper:
  * Mixup: big_vision draws one ``a ~ Beta(1, 1)`` per *batch*, ``a := max(a, 1 - a)``, and mixes image ``i``
    with image ``i - 1`` of the batch. kdbench's view recipe draws ``lambda = max(a, 1 - a)`` per *view*
    (counter-based, so that a cached view can be replayed) and the partner uniformly from the same *data
    shard* (another image of the shard, in its own view ``v``), with probability ``views.mixup`` (1.0 for the
    paper's setting). Lambda has the same distribution, but it is drawn per image instead of once per batch,
    and the partner is a random image of the same data shard instead of the batch neighbour (a random image
    of the whole training set).
  * Patience is approximated: the teacher's outputs are cached for V views per image, so a schedule with
    E > V epochs replays views (the run record and the leaderboard say so); the paper draws a fresh crop,
    flip, partner and lambda at every step of thousands of epochs.
  * Crops: kdbench's random-resized crop (``views.scale``/``ratio``) stands for the paper's inception crop
    (area 5-100%); small images need a larger minimum area (OUR CHOICE per config).
  * Ablation variants run under the table's protocol: with ``views.mixup > 0`` the ``other`` and ``clean``
    students also train on mixed views, and the ``clean`` teacher's output is that of the image itself (not
    mixed with the partner's). In the paper's ablation (Sec. 3, Fig. 3; as research/methods.md §2.2
    summarises it, function matching = consistent teaching + mixup) the other variants use crops without
    mixup; run them in a mixup-free table to compare them that way.
  * ``clean`` uses the whole image (the dataset's own framing, as evaluation does); the paper's fixed
    teachers also include a centre crop and a precomputed ensemble of crops.
  * No decay on 1-d parameters is the protocol's ``weight_decay_exclude_1d``; big_vision decays only
    ``kernel`` weights, so ViT position embeddings and class tokens (decayed here) are not decayed there.
  * One teacher (big_vision sums the losses of several teachers).

Search space: tau log-uniform in [1, 10] (1 on ImageNet, up to 10 in the paper's small-dataset configs,
methods.md §2.5); teacher_view is the ablation's variant (it changes the declared view), never tuned.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from kdbench.methods.base import (
    TEACHER_VIEWS,
    DistillMethod,
    LossOutput,
    Requirements,
    cross_entropy,
    register_method,
)
from kdbench.methods.kd import kd_loss
from kdbench.space import LogUniform


@dataclass(frozen=True)
class FunMatchConfig:
    """Attributes: tau (temperature; 1 in big_vision's ImageNet config), teacher_view (``same``, ``other`` or
    ``clean``: the consistency ablation, see the module docstring)."""

    tau: float = 1.0
    teacher_view: str = "same"

    def validate(self) -> None:
        if self.tau <= 0:
            raise ValueError(f"method 'funmatch': parameter 'tau' must be > 0, got {self.tau}")
        if self.teacher_view not in TEACHER_VIEWS:
            raise ValueError(
                f"method 'funmatch': parameter 'teacher_view' must be one of {', '.join(TEACHER_VIEWS)},"
                f" got {self.teacher_view!r}"
            )


@register_method
class FunMatch(DistillMethod):
    name = "funmatch"
    Config = FunMatchConfig
    search_space = MappingProxyType({"tau": LogUniform(1.0, 10.0)})
    reference = (
        "Beyer et al. 2022, Knowledge distillation: A good teacher is patient and consistent, CVPR 2022, "
        "arXiv:2106.05237"
    )

    @classmethod
    def teacher_view(cls, cfg: FunMatchConfig) -> str:
        return cfg.teacher_view

    @classmethod
    def requirements(cls, cfg: FunMatchConfig) -> Requirements:
        # Function matching is on the whole distribution: a top-k cache would flatten the tail.
        return Requirements(live_teacher=cfg.teacher_view == "clean", full_logits=True)

    def loss(self, student, teacher, targets, ctx) -> LossOutput:
        s = student["logits"]
        return LossOutput.from_terms(
            {"kd": kd_loss(s, teacher["logits"].to(s.dtype), self.cfg.tau)},
            metrics={"ce": float(cross_entropy(s.detach(), targets))},
        )
