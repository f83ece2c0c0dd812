"""The method contract, checked for every registered method (a new file in ``kdbench/methods`` is tested the
moment it exists) on (teacher, student) pairs of different families, on 1x28x28 inputs with 10 classes.

The harness's view of a step is reproduced here: declared taps only (teacher under ``no_grad``), mixup-aware
targets, and ``ctx.index`` when the method requires sample indices.
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
from collections.abc import Mapping
from dataclasses import dataclass

import pytest
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
PAIRS = [("cnn_m", "cnn_xs"), ("cnn_m", "vit_pico_patch4"), ("vit_nano_patch4", "cnn_s")]
NAMES = METHODS.names()
PAIR_IDS = [f"{t}->{s}" for t, s in PAIRS]


# --- helpers --------------------------------------------------------------------------------------------



def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


@functools.cache
def _pristine(name: str) -> tuple[nn.Module, ModelInfo]:
    torch.manual_seed(_seed(name))
    model = create_model(name, DATA.num_classes, DATA.in_chans, DATA.image_size)
    return model, model_info(model, name, DATA.in_chans, DATA.image_size)


def _model(name: str) -> tuple[nn.Module, ModelInfo]:
    """A fresh copy of a seeded model (built once per session) and its metadata."""
    model, info = _pristine(name)
    return copy.deepcopy(model), info


@functools.cache
def _teacher_taps(name: str, taps: frozenset[str]) -> dict[str, torch.Tensor]:
    model, _ = _pristine(name)
    model.eval()
    with torch.no_grad():
        computed = compute_taps(model, _batch()[0], taps)
    return {k: computed[k] for k in taps}


def _batch() -> tuple[torch.Tensor, Targets, torch.Tensor]:
    """Inputs, targets (half the views mixed) and the batch's rows in the training split."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, DATA.in_chans, DATA.image_size, DATA.image_size, generator=g)
    labels = torch.randint(0, DATA.num_classes, (BATCH,), generator=g)
    lam = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.7, 0.6, 0.4, 0.8])
    partner = torch.where(lam < 1, (labels + 1 + torch.arange(BATCH)) % DATA.num_classes, labels)
    rows = torch.randperm(DATA.num_train, generator=g)[:BATCH].sort().values
    return x, Targets(labels, partner, lam), rows


@dataclass
class Setup:
    name: str
    cls: type[DistillMethod]
    cfg: object
    method: DistillMethod
    teacher: nn.Module
    student: nn.Module
    teacher_name: str


def _setup(
    name: str, pair: tuple[str, str], method_cls: type[DistillMethod] | None = None, seed: int = 0,
    params: dict | None = None,
) -> Setup:
    """Builds teacher, student and method (default config, or ``params``); skips (with the method's reason) a
    pair the method cannot run."""
    cls = METHODS.get(name)
    cfg = cls.make_config(params or {})
    teacher, t_info = _model(pair[0])
    student, s_info = _model(pair[1])
    reason = cls.compatibility(cfg, t_info, s_info)
    assert reason is None or (isinstance(reason, str) and reason), (
        f"{name}: compatibility must be None or a reason"
    )
    if reason is not None:
        pytest.skip(f"{name} cannot run {pair[0]} -> {pair[1]}: {reason}")
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


def _step(su: Setup, step: int = 0, teacher_map=None) -> LossOutput:
    """One loss evaluation as the harness does it: TapDicts holding exactly the declared taps."""
    x, targets, rows = _batch()
    t_taps, s_taps = su.cls.teacher_taps(su.cfg), su.cls.student_taps(su.cfg)
    t_out: dict[str, torch.Tensor] = {}
    if t_taps:  # the teacher is a constant: computed once per (teacher, taps) under no_grad
        t_out = dict(_teacher_taps(su.teacher_name, frozenset(t_taps)))
        if teacher_map is not None:
            t_out = {k: teacher_map(k, v) for k, v in t_out.items()}
    computed = compute_taps(su.student, x, s_taps)
    s_out = {k: computed[k] for k in s_taps}
    needs_index = su.cls.requirements(su.cfg).sample_index
    ctx = StepContext(
        epoch=0, num_epochs=2, step=step, steps_per_epoch=4, view=0, index=rows if needs_index else None
    )
    owner = f"method {su.name!r}"
    return su.method.loss(
        TapDict(s_out, owner + " (student)"), TapDict(t_out, owner + " (teacher)"), targets, ctx
    )


def _check_output(out: LossOutput, name: str) -> None:
    assert isinstance(out, LossOutput)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss), f"{name}: loss {out.loss}"
    assert out.terms, f"{name}: no terms"
    for k, v in out.terms.items():
        assert v.ndim == 0 and torch.isfinite(v), f"{name}: term {k} = {v}"
    total = torch.stack(list(out.terms.values())).sum()
    torch.testing.assert_close(
        total, out.loss, rtol=1e-6, atol=1e-6, msg=f"{name}: terms do not sum to the loss"
    )
    for k, v in out.metrics.items():
        assert isinstance(v, float), f"{name}: metric {k} is {type(v)}, not float"


# --- declarations (no models needed) ----------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_default_config_and_declarations(name):
    cls = METHODS.get(name)
    assert cls.name == name
    assert isinstance(cls.reference, str) and cls.reference
    assert dataclasses.is_dataclass(cls.Config) and cls.Config.__dataclass_params__.frozen, (
        f"{name}: Config must be frozen"
    )
    cfg = cls.Config()
    assert cls.make_config({}) == cfg
    doc = inspect.getdoc(sys.modules[cls.__module__]) or ""
    assert "Deviations from the paper" in doc, (
        f"{name}: module docstring needs a 'Deviations from the paper' paragraph"
    )

    decl = cls.declarations(cfg)
    assert decl == cls.declarations(cls.Config()) == cls.declarations(cfg), (
        f"{name}: declarations are not pure"
    )
    assert json.loads(json.dumps(decl)) == decl
    for tap in decl["teacher_taps"] + decl["student_taps"]:
        parse_tap(tap)
    assert isinstance(cls.requirements(cfg), Requirements)
    assert decl["assistant"] is None or isinstance(decl["assistant"], str)


@pytest.mark.parametrize("name", NAMES)
def test_make_config_rejects_unknown_parameter(name):
    cls = METHODS.get(name)
    with pytest.raises(ValueError) as err:
        cls.make_config({"no_such_parameter": 1})
    msg = str(err.value)
    assert name in msg and "no_such_parameter" in msg
    for f in dataclasses.fields(cls.Config):
        assert f.name in msg, f"{name}: the error does not list valid parameter {f.name!r}: {msg}"


@pytest.mark.parametrize("name", NAMES)
def test_compatibility_with_a_featureless_model_is_a_reason_or_none(name):
    cls = METHODS.get(name)
    tiny = ModelInfo(
        name="tiny", family="cnn", num_classes=10, num_features=4, feature_shapes=((4, 2, 2),), num_params=1
    )
    for teacher in (tiny, dataclasses.replace(tiny, feature_shapes=())):
        reason = cls.compatibility(cls.Config(), teacher, teacher)
        assert reason is None or (isinstance(reason, str) and reason)


# Methods whose consistency ablation is a parameter (FunMatch): every value of TEACHER_VIEWS is a variant.
VIEW_VARIANTS = [
    (n, v)
    for n in NAMES
    if "teacher_view" in {f.name for f in dataclasses.fields(METHODS.get(n).Config)}
    for v in TEACHER_VIEWS
]
VIEW_IDS = [f"{n}[teacher_view={v}]" for n, v in VIEW_VARIANTS]


@pytest.mark.parametrize("name", NAMES)
def test_teacher_view_is_declared_and_clean_runs_the_teacher_live(name):
    """The teacher view is data (declared before anything runs); no store holds the clean view, so a method
    that declares it must run the teacher live."""
    cls = METHODS.get(name)
    cfgs = [cls.Config()] + [cls.make_config({"teacher_view": v}) for n, v in VIEW_VARIANTS if n == name]
    for cfg in cfgs:
        view = cls.teacher_view(cfg)
        assert view in TEACHER_VIEWS, f"{name}: teacher_view {view!r} is not one of {TEACHER_VIEWS}"
        assert cls.declarations(cfg)["teacher_view"] == view
        if view == "clean":
            assert cls.requirements(cfg).live_teacher, f"{name}: teacher_view 'clean' needs live_teacher"


# --- search spaces: what a table that tunes may change ----------------------------------------------------

# The distributions a numeric Config field may be drawn from (a Choice fits a field of its values' type).
FIELD_DISTRIBUTIONS = {float: (Uniform, LogUniform), int: (IntUniform,)}
# Integer parameters are mostly structural (stages, layers, memory sizes, curriculum lengths), and may change
# nothing the method declares (CRD's nce_k): one is tuned only when listed here as a loss hyper-parameter.
TUNABLE_INTS: set[tuple[str, str]] = set()
TUNED_NAMES = [n for n in NAMES if METHODS.get(n).search_space]


def _ends(dist: Distribution) -> tuple:
    """The extreme values a trial can draw: ``(low, high)``, or every value of a Choice."""
    return tuple(dist.values) if isinstance(dist, Choice) else (dist.low, dist.high)


def _tuned_params(cls: type[DistillMethod]) -> list[tuple[str, dict]]:
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


@pytest.mark.parametrize("name", NAMES)
def test_search_space_is_declared_over_config_fields(name):
    """Every tunable parameter is a field of the method's Config, with a well-formed distribution that fits
    the field's type and holds the paper's default (trial 0)."""
    cls = METHODS.get(name)
    assert "search_space" in vars(cls), (
        f"{name}: declare search_space next to Config (empty: nothing to tune)"
    )
    space = cls.search_space
    assert isinstance(space, Mapping), f"{name}: search_space must be a mapping, got {type(space).__name__}"
    hints = typing.get_type_hints(cls.Config)
    default = cls.Config()
    for param, dist in space.items():
        assert param in hints, (
            f"{name}: search_space names {param!r}, not a parameter of {cls.Config.__name__}"
            f" ({', '.join(hints) or 'none'})"
        )
        check_distribution(f"{name}.{param}", dist)
        value = getattr(default, param)
        assert dist.contains(value), f"{name}: the default {param} = {value!r} lies outside {dist}"
        hint = hints[param]
        if isinstance(dist, Choice):
            assert all(isinstance(v, hint) for v in dist.values), (
                f"{name}: {param} is a {hint} field, but {dist} offers other types"
            )
        else:
            assert isinstance(dist, FIELD_DISTRIBUTIONS.get(hint, ())), (
                f"{name}: {param} is a {hint} field; {type(dist).__name__} does not fit it"
            )
        assert not (isinstance(value, (int, float)) and value == 0), (
            f"{name}: {param} is 0 by default (a term switched off); tuning it would switch the term on"
        )
        assert "epoch" not in param, f"{name}: {param} is tied to the epoch count; it must not be tuned"
        assert not isinstance(value, int) or isinstance(value, bool) or (name, param) in TUNABLE_INTS, (
            f"{name}: {param} is an integer, usually structural; list it in TUNABLE_INTS only if it is a loss"
            " hyper-parameter"
        )


@pytest.mark.parametrize("name", NAMES)
def test_search_space_is_documented(name):
    cls = METHODS.get(name)
    doc = inspect.getdoc(sys.modules[cls.__module__]) or ""
    assert "Search space:" in doc, (
        f"{name}: the module docstring needs a 'Search space:' line (ranges and why)"
    )


@pytest.mark.parametrize("name", NAMES)
def test_tuning_cannot_change_declarations(name):
    """A trial at any end of the search space declares what the default declares (taps, requirements, teacher
    view, assistant) and can run the same pairs: it reads the default's stores and assistant."""
    cls = METHODS.get(name)
    default = cls.make_config({})
    declared = cls.declarations(default)
    runnable = [cls.compatibility(default, t, s) is None for t, s in _pair_infos()]
    for label, params in _tuned_params(cls):
        cfg = cls.make_config(params)
        assert cls.declarations(cfg) == declared, (
            f"{name}: the trial {label} changes the declarations: {cls.declarations(cfg)} != {declared}"
            " (a structural parameter or a switched-off term is in search_space)"
        )
        got = [cls.compatibility(cfg, t, s) is None for t, s in _pair_infos()]
        assert got == runnable, (
            f"{name}: the trial {label} changes which pairs can run ({got} != {runnable} on {PAIR_IDS})"
        )


@pytest.mark.parametrize("name", TUNED_NAMES)
def test_tuning_keeps_the_method_modules(name):
    """A trial builds the same adapters and buffers as the default (same names and shapes): the sizes of
    projectors, embeddings and memories are structural."""

    def shapes(params: dict) -> dict[str, tuple[int, ...]]:
        method = _setup(name, PAIRS[0], params=params).method
        return {k: tuple(v.shape) for k, v in method.state_dict().items()}

    default = shapes({})
    for label, params in _tuned_params(METHODS.get(name)):
        assert shapes(params) == default, f"{name}: the trial {label} builds other modules than the default"


def test_baseline_search_space_is_empty():
    """The student alone has nothing of its own to tune (its lr and weight decay are the protocol's shared
    knobs)."""
    assert dict(METHODS.get("baseline").search_space) == {}


@pytest.mark.parametrize("side", [0, -1], ids=["low", "high"])
@pytest.mark.parametrize("name", TUNED_NAMES)
def test_forward_backward_at_the_ends_of_the_search_space(name, side):
    """Every parameter at its low (high) end at once still gives a finite loss whose gradient reaches the
    student."""
    params = {k: _ends(d)[side] for k, d in METHODS.get(name).search_space.items()}
    su = _setup(name, PAIRS[0], params=params)
    out = _step(su)
    _check_output(out, name)
    out.loss.backward()
    assert any(bool(p.grad.abs().sum() > 0) for p in su.student.parameters() if p.grad is not None), (
        f"{name} at {params}: no gradient reaches the student"
    )


# --- one training step on real (tiny) models --------------------------------------------------------------


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_forward_backward(name, pair):
    su = _setup(name, pair)
    out = _step(su)
    _check_output(out, name)
    out.loss.backward()

    student_grads = [p.grad for p in su.student.parameters() if p.grad is not None]
    assert student_grads and any(bool(g.abs().sum() > 0) for g in student_grads), (
        f"{name}: no gradient reaches the student"
    )
    for pname, p in su.method.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: adapter parameter {pname} gets no gradient"
            assert torch.isfinite(p.grad).all(), (
                f"{name}: adapter parameter {pname} has a non-finite gradient"
            )
    for pname, p in su.teacher.named_parameters():
        assert p.grad is None, f"{name}: teacher parameter {pname} received a gradient"

    # A second step (stateful methods: memory banks, normalisation constants) is finite as well.
    _check_output(_step(su, step=1), name)


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("name, view", VIEW_VARIANTS, ids=VIEW_IDS)
def test_forward_backward_of_every_teacher_view(name, view, pair):
    su = _setup(name, pair, params={"teacher_view": view})
    out = _step(su)
    _check_output(out, name)
    out.loss.backward()
    assert any(bool(p.grad.abs().sum() > 0) for p in su.student.parameters() if p.grad is not None), (
        f"{name} (teacher_view {view}): no gradient reaches the student"
    )


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_loss(name, pair):
    a = _step(_setup(name, pair, seed=3), step=5)
    b = _step(_setup(name, pair, seed=3), step=5)
    assert torch.equal(a.loss, b.loss), f"{name}: {a.loss.item()} != {b.loss.item()} with the same seed"
    assert a.terms.keys() == b.terms.keys()
    for k in a.terms:
        assert torch.equal(a.terms[k], b.terms[k]), f"{name}: term {k} differs with the same seed"


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_extra_parameters(name, pair):
    su = _setup(name, pair)
    expected = sum(p.numel() for p in su.method.parameters() if p.requires_grad)
    assert su.method.extra_parameters() == expected
    assert not any(p is q for p in su.method.parameters() for q in su.student.parameters())
    assert not any(p is q for p in su.method.parameters() for q in su.teacher.parameters())


FEATURE_NAMES = [
    n
    for n in NAMES
    if any(parse_tap(t)[0] == "feature" for t in METHODS.get(n).teacher_taps(METHODS.get(n).Config()))
]


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("name", FEATURE_NAMES)
def test_teacher_feature_maps_pooled_by_the_cache(name, pair):
    """The cache policy may pool teacher maps below the size in ModelInfo; methods match sizes at run time."""
    su = _setup(name, pair)

    def pool(tap, v):
        return (
            F.adaptive_avg_pool2d(v, (max(1, v.shape[-2] // 2), max(1, v.shape[-1] // 2)))
            if v.ndim == 4
            else v
        )

    out = _step(su, teacher_map=pool)
    _check_output(out, name)
    out.loss.backward()


# --- undeclared taps ---------------------------------------------------------------------------------------

_CANDIDATE_TAPS = ("logits", "pre_logits", "feature[0]", "feature[-1]", "feature[1]")


def _greedy(cls: type[DistillMethod], side: str, tap: str) -> type[DistillMethod]:
    """A throwaway subclass whose loss also reads ``tap`` on ``side`` (not registered)."""

    class Greedy(cls):  # type: ignore[valid-type, misc]
        def loss(self, student, teacher, targets, ctx):
            (student if side == "student" else teacher)[tap]
            return super().loss(student, teacher, targets, ctx)

    return Greedy


@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("name", NAMES)
def test_reading_an_undeclared_tap_fails(name, side):
    cls = METHODS.get(name)
    cfg = cls.Config()
    declared = cls.student_taps(cfg) if side == "student" else cls.teacher_taps(cfg)
    tap = next(t for t in _CANDIDATE_TAPS if t not in declared)
    su = _setup(name, PAIRS[0], method_cls=_greedy(cls, side, tap))
    with pytest.raises(UndeclaredTapError, match=tap.replace("[", r"\[").replace("]", r"\]")):
        _step(su)
