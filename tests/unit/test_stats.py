"""Paired statistics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from mechmem.stats import bootstrap_interval, mcnemar_exact, paired_permutation_test


def test_exact_sign_flip_test_on_all_positive_differences():
    # 5 positive differences: only the all-plus and all-minus sign patterns reach |mean| = 3,
    # so p = 2 / 2^5 = 0.0625.
    result = paired_permutation_test([1.0, 2.0, 3.0, 4.0, 5.0])
    assert {k: result[k] for k in ("mean", "n", "p_value")} == {
        "mean": 3.0,
        "n": 5,
        "p_value": 0.0625,
    }
    assert result["interval"] == bootstrap_interval([1.0, 2.0, 3.0, 4.0, 5.0])


def test_bootstrap_interval_of_constant_values_is_that_value():
    assert bootstrap_interval([2.5] * 7) == [2.5, 2.5]


def test_bootstrap_interval_matches_the_normal_interval_for_many_values():
    # For n = 400 draws of N(0, 1) the mean's 95% interval is about mean ± 1.96 / 20.
    values = np.random.default_rng(1).normal(size=400)
    low, high = bootstrap_interval(values)
    assert low < values.mean() < high
    assert high - low == pytest.approx(2 * 1.96 / 20, rel=0.15)


@pytest.mark.parametrize("bad", [[], [float("inf")], [[1.0]]])
def test_bootstrap_interval_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        bootstrap_interval(bad)


def test_symmetric_differences_are_not_significant():
    assert paired_permutation_test([0.5, -0.5, 1.0, -1.0])["p_value"] == 1.0


def test_monte_carlo_branch_is_deterministic_and_close_to_zero_for_a_clear_effect():
    diffs = [1.0 + 0.1 * i for i in range(20)]
    a = paired_permutation_test(diffs, n_permutations=2000, seed=3)
    b = paired_permutation_test(diffs, n_permutations=2000, seed=3)
    assert a == b
    assert a["p_value"] < 0.01


def test_mcnemar_exact_matches_the_binomial_tail():
    # 5 vs 1 discordant pairs: 2 * (C(6,0) + C(6,1)) / 2^6 = 2 * 7 / 64 = 0.21875
    assert mcnemar_exact(5, 1) == pytest.approx(0.21875)
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 0) == 1.0


@pytest.mark.parametrize("bad", [[], [float("nan")], [[1.0, 2.0]]])
def test_bad_input_is_rejected(bad):
    with pytest.raises(ValueError):
        paired_permutation_test(bad)
