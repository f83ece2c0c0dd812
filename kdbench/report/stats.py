"""Statistics over seeds: mean ± sample std, Student-t 95% intervals, paired differences.

Formulas (``n`` values ``x_1..x_n``; all intervals are two-sided 95%):

* mean ``m = sum(x) / n``; sample standard deviation ``s = sqrt(sum((x - m)^2) / (n - 1))`` (ddof = 1);
* half width of the t-interval of the mean: ``t(0.975, n - 1) * s / sqrt(n)``; undefined (``None``) when
  ``n < 2``;
* paired difference of a method vs the baseline over the seeds both have: ``d_i = x_i - b_i``; the delta
  is ``mean(d)`` and its interval is the t-interval of ``d`` (the same formula), which needs at least two
  paired seeds. The rank rule (:mod:`kdbench.report.aggregate`) uses the same paired difference between
  any two cells: one is *below* the other when the interval of ``d`` lies entirely below 0.

Tuning (:mod:`kdbench.tuning`) adds two statistics:

* the expected best validation score after ``k`` of ``K`` trials (Dodge et al. 2019, "Show your work"),
  with the unbiased estimator for ``k`` trials drawn without replacement from the ``K`` observed scores:
  sort ``v(1) <= ... <= v(K)``; ``E[max of k] = sum_{i=k..K} v(i) * C(i-1, k-1) / C(K, k)``
  (:func:`expected_max`): ``k = 1`` gives the mean, ``k = K`` the maximum;
* Kendall's tau-b between two orders of the same methods, with its two-sided p-value
  (:func:`kendall_tau`, ``scipy.stats.kendalltau``).

A rerun on another platform (:mod:`kdbench.report.compare`) is tested against the published seeds, not
against their interval:

* two independent sets of seeds ``a`` and ``b`` differ in mean when Welch's t test rejects
  (:func:`two_sample_p`): ``t = (m_a - m_b) / sqrt(s_a^2 / n_a + s_b^2 / n_b)`` with the
  Welch-Satterthwaite degrees of freedom; a side with one value borrows the other side's variance, which
  makes the test the t prediction interval of that value (``df = n - 1`` of the other side);
* over a table's many cells, the p-values are adjusted by Holm's step-down method (:func:`holm`), so
  that the chance of any false "differs" is at most 5% when every cell is a faithful rerun.

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


def expected_max(scores: Sequence[float], k: int) -> float:
    """The expected maximum of ``k`` scores drawn without replacement from ``scores`` (Dodge et al. 2019).

    Every ``k``-subset of the ``K`` scores is equally likely; the ``i``-th smallest score ``v(i)`` is the
    maximum of ``C(i-1, k-1)`` of the ``C(K, k)`` subsets, so ``E = sum_{i=k..K} v(i) C(i-1, k-1) / C(K, k)``.

    Args:
        scores: The ``K`` observed scores (e.g. the mean validation score of each trial).
        k: Number of trials, ``1 <= k <= K``.

    Returns:
        The expected best score; ``k = 1`` is the mean of ``scores``, ``k = K`` their maximum.

    Raises:
        ValueError: ``scores`` is empty or ``k`` is outside ``1..K``.
    """
    v = sorted(float(x) for x in scores)
    n = len(v)
    if not 1 <= k <= n:
        raise ValueError(f"expected_max needs 1 <= k <= {n} (the number of scores), got k={k}")
    total = math.comb(n, k)
    # Integer weights (exact), so the weights sum to exactly C(K, k) and k = K returns the maximum itself.
    return math.fsum(v[i - 1] * math.comb(i - 1, k - 1) for i in range(k, n + 1)) / total


def expected_max_curve(scores: Sequence[float]) -> list[float]:
    """:func:`expected_max` of ``scores`` for ``k = 1..K`` (the expected-validation-performance curve)."""
    return [expected_max(scores, k) for k in range(1, len(scores) + 1)]


@dataclass(frozen=True)
class Kendall:
    """Kendall's tau-b between two orders of the same ``n`` items, with its two-sided p-value.

    ``tau`` and ``p`` are ``None`` when fewer than two items are shared or either order is constant.
    """

    tau: float | None
    p: float | None
    n: int


def kendall_tau(first: Mapping[str, float], second: Mapping[str, float]) -> Kendall:
    """Kendall's tau-b between the orders ``first`` and ``second`` give to the items both have
    (``scipy.stats.kendalltau``: tau-b, exact p-value for small ``n`` without ties).

    A single swap of two adjacent items among ``n`` gives ``1 - 4 / (n (n - 1))``.
    """
    items = sorted(set(first) & set(second))
    n = len(items)
    if n < 2:
        return Kendall(None, None, n)
    # Imported on use: scipy is slow to import, and only tuned tables need it.
    from scipy.stats import kendalltau

    result = kendalltau([first[i] for i in items], [second[i] for i in items])
    tau, p = float(result.statistic), float(result.pvalue)
    if math.isnan(tau):
        return Kendall(None, None, n)
    return Kendall(tau, None if math.isnan(p) else p, n)


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (``scipy.stats.spearmanr``: average ranks for ties); ``None`` for fewer than 2
    points or when either side has no spread (every value equal)."""
    if len(a) < 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    from scipy.stats import spearmanr  # imported on use, as in kendall_tau

    return float(spearmanr(a, b).statistic)


def two_sample_p(a: Summary, b: Summary) -> float | None:
    """The two-sided p-value of Welch's t test that ``a`` and ``b`` (independent seeds) have equal means.

    A side with a single value has no variance of its own: it borrows the other side's, so the test becomes
    the t prediction interval of that value. With no spread on either side, equal means give 1 and
    different means 0.

    Returns:
        ``None`` when either side has no value or neither has two.
    """
    if a.mean is None or b.mean is None or (a.std is None and b.std is None):
        return None
    var_a = a.std**2 if a.std is not None else b.std**2  # type: ignore[operator]
    var_b = b.std**2 if b.std is not None else a.std**2  # type: ignore[operator]
    se2 = var_a / a.n + var_b / b.n
    if se2 == 0:
        return 1.0 if a.mean == b.mean else 0.0
    if a.std is None or b.std is None:
        df = float((b.n if a.std is None else a.n) - 1)
    else:
        df = se2**2 / ((var_a / a.n) ** 2 / (a.n - 1) + (var_b / b.n) ** 2 / (b.n - 1))
    from scipy.stats import t as student_t  # imported on use, as in kendall_tau

    return float(2 * student_t.sf(abs(a.mean - b.mean) / math.sqrt(se2), df))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``p_values`` (in their order): the ``i``-th smallest of ``m`` is
    multiplied by ``m - i`` (``i`` from 0), made non-decreasing in that order and capped at 1. Rejecting an
    adjusted p below ``alpha`` keeps the family-wise error rate at most ``alpha``."""
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for i, j in enumerate(sorted(range(m), key=lambda k: p_values[k])):
        running = max(running, min(1.0, (m - i) * p_values[j]))
        adjusted[j] = running
    return adjusted
