"""DRµGS: rotate inner activations by small random angles, then decode greedily.

Five sites (the original's names in brackets), each hooked on every layer whose dose is non-zero:

| site | activation | hook |
| --- | --- | --- |
| ``H`` (heroin) | attention input (after the block's norm) | ``blocks.{l}.attn.hook_in`` |
| ``Q`` (quaaludes) | queries, before RoPE | ``blocks.{l}.attn.hook_q`` |
| ``K`` (ketamine) | keys after RoPE, full cached + new set | ``blocks.{l}.attn.hook_k_cached`` |
| ``V`` (valium) | values, the full cached + new set | ``blocks.{l}.attn.hook_v_cached`` |
| ``A`` (adderall) | per-head outputs, before the output projection | ``blocks.{l}.attn.hook_z`` |

K and V noise is redrawn at every forward pass on what attention reads, never written into the cache
(see :mod:`mechmem.core.kv_cache`). Each vector (a ``d_model`` vector for H, one ``d_head`` vector
per head otherwise) is rotated by θ ~ U(0, θ_ℓ) toward a random direction (:mod:`.rotation`), with
θ_ℓ = profile(ℓ/L) · dose (:mod:`.depth_profile`).

Per row: its own dose (``row_doses``, so a dose sweep runs as one batch), its own generator
(``row_seeds``; by default every row uses ``seed``, so a row's noise does not depend on the other
rows, only on the forward's width: a row draws for every column, padding included), and sink
protection of the first ``protect_first`` positions the model sees in that row. ``protect_inputs``
switches noise off during the prompt's prefill. The periodic cold shower is the engine's
``generate(..., clean_every=t)``: every t tokens the recent cache entries are recomputed with
every intervention off. The hooks never read the device on the host: which columns are perturbed
is computed once per step, as each column's peak angle (0 where it is protected), and each row
draws a step's noise for all the noisy layers of a site in one go (in runs of layers where
all of them would exceed :data:`_POOLED` numbers), so a hook only rotates.

Example:
    >>> from mechmem import Drugs, generate
    >>> from mechmem.methods.depth_profile import peak_profile
    >>> drugs = Drugs(sites=["H"], dose=0.1, profile=peak_profile(0.4, 0.2))
    >>> result = generate(model, "Once upon a time", [drugs], max_new_tokens=20)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from mechmem.core.config import Config, require
from mechmem.core.intervention import Intervention
from mechmem.core.kv_cache import kv_hook_name
from mechmem.methods.depth_profile import Interpolation, check_profile, profile_ratio
from mechmem.methods.rotation import Direction, Rotation, draw_directions, prepare, rotate_prepared
from mechmem.methods.rows import per_row, row_generators

Site = Literal["H", "Q", "K", "V", "A"]
SITES: tuple[Site, ...] = ("H", "Q", "K", "V", "A")
_HOOKS = {
    "H": "blocks.{layer}.attn.hook_in",
    "Q": "blocks.{layer}.attn.hook_q",
    "K": kv_hook_name("{layer}", "k_cached"),
    "V": kv_hook_name("{layer}", "v_cached"),
    "A": "blocks.{layer}.attn.hook_z",
}
_POOLED = 1 << 20  # most numbers a row draws at once for one site (4 MiB in fp32)


@dataclass
class DrugsConfig(Config):
    """Configuration of :class:`Drugs`.

    Attributes:
        sites: any of ``H Q K V A``.
        dose: peak angle in radians (0 ≤ dose ≤ π); the author advised ≤ 0.1.
        row_doses: one dose per batch row (overrides ``dose``), for batched dose sweeps.
        profile: (depth, ratio) points; the default applies the full dose at every depth.
        interpolation: ``interpolate``, ``ceil`` or ``floor`` between profile points.
        direction: ``faithful`` (uniform positive-orthant draws, as the original) or
            ``isotropic`` (Gaussian draws).
        protect_first: positions (as the model sees them, per row) never perturbed: attention sinks.
        protect_inputs: no noise during the prompt's prefill.
        seed: seed of every row's generator, unless ``row_seeds`` gives one per row.
        row_seeds: one seed per batch row.
    """

    sites: list[Site] = field(default_factory=lambda: ["H"])
    dose: float = 0.1
    row_doses: list[float] | None = None
    profile: list[tuple[float, float]] = field(default_factory=lambda: [(0.0, 1.0), (1.0, 1.0)])
    interpolation: Interpolation = "interpolate"
    direction: Direction = "faithful"
    protect_first: int = 6
    protect_inputs: bool = False
    seed: int = 0
    row_seeds: list[int] | None = None

    def validate(self) -> None:
        require(len(self.sites) > 0, "sites", f"name at least one of {SITES}")
        require(len(set(self.sites)) == len(self.sites), "sites", "must not repeat", self.sites)
        require(0.0 <= self.dose <= math.pi, "dose", "must be in [0, pi] radians", self.dose)
        if self.row_doses is not None:
            require(len(self.row_doses) > 0, "row_doses", "must not be empty")
            for dose in self.row_doses:
                require(0.0 <= dose <= math.pi, "row_doses", "each must be in [0, pi]", dose)
        check_profile(self.profile)
        require(self.protect_first >= 0, "protect_first", "must be >= 0", self.protect_first)
        if self.row_seeds is not None:
            require(len(self.row_seeds) > 0, "row_seeds", "must not be empty")
        if self.row_doses is not None and self.row_seeds is not None:
            require(
                len(self.row_doses) == len(self.row_seeds),
                "row_seeds",
                "must have as many entries as row_doses",
                self.row_seeds,
            )


class Drugs(Intervention):
    """DRµGS noise: norm-preserving random rotations at chosen sites inside attention."""

    name = "drugs"
    config_class = DrugsConfig
    state_attributes = ("_row_generators",)

    def reset(self, device=None) -> None:
        super().reset(device)
        self._device = device or "cpu"
        self._row_generators: list[torch.Generator] = []
        self._doses: Tensor | None = None

    def layer_angles(self, n_layers: int) -> list[float]:
        """Peak angle θ_ℓ / dose of each layer: the profile at depth ℓ / L."""
        c = self.config
        return [
            profile_ratio(c.profile, layer / n_layers, c.interpolation) for layer in range(n_layers)
        ]

    def begin_step(self, context) -> None:
        super().begin_step(context)
        batch = context.batch_size
        c = self.config
        doses = per_row(c.dose, c.row_doses, batch, "row_doses")
        seeds = per_row(c.seed, c.row_seeds, batch, "row_seeds")
        if len(self._row_generators) != batch:
            self._row_generators = row_generators(seeds, self._device)
        if self._doses is None or len(self._doses) != batch:
            self._doses = torch.tensor(doses, device=context.positions.device)
            self._dosed = any(dose > 0 for dose in doses)
        self._angle_scales: dict[bool, Tensor] = {}
        self._noise: dict[tuple, list[Rotation]] = {}

    def _angle_scale(self, full_set: bool) -> Tensor:
        """Each column's peak angle at a layer of ratio 1, ``[batch, columns]``: the row's dose
        where the column is perturbed (past the sinks), 0 elsewhere, for the new tokens or the
        full key/value set. Computed once per step on the device and never read on the host. An
        angle of 0 leaves a vector exactly as it was, so no mask is applied afterwards."""
        if full_set not in self._angle_scales:
            context = self.context
            position_ids = context.key_position_ids if full_set else context.position_ids
            perturbed = position_ids >= self.config.protect_first
            self._angle_scales[full_set] = self._doses[:, None] * perturbed
        return self._angle_scales[full_set]

    def _step_noise(self, site: Site, index: int, activation: Tensor) -> Rotation:
        """This step's rotation of every vector (``[batch * vectors, ...]``) for the ``index``-th
        noisy layer of ``site``.

        Drawn once per step for a run of consecutive noisy layers (all of them, unless that would
        hold more than :data:`_POOLED` numbers a row), every row from its own generator, and the
        rotation prepared in the same few kernels: a hook then only picks its layer's slice.
        """
        d = activation.shape[-1]
        vectors = math.prod(activation.shape[1:-1])  # columns x heads, per row
        run = max(1, min(len(self._ratios), _POOLED // max(1, vectors * (d + 1))))
        key = (site, activation.shape, index // run)
        if key not in self._noise:
            first = index - index % run
            ratios = self._ratios[first : first + run]
            self._noise[key] = self._draw(ratios, vectors, activation, full_set=site in ("K", "V"))
        return self._noise[key][index % run]

    def _draw(self, ratios: Tensor, vectors: int, like: Tensor, full_set: bool) -> list[Rotation]:
        """The rotation of ``[batch * vectors]`` vectors for each layer of these ``ratios``."""
        layers, d = len(ratios), like.shape[-1]
        draw = dict(device=like.device, dtype=like.dtype)
        fractions, directions = [], []
        for generator in self._row_generators:
            fractions.append(torch.rand((layers, vectors), generator=generator, **draw))
            directions.append(
                draw_directions((layers, vectors, d), self.config.direction, generator, **draw)
            )
        scale = self._angle_scale(full_set).to(like.dtype)
        peak = ratios.to(like)[:, None, None, None] * scale[..., None]
        angles = _by_layer(fractions).view(layers, *scale.shape, -1) * peak
        rotation = prepare(angles.view(layers, -1), _by_layer(directions).view(layers, -1, d))
        return [Rotation(*fields) for fields in zip(*(field.unbind() for field in rotation))]

    def hooks(self, model):
        n_layers = int(model.cfg.n_layers)
        noisy = [(layer, ratio) for layer, ratio in enumerate(self.layer_angles(n_layers)) if ratio]
        self._ratios = torch.tensor([ratio for _, ratio in noisy], dtype=torch.float64)
        return [
            (_HOOKS[site].format(layer=layer), self._make_hook(site, index))
            for index, (layer, _) in enumerate(noisy)
            for site in self.config.sites
        ]

    def _make_hook(self, site: Site, index: int):
        def perturb(activation, hook):
            context = self.context
            if context is None or not self._dosed:
                return None
            if self.config.protect_inputs and context.phase == "prefill":
                return None
            # Every row draws for every one of its vectors, perturbed or not: no count is read
            # on the host, and a row's noise depends on its own seed and the forward's width,
            # not on the other rows. The rotation runs once over the batch; vectors that are
            # not perturbed get an angle of 0, which leaves them as they were.
            rotation = self._step_noise(site, index, activation)
            vectors = activation.reshape(-1, activation.shape[-1])
            return rotate_prepared(vectors, rotation).view(activation.shape)

        return perturb


def _by_layer(rows: list[Tensor]) -> Tensor:
    """Per-row draws ``[layers, ...]`` stacked to ``[layers, batch, ...]`` (one row: no copy)."""
    return rows[0][:, None] if len(rows) == 1 else torch.stack(rows, 1)
