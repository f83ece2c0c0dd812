"""The one training loop. A method supplies a loss; everything else is the protocol's."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from typing import Protocol as TypingProtocol

import numpy as np
import torch
import torch.nn as nn

from kdbench import distributed
from kdbench.config import Protocol, per_rank_batch
from kdbench.data.shards import Split
from kdbench.data.stream import StreamedSplit
from kdbench.data.views import CLEAN_VIEW, ViewRenderer
from kdbench.errors import ConfigError, NonFiniteLossError
from kdbench.evaluate import predict, topk_accuracy
from kdbench.meta import DataInfo
from kdbench.methods.base import TEACHER_VIEWS, DistillMethod, StepContext, Targets
from kdbench.numerics import Numerics
from kdbench.taps import TapDict, compute_taps
from kdbench.train.checkpoint import (
    Checkpointing,
    Preempted,
    rng_state,
    set_rng_state,
    stop_requested,
    stopped,
)
from kdbench.train.optim import build_optimizer, lr_factor

_logger = logging.getLogger(__name__)


class TeacherSource(TypingProtocol):
    """Serves the declared teacher taps for a view (a stored view index, or ``CLEAN_VIEW``) of a batch's rows.

    A source that runs a teacher on rendered inputs (:class:`~kdbench.cache.source.LiveTeacher`) also has an
    ``input_size``: on the streaming path the stream renders the teacher's view at that size with the batch
    (the main process holds no image) and ``outputs`` gets it as ``inputs``.
    """

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
class Batch:
    """One training step's batch, whatever its source.

    Attributes:
        rows: ``int64 [n]`` rows of the training split.
        x: ``float32 [n, C, S, S]`` the student's inputs (view ``epoch mod V``), on the device.
        targets: Labels, mixup partners' labels and weights, on the device.
        teacher_x: The live teacher's inputs rendered by the stream (streaming path only), else ``None``.
        total: The rows of the global batch this batch is a part of (data parallel: every process's part
            together); ``None``: ``len(rows)`` (one process).
    """

    rows: np.ndarray
    x: torch.Tensor
    targets: Targets
    teacher_x: torch.Tensor | None = None
    total: int | None = None

    @property
    def global_rows(self) -> int:
        return len(self.rows) if self.total is None else self.total


class _SplitBatches:
    """Batches of a split held in memory: a seeded permutation of the rows per epoch, sorted within each batch,
    rendered by the split's :class:`~kdbench.data.views.ViewRenderer` on the device.

    In a data-parallel job every process computes the same global order and global batches, and takes its
    disjoint slice of each (:func:`kdbench.distributed.batch_part`): process r's batch b is part of the
    one-process batch b, every training row is seen exactly once per epoch over the processes, no padding.
    """

    def __init__(self, train: Split, protocol: Protocol, data: DataInfo, image_size: int, device: torch.device,
                 rows: np.ndarray | None = None) -> None:
        self.train, self.batch_size, self.image_size, self.device = train, protocol.batch_size, image_size, device
        self.renderer = ViewRenderer.for_split(protocol.views, train, data)
        self.rows = np.arange(len(train)) if rows is None else rows

    def epoch(self, epoch: int, view: int, seed: int) -> Iterator[Batch]:
        order = self.rows[epoch_order(len(self.rows), seed, epoch)]
        for b in range(math.ceil(len(order) / self.batch_size)):
            rows = np.sort(order[b * self.batch_size : (b + 1) * self.batch_size])
            total, rows = len(rows), distributed.batch_part(rows)
            x, params = self.renderer.render(view, rows, self.image_size, self.device)
            yield Batch(rows, x, view_targets(self.train, rows, params, self.device), total=total)


class _StreamBatches:
    """Batches of a streamed split (:meth:`~kdbench.data.stream.StreamedSplit.train_batches`), moved to the
    device; with ``teacher`` = ``(teacher_view kind, input size)`` also the live teacher's inputs.

    In a data-parallel job every process reads the same seeded stream of global batches and keeps its slice of
    each (:func:`kdbench.distributed.batch_part`), as in memory: exact, but each process decodes and renders
    every image of the batch (N times the loader work of one process).
    """

    def __init__(self, train: StreamedSplit, protocol: Protocol, data: DataInfo, image_size: int,
                 device: torch.device, teacher: tuple[str, int] | None) -> None:
        self.train, self.protocol, self.data, self.image_size = train, protocol, data, image_size
        self.device, self.teacher = device, teacher

    def epoch(self, epoch: int, view: int, seed: int) -> Iterator[Batch]:
        p, device = self.protocol, self.device
        t_view, t_size = None, None
        if self.teacher is not None:
            t_view, t_size = teacher_view_index(self.teacher[0], view, p.views.count), self.teacher[1]
        for b in self.train.train_batches(p.views, self.data.mean, self.data.std, seed, epoch, view, self.image_size,
                                          p.batch_size, t_view, t_size):
            total = len(b["rows"])
            if distributed.world().size > 1:  # this process's slice of the global batch
                part = distributed.batch_part(np.arange(total))
                b = {k: v[part[0] : part[-1] + 1] for k, v in b.items()}
            targets = Targets(b["labels"].to(device), b["partner_labels"].to(device), b["lam"].to(device))
            teacher_x = b["teacher_x"].to(device) if "teacher_x" in b else None
            yield Batch(b["rows"].numpy(), b["x"].to(device), targets, teacher_x, total=total)


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
    train: Split | StreamedSplit,
    evals: dict[str, Split | StreamedSplit],
    data: DataInfo,
    protocol: Protocol,
    seed: int,
    device: torch.device,
    teacher: TeacherSource | None = None,
    epochs_log: Path | None = None,
    label: str = "",
    checkpoint: Checkpointing | None = None,
    rows: np.ndarray | None = None,
    batch_key: str = "protocol.batch_size",
) -> FitResult:
    """Trains ``model`` with ``method``'s loss under ``protocol``.

    Epoch ``e`` replays view ``e mod V`` of every training image, in a seeded random order; the teacher's
    outputs come from ``teacher``, for exactly that view unless the method declares another
    :meth:`~kdbench.methods.base.DistillMethod.teacher_view` (see :func:`teacher_view_index`).

    The batches come from the split: one held in memory (:class:`~kdbench.data.shards.Split`) is permuted
    and rendered here; a streamed one (:class:`~kdbench.data.stream.StreamedSplit`) delivers its batches
    rendered, in its seeded stream order. Everything else (steps, schedule, loss, evaluation) is the same.

    The student's forwards (training steps and evaluation) run in the protocol's numerics (``precision``,
    ``channels_last``; :mod:`kdbench.numerics`): under ``bf16`` the model's forward is autocast and its outputs are
    float32 again before the method's loss, which (with its adapters and the backward pass) runs outside autocast.

    Args:
        model: The student (trained in place).
        method: The KD method (its adapters are trained with the student).
        train: The training split (in memory or streamed).
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
        rows: Train on these rows of ``train`` only (a trial's subset, in memory); ``None``: every row.
        batch_key: The config key of ``protocol.batch_size``, for the message that refuses a global batch that
            does not divide into the job's processes (:mod:`kdbench.distributed`).

    Raises:
        Preempted: :func:`~kdbench.train.checkpoint.request_stop` was called (the CLI's SIGUSR1 handler).
        CheckpointError: The existing checkpoint belongs to another job.
    """
    run = _Run(model, method, train, data, protocol, device, teacher, label, rows, batch_key)
    result = FitResult()
    saved = checkpoint.load() if checkpoint else None
    distributed.barrier()  # every process has read the checkpoint (or found none) before any writes one
    first = 0  # the first epoch to train
    if saved is not None:
        first = run.restore(saved)
        result.history = list(saved["history"])
        result.resumed_at = [*saved["resumed_at"], first]
        result.resumed_train_s = saved["train_time_s"]
        _logger.info("%s: resuming after epoch %d/%d from %s", label, first, protocol.epochs, checkpoint.path)
        written_by = saved.get("world_size", 1)  # (a checkpoint from before the key: one process)
        if written_by != run.world.size:  # same global batches and order: only the rounding differs
            _logger.info("%s: the checkpoint was written by %d process(es), this run has %d; the global batch and the"
                         " sample order do not depend on it", label, written_by, run.world.size)
    base = (saved["teacher_forward"], saved["cache_bytes_read"]) if saved else (0, 0)

    def counters() -> tuple[int, int]:  # teacher forwards and cache bytes read, earlier runs and every process included
        if teacher is None:
            return base
        forwards, read = distributed.all_sum([teacher.forward_count, teacher.bytes_read()])
        return base[0] + int(forwards), base[1] + int(read)

    writer = distributed.is_writer()  # one writer: rank 0 writes the log and the checkpoint
    if epochs_log and writer:
        epochs_log.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(epochs_log, "w") if epochs_log and writer else None
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
            if checkpoint and distributed.any_rank(checkpoint.due(epoch + 1, protocol.epochs)):
                teacher_forward, cache_bytes = counters()  # (every process: a collective)
                if writer:
                    checkpoint.save({
                        **run.state(), "epochs_done": epoch + 1, "history": result.history,
                        "teacher_forward": teacher_forward, "cache_bytes_read": cache_bytes,
                        "train_time_s": result.resumed_train_s + time.perf_counter() - start,
                        "resumed_at": result.resumed_at, "world_size": run.world.size,
                    })
                distributed.barrier()  # the checkpoint is on disk before any process goes on
                kept = epoch + 1
            if distributed.any_rank(stop_requested()) and epoch + 1 < protocol.epochs:
                raise Preempted(epoch + 1)
    except Preempted as stop:
        raise stopped(label, stop.args[0], protocol.epochs, checkpoint, kept, first) from None
    finally:
        if log_file:
            log_file.close()
    result.train_time_s = result.resumed_train_s + time.perf_counter() - start
    result.student_forward = run.student_forward
    result.teacher_forward, result.cache_bytes_read = counters()
    return result


class _Step(nn.Module):
    """The student's forward and the method's loss as one module: what a data-parallel job wraps in
    ``DistributedDataParallel`` (every trained parameter, the student's and the adapters', is reached by its
    forward, so DDP averages all their gradients)."""

    def __init__(self, model: nn.Module, method: DistillMethod, numerics: Numerics, taps, owner: str) -> None:
        super().__init__()
        self.model, self.method, self.numerics, self.taps, self.owner = model, method, numerics, taps, owner

    def forward(self, x: torch.Tensor, t_out: dict, targets: Targets, ctx: StepContext):
        # float32 outputs, whatever the precision: the method's loss is computed in fp32 (kdbench.numerics)
        s_out = self.numerics.run(lambda inputs: compute_taps(self.model, inputs, self.taps), x)
        return self.method.loss(TapDict(s_out, self.owner + " (student)"), TapDict(t_out, self.owner + " (teacher)"),
                                targets, ctx)


def _data_parallel(step: _Step, protocol: Protocol, n: int, needs_index: bool, device: torch.device,
                   label: str, batch_key: str = "protocol.batch_size") -> nn.Module:
    """``step`` wrapped for the job's processes (``DistributedDataParallel``; ``step`` itself in one process),
    after the checks of what a data-parallel job cannot do.

    Raises:
        ConfigError: The global batch does not divide into the processes, a short last batch would leave a
            process without a sample, the method indexes samples (CRD's memory bank is
            updated by the rows of each process), or SyncBatchNorm is asked for on CPU.
    """
    world = distributed.world()
    if world.size <= 1:
        return step
    where = f"{label} ({world.size} processes)"
    per_rank_batch(protocol.batch_size, world.size, where, batch_key)
    last = n % protocol.batch_size
    if 0 < last < world.size:
        raise ConfigError(f"{where}: key '{batch_key}': the last batch of an epoch has {last} of {n} images,"
                          f" fewer than the {world.size} processes; choose a batch size that leaves 0 or at least"
                          f" {world.size} (or fewer processes, runtime.processes)")
    if needs_index:
        raise ConfigError(f"{where}: key 'runtime.processes': the method indexes samples (a memory bank each process"
                          " would update with its own rows only); run it with runtime.processes: 1")
    if protocol.sync_batchnorm:
        if device.type != "cuda":
            raise ConfigError(f"{where}: key 'protocol.sync_batchnorm' needs CUDA (torch's SyncBatchNorm has no CPU"
                              " kernel); set it false on CPU")
        nn.SyncBatchNorm.convert_sync_batchnorm(step)
    return nn.parallel.DistributedDataParallel(
        step, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)


class _Run:
    """The state of one :func:`fit`: what is fixed for the run, the optimiser and the global step."""

    def __init__(self, model, method, train, data, protocol, device, teacher, label, rows=None,
                 batch_key="protocol.batch_size") -> None:
        self.model, self.method, self.train, self.data = model, method, train, data
        self.protocol, self.device, self.teacher, self.label = protocol, device, teacher, label
        self.image_size = protocol.image_size or data.image_size
        self.numerics = Numerics.of(protocol)  # the student's forwards (training and evaluation)
        self.numerics.model(model.to(device))
        method.to(device)
        self.n = len(train) if rows is None else len(rows)
        self.steps_per_epoch = math.ceil(self.n / protocol.batch_size)
        self.student_taps = method.student_taps(method.cfg)
        self.teacher_taps = method.teacher_taps(method.cfg)
        self.needs_index = method.requirements(method.cfg).sample_index
        self.teacher_view = method.teacher_view(method.cfg)
        teacher_view_index(self.teacher_view, 0, protocol.views.count)  # an impossible declaration fails here
        if isinstance(train, StreamedSplit):
            if rows is not None:
                raise ValueError(f"{label}: a subset of rows trains from data in memory only, not a streamed split")
            t_size = getattr(teacher, "input_size", None) if self.teacher_taps else None
            live = (self.teacher_view, t_size) if t_size is not None else None
            self.batches = _StreamBatches(train, protocol, data, self.image_size, device, live)
        else:
            self.batches = _SplitBatches(train, protocol, data, self.image_size, device, rows)
        self.owner = f"method {method.name!r}"
        self.world = distributed.world()
        self.forward = _data_parallel(_Step(model, method, self.numerics, self.student_taps, self.owner), protocol,
                                      self.n, self.needs_index, device, label, batch_key)
        # (after SyncBatchNorm's conversion: a converted layer keeps the same parameter objects)
        self.params = [q for q in list(model.parameters()) + list(method.parameters()) if q.requires_grad]
        self.optimizer = build_optimizer(self.params, protocol)
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
        t0, loss_sum, term_sums = time.perf_counter(), 0.0, {}
        b = -1
        for b, batch in enumerate(self.batches.epoch(epoch, view, seed)):
            out = self.train_step(epoch, view, batch)
            share = len(batch.rows) / batch.global_rows  # this process's part of the global batch's mean (1: all)
            loss_sum += out.loss.item() * share
            for k, v in out.terms.items():
                term_sums[k] = term_sums.get(k, 0.0) + v.item() * share
            # every process stops at the same step (a stop asked of one is asked of all)
            if distributed.any_rank(stop_requested()) and b + 1 < spe:  # at the epoch's end, fit checkpoints first
                raise Preempted(epoch)
            if (b + 1) % max(1, spe // 4) == 0 and b + 1 < spe:
                _logger.info("%s epoch %d/%d step %d/%d loss %.4f | %.0f samples/s", self.label, epoch + 1,
                             p.epochs, b + 1, spe, loss_sum / (b + 1), (b + 1) * p.batch_size / (time.perf_counter() - t0))
        if b + 1 != spe:
            raise RuntimeError(f"{self.label}: epoch {epoch} had {b + 1} batches, expected {spe}")
        if self.world.size > 1:  # the global batches' means, summed over the processes' shares
            keys = sorted(term_sums)
            loss_sum, *sums = distributed.all_sum([loss_sum, *(term_sums[k] for k in keys)])
            term_sums = dict(zip(keys, sums))
        return {
            "epoch": epoch,
            "view": view,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / spe,
            "terms": {k: v / spe for k, v in term_sums.items()},
            "_t0": t0,
            "_train_s": time.perf_counter() - t0,
        }

    def train_step(self, epoch: int, view: int, batch: Batch):
        """Serves the teacher's outputs for the batch's view and takes one optimiser step."""
        p, device = self.protocol, self.device
        x, rows, targets = batch.x, batch.rows, batch.targets
        ctx = StepContext(epoch, p.epochs, self.step, self.steps_per_epoch, view,
                          torch.from_numpy(rows).to(device) if self.needs_index else None)
        t_view = teacher_view_index(self.teacher_view, view, p.views.count)
        live_inputs = {} if batch.teacher_x is None else {"inputs": batch.teacher_x}
        t_out = self.teacher.outputs(t_view, rows, device, **live_inputs) if self.teacher_taps else {}
        out = self.forward(x, t_out, targets, ctx)  # the student's forward and the method's loss (_Step)
        if not torch.isfinite(out.loss):
            raise NonFiniteLossError(
                f"{self.label}: loss is {out.loss.item()} at epoch {epoch} step {self.step} "
                f"(terms: { {k: float(v.detach()) for k, v in out.terms.items()} }); lower the learning rate or "
                "check the method's parameters"
            )
        for group in self.optimizer.param_groups:
            group["lr"] = p.lr * lr_factor(p, self.step, self.steps_per_epoch)
        self.optimizer.zero_grad(set_to_none=True)
        if len(rows) == batch.global_rows:
            out.loss.backward()
        else:  # DDP averages the processes' gradients: weigh each by its share of a short last batch
            (out.loss * (len(rows) * self.world.size / batch.global_rows)).backward()
        if p.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, p.grad_clip_norm)
        self.optimizer.step()
        self.student_forward += batch.global_rows
        self.step += 1
        return out

    def evaluate(self, row: dict, evals: dict[str, Split | StreamedSplit]) -> None:
        """Adds each split's top-1 and the epoch's timings to ``row``."""
        t0, train_s = row.pop("_t0"), row.pop("_train_s")
        distributed.broadcast_buffers(self.model)  # per-process BatchNorm: every process evaluates rank 0's stats
        for name, split in evals.items():
            logits = predict(self.model, split, self.data, self.image_size, self.protocol.eval_batch_size, self.device,
                             self.numerics)
            row[f"{name}_top1"] = topk_accuracy(logits, split.labels, (1,))[1]
        row["time_s"] = time.perf_counter() - t0
        row["samples_per_s"] = self.n / train_s
