"""Reading an OpenMM system into force-field parameters: supported forces, refusals, the pair list."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import openmm
import pytest
from openmm import app

from boltzgen.energies.ffparams import ONE_4PI_EPS0, read_system
from boltzgen.energies.torchff import TorchForceField

TEMPERATURE_K = 300.0
MakeSystem = Callable[..., tuple[openmm.System, np.ndarray]]


def test_coulomb_constant_is_openmms() -> None:
    assert ONE_4PI_EPS0 == pytest.approx(138.93545764438198, rel=1e-15)


def test_terms_shapes_and_pair_lists(alanine_pdb: app.PDBFile, make_system: MakeSystem) -> None:
    """Without OBC the pair list holds only interacting pairs; OBC needs every pair."""
    n = alanine_pdb.topology.getNumAtoms()
    vacuum = read_system(make_system(alanine_pdb, ["amber14-all.xml"])[0])
    assert set(vacuum.terms) == {"bonds", "angles", "torsions", "nonbonded"} and vacuum.obc is None
    assert vacuum.bonds is not None and vacuum.bonds.idx.shape == (2, 21) and vacuum.bonds.k.shape == (21,)
    assert vacuum.pair_idx is not None and vacuum.nonbonded is not None
    n_pairs = vacuum.pair_idx.shape[1]
    assert n_pairs < n * (n - 1) // 2 and vacuum.nonbonded.qq.shape == (n_pairs,)
    assert np.all(vacuum.pair_idx[0] < vacuum.pair_idx[1])
    nb = vacuum.nonbonded
    assert np.all((nb.qq != 0) | (nb.c12 != 0) | (nb.c6 != 0))

    obc = read_system(make_system(alanine_pdb, ["amber96.xml", "amber96_obc.xml"])[0])
    assert "gbsa_obc" in obc.terms and obc.obc is not None and obc.pair_idx is not None
    assert obc.pair_idx.shape == (2, n * (n - 1) // 2)
    assert obc.obc.rho.shape == obc.obc.center.shape == (2, n * (n - 1) // 2)
    assert obc.obc.ace.shape == (n,)


def test_unsupported_forces_raise(alanine_pdb: app.PDBFile, make_system: MakeSystem) -> None:
    system, _ = make_system(alanine_pdb, ["amber14-all.xml"])
    custom = openmm.CustomTorsionForce("k*theta^2")
    custom.addPerTorsionParameter("k")
    custom.addTorsion(0, 1, 4, 5, [1.0])
    system.addForce(custom)
    with pytest.raises(ValueError, match=r"CustomTorsionForce.*energy_backend: openmm") as info:
        TorchForceField(system, TEMPERATURE_K)
    assert "\n" not in str(info.value)

    gb_system, _ = make_system(alanine_pdb, ["amber14-all.xml", "implicit/obc2.xml"])
    with pytest.raises(ValueError, match="CustomGBForce"):
        read_system(gb_system)

    cutoff = app.ForceField("amber14-all.xml").createSystem(
        alanine_pdb.topology, nonbondedMethod=app.CutoffNonPeriodic, constraints=None
    )
    with pytest.raises(ValueError, match="NonbondedForce.*NoCutoff"):
        read_system(cutoff)


def test_one_force_per_term(alanine_pdb: app.PDBFile, make_system: MakeSystem) -> None:
    system, _ = make_system(alanine_pdb, ["amber14-all.xml"])
    bonds = next(f for f in system.getForces() if isinstance(f, openmm.HarmonicBondForce))
    system.addForce(openmm.XmlSerializer.clone(bonds))
    with pytest.raises(ValueError, match="one bonds force per system"):
        read_system(system)


def test_cmmotionremover_is_ignored(alanine_pdb: app.PDBFile, make_system: MakeSystem) -> None:
    system, _ = make_system(alanine_pdb, ["amber14-all.xml"])
    assert any(isinstance(f, openmm.CMMotionRemover) for f in system.getForces())
    assert "CMMotionRemover" not in " ".join(read_system(system).terms)
