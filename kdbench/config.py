"""The experiment matrix as frozen dataclasses: data, protocol, cache policy, teachers, grid.

Two layers of validation: ``workflow/schemas/config.schema.yaml`` checks shapes and types inside Snakemake,
and :func:`parse_config` (used by both the workflow and every ``kdbench`` command) checks the same keys
again plus everything a schema cannot know: registered methods and their parameters, model names,
(teacher, student, method) compatibility. Every error names the file and the dotted key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from kdbench._typed import build_dataclass
from kdbench._util import OMIT_WHEN_DEFAULT, did_you_mean, field_default, stable_hash, to_jsonable
from kdbench.errors import ConfigError
from kdbench.methods import METHODS
from kdbench.models import check_model_name
from kdbench.taps import is_tap


@dataclass(frozen=True)
class DataConfig:
    """Where the raw data is and how it is split and sharded.

    Attributes:
        source: Registered data source: ``fashion-mnist``, ``cifar100``, ``cifar10`` (fixed-size images held in
            memory), ``imagefolder`` (``root/train/<class>/<file>``, ``root/val/<class>/<file>``) or
            ``webdataset`` (existing tar shards, ``train_shards`` / ``test_shards``); the last two hold
            images of any size (:mod:`kdbench.data.sources`).
        root: Directory holding the raw files in the source's standard format.
        val_size: Training images held out (seeded) as the validation split, the only split used for any
            selection; the test split is never used for selection.
        shard_size: Samples per webdataset shard (and per teacher-output shard).
        split_seed: Seed of the train/val split.
        train_limit: Keep only this many training images (after the split); ``None`` keeps all.
        test_limit: Keep only the first this many test images; ``None`` keeps all.
        image_size: Model input resolution S (images are rendered S x S) of a variable-size source
            (``imagefolder``, ``webdataset``; required there); must be unset for the fixed-size sources.
        channels: 1 (grey) or 3 (RGB) of a variable-size source; ``None`` = 3 (grey images become RGB).
        train_shards: ``webdataset`` source: the training shards, a brace pattern
            (``/data/in1k/train-{000000..000146}.tar``), a directory of ``.tar`` files or a ``wids`` shard
            index (``.json``, which lists every shard's sample count).
        test_shards: ``webdataset`` source: the test shards (same forms).
        num_classes: ``webdataset`` source: the number of classes (``cls`` is in ``[0, num_classes)``).
        shards_per_job: Data shards written per workflow job (``data_shards``); ``None`` writes every shard in
            the one ``prepare_data`` job. How the work is split, not what is written: not part of the data's
            identity (:func:`kdbench.data.layout.data_identity`).
            These six are left out of every hash while unset, so existing configs keep their hashes.
        stream: How jobs read the shards (:mod:`kdbench.data.stream`): ``auto`` streams them exactly when the
            images differ in size (the data manifest's ``native_size`` is null), ``true`` streams fixed-size
            data too, ``false`` loads every split into memory (refused on variable-size data).
        workers: Streaming only: ``DataLoader`` worker processes that read, decode and render the shards (0:
            the main process). The order of the training samples depends on it (each worker reads its own
            shards; see :mod:`kdbench.data.stream`).
        shuffle_buffer: Streaming only: samples in the seeded in-shard shuffle buffer (the shards' order is
            shuffled too); a buffer at least as large as a shard is a full in-shard permutation.
            These three are left out of every hash while they have their defaults.
    """

    source: str = "fashion-mnist"
    root: str = "/usr/share/datasets/fashion-mnist"
    val_size: int = 5000
    shard_size: int = 10000
    split_seed: int = 0
    train_limit: int | None = None
    test_limit: int | None = None
    image_size: int | None = field(default=None, metadata=OMIT_WHEN_DEFAULT)
    channels: int | None = field(default=None, metadata=OMIT_WHEN_DEFAULT)
    train_shards: str | None = field(default=None, metadata=OMIT_WHEN_DEFAULT)
    test_shards: str | None = field(default=None, metadata=OMIT_WHEN_DEFAULT)
    num_classes: int | None = field(default=None, metadata=OMIT_WHEN_DEFAULT)
    shards_per_job: int | None = field(default=None, metadata=OMIT_WHEN_DEFAULT)
    stream: str | bool = field(default="auto", metadata=OMIT_WHEN_DEFAULT)
    workers: int = field(default=2, metadata=OMIT_WHEN_DEFAULT)
    shuffle_buffer: int = field(default=1000, metadata=OMIT_WHEN_DEFAULT)


DATA_READ_KEYS = ("stream", "workers", "shuffle_buffer")
"""The :class:`DataConfig` keys of how jobs read the shards, not of what the shards hold."""


@dataclass(frozen=True)
class ViewRecipe:
    """How the augmented views of a training image are drawn (see :mod:`kdbench.data.views`).

    Attributes:
        count: Views V per training image; epoch e replays view ``e mod V``.
        seed: Seed of the counter-based view generator.
        scale: Range of the crop's area as a fraction of the image.
        ratio: Range of the crop's aspect ratio (width / height).
        flip: Whether views are horizontally flipped with probability 1/2.
        mixup: Probability that a view is mixed with a partner drawn from the same data shard
            (lambda = max(a, 1 - a), a ~ U(0, 1), as in FunMatch).
        pad: If > 0, views are whole images shifted by up to ``pad`` pixels with zero fill (the CIFAR
            protocol's ``RandomCrop(size, padding=pad)``) instead of random-resized crops; ``scale`` and
            ``ratio`` are then unused.
    """

    count: int = 4
    seed: int = 0
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (0.75, 1.3333333)
    flip: bool = True
    mixup: float = 0.0
    pad: int = 0


#: Valid values of ``protocol.precision`` (:mod:`kdbench.numerics`).
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Protocol:
    """Everything that must be equal across methods; no method can change it.

    Attributes:
        epochs: Training epochs E.
        batch_size: Training batch size.
        eval_batch_size: Evaluation batch size (does not change results).
        optimizer: ``sgd`` or ``adamw``.
        lr: Peak learning rate.
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum.
        weight_decay: Weight decay.
        schedule: ``cosine`` (per step, to zero) or ``step`` (x gamma at each milestone epoch).
        milestones: Epochs of the ``step`` schedule.
        gamma: Decay factor of the ``step`` schedule.
        warmup_epochs: Linear warm-up epochs.
        decoupled_weight_decay: ``adamw`` only: the weight decay is not multiplied by the peak learning rate;
            each step shrinks the weights by ``schedule(t) * weight_decay`` (Loshchilov & Hutter's AdamW and
            big_vision's FunMatch configs), instead of PyTorch's ``lr * schedule(t) * weight_decay``.
        weight_decay_exclude_1d: No weight decay on 1-d parameters (biases, normalisation scales and shifts):
            only weight matrices and kernels decay, as in big_vision (``.*/kernel$``) and timm.
        grad_clip_norm: Clip the global L2 norm of the gradients (student and method adapters) to this value
            before every optimiser step; ``None`` does not clip.
            These three are left out of the hash while they have their defaults (today's behaviour), so
            existing configs keep their hashes.
        views: The view recipe.
        image_size: Input resolution; ``None`` keeps the dataset's own.
        retrieval_tap: Measure retrieval at the end of every distill job with the student's embedding at this
            tap: ``pre_logits``, ``logits`` or ``feature[i]`` (a feature map is pooled to a vector by global
            average pooling). Database = the training split, queries = the test split, both rendered as
            evaluation renders them (whole images, no augmentation); 11-point mAP and top-100 precision with
            cosine and Euclidean distance, InDistill's official protocol (:mod:`kdbench.retrieval`).
            ``None`` (the default) = off; left out of the hash while off, so existing configs keep their
            hashes. Never part of a teacher's training protocol.
        precision: ``fp32`` (default) or ``bf16``: every model forward that trains or produces teacher outputs
            (the student's and the teacher's training and evaluation, the cache builder, the fidelity check, the
            live teacher) runs under ``torch.autocast`` with bfloat16 on the job's device (CUDA or CPU); the
            outputs are cast to float32 at the end of the forward, so every method's loss, its adapters and the
            stored teacher outputs are float32 (:mod:`kdbench.numerics`).
        channels_last: Models and 4-d inputs in the channels-last memory format (the default, as every kdbench
            release so far has run; tensor cores prefer it) or, with ``false``, in the contiguous (NCHW) format.
            The two give the same predictions up to float rounding (not bit for bit).
            These two are left out of the hash while they have their defaults, so existing configs keep their
            hashes and their results; like the other opt-in options, a teacher's ``train`` does not inherit them.
        student_lr: Peak learning rate of these students (timm model name -> lr), replacing ``lr`` for them
            under every method alike (the student alone included): the CRD protocol's rule of lr 0.01 for
            MobileNetV2 and ShuffleNet students. Never part of a teacher's training protocol; left out of the
            hash while empty.        sync_batchnorm: In a data-parallel job (``runtime.processes`` > 1): ``false`` (the default) keeps
            BatchNorm per process (each normalises its B / N samples; the running statistics evaluated and
            saved are rank 0's), ``true`` synchronises its batch statistics over the processes
            (``torch.nn.SyncBatchNorm``: the statistics of the whole global batch, as in one process; CUDA only).
            No effect in one process. Part of the protocol hash only when ``true``, so existing configs keep their
            hashes; never part of a teacher's training protocol.
    """

    epochs: int = 8
    batch_size: int = 128
    eval_batch_size: int = 1000
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_epochs: int = 0
    decoupled_weight_decay: bool = field(default=False, metadata=OMIT_WHEN_DEFAULT)
    weight_decay_exclude_1d: bool = field(default=False, metadata=OMIT_WHEN_DEFAULT)
    grad_clip_norm: float | None = field(default=None, metadata=OMIT_WHEN_DEFAULT)
    views: ViewRecipe = field(default_factory=ViewRecipe)
    image_size: int | None = None
    retrieval_tap: str | None = field(default=None, metadata=OMIT_WHEN_DEFAULT)
    precision: str = field(default="fp32", metadata=OMIT_WHEN_DEFAULT)
    channels_last: bool = field(default=True, metadata=OMIT_WHEN_DEFAULT)
    student_lr: Mapping[str, float] = field(default_factory=dict, metadata=OMIT_WHEN_DEFAULT)
    sync_batchnorm: bool = field(default=False, metadata=OMIT_WHEN_DEFAULT)

    def hash(self) -> str:
        """A stable hash of the whole protocol, recorded in every run."""
        return stable_hash(self)

    def for_student(self, model: str) -> Protocol:
        """The protocol a student trains under: ``lr`` is ``student_lr[model]`` when the model is listed."""
        return replace(self, lr=self.student_lr[model]) if model in self.student_lr else self


def per_rank_batch(batch_size: int, processes: int, source: str, key: str = "protocol.batch_size") -> int:
    """The batch each of ``processes`` processes of a data-parallel job trains on: the protocol's (global)
    ``batch_size`` / ``processes``.

    Raises:
        ConfigError: ``batch_size`` is not a multiple of ``processes`` (``source`` names the config file, ``key``
            the batch size's key).
    """
    if batch_size % processes:
        raise ConfigError(f"{source}: key '{key}' ({batch_size}) is the global batch and must divide"
                          f" into {processes} processes (runtime.processes); choose a multiple of {processes}")
    return batch_size // processes


DEFAULT_TOPK = 10
"""The top-k of the logits store when ``cache.topk`` is unset and the dataset has many classes."""


@dataclass(frozen=True)
class CachePolicy:
    """Global storage policy of the teacher-output stores.

    Attributes:
        logits_dtype: ``float16`` (default) or ``float32``.
        topk: Keep only the top-k logits (fp16 values + int16/int32 indices + logsumexp); ``None`` = all. Left
            unset in the config file, it defaults to :data:`DEFAULT_TOPK` for a dataset of at least
            ``topk_min_classes`` classes whose methods all accept a top-k store, else to ``None``
            (:func:`kdbench.plan.default_topk`); the resolved config then says which.
        topk_min_classes: The class count from which an unset ``topk`` defaults to :data:`DEFAULT_TOPK`
            (ImageNet-1k's fp16 logits are 2 KB per image and view, top-10 74 B: the README's store sizes).
        feature_pool: Adaptive average pooling of feature maps to this spatial size before storing;
            ``None`` stores them whole.
        feature_dtype: ``float16`` or ``bfloat16`` (for features beyond fp16's range) or ``float32``.
        verify: The reader re-hashes every shard against the manifest when it opens a store.
    """

    logits_dtype: str = "float16"
    topk: int | None = None
    topk_min_classes: int = field(default=1000, metadata=OMIT_WHEN_DEFAULT)
    feature_pool: int | None = None
    feature_dtype: str = "float16"
    verify: bool = True


@dataclass(frozen=True)
class TeacherConfig:
    """One teacher: a timm model name, trained by the workflow or loaded from a local checkpoint.

    Attributes:
        model: timm model name (kdbench's own small models are registered in timm).
        checkpoint: Path to a local checkpoint (a state dict) to load instead of training; its sha256 is
            recorded.
        train: Protocol of the teacher's own training (keys of :class:`Protocol`, unset ones from the
            student protocol, except its opt-in options: ``retrieval_tap``, ``grad_clip_norm``,
            ``decoupled_weight_decay``, ``weight_decay_exclude_1d``, ``precision``, ``channels_last``: a teacher
            trains in fp32 unless its own ``train.precision`` says ``bf16``). A teacher sees a fresh view in every
            epoch. Its outputs for a table (cache, live teacher) are computed under the table's ``protocol``
            numerics (``precision``, ``channels_last``), as the students' forwards are.
        data: The data the teacher trains on; ``None`` is the table's own. Set by ``{from: other.yaml}``
            (the other config's teacher, trained on that config's data, shared with it).
        sha256: The expected sha256 of the ``checkpoint`` file (64 hex digits, stored lower-case): loading a
            file with another digest is refused. Part of the teacher's key when set (it names the weights).
        expected_top1: The checkpoint's expected test top-1 in percent (e.g. its published number); the
            workflow's ``verify_teacher`` job measures it (as the teacher job would) and stops everything that
            depends on the teacher when it is off by more than ``top1_tolerance``. Checkpoints only: a trained
            teacher's accuracy is a result of the workflow, measured and recorded, not a claim to check.
        top1_tolerance: Allowed ``|measured - expected_top1|`` in points. 1.0 by default: on a fixed checkpoint
            and test set nothing is random, so only numerics (cuDNN, channels-last: a few images) and small
            evaluation differences (resize interpolation, centre crop: a few tenths on ImageNet) move the
            number, while a wrong checkpoint or preprocessing moves it by points (RepDistiller's resnet110:
            70.3% measured vs 74.3% published).
            These three are left out of every hash while unset, so existing configs keep their hashes.
    """

    model: str
    checkpoint: str | None = None
    train: Protocol = field(default_factory=Protocol)
    data: DataConfig | None = None
    sha256: str | None = field(default=None, metadata=OMIT_WHEN_DEFAULT)
    expected_top1: float | None = field(default=None, metadata=OMIT_WHEN_DEFAULT)
    top1_tolerance: float = field(default=1.0, metadata=OMIT_WHEN_DEFAULT)


#: Where a method entry's teacher outputs come from (``methods.<label>.teacher_source``).
TEACHER_SOURCES = ("cache", "live")


@dataclass(frozen=True)
class MethodEntry:
    """One column of the grid: a registered method with its parameters under a label.

    Attributes:
        label: The name in the config and the leaderboard (e.g. ``kd`` or ``funmatch_fixed``).
        method: The registered method name (defaults to the label).
        params: Parameters of the method's ``Config`` dataclass.
        teacher_source: The harness's, not the method's: ``cache`` (default) serves the teacher's outputs from
            the stores unless the method needs the teacher online; ``live`` runs the teacher during training on
            the same counter-based views, although the method could read a cache (the reference of the cache
            budget study: at V = E it must reproduce the cached run). Left out of every hash while ``cache``.
    """

    label: str
    method: str
    params: Mapping[str, Any] = field(default_factory=dict)
    teacher_source: str = field(default="cache", metadata=OMIT_WHEN_DEFAULT)


def hashed_entry(entry: MethodEntry) -> MethodEntry:
    """The entry as every key and hash sees it: without the parameters that change only an audit's runs (the
    method's ``audit_params``, e.g. AMD's oracle seeds), so that changing them reruns the audit alone."""
    drop = METHODS.get(entry.method).audit_params & set(entry.params)
    return replace(entry, params={k: v for k, v in entry.params.items() if k not in drop}) if drop else entry


def reads_full_logits_from_store(entry: MethodEntry) -> bool:
    """Whether a method label reads every logit of the teacher from the store (it would be refused a top-k one)."""
    cls = METHODS.get(entry.method)
    reqs = cls.requirements(cls.make_config(entry.params))
    return reqs.full_logits and not reqs.live_teacher and entry.teacher_source == "cache"


@dataclass(frozen=True)
class Runtime:
    """How jobs run; never part of any hash (results must not depend on it, except device numerics).

    Attributes:
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        threads: torch intra-op threads per job.
        tflops: Sustained TFLOP/s a job gets from its device; sets each job's time limit on a cluster
            (:mod:`kdbench.resources`). 10 is a V100- or A100-class GPU on small nets; one CPU core gives ~0.02.
        processes: Processes per distill or trial job (data parallel, :mod:`kdbench.distributed`): 1 (the
            default) runs the job as one process; N > 1 runs it under ``torchrun --standalone
            --nproc-per-node=N`` (one GPU each on CUDA, gloo on CPU), and on SLURM the job asks for N GPUs and
            ``threads`` CPUs per GPU. The global batch stays ``protocol.batch_size`` (B / N per process, so B
            must be a multiple of N): results do not depend on N beyond float rounding (without BatchNorm) or
            per-process BatchNorm statistics (``protocol.sync_batchnorm``). Trained teachers and TAKD's
            assistant (a distill job) train in N processes too; cache jobs, a checkpoint teacher's loading and
            AMD's search, oracle and fine-tuning run as one process.
    """

    device: str = "auto"
    threads: int = 1
    tflops: float = field(default=10.0, metadata=OMIT_WHEN_DEFAULT)
    processes: int = field(default=1, metadata=OMIT_WHEN_DEFAULT)


#: The protocol's shared knobs a table may tune for every method (the student alone included), and ``method``:
#: every parameter of the method's own ``search_space`` (:mod:`kdbench.space`).
TUNE_KNOBS = ("lr", "weight_decay", "method")
#: What a trial is scored on (val only: a trial never computes a test metric).
TUNE_METRICS = ("val_top1", "val_map_cosine", "val_map_euclidean")
TUNE_SAMPLERS = ("random", "qmc")


@dataclass(frozen=True)
class TuneBudget:
    """What one trial costs.

    Attributes:
        epochs: Training epochs of a trial (the protocol's schedule compressed to them: a cosine over the trial's
            epochs, a step schedule's milestones scaled by ``epochs / protocol.epochs``); ``None``: the
            protocol's.
        seeds: The seeds every trial runs with; a trial's score is the mean of its seeds' scores.
        train_limit: Train a trial on this many images of the training split (a seeded random subset, drawn with
            ``tune.seed``: the same images for every trial, method and cell of the table;
            :func:`kdbench.tuning.trial_rows`); ``None``: the whole training split. Data held in memory only.
    """

    epochs: int | None = None
    seeds: tuple[int, ...] = (0,)
    train_limit: int | None = None


@dataclass(frozen=True)
class TuneConfig:
    """A table's ``tune:`` section: the same trial budget for every method of the table (:mod:`kdbench.tuning`).

    Attributes:
        trials: Trials K per (teacher, student, method label); trial 0 is the configured (paper) values.
        sampler: ``random`` (Optuna's ``RandomSampler``) or ``qmc`` (``QMCSampler``, scrambled Sobol); both
            seeded and non-adaptive, so every trial is proposed before any runs.
        seed: Seed of the sampler (with the teacher, student and label: every cell draws its own trials).
        knobs: What is tuned: ``lr`` and ``weight_decay`` (the protocol's, per method; the student alone
            included) and ``method`` (every parameter of the method's ``search_space``).
        lr_range: ``[low, high]`` of the log-uniform learning rate; ``None``: the student's lr / 3 to x 3.
        weight_decay_range: ``[low, high]`` of the log-uniform weight decay; ``None``: the protocol's / 10 to x 10.
        budget: What one trial runs (:class:`TuneBudget`).
        metric: The val metric trials are scored on: ``val_top1`` (last epoch), or a retrieval mAP on val
            queries (``val_map_cosine``, ``val_map_euclidean``; needs ``protocol.retrieval_tap``).
        rule: How the winner is chosen: ``best_mean`` (the highest mean score over the budget's seeds; a tie
            goes to the lowest trial, so the configured values win ties and tuning never looks worse on val).
    """

    trials: int = 8
    sampler: str = "random"
    seed: int = 0
    knobs: tuple[str, ...] = TUNE_KNOBS
    lr_range: tuple[float, float] | None = None
    weight_decay_range: tuple[float, float] | None = None
    budget: TuneBudget = field(default_factory=TuneBudget)
    metric: str = "val_top1"
    rule: str = "best_mean"


@dataclass(frozen=True)
class Config:
    """A whole experiment matrix: one protocol, one leaderboard.

    The grid is every (teacher, student) pair of ``pairs`` when the config lists them (the CRD table's 13 standard
    pairs), else every teacher with every student; each pair runs every method with every seed.
    """

    name: str
    data: DataConfig
    protocol: Protocol
    cache: CachePolicy
    teachers: Mapping[str, TeacherConfig]
    students: tuple[str, ...]
    methods: Mapping[str, MethodEntry]
    seeds: tuple[int, ...]
    runtime: Runtime = field(default_factory=Runtime)
    source: str = "<dict>"
    pairs: tuple[tuple[str, str], ...] | None = None
    tune: TuneConfig | None = None

    def protocol_hash(self) -> str:
        return self.protocol.hash()

    def grid(self) -> list[tuple[str, str]]:
        """The ``(teacher, student)`` pairs of the table, in the config's order."""
        if self.pairs is not None:
            return list(self.pairs)
        return [(t, s) for t in self.teachers for s in self.students]

    def students_of(self, teacher: str) -> tuple[str, ...]:
        """The students a teacher distils into (all of them without ``pairs``)."""
        return tuple(s for t, s in self.grid() if t == teacher)


def _check_reading(d: DataConfig, where: str, source: str) -> None:
    """Checks the keys of how a data directory is read (``stream``, ``workers``, ``shuffle_buffer``)."""
    checks = [
        (d.stream in ("auto", True, False), "stream", "must be auto, true or false"),
        (d.workers >= 0, "workers", "must be >= 0 (0: read in the main process)"),
        (d.shuffle_buffer >= 1, "shuffle_buffer", "must be >= 1"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"{source}: key '{where}.{key}' {msg}")


def _check_protocol(p: Protocol, where: str, source: str) -> None:
    checks = [
        (p.epochs >= 1, "epochs", "must be >= 1"),
        (p.batch_size >= 1, "batch_size", "must be >= 1"),
        (p.optimizer in ("sgd", "adamw"), "optimizer", "must be 'sgd' or 'adamw'"),
        (p.schedule in ("cosine", "step", "constant"), "schedule", "must be 'cosine', 'step' or 'constant'"),
        (p.lr > 0, "lr", "must be > 0"),
        (p.optimizer == "adamw" or not p.decoupled_weight_decay, "decoupled_weight_decay",
         "needs optimizer 'adamw' (SGD's weight decay is part of its gradient)"),
        (p.grad_clip_norm is None or p.grad_clip_norm > 0, "grad_clip_norm", "must be > 0 (or null: no clipping)"),
        (p.views.count >= 1, "views.count", "must be >= 1"),
        (0.0 <= p.views.mixup <= 1.0, "views.mixup", "must be a probability in [0, 1]"),
        (0 < p.views.scale[0] <= p.views.scale[1] <= 1.0, "views.scale", "must be 0 < low <= high <= 1"),
        (0 < p.views.ratio[0] <= p.views.ratio[1], "views.ratio", "must be 0 < low <= high"),
        (p.retrieval_tap is None or is_tap(p.retrieval_tap), "retrieval_tap",
         "must be a tap name: 'pre_logits', 'logits' or 'feature[i]' (or null: off)"),
        (all(lr > 0 for lr in p.student_lr.values()), "student_lr", "must map student models to learning rates > 0"),
        (p.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}, got {p.precision!r}"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"{source}: key '{where}.{key}' {msg}")


def _teacher_base(protocol: Protocol) -> Protocol:
    """The student protocol as the base of a teacher's ``train``, without its opt-in options (the fields marked
    ``OMIT_WHEN_DEFAULT``: ``retrieval_tap``, gradient clipping, decoupled / 1-d weight decay). A teacher takes
    those only from its own ``train`` keys: a resolved config leaves them out while off, so an inherited value
    would not survive the round trip (nor would a ``from:`` teacher stay the referenced config's teacher)."""
    return replace(protocol, **{f.name: field_default(f) for f in fields(Protocol) if f.metadata.get("omit_when_default")})


_TEACHER_CLAIMS = ("sha256", "expected_top1", "top1_tolerance")
"""The keys of a teacher that state what its checkpoint is (:class:`TeacherConfig`)."""

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def _teacher_claims(traw: Mapping[str, Any], where: str, source: str) -> dict[str, Any]:
    """The checked ``sha256``, ``expected_top1`` and ``top1_tolerance`` of a raw teacher (only the keys given)."""
    out: dict[str, Any] = {}
    given = [k for k in _TEACHER_CLAIMS if traw.get(k) is not None]
    if given and not traw.get("checkpoint"):
        raise ConfigError(f"{source}: key '{where}.{given[0]}' states what a checkpoint is, but '{where}' has no"
                          " 'checkpoint' (a trained teacher's weights and accuracy are results of the workflow, not"
                          f" claims to check). Fix: set '{where}.checkpoint' or remove '{where}.{given[0]}'")
    sha = traw.get("sha256")
    if sha is not None:
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise ConfigError(f"{source}: key '{where}.sha256' must be the checkpoint file's sha256, 64 hex digits"
                              f" (as 'sha256sum FILE' prints it), got {sha!r}")
        out["sha256"] = sha.lower()
    for key in ("expected_top1", "top1_tolerance"):
        value = traw.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: key '{where}.{key}' must be a number (percent points), got {value!r}")
        out[key] = float(value)
    if not 0 < out.get("expected_top1", 1.0) <= 100:
        raise ConfigError(f"{source}: key '{where}.expected_top1' must be a test top-1 in percent, in (0, 100];"
                          f" got {out['expected_top1']} (a fraction? 0.7431 is written 74.31)")
    if out.get("top1_tolerance", 1.0) <= 0:
        raise ConfigError(f"{source}: key '{where}.top1_tolerance' must be > 0 (points of top-1), got"
                          f" {out['top1_tolerance']}")
    if "top1_tolerance" in out and "expected_top1" not in out:
        raise ConfigError(f"{source}: key '{where}.top1_tolerance' is set, but '{where}.expected_top1' is not: there"
                          f" is nothing to compare with. Fix: set '{where}.expected_top1' or remove"
                          f" '{where}.top1_tolerance'")
    return out


def parse_config(raw: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Validates a raw config mapping and returns the frozen :class:`Config`.

    Raises:
        ConfigError: naming ``source`` and the offending dotted key.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: the config must be a mapping at the top level")
    # (`select`: the part of the table the workflow plans, kdbench.selection; read by kdbench.plan, which takes it
    # out before this parse: not part of the table)
    top = {"name", "data", "protocol", "cache", "teachers", "students", "pairs", "methods", "seeds", "runtime", "tune",
           "select"}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key '{unknown[0]}'; valid keys: {', '.join(sorted(top))}"
                          f"{did_you_mean(unknown[0], top)}")
    for key in ("name", "teachers", "methods", "seeds"):
        if key not in raw:
            raise ConfigError(f"{source}: missing required key '{key}'")
    if "students" not in raw and "pairs" not in raw:
        raise ConfigError(f"{source}: missing required key 'students' (a list of timm model names; or 'pairs', a list"
                          " of [teacher, student])")
    name = raw["name"]
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"{source}: key 'name' must be a non-empty string without '/'")
    data = build_dataclass(DataConfig, raw.get("data"), "data", source)
    _check_reading(data, "data", source)
    protocol = build_dataclass(Protocol, raw.get("protocol"), "protocol", source)
    _check_protocol(protocol, "protocol", source)
    cache = build_dataclass(CachePolicy, raw.get("cache"), "cache", source)
    runtime = build_dataclass(Runtime, raw.get("runtime"), "runtime", source)
    if isinstance(runtime.tflops, bool) or not isinstance(runtime.tflops, (int, float)) or runtime.tflops <= 0:
        raise ConfigError(f"{source}: key 'runtime.tflops' must be a number > 0 (the sustained TFLOP/s a job gets"
                          f" from its device), got {runtime.tflops!r}")
    if isinstance(runtime.processes, bool) or not isinstance(runtime.processes, int) or runtime.processes < 1:
        raise ConfigError(f"{source}: key 'runtime.processes' must be an integer >= 1 (processes per distill job),"
                          f" got {runtime.processes!r}")
    per_rank_batch(protocol.batch_size, runtime.processes, source)

    if not isinstance(raw["teachers"], Mapping) or not raw["teachers"]:
        raise ConfigError(f"{source}: key 'teachers' must be a non-empty mapping of name -> {{model: ...}}")
    teachers: dict[str, TeacherConfig] = {}
    for tname, traw in raw["teachers"].items():
        where = f"teachers.{tname}"
        if not isinstance(traw, Mapping) or "model" not in traw:
            raise ConfigError(f"{source}: key '{where}' must be a mapping with at least 'model' (or 'from: OTHER.yaml')")
        unknown = sorted(set(traw) - {"model", "checkpoint", "train", "data", *_TEACHER_CLAIMS})
        if unknown:
            raise ConfigError(f"{source}: unknown key '{where}.{unknown[0]}'; valid keys: checkpoint, data,"
                              f" expected_top1, from, model, sha256, top1_tolerance, train")
        if isinstance(traw.get("train"), Mapping) and traw["train"].get("retrieval_tap") is not None:
            raise ConfigError(f"{source}: key '{where}.train.retrieval_tap': a teacher's training measures no"
                              " retrieval; set 'protocol.retrieval_tap' (the students') instead")
        train = build_dataclass(Protocol, traw.get("train"), f"{where}.train", source,
                                base=_teacher_base(protocol))
        _check_protocol(train, f"{where}.train", source)
        _check_model(check_model_name, traw["model"], f"{where}.model", source)
        tdata = build_dataclass(DataConfig, traw["data"], f"{where}.data", source) if traw.get("data") else None
        if tdata is not None:
            _check_reading(tdata, f"{where}.data", source)
        if tdata is not None and tdata.source != data.source:
            raise ConfigError(f"{source}: key '{where}.data.source' is {tdata.source!r} but the table's data is"
                              f" {data.source!r}; a teacher must know the table's classes")
        if not traw.get("checkpoint"):  # a trained teacher trains in runtime.processes processes
            per_rank_batch(train.batch_size, runtime.processes, source, f"{where}.train.batch_size")
        teachers[str(tname)] = TeacherConfig(model=traw["model"], checkpoint=traw.get("checkpoint"), train=train,
                                             data=tdata, **_teacher_claims(traw, where, source))

    pairs = _parse_pairs(raw["pairs"], teachers, source) if "pairs" in raw else None
    students = raw["students"] if "students" in raw else list(dict.fromkeys(s for _, s in pairs))
    if not isinstance(students, list) or not students:
        raise ConfigError(f"{source}: key 'students' must be a non-empty list of timm model names")
    for i, s in enumerate(students):
        _check_model(check_model_name, s, f"students[{i}]", source)
    if pairs is not None:
        _check_pairs_cover(pairs, teachers, students, source)
    for model in protocol.student_lr:
        _check_model(check_model_name, model, f"protocol.student_lr.{model}", source)

    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{source}: key 'seeds' must be a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{source}: key 'seeds' has duplicates: {seeds}")

    if not isinstance(raw["methods"], Mapping) or not raw["methods"]:
        raise ConfigError(f"{source}: key 'methods' must be a non-empty mapping of label -> parameters")
    methods: dict[str, MethodEntry] = {}
    for label, mraw in raw["methods"].items():
        mraw = dict(mraw or {})
        mname = mraw.pop("method", label)
        teacher_source = mraw.pop("teacher_source", "cache")
        if mname not in METHODS:
            raise ConfigError(
                f"{source}: key 'methods.{label}': unknown method {mname!r}; valid choices: {', '.join(METHODS.names())}"
                f"{did_you_mean(mname, METHODS.names())} (a plugin's method is registered once its package is"
                " installed: pip install -e DIR)"
            )
        if teacher_source not in TEACHER_SOURCES:
            raise ConfigError(f"{source}: key 'methods.{label}.teacher_source' must be one of"
                              f" {', '.join(TEACHER_SOURCES)}, got {teacher_source!r}")
        entry = MethodEntry(label=str(label), method=mname, params=mraw, teacher_source=teacher_source)
        try:
            mcfg = METHODS.get(mname).make_config(mraw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: key 'methods.{label}': {e}") from e
        if teacher_source == "live" and not METHODS.get(mname).teacher_taps(mcfg):
            raise ConfigError(f"{source}: key 'methods.{label}.teacher_source' is 'live', but method {mname!r} reads"
                              " no teacher output. Fix: remove 'teacher_source'")
        if METHODS.get(mname).teacher_view(mcfg) == "other" and protocol.views.count < 2:
            raise ConfigError(
                f"{source}: method '{label}' ({mname}) reads the teacher's outputs on another view of the image than"
                f" the student's (teacher_view 'other'), but key 'protocol.views.count' is {protocol.views.count}."
                f" Fix: set 'protocol.views.count' to 2 or more, or remove '{label}' from 'methods'"
            )
        if cache.topk and reads_full_logits_from_store(entry):
            raise ConfigError(
                f"{source}: method '{label}' ({mname}) needs the teacher's full logits, but key 'cache.topk' is"
                f" {cache.topk}, so the cache keeps only the top-{cache.topk}. Fix: remove 'cache.topk' (store all"
                f" logits, fp16) or remove '{label}' from 'methods'"
            )
        methods[str(label)] = entry
    return Config(
        name=name,
        data=data,
        protocol=protocol,
        cache=cache,
        teachers=teachers,
        students=tuple(students),
        methods=methods,
        seeds=tuple(seeds),
        runtime=runtime,
        source=source,
        pairs=pairs,
        tune=_parse_tune(raw["tune"], protocol, source) if raw.get("tune") is not None else None,
    )


def _parse_tune(raw: Any, protocol: Protocol, source: str) -> TuneConfig:
    """The ``tune:`` section; every error names the file and the dotted key."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: key 'tune' must be a mapping (trials, sampler, seed, knobs, budget, metric,"
                          " rule; see workflow/config/README.md)")
    tune = build_dataclass(TuneConfig, raw, "tune", source)
    bad_knob = next((k for k in tune.knobs if k not in TUNE_KNOBS), None)
    checks = [
        (tune.trials >= 1, "trials", "must be >= 1 (trial 0 is the configured values)"),
        (tune.sampler in TUNE_SAMPLERS, "sampler", f"must be one of {', '.join(TUNE_SAMPLERS)}, got {tune.sampler!r}"),
        (bad_knob is None, "knobs", f"has the unknown knob {bad_knob!r}; valid knobs: {', '.join(TUNE_KNOBS)}"),
        (len(set(tune.knobs)) == len(tune.knobs), "knobs", f"lists a knob twice: {list(tune.knobs)}"),
        (bool(tune.knobs), "knobs", "must list at least one knob"),
        (tune.budget.epochs is None or tune.budget.epochs >= 1, "budget.epochs", "must be >= 1 (or null: the"
         " protocol's)"),
        (bool(tune.budget.seeds) and len(set(tune.budget.seeds)) == len(tune.budget.seeds), "budget.seeds",
         "must be a non-empty list of distinct integers"),
        (tune.budget.train_limit is None or tune.budget.train_limit >= 1, "budget.train_limit",
         "must be >= 1 (or null: the whole training split)"),
        (tune.metric in TUNE_METRICS, "metric", f"must be one of {', '.join(TUNE_METRICS)}, got {tune.metric!r}"),
        (tune.metric == "val_top1" or protocol.retrieval_tap is not None, "metric",
         f"is {tune.metric!r}, a retrieval score, but 'protocol.retrieval_tap' is not set. Fix: set"
         " 'protocol.retrieval_tap' or select on 'val_top1'"),
        (tune.rule == "best_mean", "rule", f"must be 'best_mean', got {tune.rule!r}"),
        ("weight_decay" not in tune.knobs or protocol.weight_decay > 0 or tune.weight_decay_range is not None,
         "knobs", "tunes 'weight_decay' around 'protocol.weight_decay', which is 0. Fix: set"
         " 'tune.weight_decay_range: [low, high]' or remove 'weight_decay' from 'tune.knobs'"),
    ]
    for key in ("lr_range", "weight_decay_range"):
        r = getattr(tune, key)
        checks.append((r is None or 0 < r[0] < r[1], key, f"must be [low, high] with 0 < low < high, got {r}"))
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"{source}: key 'tune.{key}' {msg}")
    return tune


def _parse_pairs(raw: Any, teachers: Mapping[str, TeacherConfig], source: str) -> tuple[tuple[str, str], ...]:
    """``pairs``: a non-empty list of ``[teacher, student]``, the teacher a name under ``teachers``."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: key 'pairs' must be a non-empty list of [teacher, student] (a teacher's name"
                          " under 'teachers', a student's timm model name)")
    pairs: list[tuple[str, str]] = []
    for i, pair in enumerate(raw):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ConfigError(f"{source}: key 'pairs[{i}]' must be [teacher, student], got {pair!r}")
        teacher, student = pair
        if teacher not in teachers:
            raise ConfigError(f"{source}: key 'pairs[{i}]': teacher {teacher!r} is not under 'teachers'"
                              f" ({', '.join(teachers)}); add it there or fix the name{did_you_mean(teacher, teachers)}")
        _check_model(check_model_name, student, f"pairs[{i}]", source)
        if (teacher, student) in pairs:
            raise ConfigError(f"{source}: key 'pairs[{i}]': [{teacher}, {student}] is listed twice; remove one")
        pairs.append((teacher, student))
    return tuple(pairs)


def _check_pairs_cover(pairs: tuple[tuple[str, str], ...], teachers: Mapping[str, TeacherConfig],
                       students: list[str], source: str) -> None:
    """With ``pairs``, every teacher and every listed student is in a pair, and every pair's student is listed."""
    for t, s in pairs:
        if s not in students:
            raise ConfigError(f"{source}: key 'pairs': student {s!r} (teacher {t!r}) is not in 'students'; add it"
                              " there or remove 'students' (the pairs then name the students)")
    for name, key, at in [(t, "teachers", 0) for t in teachers] + [(s, "students", 1) for s in students]:
        if all(pair[at] != name for pair in pairs):
            raise ConfigError(f"{source}: key '{key}': {name!r} is in no pair of 'pairs'; add a pair or remove it")


def to_raw(cfg: Config) -> dict:
    """The inverse of :func:`parse_config`: every value explicit (defaults filled in), plain YAML types.

    This is what the workflow writes as a table's resolved config, so a record stays reproducible even if a
    default changes in a later version.
    """
    def method(entry: MethodEntry) -> dict:
        built = METHODS.get(entry.method).make_config(entry.params)
        source = {} if entry.teacher_source == "cache" else {"teacher_source": entry.teacher_source}
        return {"method": entry.method, **to_jsonable(built), **source}

    return {
        "name": cfg.name,
        "data": to_jsonable(cfg.data),
        "protocol": to_jsonable(cfg.protocol),
        "cache": to_jsonable(cfg.cache),
        "teachers": {name: to_jsonable(t) for name, t in cfg.teachers.items()},  # sha256 etc. only when set
        "students": list(cfg.students),
        **({} if cfg.pairs is None else {"pairs": [list(p) for p in cfg.pairs]}),
        "methods": {label: method(entry) for label, entry in cfg.methods.items()},
        "seeds": list(cfg.seeds),
        "runtime": to_jsonable(cfg.runtime),
        **({} if cfg.tune is None else {"tune": to_jsonable(cfg.tune)}),
    }


def config_hash(cfg: Config) -> str:
    """Hash of everything that defines a table (runtime settings excluded): tags its leaderboard."""
    return stable_hash({k: v for k, v in to_raw(cfg).items() if k != "runtime"})


def _check_model(check: Any, name: Any, key: str, source: str) -> None:
    if not isinstance(name, str):
        raise ConfigError(f"{source}: key '{key}' must be a timm model name (string)")
    reason = check(name)
    if reason:
        raise ConfigError(f"{source}: key '{key}': {reason}")


def read_config_file(path: str | Path) -> dict:
    """Reads one YAML config file into a mapping (not yet validated).

    Raises:
        ConfigError: one line naming the file (for invalid YAML also the line and column) and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}; pass an existing YAML file with --config")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {_yaml_problem(e)}; fix the YAML syntax there (indentation, quotes, brackets)") from None
    if raw is None:
        raise ConfigError(
            f"{path}: the config file is empty (no YAML content); write the experiment matrix into it "
            "(e.g. start from a copy of workflow/config/config.yaml)"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping at the top level, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path) -> Config:
    """Reads and validates a YAML config file (a resolved one, as every workflow job does)."""
    return parse_config(read_config_file(path), source=str(path))


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: ``not valid YAML at line L, column C: <problem>`` (1-based)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    return f"not valid YAML{where}: {problem}" + (f" ({context})" if context else "")


def config_slice_hash(*parts: Any) -> str:
    """Hash of the config parts one job depends on (its rerun trigger in the workflow)."""
    return stable_hash([to_jsonable(p) for p in parts])
