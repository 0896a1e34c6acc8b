"""The decoding loop shared by :func:`mechmem.generate` and :class:`mechmem.Session`.

A :class:`Run` owns the token buffers of a batch and the KV cache over a contiguous range of
their columns. It feeds columns to the model with a :class:`StepContext` for the interventions,
slides a window when the cache would outgrow it and recomputes entries cleanly on request.
:func:`decode` prefills a run's new columns, then picks one token per row per step until every row
stops, and returns a :class:`GenerationResult`. A run may start from an existing cache (a stored
prefix, the previous turns of a conversation): only the columns after it are fed.

Example:
    >>> decoding = Decoding(max_new_tokens=8)
    >>> decoding.row_seeds(2)
    [0, 1]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechmem.core.config import is_integer
from mechmem.core.context import Phase, StepContext, position_ids_from_mask
from mechmem.core.hooks import HookSpec, attached
from mechmem.core.intervention import Intervention
from mechmem.core.kv_cache import HookedKVCache, kv_hook_points
from mechmem.core.result import GenerationResult
from mechmem.core.sampling import Sampler
from mechmem.core.tokens import eos_token_ids, pad_token_id


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
class Gate:
    """Shared switch that lets the engine silence every intervention hook at once."""

    active: bool = True

    def wrap(self, fn: Callable) -> Callable:
        def gated(activation, hook):
            return fn(activation, hook=hook) if self.active else None

        return gated


@contextmanager
def intervened(model, interventions: Sequence[Intervention], gate: Gate | None = None):
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


@dataclass(frozen=True)
class Decoding:
    """How to pick tokens and when to stop, validated on construction.

    Attributes are :func:`mechmem.generate`'s keyword arguments of the same names.
    """

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | Sequence[int] = 0
    stop_at_eos: bool = True
    stop_strings: Sequence[str] = ()
    clean_every: int | None = None
    clean_tokens: int | None = None
    callbacks: Sequence[Callback] = ()
    callback_every: int = 100
    progress: bool = False
    return_logits: bool = False

    def __post_init__(self) -> None:
        if not is_integer(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ValueError(
                f"max_new_tokens: must be an integer >= 0, got {self.max_new_tokens!r}"
            )
        if not is_integer(self.callback_every) or self.callback_every < 1:
            raise ValueError(
                f"callback_every: must be an integer >= 1, got {self.callback_every!r}"
            )
        for name in ("clean_every", "clean_tokens"):
            value = getattr(self, name)
            if value is not None and (not is_integer(value) or value < 1):
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        strings = self.stop_strings
        if isinstance(strings, str) or not all(isinstance(s, str) and s for s in strings):
            raise ValueError(f"stop_strings: must be a list of non-empty strings, got {strings!r}")
        for callback in self.callbacks:
            if not callable(callback):
                raise ValueError(f"callbacks: {callback!r} is not callable")
        self.sampler  # noqa: B018 - validates the sampling rule now

    @property
    def sampler(self) -> Sampler:
        return Sampler(
            self.do_sample, self.temperature, self.top_k, self.top_p, self.repetition_penalty
        )

    def row_seeds(self, batch: int) -> list[int]:
        """One sampling seed per row: ``seed + i`` for an int seed, else the list as given."""
        seeds = [self.seed + i for i in range(batch)] if is_integer(self.seed) else list(self.seed)
        if len(seeds) != batch or not all(is_integer(s) for s in seeds):
            raise ValueError(
                f"seed: give an int or one int per prompt ({batch}), got {self.seed!r}"
            )
        return seeds


def check_window(
    model, window: int | None, window_keep: int | None, prompt_length: int, max_new_tokens: int
) -> int:
    """Check a window against the model's context; return the tokens a slide keeps (0: none).

    Example:
        >>> check_window(model, None, None, 10, 20)  # doctest: +SKIP
        0
    """
    n_ctx = int(model.cfg.n_ctx)
    if window is None:
        if prompt_length + max_new_tokens > n_ctx:
            raise ValueError(
                f"prompt ({prompt_length} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's context of {n_ctx}; pass window=W (W <= {n_ctx}) to slide the context"
            )
        return 0
    if not is_integer(window) or not 2 <= window <= n_ctx:
        raise ValueError(f"window: must be an integer in [2, {n_ctx}], got {window!r}")
    keep = window_keep if window_keep is not None else window // 2
    if not is_integer(keep) or not 1 <= keep < window:
        raise ValueError(f"window_keep: must be an integer in [1, {window - 1}], got {keep!r}")
    return keep


@dataclass
class Buffers:
    """Token, mask and absolute-position buffers of a batch, with free columns to generate into.

    ``positions`` holds each column's index in its row's own stream (``-1`` on padding).
    """

    ids: Tensor
    mask: Tensor
    positions: Tensor
    n_real: Tensor
    seen: Tensor | None = None
    generated: list[list[int]] = field(default_factory=list)

    @classmethod
    def of(cls, ids: Tensor, mask: Tensor, filled: int, free: int) -> Buffers:
        """Buffers holding ``filled`` columns of ``ids``/``mask`` and ``free`` empty ones."""
        batch = ids.shape[0]
        ids = torch.cat([ids[:, :filled], ids.new_zeros(batch, free)], dim=1)
        mask = torch.cat([mask[:, :filled], mask.new_zeros(batch, free)], dim=1)
        return cls(
            ids=ids,
            mask=mask,
            positions=position_ids_from_mask(mask),
            n_real=mask[:, :filled].sum(-1),
            generated=[[] for _ in range(batch)],
        )

    def count_seen(self, vocab: int, filled: int) -> None:
        """Start the repetition penalty's per-row token counts from the filled columns."""
        self.seen = torch.zeros(self.ids.shape[0], vocab, dtype=torch.long, device=self.ids.device)
        self.seen.scatter_add_(1, self.ids[:, :filled], self.mask[:, :filled])


class Run:
    """Buffers and the KV cache over columns ``[cache_start, end)`` of one generation.

    Args:
        model: the bridge.
        interventions: their ``begin_step`` is called before every forward pass.
        gate: silences every intervention hook during clean recomputes.
        buffers: the batch's tokens.
        window: sliding window (``None``: none); ``keep`` tokens survive a slide.
        cache: entries of columns ``[cache_start, end)`` already computed (default: empty).
    """

    def __init__(
        self,
        model,
        interventions,
        gate: Gate,
        buffers: Buffers,
        window: int | None = None,
        keep: int = 0,
        cache: HookedKVCache | None = None,
        cache_start: int = 0,
        end: int = 0,
    ) -> None:
        self.model = model
        self.interventions = interventions
        self.gate = gate
        self.buffers = buffers
        self.window = window
        self.keep = keep
        self.cache = cache if cache is not None else HookedKVCache(kv_hook_points(model))
        self.cache_start = cache_start  # first buffer column held in the cache
        self.end = end  # one past the last buffer column fed to the model
        self._offset = buffers.mask[:, :cache_start].sum(-1, keepdim=True)
        self.n_reprefills = 0
        self.n_clean = 0

    def _restart_cache(self, column: int) -> None:
        """Drop the cache; the next forward refills it from ``column`` (position id 0)."""
        self.cache = HookedKVCache(kv_hook_points(self.model))
        self.cache_start = column
        self._offset = self.buffers.mask[:, :column].sum(-1, keepdim=True)

    def _forward(self, start: int, stop: int, phase: Phase, step: int, active: bool = True):
        b = self.buffers
        # Real tokens before the cache start shift the model's positions; padding reads as 0.
        position_ids = (b.positions[:, start:stop] - self._offset).clamp(min=0)
        context = StepContext(
            phase=phase,
            step=step,
            positions=b.positions[:, start:stop],
            position_ids=position_ids,
            attention_mask=b.mask[:, self.cache_start : stop],
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
                attention_mask=context.attention_mask,
                position_ids=position_ids,
            )
        finally:
            self.gate.active = True
        self.end = stop
        return logits

    def prefill(self, start: int, stop: int):
        """Feed columns ``[start, stop)`` after the cached ones; all logits ``[batch, new, vocab]``.

        With a window, a cache that would outgrow it restarts so that it holds the new columns and
        at least ``keep`` columns in all.
        """
        if self.window is not None and stop - self.cache_start > self.window:
            self._restart_cache(stop - max(self.keep, stop - start))
            self.n_reprefills += int(self.cache_start < start)  # older columns were re-fed
            return self._forward(self.cache_start, stop, "prefill", 0)[:, start - stop :]
        return self._forward(start, stop, "prefill", 0)

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
            self._restart_cache(column + 1 - self.keep)
            self.n_reprefills += 1
            return self._forward(self.cache_start, column + 1, "reprefill", step)[:, -1]
        return self._forward(column, column + 1, "decode", step)[:, -1]

    def clean_recompute(self, n_tokens: int, step: int) -> None:
        """Recompute the cache entries of the last ``n_tokens`` fed columns with no intervention."""
        n_tokens = min(n_tokens, self.end - self.cache_start)
        self.cache.crop(-n_tokens)
        self._forward(self.end - n_tokens, self.end, "reprefill", step, active=False)
        self.n_clean += 1


def decode(run: Run, decoding: Decoding, start: int, stop: int, tokenizer) -> GenerationResult:
    """Prefill columns ``[start, stop)`` of ``run``, then generate as ``decoding`` says.

    The caller has attached the interventions' hooks (through ``run.gate``) and fills in the
    result's prompts. Exactly one device-to-host copy per step (the chosen tokens and stop flags).
    """
    model, buffers = run.model, run.buffers
    batch = buffers.ids.shape[0]
    device = buffers.ids.device
    sampler = decoding.sampler
    generators = [torch.Generator(device=device).manual_seed(s) for s in decoding.row_seeds(batch)]
    pad_id = pad_token_id(tokenizer)
    eos_ids = torch.tensor(sorted(eos_token_ids(model, tokenizer)), device=device)
    check_eos = decoding.stop_at_eos and len(eos_ids) > 0
    if decoding.repetition_penalty != 1.0:
        buffers.count_seen(int(model.cfg.d_vocab), stop)

    result = GenerationResult()
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    done = [False] * batch
    reasons = ["length"] * batch
    step_logits: list[Tensor] = []
    began = time.perf_counter()
    bar = tqdm(total=decoding.max_new_tokens, disable=not decoding.progress, desc="generate")
    reported = -1

    def report(step: int) -> None:
        nonlocal reported
        reported = step
        info = Progress(step, buffers.generated, tokenizer, time.perf_counter() - began)
        for callback in decoding.callbacks:
            entry = callback(info)
            if entry is not None:
                result.logs.append(entry)

    with torch.no_grad():
        if decoding.max_new_tokens:
            logits = run.prefill(start, stop)[:, -1]
        for step in range(decoding.max_new_tokens):
            if decoding.return_logits:
                step_logits.append(logits.float().cpu())
            chosen = sampler.pick(logits, generators, buffers.seen)
            chosen = torch.where(finished, torch.full_like(chosen, pad_id), chosen)
            run.append(chosen, ~finished)
            hit = (
                torch.isin(chosen, eos_ids) & ~finished if check_eos else torch.zeros_like(finished)
            )
            finished |= hit
            tokens, hits = torch.stack([chosen, hit.long()]).tolist()  # the step's one sync
            for row in range(batch):
                if not done[row]:
                    buffers.generated[row].append(tokens[row])
                    if hits[row]:
                        reasons[row], done[row] = "eos", True
            for row in _rows_hitting(decoding.stop_strings, buffers.generated, tokenizer, done):
                reasons[row], done[row] = "stop_string", True
                finished[row] = True
            bar.update(1)
            if (step + 1) % decoding.callback_every == 0:
                report(step + 1)
            if all(done) or step + 1 == decoding.max_new_tokens:
                break
            if decoding.clean_every is not None and (step + 1) % decoding.clean_every == 0:
                run.clean_recompute(decoding.clean_tokens or decoding.clean_every, step + 1)
            logits = run.advance(step + 1)
    bar.close()
    result.elapsed_s = time.perf_counter() - began
    steps_done = max(len(g) for g in buffers.generated)
    if decoding.callbacks and reported != steps_done:
        report(steps_done)
    result.tokens = buffers.generated
    result.text = [_decode(tokenizer, g, decoding.stop_strings) for g in buffers.generated]
    result.stop_reasons = reasons
    result.n_reprefills = run.n_reprefills
    result.n_clean_recomputes = run.n_clean
    if decoding.return_logits and step_logits:
        result.logits = torch.stack(step_logits, dim=1)
    return result


def _rows_hitting(stop_strings, generated, tokenizer, done: list[bool]) -> list[int]:
    if not stop_strings:
        return []
    longest = max(len(s) for s in stop_strings)
    rows = []
    for row, ids in enumerate(generated):
        if done[row] or not ids:
            continue
        tail = tokenizer.decode(ids[-(longest + 8) :], skip_special_tokens=True)
        if any(s in tail for s in stop_strings):
            rows.append(row)
    return rows


def _decode(tokenizer, ids: list[int], stop_strings: Sequence[str]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cuts = [text.find(s) for s in stop_strings if s in text]
    return text[: min(cuts)] if cuts else text
