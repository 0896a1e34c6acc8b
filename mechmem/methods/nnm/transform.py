"""The retrieval vectors' normalisation: centre, z-score, ZCA whitening, L2.

``Whitening(model_id, layer).fit(x)`` learns, from held-out ingest vectors ``x`` (``[n, d]``):

1. the mean μ and the standard deviation σ of each dimension (σ < 1e-5 is set to 1, so a
   constant dimension is centred but not blown up);
2. the covariance C of the z-scores z = (x − μ) / σ and its ZCA whitening matrix
   W = U diag((λ + eps)^-1/2) Uᵀ, where C' = U diag(λ) Uᵀ and C' is C itself or, when the fit
   set is small, C shrunk toward a scaled identity (the guard below).

``apply(x)`` returns L2-normalise((x − μ) / σ · W): unit rows, so the store's cosine distance is
their dot product.

**The guard when n is not ≫ d.** With n vectors in d dimensions the sample covariance has rank
at most n − 1 and its small eigenvalues are mostly noise; inverting them (as the original did on
a rank-deficient covariance) amplifies noise directions. The rule: when n ≥ ``min_ratio`` · d
(default 10) the full covariance is whitened. Otherwise a ``UserWarning`` says so and the
covariance is shrunk, C' = (1 − α) C + α (tr C / d) I with α = d / (d + n) (about 0.09 at n = 10d,
0.5 at n = d, close to 1 when n ≪ d, where the transform tends to a plain z-score). An explicit
``shrinkage`` overrides the rule (0 forces the full inverse, with the warning still given).

The fitted transform is saved as one safetensors file beside a collection, with the model's
fingerprint and the layer it was fitted on; :meth:`Whitening.load` refuses it for another model
or layer before anything is computed.

Example:
    >>> x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    >>> t = Whitening("demo-model", layer=3).fit(x)
    >>> y = t.apply(x)
    >>> torch.allclose(y.norm(dim=-1), torch.ones(500), atol=1e-5)
    True
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from mechmem.core.session_file import read_session, write_session

FORMAT = "mechmem.whitening/1"
MIN_STD = 1e-5


class Whitening:
    """Centre, z-score, ZCA-whiten and L2-normalise vectors of one model's layer.

    Attributes:
        model_id: the fingerprint of the model whose vectors it normalises.
        layer: the layer (and so the vectors) it was fitted on.
        whiten: ``False`` stops after the z-score (then only L2).
        min_ratio: n / d below which the covariance is shrunk (see the module docs).
        shrinkage: α used by the last fit (``None`` before a fit).
        eps: added to every eigenvalue before the inverse square root.
    """

    def __init__(
        self,
        model_id: str,
        layer: int,
        *,
        whiten: bool = True,
        min_ratio: float = 10.0,
        shrinkage: float | None = None,
        eps: float = 1e-6,
    ) -> None:
        if not model_id:
            raise ValueError("model_id: must name the model the vectors come from")
        if shrinkage is not None and not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage: must be in [0, 1] (got {shrinkage!r})")
        if min_ratio <= 0 or eps < 0:
            raise ValueError("min_ratio: must be > 0 and eps >= 0")
        self.model_id = model_id
        self.layer = int(layer)
        self.whiten = whiten
        self.min_ratio = float(min_ratio)
        self.eps = float(eps)
        self._requested_shrinkage = shrinkage
        self.shrinkage: float | None = None
        self.n_fit = 0
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        self.matrix: Tensor | None = None

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    @property
    def dim(self) -> int | None:
        return None if self.mean is None else int(self.mean.shape[0])

    def fit(self, x: Float[Tensor, "n d"]) -> Whitening:
        """Learn μ, σ and W from ``x`` (float64 internally); returns ``self``.

        Example:
            >>> Whitening("m", 0).fit(torch.randn(40, 4)).dim
            4
        """
        x = _as_matrix(x, "fit")
        n, d = x.shape
        if n < 2:
            raise ValueError(f"fit: needs at least 2 vectors, got {n}")
        x = x.to(torch.float64)
        mean = x.mean(0)
        std = x.std(0)
        std = torch.where(std < MIN_STD, torch.ones_like(std), std)
        z = (x - mean) / std
        matrix = torch.eye(d, dtype=torch.float64)
        shrinkage = 0.0
        if self.whiten:
            shrinkage = self._shrinkage(n, d)
            covariance = z.T @ z / (n - 1)
            target = covariance.diagonal().mean() * torch.eye(d, dtype=torch.float64)
            covariance = (1 - shrinkage) * covariance + shrinkage * target
            values, vectors = torch.linalg.eigh(covariance)
            values = values.clamp_min(0.0)
            matrix = vectors @ torch.diag((values + self.eps).rsqrt()) @ vectors.T
        self.mean, self.std, self.matrix = mean, std, matrix
        self.shrinkage, self.n_fit = shrinkage, n
        return self

    def _shrinkage(self, n: int, d: int) -> float:
        small = n < self.min_ratio * d
        if small:
            warnings.warn(
                f"whitening fitted on n={n} vectors of d={d} (n < {self.min_ratio:g}·d): the "
                "covariance is shrunk toward the identity (see mechmem.nnm.transform)",
                UserWarning,
                stacklevel=3,
            )
        if self._requested_shrinkage is not None:
            return self._requested_shrinkage
        return d / (d + n) if small else 0.0

    def apply(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
        """The normalised rows of ``x`` (float32, unit L2 norm), on ``x``'s device.

        Example:
            >>> t = Whitening("m", 0).fit(torch.randn(60, 3))
            >>> t.apply(torch.ones(2, 3)).shape
            torch.Size([2, 3])
        """
        if not self.fitted:
            raise ValueError("apply: the transform is not fitted; call fit() or load() first")
        x = _as_matrix(x, "apply")
        if x.shape[1] != self.dim:
            raise ValueError(f"apply: vectors have {x.shape[1]} dims, the transform {self.dim}")
        z = (x.to(torch.float64) - self.mean.to(x.device)) / self.std.to(x.device)
        y = z @ self.matrix.to(x.device)
        return torch.nn.functional.normalize(y, dim=-1).to(torch.float32)

    def check(self, model_id: str, layer: int) -> None:
        """Raise ``ValueError`` unless this transform belongs to ``model_id``'s ``layer``."""
        if model_id != self.model_id or int(layer) != self.layer:
            raise ValueError(
                f"transform: fitted for {self.model_id} layer {self.layer}, not for "
                f"{model_id} layer {layer}"
            )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted transform to ``path`` (a ``.safetensors`` file) atomically."""
        if not self.fitted:
            raise ValueError("save: the transform is not fitted")
        meta = {
            "model_id": self.model_id,
            "layer": self.layer,
            "whiten": self.whiten,
            "min_ratio": self.min_ratio,
            "shrinkage": self.shrinkage,
            "eps": self.eps,
            "n_fit": self.n_fit,
        }
        tensors = {"mean": self.mean, "std": self.std, "matrix": self.matrix}
        write_session(path, meta, tensors, format_name=FORMAT)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, model_id: str, layer: int) -> Whitening:
        """The transform saved at ``path``; ``ValueError`` if it is for another model or layer.

        Example:
            >>> Whitening.load("memory/whitening.safetensors", fp, 26)  # doctest: +SKIP
        """
        meta, tensors = read_session(path, FORMAT, what="whitening transform")
        loaded = cls(
            meta["model_id"],
            meta["layer"],
            whiten=meta["whiten"],
            min_ratio=meta["min_ratio"],
            eps=meta["eps"],
        )
        loaded.check(model_id, layer)
        loaded.mean, loaded.std, loaded.matrix = tensors["mean"], tensors["std"], tensors["matrix"]
        loaded.shrinkage, loaded.n_fit = meta["shrinkage"], meta["n_fit"]
        return loaded


def _as_matrix(x, what: str) -> Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{what}: expected a non-empty [n, d] matrix, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what}: the vectors contain NaN or infinity")
    return x
