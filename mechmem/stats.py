"""Small, dependency-free paired statistics for experiments.

Example:
    >>> paired_permutation_test([1.0, 2.0, 3.0, 4.0, 5.0])["p_value"]
    0.0625
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from math import comb

import numpy as np


def paired_permutation_test(
    differences: Sequence[float], n_permutations: int = 10000, seed: int = 0
) -> dict[str, float]:
    """Two-sided sign-flip permutation test of mean(differences) = 0.

    Exact (all 2^n sign patterns) for n <= 16, Monte Carlo with ``n_permutations`` draws above.

    Example:
        >>> round(paired_permutation_test([0.5, -0.5])["p_value"], 2)
        1.0
    """
    d = np.asarray(differences, dtype=float)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError("differences: need a non-empty 1-D sequence")
    if not np.isfinite(d).all():
        raise ValueError("differences: contains NaN or inf")
    observed = abs(d.mean())
    if len(d) <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    else:
        rng = np.random.default_rng(seed)
        signs = rng.choice((1.0, -1.0), size=(n_permutations, len(d)))
    null = np.abs((signs * d).mean(axis=1))
    p_value = float(((null >= observed - 1e-12).sum()) / len(null))
    interval = bootstrap_interval(d, seed=seed)
    return {"mean": float(d.mean()), "n": int(len(d)), "p_value": p_value, "interval": interval}


def bootstrap_interval(
    values: Sequence[float], level: float = 0.95, n_boot: int = 10000, seed: int = 0
) -> list[float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement).

    With few values the interval is too narrow (it cannot be wider than their range); read it
    beside the permutation p-value.

    Example:
        >>> bootstrap_interval([1.0, 2.0, 3.0, 4.0])
        [1.5, 3.5]
    """
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or len(v) == 0 or not np.isfinite(v).all():
        raise ValueError("values: need a non-empty 1-D sequence of finite numbers")
    if not 0 < level < 1:
        raise ValueError(f"level: must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return [float(low), float(high)]


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts of two paired arms.

    Example:
        >>> round(mcnemar_exact(5, 1), 3)
        0.219
    """
    if only_a < 0 or only_b < 0:
        raise ValueError("discordant counts must be >= 0")
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(comb(n, i) for i in range(k + 1)) / 2.0**n
    return float(min(1.0, 2 * tail))
