"""The one training loop. A method supplies a loss; everything else is the protocol's."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol as TypingProtocol

import numpy as np
import torch
import torch.nn as nn

from kdbench.config import Protocol
from kdbench.data.shards import Split
from kdbench.data.views import CLEAN_VIEW, ViewRenderer
from kdbench.errors import NonFiniteLossError
from kdbench.evaluate import predict, topk_accuracy
from kdbench.meta import DataInfo
from kdbench.methods.base import TEACHER_VIEWS, DistillMethod, StepContext, Targets
from kdbench.taps import TapDict, compute_taps
from kdbench.train.checkpoint import Checkpointing, Preempted, rng_state, set_rng_state, stop_requested
from kdbench.train.optim import build_optimizer, lr_factor

_logger = logging.getLogger(__name__)


class TeacherSource(TypingProtocol):
    """Serves the declared teacher taps for a view (a stored view index, or ``CLEAN_VIEW``) of a batch's rows."""

    forward_count: int

    def outputs(self, view: int, rows: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]: ...

    def bytes_read(self) -> int: ...


def teacher_view_index(kind: str, view: int, count: int) -> int:
    """The view whose teacher outputs a student on view ``view`` (of ``count``) is served.

    Args:
        kind: The method's declared ``teacher_view``: ``same`` (``view``), ``other`` (``(view + 1) mod count``)
            or ``clean`` (:data:`~kdbench.data.views.CLEAN_VIEW`).
        view: The student's view.
        count: V, the views per image.
    """
    if kind == "same":
        return view
    if kind == "other":
        if count < 2:
            raise ValueError(f"teacher_view 'other' needs at least 2 views per image; protocol.views.count is {count}")
        return (view + 1) % count
    if kind == "clean":
        return CLEAN_VIEW
    raise ValueError(f"unknown teacher_view {kind!r}; valid: {', '.join(TEACHER_VIEWS)}")


def view_targets(train: Split, rows: np.ndarray, params, device: torch.device) -> Targets:
    """The labels of a batch of rendered views (``params``: the renderer's, with mixup partners and weights)."""
    labels = train.labels[rows]
    partner = torch.from_numpy(params.partner)
    partner_labels = torch.where(partner >= 0, train.labels[partner.clamp(min=0)], labels)
    return Targets(labels.to(device), partner_labels.to(device), torch.from_numpy(params.lam).to(device))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded order of the training rows in an epoch."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).numpy()


@dataclass
class FitResult:
    """What :func:`fit` measured.

    A resumed job's counters and history include the epochs its checkpoint holds, as if it had not stopped.

    Attributes:
        history: One dict per epoch (also written as JSONL).
        train_time_s: Wall time of the training loop, evaluation included (earlier runs of a resumed job
            included, up to their last checkpoint).
        student_forward: Training samples the student processed.
        teacher_forward: Samples the teacher processed during training (0 when cached).
        cache_bytes_read: Stored teacher-output bytes read.
        resumed_at: The epochs done when the job resumed from its checkpoint, one per resumption (empty when
            it ran in one go).
        resumed_train_s: The part of ``train_time_s`` spent by earlier runs of a resumed job.
    """

    history: list[dict] = field(default_factory=list)
    train_time_s: float = 0.0
    student_forward: int = 0
    teacher_forward: int = 0
    cache_bytes_read: int = 0
    resumed_at: list[int] = field(default_factory=list)
    resumed_train_s: float = 0.0


def fit(
    model: nn.Module,
    method: DistillMethod,
    train: Split,
    evals: dict[str, Split],
    data: DataInfo,
    protocol: Protocol,
    seed: int,
    device: torch.device,
    teacher: TeacherSource | None = None,
    epochs_log: Path | None = None,
    label: str = "",
    checkpoint: Checkpointing | None = None,
) -> FitResult:
    """Trains ``model`` with ``method``'s loss under ``protocol``.

    Epoch ``e`` replays view ``e mod V`` of every training image, in a seeded random order; the teacher's
    outputs come from ``teacher``, for exactly that view unless the method declares another
    :meth:`~kdbench.methods.base.DistillMethod.teacher_view` (see :func:`teacher_view_index`).

    Args:
        model: The student (trained in place).
        method: The KD method (its adapters are trained with the student).
        train: The training split.
        evals: Splits evaluated after every epoch (``val``, ``test``).
        data: Dataset metadata.
        protocol: The protocol.
        seed: Seed of the batch order (model init is seeded by the caller).
        device: Where to train.
        teacher: Source of teacher taps; ``None`` if the method declares none.
        epochs_log: JSONL file for the per-epoch metrics (written as the run goes).
        label: Name of the run in progress logs.
        checkpoint: Where to keep the epoch checkpoint (:mod:`kdbench.train.checkpoint`); a matching one that
            exists already is resumed from. ``None``: no checkpoint.

    Raises:
        Preempted: :func:`~kdbench.train.checkpoint.request_stop` was called (the CLI's SIGUSR1 handler).
        CheckpointError: The existing checkpoint belongs to another job.
    """
    run = _Run(model, method, train, data, protocol, device, teacher, label)
    result = FitResult()
    saved = checkpoint.load() if checkpoint else None
    first = 0  # the first epoch to train
    if saved is not None:
        first = run.restore(saved)
        result.history = list(saved["history"])
        result.resumed_at = [*saved["resumed_at"], first]
        result.resumed_train_s = saved["train_time_s"]
        _logger.info("%s: resuming after epoch %d/%d from %s", label, first, protocol.epochs, checkpoint.path)
    base = (saved["teacher_forward"], saved["cache_bytes_read"]) if saved else (0, 0)

    def counters() -> tuple[int, int]:  # teacher forwards and cache bytes read, earlier runs included
        return (base[0] + teacher.forward_count, base[1] + teacher.bytes_read()) if teacher is not None else base

    if epochs_log:
        epochs_log.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(epochs_log, "w") if epochs_log else None
    kept = first if saved is not None else None  # epochs the checkpoint on disk holds
    start = time.perf_counter()
    try:
        if log_file:
            log_file.writelines(json.dumps(row) + "\n" for row in result.history)
            log_file.flush()
        for epoch in range(first, protocol.epochs):
            row = run.train_epoch(epoch, seed)
            run.evaluate(row, evals)
            result.history.append(row)
            if log_file:
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
            _logger.info(
                "%s epoch %d/%d view %d loss %.4f %s | %.0f samples/s",
                label, epoch + 1, protocol.epochs, row["view"], row["train_loss"],
                " ".join(f"{k}={row[k]:.2f}" for k in row if k.endswith("_top1")), row["samples_per_s"],
            )
            if checkpoint and checkpoint.due(epoch + 1, protocol.epochs):
                teacher_forward, cache_bytes = counters()
                checkpoint.save({
                    **run.state(), "epochs_done": epoch + 1, "history": result.history,
                    "teacher_forward": teacher_forward, "cache_bytes_read": cache_bytes,
                    "train_time_s": result.resumed_train_s + time.perf_counter() - start,
                    "resumed_at": result.resumed_at,
                })
                kept = epoch + 1
            if stop_requested() and epoch + 1 < protocol.epochs:
                raise Preempted(epoch + 1)
    except Preempted as stop:
        where = (f"{checkpoint.path} holds {kept} epoch(s); run the job again to resume" if kept is not None
                 else "no checkpoint holds any of it; run the job again to start over")
        raise Preempted(f"{label}: stopped on request after {stop.args[0]} of {protocol.epochs} epochs"
                        f" (steps of an unfinished epoch are lost); {where}") from None
    finally:
        if log_file:
            log_file.close()
    result.train_time_s = result.resumed_train_s + time.perf_counter() - start
    result.student_forward = run.student_forward
    result.teacher_forward, result.cache_bytes_read = counters()
    return result


class _Run:
    """The state of one :func:`fit`: what is fixed for the run, the optimiser and the global step."""

    def __init__(self, model, method, train, data, protocol, device, teacher, label) -> None:
        self.model, self.method, self.train, self.data = model, method, train, data
        self.protocol, self.device, self.teacher, self.label = protocol, device, teacher, label
        self.image_size = protocol.image_size or data.image_size
        self.renderer = ViewRenderer.for_split(protocol.views, train, data)
        model.to(device).to(memory_format=torch.channels_last)
        method.to(device)
        self.params = [q for q in list(model.parameters()) + list(method.parameters()) if q.requires_grad]
        self.optimizer = build_optimizer(self.params, protocol)
        self.n = len(train)
        self.steps_per_epoch = math.ceil(self.n / protocol.batch_size)
        self.student_taps = method.student_taps(method.cfg)
        self.teacher_taps = method.teacher_taps(method.cfg)
        self.needs_index = method.requirements(method.cfg).sample_index
        self.teacher_view = method.teacher_view(method.cfg)
        teacher_view_index(self.teacher_view, 0, protocol.views.count)  # an impossible declaration fails here
        self.owner = f"method {method.name!r}"
        self.step = 0
        self.student_forward = 0

    def state(self) -> dict:
        """What the rest of the run depends on, at an epoch boundary (for the checkpoint)."""
        return {
            "step": self.step,
            "student_forward": self.student_forward,
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "method_extra": self.method.checkpoint_state(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(),
        }

    def restore(self, saved: dict) -> int:
        """Loads a checkpoint's :meth:`state`; returns the epochs it holds (the first epoch to train)."""
        self.model.load_state_dict(saved["model"])
        self.method.load_state_dict(saved["method"])
        self.method.load_checkpoint_state(saved["method_extra"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.step, self.student_forward = saved["step"], saved["student_forward"]
        set_rng_state(saved["rng"])
        return saved["epochs_done"]

    def train_epoch(self, epoch: int, seed: int) -> dict:
        """One epoch over view ``epoch mod V`` in a seeded order; returns the epoch's log row (no eval yet)."""
        p, spe = self.protocol, self.steps_per_epoch
        view = epoch % p.views.count
        self.method.on_epoch_start(StepContext(epoch, p.epochs, self.step, spe, view))
        self.model.train()
        self.method.train()
        order = epoch_order(self.n, seed, epoch)
        t0, loss_sum, term_sums = time.perf_counter(), 0.0, {}
        for b in range(spe):
            rows = np.sort(order[b * p.batch_size : (b + 1) * p.batch_size])
            out = self.train_step(epoch, view, rows)
            loss_sum += out.loss.item()
            for k, v in out.terms.items():
                term_sums[k] = term_sums.get(k, 0.0) + v.item()
            if stop_requested() and b + 1 < spe:  # at the epoch's end, fit checkpoints first
                raise Preempted(epoch)
            if (b + 1) % max(1, spe // 4) == 0 and b + 1 < spe:
                _logger.info("%s epoch %d/%d step %d/%d loss %.4f | %.0f samples/s", self.label, epoch + 1,
                             p.epochs, b + 1, spe, loss_sum / (b + 1), (b + 1) * p.batch_size / (time.perf_counter() - t0))
        return {
            "epoch": epoch,
            "view": view,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / spe,
            "terms": {k: v / spe for k, v in term_sums.items()},
            "_t0": t0,
            "_train_s": time.perf_counter() - t0,
        }

    def train_step(self, epoch: int, view: int, rows: np.ndarray):
        """Renders the batch's view, serves the teacher's outputs for it, and takes one optimiser step."""
        p, device = self.protocol, self.device
        x, params = self.renderer.render(view, rows, self.image_size, device)
        targets = view_targets(self.train, rows, params, device)
        ctx = StepContext(epoch, p.epochs, self.step, self.steps_per_epoch, view,
                          torch.from_numpy(rows).to(device) if self.needs_index else None)
        t_view = teacher_view_index(self.teacher_view, view, p.views.count)
        t_out = self.teacher.outputs(t_view, rows, device) if self.teacher_taps else {}
        s_out = compute_taps(self.model, x.contiguous(memory_format=torch.channels_last), self.student_taps)
        out = self.method.loss(TapDict(s_out, self.owner + " (student)"), TapDict(t_out, self.owner + " (teacher)"),
                               targets, ctx)
        if not torch.isfinite(out.loss):
            raise NonFiniteLossError(
                f"{self.label}: loss is {out.loss.item()} at epoch {epoch} step {self.step} "
                f"(terms: { {k: float(v.detach()) for k, v in out.terms.items()} }); lower the learning rate or "
                "check the method's parameters"
            )
        for group in self.optimizer.param_groups:
            group["lr"] = p.lr * lr_factor(p, self.step, self.steps_per_epoch)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if p.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, p.grad_clip_norm)
        self.optimizer.step()
        self.student_forward += len(rows)
        self.step += 1
        return out

    def evaluate(self, row: dict, evals: dict[str, Split]) -> None:
        """Adds each split's top-1 and the epoch's timings to ``row``."""
        t0, train_s = row.pop("_t0"), row.pop("_train_s")
        for name, split in evals.items():
            logits = predict(self.model, split, self.data, self.image_size, self.protocol.eval_batch_size, self.device)
            row[f"{name}_top1"] = topk_accuracy(logits, split.labels, (1,))[1]
        row["time_s"] = time.perf_counter() - t0
        row["samples_per_s"] = self.n / train_s
