"""Intervention core and decoding engine."""

from mechmem.core.applied import applied
from mechmem.core.basic import Identity, Steer
from mechmem.core.config import Config, require
from mechmem.core.context import StepContext
from mechmem.core.decoding import Progress
from mechmem.core.engine import forward, generate
from mechmem.core.intervention import Intervention, intervention_from_dict
from mechmem.core.prefix import Prefix, prefix
from mechmem.core.result import GenerationResult
from mechmem.core.session import Session, Turn

__all__ = [
    "Config",
    "GenerationResult",
    "Identity",
    "Intervention",
    "Prefix",
    "Progress",
    "Session",
    "Steer",
    "StepContext",
    "Turn",
    "applied",
    "forward",
    "generate",
    "intervention_from_dict",
    "prefix",
    "require",
]
