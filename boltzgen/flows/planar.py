"""Planar and radial flows (Rezende & Mohamed 2015): an analytic log-det, and no inverse.

- **Planar**: ``x = z + u_hat tanh(w^T z + b)``, ``log|det| = log(1 + u_hat^T w tanh'(w^T z + b))``.
  ``u_hat = u + (m(w^T u) - w^T u) w / |w|^2`` with ``m(a) = -1 + max(softplus(a), 1e-6)`` keeps
  ``w^T u_hat > -1``, so the map is invertible.
- **Radial**: ``x = z + beta (z - z0) / (alpha + r)``, ``r = |z - z0|``, ``alpha > 0`` and
  ``beta >= -alpha`` (by softplus), ``log|det| = (dim - 1) log(1 + beta h) + log(1 + beta h - beta r h^2)``
  with ``h = 1 / (alpha + r)``.

Both are invertible but have no closed-form inverse, so they cannot evaluate the density of a state
they did not draw (``capabilities.density == "none"``, and ``inverse`` raises
:class:`~boltzgen.flows.capabilities.NoInverseError`): they serve variational inference and
reverse-KL training, not maximum likelihood on data. Each layer transforms all dims together, so
none may be circular. With ``identity_init`` a layer starts as the exact identity.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from boltzgen.flows.capabilities import Capabilities, NoInverseError
from boltzgen.flows.transforms import Bijection

#: softplus(a) = 1 here, so m(w^T u) = 0 and u_hat = 0 (planar) or beta = 0 (radial): the identity
_SOFTPLUS_ONE = math.log(math.e - 1.0)
#: the smallest 1 + w^T u_hat of a planar layer, so that its log-det stays finite
_MIN_SLOPE = 1e-6

NO_INVERSE = Capabilities(sampling="one_pass", density="none")


class _NoInverse(Bijection):
    """A bijection whose inverse has no closed form (``density == "none"``)."""

    capabilities = NO_INVERSE

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NoInverseError(f"{type(self).__name__} has no inverse: it cannot evaluate the density of external "
                             "data; train it by reverse KL")


class PlanarFlow(_NoInverse):
    """One planar layer over ``dim`` dims (see the module docstring)."""

    def __init__(self, dim: int, identity_init: bool = True) -> None:
        super().__init__()
        self.dim = dim
        w = torch.randn(dim) / math.sqrt(dim)
        u = _SOFTPLUS_ONE * w / w.dot(w) if identity_init else torch.randn(dim) / math.sqrt(dim)
        self.w = nn.Parameter(w)
        self.u = nn.Parameter(u)
        self.b = nn.Parameter(torch.zeros(()))

    def u_hat(self) -> Tensor:
        """``u`` projected so that ``w^T u_hat > -1`` (the layer is invertible)."""
        wu = self.w.dot(self.u)
        # softplus floored so that w^T u_hat >= -1 + 1e-6 in floating point too (softplus(-60) underflows).
        m = nn.functional.softplus(wu).clamp_min(_MIN_SLOPE) - 1.0
        return self.u + (m - wu) * self.w / self.w.dot(self.w)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        u_hat = self.u_hat()
        a = torch.tanh(z @ self.w + self.b)
        x = z + a[:, None] * u_hat
        # 1 + (1 - a^2) w^T u_hat > 0 because w^T u_hat > -1 and 0 < 1 - a^2 <= 1.
        return x, torch.log1p((1 - a * a) * self.w.dot(u_hat))


class RadialFlow(_NoInverse):
    """One radial layer over ``dim`` dims around a learned centre ``z0`` (see the module docstring)."""

    def __init__(self, dim: int, identity_init: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.z0 = nn.Parameter(torch.randn(dim) * 0.1)
        self.alpha_raw = nn.Parameter(torch.zeros(()))
        # beta = -alpha + softplus(beta_raw); identity when softplus(beta_raw) = alpha = softplus(0).
        start = 0.0 if identity_init else 1.0
        self.beta_raw = nn.Parameter(torch.full((), start))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        alpha = nn.functional.softplus(self.alpha_raw)
        beta = -alpha + nn.functional.softplus(self.beta_raw)
        d = z - self.z0
        r = torch.linalg.vector_norm(d, dim=-1)
        h = 1.0 / (alpha + r)
        x = z + (beta * h)[:, None] * d
        logdet = (self.dim - 1) * torch.log1p(beta * h) + torch.log1p(beta * h - beta * r * h * h)
        return x, logdet
