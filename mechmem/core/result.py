"""The result object of :func:`mechmem.generate`.

Example:
    >>> r = GenerationResult(prompts=["hi"], tokens=[[1, 2]], text=["ab"], elapsed_s=0.5)
    >>> r.tokens_per_second
    4.0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class GenerationResult:
    """Tokens, text and logs of one generation call.

    Attributes:
        prompts: the prompts as given.
        prompt_tokens: their token ids (chat template applied when asked).
        tokens: generated token ids per row (an EOS that ended a row included).
        text: decoded generated text per row (special tokens skipped, cut at a stop string).
        stop_reasons: per row ``"eos"``, ``"stop_string"`` or ``"length"``.
        logs: dicts returned by callbacks, in order.
        logits: ``[batch, steps, vocab]`` next-token logits when ``return_logits=True``.
        cache: the final KV cache when ``return_cache=True``.
        n_reprefills: sliding-window re-prefills performed.
        n_clean_recomputes: clean cache recomputes performed.
        elapsed_s: wall time of prefill and decoding.
    """

    prompts: list[Any] = field(default_factory=list)
    prompt_tokens: list[list[int]] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    stop_reasons: list[str] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    logits: Tensor | None = None
    cache: Any = None
    n_reprefills: int = 0
    n_clean_recomputes: int = 0
    elapsed_s: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens (all rows) per second of wall time."""
        total = sum(len(t) for t in self.tokens)
        return total / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationResult:
        """Rebuild a result from :meth:`to_dict` (derived fields such as the rate are ignored).

        Example:
            >>> GenerationResult.from_dict({"tokens": [[1]], "elapsed_s": 1.0}).tokens_per_second
            1.0
        """
        names = {f for f in cls.__dataclass_fields__ if f not in ("logits", "cache")}
        return cls(**{key: value for key, value in data.items() if key in names})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (logits left out)."""
        return {
            "prompts": [p if isinstance(p, str) else list(p) for p in self.prompts],
            "prompt_tokens": self.prompt_tokens,
            "tokens": self.tokens,
            "text": self.text,
            "stop_reasons": self.stop_reasons,
            "logs": self.logs,
            "n_reprefills": self.n_reprefills,
            "n_clean_recomputes": self.n_clean_recomputes,
            "elapsed_s": self.elapsed_s,
            "tokens_per_second": self.tokens_per_second,
        }
