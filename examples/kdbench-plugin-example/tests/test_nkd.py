"""NKD's terms against a per-sample loop of the paper's formula, and the kdbench contract on the installed
method."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdbench import contract
from kdbench.methods import METHODS
from kdbench_plugin_example.nkd import NKD, dominant_label, nkd_terms


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape)) * scale


S = _randn(8, 10, seed=1, scale=2.0)
T = _randn(8, 10, seed=2, scale=3.0)
Y = torch.from_numpy(np.random.default_rng(3).integers(0, 10, 8)).long()


def _loop(s, t, y, tau, gamma):
    """The paper's formula, one image at a time."""
    target, non = 0.0, 0.0
    for i in range(len(y)):
        others = [c for c in range(s.shape[1]) if c != y[i]]
        target += -torch.softmax(t[i], 0)[y[i]] * torch.log_softmax(s[i], 0)[y[i]]
        nt = torch.softmax(t[i, others] / tau, 0)
        ns = torch.log_softmax(s[i, others] / tau, 0)
        non += -gamma * tau**2 * (nt * ns).sum()
    return target / len(y), non / len(y)


@pytest.mark.parametrize("tau, gamma", [(1.0, 1.5), (4.0, 0.5)])
def test_nkd_terms_match_the_formula(tau, gamma):
    got = nkd_terms(S, T, Y, tau, gamma)
    want = _loop(S, T, Y, tau, gamma)
    for g, w in zip(got, want):
        assert g.item() == pytest.approx(w.item(), rel=1e-10)


def test_golden_value():
    target, non = nkd_terms(S, T, Y, 1.0, 1.5)
    assert (target + non).item() == pytest.approx(5.476700164701469, rel=1e-9)


def test_dominant_label_follows_the_larger_mixup_weight():
    got = dominant_label(torch.tensor([1, 2, 3]), torch.tensor([7, 8, 9]), torch.tensor([1.0, 0.5, 0.3]))
    assert got.tolist() == [1, 2, 9]


def test_the_entry_point_registers_nkd():
    assert METHODS.get("nkd") is NKD


@pytest.mark.parametrize("case", list(contract.cases("nkd")), ids=lambda c: c.id)
def test_contract(case):
    try:
        case.run()
    except contract.NotApplicable as e:
        pytest.skip(str(e))
