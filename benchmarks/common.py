"""Model selection and timing shared by the benchmark scripts.

Baselines are honest: :func:`untouched_hf` loads the HF model a second time from the same weights
and never wraps it in a bridge (once a bridge boots, its ``original_model`` runs through
TransformerLens too, so it is no baseline).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Callable

import torch

from mechmem.models import DTYPES, bridge_from_hf, load_hf


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--tiny ARCH`` / ``--random-shape NAME`` / ``--dtype`` / ``--device`` (default: the
    embedded model in fp32)."""
    from mechmem.tiny import SHAPES

    parser.add_argument("--tiny", default=None, help="a tiny random model of this family")
    parser.add_argument(
        "--random-shape",
        choices=sorted(SHAPES),
        default=None,
        help="random weights of this model's shape (no download; for GPU machines)",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--device", default=None)


def add_clock_arg(parser: argparse.ArgumentParser) -> None:
    """``--cpu-time``: time with this process's CPU time instead of the wall clock."""
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with process CPU time (steadier on a machine other jobs load)",
    )


def clock_from_args(args: argparse.Namespace) -> tuple[Callable[[], float], str]:
    """The clock ``--cpu-time`` asks for, and its name for the printout.

    Example:
        >>> clock_from_args(argparse.Namespace(cpu_time=True))[1]
        'CPU'
    """
    return (time.process_time, "CPU") if args.cpu_time else (time.perf_counter, "wall")


def _device(args: argparse.Namespace) -> str:
    if args.device:
        return args.device
    return "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"


def _hf_from_args(args: argparse.Namespace):
    """A freshly loaded HF model and tokenizer of the arguments' choice (same weights each call)."""
    from mechmem.tiny import shaped_hf_model, tiny_hf_model

    dtype = DTYPES[args.dtype]
    if args.tiny:
        model, tokenizer = tiny_hf_model(args.tiny)
        return model.to(dtype), tokenizer
    if args.random_shape:
        return shaped_hf_model(args.random_shape, dtype=dtype, device=_device(args))
    return load_hf(dtype=dtype)


def model_from_args(args: argparse.Namespace, *, fast: bool | None = None):
    """The bridge the arguments ask for (``fast`` as in :func:`mechmem.load_model`)."""
    return bridge_from_hf(*_hf_from_args(args), device=_device(args), fast=fast)


def untouched_hf(args: argparse.Namespace, attn_implementation: str = "eager"):
    """The same weights as :func:`model_from_args`, as a plain HF model no bridge ever touched."""
    model, _ = _hf_from_args(args)
    model.set_attn_implementation(attn_implementation)
    return model.to(_device(args)).eval()


def round_times(
    arms: dict[str, Callable[[], object]],
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Each arm's time (s) in each of ``repeats`` interleaved rounds, after one warm-up run of
    every arm; interleaving spreads the machine's noise over all arms alike. Each round runs the
    arms in its own order (shuffled from ``seed``), so no arm always follows the same one (an arm
    run right after another pays for the caches that one left behind). Each round's times are
    printed as they come (in the arms' order). ``clock=time.process_time`` counts this process's
    CPU time instead (steadier on a machine other jobs load)."""
    for run in arms.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in arms}
    order = list(arms)
    shuffler = random.Random(seed)
    for round_ in range(repeats):
        shuffler.shuffle(order)
        for name in order:
            start = clock()
            arms[name]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(clock() - start)
        line = " ".join(f"{t[-1]:.2f}s" for t in times.values())
        print(f"round {round_ + 1}/{repeats}: {line}", flush=True)
    return times


def best_times(
    arms: dict[str, Callable[[], object]],
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Best time (s) of each arm over :func:`round_times`' interleaved rounds."""
    return {name: min(times) for name, times in round_times(arms, repeats, clock).items()}


def paired_ratio(times: dict[str, list[float]], arm: str, baseline: str) -> float:
    """Median over rounds of ``baseline``'s time over ``arm``'s in the same round: a throughput
    ratio that drifts in the machine's speed between rounds leave alone.

    Example:
        >>> paired_ratio({"base": [1.0, 2.0, 1.0], "arm": [1.1, 2.0, 1.25]}, "arm", "base")
        0.9090909090909091
    """
    return statistics.median(b / a for a, b in zip(times[arm], times[baseline]))


def paired_interval(
    times: dict[str, list[float]], arm: str, baseline: str, level: float = 0.95
) -> tuple[float, float] | None:
    """A distribution-free interval (``level``) for :func:`paired_ratio`'s median: the k-th
    smallest and k-th largest of the rounds' ratios, k the largest rank whose binomial tail
    P(Binomial(n, ½) < k) is at most (1 − level) / 2. ``None`` when the rounds are too few for
    any (fewer than 6 at 95%). Whether a bar is met is read from the interval, not from the
    median alone.

    Example:
        >>> ratios = [0.90, 0.92, 0.93, 0.95, 0.96, 0.97, 0.99, 1.00]
        >>> paired_interval({"b": ratios, "a": [1.0] * 8}, "a", "b")  # 8 rounds: the range
        (0.9, 1.0)
        >>> paired_interval({"b": ratios[:5], "a": [1.0] * 5}, "a", "b") is None
        True
    """
    ratios = sorted(b / a for a, b in zip(times[arm], times[baseline]))
    n, tail = len(ratios), (1 - level) / 2
    k, below = 0, 0.0  # below: P(Binomial(n, 1/2) < k + 1)
    while k < n // 2:
        below += math.comb(n, k) / 2**n
        if below > tail:
            break
        k += 1
    return (ratios[k - 1], ratios[n - k]) if k else None


def format_interval(interval: tuple[float, float] | None) -> str:
    """``"0.943–0.961"``, or ``"n/a"`` where the rounds were too few for an interval.

    Example:
        >>> format_interval((0.9431, 0.961)), format_interval(None)
        ('0.943–0.961', 'n/a')
    """
    return "n/a" if interval is None else f"{interval[0]:.3f}–{interval[1]:.3f}"


def print_throughput(best: dict[str, float], rows_tokens: int, baseline: str) -> None:
    """One line per arm: tokens/s from its best time and the ratio to ``baseline``'s.

    Example:
        >>> print_throughput({"base": 2.0, "arm": 4.0}, 100, "base")  # doctest: +SKIP
    """
    base = rows_tokens / best[baseline]
    width = max(len(name) for name in best) + 2
    print(f"{'arm':<{width}} {'tok/s':>8} {'ratio':>7}")
    for name, seconds in best.items():
        rate = rows_tokens / seconds
        print(f"{name:<{width}} {rate:8.2f} {rate / base:7.3f}")
