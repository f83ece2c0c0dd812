"""Shared test set-up."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

# Hypothesis fails an example that takes longer than 200 ms by default: a timing assertion, which a loaded
# 2-core machine (CI's end-to-end runs share it) trips at random. Examples are checked, not timed.
settings.register_profile("kdbench", deadline=None)
settings.load_profile("kdbench")


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (and oversubscribe a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """The slow (end-to-end) tests first: under `-n auto --dist loadfile` their files then start while the fast
    files fill the other workers, instead of a 9-minute SLURM run starting last and alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
