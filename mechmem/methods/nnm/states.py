"""Per-token residual states of texts wrapped in a prompt, for the memory store.

A text is wrapped in a prompt such as ``"Context: {text}"``; only the tokens that cover the text
itself are kept. Tokens of the wrapper and the tokenizer's own special tokens
(``tokenizer.all_special_ids``: BOS, EOS, chat-template markers) are dropped, so no model's ids
are hard-coded. One forward per batch (left-padded) captures every requested hook at once.

Example:
    >>> texts = encode_texts(tokenizer, ["The vault is in Oslo."], "C: {text}")  # doctest: +SKIP
    >>> states = token_states(model, texts, ["blocks.28.hook_resid_post"])  # doctest: +SKIP
    >>> states[0]["blocks.28.hook_resid_post"].shape                        # doctest: +SKIP
    torch.Size([6, 576])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mechmem.core.engine import forward
from mechmem.core.hooks import attached
from mechmem.core.tokens import check_token_ids, hf_tokenizer, left_pad, pad_token_id

FIELD = "{text}"


class _Captured(Exception):
    """Raised by the last capture hook to end a forward pass early."""


@dataclass(frozen=True)
class EncodedText:
    """One text in its prompt: every token id, and the indices of the text's own tokens."""

    ids: tuple[int, ...]
    content: tuple[int, ...]


def check_prompt(prompt: str, field: str) -> None:
    """``ValueError`` naming ``field`` unless ``prompt`` holds ``{text}`` exactly once."""
    if not isinstance(prompt, str) or prompt.count(FIELD) != 1:
        raise ValueError(f"{field}: must contain {FIELD} exactly once, got {prompt!r}")


def encode_texts(tokenizer, texts: Sequence[str], prompt: str) -> list[EncodedText]:
    """Each text wrapped in ``prompt`` and tokenised (special tokens included), with the positions
    of the tokens that overlap the text and are not special tokens.

    Example:
        >>> encode_texts(tokenizer, ["hi"], "Q: {text}")[0].content  # doctest: +SKIP
        (3,)
    """
    check_prompt(prompt, "prompt")
    special = set(tokenizer.all_special_ids)
    start = prompt.index(FIELD)
    encoded = []
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"texts[{index}]: must be a non-empty string")
        full = prompt.replace(FIELD, text)
        end = start + len(text)
        batch = tokenizer(full, return_offsets_mapping=True)
        content = tuple(
            position
            for position, (token, (a, b)) in enumerate(zip(batch.input_ids, batch.offset_mapping))
            if token not in special and a < end and b > start
        )
        if not content:
            raise ValueError(f"texts[{index}]: no token of the text is left after filtering")
        encoded.append(EncodedText(tuple(batch.input_ids), content))
    return encoded


def token_states(
    model, texts: Sequence[EncodedText], hooks: Sequence[str], batch_size: int = 8
) -> list[dict[str, Tensor]]:
    """``[{hook: [n_content, d]}]`` per text: the activations at each hook, content tokens only,
    float32 on the CPU.

    Example:
        >>> states = token_states(model, texts, ["blocks.3.hook_resid_pre"])  # doctest: +SKIP
        >>> states[0]["blocks.3.hook_resid_pre"].shape                        # doctest: +SKIP
    """
    check_token_ids([t.ids for t in texts], int(model.cfg.d_vocab))
    longest = max((len(t.ids) for t in texts), default=0)
    if longest > int(model.cfg.n_ctx):
        raise ValueError(f"a text has {longest} tokens, over the model's context {model.cfg.n_ctx}")
    captured: dict[str, Tensor] = {}

    def keeper(name: str):
        def keep(activation, hook):
            captured[name] = activation.detach()
            if len(captured) == len(hooks):
                raise _Captured  # every state is in: skip the later layers and the unembedding

        return keep

    pad = pad_token_id(hf_tokenizer(model))
    device = torch.device(model.cfg.device)
    out: list[dict[str, Tensor]] = []
    with torch.no_grad(), attached(model, [(name, keeper(name)) for name in hooks]):
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            tokens, mask = left_pad([list(t.ids) for t in chunk], pad)
            captured.clear()
            try:
                forward(model, tokens.to(device), attention_mask=mask.to(device))
            except _Captured:
                pass
            width = tokens.shape[1]
            for row, text in enumerate(chunk):
                columns = torch.tensor(text.content) + (width - len(text.ids))
                out.append({name: captured[name][row, columns].float().cpu() for name in hooks})
    return out
