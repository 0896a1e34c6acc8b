"""Next-token selection: repetition penalty, temperature, top-k, top-p, greedy or sampled.

Each row has its own ``torch.Generator``, so a row's samples depend only on its seed, never on
what else is in the batch.

Example:
    >>> s = Sampler(do_sample=False)
    >>> s.pick(torch.tensor([[0.1, 2.0, 0.3]]), [torch.Generator()], None).tolist()
    [1]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechmem.core.config import require


@dataclass(frozen=True)
class Sampler:
    """Decoding rule.

    Attributes:
        do_sample: sample (``True``) or take the argmax (``False``).
        temperature: divides the logits before sampling (> 0).
        top_k: keep the k most likely tokens (0: all).
        top_p: keep the smallest set of tokens whose probability reaches p (1.0: all).
        repetition_penalty: HF-style penalty on tokens already in the row (1.0: none).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        require(self.temperature > 0, "temperature", "must be > 0", self.temperature)
        require(
            isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be >= 0", self.top_k
        )
        require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        require(
            self.repetition_penalty > 0,
            "repetition_penalty",
            "must be > 0",
            self.repetition_penalty,
        )

    def process(
        self, logits: Float[Tensor, "batch vocab"], seen: Int[Tensor, "batch vocab"] | None
    ) -> Float[Tensor, "batch vocab"]:
        """Apply the penalty and, when sampling, temperature / top-k / top-p filtering."""
        logits = logits.float()
        if self.repetition_penalty != 1.0 and seen is not None:
            penalised = torch.where(
                logits > 0, logits / self.repetition_penalty, logits * self.repetition_penalty
            )
            logits = torch.where(seen > 0, penalised, logits)
        if not self.do_sample:
            return logits
        logits = logits / self.temperature
        if self.top_k > 0 and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            drop = probs.cumsum(-1) - probs >= self.top_p  # keep the token crossing p
            logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
        return logits

    def pick(
        self,
        logits: Float[Tensor, "batch vocab"],
        generators: list[torch.Generator],
        seen: Int[Tensor, "batch vocab"] | None,
    ) -> Int[Tensor, " batch"]:
        """Choose one token per row."""
        processed = self.process(logits, seen)
        if not self.do_sample:
            return processed.argmax(-1)
        probs = processed.softmax(-1)
        return torch.cat(
            [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)]
        )
