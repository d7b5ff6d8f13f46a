"""Rotors: three identical terminal atoms on one atom (a methyl's hydrogens), and their relabelling.

Relabelling a rotor's three atoms by a cyclic shift (1, 2, 3) -> (2, 3, 1) maps a configuration onto
one with the same energy that the molecule reaches by turning the rotor 120°, so the Boltzmann
distribution gives every shift the same weight. MD crosses a methyl's barrier (~6 kT for alanine's
CB) a few dozen times in nanoseconds, so its frames hold the three wells unequally (0.46/0.35/0.19
for alanine's CB methyl in 3 ns at 300 K), and a flow trained on them copies the imbalance. Drawing
a random shift per rotor for every training frame removes it exactly. Shifts that swap two atoms are
not used: they give the mirror arrangement, which turning the rotor never reaches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from boltzgen.geometry import as_positions, topology_items


def find_rotors(topology: Any) -> np.ndarray:
    """``[n_rotors, 3]`` int64: the atoms of every rotor of an mdtraj or OpenMM topology.

    A rotor is three atoms of one element, each bonded to nothing but the same fourth atom, which has
    exactly four bonds (a methyl's or an ammonium's hydrogens, a CF3's fluorines). Whether they are
    identical to the force field is not checked here (see :func:`energy_invariant_rotors`).
    """
    atoms = list(topology_items(topology, "atoms"))
    neighbours: list[list[int]] = [[] for _ in atoms]
    for bond in topology_items(topology, "bonds"):
        a, b = int(bond[0].index), int(bond[1].index)
        neighbours[a].append(b)
        neighbours[b].append(a)
    rotors = []
    for center, nbrs in enumerate(neighbours):
        if len(nbrs) != 4:
            continue
        terminal = sorted(n for n in nbrs if len(neighbours[n]) == 1)
        by_element: dict[str, list[int]] = {}
        for n in terminal:
            element = atoms[n].element
            by_element.setdefault(getattr(element, "symbol", str(element)), []).append(n)
        rotors += [group for group in by_element.values() if len(group) == 3]
    return np.array(rotors, dtype=np.int64).reshape(-1, 3)


def relabel(x: Tensor, rotors: Tensor, shifts: Tensor) -> Tensor:
    """Positions ``x`` ``[batch, 3N]`` with rotor ``r``'s atoms cyclically shifted by ``shifts[:, r]``.

    ``rotors``: ``[n_rotors, 3]`` atom indices; ``shifts``: ``[batch, n_rotors]`` in {0, 1, 2}. Atom
    ``rotors[r, k]`` takes the position of ``rotors[r, (k + shift) % 3]``. Returns ``[batch, 3N]``.
    """
    pos = as_positions(x)
    batch, n_atoms = pos.shape[:2]
    source = torch.arange(n_atoms, device=x.device).expand(batch, n_atoms).clone()
    slots = torch.arange(3, device=x.device)
    for r in range(rotors.shape[0]):
        source[:, rotors[r]] = rotors[r][(slots + shifts[:, r : r + 1]) % 3]
    return pos.gather(1, source.unsqueeze(-1).expand(batch, n_atoms, 3)).reshape(batch, 3 * n_atoms)


def random_relabel(x: Tensor, rotors: Tensor) -> Tensor:
    """``x`` ``[batch, 3N]`` with an independent uniform cyclic shift of every rotor in every row."""
    if rotors.shape[0] == 0:
        return x
    shifts = torch.randint(0, 3, (x.shape[0], rotors.shape[0]), device=x.device)
    return relabel(x, rotors, shifts)


def energy_invariant_rotors(rotors: np.ndarray, energy: Any, frames: Tensor, tolerance_kT: float = 1e-6) -> tuple[
        np.ndarray, list[Sequence[int]]]:
    """The rotors whose shifts leave ``energy`` (reduced, float64) unchanged on ``frames`` ``[n, 3N]``
    nm, and the others: rotors whose atoms the force field tells apart are not symmetric."""
    x = frames.to(torch.float64)
    reference = energy(x)
    kept, dropped = [], []
    for rotor in rotors:
        one = torch.as_tensor(rotor, device=x.device).reshape(1, 3)
        shifted = energy(relabel(x, one, torch.ones(x.shape[0], 1, dtype=torch.long, device=x.device)))
        same = torch.allclose(shifted, reference, rtol=0.0, atol=tolerance_kT * max(1.0, float(reference.abs().max())))
        (kept if same else dropped).append(rotor)
    return np.array(kept, dtype=np.int64).reshape(-1, 3), [list(map(int, r)) for r in dropped]
