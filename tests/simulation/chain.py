"""A 4-atom chain whose torsion marginal is known exactly, shared by the simulation tests.

For a chain 0-1-2-3 with harmonic bonds and angles, one torsion and no other interactions, the
Jacobian of (bond lengths, angles, torsion) is r^2 sin(theta) products that do not involve the
torsion, so the marginal of phi is exactly p(phi) ∝ exp(-V_tors(phi) / kT). Quadrature of that
1-D density gives exact free energies to compare against.
"""

from __future__ import annotations

import math

import numpy as np
import openmm
import openmm.app as app
from openmm import unit

from boltzgen.geometry import dihedrals_rad
from boltzgen.units import kT_kJ_per_mol

# (periodicity, phase rad, k kJ/mol): barrier ≈ 5.2 kT at 300 K, asymmetric wells.
TORSION_TERMS = ((1, 0.0, 6.0), (2, 1.0, 1.5))
CHAIN = (0, 1, 2, 3)
MD_KW = dict(temperature_K=300.0, timestep_fs=4.0, friction_per_ps=5.0, progress=False)


def v_torsion(phi: np.ndarray) -> np.ndarray:
    """Torsion energy (kJ/mol) of the test chain at angles phi (rad)."""
    return sum(k * (1.0 + np.cos(n * phi - phase)) for n, phase, k in TORSION_TERMS)


def state_b(phi: np.ndarray) -> np.ndarray:
    return (phi > 0.0) & (phi < 2.6)


def quadrature_grid(n: int = 200_000) -> np.ndarray:
    return np.linspace(-math.pi, math.pi, n, endpoint=False)


def boltzmann_weights(phi: np.ndarray, temperature_K: float) -> np.ndarray:
    return np.exp(-(v_torsion(phi) - v_torsion(quadrature_grid()).min()) / kT_kJ_per_mol(temperature_K))


def exact_delta_f(temperature_K: float) -> float:
    phi = quadrature_grid()
    w = boltzmann_weights(phi, temperature_K)
    b = state_b(phi)
    return float(-np.log(w[b].sum() / w[~b].sum()))


def exact_mean_v(temperature_K: float) -> float:
    phi = quadrature_grid()
    w = boltzmann_weights(phi, temperature_K)
    return float((w * v_torsion(phi)).sum() / w.sum())


def exact_bin_profile(edges: np.ndarray, temperature_K: float = 300.0) -> np.ndarray:
    """-ln of the exact bin probabilities between ``edges`` (rad), minimum 0 (kT)."""
    phi = quadrature_grid()
    idx = np.digitize(phi, edges) - 1
    p = np.bincount(idx, weights=boltzmann_weights(phi, temperature_K), minlength=len(edges) - 1)
    f = -np.log(p / p.sum())
    return f - f.min()


def _soft_chain(n_atoms: int) -> tuple[openmm.System, app.Topology]:
    """``n_atoms`` carbons in a row with soft bonds (so 4 fs steps are stable) and angles, no torsion yet."""
    system = openmm.System()
    for _ in range(n_atoms):
        system.addParticle(12.0)
    bonds = openmm.HarmonicBondForce()
    for i in range(n_atoms - 1):
        bonds.addBond(i, i + 1, 0.15, 1.0e4)
    angles = openmm.HarmonicAngleForce()
    for i in range(n_atoms - 2):
        angles.addAngle(i, i + 1, i + 2, 1.91, 400.0)
    system.addForce(bonds)
    system.addForce(angles)
    top = app.Topology()
    res = top.addResidue("MOL", top.addChain())
    atoms = [top.addAtom(f"C{i}", app.element.carbon, res) for i in range(n_atoms)]
    for i in range(n_atoms - 1):
        top.addBond(atoms[i], atoms[i + 1])
    return system, top


def make_chain() -> tuple[openmm.System, app.Topology, np.ndarray]:
    """A 4-atom chain with soft bonds (so 4 fs steps are stable) and one torsion."""
    system, top = _soft_chain(4)
    torsion = openmm.PeriodicTorsionForce()
    for n, phase, k in TORSION_TERMS:
        torsion.addTorsion(*CHAIN, n, phase, k)
    system.addForce(torsion)
    positions = np.array([[0.0, 0.15, 0.0], [0.0, 0.0, 0.0], [0.15, 0.0, 0.0], [0.2, 0.1, 0.1]])
    return system, top, positions


def openmm_energies(system: openmm.System, positions_nm: np.ndarray) -> np.ndarray:
    """Potential energy (kJ/mol) of each frame [T, n, 3], straight from OpenMM."""
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    out = []
    for x in positions_nm:
        ctx.setPositions(np.asarray(x, dtype=np.float64) * unit.nanometer)
        out.append(ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    return np.array(out)


def torsion(positions_nm: np.ndarray, atoms: tuple[int, int, int, int] = CHAIN) -> np.ndarray:
    """The torsion of ``atoms`` in each frame ``[T, n_atoms, 3]`` -> ``[T]`` rad."""
    return dihedrals_rad(positions_nm, [atoms])[:, 0]


# --- a 5-atom chain with two coupled torsions: an exact 2-D (phi, psi) density ------------------

#: The two torsions of the 5-atom chain: phi of atoms 0-3, psi of atoms 1-4.
CHAIN2_PHI, CHAIN2_PSI = (0, 1, 2, 3), (1, 2, 3, 4)


def v_torsions_2d(phi: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """Torsion energy (kJ/mol) of the 5-atom chain: barriers of a few kT along both angles, coupled."""
    return 6.0 * (1 + np.cos(phi)) + 1.5 * (1 + np.cos(2 * phi - 1.0)) + 3.0 * (1 + np.cos(psi - 0.5)) \
        + 2.0 * np.cos(phi + psi)


def make_chain_2d() -> tuple[openmm.System, app.Topology, np.ndarray]:
    """A 5-atom chain with soft bonds and angles and the torsion energy :func:`v_torsions_2d`.

    The Jacobian of the chain's internal coordinates does not involve the torsions, so the joint
    marginal of (phi, psi) is exactly proportional to ``exp(-v_torsions_2d / kT)``.
    """
    system, top = _soft_chain(5)
    torsions = openmm.CustomCompoundBondForce(5, "6*(1 + cos(a)) + 1.5*(1 + cos(2*a - 1)) + 3*(1 + cos(b - 0.5)) "
                                                 "+ 2*cos(a + b); a = dihedral(p1, p2, p3, p4); b = dihedral(p2, p3, p4, p5)")
    torsions.addBond([0, 1, 2, 3, 4], [])
    system.addForce(torsions)
    positions = np.array([[0.0, 0.15, 0.0], [0.0, 0.0, 0.0], [0.15, 0.0, 0.0], [0.2, 0.1, 0.1], [0.35, 0.1, 0.12]])
    return system, top, positions


def exact_2d(temperature_K: float = 300.0, n: int = 600) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact joint density of (phi, psi) on an ``n x n`` grid: ``(phi, psi, p)`` with ``p`` summing to 1."""
    axis = np.linspace(-math.pi, math.pi, n, endpoint=False) + math.pi / n
    phi, psi = np.meshgrid(axis, axis, indexing="ij")
    v = v_torsions_2d(phi, psi)
    p = np.exp(-(v - v.min()) / kT_kJ_per_mol(temperature_K))
    return phi, psi, p / p.sum()
