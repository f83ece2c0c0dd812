"""The method contract as checks: what every registered method, built-in or plugin, must satisfy.

One definition, two users: ``tests/test_methods_contract.py`` runs every check over every registered method
(a new method is tested the moment it is registered), and ``kdbench check-method NAME`` runs them on one
installed method and says, in words, which fail (:func:`check_method`).

The checks run (teacher, student) pairs of different families (:data:`PAIRS`) on 1x28x28 inputs with 10
classes, reproducing the harness's view of a step: declared taps only (teacher under ``no_grad``), mixup-aware
targets, and ``ctx.index`` when the method requires sample indices. A check raises :class:`ContractViolation`
(what is wrong and what to fix) or :class:`NotApplicable` (the method cannot run this pair: its own reason).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import sys
import typing
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdbench.meta import DataInfo
from kdbench.methods import METHODS
from kdbench.methods.base import TEACHER_VIEWS, DistillMethod, LossOutput, Requirements, StepContext, Targets
from kdbench.models import ModelInfo, create_model, model_info
from kdbench.space import Choice, Distribution, IntUniform, LogUniform, Uniform, check_distribution
from kdbench.taps import TapDict, UndeclaredTapError, compute_taps, parse_tap

DATA = DataInfo(num_classes=10, in_chans=1, image_size=28, num_train=64, mean=(0.5,), std=(0.5,))
BATCH = 8
PAIRS = (("cnn_m", "cnn_xs"), ("cnn_m", "vit_pico_patch4"), ("vit_nano_patch4", "cnn_s"))


class ContractViolation(AssertionError):
    """A method breaks the contract; the message says how and what to fix."""


class NotApplicable(Exception):
    """A check does not apply (the method cannot run the pair; the message is its reason)."""


def _require(ok: object, message: str) -> None:
    if not ok:
        raise ContractViolation(message)


def _pair_id(pair: tuple[str, str]) -> str:
    return f"{pair[0]}->{pair[1]}"


# --- models and one step as the harness does it -----------------------------------------------------------


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


@functools.cache
def _pristine(name: str) -> tuple[nn.Module, ModelInfo]:
    torch.manual_seed(_seed(name))
    model = create_model(name, DATA.num_classes, DATA.in_chans, DATA.image_size)
    return model, model_info(model, name, DATA.in_chans, DATA.image_size)


def _model(name: str) -> tuple[nn.Module, ModelInfo]:
    """A fresh copy of a seeded model (built once per process) and its metadata."""
    model, info = _pristine(name)
    return copy.deepcopy(model), info


@functools.cache
def _teacher_taps(name: str, taps: frozenset[str]) -> dict[str, torch.Tensor]:
    model, _ = _pristine(name)
    model.eval()
    with torch.no_grad():
        computed = compute_taps(model, batch()[0], taps)
    return {k: computed[k] for k in taps}


def batch() -> tuple[torch.Tensor, Targets, torch.Tensor]:
    """Inputs ``[BATCH, 1, 28, 28]``, targets (half the views mixed) and the batch's rows in the training split."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, DATA.in_chans, DATA.image_size, DATA.image_size, generator=g)
    labels = torch.randint(0, DATA.num_classes, (BATCH,), generator=g)
    lam = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.7, 0.6, 0.4, 0.8])
    partner = torch.where(lam < 1, (labels + 1 + torch.arange(BATCH)) % DATA.num_classes, labels)
    rows = torch.randperm(DATA.num_train, generator=g)[:BATCH].sort().values
    return x, Targets(labels, partner, lam), rows


@dataclass
class Setup:
    """A method built for one (teacher, student) pair, as the harness builds it."""

    name: str
    cls: type[DistillMethod]
    cfg: object
    method: DistillMethod
    teacher: nn.Module
    student: nn.Module
    teacher_name: str


def setup(
    name: str, pair: tuple[str, str], method_cls: type[DistillMethod] | None = None, seed: int = 0,
    params: Mapping[str, Any] | None = None,
) -> Setup:
    """Builds teacher, student and method (default config, or ``params``).

    Raises:
        NotApplicable: The method cannot run the pair (its compatibility reason).
    """
    cls = METHODS.get(name)
    cfg = cls.make_config(params or {})
    teacher, t_info = _model(pair[0])
    student, s_info = _model(pair[1])
    reason = cls.compatibility(cfg, t_info, s_info)
    _require(reason is None or (isinstance(reason, str) and reason),
             f"compatibility() must return None or a non-empty reason, got {reason!r}")
    if reason is not None:
        raise NotApplicable(f"{name} cannot run {_pair_id(pair)}: {reason}")
    torch.manual_seed(seed)
    method = (method_cls or cls)(cfg, teacher=t_info, student=s_info, data=DATA)
    teacher.eval()
    student.train()
    method.train()
    reqs = cls.requirements(cfg)
    if reqs.live_teacher or reqs.live_teacher_tail:
        teacher.requires_grad_(False)  # the harness hands over a frozen teacher
        method.live_teacher_module(teacher)
    method.bind_teacher_weights(teacher)  # as the harness does whenever the job loads a teacher
    return Setup(name, cls, cfg, method, teacher, student, pair[0])


def step(
    su: Setup, step: int = 0, teacher_map: Callable[[str, torch.Tensor], torch.Tensor] | None = None
) -> LossOutput:
    """One loss evaluation as the harness does it: TapDicts holding exactly the declared taps."""
    x, targets, rows = batch()
    t_taps, s_taps = su.cls.teacher_taps(su.cfg), su.cls.student_taps(su.cfg)
    t_out: dict[str, torch.Tensor] = {}
    if t_taps:  # the teacher is a constant: computed once per (teacher, taps) under no_grad
        t_out = dict(_teacher_taps(su.teacher_name, frozenset(t_taps)))
        if teacher_map is not None:
            t_out = {k: teacher_map(k, v) for k, v in t_out.items()}
    computed = compute_taps(su.student, x, s_taps)
    s_out = {k: computed[k] for k in s_taps}
    needs_index = su.cls.requirements(su.cfg).sample_index
    ctx = StepContext(epoch=0, num_epochs=2, step=step, steps_per_epoch=4, view=0, index=rows if needs_index else None)
    owner = f"method {su.name!r}"
    return su.method.loss(TapDict(s_out, owner + " (student)"), TapDict(t_out, owner + " (teacher)"), targets, ctx)


def check_output(out: LossOutput, name: str) -> None:
    """A loss output is a finite scalar, the sum of finite scalar terms, with float metrics."""
    _require(isinstance(out, LossOutput), f"{name}: loss() must return a LossOutput, got {type(out).__name__}")
    _require(out.loss.ndim == 0 and torch.isfinite(out.loss), f"{name}: the loss is {out.loss}, not a finite scalar")
    _require(out.terms, f"{name}: the loss has no terms")
    for k, v in out.terms.items():
        _require(v.ndim == 0 and torch.isfinite(v), f"{name}: term {k} = {v} is not a finite scalar")
    total = torch.stack(list(out.terms.values())).sum()
    _require(torch.allclose(total, out.loss, rtol=1e-6, atol=1e-6),
             f"{name}: the terms sum to {total.item()}, the loss is {out.loss.item()}; build it with"
             " LossOutput.from_terms")
    for k, v in out.metrics.items():
        _require(isinstance(v, float), f"{name}: metric {k} is a {type(v).__name__}, not a float")


def _reaches_student(su: Setup) -> bool:
    return any(bool(p.grad.abs().sum() > 0) for p in su.student.parameters() if p.grad is not None)


# --- declarations (no models needed) ----------------------------------------------------------------------


def default_config_and_declarations(name: str) -> None:
    """The class is well-formed (name, reference, frozen Config, 'Deviations from the paper') and its
    declarations are pure, JSON-serialisable and name valid taps."""
    cls = METHODS.get(name)
    _require(cls.name == name, f"{name}: the class's name is {cls.name!r}")
    _require(isinstance(cls.reference, str) and cls.reference, f"{name}: reference must be a non-empty citation")
    _require(dataclasses.is_dataclass(cls.Config) and cls.Config.__dataclass_params__.frozen,
             f"{name}: Config must be a frozen dataclass (@dataclass(frozen=True))")
    cfg = cls.Config()
    _require(cls.make_config({}) == cfg, f"{name}: make_config({{}}) differs from Config()")
    doc = inspect.getdoc(sys.modules[cls.__module__]) or ""
    _require("Deviations from the paper" in doc,
             f"{name}: the module docstring of {cls.__module__} needs a 'Deviations from the paper' paragraph")
    decl = cls.declarations(cfg)
    _require(decl == cls.declarations(cls.Config()) == cls.declarations(cfg), f"{name}: declarations are not pure")
    _require(json.loads(json.dumps(decl)) == decl, f"{name}: declarations are not JSON data: {decl}")
    for tap in decl["teacher_taps"] + decl["student_taps"]:
        try:
            parse_tap(tap)
        except ValueError as e:
            raise ContractViolation(f"{name}: declared tap {tap!r} is not a tap ({e})") from None
    _require(isinstance(cls.requirements(cfg), Requirements), f"{name}: requirements() must return a Requirements")
    _require(decl["assistant"] is None or isinstance(decl["assistant"], str),
             f"{name}: assistant() must return None or a model name")


def make_config_rejects_unknown_parameter(name: str) -> None:
    """An unknown parameter is refused, naming the method, the parameter and every valid one."""
    cls = METHODS.get(name)
    try:
        cls.make_config({"no_such_parameter": 1})
    except ValueError as e:
        msg = str(e)
    else:
        raise ContractViolation(f"{name}: make_config accepts an unknown parameter")
    _require(name in msg and "no_such_parameter" in msg,
             f"{name}: the error does not name the method and the parameter: {msg}")
    for f in dataclasses.fields(cls.Config):
        _require(f.name in msg, f"{name}: the error does not list valid parameter {f.name!r}: {msg}")


def compatibility_is_a_reason_or_none(name: str) -> None:
    """compatibility() with a featureless model returns None or a non-empty reason (never raises)."""
    cls = METHODS.get(name)
    tiny = ModelInfo(name="tiny", family="cnn", num_classes=10, num_features=4, feature_shapes=((4, 2, 2),),
                     num_params=1)
    for teacher in (tiny, dataclasses.replace(tiny, feature_shapes=())):
        reason = cls.compatibility(cls.Config(), teacher, teacher)
        _require(reason is None or (isinstance(reason, str) and reason),
                 f"{name}: compatibility() returned {reason!r}, not None or a reason")


def view_variants(name: str) -> tuple[str, ...]:
    """The teacher views a method's ``teacher_view`` parameter offers (FunMatch's consistency ablation)."""
    fields = {f.name for f in dataclasses.fields(METHODS.get(name).Config)}
    return TEACHER_VIEWS if "teacher_view" in fields else ()


def teacher_view_is_declared(name: str) -> None:
    """The teacher view is one of TEACHER_VIEWS; 'clean' (which no store holds) requires live_teacher."""
    cls = METHODS.get(name)
    for cfg in [cls.Config()] + [cls.make_config({"teacher_view": v}) for v in view_variants(name)]:
        view = cls.teacher_view(cfg)
        _require(view in TEACHER_VIEWS, f"{name}: teacher_view {view!r} is not one of {TEACHER_VIEWS}")
        _require(cls.declarations(cfg)["teacher_view"] == view, f"{name}: declarations() and teacher_view() disagree")
        if view == "clean":
            _require(cls.requirements(cfg).live_teacher, f"{name}: teacher_view 'clean' needs live_teacher")


# --- search spaces: what a table that tunes may change ----------------------------------------------------

# The distributions a numeric Config field may be drawn from (a Choice fits a field of its values' type).
FIELD_DISTRIBUTIONS = {float: (Uniform, LogUniform), int: (IntUniform,)}
# Integer parameters are mostly structural (stages, layers, memory sizes, curriculum lengths), and may change
# nothing the method declares (CRD's nce_k): one is tuned only when listed here as a loss hyper-parameter.
TUNABLE_INTS: set[tuple[str, str]] = set()


def _ends(dist: Distribution) -> tuple:
    """The extreme values a trial can draw: ``(low, high)``, or every value of a Choice."""
    return tuple(dist.values) if isinstance(dist, Choice) else (dist.low, dist.high)


def tuned_params(cls: type[DistillMethod]) -> list[tuple[str, dict]]:
    """``(label, params)`` of extreme trials: each tunable parameter at each end of its range (the others at
    their defaults), then every parameter at its first end and every one at its last end at once."""
    space = cls.search_space
    out = [(f"{k}={v!r}", {k: v}) for k, d in space.items() for v in _ends(d)]
    if len(space) > 1:
        out.append(("all low", {k: _ends(d)[0] for k, d in space.items()}))
        out.append(("all high", {k: _ends(d)[-1] for k, d in space.items()}))
    return out


@functools.cache
def _pair_infos() -> tuple[tuple[ModelInfo, ModelInfo], ...]:
    return tuple((_pristine(t)[1], _pristine(s)[1]) for t, s in PAIRS)


def search_space_is_declared_over_config_fields(name: str) -> None:
    """search_space is declared on the class; every tunable parameter is a Config field with a well-formed
    distribution that fits the field's type and holds the paper's default."""
    cls = METHODS.get(name)
    _require("search_space" in vars(cls), f"{name}: declare search_space next to Config (empty: nothing to tune)")
    space = cls.search_space
    _require(isinstance(space, Mapping), f"{name}: search_space must be a mapping, got {type(space).__name__}")
    hints = typing.get_type_hints(cls.Config)
    default = cls.Config()
    for param, dist in space.items():
        _require(param in hints, f"{name}: search_space names {param!r}, not a parameter of {cls.Config.__name__}"
                                 f" ({', '.join(hints) or 'none'})")
        try:
            check_distribution(f"{name}.{param}", dist)
        except ValueError as e:
            raise ContractViolation(f"{name}: {e}") from None
        value = getattr(default, param)
        _require(dist.contains(value), f"{name}: the default {param} = {value!r} lies outside {dist}")
        hint = hints[param]
        if isinstance(dist, Choice):
            _require(all(isinstance(v, hint) for v in dist.values),
                     f"{name}: {param} is a {hint} field, but {dist} offers other types")
        else:
            _require(isinstance(dist, FIELD_DISTRIBUTIONS.get(hint, ())),
                     f"{name}: {param} is a {hint} field; {type(dist).__name__} does not fit it")
        _require(not (isinstance(value, (int, float)) and value == 0),
                 f"{name}: {param} is 0 by default (a term switched off); tuning it would switch the term on")
        _require("epoch" not in param, f"{name}: {param} is tied to the epoch count; it must not be tuned")
        _require(not isinstance(value, int) or isinstance(value, bool) or (name, param) in TUNABLE_INTS,
                 f"{name}: {param} is an integer, usually structural; list it in kdbench.contract.TUNABLE_INTS only"
                 " if it is a loss hyper-parameter")


def search_space_is_documented(name: str) -> None:
    """The module docstring has a 'Search space:' line (ranges and why)."""
    cls = METHODS.get(name)
    doc = inspect.getdoc(sys.modules[cls.__module__]) or ""
    _require("Search space:" in doc, f"{name}: the module docstring of {cls.__module__} needs a 'Search space:' line"
                                     " (ranges and why)")


def tuning_cannot_change_declarations(name: str) -> None:
    """A trial at any end of the search space declares what the default declares and can run the same pairs
    (it reads the default's stores and assistant)."""
    cls = METHODS.get(name)
    default = cls.make_config({})
    declared = cls.declarations(default)
    runnable = [cls.compatibility(default, t, s) is None for t, s in _pair_infos()]
    for label, params in tuned_params(cls):
        cfg = cls.make_config(params)
        _require(cls.declarations(cfg) == declared,
                 f"{name}: the trial {label} changes the declarations: {cls.declarations(cfg)} != {declared}"
                 " (a structural parameter or a switched-off term is in search_space)")
        got = [cls.compatibility(cfg, t, s) is None for t, s in _pair_infos()]
        _require(got == runnable, f"{name}: the trial {label} changes which pairs can run ({got} != {runnable} on"
                                  f" {[_pair_id(p) for p in PAIRS]})")


def tuning_keeps_the_method_modules(name: str) -> None:
    """A trial builds the same adapters and buffers as the default (the sizes of projectors, embeddings and
    memories are structural)."""

    def shapes(params: dict) -> dict[str, tuple[int, ...]]:
        method = setup(name, PAIRS[0], params=params).method
        return {k: tuple(v.shape) for k, v in method.state_dict().items()}

    default = shapes({})
    for label, params in tuned_params(METHODS.get(name)):
        _require(shapes(params) == default, f"{name}: the trial {label} builds other modules than the default")


def forward_backward_at_the_ends_of_the_search_space(name: str, side: str) -> None:
    """Every tunable parameter at its low (high) end at once still gives a finite loss whose gradient reaches
    the student."""
    end = 0 if side == "low" else -1
    params = {k: _ends(d)[end] for k, d in METHODS.get(name).search_space.items()}
    su = setup(name, PAIRS[0], params=params)
    out = step(su)
    check_output(out, name)
    out.loss.backward()
    _require(_reaches_student(su), f"{name} at {params}: no gradient reaches the student")


# --- one training step on real (tiny) models --------------------------------------------------------------


def forward_backward(name: str, pair: tuple[str, str]) -> None:
    """One step gives a finite loss (the sum of its terms) whose gradient reaches the student and every
    adapter, never the teacher; a second step is finite too."""
    su = setup(name, pair)
    out = step(su)
    check_output(out, name)
    out.loss.backward()
    _require(_reaches_student(su), f"{name}: no gradient reaches the student")
    for pname, p in su.method.named_parameters():
        if p.requires_grad:
            _require(p.grad is not None, f"{name}: adapter parameter {pname} gets no gradient")
            _require(torch.isfinite(p.grad).all(), f"{name}: adapter parameter {pname} has a non-finite gradient")
    for pname, p in su.teacher.named_parameters():
        _require(p.grad is None, f"{name}: teacher parameter {pname} received a gradient")
    check_output(step(su, step=1), name)  # stateful methods: memory banks, normalisation constants


def forward_backward_of_every_teacher_view(name: str, view: str, pair: tuple[str, str]) -> None:
    """Each value of the method's teacher_view parameter trains (a finite loss reaching the student)."""
    su = setup(name, pair, params={"teacher_view": view})
    out = step(su)
    check_output(out, name)
    out.loss.backward()
    _require(_reaches_student(su), f"{name} (teacher_view {view}): no gradient reaches the student")


def same_seed_same_loss(name: str, pair: tuple[str, str]) -> None:
    """Two builds with the same seed give bit-identical losses and terms."""
    a = step(setup(name, pair, seed=3), step=5)
    b = step(setup(name, pair, seed=3), step=5)
    _require(torch.equal(a.loss, b.loss), f"{name}: {a.loss.item()} != {b.loss.item()} with the same seed")
    _require(a.terms.keys() == b.terms.keys(), f"{name}: other terms with the same seed")
    for k in a.terms:
        _require(torch.equal(a.terms[k], b.terms[k]), f"{name}: term {k} differs with the same seed")


def extra_parameters_are_counted(name: str, pair: tuple[str, str]) -> None:
    """extra_parameters() counts the method's own trainable parameters, which share nothing with the models."""
    su = setup(name, pair)
    expected = sum(p.numel() for p in su.method.parameters() if p.requires_grad)
    _require(su.method.extra_parameters() == expected,
             f"{name}: extra_parameters() is {su.method.extra_parameters()}, its trainable parameters {expected}")
    _require(not any(p is q for p in su.method.parameters() for q in su.student.parameters()),
             f"{name}: the method holds the student's parameters")
    _require(not any(p is q for p in su.method.parameters() for q in su.teacher.parameters()),
             f"{name}: the method holds the teacher's parameters")


def reads_teacher_features(name: str) -> bool:
    cls = METHODS.get(name)
    return any(parse_tap(t)[0] == "feature" for t in cls.teacher_taps(cls.Config()))


def teacher_feature_maps_pooled_by_the_cache(name: str, pair: tuple[str, str]) -> None:
    """Teacher feature maps pooled below the size in ModelInfo (a cache policy) still train: sizes are matched
    at run time."""
    su = setup(name, pair)

    def pool(tap: str, v: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(v, (max(1, v.shape[-2] // 2), max(1, v.shape[-1] // 2))) if v.ndim == 4 else v

    out = step(su, teacher_map=pool)
    check_output(out, name)
    out.loss.backward()


_CANDIDATE_TAPS = ("logits", "pre_logits", "feature[0]", "feature[-1]", "feature[1]")


def _greedy(cls: type[DistillMethod], side: str, tap: str) -> type[DistillMethod]:
    """A throwaway subclass whose loss also reads ``tap`` on ``side`` (not registered)."""

    class Greedy(cls):  # type: ignore[valid-type, misc]
        def loss(self, student, teacher, targets, ctx):
            (student if side == "student" else teacher)[tap]
            return super().loss(student, teacher, targets, ctx)

    return Greedy


def reading_an_undeclared_tap_fails(name: str, side: str) -> None:
    """The taps a loss receives are exactly the declared ones: reading another raises UndeclaredTapError."""
    cls = METHODS.get(name)
    cfg = cls.Config()
    declared = cls.student_taps(cfg) if side == "student" else cls.teacher_taps(cfg)
    tap = next(t for t in _CANDIDATE_TAPS if t not in declared)
    su = setup(name, PAIRS[0], method_cls=_greedy(cls, side, tap))
    try:
        step(su)
    except UndeclaredTapError as e:
        _require(tap in str(e), f"{name}: the undeclared-tap error does not name {tap!r}: {e}")
    else:
        raise ContractViolation(f"{name}: its loss read the undeclared {side} tap {tap!r} without an error; pass"
                                " loss() the TapDicts it receives, unchanged")


# --- the list of checks -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One check on one method with its arguments (a pair, a side, a view)."""

    check: Callable[..., None]
    method: str
    args: tuple = ()

    @property
    def id(self) -> str:
        parts = [_pair_id(a) if isinstance(a, tuple) else str(a) for a in self.args]
        return "-".join([self.check.__name__, self.method, *parts])

    @property
    def description(self) -> str:
        """The check's first docstring sentence: what it asks of the method."""
        return " ".join((inspect.getdoc(self.check) or self.check.__name__).split())

    def run(self) -> None:
        self.check(self.method, *self.args)


def cases(name: str) -> Iterator[Case]:
    """Every contract check of method ``name``, with every pair, side and view it applies to."""
    cls = METHODS.get(name)
    for check in (default_config_and_declarations, make_config_rejects_unknown_parameter,
                  compatibility_is_a_reason_or_none, teacher_view_is_declared,
                  search_space_is_declared_over_config_fields, search_space_is_documented,
                  tuning_cannot_change_declarations):
        yield Case(check, name)
    if cls.search_space:
        yield Case(tuning_keeps_the_method_modules, name)
        for side in ("low", "high"):
            yield Case(forward_backward_at_the_ends_of_the_search_space, name, (side,))
    for check in (forward_backward, same_seed_same_loss, extra_parameters_are_counted):
        for pair in PAIRS:
            yield Case(check, name, (pair,))
    for view in view_variants(name):
        for pair in PAIRS:
            yield Case(forward_backward_of_every_teacher_view, name, (view, pair))
    if reads_teacher_features(name):
        for pair in PAIRS:
            yield Case(teacher_feature_maps_pooled_by_the_cache, name, (pair,))
    for side in ("student", "teacher"):
        yield Case(reading_an_undeclared_tap_fails, name, (side,))


@dataclass(frozen=True)
class Result:
    """The outcome of one case: ``pass``, ``fail`` (``message`` says why) or ``n/a`` (the method's reason)."""

    case: Case
    status: str
    message: str = ""


def run_case(case: Case) -> Result:
    """Runs one case; any exception other than :class:`NotApplicable` is a failure, described in words."""
    try:
        case.run()
    except NotApplicable as e:
        return Result(case, "n/a", str(e))
    except ContractViolation as e:
        return Result(case, "fail", str(e))
    except Exception as e:  # the method's own error: a failure of the contract, named with its type
        return Result(case, "fail", f"{case.method}: raised {type(e).__name__}: {e}")
    return Result(case, "pass")


def check_method(name: str) -> list[Result]:
    """Runs every contract check on method ``name`` (built-in or plugin)."""
    return [run_case(case) for case in cases(name)]
