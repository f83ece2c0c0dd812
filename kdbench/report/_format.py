"""Formatting of numbers for the human tables, and the CSV writer shared by every table."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from kdbench._util import atomic_path
from kdbench.report.stats import PairedDelta, Summary

DASH = "—"


def num(value: float | None, digits: int = 2, sign: bool = False) -> str:
    """``value`` with ``digits`` decimals (``+`` for positive values when ``sign``); ``""`` for ``None``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def mean_std(s: Summary, digits: int = 2) -> str:
    """``"mean ± std"``; a single seed shows ``"mean (1 seed)"``; no seeds show ``""``."""
    if s.mean is None:
        return ""
    if s.std is None:
        return f"{num(s.mean, digits)} (1 seed)"
    return f"{num(s.mean, digits)} ± {num(s.std, digits)}"


def delta(d: PairedDelta | None, digits: int = 2) -> str:
    """``"+1.23 [+0.80, +1.66] (n=5)"``, the paired gain and its 95% interval, or the note saying why not."""
    if d is None:
        return ""
    if d.diff.mean is None or d.diff.ci95 is None:
        return d.note
    s = d.diff
    return f"{num(s.mean, digits, True)} [{num(s.low, digits, True)}, {num(s.high, digits, True)}] (n={s.n})"


def si(value: float | None, unit: str = "") -> str:
    """A compact decimal count: ``"1.23M"`` for 1234567, ``"2.4 GB"`` with ``unit="B"``, ``""`` for None."""
    if value is None:
        return ""
    value = float(value)
    prefixes = ("", "k", "M", "G", "T", "P")
    i = 0
    while abs(value) >= 1000 and i < len(prefixes) - 1:
        value /= 1000
        i += 1
    text = f"{value:.0f}" if i == 0 else f"{value:.3g}"
    return f"{text} {prefixes[i]}{unit}" if unit else f"{text}{prefixes[i]}"


def seconds(value: float | None) -> str:
    """``"42 s"``, ``"12.5 min"`` or ``"3.20 h"``."""
    if value is None:
        return ""
    if value < 120:
        return f"{value:.0f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.2f} h"


def csv_value(value: Any) -> str:
    """A CSV cell: ``""`` for ``None``, ``true``/``false`` for bools, floats rounded to 6 decimals."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(round(value, 6))
    return str(value)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Writes ``rows`` (missing keys empty) under a header of ``columns``, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([csv_value(row.get(c)) for c in columns])


def parse_value(text: str) -> Any:
    """A CSV cell back to a value (the inverse of :func:`csv_value`): ``""`` -> ``None``, ``true``/``false`` ->
    bool, an integer or a float literal -> int or float, anything else stays text."""
    if text == "":
        return None
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_csv(path: Path, text_columns: Callable[[str], bool] = lambda column: False) -> list[dict[str, Any]]:
    """The rows of a CSV file written by :func:`write_csv`, each cell parsed by :func:`parse_value` except in
    the columns ``text_columns`` names (identities, digests and versions stay text: ``"1.10"``, ``"00e1"``)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [
        {k: (v if text_columns(k) else parse_value(v)) for k, v in row.items()} for row in rows
    ]
