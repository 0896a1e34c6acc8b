"""The benchmarks' timing: interleaved rounds in a shuffled order stay paired, and the interval
for a paired median comes from order statistics."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from common import paired_interval, paired_ratio, round_times  # noqa: E402


class FakeClock:
    """A clock that only the arms move: each arm advances it by its own cost."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rounds_shuffle_the_arms_order_and_keep_each_arms_times_its_own(capsys):
    clock, order = FakeClock(), []

    def arm(name: str, cost: float):
        def run():
            order.append(name)
            clock.now += cost

        return run

    arms = {name: arm(name, cost) for name, cost in (("a", 1.0), ("b", 2.0), ("c", 4.0))}
    times = round_times(arms, repeats=8, clock=clock, seed=1)
    assert times == {"a": [1.0] * 8, "b": [2.0] * 8, "c": [4.0] * 8}
    rounds = [tuple(order[i : i + 3]) for i in range(3, len(order), 3)]  # after the warm-up
    assert len(rounds) == 8 and all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert len(set(rounds)) > 1  # not one fixed order
    order.clear()
    round_times(arms, repeats=8, clock=clock, seed=1)
    assert [tuple(order[i : i + 3]) for i in range(3, len(order), 3)] == rounds  # seeded
    assert "round 8/8: 1.00s 2.00s 4.00s" in capsys.readouterr().out  # printed in arms' order


@pytest.mark.parametrize(
    ("n", "rank"),
    [(5, None), (6, 1), (8, 1), (9, 2), (20, 6), (60, 22)],
)
def test_the_interval_takes_the_binomial_ranks_and_brackets_the_median(n, rank):
    ratios = [1.0 + i / 100 for i in range(n)]  # already sorted, all distinct
    times = {"base": ratios, "arm": [1.0] * n}
    interval = paired_interval(times, "arm", "base")
    if rank is None:
        assert interval is None
        return
    assert interval == (ratios[rank - 1], ratios[n - rank])
    assert interval[0] <= paired_ratio(times, "arm", "base") <= interval[1]
