"""How a headline reads at a glance: its verdict's class and its measurement as one line.

Example:
    >>> verdict_class("holds for H 0.4 (p = 0.01)")
    'holds'
    >>> measurement({"metric": "Δ", "value": 0.5, "interval": [0.1, 0.9], "p_value": 0.02})
    'Δ: 0.5 [0.1, 0.9], p = 0.02'
"""

from __future__ import annotations

from typing import Any


def verdict_class(verdict: str) -> str:
    """``holds``, ``fails`` or ``open`` (inconclusive, not shown, pending)."""
    text = verdict.strip().lower()
    if text.startswith("holds"):
        return "holds"
    if text.startswith("does not hold"):
        return "fails"
    return "open"


def measurement(headline: dict[str, Any]) -> str:
    """``metric: value [low, high], p = …`` with three significant digits."""
    if headline.get("value") is None:
        return f"{headline['metric']}: not measured"
    text = f"{headline['metric']}: {_number(headline['value'])}"
    interval = headline.get("interval")
    if interval and None not in interval:
        text += f" [{_number(interval[0])}, {_number(interval[1])}]"
    if headline.get("p_value") is not None:
        text += f", p = {_number(headline['p_value'])}"
    return text


def _number(value: float) -> str:
    return f"{value:.3g}"
