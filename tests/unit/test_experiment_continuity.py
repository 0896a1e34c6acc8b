"""The continuity experiment end to end on a tiny model, and its pieces."""

from __future__ import annotations

import json

import pytest

from mechmem.experiments import EXPERIMENTS
from mechmem.experiments.continuity import (
    TOPICS,
    ContinuityExperimentConfig,
    content_words,
    figures,
    run_continuity,
    sweep_layers,
    word_overlap,
)


def _small_config(**changes):
    base = dict(
        prompts=["hello there", "what is this", "tell me a story", "count to three"],
        gains=[0.8, 3.0],
        topics=2,
        max_new_tokens=4,
        layer_sweep=[0, 2],
        window=320,  # the tiny models' byte tokens outgrow their 512 positions
    )
    return ContinuityExperimentConfig(**{**base, **changes})


def test_run_writes_json_and_figures_and_the_observer_is_the_base_model(tiny, tmp_path):
    results = run_continuity(tiny("llama"), _small_config(), out=tmp_path)
    saved = json.loads((tmp_path / "continuity.json").read_text())
    for name in ("probe", "layers", "protocol"):
        assert (tmp_path / f"continuity_{name}.html").is_file()
    probe = saved["probe"]
    assert probe["observer_max_abs_delta"] == 0.0  # linkage 0 is the base model exactly
    assert {(a["variant"], a["gain"]) for a in probe["arms"]} == {
        (v, g) for v in ("faithful", "causal") for g in (0.8, 3.0)
    }
    for arm in probe["arms"]:
        assert arm["kl_forward"]["mean"] > 0 and len(arm["kl_forward"]["per_prompt"]) == 4
        low, high = arm["kl_forward"]["interval"]
        assert low <= arm["kl_forward"]["mean"] <= high
    assert [row["layer"] for row in probe["by_layer"]["layers"]] == [0, 2]
    conversations = saved["protocol"]["conversations"]
    assert len(conversations) == 2 * 3  # two topics, observer + two linked arms
    for conversation in conversations:
        assert len(conversation["replies"]) == len(conversation["stance"]) == 5
        calls = conversation["calls"]
        if conversation["arm"] == "observer":
            assert calls == []  # linkage 0: the branch never runs
        else:  # one call per target layer per forward, the same count on every target layer
            assert len(calls) == 2 and calls[0] == calls[1] >= 5
    assert {t["arm"] for t in saved["protocol"]["tests"]} == {"faithful", "causal"}
    assert all(t["n"] == 2 for t in saved["protocol"]["tests"])
    assert results["headline"]["value"] == pytest.approx(
        next(a for a in probe["arms"] if a["variant"] == "faithful" and a["gain"] == 0.8)[
            "kl_forward"
        ]["mean"]
    )
    assert "7.21" in results["headline"]["claim"] and results["answer"]
    assert set(figures(saved)) == {"probe", "layers", "protocol"}  # from the JSON alone


def test_same_seed_same_conversations(tiny):
    config = _small_config(topics=1, variants=["causal"], gains=[0.8])
    first = run_continuity(tiny("llama"), config)["protocol"]["conversations"]
    second = run_continuity(tiny("llama"), config)["protocol"]["conversations"]
    assert [c["replies"] for c in first] == [c["replies"] for c in second]


def test_without_topics_the_protocol_is_skipped(tiny):
    results = run_continuity(tiny("gpt2"), _small_config(topics=0, gains=[0.8]))
    assert results["protocol"] is None and "not run" in results["answer"]
    assert set(figures(results)) == {"probe", "layers"}


def test_sweep_layers_default_to_a_stride_and_the_targets(tiny):
    model = tiny("llama")
    assert sweep_layers(model, _small_config(layer_sweep=None)) == [0, 1, 2]
    assert sweep_layers(model, _small_config(layer_sweep=None, layer_stride=2)) == [0, 1, 2]
    assert sweep_layers(model, _small_config(layer_sweep=[1])) == [1]


def test_word_overlap_counts_content_words():
    assert content_words("The cars should be banned") == {"cars", "banned"}
    assert word_overlap("cars are loud", "cars are loud") == 1.0
    assert word_overlap("the", "a") is None


def test_every_scale_builds_a_valid_config():
    experiment = EXPERIMENTS["continuity"]
    for scale in ("smoke", "default", "full"):
        config = experiment.config(scale)
        assert config.topics <= len(TOPICS)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"prompts": ["one"]}, "prompts"),
        ({"variants": ["acausal"]}, "variants"),
        ({"gains": [-1.0]}, "gains"),
        ({"topics": 99}, "topics"),
        ({"seeds": [1, 1]}, "seeds"),
        ({"layer_stride": 0}, "layer_stride"),
    ],
)
def test_bad_config_is_rejected(changes, field):
    with pytest.raises(ValueError, match=field):
        _small_config(**changes)
