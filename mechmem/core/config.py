"""Validated, JSON round-trippable configuration dataclasses.

A config subclasses :class:`Config`, declares its fields as a dataclass and checks its values in
``validate()``; construction validates, unknown keys in :meth:`Config.from_dict` raise
``ValueError`` naming the key, and ``to_dict`` / ``from_dict`` round-trip through JSON.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Gain(Config):
    ...     gain: float = 1.0
    ...     def validate(self):
    ...         require(self.gain >= 0, "gain", "must be >= 0", self.gain)
    >>> Gain.from_dict({"gain": 2.0}).to_dict()
    {'gain': 2.0}
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

C = TypeVar("C", bound="Config")


def require(condition: bool, field: str, message: str, value: Any = None) -> None:
    """Raise ``ValueError`` naming ``field`` unless ``condition`` holds.

    Example:
        >>> require(True, "dose", "must be >= 0")
    """
    if not condition:
        shown = "" if value is None else f" (got {value!r})"
        raise ValueError(f"{field}: {message}{shown}")


@dataclasses.dataclass
class Config:
    """Base of every mechmem config: validation on construction, dict/JSON round trip."""

    def __post_init__(self) -> None:
        self._check_types()
        self.validate()

    def validate(self) -> None:
        """Check field values; subclasses raise ``ValueError`` through :func:`require`."""

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected = hints.get(field.name)
            if expected is not None and not _matches(value, expected):
                raise ValueError(f"{field.name}: expected {_describe(expected)}, got {value!r}")
            if isinstance(value, list):
                setattr(self, field.name, [tuple(v) if isinstance(v, list) else v for v in value])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of the fields (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build from a dict; unknown keys raise ``ValueError`` naming them."""
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__} config must be a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown config key(s) {unknown}; known keys are {sorted(known)}"
            )
        return cls(**data)

    def replace(self: C, **changes: Any) -> C:
        """A validated copy with some fields changed."""
        return self.from_dict({**dataclasses.asdict(self), **changes})


def is_integer(value: Any) -> bool:
    """True for an ``int`` that is not a ``bool`` (``True`` is not a count).

    Example:
        >>> is_integer(3), is_integer(True), is_integer(3.0)
        (True, False, False)
    """
    return isinstance(value, int) and not isinstance(value, bool)


def _matches(value: Any, expected: Any) -> bool:
    origin = typing.get_origin(expected)
    if expected is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(expected))
    if origin is typing.Literal:
        return value in typing.get_args(expected)
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return is_integer(value)
    if origin in (list, tuple, typing.Sequence) or expected in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(expected)
        if not args or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
            inner = args[0] if args else Any
            return all(_matches(v, inner) for v in value)
        if origin is tuple:
            return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
        return all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(expected, type):
        return isinstance(value, expected)
    return True


def _describe(expected: Any) -> str:
    return getattr(expected, "__name__", None) or str(expected).replace("typing.", "")
