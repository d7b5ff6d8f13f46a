"""Regenerate ``systems/alanine-dipeptide.pdb`` (ACE-ALA-NME, 22 atoms, L-alanine, C7eq basin).

Heavy atoms come from ideal internal geometry (NeRF placement) with phi = -80 deg and psi = 75 deg;
hydrogens from ``Modeller.addHydrogens``; then a vacuum amber14 minimization. Deterministic: the
stdlib RNG that addHydrogens uses is seeded, and minimization runs on Reference. Run: ``python systems/make_alanine_pdb.py``.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import mdtraj
import numpy as np
import openmm
from openmm import app, unit

OUT = Path(__file__).with_name("alanine-dipeptide.pdb")


def place(a: np.ndarray, b: np.ndarray, c: np.ndarray, bond_A: float, angle_deg: float, dihedral_deg: float) -> np.ndarray:
    """Position d (Å) with |cd| = bond, angle b-c-d and dihedral a-b-c-d."""
    bc = (c - b) / np.linalg.norm(c - b)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.cross(n, bc)
    theta, phi = np.radians(angle_deg), np.radians(dihedral_deg)
    local = np.array([-np.cos(theta), np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi)])
    return c + bond_A * (local[0] * bc + local[1] * m + local[2] * n)


def heavy_atoms(phi: float = -80.0, psi: float = 75.0) -> dict[str, np.ndarray]:
    """Heavy-atom positions in Å, keyed 'RES:NAME'."""
    p: dict[str, np.ndarray] = {}
    p["ACE:CH3"] = np.array([0.0, 0.0, 0.0])
    p["ACE:C"] = np.array([1.52, 0.0, 0.0])
    p["ALA:N"] = place(np.array([0.0, 1.0, 0.0]), p["ACE:CH3"], p["ACE:C"], 1.33, 116.0, 180.0)
    p["ALA:CA"] = place(p["ACE:CH3"], p["ACE:C"], p["ALA:N"], 1.46, 122.0, 180.0)  # omega
    p["ALA:C"] = place(p["ACE:C"], p["ALA:N"], p["ALA:CA"], 1.52, 111.0, phi)
    p["NME:N"] = place(p["ALA:N"], p["ALA:CA"], p["ALA:C"], 1.33, 116.0, psi)
    p["NME:C"] = place(p["ALA:CA"], p["ALA:C"], p["NME:N"], 1.45, 122.0, 180.0)  # omega
    # Trans peptides put each carbonyl O cis to the next residue's alpha carbon.
    p["ACE:O"] = place(p["ALA:CA"], p["ALA:N"], p["ACE:C"], 1.23, 123.0, 0.0)
    p["ALA:O"] = place(p["NME:C"], p["NME:N"], p["ALA:C"], 1.23, 123.0, 0.0)
    # -122.5 deg about N-CA from C gives the L configuration (checked below).
    p["ALA:CB"] = place(p["ALA:C"], p["ALA:N"], p["ALA:CA"], 1.53, 110.5, -122.5)
    return p


def chirality_volume(x: np.ndarray, n: int, ca: int, c: int, cb: int) -> float:
    """(N-CA)·((C-CA)×(CB-CA)); positive for L amino acids (as in OpenMM's test.pdb)."""
    return float(np.dot(x[n] - x[ca], np.cross(x[c] - x[ca], x[cb] - x[ca])))


def main() -> None:
    atoms = heavy_atoms()
    top = app.Topology()
    chain = top.addChain()
    positions = []
    elements = {"C": app.element.carbon, "N": app.element.nitrogen, "O": app.element.oxygen}
    residues: dict[str, app.topology.Residue] = {}
    for res_name in ("ACE", "ALA", "NME"):
        residues[res_name] = top.addResidue(res_name, chain)
    created = {}
    for key in ("ACE:CH3", "ACE:C", "ACE:O", "ALA:N", "ALA:CA", "ALA:CB", "ALA:C", "ALA:O", "NME:N", "NME:C"):
        res_name, atom_name = key.split(":")
        created[key] = top.addAtom(atom_name, elements[atom_name[0]], residues[res_name])
        positions.append(atoms[key] * 0.1)
    for a, b in [("ACE:CH3", "ACE:C"), ("ACE:C", "ACE:O"), ("ACE:C", "ALA:N"), ("ALA:N", "ALA:CA"),
                 ("ALA:CA", "ALA:CB"), ("ALA:CA", "ALA:C"), ("ALA:C", "ALA:O"), ("ALA:C", "NME:N"),
                 ("NME:N", "NME:C")]:
        top.addBond(created[a], created[b])

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

    index = {(a.residue.name, a.name): a.index for a in modeller.topology.atoms()}
    vol = chirality_volume(x, index[("ALA", "N")], index[("ALA", "CA")], index[("ALA", "C")], index[("ALA", "CB")])
    traj = mdtraj.Trajectory(x[None], mdtraj.Topology.from_openmm(modeller.topology))
    phi = np.degrees(mdtraj.compute_phi(traj)[1][0, 0])
    psi = np.degrees(mdtraj.compute_psi(traj)[1][0, 0])
    assert modeller.topology.getNumAtoms() == 22, modeller.topology.getNumAtoms()
    assert vol > 0, "alpha carbon is not L"
    assert phi < 0, phi
    buffer = io.StringIO()
    app.PDBFile.writeFile(modeller.topology, x * unit.nanometer, buffer)
    # OpenMM stamps the date in a REMARK; drop it so reruns give byte-identical files.
    OUT.write_text("".join(line for line in buffer.getvalue().splitlines(True) if not line.startswith("REMARK")))
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    print(f"wrote {OUT}: phi={phi:.1f} psi={psi:.1f} deg, U={energy:.3f} kJ/mol, chirality volume={vol:.4f} nm^3")


if __name__ == "__main__":
    main()
