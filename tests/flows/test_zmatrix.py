"""Tests for boltzgen.flows.zmatrix: Z-matrix tables built from bond graphs and topologies, and validated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from boltzgen.flows.zmatrix import (
    build_mixed_zmatrix,
    build_zmatrix,
    validate_mixed_zmatrix,
    validate_zmatrix,
    zmatrix_from_topology,
)
from tests.helpers import BENZENE, BRANCHED, CHAIN

# Small bond graphs. Indices are deliberately not in chain order.
# Neopentane heavy skeleton with hydrogens: C0 center, C1..C4, H5..H16 (3 per methyl).
NEOPENTANE = [(0, c) for c in range(1, 5)] + [(c, 5 + 3 * (c - 1) + h) for c in range(1, 5) for h in range(3)]


def torsion_refs_heavy_or_sibling(zmat: np.ndarray, heavy: np.ndarray) -> bool:
    """Bond and angle references are heavy; a torsion reference is heavy, or an earlier sibling
    (an atom with the same bond and angle references)."""
    if not heavy[zmat[1:, 1]].all() or not heavy[zmat[2:, 2]].all():
        return False
    refs_of = {int(r[0]): (int(r[1]), int(r[2])) for r in zmat}
    return all(heavy[t] or refs_of[int(t)] == (int(b), int(a)) for _, b, a, t in zmat[3:])


def bonded_references(zmat: np.ndarray, bonds) -> bool:
    """Every row's bond reference (column 1, where present) is a graph neighbour of its atom."""
    bondset = {frozenset(b) for b in bonds}
    return all(frozenset((int(r[0]), int(r[1]))) in bondset for r in zmat if r[1] >= 0)


# ---------------------------------------------------------------------------------------------
# Full Z-matrices
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bonds,n_atoms",
    [(CHAIN, 6), (BRANCHED, 7), (BENZENE, 12), (NEOPENTANE, 17), ([(0, 1), (1, 2)], 3)],
    ids=["chain", "branched", "benzene", "neopentane", "triatomic"],
)
@pytest.mark.parametrize("heavy_first", [True, False])
def test_build_zmatrix_is_valid(bonds, n_atoms, heavy_first):
    zmat = build_zmatrix(bonds, n_atoms, heavy_first=heavy_first)
    validate_zmatrix(zmat, n_atoms)
    assert sorted(zmat[:, 0].tolist()) == list(range(n_atoms))
    assert bonded_references(zmat, bonds)
    # Frame rows carry exactly the missing references.
    assert (zmat[0, 1:] == -1).all() and (zmat[1, 2:] == -1).all() and zmat[2, 3] == -1
    assert (zmat[3:, 1:] >= 0).all()


def test_build_zmatrix_heavy_first_prefers_heavy_references():
    # Neopentane: without element info the leaves (hydrogens) are detected by degree.
    zmat = build_zmatrix(NEOPENTANE, 17)
    heavy = set(range(5))
    rows_heavy = [int(a) in heavy for a in zmat[:, 0]]
    assert rows_heavy == sorted(rows_heavy, reverse=True), "heavy atoms must come before hydrogens"
    assert torsion_refs_heavy_or_sibling(zmat, np.isin(np.arange(17), list(heavy)))


def test_sibling_torsions_are_taken_against_the_first_sibling():
    zmat = build_zmatrix(NEOPENTANE, 17)
    first: dict[tuple[int, int], int] = {}
    n_siblings = 0
    for atom, bond_ref, angle_ref, torsion_ref in zmat[3:].tolist():
        if (bond_ref, angle_ref) in first:
            assert torsion_ref == first[(bond_ref, angle_ref)]
            n_siblings += 1
        else:
            first[(bond_ref, angle_ref)] = atom
    assert n_siblings >= 8  # each methyl has two later hydrogens
    plain = build_zmatrix(NEOPENTANE, 17, sibling_torsions=False)
    assert (plain[:, :3] == zmat[:, :3]).all() and (plain[:, 3] != zmat[:, 3]).any()


def test_zmatrix_from_topology_protein(villin):
    md = pytest.importorskip("mdtraj")
    top = villin.top
    zmat = zmatrix_from_topology(top)
    validate_zmatrix(zmat, top.n_atoms)
    bonds = [(a.index, b.index) for a, b in top.bonds]
    assert bonded_references(zmat, bonds)
    is_h = np.array([a.element.symbol == "H" for a in top.atoms])
    # References are heavy atoms (or a sibling, for torsions); every heavy atom precedes every hydrogen.
    assert torsion_refs_heavy_or_sibling(zmat, ~is_h)
    order_h = is_h[zmat[:, 0]]
    assert not (order_h[:-1] & ~order_h[1:]).any()
    # OpenMM topologies give the same table.
    assert (zmatrix_from_topology(top.to_openmm()) == zmat).all()
    # Without sibling torsions, backbone phi/psi are explicit torsions (either orientation) for
    # (nearly) all residues.
    zmat = zmatrix_from_topology(top, sibling_torsions=False)
    quads = {tuple(q) for q in zmat[3:].tolist()}

    def present(q: list[int]) -> bool:
        return tuple(q) in quads or tuple(q[::-1]) in quads

    phi = md.compute_phi(villin)[0].tolist()
    psi = md.compute_psi(villin)[0].tolist()
    assert sum(map(present, phi)) >= len(phi) - 1
    assert sum(map(present, psi)) >= len(psi) - 1


def test_zmatrix_from_topology_tetraalanine():
    """The automatic table of ACE-(ALA)3-NME (systems/tetraalanine.pdb, 42 atoms) is valid and
    heavy-first, and names every backbone phi and psi of the three alanines as a torsion."""
    md = pytest.importorskip("mdtraj")
    path = Path(__file__).resolve().parents[2] / "systems" / "tetraalanine.pdb"
    if not path.exists():
        pytest.skip("systems/tetraalanine.pdb not written yet")
    traj = md.load(str(path))
    top = traj.top
    zmat = zmatrix_from_topology(top)
    validate_zmatrix(zmat, 42)
    assert sorted(zmat[:, 0].tolist()) == list(range(42))
    assert bonded_references(zmat, [(a.index, b.index) for a, b in top.bonds])
    is_h = np.array([a.element.symbol == "H" for a in top.atoms])
    assert torsion_refs_heavy_or_sibling(zmat, ~is_h)
    order_h = is_h[zmat[:, 0]]
    assert not (order_h[:-1] & ~order_h[1:]).any()
    quads = {tuple(q) for q in zmatrix_from_topology(top, sibling_torsions=False)[3:].tolist()}
    for q in md.compute_phi(traj)[0].tolist() + md.compute_psi(traj)[0].tolist():
        assert tuple(q) in quads or tuple(q[::-1]) in quads, q


def test_build_zmatrix_disconnected_raises():
    with pytest.raises(ValueError, match="disconnected"):
        build_zmatrix([(0, 1), (1, 2), (3, 4)], 5)
    with pytest.raises(ValueError, match="disconnected"):
        build_mixed_zmatrix([(0, 1), (1, 2), (3, 4)], 5, [0, 1, 2])


def test_build_zmatrix_bad_bonds_raise():
    with pytest.raises(ValueError, match="outside"):
        build_zmatrix([(0, 1), (1, 5)], 3)
    with pytest.raises(ValueError, match="itself"):
        build_zmatrix([(0, 1), (1, 1)], 2)


BAD_TABLES = [
    ([[0, -1, -1, -1], [1, 0, -1, -1], [2, 1, 0, -1], [3, 4, 1, 0], [4, 1, 0, 2]], "not placed"),
    ([[0, -1, -1, -1], [1, 0, -1, -1], [2, 1, 0, -1], [2, 1, 0, 3], [4, 1, 0, 2]], "more than once"),
    ([[0, -1, -1, -1], [1, 0, -1, -1], [2, 1, 0, -1], [3, 2, 1, 9], [4, 1, 0, 2]], "outside"),
    ([[0, -1, -1, -1], [1, 0, 2, -1], [2, 1, 0, -1], [3, 2, 1, 0], [4, 1, 0, 2]], "only 1 references"),
    ([[0, -1, -1, -1], [1, 0, -1, -1], [2, 1, 0, -1], [3, 2, 2, 0], [4, 1, 0, 2]], "distinct"),
    ([[0, -1, -1, -1], [1, 0, -1, -1], [2, 1, 0, -1], [3, 2, 1, 0]], "shape"),
]


@pytest.mark.parametrize("table,match", BAD_TABLES)
def test_validate_zmatrix_rejects_bad_tables(table, match):
    with pytest.raises(ValueError, match=match):
        validate_zmatrix(np.array(table), 5)


def test_validate_zmatrix_rejects_float_tables_and_accepts_a_user_table():
    with pytest.raises(ValueError, match="integer"):
        validate_zmatrix(np.zeros((3, 4)), 3)
    table = np.array([[4, -1, -1, -1], [2, 4, -1, -1], [0, 2, 4, -1], [1, 0, 2, 4], [3, 4, 2, 1]])
    checked = validate_zmatrix(table, 5)
    assert checked.dtype == np.int64 and (checked == table).all()


# ---------------------------------------------------------------------------------------------
# Mixed Z-matrices
# ---------------------------------------------------------------------------------------------


def test_build_mixed_zmatrix_places_the_non_cartesian_atoms():
    cart = [0, 1, 2, 4, 5]  # ring atoms except 3, which is placed internally like the hydrogens
    zmat = build_mixed_zmatrix(BENZENE, 12, cart)
    assert (validate_mixed_zmatrix(zmat, 12, cart) == zmat).all()
    assert sorted(zmat[:, 0].tolist()) == [3] + list(range(6, 12))
    assert (zmat[:, 1:] >= 0).all()
    assert bonded_references(zmat, BENZENE)
    with pytest.raises(ValueError, match="at least 3"):
        build_mixed_zmatrix(BENZENE, 12, [0, 1])


def test_mixed_zmatrix_with_protein_backbone_cartesian_has_heavy_references(villin):
    top = villin.top
    backbone = top.select("backbone").tolist()
    heavy = np.array([a.element.symbol != "H" for a in top.atoms])
    bonds = [(a.index, b.index) for a, b in top.bonds]
    zmat = build_mixed_zmatrix(bonds, top.n_atoms, backbone, heavy=heavy)
    validate_mixed_zmatrix(zmat, top.n_atoms, backbone)
    assert heavy[zmat[:, 1:]].all()
    assert bonded_references(zmat, bonds)


def test_validate_mixed_zmatrix():
    validate_mixed_zmatrix(np.array([[3, 0, 1, 2], [4, 3, 0, 1]]), 5, [0, 1, 2])
    with pytest.raises(ValueError, match="not placed"):
        validate_mixed_zmatrix(np.array([[3, 4, 1, 2], [4, 3, 0, 1]]), 5, [0, 1, 2])
    with pytest.raises(ValueError, match="at least 3"):
        validate_mixed_zmatrix(np.array([[2, 0, 1, 3]]), 4, [0, 1])
    with pytest.raises(ValueError, match="duplicates"):
        validate_mixed_zmatrix(np.array([[3, 0, 1, 2]]), 4, [0, 1, 1])
    with pytest.raises(ValueError, match="shape"):
        validate_mixed_zmatrix(np.array([[3, 0, 1, 2]]), 5, [0, 1, 2])
