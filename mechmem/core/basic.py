"""Two elementary interventions: a do-nothing hook (baseline and overhead measure) and an
additive steering vector.

Example:
    >>> Identity(layers=[0, 1]).to_dict()
    {'type': 'identity', 'layers': [0, 1], 'hook': 'hook_resid_post'}
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mechmem.core.config import Config, require
from mechmem.core.intervention import Intervention


def _layer_hook(layer: int, hook: str) -> str:
    """Full hook name for a per-layer site such as ``hook_resid_post`` or ``attn.hook_z``."""
    return f"blocks.{layer}.{hook}"


@dataclass
class IdentityConfig(Config):
    layers: list[int] = field(default_factory=lambda: [0])
    hook: str = "hook_resid_post"

    def validate(self) -> None:
        require(len(self.layers) > 0, "layers", "must name at least one layer")
        require(bool(self.hook), "hook", "must be a per-layer hook name")


class Identity(Intervention):
    """Hooks ``blocks.{l}.{hook}`` on every listed layer and returns the activation untouched."""

    name = "identity"
    config_class = IdentityConfig

    def hooks(self, model):
        for layer in self.config.layers:
            self.check_layer(model, layer, "layers")

        def unchanged(activation, hook):
            return activation

        return [(_layer_hook(layer, self.config.hook), unchanged) for layer in self.config.layers]


@dataclass
class SteerConfig(Config):
    layer: int = 0
    scale: float = 1.0
    hook: str = "hook_resid_post"
    direction: list[float] | None = None
    seed: int = 0

    def validate(self) -> None:
        require(bool(self.hook), "hook", "must be a per-layer hook name")
        if self.direction is not None:
            require(len(self.direction) > 0, "direction", "must not be empty")


class Steer(Intervention):
    """Adds ``scale`` times a unit direction to ``blocks.{layer}.{hook}`` at every position.

    The direction is ``config.direction`` (normalised) or, when ``None``, a random unit vector
    drawn from this intervention's own generator. ``scale=0`` leaves the logits exactly unchanged.
    """

    name = "steer"
    config_class = SteerConfig

    def hooks(self, model):
        self.check_layer(model, self.config.layer)
        d_model = int(model.cfg.d_model)
        if self.config.direction is not None:
            require(
                len(self.config.direction) == d_model,
                "direction",
                f"must have d_model = {d_model} entries",
                len(self.config.direction),
            )
            direction = torch.tensor(self.config.direction, dtype=torch.float32)
        else:
            direction = torch.randn(
                d_model, generator=torch.Generator().manual_seed(self.config.seed)
            )
        direction = (direction / direction.norm()).to(model.cfg.device)  # moved once, not per call

        def add(activation, hook):
            if self.config.scale == 0:
                return activation
            vector = direction.to(activation.device, activation.dtype)
            return activation + self.config.scale * vector

        return [(_layer_hook(self.config.layer, self.config.hook), add)]
