"""Evaluation: top-1 / top-5 on a split, student-teacher agreement, retrieval mAP."""

from __future__ import annotations

import torch
import torch.nn as nn

from kdbench.data.shards import Split
from kdbench.data.views import render
from kdbench.meta import DataInfo


@torch.inference_mode()
def predict(
    model: nn.Module, split: Split, data: DataInfo, image_size: int, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Logits of ``model`` on every image of ``split`` (whole images, no augmentation), ``float32 [N, C]`` on CPU."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(split), batch_size):
        x = render(split.images[start : start + batch_size].to(device), None, None, image_size, data.mean, data.std)
        out.append(model(x.contiguous(memory_format=torch.channels_last)).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent for each k (k clipped to the number of classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return {k: 100.0 * hit[:, : min(k, logits.shape[1])].any(1).float().mean().item() for k in ks}


def agreement(student_logits: torch.Tensor, teacher_pred: torch.Tensor) -> float:
    """Percent of images on which the student's top-1 equals the teacher's."""
    return 100.0 * (student_logits.argmax(1) == teacher_pred).float().mean().item()
