"""The continuity stream (Triplet Attention, seed 002): cross-attention to a memory of inputs.

At each target layer the block's normed attention input x (``blocks.{l}.attn.hook_in``) queries
a memory of earlier inputs through a copy of the layer's own attention
(:class:`~mechmem.methods.seeded_attention.SeededAttention`: W_Q and W_O copied, W_K and W_V
expanded from the key/value heads to the query heads in the model's grouping order, the
layer's biases and softmax scale). The result times ``gain × linkage`` is added to the layer's
attention output (``blocks.{l}.hook_attn_out``), and the memory takes in x after the forward.

Two variants:

- ``faithful`` — as the original keeps it: no rotary positions, no mask. At a forward whose
  position ids start at 0 the memory is x itself (so in a prefill every position reads the
  future); afterwards the stored memory is aligned to x the original's way (same length: as
  is; one new position: the memory's last row; otherwise the memory's first rows, zeros after),
  and then replaced by x. During decoding the memory is the previous token's input, so the
  branch is a previous-token copy path: Δ = g·λ·(W_O W_V x_{t−1}).
- ``causal`` — a causal mask, rotary positions applied as the layer applies them (the model's
  rotary embedding at the engine's position ids; GPT-2-style models have none), and a memory of
  the keys and values of every earlier position of the row, column for column with the engine's
  KV cache: cut back when the cache is (a session re-feeding from column c, a rewound turn), and
  rebuilt when the cache restarts (a sliding-window re-prefill). Padded positions are never
  read. Cached decoding equals full recomputation, and a batch row equals its prompt alone.
  Columns cached before the memory began (a stored prefix, ``reset_between_turns``) are not
  in it. Note what this variant is: with memory = the layer's own input at every earlier
  position, the branch recomputes the layer's own attention output, so the stream scales the
  attention output by ``1 + g·λ`` (up to rounding). That is the correct-causality version of the
  original's idea; the faithful variant's effect comes from reading the future in a prefill and
  from the previous-token path while decoding.

``linkage`` (or ``row_linkages``, one per batch row) gates the stream: a row with linkage 0 is
left untouched, bit for bit, and when every row has linkage 0 nothing is computed or stored.
The memory is session state (:attr:`Continuity.state_attributes`): a :class:`~mechmem.Session`
carries it across turns, ``rewind`` restores it and ``save`` writes it. ``calls[i]`` counts the
forward passes in which the branch of the i-th target layer ran: one per layer per forward.

Example:
    >>> stream = Continuity(variant="causal", gain=0.8, linkage=1.0)
    >>> stream.to_dict()["variant"]
    'causal'
    >>> result = generate(model, "Who are you?", [stream], max_new_tokens=20)  # doctest: +SKIP
    >>> stream.calls                                                            # doctest: +SKIP
    [20, 20, 20]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechmem.core.config import Config, is_integer, require
from mechmem.core.context import StepContext
from mechmem.core.intervention import Intervention
from mechmem.methods.rows import per_row
from mechmem.methods.seeded_attention import (
    ROTARY_TYPES,
    UNROTATED_TYPES,
    SeededAttention,
    rotary_module,
)

Variant = Literal["faithful", "causal"]
VARIANTS: tuple[Variant, ...] = ("faithful", "causal")
ORIGINAL_LAYERS: tuple[int, ...] = (16, 24, 30)
ORIGINAL_DEPTH = 32


def default_layers(n_layers: int) -> list[int]:
    """The original's layers 16, 24 and 30 of 32, scaled to ``n_layers`` (duplicates merged).

    Example:
        >>> default_layers(32), default_layers(30), default_layers(3)
        ([16, 24, 30], [15, 22, 28], [1, 2])
    """
    scaled = {min(n_layers - 1, layer * n_layers // ORIGINAL_DEPTH) for layer in ORIGINAL_LAYERS}
    return sorted(scaled)


@dataclass
class ContinuityConfig(Config):
    """Configuration of :class:`Continuity`.

    Attributes:
        layers: target layers (``None``: :func:`default_layers` of the model's depth).
        gain: g, the stream's scale (>= 0). The original used 3.0 (class default), 0.8 (its
            injection code) and 0.3 (its README); above 1 it garbled text.
        linkage: λ in [0, 1]; 0 is the base model, bit for bit.
        row_linkages: one linkage per batch row (overrides ``linkage``).
        variant: ``faithful`` (the original's operator) or ``causal`` (see the module docs).
    """

    layers: list[int] | None = None
    gain: float = 0.8
    linkage: float = 1.0
    row_linkages: list[float] | None = None
    variant: Variant = "faithful"

    def validate(self) -> None:
        require(math.isfinite(self.gain) and self.gain >= 0, "gain", "must be >= 0", self.gain)
        require(0 <= self.linkage <= 1, "linkage", "must be in [0, 1]", self.linkage)
        if self.row_linkages is not None:
            require(len(self.row_linkages) > 0, "row_linkages", "must not be empty")
            for value in self.row_linkages:
                require(0 <= value <= 1, "row_linkages", "each must be in [0, 1]", value)
        if self.layers is not None:
            require(len(self.layers) > 0, "layers", "name at least one layer (or None)")
            require(
                all(is_integer(layer) and layer >= 0 for layer in self.layers),
                "layers",
                "must be integers >= 0",
                self.layers,
            )
            require(len(set(self.layers)) == len(self.layers), "layers", "must not repeat")


class Continuity(Intervention):
    """The continuity stream, ``faithful`` or ``causal`` (see the module docs)."""

    name = "continuity"
    config_class = ContinuityConfig
    state_attributes = ("_memory", "_valid", "calls")  # carried across session turns

    def reset(self, device=None) -> None:
        super().reset(device)
        # Per target layer. faithful: the last forward's inputs [batch, pos, d_model];
        # causal: keys then values of every cached column [batch, 2 * heads, columns, d_head].
        self._memory: list[Tensor | None] = []
        self._valid: list[Tensor | None] = []  # [batch, columns]: which memory columns are real
        self.calls: list[int] = []
        self._inputs: dict[int, Tensor] = {}
        self._linkages: list[float] = []
        self._scales: Tensor | None = None  # gain × linkage of the linked rows
        self._rotation: tuple[StepContext, tuple[Tensor, Tensor] | None] | None = None
        # the seeded weights depend only on the model and the layers: kept across resets
        self._seeded: tuple[int, tuple[int, ...], list[SeededAttention]] | None = getattr(
            self, "_seeded", None
        )

    def target_layers(self, model) -> list[int]:
        """The configured layers, or :func:`default_layers` of ``model``'s depth."""
        layers = self.config.layers
        return default_layers(int(model.cfg.n_layers)) if layers is None else list(layers)

    def hooks(self, model):
        layers = self.target_layers(model)
        for layer in layers:
            self.check_layer(model, layer, "layers")
        if self.config.variant == "causal":
            kind = getattr(model.cfg, "positional_embedding_type", None)
            if kind not in ROTARY_TYPES + UNROTATED_TYPES:
                raise ValueError(
                    f"variant='causal': positions of type {kind!r} are not supported "
                    f"(supported: {ROTARY_TYPES + UNROTATED_TYPES})"
                )
            if kind in ROTARY_TYPES and rotary_module(model) is None:
                raise ValueError("variant='causal': cannot find this model's rotary embedding")
        self._seed(model, layers)
        c = self.config
        if not any(c.row_linkages if c.row_linkages is not None else [c.linkage]):
            return []  # linkage 0 everywhere: the base model, with nothing attached
        specs = []
        for index, layer in enumerate(layers):
            specs.append((f"blocks.{layer}.attn.hook_in", partial(self._keep_input, index)))
            specs.append((f"blocks.{layer}.hook_attn_out", partial(self._add_branch, index)))
        return specs

    def _seed(self, model, layers: list[int]) -> list[SeededAttention]:
        """The seeded attention of every target layer, read once per model and layer list."""
        key = (id(model), tuple(layers))
        if self._seeded is None or self._seeded[:2] != key:
            try:
                seeded = [SeededAttention.of(model, layer) for layer in layers]
            except ValueError as error:
                raise ValueError(f"Continuity: {error}") from error
            self._seeded = (*key, seeded)
        return self._seeded[2]

    def begin_step(self, context: StepContext) -> None:
        super().begin_step(context)
        c = self.config
        self._linkages = per_row(c.linkage, c.row_linkages, context.batch_size, "row_linkages")
        self._scales = None
        held = next((m.shape[0] for m in self._memory if m is not None), context.batch_size)
        if held != context.batch_size:
            raise ValueError(
                f"Continuity: the memory holds {held} rows but this forward has "
                f"{context.batch_size}; reset() before running another batch"
            )

    def _linked_rows(self) -> list[int]:
        return [row for row, linkage in enumerate(self._linkages) if linkage != 0]

    def _keep_input(self, index: int, activation, hook):
        if self._linked_rows():
            self._inputs[index] = activation.detach()

    def _add_branch(self, index: int, activation, hook):
        x = self._inputs.pop(index, None)
        rows = self._linked_rows()
        if not rows or x is None:
            return None
        attention = self._seeded[2][index]
        context = self._context_for(x)
        slots = len(self._seeded[1])
        for state, empty in ((self._memory, None), (self._valid, None), (self.calls, 0)):
            state.extend([empty] * (slots - len(state)))
        if self.config.variant == "causal":
            delta = self._causal(index, attention, x, context)
        else:
            delta = self._faithful(index, attention, x, context)
        self.calls[index] += 1
        if self._scales is None:
            scales = [self.config.gain * self._linkages[row] for row in rows]
            self._scales = torch.tensor(scales, device=delta.device)[:, None, None]
        if len(rows) == len(self._linkages):
            return activation + (self._scales * delta).to(activation.dtype)
        out = activation.clone()  # rows with linkage 0 stay exactly as they are
        out[rows] = out[rows] + (self._scales * delta[rows]).to(out.dtype)
        return out

    def _context_for(self, x: Tensor) -> StepContext:
        """The engine's context for this forward, or a fresh prefill one when none matches
        (the model called outside :func:`mechmem.generate`, :class:`Session` and ``applied``)."""
        context = self.context
        if context is not None and tuple(context.positions.shape) == tuple(x.shape[:2]):
            return context
        mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        return StepContext.for_prefill(mask)

    def _faithful(
        self, index: int, attention: SeededAttention, x: Float[Tensor, "b n d"], context
    ) -> Float[Tensor, "b n d"]:
        new_valid = context.new_mask.bool()
        memory, valid = aligned_memory(self._memory[index], self._valid[index], x, new_valid)
        starts = context.position_ids.masked_fill(~new_valid, 1 << 30).min(-1).values == 0
        memory = torch.where(starts[:, None, None], x, memory)
        valid = torch.where(starts[:, None], new_valid, valid)
        keys, values = attention.keys_values(memory, None)
        allowed = valid[:, None, :].expand(-1, x.shape[1], -1)
        delta = attention.attend(attention.queries(x, None), keys, values, allowed)
        self._memory[index], self._valid[index] = x, new_valid
        return delta

    def _causal(
        self, index: int, attention: SeededAttention, x: Float[Tensor, "b n d"], context
    ) -> Float[Tensor, "b n d"]:
        cached, new = context.cache_length, x.shape[1]
        queries, keys, values = attention.project(x, self._rotation_for(attention, context, x))
        past, past_valid = self._past(index, cached, keys)
        memory = torch.cat([past, torch.cat([keys, values], dim=1)], dim=2)
        valid = torch.cat([past_valid, context.new_mask.bool()], dim=1)
        valid = valid & context.attention_mask.bool()
        allowed = valid[:, None, :]
        if new > 1:  # one new position sees every column anyway
            allowed = allowed & torch.ones(
                new, cached + new, dtype=torch.bool, device=x.device
            ).tril(cached)
        heads = attention.n_heads
        delta = attention.attend(queries, memory[:, :heads], memory[:, heads:], allowed)
        self._memory[index], self._valid[index] = memory, valid
        return delta

    def _rotation_for(self, attention: SeededAttention, context: StepContext, x: Tensor):
        """The rotary ``(cos, sin)`` of this forward's positions, computed once per forward."""
        if self._rotation is None or self._rotation[0] is not context:
            self._rotation = (context, attention.rotation(context.position_ids, x))
        return self._rotation[1]

    def _past(self, index: int, columns: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """The memory of the ``columns`` cached columns: cut back to them, or led by invalid
        columns where the memory began after the cache did."""
        memory, valid = self._memory[index], self._valid[index]
        batch, heads, _, d_head = like.shape
        if memory is None:
            memory = like.new_zeros(batch, 2 * heads, 0, d_head)
            valid = torch.zeros(batch, 0, dtype=torch.bool, device=like.device)
        held = memory.shape[2]
        if held >= columns:
            return memory[:, :, :columns], valid[:, :columns]
        missing = columns - held
        lead = memory.new_zeros(batch, 2 * heads, missing, d_head)
        lead_valid = torch.zeros(batch, missing, dtype=torch.bool, device=valid.device)
        return torch.cat([lead, memory], dim=2), torch.cat([lead_valid, valid], dim=1)

    @property
    def memory_columns(self) -> list[int]:
        """How many positions each target layer's memory holds (0 before any forward)."""
        return [0 if memory is None else int(memory.shape[-2]) for memory in self._memory]


def aligned_memory(
    memory: Float[Tensor, "b m d"] | None,
    valid: Bool[Tensor, "b m"] | None,
    x: Float[Tensor, "b n d"],
    new_valid: Bool[Tensor, "b n"],
) -> tuple[Float[Tensor, "b n d"], Bool[Tensor, "b n"]]:
    """The faithful memory aligned to ``x`` as the original aligns it: none yet → x; the same
    length → as is; one new position and a longer memory → its last row; otherwise its first
    rows with zeros after (zeros are real, if empty, keys).

    Example:
        >>> m, ok = aligned_memory(torch.ones(1, 1, 2), torch.ones(1, 1, dtype=torch.bool),
        ...                        torch.full((1, 3, 2), 5.0), torch.ones(1, 3, dtype=torch.bool))
        >>> m[0, :, 0].tolist(), ok.tolist()
        ([1.0, 0.0, 0.0], [[True, True, True]])
    """
    if memory is None:
        return x, new_valid
    held, new = memory.shape[1], x.shape[1]
    if held == new:
        return memory, valid
    if new == 1:
        return memory[:, -1:], valid[:, -1:]
    kept = min(held, new)
    aligned = x.new_zeros(x.shape)
    aligned[:, :kept] = memory[:, :kept]
    aligned_valid = torch.ones_like(new_valid)
    aligned_valid[:, :kept] = valid[:, :kept]
    return aligned, aligned_valid
