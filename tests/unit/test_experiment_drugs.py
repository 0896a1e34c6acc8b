"""The DRµGS variety-coherence experiment, end to end on a tiny model, and its pieces."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mechmem
from mechmem.experiments.drugs import DrugsExperimentConfig, layer_divergence, run_drugs
from mechmem.probes.perplexity import continuation_nll


@pytest.fixture(scope="module")
def llama():
    from mechmem.tiny import tiny_model

    return tiny_model("llama")


def _small_config(**changes):
    base = dict(
        prompts=["hello there", "what is up", "tell me"],
        seeds=[0, 1, 2],
        max_new_tokens=8,
        chat=False,
        sites=["H"],
        doses=[0.3, 1.5],
        temperatures=[0.5, 1.0, 3.0],
        top_ps=[0.9],
        divergence_doses=[0.1, 1.0],
    )
    return DrugsExperimentConfig(**{**base, **changes})


def test_run_writes_json_and_figures_with_every_arm(llama, tmp_path):
    results = run_drugs(llama, _small_config(), out=tmp_path)
    saved = json.loads((tmp_path / "drugs.json").read_text())
    assert (tmp_path / "drugs_frontier.html").is_file()
    assert (tmp_path / "drugs_divergence.html").is_file()
    expected = {
        "greedy",
        "temperature 0.5",
        "temperature 1",
        "temperature 3",
        "top-p 0.9",
        "drugs H 0.3",
        "drugs H 1.5",
    }
    assert set(saved["arms"]) == expected
    assert saved["arms"]["greedy"]["variety"] == pytest.approx(0.0)  # greedy rows are identical
    for arm in saved["arms"].values():
        assert len(arm["per_prompt"]) == 3
        assert all(len(p["texts"]) == 3 for p in arm["per_prompt"])
        assert np.isfinite(arm["perplexity"])
    assert [c["arm"] for c in saved["matched_variety"]] == ["drugs H 0.3", "drugs H 1.5"]
    for c in saved["matched_variety"]:
        assert c["n_matched"] + c["n_outside"] == 3
    assert "matched variety" in results["answer"]
    divergence = np.array(saved["divergence"]["one_minus_cos"])
    assert divergence.shape == (2, llama.cfg.n_layers)
    assert (divergence[1] > divergence[0]).all()  # a larger angle moves the residual stream more


def test_divergence_grows_with_dose(llama):
    divergence = layer_divergence(llama, ["hello world, this is it"], "A", [0.05, 0.5], "isotropic")
    assert (divergence >= 0).all()
    assert divergence[1].mean() > divergence[0].mean()


def test_divergence_takes_prompts_shorter_than_the_sinks(llama):
    # "hi" is 2 byte tokens, all inside the 6 protected sink positions: it adds no positions.
    divergence = layer_divergence(llama, ["hi", "hello world, this is it"], "A", [0.5], "isotropic")
    assert divergence.shape == (1, llama.cfg.n_layers)
    assert np.isfinite(divergence).all() and (divergence > 0).all()


def test_continuation_nll_matches_a_direct_computation(llama):
    prompt, continuation = [10, 20, 30, 40], [50, 60, 70]
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        log_probs = llama(ids).float().log_softmax(-1)[0]
    expected = -np.mean([float(log_probs[i - 1, ids[0, i]]) for i in range(4, 7)])
    got = continuation_nll(llama, [prompt, [5, 6]], [continuation, []])
    assert got[0] == pytest.approx(expected, rel=1e-5)
    assert np.isnan(got[1])


@pytest.mark.parametrize(
    "change, field",
    [
        ({"seeds": [0]}, "seeds"),
        ({"prompts": ["only one"]}, "prompts"),
        ({"sites": ["X"]}, "sites"),
        ({"doses": [-0.1]}, "doses"),
        ({"temperatures": [1.0]}, "temperatures"),
        ({"top_ps": [1.5]}, "top_ps"),
    ],
)
def test_bad_config_fails_before_any_compute(change, field):
    with pytest.raises(ValueError, match=field):
        _small_config(**change)


def test_cli_rejects_a_bad_config_before_loading_a_model(monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load for a bad config")

    monkeypatch.setattr(mechmem, "load_model", no_model)
    from mechmem.cli import main

    assert main(["run", "drugs", "--set", "seeds=[0]"]) == 2
    assert "seeds" in capsys.readouterr().err
