"""mechmem's KV-cached decoding engine: :func:`generate` and :func:`forward`.

One loop for every experiment (:mod:`mechmem.core.decoding`): prefill, then one token per row per
step with the KV cache, greedy or sampled with per-row seeded generators, left-padded batches, stop
at EOS or stop strings, an optional sliding window with re-prefill (flat per-token cost, position
ids kept inside the model's context), optional clean recomputes of recent cache entries with every
intervention switched off (the DRµGS "cold shower"), callbacks every N tokens and a tqdm bar. A
stored :class:`~mechmem.core.prefix.Prefix` lets a batch of prompts continue one passage without
recomputing it. Hooks are attached for the call only and always removed, exceptions included.

Example:
    >>> result = generate(model, "The capital of France is", max_new_tokens=8)  # doctest: +SKIP
    >>> result.text[0]                                                          # doctest: +SKIP
    ' Paris.'
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechmem.core.context import StepContext
from mechmem.core.decoding import (
    Buffers,
    Callback,
    Decoding,
    Gate,
    Run,
    check_window,
    decode,
    intervened,
)
from mechmem.core.hooks import validate_hooks
from mechmem.core.intervention import Intervention, as_intervention_list
from mechmem.core.kv_cache import HookedKVCache, kv_hook_points
from mechmem.core.prefix import Prefix, check_prefix
from mechmem.core.result import GenerationResult
from mechmem.core.tokens import (
    check_token_ids,
    encode_prompts,
    hf_tokenizer,
    left_pad,
    pad_token_id,
)


def check_interventions(model, interventions: Sequence[Intervention]) -> None:
    """Resolve every hook of every intervention on ``model``; raise ``ValueError`` on the first bad
    one. Attaches nothing and runs nothing.

    Example:
        >>> check_interventions(model, [Identity(layers=[99])])  # doctest: +SKIP
        Traceback (most recent call last):
        ValueError: layers: layer 99 is out of range; ...
    """
    for intervention in as_intervention_list(interventions):
        validate_hooks(model, intervention.hooks(model))


def forward(
    model,
    tokens: Int[Tensor, "batch pos"],
    interventions: Intervention | Sequence[Intervention] = (),
    *,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    reset: bool = True,
) -> Float[Tensor, "batch pos vocab"]:
    """Logits of a plain (prefill-style) forward with ``interventions`` applied.

    Interventions get a prefill :class:`StepContext`; mechmem's full-KV hook points fire too.

    Example:
        >>> logits = forward(model, torch.tensor([[1, 2, 3]]), [])  # doctest: +SKIP
    """
    items = as_intervention_list(interventions)
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens)
    context = StepContext.for_prefill(attention_mask)
    with intervened(model, items), torch.no_grad():
        for intervention in items:
            if reset:
                intervention.reset(tokens.device)
            intervention.begin_step(context)
        logits, _ = model(
            tokens,
            return_type="logits_and_cache",
            past_key_values=HookedKVCache(kv_hook_points(model)),
            attention_mask=attention_mask,
            position_ids=context.position_ids,
        )
    return logits


def generate(
    model,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    interventions: Intervention | Sequence[Intervention] = (),
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | Sequence[int] = 0,
    chat: bool = False,
    system_prompt: str | None = None,
    prefix: Prefix | None = None,
    stop_at_eos: bool = True,
    stop_strings: Sequence[str] = (),
    window: int | None = None,
    window_keep: int | None = None,
    clean_every: int | None = None,
    clean_tokens: int | None = None,
    callbacks: Sequence[Callback] = (),
    callback_every: int = 100,
    progress: bool = False,
    reset: bool = True,
    return_logits: bool = False,
    return_cache: bool = False,
) -> GenerationResult:
    """Generate from ``prompts`` with ``interventions`` hooked on ``model``.

    Args:
        model: a ``TransformerBridge`` (see :func:`mechmem.load_model`).
        prompts: one string, a list of strings (a left-padded batch), or token id lists.
        interventions: applied in order at every forward pass.
        max_new_tokens: tokens to generate per row (>= 0).
        do_sample, temperature, top_k, top_p, repetition_penalty: the decoding rule
            (greedy by default).
        seed: sampling seed; an int gives row ``i`` the seed ``seed + i``, a list one per row.
        chat: wrap each prompt in the tokenizer's chat template (with ``system_prompt``).
        prefix: a stored passage (:func:`mechmem.prefix`) that every row continues; the prompts
            are then its suffixes, encoded without special tokens. Its cache is copied, never
            recomputed or modified.
        stop_at_eos: finish a row at its EOS token.
        stop_strings: finish a row once its generated text contains one of these.
        window: sliding context window; when the cache would exceed it, the last
            ``window_keep`` tokens (default ``window // 2``) are re-prefilled with position ids
            from 0, so generation can run past the model's context at a flat per-token cost.
        clean_every: every this many generated tokens, recompute the cache entries of the last
            ``clean_tokens`` (default ``clean_every``) tokens with every intervention off.
        callbacks: called with a :class:`Progress` every ``callback_every`` tokens and at the
            end; a returned dict is appended to ``result.logs``.
        progress: show a tqdm bar.
        reset: reset every intervention (state and generator) before starting.
        return_logits: keep each step's next-token logits in ``result.logits``.
        return_cache: keep the final KV cache (a ``HookedKVCache``, clean of full-KV hook edits)
            in ``result.cache``; it holds the columns fed to the model, i.e. every token but the
            last generated one.

    Returns:
        A :class:`~mechmem.core.result.GenerationResult`.

    Example:
        >>> result = generate(model, ["Hi", "Hello there"], max_new_tokens=4)  # doctest: +SKIP
        >>> len(result.tokens)                                               # doctest: +SKIP
        2
    """
    items = as_intervention_list(interventions)
    decoding = Decoding(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop_at_eos=stop_at_eos,
        stop_strings=stop_strings,
        clean_every=clean_every,
        clean_tokens=clean_tokens,
        callbacks=callbacks,
        callback_every=callback_every,
        progress=progress,
        return_logits=return_logits,
    )
    tokenizer = hf_tokenizer(model)
    if isinstance(prompts, Tensor):
        prompts = prompts.tolist() if prompts.ndim == 2 else [prompts.tolist()]
    if prefix is not None:
        check_prefix(model, prefix, chat)
    prompt_ids = encode_prompts(
        tokenizer, prompts, chat=chat, system_prompt=system_prompt, special=prefix is None
    )
    check_token_ids(prompt_ids, int(model.cfg.d_vocab))
    batch = len(prompt_ids)
    before = len(prefix.tokens) if prefix is not None else 0
    prompt_length = before + max(len(ids) for ids in prompt_ids)
    keep = check_window(model, window, window_keep, prompt_length, max_new_tokens)
    if window is not None and prompt_length > window:
        raise ValueError(f"the prompt ({prompt_length} tokens) is longer than window={window}")
    decoding.row_seeds(batch)

    device = torch.device(model.cfg.device)
    ids, mask = left_pad(prompt_ids, pad_token_id(tokenizer))
    if prefix is not None:
        shared = torch.tensor(prefix.tokens, dtype=torch.long).expand(batch, -1)
        ids, mask = torch.cat([shared, ids], 1), torch.cat([torch.ones_like(shared), mask], 1)
    buffers = Buffers.of(ids.to(device), mask.to(device), prompt_length, max_new_tokens)
    if reset:
        for intervention in items:
            intervention.reset(device)
    gate = Gate()
    cache = prefix.cache.copy(batch) if prefix is not None else None
    run = Run(model, items, gate, buffers, window, keep, cache=cache, end=before)
    with intervened(model, items, gate):
        result = decode(run, decoding, before, prompt_length, tokenizer)
    result.prompts = list(prompts) if not isinstance(prompts, str) else [prompts]
    result.prompt_tokens = prompt_ids
    if return_cache:
        result.cache = run.cache
    return result
