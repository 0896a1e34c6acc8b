"""Which layers KV-Embedding re-routes: the TwoNN rule, checked by a retrieval sweep.

**The rule** (KV-Embedding's): profile the intrinsic dimension of every layer's
``resid_post`` (TwoNN, one mean-pooled vector per text, :func:`mechmem.probes.id_profile`) on
the texts wrapped in the compression prompt; leave out the first ``skip_fraction`` (~20%) of
layers; take the layer of lowest dimension, and re-route a window of ``window_fraction``
(~10%) of the layers centred on it (:func:`id_window`).

**The sweep**: on a labelled set, re-route the same-sized window centred on each candidate
layer and measure NDCG@10. The rule is *confirmed* when the sweep's best window overlaps the
rule's; either way :attr:`LayerSelection.chosen` is the sweep's best window (the rule's when
there is no labelled set). Neural Native Memory's own auto-pick was overridden by hand; the
sweep is what makes that decision visible.

Example:
    >>> sel = select_layers(model, docs, labelled=train_set)  # doctest: +SKIP
    >>> sel.id_window, sel.sweep_window, sel.confirmed         # doctest: +SKIP
    ([13, 14, 15], [19, 20, 21], False)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mechmem.methods.nnm.beir import RetrievalSet
from mechmem.methods.nnm.embed import encode_layer_sets, prompt_texts
from mechmem.methods.nnm.retrieval import dense_run, evaluate
from mechmem.probes.id_profile import IDProfile, id_profile
from mechmem.stats import bootstrap_interval


@dataclass
class LayerSelection:
    """The ID profile, the rule's window, and the sweep (``None`` fields without a labelled
    set). Plain lists, so :meth:`to_dict` is JSON-ready and :meth:`from_dict` reverses it."""

    layers: list[int]
    dimension: list[float]
    ci_low: list[float]
    ci_high: list[float]
    id_pick: int
    id_window: list[int]
    chosen: list[int]
    sweep_centres: list[int] | None = None
    sweep_ndcg: list[float] | None = None
    sweep_low: list[float] | None = None
    sweep_high: list[float] | None = None
    sweep_pick: int | None = None
    sweep_window: list[int] | None = None
    confirmed: bool | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LayerSelection:
        return cls(**data)


def window_around(centre: int, n_layers: int, size: int, lowest: int = 0) -> list[int]:
    """``size`` consecutive layers centred on ``centre``, shifted to stay in
    ``[lowest, n_layers)``.

    Example:
        >>> window_around(29, 30, 3), window_around(10, 30, 3), window_around(6, 30, 3, lowest=6)
        ([27, 28, 29], [9, 10, 11], [6, 7, 8])
    """
    if not 1 <= size <= n_layers - lowest:
        raise ValueError(f"window size {size} does not fit in layers {lowest}..{n_layers - 1}")
    start = min(max(centre - (size - 1) // 2, lowest), n_layers - size)
    return list(range(start, start + size))


def id_window(
    profile: IDProfile, skip_fraction: float = 0.2, window_fraction: float = 0.1
) -> tuple[int, list[int]]:
    """The rule's pick (lowest ID after the first ``skip_fraction`` of layers,
    :meth:`IDProfile.suggest_layer`) and the window of ``round(window_fraction * L)`` layers
    (at least 1) around it, kept after the skipped layers.

    Example:
        >>> dims = np.array([9.0, 2.0, 8.0, 7.0, 3.0, 4.0, 6.0, 8.0, 9.0, 9.0])
        >>> p = IDProfile(list(range(10)), dims, dims, dims, 50, "hook_resid_post", "mean")
        >>> id_window(p, skip_fraction=0.2, window_fraction=0.3)
        (4, [3, 4, 5])
    """
    if not 0 < window_fraction <= 1:
        raise ValueError(f"window_fraction: must be in (0, 1], got {window_fraction}")
    pick = profile.suggest_layer(skip_fraction)
    n_layers = len(profile.layers)
    size = max(1, round(window_fraction * n_layers))
    lowest = profile.layers[math.ceil(skip_fraction * n_layers)]
    return pick, window_around(pick, n_layers, size, lowest=lowest)


def select_layers(
    model,
    texts: Sequence[str],
    *,
    labelled: RetrievalSet | None = None,
    role: str = "context",
    skip_fraction: float = 0.2,
    window_fraction: float = 0.1,
    sweep_centres: Sequence[int] | None = None,
    max_tokens: int | None = None,
    batch_size: int = 16,
    n_boot: int = 100,
    seed: int = 0,
    progress: bool = False,
) -> LayerSelection:
    """The TwoNN profile of ``texts`` (wrapped in the ``role`` prompt, cut to ``max_tokens``)
    with the rule's window, and, given ``labelled``, the NDCG@10 sweep over window centres
    (default: every ``L // 10``-th layer and the rule's pick).

    Example:
        >>> sel = select_layers(model, corpus_texts)  # doctest: +SKIP
        >>> sel.chosen == sel.id_window                # doctest: +SKIP
        True
    """
    n_layers = model.cfg.n_layers
    if sweep_centres is not None:
        bad = [c for c in sweep_centres if not 0 <= c < n_layers]
        if bad or not sweep_centres:
            raise ValueError(
                f"sweep_centres: give layers in 0..{n_layers - 1}, got {sweep_centres}"
            )
    if labelled is not None and not labelled.queries:
        raise ValueError("labelled: the set has no query")
    profile = id_profile(
        model,
        prompt_texts(model, texts, role, max_tokens),
        pooling="mean",
        n_boot=n_boot,
        seed=seed,
    )
    pick, window = id_window(profile, skip_fraction, window_fraction)
    selection = LayerSelection(
        layers=profile.layers,
        dimension=profile.dimension.tolist(),
        ci_low=profile.ci_low.tolist(),
        ci_high=profile.ci_high.tolist(),
        id_pick=pick,
        id_window=window,
        chosen=window,
    )
    if labelled is None:
        return selection
    if sweep_centres is None:
        sweep_centres = range(0, n_layers, max(1, n_layers // 10))
    centres = sorted({*sweep_centres, pick})
    windows = [window_around(c, n_layers, len(window)) for c in centres]
    per_query = sweep_ndcg(model, labelled, windows, max_tokens, batch_size, progress)
    means = [float(np.mean(v)) for v in per_query]
    intervals = [bootstrap_interval(v, seed=seed) for v in per_query]
    best = int(np.argmax(means))
    selection.sweep_centres = centres
    selection.sweep_ndcg = means
    selection.sweep_low = [lo for lo, _ in intervals]
    selection.sweep_high = [hi for _, hi in intervals]
    selection.sweep_pick = centres[best]
    selection.sweep_window = windows[best]
    selection.chosen = windows[best]
    selection.confirmed = bool(set(windows[best]) & set(window))
    return selection


def sweep_ndcg(
    model,
    labelled: RetrievalSet,
    windows: Sequence[Sequence[int]],
    max_tokens: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> list[list[float]]:
    """Per-query NDCG@10 of KV-Embedding with each window of re-routed layers.

    Example:
        >>> sweep_ndcg(model, synthetic_dataset(40, 10), [[1], [2]])  # doctest: +SKIP
    """
    docs, doc_vectors = _encode(
        model, labelled.corpus, "context", windows, max_tokens, batch_size, progress
    )
    queries, query_vectors = _encode(
        model, labelled.queries, "query", windows, max_tokens, batch_size, progress
    )
    scores = []
    for q, d in zip(query_vectors, doc_vectors):
        run = dense_run(q, d, queries, docs, k=10)
        scores.append(list(evaluate(labelled.qrels, run, ["ndcg@10"])["ndcg@10"].values()))
    return scores


def _encode(model, texts: dict[str, str], role, windows, max_tokens, batch_size, progress):
    ids = list(texts)
    vectors, _ = encode_layer_sets(
        model,
        [texts[i] for i in ids],
        windows,
        role=role,
        max_tokens=max_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    return ids, vectors


def layer_selection_figure(selection: LayerSelection | dict) -> go.Figure:
    """The ID profile (with its bootstrap band) and the sweep's NDCG@10 (with bootstrap
    intervals over queries) against the layer, the rule's and the sweep's windows shaded.

    Example:
        >>> layer_selection_figure(sel).write_html("layers.html")  # doctest: +SKIP
    """
    s = LayerSelection.from_dict(selection) if isinstance(selection, dict) else selection
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(
        go.Scatter(
            x=s.layers + s.layers[::-1],
            y=s.ci_high + s.ci_low[::-1],
            fill="toself",
            line={"width": 0},
            opacity=0.25,
            name="ID 95% interval",
            hoverinfo="skip",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=s.layers, y=s.dimension, mode="lines+markers", name="TwoNN intrinsic dimension"
        )
    )
    fig.add_vrect(
        x0=s.id_window[0] - 0.4,
        x1=s.id_window[-1] + 0.4,
        fillcolor="blue",
        opacity=0.1,
        line_width=0,
        annotation_text=f"ID rule: {s.id_window}",
    )
    if s.sweep_centres is not None:
        fig.add_trace(
            go.Scatter(
                x=s.sweep_centres,
                y=s.sweep_ndcg,
                mode="lines+markers",
                name="NDCG@10 (sweep)",
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": np.subtract(s.sweep_high, s.sweep_ndcg).tolist(),
                    "arrayminus": np.subtract(s.sweep_ndcg, s.sweep_low).tolist(),
                },
            ),
            secondary_y=True,
        )
        fig.add_vrect(
            x0=s.sweep_window[0] - 0.4,
            x1=s.sweep_window[-1] + 0.4,
            fillcolor="green",
            opacity=0.1,
            line_width=0,
            annotation_text=f"sweep: {s.sweep_window}",
            annotation_position="bottom",
        )
    fig.update_xaxes(title_text="layer (window centre for the sweep)")
    fig.update_yaxes(title_text="intrinsic dimension", secondary_y=False)
    fig.update_yaxes(title_text="NDCG@10", secondary_y=True)
    fig.update_layout(title="Layer selection: TwoNN rule vs retrieval sweep")
    return fig
