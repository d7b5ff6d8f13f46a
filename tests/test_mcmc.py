"""Tests of boltzgen.mcmc and boltzgen.moves against targets whose moments are known analytically
or by quadrature.

Monte Carlo errors: the chains are independent, so the standard error of a chain-averaged
observable is the standard deviation of the per-chain time averages over sqrt(n_chains); it needs no
autocorrelation time.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import i0, i1
from scipy.stats import norm
from torch import Tensor

from boltzgen.energies.base import Energy
from boltzgen.generator import BoltzmannGenerator
from boltzgen.flows.priors import Prior
from boltzgen.flows.transforms import Bijection
from boltzgen.mcmc import initial_state, resample_starts, run_chains
from boltzgen.moves import (
    CartesianMALA,
    ChainState,
    Cycle,
    IndependenceMetropolis,
    LatentHMC,
    LatentMALA,
    Move,
    _log_gaussian_kernel,
)

N_CHAINS = 512
N_SIGMA = 5.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run on one intra-op thread: the tensors here are tiny, and on a shared 2-core machine torch's
    thread pool spends far longer synchronizing than computing (measured: 25 ms vs 0.01 ms per exp)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------ test-local flows and energies


class Affine(Bijection):
    """x = a * z + b elementwise; a, b are ``[dim]``."""

    def __init__(self, a: list[float], b: list[float]) -> None:
        super().__init__()
        self.register_buffer("a", torch.tensor(a))
        self.register_buffer("b", torch.tensor(b))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.a * z + self.b, torch.log(self.a.abs()).sum().expand(z.shape[0])

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return (x - self.b) / self.a, -torch.log(self.a.abs()).sum().expand(x.shape[0])


class SinhAffine(Bijection):
    """x = a * sinh(z) + b elementwise: a non-constant log-det, so a sign error in it would show."""

    def __init__(self, a: list[float], b: list[float]) -> None:
        super().__init__()
        self.register_buffer("a", torch.tensor(a))
        self.register_buffer("b", torch.tensor(b))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.a * torch.sinh(z) + self.b, torch.log(self.a.abs() * torch.cosh(z)).sum(-1)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = torch.asinh((x - self.b) / self.a)
        return z, -torch.log(self.a.abs() * torch.cosh(z)).sum(-1)


class CircleAffine(Bijection):
    """2-D: x0 = z0 + c sin z0 (a diffeomorphism of the circle), x1 = a z1 + b."""

    def __init__(self, c: float, a: float, b: float) -> None:
        super().__init__()
        self.c, self.a, self.b = c, a, b

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x0 = z[:, 0] + self.c * torch.sin(z[:, 0])
        x1 = self.a * z[:, 1] + self.b
        logdet = torch.log1p(self.c * torch.cos(z[:, 0])) + math.log(abs(self.a))
        return torch.stack([x0, x1], -1), logdet

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # z0 + c sin z0 is increasing and |z0 - x0| <= |c|: bisection converges to machine precision.
        lo, hi = x[:, 0] - abs(self.c), x[:, 0] + abs(self.c)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            above = mid + self.c * torch.sin(mid) > x[:, 0]
            lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
        z0 = 0.5 * (lo + hi)
        z = torch.stack([z0, (x[:, 1] - self.b) / self.a], -1)
        return z, -(torch.log1p(self.c * torch.cos(z0)) + math.log(abs(self.a)))


class DoubleWell(Energy):
    """u = c4 x1^4 + c2 x1^2 + c1 x1 + x2^2 / 2 (kT)."""

    def __init__(self, c4: float = 1.0, c2: float = -6.0, c1: float = 1.0) -> None:
        super().__init__(dim=2)
        self.c4, self.c2, self.c1 = c4, c2, c1

    def reduced_energy(self, x: Tensor) -> Tensor:
        x1, x2 = x[:, 0], x[:, 1]
        return self.c4 * x1**4 + self.c2 * x1**2 + self.c1 * x1 + 0.5 * x2**2

    def marginal_x1(self) -> tuple[np.ndarray, np.ndarray]:
        """Normalized density of x1 on a fine grid (quadrature reference)."""
        grid = np.linspace(-8.0, 8.0, 400_001)
        u = self.c4 * grid**4 + self.c2 * grid**2 + self.c1 * grid
        p = np.exp(-(u - u.min()))
        return grid, p / np.trapezoid(p, grid)


class Gaussian(Energy):
    """u = sum (x - mean)^2 / (2 std^2) (kT)."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__(dim=len(mean))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float64))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float64))

    def reduced_energy(self, x: Tensor) -> Tensor:
        return (0.5 * ((x - self.mean) / self.std) ** 2).sum(-1)


class TruncatedGaussian(Energy):
    """1-D standard normal on (-2, 2); +inf at x <= -2 and NaN at x >= 2. Counts non-finite results."""

    def __init__(self) -> None:
        super().__init__(dim=1)
        self.n_nonfinite = 0

    def reduced_energy(self, x: Tensor) -> Tensor:
        x = x[:, 0]
        u = torch.where(x <= -2.0, torch.full_like(x, math.inf), 0.5 * x**2)
        u = torch.where(x >= 2.0, torch.full_like(x, math.nan), u)
        self.n_nonfinite += int((~torch.isfinite(u)).sum())
        return u


class VonMisesGaussian(Energy):
    """u = -kappa cos(x0 - mu) + (x1 - 1)^2 / 2: periodic in x0."""

    def __init__(self, kappa: float, mu: float) -> None:
        super().__init__(dim=2)
        self.kappa, self.mu = kappa, mu

    def reduced_energy(self, x: Tensor) -> Tensor:
        return -self.kappa * torch.cos(x[:, 0] - self.mu) + 0.5 * (x[:, 1] - 1.0) ** 2


class Spy(Move):
    """A move that changes nothing and records what it sees, to watch the chains from inside a Cycle."""

    name = "spy"

    def __init__(self, watched: Move | None = None) -> None:
        super().__init__()
        self.watched = watched
        self.step_sizes: list[float | None] = []
        self.z_min = math.inf
        self.z_max = -math.inf

    def step(self, state: ChainState) -> ChainState:
        if self.watched is not None:
            self.step_sizes.append(self.watched.step_size)
        if state.z is not None:
            self.z_min = min(self.z_min, float(state.z[:, 0].min()))
            self.z_max = max(self.z_max, float(state.z[:, 0].max()))
        return state


def chain_average(values: Tensor) -> tuple[float, float]:
    """Estimate and standard error of an observable ``[T, n_chains]`` from independent chains."""
    per_chain = values.to(torch.float64).mean(0)
    return float(per_chain.mean()), float(per_chain.std() / math.sqrt(per_chain.numel()))


def assert_close(values: Tensor, exact: float, label: str) -> None:
    estimate, stderr = chain_average(values)
    assert abs(estimate - exact) < N_SIGMA * stderr, f"{label}: {estimate:.4f} +- {stderr:.4f}, exact {exact:.4f}"


def check_double_well(result_x: Tensor, energy: DoubleWell) -> None:
    """Compare P(x1 < 0), E[x1], E[x1^2] with quadrature and E[x2^2] with 1."""
    grid, p = energy.marginal_x1()
    x1, x2 = result_x[..., 0], result_x[..., 1]
    assert_close((x1 < 0).double(), float(np.trapezoid(np.where(grid < 0, p, 0.0), grid)), "P(x1<0)")
    assert_close(x1, float(np.trapezoid(grid * p, grid)), "E[x1]")
    assert_close(x1**2, float(np.trapezoid(grid**2 * p, grid)), "E[x1^2]")
    assert_close(x2**2, 1.0, "E[x2^2]")


# ------------------------------------------------------------------ (0) chain starts


def test_resample_starts_draws_in_proportion_to_the_weights() -> None:
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    n = 40_000
    idx = resample_starts(torch.log(p) - 7.0, n, torch.Generator().manual_seed(0))
    assert idx.shape == (n,)
    freq = torch.bincount(idx, minlength=4).double() / n
    assert torch.all((freq - p).abs() < N_SIGMA * torch.sqrt(p * (1 - p) / n)), freq
    again = resample_starts(torch.log(p), n, torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)  # the generator alone decides the draw


def test_resample_starts_gives_nonfinite_weights_zero_probability() -> None:
    log_w = torch.tensor([0.0, math.nan, math.inf, -math.inf, 1.0], dtype=torch.float64)
    idx = resample_starts(log_w, 5000, torch.Generator().manual_seed(1))
    assert set(idx.tolist()) == {0, 4}
    with pytest.raises(ValueError, match="none of the 3 proposals"):
        resample_starts(torch.tensor([math.nan, math.inf, -math.inf]), 2)


def test_initial_state_starts_only_where_the_energy_is_finite() -> None:
    # About a fifth of the flow samples fall outside (-2, 2), where the energy is +inf or NaN.
    energy = TruncatedGaussian()
    gen = BoltzmannGenerator(Prior(1), Affine([1.5], [0.0]), energy)
    state = initial_state(gen, 256)
    assert energy.n_nonfinite > 0
    assert state.x.shape == (256, 1) and state.x.dtype == torch.float64
    assert torch.isfinite(state.u).all() and (state.x.abs() < 2.0).all()
    assert torch.allclose(state.u, energy(state.x))
    x_of_z, _ = gen.flow(state.z)
    assert torch.allclose(x_of_z.double(), state.x)


# ------------------------------------------------------------------ (1) independence Metropolis


def test_imh_with_inexact_flow_samples_deep_double_well() -> None:
    energy = DoubleWell()
    gen = BoltzmannGenerator(Prior(2), SinhAffine([1.2, 1.3], [-0.2, 0.3]), energy)
    result = run_chains(IndependenceMetropolis(gen), N_CHAINS, n_steps=200, n_warmup=50, progress=False)
    assert result.x.shape == (200, N_CHAINS, 2) and result.u.shape == (200, N_CHAINS)
    assert result.u.dtype == torch.float64
    assert 0.05 < result.acceptance_rate["imh"] < 0.95
    assert torch.allclose(result.u[-1], energy(result.x[-1]))
    check_double_well(result.x, energy)


def test_imh_counts_energy_evaluations_and_thins() -> None:
    energy = Gaussian([0.0], [1.0])
    gen = BoltzmannGenerator(Prior(1), Affine([1.5], [0.2]), energy)
    x0 = torch.zeros(64, 1)
    result = run_chains(IndependenceMetropolis(gen), x0, n_steps=30, n_warmup=10, thin=4, progress=False)
    # One evaluation for the start, then one proposal per chain per step.
    assert result.energy_evaluations == 64 * (1 + 10 + 30)
    assert result.x.shape == (7, 64, 1)
    assert result.step_sizes == {}


# ------------------------------------------------------------------ (2) latent HMC and MALA


@pytest.mark.parametrize(
    "make_move",
    [
        lambda gen: LatentHMC(gen, step_size=0.3, n_leapfrog=4),
        lambda gen: LatentMALA(gen, step_size=0.5),
    ],
    ids=["hmc", "mala"],
)
def test_latent_moves_sample_double_well(make_move) -> None:
    # A shallow (~1 kT) barrier, so that local latent moves mix within the budget; the sinh flow
    # makes the pull-back depend on the log-det, so dropping or mis-signing it would bias the moments.
    energy = DoubleWell(c4=0.25, c2=-1.0, c1=0.5)
    gen = BoltzmannGenerator(Prior(2), SinhAffine([0.8, 1.4], [0.3, -0.5]), energy)
    move = make_move(gen)
    result = run_chains(move, N_CHAINS, n_steps=200, n_warmup=100, progress=False)
    assert 0.4 < result.acceptance_rate[move.name] < 0.9
    check_double_well(result.x, energy)


# ------------------------------------------------------------------ (3) exact flow


def test_imh_accepts_everything_when_flow_is_exact() -> None:
    energy = Gaussian([0.5, -1.0], [1.3, 0.7])
    exact = BoltzmannGenerator(Prior(2), Affine([1.3, 0.7], [0.5, -1.0]), energy)
    result = run_chains(IndependenceMetropolis(exact), 256, n_steps=50, progress=False)
    assert result.acceptance_rate["imh"] == 1.0
    inexact = BoltzmannGenerator(Prior(2), Affine([1.6, 0.7], [0.5, -1.0]), energy)
    result = run_chains(IndependenceMetropolis(inexact), 256, n_steps=50, progress=False)
    assert result.acceptance_rate["imh"] < 0.95


# ------------------------------------------------------------------ (4) non-finite energies


def test_imh_rejects_and_counts_nonfinite_proposals() -> None:
    energy = TruncatedGaussian()
    gen = BoltzmannGenerator(Prior(1), Affine([1.5], [0.0]), energy)
    result = run_chains(IndependenceMetropolis(gen), torch.zeros(N_CHAINS, 1), n_steps=200, n_warmup=20, progress=False)
    # Every non-finite energy was a proposal (the start is finite), and each was counted once.
    assert result.n_nonfinite == energy.n_nonfinite > 1000
    assert torch.isfinite(result.u).all() and (result.x.abs() < 2.0).all()
    var = 1.0 - 2 * 2.0 * norm.pdf(2.0) / (norm.cdf(2.0) - norm.cdf(-2.0))
    assert_close(result.x[..., 0], 0.0, "E[x]")
    assert_close(result.x[..., 0] ** 2, var, "E[x^2]")


@pytest.mark.parametrize(
    "make_move",
    [
        lambda gen: LatentHMC(gen, step_size=0.4, n_leapfrog=4, adapt=False),
        lambda gen: LatentMALA(gen, step_size=1.0, adapt=False),
        lambda gen: CartesianMALA(gen.energy, step_size=1.0, adapt=False),
    ],
    ids=["hmc", "mala", "cartesian_mala"],
)
def test_gradient_moves_reject_nonfinite(make_move) -> None:
    energy = TruncatedGaussian()
    gen = BoltzmannGenerator(Prior(1), Affine([0.9], [0.0]), energy)
    result = run_chains(make_move(gen), torch.zeros(256, 1), n_steps=100, progress=False)
    assert 0 < result.n_nonfinite <= energy.n_nonfinite
    assert torch.isfinite(result.u).all() and (result.x.abs() < 2.0).all()


class Cusp(Energy):
    """u = sqrt(|x|) + x^2/2: finite everywhere, with an infinite gradient at x = 0."""

    def __init__(self) -> None:
        super().__init__(dim=1)

    def reduced_energy(self, x: Tensor) -> Tensor:
        return (x.abs().sqrt() + 0.5 * x**2).sum(-1)


@pytest.mark.parametrize(
    "make_move",
    [
        lambda gen: LatentHMC(gen, step_size=0.3, n_leapfrog=3, adapt=False),
        lambda gen: LatentMALA(gen, step_size=0.5, adapt=False),
    ],
    ids=["hmc", "mala"],
)
def test_latent_moves_leave_a_point_with_nonfinite_gradient(make_move) -> None:
    # Every chain starts exactly on the cusp, where the density is finite but the gradient is not.
    # Such a chain once stayed there forever; with the zero-drift rule each one moves on.
    gen = BoltzmannGenerator(Prior(1), Affine([1.0], [0.0]), Cusp())
    result = run_chains(make_move(gen), torch.zeros(64, 1), n_steps=20, progress=False)
    moved = (result.x[-1, :, 0] != 0).float().mean()
    assert moved > 0.9


# ------------------------------------------------------------------ (5) adaptation only in warm-up


@pytest.mark.parametrize(
    "make_move, target",
    [
        (lambda gen: LatentHMC(gen, step_size=0.01, n_leapfrog=3), 0.65),
        (lambda gen: LatentMALA(gen, step_size=3.0), 0.57),
        (lambda gen: CartesianMALA(gen.energy, step_size=0.01), 0.57),
    ],
    ids=["hmc", "mala", "cartesian_mala"],
)
def test_step_size_adapts_in_warmup_only(make_move, target) -> None:
    energy = Gaussian([0.0, 0.0, 0.0], [1.0, 0.5, 2.0])
    gen = BoltzmannGenerator(Prior(3), Affine([0.6, 1.0, 1.0], [0.1, 0.0, -0.2]), energy)
    move = make_move(gen)
    initial = move.step_size
    spy = Spy(watched=move)
    n_warmup, n_steps = 80, 60
    result = run_chains([move, spy], 256, n_steps=n_steps, n_warmup=n_warmup, progress=False, generator=gen)
    warmup, production = spy.step_sizes[:n_warmup], spy.step_sizes[n_warmup:]
    assert len(set(warmup)) > 10
    assert set(production) == {result.step_sizes[move.name]} == {move.step_size}
    assert move.step_size != initial
    assert abs(result.acceptance_rate[move.name] - target) < 0.15
    # A run without warm-up leaves the step size alone.
    frozen = move.step_size
    run_chains(move, result.final_state, n_steps=10, progress=False)
    assert move.step_size == frozen


# ------------------------------------------------------------------ (6) global + local combinations


def test_cycle_of_imh_and_cartesian_mala_samples_deep_double_well() -> None:
    energy = DoubleWell()
    gen = BoltzmannGenerator(Prior(2), Affine([2.2, 1.5], [-0.3, 0.4]), energy)
    moves = [IndependenceMetropolis(gen), CartesianMALA(energy, step_size=0.3)]
    result = run_chains(moves, N_CHAINS, n_steps=200, n_warmup=50, progress=False)
    assert set(result.acceptance_rate) == {"imh", "cartesian_mala"}
    assert abs(result.acceptance_rate["cartesian_mala"] - 0.57) < 0.15
    check_double_well(result.x, energy)


def test_cycle_with_latent_after_local_move() -> None:
    energy = DoubleWell()
    gen = BoltzmannGenerator(Prior(2), SinhAffine([1.2, 1.3], [-0.2, 0.3]), energy)
    local = CartesianMALA(energy, step_size=0.3)
    latent = LatentMALA(gen, step_size=0.3)
    # The local move runs right before the latent one, which must recompute z by flow.inverse.
    cycle = Cycle([IndependenceMetropolis(gen), local, latent])
    result = run_chains(cycle, N_CHAINS, n_steps=200, n_warmup=50, progress=False)
    assert set(result.acceptance_rate) == {"imh", "cartesian_mala", "latent_mala"}
    assert all(0.05 < rate < 0.95 for rate in result.acceptance_rate.values())
    check_double_well(result.x, energy)

    state = local.step(result.final_state)
    assert state.z is None
    state = latent.step(state)
    x_of_z, _ = gen.flow(state.z)
    assert torch.allclose(x_of_z, state.x, atol=1e-10)
    assert torch.allclose(state.u, energy(state.x))


# ------------------------------------------------------------------ (7) circular latent dimensions


@pytest.mark.parametrize(
    "make_move",
    [
        lambda gen: LatentHMC(gen, step_size=0.6, n_leapfrog=4, adapt=False),
        lambda gen: LatentMALA(gen, step_size=1.2, adapt=False),
    ],
    ids=["hmc", "mala"],
)
def test_circular_latent_is_wrapped_and_sampled_correctly(make_move) -> None:
    kappa, mu = 1.5, 2.8  # mode near the seam at +-pi, so that chains cross it often
    energy = VonMisesGaussian(kappa, mu)
    gen = BoltzmannGenerator(Prior(2, circular=torch.tensor([True, False])), CircleAffine(0.6, 0.8, 0.3), energy)
    move = make_move(gen)
    spy = Spy()
    result = run_chains([move, spy], N_CHAINS, n_steps=150, n_warmup=30, progress=False)
    assert -math.pi <= spy.z_min and spy.z_max < math.pi
    assert spy.z_max - spy.z_min > 6.0  # the chains do visit the whole circle
    resultant = i1(kappa) / i0(kappa)
    angle = result.x[..., 0]
    assert_close(torch.cos(angle), resultant * math.cos(mu), "E[cos x0]")
    assert_close(torch.sin(angle), resultant * math.sin(mu), "E[sin x0]")
    assert_close(result.x[..., 1], 1.0, "E[x1]")


def test_wrapped_proposal_density_sums_periodic_images() -> None:
    # The MALA acceptance ratio on circular dims needs the wrapped-normal density of the proposal;
    # compare the helper with a brute-force image sum (its normalization is the same for both directions).
    d = 5.0 * torch.randn(1000, 3)
    circular = torch.tensor([True, False, True])
    shifts = 2 * math.pi * torch.arange(-60, 61, dtype=torch.float64)
    for sigma in (0.3, 1.2, 3.0):
        periodic = torch.logsumexp(-0.5 * (d[:, circular, None] + shifts) ** 2 / sigma**2, -1).sum(-1)
        expected = periodic - 0.5 * d[:, 1] ** 2 / sigma**2
        assert torch.allclose(_log_gaussian_kernel(d, sigma, circular), expected, rtol=0, atol=1e-9)


# ------------------------------------------------------------------ dtype


def test_float32_flow_keeps_float64_energies() -> None:
    energy = DoubleWell()
    gen = BoltzmannGenerator(Prior(2), SinhAffine([1.2, 1.3], [-0.2, 0.3]), energy).to(torch.float32)
    moves = [IndependenceMetropolis(gen), LatentHMC(gen, step_size=0.1, n_leapfrog=3), CartesianMALA(energy, 0.2)]
    # Chains started by initial_state hold float64 positions.
    result = run_chains(moves, 64, n_steps=10, n_warmup=5, progress=False)
    assert result.x.dtype == torch.float64 and result.u.dtype == torch.float64
    assert torch.isfinite(result.u).all()
    # Chains keep the dtype of explicit starts.
    result = run_chains(moves, result.final_state.x.float(), n_steps=10, progress=False)
    assert result.x.dtype == torch.float32 and result.u.dtype == torch.float64
    assert result.final_state.x.dtype == torch.float32
    assert torch.isfinite(result.u).all()
