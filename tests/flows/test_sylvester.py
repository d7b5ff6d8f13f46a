"""Sylvester flows and the Householder layer: orthogonality of Q, the determinant identity's constraint."""

from __future__ import annotations

import pytest
import torch

from boltzgen.flows.sylvester import HouseholderLinear, SylvesterFlow, householder_product

DIM = 6


@pytest.mark.parametrize("variant, m", [("orthogonal", 3), ("orthogonal", DIM), ("householder", DIM),
                                        ("triangular", DIM)])
def test_q_has_orthonormal_columns(variant, m):
    layer = SylvesterFlow(DIM, variant, m=m if variant == "orthogonal" else None, reflections=2)
    q = layer.q()
    assert q.shape == (DIM, m)
    torch.testing.assert_close(q.T @ q, torch.eye(m), atol=1e-12, rtol=0)


def test_triangular_variant_alternates_identity_and_reversal():
    plain, flipped = SylvesterFlow(DIM, "triangular"), SylvesterFlow(DIM, "triangular", flip=True)
    torch.testing.assert_close(plain.q(), torch.eye(DIM), atol=0, rtol=0)
    torch.testing.assert_close(flipped.q(), torch.eye(DIM).flip(1), atol=0, rtol=0)


def test_sylvester_stays_invertible_for_extreme_diagonals():
    """R_ii R~_ii = tanh(.) tanh(.) > -1 whatever the raw parameters: the log-det stays finite."""
    layer = SylvesterFlow(DIM, "orthogonal", identity_init=False)
    with torch.no_grad():
        layer.r_diag.fill_(50.0)
        layer.rt_diag.fill_(-50.0)
        layer.b.fill_(0.0)
    _, logdet = layer(torch.randn(200, DIM) * 1e-3)  # tanh' ~ 1 near 0: the edge of the constraint
    assert torch.isfinite(logdet).all()


def test_householder_product_is_orthogonal_and_layer_inverts_by_transpose():
    vectors = torch.randn(4, DIM)
    h = householder_product(vectors)
    torch.testing.assert_close(h @ h.T, torch.eye(DIM), atol=1e-12, rtol=0)
    layer = HouseholderLinear(DIM, 4)
    z = torch.randn(5, DIM)
    x, logdet = layer(z)
    torch.testing.assert_close(layer.inverse(x)[0], z, atol=1e-12, rtol=0)
    assert (logdet == 0).all()
    with pytest.raises(ValueError, match="at least 1"):
        HouseholderLinear(DIM, 0)
