"""Collective variables given by atoms: torsions, distances and Cartesian coordinates.

A config names a CV in one of three ways (see :class:`boltzgen.baseline_config.UmbrellaCV`):

- a backbone torsion: ``phi``, ``psi`` (the first residue's; ``phi0``, ``psi0``), ``phi1``, ``psi1``,
  ... in residue order, with mdtraj's atom definitions (the CVs :mod:`boltzgen.states` gives a
  molecule);
- a Cartesian coordinate: ``x``, ``y`` or ``z`` of a one-particle system, or ``x0``, ``x1``, ... the
  flattened coordinates (``x<3a + axis>`` is atom ``a``'s), as the states of a system without
  torsions name them;
- a CV of its own name from atoms: ``torsion`` (four atoms), ``distance`` (two) or ``coordinate``
  (an atom and an axis). An atom is its index (from 0) or its name as mdtraj prints it
  (``ALA2-CA``: residue name, residue number, atom name), or a bare atom name (``CA``) where it
  is unique.

:func:`resolve_cv` turns such a name against a topology into a :class:`CollectiveVariable`, and
:func:`evaluate_cvs` computes CVs of positions in float64: torsions in radians in [-pi, pi),
distances and coordinates in nm. Problems are ``ValueError`` with one line naming the config key.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from boltzgen.geometry import dihedrals_rad, wrap_angle

CVKind = Literal["torsion", "distance", "coordinate"]
#: Backbone torsions by name: phi, psi, phi0, psi3, ...
BACKBONE_TORSION = re.compile(r"^(phi|psi)(\d*)$")
#: The Cartesian coordinates of a one-particle system.
AXES = {"x": 0, "y": 1, "z": 2}
#: A flattened Cartesian coordinate: x0, x1, ... (atom i // 3, axis i % 3).
FLAT_COORDINATE = re.compile(r"^x(\d+)$")
#: How many atoms each kind of CV takes.
N_ATOMS = {"torsion": 4, "distance": 2, "coordinate": 1}


def builtin_kind(name: str) -> CVKind | None:
    """The kind of a built-in CV name (``phi3`` is a torsion, ``x`` and ``x4`` coordinates), ``None`` otherwise."""
    if BACKBONE_TORSION.match(name):
        return "torsion"
    return "coordinate" if name in AXES or FLAT_COORDINATE.match(name) else None


@dataclass(frozen=True)
class CollectiveVariable:
    """A CV of a molecule: ``kind`` of the atoms ``atoms`` (indices from 0; ``axis`` 0, 1, 2 for a coordinate).

    Torsions are periodic, in radians; distances and coordinates are lengths in nm.
    """

    name: str
    kind: CVKind
    atoms: tuple[int, ...]
    axis: int | None = None

    @property
    def periodic(self) -> bool:
        return self.kind == "torsion"

    @property
    def unit(self) -> str:
        return "rad" if self.periodic else "nm"


def _atom_labels(topology: Any) -> list[str]:
    """``ALA2-CA`` for every atom, in index order (mdtraj's ``str(atom)``)."""
    import mdtraj

    if not isinstance(topology, mdtraj.Topology):
        topology = mdtraj.Topology.from_openmm(topology)
    return [str(atom) for atom in topology.atoms]


def resolve_atom(ref: int | str, labels: Sequence[str], where: str) -> int:
    """The index of the atom ``ref``: an index below ``len(labels)``, a label such as ``ALA2-CA``, or
    an atom name unique in the topology. ``where`` is the config key for the error."""
    n = len(labels)
    if isinstance(ref, (int, np.integer)) and not isinstance(ref, bool):
        if not 0 <= ref < n:
            raise ValueError(f"{where}: atom index {ref} is out of range; the system has {n} atoms (0 to {n - 1})")
        return int(ref)
    text = str(ref).strip()
    if text in labels:
        return labels.index(text)
    by_name = [i for i, label in enumerate(labels) if label.rsplit("-", 1)[-1] == text]
    if len(by_name) == 1:
        return by_name[0]
    if by_name:
        choices = ", ".join(labels[i] for i in by_name[:4])
        raise ValueError(f"{where}: atom name {text!r} is not unique; name the residue too, e.g. {choices}")
    examples = ", ".join(labels[:3])
    raise ValueError(f"{where}: no atom {text!r} in the system; name atoms by index or as mdtraj prints them "
                     f"(e.g. {examples})")


def resolve_cv(name: str, topology: Any, where: str, *, torsion: Sequence[int | str] | None = None,
               distance: Sequence[int | str] | None = None,
               coordinate: tuple[int | str, str] | None = None) -> CollectiveVariable:
    """The CV ``name`` of the molecule with ``topology`` (mdtraj or OpenMM), defined by one of
    ``torsion``, ``distance``, ``coordinate`` or, when none is given, by the built-in name.

    ``where`` (e.g. ``umbrella.cvs[0]``) starts every error message: an unknown atom, a backbone
    torsion the molecule lacks, ``x`` for a system of more than one particle.
    """
    labels = _atom_labels(topology)
    given = {kind: atoms for kind, atoms in (("torsion", torsion), ("distance", distance)) if atoms is not None}
    if coordinate is not None:
        atom = resolve_atom(coordinate[0], labels, f"{where}.coordinate[0]")
        return CollectiveVariable(name, "coordinate", (atom,), AXES[coordinate[1]])
    for kind, refs in given.items():
        atoms = tuple(resolve_atom(ref, labels, f"{where}.{kind}[{i}]") for i, ref in enumerate(refs))
        if len(set(atoms)) != len(atoms):
            raise ValueError(f"{where}.{kind}: the atoms {list(refs)} name the same atom twice")
        return CollectiveVariable(name, kind, atoms)  # type: ignore[arg-type]
    if name in AXES:
        if len(labels) != 1:
            raise ValueError(f"{where}: {name} is a coordinate of a one-particle system, and this one has "
                             f"{len(labels)} atoms; give {{name: ..., coordinate: [ATOM, {name}]}}")
        return CollectiveVariable(name, "coordinate", (0,), AXES[name])
    flat = FLAT_COORDINATE.match(name)
    if flat is not None:
        i = int(flat.group(1))
        if i >= 3 * len(labels):
            raise ValueError(f"{where}: {name} is beyond the {3 * len(labels)} coordinates of this system")
        return CollectiveVariable(name, "coordinate", (i // 3,), i % 3)
    match = BACKBONE_TORSION.match(name)
    if match is None:
        raise ValueError(f"{where}: {name!r} is no built-in CV (phi, psi, phiN, psiN, x, y, z, xN); define it by "
                         "atoms with torsion:, distance: or coordinate:")
    from boltzgen.states import backbone_torsions

    try:
        torsions = backbone_torsions(topology)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    key = match.group(1) + (match.group(2) or "0")
    if key not in torsions:
        raise ValueError(f"{where}: the molecule has no torsion {name}; it has {', '.join(torsions)}")
    return CollectiveVariable(name, "torsion", torsions[key])


def evaluate_cvs(positions_nm: Any, cvs: Sequence[CollectiveVariable]) -> dict[str, np.ndarray]:
    """The CVs of every frame, float64 ``[N]`` each, keyed by name.

    ``positions_nm``: ``[N, n_atoms, 3]`` (or ``[N, 3 n_atoms]``) in nm. Torsions are in radians
    in [-pi, pi), distances and coordinates in nm.
    """
    xyz = np.asarray(positions_nm, dtype=np.float64)
    if xyz.ndim == 2:
        xyz = xyz.reshape(xyz.shape[0], -1, 3)
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise ValueError(f"positions must have shape [N, n_atoms, 3] in nm, got {xyz.shape}")
    out: dict[str, np.ndarray] = {}
    for cv in cvs:
        if max(cv.atoms) >= xyz.shape[1]:
            raise ValueError(f"CV {cv.name} needs atom {max(cv.atoms)}; the positions have {xyz.shape[1]} atoms")
        if cv.kind == "torsion":
            out[cv.name] = wrap_angle(dihedrals_rad(xyz, [cv.atoms])[:, 0])
        elif cv.kind == "distance":
            out[cv.name] = np.linalg.norm(xyz[:, cv.atoms[0]] - xyz[:, cv.atoms[1]], axis=-1)
        else:
            out[cv.name] = xyz[:, cv.atoms[0], cv.axis].copy()
    return out


def displacement(values: np.ndarray, center: float | np.ndarray, periodic: bool) -> np.ndarray:
    """``values - center``, by the minimum image on the circle for a periodic CV (rad), float64."""
    d = np.asarray(values, dtype=np.float64) - center
    return wrap_angle(d) if periodic else d
