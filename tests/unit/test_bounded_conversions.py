"""Hooked attention points keep one conversion record, not one per call
(:mod:`mechmem.core.bounded_conversions`)."""

from __future__ import annotations

import torch

import mechmem
from mechmem.core.bounded_conversions import LatestOnly, attention_conversions, bound


def _attention_hooks(model, edit):
    layers = range(model.cfg.n_layers)
    return [(f"blocks.{layer}.attn.hook_in", edit) for layer in layers] + [
        (f"blocks.{layer}.hook_attn_out", edit) for layer in layers
    ]


def test_latest_only_keeps_the_entry_set_last():
    book = LatestOnly()
    book[1] = {"shape": (2, 3)}
    book[1]["type"] = "no_change"  # set, then read back and amended, as the conversion does
    book[2] = {"shape": (4, 5)}
    assert dict(book) == {2: {"shape": (4, 5)}}


def test_a_long_hooked_generation_keeps_one_record_per_layer(tiny_model_any):
    model = tiny_model_any
    conversions = attention_conversions(model)
    assert len(conversions) == model.cfg.n_layers  # one per attention, shared by its points
    hooks = _attention_hooks(model, lambda x, hook: x * 1.0)
    with model.hooks(fwd_hooks=hooks):
        mechmem.generate(model, ["a long run"], [], max_new_tokens=12, stop_at_eos=False)
    # 13 forwards x 2 hooked points per layer went through each conversion
    assert [len(c._conversion_state) for c in conversions] == [1] * len(conversions)


def test_drugs_at_h_keeps_one_record_per_layer(tiny):
    model = tiny("qwen2")
    drugs = mechmem.Drugs(sites=["H"], dose=0.2, protect_first=0)
    mechmem.generate(model, ["noise at H"], [drugs], max_new_tokens=10, stop_at_eos=False)
    assert all(len(c._conversion_state) <= 1 for c in attention_conversions(model))


def test_what_hooks_see_and_return_is_unchanged(tiny):
    model = tiny("llama")
    tokens = torch.tensor([[1, 5, 9, 2, 7, 3]])
    seen: list[tuple[str, torch.Size]] = []

    def edit(x, hook):
        seen.append((hook.name, x.shape))
        return x * 0.5 + 0.1

    hooks = _attention_hooks(model, edit)
    bounded = model.run_with_hooks(tokens, fwd_hooks=hooks)
    seen_bounded, seen[:] = list(seen), []
    try:
        for conversion in attention_conversions(model):
            conversion._conversion_state = {}  # TransformerLens' own record book
        plain = model.run_with_hooks(tokens, fwd_hooks=hooks)
    finally:
        assert bound(model) == model.cfg.n_layers
    assert torch.equal(bounded, plain)
    assert seen_bounded == seen
    assert len(seen) == 2 * model.cfg.n_layers
