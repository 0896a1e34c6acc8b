"""Sessions, prefixes and ``applied`` on the embedded SmolLM2-135M-Instruct (its real chat
template and tokenizer)."""

from __future__ import annotations

import pytest
import torch

import mechmem
from mechmem.core.tokens import chat_ids, hf_tokenizer

pytestmark = pytest.mark.integration

GREEDY = dict(max_new_tokens=12)


def test_chat_turns_feed_only_the_template_delta_and_match_a_fresh_run(embedded):
    tokenizer = hf_tokenizer(embedded)
    session = mechmem.Session(embedded)
    messages = []
    for question in ["What is the capital of France?", "And of Italy?", "Which is larger?"]:
        result = session.send(question, **GREEDY)
        turn = session.turns[-1]
        messages.append({"role": "user", "content": question})
        ids = chat_ids(tokenizer, messages, add_generation_prompt=True)
        assert result.tokens == mechmem.generate(embedded, [ids], **GREEDY).tokens
        # Nothing the cache held is fed again: the reply re-tokenises as it was generated.
        assert len(result.prompt_tokens[0]) == len(ids) - turn.cached_before
        messages.append({"role": "assistant", "content": result.text[0]})


def test_prefix_questions_equal_the_full_texts(embedded):
    tokenizer = hf_tokenizer(embedded)
    passage = "The vault code is 4417. The vault is in Oslo, under the old library.\n"
    questions = ["Q: What is the vault code?\nA:", "Q: In which city is the vault?\nA:"]
    stored = mechmem.prefix(embedded, passage)
    full = [
        list(stored.tokens) + tokenizer(q, add_special_tokens=False).input_ids for q in questions
    ]
    expected = mechmem.generate(embedded, full, **GREEDY).tokens
    assert mechmem.generate(embedded, questions, prefix=stored, **GREEDY).tokens == expected


def test_applied_run_with_cache_equals_forward(embedded):
    tokens = torch.tensor([hf_tokenizer(embedded)("The capital of France is").input_ids])
    drugs = mechmem.Drugs(sites=["H", "K"], dose=0.1)
    expected = mechmem.forward(embedded, tokens, drugs)
    with mechmem.applied(embedded, drugs):
        logits, cache = embedded.run_with_cache(tokens)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert "blocks.12.hook_resid_post" in cache
