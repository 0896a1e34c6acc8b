"""Neural Native Memory (seed 001): the model's own states as a memory, stored, searched and
injected back.

Example:
    >>> from mechmem import nnm
    >>> nnm.Whitening("model-id", layer=3).fitted
    False
"""

from mechmem.methods.nnm.beir import RetrievalSet, load_beir, synthetic_dataset
from mechmem.methods.nnm.embed import (
    Encodings,
    compression_prompt,
    embed,
    encode,
    encode_layer_sets,
    hidden_state_embeddings,
)
from mechmem.methods.nnm.inject import PassageKV, ResidualInjection, rotate_keys
from mechmem.methods.nnm.layers import LayerSelection, layer_selection_figure, select_layers
from mechmem.methods.nnm.retrieval import bm25_run, dense_run, evaluate
from mechmem.methods.nnm.store import Hit, MemoryStore, MemoryStoreLocked, int8_recall
from mechmem.methods.nnm.transform import Whitening

__all__ = [
    "Encodings",
    "LayerSelection",
    "RetrievalSet",
    "bm25_run",
    "compression_prompt",
    "dense_run",
    "embed",
    "encode",
    "encode_layer_sets",
    "evaluate",
    "hidden_state_embeddings",
    "layer_selection_figure",
    "load_beir",
    "select_layers",
    "synthetic_dataset",
    "Hit",
    "MemoryStore",
    "MemoryStoreLocked",
    "PassageKV",
    "ResidualInjection",
    "Whitening",
    "int8_recall",
    "rotate_keys",
]
