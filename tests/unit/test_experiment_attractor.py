"""The attractor experiment end to end on a tiny model, its pieces, and the story-QA generator."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mechmem.experiments import EXPERIMENTS
from mechmem.experiments.attractor import (
    AttractorExperimentConfig,
    achieved_power,
    figures,
    required_items,
    run_attractor,
    window_nll,
)
from mechmem.experiments.base import check_results
from mechmem.experiments.story_qa import first_word, is_correct, story_item, story_items
from mechmem.methods.attractor import Attractor


def _config(**changes) -> AttractorExperimentConfig:
    small = dict(
        max_text_tokens=256,
        window=32,
        overhead_tokens=4,
        overhead_repeats=1,
        seeds=[0, 1],
        tokens=40,
        rep_window=20,
        generation_arms=["causal", "faithful_standard"],
        qa_items=8,
        qa_chains=4,
        scale=2.0,
    )
    return AttractorExperimentConfig(**{**small, **changes})


def test_run_follows_the_contract_and_figures_rebuild_from_json(tiny, tmp_path):
    results = run_attractor(tiny("llama"), _config(), out=tmp_path)
    saved = json.loads((tmp_path / "attractor.json").read_text())
    check_results(saved)
    assert sorted(figures(saved)) == sorted(
        ["perplexity", "overhead", "repetition", "strengths", "events", "injection", "qa"]
    )
    for name in figures(saved):
        assert (tmp_path / f"attractor_{name}.html").is_file()
    perplexity = saved["perplexity"]
    assert perplexity["n_windows"] == 8 and perplexity["n_tokens_scored"] == 8 * 31
    # the faithful preset counts one update per forward (window): 8 < 50, never out of burn-in
    assert perplexity["arms"]["faithful"]["bit_identical"]
    assert perplexity["arms"]["faithful"]["change_pct"] == 0.0
    assert not perplexity["arms"]["causal"]["bit_identical"]
    runs = saved["generation"]["runs"]
    assert {arm: len(r) for arm, r in runs.items()} == {
        "none": 2,
        "causal": 2,
        "faithful_standard": 2,
    }
    assert len(runs["causal"][0]["injected_norm"]) > 40  # prompt tokens + fed tokens
    assert set(saved["qa"]["accuracy"]) == {"none", "reset", "carried"}
    assert saved["headline"]["metric"].startswith("perplexity change of causal")
    assert results["answer"].startswith("(a) Perplexity")


def test_window_nll_carries_the_state_and_scores_each_token_once(tiny):
    model = tiny("gpt2")
    ids = list(range(40, 104))
    base = window_nll(model, ids, 16, None)
    assert base.shape == (4,)
    carried = Attractor(causal=True, burn_in=0, scale=3.0, threshold=0.3)
    window_nll(model, ids, 16, carried)
    assert carried.traces().strengths.shape[0] == 64  # one update per token, no reset between


def test_power_estimates():
    assert required_items(0.04) == 783
    assert required_items(0.015) is None  # fewer discordant items than the difference
    assert achieved_power(783, 0.04) == pytest.approx(0.8, abs=0.005)
    assert achieved_power(100, 0.04) < achieved_power(2000, 0.04)


def test_story_items_are_seeded_have_distractors_and_score_by_first_word():
    assert story_items(20, seed=3) == story_items(20, seed=3)
    assert story_items(20, seed=3) != story_items(20, seed=4)
    for item in story_items(50, seed=0):
        *shots, asked = item.prompt.split("\n\n")
        assert len(shots) == 1 and shots[0].startswith("Story: ") and asked.endswith("Answer:")
        story = asked.split("\n")[0]
        assert item.answer in story.lower()
    item = story_item(0, n_people=4, facts_per_person=3, shots=0)
    assert item.prompt.count(".") >= 12 and "\n\n" not in item.prompt
    assert first_word(" Paris.") == "paris" and first_word("...") == ""
    assert is_correct("\nBlue", "blue") and not is_correct(" light blue", "blue")


def test_scales_are_valid_configs_and_bad_settings_are_refused():
    experiment = EXPERIMENTS["attractor"]
    for scale in ("smoke", "default", "full"):
        config = experiment.config(scale)
        assert config.tokens >= 100 and config.qa_items % config.qa_chains == 0
    assert experiment.config("default").tokens >= 500
    assert np.isclose(experiment.config("default").equivalence_pct, 1.0)
    with pytest.raises(ValueError, match="qa_items"):
        AttractorExperimentConfig(qa_items=10, qa_chains=4)
    with pytest.raises(ValueError, match="generation_arms"):
        AttractorExperimentConfig(generation_arms=["causal", "causal"])
    with pytest.raises(ValueError, match="perplexity_arms"):
        AttractorExperimentConfig(perplexity_arms=["nonsense"])
