"""Time mechmem's TwoNN against scikit-dimension's on the same points.

Run ``python benchmarks/bench_twonn.py [--n 10000] [--d 576] [--repeats 3]``. The points lie on a
random 20-dimensional linear subspace of R^d plus small isotropic noise. The two implementations
are run alternately (so both see the same machine load) and each is timed best-of-``repeats``;
the target is mechmem taking at most half of skdim's time.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from mechmem.probes.twonn import twonn

TARGET_RATIO = 0.5


def make_points(n: int, d: int, manifold_dim: int = 20, noise: float = 1e-3) -> np.ndarray:
    """``n`` points on a random ``manifold_dim``-dim linear subspace of R^d plus Gaussian noise.

    Example:
        >>> make_points(100, 30).shape
        (100, 30)
    """
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.standard_normal((d, manifold_dim)))
    latent = rng.standard_normal((n, manifold_dim))
    return latent @ basis.T + noise * rng.standard_normal((n, d))


def timed(fn: Callable[[], float]) -> tuple[float, float]:
    """Wall time of one call of ``fn`` and its value.

    Example:
        >>> seconds, value = timed(lambda: 1.0)
        >>> value
        1.0
    """
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="number of points")
    parser.add_argument("--d", type=int, default=576, help="ambient dimension")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per implementation")
    args = parser.parse_args()

    X = make_points(args.n, args.d)
    runs: dict[str, Callable[[], float]] = {"mechmem": lambda: twonn(X, discard_fraction=0.1)}
    try:
        import skdim

        runs["skdim"] = lambda: float(skdim.id.TwoNN(discard_fraction=0.1).fit(X).dimension_)
    except ImportError:
        print("skdim is not installed (pip install scikit-dimension): timing mechmem alone")
    print(
        f"{args.n} points in R^{args.d} (20-dim subspace + noise), best of {args.repeats}, "
        f"{torch.get_num_threads()} torch threads"
    )
    best = dict.fromkeys(runs, float("inf"))
    estimate = {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            seconds, estimate[name] = timed(fn)
            best[name] = min(best[name], seconds)
    for name in runs:
        print(f"{name:8s} {best[name]:.2f} s, dimension {estimate[name]:.4f}")
    if "skdim" in runs:
        print(
            f"twonn: mechmem {best['mechmem']:.2f} s, skdim {best['skdim']:.2f} s, "
            f"ratio {best['mechmem'] / best['skdim']:.2f} (target <= {TARGET_RATIO})"
        )


if __name__ == "__main__":
    main()
