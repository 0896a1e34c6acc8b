"""Layer-selection analysis: the TwoNN intrinsic dimension of every layer's representations.

Each text runs once; at every layer the hook's activations are pooled per text (``"last"``
token, ``"mean"`` over real tokens) or kept per token (``"tokens"``, as Neural Native Memory did;
token vectors of one text are strongly correlated, so one pooled vector per text is the sounder
input), and TwoNN (with a bootstrap interval) is fitted to each layer's point cloud.
:meth:`IDProfile.suggest_layer` picks the ID minimum after the first 20% of layers, the
KV-Embedding rule — always confirm such a pick with a retrieval sweep.

Mean and token pooling leave out each text's first ``skip_first`` tokens (default 1). Many LMs
park a massive activation on the first token (the attention sink): in the embedded SmolLM2, from
layer 11 on, coordinate 507 of the first token's residual is about 22,500, against at most 132 at
the other positions (layer 15, first built-in text). Averaged in, it adds about
``22,500 / length`` along one axis, so the measured dimension mostly reflects text length: the 64
built-in texts read ID 9.8 at layer 11 with the first token kept and 26.5 without it
(``docs/probes.md``).

Example:
    >>> profile = id_profile(model, texts, pooling="mean")   # doctest: +SKIP
    >>> profile.suggest_layer()                              # doctest: +SKIP
    12
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from mechmem.core.config import is_integer
from mechmem.core.context import position_ids_from_mask
from mechmem.core.engine import forward
from mechmem.core.hooks import attached, resolve_hook_point
from mechmem.core.intervention import Intervention
from mechmem.core.tokens import encode_batch, encode_prompts, hf_tokenizer
from mechmem.probes.twonn import check_bootstrap_args, twonn_bootstrap

Pooling = Literal["last", "mean", "tokens"]


@dataclass
class IDProfile:
    """Intrinsic dimension per layer, with bootstrap intervals."""

    layers: list[int]
    dimension: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    n_points: int
    hook: str
    pooling: str
    skip_first: int = 0

    def suggest_layer(self, skip_fraction: float = 0.2) -> int:
        """The layer of lowest ID once the first ``skip_fraction`` of layers is excluded."""
        if not 0 <= skip_fraction < 1:
            raise ValueError(f"skip_fraction: must be in [0, 1), got {skip_fraction}")
        start = int(np.ceil(skip_fraction * len(self.layers)))
        candidates = range(start, len(self.layers))
        return self.layers[min(candidates, key=lambda i: self.dimension[i])]

    def to_dict(self) -> dict:
        return {
            "layers": self.layers,
            "dimension": self.dimension.tolist(),
            "ci_low": self.ci_low.tolist(),
            "ci_high": self.ci_high.tolist(),
            "n_points": self.n_points,
            "hook": self.hook,
            "pooling": self.pooling,
            "skip_first": self.skip_first,
            "suggested_layer": self.suggest_layer(),
        }


def block_hook_name(model, layer: int, hook: str) -> str:
    """The full name of ``hook`` in block ``layer``, checked on ``model``; the ``hook_`` prefix of
    its last part may be left out (``"resid_post"``, ``"attn.z"``).

    Example:
        >>> block_hook_name(model, 3, "attn.z")  # doctest: +SKIP
        'blocks.3.attn.hook_z'
    """
    if not isinstance(hook, str) or not hook:
        raise ValueError(f"hook: must be a non-empty string, got {hook!r}")
    name = f"blocks.{layer}.{hook}"
    head, dot, last = hook.rpartition(".")
    prefixed = f"blocks.{layer}.{head}{dot}hook_{last}"
    if name not in model.hook_dict and prefixed in model.hook_dict:
        name = prefixed
    resolve_hook_point(model, name)
    return name


def layer_representations(
    model,
    texts: Sequence[str],
    *,
    hook: str = "hook_resid_post",
    pooling: Pooling = "mean",
    skip_first: int = 1,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    interventions: Intervention | Sequence[Intervention] = (),
) -> dict[int, torch.Tensor]:
    """``{layer: [points, d]}`` pooled activations of ``blocks.{layer}.{hook}`` over ``texts``,
    with ``interventions`` applied (none by default). ``"tokens"`` pooling keeps every real token,
    text by text, in order. ``"mean"`` and ``"tokens"`` leave out each text's first
    ``skip_first`` tokens (the attention sink, see the module docstring); ``"last"`` ignores it.
    ``hook`` may leave out the ``hook_`` prefix (see :func:`block_hook_name`).

    Example:
        >>> reps = layer_representations(model, ["a b", "c d e"], pooling="last")  # doctest: +SKIP
        >>> reps[0].shape                                                         # doctest: +SKIP
        torch.Size([2, 576])
    """
    if pooling not in ("last", "mean", "tokens"):
        raise ValueError(f"pooling: must be 'last', 'mean' or 'tokens', got {pooling!r}")
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError("texts: give a non-empty list of texts")
    if not is_integer(skip_first) or skip_first < 0:
        raise ValueError(f"skip_first: must be an integer >= 0, got {skip_first!r}")
    ids = encode_prompts(hf_tokenizer(model), list(texts))
    skipped = skip_first if pooling != "last" else 0
    short = [i for i, row in enumerate(ids) if len(row) <= skipped]
    if short:
        raise ValueError(
            f"texts {short[:5]} have at most skip_first={skip_first} tokens: nothing is left to "
            "pool; lengthen or drop them, or lower skip_first"
        )
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    if not layers:
        raise ValueError("layers: give at least one layer")
    for layer in layers:
        Intervention.check_layer(model, layer, "layers")
    names = {layer: block_hook_name(model, layer, hook) for layer in layers}
    collected: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    captured: dict[int, torch.Tensor] = {}  # the current batch's activations, by layer

    def capture(layer: int):
        def keep(activation, hook):
            captured[layer] = activation.detach().float()

        return keep

    with torch.no_grad(), attached(model, [(names[layer], capture(layer)) for layer in layers]):
        for start in range(0, len(texts), batch_size):
            tokens, mask = encode_batch(model, ids[start : start + batch_size])
            forward(model, tokens, interventions, attention_mask=mask)
            pooled_mask = position_ids_from_mask(mask) >= skipped
            weights = pooled_mask.float()
            for layer in layers:
                acts = captured[layer]
                if pooling == "last":
                    pooled = acts[:, -1]
                elif pooling == "mean":
                    pooled = (acts * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
                else:
                    pooled = acts[pooled_mask]
                collected[layer].append(pooled.cpu())
    return {layer: torch.cat(parts) for layer, parts in collected.items()}


def id_profile(
    model,
    texts: Sequence[str],
    *,
    hook: str = "hook_resid_post",
    pooling: Pooling = "mean",
    skip_first: int = 1,
    layers: Sequence[int] | None = None,
    method: Literal["regression", "mle"] = "regression",
    discard_fraction: float = 0.1,
    n_boot: int = 100,
    ci: float = 0.95,
    seed: int = 0,
) -> IDProfile:
    """TwoNN intrinsic dimension of every layer's representations of ``texts``, each with a
    bootstrap interval of coverage ``ci`` (see :func:`mechmem.probes.twonn_bootstrap`).

    Example:
        >>> id_profile(model, texts).dimension.shape  # doctest: +SKIP
        (30,)
    """
    check_bootstrap_args(n_boot, ci, discard_fraction, method)  # before the forward passes
    if pooling in ("last", "mean") and not isinstance(texts, str) and len(texts) < 3:
        raise ValueError(f"texts: TwoNN needs at least 3 texts to pool, got {len(texts)}")
    reps = layer_representations(
        model, texts, hook=hook, pooling=pooling, skip_first=skip_first, layers=layers
    )
    hook = block_hook_name(model, next(iter(reps)), hook).split(".", 2)[2]
    fits = [
        twonn_bootstrap(points, n_boot, ci, seed, method=method, discard_fraction=discard_fraction)
        for points in reps.values()
    ]
    return IDProfile(
        layers=list(reps),
        dimension=np.array([f.dimension for f in fits]),
        ci_low=np.array([f.ci_low for f in fits]),
        ci_high=np.array([f.ci_high for f in fits]),
        n_points=int(next(iter(reps.values())).shape[0]),
        hook=hook,
        pooling=pooling,
        skip_first=skip_first if pooling != "last" else 0,
    )
