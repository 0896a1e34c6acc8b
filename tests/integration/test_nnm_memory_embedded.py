"""The memory loop on the embedded SmolLM2-135M-Instruct: store fictional facts, find them by a
question, answer from the stored pre-RoPE KV prefix exactly as from the text."""

from __future__ import annotations

import pytest
import torch

import mechmem
from mechmem.core.tokens import hf_tokenizer
from mechmem.experiments.nnm_gate import QUESTION_PROMPT, fictional_items
from mechmem.methods.nnm import MemoryStore, ResidualInjection

pytestmark = pytest.mark.integration


def test_store_search_and_stored_prefix_on_the_embedded_model(embedded, tmp_path):
    items = fictional_items(6, seed=11)
    held_out = [item["context"] for item in fictional_items(24, seed=12)]
    with MemoryStore(embedded, path=tmp_path / "memory") as store:
        store.fit_transform(held_out, min_ratio=1.0)  # ~800 tokens for d = 576: full ZCA
        store.ingest({f"item-{i}": item["context"] for i, item in enumerate(items)}, prefixes=True)
        found = store.search_many([item["question"] for item in items], k=1)
        top1 = [hits[0].source_id for hits in found]
        assert sum(s == f"item-{i}" for i, s in enumerate(top1)) >= 5  # invented names are found

        kv = store.passage_kv(store.entry_id("item-0"))
        question = hf_tokenizer(embedded)(
            QUESTION_PROMPT.format(question=items[0]["question"]), add_special_tokens=False
        ).input_ids
        common = dict(max_new_tokens=1, return_logits=True)
        text = mechmem.generate(embedded, [list(kv.tokens) + question], **common).logits[0]
        stored = mechmem.generate(embedded, [question], prefix=kv.prefix(embedded), **common)
        torch.testing.assert_close(stored.logits[0], text, atol=1e-3, rtol=0)

        vector = store.injection_vectors(store.entry_id("item-0")).mean(0, keepdim=True)
        off = ResidualInjection.of(store.injection_layer, vector, gain=0.0)
        base = mechmem.generate(embedded, [question], **common).logits
        assert torch.equal(mechmem.generate(embedded, [question], [off], **common).logits, base)
