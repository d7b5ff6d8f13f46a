"""Tests for boltzgen.energies.particle: the OpenMM Mueller-Brown particle is the analytic potential."""

from __future__ import annotations

import math

import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from boltzgen.energies.analytic import MuellerBrown
from boltzgen.energies.particle import MuellerBrownParticle, build_mueller_brown_particle
from boltzgen.units import kT_kJ_per_mol


def _points(n: int, seed: int = 0) -> torch.Tensor:
    """``[n, 3]`` nm: uniform over the quadrature box in (x0, x1) and +-0.3 nm in z."""
    g = torch.Generator().manual_seed(seed)
    low, width = torch.tensor([-2.5, -1.5, -0.3]), torch.tensor([4.0, 4.5, 0.6])
    return low + width * torch.rand(n, 3, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("beta, temperature_K, sigma", [(0.1, 300.0, 0.1), (0.05, 450.0, 0.3)])
def test_openmm_energy_is_the_analytic_energy(beta: float, temperature_K: float, sigma: float) -> None:
    energy = MuellerBrownParticle(build_mueller_brown_particle(beta, temperature_K, 2.0, sigma), beta, sigma)
    x = _points(2000)
    u = energy(x)
    expected = MuellerBrown(beta)(x[:, :2]) + 0.5 * (x[:, 2] / sigma) ** 2
    assert u.dtype == torch.float64 and u.shape == (2000,)
    torch.testing.assert_close(u, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(energy.exact_reduced_energy(x), expected, rtol=0, atol=0)
    # Forces from OpenMM agree with autograd of the closed form.
    xg = x[:50].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(energy.exact_reduced_energy(xg).sum(), xg)
    torch.testing.assert_close(energy.force(x[:50]), -grad, rtol=1e-9, atol=1e-7)


def test_openmm_energy_scales_with_temperature_like_kT() -> None:
    """At another thermostat temperature T the same system's reduced energy is beta V * T_ref / T:
    the force is in kJ/mol, fixed by the reference temperature."""
    molecule = build_mueller_brown_particle(0.1, 300.0)
    platform = openmm.Platform.getPlatformByName("Reference")
    context = openmm.Context(molecule.system, openmm.VerletIntegrator(0.001), platform)
    x = _points(20).numpy()
    for xi in x:
        context.setPositions(xi[None] * unit.nanometer)
        e = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        u_600 = e / kT_kJ_per_mol(600.0)
        exact = (MuellerBrown(0.1)(torch.as_tensor(xi[None, :2])).item() + 0.5 * (xi[2] / 0.1) ** 2) * 300.0 / 600.0
        assert u_600 == pytest.approx(exact, rel=1e-9, abs=1e-9)


def test_exact_answers_are_those_of_the_2d_potential() -> None:
    beta, sigma = 0.1, 0.1
    energy = MuellerBrownParticle(build_mueller_brown_particle(beta, 300.0, 1.0, sigma), beta, sigma)
    assert energy.dim == 3
    assert energy.log_z == pytest.approx(MuellerBrown(beta).log_z + math.log(math.sqrt(2 * math.pi) * sigma), rel=1e-12)
    # log Z by quadrature over z of the 3-D closed form, at x0, x1 on the 2-D quadrature grid.
    z = np.linspace(-8 * sigma, 8 * sigma, 4001)
    log_z_z = math.log(np.trapezoid(np.exp(-0.5 * (z / sigma) ** 2), z))
    assert energy.log_z == pytest.approx(MuellerBrown(beta).log_z + log_z_z, rel=1e-9)
    # The states on x0, x1 see exactly the Mueller-Brown marginal.
    states = {"A": lambda c: c["x1"] > 1.175 * c["x0"] + 1.59, "B": lambda c: c["x1"] <= 1.175 * c["x0"] + 1.59}
    p = energy.quadrature_probabilities(states, points_per_dim=801)
    q = MuellerBrown(beta).quadrature_probabilities(states, points_per_dim=801)
    assert p == pytest.approx(q, rel=1e-12)
    assert energy.cv_range(2) == (-6 * sigma, 6 * sigma) and energy.cv_range(0) == (-2.5, 1.5)


def test_the_system_is_one_particle_with_a_topology() -> None:
    molecule = build_mueller_brown_particle(0.1, 300.0, mass_amu=3.0)
    assert molecule.n_atoms == 1 and molecule.system.getNumParticles() == 1
    assert molecule.system.getParticleMass(0).value_in_unit(unit.dalton) == 3.0
    assert molecule.mdtraj_topology.n_atoms == 1 and molecule.kT_kJ_per_mol == kT_kJ_per_mol(300.0)
    np.testing.assert_allclose(molecule.positions_nm, [[-0.558, 1.442, 0.0]])
    with pytest.raises(ValueError, match="must be positive"):
        build_mueller_brown_particle(0.1, 300.0, z_sigma_nm=0.0)
