"""The experiment contract: registry entries, headlines, offline pages, `mechmem run --scale`."""

from __future__ import annotations

import json

import plotly.graph_objects as go
import pytest

import mechmem
from mechmem.cli import main
from mechmem.experiments import EXPERIMENTS
from mechmem.experiments.base import SCALES, check_results, headline, write_outputs


def _results(**changes):
    base = {
        "experiment": "demo",
        "config": {"a": 1},
        "model": "tiny",
        "answer": "text",
        "headline": headline(
            claim="c",
            setup="s",
            metric="m",
            value=1.0,
            interval=(0.5, 1.5),
            p_value=0.2,
            verdict="inconclusive",
        ),
    }
    return {**base, **changes}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_registered_experiment_has_valid_scales(name):
    experiment = EXPERIMENTS[name]
    assert experiment.name == name
    assert set(experiment.scales) == set(SCALES)
    for scale in SCALES:
        assert isinstance(experiment.config(scale), experiment.config_class)


def test_unknown_scale_and_bad_override_are_refused():
    with pytest.raises(ValueError, match="scale"):
        EXPERIMENTS["drugs"].config("huge")
    with pytest.raises(ValueError, match="seeds"):
        EXPERIMENTS["drugs"].config("smoke", {"seeds": [0]})


def test_headline_turns_nan_into_none():
    h = headline(
        claim="c",
        setup="s",
        metric="m",
        value=float("nan"),
        interval=(float("inf"), 1.0),
        p_value=None,
        verdict="v",
    )
    assert h["value"] is None and h["interval"] == [None, 1.0]


def test_check_results_names_what_is_missing_and_refuses_nan():
    with pytest.raises(ValueError, match="answer"):
        check_results({k: v for k, v in _results().items() if k != "answer"})
    with pytest.raises(ValueError, match="headline.verdict"):
        check_results(_results(headline={"claim": "c"}))
    with pytest.raises(ValueError):
        check_results(_results(extra=float("nan")))


def test_write_outputs_writes_json_and_offline_pages_with_one_plotly_js(tmp_path):
    figures = {"one": go.Figure(go.Scatter(y=[1, 2])), "two": go.Figure(go.Bar(y=[3]))}
    path = write_outputs(tmp_path, "demo", _results(), figures)
    assert json.loads(path.read_text())["headline"]["value"] == 1.0
    pages = sorted(p.name for p in tmp_path.glob("*.html"))
    assert pages == ["demo_one.html", "demo_two.html"]
    assert (tmp_path / "plotly.min.js").stat().st_size > 1_000_000
    for page in pages:
        html = (tmp_path / page).read_text()
        assert 'src="plotly.min.js"' in html and "cdn.plot.ly" not in html


def test_write_outputs_refuses_results_without_a_headline(tmp_path):
    bad = {k: v for k, v in _results().items() if k != "headline"}
    with pytest.raises(ValueError, match="headline"):
        write_outputs(tmp_path, "demo", bad, {})
    assert not any(tmp_path.iterdir())


def test_run_at_a_scale_applies_its_overrides_then_the_sets(tiny, monkeypatch, tmp_path):
    seen = {}

    def fake_run(model, config, *, out=None, progress=False):
        seen["config"] = config
        return {"answer": "done"}

    monkeypatch.setattr(mechmem, "load_model", lambda *a, **k: tiny("llama"))
    experiment = EXPERIMENTS["rdnet"]
    monkeypatch.setitem(
        EXPERIMENTS, "rdnet", type(experiment)(**{**experiment.__dict__, "run": fake_run})
    )
    argv = ["run", "rdnet", "--scale", "smoke", "--set", "seeds=[5]", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert seen["config"].tokens == experiment.scales["smoke"]["tokens"]
    assert seen["config"].seeds == [5]


def test_run_with_an_unknown_scale_fails_before_loading(monkeypatch):
    monkeypatch.setattr(mechmem, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit):
        main(["run", "rdnet", "--scale", "huge"])
