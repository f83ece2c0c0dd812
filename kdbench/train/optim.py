"""Optimizer and learning-rate schedule from the protocol (never from a method)."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from kdbench.config import Protocol


def build_optimizer(params: Iterable[torch.nn.Parameter], p: Protocol) -> torch.optim.Optimizer:
    params = [q for q in params if q.requires_grad]
    if p.optimizer == "sgd":
        return torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, nesterov=p.nesterov, weight_decay=p.weight_decay)
    return torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)


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
