"""id_profile / layer_representations and the plotly figures of every probe result."""

from __future__ import annotations

import importlib

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from mechmem.core.basic import Steer
from mechmem.core.engine import generate
from mechmem.core.hooks import attached
from mechmem.plots import (
    id_profile_figure,
    layer_effect_figure,
    logit_delta_figure,
    repetition_figure,
    trace_figure,
    twonn_fit_figure,
)
from mechmem.probes.cli import default_texts
from mechmem.probes.id_profile import IDProfile, id_profile, layer_representations
from mechmem.probes.logit_delta import logit_delta, logit_delta_by_layer
from mechmem.probes.traces import TraceRecorder
from mechmem.probes.twonn import twonn_bootstrap


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return default_texts()


@pytest.fixture(scope="module")
def profile(tiny, texts) -> IDProfile:
    return id_profile(tiny("llama"), texts, pooling="mean", n_boot=30)


# ---------------------------------------------------------------- id_profile


def test_default_texts():
    texts = default_texts()
    assert len(texts) == 64
    assert all(isinstance(t, str) and t for t in texts)


def test_one_finite_id_per_layer_inside_its_interval(tiny, texts, profile):
    n_layers = int(tiny("llama").cfg.n_layers)
    assert profile.layers == list(range(n_layers))
    for values in (profile.dimension, profile.ci_low, profile.ci_high):
        assert values.shape == (n_layers,)
        assert np.isfinite(values).all()
    assert (profile.dimension > 0).all()
    assert (profile.ci_low <= profile.dimension).all()
    assert (profile.dimension <= profile.ci_high).all()
    assert profile.n_points == len(texts)
    assert profile.hook == "hook_resid_post"
    assert profile.pooling == "mean"
    data = profile.to_dict()
    assert data["suggested_layer"] == profile.suggest_layer()
    assert len(data["dimension"]) == n_layers


def test_profile_is_seeded(tiny, texts, profile):
    again = id_profile(tiny("llama"), texts, pooling="mean", n_boot=30)
    np.testing.assert_array_equal(again.dimension, profile.dimension)
    np.testing.assert_array_equal(again.ci_low, profile.ci_low)


def test_suggest_layer_skips_the_first_fifth():
    dimension = np.array([1.0, 2.0, 9.0, 8.0, 3.0, 7.0, 6.0, 5.0, 4.0, 10.0])
    profile = IDProfile(
        layers=list(range(10)),
        dimension=dimension,
        ci_low=dimension - 1,
        ci_high=dimension + 1,
        n_points=50,
        hook="hook_resid_post",
        pooling="mean",
    )
    assert profile.suggest_layer() == 4  # layers 0 and 1 (lower IDs) are excluded
    assert profile.suggest_layer(0.0) == 0
    assert profile.suggest_layer(0.5) == 8
    shifted = IDProfile(**{**profile.__dict__, "layers": list(range(10, 20))})
    assert shifted.suggest_layer() == 14  # returns the layer, not the index
    with pytest.raises(ValueError, match="skip_fraction"):
        profile.suggest_layer(1.0)
    with pytest.raises(ValueError, match="skip_fraction"):
        profile.suggest_layer(-0.1)


def test_suggest_layer_on_a_real_profile_excludes_the_first_fifth(profile):
    start = int(np.ceil(0.2 * len(profile.layers)))
    suggested = profile.suggest_layer()
    assert suggested in profile.layers[start:]
    assert profile.dimension[profile.layers.index(suggested)] == profile.dimension[start:].min()


def test_pooling_sizes(tiny):
    model = tiny("llama")
    texts = ["hello there", "ab", "the cat sat"]
    lengths = [len(model.hf_tokenizer(t).input_ids) for t in texts]
    d_model = int(model.cfg.d_model)
    mean = layer_representations(model, texts, pooling="mean")
    tokens = layer_representations(model, texts, pooling="tokens")
    every_token = layer_representations(model, texts, pooling="tokens", skip_first=0, layers=[1])
    last = layer_representations(model, texts, pooling="last", layers=[1])
    assert set(mean) == set(range(int(model.cfg.n_layers)))
    assert mean[0].shape == (3, d_model)
    assert tokens[0].shape == (sum(lengths) - 3, d_model)  # each text's first token left out
    assert every_token[1].shape == (sum(lengths), d_model)
    assert list(last) == [1]
    # padding never leaks: every pooled value equals that of the text run alone
    for index, text in enumerate(texts):
        alone = layer_representations(model, [text], pooling="tokens", skip_first=0, layers=[1])[1]
        torch.testing.assert_close(alone[1:].mean(0), mean[1][index], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(alone[-1], last[1][index], rtol=1e-4, atol=1e-4)
    # tokens pooling is the every-token set minus each text's first token, in order
    firsts = np.cumsum([0, *lengths[:-1]])
    keep = np.setdiff1d(np.arange(sum(lengths)), firsts)
    torch.testing.assert_close(tokens[1], every_token[1][keep], rtol=0, atol=0)


def test_skip_first_leaves_out_a_planted_sink(tiny):
    """A huge first-token activation dominates mean pooling unless it is skipped."""
    model = tiny("gpt2")
    texts = ["hello there you", "abcdef", "the cat sat on it"]

    def sink(activation, hook):  # position 0 of each row as the model sees it (no padding alone)
        activation[:, 0, 0] = 1e4
        return activation

    reps = {}
    for skip in (0, 1):
        with attached(model, [("blocks.0.hook_resid_post", sink)]):
            reps[skip] = torch.cat(
                [layer_representations(model, [t], skip_first=skip, layers=[0])[0] for t in texts]
            )
    lengths = torch.tensor([len(model.hf_tokenizer(t).input_ids) for t in texts])
    assert (reps[0][:, 0] > 1e4 / lengths - 100).all()
    assert (reps[1][:, 0].abs() < 100).all()


def test_tokens_pooling_gives_more_points(tiny, texts):
    model = tiny("llama")
    by_token = id_profile(model, texts[:16], pooling="tokens", layers=[0, 2], n_boot=10)
    by_text = id_profile(model, texts[:16], pooling="mean", layers=[0, 2], n_boot=10)
    assert by_token.layers == [0, 2]
    assert by_token.n_points > by_text.n_points == 16


@pytest.mark.parametrize(
    ("texts", "kwargs", "match"),
    [
        ([], {}, "texts"),
        ("just one string", {}, "texts"),
        (["a b", "c d"], {"pooling": "max"}, "pooling"),
        (["a b", "c d", "e f"], {"hook": "hook_nope"}, "hook_nope"),
        (["a b", "c d", "e f"], {"layers": [7]}, "out of range"),
        (["a b", "c d", "e f"], {"layers": []}, "layers"),
        (["a b", "c d", "e f"], {"hook": ""}, "hook"),
        (["a b", "c", "d e"], {"skip_first": 1}, "texts \\[1\\] have at most skip_first=1"),
        (["a b", "c d", "e f"], {"skip_first": 3}, "texts \\[0, 1, 2\\]"),
        (["a b", "c d"], {}, "at least 3 texts"),
        (["a b", "c d", "e f"], {"skip_first": -1}, "skip_first"),
        (["a b", "c d", "e f"], {"skip_first": True}, "skip_first"),
    ],
)
def test_id_profile_rejects_bad_input(tiny, texts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        id_profile(tiny("llama"), texts, **kwargs)


def test_bad_hook_fails_before_any_forward(tiny, monkeypatch):
    module = importlib.import_module("mechmem.probes.id_profile")

    def no_forward(*args, **kwargs):
        raise AssertionError("a forward pass ran before the hook was checked")

    monkeypatch.setattr(module, "forward", no_forward)
    with pytest.raises(ValueError, match="hook_nope"):
        layer_representations(tiny("llama"), ["a b", "c d"], hook="hook_nope", layers=[0, 2])


def test_hook_prefix_may_be_left_out(tiny, texts):
    model = tiny("gpt2")
    short = layer_representations(model, texts[:4], hook="resid_post", layers=[1])
    full = layer_representations(model, texts[:4], hook="hook_resid_post", layers=[1])
    torch.testing.assert_close(short[1], full[1], rtol=0, atol=0)
    profile = id_profile(model, texts[:16], hook="resid_post", layers=[1], n_boot=5)
    assert profile.hook == "hook_resid_post"
    nested = layer_representations(model, texts[:4], hook="attn.z", layers=[0], pooling="last")
    full = layer_representations(model, texts[:4], hook="attn.hook_z", layers=[0], pooling="last")
    torch.testing.assert_close(nested[0], full[0], rtol=0, atol=0)


def test_missing_hook_error_comes_from_hook_resolution(tiny):
    from mechmem.core import hooks

    with pytest.raises(ValueError) as caught:
        layer_representations(tiny("llama"), ["a b"], hook="hook_nope")
    frames = [entry.frame.f_globals.get("__name__") for entry in caught.traceback]
    assert hooks.__name__ in frames


# ---------------------------------------------------------------- figures


def test_logit_delta_figure(tiny):
    result = logit_delta(tiny("llama"), ["ab", "cde"], Steer(layer=0, scale=3.0), positions="all")
    fig = logit_delta_figure(result, title="t")
    assert isinstance(fig, go.Figure)
    assert len(fig.data) == 4
    assert len(fig.data[0].x) == len(result.row)
    assert fig.layout.title.text == "t"


def test_layer_effect_figure(tiny):
    sweep = logit_delta_by_layer(tiny("llama"), "ab", lambda layer: Steer(layer=layer, scale=3.0))
    fig = layer_effect_figure(sweep)
    assert isinstance(fig, go.Figure)
    assert len(fig.data) == 3
    assert list(fig.data[0].x) == sweep.layers
    # KL and a fraction cannot go below zero, nor can their axis
    assert fig.layout.yaxis.rangemode == "tozero" and fig.layout.yaxis2.rangemode == "tozero"


def test_id_profile_figure(profile):
    fig = id_profile_figure(profile)
    assert isinstance(fig, go.Figure)
    assert len(fig.data) == 2  # the CI band and the ID line
    assert list(fig.data[1].y) == pytest.approx(profile.dimension.tolist())
    assert len(fig.layout.shapes) == 1  # the suggested-layer marker
    assert fig.layout.shapes[0].x0 == profile.suggest_layer()


def test_trace_figure_lines_for_scalar_traces(tiny):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    recorder = TraceRecorder(hooks=hooks, reduce="norm")
    generate(tiny("llama"), ["ab", "cd"], [recorder], max_new_tokens=5, stop_at_eos=False)
    fig = trace_figure(recorder.traces(), row=1)
    assert isinstance(fig, go.Figure)
    assert len(fig.data) == 2
    assert all(isinstance(trace, go.Scatter) for trace in fig.data)
    np.testing.assert_allclose(fig.data[0].y, recorder.traces()[hooks[0]][:, 1])


def test_trace_figure_heatmap_for_a_vector_trace(tiny):
    hook = "blocks.0.hook_resid_post"
    recorder = TraceRecorder(hooks=[hook], reduce="slice:0:8")
    generate(tiny("llama"), "ab", [recorder], max_new_tokens=5, stop_at_eos=False)
    fig = trace_figure(recorder.traces())
    assert len(fig.data) == 1
    assert isinstance(fig.data[0], go.Heatmap)
    assert np.asarray(fig.data[0].z).shape == (8, 5)  # component x step


def test_trace_figure_mixed_traces():
    traces = {"a": np.ones((4, 1)), "b": np.ones((4, 1, 3)), "c": np.ones((4, 1, 2))}
    fig = trace_figure(traces)
    assert len(fig.data) == 3
    assert all(isinstance(trace, go.Scatter) for trace in fig.data)
    np.testing.assert_allclose(fig.data[1].y, np.sqrt(3.0))


def test_twonn_fit_figure():
    result = twonn_bootstrap(torch.rand(400, 2, generator=torch.Generator().manual_seed(0)), 20)
    fig = twonn_fit_figure(result)
    kept, discarded, line = fig.data
    assert (len(kept.x), len(discarded.x)) == (360, 39)  # the largest ratio (F = 1) left out
    np.testing.assert_allclose(kept.x, np.log(np.sort(result.mu))[:360])
    np.testing.assert_allclose(kept.y, -np.log1p(-np.arange(1, 361) / 400))
    x, y = np.asarray(kept.x), np.asarray(kept.y)
    assert (x @ y) / (x @ x) == pytest.approx(result.dimension, rel=1e-12)  # the plotted fit
    np.testing.assert_allclose(np.asarray(line.y), result.dimension * np.asarray(line.x))
    mle = twonn_fit_figure(twonn_bootstrap(torch.rand(400, 2), 5, method="mle"))
    assert "MLE" in mle.data[-1].name
    assert result.to_dict()["discard_fraction"] == 0.1


def test_trace_figure_norm_ignores_nan_padding():
    pattern = np.array([[[1.0, np.nan]], [[0.6, 0.8]]])[:, None]  # [step, batch, head, key]
    fig = trace_figure({"norm": np.ones((2, 1)), "pattern": pattern})
    np.testing.assert_allclose(fig.data[1].y, [1.0, 1.0])


def test_repetition_figure():
    logs = [{"step": 10, "rep_n_token": 0.1, "d": 1}, {"step": 20, "rep_n_token": 0.3, "d": 2}]
    fig = repetition_figure(logs, keys=["rep_n_token", "d"])
    assert isinstance(fig, go.Figure)
    assert len(fig.data) == 2
    assert list(fig.data[0].x) == [10, 20]


def test_figures_reject_empty_input():
    with pytest.raises(ValueError, match="traces"):
        trace_figure({})
    with pytest.raises(ValueError, match="logs"):
        repetition_figure([])
