"""What the engine tells every intervention before each forward pass.

Inside a TransformerLens hook nothing says which absolute position a token has (during cached
decoding every hook sees ``pos = 1``), so the engine publishes a :class:`StepContext` instead.

Example:
    >>> ctx = StepContext.for_prefill(torch.tensor([[0, 1, 1], [1, 1, 1]]))
    >>> ctx.positions.tolist()
    [[-1, 0, 1], [0, 1, 2]]
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from jaxtyping import Int
from torch import Tensor

Phase = Literal["prefill", "decode", "reprefill"]
PHASES: tuple[Phase, ...] = ("prefill", "decode", "reprefill")


@dataclass(frozen=True)
class StepContext:
    """The state of decoding at one forward pass.

    Attributes:
        phase: ``"prefill"`` (the prompt), ``"decode"`` (one new token per row) or
            ``"reprefill"`` (the engine rebuilds cache entries: a sliding-window shift or a
            clean recompute).
        step: number of tokens generated so far (0 during the prefill).
        positions: absolute index of each new token in its row's own stream (prompt and
            generated tokens, padding excluded); ``-1`` marks padding.
        position_ids: the positions the model itself sees (they restart inside a sliding window).
        attention_mask: mask over the cached and the new columns, 1 for real tokens.
        cache_length: number of cached columns before this forward.
        active: ``False`` while the engine recomputes entries without interventions; the engine
            then skips every intervention hook.
    """

    phase: Phase
    step: int
    positions: Int[Tensor, "batch new"]
    position_ids: Int[Tensor, "batch new"]
    attention_mask: Int[Tensor, "batch total"]
    cache_length: int = 0
    active: bool = True

    @property
    def batch_size(self) -> int:
        return int(self.positions.shape[0])

    @property
    def new_mask(self) -> Int[Tensor, "batch new"]:
        """1 where a new column holds a real token of its row."""
        return self.attention_mask[:, self.cache_length :]

    @cached_property
    def key_position_ids(self) -> Int[Tensor, "batch total"]:
        """Position ids the model sees for every cached and new column (``-1`` on padding)."""
        return position_ids_from_mask(self.attention_mask)

    @classmethod
    def for_prefill(cls, attention_mask: Int[Tensor, "batch pos"]) -> StepContext:
        """The context of a plain forward over whole (left-padded) sequences with no cache.

        Example:
            >>> StepContext.for_prefill(torch.ones(1, 2, dtype=torch.long)).phase
            'prefill'
        """
        positions = position_ids_from_mask(attention_mask)
        return cls(
            phase="prefill",
            step=0,
            positions=positions,
            position_ids=positions.clamp(min=0),
            attention_mask=attention_mask,
        )


def position_ids_from_mask(mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Count real tokens along each row: 0, 1, 2, ... with ``-1`` at padded columns.

    Example:
        >>> position_ids_from_mask(torch.tensor([[0, 1, 0, 1]])).tolist()
        [[-1, 0, -1, 1]]
    """
    counted = mask.long().cumsum(-1) - 1
    return counted.masked_fill(mask == 0, -1)
