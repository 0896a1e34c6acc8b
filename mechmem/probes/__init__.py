"""Probes: plain-data measurements that :mod:`mechmem.plots` turns into figures."""

from mechmem.probes.id_profile import IDProfile, id_profile, layer_representations
from mechmem.probes.logit_delta import (
    LayerEffectResult,
    LogitDeltaResult,
    compare_logits,
    logit_delta,
    logit_delta_arms,
    logit_delta_by_layer,
)
from mechmem.probes.perplexity import PerplexityResult, perplexity
from mechmem.probes.repetition import RepetitionMonitor, distinct_n, rep_n, self_bleu
from mechmem.probes.traces import TraceRecorder
from mechmem.probes.turn_effect import turn_effects
from mechmem.probes.twonn import TwoNNResult, twonn, twonn_bootstrap

__all__ = [
    "IDProfile",
    "LayerEffectResult",
    "LogitDeltaResult",
    "PerplexityResult",
    "RepetitionMonitor",
    "TraceRecorder",
    "TwoNNResult",
    "compare_logits",
    "distinct_n",
    "id_profile",
    "layer_representations",
    "logit_delta",
    "logit_delta_arms",
    "logit_delta_by_layer",
    "perplexity",
    "rep_n",
    "self_bleu",
    "turn_effects",
    "twonn",
    "twonn_bootstrap",
]
