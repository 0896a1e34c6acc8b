"""Prompt tokenisation the way the model's own tokenizer does it, and left padding.

Example:
    >>> ids, mask = left_pad([[5, 6], [7]], pad_id=0, capacity=3)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 0], [0, 7, 0]], [[1, 1, 0], [0, 1, 0]])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Int
from torch import Tensor


def hf_tokenizer(model):
    """The model's own HF tokenizer (the bridge keeps a BOS-prepending copy as ``.tokenizer``).

    Example:
        >>> hf_tokenizer(model).decode([65])  # doctest: +SKIP
        'A'
    """
    tokenizer = getattr(model, "hf_tokenizer", None) or getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("this model has no tokenizer; pass token ids instead of text")
    return tokenizer


def chat_ids(
    tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool
) -> list[int]:
    """Token ids of ``messages`` written by the tokenizer's chat template.

    Example:
        >>> messages = [{"role": "user", "content": "Hi"}]
        >>> chat_ids(tokenizer, messages, add_generation_prompt=True)  # doctest: +SKIP
        [1, 4093, 198, 17535, 2, 198, 1, 520, 9531, 198]
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat=True but this tokenizer has no chat template")
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return tokenizer(text, add_special_tokens=False).input_ids


def encode_prompts(
    tokenizer,
    prompts,
    *,
    chat: bool = False,
    system_prompt: str | None = None,
    special: bool = True,
) -> list[list[int]]:
    """Token ids of each prompt: text as the tokenizer encodes it (with its own special tokens
    unless ``special=False``), optionally wrapped in its chat template; token id lists pass through.

    Example:
        >>> encode_prompts(tokenizer, [[1, 2]])  # doctest: +SKIP
        [[1, 2]]
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Tensor):
        prompts = prompts.tolist() if prompts.ndim == 2 else [prompts.tolist()]
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts: give a non-empty string or a non-empty list of prompts")
    encoded = []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"prompts[{index}] is an empty string")
            if chat:
                messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
                messages.append({"role": "user", "content": prompt})
                ids = chat_ids(tokenizer, messages, add_generation_prompt=True)
            else:
                ids = tokenizer(prompt, add_special_tokens=special).input_ids
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            raise ValueError(f"prompts[{index}]: expected a string or a list of token ids")
        if not ids:
            raise ValueError(f"prompts[{index}] encodes to no tokens")
        encoded.append(ids)
    return encoded


def check_token_ids(sequences: Sequence[Sequence[int]], vocab_size: int) -> None:
    """Raise ``ValueError`` naming the prompt and id unless every id is in ``[0, vocab_size)``.

    Example:
        >>> check_token_ids([[0, 5]], vocab_size=6)
    """
    for index, ids in enumerate(sequences):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"prompts[{index}]: token id {bad[0]} is outside the vocabulary [0, {vocab_size})"
            )


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, capacity: int | None = None
) -> tuple[Int[Tensor, "batch capacity"], Int[Tensor, "batch capacity"]]:
    """Left-pad sequences to their longest length inside a buffer of ``capacity`` columns.

    Columns past the longest sequence are left free (id ``pad_id``, mask 0) for the engine.
    """
    longest = max(len(s) for s in sequences)
    capacity = max(capacity or longest, longest)
    ids = torch.full((len(sequences), capacity), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), capacity), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, longest - len(seq) : longest] = torch.tensor(seq, dtype=torch.long)
        mask[row, longest - len(seq) : longest] = 1
    return ids, mask


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends a sequence: the tokenizer's EOS and the generation config's.

    Example:
        >>> eos_token_ids(model, hf_tokenizer(model))  # doctest: +SKIP
        {2}
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config = getattr(getattr(model, "original_model", None), "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    return ids


def pad_token_id(tokenizer) -> int:
    """The tokenizer's padding id, or 0 when it has none (padded columns are masked anyway).

    Example:
        >>> pad_token_id(tokenizer)  # doctest: +SKIP
        2
    """
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def encode_batch(model, prompts) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Tokenise ``prompts`` with the model's tokenizer and left-pad them, on the model's device.

    Example:
        >>> tokens, mask = encode_batch(model, ["a", "bcd"])  # doctest: +SKIP
    """
    tokenizer = hf_tokenizer(model)
    ids = encode_prompts(tokenizer, prompts)
    check_token_ids(ids, int(model.cfg.d_vocab))
    tokens, mask = left_pad(ids, pad_token_id(tokenizer))
    return tokens.to(model.cfg.device), mask.to(model.cfg.device)
