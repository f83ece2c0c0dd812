"""One job, N processes: the process group of a data-parallel job (``torchrun``), its rank and size, and the
few collectives the harness needs.

A job with ``runtime.processes`` N > 1 runs under ``torchrun --standalone --nnodes=1 --nproc-per-node=N`` (the
workflow's shell line, :func:`launcher`); every process runs the same command. :func:`init` reads torchrun's
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and joins the group:
``nccl`` on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), ``gloo`` on CPU, which is how the tests run it.
Without torchrun's environment a job is one process, whatever the config says, exactly as before this module
existed: no process group, every collective here the identity.

What the harness splits and how (see :func:`batch_part` and :func:`eval_part`): the training data by global
sample (each rank takes a disjoint slice of every global batch of the seeded epoch order, so the store is read
by sample key as in one process), evaluation by contiguous parts of the split, gathered in order (each image
counted once). Only rank 0 (:func:`is_writer`) writes files.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

_logger = logging.getLogger(__name__)

#: How long a collective waits for the other ranks before it fails (a rank that died is normally noticed at
#: once: torchrun stops the job and names it; this bounds a hang).
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    """The processes of the running job.

    Attributes:
        rank: This process's rank (0: the writer).
        size: The number of processes (1: no process group).
        local_rank: The rank on this node (the CUDA device index of a GPU job).
        backend: ``gloo`` or ``nccl``; ``None`` in one process.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None


_world = World()


def world() -> World:
    """The job's processes (:func:`init` sets them; one process before and without it)."""
    return _world


def is_writer() -> bool:
    """Whether this process writes the job's files (records, checkpoints, logs, model directories): rank 0."""
    return _world.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` of torchrun's environment (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """``RANK`` of torchrun's environment (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def init(device: torch.device) -> torch.device:
    """Joins torchrun's process group when the job has more than one process; returns this process's device.

    Args:
        device: The device :func:`kdbench.runtime.setup` chose. On CUDA each process takes ``cuda:LOCAL_RANK``
            (backend ``nccl``); on CPU the backend is ``gloo``.

    Returns:
        The device this process computes on.
    """
    global _world
    size = env_world_size()
    if size <= 1 or _world.size > 1:
        return device if _world.size <= 1 or device.type != "cuda" else torch.device("cuda", _world.local_rank)
    rank, local = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT,
                            **({"device_id": device} if device.type == "cuda" else {}))
    _world = World(rank, size, local, backend)
    _logger.info("rank %d of %d (%s) on %s", rank, size, backend, device)
    return device


def describe(batch_size: int, sync_batchnorm: bool) -> dict:
    """What a record states of the job's processes (its ``provenance.parallel``): ``world_size``,
    ``per_rank_batch`` and ``global_batch`` (the protocol's ``batch_size``), ``backend`` (``None`` in one
    process) and ``sync_batchnorm`` (whether BatchNorm statistics were synchronised: only with more than one
    process)."""
    return {"world_size": _world.size, "per_rank_batch": batch_size // _world.size, "global_batch": batch_size,
            "backend": _world.backend, "sync_batchnorm": bool(sync_batchnorm and _world.size > 1)}


def shutdown() -> None:
    """Leaves the process group (a no-op in one process)."""
    global _world
    if _world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _world = World()


def barrier() -> None:
    """Waits for every rank (a no-op in one process)."""
    if _world.size > 1:
        dist.barrier()


def batch_part(rows: np.ndarray, rank: int | None = None, size: int | None = None) -> np.ndarray:
    """Rank ``rank``'s part of one global batch of rows (sorted, as the loop makes them): contiguous, disjoint,
    together exactly ``rows``; a full batch of B rows gives every rank B / N of them (:func:`kdbench.config.per_rank_batch`).
    A short last batch is split as evenly as it goes (``np.array_split``)."""
    rank = _world.rank if rank is None else rank
    size = _world.size if size is None else size
    return np.array_split(rows, size)[rank]


def eval_part(n: int, rank: int | None = None, size: int | None = None, align: int = 1) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous part of a split of ``n`` images for evaluation; the parts,
    in rank order, are the split in order, each image once (no padding). ``align``: every bound but the last is
    a multiple of it (whole batches per rank: each batch is then the one-process job's, so a forward gives the
    same bits)."""
    rank = _world.rank if rank is None else rank
    size = _world.size if size is None else size
    blocks = -(-n // align)  # ceil
    bounds = [min(n, int(i * blocks // size) * align) for i in range(size + 1)]
    return bounds[rank], bounds[rank + 1]


def gather_rows(part: torch.Tensor) -> torch.Tensor:
    """Every rank's ``part`` (``[n_r, ...]`` on CPU, the same trailing shape and dtype on every rank)
    concatenated in rank order: ``[sum n_r, ...]``; ``part`` itself in one process."""
    if _world.size <= 1:
        return part
    counts = [None] * _world.size
    dist.all_gather_object(counts, (int(part.shape[0]), tuple(part.shape[1:]), str(part.dtype)))
    trailing, dtype = counts[0][1], part.dtype
    width = max(c[0] for c in counts)
    padded = torch.zeros((width, *trailing), dtype=dtype)
    padded[: part.shape[0]] = part.cpu()
    if _world.backend == "nccl":  # NCCL gathers device tensors
        padded = padded.cuda()
    out = [torch.empty_like(padded) for _ in range(_world.size)]
    dist.all_gather(out, padded)
    return torch.cat([o[: c[0]].cpu() for o, c in zip(out, counts)])


def gather_array(part: np.ndarray) -> np.ndarray:
    """:func:`gather_rows` of a NumPy array of any dtype (sent as its bytes, which every backend carries)."""
    if _world.size <= 1:
        return part
    part = np.ascontiguousarray(part)
    raw = torch.from_numpy(part.view(np.uint8).reshape(len(part), -1))
    return gather_rows(raw).numpy().view(part.dtype).reshape(-1, *part.shape[1:])


def all_sum(values: list[float]) -> list[float]:
    """The element-wise sum over ranks of ``values`` (float64; ``values`` itself in one process)."""
    if _world.size <= 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if _world.backend == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (every rank gets the same answer; ``flag`` in one process)."""
    if _world.size <= 1:
        return flag
    return all_sum([1.0 if flag else 0.0])[0] > 0


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copies rank 0's buffers (BatchNorm running statistics) of ``module`` to every rank (a no-op in one
    process): with BatchNorm per rank each rank's running statistics follow its own samples, and evaluation
    and the saved model use rank 0's."""
    if _world.size <= 1:
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)
