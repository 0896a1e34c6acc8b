"""Model selection and timing shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import mechmem


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--tiny ARCH`` / ``--random-smollm2`` / ``--device`` (default: the embedded model)."""
    parser.add_argument("--tiny", default=None, help="a tiny random model of this family")
    parser.add_argument(
        "--random-smollm2",
        action="store_true",
        help="random weights of SmolLM2-135M's shape (no download; for GPU machines)",
    )
    parser.add_argument("--device", default=None)


def model_from_args(args: argparse.Namespace):
    """The model the arguments ask for."""
    from mechmem.tiny import smollm2_shaped_model, tiny_model

    if args.tiny:
        return tiny_model(args.tiny, device=args.device or "cpu")
    if args.random_smollm2:
        return smollm2_shaped_model(device=args.device)
    return mechmem.load_model(device=args.device)


def best_times(arms: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time (s) of each arm over ``repeats`` interleaved rounds, after one warm-up
    run of every arm; interleaving spreads the machine's noise over all arms alike."""
    for run in arms.values():
        run()
    best = {name: float("inf") for name in arms}
    for _ in range(repeats):
        for name, run in arms.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best
