"""What every experiment provides, so `mechmem run` and `mechmem report` treat them alike.

An experiment is a config class, a ``run(model, config, *, out, progress) -> results`` function
that returns a JSON-safe dict, and a ``figures(results)`` function that rebuilds every figure
from that dict alone (so a report can re-render stored results). Its ``results["headline"]``
(built by :func:`headline`) is the one number a reader needs: the original's claim, our setup,
the measurement with its 95% interval, and a one-line verdict. ``scales`` maps ``smoke`` /
``default`` / ``full`` to config overrides.

Example:
    >>> h = headline(claim="perplexity unchanged", setup="with vs without", metric="Δ ppl",
    ...              value=0.1, interval=(-0.2, 0.4), p_value=0.5, verdict="holds")
    >>> h["interval"]
    [-0.2, 0.4]
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from mechmem.core.config import Config
from mechmem.plots import write_figure

SCALES: tuple[str, ...] = ("smoke", "default", "full")
HEADLINE_KEYS: tuple[str, ...] = (
    "claim",
    "setup",
    "metric",
    "value",
    "interval",
    "p_value",
    "verdict",
)
RESULT_KEYS: tuple[str, ...] = ("experiment", "config", "model", "answer", "headline")


@dataclass(frozen=True)
class Experiment:
    """One registered experiment (see the module docstring)."""

    name: str
    config_class: type[Config]
    run: Callable[..., dict[str, Any]]
    figures: Callable[[dict[str, Any]], dict[str, go.Figure]]
    scales: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    summary: str = ""

    def config(self, scale: str = "default", overrides: Mapping[str, Any] | None = None) -> Config:
        """The config at ``scale`` with ``overrides`` on top, validated.

        Example:
            >>> EXPERIMENTS["drugs"].config("smoke").seeds  # doctest: +SKIP
            [0]
        """
        if scale not in SCALES:
            raise ValueError(f"scale: unknown {scale!r}; expected one of {list(SCALES)}")
        return self.config_class.from_dict({**self.scales.get(scale, {}), **(overrides or {})})


def headline(
    *,
    claim: str,
    setup: str,
    metric: str,
    verdict: str,
    value: float | None = None,
    interval: tuple[float, float] | None = None,
    p_value: float | None = None,
) -> dict[str, Any]:
    """The experiment's one number, as a JSON-safe dict (NaN becomes ``None``); leave out
    value, interval and p when nothing could be measured.

    Example:
        >>> headline(claim="c", setup="s", metric="m", value=float("nan"), interval=None,
        ...          p_value=None, verdict="inconclusive")["value"] is None
        True
    """
    return {
        "claim": claim,
        "setup": setup,
        "metric": metric,
        "value": _finite(value),
        "interval": None if interval is None else [_finite(v) for v in interval],
        "p_value": _finite(p_value),
        "verdict": verdict,
    }


def check_results(results: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` if ``results`` lacks a required key or holds a NaN or infinity.

    Example:
        >>> check_results({"experiment": "x"})
        Traceback (most recent call last):
        ...
        ValueError: results of 'x': missing config, model, answer, headline
    """
    name = results.get("experiment", "?")
    missing = [key for key in RESULT_KEYS if key not in results]
    if "headline" in results:
        missing += [f"headline.{k}" for k in HEADLINE_KEYS if k not in results["headline"]]
    if missing:
        raise ValueError(f"results of {name!r}: missing {', '.join(missing)}")
    json.dumps(results, allow_nan=False)  # ValueError on NaN / inf


def write_outputs(
    out: str | Path,
    name: str,
    results: dict[str, Any],
    figures: Mapping[str, go.Figure],
) -> Path:
    """Write ``{name}.json`` and one HTML page per figure (``{name}_{key}.html``) into ``out``.

    The pages load ``plotly.min.js`` from the same folder, written once, so they work offline.
    Returns the JSON path.

    Example:
        >>> write_outputs("results", "drugs", results, figures(results))  # doctest: +SKIP
        PosixPath('results/drugs.json')
    """
    check_results(results)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    partial = path.with_suffix(".json.part")
    partial.write_text(json.dumps(results, indent=2, allow_nan=False))
    partial.replace(path)  # atomic: an interrupted write never leaves a half file
    for key, figure in figures.items():
        write_figure(figure, folder / f"{name}_{key}.html")
    return path


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
