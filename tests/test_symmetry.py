"""Rotors: found from the bond graph, relabelled by cyclic shifts, kept only where the energy is symmetric."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from boltzgen.energies.openmm import OpenMMEnergy, build_system
from boltzgen.geometry import dihedral, is_l_chirality
from boltzgen.symmetry import energy_invariant_rotors, find_rotors, random_relabel, relabel

PDB = Path(__file__).resolve().parents[1] / "systems" / "alanine-dipeptide.pdb"
# ACE's CH3 (C 0), ALA's CB (C 10) and NME's CH3 (C 18) carry the three methyls.
METHYL_HYDROGENS = [[1, 2, 3], [11, 12, 13], [19, 20, 21]]


@pytest.fixture(scope="module")
def alanine():
    """Alanine dipeptide (amber96, vacuum): the system and 6 perturbed frames ``[6, 66]`` nm."""
    system = build_system(PDB, ["amber96.xml"], temperature_K=300.0)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.as_tensor(system.positions_nm).reshape(1, -1)
    return system, x0 + 0.005 * torch.randn(6, x0.shape[1], generator=generator, dtype=torch.float64)


def test_the_three_methyls_of_alanine_dipeptide_are_its_rotors(alanine):
    system, _ = alanine
    assert find_rotors(system.mdtraj_topology).tolist() == METHYL_HYDROGENS
    assert find_rotors(system.topology).tolist() == METHYL_HYDROGENS  # an OpenMM topology too


def test_a_shift_moves_the_atoms_round_and_three_shifts_are_the_identity(alanine):
    _, x = alanine
    rotors = torch.as_tensor(METHYL_HYDROGENS)
    one = torch.ones(x.shape[0], 3, dtype=torch.long)
    moved = relabel(x, rotors, one).reshape(x.shape[0], -1, 3)
    pos = x.reshape(x.shape[0], -1, 3)
    assert torch.equal(moved[:, 11], pos[:, 12]) and torch.equal(moved[:, 13], pos[:, 11])
    untouched = [a for a in range(22) if a not in sum(METHYL_HYDROGENS, [])]
    assert torch.equal(moved[:, untouched], pos[:, untouched])
    assert torch.equal(relabel(x, rotors, 0 * one), x)
    three = relabel(relabel(relabel(x, rotors, one), rotors, one), rotors, one)
    assert torch.equal(three, x)


def test_relabelling_keeps_the_energy_and_the_handedness_of_every_methyl(alanine):
    system, x = alanine
    energy = OpenMMEnergy(system, platform="Reference")
    rotors = torch.as_tensor(METHYL_HYDROGENS)
    shifted = random_relabel(x, rotors)
    assert torch.allclose(energy(shifted), energy(x), rtol=0, atol=1e-9)
    assert is_l_chirality(shifted, system.mdtraj_topology).all()
    # A swap of two hydrogens would flip the improper H1-C-H2-H3; a cyclic shift keeps its sign.
    for (h1, h2, h3), center in zip(METHYL_HYDROGENS, (0, 10, 18)):
        atoms = [h1, center, h2, h3]
        assert torch.equal(torch.sign(_dihedral(shifted, atoms)), torch.sign(_dihedral(x, atoms)))


def test_random_shifts_are_uniform_and_independent_per_row():
    torch.manual_seed(3)
    x = torch.arange(6 * 3, dtype=torch.float64).reshape(1, 18).expand(30_000, 18)  # 6 atoms
    out = random_relabel(x, torch.tensor([[1, 2, 3]])).reshape(-1, 6, 3)
    which = (out[:, 1, 0] / 3).long()  # the atom whose position atom 1 now holds
    counts = torch.bincount(which, minlength=4)[1:].double()
    # Each of the three shifts ~10,000 times: 4 binomial sigmas (~326) bound a fair draw.
    assert counts.sum() == 30_000 and (counts - 10_000).abs().max() < 330, counts


def test_a_rotor_whose_atoms_the_energy_tells_apart_is_dropped(alanine):
    _, x = alanine

    def lopsided(v: torch.Tensor) -> torch.Tensor:  # atom 12 alone feels a field along x
        return (v.reshape(v.shape[0], -1, 3) ** 2).sum((1, 2)) + v.reshape(v.shape[0], -1, 3)[:, 12, 0]

    kept, dropped = energy_invariant_rotors(np.array(METHYL_HYDROGENS), lopsided, x)
    assert kept.tolist() == [[1, 2, 3], [19, 20, 21]] and dropped == [[11, 12, 13]]


def test_no_rotors_leaves_the_batch_alone():
    x = torch.randn(4, 9)
    assert random_relabel(x, torch.zeros(0, 3, dtype=torch.long)) is x
    assert find_rotors(_water_like()).shape == (0, 3)


def _dihedral(x: torch.Tensor, atoms: list[int]) -> torch.Tensor:
    p = x.reshape(x.shape[0], -1, 3)
    return dihedral(*(p[:, a] for a in atoms))


def _water_like():
    """An mdtraj topology O-H-H: no atom with four bonds."""
    import mdtraj
    top = mdtraj.Topology()
    res = top.add_residue("HOH", top.add_chain())
    o = top.add_atom("O", mdtraj.element.oxygen, res)
    for name in ("H1", "H2"):
        top.add_bond(o, top.add_atom(name, mdtraj.element.hydrogen, res))
    return top
