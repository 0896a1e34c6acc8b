"""Experiments: each seed's headline claim with its control arm, as config → results dict.

``EXPERIMENTS`` maps a name to its :class:`~mechmem.experiments.base.Experiment` (config class,
run function, figure builder, scales); ``mechmem run NAME`` and ``mechmem report`` read it.

Example:
    >>> sorted(EXPERIMENTS)[:2]
    ['drugs', 'rdnet']
"""

from mechmem.experiments import drugs, rdnet
from mechmem.experiments.base import Experiment
from mechmem.experiments.drugs import DrugsExperimentConfig, run_drugs
from mechmem.experiments.rdnet import RDNetExperimentConfig, run_rdnet

EXPERIMENTS: dict[str, Experiment] = {
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
            "smoke": {"tokens": 256, "log_every": 64, "window": 256, "window_keep": 64},
            "default": {"tokens": 2000, "log_every": 250},
            "full": {"tokens": 150_000, "seeds": [0, 1, 2, 3]},
        },
        summary="RD-Net: long-generation repetition against sampling and penalty controls",
    ),
}

__all__ = [
    "EXPERIMENTS",
    "DrugsExperimentConfig",
    "Experiment",
    "RDNetExperimentConfig",
    "run_drugs",
    "run_rdnet",
]
