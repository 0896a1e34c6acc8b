"""Where and with what a report ran: hardware and package versions, as plain data.

Example:
    >>> sorted(environment("cpu"))
    ['device', 'hardware', 'python', 'versions']
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

PACKAGES: tuple[str, ...] = ("mechmem", "torch", "transformers", "transformer-lens", "numpy")


def environment(device: str | torch.device) -> dict[str, Any]:
    """The machine (CPU, cores, GPU when the device is one) and the versions that produced a run.

    Example:
        >>> environment("cpu")["versions"]["mechmem"]  # doctest: +SKIP
        '0.1.0'
    """
    device = torch.device(device)
    hardware = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        hardware["gpu"] = torch.cuda.get_device_name(device)
    return {
        "device": str(device),
        "hardware": hardware,
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in PACKAGES},
    }


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
