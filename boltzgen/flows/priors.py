"""Latent distributions: standard normal on ordinary dimensions, uniform on circular ones."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Prior(nn.Module):
    """A factorized latent density of dimension ``dim``.

    Dimensions flagged in ``circular`` are uniform on [-pi, pi); all others are standard normal.
    ``log_prob`` returns ``[batch]`` in the dtype of its input; ``sample`` draws ``[n, dim]`` in the
    dtype and on the device of the registered buffers (move the prior with ``.to``).
    """

    def __init__(self, dim: int, circular: Tensor | None = None) -> None:
        super().__init__()
        self.dim = dim
        mask = torch.zeros(dim, dtype=torch.bool) if circular is None else circular.to(torch.bool).clone()
        if mask.shape != (dim,):
            raise ValueError(f"circular mask must have shape [{dim}], got {list(mask.shape)}")
        self.register_buffer("circular", mask)
        self.register_buffer("_dtype_anchor", torch.zeros(()))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, self.dim, dtype=self._dtype_anchor.dtype, device=self._dtype_anchor.device, generator=generator)
        if self.circular.any():
            u = torch.rand(n, self.dim, dtype=z.dtype, device=z.device, generator=generator)
            z = torch.where(self.circular, (2 * u - 1) * math.pi, z)
        return z

    def log_prob(self, z: Tensor) -> Tensor:
        gauss = -0.5 * z**2 - 0.5 * math.log(2 * math.pi)
        inside = (z >= -math.pi) & (z <= math.pi)
        uniform = torch.where(inside, torch.full_like(z, -math.log(2 * math.pi)), torch.full_like(z, -math.inf))
        return torch.where(self.circular, uniform, gauss).sum(dim=-1)
