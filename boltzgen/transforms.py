"""Bijections: invertible maps with exact log-determinants, composed into flows.

Convention (DESIGN.md): ``forward(z) -> (x, logdet)`` maps latent to configuration (the sampling
direction); ``inverse(x) -> (z, logdet)`` is the density direction. ``logdet`` is
``log|det dx/dz|`` for forward and ``log|det dz/dx|`` for inverse, shape ``[batch]``, from the same
pass, so that the forward and inverse log-dets of the same point sum to 0.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Bijection(nn.Module, ABC):
    """An invertible map between ``[batch, dim_in]`` latents and ``[batch, dim_out]`` states."""

    @abstractmethod
    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Latent -> state. Returns ``(x, log|det dx/dz|)``, log-det of shape ``[batch]``."""

    @abstractmethod
    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """State -> latent. Returns ``(z, log|det dz/dx|)``, log-det of shape ``[batch]``."""


class Compose(Bijection):
    """``forward`` applies the layers in order; ``inverse`` applies them in reverse."""

    def __init__(self, layers: Sequence[Bijection]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        logdet = z.new_zeros(z.shape[0])
        for layer in self.layers:
            z, ld = layer(z)
            logdet = logdet + ld
        return z, logdet

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in reversed(self.layers):
            x, ld = layer.inverse(x)
            logdet = logdet + ld
        return x, logdet


class Inverse(Bijection):
    """Swaps the directions of a bijection."""

    def __init__(self, bijection: Bijection) -> None:
        super().__init__()
        self.bijection = bijection

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.bijection.inverse(z)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.bijection(x)
