"""TraceRecorder: one entry per generation step, equal to a full forward at absolute positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechmem.core.basic import Steer
from mechmem.core.engine import generate
from mechmem.probes.traces import TraceRecorder, parse_reducer

HOOKS = ["blocks.0.hook_resid_post", "blocks.2.attn.hook_z", "ln_final.hook_normalized"]


def _cached(model, ids: list[int], hooks: list[str]) -> dict[str, np.ndarray]:
    """``run_with_cache`` of one unpadded row: ``{hook: [pos, ...]}``."""
    tokens = torch.tensor([ids], device=model.cfg.device)
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in hooks)
    return {name: cache[name][0].float().cpu().numpy() for name in hooks}


@pytest.fixture(scope="module")
def long_run(tiny):
    """100 greedy tokens on the tiny llama with a "none" and a "norm" recorder."""
    model = tiny("llama")
    exact = TraceRecorder(hooks=HOOKS, reduce="none")
    norms = TraceRecorder(hooks=HOOKS, reduce="norm")
    result = generate(model, "hello", [exact, norms], max_new_tokens=100, stop_at_eos=False)
    return model, result, exact, norms


def test_one_entry_per_step(long_run):
    model, result, exact, norms = long_run
    assert len(result.tokens[0]) == 100
    d_model = int(model.cfg.d_model)
    traces = exact.traces()
    assert set(traces) == set(HOOKS)
    assert traces["blocks.0.hook_resid_post"].shape == (100, 1, d_model)
    assert traces["blocks.2.attn.hook_z"].shape[:2] == (100, 1)
    assert traces["ln_final.hook_normalized"].shape == (100, 1, d_model)
    for values in norms.traces().values():
        assert values.shape == (100, 1)
    assert exact.positions().shape == (100, 1)


def test_positions_are_absolute(long_run):
    _, result, exact, norms = long_run
    prompt_length = len(result.prompt_tokens[0])
    expected = prompt_length - 1 + np.arange(100)
    np.testing.assert_array_equal(exact.positions()[:, 0], expected)
    np.testing.assert_array_equal(norms.positions(), exact.positions())


def test_matches_run_with_cache_of_the_final_sequence(long_run):
    model, result, exact, norms = long_run
    sequence = result.prompt_tokens[0] + result.tokens[0]
    cached = _cached(model, sequence, HOOKS)
    positions = exact.positions()[:, 0]
    for name in HOOKS:
        reference = cached[name][positions]
        np.testing.assert_allclose(exact.traces()[name][:, 0], reference, rtol=1e-4, atol=1e-4)
        reference_norm = np.linalg.norm(reference.reshape(len(positions), -1), axis=-1)
        np.testing.assert_allclose(norms.traces()[name][:, 0], reference_norm, rtol=1e-4)


@pytest.mark.parametrize("hook", ["blocks.1.attn.hook_pattern", "blocks.2.attn.hook_attn_scores"])
def test_attention_trace_is_the_newest_query_row(tiny, hook):
    """[step, batch, head, key]: the newest query's row, NaN past the keys that existed then."""
    model = tiny("llama")
    recorder = TraceRecorder(hooks=[hook], reduce="none")
    result = generate(model, "hello", [recorder], max_new_tokens=12, stop_at_eos=False)
    trace, positions = recorder.traces()[hook], recorder.positions()[:, 0]
    final_length = len(result.prompt_tokens[0]) + 12
    assert trace.shape == (12, 1, int(model.cfg.n_heads), final_length - 1)
    cached = _cached(model, result.prompt_tokens[0] + result.tokens[0], [hook])[hook]
    for step, position in enumerate(positions):
        keys = position + 1
        reference = cached[:, position, :keys]  # [head, key]
        np.testing.assert_allclose(trace[step, 0, :, :keys], reference, rtol=1e-4, atol=1e-5)
        assert np.isnan(trace[step, 0, :, keys:]).all()


def test_left_padded_batch(tiny):
    model = tiny("llama")
    hooks = ["blocks.1.hook_resid_post"]
    prompts = ["hi", "hello there, world", "abc"]
    recorder = TraceRecorder(hooks=hooks, reduce="none")
    result = generate(model, prompts, [recorder], max_new_tokens=20, stop_at_eos=False)
    traces, positions = recorder.traces()[hooks[0]], recorder.positions()
    assert traces.shape == (20, 3, int(model.cfg.d_model))
    assert positions.shape == (20, 3)
    for row in range(3):
        prompt_length = len(result.prompt_tokens[row])
        np.testing.assert_array_equal(positions[:, row], prompt_length - 1 + np.arange(20))
        cached = _cached(model, result.prompt_tokens[row] + result.tokens[row], hooks)[hooks[0]]
        np.testing.assert_allclose(
            traces[:, row], cached[positions[:, row]], rtol=1e-4, atol=1e-4, err_msg=f"row {row}"
        )


def test_traces_follow_the_interventions(tiny):
    """A steer before the traced hook shows up in the trace, at every step."""
    model = tiny("llama")
    hooks = ["blocks.1.hook_resid_post"]
    plain = TraceRecorder(hooks=hooks, reduce="none")
    generate(model, "hello", [plain], max_new_tokens=1)
    direction = [1.0] + [0.0] * (int(model.cfg.d_model) - 1)
    steered = TraceRecorder(hooks=hooks, reduce="none")
    generate(
        model, "hello", [Steer(layer=1, scale=7.0, direction=direction), steered], max_new_tokens=1
    )
    delta = steered.traces()[hooks[0]][0, 0] - plain.traces()[hooks[0]][0, 0]
    np.testing.assert_allclose(delta, np.array(direction) * 7.0, atol=1e-4)


def test_mean_slice_and_custom_reducers(tiny):
    model = tiny("gpt2")
    hook = "blocks.1.hook_resid_post"
    recorders = {
        "none": TraceRecorder(hooks=[hook], reduce="none"),
        "mean": TraceRecorder(hooks=[hook], reduce="mean"),
        "slice": TraceRecorder(hooks=[hook], reduce="slice:2:5"),
        "custom": TraceRecorder(hooks=[hook], reducer=lambda x: x.float().max(dim=-1).values),
    }
    generate(model, "abc", list(recorders.values()), max_new_tokens=6, stop_at_eos=False)
    full = recorders["none"].traces()[hook]
    np.testing.assert_allclose(
        recorders["mean"].traces()[hook], full.mean(-1), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(recorders["slice"].traces()[hook], full[..., 2:5])
    np.testing.assert_array_equal(recorders["custom"].traces()[hook], full.max(-1))


def test_clean_recomputes_are_not_recorded(tiny):
    model = tiny("llama")
    recorder = TraceRecorder(hooks=["blocks.0.hook_resid_post"], reduce="norm")
    result = generate(
        model, "hello", [recorder], max_new_tokens=30, stop_at_eos=False, clean_every=5
    )
    assert result.n_clean_recomputes > 0
    assert recorder.traces()["blocks.0.hook_resid_post"].shape == (30, 1)
    np.testing.assert_array_equal(recorder.positions()[:, 0], 4 + np.arange(30))


def test_sliding_window_keeps_absolute_positions(tiny):
    model = tiny("llama")
    recorder = TraceRecorder(hooks=["blocks.0.hook_resid_post"], reduce="norm")
    result = generate(model, "hello", [recorder], max_new_tokens=40, stop_at_eos=False, window=16)
    assert result.n_reprefills > 0
    np.testing.assert_array_equal(recorder.positions()[:, 0], 4 + np.arange(40))
    assert recorder.traces()["blocks.0.hook_resid_post"].shape == (40, 1)


def test_reset_between_generations(tiny):
    model = tiny("llama")
    recorder = TraceRecorder(hooks=["blocks.0.hook_resid_post"])
    generate(model, "hello", [recorder], max_new_tokens=5, stop_at_eos=False)
    generate(model, "hello", [recorder], max_new_tokens=3, stop_at_eos=False)
    assert recorder.traces()["blocks.0.hook_resid_post"].shape == (3, 1)
    recorder.reset()
    assert recorder.traces()["blocks.0.hook_resid_post"].shape == (0,)
    assert recorder.positions().shape == (0,)


def test_to_dict_round_trip():
    from mechmem.core.intervention import intervention_from_dict

    recorder = TraceRecorder(hooks=["blocks.0.hook_resid_post"], reduce="slice:0:3")
    data = recorder.to_dict()
    assert data == {"type": "trace", "hooks": ["blocks.0.hook_resid_post"], "reduce": "slice:0:3"}
    assert intervention_from_dict(data).config == recorder.config


def test_parse_reducer():
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert parse_reducer("norm")(x).tolist() == [5.0, 1.0]
    assert parse_reducer("mean")(x).tolist() == [3.5, 0.5]
    assert parse_reducer("slice:1:2")(x).tolist() == [[4.0], [1.0]]
    assert parse_reducer("slice:-1:2")(x).tolist() == [[4.0], [1.0]]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hooks": []}, "hooks"),
        ({"hooks": ["a", "a"]}, "repeat"),
        ({"hooks": ["a"], "reduce": "max"}, "reduce"),
        ({"hooks": ["a"], "reduce": "slice:1"}, "reduce"),
        ({"hooks": ["a"], "reduce": "slice:a:b"}, "reduce"),
        ({"hooks": ["a"], "colour": 1}, "colour"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TraceRecorder(**kwargs)


def test_a_hook_the_model_lacks(tiny):
    recorder = TraceRecorder(hooks=["blocks.0.hook_nope"])
    with pytest.raises(ValueError, match="hook_nope"):
        generate(tiny("llama"), "hello", [recorder], max_new_tokens=2)
    recorder = TraceRecorder(hooks=["blocks.9.hook_resid_post"])
    with pytest.raises(ValueError, match="out of range"):
        generate(tiny("llama"), "hello", [recorder], max_new_tokens=2)
