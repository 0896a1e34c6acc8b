"""RD-Net: a memory whose keys drift on a schedule, read at every generated token (seed 000).

Two modes, every constant in :class:`RDNetConfig`:

- ``faithful`` — the original's logit-space slot memory. Frozen keys K and values V
  (``n_slots × d``, N(0, init_std²)) and a frozen projection W_p (``d × vocab``,
  N(0, projection_std²)), all drawn from ``seed``. At generated token s (counted from 1) with
  h = the final norm's output at the newest position: K̃ = K + σ(s)·ε (fresh ε every step, keys
  only), a = softmax_i(cos(K̃_i, h) / cosine_temperature), logits += gain · W_pᵀ (aᵀV).
- ``fast_weight`` — a Hebbian fast-weight memory on ``blocks.{layer}.hook_resid_post`` (Ba et al.
  2016). With q = x / ‖x‖ the residual at the newest position: read r = (A + σ(s)·E) q with
  E_ij ~ N(0, 1/d) fresh every step, add gain · ‖x‖ · r to the residual, then write
  A ← decay · A + learning_rate · q qᵀ and rescale A to Frobenius norm ``max_norm`` if it is
  larger. For a unit q, E q ~ N(0, I/d), so the drift term is drawn as a d-vector (same
  distribution, d draws instead of d²). With the defaults ‖A‖ ≤ learning_rate / (1 − decay) = 1.

The drift schedule is :func:`drift_sigma`. Both modes act only at the newest position of each
forward pass (the prompt's last token at the prefill, the fed token afterwards), so there is one
memory step per generated token. ``gain`` (or ``row_gains``, one per batch row) scales what the
memory adds; a row with gain 0 is left untouched, bit for bit, and draws nothing. Each row has
its own state (drift generator seeded from ``row_seeds``, its own fast-weight matrix), so arms
of one seed run as one batch and a row equals its run alone. The frozen faithful memory (K, V,
W_p) comes from ``seed`` and is shared by the rows. :meth:`RDNet.callback` logs the step's σ and
each row's memory and read-out norms.

Example:
    >>> rdnet = RDNet(mode="faithful", gain=1.0, seed=0)
    >>> result = generate(model, "Once upon a time", [rdnet], max_new_tokens=20,
    ...                   do_sample=True, temperature=0.8)  # doctest: +SKIP
    >>> rdnet.state()["sigma"]                               # doctest: +SKIP
    0.12...
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechmem.core.config import Config, is_integer, require
from mechmem.core.intervention import Intervention
from mechmem.methods.rows import per_row, row_generators

Mode = Literal["faithful", "fast_weight"]
MODES: tuple[Mode, ...] = ("faithful", "fast_weight")


def drift_sigma(
    step: int, floor: float = 0.006, span: float = 0.114, horizon: int = 200_000
) -> float:
    """σ(s) = floor + span · max(0, 1 − log10(1 + 9p)), p = min(s / horizon, 1).

    Example:
        >>> [round(drift_sigma(s), 4) for s in (10_000, 50_000, 150_000, 200_000)]
        [0.1016, 0.0616, 0.0186, 0.006]
    """
    progress = min(step / horizon, 1.0)
    return floor + span * max(0.0, 1.0 - math.log10(1.0 + 9.0 * progress))


def fast_weight_step(
    memory: Float[Tensor, "d d"],
    x: Float[Tensor, " d"],
    drift: Float[Tensor, " d"],
    *,
    decay: float,
    learning_rate: float,
    max_norm: float,
) -> tuple[Float[Tensor, " d"], Float[Tensor, "d d"]]:
    """One fast-weight step: the read-out for ``x`` (drift included), then the Hebbian write.

    ``drift`` is σ · (E q), already drawn. Returns ``(read-out r, new memory)``; the caller adds
    ``gain · ‖x‖ · r`` to the residual.

    Example:
        >>> r, a = fast_weight_step(torch.zeros(2, 2), torch.tensor([3.0, 4.0]), torch.zeros(2),
        ...                         decay=0.5, learning_rate=0.5, max_norm=1.0)
        >>> r.tolist(), a.norm().item()
        ([0.0, 0.0], 0.5)
    """
    q = x / x.norm().clamp_min(1e-12)
    read = memory @ q + drift
    memory = decay * memory + learning_rate * torch.outer(q, q)
    norm = memory.norm()
    if norm > max_norm:
        memory = memory * (max_norm / norm)
    return read, memory


@dataclass
class RDNetConfig(Config):
    """Configuration of :class:`RDNet`.

    Attributes:
        mode: ``faithful`` (logit-space slot memory) or ``fast_weight`` (residual-stream memory).
        gain: scales what the memory adds (>= 0; 0 is the base model, bit for bit).
        row_gains: one gain per batch row (overrides ``gain``).
        seed: seed of the frozen faithful memory, and of every row's drift unless ``row_seeds``.
        row_seeds: one drift seed per batch row.
        sigma_floor, sigma_span, drift_horizon: the drift schedule (:func:`drift_sigma`).
        n_slots: faithful: number of key/value slots.
        init_std: faithful: std of the frozen keys and values.
        projection_std: faithful: std of the frozen projection to the vocabulary.
        cosine_temperature: faithful: softmax temperature of the key cosines.
        layer: fast_weight: the residual stream's layer (``None``: the middle layer).
        decay: fast_weight: λ in A ← λA + η q qᵀ, in [0, 1).
        learning_rate: fast_weight: η.
        max_norm: fast_weight: bound on ‖A‖_F.
    """

    mode: Mode = "faithful"
    gain: float = 1.0
    row_gains: list[float] | None = None
    seed: int = 0
    row_seeds: list[int] | None = None
    sigma_floor: float = 0.006
    sigma_span: float = 0.114
    drift_horizon: int = 200_000
    n_slots: int = 2048
    init_std: float = 0.02
    projection_std: float = 0.02
    cosine_temperature: float = 0.1
    layer: int | None = None
    decay: float = 0.95
    learning_rate: float = 0.05
    max_norm: float = 1.0

    def validate(self) -> None:
        require(math.isfinite(self.gain) and self.gain >= 0, "gain", "must be >= 0", self.gain)
        for name in ("row_gains", "row_seeds"):
            values = getattr(self, name)
            require(values is None or len(values) > 0, name, "must not be empty")
        for gain in self.row_gains or []:
            require(math.isfinite(gain) and gain >= 0, "row_gains", "each must be >= 0", gain)
        if self.row_gains is not None and self.row_seeds is not None:
            require(
                len(self.row_gains) == len(self.row_seeds),
                "row_seeds",
                "must have as many entries as row_gains",
                self.row_seeds,
            )
        for name in ("sigma_floor", "sigma_span", "learning_rate"):
            value = getattr(self, name)
            require(math.isfinite(value) and value >= 0, name, "must be >= 0", value)
        for name in ("init_std", "projection_std", "cosine_temperature", "max_norm"):
            value = getattr(self, name)
            require(math.isfinite(value) and value > 0, name, "must be > 0", value)
        require(self.drift_horizon >= 1, "drift_horizon", "must be >= 1", self.drift_horizon)
        require(self.n_slots >= 1, "n_slots", "must be >= 1", self.n_slots)
        require(0 <= self.decay < 1, "decay", "must be in [0, 1)", self.decay)
        require(
            self.layer is None or (is_integer(self.layer) and self.layer >= 0),
            "layer",
            "must be None or an integer >= 0",
            self.layer,
        )


class RDNet(Intervention):
    """RD-Net drift-injected memory, ``faithful`` or ``fast_weight`` (see the module docs)."""

    name = "rdnet"
    config_class = RDNetConfig
    state_attributes = ("_generators", "_fast")  # kept across session turns, saved with them

    def reset(self, device=None) -> None:
        super().reset(device)
        self._device = device or "cpu"
        self._generators: list[torch.Generator] = []
        self._gains: list[float] = []
        self._hidden: Tensor | None = None
        self._fast: Tensor | None = None
        self._sigma = 0.0
        self._memory_norms: list[float | None] = []
        self._readout_norms: list[float | None] = []
        # the frozen faithful memory depends only on the config: kept across resets
        self._frozen: dict[tuple, tuple[Tensor, ...]] = getattr(self, "_frozen", {})

    def sigma(self, step: int) -> float:
        """The configured drift σ at generated token ``step`` (counted from 1)."""
        c = self.config
        return drift_sigma(step, c.sigma_floor, c.sigma_span, c.drift_horizon)

    def layer(self, model) -> int:
        """The fast-weight layer on ``model`` (the configured one, or the middle layer)."""
        n_layers = int(model.cfg.n_layers)
        return n_layers // 2 if self.config.layer is None else self.config.layer

    def hooks(self, model):
        if self.config.mode == "fast_weight":
            layer = self.layer(model)
            self.check_layer(model, layer)
            return [(f"blocks.{layer}.hook_resid_post", self._fast_weight_hook)]
        self._memory(int(model.cfg.d_model), int(model.cfg.d_vocab), model.cfg.device)
        # The final norm is applied here to the last block's output rather than read at
        # ln_final.hook_out: a hook inside the norm would move the model off its fast path
        # (mechmem.core.fastpath), whose numbers differ in the last bits, and gain 0 must be
        # the base model bit for bit.
        self._final_norm = model.ln_final.original_component
        last = int(model.cfg.n_layers) - 1
        return [
            (f"blocks.{last}.hook_resid_post", self._keep_hidden),
            ("unembed.hook_out", self._faithful_hook),
        ]

    def _memory(self, d_model: int, vocab: int, device) -> tuple[Tensor, ...]:
        """The frozen keys, values and projection (drawn once per shape from ``seed``)."""
        c = self.config
        key = (d_model, vocab, str(device))
        if key not in self._frozen:
            generator = torch.Generator().manual_seed(c.seed)
            keys = torch.randn(c.n_slots, d_model, generator=generator) * c.init_std
            values = torch.randn(c.n_slots, d_model, generator=generator) * c.init_std
            projection = torch.randn(d_model, vocab, generator=generator) * c.projection_std
            self._frozen = {key: tuple(t.to(device) for t in (keys, values, projection))}
        return self._frozen[key]

    def begin_step(self, context) -> None:
        super().begin_step(context)
        c, batch = self.config, context.batch_size
        self._gains = per_row(c.gain, c.row_gains, batch, "row_gains")
        if len(self._generators) != batch:
            seeds = per_row(c.seed, c.row_seeds, batch, "row_seeds")
            self._generators = row_generators(seeds, self._device)
        self._sigma = self.sigma(context.step + 1)

    def _active_rows(self) -> list[int]:
        return [row for row, gain in enumerate(self._gains) if gain != 0]

    def _keep_hidden(self, activation, hook):
        if self._active_rows():
            self._hidden = self._final_norm(activation[:, -1:])[:, 0].detach()

    def _faithful_hook(self, activation, hook):
        rows = self._active_rows()
        self._memory_norms = [None] * len(self._gains)
        self._readout_norms = [None] * len(self._gains)
        if not rows or self._hidden is None:
            return None
        keys, values, projection = self._memory(
            self._hidden.shape[-1], activation.shape[-1], activation.device
        )
        drifted = torch.empty_like(keys)  # one buffer for every row's K + σ·ε
        reads = []
        for row in rows:
            drifted.normal_(generator=self._generators[row]).mul_(self._sigma).add_(keys)
            slot_norms = drifted.norm(dim=-1)
            h = self._hidden[row].to(keys.dtype)
            cosines = (drifted @ h) / (slot_norms * h.norm()).clamp_min(1e-8)
            weights = (cosines / self.config.cosine_temperature).softmax(-1)
            reads.append(weights @ values)
            self._memory_norms[row] = float(slot_norms.square().sum().sqrt())
        gains = torch.tensor([self._gains[row] for row in rows], device=keys.device)
        shifts = gains[:, None] * (torch.stack(reads) @ projection)  # one pass over W_p
        out = activation.clone()
        out[rows, -1] += shifts.to(out.dtype)
        for row, shift in zip(rows, shifts):
            self._readout_norms[row] = float(shift.norm())
        return out

    def _fast_weight_hook(self, activation, hook):
        rows = self._active_rows()
        self._memory_norms = [None] * len(self._gains)
        self._readout_norms = [None] * len(self._gains)
        if not rows:
            return None
        d = activation.shape[-1]
        if self._fast is None or self._fast.shape[0] != len(self._gains):
            self._fast = torch.zeros(
                len(self._gains), d, d, device=activation.device, dtype=torch.float32
            )
        c = self.config
        out = activation.clone()
        for row in rows:
            x = activation[row, -1].float()
            drift = torch.randn(
                d, generator=self._generators[row], device=x.device, dtype=x.dtype
            ) * (self._sigma / math.sqrt(d))
            read, self._fast[row] = fast_weight_step(
                self._fast[row],
                x,
                drift,
                decay=c.decay,
                learning_rate=c.learning_rate,
                max_norm=c.max_norm,
            )
            shift = self._gains[row] * x.norm() * read
            out[row, -1] += shift.to(out.dtype)
            self._memory_norms[row] = float(self._fast[row].norm())
            self._readout_norms[row] = float(shift.norm())
        return out

    def state(self) -> dict[str, Any]:
        """The latest step's drift σ and, per row, the memory's norm (‖K̃‖_F of the drifted keys
        for faithful, ‖A‖_F for fast_weight) and the norm of what the memory added (to the
        logits, or to the residual); ``None`` for rows with gain 0."""
        step = 0 if self.context is None else self.context.step + 1
        return {
            "step": step,
            "sigma": self._sigma,
            "memory_norm": list(self._memory_norms),
            "readout_norm": list(self._readout_norms),
        }

    def callback(self):
        """A ``generate(callbacks=[...])`` function returning :meth:`state` for the logs.

        Example:
            >>> result = generate(model, "Hi", [rdnet], max_new_tokens=200,   # doctest: +SKIP
            ...                   callbacks=[rdnet.callback()], callback_every=100)
            >>> result.logs[0]["sigma"]                                       # doctest: +SKIP
            0.1199...
        """

        def log(progress) -> dict[str, Any]:
            return self.state()

        return log
