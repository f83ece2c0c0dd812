"""Evaluation: logits and embeddings of a split (whole images), top-1 / top-5, student-teacher agreement.

Retrieval mAP over the embeddings of :func:`embed` is :func:`kdbench.retrieval.retrieval_map`.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn as nn

from kdbench import distributed
from kdbench.data.shards import Split
from kdbench.data.stream import StreamedSplit
from kdbench.data.views import render
from kdbench.meta import DataInfo
from kdbench.numerics import DEFAULT, Numerics
from kdbench.taps import compute_taps, normalize_tap, parse_tap


def _inputs(split: Split | StreamedSplit, data: DataInfo, image_size: int, batch_size: int,
            device: torch.device, part: tuple[int, int] | None = None) -> Iterator[torch.Tensor]:
    """The evaluation inputs of ``split`` in order, in batches: a split in memory rendered here on the device
    (whole images; ``part``: only the images ``[start, stop)``), a streamed one rendered by its stream
    (:meth:`StreamedSplit.eval_inputs`)."""
    if isinstance(split, StreamedSplit):
        for x in split.eval_inputs(data.mean, data.std, image_size, batch_size):
            yield x.to(device)
        return
    first, stop = (0, len(split)) if part is None else part
    for start in range(first, stop, batch_size):
        end = min(start + batch_size, stop)
        yield render(split.images[start:end].to(device), None, None, image_size, data.mean, data.std)


def _batched(
    forward: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, split: Split | StreamedSplit,
    data: DataInfo, image_size: int, batch_size: int, device: torch.device, numerics: Numerics,
) -> torch.Tensor:
    """``forward`` (a function of ``model``) on every image of ``split``, as evaluation renders them: whole
    images (fixed-size data) or the centre crop of :func:`~kdbench.data.views.eval_box` (variable-size data),
    no augmentation, resized to ``image_size`` and normalised; ``model`` in eval mode meanwhile; in the
    protocol's ``numerics`` (:mod:`kdbench.numerics`).

    In a data-parallel job (:mod:`kdbench.distributed`; a split in memory) each process computes a contiguous
    part of the split and the parts are gathered in order: every process gets the outputs of every image,
    each computed once (no padding). Every process must call it (a collective).

    Returns:
        The outputs of the batches concatenated, ``float32`` on CPU.
    """
    world = distributed.world()
    parallel = world.size > 1 and not isinstance(split, StreamedSplit)
    part = distributed.eval_part(len(split)) if parallel else None
    was_training = model.training
    model.eval()
    out = []
    try:
        for x in _inputs(split, data, image_size, batch_size, device, part):
            out.append(numerics.run(forward, x).cpu())
        if parallel and not out:  # a process with an empty part still gathers, with the outputs' shape
            out = [numerics.run(forward, next(_inputs(split, data, image_size, 1, device, (0, 1)))).cpu()[:0]]
    finally:
        model.train(was_training)
    return distributed.gather_rows(torch.cat(out)) if parallel else torch.cat(out)


@torch.inference_mode()
def predict(
    model: nn.Module, split: Split | StreamedSplit, data: DataInfo, image_size: int, batch_size: int,
    device: torch.device, numerics: Numerics = DEFAULT,
) -> torch.Tensor:
    """Logits of ``model`` on every image of ``split`` (whole images, no augmentation), ``float32 [N, C]`` on CPU,
    computed in ``numerics`` (the protocol's, :mod:`kdbench.numerics`)."""
    return _batched(model, model, split, data, image_size, batch_size, device, numerics)


@torch.inference_mode()
def embed(
    model: nn.Module, split: Split | StreamedSplit, data: DataInfo, image_size: int, batch_size: int, device: torch.device, tap: str,
    numerics: Numerics = DEFAULT,
) -> torch.Tensor:
    """The embedding of every image of ``split`` at ``tap``, rendered exactly as :func:`predict` renders them.

    ``pre_logits`` and ``logits`` are vectors as they are; a feature map ``feature[i]`` (``[B, C, H, W]``, ViT
    token grids included) is pooled to a vector by global average pooling over its spatial positions.

    Args:
        model: A timm model with the feature API (:func:`kdbench.taps.compute_taps`).
        split: The images.
        data: Normalisation of the dataset.
        image_size: Input resolution.
        batch_size: Images per forward pass (does not change the result).
        device: Where the model runs.
        tap: ``pre_logits``, ``logits`` or ``feature[i]`` (negative ``i`` counts from the end).
        numerics: The protocol's forward numerics (the pooling runs in float32).

    Returns:
        ``float32 [N, D]`` on CPU.

    Raises:
        ValueError: ``tap`` is not a tap name, or its feature index is out of range for ``model``.
    """
    kind, _ = parse_tap(tap)
    tap = normalize_tap(tap, len(model.feature_info)) if kind == "feature" else tap

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = compute_taps(model, x, (tap,))[tap].float()
        return out.flatten(2).mean(2) if kind == "feature" else out

    return _batched(forward, model, split, data, image_size, batch_size, device, numerics)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent for each k (k clipped to the number of classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return {k: 100.0 * hit[:, : min(k, logits.shape[1])].any(1).float().mean().item() for k in ks}


def agreement(student_logits: torch.Tensor, teacher_pred: torch.Tensor) -> float:
    """Percent of images on which the student's top-1 equals the teacher's."""
    return 100.0 * (student_logits.argmax(1) == teacher_pred).float().mean().item()
