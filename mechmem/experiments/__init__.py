"""Experiments: each seed's headline claim with its control arm, as config → results dict.

``EXPERIMENTS`` maps a name to its :class:`~mechmem.experiments.base.Experiment` (config class,
run function, figure builder, scales); ``mechmem run NAME`` and ``mechmem report`` read it.

Example:
    >>> {"drugs", "rdnet"} <= set(EXPERIMENTS)
    True
"""

from mechmem.experiments import attractor, continuity, drugs, needle, nnm_gate, nnm_retrieval, rdnet
from mechmem.experiments.attractor import AttractorExperimentConfig, run_attractor
from mechmem.experiments.base import Experiment
from mechmem.experiments.continuity import ContinuityExperimentConfig, run_continuity
from mechmem.experiments.drugs import DrugsExperimentConfig, run_drugs
from mechmem.experiments.needle import NeedleConfig, run_needle
from mechmem.experiments.nnm_gate import NNMGateConfig, run_nnm_gate
from mechmem.experiments.nnm_retrieval import NNMRetrievalConfig, run_nnm_retrieval
from mechmem.experiments.rdnet import RDNetExperimentConfig, run_rdnet

EXPERIMENTS: dict[str, Experiment] = {
    "attractor": Experiment(
        name="attractor",
        config_class=AttractorExperimentConfig,
        run=run_attractor,
        figures=attractor.figures,
        scales={
            "smoke": {
                "max_text_tokens": 512,
                "overhead_tokens": 16,
                "overhead_repeats": 1,
                "seeds": [0],
                "tokens": 100,
                "rep_window": 50,
                "generation_arms": ["causal"],
                "qa_items": 24,
                "qa_chains": 8,
            },
            "default": {},
            "full": {
                "max_text_tokens": 50_000,
                "window": 256,
                "seeds": [0, 1, 2, 3, 4, 5, 6, 7],
                "tokens": 1000,
                "generation_arms": list(attractor.ARMS),
                "qa_items": 1600,
                "qa_chains": 32,
            },
        },
        summary="Attractor layer: perplexity, overhead, long generation, story QA vs no attractor",
    ),
    "drugs": Experiment(
        name="drugs",
        config_class=DrugsExperimentConfig,
        run=run_drugs,
        figures=drugs.figures,
        scales={
            "smoke": {
                "prompts": drugs.DEFAULT_PROMPTS[:4],
                "seeds": [0, 1],
                "max_new_tokens": 16,
                "sites": ["H"],
                "doses": [0.2, 0.8],
                "temperatures": [0.6, 1.2],
                "divergence_doses": [0.1, 0.4],
            },
            "default": {},
            "full": {"seeds": [0, 1, 2, 3, 4, 5, 6, 7], "max_new_tokens": 64},
        },
        summary="DRµGS: variety against coherence, against temperature and top-p sampling",
    ),
    "rdnet": Experiment(
        name="rdnet",
        config_class=RDNetExperimentConfig,
        run=run_rdnet,
        figures=rdnet.figures,
        scales={
            "smoke": {
                "tokens": 256,
                "log_every": 64,
                "window": 256,
                "window_keep": 64,
                "seeds": [0, 1, 2, 3, 4, 5],  # 6 pairs: the smallest exact p is 0.03
            },
            "default": {"tokens": 2000, "log_every": 250, "seeds": [0, 1, 2, 3, 4, 5]},
            "full": {"tokens": 150_000, "seeds": [0, 1, 2, 3]},
        },
        summary="RD-Net: long-generation repetition against sampling and penalty controls",
    ),
    "continuity": Experiment(
        name="continuity",
        config_class=ContinuityExperimentConfig,
        run=run_continuity,
        figures=continuity.figures,
        scales={
            "smoke": {
                "prompts": continuity.DEFAULT_PROMPTS[:6],  # 6 pairs: smallest p 0.03
                "gains": [0.8],
                "layer_stride": 10,
                "topics": 1,
                "max_new_tokens": 16,
            },
            "default": {},
            "full": {"seeds": [0, 1, 2, 3], "max_new_tokens": 96},
        },
        summary="Continuity stream: logit probe (linkage 1 vs 0) and the 5-turn stance protocol",
    ),
    "nnm-retrieval": Experiment(
        name="nnm-retrieval",
        config_class=NNMRetrievalConfig,
        run=run_nnm_retrieval,
        figures=nnm_retrieval.figures,
        scales={
            "smoke": {
                "synthetic_docs": 32,
                "synthetic_queries": 8,
                "id_texts": 32,
                "max_tokens": 48,
            },
            "default": {},
            "full": {"synthetic_docs": 2000, "synthetic_queries": 500, "max_tokens": 512},
        },
        summary="KV-Embedding: NDCG@10 / recall@100 vs hidden-state pooling and BM25 (BEIR)",
    ),
    "nnm-gate": Experiment(
        name="nnm-gate",
        config_class=NNMGateConfig,
        run=run_nnm_gate,
        figures=nnm_gate.figures,
        scales={
            "smoke": {"n_items": 6, "held_out": 12, "max_new_tokens": 6},
            "default": {},
            "full": {"n_items": 500, "held_out": 400},
        },
        summary="NNM gate: cold / rag / stored KV prefix / text-prefix / random / injection, EM",
    ),
    "needle": Experiment(
        name="needle",
        config_class=NeedleConfig,
        run=run_needle,
        figures=needle.figures,
        scales={
            "smoke": {"lengths": [64, 160], "depths": [0.5], "max_new_tokens": 6},
            "default": {},
            "full": {"lengths": [512, 1024, 2048, 4096, 8000], "needles": 5},
        },
        summary="Needle in a haystack: rag vs stored KV prefix vs cold, question never truncated",
    ),
}

__all__ = [
    "EXPERIMENTS",
    "AttractorExperimentConfig",
    "ContinuityExperimentConfig",
    "DrugsExperimentConfig",
    "NNMGateConfig",
    "NNMRetrievalConfig",
    "NeedleConfig",
    "Experiment",
    "RDNetExperimentConfig",
    "run_attractor",
    "run_continuity",
    "run_drugs",
    "run_needle",
    "run_nnm_gate",
    "run_nnm_retrieval",
    "run_rdnet",
]
