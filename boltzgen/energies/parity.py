"""Parity of the torch force field with OpenMM: the check behind ``boltzgen check-energy``.

:func:`compare_with_openmm` evaluates :class:`~boltzgen.energies.torchff.TorchForceField` and
OpenMM's Reference platform on perturbed configurations and reports the largest deviations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import openmm
import openmm.unit as unit
import torch

from boltzgen.energies.torchff import TorchForceField

# Parity tolerances used by `compare_with_openmm` (`boltzgen check-energy`).
ENERGY_REL_TOL: float = 1e-6
ENERGY_ABS_TOL_KJ: float = 1e-4
FORCE_ABS_TOL_KJ_NM: float = 1e-4


@dataclass(frozen=True)
class ParityReport:
    """Largest deviations of :class:`TorchForceField` from OpenMM's Reference platform over ``n``
    configurations: ``max_abs_energy_kJ`` is max |U_torch - U_openmm| in kJ/mol, ``max_rel_energy``
    the same divided by max(|U_openmm|, tiny) (dimensionless), and ``max_abs_force_kJ_nm`` the
    largest componentwise |F_torch - F_openmm| in kJ/mol/nm.
    """

    max_abs_energy_kJ: float
    max_rel_energy: float
    max_abs_force_kJ_nm: float
    n: int

    @property
    def passed(self) -> bool:
        """Energies within ENERGY_REL_TOL relative or ENERGY_ABS_TOL_KJ absolute, forces within FORCE_ABS_TOL_KJ_NM."""
        energy_ok = self.max_rel_energy <= ENERGY_REL_TOL or self.max_abs_energy_kJ <= ENERGY_ABS_TOL_KJ
        return energy_ok and self.max_abs_force_kJ_nm <= FORCE_ABS_TOL_KJ_NM


def openmm_energies_forces(system: openmm.System, positions_nm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Energies ``[n]`` (kJ/mol) and forces ``[n, n_atoms, 3]`` (kJ/mol/nm) from a Reference context.

    ``positions_nm`` is ``[n, n_atoms, 3]``.
    """
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    try:
        energies = np.empty(positions_nm.shape[0])
        forces = np.empty(positions_nm.shape)
        for s, frame in enumerate(positions_nm):
            context.setPositions(frame)
            state = context.getState(getEnergy=True, getForces=True)
            energies[s] = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
            forces[s] = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    finally:
        del context
    return energies, forces


def compare_with_openmm(
    system: openmm.System,
    positions_nm: np.ndarray,
    temperature_K: float,
    n: int = 16,
    noise_nm: float = 0.01,
    seed: int = 0,
    native: bool | None = None,
) -> ParityReport:
    """Compare :class:`TorchForceField` (float64, CPU) with OpenMM's Reference platform on ``system``.

    The ``n`` configurations are the reference positions ``positions_nm`` (``[n_atoms, 3]``, nm)
    with every coordinate perturbed by Gaussian noise of standard deviation ``noise_nm`` (nm), drawn
    from ``seed``. ``temperature_K`` only sets kT: parity is checked in kJ/mol. ``native`` is passed
    to :class:`TorchForceField` (``None``: the C kernel where it builds, ``False``: eager torch).
    Returns the largest deviations as a :class:`ParityReport`.
    """
    base = np.asarray(positions_nm, dtype=np.float64).reshape(-1, 3)
    rng = np.random.default_rng(seed)
    frames = base[None] + noise_nm * rng.standard_normal((n, *base.shape))
    e_ref, f_ref = openmm_energies_forces(system, frames)
    ff = TorchForceField(system, temperature_K, native=native)
    x = torch.as_tensor(frames.reshape(n, -1), dtype=torch.float64)
    energy, forces = ff.energy_and_forces_kJ(x)
    e, f = energy.numpy(), forces.numpy().reshape(frames.shape)
    abs_err = np.abs(e - e_ref)
    return ParityReport(
        max_abs_energy_kJ=float(abs_err.max()),
        max_rel_energy=float((abs_err / np.maximum(np.abs(e_ref), 1e-300)).max()),
        max_abs_force_kJ_nm=float(np.abs(f - f_ref).max()),
        n=int(n),
    )
