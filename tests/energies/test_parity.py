"""The torch force field against OpenMM's Reference platform (float64 parity), on both CPU paths."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from boltzgen.energies.ffparams import read_system
from boltzgen.energies.parity import (
    ENERGY_ABS_TOL_KJ,
    ENERGY_REL_TOL,
    FORCE_ABS_TOL_KJ_NM,
    ParityReport,
    compare_with_openmm,
    openmm_energies_forces,
)
from boltzgen.energies.torchff import TorchForceField

TEMPERATURE_K = 300.0
MakeSystem = Callable[..., tuple[openmm.System, np.ndarray]]

SYSTEMS = {
    "alanine-amber14-vacuum": ("alanine", ["amber14-all.xml"]),
    "alanine-amber96-obc": ("alanine", ["amber96.xml", "amber96_obc.xml"]),
    "tetraalanine-amber96-obc": ("tetraalanine", ["amber96.xml", "amber96_obc.xml"]),
    "protein-amber14-vacuum": ("protein", ["amber14-all.xml"]),
    "protein-amber99sb-obc": ("protein", ["amber99sb.xml", "amber99_obc.xml"]),
}
TERM_FORCES = {
    "bonds": "HarmonicBondForce",
    "angles": "HarmonicAngleForce",
    "torsions": "PeriodicTorsionForce",
    "nonbonded": "NonbondedForce",
    "gbsa_obc": "GBSAOBCForce",
}


@pytest.fixture(scope="module", params=list(SYSTEMS))
def system_case(request: pytest.FixtureRequest, make_system: MakeSystem) -> tuple[str, openmm.System, np.ndarray]:
    molecule, forcefield = SYSTEMS[request.param]
    pdb = request.getfixturevalue({"alanine": "alanine_pdb", "tetraalanine": "tetraalanine_pdb"}.get(molecule, "protein"))
    system, positions = make_system(pdb, forcefield)
    return request.param, system, positions


def _assert_parity(report: ParityReport) -> None:
    assert report.passed, report
    assert report.max_rel_energy <= ENERGY_REL_TOL or report.max_abs_energy_kJ <= ENERGY_ABS_TOL_KJ
    assert report.max_abs_force_kJ_nm <= FORCE_ABS_TOL_KJ_NM


def _alone(system: openmm.System, force: openmm.Force) -> openmm.System:
    """A system with the particles of ``system`` and a copy of ``force`` only."""
    alone = openmm.System()
    for a in range(system.getNumParticles()):
        alone.addParticle(system.getParticleMass(a))
    alone.addForce(openmm.XmlSerializer.clone(force))
    return alone


@pytest.mark.parametrize("noise_nm", [0.01, 0.05])
def test_parity_with_openmm(system_case: tuple[str, openmm.System, np.ndarray], noise_nm: float, native: bool) -> None:
    name, system, positions = system_case
    n = 6 if name.startswith(("alanine", "tetraalanine")) else 2
    report = compare_with_openmm(system, positions, TEMPERATURE_K, n=n, noise_nm=noise_nm, seed=1, native=native)
    _assert_parity(report)


def test_per_force_parity(system_case: tuple[str, openmm.System, np.ndarray], native: bool) -> None:
    """Each force on its own (its own force group in OpenMM, a system of its own in torch), so a
    failure names the term at fault."""
    _, system, positions = system_case
    system = openmm.XmlSerializer.clone(system)
    groups = {}
    for g, force in enumerate(system.getForces()):
        force.setForceGroup(g)
        groups[type(force).__name__] = g
    rng = np.random.default_rng(3)
    frame = positions + 0.02 * rng.standard_normal(positions.shape)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(frame)
    whole = TorchForceField(system, TEMPERATURE_K, native=native)
    assert whole.uses_native_kernel() == native
    terms = [term for term, force in TERM_FORCES.items() if force in groups]
    assert set(whole.terms) == set(terms)
    for term in terms:
        force = system.getForce(groups[TERM_FORCES[term]])
        ff = TorchForceField(_alone(system, force), TEMPERATURE_K, native=native)
        assert ff.terms == (term,)
        energy, forces = ff.energy_and_forces_kJ(torch.as_tensor(frame.reshape(1, -1)))
        state = context.getState(getEnergy=True, getForces=True, groups={groups[TERM_FORCES[term]]})
        ref = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        ref_forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        assert abs(energy.item() - ref) <= max(ENERGY_ABS_TOL_KJ, ENERGY_REL_TOL * abs(ref)), (term, energy.item(), ref)
        assert np.abs(forces.numpy().reshape(ref_forces.shape) - ref_forces).max() <= FORCE_ABS_TOL_KJ_NM, term


def test_close_pair_high_energy(alanine_pdb: app.PDBFile, make_system: MakeSystem, native: bool) -> None:
    """A non-bonded pair pushed to 0.12 nm (huge LJ repulsion) still matches OpenMM."""
    for forcefield in (["amber14-all.xml"], ["amber96.xml", "amber96_obc.xml"]):
        system, positions = make_system(alanine_pdb, forcefield)
        frame = positions.copy()
        # ACE methyl H1 (1) and ALA carbonyl O (15) are far apart in the topology.
        direction = frame[1] - frame[15]
        frame[1] = frame[15] + 0.12 * direction / np.linalg.norm(direction)
        frames = np.stack([frame, frame + 0.003 * np.random.default_rng(0).standard_normal(frame.shape)])
        e_ref, f_ref = openmm_energies_forces(system, frames)
        assert e_ref.min() > 1e3  # really a high-energy configuration
        ff = TorchForceField(system, TEMPERATURE_K, native=native)
        energy, forces = ff.energy_and_forces_kJ(torch.as_tensor(frames.reshape(2, -1)))
        assert np.all(np.abs(energy.numpy() - e_ref) <= np.maximum(ENERGY_ABS_TOL_KJ, ENERGY_REL_TOL * np.abs(e_ref)))
        # Forces here are ~1e5 kJ/mol/nm; compare relative to their scale.
        scale = np.abs(f_ref).max()
        assert np.abs(forces.numpy().reshape(f_ref.shape) - f_ref).max() <= max(FORCE_ABS_TOL_KJ_NM, 1e-9 * scale)


def test_torsion_phases_and_periodicities(alanine_pdb: app.PDBFile, make_system: MakeSystem, native: bool) -> None:
    """Arbitrary phases and periodicities 1..6 (the sine polynomial), incl. several terms per quadruplet."""
    system, positions = make_system(alanine_pdb, ["amber14-all.xml"])
    torsions = next(f for f in system.getForces() if isinstance(f, openmm.PeriodicTorsionForce))
    rng = np.random.default_rng(7)
    for t in range(torsions.getNumTorsions()):
        i, j, k, l, _, _, kt = torsions.getTorsionParameters(t)
        torsions.setTorsionParameters(t, i, j, k, l, int(rng.integers(1, 7)), float(rng.uniform(0, 2 * np.pi)), kt)
    i, j, k, l, *_ = torsions.getTorsionParameters(0)
    torsions.addTorsion(i, j, k, l, 5, 1.234, 3.0)
    report = compare_with_openmm(system, positions, TEMPERATURE_K, n=4, noise_nm=0.03, seed=2, native=native)
    _assert_parity(report)
    parameters = read_system(system).torsions
    assert parameters is not None and parameters.sin_coef.shape[0] > 0


def test_openmm_energies_forces_shapes(alanine_obc: tuple[openmm.System, np.ndarray]) -> None:
    system, positions = alanine_obc
    frames = np.stack([positions, positions + 0.01])
    energies, forces = openmm_energies_forces(system, frames)
    assert energies.shape == (2,) and forces.shape == frames.shape
    assert energies[0] == pytest.approx(energies[1], abs=1e-6)  # a rigid shift changes nothing


def test_parity_report() -> None:
    ok = ParityReport(max_abs_energy_kJ=1e-3, max_rel_energy=1e-8, max_abs_force_kJ_nm=1e-6, n=3)
    assert ok.passed
    assert ParityReport(1e-5, 1e-3, 1e-6, 3).passed  # absolute energy criterion alone suffices
    assert not ParityReport(1e-3, 1e-5, 1e-6, 3).passed
    assert not ParityReport(1e-9, 1e-12, 1e-3, 3).passed
    with pytest.raises(dataclasses.FrozenInstanceError):
        ok.n = 4  # type: ignore[misc]
