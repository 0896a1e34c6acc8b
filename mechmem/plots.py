"""Plotly figures of probe results. Every function returns a ``go.Figure`` and never shows it.

Example:
    >>> fig = id_profile_figure(profile)   # doctest: +SKIP
    >>> fig.write_html("id_profile.html")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mechmem.methods.attractor import AttractorTraces
from mechmem.probes.id_profile import IDProfile
from mechmem.probes.logit_delta import LayerEffectResult, LogitDeltaResult
from mechmem.probes.twonn import TwoNNResult


def write_figure(figure: go.Figure, path: str | Path) -> None:
    """Write ``figure`` as an HTML page that works offline: ``plotly.min.js`` is written once
    beside it and loaded from there (no CDN).

    Example:
        >>> write_figure(go.Figure(), "results/empty.html")  # doctest: +SKIP
    """
    figure.write_html(Path(path), include_plotlyjs="directory")


def logit_delta_figure(result: LogitDeltaResult, title: str = "Logit delta") -> go.Figure:
    """Per scored position: max / mean |Δlogit| (left axis) and KL both ways (right axis).

    Example:
        >>> logit_delta_figure(logit_delta(model, prompts, steer))  # doctest: +SKIP
    """
    labels = [f"row {r} pos {p}" for r, p in zip(result.row, result.position)]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_bar(x=labels, y=result.max_abs_delta, name="max |Δlogit|")
    fig.add_bar(x=labels, y=result.mean_abs_delta, name="mean |Δlogit|")
    fig.add_scatter(
        x=labels,
        y=result.kl_forward,
        name="KL(P_int‖P_base)",
        mode="markers+lines",
        secondary_y=True,
    )
    fig.add_scatter(
        x=labels,
        y=result.kl_reverse,
        name="KL(P_base‖P_int)",
        mode="markers+lines",
        secondary_y=True,
    )
    fig.update_layout(title=title, barmode="group", xaxis_title="scored position")
    fig.update_yaxes(title_text="|Δlogit|", rangemode="tozero", secondary_y=False)
    fig.update_yaxes(title_text="KL (nats)", rangemode="tozero", secondary_y=True)
    return fig


def layer_effect_figure(result: LayerEffectResult, title: str = "Effect by layer") -> go.Figure:
    """Mean |Δlogit| and KL of the same intervention applied at each layer in turn.

    Example:
        >>> layer_effect_figure(logit_delta_by_layer(model, prompts, make))  # doctest: +SKIP
    """
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_scatter(x=result.layers, y=result.metric("mean_abs_delta"), name="mean |Δlogit|")
    fig.add_scatter(
        x=result.layers, y=result.metric("kl_forward"), name="KL(P_int‖P_base)", secondary_y=True
    )
    fig.add_scatter(
        x=result.layers,
        y=1 - result.metric("top1_agreement"),
        name="top-1 changed (fraction)",
        secondary_y=True,
        line={"dash": "dot"},
    )
    fig.update_layout(title=title, xaxis_title="layer")
    # |Δlogit|, KL and a fraction are never negative: both axes start at zero.
    fig.update_yaxes(title_text="mean |Δlogit|", rangemode="tozero", secondary_y=False)
    fig.update_yaxes(title_text="KL (nats) / fraction", rangemode="tozero", secondary_y=True)
    return fig


def id_profile_figure(profile: IDProfile, title: str | None = None) -> go.Figure:
    """Intrinsic dimension per layer with its bootstrap band and the suggested layer marked.

    Example:
        >>> id_profile_figure(id_profile(model, texts))  # doctest: +SKIP
    """
    layers = np.array(profile.layers)
    fig = go.Figure()
    fig.add_scatter(
        x=np.concatenate([layers, layers[::-1]]),
        y=np.concatenate([profile.ci_high, profile.ci_low[::-1]]),
        fill="toself",
        line={"width": 0},
        opacity=0.25,
        name="bootstrap CI",
        hoverinfo="skip",
    )
    fig.add_scatter(x=layers, y=profile.dimension, mode="lines+markers", name="TwoNN ID")
    suggested = profile.suggest_layer()
    fig.add_vline(x=suggested, line_dash="dash", annotation_text=f"suggested layer {suggested}")
    fig.update_layout(
        title=title
        or f"Intrinsic dimension by layer ({profile.hook}, {profile.pooling} pooling, "
        f"{profile.n_points} points)",
        xaxis_title="layer",
        yaxis_title="intrinsic dimension",
    )
    return fig


def twonn_fit_figure(result: TwoNNResult, title: str | None = None) -> go.Figure:
    """The TwoNN diagnostic: -log(1 - F) against log(mu) with the line of slope d through 0
    (the least-squares fit for ``method="regression"``; for ``"mle"``, the MLE's slope).

    On data that follow the TwoNN law the kept points lie on the line; a bend means the
    dimension changes with scale (or, bent down at large mu, a boundary). Discarded ratios are
    drawn in grey.

    Example:
        >>> twonn_fit_figure(twonn_bootstrap(points))  # doctest: +SKIP
    """
    log_mu = np.log(np.sort(result.mu))
    n = len(log_mu)
    kept = int(n * (1 - result.discard_fraction))
    x, y = log_mu[: n - 1], -np.log1p(-np.arange(1, n) / n)  # F = 1 at the largest: left out
    fig = go.Figure()
    fig.add_scatter(x=x[:kept], y=y[:kept], mode="markers", name="kept ratios")
    if kept < n - 1:
        fig.add_scatter(
            x=x[kept:], y=y[kept:], mode="markers", name="discarded", marker={"color": "grey"}
        )
    line_x = np.array([0.0, x[-1]])
    label = (
        "least-squares fit" if result.method == "regression" else "MLE, not fitted to these axes"
    )
    fig.add_scatter(
        x=line_x,
        y=result.dimension * line_x,
        mode="lines",
        name=f"slope d = {result.dimension:.2f} ({label})",
    )
    fig.update_layout(
        title=title
        or f"TwoNN fit ({result.method}): d = {result.dimension:.2f} "
        f"[{result.ci_low:.2f}, {result.ci_high:.2f}], {result.n_points} points",
        xaxis_title="log(mu)",
        yaxis_title="-log(1 - F(mu))",
    )
    return fig


def trace_figure(
    traces: dict[str, np.ndarray], row: int = 0, title: str = "Activation traces"
) -> go.Figure:
    """Lines for scalar traces ``[step, batch]``, a heatmap for vector ones ``[step, batch, k]``.

    A single vector trace alone is a heatmap; otherwise each vector trace is drawn as its norm per
    step (NaN padding counted as 0).

    Example:
        >>> trace_figure(recorder.traces())  # doctest: +SKIP
    """
    if not traces:
        raise ValueError("traces: nothing to plot")
    scalar = {k: v for k, v in traces.items() if v.ndim == 2}
    vector = {k: v for k, v in traces.items() if v.ndim >= 3}
    if vector and not scalar and len(vector) == 1:
        name, values = next(iter(vector.items()))
        flat = values[:, row].reshape(values.shape[0], -1)
        fig = go.Figure(go.Heatmap(z=flat.T, colorbar={"title": "value"}))
        fig.update_layout(title=f"{title}: {name}", xaxis_title="step", yaxis_title="component")
        return fig
    fig = go.Figure()
    for name, values in scalar.items():
        fig.add_scatter(y=values[:, row], mode="lines", name=name)
    for name, values in vector.items():
        flat = values[:, row].reshape(values.shape[0], -1)
        norm = np.linalg.norm(np.nan_to_num(flat), axis=-1)  # NaN: padding of growing key axes
        fig.add_scatter(y=norm, mode="lines", name=f"‖{name}‖")
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="value")
    return fig


def repetition_figure(
    logs: Sequence[dict], keys: Sequence[str] = ("rep_n_token",), title: str = "Repetition"
) -> go.Figure:
    """Repetition metrics logged every N tokens (the engine's callback logs) against tokens.

    Example:
        >>> repetition_figure(result.logs)  # doctest: +SKIP
    """
    if not logs:
        raise ValueError("logs: nothing to plot")
    fig = go.Figure()
    steps = [entry["step"] for entry in logs]
    for key in keys:
        fig.add_scatter(
            x=steps, y=[entry.get(key) for entry in logs], mode="lines+markers", name=key
        )
    fig.update_layout(title=title, xaxis_title="generated tokens", yaxis_title="value")
    return fig


def turn_effect_figure(
    arms: dict[str, Sequence[dict]], title: str = "Effect of the interventions per turn"
) -> go.Figure:
    """KL(P_int‖P_clean) per turn (bars) and top-1 agreement (markers), one colour per arm.

    Example:
        >>> turn_effect_figure({"steer": turn_effects(session)})  # doctest: +SKIP
    """
    if not arms or not all(arms.values()):
        raise ValueError("arms: give at least one arm with at least one turn")
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for name, effects in arms.items():
        turns = [f"turn {e['turn'] + 1}" for e in effects]
        fig.add_bar(x=turns, y=[e["kl_forward"] for e in effects], name=f"{name}: KL")
        fig.add_scatter(
            x=turns,
            y=[e["top1_agreement"] for e in effects],
            name=f"{name}: top-1 agreement",
            mode="markers+lines",
            secondary_y=True,
        )
    fig.update_layout(title=title, barmode="group")
    fig.update_yaxes(title_text="KL(P_int‖P_clean), nats", secondary_y=False)
    fig.update_yaxes(title_text="top-1 agreement", range=[0, 1.05], secondary_y=True)
    return fig


def attractor_strength_figure(
    traces: AttractorTraces, row: int = 0, title: str = "Attractor strengths"
) -> go.Figure:
    """Heatmap of every slot's strength over the updates (steps × slots) of one batch row, with
    the slot each query matched marked on top.

    Example:
        >>> attractor_strength_figure(attractor.traces())  # doctest: +SKIP
    """
    strengths = traces.strengths[:, row]
    steps = np.arange(len(strengths))
    fig = go.Figure(
        go.Heatmap(x=steps, z=strengths.T, colorscale="Viridis", colorbar={"title": "strength"})
    )
    fired = traces.fired[:, row]
    hit = fired >= 0
    fig.add_scatter(
        x=steps[hit],
        y=fired[hit],
        mode="markers",
        name="matched slot",
        marker={"size": 3, "color": "white"},
    )
    fig.update_layout(
        title=f"{title} (layer {traces.layer}, row {row})", xaxis_title="update", yaxis_title="slot"
    )
    return fig


def attractor_events_figure(
    traces: AttractorTraces, row: int = 0, title: str = "Attractor births and evictions"
) -> go.Figure:
    """Timeline of slot births and evictions (update × slot) of one row; burn-in shaded.

    Example:
        >>> attractor_events_figure(attractor.traces())  # doctest: +SKIP
    """
    fig = go.Figure()
    for name, events, symbol in (
        ("birth", traces.born, "triangle-up"),
        ("eviction", traces.evicted, "x"),
    ):
        steps, slots = np.nonzero(events[:, row])
        fig.add_scatter(x=steps, y=slots, mode="markers", name=name, marker={"symbol": symbol})
    burning = np.nonzero(traces.burn_in[:, row])[0]
    if len(burning):
        fig.add_vrect(
            x0=burning.min() - 0.5,
            x1=burning.max() + 0.5,
            opacity=0.15,
            fillcolor="grey",
            line_width=0,
            annotation_text="burn-in",
        )
    fig.update_layout(
        title=f"{title} (layer {traces.layer}, row {row})", xaxis_title="update", yaxis_title="slot"
    )
    return fig


def add_mean_band(
    fig: go.Figure, x: Sequence[float], values: np.ndarray, name: str, mode: str = "lines"
) -> None:
    """Add the mean over the columns of ``values`` ``[len(x), runs]`` as a line, with a min–max
    band when there is more than one run.

    Example:
        >>> add_mean_band(go.Figure(), [0, 1], np.array([[1.0, 2.0], [3.0, 5.0]]), "arm")
    """
    x = list(x)
    lines = sum(1 for trace in fig.data if trace.fill != "toself")
    colour = plotly.colors.qualitative.Plotly[lines % len(plotly.colors.qualitative.Plotly)]
    if values.shape[1] > 1:
        fig.add_scatter(
            x=x + x[::-1],
            y=values.max(1).tolist() + values.min(1)[::-1].tolist(),
            fill="toself",
            fillcolor=colour,
            opacity=0.2,
            line={"width": 0},
            showlegend=False,
            name=f"{name} (range)",
        )
    fig.add_scatter(x=x, y=values.mean(1), mode=mode, name=name, line={"color": colour})


def attractor_injection_figure(
    norms: dict[str, np.ndarray], title: str = "Injected norm"
) -> go.Figure:
    """Norm of what the attractor added to the attention output per update, one line per label:
    the mean over the columns of its ``[update, row]`` array (traces' ``injected_norm``, or one
    column per seed) with a min–max band.

    Example:
        >>> norms = {"causal": attractor.traces().injected_norm}  # doctest: +SKIP
        >>> attractor_injection_figure(norms)                      # doctest: +SKIP
    """
    fig = go.Figure()
    for label, values in norms.items():
        values = np.asarray(values, dtype=float).reshape(len(values), -1)
        add_mean_band(fig, np.arange(len(values)).tolist(), values, label)
    fig.update_layout(title=title, xaxis_title="update", yaxis_title="‖injected‖")
    return fig
