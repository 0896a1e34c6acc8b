"""A short identity of a model's weights, so stored caches and sessions refuse another model.

Example:
    >>> model_fingerprint(model)  # doctest: +SKIP
    'SmolLM2-135M-Instruct.Q4_1/L30/d576/v49152/a65389317c7b'
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch


def model_fingerprint(model) -> str:
    """Model name, shape and a hash of the first rows of the embedding matrix, and the weights'
    dtype unless fp32 (a checkpoint stored in bf16 hashes alike in both dtypes, but its states
    and caches differ).

    Example:
        >>> model_fingerprint(model).startswith("LlamaForCausalLM/")  # doctest: +SKIP
        True
    """
    cfg = model.cfg
    rows = model.W_E[:8].detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:12]
    dtype = weights_dtype(model)
    suffix = "" if dtype is None else f"/{dtype}"
    return f"{model_name(model)}/L{cfg.n_layers}/d{cfg.d_model}/v{cfg.d_vocab}/{digest}{suffix}"


def weights_dtype(model) -> str | None:
    """The name of the weights' dtype (read off the embedding matrix), ``None`` for fp32.

    Example:
        >>> weights_dtype(tiny_model("llama", dtype=torch.float16))  # doctest: +SKIP
        'float16'
    """
    dtype = model.W_E.dtype
    return None if dtype == torch.float32 else str(dtype).removeprefix("torch.")


def model_name(model) -> str:
    """The model's folder or hub name, without its path or mechmem's cache-hash suffix, so a
    fingerprint does not change when the cache folder moves.

    Example:
        >>> model_name(load_model())  # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1'
    """
    return re.sub(r"-[0-9a-f]{12}$", "", Path(str(model.cfg.model_name)).name)


def model_label(model) -> str:
    """The model as an experiment's results name it: ``cfg.model_name``, and the weights' dtype
    unless they are fp32 (so a bf16 run is never taken for the fp32 one).

    Example:
        >>> model_label(tiny_model("llama", dtype=torch.bfloat16))  # doctest: +SKIP
        'LlamaForCausalLM (bfloat16)'
    """
    name = str(getattr(model.cfg, "model_name", "unknown"))
    dtype = weights_dtype(model)
    return name if dtype is None else f"{name} ({dtype})"
