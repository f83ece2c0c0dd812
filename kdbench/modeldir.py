"""Model directories, shared by teachers, assistants and students: ``model.pt`` (the state dict),
``predictions.npy`` (test top-1 classes, for agreement) and ``metrics.json`` (written last: model name, sha256
of ``model.pt``, val/test top-1). A distill run directory is one too, so a distilled student (TAKD's
assistant) is a teacher as is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from kdbench import distributed
from kdbench._util import atomic_path, read_json, sha256_file, write_json_atomic
from kdbench.data.shards import Split
from kdbench.data.stream import StreamedSplit
from kdbench.errors import CheckpointError
from kdbench.evaluate import predict, topk_accuracy
from kdbench.meta import DataInfo
from kdbench.models import create_model
from kdbench.numerics import DEFAULT, Numerics
from kdbench.runtime import provenance

SEARCH_DIR = "search"
"""Subdirectory of a searched assistant's directory (AMD) holding its search (:mod:`kdbench.tasearch`)."""
CANDIDATES_FILE = "candidates.json"
"""The search's summary: every candidate, its joint accuracy, and the search's wall time."""
SELECTION_FILE = "selection.json"
"""The search's selection: the rule's pick, its preference order and the pick's stability."""


def save_model_dir(
    out_dir: Path, model: nn.Module, model_name: str, test: Split | StreamedSplit, val: Split | StreamedSplit,
    data: DataInfo, image_size: int, batch_size: int, device: torch.device, extra: dict,
    numerics: Numerics = DEFAULT,
) -> tuple[dict, torch.Tensor]:
    """Evaluates ``model`` in ``numerics`` (its protocol's) and writes ``model.pt``, ``predictions.npy`` and (last)
    ``metrics.json``.

    Returns:
        ``(metrics, test logits [N, C])``.

    In a data-parallel job every process evaluates (a collective, :func:`~kdbench.evaluate.predict`) and only rank
    0 writes; the other processes get the metrics with ``sha256`` ``None``.
    """
    test_logits = predict(model, test, data, image_size, batch_size, device, numerics)
    val_logits = predict(model, val, data, image_size, batch_size, device, numerics)
    writer = distributed.is_writer()
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(out_dir / "model.pt") as tmp:
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
        with atomic_path(out_dir / "predictions.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, test_logits.argmax(1).numpy().astype(np.int32))
    acc = topk_accuracy(test_logits, test.labels)
    metrics = {
        "model": model_name,
        "sha256": sha256_file(out_dir / "model.pt") if writer else None,
        "test_top1": acc[1],
        "test_top5": acc[5],
        "val_top1": topk_accuracy(val_logits, val.labels, (1,))[1],
        "image_size": image_size,
        **extra,
        "provenance": provenance(device, numerics),
    }
    if writer:
        write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics, test_logits


def load_checkpoint(model: nn.Module, path: Path, model_name: str) -> None:
    """Loads a state dict (or ``{"state_dict": ...}`` / ``{"model": ...}``) strictly into ``model``."""
    if not path.exists():
        raise CheckpointError(f"teacher checkpoint not found: {path}; fix the 'checkpoint' key of the teacher")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises many types for a bad file)
        raise CheckpointError(f"teacher checkpoint {path} cannot be read ({e}); is it a torch state dict?") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shape:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}"
            for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shape))
            if keys
        )
        raise CheckpointError(
            f"teacher checkpoint {path} does not match model {model_name!r} ({detail}). Fix: give a checkpoint of"
            f" {model_name!r} with this dataset's classes and channels, or change the teacher's 'model'"
        )
    model.load_state_dict(state)


def read_teacher_metrics(teacher_dir: Path) -> dict:
    """The ``metrics.json`` of a teacher directory (model name, sha256, accuracy)."""
    return read_json(Path(teacher_dir) / "metrics.json", "teacher metrics (the teacher step did not finish)")


def load_teacher(
    teacher_dir: Path, data: DataInfo, device: torch.device, numerics: Numerics = DEFAULT
) -> tuple[nn.Module, dict]:
    """Loads a teacher directory (frozen, eval mode, in the memory format of ``numerics``: the protocol of the
    table it serves) and checks ``model.pt`` against its recorded sha256."""
    metrics = read_teacher_metrics(teacher_dir)
    path = teacher_dir / "model.pt"
    if sha256_file(path) != metrics["sha256"]:
        raise CheckpointError(f"{path} does not match the sha256 in {teacher_dir / 'metrics.json'}; rerun the teacher step")
    model = create_model(metrics["model"], data.num_classes, data.in_chans, metrics["image_size"])
    load_checkpoint(model, path, metrics["model"])
    numerics.model(model.to(device)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, metrics
