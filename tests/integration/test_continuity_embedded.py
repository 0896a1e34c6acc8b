"""Continuity stream on the embedded SmolLM2-135M-Instruct: linkage 0 is the base model bit for
bit, the seeded copy reproduces a grouped-query layer's attention, and causal cached decoding
equals full recomputation."""

from __future__ import annotations

import pytest
import torch

import mechmem
from mechmem.core.hooks import attached
from mechmem.core.tokens import hf_tokenizer
from mechmem.methods.continuity import Continuity
from mechmem.methods.seeded_attention import SeededAttention

pytestmark = pytest.mark.integration

PROMPT = "Who are you, and what do you remember?"


def test_linkage_zero_is_bit_identical_in_prefill_and_decoding(embedded):
    common = dict(max_new_tokens=6, stop_at_eos=False, return_logits=True)
    base = mechmem.generate(embedded, PROMPT, **common)
    for variant in ("faithful", "causal"):
        off = mechmem.generate(
            embedded, PROMPT, [Continuity(variant=variant, linkage=0.0)], **common
        )
        assert torch.equal(off.logits, base.logits), variant


def test_seeded_copy_reproduces_the_attention_of_a_grouped_query_layer(embedded):
    layer = 15  # 9 query heads read 3 key/value heads
    ids = torch.tensor([hf_tokenizer(embedded)(PROMPT).input_ids])
    got = {}
    hooks = [
        (f"blocks.{layer}.attn.hook_in", lambda x, hook: got.update(x=x.clone())),
        (f"blocks.{layer}.hook_attn_out", lambda x, hook: got.update(out=x.clone())),
    ]
    with attached(embedded, hooks):
        mechmem.forward(embedded, ids)
    seeded = SeededAttention.of(embedded, layer)
    n = ids.shape[1]
    queries, keys, values = seeded.project(
        got["x"], seeded.rotation(torch.arange(n)[None], got["x"])
    )
    causal = torch.ones(1, n, n, dtype=torch.bool).tril()
    branch = seeded.attend(queries, keys, values, causal)
    torch.testing.assert_close(branch, got["out"], atol=1e-4, rtol=0)


def test_causal_cached_decoding_equals_full_recomputation(embedded):
    stream = Continuity(variant="causal")
    result = mechmem.generate(
        embedded, PROMPT, [stream], max_new_tokens=6, stop_at_eos=False, return_logits=True
    )
    ids = hf_tokenizer(embedded)(PROMPT).input_ids + result.tokens[0]
    full = mechmem.forward(embedded, torch.tensor([ids]), [Continuity(variant="causal")])
    torch.testing.assert_close(result.logits[0], full[0, -7:-1], atol=1e-3, rtol=1e-4)
    assert stream.calls == [6, 6, 6]
