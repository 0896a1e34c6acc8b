"""KV prefixes stored before RoPE, and the residual injection intervention."""

from __future__ import annotations

import pytest
import torch

import mechmem
from mechmem.core.intervention import intervention_from_dict
from mechmem.methods.nnm.inject import PassageKV, ResidualInjection, rotate_keys

PASSAGE = "The vault code is 4417 and the vault is in Oslo."
QUESTION = " Where is the vault?"


def _next_logits(model, passage_ids, question_ids, stored=None):
    if stored is None:
        return mechmem.generate(
            model, [passage_ids + question_ids], max_new_tokens=1, return_logits=True
        ).logits[0]
    return mechmem.generate(
        model, [question_ids], prefix=stored, max_new_tokens=1, return_logits=True
    ).logits[0]


def test_stored_prefix_plus_question_equals_text(tiny_model_any, tmp_path):
    model = tiny_model_any
    kv = PassageKV.of(model, PASSAGE)
    kv.save(tmp_path / "e1.safetensors")
    loaded = PassageKV.load(tmp_path / "e1.safetensors", model)
    question = mechmem.core.tokens.hf_tokenizer(model)(QUESTION, add_special_tokens=False).input_ids
    text = _next_logits(model, list(kv.tokens), question)
    stored = _next_logits(model, list(kv.tokens), question, loaded.prefix(model))
    torch.testing.assert_close(stored, text, atol=1e-3, rtol=0)


def test_post_rope_keys_rotated_again_do_not_match(tiny, arch):
    if arch == "gpt2":
        pytest.skip("GPT-2 has no rotary embedding: its keys carry no position to rotate twice")
    model = tiny(arch)
    clean = mechmem.prefix(model, PASSAGE)
    post = [k for k, _ in clean.cache.entries()]
    wrong = PassageKV(
        clean.tokens, tuple(post), tuple(v for _, v in clean.cache.entries()), clean.model
    )
    question = mechmem.core.tokens.hf_tokenizer(model)(QUESTION, add_special_tokens=False).input_ids
    text = _next_logits(model, list(clean.tokens), question)
    twice = _next_logits(model, list(clean.tokens), question, wrong.prefix(model))
    assert (twice - text).abs().max() > 1e-2


def test_rotation_round_trip_and_keys_are_pre_rope(tiny):
    model = tiny("gpt_neox")  # partial rotary: only the first dims of a head turn
    keys = torch.randn(1, 4, 6, 16, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(6)
    turned = rotate_keys(model, keys, positions)
    assert torch.equal(turned[..., 8:], keys[..., 8:])
    assert not torch.allclose(turned[..., 1:, :8], keys[..., 1:, :8])
    torch.testing.assert_close(turned[..., 0, :], keys[..., 0, :])  # position 0 does not turn
    torch.testing.assert_close(rotate_keys(model, turned, positions, inverse=True), keys)


def test_passage_kv_refuses_another_model(tiny, tmp_path):
    kv = PassageKV.of(tiny("llama"), PASSAGE)
    kv.save(tmp_path / "e.safetensors")
    with pytest.raises(ValueError, match="not by this model"):
        PassageKV.load(tmp_path / "e.safetensors", tiny("qwen2"))
    with pytest.raises(ValueError, match="no KV prefix file"):
        PassageKV.load(tmp_path / "missing.safetensors")


def test_injection_gain_zero_is_bit_for_bit_and_rows_are_independent(tiny_model_any):
    model = tiny_model_any
    d = int(model.cfg.d_model)
    vectors = torch.randn(2, d, generator=torch.Generator().manual_seed(1)) * 3
    prompts = ["Hello there", "A question"]
    base = mechmem.generate(model, prompts, max_new_tokens=3, return_logits=True)
    off = ResidualInjection.of(1, vectors, gain=0.0)
    zero = mechmem.generate(model, prompts, [off], max_new_tokens=3, return_logits=True)
    assert torch.equal(zero.logits, base.logits)
    mixed = ResidualInjection.of(1, vectors, row_gains=[0.0, 2.0])
    both = mechmem.generate(model, prompts, [mixed], max_new_tokens=3, return_logits=True)
    assert torch.equal(both.logits[0], base.logits[0])
    alone = ResidualInjection.of(1, vectors[1:], gain=2.0)
    single = mechmem.generate(model, prompts[1:], [alone], max_new_tokens=3, return_logits=True)
    torch.testing.assert_close(both.logits[1], single.logits[0], atol=1e-5, rtol=0)
    assert (single.logits[0] - base.logits[1]).abs().max() > 1e-3


def test_injection_json_round_trip_and_bad_input(tiny):
    model = tiny("llama")
    inject = ResidualInjection.of(1, torch.ones(1, int(model.cfg.d_model)), gain=0.5)
    again = intervention_from_dict(inject.to_dict())
    assert isinstance(again, ResidualInjection) and again.to_dict() == inject.to_dict()
    with pytest.raises(ValueError, match="gain"):
        ResidualInjection(layer=0, gain=-1.0, vectors=[[0.0]])
    with pytest.raises(ValueError, match="d_model"):
        mechmem.generate(model, "Hi", [ResidualInjection(vectors=[[1.0]])], max_new_tokens=1)
    with pytest.raises(ValueError, match="layer"):
        mechmem.generate(
            model, "Hi", [ResidualInjection.of(99, torch.ones(1, 8))], max_new_tokens=1
        )
    two = ResidualInjection.of(0, torch.ones(2, int(model.cfg.d_model)))
    with pytest.raises(ValueError, match="vectors: has 2 rows but the batch has 3"):
        mechmem.generate(model, ["a", "b", "c"], [two], max_new_tokens=1)
