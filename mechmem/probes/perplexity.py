"""Perplexity of a long text with a sliding window in which every token's loss counts once.

Windows of ``window`` tokens advance by ``stride``; each window scores only the tokens that no
earlier window scored (the first window scores all of its tokens but the first), so every token
after the first is predicted exactly once, with up to ``window - 1`` tokens of context.

Example:
    >>> result = perplexity(model, "The quick brown fox jumps over the lazy dog.")  # doctest: +SKIP
    >>> result.n_tokens                                                           # doctest: +SKIP
    9
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mechmem.core.engine import check_interventions, forward
from mechmem.core.intervention import Intervention, as_intervention_list
from mechmem.core.tokens import encode_batch, encode_prompts, hf_tokenizer


@dataclass
class PerplexityResult:
    """Perplexity and the per-token negative log-likelihoods (nats) behind it.

    Attributes:
        perplexity: ``exp(mean NLL)``.
        mean_nll: mean negative log-likelihood per scored token.
        token_nll: NLL of tokens 1..N-1 (token 0 has no prediction), in order.
        n_tokens: tokens scored (N - 1).
        n_windows: forward passes used.
    """

    perplexity: float
    mean_nll: float
    token_nll: np.ndarray
    n_tokens: int
    n_windows: int

    def to_dict(self) -> dict:
        return {
            "perplexity": self.perplexity,
            "mean_nll": self.mean_nll,
            "n_tokens": self.n_tokens,
            "n_windows": self.n_windows,
        }


def perplexity(
    model,
    text: str | Sequence[int],
    interventions: Intervention | Sequence[Intervention] = (),
    *,
    window: int | None = None,
    stride: int | None = None,
) -> PerplexityResult:
    """Perplexity of ``text`` (a string or token ids) under ``model`` with ``interventions``.

    Args:
        window: tokens per forward pass (default: the model's context, capped at 1024).
        stride: how far each window advances (default ``window // 2``), 1 <= stride <= window - 1.

    Example:
        >>> perplexity(model, list(range(50)), window=16, stride=8).n_tokens  # doctest: +SKIP
        49
    """
    ids = encode_prompts(hf_tokenizer(model), [text])[0] if isinstance(text, str) else list(text)
    if len(ids) < 2 or not all(isinstance(t, int) for t in ids):
        raise ValueError("text: needs at least two tokens to score")
    window = min(int(model.cfg.n_ctx), 1024) if window is None else window
    if not isinstance(window, int) or not 2 <= window <= int(model.cfg.n_ctx):
        raise ValueError(f"window: must be an integer in [2, {model.cfg.n_ctx}], got {window!r}")
    stride = max(window // 2, 1) if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride <= window - 1:
        raise ValueError(f"stride: must be an integer in [1, window - 1], got {stride!r}")
    items = as_intervention_list(interventions)
    check_interventions(model, items)

    tokens = torch.tensor(ids, device=model.cfg.device)
    nll = torch.full((len(ids),), float("nan"), dtype=torch.float64)
    scored_until = 1  # tokens [1, scored_until) already have a loss
    n_windows = 0
    begin = 0
    while scored_until < len(ids):
        end = min(begin + window, len(ids))
        logits = forward(model, tokens[None, begin:end], items)[0].float()
        log_probs = logits[:-1].log_softmax(-1)
        targets = tokens[begin + 1 : end]
        losses = -log_probs.gather(-1, targets[:, None])[:, 0].double().cpu()
        first_new = scored_until - (begin + 1)  # index into losses of the first unscored target
        nll[scored_until:end] = losses[first_new:]
        scored_until = end
        n_windows += 1
        begin = min(begin + stride, len(ids) - window)  # the last window ends at the text's end
    token_nll = nll[1:].numpy()
    mean = float(token_nll.mean())
    return PerplexityResult(
        perplexity=math.exp(mean),
        mean_nll=mean,
        token_nll=token_nll,
        n_tokens=len(token_nll),
        n_windows=n_windows,
    )


def continuation_nll(
    model,
    prompt_tokens: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    batch_size: int = 16,
) -> np.ndarray:
    """Mean NLL (nats) per token of each continuation given its prompt, under the clean model.

    The coherence measure of generated text: ``exp`` of it is the continuation's perplexity.
    Rows with an empty continuation get NaN.

    Example:
        >>> continuation_nll(model, [[1, 2, 3]], [[4, 5]]).shape  # doctest: +SKIP
        (1,)
    """
    if len(prompt_tokens) != len(continuations) or len(prompt_tokens) == 0:
        raise ValueError("prompt_tokens and continuations must be non-empty and of equal length")
    result = np.full(len(continuations), np.nan)
    for start in range(0, len(continuations), batch_size):
        rows = range(start, min(start + batch_size, len(continuations)))
        sequences = [list(prompt_tokens[i]) + list(continuations[i]) for i in rows]
        tokens, mask = encode_batch(model, sequences)
        log_probs = forward(model, tokens, [], attention_mask=mask).float().log_softmax(-1)
        target_nll = -log_probs[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
        width = tokens.shape[1]
        for offset, i in enumerate(rows):
            n = len(continuations[i])
            if n:
                result[i] = float(target_nll[offset, width - 1 - n :].mean())
    return result
