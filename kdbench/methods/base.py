"""The method contract: what a KD method declares, builds and returns.

The harness (:mod:`kdbench.train`) owns the data, views, optimizer, schedule, epochs and evaluation; a method
owns only its loss, its hyper-parameters (a frozen ``Config`` dataclass whose defaults are the paper's), its
adapter modules and its declarations. Declarations are class methods of the config alone, so the workflow
can plan cache jobs before anything runs.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdbench._typed import coerce_value
from kdbench._util import did_you_mean
from kdbench.meta import DataInfo
from kdbench.models import ModelInfo
from kdbench.plugins import METHOD_GROUP, Plugin, PluginError, load_group
from kdbench.plugins import clash as plugin_clash
from kdbench.registry import Registry
from kdbench.space import Distribution
from kdbench.taps import TapDict


@dataclass(frozen=True)
class Requirements:
    """What a method needs from the harness beyond its taps.

    Attributes:
        live_teacher: The teacher module must run during training (its compute is counted and the row is
            marked in the leaderboard).
        sample_index: The step context carries the rows (positions) of the batch's samples (memory banks).
        full_logits: Needs every class's logit; a grid whose cache keeps only the top-k is rejected.
        live_teacher_tail: The method receives the teacher module (:meth:`DistillMethod.live_teacher_module`)
            to run part of it (ScaleKD's last stage) on its own inputs, but its declared teacher taps are still
            served from the stores; the row is marked and the method counts that part's compute.
    """

    live_teacher: bool = False
    sample_index: bool = False
    full_logits: bool = False
    live_teacher_tail: bool = False


SEARCHED_ASSISTANT = "searched"
""":meth:`DistillMethod.assistant` of a method whose assistant is a pruned teacher found by the workflow's
search (AMD); the assistant's model is then the teacher's family at the selected widths."""

TEACHER_VIEWS = ("same", "other", "clean")
"""What a method's teacher outputs may be computed on (:meth:`DistillMethod.teacher_view`):

* ``same``: exactly the view the student sees in this step (consistent teaching; every method by default);
* ``other``: another stored view of the same image, view ``(v + 1) mod V`` for the student's view ``v``
  (independent augmentation of teacher and student; needs ``V >= 2``);
* ``clean``: the un-augmented image (whole image, no flip, no mixup), one output per image for the whole
  run (a "fixed teacher"). No store holds it yet, so a method that declares ``clean`` must also declare
  ``Requirements(live_teacher=True)``.
"""


@dataclass(frozen=True)
class Targets:
    """Labels of a batch of (possibly mixed) views.

    Attributes:
        labels: ``int64 [B]``.
        partner_labels: ``int64 [B]``, the mixup partner's labels (``labels`` where not mixed).
        lam: ``float32 [B]``, weight of ``labels`` (1 where not mixed).
    """

    labels: torch.Tensor
    partner_labels: torch.Tensor
    lam: torch.Tensor


@dataclass
class StepContext:
    """Where training stands; read-only for methods.

    Attributes:
        epoch: Current epoch (0-based).
        num_epochs: Total epochs of the protocol.
        step: Global step.
        steps_per_epoch: Steps per epoch.
        view: The view index this epoch replays.
        index: ``int64 [B]`` rows of the batch in the training split, or ``None`` unless the method
            requires ``sample_index``.
    """

    epoch: int
    num_epochs: int
    step: int
    steps_per_epoch: int
    view: int
    index: torch.Tensor | None = None

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1)."""
        return self.step / max(1, self.num_epochs * self.steps_per_epoch)


@dataclass
class LossOutput:
    """A method's loss: the sum of named, weighted terms, plus detached metrics for the logs.

    Build it with :meth:`from_terms` so that ``loss == sum(terms)`` always holds.
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_terms(cls, terms: Mapping[str, torch.Tensor], metrics: Mapping[str, float] | None = None) -> "LossOutput":
        terms = dict(terms)
        if not terms:
            raise ValueError("a loss needs at least one term")
        return cls(loss=torch.stack(list(terms.values())).sum(), terms=terms, metrics=dict(metrics or {}))


def cross_entropy(logits: torch.Tensor, targets: Targets) -> torch.Tensor:
    """Cross-entropy against (possibly mixup-mixed) hard labels, averaged over the batch."""
    logp = F.log_softmax(logits, dim=-1)
    own = logp.gather(1, targets.labels[:, None]).squeeze(1)
    other = logp.gather(1, targets.partner_labels[:, None]).squeeze(1)
    return -(targets.lam * own + (1 - targets.lam) * other).mean()


class DistillMethod(nn.Module):
    """Base class of every KD method. Subclasses set the class attributes and implement :meth:`loss`.

    Class attributes:
        name: Registered name.
        Config: Frozen dataclass of hyper-parameters (defaults = the paper's / the CRD protocol's).
        reference: Citation.

    Args:
        cfg: An instance of ``Config``.
        teacher: Metadata of the teacher (``None`` for methods without a teacher).
        student: Metadata of the student.
        data: Metadata of the dataset.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    reference: ClassVar[str]
    search_space: ClassVar[Mapping[str, Distribution]] = {}
    """The distributions of the method's tunable ``Config`` parameters, around the paper's defaults
    (:mod:`kdbench.space`); a table that tunes draws its trials from them (:mod:`kdbench.tuning`). Empty: the
    method has nothing of its own to tune (the protocol's shared knobs may still be tuned)."""
    audit_params: ClassVar[frozenset[str]] = frozenset()
    """``Config`` parameters that change only an audit's runs (AMD's oracle), never an assistant or a student:
    left out of every key and hash (:func:`kdbench.config.hashed_entry`), so changing them reruns the audit
    alone."""

    def __init__(self, cfg: Any, *, teacher: ModelInfo | None, student: ModelInfo, data: DataInfo) -> None:
        super().__init__()
        self.cfg = cfg
        self.teacher_info = teacher
        self.student_info = student
        self.data_info = data

    # --- declarations (pure functions of the config) -------------------------------------------------
    @classmethod
    def teacher_taps(cls, cfg: Any) -> frozenset[str]:
        """Teacher taps the loss reads (empty: the method needs no teacher)."""
        return frozenset({"logits"})

    @classmethod
    def student_taps(cls, cfg: Any) -> frozenset[str]:
        """Student taps the loss reads."""
        return frozenset({"logits"})

    @classmethod
    def requirements(cls, cfg: Any) -> Requirements:
        return Requirements()

    @classmethod
    def teacher_view(cls, cfg: Any) -> str:
        """Which view the teacher's outputs come from, one of :data:`TEACHER_VIEWS` (default ``same``)."""
        return "same"

    @classmethod
    def assistant(cls, cfg: Any) -> str | None:
        """A teacher assistant that replaces the teacher for this method: a timm name the workflow first
        distils from the teacher (TAKD), :data:`SEARCHED_ASSISTANT` for one the workflow searches by pruning
        the teacher (AMD, :mod:`kdbench.tasearch`), ``None`` for one-step methods."""
        return None

    @classmethod
    def compatibility(cls, cfg: Any, teacher: ModelInfo | None, student: ModelInfo) -> str | None:
        """``None`` if the method can run on this (teacher, student) pair, else the reason it cannot."""
        return None

    @classmethod
    def make_config(cls, params: Mapping[str, Any]) -> Any:
        """Builds ``Config`` from config-file parameters; an unknown or mistyped parameter names the choices."""
        names = [f.name for f in dataclasses.fields(cls.Config)]
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise ValueError(
                f"method {cls.name!r} has no parameter {unknown[0]!r}; valid parameters: {', '.join(names) or '(none)'}"
                f"{did_you_mean(unknown[0], names)}"
            )
        hints = typing.get_type_hints(cls.Config)
        values = {}
        for k, v in params.items():
            try:
                values[k] = coerce_value(v, hints[k])
            except TypeError as e:
                raise ValueError(f"method {cls.name!r}: parameter {k!r} {e}") from None
        cfg = cls.Config(**values)
        if hasattr(cfg, "validate"):
            cfg.validate()
        return cfg

    @classmethod
    def declarations(cls, cfg: Any) -> dict[str, Any]:
        """Everything the method declares, as JSON-serialisable data."""
        return {
            "teacher_taps": sorted(cls.teacher_taps(cfg)),
            "student_taps": sorted(cls.student_taps(cfg)),
            "requirements": dataclasses.asdict(cls.requirements(cfg)),
            "teacher_view": cls.teacher_view(cfg),
            "assistant": cls.assistant(cfg),
        }

    # --- training-time hooks --------------------------------------------------------------------------
    def loss(self, student: TapDict, teacher: TapDict, targets: Targets, ctx: StepContext) -> LossOutput:
        """The training loss of one batch.

        Args:
            student: The declared student taps.
            teacher: The declared teacher taps (constants: cached or computed without grad).
            targets: Labels of the batch's views.
            ctx: Step context.
        """
        raise NotImplementedError

    def on_epoch_start(self, ctx: StepContext) -> None:
        """Called before each epoch (curricula, memory-bank refreshes)."""

    def live_teacher_module(self, teacher: nn.Module) -> None:
        """Receives the teacher module when ``requirements().live_teacher`` or ``live_teacher_tail`` (frozen;
        never trained)."""

    def bind_teacher_weights(self, teacher: nn.Module) -> None:
        """Receives the frozen teacher once, before training, whenever the job loads one (cached or live), for
        constants derived from its weights (InDistill's pruned channels). The teacher's outputs still come
        from the cache: a method that runs the teacher must declare ``live_teacher`` instead."""

    def audit(self) -> dict[str, Any]:
        """JSON-serialisable facts a method derived at run time (e.g. from the teacher's weights), written to
        the run record's provenance; empty by default."""
        return {}

    def checkpoint_state(self) -> dict[str, Any]:
        """State that changes during training and is not in the module's ``state_dict``, saved in the epoch
        checkpoints (:mod:`kdbench.train.checkpoint`) so that a resumed run restores it.

        Parameters and buffers (adapters, CRD's memory banks) are in the ``state_dict`` already. The default
        returns the method's own public ``int`` and ``float`` attributes (counters such as ScaleKD's
        ``tail_forward``); a method with other such state (a Python list, a generator) overrides this and
        :meth:`load_checkpoint_state`. Values must be plain JSON-like data or tensors.
        """
        return {k: v for k, v in vars(self).items() if type(v) in (int, float) and not k.startswith("_")}

    def load_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        """Restores what :meth:`checkpoint_state` returned."""
        for k, v in state.items():
            setattr(self, k, v)

    def extra_parameters(self) -> int:
        """Trainable parameters the method adds (adapters), counted in the cost columns."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def _method_origin(name: str) -> str:
    """Where a registered method comes from, for a clash message."""
    source = METHODS.source(name)
    if isinstance(source, Plugin):
        return f"package {source.describe()} ('{source.entry_point}')"
    return f"kdbench (built-in, {METHODS.peek(name).__module__})"


def _register_plugin(name: str, cls: Any, plugin: Plugin) -> None:
    """Registers a :data:`~kdbench.plugins.METHOD_GROUP` entry point's class; refuses a wrong object or a name
    that is taken."""
    if not (isinstance(cls, type) and issubclass(cls, DistillMethod)):
        raise PluginError(f"package {plugin.describe()}: entry point '{plugin.entry_point}' must name a DistillMethod"
                          f" subclass, not {cls!r}; fix its pyproject.toml")
    missing = [a for a in ("name", "Config", "reference") if not hasattr(cls, a)]
    if missing or cls.name != name:
        problem = f"does not define {missing[0]!r}" if missing else f"is named {cls.name!r}"
        raise PluginError(f"package {plugin.describe()}: the class {cls.__name__} of entry point"
                          f" '{plugin.entry_point}' {problem}; set name = {name!r} in the class (the entry point's"
                          " name and the method's name are one)")
    existing = METHODS.peek(name)
    if existing is cls:  # the class used @register_method itself: only its source changes
        METHODS.attribute(name, plugin)
        return
    if existing is not None:
        raise plugin_clash("method", name, _method_origin(name), plugin)
    METHODS.register(name, plugin)(cls)


def _load_plugins() -> None:
    load_group(METHOD_GROUP, _register_plugin)


METHODS: Registry[type[DistillMethod]] = Registry("method", loader=_load_plugins)
"""Every method: the built-ins (``kdbench/methods/*.py``), then, the first time it is read, the installed plugins'
(:mod:`kdbench.plugins`)."""


def method_source(name: str) -> Plugin | None:
    """The plugin a method comes from, ``None`` for a built-in."""
    source = METHODS.source(name)
    return source if isinstance(source, Plugin) else None


def register_method(cls: type[DistillMethod]) -> type[DistillMethod]:
    """Class decorator: registers a method under ``cls.name``."""
    for attr in ("name", "Config", "reference"):
        if not hasattr(cls, attr):
            raise TypeError(f"method class {cls.__name__} must define {attr!r}")
    return METHODS.register(cls.name)(cls)


def create_method(
    name: str, params: Mapping[str, Any], *, teacher: ModelInfo | None, student: ModelInfo, data: DataInfo
) -> DistillMethod:
    """Builds a registered method from config parameters and model metadata."""
    cls = METHODS.get(name)
    return cls(cls.make_config(params), teacher=teacher, student=student, data=data)
