"""Residual flows: the log-det estimators against the exact log-det, statistically; the Lipschitz
bound; the fixed-point inverse; the noise measurement that `sample` reports."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from boltzgen.flows.priors import Prior
from boltzgen.flows.residual import ContractiveMLP, ResidualBlock, exact_log_dets, measure_log_q_noise
from boltzgen.flows.transforms import Compose

DIM = 5
#: estimates per point: the standard error of a mean is then ~1/20 of one estimate's spread
REPEATS = 400
#: |mean - expected| / standard error above this fails; over 16 points a correct estimator passes
#: with probability ~0.999 (and the seed is fixed)
Z_LIMIT = 4.5


def _strong_block(estimator: str, n_terms: int = 5) -> ResidualBlock:
    """A block with a large Jacobian, so that truncation bias is visible.

    g(z) = B lipswish(A z + 3) with A = U diag(s) V^T, B = V diag(+-s) U^T and s in [0.5, 0.78]: the
    activation's slope is ~0.99 at the shifted pre-activations, so J ~ V diag(+-0.99 s^2) V^T, a
    symmetric non-diagonal matrix with eigenvalues of both signs and magnitudes 0.25-0.6. Its spectral
    radius stays below sqrt(1 - p) = 0.71, so the roulette estimator's variance is finite.
    """
    block = ResidualBlock(DIM, [DIM], lipschitz=0.95, estimator=estimator, n_terms=n_terms, fixed_point_tol=1e-13)
    generator = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(DIM, DIM, generator=generator))[0]
    v = torch.linalg.qr(torch.randn(DIM, DIM, generator=generator))[0]
    s = torch.linspace(0.5, 0.78, DIM)
    signs = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0])
    with torch.no_grad():
        block.net.linears[0].weight.copy_(u @ torch.diag(s) @ v.T)
        block.net.linears[1].weight.copy_(v @ torch.diag(signs * s) @ u.T)
        block.net.linears[0].bias.fill_(3.0)
        block.net.linears[1].bias.zero_()
    return block


def _jacobian_of_g(block: ResidualBlock, z: Tensor) -> Tensor:
    weights = block.net.normalized_weights()
    return torch.stack([torch.autograd.functional.jacobian(lambda v: block.net.apply(v[None], weights)[0], p)
                        for p in z])


def _exact(block: ResidualBlock, z: Tensor) -> Tensor:
    """log|det(I + J_g)| from the autograd Jacobian of the whole block."""
    jac = torch.stack([torch.autograd.functional.jacobian(lambda v: block(v[None])[0][0], p) for p in z])
    return torch.linalg.slogdet(jac).logabsdet


def _truncated_series(block: ResidualBlock, z: Tensor, n_terms: int) -> Tensor:
    """sum_{k <= n} (-1)^(k+1) tr(J^k) / k from the autograd Jacobian: what the power series estimates."""
    jac = _jacobian_of_g(block, z)
    power, total = torch.eye(DIM).expand_as(jac), torch.zeros(len(z))
    for k in range(1, n_terms + 1):
        power = power @ jac
        total = total + (-1) ** (k + 1) / k * torch.diagonal(power, dim1=1, dim2=2).sum(-1)
    return total


def _z_scores(block: ResidualBlock, z: Tensor, expected: Tensor, inverse: bool = False) -> Tensor:
    """(mean of REPEATS estimates - expected) / standard error, per point."""
    with torch.no_grad():
        if inverse:
            x = block(z)[0]
            estimates = torch.stack([-block.inverse(x)[1] for _ in range(REPEATS)])
        else:
            estimates = torch.stack([block(z)[1] for _ in range(REPEATS)])
    return (estimates.mean(0) - expected) / (estimates.std(0) / math.sqrt(REPEATS))


@pytest.fixture
def points() -> Tensor:
    return torch.randn(16, DIM)


def test_strong_block_has_a_large_jacobian(points):
    """The statistical tests below have power only if the higher terms of the series matter."""
    block = _strong_block("exact")
    exact = _exact(block, points)
    first_term = _truncated_series(block, points, 1)
    assert (exact - first_term).abs().mean() > 0.2


def test_roulette_estimate_is_unbiased_in_both_directions(points):
    block = _strong_block("roulette")
    exact = _exact(block, points)
    assert _z_scores(block, points, exact).abs().max() < Z_LIMIT
    assert _z_scores(block, points, exact, inverse=True).abs().max() < Z_LIMIT


def test_statistical_test_detects_a_biased_estimator(points):
    """The same test fails for the power series cut after one term: it can fail."""
    block = _strong_block("power_series", n_terms=1)
    assert (_z_scores(block, points, _exact(block, points)).abs() > Z_LIMIT).all()


def test_power_series_estimates_its_truncated_series_and_the_bias_is_bounded(points):
    n_terms, lipschitz = 4, 0.95
    block = _strong_block("power_series", n_terms=n_terms)
    truncated = _truncated_series(block, points, n_terms)
    assert _z_scores(block, points, truncated).abs().max() < Z_LIMIT
    bias_bound = DIM * lipschitz ** (n_terms + 1) / ((n_terms + 1) * (1 - lipschitz))
    assert (truncated - _exact(block, points)).abs().max() < bias_bound


def test_estimates_vary_between_calls_and_the_exact_mode_does_not(points):
    block = _strong_block("roulette")
    with torch.no_grad():
        assert (block(points)[1] - block(points)[1]).abs().max() > 1e-3
        with exact_log_dets(block):
            torch.testing.assert_close(block(points)[1], block(points)[1], atol=0, rtol=0)
    assert block.estimator == "roulette"  # restored after the block


@pytest.mark.parametrize("estimator", ["power_series", "roulette"])
def test_estimated_logdet_gradients_reach_every_parameter(estimator, points):
    """Gradients through the estimator itself (the contract test runs the exact mode)."""
    block = _strong_block(estimator)
    for direction in (block.forward, block.inverse):
        block.zero_grad()
        out, logdet = direction(points)
        (out.square().sum() + logdet.sum()).backward()
        for name, p in block.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_lipschitz_bound_holds_for_any_weights():
    net = ContractiveMLP(DIM, [32, 32], lipschitz=0.7)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(10.0)
    weights = net.normalized_weights()
    a, b = torch.randn(2000, DIM), torch.randn(2000, DIM) * 0.1
    ratio = (net.apply(a + b, weights) - net.apply(a, weights)).norm(dim=-1) / b.norm(dim=-1)
    assert ratio.max() <= 0.7 + 1e-12
    assert ratio.max() > 0.01  # not met trivially by a vanishing network


def test_fixed_point_inverse_converges_in_few_iterations_and_reports_them(points):
    block = _strong_block("exact")
    x, _ = block(points)
    z, _ = block.inverse(x)
    torch.testing.assert_close(z, points, atol=1e-11, rtol=0)
    # The error shrinks at least by the Lipschitz constant per iteration: log(1e-13) / log(0.95) ~ 580.
    assert 1 < block.last_iterations < 580


def test_measure_log_q_noise_sees_the_estimator_and_its_bias():
    torch.manual_seed(1)
    flow = Compose([_strong_block("power_series", n_terms=1), _strong_block("roulette")])
    noise = measure_log_q_noise(Prior(DIM), flow, n_points=64, n_repeats=12)
    assert noise.n_points == 64 and noise.n_repeats == 12
    assert 0.0 < noise.std <= noise.std_max
    # The one-term series misses -tr(J^2)/2 + ..., a bias of ~0.2-0.5 per point: measured, not hidden.
    assert noise.bias is not None and abs(noise.bias) > 4 * noise.bias_stderr
    exact_flow = Compose([_strong_block("exact")])
    exact_noise = measure_log_q_noise(Prior(DIM), exact_flow, n_points=16, n_repeats=3)
    assert exact_noise.std == 0.0 and abs(exact_noise.bias) < 1e-12
