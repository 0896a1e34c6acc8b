"""Interventions on a bridge for a ``with`` block, so plain TransformerLens calls see them.

Inside ``applied(model, interventions)``, ``model(tokens)``, ``model.run_with_cache(tokens)`` and
other libraries' probes run with the interventions' hooks attached. Every forward pass first hands
each intervention a prefill :class:`~mechmem.core.context.StepContext` built from its input:
absolute positions from 0 (after any ``past_key_values``), or from ``attention_mask`` when one is
passed. When an intervention hooks mechmem's full key/value points and the call brings no cache,
a :class:`~mechmem.core.kv_cache.HookedKVCache` is supplied so that those points fire, exactly as
in :func:`mechmem.forward`. Everything is removed on exit, exceptions included.

Example:
    >>> with applied(model, [mechmem.Steer(layer=3, scale=4.0)]):    # doctest: +SKIP
    ...     logits, cache = model.run_with_cache(tokens)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from mechmem.core.context import StepContext
from mechmem.core.decoding import intervened
from mechmem.core.engine import check_interventions
from mechmem.core.intervention import Intervention, as_intervention_list
from mechmem.core.kv_cache import HookedKVCache, kv_hook_points


@contextmanager
def applied(
    model,
    interventions: Intervention | Sequence[Intervention],
    *,
    reset: bool = True,
) -> Iterator[None]:
    """Attach ``interventions`` to ``model`` for the block (validated first; reset unless
    ``reset=False``), publishing a :class:`StepContext` before every forward pass.

    Example:
        >>> with applied(model, drugs):          # doctest: +SKIP
        ...     logits = model(tokens)
    """
    items = as_intervention_list(interventions)
    check_interventions(model, items)
    kv_points = kv_hook_points(model).points
    needs_kv_cache = any(name in kv_points for item in items for name, _ in item.hooks(model))
    if reset:
        for item in items:
            item.reset(torch.device(model.cfg.device))
    inner = model.forward

    def forward(*args, **kwargs):
        tokens = args[0] if args else kwargs.get("input")
        if not isinstance(tokens, Tensor):
            tokens = model.to_tokens(tokens, prepend_bos=kwargs.get("prepend_bos"))
        if tokens.ndim == 1:
            tokens = tokens[None]
        cache = kwargs.get("past_key_values")
        for item in items:
            item.begin_step(_context(tokens, kwargs.get("attention_mask"), cache))
        if needs_kv_cache and cache is None:
            kwargs["past_key_values"] = HookedKVCache(kv_hook_points(model))
        return inner(*args, **kwargs)

    shadowed = model.__dict__.get("forward")
    model.forward = forward  # run_with_cache calls self.forward, not __call__
    try:
        with intervened(model, items):
            yield
    finally:
        if shadowed is None:
            del model.forward
        else:
            model.forward = shadowed


def _context(tokens: Tensor, attention_mask: Tensor | None, cache) -> StepContext:
    """The prefill context of ``tokens`` after ``cache``'s entries (mask over both when given)."""
    batch, new = tokens.shape
    cached = cache.get_seq_length() if cache is not None else 0
    if attention_mask is None:
        attention_mask = torch.ones(batch, cached + new, dtype=torch.long, device=tokens.device)
    context = StepContext.for_prefill(attention_mask)
    return StepContext(
        phase="prefill",
        step=0,
        positions=context.positions[:, -new:],
        position_ids=context.position_ids[:, -new:],
        attention_mask=attention_mask,
        cache_length=attention_mask.shape[1] - new,
    )
