"""Continuity stream: linkage 0 identity, the seeded copy of the layer's attention, causality
(and the faithful variant's documented leak), cached decoding against full recomputation,
batch rows against their prompt alone, memory across session turns, counters, and errors
before any compute."""

from __future__ import annotations

import pytest
import torch

import mechmem
from mechmem.core.hooks import attached
from mechmem.core.intervention import intervention_from_dict
from mechmem.core.tokens import hf_tokenizer
from mechmem.methods.continuity import Continuity, ContinuityConfig, default_layers
from mechmem.methods.seeded_attention import SeededAttention

PROMPT = "hello world, this is a test"
GREEDY = dict(max_new_tokens=8, stop_at_eos=False)
VARIANTS = ["faithful", "causal"]


def _ids(model, text: str = PROMPT) -> torch.Tensor:
    return torch.tensor([hf_tokenizer(model)(text).input_ids])


def _run(model, interventions=(), prompts=PROMPT, **kwargs):
    return mechmem.generate(model, prompts, interventions, **{**GREEDY, **kwargs})


@pytest.mark.parametrize("variant", VARIANTS)
def test_linkage_zero_is_bit_identical_in_prefill_and_every_step(tiny_model_any, variant):
    base = _run(tiny_model_any, return_logits=True)
    zero = Continuity(variant=variant, linkage=0.0, gain=3.0)
    off = _run(tiny_model_any, [zero], return_logits=True)
    assert torch.equal(base.logits, off.logits) and base.tokens == off.tokens
    assert zero.calls == [] and zero.memory_columns == []  # nothing computed, nothing stored
    on = _run(tiny_model_any, [Continuity(variant=variant, gain=3.0)], return_logits=True)
    assert not torch.equal(base.logits[:, 0], on.logits[:, 0])


def test_a_row_with_linkage_zero_is_untouched_beside_a_linked_row(tiny_model_any):
    prompts = [PROMPT, "another prompt, longer than the first one"]
    base = _run(tiny_model_any, prompts=prompts, return_logits=True)
    mixed = Continuity(variant="causal", gain=3.0, row_linkages=[0.0, 1.0])
    got = _run(tiny_model_any, [mixed], prompts=prompts, return_logits=True)
    assert torch.equal(got.logits[0], base.logits[0])
    assert not torch.equal(got.logits[1, 0], base.logits[1, 0])


def _captured(model, layer: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    got = {}
    hooks = [
        (f"blocks.{layer}.attn.hook_in", lambda x, hook: got.update(x=x.clone())),
        (f"blocks.{layer}.hook_attn_out", lambda x, hook: got.update(out=x.clone())),
    ]
    with attached(model, hooks):
        mechmem.forward(model, ids)
    return got["x"], got["out"]


def test_seeded_projections_reproduce_the_layers_own_attention(tiny_model_any):
    """Memory = the current input, causal mask, rotary positions: the layer's attention output."""
    model = tiny_model_any
    ids = _ids(model)
    n = ids.shape[1]
    for layer in range(model.cfg.n_layers):
        x, out = _captured(model, layer, ids)
        seeded = SeededAttention.of(model, layer)
        rotation = seeded.rotation(torch.arange(n)[None], x)
        queries, keys, values = seeded.project(x, rotation)
        causal = torch.ones(1, n, n, dtype=torch.bool).tril()
        branch = seeded.attend(queries, keys, values, causal)
        torch.testing.assert_close(branch, out, atol=1e-4, rtol=0)
        # the separate projections are the fused ones
        assert torch.equal(seeded.queries(x, rotation), queries)
        assert all(map(torch.equal, seeded.keys_values(x, rotation), (keys, values)))
        without_mask = seeded.attend(queries, keys, values, ~causal | causal)
        assert (without_mask - out).abs().max() > 1e-2  # the check can fail


def test_grouped_query_heads_are_expanded_in_the_models_grouping_order(tiny):
    model = tiny("llama")  # 4 query heads, 2 key/value heads
    seeded = SeededAttention.of(model, 1)
    w_k = model.blocks[1].attn.W_K.detach()  # [kv_heads, d_model, d_head]
    expanded = seeded.w_k.view(model.cfg.d_model, 4, -1).permute(1, 0, 2)
    for head in range(4):
        assert torch.equal(expanded[head], w_k[head // 2])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_branch_at_memory_equal_input_scales_attention_by_one_plus_gain(tiny, arch):
    model = tiny(arch)
    ids = _ids(model)
    layer = 1
    _, out = _captured(model, layer, ids)
    stream = Continuity(variant="causal", layers=[layer], gain=0.5)
    hook = [(f"blocks.{layer}.hook_attn_out", lambda x, hook: got.update(o=x.clone()))]
    got = {}
    with mechmem.applied(model, [stream]), attached(model, hook), torch.no_grad():
        model(ids)  # the capture hook runs after the stream's
    torch.testing.assert_close(got["o"], 1.5 * out, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_prefill_ignores_later_tokens_and_faithful_leaks(tiny_model_any, variant):
    model = tiny_model_any
    ids = _ids(model)
    changed = ids.clone()
    changed[0, -2] = (changed[0, -2] + 7) % 250
    stream = Continuity(variant=variant, gain=3.0)
    first = mechmem.forward(model, ids, [stream])
    second = mechmem.forward(model, changed, [stream])
    early = slice(0, ids.shape[1] - 2)  # positions before the changed token
    if variant == "causal":
        torch.testing.assert_close(first[0, early], second[0, early], atol=1e-5, rtol=0)
    else:  # the original's operator reads the future in a prefill
        assert (first[0, early] - second[0, early]).abs().max() > 1e-3


def test_causal_cached_decoding_equals_full_recomputation(tiny_model_any):
    model = tiny_model_any
    stream = Continuity(variant="causal", gain=3.0)
    result = _run(model, [stream], max_new_tokens=10, return_logits=True)
    full_ids = torch.tensor([hf_tokenizer(model)(PROMPT).input_ids + result.tokens[0]])
    full = mechmem.forward(model, full_ids, [Continuity(variant="causal", gain=3.0)])
    prompt_length = full_ids.shape[1] - 10
    recomputed = full[0, prompt_length - 1 : -1]
    torch.testing.assert_close(result.logits[0], recomputed, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_batched_row_equals_its_prompt_alone(tiny_model_any, variant):
    prompts = ["short one", PROMPT, "a third, rather longer prompt than the others"]
    batch = _run(
        tiny_model_any, [Continuity(variant=variant, gain=2.0)], prompts=prompts, return_logits=True
    )
    for row, prompt in enumerate(prompts):
        alone = _run(
            tiny_model_any,
            [Continuity(variant=variant, gain=2.0)],
            prompts=prompt,
            return_logits=True,
        )
        assert batch.tokens[row] == alone.tokens[0]
        torch.testing.assert_close(batch.logits[row], alone.logits[0], atol=1e-4, rtol=1e-4)


def _decode_step_attention(model, layer: int, ids: torch.Tensor, interventions) -> torch.Tensor:
    """The layer's attention output at the last token, fed as one decode step after a prefill."""
    got = {}
    hooks = [(f"blocks.{layer}.hook_attn_out", lambda a, hook: got.update(o=a.clone()))]
    with mechmem.applied(model, interventions), attached(model, hooks), torch.no_grad():
        _, cache = model(ids[:, :-1], return_type="logits_and_cache")
        model(ids[:, -1:], return_type="logits_and_cache", past_key_values=cache)
    return got["o"]


def test_faithful_decoding_is_a_previous_token_path(tiny):
    """While decoding the faithful memory is the previous token's input: one key, softmax 1,
    so Δ = g · (W_O (W_V x_{t-1} + b_V) + b_O)."""
    model = tiny("qwen2")  # biases on q/k/v
    layer, ids = 1, _ids(model)
    x, _ = _captured(model, layer, ids)
    stream = Continuity(variant="faithful", layers=[layer], gain=0.5)
    plain = _decode_step_attention(model, layer, ids, [])
    linked = _decode_step_attention(model, layer, ids, [stream])
    seeded = SeededAttention.of(model, layer)
    _, values = seeded.keys_values(x[:, -2:-1], None)
    expected = values.transpose(1, 2).reshape(1, 1, -1) @ seeded.w_o + seeded.b_o
    torch.testing.assert_close(linked - plain, 0.5 * expected, atol=1e-4, rtol=1e-4)
    assert stream.calls == [2]


@pytest.mark.parametrize("variant", VARIANTS)
def test_counters_count_one_per_target_layer_per_forward(tiny, variant):
    model = tiny("llama")
    stream = Continuity(variant=variant, layers=[0, 2])
    _run(model, [stream], max_new_tokens=6)
    assert stream.calls == [6, 6]  # the prefill and five decode steps
    mechmem.forward(model, _ids(model), [stream])
    assert stream.calls == [1, 1]  # reset by the forward


def test_session_carries_memory_across_turns_and_reset_clears_it(tiny):
    model = tiny("llama")
    stream = Continuity(variant="causal", gain=2.0)
    chat = mechmem.Session(model, [stream])
    chat.send("first message", max_new_tokens=6)
    after_one = stream.memory_columns
    first_memory = stream._memory[0].clone()
    assert after_one[0] == chat.cached_range[1] > 0  # one column per cached token
    chat.send("second message", max_new_tokens=6)
    assert stream.memory_columns[0] == chat.cached_range[1] > after_one[0]
    kept = len(chat.tokens) - len(chat.turns[1].result.prompt_tokens[0]) - 6  # columns reused
    assert kept > 0 and torch.equal(stream._memory[0][:, :, :kept], first_memory[:, :, :kept])
    chat.reset()
    assert stream.memory_columns == [] and stream.calls == []


def test_causal_session_turn_equals_rerunning_the_conversation(tiny_model_any):
    """Memory carried across turns reads what a fresh run of the whole conversation reads."""
    model = tiny_model_any
    chat = mechmem.Session(model, [Continuity(variant="causal", gain=2.0)])
    chat.send("first message", max_new_tokens=5)
    second = chat.send("second message", max_new_tokens=5, return_logits=True)
    fed = chat.tokens[: len(chat.tokens) - 5]
    full = mechmem.forward(
        model, torch.tensor([chat.tokens]), [Continuity(variant="causal", gain=2.0)]
    )
    torch.testing.assert_close(second.logits[0], full[0, len(fed) - 1 : -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rewind_restores_the_memory_and_the_turn_repeats_exactly(tiny, variant):
    model = tiny("llama")
    stream = Continuity(variant=variant, gain=2.0)
    chat = mechmem.Session(model, [stream], chat=False)
    chat.send("one two three", max_new_tokens=5)
    before = [m.clone() for m in stream._memory]
    second = chat.send(" four five", max_new_tokens=5, return_logits=True)
    chat.rewind()
    assert all(torch.equal(a, b) for a, b in zip(stream._memory, before))
    again = chat.send(" four five", max_new_tokens=5, return_logits=True)
    assert torch.equal(second.logits, again.logits)


@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_session_continues_with_its_memory(tiny, tmp_path, variant):
    """A causal session's cache can be rebuilt by one prefill; the faithful operator reads the
    future in a prefill, so its cache depends on how tokens were fed and must be saved with it."""
    model = tiny("llama")
    chat = mechmem.Session(model, [Continuity(variant=variant, gain=2.0)], chat=False)
    chat.send("one two three", max_new_tokens=5)
    chat.save(tmp_path / "s.safetensors", cache=variant == "faithful")
    loaded = mechmem.Session.load(tmp_path / "s.safetensors", model)
    assert torch.equal(loaded.interventions[0]._memory[0], chat.interventions[0]._memory[0])
    expected = chat.send(" four", max_new_tokens=5, return_logits=True)
    got = loaded.send(" four", max_new_tokens=5, return_logits=True)
    assert expected.tokens == got.tokens
    torch.testing.assert_close(expected.logits, got.logits, atol=1e-4, rtol=1e-4)


def test_causal_memory_follows_a_window_restart(tiny):
    """After a window re-prefill the memory holds exactly the restarted cache's columns, so a
    step reads what a fresh forward of those columns (positions from 0) reads."""
    model = tiny("llama")
    stream = Continuity(variant="causal", gain=2.0)
    result = _run(model, [stream], max_new_tokens=40, window=40, window_keep=10, return_logits=True)
    assert result.n_reprefills > 0
    tokens = hf_tokenizer(model)(PROMPT).input_ids + result.tokens[0]
    fed = len(tokens) - 1  # the last token is never fed
    start = fed - stream.memory_columns[0]
    assert 0 < stream.memory_columns[0] <= 40 and start > 0
    window = torch.tensor([tokens[start:fed]])
    fresh = mechmem.forward(model, window, [Continuity(variant="causal", gain=2.0)])
    torch.testing.assert_close(result.logits[0, -1], fresh[0, -1], atol=1e-4, rtol=1e-4)


def test_default_layers_scale_the_originals_16_24_30_of_32():
    assert default_layers(32) == [16, 24, 30]
    assert default_layers(30) == [15, 22, 28]
    assert default_layers(3) == [1, 2]


def test_json_round_trip():
    stream = Continuity(
        layers=[0, 2], gain=0.3, linkage=0.5, variant="causal", row_linkages=[0.0, 1.0]
    )
    again = intervention_from_dict(stream.to_dict())
    assert isinstance(again, Continuity) and again.config == stream.config
    assert mechmem.Continuity is Continuity


@pytest.mark.parametrize(
    "config, field",
    [
        ({"linkage": 1.5}, "linkage"),
        ({"linkage": -0.1}, "linkage"),
        ({"gain": -1.0}, "gain"),
        ({"row_linkages": [0.5, 2.0]}, "row_linkages"),
        ({"layers": []}, "layers"),
        ({"layers": [1, 1]}, "layers"),
        ({"variant": "acausal"}, "variant"),
        ({"strength": 1.0}, "strength"),
    ],
)
def test_bad_config_is_rejected_on_construction(config, field):
    with pytest.raises(ValueError, match=field):
        ContinuityConfig.from_dict(config)


def _refuse_forward(model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(model, "forward", refuse)


def test_layer_out_of_range_fails_before_any_compute(tiny, monkeypatch):
    model = tiny("llama")
    _refuse_forward(model, monkeypatch)
    with pytest.raises(ValueError, match="layers"):
        mechmem.generate(model, PROMPT, [Continuity(layers=[0, 3])], max_new_tokens=2)


def test_row_linkages_of_the_wrong_length_fail_before_any_compute(tiny, monkeypatch):
    model = tiny("llama")
    _refuse_forward(model, monkeypatch)
    with pytest.raises(ValueError, match="row_linkages"):
        mechmem.generate(model, PROMPT, [Continuity(row_linkages=[1.0, 0.0])], max_new_tokens=2)


def test_unreadable_attention_weights_fail_before_any_compute(tiny, monkeypatch):
    model = tiny("llama")
    attention_type = type(model.blocks[0].attn)

    def unreadable(self):
        raise RuntimeError("packed weights")

    monkeypatch.setattr(attention_type, "W_K", property(unreadable))
    _refuse_forward(model, monkeypatch)
    with pytest.raises(ValueError, match="cannot read this model's attention weights"):
        mechmem.generate(model, PROMPT, [Continuity(layers=[1])], max_new_tokens=2)
