"""Benchmark plumbing: a session-wide results table (each result with its ratio against a reference measured in
the same run), printed at the end of the session by ``pytest_terminal_summary``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The shared store helpers live in tests/ (there is no tests/conftest.py to put them on the path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_TABLE = pytest.StashKey[list]()


@pytest.fixture(scope="session")
def bench_table(request) -> list[dict]:
    """Rows of the summary table: ``name``, ``value``, ``unit``, ``reference``, ``ratio``, ``note``."""
    return request.config.stash.setdefault(_TABLE, [])


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    rows = config.stash.get(_TABLE, [])
    if not rows:
        return
    enabled = config.getoption("benchmark_enable", False) or not config.getoption("benchmark_disable", False)
    title = "kdbench store benchmarks" + ("" if enabled else " (SMOKE: one call each, not measurements)")
    terminalreporter.section(title)
    header = ("benchmark", "value", "unit", "reference", "ratio", "note")
    table = [header] + [
        (r["name"], _fmt(r["value"]), r["unit"], r.get("reference") or "-", _fmt(r.get("ratio")), r.get("note", ""))
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        terminalreporter.write_line("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            terminalreporter.write_line("  ".join("-" * w for w in widths))
