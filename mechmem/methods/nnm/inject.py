"""Putting stored memory back into the model: a pre-RoPE KV prefix and a residual injection.

**KV prefix.** :class:`PassageKV` holds a passage's keys and values at every layer with the keys
*before* the rotary position embedding. :meth:`PassageKV.prefix` rotates them once, at their
true positions 0..n−1, and returns a :class:`mechmem.Prefix`; a question continued from it gets
the logits of the passage text followed by the question (``tests/unit/test_nnm_inject.py``,
atol 1e-3). Keys stored after RoPE and rotated again on load are rotated twice, and the logits
move (the same test shows it): that is the original's failed arm.

The keys are taken from the engine's own prefill cache (:func:`mechmem.prefix`, post-RoPE) and
rotated back by the inverse rotation at each position, so the stored keys are exactly what the
attention rotated; models without rotary embeddings (GPT-2) store their keys as they are. A
``PassageKV`` lives in a safetensors file beside the memory store's collection (one file per
entry, ``prefixes/{entry_id}.safetensors``), not in Qdrant's payload: a passage's K/V is
``2 · layers · kv_heads · d_head`` floats per token (about 46 KB per token on SmolLM2-135M),
far too large for a JSON payload.

**Residual injection.** :class:`ResidualInjection` adds ``gain`` times one vector per batch row
(e.g. the mean of a retrieved entry's stored ``injection`` vectors, read back from the store) to
``blocks.{layer}.hook_resid_pre`` at every position. ``gain=0`` leaves the logits bit for bit;
``row_gains`` / ``vectors`` give each row its own strength and memory, so arms run as one batch.

Example:
    >>> kv = PassageKV.of(model, "The vault code is 4417.")             # doctest: +SKIP
    >>> kv.save("memory/prefixes/e1.safetensors")                        # doctest: +SKIP
    >>> p = PassageKV.load("memory/prefixes/e1.safetensors", model).prefix(model)  # doctest: +SKIP
    >>> generate(model, " The code is", prefix=p, max_new_tokens=3)      # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from mechmem.core.config import Config, is_integer, require
from mechmem.core.fingerprint import model_fingerprint
from mechmem.core.intervention import Intervention
from mechmem.core.kv_cache import HookedKVCache, kv_hook_points
from mechmem.core.prefix import Prefix, prefix
from mechmem.core.session_file import read_session, write_session
from mechmem.methods.rows import per_row

FORMAT = "mechmem.kv-prefix/1"
KVTensor = Float[Tensor, "1 kv_heads pos d_head"]


def _rotary_module(model):
    """The HF rotary embedding module of ``model``, or ``None`` (no rotary positions)."""
    for name, module in model.original_model.named_modules():
        if name.endswith("rotary_emb"):
            return module
    return None


def rotate_keys(model, keys: KVTensor, positions: Tensor, *, inverse: bool = False) -> KVTensor:
    """Apply the model's rotary embedding to ``keys`` at ``positions`` (or undo it).

    Rotates the first ``rot`` dims of each head (all of them, or GPT-NeoX's partial rotary),
    as HF attention does: k·cos + rotate_half(k)·sin. The inverse divides out cos² + sin²
    (1 unless the rotary scales its output). Keys of a model without rotary pass through.

    Example:
        >>> turned = rotate_keys(model, k, pos)                           # doctest: +SKIP
        >>> back = rotate_keys(model, turned, pos, inverse=True)          # doctest: +SKIP
    """
    module = _rotary_module(model)
    if module is None:
        return keys
    with torch.no_grad():
        cos, sin = module(keys.float(), positions.reshape(1, -1).to(keys.device))
    cos, sin = cos[:, None].to(torch.float32), sin[:, None].to(torch.float32)  # [1, 1, pos, rot]
    rot = cos.shape[-1]
    part, rest = keys[..., :rot].to(torch.float32), keys[..., rot:]
    half = part.shape[-1] // 2
    turned = torch.cat([-part[..., half:], part[..., :half]], dim=-1)
    if inverse:
        part = (part * cos - turned * sin) / (cos * cos + sin * sin)
    else:
        part = part * cos + turned * sin
    return torch.cat([part.to(keys.dtype), rest], dim=-1)


@dataclass(frozen=True)
class PassageKV:
    """A passage's per-layer keys (pre-RoPE) and values, batch 1, HF layout.

    Attributes:
        tokens: the passage's token ids (positions 0..n−1).
        keys: one ``[1, kv_heads, n, d_head]`` tensor per layer, before the rotary embedding.
        values: one ``[1, kv_heads, n, d_head]`` tensor per layer.
        model: the fingerprint of the model that computed them.
    """

    tokens: tuple[int, ...]
    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    model: str

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def of(cls, model, text_or_ids: str | Sequence[int]) -> PassageKV:
        """One prefill of the passage (as :func:`mechmem.prefix` encodes it), keys un-rotated.

        Example:
            >>> len(PassageKV.of(model, [5, 6, 7]))  # doctest: +SKIP
            3
        """
        return cls.from_prefix(model, prefix(model, text_or_ids))

    @classmethod
    def from_prefix(cls, model, stored: Prefix) -> PassageKV:
        """The pre-RoPE form of a plain :class:`mechmem.Prefix` (computed without interventions)."""
        if stored.interventions:
            raise ValueError("PassageKV: the prefix was computed with interventions")
        positions = torch.arange(len(stored))
        keys, values = [], []
        for layer_keys, layer_values in stored.cache.entries():
            keys.append(rotate_keys(model, layer_keys, positions, inverse=True).contiguous())
            values.append(layer_values.contiguous())
        return cls(tuple(stored.tokens), tuple(keys), tuple(values), stored.model)

    def prefix(self, model) -> Prefix:
        """The keys rotated once at positions 0..n−1, as a :class:`mechmem.Prefix` of ``model``.

        Example:
            >>> p = kv.prefix(model)                                          # doctest: +SKIP
            >>> generate(model, " Q: the code? A:", prefix=p, max_new_tokens=4)  # doctest: +SKIP
        """
        self.check(model)
        positions = torch.arange(len(self))
        device = torch.device(model.cfg.device)
        entries = [
            (rotate_keys(model, k.to(device), positions), v.to(device))
            for k, v in zip(self.keys, self.values)
        ]
        cache = HookedKVCache.of(kv_hook_points(model), entries)
        return Prefix(tokens=self.tokens, cache=cache, model=self.model)

    def check(self, model) -> None:
        """``ValueError`` unless this K/V belongs to ``model``."""
        here = model_fingerprint(model)
        if self.model != here:
            raise ValueError(f"PassageKV: computed by {self.model}, not by this model ({here})")
        if len(self.keys) != int(model.cfg.n_layers):
            raise ValueError(
                f"PassageKV: has {len(self.keys)} layers, the model {model.cfg.n_layers}"
            )

    def save(self, path: str | os.PathLike) -> None:
        """Write to one safetensors file atomically (keys ``k.{layer}``, ``v.{layer}``)."""
        tensors = {f"k.{i}": k for i, k in enumerate(self.keys)}
        tensors.update({f"v.{i}": v for i, v in enumerate(self.values)})
        meta = {"tokens": list(self.tokens), "model": self.model, "keys": "pre-rope"}
        write_session(path, meta, tensors, format_name=FORMAT)

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> PassageKV:
        """Read a saved ``PassageKV``; with ``model``, refuse one computed by another model."""
        meta, tensors = read_session(path, FORMAT, what="KV prefix")
        layers = sum(1 for key in tensors if key.startswith("k."))
        loaded = cls(
            tokens=tuple(meta["tokens"]),
            keys=tuple(tensors[f"k.{i}"] for i in range(layers)),
            values=tuple(tensors[f"v.{i}"] for i in range(layers)),
            model=meta["model"],
        )
        if model is not None:
            loaded.check(model)
        return loaded


@dataclass
class ResidualInjectionConfig(Config):
    """Configuration of :class:`ResidualInjection`.

    Attributes:
        layer: the injection layer (its ``hook_resid_pre``).
        gain: scale of the added vector (>= 0; 0 is the base model, bit for bit).
        row_gains: one gain per batch row (overrides ``gain``).
        vectors: one ``d_model`` vector per batch row, or a single vector for every row.
    """

    layer: int = 0
    gain: float = 1.0
    row_gains: list[float] | None = None
    vectors: list[list[float]] | None = None

    def validate(self) -> None:
        require(is_integer(self.layer) and self.layer >= 0, "layer", "must be >= 0", self.layer)
        require(math.isfinite(self.gain) and self.gain >= 0, "gain", "must be >= 0", self.gain)
        require(self.row_gains is None or len(self.row_gains) > 0, "row_gains", "must not be empty")
        for gain in self.row_gains or []:
            require(math.isfinite(gain) and gain >= 0, "row_gains", "each must be >= 0", gain)
        require(self.vectors is None or len(self.vectors) > 0, "vectors", "must not be empty")
        if self.vectors:
            sizes = {len(vector) for vector in self.vectors}
            require(len(sizes) == 1, "vectors", "must all have the same length", sorted(sizes))
            require(
                all(math.isfinite(x) for vector in self.vectors for x in vector),
                "vectors",
                "must be finite",
            )


class ResidualInjection(Intervention):
    """Adds ``gain_r · v_r`` to row r's ``blocks.{layer}.hook_resid_pre`` at every position.

    Example:
        >>> inject = ResidualInjection(layer=4, gain=0.5, vectors=[v.tolist()])  # doctest: +SKIP
        >>> generate(model, "Q: the code? A:", [inject], max_new_tokens=4)       # doctest: +SKIP
    """

    name = "nnm-inject"
    config_class = ResidualInjectionConfig

    @classmethod
    def of(
        cls, layer: int, vectors: Float[Tensor, "rows d"], gain: float = 1.0, **config
    ) -> ResidualInjection:
        """Build from a tensor of per-row vectors.

        Example:
            >>> len(ResidualInjection.of(2, torch.zeros(3, 8)).config.vectors)
            3
        """
        return cls(layer=layer, gain=gain, vectors=vectors.float().cpu().tolist(), **config)

    def hooks(self, model):
        self.check_layer(model, self.config.layer)
        d_model = int(model.cfg.d_model)
        vectors = self.config.vectors
        require(vectors is not None, "vectors", "must be given (one d_model vector per row)")
        require(
            len(vectors[0]) == d_model,
            "vectors",
            f"must have d_model = {d_model} entries",
            len(vectors[0]),
        )
        table = torch.tensor(vectors, dtype=torch.float32, device=model.cfg.device)

        def add(activation, hook):
            batch = activation.shape[0]
            gains = self._gains(batch)
            rows = [row for row, gain in enumerate(gains) if gain != 0]
            if not rows:
                return activation
            rows_vectors = table.expand(batch, -1)[rows].to(activation.dtype)
            scale = torch.tensor([gains[row] for row in rows], device=activation.device)
            out = activation.clone()
            added = activation[rows] + (scale[:, None] * rows_vectors)[:, None, :]
            out[rows] = added.to(out.dtype)
            return out

        return [(f"blocks.{self.config.layer}.hook_resid_pre", add)]

    def begin_step(self, context) -> None:
        super().begin_step(context)
        self._gains(context.batch_size)  # a wrong row count fails before the forward pass

    def _gains(self, batch: int) -> list[float]:
        vectors = self.config.vectors or []
        if len(vectors) not in (1, batch):
            raise ValueError(f"vectors: has {len(vectors)} rows but the batch has {batch}")
        return per_row(self.config.gain, self.config.row_gains, batch, "row_gains")
