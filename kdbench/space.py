"""Search-space distributions: what a method declares about its own hyper-parameters (a leaf module).

A method file declares, next to its ``Config`` defaults (the paper's values), the distributions its tunable
parameters are drawn from when a table tunes (``tune:`` in the config, :mod:`kdbench.tuning`)::

    search_space = {"tau": Uniform(1.0, 8.0), "kd_weight": LogUniform(0.1, 10.0)}

The distributions are plain frozen dataclasses, so declaring one needs neither Optuna nor torch; the tuning
module turns them into Optuna distributions. A tuned parameter must not change what the method declares (its
taps, requirements, teacher view, assistant): the stores and assistants a trial reads are the default's
(checked for every method by :mod:`kdbench.contract`, in ``tests/test_methods_contract.py`` and ``kdbench check-method``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union


class _FloatRange:
    low: float
    high: float

    def contains(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high


@dataclass(frozen=True)
class Uniform(_FloatRange):
    """A float drawn uniformly from ``[low, high]``."""

    low: float
    high: float


@dataclass(frozen=True)
class LogUniform(_FloatRange):
    """A float drawn uniformly in log space from ``[low, high]`` (``0 < low``): loss weights, learning rates."""

    low: float
    high: float


@dataclass(frozen=True)
class IntUniform:
    """An integer drawn uniformly from ``[low, high]`` (both included)."""

    low: int
    high: int

    def contains(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high


@dataclass(frozen=True)
class Choice:
    """One of a few values (numbers, strings or booleans)."""

    values: tuple

    def contains(self, value: Any) -> bool:
        return value in self.values


Distribution = Union[Uniform, LogUniform, IntUniform, Choice]


def check_distribution(name: str, dist: Distribution) -> None:
    """Refuses an empty or ill-formed range (a declaration error of a method file, or of a ``tune:`` range).

    Raises:
        ValueError: naming the parameter and the fix.
    """
    if isinstance(dist, Choice):
        if len(dist.values) < 2:
            raise ValueError(f"search space of {name!r}: Choice needs at least two values, got {dist.values!r}")
        return
    if not isinstance(dist, (Uniform, LogUniform, IntUniform)):
        raise ValueError(f"search space of {name!r}: {dist!r} is not a distribution of kdbench.space")
    if not (math.isfinite(dist.low) and math.isfinite(dist.high)) or not dist.low < dist.high:
        raise ValueError(f"search space of {name!r}: needs finite low < high, got [{dist.low}, {dist.high}]")
    if isinstance(dist, LogUniform) and dist.low <= 0:
        raise ValueError(f"search space of {name!r}: LogUniform needs low > 0, got {dist.low}")


def around(value: float, factor: float) -> LogUniform:
    """``LogUniform(value / factor, value * factor)``: a log range centred on ``value`` (``value > 0``)."""
    if not value > 0 or not factor > 1:
        raise ValueError(f"around({value}, {factor}): needs value > 0 and factor > 1")
    return LogUniform(value / factor, value * factor)
