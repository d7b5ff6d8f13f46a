"""Angles, bond geometry, dihedrals and chirality: each computed once, here.

Positions are ``[..., 3]`` in any length unit (nm at the package's edges). Angles are in radians.
Torch functions are batched and differentiable; :func:`wrap_angle` also takes numpy arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

Angles = TypeVar("Angles", Tensor, np.ndarray)

# Sign of det[N - CA, C - CA, CB - CA] for L-amino acids. Measured on every non-glycine residue of
# the villin headpiece bundled with OpenMM (openmm/app/data/test.pdb, an all-L protein); the test
# suite re-checks it on that file.
L_CHIRALITY_SIGN: int = 1


def wrap_angle(angle: Angles) -> Angles:
    """Angles mapped onto ``[-pi, pi)``; a tensor stays a tensor (same dtype), anything else becomes float64 numpy."""
    if isinstance(angle, Tensor):
        wrapped = torch.remainder(angle + math.pi, 2 * math.pi) - math.pi
        # remainder can round up to exactly 2*pi for tiny negative arguments.
        return torch.where(wrapped >= math.pi, wrapped - 2 * math.pi, wrapped)
    wrapped = np.remainder(np.asarray(angle, dtype=np.float64) + math.pi, 2 * math.pi) - math.pi
    return np.where(wrapped >= math.pi, wrapped - 2 * math.pi, wrapped)


def wrap_circular(z: Tensor, circular: Tensor | None) -> Tensor:
    """Wrap the dimensions of ``z`` (``[..., dim]``) flagged in the ``[dim]`` bool mask ``circular``
    into [-pi, pi); the others pass unchanged (all of them when ``circular`` is None)."""
    if circular is None or not bool(circular.any()):
        return z
    return torch.where(circular, wrap_angle(z), z)


def bond_length(xi: Tensor, xj: Tensor) -> Tensor:
    """Distances ``|xi - xj|``; inputs ``[..., 3]``, output ``[...]``, in input length units."""
    return torch.linalg.vector_norm(xi - xj, dim=-1)


def bond_angle(xi: Tensor, xj: Tensor, xk: Tensor) -> Tensor:
    """Angle at ``xj`` between ``xi`` and ``xk`` in [0, pi] radians; inputs ``[..., 3]``."""
    u = xi - xj
    v = xk - xj
    # atan2 of (|u x v|, u.v) stays accurate near 0 and pi, where acos loses digits.
    return torch.atan2(torch.linalg.vector_norm(torch.cross(u, v, dim=-1), dim=-1), (u * v).sum(-1))


def dihedral(x0: Tensor, x1: Tensor, x2: Tensor, x3: Tensor) -> Tensor:
    """IUPAC dihedral angle of ``x0-x1-x2-x3`` in [-pi, pi) radians; inputs ``[..., 3]``, output ``[...]``.

    Same sign convention as OpenMM and ``mdtraj.compute_dihedrals``; symmetric under reversing the
    four points.
    """
    b1 = x1 - x0
    b2 = x2 - x1
    b3 = x3 - x2
    n1 = torch.cross(b1, b2, dim=-1)
    n2 = torch.cross(b2, b3, dim=-1)
    y = torch.linalg.vector_norm(b2, dim=-1) * (b1 * n2).sum(-1)
    phi = torch.atan2(y, (n1 * n2).sum(-1))
    return torch.where(phi >= math.pi, phi - 2 * math.pi, phi)  # atan2's +pi onto -pi


def dihedrals_rad(positions: np.ndarray | Tensor, atoms: Sequence[Sequence[int]]) -> np.ndarray:
    """Dihedrals of several atom quadruples, float64 numpy ``[T, n]`` (``[n]`` for one frame).

    ``positions``: ``[T, n_atoms, 3]`` or ``[n_atoms, 3]``; ``atoms``: ``n`` quadruples of atom indices.
    """
    x = torch.as_tensor(np.asarray(positions, dtype=np.float64))
    idx = torch.as_tensor(np.asarray(atoms, dtype=np.int64).reshape(-1, 4))
    points = [x.index_select(-2, idx[:, m]) for m in range(4)]
    return dihedral(*points).numpy()


def as_positions(x: Tensor, n_atoms: int | None = None) -> Tensor:
    """``[batch, 3N]`` or ``[batch, N, 3]`` -> ``[batch, N, 3]`` (a view when possible)."""
    if x.dim() == 3:
        if x.shape[-1] != 3 or (n_atoms is not None and x.shape[1] != n_atoms):
            raise ValueError(f"expected positions [batch, {n_atoms or 'N'}, 3], got {list(x.shape)}")
        return x
    if x.dim() != 2 or x.shape[1] % 3 != 0 or (n_atoms is not None and x.shape[1] != 3 * n_atoms):
        expected = f"3*{n_atoms}={3 * n_atoms}" if n_atoms is not None else "a multiple of 3"
        raise ValueError(f"expected flat positions [batch, {expected}], got {list(x.shape)}")
    return x.reshape(x.shape[0], -1, 3)


def topology_items(obj: Any, name: str) -> Any:
    """``obj.atoms``/``obj.residues``/...: mdtraj exposes them as properties, OpenMM as methods; accept both."""
    attr = getattr(obj, name)
    return attr() if callable(attr) else attr


def find_alpha_carbon_chirality(topology: Any) -> np.ndarray:
    """``[n_chiral, 4]`` int64 rows ``(CA, N, C, CB)`` for residues that have all four atoms.

    Accepts an mdtraj or OpenMM topology; glycine (no CB) and non-amino-acid residues are skipped.
    For an L-amino acid the sign of det[N - CA, C - CA, CB - CA] is :data:`L_CHIRALITY_SIGN`.
    """
    rows = []
    for res in topology_items(topology, "residues"):
        names = {a.name: int(a.index) for a in topology_items(res, "atoms")}
        if all(n in names for n in ("CA", "N", "C", "CB")):
            rows.append((names["CA"], names["N"], names["C"], names["CB"]))
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def is_l_chirality(x: Tensor, topology: Any) -> Tensor:
    """BoolTensor ``[batch]``: every alpha carbon of ``topology`` has L chirality in ``x``.

    ``x``: ``[batch, 3N]`` or ``[batch, N, 3]`` nm. ``topology`` may also be the ``[n, 4]`` array of
    :func:`find_alpha_carbon_chirality` (cheaper inside loops). No chiral centers -> all True.
    """
    quads = topology if isinstance(topology, (np.ndarray, Tensor)) else find_alpha_carbon_chirality(topology)
    pos = as_positions(x)
    idx = torch.as_tensor(np.asarray(quads), dtype=torch.long, device=pos.device).reshape(-1, 4)
    if idx.shape[0] == 0:
        return torch.ones(pos.shape[0], dtype=torch.bool, device=pos.device)
    c, a, b, d = (pos.index_select(1, idx[:, m]) for m in range(4))
    vol = ((a - c) * torch.cross(b - c, d - c, dim=-1)).sum(-1)
    return (torch.sign(vol) == L_CHIRALITY_SIGN).all(dim=1)
