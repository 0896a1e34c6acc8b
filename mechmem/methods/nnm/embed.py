"""KV-Embedding (arXiv:2601.01046): a training-free text embedding from a decoder's own states,
and the hidden-state baselines it is compared with.

Each text is wrapped in a compression prompt (:func:`compression_prompt`), e.g.
``"Context: <text>" Compress the context in one word:``, and run twice:

1. **Pass 1** keeps, at each selected layer, the key and value the prompt's last token writes.
2. **Pass 2** runs the same tokens with one extra key/value slot in front: at the selected layers
   the slot holds pass 1's last-token key and value and every real query gets ``+prefix_bias``
   on its attention score toward it; at every other layer the slot is masked out, so those
   layers compute exactly what pass 1 did. The embedding is the L2-normalised sum of the last
   token's and the mean-pooled final-layer states of pass 2.

How it is built: pass 2 feeds one placeholder column before the (left-padded) prompt. Its key
and value are overwritten through mechmem's full-KV hook points
(``blocks.{l}.attn.hook_k_cached`` / ``hook_v_cached``, :mod:`mechmem.core.kv_cache`), and
``blocks.{l}.attn.hook_attn_scores`` adds the bias at the selected layers and masks the column
(for every query but the placeholder's own) at the others. The real tokens keep pass 1's
position ids, so their own attention is unchanged.

**RoPE.** The key read at ``hook_k_cached`` is already rotated, at the last token's position
``n - 1``; the slot keeps that rotation. A query at position ``i`` therefore sees the slot at
relative distance ``i - (n - 1)``: the last token meets it at distance 0, as it met its own key in
pass 1, and the slot is not re-rotated to a made-up front position. (GPT-2 has no RoPE; the
slot's key is pass 1's key as it was.)

**Final-layer states** are the output of the model's final norm (what HF returns as the last
hidden state), read at ``ln_final.hook_normalized``; the forward stops there (the unembedding
is not needed). Mean pooling leaves out each prompt's first token, the attention sink (see
:mod:`mechmem.probes.id_profile`), and every padded column; padding is on the left, so the last
column is every row's last real token.

Every function returns a float32 CPU ``torch.Tensor`` ``[n, d_model]`` with unit rows, in the
order of ``texts``. Texts are sorted by length into batches (less padding) and put back in order.

Example:
    >>> docs = embed(model, ["Paris is in France."], layers=[12, 13, 14])  # doctest: +SKIP
    >>> docs.shape, float(docs.norm())                                     # doctest: +SKIP
    (torch.Size([1, 576]), 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechmem.core.config import is_integer
from mechmem.core.context import StepContext
from mechmem.core.hooks import attached
from mechmem.core.intervention import Intervention
from mechmem.core.kv_cache import HookedKVCache, kv_hook_name, kv_hook_points
from mechmem.core.tokens import (
    check_token_ids,
    encode_prompts,
    hf_tokenizer,
    left_pad,
    pad_token_id,
)

Role = Literal["context", "query"]
ROLES: tuple[str, ...] = ("context", "query")
FINAL = "ln_final.hook_normalized"
SKIP_FIRST = 1  # the attention sink, left out of mean pooling


def compression_prompt(text: str, role: Role) -> str:
    """``text`` wrapped in KV-Embedding's compression prompt for ``role``.

    Example:
        >>> compression_prompt("Cats purr.", "query")
        '"Query: Cats purr." Compress the query in one word:'
    """
    check_role(role)
    return f'"{role.capitalize()}: {text}" Compress the {role} in one word:'


def check_role(role) -> None:
    if role not in ROLES:
        raise ValueError(f"role: must be one of {list(ROLES)}, got {role!r}")


@dataclass
class Encodings:
    """What the two passes give, each ``[n, d_model]`` with unit rows.

    Attributes:
        kv: KV-Embedding (pass 2, last + mean); ``None`` when no layer was re-routed.
        mean: pass 1's mean-pooled states at the baseline layer.
        last: pass 1's last-token state at the baseline layer.
        pooled: pass 1's last + mean at the baseline layer: KV-Embedding without the re-routing
            when the baseline layer is the final one.
    """

    kv: Tensor | None
    mean: Tensor
    last: Tensor
    pooled: Tensor


class _Stop(Exception):
    """Raised by the final-state hook: nothing after the final norm is needed."""


def encode(
    model,
    texts: Sequence[str],
    *,
    role: Role | None = "context",
    layers: Sequence[int] = (),
    prefix_bias: float = 1.0,
    baseline_layer: int | None = None,
    batch_size: int = 16,
    max_tokens: int | None = None,
    progress: bool = False,
) -> Encodings:
    """KV-Embedding and the hidden-state baselines of ``texts``, sharing pass 1.

    Args:
        role: ``"context"`` (documents) or ``"query"``; ``None`` embeds the plain text without
            the compression prompt (only without ``layers``: KV-Embedding needs the prompt).
        layers: the re-routed layers; empty skips pass 2 (``kv`` is then ``None``).
        prefix_bias: added to every real query's attention score toward the prepended slot;
            ``-inf`` masks the slot, which gives back ``pooled``.
        baseline_layer: where ``mean``/``last`` are read: ``None`` for the final norm's output,
            an integer for ``blocks.{layer}.hook_resid_post``.
        max_tokens: cut each text to its first ``max_tokens`` tokens before it is wrapped (the
            prompt's instruction is never cut).

    Example:
        >>> out = encode(model, ["a b c", "d e"], layers=[1])  # doctest: +SKIP
        >>> out.kv.shape, out.mean.shape                        # doctest: +SKIP
        (torch.Size([2, 64]), torch.Size([2, 64]))
    """
    no_layers = isinstance(layers, (list, tuple, range)) and len(layers) == 0
    layer_sets = [] if no_layers else [layers]  # anything else is checked as a layer list
    kvs, encodings = encode_layer_sets(
        model,
        texts,
        layer_sets,
        role=role,
        prefix_bias=prefix_bias,
        baseline_layer=baseline_layer,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=progress,
    )
    encodings.kv = kvs[0] if kvs else None
    return encodings


def encode_layer_sets(
    model,
    texts: Sequence[str],
    layer_sets: Sequence[Sequence[int]],
    *,
    role: Role | None = "context",
    prefix_bias: float = 1.0,
    baseline_layer: int | None = None,
    batch_size: int = 16,
    max_tokens: int | None = None,
    progress: bool = False,
) -> tuple[list[Float[Tensor, "n d"]], Encodings]:
    """KV-Embedding of ``texts`` for each set of re-routed layers (one pass 2 per set, one
    shared pass 1), and the baselines (``kv`` left ``None``); used by layer sweeps.

    Example:
        >>> kvs, base = encode_layer_sets(model, texts, [[3], [4], [5]])  # doctest: +SKIP
        >>> len(kvs)                                                      # doctest: +SKIP
        3
    """
    if isinstance(layer_sets, (int, str)) or not isinstance(layer_sets, Sequence):
        raise ValueError(f"layer_sets: give a list of layer lists, got {layer_sets!r}")
    sets = [_check_layers(model, layers, role) for layers in layer_sets]
    _check_args(model, texts, role, prefix_bias, baseline_layer, batch_size, max_tokens)
    ids = _prompt_ids(model, texts, role, max_tokens)
    union = sorted({layer for layers in sets for layer in layers})
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    kvs: list[list[Tensor]] = [[] for _ in sets]
    means, lasts = [], []
    starts = range(0, len(order), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="embed", disable=not progress, unit="batch"):
            batch = [ids[i] for i in order[start : start + batch_size]]
            keys, values, mean, last = _pass_one(model, batch, union, baseline_layer)
            means.append(mean)
            lasts.append(last)
            for parts, layers in zip(kvs, sets):
                parts.append(_pass_two(model, batch, layers, prefix_bias, keys, values))
    inverse = torch.argsort(torch.tensor(order))
    mean, last = torch.cat(means)[inverse], torch.cat(lasts)[inverse]
    encodings = Encodings(kv=None, mean=_unit(mean), last=_unit(last), pooled=_unit(mean + last))
    return [_unit(torch.cat(parts)[inverse]) for parts in kvs], encodings


def embed(
    model,
    texts: Sequence[str],
    *,
    role: Role = "context",
    layers: Sequence[int],
    prefix_bias: float = 1.0,
    batch_size: int = 16,
    max_tokens: int | None = None,
    progress: bool = False,
) -> Float[Tensor, "n d"]:
    """KV-Embedding of ``texts``: ``[n, d_model]`` float32, unit rows (see the module docs).

    Example:
        >>> q = embed(model, ["Do cats purr?"], role="query", layers=[13, 14, 15])  # doctest: +SKIP
    """
    kvs, _ = encode_layer_sets(
        model,
        texts,
        [layers],
        role=role,
        prefix_bias=prefix_bias,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=progress,
    )
    return kvs[0]


def hidden_state_embeddings(
    model,
    texts: Sequence[str],
    *,
    role: Role | None = None,
    layer: int | None = None,
    batch_size: int = 16,
    max_tokens: int | None = None,
    progress: bool = False,
) -> dict[str, Float[Tensor, "n d"]]:
    """The baselines from one forward: ``{"mean": ..., "last": ...}``, unit rows, of the plain
    text (``role=None``) or of its compression prompt, at ``layer`` (``None``: the final norm).

    Example:
        >>> base = hidden_state_embeddings(model, ["a b c"], layer=5)  # doctest: +SKIP
        >>> sorted(base)                                               # doctest: +SKIP
        ['last', 'mean']
    """
    out = encode(
        model,
        texts,
        role=role,
        baseline_layer=layer,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=progress,
    )
    return {"mean": out.mean, "last": out.last}


def _check_layers(model, layers, role) -> list[int]:
    if isinstance(layers, (int, str)) or not isinstance(layers, Sequence) or not layers:
        raise ValueError(f"layers: give a non-empty list of layer indices, got {layers!r}")
    for layer in layers:
        Intervention.check_layer(model, layer, "layers")
    if role is None:
        raise ValueError(
            "role: KV-Embedding needs the compression prompt; give 'context' or 'query'"
        )
    return sorted(set(layers))


def _check_args(model, texts, role, prefix_bias, baseline_layer, batch_size, max_tokens):
    if isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) == 0:
        raise ValueError("texts: give a non-empty list of texts")
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"texts[{index}]: expected a non-empty string, got {text!r}")
    if role is not None:
        check_role(role)
    if isinstance(prefix_bias, bool) or not isinstance(prefix_bias, (int, float)):
        raise ValueError(f"prefix_bias: must be a number, got {prefix_bias!r}")
    if prefix_bias != prefix_bias or prefix_bias == float("inf"):
        raise ValueError(f"prefix_bias: must be finite or -inf, got {prefix_bias!r}")
    if baseline_layer is not None:
        Intervention.check_layer(model, baseline_layer, "baseline_layer")
    if not is_integer(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    if max_tokens is not None and (not is_integer(max_tokens) or max_tokens < 1):
        raise ValueError(f"max_tokens: must be an integer >= 1 or None, got {max_tokens!r}")


def prompt_texts(
    model, texts: Sequence[str], role: Role | None, max_tokens: int | None = None
) -> list[str]:
    """``texts`` cut to ``max_tokens`` tokens and wrapped in the compression prompt of ``role``
    (``None``: left as they are), exactly as :func:`encode` feeds them.

    Example:
        >>> prompt_texts(model, ["Cats purr."], "context")  # doctest: +SKIP
        ['"Context: Cats purr." Compress the context in one word:']
    """
    if max_tokens is not None:
        tokenizer = hf_tokenizer(model)
        texts = [_cut(tokenizer, text, max_tokens) for text in texts]
    return list(texts) if role is None else [compression_prompt(t, role) for t in texts]


def _prompt_ids(model, texts, role, max_tokens) -> list[list[int]]:
    """Token ids of every (cut, wrapped) text, as the model's tokenizer writes them."""
    ids = encode_prompts(hf_tokenizer(model), prompt_texts(model, texts, role, max_tokens))
    check_token_ids(ids, int(model.cfg.d_vocab))
    short = [i for i, row in enumerate(ids) if len(row) <= SKIP_FIRST]
    if short:
        raise ValueError(f"texts {short[:5]}: a single token leaves nothing to mean-pool")
    return ids


def _cut(tokenizer, text: str, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def _unit(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)


def _positions(mask: Tensor) -> Tensor:
    return StepContext.for_prefill(mask).position_ids


def _run(model, tokens, mask, positions, hooks) -> None:
    """One forward with ``hooks`` (the final-state hook raises :class:`_Stop` after the norm)."""
    cache = HookedKVCache(kv_hook_points(model))
    with attached(model, hooks):
        try:
            model(
                tokens,
                return_type="logits",
                past_key_values=cache,
                attention_mask=mask,
                position_ids=positions,
            )
        except _Stop:
            return
    raise RuntimeError("the final-state hook did not fire")  # pragma: no cover


def _pool(states: Float[Tensor, "b pos d"], mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over real tokens after each row's first, and the last column (the last token)."""
    weights = (StepContext.for_prefill(mask).positions >= SKIP_FIRST).float()[..., None]
    mean = (states * weights).sum(1) / weights.sum(1)
    return mean.cpu(), states[:, -1].cpu()


def _final_hook(store: dict, name: str, stop: bool):
    def keep(activation, hook):
        store[name] = activation.detach().float()
        if stop:
            raise _Stop

    return keep


def _pass_one(model, batch, layers, baseline_layer):
    """Pass 1: the last token's key/value per selected layer and the baseline's pooled states."""
    device = model.cfg.device
    tokens, mask = left_pad(batch, pad_token_id(hf_tokenizer(model)))
    tokens, mask = tokens.to(device), mask.to(device)
    seen: dict[str, Tensor] = {}

    def last_column(activation, hook):
        seen[hook.name] = activation[:, -1].detach().clone()

    hooks = [
        (kv_hook_name(layer, site), last_column)
        for layer in layers
        for site in ("k_cached", "v_cached")
    ]
    base = FINAL if baseline_layer is None else f"blocks.{baseline_layer}.hook_resid_post"
    hooks.append((base, _final_hook(seen, "base", stop=baseline_layer is None)))
    if baseline_layer is not None:
        hooks.append((FINAL, _final_hook(seen, "end", stop=True)))
    _run(model, tokens, mask, _positions(mask), hooks)
    mean, last = _pool(seen["base"], mask)
    keys = {layer: seen[kv_hook_name(layer, "k_cached")] for layer in layers}
    values = {layer: seen[kv_hook_name(layer, "v_cached")] for layer in layers}
    return keys, values, mean, last


def _pass_two(model, batch, layers, prefix_bias, keys, values) -> Tensor:
    """Pass 2: one slot in front holding pass 1's last-token key/value at ``layers``;
    returns the un-normalised last + mean of the final states."""
    device = model.cfg.device
    pad = pad_token_id(hf_tokenizer(model))
    tokens, mask = left_pad(batch, pad)
    tokens, mask = tokens.to(device), mask.to(device)
    positions = _positions(mask)
    slot = torch.ones_like(mask[:, :1])
    tokens2 = torch.cat([torch.full_like(slot, pad), tokens], 1)
    mask2 = torch.cat([slot, mask], 1)
    positions2 = torch.cat([torch.zeros_like(slot), positions], 1)
    seen: dict[str, Tensor] = {}
    routed = set(layers)

    def put(stored: dict[int, Tensor]):
        def hook(activation, hook):  # [batch, pos, kv_heads, d_head]
            layer = int(hook.name.split(".")[1])
            out = activation.clone()
            out[:, 0] = stored[layer].to(out.dtype)
            return out

        return hook

    def scores(activation, hook):  # [batch, heads, q, k]; column 0 is the slot
        out = activation.clone()
        if int(hook.name.split(".")[1]) in routed:
            out[:, :, 1:, 0] += prefix_bias
        else:
            out[:, :, 1:, 0] = torch.finfo(out.dtype).min
        return out

    hooks = [(kv_hook_name(layer, "k_cached"), put(keys)) for layer in layers]
    hooks += [(kv_hook_name(layer, "v_cached"), put(values)) for layer in layers]
    hooks += [
        (f"blocks.{layer}.attn.hook_attn_scores", scores) for layer in range(model.cfg.n_layers)
    ]
    hooks.append((FINAL, _final_hook(seen, "final", stop=True)))
    _run(model, tokens2, mask2, positions2, hooks)
    mean, last = _pool(seen["final"][:, 1:], mask)
    return mean + last
