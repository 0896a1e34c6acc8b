"""The Intervention base class: a validated config, state, hooks and a seeded generator.

An intervention declares ``hooks(model) -> [(hook_name, fn)]``; the engine validates every name
before any compute, calls :meth:`Intervention.reset` at the start of a generation (fresh state,
fresh ``torch.Generator`` seeded from the config) and :meth:`Intervention.begin_step` with a
:class:`~mechmem.core.context.StepContext` before every forward pass. A list of interventions
applies in order. At zero strength an intervention must leave the logits exactly unchanged.

Subclasses register themselves under ``name`` so that :func:`intervention_from_dict` can rebuild
any of them from JSON. State that must survive a saved session or a rewound turn (memories,
per-row generators, counters) is named in ``state_attributes``; :meth:`Intervention.state_dict`
turns it into tensors and :meth:`Intervention.load_state_dict` puts it back.

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
from torch import Tensor

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
    state_attributes: ClassVar[tuple[str, ...]] = ()

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

    def state_dict(self) -> dict[str, Tensor]:
        """A copy of this intervention's state as CPU tensors: its generator and every attribute
        named in ``state_attributes`` (a tensor, a generator, an int or float, ``None``, or a list
        of those).

        Example:
            >>> sorted(Steer().state_dict())  # doctest: +SKIP
            ['generator#generator']
        """
        state: dict[str, Tensor] = {}
        _pack(state, "generator", self.generator)
        for attribute in self.state_attributes:
            value = getattr(self, attribute)
            if isinstance(value, list):
                for index, item in enumerate(value):
                    _pack(state, f"{attribute}.{index}", item)
            else:
                _pack(state, attribute, value)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (tensors go to the generator's device).

        Example:
            >>> saved = drugs.state_dict()                       # doctest: +SKIP
            >>> drugs.reset(); drugs.load_state_dict(saved)      # doctest: +SKIP
        """
        stored = {key.split("#")[0] for key in state}
        unknown = {key.split(".")[0] for key in stored} - {"generator", *self.state_attributes}
        if unknown:
            raise ValueError(f"{self.name}: the state has unknown entries {sorted(unknown)}")
        device = self.generator.device
        self.generator = _unpack(state, "generator", device)
        for attribute in self.state_attributes:
            if isinstance(getattr(self, attribute), list) or f"{attribute}.0" in stored:
                count = sum(1 for key in stored if key.startswith(f"{attribute}."))
                items = [_unpack(state, f"{attribute}.{i}", device) for i in range(count)]
                setattr(self, attribute, items)
            else:
                setattr(self, attribute, _unpack(state, attribute, device))

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


def _pack(state: dict[str, Tensor], key: str, value: Any) -> None:
    """Store ``value`` under ``key``, its kind after a ``#`` (nothing is stored for ``None``)."""
    if value is None:
        return
    if isinstance(value, torch.Generator):
        state[f"{key}#generator"] = value.get_state().clone()
    elif isinstance(value, Tensor):
        state[f"{key}#tensor"] = value.detach().to("cpu", copy=True)
    elif isinstance(value, bool | int | float):
        state[f"{key}#{type(value).__name__}"] = torch.tensor(value)
    else:
        raise TypeError(f"state entry {key!r}: cannot store a {type(value).__name__}")


def _unpack(state: dict[str, Tensor], key: str, device: torch.device) -> Any:
    """The value :func:`_pack` stored under ``key``, or ``None``."""
    if (saved := state.get(f"{key}#generator")) is not None:
        generator = torch.Generator(device=device)
        generator.set_state(saved.clone())
        return generator
    if (saved := state.get(f"{key}#tensor")) is not None:
        return saved.to(device, copy=True)
    for kind in (bool, int, float):
        if (saved := state.get(f"{key}#{kind.__name__}")) is not None:
            return kind(saved.item())
    return None


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
