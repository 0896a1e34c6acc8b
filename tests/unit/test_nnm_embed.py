"""KV-Embedding: shapes and unit rows, padding independence, the prepended slot attended with
exactly the bias (and masked everywhere else), -inf bias giving back plain pooling, the
baselines against the house's own pooling, and bad input refused before any compute."""

from __future__ import annotations

import math

import pytest
import torch

from mechmem.core.hooks import attached
from mechmem.methods.nnm.embed import (
    compression_prompt,
    embed,
    encode,
    encode_layer_sets,
    hidden_state_embeddings,
    prompt_texts,
)
from mechmem.probes.id_profile import layer_representations

TEXTS = [
    "the cat sat on the mat",
    "a much longer sentence about rivers, mountains and the sea",
    "short",
    "numbers 1 2 3 4 5",
]


def test_compression_prompt_names_the_role_twice():
    assert (
        compression_prompt("x y", "context") == '"Context: x y" Compress the context in one word:'
    )
    with pytest.raises(ValueError, match="role"):
        compression_prompt("x", "document")


def test_shapes_and_unit_rows(tiny_model_any):
    out = encode(tiny_model_any, TEXTS, layers=[1])
    d = tiny_model_any.cfg.d_model
    for name in ("kv", "mean", "last", "pooled"):
        vectors = getattr(out, name)
        assert vectors.shape == (len(TEXTS), d) and vectors.dtype == torch.float32, name
        assert torch.allclose(vectors.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5), name
    assert torch.isfinite(out.kv).all()


def test_a_batch_equals_each_text_alone(tiny_model_any):
    """Left padding never reaches the pooled states or the slot."""
    batched = encode(tiny_model_any, TEXTS, layers=[0, 2], batch_size=len(TEXTS))
    for index, text in enumerate(TEXTS):
        alone = encode(tiny_model_any, [text], layers=[0, 2])
        for name in ("kv", "mean", "last"):
            got, want = getattr(batched, name)[index], getattr(alone, name)[0]
            assert torch.allclose(got, want, atol=1e-5), (name, index)


def test_minus_inf_bias_gives_back_plain_pooling_and_the_bias_acts(tiny_model_any):
    off = encode(tiny_model_any, TEXTS, layers=[1], prefix_bias=float("-inf"))
    assert torch.allclose(off.kv, off.pooled, atol=1e-6)
    on = {b: embed(tiny_model_any, TEXTS, layers=[1], prefix_bias=b) for b in (0.0, 1.0, 3.0)}
    assert (on[1.0] - off.pooled).abs().max() > 1e-3  # the re-routing moves the embedding
    assert (on[0.0] - on[1.0]).abs().max() > 1e-4
    assert (on[3.0] - on[1.0]).abs().max() > 1e-4


@pytest.mark.parametrize("bias", [0.0, 1.0, 2.5])
def test_the_slot_is_attended_with_the_bias_at_routed_layers_only(tiny_model_any, bias):
    """At the first re-routed layer everything below is as in pass 1, so the last token's score
    toward the slot (its own pass-1 key, at its own RoPE position) is its score toward itself
    plus the bias: the weights' ratio is exp(bias). Other layers give the slot no weight."""
    model, routed = tiny_model_any, 1
    patterns: dict[int, torch.Tensor] = {}

    def keep(pattern, hook):
        if pattern.shape[-1] == pattern.shape[-2] and pattern.shape[-1] > 0:
            patterns.setdefault(int(hook.name.split(".")[1]), []).append(pattern.detach())

    names = [(f"blocks.{layer}.attn.hook_pattern", keep) for layer in range(model.cfg.n_layers)]
    with attached(model, names):
        embed(model, [TEXTS[1]], layers=[routed], prefix_bias=bias)
    for layer, (first, second) in patterns.items():
        assert second.shape[-1] == first.shape[-1] + 1  # pass 2 has the slot in front
        slot = second[0, :, 1:, 0]
        if layer == routed:
            ratio = second[0, :, -1, 0] / second[0, :, -1, -1]
            assert torch.allclose(ratio, torch.full_like(ratio, math.exp(bias)), rtol=1e-4)
        else:
            assert slot.abs().max() == 0
        if layer < routed:  # below the routed layer pass 2 is pass 1
            assert torch.allclose(second[0, :, 1:, 1:], first[0], atol=1e-6)


def test_layer_sets_share_pass_one_and_match_single_runs(tiny):
    model = tiny("llama")
    kvs, base = encode_layer_sets(model, TEXTS, [[0], [1, 2]])
    for layers, got in zip([[0], [1, 2]], kvs):
        assert torch.allclose(got, embed(model, TEXTS, layers=layers), atol=1e-6)
    assert torch.allclose(base.mean, encode(model, TEXTS).mean, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_baselines_match_the_house_pooling(tiny, pooling):
    """hidden_state_embeddings of plain text at a layer = id_profile's pooling, normalised."""
    model = tiny("gpt2")
    got = hidden_state_embeddings(model, TEXTS, layer=1)[pooling]
    want = layer_representations(model, TEXTS, pooling=pooling, layers=[1])[1]
    assert torch.allclose(got, torch.nn.functional.normalize(want, dim=-1), atol=1e-5)


def test_max_tokens_cuts_the_text_not_the_instruction(tiny):
    model = tiny("llama")  # byte tokenizer: one token per character
    [cut] = prompt_texts(model, ["abcdefghij"], "query", max_tokens=4)
    assert cut == compression_prompt("abcd", "query")
    assert torch.allclose(
        embed(model, ["abcdefghij"], layers=[1], max_tokens=4),
        embed(model, ["abcd"], layers=[1]),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"texts": []}, "texts"),
        ({"texts": "one string"}, "texts"),
        ({"texts": ["ok", ""]}, r"texts\[1\]"),
        ({"role": "doc"}, "role"),
        ({"layers": [7]}, "layers"),
        ({"layers": []}, "layers"),
        ({"layers": 1}, "layers"),
        ({"prefix_bias": float("inf")}, "prefix_bias"),
        ({"prefix_bias": float("nan")}, "prefix_bias"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_input_is_refused_before_any_forward(tiny, kwargs, match):
    model = tiny("llama")
    args = {"texts": TEXTS, "layers": [1], **kwargs}
    forwards = []
    with attached(model, [("blocks.0.hook_resid_pre", lambda x, hook: forwards.append(1))]):
        with pytest.raises(ValueError, match=match):
            embed(model, args.pop("texts"), **args)
    assert forwards == []


def test_plain_text_needs_no_prompt_but_kv_embedding_does(tiny):
    with pytest.raises(ValueError, match="compression prompt"):
        encode(tiny("llama"), TEXTS, role=None, layers=[1])
    assert encode(tiny("llama"), TEXTS, role=None).kv is None
    with pytest.raises(ValueError, match="layers"):
        encode(tiny("llama"), TEXTS, layers=1)
