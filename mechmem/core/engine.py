"""mechmem's KV-cached decoding engine.

One loop for every experiment: prefill, then one token per row per step with the KV cache, greedy
or sampled with per-row seeded generators, left-padded batches, stop at EOS or stop strings, an
optional sliding window with re-prefill (flat per-token cost, position ids kept inside the
model's context), optional clean recomputes of recent cache entries with every intervention
switched off (the DRµGS "cold shower"), callbacks every N tokens and a tqdm bar. Hooks are
attached for the call only and always removed, exceptions included.

Example:
    >>> result = generate(model, "The capital of France is", max_new_tokens=8)  # doctest: +SKIP
    >>> result.text[0]                                                          # doctest: +SKIP
    ' Paris.'
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechmem.core.context import Phase, StepContext, position_ids_from_mask
from mechmem.core.hooks import HookSpec, attached, validate_hooks
from mechmem.core.intervention import Intervention, as_intervention_list
from mechmem.core.kv_cache import HookedKVCache, kv_hook_points
from mechmem.core.result import GenerationResult
from mechmem.core.sampling import Sampler
from mechmem.core.tokens import (
    check_token_ids,
    encode_prompts,
    eos_token_ids,
    hf_tokenizer,
    left_pad,
    pad_token_id,
)


@dataclass
class Progress:
    """What a callback sees every ``callback_every`` generated tokens.

    Attributes:
        step: tokens generated so far.
        generated: the generated token ids of every row so far.
        tokenizer: the model's tokenizer, to decode text.
        elapsed_s: seconds since the prefill started.
    """

    step: int
    generated: list[list[int]]
    tokenizer: Any
    elapsed_s: float

    def text(self, row: int = 0, last: int | None = None) -> str:
        """Decoded text of ``row`` (its last ``last`` tokens when given)."""
        ids = self.generated[row] if last is None else self.generated[row][-last:]
        return self.tokenizer.decode(ids, skip_special_tokens=True)


Callback = Callable[[Progress], "dict[str, Any] | None"]


@dataclass
class _Gate:
    """Shared switch that lets the engine silence every intervention hook at once."""

    active: bool = True

    def wrap(self, fn: Callable) -> Callable:
        def gated(activation, hook):
            return fn(activation, hook=hook) if self.active else None

        return gated


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


@contextmanager
def intervened(model, interventions: Sequence[Intervention], gate: _Gate | None = None):
    """Validate and attach the hooks of ``interventions`` (in order) for the block.

    Example:
        >>> with intervened(model, [Identity(layers=[0])]):  # doctest: +SKIP
        ...     model("hi")
    """
    specs: list[HookSpec] = []
    for intervention in interventions:
        for name, fn in intervention.hooks(model):
            specs.append((name, gate.wrap(fn) if gate else fn))
    with attached(model, specs):
        yield


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


@dataclass
class _Buffers:
    """Token, mask and absolute-position buffers for the whole run, preallocated."""

    ids: Tensor
    mask: Tensor
    positions: Tensor
    n_real: Tensor
    seen: Tensor | None = None
    generated: list[list[int]] = field(default_factory=list)


def _validate(
    model,
    max_new_tokens: int,
    window: int | None,
    window_keep: int | None,
    clean_every: int | None,
    clean_tokens: int | None,
    callback_every: int,
    prompt_length: int,
) -> int:
    """Check the decoding arguments; return how many tokens a window slide keeps (0: no window)."""
    n_ctx = int(model.cfg.n_ctx)
    keep = 0
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(callback_every, int) or callback_every < 1:
        raise ValueError(f"callback_every: must be an integer >= 1, got {callback_every!r}")
    if window is None:
        if prompt_length + max_new_tokens > n_ctx:
            raise ValueError(
                f"prompt ({prompt_length} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's context of {n_ctx}; pass window=W (W <= {n_ctx}) to slide the context"
            )
    else:
        if not isinstance(window, int) or not 2 <= window <= n_ctx:
            raise ValueError(f"window: must be an integer in [2, {n_ctx}], got {window!r}")
        if prompt_length > window:
            raise ValueError(f"the prompt ({prompt_length} tokens) is longer than window={window}")
        keep = window_keep if window_keep is not None else window // 2
        if not isinstance(keep, int) or not 1 <= keep < window:
            raise ValueError(f"window_keep: must be an integer in [1, {window - 1}], got {keep!r}")
    if clean_every is not None and (not isinstance(clean_every, int) or clean_every < 1):
        raise ValueError(f"clean_every: must be an integer >= 1, got {clean_every!r}")
    if clean_tokens is not None and (not isinstance(clean_tokens, int) or clean_tokens < 1):
        raise ValueError(f"clean_tokens: must be an integer >= 1, got {clean_tokens!r}")
    return keep


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
    sampler = Sampler(do_sample, temperature, top_k, top_p, repetition_penalty)
    tokenizer = hf_tokenizer(model)
    if isinstance(prompts, Tensor):
        prompts = prompts.tolist() if prompts.ndim == 2 else [prompts.tolist()]
    prompt_ids = encode_prompts(tokenizer, prompts, chat=chat, system_prompt=system_prompt)
    check_token_ids(prompt_ids, int(model.cfg.d_vocab))
    batch = len(prompt_ids)
    prompt_length = max(len(ids) for ids in prompt_ids)
    keep = _validate(
        model,
        max_new_tokens,
        window,
        window_keep,
        clean_every,
        clean_tokens,
        callback_every,
        prompt_length,
    )
    seeds = [seed + i for i in range(batch)] if isinstance(seed, int) else list(seed)
    if len(seeds) != batch or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"seed: give an int or one int per prompt ({batch}), got {seed!r}")
    if isinstance(stop_strings, str) or not all(isinstance(s, str) and s for s in stop_strings):
        raise ValueError(f"stop_strings: must be a list of non-empty strings, got {stop_strings!r}")
    for callback in callbacks:
        if not callable(callback):
            raise ValueError(f"callbacks: {callback!r} is not callable")

    device = torch.device(model.cfg.device)
    pad_id = pad_token_id(tokenizer)
    ids, mask = left_pad(prompt_ids, pad_id, capacity=prompt_length + max_new_tokens)
    ids, mask = ids.to(device), mask.to(device)
    buffers = _Buffers(
        ids=ids,
        mask=mask,
        positions=position_ids_from_mask(mask),
        n_real=mask[:, :prompt_length].sum(-1),
        generated=[[] for _ in range(batch)],
    )
    if repetition_penalty != 1.0:
        vocab = int(model.cfg.d_vocab)
        buffers.seen = torch.zeros(batch, vocab, dtype=torch.long, device=device)
        buffers.seen.scatter_add_(1, ids[:, :prompt_length], mask[:, :prompt_length])
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    eos_ids = torch.tensor(sorted(eos_token_ids(model, tokenizer)), device=device)

    gate = _Gate()
    if reset:
        for intervention in items:
            intervention.reset(device)
    run = _Run(model, items, gate, buffers, window, keep)
    result = GenerationResult(prompts=list(prompts) if not isinstance(prompts, str) else [prompts])
    result.prompt_tokens = prompt_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    reasons = ["length"] * batch
    step_logits: list[Tensor] = []
    start = time.perf_counter()
    bar = tqdm(total=max_new_tokens, disable=not progress, desc="generate", unit="tok")

    reported = [-1]

    def report(step: int) -> None:
        reported[0] = step
        info = Progress(step, buffers.generated, tokenizer, time.perf_counter() - start)
        for callback in callbacks:
            entry = callback(info)
            if entry is not None:
                result.logs.append(entry)

    with intervened(model, items, gate), torch.no_grad():
        logits = run.prefill(prompt_length) if max_new_tokens else None
        for step in range(max_new_tokens):
            if return_logits:
                step_logits.append(logits.float().cpu())
            chosen = sampler.pick(logits, generators, buffers.seen)
            chosen = torch.where(finished, torch.full_like(chosen, pad_id), chosen)
            run.append(chosen, ~finished)
            for row, (token, done) in enumerate(zip(chosen.tolist(), finished.tolist())):
                if not done:
                    buffers.generated[row].append(token)
            if stop_at_eos and len(eos_ids):
                hit = torch.isin(chosen, eos_ids) & ~finished
                for row in hit.nonzero().flatten().tolist():
                    reasons[row] = "eos"
                finished |= hit
            for row in _rows_hitting(stop_strings, buffers.generated, tokenizer, finished):
                reasons[row] = "stop_string"
                finished[row] = True
            bar.update(1)
            if (step + 1) % callback_every == 0:
                report(step + 1)
            if bool(finished.all()) or step + 1 == max_new_tokens:
                break
            if clean_every is not None and (step + 1) % clean_every == 0:
                run.clean_recompute(clean_tokens or clean_every, step + 1)
            logits = run.advance(step + 1)
    bar.close()
    result.elapsed_s = time.perf_counter() - start
    steps_done = max(len(g) for g in buffers.generated)
    if callbacks and reported[0] != steps_done:
        report(steps_done)
    result.tokens = buffers.generated
    result.text = [_decode(tokenizer, g, stop_strings) for g in buffers.generated]
    result.stop_reasons = reasons
    result.n_reprefills = run.n_reprefills
    result.n_clean_recomputes = run.n_clean
    if return_logits and step_logits:
        result.logits = torch.stack(step_logits, dim=1)
    if return_cache:
        result.cache = run.cache
    return result


class _Run:
    """The mutable state of one generation: buffers, cache and the columns it covers."""

    def __init__(self, model, interventions, gate, buffers, window, keep) -> None:
        self.model = model
        self.interventions = interventions
        self.gate = gate
        self.buffers = buffers
        self.window = window
        self.keep = keep  # tokens a window slide keeps
        self.cache = HookedKVCache(kv_hook_points(model))
        self.cache_start = 0  # first buffer column held in the cache
        self.end = 0  # one past the last buffer column fed to the model
        self.n_reprefills = 0
        self.n_clean = 0

    def _forward(self, start: int, stop: int, phase: Phase, step: int, active: bool = True):
        b = self.buffers
        window_mask = b.mask[:, self.cache_start : stop]
        position_ids = position_ids_from_mask(window_mask).clamp(min=0)[
            :, start - self.cache_start :
        ]
        context = StepContext(
            phase=phase,
            step=step,
            positions=b.positions[:, start:stop],
            position_ids=position_ids,
            attention_mask=window_mask,
            cache_length=start - self.cache_start,
            active=active,
        )
        for intervention in self.interventions:
            intervention.begin_step(context)
        self.gate.active = active
        try:
            logits, self.cache = self.model(
                b.ids[:, start:stop],
                return_type="logits_and_cache",
                past_key_values=self.cache,
                attention_mask=window_mask,
                position_ids=position_ids,
            )
        finally:
            self.gate.active = True
        self.end = stop
        return logits[:, -1]

    def prefill(self, prompt_length: int):
        return self._forward(0, prompt_length, "prefill", 0)

    def append(self, chosen: Tensor, live: Tensor) -> None:
        """Write the chosen tokens into the next column (padding for finished rows)."""
        b, column = self.buffers, self.end
        b.ids[:, column] = chosen
        b.mask[:, column] = live.long()
        b.positions[:, column] = torch.where(live, b.n_real, torch.full_like(b.n_real, -1))
        b.n_real += live.long()
        if b.seen is not None:
            b.seen.scatter_add_(1, chosen[:, None], live.long()[:, None])

    def advance(self, step: int):
        """Feed the newest column: one decode step, or a window shift with re-prefill."""
        column = self.end
        if self.window is not None and column + 1 - self.cache_start > self.window:
            self.cache = HookedKVCache(kv_hook_points(self.model))
            self.cache_start = column + 1 - self.keep
            self.n_reprefills += 1
            return self._forward(self.cache_start, column + 1, "reprefill", step)
        return self._forward(column, column + 1, "decode", step)

    def clean_recompute(self, n_tokens: int, step: int) -> None:
        """Recompute the cache entries of the last ``n_tokens`` fed columns with no intervention."""
        n_tokens = min(n_tokens, self.end - self.cache_start)
        self.cache.crop(-n_tokens)
        self._forward(self.end - n_tokens, self.end, "reprefill", step, active=False)
        self.n_clean += 1


def _rows_hitting(stop_strings, generated, tokenizer, finished) -> list[int]:
    if not stop_strings:
        return []
    longest = max(len(s) for s in stop_strings)
    rows = []
    for row, ids in enumerate(generated):
        if finished[row] or not ids:
            continue
        tail = tokenizer.decode(ids[-(longest + 8) :], skip_special_tokens=True)
        if any(s in tail for s in stop_strings):
            rows.append(row)
    return rows


def _decode(tokenizer, ids: list[int], stop_strings: Sequence[str]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cuts = [text.find(s) for s in stop_strings if s in text]
    return text[: min(cuts)] if cuts else text
