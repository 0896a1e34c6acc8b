"""The RD-Net long-generation experiment, end to end on a tiny model, and its pieces."""

from __future__ import annotations

import json
import re

import pytest

import mechmem
from mechmem.experiments.rdnet import (
    RDNetExperimentConfig,
    _arm_summary,
    _headline,
    _identical_to_vanilla,
    _Row,
    collapse_onset,
    run_rdnet,
)
from mechmem.methods.rdnet import drift_sigma


def _small_config(**changes):
    base = dict(
        prompts=["once upon a time"],
        seeds=[0, 1],
        tokens=120,
        log_every=40,
        window=48,
        window_keep=16,
        rep_window=40,
        char_window=80,
        faithful_gain=200.0,
        fast_weight_gain=1.0,
    )
    return RDNetExperimentConfig(**{**base, **changes})


def test_run_writes_logs_json_and_figure_for_every_arm_and_seed(tiny, tmp_path):
    results = run_rdnet(tiny("llama"), _small_config(), out=tmp_path)
    saved = json.loads((tmp_path / "rdnet.json").read_text())
    assert (tmp_path / "rdnet_curves.html").is_file()
    assert set(saved["arms"]) == {"vanilla", "faithful", "fast_weight", "penalty"}
    assert len(saved["runs"]) == 8
    assert saved["n_reprefills"] > 0  # the window slid
    line = re.compile(r"^0\.\d+k tokens \| rep-4 = \d\.\d{4} \| drift = \d\.\d{4}$")
    for run in saved["runs"]:
        assert [e["step"] for e in run["curve"]] == [40, 80, 120]
        label = f"{run['arm']}_prompt0_seed{run['seed']}_log.txt"
        lines = (tmp_path / "rdnet_logs" / label).read_text().splitlines()
        assert len(lines) == 3 and all(line.match(text) for text in lines), lines
        memory = run["arm"] in ("faithful", "fast_weight")
        assert lines[0].endswith(f"drift = {drift_sigma(40) if memory else 0:.4f}")
    pairs = {(t["arm"], t["control"]) for t in saved["paired_tests"]}
    assert pairs == {(a, c) for a in ("faithful", "fast_weight") for c in ("vanilla", "penalty")}
    for test in saved["paired_tests"]:
        assert test["smallest_attainable_p"] == 0.5 and test["p_value"] >= 0.5
        assert not test["beats_control"]  # two seeds can never reach p < 0.05
    assert "Drift beats the controls: NO" in results["answer"]


def test_arm_summary_reports_onsets_with_censored_runs():
    def run(reps):
        curve = [{"step": 1000 * (i + 1), "rep_n_token": r} for i, r in enumerate(reps)]
        return {"curve": curve, "onset": collapse_onset(curve, 0.85)}

    summary = _arm_summary([run([0.5, 0.9, 0.95]), run([0.2, 0.3, 0.4])], tokens=3000)
    assert summary["onsets"] == [2000, None]
    assert summary["n_collapsed"] == 1
    assert summary["onset_range"] == [2000, 3000]  # the run that never collapsed counts as 3000
    assert summary["mean_curve"] == pytest.approx([0.35, 0.6, 0.675])
    assert summary["mean_rep"] == pytest.approx(0.5416666)
    never = _arm_summary([run([0.1, 0.1, 0.1])], tokens=3000)
    assert never["n_collapsed"] == 0 and never["onset_range"] is None


def test_collapse_onset_reads_the_first_step_over_the_threshold():
    curve = [{"step": s, "rep_n_token": r} for s, r in ((1, 0.2), (2, 0.9), (3, 0.95))]
    assert collapse_onset(curve, 0.85) == 2
    assert collapse_onset(curve, 0.96) is None


@pytest.mark.parametrize(
    "change, field",
    [
        ({"seeds": []}, "seeds"),
        ({"arms": ["vanilla", "magic"]}, "arms"),
        ({"tokens": 10}, "tokens"),
        ({"window_keep": 48}, "window_keep"),
        ({"collapse": 1.5}, "collapse"),
        ({"fast_weight_gain": -1.0}, "fast_weight_gain"),
        ({"rep_window": 2}, "rep_window"),
    ],
)
def test_bad_config_fails_before_any_compute(change, field):
    with pytest.raises(ValueError, match=field):
        _small_config(**change)


def test_cli_takes_tokens_and_rejects_a_bad_config_before_loading_a_model(monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load for a bad config")

    monkeypatch.setattr(mechmem, "load_model", no_model)
    from mechmem.cli import main

    assert main(["run", "rdnet", "--tokens", "10"]) == 2  # fewer than log_every = 1000
    assert "tokens" in capsys.readouterr().err
    assert main(["run", "rdnet", "--set", 'arms=["vanilla","nope"]']) == 2
    assert "arms" in capsys.readouterr().err


def test_a_memory_that_changes_no_sampled_token_is_reported_as_such():
    rows = [_Row(arm, 0, seed) for seed in (0, 1) for arm in ("vanilla", "faithful", "penalty")]
    tokens = [[1, 2], [1, 2], [3, 4], [5, 6], [5, 6], [5, 7]]
    identical = _identical_to_vanilla(rows, tokens)
    assert identical == {"faithful": True, "penalty": False}
    test = {
        "arm": "faithful",
        "control": "vanilla",
        "mean": 0.0,
        "interval": [0.0, 0.0],
        "p_value": 1.0,
        "beats_control": False,
        "smallest_attainable_p": 0.5,
    }
    verdict = _headline([test], RDNetExperimentConfig(), identical)["verdict"]
    assert verdict.startswith("does not hold: faithful samples exactly vanilla's tokens")
    assert _headline([test], RDNetExperimentConfig(), {})["verdict"].startswith("inconclusive")
