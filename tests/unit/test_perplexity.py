"""Sliding-window perplexity: every token scored once, with exactly the context its window gave."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mechmem.core.basic import Steer
from mechmem.probes.perplexity import PerplexityResult, perplexity

N_TOKENS = 61


@pytest.fixture(scope="module")
def token_ids() -> list[int]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (N_TOKENS,), generator=generator).tolist()


def _direct_nll(model, context: list[int], target: int) -> float:
    """NLL of ``target`` after ``context`` from one plain HF forward over exactly that context."""
    tokens = torch.tensor([context], device=model.cfg.device)
    with torch.no_grad():
        logits = model.original_model(input_ids=tokens).logits[0, -1].double()
    return float(-logits.log_softmax(-1)[target])


def _window_begins(n: int, window: int, stride: int) -> list[int]:
    """Start of every window: 0, stride, 2*stride, ..., the last one clamped to n - window."""
    begins, begin = [0], 0
    while begin + window < n:
        begin = min(begin + stride, n - window)
        begins.append(begin)
    return begins


def _scoring_window_begin(t: int, begins: list[int], window: int) -> int:
    """Begin of the first window that reaches token ``t`` (it is the one that scores ``t``)."""
    return next(b for b in begins if b + window > t)


def test_single_window_equals_hf_mean_loss(tiny, token_ids):
    model = tiny("llama")
    result = perplexity(model, token_ids)
    assert isinstance(result, PerplexityResult)
    ids = torch.tensor([token_ids])
    with torch.no_grad():
        loss = model.original_model(input_ids=ids, labels=ids).loss
    assert result.n_windows == 1
    assert result.n_tokens == N_TOKENS - 1
    assert result.mean_nll == pytest.approx(float(loss), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(result.token_nll.mean()), rel=1e-12)


@pytest.mark.parametrize(("window", "stride"), [(16, 5), (16, 15), (10, 1), (8, 4)])
def test_sliding_window_scores_every_token_once_with_its_window_context(
    tiny, token_ids, window, stride
):
    model = tiny("llama")
    result = perplexity(model, token_ids, window=window, stride=stride)
    n = len(token_ids)
    begins = _window_begins(n, window, stride)
    assert result.n_tokens == n - 1
    assert result.token_nll.shape == (n - 1,)
    assert not np.isnan(result.token_nll).any()
    assert (result.token_nll > 0).all()
    assert result.n_windows == len(begins)
    # tokens at window starts, window ends and the clamped last window, and a spread in between
    checked = sorted({1, 2, window - 1, window, window + 1, n - 2, n - 1, *range(3, n, 7)})
    for t in checked:
        begin = _scoring_window_begin(t, begins, window)
        expected = _direct_nll(model, token_ids[begin:t], token_ids[t])
        assert result.token_nll[t - 1] == pytest.approx(expected, rel=1e-4, abs=1e-5), (
            f"token {t} (window begins at {begin})"
        )
    assert result.mean_nll == pytest.approx(result.token_nll.mean())


def test_sliding_window_differs_from_full_context(tiny, token_ids):
    """A small window really truncates the context (otherwise the test above proves nothing)."""
    model = tiny("llama")
    full = perplexity(model, token_ids)
    sliding = perplexity(model, token_ids, window=8, stride=4)
    np.testing.assert_allclose(sliding.token_nll[:7], full.token_nll[:7], rtol=1e-4)
    assert not np.allclose(sliding.token_nll, full.token_nll, rtol=1e-3)


@pytest.mark.parametrize("window", [N_TOKENS, N_TOKENS + 1, 512])
def test_window_covering_the_text_reproduces_the_single_window(tiny, token_ids, window):
    model = tiny("llama")
    single = perplexity(model, token_ids)
    result = perplexity(model, token_ids, window=window)
    assert result.n_windows == 1
    np.testing.assert_array_equal(result.token_nll, single.token_nll)
    assert result.perplexity == single.perplexity


def test_text_and_its_token_ids_agree(tiny):
    model = tiny("gpt2")
    text = "The quick brown fox jumps over the lazy dog."
    ids = model.hf_tokenizer(text).input_ids
    by_text = perplexity(model, text, window=12, stride=6)
    by_ids = perplexity(model, ids, window=12, stride=6)
    assert by_text.n_tokens == len(ids) - 1
    np.testing.assert_array_equal(by_text.token_nll, by_ids.token_nll)


def test_interventions_change_perplexity_and_zero_scale_does_not(tiny, token_ids):
    model = tiny("llama")
    base = perplexity(model, token_ids, window=16, stride=8)
    zero = perplexity(model, token_ids, Steer(layer=1, scale=0.0), window=16, stride=8)
    steered = perplexity(model, token_ids, Steer(layer=1, scale=20.0), window=16, stride=8)
    np.testing.assert_array_equal(zero.token_nll, base.token_nll)
    assert steered.perplexity != pytest.approx(base.perplexity, rel=1e-3)


def test_two_tokens_is_enough(tiny):
    model = tiny("llama")
    result = perplexity(model, [5, 6])
    assert result.n_tokens == 1
    assert result.token_nll[0] == pytest.approx(_direct_nll(model, [5], 6), rel=1e-4)
    assert result.to_dict() == {
        "perplexity": result.perplexity,
        "mean_nll": result.mean_nll,
        "n_tokens": 1,
        "n_windows": 1,
    }


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ([], "two tokens"),
        ([5], "two tokens"),
        ("a", "two tokens"),
        ("", "empty"),
        ([1, 2.5, 3], "two tokens"),
    ],
)
def test_rejects_too_short_or_bad_text(tiny, text, match):
    with pytest.raises(ValueError, match=match):
        perplexity(tiny("llama"), text)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 1}, "window"),
        ({"window": 513}, "window"),
        ({"window": 8.0}, "window"),
        ({"window": -4}, "window"),
        ({"window": 8, "stride": 8}, "stride"),
        ({"window": 8, "stride": 20}, "stride"),
        ({"window": 8, "stride": -1}, "stride"),
        ({"window": 8, "stride": 2.5}, "stride"),
    ],
)
def test_rejects_bad_window_or_stride(tiny, token_ids, kwargs, match):
    with pytest.raises(ValueError, match=match):
        perplexity(tiny("llama"), token_ids, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"window": 0}, "window"), ({"stride": 0}, "stride")]
)
def test_rejects_zero_window_or_stride(tiny, token_ids, kwargs, match):
    """0 is out of range (window >= 2, stride >= 1), not a request for the default."""
    with pytest.raises(ValueError, match=match):
        perplexity(tiny("llama"), token_ids, **kwargs)


def test_rejects_a_hook_the_model_lacks(tiny, token_ids):
    with pytest.raises(ValueError, match="hook_nope"):
        perplexity(tiny("llama"), token_ids, Steer(layer=0, hook="hook_nope"))
    with pytest.raises(ValueError, match="layer"):
        perplexity(tiny("llama"), token_ids, Steer(layer=9))
