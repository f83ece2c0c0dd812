"""Epoch checkpoints and preemption: a killed or preempted training job starts where it left off.

:func:`~kdbench.train.loop.fit` writes ``checkpoint.pt`` into the run (or teacher) directory at the end of every
``every``-th epoch, atomically (temporary file + rename: a kill at any moment leaves the previous checkpoint or
the new one, never half of one). It holds everything the rest of the run depends on: the epochs done, the
student's and the method's state (``state_dict``: adapters and buffers such as CRD's memory banks, plus
:meth:`~kdbench.methods.base.DistillMethod.checkpoint_state`), the optimiser (its step counts and moments), the
global step (the learning-rate schedule is a function of it), the RNG states (torch CPU and CUDA, numpy,
Python), the epoch log so far and the cost counters. The batch order is a function of ``(seed, epoch)`` and
the views are counter-based, so a job resumed at an epoch boundary computes what the uninterrupted job would
have: on CPU its record is identical apart from timings.

In a data-parallel job (:mod:`kdbench.distributed`) rank 0 writes the checkpoint and every process reads it. It
holds nothing that depends on the number of processes (the global batch and the sample order do not), so a
checkpoint written by N processes resumes under any other N (the RNG state restored everywhere is rank 0's).

A checkpoint carries the fingerprint of its job (protocol and config hashes, teacher, student, method, seed,
input digests); a job never resumes one written by another job (the workflow reruns a job in the same directory
when its config changed): it deletes it with a warning naming the file and the difference, and starts over. The
job deletes its checkpoint once its record (or teacher directory) is written. AMD's search
(:func:`kdbench.tasearch.run_search`), which trains with its own joint loop, keeps the same kind of checkpoint
(its epochs, then the candidates it has saved) and stops the same way.

Preemption (SLURM ``--signal=USR1@<seconds>``): the CLI installs :func:`stop_on_signal`; the loop then stops
after the current step (writing the epoch's checkpoint if the signal came between the last step and the
end of the epoch) and raises :class:`Preempted`; the CLI asks SLURM to requeue the job
(:func:`requeue`) and exits with :data:`EXIT_PREEMPTED`. The requeued job resumes from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import signal
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdbench import distributed
from kdbench._util import atomic_path

_logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
"""Name of the checkpoint in a run (or teacher) directory."""

FORMAT_VERSION = 1

EXIT_PREEMPTED = 75
"""Exit status of a job stopped by :data:`STOP_SIGNAL` (``EX_TEMPFAIL``: run it again and it resumes; a
cluster may list it in slurm.conf's ``RequeueExit``)."""

STOP_SIGNAL = signal.SIGUSR1
"""The signal that asks a training job to stop and be requeued (SLURM's ``--signal``)."""

REQUEUE_TIMEOUT_S = 60
"""How long :func:`requeue` waits for ``scontrol`` (a controller that does not answer must not hold the job)."""


class Preempted(Exception):
    """Training stopped because :data:`STOP_SIGNAL` arrived; the last checkpoint (if any) holds the progress.

    ``progressed`` says whether this run left more on disk than it started from: a job that stops without
    (an epoch longer than the time between the signal and the limit) must not be requeued, or it would loop.
    """

    def __init__(self, *args: Any, progressed: bool = True) -> None:
        super().__init__(*args)
        self.progressed = progressed


def stopped(label: str, done: int, epochs: int, checkpoint: Checkpointing | None, kept: int | None,
            first: int) -> Preempted:
    """The :class:`Preempted` of a training loop that stopped on request after ``done`` of ``epochs`` epochs,
    saying what is on disk: ``kept`` epochs in ``checkpoint`` (``None``: no checkpoint holds any of it), of which
    the run found ``first`` when it started."""
    where = (f"{checkpoint.path} holds {kept} epoch(s); run the job again to resume"
             if checkpoint is not None and kept is not None
             else "no checkpoint holds any of it; run the job again to start over")
    return Preempted(f"{label}: stopped on request after {done} of {epochs} epochs"
                     f" (steps of an unfinished epoch are lost); {where}",
                     progressed=kept is not None and kept > first)


_stop = False


def request_stop(*_: Any) -> None:
    """Asks the running :func:`~kdbench.train.loop.fit` to stop after its current step (a signal handler)."""
    global _stop
    _stop = True


def stop_requested() -> bool:
    return _stop


@contextlib.contextmanager
def stop_on_signal(sig: int = STOP_SIGNAL) -> Iterator[None]:
    """While active, ``sig`` makes the training loop stop after its current step and raise :class:`Preempted`
    (the previous handler is restored afterwards)."""
    global _stop
    _stop = False
    previous = signal.signal(sig, request_stop)
    try:
        yield
    finally:
        signal.signal(sig, previous)
        _stop = False


def requeue() -> bool:
    """Requeues the SLURM job this process runs in (``scontrol requeue $SLURM_JOB_ID``); ``False`` outside SLURM
    or when ``scontrol`` fails or does not answer within :data:`REQUEUE_TIMEOUT_S` (the job's next run resumes from
    the checkpoint all the same)."""
    job = os.environ.get("SLURM_JOB_ID")
    scontrol = shutil.which("scontrol")
    if not job or not scontrol:
        return False
    try:
        done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=REQUEUE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _logger.warning("scontrol requeue %s did not answer in %s s; the job is not requeued", job, REQUEUE_TIMEOUT_S)
        return False
    if done.returncode != 0:
        _logger.warning("scontrol requeue %s failed: %s", job, done.stderr.strip())
        return False
    _logger.info("SLURM job %s requeued", job)
    return True


def rng_state() -> dict[str, Any]:
    """The global RNG states (torch CPU, CUDA when initialised, numpy, Python), as plain tensors and tuples."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restores what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class Checkpointing:
    """Where a training job keeps its epoch checkpoint, and which job it is.

    Attributes:
        path: The checkpoint file (``<run dir>/checkpoint.pt``).
        fingerprint: What identifies the job (JSON values); a checkpoint with another fingerprint is refused.
        every: Write one every ``every`` epochs (and at a requested stop); 0 writes none. An existing
            checkpoint is resumed from whatever ``every`` is. Not part of any hash: it changes no result.
    """

    path: Path
    fingerprint: Mapping[str, Any]
    every: int = 1

    def due(self, epochs_done: int, epochs: int) -> bool:
        """Whether to write a checkpoint after ``epochs_done`` of ``epochs`` epochs (also after the last one:
        a job killed while it evaluates and saves the trained model does not train again)."""
        return self.every > 0 and (epochs_done % self.every == 0 or epochs_done == epochs or stop_requested())

    def load(self) -> dict[str, Any] | None:
        """The saved state, ``None`` if there is no checkpoint of this job.

        A checkpoint that cannot be read, or that another job wrote (the workflow reruns a job in the same
        directory when its config changed), is not this job's progress: it is deleted with a warning that
        names the file and why, and the job starts over.
        """
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (any unreadable file is treated the same)
            return self._stale(f"it cannot be read ({(str(e).splitlines() or [type(e).__name__])[0][:200]})")
        if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
            return self._stale(f"it is not a training checkpoint of format {FORMAT_VERSION}")
        saved, expected = state["fingerprint"], dict(self.fingerprint)
        if saved != expected:
            diff = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, this job {expected.get(k)!r}"
                             for k in sorted(set(saved) | set(expected)) if saved.get(k) != expected.get(k))
            return self._stale(f"another job wrote it ({diff})")
        return state

    def _stale(self, why: str) -> None:
        _logger.warning("%s: %s; deleted, the job starts over", self.path, why)
        self.discard()

    def save(self, state: dict[str, Any]) -> None:
        """Writes ``state`` (plus the format and the fingerprint) atomically; in a data-parallel job only rank 0
        writes (:func:`kdbench.distributed.is_writer`)."""
        if not distributed.is_writer():
            return
        with atomic_path(self.path) as tmp:
            torch.save({"format": FORMAT_VERSION, "fingerprint": dict(self.fingerprint), **state}, tmp)

    def discard(self) -> None:
        """Deletes the checkpoint and any temporary file a killed write left beside it (rank 0 only)."""
        if not distributed.is_writer():
            return
        for path in [self.path, *self.path.parent.glob(f"{self.path.name}.tmp-*")]:
            path.unlink(missing_ok=True)
