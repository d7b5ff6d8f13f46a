"""Z-matrix tables: built from the bond graph of one connected molecule, and validated.

A Z-matrix is an integer array ``[n_rows, 4]``. Row ``(i, j, k, l)`` places atom ``i`` at bond
length ``|x_i - x_j|`` (nm), angle ``angle(i, j, k)`` at ``j`` and torsion ``dihedral(i, j, k, l)``
(radians, IUPAC sign, the same value as ``mdtraj.compute_dihedrals``), relative to atoms placed in
earlier rows. Missing references are ``-1``. A full Z-matrix (for ``InternalCoordinates``) has one
row per atom, and its first three rows carry 0, 1 and 2 references; a mixed Z-matrix (for
``MixedCoordinates``) has one row per non-Cartesian atom, each with three references that are
Cartesian atoms or atoms of earlier rows. Both transforms live in :mod:`boltzgen.flows.internal`.

Linear arrangements of the three reference atoms of a row (CO2, alkynes) make that row's torsion
undefined; no Z-matrix of this form can represent such molecules without a singularity.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from boltzgen.geometry import topology_items


def _adjacency(bonds: Sequence[tuple[int, int]], n_atoms: int) -> list[list[int]]:
    """Sorted neighbour lists; raises ValueError on out-of-range or self bonds."""
    if n_atoms < 1:
        raise ValueError(f"n_atoms must be >= 1, got {n_atoms}")
    nbrs: list[set[int]] = [set() for _ in range(n_atoms)]
    for bond in bonds:
        a, b = (int(v) for v in bond)
        if not (0 <= a < n_atoms and 0 <= b < n_atoms):
            raise ValueError(f"bond {(a, b)} has an atom index outside [0, {n_atoms})")
        if a == b:
            raise ValueError(f"bond {(a, b)} connects an atom to itself")
        nbrs[a].add(b)
        nbrs[b].add(a)
    return [sorted(s) for s in nbrs]


def _bfs_distances(adj: list[list[int]], source: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """Graph distances from ``source`` (-1 where unreachable), optionally within ``allowed`` atoms."""
    dist = np.full(len(adj), -1, dtype=np.int64)
    dist[source] = 0
    queue = deque([source])
    while queue:
        a = queue.popleft()
        for b in adj[a]:
            if dist[b] < 0 and (allowed is None or allowed[b]):
                dist[b] = dist[a] + 1
                queue.append(b)
    return dist


def _check_connected(adj: list[list[int]]) -> None:
    """Raises ``ValueError``, naming the number of components, unless the bond graph is connected."""
    dist = _bfs_distances(adj, 0)
    if (dist < 0).any():
        n_comp, seen = 0, np.zeros(len(adj), dtype=bool)
        for a in range(len(adj)):
            if not seen[a]:
                n_comp += 1
                seen |= _bfs_distances(adj, a) >= 0
        missing = np.flatnonzero(dist < 0)[:10].tolist()
        raise ValueError(
            f"the bond graph is disconnected ({n_comp} components; e.g. atoms {missing} are not "
            "reachable from atom 0). A single Z-matrix needs one connected molecule: remove "
            "solvent/ions or add the missing bonds."
        )


def _heavy_mask(adj: list[list[int]], heavy: Sequence[bool] | np.ndarray | None) -> np.ndarray:
    """Which atoms are preferred as references. Without element information, non-leaf atoms."""
    n = len(adj)
    if heavy is None:
        mask = np.array([len(nb) > 1 for nb in adj], dtype=bool)
        if not mask.any():
            mask[:] = True
        return mask
    mask = np.asarray(heavy, dtype=bool)
    if mask.shape != (n,):
        raise ValueError(f"heavy mask must have shape [{n}], got {list(mask.shape)}")
    return mask


def _pseudo_peripheral(adj: list[list[int]], allowed: np.ndarray) -> int:
    """An atom at one end of a (near-)longest shortest path, by two BFS sweeps (lowest index on ties)."""
    start = int(np.flatnonzero(allowed)[0])
    for _ in range(2):
        dist = _bfs_distances(adj, start, allowed)
        start = int(np.argmax(dist))  # argmax returns the lowest index among ties
    return start


def _spanning_tree(
    adj: list[list[int]], sources: Sequence[int], heavy: np.ndarray, heavy_first: bool
) -> tuple[list[int], np.ndarray]:
    """BFS order of the atoms not in ``sources`` and their tree parents (-1 for sources).

    With ``heavy_first``, heavy atoms are spanned first through heavy-heavy bonds only, so that heavy
    atoms get heavy parents (and hence heavy angle/torsion references) and all light atoms come last.
    """
    n = len(adj)
    parent = np.full(n, -1, dtype=np.int64)
    visited = np.zeros(n, dtype=bool)
    visited[list(sources)] = True
    order: list[int] = []

    def sweep(frontier: Sequence[int], allowed: np.ndarray | None) -> None:
        queue = deque(frontier)
        while queue:
            a = queue.popleft()
            for b in adj[a]:
                if not visited[b] and (allowed is None or allowed[b]):
                    visited[b] = True
                    parent[b] = a
                    order.append(b)
                    queue.append(b)

    if heavy_first:
        sweep([s for s in sources if heavy[s]], heavy)
    # Light atoms (and any heavy atom reachable only through a light one) hang off the placed atoms.
    sweep(list(sources) + list(order), None)
    return order, parent


def _choose_refs(
    i: int, adj: list[list[int]], parent: np.ndarray, placed: set[int], heavy: np.ndarray
) -> tuple[int, int, int]:
    """Bond, angle and torsion references (j, k, l) for atom ``i`` among ``placed`` atoms.

    The preferred choice follows the spanning tree (j = parent(i), k = parent(j), l = parent(k)), a
    bonded chain, so backbone dihedrals such as phi/psi show up as explicit torsions. Near the tree's
    roots the fallbacks are bonded neighbours of k or j, then the placed atoms closest to j in the
    graph. Any heavy candidate beats every light one, so hydrogens never serve as references when a
    heavy atom is available.
    """
    j = int(parent[i])
    dist_cache: dict[int, list[int]] = {}

    def by_distance(center: int) -> list[int]:
        if center not in dist_cache:
            dist = _bfs_distances(adj, center)
            cands = [a for a in placed if dist[a] >= 0]
            dist_cache[center] = sorted(cands, key=lambda a: (dist[a], a))
        return dist_cache[center]

    def pick(tiers: Sequence[Callable[[], Sequence[int]]], exclude: set[int]) -> int:
        # A heavy atom from any tier beats a light one from an earlier tier.
        for need_heavy in (True, False):
            for tier in tiers:
                for c in tier():
                    if c >= 0 and c in placed and c not in exclude and (heavy[c] or not need_heavy):
                        return int(c)
        return -1

    k = pick([lambda: [int(parent[j])], lambda: adj[j], lambda: by_distance(j)], {i, j})
    l = pick(
        [lambda: [int(parent[k])], lambda: adj[k], lambda: adj[j], lambda: by_distance(j)],
        {i, j, k},
    )
    return j, k, l


def build_zmatrix(
    bonds: Sequence[tuple[int, int]],
    n_atoms: int,
    heavy_first: bool = True,
    *,
    heavy: Sequence[bool] | np.ndarray | None = None,
    sibling_torsions: bool = True,
) -> np.ndarray:
    """A full Z-matrix ``[n_atoms, 4]`` (int64) derived from the bond graph of one connected molecule.

    ``bonds`` are pairs of atom indices, such as ``[(a.index, b.index) for a, b in top.bonds]``,
    for ``n_atoms`` atoms. With ``heavy_first`` the heavy atoms are spanned first, so that they
    precede all light atoms and serve as the references of hydrogens; ``False`` gives a plain
    breadth-first tree. ``heavy`` is an optional boolean mask ``[n_atoms]`` of heavy (non-hydrogen)
    atoms; without it, atoms with more than one bond count as heavy (:func:`zmatrix_from_topology`
    fills it from the elements). The first atom is a heavy atom at one end of the longest heavy-atom
    path. With ``sibling_torsions``, an atom that shares its bond and angle references with an
    earlier one takes its torsion against that sibling (see :func:`_use_sibling_torsions`).

    Returns rows ``(atom, bond_ref, angle_ref, torsion_ref)`` with ``-1`` for the missing references
    of the first three rows: every atom appears once, and every reference is placed in an earlier
    row. Raises ``ValueError`` for a disconnected graph or an invalid bond.
    """
    adj = _adjacency(bonds, n_atoms)
    _check_connected(adj)
    # Without heavy_first no atom is preferred: a plain breadth-first tree over the whole graph.
    heavy_mask = _heavy_mask(adj, heavy) if heavy_first else np.ones(n_atoms, dtype=bool)
    allowed = heavy_mask if heavy_first and heavy_mask.any() else np.ones(n_atoms, dtype=bool)
    # A heavy subgraph split by light atoms cannot be swept alone; fall back to the full graph.
    if (_bfs_distances(adj, int(np.flatnonzero(allowed)[0]), allowed)[allowed] < 0).any():
        allowed = np.ones(n_atoms, dtype=bool)
    root = _pseudo_peripheral(adj, allowed)
    order, parent = _spanning_tree(adj, [root], heavy_mask, heavy_first)
    order = [root] + order

    zmat = np.full((n_atoms, 4), -1, dtype=np.int64)
    placed: set[int] = set()
    for row, i in enumerate(order):
        zmat[row, 0] = i
        if row == 1:
            zmat[row, 1] = root
        elif row == 2:
            zmat[row, 1] = parent[i]
            zmat[row, 2] = order[1] if parent[i] == root else root
        elif row >= 3:
            zmat[row, 1:] = _choose_refs(i, adj, parent, placed, heavy_mask)
        placed.add(i)
    if sibling_torsions:
        _use_sibling_torsions(zmat)
    validate_zmatrix(zmat, n_atoms)
    return zmat


def _use_sibling_torsions(zmat: np.ndarray) -> None:
    """Rewrite in place the torsion reference of every atom that shares its bond and angle references
    with an earlier atom (a sibling): the torsion is then taken against that sibling.

    Siblings such as the three hydrogens of a methyl group, or CB and C on an alpha carbon, would
    otherwise each carry a torsion about the same bond, the same rotation up to a ~120° offset: three
    tightly coupled circular variables that a flow must learn. Against the first sibling, the later
    ones become near-constant improper-like torsions (about ±120°), and only the first one rotates.
    """
    first_sibling: dict[tuple[int, int], int] = {}
    for row in range(3, zmat.shape[0]):
        atom, bond_ref, angle_ref, _ = (int(v) for v in zmat[row])
        key = (bond_ref, angle_ref)
        if key in first_sibling:
            zmat[row, 3] = first_sibling[key]
        else:
            first_sibling[key] = atom


def build_mixed_zmatrix(
    bonds: Sequence[tuple[int, int]],
    n_atoms: int,
    cartesian_atoms: Sequence[int],
    heavy_first: bool = True,
    *,
    heavy: Sequence[bool] | np.ndarray | None = None,
) -> np.ndarray:
    """A mixed Z-matrix ``[n_atoms - n_cart, 4]`` (int64) placing every atom not in ``cartesian_atoms``.

    ``bonds``, ``n_atoms``, ``heavy_first`` and ``heavy`` mean what they mean for
    :func:`build_zmatrix`. The Cartesian atoms are placed first (they are the roots of a
    breadth-first spanning forest); every row has three references, each a Cartesian atom or an atom
    of an earlier row. Needs at least three distinct Cartesian atoms and a connected bond graph;
    raises ``ValueError`` otherwise.
    """
    adj = _adjacency(bonds, n_atoms)
    _check_connected(adj)
    cart = [int(a) for a in cartesian_atoms]
    _check_cartesian_atoms(cart, n_atoms)
    heavy_mask = _heavy_mask(adj, heavy) if heavy_first else np.ones(n_atoms, dtype=bool)
    order, parent = _spanning_tree(adj, cart, heavy_mask, heavy_first)
    zmat = np.full((len(order), 4), -1, dtype=np.int64)
    placed = set(cart)
    for row, i in enumerate(order):
        zmat[row, 0] = i
        zmat[row, 1:] = _choose_refs(i, adj, parent, placed, heavy_mask)
        placed.add(i)
    validate_mixed_zmatrix(zmat, n_atoms, cart)
    return zmat


def _check_cartesian_atoms(cart: Sequence[int], n_atoms: int) -> None:
    """Raises ``ValueError`` unless ``cart`` holds at least three distinct atom indices in range."""
    if len(cart) < 3:
        raise ValueError(f"mixed coordinates need at least 3 Cartesian atoms, got {len(cart)}")
    if len(set(cart)) != len(cart):
        raise ValueError("cartesian_atoms contains duplicates")
    bad = [a for a in cart if not 0 <= a < n_atoms]
    if bad:
        raise ValueError(f"cartesian_atoms {bad} outside [0, {n_atoms})")


def _check_rows(zmat: np.ndarray, n_atoms: int, placed: set[int], n_refs: Sequence[int], what: str) -> None:
    """Shared row checks: ``n_refs[r]`` references required in row r, the rest must be -1."""
    for r, row in enumerate(zmat):
        i = int(row[0])
        if not 0 <= i < n_atoms:
            raise ValueError(f"{what} row {r}: atom {i} outside [0, {n_atoms})")
        if i in placed:
            raise ValueError(f"{what} row {r}: atom {i} appears more than once")
        need = n_refs[r]
        refs = [int(v) for v in row[1 : 1 + need]]
        if any(v != -1 for v in row[1 + need :]):
            raise ValueError(f"{what} row {r}: only {need} references allowed, missing ones must be -1")
        for v in refs:
            if not 0 <= v < n_atoms:
                raise ValueError(f"{what} row {r}: reference {v} outside [0, {n_atoms})")
            if v not in placed:
                raise ValueError(f"{what} row {r}: reference {v} of atom {i} is not placed before it")
        if len(set(refs + [i])) != need + 1:
            raise ValueError(f"{what} row {r}: atom and references must be distinct, got {row.tolist()}")
        placed.add(i)


def validate_zmatrix(zmatrix: Any, n_atoms: int) -> np.ndarray:
    """Checks a full Z-matrix ``[n_atoms, 4]`` and returns it as int64; raises ``ValueError`` if invalid.

    Row r needs min(r, 3) references, all in range, distinct, and placed in earlier rows; unused
    references are -1; every atom ``0 .. n_atoms - 1`` appears exactly once in column 0.
    """
    zmat = np.asarray(zmatrix)
    if zmat.ndim != 2 or zmat.shape[1] != 4 or zmat.shape[0] != n_atoms:
        raise ValueError(f"z-matrix must have shape [{n_atoms}, 4], got {list(zmat.shape)}")
    if not np.issubdtype(zmat.dtype, np.integer):
        raise ValueError(f"z-matrix must be integer, got {zmat.dtype}")
    zmat = zmat.astype(np.int64)
    _check_rows(zmat, n_atoms, set(), [min(r, 3) for r in range(n_atoms)], "z-matrix")
    return zmat


def validate_mixed_zmatrix(zmatrix: Any, n_atoms: int, cartesian_atoms: Sequence[int]) -> np.ndarray:
    """Checks a mixed Z-matrix ``[n_atoms - n_cart, 4]`` and returns it as int64.

    Every row needs three distinct references, each a Cartesian atom or an atom of an earlier row;
    together with ``cartesian_atoms`` the rows name every atom exactly once. Raises ``ValueError``
    if the table or the Cartesian atoms are invalid.
    """
    cart = [int(a) for a in cartesian_atoms]
    _check_cartesian_atoms(cart, n_atoms)
    zmat = np.asarray(zmatrix)
    n_rows = n_atoms - len(cart)
    if zmat.ndim != 2 or zmat.shape[1] != 4 or zmat.shape[0] != n_rows:
        raise ValueError(f"mixed z-matrix must have shape [{n_rows}, 4], got {list(zmat.shape)}")
    if n_rows and not np.issubdtype(zmat.dtype, np.integer):
        raise ValueError(f"z-matrix must be integer, got {zmat.dtype}")
    zmat = zmat.astype(np.int64).reshape(n_rows, 4)
    _check_rows(zmat, n_atoms, set(cart), [3] * n_rows, "mixed z-matrix")
    return zmat


def zmatrix_from_topology(topology: Any, heavy_first: bool = True, sibling_torsions: bool = True) -> np.ndarray:
    """:func:`build_zmatrix` for an mdtraj or OpenMM ``topology``, hydrogens identified by element.

    Hydrogen and deuterium atoms are light; all others, those without an element included, are heavy.
    Returns the int64 table ``[n_atoms, 4]``.
    """
    atoms = list(topology_items(topology, "atoms"))
    bonds = [(int(a.index), int(b.index)) for a, b in topology_items(topology, "bonds")]
    heavy = np.zeros(len(atoms), dtype=bool)
    for a in atoms:
        element = a.element
        symbol = getattr(element, "symbol", None) if element is not None else None
        heavy[int(a.index)] = symbol not in ("H", "D")
    return build_zmatrix(bonds, len(atoms), heavy_first, heavy=heavy, sibling_torsions=sibling_torsions)
