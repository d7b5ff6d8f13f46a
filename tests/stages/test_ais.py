"""AIS in the flow's latent space: log-weights against exact normalizing constants of Gaussians,
step-size adaptation, and non-finite energies (weight 0, counted, never replaced)."""

from __future__ import annotations

import math

import pytest
import torch

from boltzgen.stages.ais import LatentAIS
from tests.test_training import GaussianEnergy, InfWhereEnergy, make_generator

MU, SIGMA = (0.5, -0.3), 0.8


def exact_log_z_p_squared_over_q(mu: tuple[float, ...], sigma: float) -> float:
    """log ∫ p(x)^2 / q(x) dx for p = exp(-|x - mu|^2 / (2 sigma^2)) (unnormalized) and q = N(0, I)."""
    a = 1 / sigma**2 - 0.5  # the integrand is exp(-a x^2 + b x + c) sqrt(2 pi) per dimension
    total = 0.0
    for m in mu:
        b, c = 2 * m / sigma**2, -(m**2) / sigma**2
        total += 0.5 * math.log(2 * math.pi) + 0.5 * math.log(math.pi / a) + b * b / (4 * a) + c
    return total


@pytest.fixture
def generator():
    """A small real_nvp flow at its identity initialization: q = N(0, I) exactly."""
    return make_generator(GaussianEnergy(mu=MU, sigma=SIGMA), blocks=2, hidden=(8,))


@pytest.mark.parametrize(("n_intermediate", "p_power", "q_power"), [(0, 1, 0), (3, 1, 0), (0, 2, -1), (3, 2, -1)],
                         ids=["IS-to-p", "AIS-to-p", "IS-to-p2/q", "AIS-to-p2/q"])
def test_ais_weights_estimate_the_exact_normalizing_constant(generator, n_intermediate, p_power, q_power):
    """E[w] = ∫ g exactly for g = p (log Z of the Gaussian) and g = p^2/q (FAB's target), with or
    without HMC transitions; the estimate is within 4 of its standard errors."""
    ais = LatentAIS(generator, n_intermediate, n_leapfrog=3, step_size=0.5, adapt=False, p_power=p_power,
                    q_power=q_power)
    result = ais.run(40_000)
    log_w = result.log_w
    n = log_w.numel()
    estimate = float(torch.logsumexp(log_w, 0) - math.log(n))
    n_eff = float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)))
    stderr = math.sqrt(1 / n_eff - 1 / n)
    exact = GaussianEnergy(mu=MU, sigma=SIGMA).log_z if p_power == 1 else exact_log_z_p_squared_over_q(MU, SIGMA)
    assert abs(estimate - exact) < 4 * stderr + 1e-3, (estimate, exact, stderr)
    assert result.n_nonfinite == 0 and len(result.accept) == n_intermediate
    # plain importance weights of the starting flow samples toward p: log w = -u - log q
    assert float(torch.logsumexp(result.log_w_flow, 0) - math.log(n)) == pytest.approx(
        GaussianEnergy(mu=MU, sigma=SIGMA).log_z, abs=0.05)


def test_transitions_improve_the_weights_and_are_counted(generator):
    energy = generator.energy
    plain = LatentAIS(generator, 0, adapt=False).run(4000)
    before = energy.evaluations
    annealed = LatentAIS(generator, 4, n_leapfrog=5, step_size=0.4, adapt=False).run(4000)
    assert energy.evaluations - before == 4000 * (1 + 4 * 5)  # counted through AIS, one per point

    def ess(log_w):
        return float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))) / log_w.numel()

    assert ess(annealed.log_w) > ess(plain.log_w) + 0.1
    assert all(0.3 < a <= 1.0 for a in annealed.accept)


def test_step_sizes_adapt_toward_the_target_acceptance_and_round_trip(generator):
    ais = LatentAIS(generator, 2, n_leapfrog=4, step_size=3.0, target_accept=0.65)
    first = ais.run(512)
    for _ in range(30):
        last = ais.run(512)
    assert max(first.accept) < 0.5 and all(a > 0.45 for a in last.accept)
    assert all(s < 3.0 for s in ais.step_sizes)
    other = LatentAIS(generator, 2, n_leapfrog=4, step_size=0.1)
    other.load_state_dict(ais.state_dict())
    assert other.step_sizes == ais.step_sizes


def test_nonfinite_energies_are_weight_zero_and_counted_never_replaced():
    """u = +inf for x0 > 1: starting samples there get weight 0 (log w = -inf, not NaN or a number),
    HMC trajectories that enter it are rejected, and both are counted."""
    energy = InfWhereEnergy(threshold=1.0)
    generator = make_generator(energy, blocks=2, hidden=(8,))
    result = LatentAIS(generator, 2, n_leapfrog=5, step_size=0.8, adapt=False).run(3000)
    start_bad = ~torch.isfinite(result.log_w_flow)
    assert 300 < int(start_bad.sum()) < 700  # P(x0 > 1) = 0.16 under q = N(0, I)
    assert torch.all(torch.isneginf(result.log_w[start_bad])) and not torch.isnan(result.log_w).any()
    assert torch.all(result.x[~start_bad, 0] <= 1.0)  # no chain moved into the forbidden region
    assert result.n_nonfinite > int(start_bad.sum())  # plus the rejected trajectories
