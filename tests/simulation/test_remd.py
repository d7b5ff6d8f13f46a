"""Tests for boltzgen.simulation.remd (openmmtools parallel tempering) on the Mueller-Brown particle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openmm
import pytest
from openmm import unit

from boltzgen.energies.particle import build_mueller_brown_particle
from boltzgen.simulation.remd import run_replica_exchange
from boltzgen.units import kT_kJ_per_mol

LADDER = [300.0, 500.0, 800.0]
KW = {"steps_per_exchange": 50, "timestep_fs": 10.0, "friction_per_ps": 5.0, "checkpoint_every": 10, "progress": False}


@pytest.fixture(scope="module")
def particle():
    return build_mueller_brown_particle(0.1, 300.0)


def _energies_kJ(system: openmm.System, positions_nm: np.ndarray) -> np.ndarray:
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    out = []
    for xyz in positions_nm.reshape(-1, system.getNumParticles(), 3):
        context.setPositions(xyz.astype(np.float64) * unit.nanometer)
        out.append(context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    return np.asarray(out).reshape(positions_nm.shape[:2])


def test_run_stores_reduced_potentials_states_and_exchanges(particle, tmp_path: Path) -> None:
    result = run_replica_exchange(particle.system, particle.positions_nm, LADDER, iterations=20, seed=3,
                                  storage=tmp_path / "remd.nc", **KW)
    t, r, k = result.reduced_potentials.shape
    assert (t, r, k) == (20, 3, 3) and result.iterations == 20
    assert result.positions_nm.shape == (20, 3, 1, 3) and result.positions_nm.dtype == np.float32
    np.testing.assert_array_equal(result.temperatures_K, LADDER)
    # Every iteration the replicas occupy each rung once.
    assert np.all(np.sort(result.states, axis=1) == np.arange(3))
    # u_k = U / kT_k of the stored configuration (float32 positions: ~1e-5 kT).
    kT = np.array([kT_kJ_per_mol(temperature) for temperature in LADDER])
    expected = _energies_kJ(particle.system, result.positions_nm)[:, :, None] / kT[None, None, :]
    np.testing.assert_allclose(result.reduced_potentials, expected, rtol=1e-4, atol=1e-3)
    # Only neighbours are proposed, and no more accepted than proposed.
    assert np.all(result.n_accepted <= result.n_proposed) and result.n_proposed[0, 2] == 0
    assert result.n_proposed[0, 1] + result.n_proposed[1, 0] > 0
    assert result.energy_evaluations == 20 * 3 * 51 + 3 and result.wall_seconds > 0
    assert (tmp_path / "remd_checkpoint.nc").exists()


def test_same_seed_same_run_and_resume_extends(particle, tmp_path: Path) -> None:
    first = run_replica_exchange(particle.system, particle.positions_nm, LADDER, iterations=20, seed=5,
                                 storage=tmp_path / "a.nc", **KW)
    again = run_replica_exchange(particle.system, particle.positions_nm, LADDER, iterations=20, seed=5,
                                 storage=tmp_path / "b.nc", **KW)
    np.testing.assert_array_equal(first.reduced_potentials, again.reduced_potentials)
    np.testing.assert_array_equal(first.states, again.states)
    other = run_replica_exchange(particle.system, particle.positions_nm, LADDER, iterations=20, seed=6,
                                 storage=tmp_path / "c.nc", **KW)
    assert not np.array_equal(first.reduced_potentials, other.reduced_potentials)

    # The finished storage is read as it is; a longer run continues it from its last checkpoint.
    reused = run_replica_exchange(particle.system, particle.positions_nm, LADDER, iterations=20, seed=5,
                                  storage=tmp_path / "a.nc", **KW)
    np.testing.assert_array_equal(reused.reduced_potentials, first.reduced_potentials)
    assert reused.wall_seconds == first.wall_seconds
    longer = run_replica_exchange(particle.system, particle.positions_nm, LADDER, iterations=35, seed=5,
                                  storage=tmp_path / "a.nc", **KW)
    assert longer.iterations == 35 and longer.wall_seconds > first.wall_seconds
    np.testing.assert_array_equal(longer.reduced_potentials[:20], first.reduced_potentials)
    assert np.all(np.sort(longer.states, axis=1) == np.arange(3))


def test_a_storage_of_another_run_is_refused_or_replaced(particle, tmp_path: Path) -> None:
    storage = tmp_path / "remd.nc"
    run_replica_exchange(particle.system, particle.positions_nm, LADDER, iterations=10, seed=1, storage=storage, **KW)
    with pytest.raises(ValueError, match="different replica exchange run"):
        run_replica_exchange(particle.system, particle.positions_nm, [300.0, 600.0], iterations=10, seed=1,
                             storage=storage, **KW)
    fresh = run_replica_exchange(particle.system, particle.positions_nm, [300.0, 600.0], iterations=10, seed=1,
                                 storage=storage, resume=False, **KW)
    assert fresh.reduced_potentials.shape == (10, 2, 2)
    storage.write_bytes(b"not a netCDF file")  # e.g. killed while it was created: started afresh
    again = run_replica_exchange(particle.system, particle.positions_nm, [300.0, 600.0], iterations=10, seed=1,
                                 storage=storage, **KW)
    np.testing.assert_array_equal(again.reduced_potentials, fresh.reduced_potentials)


@pytest.mark.parametrize("ladder", [[300.0], [300.0, 300.0], [500.0, 300.0], [-1.0, 300.0]])
def test_bad_ladders_are_refused(particle, tmp_path: Path, ladder: list[float]) -> None:
    with pytest.raises(ValueError, match="increasing positive"):
        run_replica_exchange(particle.system, particle.positions_nm, ladder, iterations=2, storage=tmp_path / "x.nc",
                             **KW)


def test_hydrogen_mass_repartitioning_keeps_the_total_mass_and_the_energy() -> None:
    from boltzgen.energies.openmm import build_system
    from boltzgen.simulation.remd import repartition_hydrogen_mass
    from tests.helpers import ROOT

    molecule = build_system(ROOT / "systems" / "alanine-dipeptide.pdb", ["amber14-all.xml"], 300.0)
    top = molecule.mdtraj_topology
    bonds = [(a.index, b.index) for a, b in top.bonds]
    hydrogens = [a.index for a in top.atoms if a.element.symbol == "H"]
    heavy = repartition_hydrogen_mass(molecule.system, bonds, hydrogens, 3.0)

    def masses(system: openmm.System) -> np.ndarray:
        return np.array([system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(system.getNumParticles())])

    assert masses(heavy).sum() == pytest.approx(masses(molecule.system).sum(), rel=1e-12)
    np.testing.assert_allclose(masses(heavy)[hydrogens], 3.0)
    methyl_carbon = next(a.index for a in top.atoms if a.name == "CH3")
    expected = masses(molecule.system)[methyl_carbon] - 3 * (3.0 - 1.008)
    assert masses(heavy)[methyl_carbon] == pytest.approx(expected, rel=1e-3)
    positions = molecule.positions_nm[None] + np.random.default_rng(0).normal(scale=0.01, size=(4, 22, 3))
    np.testing.assert_array_equal(_energies_kJ(heavy, positions[:, None])[:, 0],
                                  _energies_kJ(molecule.system, positions[:, None])[:, 0])
    with pytest.raises(ValueError, match="lower hydrogen_mass_amu"):
        repartition_hydrogen_mass(molecule.system, bonds, hydrogens, 5.0)
