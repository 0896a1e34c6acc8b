"""Attractor layer: a few slot vectors that strengthen when queries visit them (seed 003, V1).

Per wrapped layer the state is ``M`` slots ``A`` (``d_head`` vectors, drawn N(0, init_std²)),
their strengths ``S`` (0 at the start), the update at which each was last used, and an update
counter ``t``. The queries are the layer's pre-RoPE queries averaged over heads
(``blocks.{l}.attn.hook_q`` is ``[batch, pos, heads, d_head]`` before any rotation on every
architecture; GPT-2 has no rotation; :func:`query_source` says where they are read). One update
(:func:`attractor_update`) takes a set of queries q̄ in order and:

1. detects: ``m* = argmax_m cos(q̄, A_m)``; a match if ``cos > threshold`` and
   ``S_m* > min_strength``;
2. accumulates: ``A_m ← A_m + learning_rate · mean(q̄ − A_m)`` over the queries matched to m,
   ``S ← hit_decay · S + hits`` (hits = number of queries matched to the slot);
3. creates: unmatched queries, in order, fill the free slots (``S < min_strength``) in index
   order with ``A_m = q̄``, ``S_m = birth_strength`` (queries left over when no slot is free are
   dropped);
4. decays ``S ← decay · S``; 5. evicts: a slot that falls below ``min_strength`` is reset
   (``S = 0``, ``A`` redrawn); 6. ``t ← t + 1``.

The injection (:func:`attractor_readout`) is ``scale · tanh(ΣS) · u`` with ``u`` the unit vector
of ``Σ S_m A_m / Σ S_m``; it is zero while the layer is in burn-in (``ΣS < burn_in`` in
``"strength"`` mode, ``t < burn_in`` in ``"tokens"`` mode) or has no live slot. It is added to
``blocks.{l}.hook_attn_out`` at every position, either ``"tile"``d (the ``d_head`` vector
repeated to ``d_model``; when ``d_model`` is not a multiple of ``d_head`` the last copy is cut:
entry ``i`` is ``u[i mod d_head]``) or through ``"o_proj"``, the layer's own output projection
without its bias applied to ``u`` copied into every head.

Two orders:

- ``causal=False`` (the original): one state shared by the whole batch; each forward pass is one
  update with every real query of every row (row by row, position by position), then the new
  state's vector is injected at every position. In a prefill, early positions see later queries.
- ``causal=True``: one state per row, and one update per token: the injection at position i uses
  the state after positions < i only, then position i updates it. A row's result does not depend
  on the rest of the batch or on later tokens.

Padded columns (attention mask 0) never update a state. A window re-prefill (the engine's
``"reprefill"`` phase) feeds tokens that were already counted: they get the current vector and no
update. ``preset`` fills every field left ``None``: ``conservative`` (the middle layer, or the two
middle layers when L > 12; 16 slots, θ 0.8, α 0.05, λ 0.995, scale 0.15, burn-in 50) or
``standard`` (every layer; 32 slots, θ 0.75, α 0.1, λ 0.99, scale 0.3, burn-in 30). ``scale`` 0
(or a row's entry of ``row_scales``) leaves the logits of that row exactly as the base model's.
:meth:`Attractor.traces` returns what every update did (:class:`AttractorTraces`).

Example:
    >>> attractor = Attractor(preset="conservative", causal=True, burn_in=0)
    >>> result = generate(model, "Once upon a time", [attractor],  # doctest: +SKIP
    ...                   max_new_tokens=50)
    >>> attractor.traces().strengths.shape                          # doctest: +SKIP
    (55, 1, 16)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.model_bridge.generalized_components.linear import LinearBridge
from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
    PositionEmbeddingsAttentionBridge,
)

from mechmem.core.config import Config, is_integer, require
from mechmem.core.intervention import Intervention
from mechmem.methods.rows import per_row, row_generators

Preset = Literal["conservative", "standard"]
Readout = Literal["tile", "o_proj"]
BurnInMode = Literal["tokens", "strength"]

PRESETS: dict[str, dict[str, float | int | str]] = {
    "conservative": dict(
        layers="middle",
        n_slots=16,
        threshold=0.8,
        learning_rate=0.05,
        decay=0.995,
        scale=0.15,
        burn_in=50.0,
    ),
    "standard": dict(
        layers="all",
        n_slots=32,
        threshold=0.75,
        learning_rate=0.1,
        decay=0.99,
        scale=0.3,
        burn_in=30.0,
    ),
}


def preset_layers(preset: str, n_layers: int) -> list[int]:
    """The layers a preset wraps: the middle one (the two middle ones when L > 12), or all.

    Example:
        >>> preset_layers("conservative", 30), preset_layers("conservative", 3)
        ([14, 15], [1])
    """
    if PRESETS[preset]["layers"] == "all":
        return list(range(n_layers))
    middle = n_layers // 2
    return [middle - 1, middle] if n_layers > 12 else [middle]


@dataclass
class AttractorConfig(Config):
    """Configuration of :class:`Attractor`; fields left ``None`` come from ``preset``.

    Attributes:
        preset: ``conservative`` or ``standard`` (see the module docs).
        causal: ``False``: the original order (update, then inject; one state for the batch);
            ``True``: inject, then update, one state per row, one update per token.
        readout: ``tile`` (the query-space vector repeated to d_model) or ``o_proj`` (through
            the layer's output projection).
        layers: wrapped layers (``None``: the preset's).
        n_slots: M, the number of attractor slots (>= 1).
        threshold: θ, the cosine a query needs to match a slot, in (-1, 1).
        learning_rate: α, how far a matched slot moves toward its queries' mean, in [0, 1].
        decay: λ, the strengths' decay per update, in (0, 1].
        scale: the injection's size (>= 0; 0 is the base model, bit for bit).
        row_scales: one scale per batch row (overrides ``scale``).
        burn_in: no injection while ``t < burn_in`` (tokens) or ``ΣS < burn_in`` (strength).
        burn_in_mode: ``tokens`` (updates counted) or ``strength`` (total strength).
        hit_decay: the factor on S before hits are added, in (0, 1].
        birth_strength: a new slot's strength (> min_strength).
        min_strength: below it a slot is free (and evicted), > 0.
        init_std: std of the slots' initial and refill draws (> 0).
        seed: seed of the shared state's draws, and of every row's unless ``row_seeds``.
        row_seeds: one seed per batch row (causal state).
        trace: record :class:`AttractorTraces` at every update.
    """

    preset: Preset = "conservative"
    causal: bool = False
    readout: Readout = "tile"
    layers: list[int] | None = None
    n_slots: int | None = None
    threshold: float | None = None
    learning_rate: float | None = None
    decay: float | None = None
    scale: float | None = None
    row_scales: list[float] | None = None
    burn_in: float | None = None
    burn_in_mode: BurnInMode = "tokens"
    hit_decay: float = 0.99
    birth_strength: float = 0.5
    min_strength: float = 1e-3
    init_std: float = 1e-3
    seed: int = 0
    row_seeds: list[int] | None = None
    trace: bool = True

    def validate(self) -> None:
        for name, value in PRESETS[self.preset].items():
            if name != "layers" and getattr(self, name) is None:
                setattr(self, name, value)
        require(self.n_slots >= 1, "n_slots", "must be >= 1", self.n_slots)
        require(-1 < self.threshold < 1, "threshold", "must be in (-1, 1)", self.threshold)
        require(0 <= self.learning_rate <= 1, "learning_rate", "must be in [0, 1]")
        require(0 < self.decay <= 1, "decay", "must be in (0, 1]", self.decay)
        require(0 < self.hit_decay <= 1, "hit_decay", "must be in (0, 1]", self.hit_decay)
        require(math.isfinite(self.scale) and self.scale >= 0, "scale", "must be >= 0", self.scale)
        if self.row_scales is not None:
            require(len(self.row_scales) > 0, "row_scales", "must not be empty")
            for scale in self.row_scales:
                require(math.isfinite(scale) and scale >= 0, "row_scales", "each must be >= 0")
        if self.row_seeds is not None:
            require(len(self.row_seeds) > 0, "row_seeds", "must not be empty")
        require(math.isfinite(self.burn_in) and self.burn_in >= 0, "burn_in", "must be >= 0")
        require(self.min_strength > 0, "min_strength", "must be > 0", self.min_strength)
        require(
            self.birth_strength > self.min_strength,
            "birth_strength",
            "must be > min_strength",
            self.birth_strength,
        )
        require(self.init_std > 0, "init_std", "must be > 0", self.init_std)
        if self.layers is not None:
            require(len(self.layers) > 0, "layers", "must name at least one layer")
            require(len(set(self.layers)) == len(self.layers), "layers", "must not repeat")
            for layer in self.layers:
                require(is_integer(layer) and layer >= 0, "layers", "each must be >= 0", layer)


@dataclass
class SlotState:
    """One layer's attractor state for R independent rows (R = 1 for the shared state).

    Attributes:
        slots: A, ``[R, M, d_head]``.
        strengths: S, ``[R, M]``.
        last_used: update index at which each slot last matched or was born (-1: never).
        updates: t, updates so far per row.
    """

    slots: Float[Tensor, "rows slots d_head"]
    strengths: Float[Tensor, "rows slots"]
    last_used: Int[Tensor, "rows slots"]
    updates: Int[Tensor, " rows"]

    @classmethod
    def fresh(
        cls, n_slots: int, d_head: int, init_std: float, generators: list[torch.Generator]
    ) -> SlotState:
        """Slots drawn N(0, init_std²) from each row's generator, strengths 0.

        Example:
            >>> SlotState.fresh(4, 8, 1e-3, [torch.Generator()]).slots.shape
            torch.Size([1, 4, 8])
        """
        device = generators[0].device
        slots = torch.stack(
            [torch.randn(n_slots, d_head, generator=g, device=device) for g in generators]
        )
        rows = len(generators)
        return cls(
            slots=slots * init_std,
            strengths=torch.zeros(rows, n_slots, device=device),
            last_used=torch.full((rows, n_slots), -1, dtype=torch.long, device=device),
            updates=torch.zeros(rows, dtype=torch.long, device=device),
        )


@dataclass
class UpdateEvents:
    """What one update did, per row.

    Attributes:
        best_slot: the slot with the highest cosine for each query ``[R, N]``.
        best_cosine: that cosine ``[R, N]``.
        matched: whether the query matched it ``[R, N]``.
        born: slots created ``[R, M]``.
        evicted: slots evicted ``[R, M]``.
    """

    best_slot: Int[Tensor, "rows queries"]
    best_cosine: Float[Tensor, "rows queries"]
    matched: Bool[Tensor, "rows queries"]
    born: Bool[Tensor, "rows slots"]
    evicted: Bool[Tensor, "rows slots"]


def attractor_update(
    state: SlotState,
    queries: Float[Tensor, "rows queries d_head"],
    valid: Bool[Tensor, "rows queries"],
    config: AttractorConfig,
    generators: list[torch.Generator],
) -> UpdateEvents:
    """One V1 update of ``state`` (in place) with each row's queries, in order (module docs).

    A row without a valid query is left exactly as it was. Evicted slots are redrawn from that
    row's generator.

    Example:
        >>> config = AttractorConfig(n_slots=2, threshold=0.5)
        >>> state = SlotState.fresh(2, 3, 1e-3, [torch.Generator()])
        >>> q = torch.tensor([[[1.0, 0.0, 0.0]]])
        >>> events = attractor_update(state, q, torch.ones(1, 1, dtype=torch.bool), config,
        ...                           [torch.Generator()])
        >>> events.born.tolist(), round(state.strengths[0, 0].item(), 4)
        ([[True, False]], 0.4975)
    """
    c = config
    slots, strengths = state.slots, state.strengths
    active = valid.any(-1)  # rows with a real query: only they update
    unit_q = torch.nn.functional.normalize(queries, dim=-1)
    unit_a = torch.nn.functional.normalize(slots, dim=-1)
    best_cosine, best_slot = (unit_q @ unit_a.transpose(1, 2)).max(-1)  # over slots
    alive = strengths > c.min_strength
    matched = valid & (best_cosine > c.threshold) & alive.gather(1, best_slot)
    weights = matched.to(queries.dtype)
    hits = torch.zeros_like(strengths).scatter_add_(1, best_slot, weights)
    sums = torch.zeros_like(slots).scatter_add_(
        1, best_slot[..., None].expand_as(queries), queries * weights[..., None]
    )
    hit = hits > 0
    means = sums / hits.clamp_min(1)[..., None]
    new_slots = torch.where(hit[..., None], slots + c.learning_rate * (means - slots), slots)
    new_strengths = c.hit_decay * strengths + hits

    # creation: the k-th unmatched query of a row takes the row's k-th free slot, in order
    unmatched = valid & ~matched
    free = new_strengths < c.min_strength
    born = torch.zeros_like(free)
    if bool(unmatched.any()):
        query_rank = unmatched.long().cumsum(1) - 1
        takes = unmatched & (query_rank < free.sum(1, keepdim=True))
        free_order = torch.sort((~free).long(), dim=1, stable=True).indices  # free slots first
        row_index, query_index = takes.nonzero(as_tuple=True)
        born_slots = free_order[row_index, query_rank[row_index, query_index]]
        new_slots[row_index, born_slots] = queries[row_index, query_index]
        new_strengths[row_index, born_slots] = c.birth_strength
        born[row_index, born_slots] = True

    new_strengths = c.decay * new_strengths
    replaced = alive & free & born  # fell below min_strength and was taken by a new query
    dead = (alive | born) & (new_strengths < c.min_strength) & active[:, None]
    if bool(dead.any()):
        new_strengths = torch.where(dead, torch.zeros_like(new_strengths), new_strengths)
        for row in dead.any(1).nonzero().flatten().tolist():
            fresh = torch.randn(
                int(dead[row].sum()),
                slots.shape[-1],
                generator=generators[row],
                device=slots.device,
            )
            new_slots[row, dead[row]] = fresh * c.init_std
    evicted = dead | replaced

    keep = ~active[:, None]
    if not bool(active.all()):
        new_slots = torch.where(keep[..., None], slots, new_slots)
        new_strengths = torch.where(keep, strengths, new_strengths)
    state.slots, state.strengths = new_slots, new_strengths
    state.last_used = torch.where((hit | born) & ~keep, state.updates[:, None], state.last_used)
    state.updates = state.updates + active.long()
    return UpdateEvents(
        best_slot=best_slot,
        best_cosine=best_cosine,
        matched=matched,
        born=born & ~keep,
        evicted=evicted & ~keep,
    )


def attractor_readout(
    state: SlotState, config: AttractorConfig
) -> tuple[Float[Tensor, "rows d_head"], Bool[Tensor, " rows"]]:
    """``tanh(ΣS) · u`` for each row (``u``: unit strength-weighted centroid), zero where the row
    is in burn-in or has no live slot; and the burn-in flag.

    Example:
        >>> state = SlotState.fresh(2, 2, 1e-3, [torch.Generator()])
        >>> state.strengths[0, 0] = 1.0; state.slots[0, 0] = torch.tensor([3.0, 4.0])
        >>> vector, burning = attractor_readout(state, AttractorConfig(burn_in=0))
        >>> [round(v, 4) for v in vector[0].tolist()], burning.tolist()
        ([0.457, 0.6093], [False])
    """
    strengths = state.strengths
    total = strengths.sum(-1)
    if config.burn_in_mode == "tokens":
        burning = state.updates < config.burn_in
    else:
        burning = total < config.burn_in
    centroid = (strengths[..., None] * state.slots).sum(1) / total.clamp_min(1e-12)[:, None]
    unit = centroid / centroid.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    live = ~burning & (total > 0)
    vector = torch.where(live[:, None], torch.tanh(total)[:, None] * unit, 0.0)
    return vector, burning


def tile(vector: Float[Tensor, "... d_head"], d_model: int) -> Float[Tensor, "... d_model"]:
    """Repeat a ``d_head`` vector to ``d_model`` entries: entry i is ``vector[i mod d_head]``.

    Example:
        >>> tile(torch.tensor([1.0, 2.0]), 5).tolist()
        [1.0, 2.0, 1.0, 2.0, 1.0]
    """
    copies = -(-d_model // vector.shape[-1])
    return vector.repeat(*([1] * (vector.ndim - 1)), copies)[..., :d_model]


def query_source(model, layer: int) -> tuple[str, Callable[[Tensor], Tensor]]:
    """Where ``layer``'s pre-RoPE queries ``[batch, pos, heads, d_head]`` are read: the hook and
    the function that turns its activation into them.

    ``blocks.{l}.attn.hook_q`` in general. A rotary attention with a plain query projection
    (Llama, Qwen2, SmolLM2) is read at its input ``attn.hook_in`` through that projection
    instead: the same numbers, but a hook on ``hook_q`` next to one on ``hook_attn_out`` would
    send the layer through TransformerLens' own attention (:mod:`mechmem.core.fastpath`),
    which costs more than the projection computed once more.

    Example:
        >>> query_source(model, 1)[0]   # doctest: +SKIP
        'blocks.1.attn.hook_in'
    """
    attention = model.blocks[layer].attn
    projection = getattr(attention, "q", None)
    if type(attention) is PositionEmbeddingsAttentionBridge and type(projection) is LinearBridge:
        linear = projection.original_component
        shape = (int(model.cfg.n_heads), int(model.cfg.d_head))
        return f"blocks.{layer}.attn.hook_in", lambda x: linear(x).unflatten(-1, shape)
    return f"blocks.{layer}.attn.hook_q", lambda x: x


def o_proj_matrix(model, layer: int) -> Float[Tensor, "d_head d_model"]:
    """The linear map of a ``d_head`` vector copied into every head through ``layer``'s output
    projection (its bias left out): ``Σ_h W_O[h]``.

    Example:
        >>> o_proj_matrix(model, 1).shape   # doctest: +SKIP
        torch.Size([16, 64])
    """
    projection = model.blocks[layer].attn.o.original_component
    n_heads, d_head = int(model.cfg.n_heads), int(model.cfg.d_head)
    weight = next(projection.parameters())
    basis = torch.eye(d_head, device=weight.device, dtype=weight.dtype).repeat(1, n_heads)
    with torch.no_grad():
        return (projection(basis) - projection(torch.zeros_like(basis))).float()


@dataclass
class AttractorTraces:
    """What every update of one layer did, per step (update) and batch row.

    A ``causal`` run has one step per column of each forward (padded columns included, with
    position -1 and nothing changed); the faithful order has one step per forward pass, whose
    shared state is repeated for every row, and reports the row's newest query.

    Attributes:
        layer: the wrapped layer.
        positions: absolute position of the step's (newest) query ``[step, row]``; -1 padding.
        strengths: every slot's strength after the update ``[step, row, slot]``.
        fired: the slot the query matched, -1 if none ``[step, row]``.
        cosine: the query's best cosine over the slots (matched or not) ``[step, row]``.
        born, evicted: slots created / evicted by the update ``[step, row, slot]``.
        burn_in: the injection at this step was held back by burn-in ``[step, row]``.
        injected_norm: norm of what was added to the attention output at the query's position
            ``[step, row]``.
    """

    layer: int
    positions: np.ndarray
    strengths: np.ndarray
    fired: np.ndarray
    cosine: np.ndarray
    born: np.ndarray
    evicted: np.ndarray
    burn_in: np.ndarray
    injected_norm: np.ndarray

    def to_dict(self) -> dict:
        """JSON-ready lists (NaN becomes ``None``).

        Example:
            >>> AttractorTraces.from_dict(traces.to_dict()).cosine.shape   # doctest: +SKIP
            (60, 2)
        """
        out: dict = {"layer": self.layer}
        for name in _TRACE_KINDS:
            value = getattr(self, name)
            if value.dtype.kind == "f":
                value = np.where(np.isnan(value), None, value)
            out[name] = value.tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> AttractorTraces:
        """The inverse of :meth:`to_dict`."""
        arrays = {name: np.array(data[name], dtype=kind) for name, kind in _TRACE_KINDS.items()}
        return cls(layer=int(data["layer"]), **arrays)


_TRACE_KINDS = {
    "positions": np.int64,
    "strengths": np.float32,
    "fired": np.int64,
    "cosine": np.float32,
    "born": bool,
    "evicted": bool,
    "burn_in": bool,
    "injected_norm": np.float32,
}


class _TraceLog:
    """One layer's trace entries ``[update, batch, ...]`` in tensors that double when full.

    One small tensor kept per step among the model's large short-lived allocations fragments the
    C heap: resident memory then grows with the square of the run's length (8.6 GB after 200
    tokens of a 9-row batch with every layer of the embedded model wrapped). A few buffers that
    double when full do not. A batch of another width starts a new segment.
    """

    def __init__(self) -> None:
        self.segments: list[dict[str, np.ndarray]] = []
        self.buffers: dict[str, Tensor] = {}
        self.length = 0
        self.last = 0

    def append(self, entries: dict[str, Tensor]) -> None:
        """Add entries ``[batch, updates, ...]`` (every key, the same batch and updates)."""
        values = {key: v.detach().to("cpu").transpose(0, 1) for key, v in entries.items()}
        known = self.buffers.get("positions")
        if known is not None and known.shape[1:] != values["positions"].shape[1:]:
            self.segments.append(self._arrays())
            self.buffers, self.length = {}, 0
        n = next(iter(values.values())).shape[0]
        for key, value in values.items():
            buffer = self.buffers.get(key)
            if buffer is None or len(buffer) < self.length + n:
                size = max(64, 2 * (self.length + n))
                grown = torch.empty((size, *value.shape[1:]), dtype=value.dtype)
                if buffer is not None:
                    grown[: self.length] = buffer[: self.length]
                self.buffers[key] = buffer = grown
            buffer[self.length : self.length + n] = value
        self.last, self.length = n, self.length + n

    def set_last(self, key: str, value: Tensor) -> None:
        """Overwrite ``key`` of the latest entries with ``value`` ``[batch, updates]``."""
        rows = slice(self.length - self.last, self.length)
        self.buffers[key][rows] = value.detach().to("cpu").transpose(0, 1)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {key: buffer[: self.length].numpy().copy() for key, buffer in self.buffers.items()}

    def arrays(self) -> dict[str, np.ndarray]:
        """Every entry ``[update, batch, ...]``; ``ValueError`` across batches of other widths."""
        segments = [*self.segments, self._arrays()] if self.length else list(self.segments)
        if len({segment["positions"].shape[1] for segment in segments}) > 1:
            raise ValueError(
                "attractor traces span batches of different widths: read traces() after each "
                "call, or reset() between them"
            )
        return {key: np.concatenate([segment[key] for segment in segments]) for key in segments[0]}


class Attractor(Intervention):
    """The attractor layer (V1), faithful or causal (see the module docs)."""

    name = "attractor"
    config_class = AttractorConfig
    state_attributes = ("_slots", "_strengths", "_last_used", "_updates", "_generators")

    def reset(self, device=None) -> None:
        super().reset(device)
        self._device = device or "cpu"
        self._slots: list[Tensor] = []
        self._strengths: list[Tensor] = []
        self._last_used: list[Tensor] = []
        self._updates: list[Tensor] = []
        self._generators: list[torch.Generator] = []
        self._pending: dict[int, Tensor] = {}
        self._logs: dict[int, _TraceLog] = {}
        self._scales: Tensor | None = None

    def layers(self, model) -> list[int]:
        """The wrapped layers on ``model`` (the configured ones, or the preset's)."""
        layers = self.config.layers
        return (
            preset_layers(self.config.preset, int(model.cfg.n_layers))
            if layers is None
            else (list(layers))
        )

    def hooks(self, model):
        layers = self.layers(model)
        for layer in layers:
            self.check_layer(model, layer, "layers")
        self._layers = layers
        d_model = int(model.cfg.d_model)
        specs = []
        for index, layer in enumerate(layers):
            if self.config.readout == "o_proj":
                matrix = o_proj_matrix(model, layer)
                readout = lambda v, m=matrix: v @ m.to(v.device)  # noqa: E731
            else:
                readout = lambda v: tile(v, d_model)  # noqa: E731
            site, queries_of = query_source(model, layer)
            specs.append((site, self._query_hook(index, queries_of)))
            specs.append((f"blocks.{layer}.hook_attn_out", self._inject_hook(index, readout)))
        return specs

    def begin_step(self, context) -> None:
        super().begin_step(context)
        c, batch = self.config, context.batch_size
        scales = per_row(c.scale, c.row_scales, batch, "row_scales")
        self._scales = torch.tensor(scales, dtype=torch.float32, device=context.positions.device)
        rows = batch if c.causal else 1
        if self._generators and len(self._generators) != rows:
            raise ValueError(
                f"attractor: the carried state has {len(self._generators)} rows but this batch "
                f"has {batch}; call reset() (or generate with reset=True) first"
            )
        if not self._generators:
            seeds = per_row(c.seed, c.row_seeds, batch, "row_seeds") if c.causal else [c.seed]
            self._generators = row_generators(seeds, self._device)

    def _state(self, index: int, d_head: int) -> SlotState:
        while len(self._slots) <= index:
            fresh = SlotState.fresh(
                self.config.n_slots, d_head, self.config.init_std, self._generators
            )
            self._slots.append(fresh.slots)
            self._strengths.append(fresh.strengths)
            self._last_used.append(fresh.last_used)
            self._updates.append(fresh.updates)
        return SlotState(
            self._slots[index],
            self._strengths[index],
            self._last_used[index],
            self._updates[index],
        )

    def _store(self, index: int, state: SlotState) -> None:
        self._slots[index], self._strengths[index] = state.slots, state.strengths
        self._last_used[index], self._updates[index] = state.last_used, state.updates

    def _query_hook(self, index: int, queries_of):
        def read(activation, hook):
            context = self.context
            with torch.no_grad():
                queries = queries_of(activation).detach().float().mean(2)  # [batch, pos, d_head]
            valid = context.new_mask.bool()
            state = self._state(index, queries.shape[-1])
            if context.phase == "reprefill":
                vector, _ = attractor_readout(state, self.config)
                vectors = self._per_row(vector, queries.shape[0])[:, None].expand_as(queries)
            elif self.config.causal:
                vectors = self._causal(index, state, queries, valid)
            else:
                vectors = self._faithful(index, state, queries, valid)
            self._store(index, state)
            self._pending[index] = vectors * valid[..., None]

        return read

    def _per_row(self, vector: Tensor, batch: int) -> Tensor:
        return vector if self.config.causal else vector.expand(batch, -1)

    def _faithful(self, index, state, queries, valid):
        batch, width, d_head = queries.shape
        events = attractor_update(
            state,
            queries.reshape(1, -1, d_head),
            valid.reshape(1, -1),
            self.config,
            self._generators,
        )
        vector, burning = attractor_readout(state, self.config)
        if self.config.trace:
            newest = torch.arange(batch, device=queries.device) * width + width - 1
            entries = dict(
                strengths=state.strengths.expand(batch, -1),
                fired=torch.where(events.matched[0, newest], events.best_slot[0, newest], -1),
                cosine=torch.where(valid[:, -1], events.best_cosine[0, newest], torch.nan),
                born=events.born.expand(batch, -1),
                evicted=events.evicted.expand(batch, -1),
                burn_in=burning.expand(batch),
            )
            self._record(
                index, self.context.positions[:, -1:], {k: v[:, None] for k, v in entries.items()}
            )
        return vector.expand(batch, -1)[:, None].expand(batch, width, d_head)

    def _causal(self, index, state, queries, valid):
        vectors, records = [], []
        for column in range(queries.shape[1]):
            vector, burning = attractor_readout(state, self.config)
            vectors.append(vector)
            events = attractor_update(
                state,
                queries[:, column : column + 1],
                valid[:, column : column + 1],
                self.config,
                self._generators,
            )
            if self.config.trace:
                records.append(
                    dict(
                        strengths=state.strengths,
                        fired=torch.where(events.matched[:, 0], events.best_slot[:, 0], -1),
                        cosine=torch.where(valid[:, column], events.best_cosine[:, 0], torch.nan),
                        born=events.born,
                        evicted=events.evicted,
                        burn_in=burning,
                    )
                )
        if records:  # [batch, column, ...]
            stacked = {key: torch.stack([r[key] for r in records], 1) for key in records[0]}
            self._record(index, self.context.positions, stacked)
        return torch.stack(vectors, 1)

    def _record(self, index: int, positions: Tensor, entries: dict[str, Tensor]) -> None:
        """Keep one forward pass's trace entries ``[batch, updates, ...]``."""
        entries["positions"] = positions
        entries["injected_norm"] = torch.zeros(positions.shape)  # set by the injection hook
        self._logs.setdefault(index, _TraceLog()).append(entries)

    def _inject_hook(self, index: int, readout):
        def inject(activation, hook):
            vectors = self._pending.pop(index, None)
            if vectors is None:
                return None
            delta = readout(vectors) * self._scales[:, None, None]
            norms = delta.norm(dim=-1)
            if self.config.trace and index in self._logs and self.context.phase != "reprefill":
                log = self._logs[index]
                log.set_last("injected_norm", norms[:, -log.last :])
            rows = norms.amax(1) > 0
            if bool(rows.all()):
                return activation + delta.to(activation.dtype)
            if not bool(rows.any()):
                return None
            out = activation.clone()  # rows with nothing to add stay bit for bit as they were
            out[rows] += delta[rows].to(out.dtype)
            return out

        return inject

    def traces(self, layer: int | None = None) -> AttractorTraces:
        """Everything recorded since the last reset, for ``layer`` (default: the first wrapped).

        Example:
            >>> traces = attractor.traces()   # doctest: +SKIP
            >>> traces.strengths.shape        # [step, row, slot]  # doctest: +SKIP
            (60, 2, 16)
        """
        wrapped = getattr(self, "_layers", None)
        if wrapped is None:
            raise ValueError("attractor: nothing recorded yet (run a forward pass first)")
        layer = wrapped[0] if layer is None else layer
        if layer not in wrapped:
            raise ValueError(f"layer: {layer} is not wrapped; wrapped layers are {wrapped}")
        log = self._logs.get(wrapped.index(layer))
        if log is None:
            raise ValueError("attractor: no update recorded (trace=False, or no forward yet)")
        return AttractorTraces(layer=layer, **log.arrays())
