"""The report as one self-contained HTML page: plotly.js inlined once, every figure beside the
numbers it shows, a summary table on top and the run's provenance at the bottom.

Example:
    >>> html = render_page(report, figures)  # doctest: +SKIP
    >>> Path("report/index.html").write_text(html)  # doctest: +SKIP
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

import plotly.graph_objects as go
import plotly.offline

from mechmem.report.sections import SECTIONS, Section
from mechmem.report.verdicts import measurement, verdict_class

_STYLE = """
body { font: 16px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2327;
       margin: 0; background: #f6f7f9; }
main { max-width: 1080px; margin: 0 auto; padding: 24px; }
header h1 { margin: 0 0 4px; font-size: 28px; }
header p { margin: 4px 0; color: #50575e; }
table { border-collapse: collapse; width: 100%; background: #fff; margin: 16px 0; }
th, td { text-align: left; vertical-align: top; padding: 8px 10px;
         border-bottom: 1px solid #e2e4e7; }
th { background: #eef0f3; font-weight: 600; }
section { background: #fff; border: 1px solid #e2e4e7; border-radius: 8px; padding: 8px 20px 16px;
          margin: 20px 0; }
section h2 { margin: 12px 0 4px; }
h3 { margin: 16px 0 4px; font-size: 18px; }
dl { display: grid; grid-template-columns: 120px 1fr; gap: 4px 12px; margin: 8px 0; }
dt { font-weight: 600; color: #50575e; }
dd { margin: 0; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 14px;
         font-weight: 600; }
.holds { background: #d8f3dc; color: #1b5e20; }
.fails { background: #fde2e1; color: #8e1b1b; }
.open { background: #fff1c2; color: #6b4e00; }
.pending { background: #e2e4e7; color: #50575e; }
details { margin: 8px 0; }
summary { cursor: pointer; color: #2c5d9c; }
.figure { margin: 12px 0; }
footer { color: #50575e; font-size: 14px; }
footer code { font-size: 13px; }
"""


def render_page(report: Mapping[str, Any], figures: Mapping[str, Mapping[str, go.Figure]]) -> str:
    """The page for ``report`` (results.json's content) with each experiment's ``figures``.

    Sections whose experiments have not run yet say so (an interrupted run's page).
    """
    experiments = report["experiments"]
    sections = [s for s in SECTIONS if s.key in report["sections"]]
    body = [
        _header(report),
        _summary_table(sections, experiments),
        *(_section(s, experiments, figures) for s in sections),
        _footer(report),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>mechmem report — {_e(report['model']['name'])}</title>"
        f"<style>{_STYLE}</style>"
        f'<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>'
        f"</head><body><main>{''.join(body)}</main></body></html>\n"
    )


def _header(report: Mapping[str, Any]) -> str:
    run = report["run"]
    return (
        "<header><h1>mechmem: five inference-time memory and variety methods, tested</h1>"
        f"<p>Model <b>{_e(report['model']['name'])}</b> · scale <b>{_e(report['scale'])}</b> · "
        f"{_e(run.get('finished') or run.get('started', ''))}</p>"
        "<p>Each section states what the original project claimed, how we measured it with a "
        "control arm, the number with its 95% interval, and a one-line verdict.</p></header>"
    )


def _summary_table(sections: list[Section], experiments: Mapping[str, Any]) -> str:
    rows = []
    for section in sections:
        results = experiments.get(section.experiments[0])
        if results is None:
            cells = '<td colspan="2">not run yet</td><td><span class="badge pending">pending</span>'
        else:
            head = results["headline"]
            cells = (
                f"<td>{_e(head['claim'])}</td><td>{_e(measurement(head))}</td>"
                f"<td>{_badge(head['verdict'])}"
            )
        link = f'<a href="#{section.key}">{_e(section.title)}</a>'
        rows.append(f"<tr><td>{link}</td>{cells}</td></tr>")
    return (
        "<table><thead><tr><th>Method</th><th>The original's claim</th>"
        "<th>Our measurement</th><th>Verdict</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _section(
    section: Section,
    experiments: Mapping[str, Any],
    figures: Mapping[str, Mapping[str, go.Figure]],
) -> str:
    parts = [f'<section id="{section.key}"><h2>{_e(section.title)}</h2><p>{_e(section.what)}</p>']
    for name in section.experiments:
        results = experiments.get(name)
        if results is None:
            parts.append(f'<h3>{_e(name)}</h3><p><span class="badge pending">pending</span></p>')
            continue
        head = results["headline"]
        parts.append(
            f"<h3>{_e(name)}</h3><dl>"
            f"<dt>Claim</dt><dd>{_e(head['claim'])}</dd>"
            f"<dt>Our setup</dt><dd>{_e(head['setup'])}</dd>"
            f"<dt>Measured</dt><dd>{_e(measurement(head))}</dd>"
            f"<dt>Verdict</dt><dd>{_badge(head['verdict'])}</dd></dl>"
            f"<details><summary>The full answer</summary><p>{_e(results['answer'])}</p></details>"
        )
        for key, figure in figures.get(name, {}).items():
            div = figure.to_html(
                full_html=False,
                include_plotlyjs=False,
                div_id=f"fig-{name}-{key}",
                default_width="100%",
                default_height="440px",
                config={"responsive": True, "displaylogo": False},
            )
            parts.append(f'<div class="figure">{div}</div>')
    parts.append(
        f"<p>More: <code>{_e(section.doc)}</code> · notebook <code>{_e(section.notebook)}</code>"
        "</p></section>"
    )
    return "".join(parts)


def _footer(report: Mapping[str, Any]) -> str:
    run = report["run"]
    env = run["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    hardware = ", ".join(f"{k}: {v}" for k, v in env["hardware"].items())
    seeds = "; ".join(
        f"{name}: {results['config'].get('seeds', results['config'].get('seed', '—'))}"
        for name, results in report["experiments"].items()
    )
    return (
        "<footer><h2>How this was produced</h2><dl>"
        f"<dt>Command</dt><dd><code>{_e(run.get('command', ''))}</code></dd>"
        f"<dt>Model</dt><dd>{_e(report['model']['name'])} "
        f"(<code>{_e(report['model']['fingerprint'])}</code>)</dd>"
        f"<dt>Device</dt><dd>{_e(env['device'])}; {_e(hardware)}</dd>"
        f"<dt>Versions</dt><dd>Python {_e(env['python'])}, {_e(versions)}</dd>"
        f"<dt>Seeds</dt><dd>{_e(seeds)}</dd>"
        f"<dt>Run time</dt><dd>{run.get('elapsed_s', 0):.0f} s "
        f"(started {_e(run.get('started', ''))})</dd></dl></footer>"
    )


def _badge(verdict: str) -> str:
    return f'<span class="badge {verdict_class(verdict)}">{_e(verdict)}</span>'


def _e(text: Any) -> str:
    return html.escape(str(text))
