"""Sylvester flows (van den Berg et al. 2018) and the Householder flow (Tomczak & Welling 2016).

A Sylvester layer maps ``x = z + Q R tanh(R_tilde Q^T z + b)`` with ``Q`` (``[dim, m]``) orthonormal
columns and ``R``, ``R_tilde`` (``[m, m]``) upper triangular. By Sylvester's determinant identity,
``log|det| = sum_i log(1 + R_ii R_tilde_ii tanh'(...)_i)``, exact and in ``O(m)``; the diagonals are
``tanh`` of free parameters, so ``R_ii R_tilde_ii > -1`` and the map is invertible. It has no
closed-form inverse (``capabilities.density == "none"``): like planar flows, it serves reverse-KL
training. Three ways to get ``Q``:

- ``orthogonal``: ``Q`` from the QR decomposition of a free ``[dim, m]`` matrix (``m <= dim``);
- ``householder``: ``Q`` a product of ``reflections`` Householder reflections (``m = dim``);
- ``triangular``: ``Q`` the identity or the reversal permutation, alternating by layer (``m = dim``).

:class:`HouseholderLinear` is the Householder flow as a layer of its own: ``x = H_k ... H_1 z``, an
orthogonal map, log-det 0, inverse by the transpose. It mixes dims, so it must not be applied to
circular dims; neither may Sylvester layers.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from boltzgen.flows.planar import _NoInverse
from boltzgen.flows.transforms import Bijection

Variant = Literal["orthogonal", "householder", "triangular"]
VARIANTS = ("orthogonal", "householder", "triangular")


def householder_product(vectors: Tensor) -> Tensor:
    """``H_k ... H_1`` ``[dim, dim]`` with ``H_i = I - 2 v_i v_i^T / |v_i|^2``, ``vectors`` ``[k, dim]``."""
    dim = vectors.shape[1]
    q = torch.eye(dim, dtype=vectors.dtype, device=vectors.device)
    for v in vectors:
        q = q - 2.0 * torch.outer(v, v @ q) / v.dot(v)
    return q


class HouseholderLinear(Bijection):
    """The Householder flow: ``x = z H^T`` with ``H = H_k ... H_1``, ``k = reflections`` random
    reflections at the start (a random orthogonal map); log-det 0."""

    def __init__(self, dim: int, reflections: int) -> None:
        super().__init__()
        if reflections < 1:
            raise ValueError(f"reflections must be at least 1, got {reflections}")
        self.dim = dim
        self.vectors = nn.Parameter(torch.randn(reflections, dim))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z @ householder_product(self.vectors).T, z.new_zeros(z.shape[0])

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x @ householder_product(self.vectors), x.new_zeros(x.shape[0])


class SylvesterFlow(_NoInverse):
    """One Sylvester layer over ``dim`` dims (see the module docstring).

    ``variant`` picks ``Q``; ``m`` (orthogonal only, default ``dim``) its number of columns;
    ``reflections`` (householder only, default ``dim``) the number of reflections; ``flip``
    (triangular only) uses the reversal permutation instead of the identity. With ``identity_init``
    ``R`` starts at 0, so the layer starts as the identity.
    """

    def __init__(self, dim: int, variant: Variant = "orthogonal", m: int | None = None,
                 reflections: int | None = None, flip: bool = False, identity_init: bool = True) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown Sylvester variant {variant!r}; use one of {', '.join(VARIANTS)}")
        m = dim if variant != "orthogonal" or m is None else m
        if not 1 <= m <= dim:
            raise ValueError(f"Sylvester m must lie in 1..{dim}, got {m}")
        self.dim, self.m, self.variant = dim, m, variant
        scale = 1.0 / math.sqrt(m)
        self.r_upper = nn.Parameter(torch.zeros(m, m) if identity_init else torch.randn(m, m) * scale)
        self.r_diag = nn.Parameter(torch.zeros(m) if identity_init else torch.randn(m) * scale)
        self.rt_upper = nn.Parameter(torch.randn(m, m) * scale)
        self.rt_diag = nn.Parameter(torch.randn(m) * scale)
        self.b = nn.Parameter(torch.zeros(m))
        self.register_buffer("upper", torch.triu(torch.ones(m, m), diagonal=1))
        if variant == "orthogonal":
            self.q_raw = nn.Parameter(torch.randn(dim, m) * scale)
        elif variant == "householder":
            self.q_vectors = nn.Parameter(torch.randn(reflections or dim, dim))
        else:
            perm = torch.arange(dim).flip(0) if flip else torch.arange(dim)
            self.register_buffer("perm", perm)

    def q(self) -> Tensor:
        """``Q`` ``[dim, m]`` with orthonormal columns."""
        if self.variant == "orthogonal":
            return torch.linalg.qr(self.q_raw, mode="reduced")[0]
        if self.variant == "householder":
            return householder_product(self.q_vectors)
        eye = torch.eye(self.dim, dtype=self.b.dtype, device=self.b.device)
        return eye[:, self.perm]

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        q = self.q()
        r_diag, rt_diag = torch.tanh(self.r_diag), torch.tanh(self.rt_diag)
        r = self.r_upper * self.upper + torch.diag(r_diag)
        r_tilde = self.rt_upper * self.upper + torch.diag(rt_diag)
        pre = z @ q @ r_tilde.T + self.b  # [batch, m]
        a = torch.tanh(pre)
        x = z + a @ r.T @ q.T
        # 1 + R_ii R~_ii (1 - a_i^2) > 0 because |R_ii R~_ii| < 1 and 0 < 1 - a^2 <= 1.
        logdet = torch.log1p(r_diag * rt_diag * (1 - a * a)).sum(-1)
        return x, logdet
