"""TwoNN against known dimensions and against scikit-dimension, over many samples.

For each manifold of :mod:`mechmem.probes.manifolds` (cube, torus, sphere; d = 2, 5, 10), draws
``--points`` points with each of ``--seeds`` seeds and prints a markdown table: the mean and spread
of mechmem's estimate, its relative error, and the largest relative difference from
``skdim.id.TwoNN(discard_fraction=0.1)`` on the same points (none for the torus, whose
wrap-around distances skdim cannot take).

Usage:
    python scripts/validate_twonn.py --seeds 10 --points 4000
"""

from __future__ import annotations

import argparse

import numpy as np

from mechmem.probes.manifolds import KINDS, sample_manifold, torus_ratios
from mechmem.probes.twonn import fit_twonn, twonn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--points", type=int, default=4000)
    args = parser.parse_args()
    import skdim

    print(f"{args.points} points, {args.seeds} seeds each, discard_fraction 0.1, regression fit\n")
    print("| manifold | d | mean estimate | sd | mean error | max \\|mechmem / skdim - 1\\| |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind in KINDS:
        for d in (2, 5, 10):
            estimates, gaps = [], []
            for seed in range(args.seeds):
                X = sample_manifold(kind, d, args.points, seed=(seed, d))
                if kind == "torus":
                    estimates.append(fit_twonn(torus_ratios(X)))
                    continue
                estimates.append(twonn(X))
                reference = skdim.id.TwoNN(discard_fraction=0.1).fit(X).dimension_
                gaps.append(abs(estimates[-1] / reference - 1))
            mean = float(np.mean(estimates))
            gap = f"{max(gaps):.1e}" if gaps else "n/a"
            print(
                f"| {kind} | {d} | {mean:.3f} | {np.std(estimates):.3f} "
                f"| {100 * (mean / d - 1):+.1f}% | {gap} |"
            )


if __name__ == "__main__":
    main()
