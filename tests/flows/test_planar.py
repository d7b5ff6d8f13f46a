"""Planar and radial flows: the invertibility constraints hold for any parameters; no inverse."""

from __future__ import annotations

import pytest
import torch

from boltzgen.flows.capabilities import NoInverseError
from boltzgen.flows.planar import PlanarFlow, RadialFlow

DIM = 4


def test_planar_constraint_holds_for_adversarial_parameters():
    layer = PlanarFlow(DIM)
    with torch.no_grad():
        layer.w.copy_(torch.tensor([1.0, 2.0, -1.0, 0.5]))
        layer.u.copy_(-10.0 * layer.w)  # w^T u = -62.5, far below -1
    assert layer.w.dot(layer.u_hat()) > -1
    z = torch.randn(500, DIM) * 3
    _, logdet = layer(z)
    assert torch.isfinite(logdet).all()


def test_planar_is_injective_along_w():
    """Along w the map is x.w = a + (w.u_hat) tanh(a + b), strictly increasing in a = w.z."""
    layer = PlanarFlow(DIM, identity_init=False)
    with torch.no_grad():
        layer.u.copy_(-5.0 * layer.w / layer.w.dot(layer.w))
    a = torch.linspace(-10, 10, 2001)
    z = a[:, None] * layer.w / layer.w.dot(layer.w)
    x, _ = layer(z)
    assert ((x @ layer.w).diff() > 0).all()


def test_radial_constraint_holds_for_adversarial_parameters():
    layer = RadialFlow(DIM)
    with torch.no_grad():
        layer.beta_raw.fill_(-30.0)  # beta -> -alpha, the edge of invertibility
        layer.alpha_raw.fill_(2.0)
    z = layer.z0.detach() + torch.randn(500, DIM) * torch.logspace(-4, 1, 500)[:, None]
    _, logdet = layer(z)
    assert torch.isfinite(logdet).all()
    # Radially, r' = r (1 + beta / (alpha + r)) is increasing in r: the map is injective.
    r = torch.linspace(0, 20, 4001)
    alpha = torch.nn.functional.softplus(layer.alpha_raw)
    beta = -alpha + torch.nn.functional.softplus(layer.beta_raw)
    assert ((r * (1 + beta / (alpha + r))).diff() > 0).all()


@pytest.mark.parametrize("cls", [PlanarFlow, RadialFlow])
def test_no_inverse_is_refused_with_the_reason(cls):
    layer = cls(DIM)
    assert layer.capabilities.density == "none" and not layer.capabilities.data_density
    with pytest.raises(NoInverseError, match="cannot evaluate the density of external data"):
        layer.inverse(torch.randn(2, DIM))
