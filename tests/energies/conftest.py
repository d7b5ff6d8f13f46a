"""Molecules shared by the force-field tests: alanine dipeptide, tetra-alanine and a 582-atom protein, as OpenMM systems."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import openmm
import pytest
from openmm import app, unit

from tests.helpers import skip_without_kernel

ROOT = Path(__file__).resolve().parents[2]
ALANINE_PDB = ROOT / "systems" / "alanine-dipeptide.pdb"
TETRAALANINE_PDB = ROOT / "systems" / "tetraalanine.pdb"
PROTEIN_PDB = Path(app.__file__).parent / "data" / "test.pdb"

MakeSystem = Callable[..., tuple[openmm.System, np.ndarray]]


def _make(pdb: app.PDBFile | app.Modeller, forcefield: list[str]) -> tuple[openmm.System, np.ndarray]:
    system = app.ForceField(*forcefield).createSystem(
        pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None, rigidWater=False
    )
    positions = np.asarray(pdb.positions.value_in_unit(unit.nanometer), dtype=np.float64)
    return system, positions


@pytest.fixture(scope="session")
def make_system() -> MakeSystem:
    """``make_system(pdb, forcefield)``: a fresh system without cutoff or constraints, and the
    positions ``[n_atoms, 3]`` (nm) of ``pdb``."""
    return _make


@pytest.fixture(scope="session")
def alanine_pdb() -> app.PDBFile:
    if not ALANINE_PDB.exists():
        pytest.skip("systems/alanine-dipeptide.pdb not present")
    return app.PDBFile(str(ALANINE_PDB))


@pytest.fixture(scope="session")
def tetraalanine_pdb() -> app.PDBFile:
    """ACE-(ALA)3-NME, 42 atoms (systems/make_alanine_pdb.py --residues 3)."""
    if not TETRAALANINE_PDB.exists():
        pytest.skip("systems/tetraalanine.pdb not present")
    return app.PDBFile(str(TETRAALANINE_PDB))


@pytest.fixture(scope="session")
def protein() -> app.Modeller:
    """The peptide of OpenMM's bundled test.pdb (35 residues, 582 atoms): water and Cl- ions stripped."""
    pdb = app.PDBFile(str(PROTEIN_PDB))
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.deleteWater()
    modeller.delete([r for r in modeller.topology.residues() if r.name == "Cl"])
    assert modeller.topology.getNumAtoms() == 582
    return modeller


@pytest.fixture(scope="session")
def alanine_obc(alanine_pdb: app.PDBFile) -> tuple[openmm.System, np.ndarray]:
    """Alanine dipeptide with Amber ff96 and OBC implicit solvent; tests must not modify it."""
    return _make(alanine_pdb, ["amber96.xml", "amber96_obc.xml"])


@pytest.fixture(params=[False, True], ids=["eager", "kernel"])
def native(request: pytest.FixtureRequest) -> bool:
    """Both CPU paths: eager torch, and the fused C kernel (skipped, with the reason, where it cannot build)."""
    if request.param:
        skip_without_kernel()
    return request.param
