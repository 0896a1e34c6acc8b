"""Paired statistics against hand-computed values."""

from __future__ import annotations

import pytest

from mechmem.stats import mcnemar_exact, paired_permutation_test


def test_exact_sign_flip_test_on_all_positive_differences():
    # 5 positive differences: only the all-plus and all-minus sign patterns reach |mean| = 3,
    # so p = 2 / 2^5 = 0.0625.
    result = paired_permutation_test([1.0, 2.0, 3.0, 4.0, 5.0])
    assert result == {"mean": 3.0, "n": 5, "p_value": 0.0625}


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
