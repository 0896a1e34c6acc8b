"""A short identity of a model's weights, so stored caches and sessions refuse another model.

Example:
    >>> model_fingerprint(model)  # doctest: +SKIP
    'LlamaForCausalLM/L30/d576/v49152/3f9c0a1e5b7d'
"""

from __future__ import annotations

import hashlib

import torch


def model_fingerprint(model) -> str:
    """Architecture name, shape and a hash of the first rows of the embedding matrix.

    Example:
        >>> model_fingerprint(model).startswith("LlamaForCausalLM/")  # doctest: +SKIP
        True
    """
    cfg = model.cfg
    rows = model.W_E[:8].detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:12]
    return f"{cfg.model_name}/L{cfg.n_layers}/d{cfg.d_model}/v{cfg.d_vocab}/{digest}"
