"""The whitening transform against a numpy computation, its small-n guard and its file."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from mechmem.methods.nnm.transform import Whitening


def _numpy_whitening(fit: np.ndarray, other: np.ndarray, alpha: float, eps: float = 1e-6):
    mean = fit.mean(0)
    std = fit.std(0, ddof=1)
    std[std < 1e-5] = 1.0
    z = (fit - mean) / std
    cov = np.cov(z, rowvar=False)
    cov = (1 - alpha) * cov + alpha * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    values, vectors = np.linalg.eigh(cov)
    w = vectors @ np.diag(1 / np.sqrt(np.clip(values, 0, None) + eps)) @ vectors.T
    y = ((other - mean) / std) @ w
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def _correlated(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d))
    return rng.normal(size=(n, d)) @ mixing + rng.normal(size=d) * 5


def test_fit_on_one_set_apply_to_another_matches_numpy():
    fit, other = _correlated(400, 6, 0), _correlated(30, 6, 1)
    t = Whitening("m", 2).fit(torch.tensor(fit))
    expected = _numpy_whitening(fit, other, alpha=0.0)
    np.testing.assert_allclose(t.apply(torch.tensor(other)).numpy(), expected, atol=1e-5)
    assert t.shrinkage == 0.0


def test_whitened_fit_set_has_identity_covariance_before_l2():
    fit = _correlated(2000, 5, 2)
    t = Whitening("m", 0).fit(torch.tensor(fit))
    z = (torch.tensor(fit) - t.mean) / t.std @ t.matrix
    cov = np.cov(z.numpy(), rowvar=False)
    np.testing.assert_allclose(cov, np.eye(5), atol=1e-3)  # eps on the eigenvalues


def test_constant_dimension_is_centred_not_scaled():
    fit = _correlated(300, 4, 3)
    fit[:, 2] = 7.0
    t = Whitening("m", 0, whiten=False).fit(torch.tensor(fit))
    assert t.std[2] == 1.0
    z = _numpy_whitening(fit, fit, alpha=1.0)  # alpha 1 with a constant column: z-score + L2 only
    assert np.isfinite(z).all()
    np.testing.assert_allclose(t.apply(torch.tensor(fit)).numpy()[:, 2], 0.0, atol=1e-6)


def test_small_n_warns_and_shrinks_by_the_documented_rule():
    fit, other = _correlated(12, 8, 4), _correlated(5, 8, 5)  # n < 10·d
    with pytest.warns(UserWarning, match="shrunk"):
        t = Whitening("m", 1).fit(torch.tensor(fit))
    alpha = 8 / (8 + 12)
    assert t.shrinkage == pytest.approx(alpha)
    expected = _numpy_whitening(fit, other, alpha=alpha)
    np.testing.assert_allclose(t.apply(torch.tensor(other)).numpy(), expected, atol=1e-5)


def test_n_below_d_stays_finite_and_large_n_does_not_warn():
    with pytest.warns(UserWarning):
        t = Whitening("m", 1).fit(torch.tensor(_correlated(5, 20, 6)))
    assert torch.isfinite(t.apply(torch.tensor(_correlated(3, 20, 7)))).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Whitening("m", 1).fit(torch.tensor(_correlated(200, 20, 8)))


def test_save_load_round_trip_and_refusal(tmp_path):
    fit = torch.tensor(_correlated(100, 4, 9))
    t = Whitening("model-a", 5).fit(fit)
    path = t.save(tmp_path / "whitening.safetensors")
    loaded = Whitening.load(path, "model-a", 5)
    assert torch.equal(loaded.apply(fit), t.apply(fit))
    with pytest.raises(ValueError, match="model-a layer 5, not for model-b layer 5"):
        Whitening.load(path, "model-b", 5)
    with pytest.raises(ValueError, match="not for model-a layer 4"):
        Whitening.load(path, "model-a", 4)


def test_bad_input_is_refused():
    t = Whitening("m", 0)
    with pytest.raises(ValueError, match="not fitted"):
        t.apply(torch.ones(1, 3))
    with pytest.raises(ValueError, match="at least 2"):
        t.fit(torch.ones(1, 3))
    with pytest.raises(ValueError, match="NaN"):
        t.fit(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    t.fit(torch.tensor(_correlated(50, 3, 10)))
    with pytest.raises(ValueError, match="3"):
        t.apply(torch.ones(2, 4))
    with pytest.raises(ValueError, match="shrinkage"):
        Whitening("m", 0, shrinkage=2.0)
