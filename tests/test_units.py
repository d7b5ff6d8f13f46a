"""Tests for boltzgen.units: kT and reduced energies, where kJ/mol meet kT."""

from __future__ import annotations

import numpy as np
import pytest
from openmm import unit

from boltzgen.units import R_KJ_PER_MOL_K, kT_kJ_per_mol, reduced_energy


def test_kT_is_openmms_value() -> None:
    assert kT_kJ_per_mol(300.0) == pytest.approx(2.494338785, rel=1e-9)
    expected = (unit.MOLAR_GAS_CONSTANT_R * 300.0 * unit.kelvin).value_in_unit(unit.kilojoule_per_mole)
    assert kT_kJ_per_mol(300.0) == expected  # bit for bit what OpenMM's thermostats use
    assert kT_kJ_per_mol(600.0) == pytest.approx(2.0 * kT_kJ_per_mol(300.0), rel=1e-15)
    assert R_KJ_PER_MOL_K * 300.0 == pytest.approx(kT_kJ_per_mol(300.0), rel=1e-15)


@pytest.mark.parametrize("temperature_K", [0.0, -1.0, float("nan")])
def test_kT_refuses_non_positive_temperatures(temperature_K: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        kT_kJ_per_mol(temperature_K)


def test_reduced_energy() -> None:
    u = reduced_energy(np.array([2.494338785, 0.0]), 300.0)
    assert u.dtype == np.float64 and u.shape == (2,)
    np.testing.assert_allclose(u, [1.0, 0.0], rtol=1e-6)
    # Reducing to a higher temperature gives proportionally smaller reduced energies.
    np.testing.assert_allclose(reduced_energy(10.0, 600.0) * 2, reduced_energy(10.0, 300.0))
    assert reduced_energy(np.float32(1.0), 300.0).dtype == np.float64
    assert reduced_energy(5.0, 300.0) == 5.0 / kT_kJ_per_mol(300.0)
