"""The fast path on the embedded SmolLM2-135M: logits equal TransformerLens' own path."""

from __future__ import annotations

import pytest
import torch

import mechmem
from mechmem.core import fastpath

pytestmark = pytest.mark.integration


def _logits(model):
    prompts = ["The capital of France is", "Once upon a time"]
    result = mechmem.generate(
        model, prompts, max_new_tokens=6, stop_at_eos=False, return_logits=True
    )
    return result.logits


def test_fast_path_logits_equal_the_tl_path_in_prefill_and_cached_decoding(embedded):
    was_applied = fastpath.is_applied(embedded)
    try:
        assert fastpath.apply(embedded)
        fast = _logits(embedded)
        fastpath.remove(embedded)
        slow = _logits(embedded)
    finally:
        (fastpath.apply if was_applied else fastpath.remove)(embedded)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
