"""Latent distributions: standard normal or standard logistic on ordinary dimensions, uniform on circular ones."""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor, nn

Base = Literal["normal", "logistic"]
BASES: tuple[str, ...] = get_args(Base)
#: the smallest uniform draw behind a logistic latent: torch.rand can return exactly 0 (never 1)
_LOGISTIC_U_MIN = 2.0**-60


class Prior(nn.Module):
    """A factorized latent density of dimension ``dim``.

    Dimensions flagged in ``circular`` are uniform on [-pi, pi); all others follow ``base``: the
    standard normal, or the standard logistic ``p(z) = e^-z / (1 + e^-z)^2`` (variance pi^2 / 3),
    whose log density falls linearly, not quadratically, in the tails. A volume-preserving flow
    (``nice``) can only rearrange its prior's mass, so the prior's tails are what it gives a narrow or
    distant well (the logistic prior of Dinh et al. 2014). ``log_prob`` returns ``[batch]`` in the
    dtype of its input; ``sample`` draws ``[n, dim]`` in the dtype and on the device of the
    registered buffers (move the prior with ``.to``).
    """

    def __init__(self, dim: int, circular: Tensor | None = None, base: Base = "normal") -> None:
        super().__init__()
        if base not in BASES:
            raise ValueError(f"unknown prior {base!r}; use one of {', '.join(BASES)}")
        self.dim = dim
        self.base = base
        mask = torch.zeros(dim, dtype=torch.bool) if circular is None else circular.to(torch.bool).clone()
        if mask.shape != (dim,):
            raise ValueError(f"circular mask must have shape [{dim}], got {list(mask.shape)}")
        self.register_buffer("circular", mask)
        self.register_buffer("_dtype_anchor", torch.zeros(()))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        dtype, device = self._dtype_anchor.dtype, self._dtype_anchor.device
        if self.base == "normal":
            z = torch.randn(n, self.dim, dtype=dtype, device=device, generator=generator)
        else:
            u = torch.rand(n, self.dim, dtype=torch.float64, device=device, generator=generator)
            u = u.clamp(min=_LOGISTIC_U_MIN)
            z = (torch.log(u) - torch.log1p(-u)).to(dtype)
        if self.circular.any():
            u = torch.rand(n, self.dim, dtype=z.dtype, device=z.device, generator=generator)
            z = torch.where(self.circular, (2 * u - 1) * math.pi, z)
        return z

    def log_prob(self, z: Tensor) -> Tensor:
        if self.base == "normal":
            ordinary = -0.5 * z**2 - 0.5 * math.log(2 * math.pi)
        else:
            ordinary = -z.abs() - 2 * torch.log1p(torch.exp(-z.abs()))
        inside = (z >= -math.pi) & (z <= math.pi)
        uniform = torch.where(inside, torch.full_like(z, -math.log(2 * math.pi)), torch.full_like(z, -math.inf))
        return torch.where(self.circular, uniform, ordinary).sum(dim=-1)
