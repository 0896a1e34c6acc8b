"""Activation traces: chosen hooks, reduced, recorded at every step of ``mechmem.generate``.

A :class:`TraceRecorder` is an intervention that changes nothing: at every forward pass it reads
each chosen hook at the newest position of every row (the last prompt token in the prefill, the
fed token afterwards), reduces it (``"norm"``, ``"mean"``, ``"none"``, ``"slice:a:b"`` or any
function) and appends it. Entry ``s`` therefore belongs to absolute position
``prompt_length - 1 + s`` of each row. Clean recomputes (interventions off) are not recorded.

Attention patterns and scores (``[batch, head, query, key]``) are read at the newest query, giving
``[batch, head, key]`` per step. Their key axis is the cache, left padding included: it grows by one
per step, so :meth:`traces` pads shorter entries with NaN at the end, and after a ``window``
re-prefill it starts again from the kept tokens, so a key column is a cache slot, not an absolute
position. Padded keys read 0 in patterns and the dtype's lowest value (about -3.4e38) in scores;
reduce scores with a function of your own that masks them, or trace the pattern.

Example:
    >>> recorder = TraceRecorder(hooks=["blocks.0.hook_resid_post"], reduce="norm")
    >>> result = generate(model, "Hi", [recorder], max_new_tokens=10)  # doctest: +SKIP
    >>> recorder.traces()["blocks.0.hook_resid_post"].shape             # doctest: +SKIP
    (10, 1)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from mechmem.core.config import Config, require
from mechmem.core.intervention import Intervention

Reducer = Callable[[torch.Tensor], torch.Tensor]
_QUERY_AXIS_2 = ("hook_pattern", "hook_attn_scores")  # [batch, head, query, key]


def newest_position(activation: torch.Tensor, name: str) -> torch.Tensor:
    """The activation at the newest position of every row: the last query for attention
    patterns and scores, the last position otherwise.

    Example:
        >>> newest_position(torch.zeros(2, 4, 5, 5), "blocks.0.attn.hook_pattern").shape
        torch.Size([2, 4, 5])
    """
    return activation[:, :, -1] if name.endswith(_QUERY_AXIS_2) else activation[:, -1]


def _stack_padded(values: list[torch.Tensor]) -> np.ndarray:
    """Stack equal-rank tensors; where shapes differ, NaN-pad each dim at its end (as float)."""
    if all(v.shape == values[0].shape for v in values):
        return torch.stack(values).numpy()
    shape = [max(sizes) for sizes in zip(*(v.shape for v in values), strict=True)]
    out = torch.full(
        (len(values), *shape),
        float("nan"),
        dtype=torch.promote_types(values[0].dtype, torch.float32),
    )
    for i, value in enumerate(values):
        out[(i, *(slice(0, size) for size in value.shape))] = value
    return out.numpy()


@dataclass
class TraceConfig(Config):
    hooks: list[str] = field(default_factory=list)
    reduce: str = "norm"

    def validate(self) -> None:
        require(len(self.hooks) > 0, "hooks", "name at least one hook to record")
        require(len(set(self.hooks)) == len(self.hooks), "hooks", "must not repeat", self.hooks)
        parse_reducer(self.reduce)


def parse_reducer(spec: str) -> Reducer:
    """Turn a reducer name into a function of a ``[batch, ...]`` activation.

    ``"norm"``: L2 norm over all non-batch dims; ``"mean"``: mean over them; ``"none"``: the
    activation itself; ``"slice:a:b"``: entries ``a:b`` of the flattened activation.

    Example:
        >>> parse_reducer("norm")(torch.tensor([[3.0, 4.0]])).tolist()
        [5.0]
    """
    if spec == "norm":
        return lambda x: x.flatten(1).float().norm(dim=-1)
    if spec == "mean":
        return lambda x: x.flatten(1).float().mean(dim=-1)
    if spec == "none":
        return lambda x: x.float()
    if spec.startswith("slice:"):
        parts = spec.split(":")
        if len(parts) == 3 and all(p.lstrip("-").isdigit() for p in parts[1:]):
            a, b = int(parts[1]), int(parts[2])
            return lambda x: x.flatten(1)[:, a:b].float()
    raise ValueError(f"reduce: unknown reducer {spec!r}; use 'norm', 'mean', 'none' or 'slice:a:b'")


class TraceRecorder(Intervention):
    """Records reduced activations of ``config.hooks`` at every generation step.

    Pass ``reducer=fn`` to use a function of your own instead of ``config.reduce`` (it is not
    serialised by :meth:`to_dict`).
    """

    name = "trace"
    config_class = TraceConfig

    def __init__(self, config=None, *, reducer: Reducer | None = None, **overrides) -> None:
        self._reduce = reducer
        self._entries: dict[str, list[torch.Tensor]] = {}
        self._positions: list[torch.Tensor] = []
        super().__init__(config, **overrides)
        if reducer is None:
            self._reduce = parse_reducer(self.config.reduce)

    def reset(self, device=None) -> None:
        super().reset(device)
        self._entries = {name: [] for name in self.config.hooks}
        self._positions = []

    def begin_step(self, context) -> None:
        super().begin_step(context)
        if context.active:
            self._positions.append(context.positions[:, -1].cpu())

    def hooks(self, model):
        def make(name: str):
            def record(activation, hook):  # the engine's gate skips it in clean recomputes
                newest = newest_position(activation, name)
                self._entries[name].append(self._reduce(newest).detach().cpu())

            return record

        return [(name, make(name)) for name in self.config.hooks]

    def traces(self) -> dict[str, np.ndarray]:
        """``{hook: array [step, batch, ...]}`` of everything recorded since the last reset.

        Entries whose shapes differ (an attention pattern's growing key axis) are NaN-padded.
        """
        return {
            name: _stack_padded(values) if values else np.zeros((0,))
            for name, values in self._entries.items()
        }

    def positions(self) -> np.ndarray:
        """Absolute position ``[step, batch]`` of each recorded entry."""
        return torch.stack(self._positions).numpy() if self._positions else np.zeros((0,))
