"""Dose by depth: a piecewise profile over relative layer depth ℓ/L.

The profile is a sorted list of ``(depth, ratio)`` points with depth in [0, 1] and ratio >= 0.
Between points the ratio is ``interpolate``d linearly, or taken from the point at or below
(``floor``) or at or above (``ceil``); outside the points it is clamped to the end values.
The angle at layer ℓ of L is ``profile(ℓ / L) * dose``.

Example:
    >>> peak = [(0.3, 0.0), (0.4, 1.0), (0.5, 0.0)]
    >>> [round(profile_ratio(peak, d, "interpolate"), 2) for d in (0.0, 0.35, 0.4, 0.9)]
    [0.0, 0.5, 1.0, 0.0]
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Literal

from mechmem.core.config import require

Interpolation = Literal["interpolate", "ceil", "floor"]


def check_profile(points: Sequence[tuple[float, float]], field: str = "profile") -> None:
    """Raise ``ValueError`` unless ``points`` is a non-empty sorted list of valid (depth, ratio)."""
    require(len(points) > 0, field, "needs at least one (depth, ratio) point")
    for depth, ratio in points:
        require(0.0 <= depth <= 1.0, field, "depths must lie in [0, 1]", depth)
        require(ratio >= 0.0, field, "ratios must be >= 0", ratio)
    depths = [depth for depth, _ in points]
    require(
        all(a < b for a, b in zip(depths, depths[1:])),
        field,
        "points must be sorted by strictly increasing depth",
        depths,
    )


def profile_ratio(
    points: Sequence[tuple[float, float]], depth: float, mode: Interpolation
) -> float:
    """The profile's ratio at ``depth``.

    Example:
        >>> profile_ratio([(0.2, 1.0), (0.6, 3.0)], 0.4, "ceil")
        3.0
    """
    depths = [d for d, _ in points]
    ratios = [r for _, r in points]
    if depth <= depths[0]:
        return float(ratios[0])
    if depth >= depths[-1]:
        return float(ratios[-1])
    upper = bisect.bisect_left(depths, depth)
    if depths[upper] == depth:
        return float(ratios[upper])
    lower = upper - 1
    if mode == "floor":
        return float(ratios[lower])
    if mode == "ceil":
        return float(ratios[upper])
    if mode == "interpolate":
        share = (depth - depths[lower]) / (depths[upper] - depths[lower])
        return float(ratios[lower] + share * (ratios[upper] - ratios[lower]))
    raise ValueError(f"interpolation: must be interpolate, ceil or floor, got {mode!r}")


def peak_profile(depth: float, spread: float) -> list[tuple[float, float]]:
    """A triangular profile peaking (ratio 1) at ``depth`` and falling to 0 at ``depth ± spread``.

    Example:
        >>> peak_profile(0.4, 0.1)
        [(0.3, 0.0), (0.4, 1.0), (0.5, 0.0)]
    """
    require(0.0 <= depth <= 1.0, "depth", "must lie in [0, 1]", depth)
    require(spread > 0, "spread", "must be > 0", spread)
    points = [(round(depth - spread, 10), 0.0), (depth, 1.0), (round(depth + spread, 10), 0.0)]
    return [(d, r) for d, r in points if 0.0 <= d <= 1.0]
