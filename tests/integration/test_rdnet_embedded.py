"""RD-Net on the embedded SmolLM2-135M-Instruct: gain 0 is the base model bit for bit, and the
faithful memory moves the logits by about a thousandth, as the original's initialisation does."""

from __future__ import annotations

import pytest
import torch

import mechmem
from mechmem.methods.rdnet import RDNet
from mechmem.probes import logit_delta

pytestmark = pytest.mark.integration

PROMPT = "Once upon a time, in a kingdom by the sea,"


def test_gain_zero_is_bit_identical_and_the_faithful_memory_barely_moves_logits(embedded):
    common = dict(max_new_tokens=8, do_sample=True, temperature=0.8, seed=1, return_logits=True)
    base = mechmem.generate(embedded, PROMPT, **common)
    for mode in ("faithful", "fast_weight"):
        zero = mechmem.generate(embedded, PROMPT, [RDNet(mode=mode, gain=0.0)], **common)
        assert torch.equal(zero.logits, base.logits), mode
        assert zero.tokens == base.tokens
    summary = logit_delta(embedded, [PROMPT], RDNet(mode="faithful", gain=1.0)).summary()
    assert 1e-5 < summary["mean_abs_delta"] < 1e-2
    assert summary["top1_agreement"] == 1.0
