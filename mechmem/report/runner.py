"""`mechmem report`: every method's headline experiment on one model, resumable, one page.

Each experiment's results are written to ``out/runs/NAME.json`` as soon as it finishes, and
the page (``index.html``), ``results.json`` and ``summary.md`` are rewritten after each one. A
run that is started again skips every experiment whose stored results were made with the same
model, scale and config, so an interrupted run loses nothing; ``fresh=True`` starts over.

Example:
    >>> report = run_report(scale="smoke", out="report")  # doctest: +SKIP
    >>> report["sections"]                                  # doctest: +SKIP
    ['drugs', 'rdnet', 'attractor', 'continuity', 'nnm']
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mechmem.core.fingerprint import model_fingerprint, model_name
from mechmem.experiments import EXPERIMENTS
from mechmem.experiments.base import SCALES, write_outputs
from mechmem.report.environment import environment
from mechmem.report.page import render_page
from mechmem.report.sections import SECTION_KEYS, SECTIONS, Section
from mechmem.report.summary import summary_markdown

SCHEMA = "mechmem-report/1"


def check_report_args(out: str | Path, scale: str, only: Sequence[str] | None) -> list[Section]:
    """Validate the report's options before any model loads; return the sections to run.

    Example:
        >>> check_report_args("report", "huge", None)
        Traceback (most recent call last):
        ...
        ValueError: --scale: unknown 'huge'; expected one of ['smoke', 'default', 'full']
    """
    if scale not in SCALES:
        raise ValueError(f"--scale: unknown {scale!r}; expected one of {list(SCALES)}")
    unknown = [key for key in only or () if key not in SECTION_KEYS]
    if unknown:
        raise ValueError(f"--only: unknown {unknown}; expected some of {list(SECTION_KEYS)}")
    chosen = [s for s in SECTIONS if not only or s.key in only]
    missing = [n for s in chosen for n in s.experiments if n not in EXPERIMENTS]
    if missing:
        raise ValueError(f"experiments {missing} are not registered in mechmem.experiments")
    _check_writable(Path(out))
    return chosen


def run_report(
    model=None,
    *,
    model_name: str | None = None,
    out: str | Path = "report",
    scale: str = "smoke",
    only: Sequence[str] | None = None,
    fresh: bool = False,
    device: str | None = None,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the report's experiments (resuming), write the page, results.json and summary.md.

    ``model`` is an already loaded bridge; without it ``model_name`` (None: the embedded model) is
    loaded after every option has been checked. Returns results.json's content.
    """
    sections = check_report_args(out, scale, only)
    if model is None:
        from mechmem.models import load_model, model_config

        model_config(model_name)  # a bad --model fails here, before any weights load
        model = load_model(model_name, device=device)
    folder, runs = Path(out), Path(out) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    if fresh:
        for stored in runs.glob("*.json"):
            stored.unlink()
    started = _now()
    identity = {"model": model_fingerprint(model), "scale": scale}
    plan = [name for section in sections for name in section.experiments]
    done: dict[str, dict[str, Any]] = {}
    timings: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(plan), desc="mechmem report", unit="experiment", disable=not progress)
    try:
        for name in plan:
            bar.set_postfix_str(name)
            results = _run_or_resume(model, name, scale, identity, runs)
            timings[name] = results.pop("timings", {})
            done[name] = results
            bar.update(1)
            _write_report(folder, model, sections, scale, done, timings, started, command)
    finally:
        bar.close()
    return _write_report(folder, model, sections, scale, done, timings, started, command)


def _run_or_resume(
    model, name: str, scale: str, identity: dict[str, str], runs: Path
) -> dict[str, Any]:
    experiment = EXPERIMENTS[name]
    config = experiment.config(scale)
    key = {**identity, "config": config.to_dict()}
    stored = _stored(runs / f"{name}.json", key)
    if stored is not None:
        return stored
    start = time.perf_counter()
    results = experiment.run(model, config, out=None, progress=False)
    results["report_key"] = key
    results.setdefault("timings", {})["report_s"] = time.perf_counter() - start
    write_outputs(runs, name, results, experiment.figures(results))
    return json.loads((runs / f"{name}.json").read_text())


def _stored(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The stored results at ``path`` if they were made with ``key``, else None."""
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return results if results.get("report_key") == key else None


def _write_report(
    folder: Path,
    model,
    sections: list[Section],
    scale: str,
    done: dict[str, dict[str, Any]],
    timings: dict[str, dict[str, Any]],
    started: str,
    command: str | None,
) -> dict[str, Any]:
    report = {
        "schema": SCHEMA,
        "model": {
            "name": model_name(model),
            "fingerprint": model_fingerprint(model),
            "n_layers": int(model.cfg.n_layers),
            "d_model": int(model.cfg.d_model),
        },
        "scale": scale,
        "sections": [s.key for s in sections],
        "experiments": done,
        "run": {
            "command": command or " ".join(["mechmem", *sys.argv[1:]]),
            "started": started,
            "finished": _now(),
            "elapsed_s": sum(t.get("report_s", 0.0) for t in timings.values()),
            "timings": timings,
            "environment": environment(model.cfg.device),
        },
    }
    figures = {
        name: EXPERIMENTS[name].figures({**results, "timings": timings[name]})
        for name, results in done.items()
    }
    _write_atomic(folder / "results.json", json.dumps(report, indent=2, allow_nan=False))
    _write_atomic(folder / "summary.md", summary_markdown(report))
    _write_atomic(folder / "index.html", render_page(report, figures))
    return report


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".mechmem-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"--out: cannot write to {folder} ({error.strerror or error})") from error


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".part")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
