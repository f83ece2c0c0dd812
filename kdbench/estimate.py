"""What a plan costs before it runs: jobs per stage and compute, from each model's measured FLOPs per image.

The forward FLOPs of one image are counted by running the model once (``torch.utils.flop_counter``, which counts
the matrix multiplications and convolutions of the actual forward, at the protocol's resolution). A training step
costs three forwards (forward + backward), a teacher forward or an evaluation one:

* teacher (or assistant) training: epochs x train images x 3 F_teacher, plus one evaluation pass of val per epoch;
* a store: V views x train images x F_teacher (each stored tap is its own job, so each pays its forwards);
* a distill job: epochs x train images x 3 F_student, plus F_teacher per image and epoch when the teacher runs
  live, plus one evaluation pass of val and test per epoch;
* a tuned table (``tune:``, :mod:`kdbench.tuning`): its trials (K x the budget's seeds per cell, each a distill
  job at the budget's epochs, evaluated on val only) and its final tuned runs (one per distill job).

GPU-hours are those FLOPs at an assumed sustained throughput (``gpu_tflops``, 10 TFLOP/s by default: a V100- or
A100-class GPU in fp32 / TF32 on small CIFAR nets, far below its peak; a data-loading-bound job is slower). Left
out: method adapters and losses (small next to the networks), data preparation and reports, AMD's search and
oracle runs (:mod:`kdbench.tasearch`), retrieval evaluation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from kdbench.data.sources import source_info, split_sizes
from kdbench.models import create_model
from kdbench import tuning
from kdbench.plan import Plan

DEFAULT_GPU_TFLOPS = 10.0


@functools.lru_cache(maxsize=None)
def forward_flops(model: str, num_classes: int, in_chans: int, image_size: int) -> int:
    """Forward FLOPs of one image through a timm model (eval mode), counted on a real forward pass."""
    net = create_model(model, num_classes, in_chans, image_size).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.zeros(1, in_chans, image_size, image_size))
    return counter.get_total_flops()


@dataclass(frozen=True)
class Stage:
    """One stage of a table: its job count and the FLOPs of all its jobs."""

    name: str
    jobs: int
    flops: float

    def gpu_hours(self, gpu_tflops: float = DEFAULT_GPU_TFLOPS) -> float:
        return self.flops / (gpu_tflops * 1e12) / 3600


def estimate(plan: Plan) -> dict[str, list[Stage]]:
    """Per table: the stages ``teachers`` (trained ones; checkpoints cost nothing), ``assistants``, ``store shards``
    (one job per tap and data shard) and ``distill``, each with its jobs and FLOPs."""
    out = {}
    for name, table in plan.tables.items():
        cfg = table.cfg
        src = source_info(cfg.data)
        sizes = split_sizes(cfg.data)
        size = cfg.protocol.image_size or src.image_size

        def f(model: str, image_size: int | None = None) -> int:
            return forward_flops(model, src.num_classes, src.in_chans, image_size or size)

        trained = {"teachers": [0, 0.0], "assistants": [0, 0.0]}
        for tk in plan.teachers.values():
            if tk.table != name or (not tk.label and cfg.teachers[tk.teacher].checkpoint):
                continue
            train = cfg.protocol if tk.label else cfg.teachers[tk.teacher].train
            own = split_sizes(plan.data_config(plan.teacher_data_key(tk.key)))  # a teacher's own data, if it has one
            flops = f(plan.teacher_model(tk), train.image_size) * train.epochs * (3 * own["train"] + own["val"])
            stage = trained["assistants" if tk.label else "teachers"]
            stage[0], stage[1] = stage[0] + 1, stage[1] + flops
        stores = [s for s in plan.stores.values() if s.table == name]
        store_flops = sum(f(plan.teacher_model(s.teacher)) * cfg.protocol.views.count * sizes["train"] for s in stores)
        def job_flops(job, epochs: int | None = None, splits: tuple[str, ...] = ("val", "test")) -> float:
            p = cfg.protocol.for_student(job.student)
            e = epochs or p.epochs
            student = f(job.student) * e * (3 * sizes["train"] + sum(sizes[s] for s in splits))
            cls, mcfg = plan.method(name, job.label)
            tk = plan.job_teacher(job)
            live = tk is not None and cls.teacher_taps(mcfg) and not plan.job_stores(job)
            return student + (f(plan.teacher_model(tk)) * e * sizes["train"] if live else 0)

        jobs = [j for j in plan.jobs if j.table == name]
        stages = [Stage("teachers", *trained["teachers"]), Stage("assistants", *trained["assistants"]),
                  Stage("store shards", sum(len(plan.store_shards(s.dir)) for s in stores), store_flops),
                  Stage("distill", len(jobs), sum(job_flops(j) for j in jobs))]
        if cfg.tune is not None:  # K trials x budget seeds per cell (val only), then every seed again, tuned
            cells = tuning.cells(plan, name)
            per_cell = cfg.tune.trials * len(cfg.tune.budget.seeds)
            trial_flops = sum(job_flops(plan.job(name, t, s, m, 0), cfg.tune.budget.epochs, ("val",))
                              for t, s, m in cells)
            stages += [Stage("trials", per_cell * len(cells), per_cell * trial_flops),
                       Stage("tuned", len(jobs), stages[-1].flops)]
        out[name] = stages
    return out


def assumptions(plan: Plan) -> dict[str, str]:
    """Per table, one line: the images its estimate counts (the sizes of the data at ``data.root``: a smaller
    copy, or ``train_limit`` / ``test_limit``, gives smaller figures), their resolution, epochs and views."""
    out = {}
    for name, table in plan.tables.items():
        cfg = table.cfg
        sizes = split_sizes(cfg.data)
        size = cfg.protocol.image_size or source_info(cfg.data).image_size
        limits = ", ".join(f"{k} {getattr(cfg.data, k)}" for k in ("train_limit", "test_limit") if getattr(cfg.data, k))
        out[name] = (f"assumes {sizes['train']} training, {sizes['val']} val and {sizes['test']} test images of"
                     f" {cfg.data.source} at {cfg.data.root} ({size} px{', ' + limits if limits else ''}),"
                     f" {cfg.protocol.epochs} epochs, {cfg.protocol.views.count} views per image")
    return out


def render(estimates: dict[str, list[Stage]], gpu_tflops: float = DEFAULT_GPU_TFLOPS,
           notes: dict[str, str] | None = None) -> str:
    """A plain-text table per table: jobs, PFLOPs and GPU-hours per stage, and the total; under its title, the
    table's note (:func:`assumptions`), if given."""
    lines = []
    for name, stages in estimates.items():
        lines.append(f"table {name}: compute estimate at {gpu_tflops:g} TFLOP/s sustained per GPU")
        if notes and name in notes:
            lines.append(f"  {notes[name]}")
        lines.append(f"  {'stage':<13}{'jobs':>6}{'PFLOP':>12}{'GPU-hours':>11}")
        for s in stages + [Stage("total", sum(s.jobs for s in stages), sum(s.flops for s in stages))]:
            lines.append(f"  {s.name:<13}{s.jobs:>6}{s.flops / 1e15:>12.1f}{s.gpu_hours(gpu_tflops):>11.1f}")
    return "\n".join(lines)
