"""A molecule with an exact answer: one OpenMM particle in the Mueller-Brown potential.

:func:`build_mueller_brown_particle` builds an OpenMM system of one particle whose potential is a
``CustomExternalForce``: the Mueller-Brown potential over (x, y) in nm, scaled so that its reduced
energy at the reference temperature is exactly ``beta * V_MB(x, y)`` of
:class:`~boltzgen.energies.analytic.MuellerBrown`, plus a harmonic restraint on z.

Why a harmonic z and not a fixed one: OpenMM cannot freeze one coordinate of a particle (mass 0
freezes all three), and a free z would make the density improper, which a flow cannot learn. With
``u_z = z^2 / (2 sigma^2)`` (kT at the reference temperature) the Boltzmann density factorizes,
``p(x, y, z) = p_MB(x, y) N(z; 0, sigma^2 T / T_ref)``, so the marginal of (x, y) at every temperature
is exactly the analytic Mueller-Brown density there: every state on x0, x1 has the quadrature
probability, ΔF between them is the analytic one, and ``log Z`` is the analytic one plus
``log(sqrt(2 pi) sigma)``. The z term stays in the reduced energy, as it must for importance
weights and for the exchange criterion of replica exchange to be those of the simulated system.

:class:`MuellerBrownParticle` is the :class:`~boltzgen.energies.analytic.AnalyticEnergy` of that
system: its energy is evaluated by OpenMM (:class:`~boltzgen.energies.openmm.OpenMMEnergy`, the
path every molecule takes), its quadrature and log Z are exact.
"""

from __future__ import annotations

import math
from functools import cached_property

import mdtraj
import numpy as np
import openmm
from openmm import app
from torch import Tensor

from boltzgen.energies.analytic import MUELLER_BROWN_CONSTANTS, AnalyticEnergy, MuellerBrown
from boltzgen.energies.openmm import MolecularSystem, OpenMMEnergy
from boltzgen.units import kT_kJ_per_mol

#: Where the particle starts: the deepest minimum of the Mueller-Brown potential (nm).
START_NM = (-0.558, 1.442, 0.0)
#: The reach of the quadrature and histograms in z, in restraint widths.
Z_REACH_SIGMAS = 6.0


def mueller_brown_expression(scale_kJ_mol: float, k_z_kJ_mol_nm2: float) -> str:
    """The ``CustomExternalForce`` energy (kJ/mol, x y z in nm):
    ``scale * V_MB(x, y) + k_z z^2 / 2``, the constants written out exactly (``repr`` of float64)."""
    c = MUELLER_BROWN_CONSTANTS
    terms = []
    for k in range(len(c["A"])):
        dx, dy = f"(x-({c['x0'][k]!r}))", f"(y-({c['y0'][k]!r}))"
        exponent = f"({c['a'][k]!r})*{dx}^2+({c['b'][k]!r})*{dx}*{dy}+({c['c'][k]!r})*{dy}^2"
        terms.append(f"({c['A'][k]!r})*exp({exponent})")
    return f"({scale_kJ_mol!r})*({'+'.join(terms)})+0.5*({k_z_kJ_mol_nm2!r})*z^2"


def build_mueller_brown_particle(beta: float, temperature_K: float, mass_amu: float = 1.0,
                                 z_sigma_nm: float = 0.1) -> MolecularSystem:
    """The one-particle OpenMM system described in the module docstring, as a :class:`MolecularSystem`.

    ``beta``: 1/kT in the units of V_MB at ``temperature_K`` (K), so the force is
    ``beta kT(temperature_K) V_MB`` kJ/mol. ``mass_amu``: the particle's mass (amu), which sets the
    dynamics only. ``z_sigma_nm``: the standard deviation of z at ``temperature_K`` (nm). The
    particle starts in the deepest minimum, :data:`START_NM`; its topology is one atom ``P`` (argon
    as element) in residue ``MBP``.
    """
    if not (beta > 0 and temperature_K > 0 and mass_amu > 0 and z_sigma_nm > 0):
        raise ValueError(f"beta, temperature_K, mass_amu and z_sigma_nm must be positive, got {beta}, "
                         f"{temperature_K}, {mass_amu}, {z_sigma_nm}")
    kT = kT_kJ_per_mol(temperature_K)
    system = openmm.System()
    system.addParticle(mass_amu)
    force = openmm.CustomExternalForce(mueller_brown_expression(beta * kT, kT / z_sigma_nm**2))
    force.addParticle(0, [])
    system.addForce(force)
    topology = app.Topology()
    residue = topology.addResidue("MBP", topology.addChain())
    topology.addAtom("P", app.element.argon, residue)
    return MolecularSystem(topology=topology, system=system, positions_nm=np.array([START_NM], dtype=np.float64),
                           temperature_K=float(temperature_K), kT_kJ_per_mol=kT,
                           mdtraj_topology=mdtraj.Topology.from_openmm(topology))


class MuellerBrownParticle(AnalyticEnergy):
    """Reduced energy of the Mueller-Brown particle, ``u = beta V_MB(x0, x1) + x2^2 / (2 sigma^2)``.

    ``x``: ``[batch, 3]`` positions in nm; :meth:`reduced_energy` asks OpenMM (``platform``) and is
    differentiable like every molecule's energy. :meth:`exact_reduced_energy` is the same in torch,
    :meth:`marginal_energy` the (x0, x1) part, :attr:`log_z` exact (quadrature of the analytic
    Mueller-Brown plus the Gaussian's ``log(sqrt(2 pi) sigma)``).
    """

    box = MuellerBrown.box

    def __init__(self, molecule: MolecularSystem, beta: float, z_sigma_nm: float, platform: str = "Reference") -> None:
        super().__init__(dim=3)
        self.molecular_system = molecule
        self.z_sigma_nm = float(z_sigma_nm)
        self.analytic = MuellerBrown(beta)
        self.openmm = OpenMMEnergy(molecule, platform=platform)

    def reduced_energy(self, x: Tensor) -> Tensor:
        return self.openmm.reduced_energy(x)

    def exact_reduced_energy(self, x: Tensor) -> Tensor:
        """The same energy in closed form (torch, float64 ``[batch]``), for checks against OpenMM."""
        return self.analytic.reduced_energy(x[:, :2]) + 0.5 * (x[:, 2] / self.z_sigma_nm) ** 2

    def marginal_energy(self, x: Tensor) -> Tensor:
        return self.analytic.reduced_energy(x[:, :2])

    def cv_range(self, d: int) -> tuple[float, float]:
        if d == 2:
            return -Z_REACH_SIGMAS * self.z_sigma_nm, Z_REACH_SIGMAS * self.z_sigma_nm
        return super().cv_range(d)

    @cached_property
    def log_z(self) -> float:
        return self.analytic.log_z + 0.5 * math.log(2.0 * math.pi) + math.log(self.z_sigma_nm)

    def close(self) -> None:
        """Free the OpenMM context (the next evaluation recreates it)."""
        self.openmm.close()
