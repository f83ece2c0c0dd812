"""Statistics over seeds: mean ± sample std, Student-t 95% intervals, paired differences.

Formulas (``n`` values ``x_1..x_n``; all intervals are two-sided 95%):

* mean ``m = sum(x) / n``; sample standard deviation ``s = sqrt(sum((x - m)^2) / (n - 1))`` (ddof = 1);
* half width of the t-interval of the mean: ``t(0.975, n - 1) * s / sqrt(n)``; undefined (``None``) when
  ``n < 2``;
* paired difference of a method vs the baseline over the seeds both have: ``d_i = x_i - b_i``; the delta
  is ``mean(d)`` and its interval is the t-interval of ``d`` (the same formula), which needs at least two
  paired seeds. The rank rule (:mod:`kdbench.report.aggregate`) uses the same paired difference between
  any two cells: one is *below* the other when the interval of ``d`` lies entirely below 0.

The t critical values come from a small table for df 1..30 (three decimals, as printed in every
statistics textbook); beyond 30 degrees of freedom the normal value 1.960 is used, which makes the
interval at most 4% narrower than the exact one (df = 31).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

# Two-sided 95% critical values t(0.975, df) for df = 1..30.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z975 = 1.960


def t_critical_95(df: int) -> float:
    """The two-sided 95% Student-t critical value ``t(0.975, df)``.

    Args:
        df: Degrees of freedom, at least 1.

    Returns:
        The tabulated value for ``df <= 30``, the normal value 1.960 beyond.
    """
    if df < 1:
        raise ValueError(f"t critical value needs df >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else _Z975


@dataclass(frozen=True)
class Summary:
    """Mean, sample std and 95% t-interval half width of a set of values.

    Attributes:
        n: Number of values.
        mean: Their mean (``None`` when ``n == 0``).
        std: Sample standard deviation, ddof = 1 (``None`` when ``n < 2``).
        ci95: Half width of the 95% t-interval of the mean (``None`` when ``n < 2``).
    """

    n: int
    mean: float | None
    std: float | None
    ci95: float | None

    @classmethod
    def empty(cls) -> Summary:
        """The summary of no values."""
        return cls(0, None, None, None)

    @property
    def low(self) -> float | None:
        """Lower end of the 95% interval (``None`` when it is undefined)."""
        return None if self.mean is None or self.ci95 is None else self.mean - self.ci95

    @property
    def high(self) -> float | None:
        """Upper end of the 95% interval (``None`` when it is undefined)."""
        return None if self.mean is None or self.ci95 is None else self.mean + self.ci95


def summarize(values: Sequence[float | None]) -> Summary:
    """Mean, sample std and t-interval of ``values``; ``None`` entries are left out.

    Args:
        values: One value per seed.

    Returns:
        The :class:`Summary`; fields that need more values than given are ``None``.
    """
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(xs)
    if n == 0:
        return Summary.empty()
    mean = math.fsum(xs) / n
    if n < 2:
        return Summary(1, mean, None, None)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    return Summary(n, mean, std, t_critical_95(n - 1) * std / math.sqrt(n))


@dataclass(frozen=True)
class PairedDelta:
    """A method's gain over the baseline (or over any other cell), paired by seed.

    Attributes:
        seeds: The seeds both runs have, sorted.
        diff: Summary of the per-seed differences ``method - baseline`` (``mean`` and ``ci95`` are
            ``None`` when fewer than two seeds are paired).
        note: Why the delta is empty, or ``""``.
    """

    seeds: tuple[int, ...]
    diff: Summary
    note: str = ""

    @property
    def below_zero(self) -> bool:
        """Whether the 95% interval of the difference lies entirely below 0 (``False`` when undefined)."""
        return self.diff.high is not None and self.diff.high < 0


def paired_delta(
    method: Mapping[int, float], baseline: Mapping[int, float], min_pairs: int = 2
) -> PairedDelta:
    """The mean per-seed difference ``method - baseline`` and its paired 95% t-interval.

    Args:
        method: Value per seed of the method.
        baseline: Value per seed of the baseline.
        min_pairs: Fewest paired seeds for which a delta is reported.

    Returns:
        A :class:`PairedDelta`; with fewer than ``min_pairs`` paired seeds its ``diff`` is empty and
        ``note`` says why.
    """
    seeds = tuple(sorted(set(method) & set(baseline)))
    if len(seeds) < min_pairs:
        note = f"fewer than {min_pairs} seeds paired with the baseline (n={len(seeds)})"
        return PairedDelta(seeds, Summary(len(seeds), None, None, None), note)
    return PairedDelta(seeds, summarize([method[s] - baseline[s] for s in seeds]))
