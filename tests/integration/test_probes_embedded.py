"""Probes on the embedded SmolLM2-135M-Instruct, checked against the HF model's own numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mechmem
from mechmem.core.basic import Steer
from mechmem.core.tokens import hf_tokenizer
from mechmem.probes.logit_delta import logit_delta
from mechmem.probes.perplexity import perplexity
from mechmem.probes.traces import TraceRecorder

pytestmark = pytest.mark.integration

TEXT = (
    "The quick brown fox jumps over the lazy dog. It was a sunny day in the park, and the "
    "children played by the pond while their parents talked."
)


def _hf_loss(model, ids: list[int]) -> float:
    tokens = torch.tensor([ids], device=model.cfg.device)
    with torch.no_grad():
        return float(model.original_model(input_ids=tokens, labels=tokens).loss)


def test_perplexity_equals_exp_of_hf_loss(embedded):
    ids = hf_tokenizer(embedded)(TEXT).input_ids
    result = perplexity(embedded, TEXT)
    assert result.n_windows == 1
    assert result.n_tokens == len(ids) - 1
    assert result.perplexity == pytest.approx(math.exp(_hf_loss(embedded, ids)), rel=1e-4)


def test_sliding_perplexity_token_matches_its_window(embedded):
    ids = hf_tokenizer(embedded)(TEXT).input_ids
    window, stride = 12, 5
    result = perplexity(embedded, ids, window=window, stride=stride)
    assert result.n_tokens == len(ids) - 1
    assert not np.isnan(result.token_nll).any()
    # token 14 is scored by the window [5, 17): context ids[5:14]
    t, begin = 14, 5
    tokens = torch.tensor([ids[begin:t]], device=embedded.cfg.device)
    with torch.no_grad():
        logits = embedded.original_model(input_ids=tokens).logits[0, -1].double()
    expected = float(-logits.log_softmax(-1)[ids[t]])
    assert result.token_nll[t - 1] == pytest.approx(expected, rel=1e-4)


def test_trace_of_a_generation_matches_run_with_cache(embedded):
    hooks = ["blocks.3.hook_resid_post", f"blocks.{embedded.cfg.n_layers - 1}.hook_resid_post"]
    exact = TraceRecorder(hooks=hooks, reduce="none")
    norms = TraceRecorder(hooks=hooks, reduce="norm")
    result = mechmem.generate(
        embedded,
        "The capital of France is",
        [exact, norms],
        max_new_tokens=30,
        stop_at_eos=False,
    )
    prompt_length = len(result.prompt_tokens[0])
    positions = exact.positions()[:, 0]
    np.testing.assert_array_equal(positions, prompt_length - 1 + np.arange(30))
    sequence = torch.tensor(
        [result.prompt_tokens[0] + result.tokens[0]], device=embedded.cfg.device
    )
    _, cache = embedded.run_with_cache(sequence, names_filter=lambda name: name in hooks)
    for name in hooks:
        reference = cache[name][0, positions].float().cpu().numpy()
        recorded = exact.traces()[name][:, 0]
        assert recorded.shape == (30, int(embedded.cfg.d_model))
        # the residual stream reaches ~1e3 here: compare relative to its scale
        scale = float(np.abs(reference).max())
        np.testing.assert_allclose(recorded, reference, rtol=1e-4, atol=1e-5 * scale)
        np.testing.assert_allclose(
            norms.traces()[name][:, 0], np.linalg.norm(reference, axis=-1), rtol=1e-4
        )


def test_logit_delta_zero_and_nonzero_steer(embedded):
    prompts = ["The capital of France is", "Hello"]
    zero = logit_delta(embedded, prompts, Steer(layer=10, scale=0.0), positions="all")
    np.testing.assert_array_equal(zero.kl_forward, 0.0)
    assert zero.top1_agree.all()
    steered = logit_delta(embedded, prompts, Steer(layer=10, scale=30.0))
    assert (steered.kl_forward > 0).all()
    assert steered.summary()["n_positions"] == 2
