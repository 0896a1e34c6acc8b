"""Experiments: each seed's headline claim with its control arm, as config → results dict.

Example:
    >>> sorted(EXPERIMENTS)
    ['drugs', 'rdnet']
"""

from mechmem.experiments.drugs import DrugsExperimentConfig, run_drugs
from mechmem.experiments.rdnet import RDNetExperimentConfig, run_rdnet

EXPERIMENTS = {
    "drugs": (DrugsExperimentConfig, run_drugs),
    "rdnet": (RDNetExperimentConfig, run_rdnet),
}

__all__ = [
    "EXPERIMENTS",
    "DrugsExperimentConfig",
    "RDNetExperimentConfig",
    "run_drugs",
    "run_rdnet",
]
