"""Per-row parameters of an intervention: one value per batch row, so a sweep runs as one batch.

A config holds a scalar (``gain``) and an optional list (``row_gains``); :func:`per_row` expands
them to the batch at the first forward pass and names the field when the list has the wrong
length, before the model computes anything.

Example:
    >>> per_row(0.5, None, 3, "row_gains")
    [0.5, 0.5, 0.5]
    >>> per_row(0.5, [0.0, 1.0], 3, "row_gains")
    Traceback (most recent call last):
    ValueError: row_gains: has 2 entries but the batch has 3 rows
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def per_row(value: T, values: Sequence[T] | None, batch: int, field: str) -> list[T]:
    """``values`` (checked to have ``batch`` entries) or ``value`` repeated for every row."""
    if values is None:
        return [value] * batch
    if len(values) != batch:
        raise ValueError(f"{field}: has {len(values)} entries but the batch has {batch} rows")
    return list(values)


def row_generators(seeds: Sequence[int], device) -> list[torch.Generator]:
    """One freshly seeded ``torch.Generator`` per row, so a row's draws never depend on the rest
    of the batch.

    Example:
        >>> [g.initial_seed() for g in row_generators([3, 4], "cpu")]
        [3, 4]
    """
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
