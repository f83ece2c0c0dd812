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


@pytest.mark.parametrize(("removed", "added"), [
    ("return Targets(labels.to(device), partner_labels.to(device), lam.to(device))",
     "return Targets(labels.to(None), partner_labels.to(device), lam.to(device))"),
    ("x, params = self.renderer.render(view, rows, self.image_size, self.device)",
     "x, params = self.renderer.render(view, rows, self.image_size, None)"),
    ("x, params = self.renderer.render(view, rows, self.image_size, self.device)",
     "x, params = self.renderer.render(view, rows, self.image_size, )"),
    ("logits = predict(self.model, split, self.data, 4, self.device,", "logits = predict(self.model, split, self.data, 4, None,"),
])
def test_a_positional_device_nulled_or_dropped_last_is_device_only(removed, added):
    assert run.device_only(removed, added)


@pytest.mark.parametrize(("removed", "added"), [
    # a device dropped before another argument shifts that argument into its place
    ("self.batches = _SplitBatches(train, protocol, data, self.image_size, device, rows)",
     "self.batches = _SplitBatches(train, protocol, data, self.image_size, rows)"),
    ("y = f(a.device, b)", "y = f(None, None)"),  # another argument changed too
    ("y = f(a.device, b)", "y = f(a.device, c)"),
    ("if self.device == 'cuda':", "if None == 'cuda':"),  # a comparison, not an argument
    ("y = f(mydevice, b)", "y = f(None, b)"),
])
def test_other_changes_near_a_positional_device_are_not_device_only(removed, added):
    assert not run.device_only(removed, added)
