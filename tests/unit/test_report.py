"""``mechmem report`` on a tiny model: schema, determinism, resume after a kill, bad options,
and the page in a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import replace
from importlib.resources import files

import pytest

import mechmem
from mechmem.cli import main
from mechmem.experiments import EXPERIMENTS
from mechmem.report import run_report

TINY_SCALES = {
    "drugs": {
        "prompts": ["hello there", "what is up", "tell me"],
        "seeds": [0, 1],
        "max_new_tokens": 6,
        "chat": False,
        "sites": ["H"],
        "doses": [0.3, 1.5],
        "temperatures": [0.5, 3.0],
        "top_ps": [0.9],
        "divergence_doses": [0.5],
    },
    "rdnet": {
        "prompts": ["once upon a time"],
        "seeds": [0, 1],
        "tokens": 40,
        "log_every": 20,
        "window": 32,
        "window_keep": 8,
        "rep_window": 20,
        "char_window": 40,
    },
    "attractor": {
        "max_text_tokens": 256,
        "window": 32,
        "overhead_tokens": 4,
        "overhead_repeats": 1,
        "seeds": [0, 1],
        "tokens": 40,
        "rep_window": 20,
        "generation_arms": ["causal"],
        "qa_items": 8,
        "qa_chains": 4,
    },
    "continuity": {
        "prompts": ["hello there", "what is this", "tell me a story"],
        "gains": [0.8],
        "topics": 1,
        "max_new_tokens": 4,
        "layer_sweep": [0],
        "window": 320,  # the tiny models' byte tokens outgrow their 512 positions
    },
    "nnm-gate": {"n_items": 3, "held_out": 6, "max_new_tokens": 2},
    "nnm-retrieval": {
        "synthetic_docs": 16,
        "synthetic_queries": 4,
        "id_texts": 16,
        "max_tokens": 24,
    },
}
ONLY = ["drugs", "rdnet"]


@pytest.fixture
def tiny_scales(monkeypatch):
    """Every scale of drugs and rdnet shrunk to a few tiny-model tokens; counts each run."""
    calls: list[str] = []
    for name, overrides in TINY_SCALES.items():
        experiment = EXPERIMENTS[name]

        def counted(model, config, *, _run=experiment.run, _name=name, **kwargs):
            calls.append(_name)
            return _run(model, config, **kwargs)

        scales = {scale: overrides for scale in ("smoke", "default", "full")}
        monkeypatch.setitem(EXPERIMENTS, name, replace(experiment, run=counted, scales=scales))
    return calls


def _without_run(report: dict) -> dict:
    return {key: value for key, value in report.items() if key != "run"}


def test_results_json_follows_the_schema_and_a_rerun_with_the_same_seeds_is_equal(
    tiny, tiny_scales, tmp_path
):
    """Every section, twice: equal numbers everywhere but the run's timings."""
    jsonschema = pytest.importorskip("jsonschema")
    first = run_report(tiny("llama"), out=tmp_path / "a", progress=False)
    second = run_report(tiny("llama"), out=tmp_path / "b", progress=False)
    schema = json.loads(files("mechmem").joinpath("data/report.schema.json").read_text())
    stored = json.loads((tmp_path / "a" / "results.json").read_text())
    jsonschema.validate(stored, schema)
    assert "NaN" not in (tmp_path / "a" / "results.json").read_text()
    assert _without_run(first) == _without_run(second)
    assert tiny_scales == [*TINY_SCALES, *TINY_SCALES]
    assert set(stored["run"]["timings"]) == set(TINY_SCALES)
    assert "overhead" in stored["run"]["timings"]["attractor"]  # a timing, kept with the run's
    summary = (tmp_path / "a" / "summary.md").read_text()
    assert all(f"| {name} |" in summary for name in TINY_SCALES)
    page = (tmp_path / "a" / "index.html").read_text()
    assert "Greedy tokens\\u002fs by CPU time" in page  # the attractor's overhead figure (timings)


def test_an_interrupted_run_resumes_with_the_remaining_experiments_only(
    tiny, tiny_scales, tmp_path, monkeypatch
):
    model = tiny("llama")
    whole = run_report(model, out=tmp_path / "whole", only=ONLY, progress=False)
    tiny_scales.clear()
    rdnet = EXPERIMENTS["rdnet"]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(EXPERIMENTS, "rdnet", replace(rdnet, run=killed))
    with pytest.raises(KeyboardInterrupt):
        run_report(model, out=tmp_path / "cut", only=ONLY, progress=False)
    partial = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert list(partial["experiments"]) == ["drugs"]  # written as soon as drugs finished
    assert "pending" in (tmp_path / "cut" / "index.html").read_text()
    monkeypatch.setitem(EXPERIMENTS, "rdnet", rdnet)
    tiny_scales.clear()
    resumed = run_report(model, out=tmp_path / "cut", only=ONLY, progress=False)
    assert tiny_scales == ["rdnet"]
    assert _without_run(resumed) == _without_run(whole)
    tiny_scales.clear()
    run_report(model, out=tmp_path / "cut", only=ONLY, progress=False, fresh=True)
    assert tiny_scales == ["drugs", "rdnet"]


def test_a_changed_config_is_not_taken_from_the_stored_run(
    tiny, tiny_scales, tmp_path, monkeypatch
):
    run_report(tiny("llama"), out=tmp_path, only=["drugs"], progress=False)
    drugs = EXPERIMENTS["drugs"]
    smaller = {**TINY_SCALES["drugs"], "max_new_tokens": 5}
    monkeypatch.setitem(EXPERIMENTS, "drugs", replace(drugs, scales={"smoke": smaller}))
    run_report(tiny("llama"), out=tmp_path, only=["drugs"], progress=False)
    assert tiny_scales == ["drugs", "drugs"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--scale", "huge"], "--scale"),
        (["--only", "nope"], "--only"),
        (["--only", "drugs", "--model", "/nowhere/model.gguf"], "No GGUF file"),
    ],
)
def test_bad_options_fail_before_any_model_loads(argv, message, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(mechmem, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["report", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_an_unwritable_out_fails_before_any_model_loads(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(mechmem, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    blocker = tmp_path / "file"
    blocker.write_text("the user's file")
    assert main(["report", "--only", "drugs", "--out", str(blocker / "report")]) == 2
    assert "--out" in capsys.readouterr().err
    assert blocker.read_text() == "the user's file"


def _chromium() -> str | None:
    return next(
        (shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None
    )


def test_the_page_renders_every_figure_in_headless_chromium_without_errors(
    tiny, tiny_scales, tmp_path
):
    browser = _chromium()
    if browser is None:
        if os.environ.get("MECHMEM_REQUIRE_BROWSER") == "1":
            pytest.fail("Chromium is required here (scripts/test.sh installs it) but is absent")
        pytest.skip("no Chromium on this machine (scripts/test.sh installs Debian's)")
    report = run_report(tiny("llama"), out=tmp_path, only=ONLY, progress=False)
    page = tmp_path / "index.html"
    html = page.read_text()
    assert html.count("plotly.js v") == 1  # plotly.js inlined once
    assert "<script src=" not in html and '<link rel="stylesheet" href' not in html  # offline
    expected = {
        f"fig-{name}-{key}"
        for name, results in report["experiments"].items()
        for key in EXPERIMENTS[name].figures(results)
    }
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=20000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rendered = set(re.findall(r'<div id="(fig-[^"]+)" class="[^"]*js-plotly-plot', done.stdout))
    assert rendered == expected and len(expected) == 3
    assert done.stdout.count('class="main-svg"') >= 2 * len(expected)  # each plot drew its SVG
    from mechmem.report.docs import write_results_doc

    doc = write_results_doc(tmp_path / "results.json", tmp_path / "docs").read_text()
    for div_id in expected:
        name, key = div_id.removeprefix("fig-").split("-", 1)
        image = tmp_path / "docs" / "img" / f"{name}_{key}.png"
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(img/{image.name})" in doc
    errors = [
        line for line in done.stderr.splitlines() if "Uncaught" in line or ":ERROR:CONSOLE" in line
    ]
    assert errors == []
