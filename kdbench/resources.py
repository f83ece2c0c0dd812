"""What each job asks its cluster for: a memory and a time limit, from what the plan knows.

The workflow's compute rules take their ``mem_mb`` and ``runtime`` from here (times the attempt: a job that
failed is resubmitted once with twice both), and the SLURM profile passes them on to ``sbatch``. The rule:

* **Memory** (``mem_mb``, host RAM): 2.5 GB for the job's three Python processes that import torch (the SLURM
  job step, Snakemake inside it, the kdbench command: SLURM counted a tiny job at 2.5 GB), plus what the job
  holds: the data (every split in memory as ``uint8``, or, streamed, the loader workers' shuffle buffers of
  encoded images and their batches, each image counted at the protocol's size), the teacher outputs it reads (a whole
  store in memory, or a streamed job's few (shard, view) slices), the model's state (weights, gradients and two
  optimizer moments) and one batch's activations (every layer's output, kept for the backward; a forward without
  gradients, a teacher's, holds its largest layer's output and that layer's input), all times 1.5, rounded up to
  500 MB. Activations are counted in host RAM, as on a CPU: on a GPU they live in the GPU's memory, so there the
  figure is an upper bound.
* **Time** (``runtime``, minutes): the job's FLOPs (:mod:`kdbench.estimate`: the counted forwards) at
  ``runtime.tflops`` sustained TFLOP/s, plus 50 ms per step and per evaluation batch (a small net on a GPU is
  launch- and loader-bound, not FLOP-bound), times 2, rounded up to 10 minutes, at least 30 minutes. A job that
  outlives its limit anyway is not lost: the checkpointing rules are signalled before it and requeued, and
  resume (README, "Running on SLURM").

A data-parallel distill or trial job (``runtime.processes`` N > 1) holds N processes' memory (each the data, the
stores and a batch of B / N; 800 MB more per further process) and shares the FLOPs among N devices.

Scale it with ``runtime.tflops`` (10 by default, a V100- or A100-class GPU; about 0.02 per CPU core); the
memory follows the config (batch size, image size, views, taps, ``data.workers``) by itself.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from kdbench.cache.store import bytes_per_view
from kdbench.data.sources import source_info, split_sizes
from kdbench.estimate import ModelCost, TableCosts
from kdbench.plan import DistillJob, Plan, StoreKey, TeacherKey

BASE_MB = 2500
PROCESS_MB = 800  # each further process of a data-parallel job (torch imported; kdbench.distributed)
MEM_MARGIN = 1.5
MEM_STEP_MB = 500
STEP_SECONDS = 0.05
TIME_MARGIN = 2.0
TIME_STEP_MIN = 10
MIN_RUNTIME_MIN = 30
F32 = 4
MB = 1024**2


@dataclass(frozen=True)
class Need:
    """A job's limits: ``mem_mb`` (MB of host RAM) and ``runtime`` (minutes)."""

    mem_mb: int
    runtime: int


def _train_bytes(cost: ModelCost, batch: int) -> float:
    """A model in training: weights, gradients and two optimizer moments; a batch's activations (every layer's
    output, what autograd keeps for the backward)."""
    return cost.params * F32 * 4 + batch * cost.activations * F32


def _forward_bytes(cost: ModelCost, batch: int) -> float:
    """A model run forward without gradients: its weights and a batch's largest layer output, with its input."""
    return cost.params * F32 + batch * 2 * cost.peak * F32


def _steps(images: int, batch: int) -> int:
    return math.ceil(images / batch)


def gpu_request(processes: int, threads: int, gres: str) -> dict[str, int | str]:
    """The GPU and CPU resources of a distill or trial job (rules ``distill``, ``trial``, ``distill_tuned``) for the
    SLURM profile (snakemake-executor-plugin-slurm's keys).

    Args:
        processes: The job's processes (``runtime.processes``; :mod:`kdbench.distributed`).
        threads: CPUs per process (the rule's threads for one process).
        gres: ``$KDBENCH_GRES``: what one model job asks for (``gpu:1`` or ``gpu:<type>:1``; empty: no GPU), as
            the profile gives every other rule that runs a model.

    Returns:
        ``gres``, ``gpu``, ``gpu_model`` and ``cpus_per_gpu``. One process: ``gres`` as given (``--gres``), and
        ``threads`` CPUs (per GPU: the same count for one GPU). N > 1 with a GPU asked for: ``gpu`` N
        (``--gpus=[<type>:]N``, the type taken from ``gres``), ``cpus_per_gpu`` ``threads`` and no ``gres``;
        never ``tasks``: the job is one task in which torchrun starts the N processes (a ``tasks`` would become
        ``--ntasks-per-gpu`` and run the command once per GPU). N > 1 without a GPU: CPUs only (the rule's
        threads, N x ``threads``).
    """
    parts = gres.split(":") if gres else []
    on_gpu = bool(parts) and parts[0] == "gpu"
    if processes <= 1 or not on_gpu:
        return {"gres": gres if processes <= 1 else "", "gpu": 0, "gpu_model": "", "cpus_per_gpu": threads}
    return {"gres": "", "gpu": processes, "gpu_model": parts[1] if len(parts) == 3 else "", "cpus_per_gpu": threads}


class Needs:
    """Each compute job's :class:`Need`, from the plan (one instance per workflow, its answers cached)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    @functools.lru_cache(maxsize=None)
    def costs(self, table: str) -> TableCosts:
        return TableCosts(self.plan, table)

    def _need(self, table: str, held: float, flops: float, steps: int, processes: int = 1) -> Need:
        """``held``: bytes one process holds; ``flops``: the job's, shared by its ``processes`` (each with its own
        device and ``runtime.tflops``); ``steps``: each process's."""
        tflops = self.plan.tables[table].cfg.runtime.tflops
        mem = (BASE_MB + (processes - 1) * PROCESS_MB + processes * held / MB) * MEM_MARGIN
        minutes = TIME_MARGIN * (flops / (processes * tflops * 1e12) + steps * STEP_SECONDS) / 60
        return Need(mem_mb=int(math.ceil(mem / MEM_STEP_MB) * MEM_STEP_MB),
                    runtime=max(MIN_RUNTIME_MIN, int(math.ceil(minutes / TIME_STEP_MIN) * TIME_STEP_MIN)))

    # --- what a job holds

    @functools.lru_cache(maxsize=None)
    def data_bytes(self, key: str, batch: int) -> float:
        """The data a job reads from directory ``key``: every split in memory, or a streamed job's buffers."""
        cfg = self.plan.data_config(key)
        src = source_info(cfg)
        if not self.plan.may_stream(key):
            return sum(split_sizes(cfg).values()) * src.in_chans * src.image_size**2
        return (cfg.workers + 1) * (cfg.shuffle_buffer + 4 * batch) * src.in_chans * src.image_size**2

    def store_bytes(self, stores: dict[str, StoreKey]) -> float:
        """The teacher outputs a job reads: whole stores in memory, or a streamed job's (shard, view) slices."""
        total = 0.0
        for sk in stores.values():
            cfg = self.plan.tables[sk.table].cfg
            views = cfg.protocol.views.count
            per_record = bytes_per_view(self.plan.tap_shape(sk), cfg.cache, sk.tap, views)
            if self.plan.may_stream(self.plan.data_key(sk.table)):
                total += (2 * cfg.data.workers + 2) * cfg.data.shard_size * per_record
            else:
                total += views * self.costs(sk.table).sizes["train"] * per_record
        return total

    # --- the jobs

    @functools.lru_cache(maxsize=None)
    def distill(self, job: DistillJob, epochs: int | None = None, splits: tuple[str, ...] = ("val", "test"),
                train: int | None = None) -> Need:
        """A distill job (or a trial: its ``epochs``, evaluated on ``splits``, trained on ``train`` images)."""
        costs, plan = self.costs(job.table), self.plan
        p = costs.cfg.protocol.for_student(job.student)
        n = costs.cfg.runtime.processes  # each process holds the data and stores, and a batch of B / n
        batch = p.batch_size // n
        held = (self.data_bytes(plan.data_key(job.table), batch) + self.store_bytes(plan.job_stores(job))
                + _train_bytes(costs.model(job.student), batch))
        if costs.live(job):
            held += _forward_bytes(costs.model(plan.teacher_model(plan.job_teacher(job))), batch)
        e = epochs or p.epochs
        steps = e * (_steps(costs.train_images(train), p.batch_size)
                     + sum(_steps(costs.sizes[s], p.eval_batch_size) for s in splits))
        return self._need(job.table, held, costs.distill(job, epochs, splits, train), steps, n)

    @functools.lru_cache(maxsize=None)
    def trial(self, job: DistillJob) -> Need:
        """A trial of a tuned table: the cell's job at the budget's epochs and training images, on val only."""
        budget = self.plan.tables[job.table].cfg.tune.budget
        return self.distill(job, budget.epochs, ("val",), budget.train_limit)

    @functools.lru_cache(maxsize=None)
    def teacher(self, tk: TeacherKey) -> Need:
        """Training a teacher, or an assistant (with the stores of the teacher it learns from); a checkpoint
        teacher is only loaded and saved."""
        costs = self.costs(tk.table)
        if not costs.trained(tk):
            return self._need(tk.table, _forward_bytes(costs.model(self.plan.teacher_model(tk)), 1), 0, 0)
        searched = tk.label is not None and self.plan.searched(tk.table, tk.label)  # AMD's fine-tuning: 1 process
        return self._training(tk, processes=1 if searched else costs.cfg.runtime.processes)

    def _training(self, tk: TeacherKey, copies: int = 1, epochs: int | None = None, processes: int = 1) -> Need:
        """``copies`` models of a teacher key's size trained together for ``epochs`` (the training's own), in
        ``processes`` processes (each a batch of B / N)."""
        costs, plan = self.costs(tk.table), self.plan
        train, own = costs.teacher_protocol(tk), costs.teacher_sizes(tk)
        cost = costs.model(plan.teacher_model(tk), train.image_size)
        batch = train.batch_size // processes
        held = (self.data_bytes(plan.teacher_data_key(tk.key), batch) + copies * _train_bytes(cost, batch))
        if tk.label:
            held += self.store_bytes(plan.assistant_stores(tk.table, tk.teacher, tk.label))
        scale = copies * (epochs or train.epochs) / train.epochs
        steps = (epochs or train.epochs) * (copies * _steps(own["train"], train.batch_size)
                                            + _steps(own["val"], train.eval_batch_size))
        return self._need(tk.table, held, scale * costs.teacher(tk), steps, processes)

    @functools.lru_cache(maxsize=None)
    def search(self, ak: TeacherKey) -> Need:
        """AMD's search: the teacher's candidates trained jointly, ``1 + sandwich`` per step (each counted at the
        teacher's full size: an upper bound), for the joint epochs."""
        _, mcfg = self.plan.method(ak.table, ak.label)
        epochs = mcfg.epochs("joint", self.costs(ak.table).cfg.protocol.epochs)
        return self._training(ak, 1 + mcfg.sandwich, epochs)

    @functools.lru_cache(maxsize=None)
    def oracle(self, ak: TeacherKey, student: str) -> Need:
        """AMD's audit run: one candidate (run live, at the teacher's full size) to one student, oracle epochs."""
        costs, plan = self.costs(ak.table), self.plan
        _, mcfg = plan.method(ak.table, ak.label)
        p = costs.cfg.protocol.for_student(student)
        epochs = mcfg.epochs("oracle", p.epochs)
        teacher = costs.model(plan.teacher_model(ak))
        held = (self.data_bytes(plan.data_key(ak.table), p.batch_size) + _train_bytes(costs.model(student), p.batch_size)
                + _forward_bytes(teacher, p.batch_size))
        n = costs.sizes
        flops = epochs * ((3 * costs.model(student).flops + teacher.flops) * n["train"]
                          + costs.model(student).flops * n["val"])
        steps = epochs * (_steps(n["train"], p.batch_size) + _steps(n["val"], p.eval_batch_size))
        return self._need(ak.table, held, flops, steps)

    @functools.lru_cache(maxsize=None)
    def verify(self, tk: TeacherKey) -> Need:
        """A checkpoint teacher's test top-1: one evaluation pass."""
        costs = self.costs(tk.table)
        train, own = costs.teacher_protocol(tk), costs.teacher_sizes(tk)
        cost = costs.model(self.plan.teacher_model(tk), train.image_size)
        held = self.data_bytes(self.plan.teacher_data_key(tk.key), train.eval_batch_size) + _forward_bytes(
            cost, train.eval_batch_size)
        return self._need(tk.table, held, cost.flops * own["test"], _steps(own["test"], train.eval_batch_size))

    @functools.lru_cache(maxsize=None)
    def store_shard(self, sk: StoreKey) -> Need:
        """One data shard of one store: every view of its images through the teacher, the shard's outputs held."""
        costs, plan = self.costs(sk.table), self.plan
        cfg = costs.cfg
        shards = len(plan.store_shards(sk.dir))
        views = cfg.protocol.views.count
        images = min(cfg.data.shard_size, costs.sizes["train"])
        out = views * images * bytes_per_view(plan.tap_shape(sk), cfg.cache, sk.tap, views)
        held = (self.data_bytes(plan.data_key(sk.table), cfg.protocol.eval_batch_size) + out
                + _forward_bytes(costs.model(plan.teacher_model(sk.teacher)), cfg.protocol.eval_batch_size))
        steps = views * _steps(images, cfg.protocol.eval_batch_size)
        return self._need(sk.table, held, costs.store(sk) / shards, steps)


def stage_limits(plan: Plan, table: str) -> dict[str, Need]:
    """Per stage of a table (the estimate's stages), the largest memory and time limit its jobs ask for."""
    needs = Needs(plan)
    cfg = plan.tables[table].cfg
    jobs = [j for j in plan.jobs if j.table == table]
    teachers = [tk for tk in plan.teachers.values() if tk.table == table]
    stages = {
        "teachers": [needs.teacher(tk) for tk in teachers if not tk.label],
        "assistants": [needs.teacher(tk) for tk in teachers if tk.label],
        "store shards": [needs.store_shard(sk) for sk in plan.stores.values() if sk.table == table],
        "distill": [needs.distill(j) for j in jobs],
    }
    if cfg.tune is not None:
        stages["trials"] = [needs.trial(j) for j in jobs if j.seed == jobs[0].seed]
        stages["tuned"] = stages["distill"]
    return {name: Need(max(n.mem_mb for n in got), max(n.runtime for n in got)) for name, got in stages.items() if got}


def render_limits(plan: Plan) -> str:
    """``kdbench plan --estimate``'s job limits: per table and stage, the largest ``mem_mb`` and ``runtime``."""
    lines = []
    for name, table in plan.tables.items():
        lines.append(f"table {name}: job limits on a cluster (the largest of each stage; kdbench/resources.py,"
                     f" at runtime.tflops {table.cfg.runtime.tflops:g})")
        lines.append(f"  {'stage':<13}{'memory':>10}{'time':>10}")
        for stage, need in stage_limits(plan, name).items():
            lines.append(f"  {stage:<13}{need.mem_mb / 1000:>8.1f}GB{need.runtime // 60:>6}h{need.runtime % 60:02d}m")
    return "\n".join(lines)
