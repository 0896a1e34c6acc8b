"""Logit delta and KL: what an intervention does to next-token distributions.

The same inputs run with and without the interventions (fp32, no cache reuse); per scored position
it reports max and mean |Δlogit| over the vocabulary, KL(P_intervened ‖ P_base) and the reverse in
nats, top-1 agreement and top-k overlap. :func:`logit_delta_by_layer` applies an intervention one
layer at a time — the effect-by-layer diagnosis.

Example:
    >>> from mechmem import Steer
    >>> result = logit_delta(model, ["The capital of France is"], Steer(layer=3, scale=8.0))
    ...                                                                  # doctest: +SKIP
    >>> result.summary()["kl_forward"]                                   # doctest: +SKIP
    0.21
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechmem.core.context import position_ids_from_mask
from mechmem.core.engine import check_interventions, forward
from mechmem.core.intervention import Intervention, as_intervention_list
from mechmem.core.tokens import encode_batch

Positions = Literal["last", "all"]


@dataclass
class LogitDeltaResult:
    """Per scored position metrics (flat arrays) with the row and position of each entry."""

    row: np.ndarray
    position: np.ndarray
    max_abs_delta: np.ndarray
    mean_abs_delta: np.ndarray
    kl_forward: np.ndarray
    kl_reverse: np.ndarray
    top1_agree: np.ndarray
    topk_overlap: np.ndarray
    k: int = 10
    meta: dict = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Means over every scored position (max_abs_delta: the max)."""
        return {
            "max_abs_delta": float(self.max_abs_delta.max()),
            "mean_abs_delta": float(self.mean_abs_delta.mean()),
            "kl_forward": float(self.kl_forward.mean()),
            "kl_reverse": float(self.kl_reverse.mean()),
            "top1_agreement": float(self.top1_agree.mean()),
            f"top{self.k}_overlap": float(self.topk_overlap.mean()),
            "n_positions": int(len(self.row)),
        }

    def to_dict(self) -> dict:
        """JSON-ready dict of every array and the summary."""
        arrays = {
            name: getattr(self, name).tolist()
            for name in (
                "row",
                "position",
                "max_abs_delta",
                "mean_abs_delta",
                "kl_forward",
                "kl_reverse",
                "top1_agree",
                "topk_overlap",
            )
        }
        return {"summary": self.summary(), "k": self.k, "meta": self.meta, **arrays}


def compare_logits(
    base: Float[Tensor, "n vocab"], intervened: Float[Tensor, "n vocab"], k: int = 10
) -> dict[str, np.ndarray]:
    """Metrics between two stacks of logit vectors (rows are positions), in fp32 / nats.

    Example:
        >>> z = torch.zeros(1, 4)
        >>> compare_logits(z, z + 1.0)["max_abs_delta"].tolist()
        [1.0]
    """
    if base.shape != intervened.shape or base.ndim != 2:
        raise ValueError(
            f"logit stacks must share a [n, vocab] shape: {base.shape} vs {intervened.shape}"
        )
    base, intervened = base.float(), intervened.float()
    k = min(k, base.shape[-1])
    delta = (intervened - base).abs()
    log_p_base = base.log_softmax(-1)
    log_p_int = intervened.log_softmax(-1)
    kl_forward = (log_p_int.exp() * (log_p_int - log_p_base)).sum(-1).clamp(min=0)
    kl_reverse = (log_p_base.exp() * (log_p_base - log_p_int)).sum(-1).clamp(min=0)
    top_base = base.topk(k, dim=-1).indices
    top_int = intervened.topk(k, dim=-1).indices
    overlap = (top_base[:, :, None] == top_int[:, None, :]).any(-1).float().mean(-1)
    return {
        "max_abs_delta": delta.max(-1).values.numpy(),
        "mean_abs_delta": delta.mean(-1).numpy(),
        "kl_forward": kl_forward.numpy(),
        "kl_reverse": kl_reverse.numpy(),
        "top1_agree": (top_base[:, 0] == top_int[:, 0]).numpy(),
        "topk_overlap": overlap.numpy(),
    }


def _checked_arm(model, interventions, positions: Positions, k: int) -> list[Intervention]:
    """``interventions`` as a non-empty list whose hooks and layers exist, with the scoring
    arguments checked too: everything :func:`_delta_metrics` needs, before any compute."""
    items = as_intervention_list(interventions)
    if not items:
        raise ValueError("interventions: give at least one intervention to compare against none")
    if positions not in ("last", "all"):
        raise ValueError(f"positions: must be 'last' or 'all', got {positions!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: must be an integer >= 1, got {k!r}")
    check_interventions(model, items)
    return items


def _delta_metrics(
    model,
    prompts,
    arms: list[list[Intervention]],
    positions: Positions,
    k: int,
    batch_size: int,
) -> list[dict[str, np.ndarray]]:
    """Per-position metrics of each arm (a list of interventions) against one shared clean run.

    Each batch runs clean once and then once per arm, so a sweep of L arms costs L + 1 forward
    passes per batch rather than 2L.
    """
    tokens, mask = encode_batch(model, prompts)
    parts: list[dict[str, list[np.ndarray]]] = [{} for _ in arms]
    for start in range(0, len(tokens), batch_size):
        chunk, chunk_mask = tokens[start : start + batch_size], mask[start : start + batch_size]
        if positions == "last":
            select = torch.zeros_like(chunk_mask, dtype=torch.bool)
            select[:, -1] = True
        else:
            select = chunk_mask.bool()
        rows, cols = select.nonzero(as_tuple=True)
        where = {
            "row": (rows + start).cpu().numpy(),
            "position": position_ids_from_mask(chunk_mask)[rows, cols].cpu().numpy(),
        }
        base = forward(model, chunk, [], attention_mask=chunk_mask).float()[rows, cols].cpu()
        for arm, part in zip(arms, parts):
            altered = forward(model, chunk, arm, attention_mask=chunk_mask).float()
            metrics = {**compare_logits(base, altered[rows, cols].cpu(), k), **where}
            for name, values in metrics.items():
                part.setdefault(name, []).append(values)
    return [{name: np.concatenate(values) for name, values in part.items()} for part in parts]


def logit_delta(
    model,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    interventions: Intervention | Sequence[Intervention],
    *,
    positions: Positions = "last",
    k: int = 10,
    batch_size: int = 16,
) -> LogitDeltaResult:
    """Compare logits with and without ``interventions`` on the same inputs.

    Args:
        model: a ``TransformerBridge``.
        prompts: one prompt, a list of prompts, or token id lists.
        interventions: one or several interventions, applied in order.
        positions: ``"last"`` scores each prompt's last token, ``"all"`` every real token.
        k: size of the top-k overlap.
        batch_size: prompts per forward pass.

    Example:
        >>> logit_delta(model, "Hi", Steer(layer=0, scale=0.0)).summary()["kl_forward"]
        ...                                                      # doctest: +SKIP
        0.0
    """
    options = dict(positions=positions, k=k, batch_size=batch_size)
    return logit_delta_arms(model, prompts, {"intervened": interventions}, **options)["intervened"]


def logit_delta_arms(
    model,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    arms: Mapping[str, Intervention | Sequence[Intervention]],
    *,
    positions: Positions = "last",
    k: int = 10,
    batch_size: int = 16,
) -> dict[str, LogitDeltaResult]:
    """:func:`logit_delta` of several arms against one shared clean run (each batch runs clean
    once and then once per arm).

    Example:
        >>> results = logit_delta_arms(model, "Hi", {"weak": Steer(layer=1, scale=1.0),
        ...                                          "strong": Steer(layer=1, scale=8.0)})
        ...                                                      # doctest: +SKIP
        >>> results["strong"].summary()["kl_forward"]            # doctest: +SKIP
    """
    if not arms:
        raise ValueError("arms: give at least one arm")
    names = list(arms)
    checked = [_checked_arm(model, arms[name], positions, k) for name in names]
    merged = _delta_metrics(model, prompts, checked, positions, k, batch_size)
    return {
        name: LogitDeltaResult(
            **metrics,
            k=k,
            meta={"interventions": [i.to_dict() for i in items], "positions": positions},
        )
        for name, items, metrics in zip(names, checked, merged)
    }


@dataclass
class LayerEffectResult:
    """Summary metrics of one intervention applied at each layer in turn (``results``: each
    layer's per-position metrics, for intervals across prompts)."""

    layers: list[int]
    summaries: list[dict[str, float]]
    results: list[LogitDeltaResult] = field(default_factory=list)

    def metric(self, name: str) -> np.ndarray:
        """One summary metric across layers."""
        return np.array([s[name] for s in self.summaries])

    def to_dict(self) -> dict:
        return {"layers": self.layers, "summaries": self.summaries}


def logit_delta_by_layer(
    model,
    prompts: str | Sequence[str],
    make_intervention: Callable[[int], Intervention],
    *,
    layers: Sequence[int] | None = None,
    positions: Positions = "last",
    k: int = 10,
    batch_size: int = 16,
) -> LayerEffectResult:
    """Apply ``make_intervention(layer)`` one layer at a time and summarise each effect.

    The clean run is shared: each batch of prompts runs once clean and once per layer.

    Example:
        >>> sweep = logit_delta_by_layer(model, "Hi", lambda l: Steer(layer=l, scale=4.0))
        ...                                                      # doctest: +SKIP
    """
    n_layers = int(model.cfg.n_layers)
    layers = list(range(n_layers)) if layers is None else list(layers)
    if not layers:
        raise ValueError("layers: give at least one layer")
    for layer in layers:
        Intervention.check_layer(model, layer, "layers")
    arms = [_checked_arm(model, make_intervention(layer), positions, k) for layer in layers]
    results = [
        LogitDeltaResult(**metrics, k=k)
        for metrics in _delta_metrics(model, prompts, arms, positions, k, batch_size)
    ]
    summaries = [result.summary() for result in results]
    return LayerEffectResult(layers=layers, summaries=summaries, results=results)
