"""The repetition-penalty control as an intervention, with one penalty per batch row.

The engine's ``generate(repetition_penalty=p)`` applies one penalty to the whole batch. This
intervention applies the same HF-style rule (:class:`~mechmem.core.sampling.Sampler`) at the
logits hook, row by row, so a penalty arm runs in the same batch as other arms. A row's penalised
tokens are those in the model's current context: the prompt and every token fed since, and after
a sliding-window shift only the re-prefilled tokens (what HF would penalise when it is handed
that window). Without a window shift a row equals ``generate(repetition_penalty=p)`` alone.

Example:
    >>> control = RepetitionPenalty(row_penalties=[1.0, 1.3])
    >>> result = generate(model, ["Hi", "Hi"], [control], max_new_tokens=20,   # doctest: +SKIP
    ...                   do_sample=True, temperature=0.8)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mechmem.core.config import Config, require
from mechmem.core.intervention import Intervention
from mechmem.core.sampling import Sampler
from mechmem.methods.rows import per_row


@dataclass
class RepetitionPenaltyConfig(Config):
    """Configuration of :class:`RepetitionPenalty`.

    Attributes:
        penalty: HF repetition penalty (> 0; 1.0 changes nothing).
        row_penalties: one penalty per batch row (overrides ``penalty``).
    """

    penalty: float = 1.2
    row_penalties: list[float] | None = None

    def validate(self) -> None:
        for value in [self.penalty, *(self.row_penalties or [])]:
            field = "penalty" if self.row_penalties is None else "row_penalties"
            require(math.isfinite(value) and value > 0, field, "must be > 0", value)
        if self.row_penalties is not None:
            require(len(self.row_penalties) > 0, "row_penalties", "must not be empty")


class RepetitionPenalty(Intervention):
    """Per-row repetition penalty on the tokens in context, applied at ``unembed.hook_out``."""

    name = "repetition_penalty"
    config_class = RepetitionPenaltyConfig

    def reset(self, device=None) -> None:
        super().reset(device)
        self._seen: Tensor | None = None
        self._penalties: list[float] = []

    def hooks(self, model):
        vocab = int(model.cfg.d_vocab)

        def record(ids, hook):
            context = self.context
            if self._seen is None or context.cache_length == 0:  # prefill or window shift
                self._seen = torch.zeros(len(ids), vocab, dtype=torch.long, device=ids.device)
            self._seen.scatter_add_(1, ids, context.new_mask.to(ids.device).long())

        def penalise(logits, hook):
            out = None
            for penalty in sorted(set(self._penalties) - {1.0}):
                rows = [r for r, p in enumerate(self._penalties) if p == penalty]
                rule = Sampler(repetition_penalty=penalty)
                out = logits.clone() if out is None else out
                out[rows, -1] = rule.process(logits[rows, -1], self._seen[rows]).to(out.dtype)
            return out

        return [("embed.hook_in", record), ("unembed.hook_out", penalise)]

    def begin_step(self, context) -> None:
        super().begin_step(context)
        c = self.config
        self._penalties = per_row(c.penalty, c.row_penalties, context.batch_size, "row_penalties")
