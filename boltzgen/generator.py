"""The Boltzmann generator: a prior, a flow, and the target energy it is trained against."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from boltzgen.energies.base import Energy
from boltzgen.flows.priors import Prior
from boltzgen.flows.transforms import Bijection


@dataclass(frozen=True)
class Sample:
    """A batch of generated configurations with their densities and weights.

    ``x``: ``[n, dim]`` states (flattened nm for molecules); ``z``: ``[n, latent_dim]`` latents;
    ``log_q``: log density of the flow at ``x``; ``u``: reduced energy; ``log_w = -u - log_q``
    (unnormalized). The last three are ``[n]`` float64; ``log_w`` is -inf where ``u`` or ``log_q``
    is not finite (a non-finite energy or density means weight 0).
    """

    x: Tensor
    z: Tensor
    log_q: Tensor
    u: Tensor
    log_w: Tensor


def log_weights(u: Tensor, log_q: Tensor) -> Tensor:
    """log w = -u - log q in float64, with -inf wherever either term is not finite."""
    log_w = -u.to(torch.float64) - log_q.to(torch.float64)
    return torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -torch.inf))


class BoltzmannGenerator(nn.Module):
    """``x = flow(z)``, ``z ~ prior``; ``log q(x) = log p(z) - log|det dx/dz|``."""

    def __init__(self, prior: Prior, flow: Bijection, energy: Energy) -> None:
        super().__init__()
        self.prior = prior
        self.flow = flow
        self.energy = energy

    def sample_with_log_q(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """Differentiable draw: ``(x, z, log_q)`` with gradients to the flow parameters."""
        z = self.prior.sample(n)
        x, logdet = self.flow(z)
        return x, z, self.prior.log_prob(z) - logdet

    def log_prob(self, x: Tensor) -> Tensor:
        """log q(x), shape ``[batch]``, in the flow's dtype."""
        z, logdet = self.flow.inverse(x)
        return self.prior.log_prob(z) + logdet

    @torch.no_grad()
    def sample(self, n: int, batch_size: int = 65536) -> Sample:
        """Draw ``n`` samples in batches of at most ``batch_size`` and evaluate their weights."""
        parts = [self._sample_batch(min(batch_size, n - start)) for start in range(0, n, batch_size)]
        return Sample(*(torch.cat(tensors) for tensors in zip(*(vars(p).values() for p in parts))))

    def _sample_batch(self, n: int) -> Sample:
        x, z, log_q = self.sample_with_log_q(n)
        u = self.energy(x)
        return Sample(x=x, z=z, log_q=log_q.to(torch.float64), u=u, log_w=log_weights(u, log_q))
