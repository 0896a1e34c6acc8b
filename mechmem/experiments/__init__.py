"""Experiments: each seed's headline claim with its control arm, as config → results dict.

Example:
    >>> sorted(EXPERIMENTS)
    ['drugs']
"""

from mechmem.experiments.drugs import DrugsExperimentConfig, run_drugs

EXPERIMENTS = {"drugs": (DrugsExperimentConfig, run_drugs)}

__all__ = ["EXPERIMENTS", "DrugsExperimentConfig", "run_drugs"]
