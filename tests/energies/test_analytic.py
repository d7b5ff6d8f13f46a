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
