import math

import numpy as np
import pytest
import torch

from boltzgen.energies.analytic import DoubleWell, MuellerBrown


@pytest.mark.parametrize("energy", [DoubleWell(), MuellerBrown()], ids=["double_well", "mueller_brown"])
def test_force_is_minus_gradient_by_finite_differences(energy):
    x = torch.randn(16, 2, dtype=torch.float64) * 0.7 + torch.tensor([-0.3, 0.6], dtype=torch.float64)
    force = energy.force(x)
    h = 1e-6
    for d in range(2):
        step = torch.zeros(2, dtype=torch.float64)
        step[d] = h
        numeric = -(energy(x + step) - energy(x - step)) / (2 * h)
        torch.testing.assert_close(force[:, d], numeric, rtol=1e-6, atol=1e-6)


def test_energies_are_float64_batched_and_counted():
    energy = DoubleWell()
    u = energy(torch.zeros(5, 2, dtype=torch.float32))
    assert u.dtype == torch.float64 and u.shape == (5,)
    assert energy.evaluations == 5
    assert energy.seconds > 0  # wall time inside the call, for the summary's energy_seconds


def test_double_well_formula():
    x = torch.tensor([[1.5, -2.0]], dtype=torch.float64)
    assert float(DoubleWell()(x)) == pytest.approx(1.5**4 - 6 * 1.5**2 + 1.5 + 2.0)


def test_mueller_brown_minima_are_stationary_with_published_values():
    energy = MuellerBrown(beta=1.0)
    minima = torch.tensor([[-0.558, 1.442], [0.623, 0.028], [-0.050, 0.467]], dtype=torch.float64)
    # published minima are given to 3 decimals; the gradient there is small compared with its scale (~100s)
    assert energy.force(minima).abs().max() < 2.0
    u = energy(minima)
    assert u[0] < u[1] < u[2]  # the first minimum is the deepest
    torch.testing.assert_close(MuellerBrown(beta=0.1)(minima), 0.1 * u)


def test_double_well_quadrature_matches_published_free_energy_and_converges():
    energy = DoubleWell()
    states = {"A": lambda c: c["x0"] < 0, "B": lambda c: c["x0"] > 0}
    coarse = energy.quadrature_probabilities(states, points_per_dim=801)
    fine = energy.quadrature_probabilities(states, points_per_dim=2001)
    df = -math.log(fine["B"] / fine["A"])
    assert df == pytest.approx(3.38, abs=0.01)  # the published value: about 3.38 kT
    assert abs(df + math.log(coarse["B"] / coarse["A"])) < 1e-4
    assert fine["A"] + fine["B"] == pytest.approx(1.0)


def test_quadrature_box_holds_the_mass():
    for energy in (DoubleWell(), MuellerBrown()):
        lo, hi = energy.box.lower, energy.box.upper
        edge = np.concatenate([
            np.stack([np.linspace(lo[0], hi[0], 200), np.full(200, y)], 1) for y in (lo[1], hi[1])
        ] + [np.stack([np.full(200, x), np.linspace(lo[1], hi[1], 200)], 1) for x in (lo[0], hi[0])])
        u_edge = energy(torch.from_numpy(edge))
        u_min = energy(torch.tensor([[-1.7, 0.0], [-0.558, 1.442]], dtype=torch.float64)).min()
        assert float(u_edge.min() - u_min) > 15.0


def test_energy_constants_stay_out_of_checkpoints():
    """A checkpoint holds the flow only: an energy's stored constants may change shape between
    versions, and a checkpoint written with old ones still loads."""
    model = torch.nn.Module()
    model.flow = torch.nn.Linear(2, 2)
    model.energy = DoubleWell()
    state = model.state_dict()
    assert state and not any(key.startswith("energy.") for key in state)
    state["energy.old_constant"] = torch.zeros(3, 1)  # as a checkpoint from before might carry
    model.load_state_dict(state)  # strict: neither missing nor unexpected keys


# --- the benchmarks of training without data ------------------------------------------------------------

from boltzgen.energies.analytic import GaussianMixture, ManyWell  # noqa: E402


def test_many_well_is_sixteen_double_wells_with_the_published_log_z():
    energy = ManyWell(32)
    x = torch.randn(64, 32, dtype=torch.float64) * 1.5
    pairs = [energy.marginal_energy(x[:, 2 * k: 2 * k + 2]) for k in range(16)]
    torch.testing.assert_close(energy(x), torch.stack(pairs).sum(0))
    x1, x2 = x[:, 0], x[:, 1]
    torch.testing.assert_close(pairs[0], x1**4 - 6 * x1**2 - 0.5 * x1 + 0.5 * x2**2)
    assert energy.log_z == pytest.approx(164.696, abs=5e-4)  # published: 164.696
    # 16 times the 2-D quadrature of one pair (an independent route)
    assert energy.log_z == pytest.approx(16 * DoubleWell(1.0, 6.0, -0.5).log_z, abs=1e-9)
    with pytest.raises(ValueError):
        ManyWell(5)


def test_gaussian_mixture_is_normalized_and_its_modes_hold_equal_mass():
    energy = GaussianMixture()
    assert energy.n_modes == 40 and energy.scale == pytest.approx(math.log1p(math.e))
    means = energy.means.numpy()
    assert means.min() >= -40 and means.max() <= 40
    assert np.array_equal(means, GaussianMixture().means.numpy())  # a fixed seed
    assert energy.log_z == 0.0
    assert energy.quadrature_log_z(points_per_dim=801) == pytest.approx(0.0, abs=1e-9)  # quadrature agrees
    # At a mean, the mixture density is at least that component's peak / 40.
    u = energy(energy.means)
    assert torch.all(u <= math.log(40 * 2 * math.pi * energy.scale**2) + 1e-9)
    r = energy.responsibilities(energy.means)
    torch.testing.assert_close(r.sum(1), torch.ones(40, dtype=torch.float64))
    assert torch.all(r.argmax(1) == torch.arange(40))


@pytest.mark.parametrize("energy", [ManyWell(4), GaussianMixture(n_modes=5, loc_scale=3.0)], ids=["many_well", "gmm"])
def test_benchmark_forces_are_minus_gradients(energy):
    x = torch.randn(8, energy.dim, dtype=torch.float64)
    force, h = energy.force(x), 1e-6
    for d in range(energy.dim):
        step = torch.zeros(energy.dim, dtype=torch.float64)
        step[d] = h
        torch.testing.assert_close(force[:, d], -(energy(x + step) - energy(x - step)) / (2 * h), rtol=1e-5, atol=1e-5)


def test_exact_log_z_of_the_toys_by_quadrature_converges():
    for energy in (DoubleWell(), MuellerBrown()):
        wider = type(energy)()
        lo, hi = np.array(energy.box.lower), np.array(energy.box.upper)
        wider.box = type(energy.box)(lower=tuple(lo - 1.0), upper=tuple(hi + 1.0))
        assert energy.log_z == pytest.approx(wider.log_z, abs=1e-6)
    # the double well factorizes: its x1 part is the Gaussian's sqrt(2 pi)
    x = np.linspace(-6, 6, 600_001)
    quartic = np.log(np.trapezoid(np.exp(-(x**4 - 6 * x**2 + x)), x))
    assert DoubleWell().log_z == pytest.approx(quartic + 0.5 * math.log(2 * math.pi), abs=1e-8)
