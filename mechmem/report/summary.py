"""The report's ``summary.md``: the summary table and provenance, as Markdown.

Example:
    >>> print(summary_markdown(report))  # doctest: +SKIP
    # mechmem report: SmolLM2-135M-Instruct, scale smoke
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mechmem.report.sections import SECTIONS
from mechmem.report.verdicts import measurement


def summary_markdown(report: Mapping[str, Any]) -> str:
    """One table row per experiment (method, claim, measurement, verdict), then provenance."""
    run = report["run"]
    env = run["environment"]
    lines = [
        f"# mechmem report: {report['model']['name']}, scale {report['scale']}",
        "",
        "| method | experiment | the original's claim | our measurement | verdict |",
        "| --- | --- | --- | --- | --- |",
    ]
    for section in (s for s in SECTIONS if s.key in report["sections"]):
        for name in section.experiments:
            results = report["experiments"].get(name)
            if results is None:
                lines.append(f"| {section.title} | {name} | | | pending |")
                continue
            head = results["headline"]
            cells = [section.title, name, head["claim"], measurement(head), head["verdict"]]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    lines += [
        "",
        f"- command: `{run.get('command', '')}`",
        f"- model: {report['model']['name']} (`{report['model']['fingerprint']}`)",
        f"- device: {env['device']}; " + ", ".join(f"{k} {v}" for k, v in env["hardware"].items()),
        f"- versions: Python {env['python']}, {versions}",
        f"- run time: {run.get('elapsed_s', 0):.0f} s, finished {run.get('finished', '')}",
        "",
    ]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
