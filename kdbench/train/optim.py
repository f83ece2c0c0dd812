"""Optimizer and learning-rate schedule from the protocol (never from a method)."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from kdbench.config import Protocol


def build_optimizer(params: Iterable[torch.nn.Parameter], p: Protocol) -> torch.optim.Optimizer:
    """The protocol's optimizer over the trainable ``params``.

    With ``p.decoupled_weight_decay`` (``adamw``), PyTorch's ``weight_decay`` is ``p.weight_decay / p.lr``:
    PyTorch multiplies it by the group's learning rate ``p.lr * schedule(t)``, so each step shrinks the
    weights by ``schedule(t) * p.weight_decay`` (big_vision's ``-sched(t) * (lr * adam + wd * theta)``).
    With ``p.weight_decay_exclude_1d``, 1-d parameters (biases, norm scales/shifts) form a group without decay.
    """
    params = [q for q in params if q.requires_grad]
    wd = p.weight_decay / p.lr if p.decoupled_weight_decay else p.weight_decay
    groups: list[dict] | list[torch.nn.Parameter] = params
    if p.weight_decay_exclude_1d:
        decay, no_decay = [q for q in params if q.ndim > 1], [q for q in params if q.ndim <= 1]
        groups = [g for g in ({"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0})
                  if g["params"]]
    if p.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum, nesterov=p.nesterov, weight_decay=wd)
    return torch.optim.AdamW(groups, lr=p.lr, weight_decay=wd)


def lr_factor(p: Protocol, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the peak learning rate at a global step (linear warm-up, then the schedule)."""
    epoch = step / steps_per_epoch
    if p.warmup_epochs and epoch < p.warmup_epochs:
        return (step + 1) / (p.warmup_epochs * steps_per_epoch)
    if p.schedule == "cosine":
        total = (p.epochs - p.warmup_epochs) * steps_per_epoch
        done = step - p.warmup_epochs * steps_per_epoch
        return 0.5 * (1.0 + math.cos(math.pi * done / max(1, total)))
    if p.schedule == "step":
        return p.gamma ** sum(int(epoch) >= m for m in p.milestones)
    return 1.0
