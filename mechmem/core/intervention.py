"""The Intervention base class: a validated config, state, hooks and a seeded generator.

An intervention declares ``hooks(model) -> [(hook_name, fn)]``; the engine validates every name
before any compute, calls :meth:`Intervention.reset` at the start of a generation (fresh state,
fresh ``torch.Generator`` seeded from the config) and :meth:`Intervention.begin_step` with a
:class:`~mechmem.core.context.StepContext` before every forward pass. A list of interventions
applies in order. At zero strength an intervention must leave the logits exactly unchanged.

Subclasses register themselves under ``name`` so that :func:`intervention_from_dict` can rebuild
any of them from JSON.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class ScaleConfig(Config):
    ...     layer: int = 0
    ...     factor: float = 1.0
    >>> class Scale(Intervention):
    ...     name = "scale-doc"
    ...     config_class = ScaleConfig
    ...     def hooks(self, model):
    ...         self.check_layer(model, self.config.layer)
    ...         return [(f"blocks.{self.config.layer}.hook_resid_post",
    ...                  lambda x, hook: x * self.config.factor)]
    >>> Scale(factor=2.0).to_dict()
    {'type': 'scale-doc', 'layer': 0, 'factor': 2.0}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from mechmem.core.config import Config
from mechmem.core.context import StepContext
from mechmem.core.hooks import HookSpec

_REGISTRY: dict[str, type[Intervention]] = {}


class Intervention:
    """Base class of every mechmem intervention.

    Attributes:
        name: registry key, written as ``"type"`` by :meth:`to_dict`.
        config_class: the :class:`~mechmem.core.config.Config` subclass of this intervention.
        config: the validated config.
        context: the latest :class:`StepContext` (``None`` outside a forward pass).
        generator: this intervention's own random generator (see :meth:`reset`).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[Config]] = Config

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            _REGISTRY[cls.name] = cls

    def __init__(self, config: Config | dict | None = None, **overrides: Any) -> None:
        if isinstance(config, dict):
            config = self.config_class.from_dict({**config, **overrides})
        elif config is None:
            config = self.config_class.from_dict(overrides)
        elif overrides:
            config = config.replace(**overrides)
        if not isinstance(config, self.config_class):
            raise ValueError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        self.config = config
        self.context: StepContext | None = None
        self.generator: torch.Generator | None = None
        self.reset()

    def hooks(self, model) -> list[HookSpec]:
        """``(hook_name, fn)`` pairs to attach; ``ValueError`` if the model lacks something."""
        raise NotImplementedError

    def reset(self, device: torch.device | str | None = None) -> None:
        """Forget all state and reseed the generator from ``config.seed`` (0 if it has none)."""
        seed = int(getattr(self.config, "seed", 0))
        self.generator = torch.Generator(device=device or "cpu").manual_seed(seed)

    def begin_step(self, context: StepContext) -> None:
        """Called by the engine before every forward pass."""
        self.context = context

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description: ``{"type": name, **config}``."""
        return {"type": self.name, **self.config.to_dict()}

    @staticmethod
    def check_layer(model, layer: int, field: str = "layer") -> None:
        """Raise ``ValueError`` naming ``field`` unless ``layer`` is one of the model's layers."""
        n_layers = model.cfg.n_layers
        if not isinstance(layer, int) or not 0 <= layer < n_layers:
            raise ValueError(
                f"{field}: layer {layer!r} is out of range; the model has {n_layers} layers "
                f"(0..{n_layers - 1})"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def intervention_from_dict(data: dict[str, Any]) -> Intervention:
    """Rebuild any registered intervention from its :meth:`Intervention.to_dict` form.

    Example:
        >>> intervention_from_dict({"type": "identity", "layers": [0]}).name
        'identity'
    """
    if not isinstance(data, dict) or "type" not in data:
        raise ValueError("an intervention dict needs a 'type' key")
    kind = data["type"]
    if kind not in _REGISTRY:
        raise ValueError(f"unknown intervention type {kind!r}; known: {sorted(_REGISTRY)}")
    config = {k: v for k, v in data.items() if k != "type"}
    return _REGISTRY[kind](config)


def as_intervention_list(interventions: Intervention | Sequence[Intervention] | None):
    """Normalise ``None`` / one intervention / a sequence into a list, type-checked.

    Example:
        >>> as_intervention_list(None)
        []
    """
    if interventions is None:
        return []
    if isinstance(interventions, Intervention):
        return [interventions]
    items = list(interventions)
    for item in items:
        if not isinstance(item, Intervention):
            raise ValueError(f"expected Intervention objects, got {type(item).__name__}")
    return items
