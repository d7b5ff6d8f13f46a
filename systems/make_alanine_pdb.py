"""Build ACE-(ALA)n-NME PDB files: ``systems/alanine-dipeptide.pdb`` (n = 1, 22 atoms) and
``systems/tetraalanine.pdb`` (n = 3, 42 atoms); L-alanines, each in the C7eq basin.

Heavy atoms come from ideal internal geometry (NeRF placement) with phi = -80 deg and psi = 75 deg
in every alanine; hydrogens from ``Modeller.addHydrogens``; then a vacuum amber14 minimization.
The stdlib RNG that addHydrogens uses is seeded and minimization runs on Reference, so reruns give
the same file, except that about one run in ten ends the minimization ~1e-4 nm away (a change in the
last printed digit; cause not found): rerun if ``git diff`` shows one.
Run: ``python systems/make_alanine_pdb.py`` (the dipeptide) or
``python systems/make_alanine_pdb.py --residues 3 --out systems/tetraalanine.pdb``.
"""

from __future__ import annotations

import argparse
import io
import random
from dataclasses import dataclass
from pathlib import Path

import mdtraj
import numpy as np
import openmm
from openmm import app, unit

HERE = Path(__file__).parent
#: Where each chain length is written unless --out says otherwise.
DEFAULT_OUT = {1: HERE / "alanine-dipeptide.pdb", 3: HERE / "tetraalanine.pdb"}
#: Atoms per residue once hydrogens are added: ACE and NME 6 each, ALA 10.
ATOMS_PER_ALA, ATOMS_IN_CAPS = 10, 12

Key = tuple[int, str]  # (residue index: 0 ACE, 1..n ALA, n + 1 NME; atom name)


def place(a: np.ndarray, b: np.ndarray, c: np.ndarray, bond_A: float, angle_deg: float, dihedral_deg: float) -> np.ndarray:
    """Position d (Å) with |cd| = bond, angle b-c-d and dihedral a-b-c-d."""
    bc = (c - b) / np.linalg.norm(c - b)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.cross(n, bc)
    theta, phi = np.radians(angle_deg), np.radians(dihedral_deg)
    local = np.array([-np.cos(theta), np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi)])
    return c + bond_A * (local[0] * bc + local[1] * m + local[2] * n)


def heavy_atoms(n_ala: int = 1, phi: float = -80.0, psi: float = 75.0) -> dict[Key, np.ndarray]:
    """Heavy-atom positions in Å of ACE-(ALA)n-NME, keyed (residue index, atom name); every alanine
    gets the same phi and psi (degrees) and trans peptide bonds."""
    p: dict[Key, np.ndarray] = {}
    cap = n_ala + 1  # the NME residue
    p[0, "CH3"] = np.array([0.0, 0.0, 0.0])
    p[0, "C"] = np.array([1.52, 0.0, 0.0])
    p[1, "N"] = place(np.array([0.0, 1.0, 0.0]), p[0, "CH3"], p[0, "C"], 1.33, 116.0, 180.0)
    p[1, "CA"] = place(p[0, "CH3"], p[0, "C"], p[1, "N"], 1.46, 122.0, 180.0)  # omega
    previous_c = (0, "C")
    for i in range(1, n_ala + 1):
        p[i, "C"] = place(p[previous_c], p[i, "N"], p[i, "CA"], 1.52, 111.0, phi)
        p[i + 1, "N"] = place(p[i, "N"], p[i, "CA"], p[i, "C"], 1.33, 116.0, psi)
        next_alpha = (cap, "C") if i == n_ala else (i + 1, "CA")
        p[next_alpha] = place(p[i, "CA"], p[i, "C"], p[i + 1, "N"], 1.45 if i == n_ala else 1.46, 122.0, 180.0)  # omega
        previous_c = (i, "C")
    # Trans peptides put each carbonyl O cis to the next residue's alpha carbon.
    p[0, "O"] = place(p[1, "CA"], p[1, "N"], p[0, "C"], 1.23, 123.0, 0.0)
    for i in range(1, n_ala + 1):
        next_alpha = (cap, "C") if i == n_ala else (i + 1, "CA")
        p[i, "O"] = place(p[next_alpha], p[i + 1, "N"], p[i, "C"], 1.23, 123.0, 0.0)
        # -122.5 deg about N-CA from C gives the L configuration (checked in build()).
        p[i, "CB"] = place(p[i, "C"], p[i, "N"], p[i, "CA"], 1.53, 110.5, -122.5)
    return p


def heavy_topology(n_ala: int) -> tuple[app.Topology, list[Key]]:
    """The heavy-atom topology of ACE-(ALA)n-NME with its bonds, and the key of each atom in order."""
    top = app.Topology()
    chain = top.addChain()
    names = ["ACE", *["ALA"] * n_ala, "NME"]
    residues = [top.addResidue(name, chain) for name in names]
    keys: list[Key] = [(0, "CH3"), (0, "C"), (0, "O")]
    keys += [(i, name) for i in range(1, n_ala + 1) for name in ("N", "CA", "CB", "C", "O")]
    keys += [(n_ala + 1, "N"), (n_ala + 1, "C")]
    elements = {"C": app.element.carbon, "N": app.element.nitrogen, "O": app.element.oxygen}
    created = {key: top.addAtom(key[1], elements[key[1][0]], residues[key[0]]) for key in keys}
    bonds: list[tuple[Key, Key]] = [((0, "CH3"), (0, "C")), ((0, "C"), (0, "O")), ((0, "C"), (1, "N"))]
    for i in range(1, n_ala + 1):
        bonds += [((i, "N"), (i, "CA")), ((i, "CA"), (i, "CB")), ((i, "CA"), (i, "C")), ((i, "C"), (i, "O")),
                  ((i, "C"), (i + 1, "N"))]
    bonds.append(((n_ala + 1, "N"), (n_ala + 1, "C")))
    for a, b in bonds:
        top.addBond(created[a], created[b])
    return top, keys


def chirality_volume(x: np.ndarray, n: int, ca: int, c: int, cb: int) -> float:
    """(N-CA)·((C-CA)×(CB-CA)); positive for L amino acids (as in OpenMM's test.pdb)."""
    return float(np.dot(x[n] - x[ca], np.cross(x[c] - x[ca], x[cb] - x[ca])))


@dataclass(frozen=True)
class Peptide:
    """A built ACE-(ALA)n-NME: ``positions_nm`` ``[n_atoms, 3]``, its backbone torsions in degrees
    (one per alanine), the alpha carbons' chirality volumes (nm³, positive = L) and the minimized
    amber14 vacuum energy (kJ/mol)."""

    topology: app.Topology
    positions_nm: np.ndarray
    phi_deg: np.ndarray
    psi_deg: np.ndarray
    chirality_nm3: np.ndarray
    energy_kJ_mol: float


def build(n_ala: int) -> Peptide:
    """ACE-(ALA)n-NME from ideal geometry, hydrogens added and minimized; checks the atom count, the
    L configuration of every alpha carbon and phi < 0 (AssertionError otherwise)."""
    top, keys = heavy_topology(n_ala)
    atoms = heavy_atoms(n_ala)
    positions = [atoms[key] * 0.1 for key in keys]
    ff = app.ForceField("amber14-all.xml")
    random.seed(0)  # addHydrogens starts hydrogens from random.random() positions
    modeller = app.Modeller(top, np.array(positions) * unit.nanometer)
    modeller.addHydrogens(ff)
    system = ff.createSystem(modeller.topology, nonbondedMethod=app.NoCutoff, constraints=None, rigidWater=False)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(modeller.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 1e-3, 0)
    state = context.getState(getPositions=True, getEnergy=True)
    x = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)

    index = {(a.residue.index, a.name): a.index for a in modeller.topology.atoms()}
    volumes = np.array([chirality_volume(x, index[i, "N"], index[i, "CA"], index[i, "C"], index[i, "CB"])
                        for i in range(1, n_ala + 1)])
    traj = mdtraj.Trajectory(x[None], mdtraj.Topology.from_openmm(modeller.topology))
    phi = np.degrees(mdtraj.compute_phi(traj)[1][0])
    psi = np.degrees(mdtraj.compute_psi(traj)[1][0])
    n_atoms = modeller.topology.getNumAtoms()
    assert n_atoms == ATOMS_IN_CAPS + ATOMS_PER_ALA * n_ala, n_atoms
    assert (volumes > 0).all(), f"alpha carbon(s) not L: chirality volumes {volumes}"
    assert (phi < 0).all(), phi
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    return Peptide(modeller.topology, x, phi, psi, volumes, energy)


def write_pdb(peptide: Peptide, out: Path) -> None:
    """Write ``peptide`` to ``out`` without OpenMM's REMARK line, whose date would change every rerun."""
    buffer = io.StringIO()
    app.PDBFile.writeFile(peptide.topology, peptide.positions_nm * unit.nanometer, buffer)
    out.write_text("".join(line for line in buffer.getvalue().splitlines(True) if not line.startswith("REMARK")))


def main(argv: list[str] | None = None) -> None:
    """Build ACE-(ALA)n-NME for ``--residues n`` and write it to ``--out`` (or the default file of that n)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--residues", type=int, default=1, help="alanines between the ACE and NME caps (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="the PDB to write (default: "
                        + ", ".join(f"{path.name} for {n}" for n, path in DEFAULT_OUT.items()) + ")")
    args = parser.parse_args(argv)
    if args.residues < 1:
        parser.error(f"--residues must be at least 1, got {args.residues}")
    out = args.out or DEFAULT_OUT.get(args.residues)
    if out is None:
        parser.error(f"--residues {args.residues} has no default file name; give --out")
    peptide = build(args.residues)
    write_pdb(peptide, out)
    angles = ", ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(peptide.phi_deg, peptide.psi_deg))
    volumes = ", ".join(f"{v:.4f}" for v in peptide.chirality_nm3)
    print(f"wrote {out}: phi/psi={angles} deg, U={peptide.energy_kJ_mol:.3f} kJ/mol, "
          f"chirality volume={volumes} nm^3")


if __name__ == "__main__":
    main()
