"""The effect of a session's interventions on each turn's reply.

For every turn, the logits the session decoded with (interventions on, cache carried over from the
earlier turns) are compared with those of the clean model reading the same conversation in one
plain forward. The difference is what the interventions did to that reply, including whatever
they left in the cache during earlier turns.

Example:
    >>> session = Session(model, [Steer(layer=12, scale=8.0)])        # doctest: +SKIP
    >>> for text in ["Hi", "Go on"]:                                     # doctest: +SKIP
    ...     session.send(text, max_new_tokens=20, return_logits=True)
    >>> [e["kl_forward"] for e in turn_effects(session)]               # doctest: +SKIP
    [0.41, 0.57]
"""

from __future__ import annotations

from typing import Any

import torch

from mechmem.core.engine import forward
from mechmem.probes.logit_delta import compare_logits


def turn_effects(session, k: int = 10) -> list[dict[str, Any]]:
    """Per turn: mean KL both ways, mean |Δlogit|, top-1 agreement and top-k overlap between the
    session's reply logits and the clean model's over the same tokens.

    Every turn must have been sent with ``return_logits=True``; the conversation must fit the
    model's context (a plain forward reads it whole).

    Example:
        >>> turn_effects(session)[0]["top1_agreement"]  # doctest: +SKIP
        0.85
    """
    turns = session.turns
    if not turns or any(turn.result.logits is None for turn in turns):
        raise ValueError("turn_effects: send every turn with return_logits=True")
    n_ctx = int(session.model.cfg.n_ctx)
    if len(session) > n_ctx:
        raise ValueError(f"turn_effects: the conversation ({len(session)} tokens) exceeds {n_ctx}")
    effects = []
    for index, turn in enumerate(turns):
        after = turns[index + 1].tokens_before if index + 1 < len(turns) else session.tokens
        reply = turn.result.tokens[0]
        start = len(after) - len(reply) - 1  # the position that predicts the reply's first token
        tokens = torch.tensor([after[:-1]], device=session.model.cfg.device)
        clean = forward(session.model, tokens)[0, start:].float().cpu()
        metrics = compare_logits(clean, turn.result.logits[0].float(), k=k)
        effects.append(
            {
                "turn": index,
                "n_tokens": len(reply),
                "kl_forward": float(metrics["kl_forward"].mean()),
                "kl_reverse": float(metrics["kl_reverse"].mean()),
                "mean_abs_delta": float(metrics["mean_abs_delta"].mean()),
                "top1_agreement": float(metrics["top1_agree"].mean()),
                f"top{k}_overlap": float(metrics["topk_overlap"].mean()),
            }
        )
    return effects
