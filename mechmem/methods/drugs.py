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
(``row_seeds``; by default every row uses ``seed``, so a row's noise does not depend on the rest
of the batch), and sink protection of the first ``protect_first`` positions the model sees in that
row. ``protect_inputs`` switches noise off during the prompt's prefill. The periodic cold shower is
the engine's ``generate(..., clean_every=t)``: every t tokens the recent cache entries are
recomputed with every intervention off.

Example:
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
from mechmem.methods.rotation import Direction, draw_directions, rotate

Site = Literal["H", "Q", "K", "V", "A"]
SITES: tuple[Site, ...] = ("H", "Q", "K", "V", "A")
_HOOKS = {
    "H": "blocks.{layer}.attn.hook_in",
    "Q": "blocks.{layer}.attn.hook_q",
    "K": kv_hook_name("{layer}", "k_cached"),
    "V": kv_hook_name("{layer}", "v_cached"),
    "A": "blocks.{layer}.attn.hook_z",
}


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
        for name, values in (("row_doses", c.row_doses), ("row_seeds", c.row_seeds)):
            if values is not None and len(values) != batch:
                raise ValueError(
                    f"{name}: has {len(values)} entries but the batch has {batch} rows"
                )
        if len(self._row_generators) != batch:
            seeds = c.row_seeds or [c.seed] * batch
            self._row_generators = [
                torch.Generator(device=self._device).manual_seed(s) for s in seeds
            ]
        self._doses = torch.tensor(c.row_doses or [c.dose] * batch, device=context.positions.device)
        self._eligible: dict[bool, tuple[Tensor, list[int]]] = {}

    def _eligibility(self, full_set: bool) -> tuple[Tensor, list[int]]:
        """This step's perturbed positions (past the sinks, in rows with a dose > 0) and their
        count per row, for the new tokens or the full key/value set; computed once per step,
        since it is the same at every layer (a hooked layer's angle ratio is > 0)."""
        if full_set not in self._eligible:
            context = self.context
            position_ids = context.key_position_ids if full_set else context.position_ids
            eligible = (position_ids >= self.config.protect_first) & (self._doses[:, None] > 0)
            self._eligible[full_set] = (eligible, eligible.sum(-1).tolist())
        return self._eligible[full_set]

    def hooks(self, model):
        n_layers = int(model.cfg.n_layers)
        ratios = self.layer_angles(n_layers)
        specs = []
        for layer, ratio in enumerate(ratios):
            if ratio == 0.0:
                continue
            for site in self.config.sites:
                name = _HOOKS[site].format(layer=layer)
                specs.append((name, self._make_hook(ratio, full_set=site in ("K", "V"))))
        return specs

    def _make_hook(self, ratio: float, full_set: bool):
        def perturb(activation, hook):
            context = self.context
            if context is None or (self.config.protect_inputs and context.phase == "prefill"):
                return None
            eligible, counts = self._eligibility(full_set)
            angles = self._doses * ratio
            if not any(counts):
                return None
            # Each row draws from its own generator (its noise must not depend on the rest of the
            # batch); the rotation itself runs once over every eligible vector of the batch.
            vectors = activation[eligible]  # [n_eligible, (heads,) d]
            per_column = vectors[..., 0].numel() // sum(counts)
            d = vectors.shape[-1]
            thetas, directions = [], []
            for row, count in enumerate(counts):
                if count:
                    n, generator = count * per_column, self._row_generators[row]
                    draw = dict(generator=generator, device=vectors.device, dtype=vectors.dtype)
                    thetas.append(torch.rand(n, **draw) * angles[row])
                    directions.append(draw_directions((n, d), self.config.direction, **draw))
            rotated = rotate(vectors.reshape(-1, d), torch.cat(thetas), torch.cat(directions))
            out = activation.clone()
            out[eligible] = rotated.reshape(vectors.shape)
            return out

        return perturb
