"""Neural Native Memory (seed 001): the model's own states as a memory, stored, searched and
injected back.

Example:
    >>> from mechmem import nnm
    >>> nnm.Whitening("model-id", layer=3).fitted
    False
"""

from mechmem.methods.nnm.inject import PassageKV, ResidualInjection, rotate_keys
from mechmem.methods.nnm.store import Hit, MemoryStore, MemoryStoreLocked, int8_recall
from mechmem.methods.nnm.transform import Whitening

__all__ = [
    "Hit",
    "MemoryStore",
    "MemoryStoreLocked",
    "PassageKV",
    "ResidualInjection",
    "Whitening",
    "int8_recall",
    "rotate_keys",
]
