"""Reusable prefixes: compute a passage's KV cache once, continue it with many prompts.

``generate(model, questions, prefix=p)`` copies the prefix's cache to every row and feeds only the
questions, with absolute positions that continue after the passage. The prefix is never modified
by use, and it records the model it came from.

Example:
    >>> passage = prefix(model, "The vault code is 4417. The vault is in Oslo.")  # doctest: +SKIP
    >>> generate(model, [" Q: the code? A:", " Q: the city? A:"], prefix=passage,
    ...          max_new_tokens=4).text                                           # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mechmem.core.decoding import Buffers, Gate, Run, intervened
from mechmem.core.fingerprint import model_fingerprint
from mechmem.core.intervention import Intervention, as_intervention_list
from mechmem.core.kv_cache import HookedKVCache
from mechmem.core.tokens import check_token_ids, encode_prompts, hf_tokenizer


@dataclass(frozen=True)
class Prefix:
    """The KV cache of one passage (batch 1), ready to be continued.

    Attributes:
        tokens: the passage's token ids.
        cache: its entries, computed with ``interventions`` applied.
        model: the fingerprint of the model that computed it.
        interventions: the ``to_dict`` forms of the interventions it was computed with.
    """

    tokens: tuple[int, ...]
    cache: HookedKVCache
    model: str
    interventions: tuple[dict[str, Any], ...] = ()

    def __len__(self) -> int:
        return len(self.tokens)


def prefix(
    model,
    text_or_ids: str | Sequence[int] | Tensor,
    interventions: Intervention | Sequence[Intervention] = (),
    *,
    reset: bool = True,
) -> Prefix:
    """The :class:`Prefix` of a passage: one prefill, its cache kept.

    Text is encoded as :func:`mechmem.generate` encodes a prompt (with the tokenizer's special
    tokens); token ids pass through.

    Example:
        >>> p = prefix(model, "A long passage.")  # doctest: +SKIP
        >>> len(p)                                 # doctest: +SKIP
        4
    """
    items = as_intervention_list(interventions)
    if isinstance(text_or_ids, Tensor):
        text_or_ids = text_or_ids.flatten().tolist()
    ids = encode_prompts(hf_tokenizer(model), [text_or_ids])[0]
    check_token_ids([ids], int(model.cfg.d_vocab))
    n_ctx = int(model.cfg.n_ctx)
    if len(ids) > n_ctx:
        raise ValueError(f"the prefix ({len(ids)} tokens) exceeds the model's context of {n_ctx}")
    device = torch.device(model.cfg.device)
    tokens = torch.tensor([ids], device=device)
    buffers = Buffers.of(tokens, torch.ones_like(tokens), len(ids), 0)
    if reset:
        for intervention in items:
            intervention.reset(device)
    gate = Gate()
    run = Run(model, items, gate, buffers)
    with intervened(model, items, gate), torch.no_grad():
        run.prefill(0, len(ids))
    return Prefix(
        tokens=tuple(ids),
        cache=run.cache,
        model=model_fingerprint(model),
        interventions=tuple(item.to_dict() for item in items),
    )


def check_prefix(model, stored: Prefix, chat: bool) -> None:
    """Raise ``ValueError`` unless ``stored`` is a prefix of ``model`` usable as given.

    Example:
        >>> check_prefix(other_model, p, chat=False)  # doctest: +SKIP
        Traceback (most recent call last):
        ValueError: prefix: it was computed by ...
    """
    if not isinstance(stored, Prefix):
        raise ValueError(f"prefix: expected a Prefix from mechmem.prefix(), got {type(stored)}")
    here = model_fingerprint(model)
    if stored.model != here:
        raise ValueError(f"prefix: it was computed by {stored.model}, not by this model ({here})")
    if chat:
        raise ValueError(
            "prefix: chat=True would wrap each suffix in its own chat template; build the chat "
            "text of the passage and the questions yourself and pass token ids or plain text"
        )
