"""The method contract (:mod:`kdbench.contract`), checked for every registered method: a new file in
``kdbench/methods`` or an installed plugin is tested the moment it is registered. ``kdbench check-method NAME``
runs the same checks on one method.

Each contract check is one parametrised case here (``<check>-<method>[-<pair or side or view>]``); a pair the
method cannot run is skipped with the method's reason. Below them: tests of the checks themselves (each must
fail on a method planted with the bug it looks for). The planted methods are defined in this module, so its
docstring is theirs too: Deviations from the paper: none. Search space: KD's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

from kdbench import contract
from kdbench.methods import METHODS
from kdbench.methods.base import DistillMethod, LossOutput, cross_entropy
from kdbench.methods.kd import KD

CASES = [case for name in METHODS.names() for case in contract.cases(name)]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_contract(case):
    try:
        case.run()
    except contract.NotApplicable as e:
        pytest.skip(str(e))


def test_every_method_has_the_step_checks():
    """The parametrisation covers every registered method with the checks that train it on every pair."""
    for name in METHODS.names():
        checks = {(c.check.__name__, c.args) for c in contract.cases(name)}
        for pair in contract.PAIRS:
            assert ("forward_backward", (pair,)) in checks, name
        assert ("reading_an_undeclared_tap_fails", ("teacher",)) in checks, name


def test_baseline_search_space_is_empty():
    """The student alone has nothing of its own to tune (its lr and weight decay are the protocol's shared
    knobs)."""
    assert dict(METHODS.get("baseline").search_space) == {}


# --- the checks find planted bugs --------------------------------------------------------------------------


@pytest.fixture
def planted():
    """Registers a throwaway method class under a test name for the duration of a test."""
    names = []

    def register(cls: type[DistillMethod]) -> str:
        METHODS.register(cls.name, "test")(cls)
        names.append(cls.name)
        return cls.name

    yield register
    for name in names:
        METHODS._items.pop(name)
        METHODS._sources.pop(name)


def _failures(name: str) -> dict[str, str]:
    return {r.case.id: r.message for r in contract.check_method(name) if r.status == "fail"}


def test_a_correct_method_passes_every_check(planted):
    class Fine(KD):
        name = "test_fine"
        search_space = KD.search_space

    assert _failures(planted(Fine)) == {}


def test_a_loss_that_is_not_the_sum_of_its_terms_fails_in_words(planted):
    class Off(KD):
        name = "test_off"
        search_space = KD.search_space

        def loss(self, student, teacher, targets, ctx):
            out = super().loss(student, teacher, targets, ctx)
            return LossOutput(out.loss * 2, out.terms, out.metrics)

    failures = _failures(planted(Off))
    assert "forward_backward-test_off-cnn_m->cnn_xs" in failures
    assert "terms sum to" in failures["forward_backward-test_off-cnn_m->cnn_xs"]


def test_a_teacher_tap_read_without_declaring_it_fails(planted):
    class Sneaky(DistillMethod):
        """Sneaky. Deviations from the paper: none. Search space: none."""

        name = "test_sneaky"
        reference = "nobody"
        search_space = {}

        @dataclass(frozen=True)
        class Config:
            pass

        @classmethod
        def teacher_taps(cls, cfg):
            return frozenset()

        def loss(self, student, teacher, targets, ctx):
            logits = student["logits"] + 0 * teacher["logits"]
            return LossOutput.from_terms({"ce": cross_entropy(logits, targets)})

    planted(Sneaky)
    case = next(c for c in contract.cases("test_sneaky") if c.check is contract.forward_backward)
    result = contract.run_case(case)
    assert result.status == "fail" and "logits" in result.message


def test_an_unfrozen_config_and_a_default_outside_the_space_fail(planted):
    @dataclass
    class Loose:
        temperature: float = 4.0

    class Unfrozen(KD):
        name = "test_unfrozen"
        search_space = KD.search_space
        Config = Loose

    failures = _failures(planted(Unfrozen))
    assert "frozen" in failures["default_config_and_declarations-test_unfrozen"]

    class Outside(KD):
        name = "test_outside"
        search_space = {"tau": contract.Uniform(5.0, 8.0)}

    failures = _failures(planted(Outside))
    assert "lies outside" in failures["search_space_is_declared_over_config_fields-test_outside"]


def test_a_method_that_raises_fails_naming_the_error(planted):
    class Broken(KD):
        name = "test_broken"
        search_space = KD.search_space

        def loss(self, student, teacher, targets, ctx):
            raise RuntimeError("shape mismatch somewhere")

    result = contract.run_case(contract.Case(contract.forward_backward, "test_broken", (contract.PAIRS[0],)))
    assert result.status == "fail"  # the registry does not know it yet: a KeyError, reported as a failure
    planted(Broken)
    result = contract.run_case(contract.Case(contract.forward_backward, "test_broken", (contract.PAIRS[0],)))
    assert result.status == "fail" and "RuntimeError: shape mismatch somewhere" in result.message


def test_an_incompatible_pair_is_not_applicable_with_the_reason(planted):
    class Picky(KD):
        name = "test_picky"
        search_space = KD.search_space

        @classmethod
        def compatibility(cls, cfg, teacher, student):
            return "needs a CNN student" if student.family != "cnn" else None

    planted(Picky)
    results = {r.case.id: r for r in contract.check_method("test_picky")}
    vit = results["forward_backward-test_picky-cnn_m->vit_pico_patch4"]
    assert vit.status == "n/a" and "needs a CNN student" in vit.message
    assert results["forward_backward-test_picky-cnn_m->cnn_xs"].status == "pass"


def test_check_output_refuses_a_non_finite_term():
    out = LossOutput({"a": torch.tensor(1.0), "b": torch.tensor(float("nan"))}["a"],
                     {"a": torch.tensor(1.0), "b": torch.tensor(float("nan"))})
    with pytest.raises(contract.ContractViolation, match="term b = nan is not a finite scalar"):
        contract.check_output(out, "m")


def test_tuned_params_hit_both_ends_of_every_parameter():
    params = dict(contract.tuned_params(METHODS.get("kd")))
    space = METHODS.get("kd").search_space
    for k, d in space.items():
        assert {k: d.low} in params.values() and {k: d.high} in params.values()
    assert dataclasses.is_dataclass(METHODS.get("kd").Config)
