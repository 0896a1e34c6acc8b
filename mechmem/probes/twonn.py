"""TwoNN intrinsic dimension (Facco, d'Errico, Rodriguez & Laio, Sci. Rep. 7, 12140, 2017).

For each point, mu = r2 / r1 is the ratio of the distances to its second and first nearest
neighbours. On a manifold of intrinsic dimension d with locally uniform density, mu follows a
Pareto law with shape d: F(mu) = 1 - mu**-d, so -log(1 - F(mu)) = d * log(mu) and log(mu) is
exponential with rate d. The dimension is read off either as the slope of that line through the
empirical distribution (``method="regression"``, the paper's estimator) or as the closed-form
maximum-likelihood rate (``method="mle"``).

The work is split in two: :func:`twonn_ratios` finds the neighbours (chunked, never holding the
full n x n distance matrix) and :func:`fit_twonn` fits the ratios, so :func:`twonn` is
``fit_twonn(twonn_ratios(X))`` and :func:`twonn_bootstrap` refits resampled ratios cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Real

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechmem.core.config import is_integer

METHODS = ("regression", "mle")

# Neighbour candidates per point found in float32. The nearest few are measured exactly; the
# others only for points whose float32 rounding-error bound cannot rule them out.
_N_CANDIDATES = 16
_N_MEASURED_FIRST = 4
# Relative precision of float32 matmuls under torch.get_float32_matmul_precision() (fp32, TF32,
# bf16), for the bound on the float32 search's rounding error.
_FLOAT32_MATMUL_EPS = {"highest": 2.0**-23, "high": 2.0**-10, "medium": 2.0**-7}


@dataclass(frozen=True)
class TwoNNResult:
    """A TwoNN estimate with a bootstrap confidence interval.

    Attributes:
        dimension: The estimate on all distinct points.
        ci_low: Lower end of the percentile bootstrap interval.
        ci_high: Upper end of the percentile bootstrap interval.
        ci: Coverage of the interval, e.g. 0.95.
        n_boot: Number of bootstrap refits.
        n_points: Number of distinct points the ratios were computed on.
        method: ``"regression"`` or ``"mle"``.
        mu: The ratios r2 / r1, one per distinct point, as float64.
        discard_fraction: Fraction of the largest ratios left out of the fit.

    Example:
        >>> r = twonn_bootstrap(torch.rand(1000, 3), n_boot=50)
        >>> r.ci_low <= r.dimension <= r.ci_high
        True
    """

    dimension: float
    ci_low: float
    ci_high: float
    ci: float
    n_boot: int
    n_points: int
    method: str
    mu: np.ndarray = field(repr=False, compare=False)
    discard_fraction: float = 0.1

    def to_dict(self) -> dict:
        """JSON-ready fields (the ratios themselves left out)."""
        return {
            "dimension": self.dimension,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "ci": self.ci,
            "n_boot": self.n_boot,
            "n_points": self.n_points,
            "method": self.method,
            "discard_fraction": self.discard_fraction,
        }


def _check_fit_args(discard_fraction: float, method: str) -> None:
    if isinstance(discard_fraction, bool) or not isinstance(discard_fraction, Real):
        raise ValueError(f"discard_fraction must be a number, got {discard_fraction!r}")
    if not 0.0 <= discard_fraction < 1.0:
        raise ValueError(f"discard_fraction must be in [0, 1), got {discard_fraction}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _check_chunk_size(chunk_size: int) -> None:
    if not is_integer(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def _as_points(
    X: Float[Tensor, "n d"] | Float[np.ndarray, "n d"], device: str | torch.device | None
) -> Float[Tensor, "n d"]:
    """Validate X and return it as a float64 tensor on ``device`` (default: X's device)."""
    if isinstance(X, np.ndarray):
        if X.dtype.kind not in "fiu":
            raise ValueError(f"X must hold real numbers, got dtype {X.dtype}")
        X = torch.from_numpy(np.ascontiguousarray(X))
    elif isinstance(X, Tensor):
        if X.dtype.is_complex or X.dtype == torch.bool:
            raise ValueError(f"X must hold real numbers, got dtype {X.dtype}")
    else:
        raise ValueError(f"X must be a torch.Tensor or numpy.ndarray, got {type(X).__name__}")
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D [n_points, n_features], got shape {tuple(X.shape)}")
    if X.shape[1] < 1:
        raise ValueError(f"X must have at least one feature, got shape {tuple(X.shape)}")
    if X.shape[0] < 3:
        raise ValueError(f"too few points: TwoNN needs at least 3, got {X.shape[0]}")
    if not bool(torch.isfinite(X).all()):
        raise ValueError("X contains NaN or infinite values")
    return X.to(device=X.device if device is None else device, dtype=torch.float64)


def _unique_rows(X: Float[Tensor, "n d"]) -> Float[Tensor, "m d"]:
    """Drop exact duplicate rows, keeping each first occurrence in its original order."""
    uniq, inverse = torch.unique(X, dim=0, return_inverse=True)
    if len(uniq) == len(X):
        return X
    n = len(X)
    first = torch.full((len(uniq),), n, dtype=torch.long, device=X.device)
    first.scatter_reduce_(0, inverse, torch.arange(n, device=X.device), reduce="amin")
    return X[first.sort().values]


def _merge_topk(
    best: Float[Tensor, "b k"],
    best_idx: Int[Tensor, "b k"],
    score: Float[Tensor, "b m"],
    offset: int,
) -> None:
    """Merge the k smallest entries of ``score`` (column j is point offset + j) into ``best``."""
    k = best.shape[1]
    values, idx = score.topk(min(k, score.shape[1]), dim=1, largest=False)
    values, order = torch.cat([best, values], dim=1).topk(k, dim=1, largest=False)
    best.copy_(values)
    best_idx.copy_(torch.cat([best_idx, idx + offset], dim=1).gather(1, order))


def _candidates(
    Y: Float[Tensor, "n d"], k: int, chunk_size: int
) -> tuple[Float[Tensor, "n k"], Int[Tensor, "n k"]]:
    """Each point's k nearest other points by float32 squared distance, with those distances.

    One matmul of augmented rows gives squared distances directly:
    [a, ||a||^2, 1] . [-2b, 1, ||b||^2] = ||a - b||^2. The distance matrix is symmetric, so each
    block (I, J) with I <= J serves the queries in I (rows) and, transposed, those in J (columns):
    half the products of a plain row-chunked search.
    """
    n = len(Y)
    sq_norms = (Y * Y).sum(dim=1, keepdim=True)
    ones = torch.ones_like(sq_norms)
    left = torch.cat([Y, sq_norms, ones], dim=1)
    right = torch.cat([-2.0 * Y, ones, sq_norms], dim=1)
    best = torch.full((n, k), torch.inf, dtype=Y.dtype, device=Y.device)
    best_idx = torch.zeros((n, k), dtype=torch.long, device=Y.device)
    for i0 in range(0, n, chunk_size):
        i1 = min(i0 + chunk_size, n)
        for j0 in range(i0, n, chunk_size):
            j1 = min(j0 + chunk_size, n)
            dist = left[i0:i1] @ right[j0:j1].T
            if i0 == j0:
                dist.fill_diagonal_(torch.inf)
            else:
                _merge_topk(best[j0:j1], best_idx[j0:j1], dist.T.contiguous(), i0)
            _merge_topk(best[i0:i1], best_idx[i0:i1], dist, j0)
    return best, best_idx


def _score_error_bound(Y: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
    """Per query a, a bound on the float32 squared distance's error, over all b.

    (d + 4) * eps * (||a|| + max ||b||)^2 covers rounding Y and the squared norms to float32 and
    the length-(d + 2) float32 dot product of :func:`_candidates`.
    """
    norms = Y.norm(dim=1)
    eps = _FLOAT32_MATMUL_EPS[torch.get_float32_matmul_precision()]
    return (Y.shape[1] + 4) * eps * (norms + norms.max()) ** 2


def _candidates_float64(
    Y: Float[Tensor, "n d"], rows: Int[Tensor, " b"], k: int
) -> Int[Tensor, "b k"]:
    """The k nearest other points of ``Y[rows]``, scored in float64 against every point."""
    score = torch.addmm((Y * Y).sum(dim=1).unsqueeze(0), Y[rows], Y.T, alpha=-2.0)
    score[torch.arange(len(rows), device=Y.device), rows] = torch.inf
    return score.topk(k, dim=1, largest=False).indices


def _two_nearest(
    X: Float[Tensor, "n d"], rows: Int[Tensor, " b"], candidates: Int[Tensor, "b k"]
) -> Float[Tensor, "b 2"]:
    """Exact distances from ``X[rows]`` to their two nearest candidates, ascending."""
    exact = (X[rows].unsqueeze(1) - X[candidates]).norm(dim=2)
    return exact.topk(2, dim=1, largest=False).values


def twonn_ratios(
    X: Float[Tensor, "n d"] | Float[np.ndarray, "n d"],
    *,
    chunk_size: int = 2048,
    device: str | torch.device | None = None,
) -> Float[Tensor, " m"]:
    """Ratios mu = r2 / r1 of second to first nearest-neighbour Euclidean distances.

    Exact duplicate rows are removed first (their r1 would be 0 and mu undefined), so there is
    one ratio per distinct point, in the order of each point's first occurrence in X.

    Neighbours are searched in ``chunk_size`` x ``chunk_size`` blocks of the distance matrix
    (memory O(chunk_size^2 + n * d), never n x n). Each point's 16 nearest candidates are
    ranked in float32 on centred, rescaled data with the ||a||^2 + ||b||^2 - 2ab expansion, and
    the distances to the best 4 are measured exactly in float64 as ||a - b||. A bound on the
    float32 rounding error then checks that no unmeasured point can be nearer than the second
    neighbour found; where it cannot, all 16 candidates are measured and checked again, and the
    few points still in doubt (tight clusters far from the centroid, very dense low-dimensional
    sets, TF32 or bf16 matmuls) are searched again in float64, as exact as scikit-learn.

    Args:
        X: Points, [n_points, n_features]; a torch tensor (any device) or numpy array.
        chunk_size: Rows and columns per block; the ratios do not depend on it.
        device: Where to compute; default X's device (CPU for numpy input).

    Returns:
        float64 tensor [m] of ratios (all >= 1) on ``device``, m = number of distinct rows.

    Raises:
        ValueError: X is not 2-D, not real, has NaN/inf, or has fewer than 3 distinct points.

    Example:
        >>> mu = twonn_ratios(torch.rand(500, 2))
        >>> mu.shape, bool((mu >= 1).all())
        (torch.Size([500]), True)
    """
    _check_chunk_size(chunk_size)
    X = _unique_rows(_as_points(X, device))
    n = len(X)
    if n < 3:
        raise ValueError(f"too few points: TwoNN needs at least 3 distinct points, got {n}")

    Y = X - X.mean(dim=0)
    scale = Y.abs().max()
    Y /= scale  # |coordinates| <= 1, so the float32 search cannot overflow
    k = min(_N_CANDIDATES, n - 1)
    scores, candidates = _candidates(Y.to(torch.float32), k, chunk_size)
    bound = _score_error_bound(Y)
    r = torch.empty(n, 2, dtype=torch.float64, device=X.device)
    unsure = torch.arange(n, device=X.device)
    for width in sorted({min(_N_MEASURED_FIRST, k), k}):
        for rows in unsure.split(chunk_size):
            r[rows] = _two_nearest(X, rows, candidates[rows, :width])
        if width == n - 1:  # every other point was measured
            return r[:, 1] / r[:, 0]
        # Every unmeasured b has a float32 squared distance >= floor, so an exact one
        # >= floor - bound: it cannot be nearer than r2 when that exceeds r2^2.
        floor = scores[unsure, min(width, k - 1)].to(torch.float64) - bound[unsure]
        unsure = unsure[floor <= (r[unsure, 1] / scale) ** 2]
    for rows in unsure.split(chunk_size):
        r[rows] = _two_nearest(X, rows, _candidates_float64(Y, rows, k))
    return r[:, 1] / r[:, 0]


def fit_twonn(
    mu: Float[Tensor, " n"] | Float[np.ndarray, " n"],
    discard_fraction: float = 0.1,
    method: str = "regression",
) -> float:
    """Fit the TwoNN dimension to nearest-neighbour ratios.

    The N ratios are sorted and the smallest k = floor(N * (1 - discard_fraction)) kept, with the
    empirical CDF F_i = i / N of the i-th smallest (as in ``skdim.id.TwoNN``).

    - ``"regression"`` (Facco et al. 2017): least squares through the origin of -log(1 - F_i)
      on log(mu_i) over the kept ratios; the slope is d. When nothing is discarded the largest
      ratio has F = 1 (an infinite ordinate) and is left out of the fit.
    - ``"mle"``: log(mu) is Exponential(d), and keeping the k smallest of N is Type-II censoring
      whose total time on test T = sum_{i<=k} log(mu_(i)) + (N - k) log(mu_(k)) is Gamma(k, d),
      so d = (k - 1) / T is the unbiased estimate (k / T, the plain MLE, is biased up by a factor
      k / (k - 1)). With ``discard_fraction=0`` this is (N - 1) / sum(log(mu)).

    Args:
        mu: Ratios r2 / r1 (each >= 1), e.g. from :func:`twonn_ratios`.
        discard_fraction: Fraction of the largest ratios to discard, in [0, 1).
        method: ``"regression"`` or ``"mle"``.

    Returns:
        The intrinsic dimension estimate.

    Raises:
        ValueError: Bad arguments, ratios that are not 1-D, finite and >= 1, fewer than 2 kept
            ratios, or kept ratios all equal to 1 (e.g. points on a regular grid).

    Example:
        >>> mu = torch.rand(10_000, dtype=torch.float64) ** -0.5  # Pareto(1, 2) samples
        >>> round(fit_twonn(mu, method="mle"))
        2
    """
    _check_fit_args(discard_fraction, method)
    mu = torch.as_tensor(mu).to(torch.float64)
    if mu.ndim != 1:
        raise ValueError(f"mu must be 1-D, got shape {tuple(mu.shape)}")
    if not bool(torch.isfinite(mu).all()):
        raise ValueError("mu contains NaN or infinite values")
    if not bool((mu >= 1).all()):
        raise ValueError("mu must be >= 1 (mu = r2 / r1 with r2 >= r1)")
    n = len(mu)
    k = int(n * (1 - discard_fraction))
    if k < 2:
        raise ValueError(
            f"too few ratios: {n} ratios with discard_fraction={discard_fraction} keep {k} (< 2)"
        )

    log_mu = mu.sort().values[:k].log()
    if method == "mle":
        total = log_mu.sum() + (n - k) * log_mu[-1]
        if total <= 0:
            raise ValueError("all kept ratios equal 1: the dimension is unbounded")
        return float((k - 1) / total)

    cdf = torch.arange(1, k + 1, dtype=torch.float64, device=mu.device) / n
    if k == n:
        log_mu, cdf = log_mu[:-1], cdf[:-1]
    sxx = (log_mu * log_mu).sum()
    if sxx <= 0:
        raise ValueError("all kept ratios equal 1: the dimension is unbounded")
    return float((log_mu * -torch.log1p(-cdf)).sum() / sxx)


def twonn(
    X: Float[Tensor, "n d"] | Float[np.ndarray, "n d"],
    discard_fraction: float = 0.1,
    method: str = "regression",
    *,
    chunk_size: int = 2048,
    device: str | torch.device | None = None,
) -> float:
    """TwoNN intrinsic dimension of a point cloud: ``fit_twonn(twonn_ratios(X))``.

    Exact duplicate rows are counted once (see :func:`twonn_ratios`); the fit is described in
    :func:`fit_twonn`.

    Args:
        X: Points, [n_points, n_features]; a torch tensor (any device) or numpy array.
        discard_fraction: Fraction of the largest ratios to discard, in [0, 1).
        method: ``"regression"`` (Facco et al.) or ``"mle"`` (unbiased, censoring-aware).
        chunk_size: Query rows per neighbour-search block.
        device: Where to compute; default X's device.

    Returns:
        The intrinsic dimension estimate.

    Raises:
        ValueError: Bad X (see :func:`twonn_ratios`) or bad fit arguments.

    Example:
        >>> plane = torch.randn(2000, 2) @ torch.randn(2, 50)
        >>> round(twonn(plane))
        2
    """
    _check_fit_args(discard_fraction, method)
    mu = twonn_ratios(X, chunk_size=chunk_size, device=device)
    return fit_twonn(mu, discard_fraction, method)


def check_bootstrap_args(
    n_boot: int, ci: float = 0.95, discard_fraction: float = 0.1, method: str = "regression"
) -> None:
    """Raise ``ValueError`` on arguments :func:`twonn_bootstrap` would reject, before any work.

    Example:
        >>> check_bootstrap_args(100, 0.95, 0.1, "mle")
    """
    if not is_integer(n_boot) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if isinstance(ci, bool) or not isinstance(ci, Real) or not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be a number in (0, 1), got {ci!r}")
    _check_fit_args(discard_fraction, method)


def twonn_bootstrap(
    X: Float[Tensor, "n d"] | Float[np.ndarray, "n d"],
    n_boot: int = 200,
    ci: float = 0.95,
    seed: int = 0,
    *,
    discard_fraction: float = 0.1,
    method: str = "regression",
    chunk_size: int = 2048,
    device: str | torch.device | None = None,
) -> TwoNNResult:
    """TwoNN estimate with a percentile bootstrap confidence interval.

    The bootstrap resamples the per-point ratios mu_i with replacement and refits them, rather
    than resampling points: a resample of points repeats points, whose zero nearest-neighbour
    distance makes mu undefined, and recomputing neighbours per resample would cost n_boot
    neighbour searches. The ratios are not independent (neighbouring points share distances),
    so the interval is somewhat optimistic.

    Args:
        X: Points, [n_points, n_features]; a torch tensor (any device) or numpy array.
        n_boot: Number of bootstrap refits.
        ci: Coverage of the interval, in (0, 1).
        seed: Seed of the numpy generator drawing the resamples; same seed, same interval.
        discard_fraction: Fraction of the largest ratios to discard, in [0, 1).
        method: ``"regression"`` or ``"mle"``.
        chunk_size: Query rows per neighbour-search block.
        device: Where to compute the ratios; default X's device.

    Returns:
        A :class:`TwoNNResult`.

    Raises:
        ValueError: Bad X, fit arguments, n_boot or ci.

    Example:
        >>> r = twonn_bootstrap(torch.rand(2000, 2), n_boot=100, seed=1)
        >>> 1.5 < r.ci_low <= r.ci_high < 2.5
        True
    """
    check_bootstrap_args(n_boot, ci, discard_fraction, method)
    mu = twonn_ratios(X, chunk_size=chunk_size, device=device).cpu().numpy()
    dimension = fit_twonn(mu, discard_fraction, method)
    rng = np.random.default_rng(seed)
    boots = np.array(
        [
            fit_twonn(mu[rng.integers(0, len(mu), size=len(mu))], discard_fraction, method)
            for _ in range(n_boot)
        ]
    )
    ci_low, ci_high = np.quantile(boots, [(1 - ci) / 2, (1 + ci) / 2])
    return TwoNNResult(
        dimension=dimension,
        ci_low=float(ci_low),
        ci_high=float(ci_high),
        ci=ci,
        n_boot=n_boot,
        n_points=len(mu),
        method=method,
        discard_fraction=discard_fraction,
        mu=mu,
    )
