"""Thermal energy and reduced energies: the one place where kJ/mol meet kT.

Inside the package every energy is reduced, ``u = U / kT`` (dimensionless, float64). OpenMM works
in kJ/mol; these functions convert at that edge, with OpenMM's value of the gas constant so that
kT agrees with OpenMM's thermostats.
"""

from __future__ import annotations

import numpy as np
from openmm import unit

#: Molar gas constant in kJ/(mol K), OpenMM's value.
R_KJ_PER_MOL_K: float = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)


def kT_kJ_per_mol(temperature_K: float) -> float:
    """Thermal energy k_B T in kJ/mol at ``temperature_K`` (K, positive).

    Computed as an OpenMM quantity, bit for bit the value OpenMM's own code uses.
    """
    if not temperature_K > 0:
        raise ValueError(f"temperature_K must be positive, got {temperature_K}")
    kT = unit.MOLAR_GAS_CONSTANT_R * float(temperature_K) * unit.kelvin
    return float(kT.value_in_unit(unit.kilojoule_per_mole))


def reduced_energy(potential_kJ_mol: np.ndarray | float, temperature_K: float) -> np.ndarray:
    """``u = U / kT`` (float64, same shape as ``potential_kJ_mol``) for ``U`` in kJ/mol at ``temperature_K``."""
    return np.asarray(potential_kJ_mol, dtype=np.float64) / kT_kJ_per_mol(temperature_K)
