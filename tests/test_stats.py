"""kdbench.report.stats: edge cases and properties (Hypothesis) of the seed statistics, the paired delta, the
expected maximum and Kendall's tau. Hand values of the formulas are in test_report.py and test_report_tuning.py."""

from __future__ import annotations

import math

import pytest
import scipy.stats
from hypothesis import given
from hypothesis import strategies as st

from kdbench.report.stats import (
    holm,
    two_sample_p,
    Kendall,
    Summary,
    expected_max,
    kendall_tau,
    paired_delta,
    spearman,
    summarize,
    t_critical_95,
)

# Accuracies in percent, two decimals, as the records have them (bounded: no overflow in the squares).
accuracy = st.floats(min_value=0.0, max_value=100.0, allow_nan=False).map(lambda x: round(x, 2))
seeds_values = st.dictionaries(st.integers(0, 20), accuracy, min_size=0, max_size=12)


# --- summaries --------------------------------------------------------------------------------------------------


@given(st.lists(accuracy, min_size=2, max_size=40))
def test_interval_is_t_times_std_over_root_n_and_narrows_as_n_grows(xs: list[float]) -> None:
    s = summarize(xs)
    assert s.n == len(xs) and min(xs) - 1e-9 <= s.mean <= max(xs) + 1e-9
    assert s.ci95 == pytest.approx(t_critical_95(s.n - 1) * s.std / math.sqrt(s.n), rel=1e-12, abs=1e-12)
    # The same spread with one more value: for a fixed std the half width t(n - 1) / sqrt(n) shrinks with n.
    factors = [t_critical_95(n - 1) / math.sqrt(n) for n in range(2, 80)]
    assert all(a > b for a, b in zip(factors, factors[1:]))
    if s.std > 0:  # the interval contains the mean and is symmetric about it
        assert s.low < s.mean < s.high and (s.high - s.mean) == pytest.approx(s.mean - s.low)


@given(st.lists(accuracy, min_size=2, max_size=20), st.floats(-50, 50).map(lambda x: round(x, 2)))
def test_shifting_every_value_shifts_the_mean_only(xs: list[float], c: float) -> None:
    a, b = summarize(xs), summarize([x + c for x in xs])
    assert b.mean == pytest.approx(a.mean + c, abs=1e-9)
    assert b.std == pytest.approx(a.std, abs=1e-6) and b.ci95 == pytest.approx(a.ci95, abs=1e-6)


def test_summaries_of_zero_and_one_value_and_of_nan() -> None:
    assert summarize([]) == Summary(0, None, None, None) == Summary.empty()
    assert summarize([None, float("nan")]) == Summary(0, None, None, None)
    one = summarize([float("nan"), 70.25, None])
    assert one == Summary(1, 70.25, None, None) and one.low is None and one.high is None
    two = summarize([70.0, 72.0])  # sd sqrt(2), half width 12.706 * sqrt(2) / sqrt(2)
    assert (two.n, two.mean, two.std) == (2, 71.0, pytest.approx(math.sqrt(2)))
    assert (two.low, two.high) == pytest.approx((71.0 - 12.706, 71.0 + 12.706))


def test_t_critical_rejects_df_below_one_and_is_the_normal_value_beyond_thirty() -> None:
    for df in (0, -1):
        with pytest.raises(ValueError, match=rf"df >= 1, got {df}"):
            t_critical_95(df)
    assert t_critical_95(30) == 2.042 and t_critical_95(31) == 1.960


# --- the paired delta -------------------------------------------------------------------------------------------


@given(seeds_values, seeds_values)
def test_swapping_the_paired_arms_mirrors_the_delta(method: dict[int, float], baseline: dict[int, float]) -> None:
    ab, ba = paired_delta(method, baseline), paired_delta(baseline, method)
    assert ab.seeds == ba.seeds == tuple(sorted(set(method) & set(baseline)))
    assert ab.note == ba.note and ab.diff.n == ba.diff.n == len(ab.seeds)
    if len(ab.seeds) < 2:
        assert ab.diff.mean is None and ba.diff.mean is None and not ab.below_zero and not ba.below_zero
        assert ab.note == f"fewer than 2 seeds paired with the baseline (n={len(ab.seeds)})"
        return
    assert ab.note == ""
    assert ab.diff.mean == pytest.approx(-ba.diff.mean, abs=1e-9)
    assert ab.diff.std == pytest.approx(ba.diff.std, abs=1e-9) and ab.diff.ci95 == pytest.approx(ba.diff.ci95, abs=1e-9)
    assert ab.diff.low == pytest.approx(-ba.diff.high, abs=1e-9)
    # The same differences, summarised directly.
    direct = summarize([method[s] - baseline[s] for s in ab.seeds])
    assert ab.diff.mean == pytest.approx(direct.mean) and ab.diff.ci95 == pytest.approx(direct.ci95)


def test_below_zero_needs_the_whole_interval_below_zero() -> None:
    base = {0: 70.0, 1: 70.0, 2: 70.0}
    assert paired_delta({0: 60.0, 1: 61.0, 2: 59.0}, base).below_zero  # d = -10, -9, -11: high < 0
    assert not paired_delta({0: 69.0, 1: 72.0, 2: 68.0}, base).below_zero  # the interval holds 0
    assert not paired_delta({0: 71.0, 1: 72.0, 2: 73.0}, base).below_zero  # above 0
    constant = paired_delta({0: 69.0, 1: 69.0}, {0: 70.0, 1: 70.0})  # d = -1, -1: zero width, high = -1
    assert constant.diff.high == -1.0 and constant.below_zero
    tie = paired_delta({0: 70.0, 1: 70.0}, {0: 70.0, 1: 70.0})  # d = 0: high == 0 is not below zero
    assert tie.diff.high == 0.0 and not tie.below_zero


def test_min_pairs_is_the_fewest_paired_seeds_reported() -> None:
    method, base = {0: 72.0, 1: 74.0, 2: 73.0}, {0: 70.0, 1: 71.0, 2: 70.0}
    assert paired_delta(method, base, min_pairs=3).diff.mean == pytest.approx(8 / 3)
    short = paired_delta(method, base, min_pairs=4)
    assert short.seeds == (0, 1, 2) and short.diff == Summary(3, None, None, None)
    assert short.note == "fewer than 4 seeds paired with the baseline (n=3)"


# --- expected maximum and Kendall's tau -------------------------------------------------------------------------


def test_expected_max_names_the_bad_k() -> None:
    with pytest.raises(ValueError, match=r"1 <= k <= 3 \(the number of scores\), got k=4"):
        expected_max([1.0, 2.0, 3.0], 4)
    with pytest.raises(ValueError, match=r"1 <= k <= 0 .*got k=1"):
        expected_max([], 1)


@given(st.lists(accuracy, min_size=1, max_size=8))
def test_expected_max_lies_between_the_mean_and_the_maximum_and_grows_with_k(scores: list[float]) -> None:
    curve = [expected_max(scores, k) for k in range(1, len(scores) + 1)]
    assert curve[0] == pytest.approx(sum(scores) / len(scores)) and curve[-1] == max(scores)
    assert all(a <= b + 1e-9 for a, b in zip(curve, curve[1:]))


def test_kendall_with_fewer_than_two_shared_items_or_a_constant_order() -> None:
    assert kendall_tau({}, {"a": 1.0}) == Kendall(None, None, 0)
    assert kendall_tau({"a": 1.0, "b": 2.0}, {"a": 2.0}) == Kendall(None, None, 1)
    two = kendall_tau({"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 4.0})  # two items are enough for a tau
    assert two.n == 2 and two.tau == pytest.approx(1.0) and two.p == pytest.approx(1.0)
    flat = kendall_tau({"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 5.0, "b": 5.0, "c": 5.0})  # tau undefined
    assert flat == Kendall(None, None, 3)


def test_kendall_reports_an_undefined_p_value_as_none(monkeypatch) -> None:
    # scipy returns a nan p-value for some tied inputs; the statistic then carries no p (never a nan).
    class Result:
        statistic, pvalue = 0.5, float("nan")

    monkeypatch.setattr(scipy.stats, "kendalltau", lambda a, b: Result())
    assert kendall_tau({"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 1.0, "b": 3.0, "c": 2.0}) == Kendall(0.5, None, 3)


# --- Spearman's rank correlation (AMD's audit: the rule's order against the oracle's) ----------------------------


@pytest.mark.parametrize(("a", "b", "rho"), [
    ([1, 2, 3, 4], [10, 20, 30, 40], 1.0),
    ([1, 2, 3, 4], [4, 3, 2, 1], -1.0),
    ([1, 2, 3, 4, 5], [2, 1, 4, 3, 5], 0.8),  # 1 - 6 * (1 + 1 + 1 + 1) / (5 * 24)
    ([1, 2, 2, 3], [1, 3, 2, 2], 0.5),  # average ranks 1, 2.5, 2.5, 4 / 1, 4, 2.5, 2.5: cov 2.25, var 4.5 each
    ([1, 2], [2, 1], -1.0),
])
def test_spearman_against_hand_values_with_and_without_ties(a, b, rho):
    assert spearman(a, b) == pytest.approx(rho, abs=1e-12)


def test_spearman_is_undefined_below_two_points_or_without_spread():
    assert spearman([1.0], [2.0]) is None and spearman([], []) is None
    assert spearman([1, 2, 3], [1, 1, 1]) is None and spearman([4, 4], [1, 2]) is None


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=2, max_size=12))
def test_spearman_is_symmetric_bounded_and_defined_exactly_with_spread(pairs):
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    rho = spearman(a, b)
    if len(set(a)) < 2 or len(set(b)) < 2:
        assert rho is None
    else:
        assert -1 - 1e-12 <= rho <= 1 + 1e-12 and spearman(b, a) == pytest.approx(rho)
        assert spearman(a, [-y for y in b]) == pytest.approx(-rho)


# --- a rerun on another platform: Welch's t against the published seeds, Holm over a table ----------------------


@pytest.mark.parametrize(("a", "b"), [
    ((67.2, 1.1685, 5), (71.08, 1.6, 5)),  # the zoo's FitNet row on two CPU kinds
    ((70.0, 0.5, 3), (71.0, 2.0, 7)),  # unequal n and spread: Welch's df is far from n_a + n_b - 2
    ((80.0, 3.0, 2), (80.5, 0.2, 10)),
])
def test_two_sample_p_is_welchs_t_test(a, b):
    want = scipy.stats.ttest_ind_from_stats(*a, *b, equal_var=False).pvalue
    got = two_sample_p(Summary(a[2], a[0], a[1], None), Summary(b[2], b[0], b[1], None))
    assert got == pytest.approx(want, rel=1e-12)
    assert two_sample_p(Summary(b[2], b[0], b[1], None), Summary(a[2], a[0], a[1], None)) == pytest.approx(want)


def test_a_single_seed_side_is_tested_by_the_other_sides_prediction_interval():
    seeds = Summary(4, 70.0, 2.0, None)
    t = (75.0 - 70.0) / (2.0 * math.sqrt(1 + 1 / 4))  # df 3
    want = 2 * scipy.stats.t.sf(t, 3)
    assert two_sample_p(Summary(1, 75.0, None, None), seeds) == pytest.approx(want, rel=1e-12)
    assert two_sample_p(seeds, Summary(1, 75.0, None, None)) == pytest.approx(want, rel=1e-12)
    assert 0.05 < want < 0.2  # 5 points is 2.2 prediction sds, inside t(0.975, 3) = 3.182


def test_two_sample_p_without_spread_or_without_values():
    flat = Summary(3, 70.0, 0.0, 0.0)
    assert two_sample_p(flat, Summary(3, 70.0, 0.0, 0.0)) == 1.0
    assert two_sample_p(flat, Summary(3, 70.000001, 0.0, 0.0)) == 0.0
    assert two_sample_p(flat, Summary(1, 70.0, None, None)) == 1.0
    assert two_sample_p(Summary(1, 70.0, None, None), Summary(1, 70.0, None, None)) is None
    assert two_sample_p(Summary.empty(), Summary(3, 70.0, 1.0, 1.0)) is None
    assert two_sample_p(Summary(3, 70.0, 1.0, 1.0), Summary.empty()) is None


@pytest.mark.parametrize(("p", "adjusted"), [
    ([0.01, 0.04, 0.03, 0.5], [0.04, 0.09, 0.09, 0.5]),  # 0.04 * 2 = 0.08 is lifted to the 0.09 before it
    ([0.02, 0.01], [0.02, 0.02]),
    ([0.3, 0.6, 0.001], [0.6, 0.6, 0.003]),
    ([0.9], [0.9]),
    ([], []),
])
def test_holm_against_hand_values(p, adjusted):
    assert holm(p) == pytest.approx(adjusted, abs=1e-15)


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12))
def test_holm_never_lowers_a_p_value_keeps_the_order_and_caps_at_one(p):
    q = holm(p)
    assert all(a <= b <= 1.0 for a, b in zip(p, q))
    order = sorted(range(len(p)), key=lambda i: p[i])
    assert all(q[i] <= q[j] for i, j in zip(order, order[1:]))
    assert min(q) == pytest.approx(min(1.0, len(p) * min(p)))
