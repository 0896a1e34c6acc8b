"""Attractor layer on the embedded SmolLM2-135M-Instruct: in burn-in and at scale 0 the logits are
the base model's bit for bit (its two middle layers hooked at ``hook_q`` and ``hook_attn_out``),
and once burn-in ends the conservative preset moves them."""

from __future__ import annotations

import pytest
import torch

import mechmem
from mechmem.methods.attractor import Attractor

pytestmark = pytest.mark.integration

PROMPT = "Once upon a time, in a kingdom by the sea,"


def test_burn_in_and_scale_zero_are_bit_identical_then_the_preset_acts(embedded):
    common = dict(max_new_tokens=6, do_sample=True, temperature=0.8, seed=1, return_logits=True)
    base = mechmem.generate(embedded, PROMPT, **common)
    for causal in (False, True):
        burning = Attractor(causal=causal)  # conservative: burn-in 50 updates > this run
        zero = Attractor(causal=causal, burn_in=0, scale=0.0)
        for attractor in (burning, zero):
            run = mechmem.generate(embedded, PROMPT, [attractor], **common)
            assert torch.equal(run.logits, base.logits), attractor
            assert run.tokens == base.tokens
        assert burning.traces().burn_in.all() and burning.traces().layer == 14
        acting = mechmem.generate(embedded, PROMPT, [Attractor(causal=causal, burn_in=0)], **common)
        assert not torch.equal(acting.logits, base.logits)
