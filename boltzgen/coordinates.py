"""Molecular coordinate transforms: Z-matrix internal coordinates and mixed Cartesian/internal.

All transforms follow the package convention (DESIGN.md): ``forward`` is the sampling direction,
latent/internal -> Cartesian, and ``inverse`` is the density direction. Cartesian states are flat
``[batch, 3 * n_atoms]`` tensors in nm (atom-major: ``x[:, 3 * a + c]`` is coordinate ``c`` of atom
``a``); ``inverse`` also accepts ``[batch, n_atoms, 3]``. Bonds are in nm, angles and torsions in
radians.

Z-matrix tables are integer arrays ``[n_rows, 4]``: row ``(i, j, k, l)`` places atom ``i`` at bond
length ``|x_i - x_j|``, angle ``angle(i, j, k)`` (at ``j``) and torsion ``dihedral(i, j, k, l)``
(IUPAC sign, the same value as ``mdtraj.compute_dihedrals``), relative to atoms placed in earlier
rows. Missing references are ``-1``.

Out-of-range internal coordinates produced by a flow. ``forward`` accepts any finite input and
never produces NaN for it: a negative bond places the atom on the opposite side of its reference; an
angle outside (0, pi) is used as given by the NeRF formula (theta and 2*pi - theta with the torsion
shifted by pi give the same point), so the map is not injective there. The log-det uses
``log|r|`` and ``log|sin theta|``, so it is the log of the local volume change everywhere and is
finite except on the measure-zero sets r = 0 or sin(theta) = 0, where it is ``-inf`` (not NaN). Such
configurations are physically strained; the energy, not this transform, is what penalizes them.
``inverse`` always returns bonds >= 0, angles in [0, pi] and torsions in [-pi, pi).

Linear arrangements of the three reference atoms of a row (e.g. CO2, alkynes) make that row's
torsion undefined; no Z-matrix of this form can represent such molecules without a singularity.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .transforms import Bijection

__all__ = [
    "L_CHIRALITY_SIGN",
    "InternalCoordinates",
    "MixedCoordinates",
    "build_mixed_zmatrix",
    "build_zmatrix",
    "chirality_sign",
    "dihedral",
    "find_alpha_carbon_chirality",
    "fit_internal_coordinates",
    "fit_mixed_coordinates",
    "is_l_chirality",
    "validate_mixed_zmatrix",
    "validate_zmatrix",
    "zmatrix_from_topology",
]

# Sign of det[N - CA, C - CA, CB - CA] for L-amino acids. Measured on every non-glycine residue of
# the villin headpiece bundled with OpenMM (openmm/app/data/test.pdb, an all-L protein); the test
# suite re-checks it on that file.
L_CHIRALITY_SIGN: int = 1

# Guards normalizations of (near-)zero vectors: the result is a finite zero vector, not NaN.
_NORM_EPS = 1e-12


# --------------------------------------------------------------------------------------------------
# Geometry primitives (batched; last dimension is xyz)
# --------------------------------------------------------------------------------------------------


def _bond(xi: Tensor, xj: Tensor) -> Tensor:
    """Distances ``|xi - xj|``; inputs ``[..., 3]``, output ``[...]``, in input length units."""
    return torch.linalg.vector_norm(xi - xj, dim=-1)


def _angle(xi: Tensor, xj: Tensor, xk: Tensor) -> Tensor:
    """Angle at ``xj`` between ``xi`` and ``xk`` in [0, pi] radians; inputs ``[..., 3]``."""
    u = xi - xj
    v = xk - xj
    # atan2 of (|u x v|, u.v) stays accurate near 0 and pi, where acos loses digits.
    return torch.atan2(torch.linalg.vector_norm(torch.cross(u, v, dim=-1), dim=-1), (u * v).sum(-1))


def dihedral(x0: Tensor, x1: Tensor, x2: Tensor, x3: Tensor) -> Tensor:
    """IUPAC dihedral angle of ``x0-x1-x2-x3`` in [-pi, pi) radians; inputs ``[..., 3]``.

    Same sign convention as ``mdtraj.compute_dihedrals``; symmetric under reversing the four points.
    """
    b1 = x1 - x0
    b2 = x2 - x1
    b3 = x3 - x2
    n1 = torch.cross(b1, b2, dim=-1)
    n2 = torch.cross(b2, b3, dim=-1)
    y = torch.linalg.vector_norm(b2, dim=-1) * (b1 * n2).sum(-1)
    phi = torch.atan2(y, (n1 * n2).sum(-1))
    return _wrap_half_open(phi)


def _wrap_half_open(phi: Tensor) -> Tensor:
    """Maps atan2's (-pi, pi] onto [-pi, pi) (only +pi moves)."""
    return torch.where(phi >= math.pi, phi - 2 * math.pi, phi)


def _wrap(phi: Tensor) -> Tensor:
    """Any angle onto [-pi, pi)."""
    return _wrap_half_open(torch.remainder(phi + math.pi, 2 * math.pi) - math.pi)


def _nerf(xj: Tensor, xk: Tensor, xl: Tensor, r: Tensor, theta: Tensor, phi: Tensor) -> Tensor:
    """Places atoms i with |i-j| = r, angle(i,j,k) = theta, dihedral(i,j,k,l) = phi.

    ``xj, xk, xl``: ``[batch, m, 3]``; ``r, theta, phi``: ``[batch, m]``. Returns ``[batch, m, 3]``.
    """
    bc = F.normalize(xj - xk, dim=-1, eps=_NORM_EPS)
    n = F.normalize(torch.cross(xk - xl, bc, dim=-1), dim=-1, eps=_NORM_EPS)
    m = torch.cross(n, bc, dim=-1)
    rs = r * torch.sin(theta)
    d_bc = -r * torch.cos(theta)
    d_m = rs * torch.cos(phi)
    d_n = rs * torch.sin(phi)
    return xj + d_bc.unsqueeze(-1) * bc + d_m.unsqueeze(-1) * m + d_n.unsqueeze(-1) * n


def _log_volume(r: Tensor, theta: Tensor) -> Tensor:
    """``log|r^2 sin(theta)|`` per placed atom, ``[batch, m]`` -> ``[batch, m]`` (see module doc)."""
    return 2 * torch.log(torch.abs(r)) + torch.log(torch.abs(torch.sin(theta)))


def _as_positions(x: Tensor, n_atoms: int | None = None) -> Tensor:
    """``[batch, 3N]`` or ``[batch, N, 3]`` -> ``[batch, N, 3]`` (a view when possible)."""
    if x.dim() == 3:
        if x.shape[-1] != 3 or (n_atoms is not None and x.shape[1] != n_atoms):
            raise ValueError(f"expected positions [batch, {n_atoms or 'N'}, 3], got {list(x.shape)}")
        return x
    if x.dim() != 2 or x.shape[1] % 3 != 0 or (n_atoms is not None and x.shape[1] != 3 * n_atoms):
        expected = f"3*{n_atoms}={3 * n_atoms}" if n_atoms is not None else "a multiple of 3"
        raise ValueError(f"expected flat positions [batch, {expected}], got {list(x.shape)}")
    return x.reshape(x.shape[0], -1, 3)


# --------------------------------------------------------------------------------------------------
# Z-matrix construction and validation
# --------------------------------------------------------------------------------------------------


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
    root: int | None = None,
    sibling_torsions: bool = True,
) -> np.ndarray:
    """A Z-matrix derived from the bond graph of one connected molecule.

    Args:
        bonds: pairs of atom indices, e.g. ``[(a.index, b.index) for a, b in top.bonds]``.
        n_atoms: number of atoms N.
        heavy_first: span the heavy atoms first so that they precede all light atoms and serve as
            the references of hydrogens; ``False`` gives a plain breadth-first tree.
        heavy: optional boolean mask ``[N]`` of heavy (non-hydrogen) atoms; without it, atoms with
            more than one bond are treated as heavy. ``zmatrix_from_topology`` fills it from elements.
        root: the first atom; by default a heavy atom at one end of the longest heavy-atom path.
        sibling_torsions: take the torsion of an atom against an earlier sibling (same bond and
            angle references) when there is one (see :func:`_use_sibling_torsions`).

    Returns:
        int64 array ``[N, 4]`` of rows ``(atom, bond_ref, angle_ref, torsion_ref)``, ``-1`` for the
        missing references of the first three rows. Every atom appears once; every reference is
        placed in an earlier row. Raises ``ValueError`` for a disconnected graph.
    """
    adj = _adjacency(bonds, n_atoms)
    _check_connected(adj)
    # Without heavy_first no atom is preferred: a plain breadth-first tree over the whole graph.
    heavy_mask = _heavy_mask(adj, heavy) if heavy_first else np.ones(n_atoms, dtype=bool)
    if root is None:
        allowed = heavy_mask if heavy_first and heavy_mask.any() else np.ones(n_atoms, dtype=bool)
        # A heavy subgraph split by light atoms cannot be swept alone; fall back to the full graph.
        if (_bfs_distances(adj, int(np.flatnonzero(allowed)[0]), allowed)[allowed] < 0).any():
            allowed = np.ones(n_atoms, dtype=bool)
        root = _pseudo_peripheral(adj, allowed)
    elif not 0 <= root < n_atoms:
        raise ValueError(f"root {root} outside [0, {n_atoms})")
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
    """Z-matrix rows ``[N - n_cart, 4]`` placing every non-Cartesian atom relative to placed atoms.

    The Cartesian atoms are placed first (they are the roots of a breadth-first spanning forest);
    all rows have three references, each a Cartesian atom or an atom of an earlier row. Needs at
    least three Cartesian atoms and a connected bond graph (``ValueError`` otherwise).
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
    """Checks a full Z-matrix ``[N, 4]`` and returns it as int64; raises ``ValueError`` if invalid.

    Row r needs min(r, 3) references, all in range, distinct, and placed in earlier rows; unused
    references are -1; every atom 0..N-1 appears exactly once in column 0.
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
    """Checks mixed-coordinate rows ``[N - n_cart, 4]`` (all with three references placed earlier or
    Cartesian; together with the Cartesian atoms every atom exactly once). Returns int64 rows."""
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
    """``build_zmatrix`` for an mdtraj or OpenMM topology, with hydrogens identified by element."""
    atoms = list(_iter(topology, "atoms"))
    bonds = [(_index(a), _index(b)) for a, b in _iter(topology, "bonds")]
    heavy = np.zeros(len(atoms), dtype=bool)
    for a in atoms:
        element = a.element
        symbol = getattr(element, "symbol", None) if element is not None else None
        heavy[_index(a)] = symbol not in ("H", "D")
    return build_zmatrix(bonds, len(atoms), heavy_first, heavy=heavy, sibling_torsions=sibling_torsions)


def _iter(obj: Any, name: str) -> Any:
    """mdtraj exposes ``top.atoms`` as a property, OpenMM as a method; accept both."""
    attr = getattr(obj, name)
    return attr() if callable(attr) else attr


def _index(atom: Any) -> int:
    return int(atom.index)


# --------------------------------------------------------------------------------------------------
# Placement schedule shared by both transforms
# --------------------------------------------------------------------------------------------------


def _schedule(rows: np.ndarray, initial: Sequence[int], first_gen: Sequence[int]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Groups three-reference rows into generations whose references are all placed already.

    ``initial`` atoms occupy slots ``0..len(initial)-1`` with generations ``first_gen``. Returns the
    row permutation (rows sorted by generation, stable), reference slots ``[M, 3]`` in that order,
    and the generation boundaries as offsets into the sorted rows.
    """
    gen = {int(a): int(g) for a, g in zip(initial, first_gen)}
    row_gen = np.empty(len(rows), dtype=np.int64)
    for r, (i, j, k, l) in enumerate(rows):
        row_gen[r] = 1 + max(gen[int(j)], gen[int(k)], gen[int(l)])
        gen[int(i)] = int(row_gen[r])
    perm = np.argsort(row_gen, kind="stable")
    slot = {int(a): s for s, a in enumerate(initial)}
    for s, r in enumerate(perm):
        slot[int(rows[r, 0])] = len(initial) + s
    ref_slots = np.array([[slot[int(v)] for v in rows[r, 1:]] for r in perm], dtype=np.int64).reshape(-1, 3)
    sorted_gen = row_gen[perm]
    bounds = [0] + [s for s in range(1, len(perm)) if sorted_gen[s] != sorted_gen[s - 1]] + [len(perm)]
    return perm, ref_slots, bounds if len(perm) else [0]


class _ZMatrixPlacer(torch.nn.Module):
    """NeRF placement of three-reference rows, generation by generation, vectorized over the batch.

    Holds integer buffers only. ``place(placed, r, theta, phi)`` takes the already placed atoms in
    slot order ``[batch, n_initial, 3]`` and per-row internal coordinates ``[batch, M]`` (in the
    original row order) and returns all atoms in slot order ``[batch, n_initial + M, 3]``.
    """

    def __init__(self, rows: np.ndarray, initial: Sequence[int], first_gen: Sequence[int]) -> None:
        super().__init__()
        perm, ref_slots, bounds = _schedule(rows, initial, first_gen)
        self.bounds = bounds
        self.register_buffer("perm", torch.as_tensor(perm, dtype=torch.long), persistent=False)
        self.register_buffer("ref_slots", torch.as_tensor(ref_slots, dtype=torch.long), persistent=False)

    @property
    def n_generations(self) -> int:
        return len(self.bounds) - 1

    def place(self, placed: Tensor, r: Tensor, theta: Tensor, phi: Tensor) -> Tensor:
        r, theta, phi = (t.index_select(1, self.perm) for t in (r, theta, phi))
        # Growing by concatenation (no in-place writes) keeps the graph friendly to torch.func.
        for s, e in zip(self.bounds[:-1], self.bounds[1:]):
            refs = self.ref_slots[s:e]
            xj, xk, xl = (placed.index_select(1, refs[:, c]) for c in range(3))
            new = _nerf(xj, xk, xl, r[:, s:e], theta[:, s:e], phi[:, s:e])
            placed = torch.cat([placed, new], dim=1)
        return placed


class _Standardization(torch.nn.Module):
    """Optional per-dimension affine map ``value = loc + scale * latent`` with buffers ``[dim]``."""

    def __init__(self, dim: int, loc: Tensor | None, scale: Tensor | None) -> None:
        super().__init__()
        if (loc is None) != (scale is None):
            raise ValueError("give both loc and scale for standardization, or neither")
        if loc is not None and scale is not None:
            loc = torch.as_tensor(loc)
            scale = torch.as_tensor(scale)
            if loc.shape != (dim,) or scale.shape != (dim,):
                raise ValueError(f"standardization loc/scale must have shape [{dim}], got {list(loc.shape)}, {list(scale.shape)}")
            if not (scale > 0).all():
                raise ValueError("standardization scales must be positive")
            loc, scale = loc.detach().clone(), scale.detach().clone()
        self.register_buffer("loc", loc)
        self.register_buffer("scale", scale)

    @property
    def active(self) -> bool:
        return self.loc is not None

    def to_value(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """latent ``[batch, dim]`` -> value, with ``log|det|`` ``[batch]``."""
        if self.loc is None or self.scale is None:
            return z, z.new_zeros(z.shape[0])
        scale = self.scale.to(z)
        return self.loc.to(z) + scale * z, torch.log(scale).sum().expand(z.shape[0])

    def to_latent(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """value ``[batch, dim]`` -> latent, with ``log|det|`` ``[batch]``."""
        if self.loc is None or self.scale is None:
            return v, v.new_zeros(v.shape[0])
        scale = self.scale.to(v)
        return (v - self.loc.to(v)) / scale, -torch.log(scale).sum().expand(v.shape[0])


# --------------------------------------------------------------------------------------------------
# Internal coordinates
# --------------------------------------------------------------------------------------------------


class InternalCoordinates(Bijection):
    """Z-matrix internal coordinates ``[batch, 3N-6]`` <-> Cartesian positions ``[batch, 3N]`` (nm).

    Latent layout: ``[bonds (N-1) | angles (N-2) | torsions (N-3)]``, entry ``m`` of each block
    belonging to Z-matrix row ``m+1``, ``m+2`` and ``m+3`` respectively. Bonds in nm, angles and
    torsions in rad. With standardization, the latent bond and angle entries are
    ``(value - mean) / std`` so that a flow sees roughly N(0, 1); torsions are only rotated by an
    offset and stay in [-pi, pi) (``circular_mask``) for circular splines and a uniform prior.

    ``forward`` builds the canonical frame: the first Z-matrix atom at the origin, the second on
    the +x axis, the third in the xy-plane with y > 0 (for a positive bond and an angle in
    (0, pi)). ``inverse`` accepts any pose and discards the six rigid-body degrees of freedom, so
    ``forward(inverse(x))`` equals ``x`` up to a rigid motion.

    ``logdet`` is exact for the map from the 3N-6 latents to the 3N-6 free Cartesian coordinates of
    the canonical frame (``free_cartesian_index``): ``log|r_3| + sum_{i>3} log|r_i^2 sin theta_i|``
    plus ``sum log std`` of the standardization. Densities from ``inverse`` are therefore densities
    over those canonical-frame coordinates. See the module docstring for out-of-range inputs.
    """

    def __init__(
        self,
        zmatrix: Any,
        mean: Tensor | None = None,
        std: Tensor | None = None,
    ) -> None:
        """``zmatrix``: ``[N, 4]`` table (validated), N >= 3. ``mean``/``std``: optional ``[3N-6]``
        standardization statistics; torsion entries of ``mean`` are offsets (circular means, wrapped
        into [-pi, pi)), their ``std`` is ignored (1): latent torsion = wrap(torsion - offset)."""
        super().__init__()
        zmat = np.asarray(zmatrix)
        n_atoms = int(zmat.shape[0]) if zmat.ndim == 2 else -1
        if n_atoms < 3:
            raise ValueError(f"internal coordinates need at least 3 atoms, got z-matrix shape {list(zmat.shape)}")
        zmat = validate_zmatrix(zmat, n_atoms)
        self.n_atoms = n_atoms
        self.dim_internal = 3 * n_atoms - 6
        self.n_bonds, self.n_angles, self.n_torsions = n_atoms - 1, n_atoms - 2, n_atoms - 3
        self.register_buffer("zmatrix", torch.as_tensor(zmat, dtype=torch.long), persistent=False)

        mask = torch.zeros(self.dim_internal, dtype=torch.bool)
        mask[self.n_bonds + self.n_angles :] = True
        self.register_buffer("circular_mask", mask, persistent=False)

        if mean is not None and std is not None:
            mean = torch.as_tensor(mean).clone()
            std = torch.as_tensor(std).clone()
            if mean.shape == (self.dim_internal,) and std.shape == (self.dim_internal,):
                # Torsions are only rotated (by their circular mean, which ``fit`` supplies), never
                # scaled: a rotation keeps them on the circle and puts a narrow peak such as an
                # improper's or omega's at 0, away from the spline's seam at ±pi.
                mean[mask] = _wrap(mean[mask])
                std[mask] = 1.0
        self.standardization = _Standardization(self.dim_internal, mean, std)

        first3 = [int(a) for a in zmat[:3, 0]]
        self.placer = _ZMatrixPlacer(zmat[3:], first3, [0, 1, 2])
        slot_order = first3 + [int(zmat[3 + r, 0]) for r in self.placer.perm.tolist()]
        atom_to_slot = np.empty(n_atoms, dtype=np.int64)
        atom_to_slot[slot_order] = np.arange(n_atoms)
        self.register_buffer("atom_to_slot", torch.as_tensor(atom_to_slot), persistent=False)
        # Third atom: its bond reference is slot 0 or 1 (the only placed atoms), the other is its angle reference.
        self._row2_bond_slot = 0 if int(zmat[2, 1]) == first3[0] else 1

        a1, a2 = first3[1], first3[2]
        free = [3 * a1] + [3 * a2, 3 * a2 + 1]
        for a in zmat[3:, 0]:
            free += [3 * int(a), 3 * int(a) + 1, 3 * int(a) + 2]
        self.register_buffer("free_cartesian_index", torch.as_tensor(free, dtype=torch.long), persistent=False)

    @classmethod
    def fit(cls, zmatrix: Any, x_data: Tensor, min_std: float = 1e-5) -> InternalCoordinates:
        """Same as :func:`fit_internal_coordinates`."""
        return fit_internal_coordinates(zmatrix, x_data, min_std)

    @property
    def n_generations(self) -> int:
        """Number of vectorized placement steps after the first three atoms."""
        return self.placer.n_generations

    def split(self, ic: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[batch, 3N-6]`` -> bonds ``[batch, N-1]``, angles ``[batch, N-2]``, torsions ``[batch, N-3]``."""
        return torch.split(ic, [self.n_bonds, self.n_angles, self.n_torsions], dim=1)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Latent internal coordinates ``[batch, 3N-6]`` -> Cartesian ``[batch, 3N]`` nm, log|det| ``[batch]``."""
        if z.dim() != 2 or z.shape[1] != self.dim_internal:
            raise ValueError(f"expected internal coordinates [batch, {self.dim_internal}], got {list(z.shape)}")
        ic, logdet = self.standardization.to_value(z)
        bonds, angles, torsions = self.split(ic)
        batch = z.shape[0]
        zero = z.new_zeros(batch)
        p0 = z.new_zeros(batch, 3)
        p1 = torch.stack([bonds[:, 0], zero, zero], dim=-1)
        pj, pk = (p0, p1) if self._row2_bond_slot == 0 else (p1, p0)
        u = F.normalize(pk - pj, dim=-1, eps=_NORM_EPS)
        r2, t2 = bonds[:, 1:2], angles[:, 0:1]
        e_y = torch.stack([zero, zero + 1, zero], dim=-1)
        p2 = pj + r2 * torch.cos(t2) * u + r2 * torch.sin(t2) * e_y
        placed = torch.stack([p0, p1, p2], dim=1)
        placed = self.placer.place(placed, bonds[:, 2:], angles[:, 1:], torsions)
        x = placed.index_select(1, self.atom_to_slot).reshape(batch, 3 * self.n_atoms)
        logdet = logdet + self._log_volume(bonds, angles)
        return x, logdet

    def _log_volume(self, bonds: Tensor, angles: Tensor) -> Tensor:
        """``log|dx_free / d(ic)|`` ``[batch]`` from raw bonds and angles."""
        # Atom 2 (x only): factor 1. Atom 3 (polar coordinates in the xy-plane): |r|. Others: r^2 sin.
        ld = torch.log(torch.abs(bonds[:, 1]))
        return ld + _log_volume(bonds[:, 2:], angles[:, 1:]).sum(dim=1)

    def internal(self, x: Tensor) -> Tensor:
        """Raw (unstandardized) internal coordinates ``[batch, 3N-6]`` of positions ``[batch, 3N]``
        or ``[batch, N, 3]``: bonds >= 0 nm, angles in [0, pi], torsions in [-pi, pi)."""
        pos = _as_positions(x, self.n_atoms)
        zm = self.zmatrix
        xi = pos.index_select(1, zm[1:, 0])
        bonds = _bond(xi, pos.index_select(1, zm[1:, 1]))
        angles = _angle(xi[:, 1:], pos.index_select(1, zm[2:, 1]), pos.index_select(1, zm[2:, 2]))
        torsions = dihedral(
            xi[:, 2:], pos.index_select(1, zm[3:, 1]), pos.index_select(1, zm[3:, 2]), pos.index_select(1, zm[3:, 3])
        )
        return torch.cat([bonds, angles, torsions], dim=1)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Cartesian ``[batch, 3N]`` (any pose) -> latent ``[batch, 3N-6]``, log|det| ``[batch]``."""
        ic = self.internal(x)
        bonds, angles, _ = self.split(ic)
        z, logdet = self.standardization.to_latent(ic)
        z = torch.where(self.circular_mask, _wrap(z), z)
        return z, logdet - self._log_volume(bonds, angles)


def fit_internal_coordinates(zmatrix: Any, x_data: Tensor, min_std: float = 1e-5) -> InternalCoordinates:
    """``InternalCoordinates`` whose bonds and angles are standardized with statistics of ``x_data``.

    ``x_data``: MD samples ``[n, 3N]`` (or ``[n, N, 3]``) in nm, n >= 2. Means and standard
    deviations (floored at ``min_std``, nm or rad, so rigid dimensions do not give log 0) are stored
    as buffers in the dtype of ``x_data``. Torsions are rotated by their circular mean, not scaled.
    """
    plain = InternalCoordinates(zmatrix)
    if x_data.shape[0] < 2:
        raise ValueError(f"need at least 2 samples to fit standardization, got {x_data.shape[0]}")
    with torch.no_grad():
        ic = plain.internal(x_data)
        mean = ic.mean(dim=0)
        std = ic.std(dim=0).clamp_min(min_std)
        torsions = plain.circular_mask
        mean[torsions] = torch.atan2(torch.sin(ic[:, torsions]).mean(0), torch.cos(ic[:, torsions]).mean(0))
    return InternalCoordinates(plain.zmatrix.cpu().numpy(), mean=mean, std=std).to(x_data.device)


# --------------------------------------------------------------------------------------------------
# Mixed Cartesian / internal coordinates
# --------------------------------------------------------------------------------------------------


class MixedCoordinates(Bijection):
    """Some atoms kept Cartesian, the rest placed by bond/angle/torsion: latent ``[batch, 3N]``.

    Latent layout: ``[cartesian (3 * n_cart, atom-major in the order of cartesian_atoms) | bonds (M)
    | angles (M) | torsions (M)]`` with M = N - n_cart, entry m of each block belonging to row m of
    the mixed Z-matrix. The Cartesian block is passed through unchanged (no rigid-body removal), so
    the latent dimension equals 3N and ``logdet`` is the exact full Jacobian:
    ``sum_rows log|r^2 sin theta|`` plus ``sum log std`` of the optional bond/angle standardization.
    ``circular_mask`` is True on the torsions. ``forward(inverse(x)) == x`` exactly (no frame).
    """

    def __init__(
        self,
        cartesian_atoms: Sequence[int],
        zmatrix: Any,
        n_atoms: int,
        mean: Tensor | None = None,
        std: Tensor | None = None,
    ) -> None:
        """``zmatrix``: ``[N - n_cart, 4]`` rows with three references each (validated).
        ``mean``/``std``: optional ``[3N]`` statistics; only bond and angle entries are used."""
        super().__init__()
        cart = [int(a) for a in cartesian_atoms]
        zmat = validate_mixed_zmatrix(zmatrix, n_atoms, cart)
        self.n_atoms = n_atoms
        self.n_cartesian = len(cart)
        self.n_internal = n_atoms - len(cart)
        self.dim_internal = 3 * n_atoms
        self.register_buffer("cartesian_atoms", torch.as_tensor(cart, dtype=torch.long), persistent=False)
        self.register_buffer("zmatrix", torch.as_tensor(zmat, dtype=torch.long).reshape(-1, 4), persistent=False)

        n_c = 3 * self.n_cartesian
        mask = torch.zeros(self.dim_internal, dtype=torch.bool)
        mask[n_c + 2 * self.n_internal :] = True
        self.register_buffer("circular_mask", mask, persistent=False)

        if mean is not None and std is not None:
            mean = torch.as_tensor(mean).clone()
            std = torch.as_tensor(std).clone()
            if mean.shape == (self.dim_internal,) and std.shape == (self.dim_internal,):
                keep = torch.zeros(self.dim_internal, dtype=torch.bool)
                keep[n_c : n_c + 2 * self.n_internal] = True
                mean[~keep] = 0.0
                std[~keep] = 1.0
        self.standardization = _Standardization(self.dim_internal, mean, std)

        self.placer = _ZMatrixPlacer(zmat, cart, [0] * len(cart))
        slot_order = cart + [int(zmat[r, 0]) for r in self.placer.perm.tolist()]
        atom_to_slot = np.empty(n_atoms, dtype=np.int64)
        atom_to_slot[slot_order] = np.arange(n_atoms)
        self.register_buffer("atom_to_slot", torch.as_tensor(atom_to_slot), persistent=False)

    @classmethod
    def from_bonds(
        cls,
        bonds: Sequence[tuple[int, int]],
        n_atoms: int,
        cartesian_atoms: Sequence[int],
        heavy: Sequence[bool] | np.ndarray | None = None,
    ) -> MixedCoordinates:
        """Builds the Z-matrix for the non-Cartesian atoms with :func:`build_mixed_zmatrix`."""
        zmat = build_mixed_zmatrix(bonds, n_atoms, cartesian_atoms, heavy=heavy)
        return cls(cartesian_atoms, zmat, n_atoms)

    @classmethod
    def fit(
        cls, cartesian_atoms: Sequence[int], zmatrix: Any, n_atoms: int, x_data: Tensor, min_std: float = 1e-5
    ) -> MixedCoordinates:
        """Same as :func:`fit_mixed_coordinates`."""
        return fit_mixed_coordinates(cartesian_atoms, zmatrix, n_atoms, x_data, min_std)

    @property
    def n_generations(self) -> int:
        """Number of vectorized placement steps."""
        return self.placer.n_generations

    def split(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``[batch, 3N]`` -> cartesian ``[batch, 3 n_cart]``, bonds, angles, torsions ``[batch, M]``."""
        m = self.n_internal
        return torch.split(w, [3 * self.n_cartesian, m, m, m], dim=1)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Latent ``[batch, 3N]`` -> Cartesian ``[batch, 3N]`` nm, log|det| ``[batch]``."""
        if z.dim() != 2 or z.shape[1] != self.dim_internal:
            raise ValueError(f"expected mixed coordinates [batch, {self.dim_internal}], got {list(z.shape)}")
        w, logdet = self.standardization.to_value(z)
        cart, bonds, angles, torsions = self.split(w)
        batch = z.shape[0]
        placed = self.placer.place(cart.reshape(batch, self.n_cartesian, 3), bonds, angles, torsions)
        x = placed.index_select(1, self.atom_to_slot).reshape(batch, 3 * self.n_atoms)
        return x, logdet + _log_volume(bonds, angles).sum(dim=1)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Cartesian ``[batch, 3N]`` -> latent ``[batch, 3N]``, log|det| ``[batch]``."""
        pos = _as_positions(x, self.n_atoms)
        batch = pos.shape[0]
        zm = self.zmatrix
        cart = pos.index_select(1, self.cartesian_atoms).reshape(batch, 3 * self.n_cartesian)
        xi = pos.index_select(1, zm[:, 0])
        xj, xk, xl = (pos.index_select(1, zm[:, c]) for c in (1, 2, 3))
        bonds = _bond(xi, xj)
        angles = _angle(xi, xj, xk)
        torsions = dihedral(xi, xj, xk, xl)
        z, logdet = self.standardization.to_latent(torch.cat([cart, bonds, angles, torsions], dim=1))
        return z, logdet - _log_volume(bonds, angles).sum(dim=1)


def fit_mixed_coordinates(
    cartesian_atoms: Sequence[int], zmatrix: Any, n_atoms: int, x_data: Tensor, min_std: float = 1e-5
) -> MixedCoordinates:
    """``MixedCoordinates`` with bonds and angles standardized by statistics of ``x_data`` ``[n, 3N]``
    (nm, n >= 2); the Cartesian block and the torsions stay raw."""
    plain = MixedCoordinates(cartesian_atoms, zmatrix, n_atoms)
    if x_data.shape[0] < 2:
        raise ValueError(f"need at least 2 samples to fit standardization, got {x_data.shape[0]}")
    with torch.no_grad():
        w, _ = plain.inverse(x_data)
        mean = w.mean(dim=0)
        std = w.std(dim=0).clamp_min(min_std)
    return MixedCoordinates(cartesian_atoms, zmatrix, n_atoms, mean=mean, std=std).to(x_data.device)


# --------------------------------------------------------------------------------------------------
# Chirality
# --------------------------------------------------------------------------------------------------


def chirality_sign(x: Tensor, center: int, neighbors: tuple[int, int, int]) -> Tensor:
    """Sign of det[a - c, b - c, d - c] for center c and neighbours (a, b, d), ``[batch]``.

    ``x``: ``[batch, 3N]`` or ``[batch, N, 3]``. Returns -1, 0 or +1 in the dtype of ``x``; a mirror
    image flips it.
    """
    pos = _as_positions(x)
    c = pos[:, center]
    a, b, d = (pos[:, n] - c for n in neighbors)
    return torch.sign((a * torch.cross(b, d, dim=-1)).sum(-1))


def find_alpha_carbon_chirality(topology: Any) -> np.ndarray:
    """``[n_chiral, 4]`` int64 rows ``(CA, N, C, CB)`` for residues that have all four atoms.

    Accepts an mdtraj or OpenMM topology; glycine (no CB) and non-amino-acid residues are skipped.
    For L-amino acids, ``chirality_sign(x, CA, (N, C, CB)) == L_CHIRALITY_SIGN``.
    """
    rows = []
    for res in _iter(topology, "residues"):
        names = {a.name: _index(a) for a in _iter(res, "atoms")}
        if all(n in names for n in ("CA", "N", "C", "CB")):
            rows.append((names["CA"], names["N"], names["C"], names["CB"]))
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def is_l_chirality(x: Tensor, topology: Any) -> Tensor:
    """BoolTensor ``[batch]``: every alpha carbon of ``topology`` has L chirality in ``x``.

    ``x``: ``[batch, 3N]`` or ``[batch, N, 3]`` nm. ``topology`` may also be the ``[n, 4]`` array of
    :func:`find_alpha_carbon_chirality` (cheaper inside loops). No chiral centers -> all True.
    """
    quads = topology if isinstance(topology, (np.ndarray, Tensor)) else find_alpha_carbon_chirality(topology)
    pos = _as_positions(x)
    idx = torch.as_tensor(np.asarray(quads), dtype=torch.long, device=pos.device).reshape(-1, 4)
    if idx.shape[0] == 0:
        return torch.ones(pos.shape[0], dtype=torch.bool, device=pos.device)
    c, a, b, d = (pos.index_select(1, idx[:, m]) for m in range(4))
    vol = ((a - c) * torch.cross(b - c, d - c, dim=-1)).sum(-1)
    return (torch.sign(vol) == L_CHIRALITY_SIGN).all(dim=1)
