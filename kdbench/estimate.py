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
from kdbench.config import Protocol
from kdbench.plan import DistillJob, Plan, StoreKey, TeacherKey

DEFAULT_GPU_TFLOPS = 10.0


@dataclass(frozen=True)
class ModelCost:
    """What one image costs a model, measured on one real forward pass (eval mode, the protocol's resolution).

    Attributes:
        flops: Forward FLOPs (``torch.utils.flop_counter``: the matrix multiplications and convolutions).
        activations: Elements of every leaf module's output (what a training step keeps for its backward).
        peak: Elements of the largest leaf module's output (what a forward without gradients holds at once,
            with its input).
        params: Parameters.
    """

    flops: int
    activations: int
    peak: int
    params: int


@functools.lru_cache(maxsize=None)
def model_cost(model: str, num_classes: int, in_chans: int, image_size: int) -> ModelCost:
    """The :class:`ModelCost` of one image through a timm model, counted on a real forward pass."""
    net = create_model(model, num_classes, in_chans, image_size).eval()
    outputs = []

    def count(_module, _inputs, out) -> None:
        outputs.extend(t.numel() for t in (out if isinstance(out, (tuple, list)) else [out]) if torch.is_tensor(t))

    hooks = [m.register_forward_hook(count) for m in net.modules() if not list(m.children())]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.zeros(1, in_chans, image_size, image_size))
    for h in hooks:
        h.remove()
    return ModelCost(counter.get_total_flops(), sum(outputs), max(outputs, default=0),
                     sum(p.numel() for p in net.parameters()))


def forward_flops(model: str, num_classes: int, in_chans: int, image_size: int) -> int:
    """Forward FLOPs of one image through a timm model (eval mode), counted on a real forward pass."""
    return model_cost(model, num_classes, in_chans, image_size).flops


@dataclass(frozen=True)
class Stage:
    """One stage of a table: its job count and the FLOPs of all its jobs."""

    name: str
    jobs: int
    flops: float

    def gpu_hours(self, gpu_tflops: float = DEFAULT_GPU_TFLOPS) -> float:
        return self.flops / (gpu_tflops * 1e12) / 3600


class TableCosts:
    """The FLOPs of each job of one table, from its models' counted forwards and its data's sizes."""

    def __init__(self, plan: Plan, table: str) -> None:
        self.plan, self.table, self.cfg = plan, table, plan.tables[table].cfg
        self.src = source_info(self.cfg.data)
        self.sizes = split_sizes(self.cfg.data)
        self.image_size = self.cfg.protocol.image_size or self.src.image_size

    def model(self, model: str, image_size: int | None = None) -> ModelCost:
        return model_cost(model, self.src.num_classes, self.src.in_chans, image_size or self.image_size)

    def trained(self, tk: TeacherKey) -> bool:
        """Whether a teacher key is trained by the workflow (a checkpoint teacher is not)."""
        return bool(tk.label) or not self.cfg.teachers[tk.teacher].checkpoint

    def teacher_protocol(self, tk: TeacherKey) -> Protocol:
        return self.cfg.protocol if tk.label else self.cfg.teachers[tk.teacher].train

    def teacher_sizes(self, tk: TeacherKey) -> dict[str, int]:
        """The split sizes of the data a teacher (or an assistant) trains on (a teacher's own data, if it has one)."""
        return split_sizes(self.plan.data_config(self.plan.teacher_data_key(tk.key)))

    def teacher(self, tk: TeacherKey) -> float:
        """Training a teacher or an assistant: epochs x (3 forwards per training image + one per val image)."""
        train, own = self.teacher_protocol(tk), self.teacher_sizes(tk)
        return self.model(self.plan.teacher_model(tk), train.image_size).flops * train.epochs * (
            3 * own["train"] + own["val"])

    def store(self, sk: StoreKey) -> float:
        """A whole store: every view of every training image through the teacher (its shards share it evenly)."""
        return self.model(self.plan.teacher_model(sk.teacher)).flops * self.cfg.protocol.views.count * self.sizes["train"]

    def live(self, job: DistillJob) -> bool:
        """Whether a job runs its teacher (or assistant) online, every epoch."""
        cls, mcfg = self.plan.method(self.table, job.label)
        tk = self.plan.job_teacher(job)
        return tk is not None and bool(cls.teacher_taps(mcfg)) and not self.plan.job_stores(job)

    def distill(self, job: DistillJob, epochs: int | None = None, splits: tuple[str, ...] = ("val", "test"),
                train: int | None = None) -> float:
        """A distill job (or a trial: fewer ``epochs``, ``splits`` val only, ``train`` images): epochs x (3 student
        forwards per training image + one per evaluated image), plus a teacher forward per training image when it
        runs live."""
        e, n = epochs or self.cfg.protocol.epochs, self.train_images(train)
        student = self.model(job.student).flops * e * (3 * n + sum(self.sizes[s] for s in splits))
        tk = self.plan.job_teacher(job)
        return student + (self.model(self.plan.teacher_model(tk)).flops * e * n if self.live(job) else 0)

    def train_images(self, limit: int | None = None) -> int:
        """The training images a job trains on: the split's, or ``limit`` of them (a trial's subset)."""
        return min(limit or self.sizes["train"], self.sizes["train"])

    def trial(self, job: DistillJob) -> float:
        """A trial of a tuned table: the cell's job at the budget's epochs and training images, on val only."""
        budget = self.cfg.tune.budget
        return self.distill(job, budget.epochs, ("val",), budget.train_limit)


def estimate(plan: Plan) -> dict[str, list[Stage]]:
    """Per table: the stages ``teachers`` (trained ones; checkpoints cost nothing), ``assistants``, ``store shards``
    (one job per tap and data shard) and ``distill``, each with its jobs and FLOPs."""
    out = {}
    for name, table in plan.tables.items():
        cfg, costs = table.cfg, TableCosts(plan, name)
        trained = {"teachers": [0, 0.0], "assistants": [0, 0.0]}
        for tk in plan.teachers.values():
            if tk.table != name or not costs.trained(tk):
                continue
            stage = trained["assistants" if tk.label else "teachers"]
            stage[0], stage[1] = stage[0] + 1, stage[1] + costs.teacher(tk)
        stores = [s for s in plan.stores.values() if s.table == name]
        jobs = [j for j in plan.jobs if j.table == name]
        stages = [Stage("teachers", *trained["teachers"]), Stage("assistants", *trained["assistants"]),
                  Stage("store shards", sum(len(plan.store_shards(s.dir)) for s in stores),
                        sum(costs.store(s) for s in stores)),
                  Stage("distill", len(jobs), sum(costs.distill(j) for j in jobs))]
        if cfg.tune is not None:  # K trials x budget seeds per cell (val only), then every seed again, tuned
            cells = tuning.cells(plan, name)
            per_cell = cfg.tune.trials * len(cfg.tune.budget.seeds)
            trial_flops = sum(costs.trial(plan.job(name, t, s, m, 0)) for t, s, m in cells)
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
