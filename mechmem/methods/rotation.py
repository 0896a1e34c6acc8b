"""Norm-preserving rotation of vectors by a chosen angle toward a random direction.

For a vector x, a draw r and an angle θ: o = r − (r·x / x·x)·x is r with its x-component removed,
and x' = x cos θ + ‖x‖ (o/‖o‖) sin θ. Since o ⟂ x, ‖x'‖ = ‖x‖ and the angle between x and x' is
exactly θ (for θ in [0, π]). Zero vectors, and draws parallel to x (‖o‖ ≈ 0), are left unchanged.

``faithful`` directions draw r uniformly from [0, 1)^d, as DRµGS did; they all lie in the positive
orthant, so the rotation directions are correlated across vectors (mean pairwise cosine ≈ 0.74 in
high dimension). ``isotropic`` directions draw r from N(0, I) and are uncorrelated.

:func:`prepare` does the part that depends only on θ and r (sin θ, cos θ, r / ‖r‖), so a caller
that draws ahead, as DRµGS does once per step for all its layers, pays for it once.

Example:
    >>> x = torch.tensor([[3.0, 4.0]])
    >>> y = rotate(x, torch.tensor([0.5]), torch.tensor([[1.0, 0.0]]))
    >>> round(float(y.norm()), 5)
    5.0
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

Direction = Literal["faithful", "isotropic"]
_EPS = 1e-12
_PARALLEL = 1e-6  # sin² of the angle between x and r below this: r is within 0.06° of ±x


def draw_directions(
    shape: tuple[int, ...], mode: Direction, generator: torch.Generator, device, dtype
) -> Tensor:
    """Raw direction draws r: uniform [0, 1) (``faithful``) or standard normal (``isotropic``).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> bool((draw_directions((4, 3), "faithful", g, "cpu", torch.float32) >= 0).all())
        True
    """
    if mode == "faithful":
        return torch.rand(shape, generator=generator, device=device, dtype=dtype)
    if mode == "isotropic":
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    raise ValueError(f"direction: must be 'faithful' or 'isotropic', got {mode!r}")


class Rotation(NamedTuple):
    """Angles and draws made ready once, to rotate by later (:func:`prepare`): sin θ and cos θ
    ``[..., 1]`` and the unit draws r / ‖r‖ ``[..., d]``. Indexing each field alike
    (``Rotation(*(f[i] for f in rotation))``) keeps it a rotation."""

    sin: Tensor
    cos: Tensor
    unit: Tensor


def prepare(theta: Float[Tensor, "*n"], r: Float[Tensor, "*n d"]) -> Rotation:
    """The part of a rotation that does not depend on the vectors rotated.

    Example:
        >>> prepare(torch.zeros(2), torch.ones(2, 4)).unit.tolist()
        [[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]]
    """
    theta = theta.unsqueeze(-1)
    r_norm = torch.linalg.vector_norm(r, dim=-1, keepdim=True)
    return Rotation(theta.sin(), theta.cos(), r * r_norm.clamp_min(_EPS).reciprocal())


def rotate(
    x: Float[Tensor, "n d"], theta: Float[Tensor, " n"], r: Float[Tensor, "n d"]
) -> Float[Tensor, "n d"]:
    """Rotate each row of ``x`` by ``theta`` radians toward its draw ``r`` (norm preserved).

    Example:
        >>> rotate(torch.zeros(1, 3), torch.ones(1), torch.ones(1, 3)).tolist()
        [[0.0, 0.0, 0.0]]
    """
    return rotate_prepared(x, prepare(theta.to(x.dtype), r))


def rotate_prepared(x: Float[Tensor, "n d"], rotation: Rotation) -> Float[Tensor, "n d"]:
    """:func:`rotate` with the angles and draws prepared beforehand (:func:`prepare`).

    Example:
        >>> rotate_prepared(torch.ones(1, 2), prepare(torch.zeros(1), torch.ones(1, 2))).tolist()
        [[1.0, 1.0]]
    """
    if x.dtype == torch.float16:  # x·x overflows fp16 once ‖x‖ > 255
        return rotate_prepared(x.float(), Rotation(*(f.float() for f in rotation))).half()
    # With u = r / ‖r‖, xx = x·x, xu = x·u and D = xx − xu² (= xx ‖o‖² for o = u − (xu / xx) x):
    # x' = x cos θ + ‖x‖ sin θ o / ‖o‖ = (cos θ − q xu) x + q xx u, where q = sin θ / √D.
    # Two dot products, then a dozen small kernels over the vectors.
    sin, cos, unit = rotation
    xx = torch.linalg.vecdot(x, x).unsqueeze(-1)
    xu = torch.linalg.vecdot(x, unit).unsqueeze(-1)
    spread = torch.addcmul(xx, xu, xu, value=-1)
    q = sin * spread.clamp_min(_EPS).rsqrt()
    rotated = torch.addcmul(torch.addcmul(cos, q, xu, value=-1) * x, q * xx, unit)
    # D / xx is sin² of the angle between x and r: a zero vector (D = xx = 0) and a draw
    # (nearly) parallel to x leave x as it was
    return torch.where(spread > _PARALLEL * xx, rotated, x)
