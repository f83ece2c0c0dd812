"""The mutation runner's rule for device-only mutants (tests/mutation/run.py): what it lets through untested."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("mutation_run", Path(__file__).parent / "mutation" / "run.py")
run = sys.modules["mutation_run"] = importlib.util.module_from_spec(_spec)  # its dataclasses need it
_spec.loader.exec_module(run)

ZEROS = "best = torch.zeros(len(relevant), 4, dtype=torch.float64, device=relevant.device)"


@pytest.mark.parametrize("added", [
    "best = torch.zeros(len(relevant), 4, dtype=torch.float64, device=None)",
    "best = torch.zeros(len(relevant), 4, dtype=torch.float64, )",
])
def test_dropping_or_nulling_the_device_is_device_only(added):
    assert run.device_only(ZEROS, added)
    assert run.device_only("x = f(device=a.device, y=2)", "x = f( y=2)")


@pytest.mark.parametrize("added", [
    ZEROS,  # no change
    "best = torch.zeros(len(relevant), 4, dtype=None, device=relevant.device)",  # another argument
    "best = torch.zeros(len(relevant), 5, dtype=torch.float64, device=relevant.device)",
    "best = torch.zeros(len(relevant), 4, dtype=torch.float64, device=None) + 1",
    "best = torch.zeros(len(relevant), dtype=torch.float64, device=None)",  # an argument lost with the device
    "best = torch.zeros(len(relevant), 4, dtype=torch.float64, device=other.device)",  # another device
])
def test_any_other_change_is_not_device_only(added):
    assert not run.device_only(ZEROS, added)


def test_a_device_only_survivor_counts_as_listed_and_another_does_not():
    assert run._listed("m.py", ("m_1", "f", ZEROS, ZEROS.replace("relevant.device", "None")), [])
    assert not run._listed("m.py", ("m_2", "f", ZEROS, ZEROS.replace("float64", "float32")), [])
