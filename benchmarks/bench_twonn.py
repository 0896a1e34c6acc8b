"""Time mechmem's TwoNN against scikit-dimension's on the same points.

Run ``python benchmarks/bench_twonn.py [--n 10000] [--d 576] [--repeats 3]``. The points lie on a
random 20-dimensional linear subspace of R^d plus small isotropic noise. Each implementation is
timed best-of-``repeats``; the target is mechmem taking at most half of skdim's time.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

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


def best_time(fn: Callable[[], float], repeats: int) -> tuple[float, float]:
    """Best wall time of ``repeats`` calls of ``fn`` and the value of the last call.

    Example:
        >>> seconds, value = best_time(lambda: 1.0, 2)
        >>> value
        1.0
    """
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return min(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="number of points")
    parser.add_argument("--d", type=int, default=576, help="ambient dimension")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per implementation")
    args = parser.parse_args()

    X = make_points(args.n, args.d)
    print(f"{args.n} points in R^{args.d} (20-dim subspace + noise), best of {args.repeats}")
    ours_s, ours_d = best_time(lambda: twonn(X, discard_fraction=0.1), args.repeats)
    print(f"mechmem twonn: {ours_s:.2f} s, dimension {ours_d:.4f}")
    try:
        import skdim
    except ImportError:
        print("skdim is not installed (pip install scikit-dimension): no comparison")
        return
    skdim_s, skdim_d = best_time(
        lambda: float(skdim.id.TwoNN(discard_fraction=0.1).fit(X).dimension_), args.repeats
    )
    print(f"skdim TwoNN:   {skdim_s:.2f} s, dimension {skdim_d:.4f}")
    print(
        f"twonn: mechmem {ours_s:.2f} s, skdim {skdim_s:.2f} s, "
        f"ratio {ours_s / skdim_s:.2f} (target <= {TARGET_RATIO})"
    )


if __name__ == "__main__":
    main()
