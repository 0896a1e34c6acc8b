"""A KV cache that exposes the full (cached + new) keys and values through HookPoints.

TransformerLens' ``hook_k`` / ``hook_v`` / ``hook_rot_k`` see only the new positions, and what
they return is written into the cache. Methods that must act on every cached position at every
step (DRµGS key/value noise) need a hook on the full set that does **not** dirty the cache.
:class:`HookedKVCache` stores the clean new entries as usual, then passes the concatenated keys
and values of layer ``l`` through ``blocks.{l}.attn.hook_k_cached`` and
``blocks.{l}.attn.hook_v_cached`` (shape ``[batch, pos, n_kv_heads, d_head]``, keys after
RoPE) and hands the hooked result to attention without storing it.

Example:
    >>> points = kv_hook_points(model)          # doctest: +SKIP
    >>> cache = HookedKVCache(points)            # doctest: +SKIP
    >>> model(tokens, return_type="logits_and_cache", past_key_values=cache)  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from transformer_lens.hook_points import HookPoint
from transformers import DynamicCache

KV_SITES = ("k_cached", "v_cached")


def kv_hook_name(layer: int, site: str) -> str:
    """Name of mechmem's full-KV hook point for ``layer`` and ``site`` (``k_cached``/``v_cached``).

    Example:
        >>> kv_hook_name(3, "k_cached")
        'blocks.3.attn.hook_k_cached'
    """
    return f"blocks.{layer}.attn.hook_{site}"


class KVHookPoints:
    """The full-KV HookPoints of one model, two per layer, named as :func:`kv_hook_name` says."""

    def __init__(self, n_layers: int) -> None:
        self.points = {
            kv_hook_name(layer, site): HookPoint() for layer in range(n_layers) for site in KV_SITES
        }
        for name, point in self.points.items():
            point.name = name


def kv_hook_points(model) -> KVHookPoints:
    """The model's full-KV hook points, made once per model and kept on it.

    Example:
        >>> "blocks.0.attn.hook_k_cached" in kv_hook_points(model).points  # doctest: +SKIP
        True
    """
    points = model.__dict__.get("_mechmem_kv_points")
    if points is None:
        points = KVHookPoints(model.cfg.n_layers)
        model.__dict__["_mechmem_kv_points"] = points
    return points


class HookedKVCache(DynamicCache):
    """A ``DynamicCache`` whose returned keys/values pass through full-KV HookPoints."""

    def __init__(self, points: KVHookPoints) -> None:
        super().__init__()
        self.hook_points = points

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        return (
            self._through(keys, kv_hook_name(layer_idx, "k_cached")),
            self._through(values, kv_hook_name(layer_idx, "v_cached")),
        )

    @classmethod
    def of(cls, points: KVHookPoints, entries) -> HookedKVCache:
        """A cache holding ``entries``: ``(keys, values)`` per layer, ``[batch, kv_heads, pos, d]``.

        Example:
            >>> cache = HookedKVCache.of(points, old.entries())  # doctest: +SKIP
        """
        cache = cls(points)
        for index, (keys, values) in enumerate(entries):
            DynamicCache.update(cache, keys, values, index)
        return cache

    def copy(self, batch: int = 1) -> HookedKVCache:
        """A new cache with these entries, each repeated ``batch`` times along the batch axis.

        The copy shares this cache's tensors as read-only views: ``update`` concatenates and
        ``crop`` slices, so nothing the copy does writes into this cache.

        Example:
            >>> rows = prefix_cache.copy(batch=4)  # doctest: +SKIP
        """
        shape = (batch, -1, -1, -1)
        entries = [(keys.expand(shape), values.expand(shape)) for keys, values in self.entries()]
        return HookedKVCache.of(self.hook_points, entries)

    def entries(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(keys, values)`` of every layer, HF layout ``[batch, kv_heads, pos, d_head]``."""
        return [(layer.keys, layer.values) for layer in self.layers if layer.is_initialized]

    def _through(self, states: torch.Tensor, name: str) -> torch.Tensor:
        point = self.hook_points.points.get(name)
        if point is None or not point._forward_hooks:
            return states
        # HF layout [batch, heads, pos, d_head] <-> TL layout [batch, pos, heads, d_head].
        return point(states.transpose(1, 2)).transpose(1, 2)
