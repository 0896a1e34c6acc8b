"""mechmem: inference-time memory and variety interventions on TransformerLens models.

Example:
    >>> import mechmem
    >>> model = mechmem.load_model()                       # doctest: +SKIP
    >>> mechmem.generate(model, "Hello", max_new_tokens=5)  # doctest: +SKIP
"""

from mechmem import nnm
from mechmem.core import (
    Config,
    GenerationResult,
    Identity,
    Intervention,
    Prefix,
    Progress,
    Session,
    Steer,
    StepContext,
    Turn,
    applied,
    forward,
    generate,
    intervention_from_dict,
    prefix,
)
from mechmem.methods.attractor import Attractor
from mechmem.methods.continuity import Continuity
from mechmem.methods.drugs import Drugs
from mechmem.methods.nnm import MemoryStore, ResidualInjection
from mechmem.methods.rdnet import RDNet
from mechmem.models import ModelLoadError, load_model

__version__ = "0.1.0"

__all__ = [
    "Attractor",
    "Config",
    "Continuity",
    "Drugs",
    "GenerationResult",
    "Identity",
    "Intervention",
    "MemoryStore",
    "ModelLoadError",
    "Prefix",
    "Progress",
    "RDNet",
    "ResidualInjection",
    "Session",
    "Steer",
    "StepContext",
    "Turn",
    "applied",
    "forward",
    "generate",
    "intervention_from_dict",
    "load_model",
    "nnm",
    "prefix",
]
