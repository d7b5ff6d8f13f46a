"""Flat-bottom walls: no energy inside the box, k * excess^2 outside, on the circle for a torsion."""

from __future__ import annotations

import math

import numpy as np
import openmm
import pytest

from boltzgen.cvs import CollectiveVariable
from boltzgen.simulation.walls import wall_forces

K = 500.0


def energy_kJ_mol(forces: list[openmm.Force], positions_nm: np.ndarray) -> float:
    system = openmm.System()
    for _ in range(len(positions_nm)):
        system.addParticle(1.0)
    for force in forces:
        system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions_nm)
    return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)


def torsion_positions(theta: float) -> np.ndarray:
    """Four atoms whose dihedral is ``theta`` (rad)."""
    return np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0],
                     [math.cos(theta), math.sin(theta), 1.0]])


TORSION = CollectiveVariable("phi", "torsion", (0, 1, 2, 3))


@pytest.mark.parametrize("theta", [0.1, 1.0, 2.1])
def test_a_torsion_inside_its_bounds_feels_nothing(theta):
    forces = wall_forces({"phi": (0.0, 2.2)}, {"phi": TORSION}, K)
    assert energy_kJ_mol(forces, torsion_positions(theta)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(("theta", "excess"), [(2.5, 0.3), (-0.2, 0.2), (-2.9, 2 * math.pi - 2.9 - 2.2)])
def test_a_torsion_outside_pays_k_excess_squared_the_short_way_round(theta, excess):
    # Bounds (0, 2.2): -2.9 rad lies 1.18 rad beyond 2.2 across +-pi, and 2.9 rad short of 0 the long way.
    forces = wall_forces({"phi": (0.0, 2.2)}, {"phi": TORSION}, K)
    assert energy_kJ_mol(forces, torsion_positions(theta)) == pytest.approx(K * excess**2, rel=1e-6)


def test_coordinate_and_distance_walls_and_open_sides():
    cvs = {"x0": CollectiveVariable("x0", "coordinate", (0,), 0),
           "d": CollectiveVariable("d", "distance", (0, 1))}
    def walls():  # a force belongs to one System: fresh ones per evaluation
        return wall_forces({"x0": (-math.inf, 0.5), "d": (0.2, 0.4)}, cvs, K)

    assert len(walls()) == 2
    inside = np.array([[0.4, 0.0, 0.0], [0.4, 0.3, 0.0]])  # x0 0.4, d 0.3
    assert energy_kJ_mol(walls(), inside) == pytest.approx(0.0, abs=1e-9)
    outside = np.array([[0.7, 0.0, 0.0], [0.7, 0.1, 0.0]])  # x0 0.2 beyond, d 0.1 short
    assert energy_kJ_mol(walls(), outside) == pytest.approx(K * (0.2**2 + 0.1**2), rel=1e-6)
    assert energy_kJ_mol(walls(), np.array([[-50.0, 0, 0], [-50.0, 0.3, 0]])) == pytest.approx(0.0, abs=1e-9)


def test_no_wall_for_a_full_or_half_open_torsion_interval():
    assert wall_forces({"phi": (-4.0, 3.0)}, {"phi": TORSION}, K) == []
    assert wall_forces({"phi": (0.0, math.inf)}, {"phi": TORSION}, K) == []
