"""A copy of one layer's attention as a multi-head attention over any keys and values.

:class:`SeededAttention` reads a layer's weights through the bridge's own accessors
(``W_Q``, ``W_K``, ``W_V``, ``W_O`` and the biases, which cover separate q/k/v projections,
GPT-2's fused ``c_attn`` and GPT-NeoX's fused ``query_key_value`` alike) and keeps them as a
plain multi-head attention: query and output weights copied, key and value weights expanded
from the model's key/value heads to its query heads in the model's own grouping order (query
head ``h`` reads key/value head ``h // (H / H_kv)``, as ``repeat_kv`` does). Rotary positions,
when asked for, are the model's own (its rotary embedding module, on the first ``rotary_dim``
dimensions of each head). Fed the layer's own normed input with a causal mask and rotary
positions, it reproduces the layer's attention output; the continuity stream
(:mod:`mechmem.methods.continuity`) feeds it a memory instead.

Example:
    >>> attention = SeededAttention.of(model, layer=2)                 # doctest: +SKIP
    >>> rotation = attention.rotation(position_ids, x)                  # doctest: +SKIP
    >>> q, k, v = attention.project(x, rotation)                        # doctest: +SKIP
    >>> out = attention.attend(q, k, v, causal_mask)                    # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

ROTARY_TYPES = ("rotary",)
UNROTATED_TYPES = ("standard",)  # positions are in the residual stream already (GPT-2)


@dataclass
class SeededAttention:
    """One layer's attention weights as an ``H``-head attention (see the module docs).

    Attributes:
        w_qkv: ``[d_model, 3 * H * d_head]``, the query, key and value projections side by side
            (key and value expanded; :attr:`w_q`, :attr:`w_k`, :attr:`w_v` are views of it).
        b_qkv: ``[3 * H * d_head]`` biases (zeros where the model has none).
        w_o: ``[H * d_head, d_model]``; b_o: ``[d_model]``.
        n_heads, d_head: query heads and their size.
        scale: the layer's softmax scale.
        rotary: the model's rotary embedding module (``None``: no rotary positions).
    """

    w_qkv: Tensor
    b_qkv: Tensor
    w_o: Tensor
    b_o: Tensor
    n_heads: int
    d_head: int
    scale: float
    rotary: Any = None

    @classmethod
    def of(cls, model, layer: int) -> SeededAttention:
        """Seed from ``model``'s attention at ``layer``; ``ValueError`` if its weights cannot be
        read as a (grouped-query) multi-head attention."""
        attention = model.blocks[layer].attn
        try:
            w_q, w_k, w_v, w_o = (attention.W_Q, attention.W_K, attention.W_V, attention.W_O)
            biases = (attention.b_Q, attention.b_K, attention.b_V, attention.b_O)
        except Exception as error:  # any accessor failure means: not readable
            raise ValueError(
                f"layer {layer}: cannot read this model's attention weights "
                f"({type(error).__name__}: {error})"
            ) from error
        tensors = (w_q, w_k, w_v, w_o)
        if not all(isinstance(t, Tensor) and t.ndim == 3 for t in tensors):
            raise ValueError(
                f"layer {layer}: the attention weights are not [heads, d_model, d_head] tensors"
            )
        n_heads, d_model, d_head = w_q.shape
        n_kv = w_k.shape[0]
        if (
            w_k.shape != w_v.shape
            or w_k.shape[1:] != (d_model, d_head)
            or w_o.shape != (n_heads, d_head, d_model)
            or n_heads % n_kv
        ):
            raise ValueError(
                f"layer {layer}: attention weights of shapes Q {tuple(w_q.shape)}, "
                f"K {tuple(w_k.shape)}, V {tuple(w_v.shape)}, O {tuple(w_o.shape)} are not a "
                "grouped-query multi-head attention"
            )
        original = attention.original_component
        for unsupported in ("attn_logit_softcapping", "sliding_window"):
            if getattr(original, unsupported, None) is not None:
                raise ValueError(
                    f"layer {layer}: attention with {unsupported} is not supported by the "
                    "seeded copy"
                )
        scale = getattr(original, "scaling", None)
        if scale is None:
            scale = d_head**-0.5
        if getattr(original, "scale_attn_by_inverse_layer_idx", False):
            scale = scale / (layer + 1)
        rep = n_heads // n_kv

        def inputs(weight: Tensor, heads_first: int) -> Tensor:
            # [heads, d_model, d_head] -> [d_model, H * d_head], heads repeated in grouping order
            weight = weight.detach().repeat_interleave(heads_first, dim=0)
            return weight.permute(1, 0, 2).reshape(d_model, n_heads * d_head)

        def bias(value: Tensor | None, heads_first: int) -> Tensor:
            if value is None:
                return w_q.new_zeros(n_heads * d_head)
            return value.detach().repeat_interleave(heads_first, dim=0).reshape(-1)

        b_q, b_k, b_v, b_o = biases
        return cls(
            w_qkv=torch.cat([inputs(w_q, 1), inputs(w_k, rep), inputs(w_v, rep)], dim=1),
            b_qkv=torch.cat([bias(b_q, 1), bias(b_k, rep), bias(b_v, rep)]),
            w_o=w_o.detach().reshape(n_heads * d_head, d_model),
            b_o=w_q.new_zeros(d_model) if b_o is None else b_o.detach().reshape(d_model),
            n_heads=n_heads,
            d_head=d_head,
            scale=float(scale),
            rotary=rotary_module(model),
        )

    def _part(self, tensor: Tensor, index: int) -> Tensor:
        width = self.n_heads * self.d_head
        return tensor[..., index * width : (index + 1) * width]

    @property
    def w_q(self) -> Tensor:
        return self._part(self.w_qkv, 0)

    @property
    def w_k(self) -> Tensor:
        return self._part(self.w_qkv, 1)

    @property
    def w_v(self) -> Tensor:
        return self._part(self.w_qkv, 2)

    def rotation(
        self, position_ids: Int[Tensor, "batch pos"], like: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        """The model's rotary ``(cos, sin)`` at ``position_ids`` (``None`` for a model without
        rotary positions), shaped to rotate ``[batch, H, pos, d_head]`` states."""
        if self.rotary is None:
            return None
        cos, sin = self.rotary(like, position_ids)
        return cos[:, None].to(like.dtype), sin[:, None].to(like.dtype)

    def _heads(self, projected: Float[Tensor, "batch pos hd"]) -> Float[Tensor, "batch H pos d"]:
        batch, pos, _ = projected.shape
        return projected.view(batch, pos, self.n_heads, self.d_head).transpose(1, 2)

    @staticmethod
    def _rotate(states: Tensor, rotation: tuple[Tensor, Tensor] | None) -> Tensor:
        return states if rotation is None else apply_rotary(states, *rotation)

    def queries(
        self, x: Float[Tensor, "batch pos d_model"], rotation: tuple[Tensor, Tensor] | None
    ) -> Float[Tensor, "batch H pos d_head"]:
        """Queries of ``x``, rotated by ``rotation`` (``None``: not rotated)."""
        return self._rotate(self._heads(x @ self.w_q + self._part(self.b_qkv, 0)), rotation)

    def keys_values(
        self, x: Float[Tensor, "batch pos d_model"], rotation: tuple[Tensor, Tensor] | None
    ) -> tuple[Float[Tensor, "batch H pos d_head"], Float[Tensor, "batch H pos d_head"]]:
        """Keys (rotated by ``rotation`` unless ``None``) and values of ``x``."""
        keys = self._rotate(self._heads(x @ self.w_k + self._part(self.b_qkv, 1)), rotation)
        return keys, self._heads(x @ self.w_v + self._part(self.b_qkv, 2))

    def project(
        self, x: Float[Tensor, "batch pos d_model"], rotation: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of ``x`` in one matrix product (queries and keys rotated)."""
        projected = x @ self.w_qkv + self.b_qkv
        q, k, v = (self._heads(p) for p in projected.chunk(3, dim=-1))
        return self._rotate(q, rotation), self._rotate(k, rotation), v

    def attend(
        self,
        queries: Float[Tensor, "batch H q d_head"],
        keys: Float[Tensor, "batch H k d_head"],
        values: Float[Tensor, "batch H k d_head"],
        allowed: Bool[Tensor, "batch q k"],
    ) -> Float[Tensor, "batch q d_model"]:
        """Softmax attention where ``allowed``, through the output projection. A query with no
        allowed key (padding) gets the output bias alone."""
        scores = (queries @ keys.transpose(-1, -2)) * self.scale
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        weights = scores.softmax(-1).nan_to_num(0.0)
        mixed = (weights @ values).transpose(1, 2)
        batch, pos = mixed.shape[:2]
        return mixed.reshape(batch, pos, -1) @ self.w_o + self.b_o


def rotary_module(model):
    """The HF rotary embedding module of ``model`` (``cos, sin = module(x, position_ids)``), or
    ``None`` for a model without rotary positions."""
    if getattr(model.cfg, "positional_embedding_type", None) not in ROTARY_TYPES:
        return None
    component = getattr(model, "rotary_emb", None)
    return getattr(component, "original_component", None)


def apply_rotary(
    states: Float[Tensor, "batch H pos d"],
    cos: Float[Tensor, "batch 1 pos r"],
    sin: Float[Tensor, "batch 1 pos r"],
) -> Float[Tensor, "batch H pos d"]:
    """Rotate the first ``r`` dimensions of each head as HF's ``rotate_half`` convention does;
    the rest pass through (GPT-NeoX's partial rotary).

    Example:
        >>> x = torch.tensor([[[[1.0, 0.0]]]])
        >>> apply_rotary(x, torch.zeros(1, 1, 1, 2), torch.ones(1, 1, 1, 2)).tolist()
        [[[[0.0, 1.0]]]]
    """
    r = cos.shape[-1]
    rotated, rest = states[..., :r], states[..., r:]
    first, second = rotated.chunk(2, dim=-1)
    halved = torch.cat((-second, first), dim=-1)
    return torch.cat((rotated * cos + halved * sin, rest), dim=-1)
