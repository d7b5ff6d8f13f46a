"""Molecular coordinate bijections: Z-matrix internal coordinates and mixed Cartesian/internal.

Both transforms follow the package convention: ``forward`` is the sampling direction,
latent/internal -> Cartesian, and ``inverse`` is the density direction. Cartesian states are flat
``[batch, 3 * n_atoms]`` tensors in nm (atom-major: ``x[:, 3 * a + c]`` is coordinate ``c`` of atom
``a``); ``inverse`` also accepts ``[batch, n_atoms, 3]``. Bonds are in nm, angles and torsions in
radians. The Z-matrix tables that say which atoms define each bond, angle and torsion are built and
validated in :mod:`boltzgen.flows.zmatrix`.

Out-of-range internal coordinates produced by a flow. ``forward`` accepts any finite input and
never produces NaN for it: a negative bond places the atom on the opposite side of its reference; an
angle outside (0, pi) is used as given by the NeRF formula (theta and 2*pi - theta with the torsion
shifted by pi give the same point), so the map is not injective there. The log-det uses
``log|r|`` and ``log|sin theta|``, so it is the log of the local volume change everywhere and is
finite except on the measure-zero sets r = 0 or sin(theta) = 0, where it is ``-inf`` (not NaN). Such
configurations are physically strained; the energy, not this transform, is what penalizes them.
``inverse`` always returns bonds >= 0, angles in [0, pi] and torsions in [-pi, pi).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from boltzgen.flows.transforms import Bijection
from boltzgen.flows.zmatrix import validate_mixed_zmatrix, validate_zmatrix
from boltzgen.geometry import as_positions, bond_angle, bond_length, dihedral, wrap_angle

# Guards normalizations of (near-)zero vectors: the result is a finite zero vector, not NaN.
_NORM_EPS = 1e-12

#: A torsion is rigid (standardized, Gaussian prior) only if its offset +- pi lies at least this many
#: standard deviations out in the latent: a prior mass beyond it of 3.6e-33 (see InternalCoordinates).
RIGID_TORSION_MIN_BOUND = 12.0


# --------------------------------------------------------------------------------------------------
# NeRF placement (batched; the last dimension is xyz)
# --------------------------------------------------------------------------------------------------


def _nerf(xj: Tensor, xk: Tensor, xl: Tensor, r: Tensor, theta: Tensor, phi: Tensor) -> Tensor:
    """Positions ``[batch, m, 3]`` of atoms i with ``|i - j| = r``, ``angle(i, j, k) = theta`` and
    ``dihedral(i, j, k, l) = phi``.

    ``xj``, ``xk``, ``xl``: reference positions ``[batch, m, 3]``; ``r``: ``[batch, m]`` in their
    length unit; ``theta``, ``phi``: ``[batch, m]`` radians.
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
    ``(value - mean) / std`` so that a flow sees roughly N(0, 1). A circular torsion is only rotated
    by an offset and stays in [-pi, pi) (``circular_mask``) for circular splines and a uniform prior.
    A rigid torsion (``circular`` False: an improper, an amide, a methyl hydrogen placed relative to
    its sibling) is standardized like a bond, as ``wrap(value - mean) / std``, for ordinary splines
    and a Gaussian prior. That map is onto only the latent interval ``[-pi, pi) / std``, and the
    forward map of a latent outside it wraps onto the same torsions again; :meth:`fit` makes a torsion
    rigid only when ``pi / std >= RIGID_TORSION_MIN_BOUND`` latent units, where the flow's (identity
    tails beyond ``tail_bound``) Gaussian prior has a mass below 1e-32, so the density computed by
    ``inverse`` is that of the samples ``forward`` draws.

    ``forward`` builds the canonical frame: the first Z-matrix atom at the origin, the second on
    the +x axis, the third in the xy-plane with y > 0 (for a positive bond and an angle in
    (0, pi)). ``inverse`` accepts any pose and discards the six rigid-body degrees of freedom, so
    ``forward(inverse(x))`` equals ``x`` up to a rigid motion.

    ``logdet`` is exact for the map from the 3N-6 latents to the 3N-6 free Cartesian coordinates of
    the canonical frame (x of the second atom, x and y of the third, all three of every later atom):
    ``log|r_3| + sum_{i>3} log|r_i^2 sin theta_i|`` plus ``sum log std`` of the standardization.
    Densities from ``inverse`` are therefore densities over those canonical-frame coordinates. See
    the module docstring for out-of-range inputs.
    """

    def __init__(
        self,
        zmatrix: Any,
        mean: Tensor | None = None,
        std: Tensor | None = None,
        circular: Tensor | None = None,
    ) -> None:
        """The transform of a full Z-matrix ``zmatrix`` ``[N, 4]`` (validated here), N >= 3.

        ``mean`` and ``std`` are optional standardization statistics ``[3N-6]`` in the latent
        layout (nm for bonds, rad for angles and torsions). The torsion entries of ``mean`` are
        offsets (circular means, wrapped into [-pi, pi)). ``circular`` ``[N-3]`` bool (default: all
        True) says which torsions are circular; their ``std`` is ignored (taken as 1), so their latent
        is ``wrap(torsion - offset)``; a rigid torsion's latent is ``wrap(torsion - offset) / std``.
        :meth:`fit` computes all three from data.
        """
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

        circular = torch.ones(self.n_torsions, dtype=torch.bool) if circular is None \
            else torch.as_tensor(circular, dtype=torch.bool).cpu()
        if circular.shape != (self.n_torsions,):
            raise ValueError(f"circular must flag the {self.n_torsions} torsions, got shape {list(circular.shape)}")
        torsions = torch.zeros(self.dim_internal, dtype=torch.bool)
        torsions[self.n_bonds + self.n_angles :] = True
        mask = torsions.clone()
        mask[torsions] = circular
        self.register_buffer("circular_mask", mask, persistent=False)
        self.register_buffer("torsion_mask", torsions, persistent=False)

        if mean is not None and std is not None:
            mean = torch.as_tensor(mean).clone()
            std = torch.as_tensor(std).clone()
            if mean.shape == (self.dim_internal,) and std.shape == (self.dim_internal,):
                # Circular torsions are only rotated (by their circular mean, which ``fit`` supplies),
                # never scaled: a rotation keeps them on the circle. Every torsion's offset puts its
                # peak at 0, away from the seam at ±pi.
                mean[torsions] = wrap_angle(mean[torsions])
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

    @classmethod
    def fit(cls, zmatrix: Any, x_data: Tensor, min_std: float = 1e-5, rigid_torsions: bool = True,
            circular: Tensor | None = None) -> InternalCoordinates:
        """The transform of ``zmatrix`` standardized by statistics of ``x_data``.

        ``x_data``: samples ``[n, 3N]`` (or ``[n, N, 3]``) in nm, n >= 2. Means and standard
        deviations (floored at ``min_std``, nm or rad, so that rigid dimensions do not give log 0)
        are stored as buffers in the dtype of ``x_data``, on its device. Torsions are rotated by
        their circular mean. With ``rigid_torsions``, a torsion whose deviations from that mean have
        a standard deviation of at most ``pi / RIGID_TORSION_MIN_BOUND`` (15 deg) is rigid: scaled by
        it, not circular (see the class doc). ``circular`` ``[N-3]`` bool, if given, says which
        torsions are circular instead (a checkpoint's layout).
        """
        plain = cls(zmatrix)
        if x_data.shape[0] < 2:
            raise ValueError(f"need at least 2 samples to fit standardization, got {x_data.shape[0]}")
        with torch.no_grad():
            ic = plain.internal(x_data)
            mean = ic.mean(dim=0)
            std = ic.std(dim=0).clamp_min(min_std)
            torsions = plain.torsion_mask
            mean[torsions] = torch.atan2(torch.sin(ic[:, torsions]).mean(0), torch.cos(ic[:, torsions]).mean(0))
            deviation = wrap_angle(ic[:, torsions] - mean[torsions])
            std[torsions] = deviation.pow(2).mean(0).sqrt().clamp_min(min_std)
            if circular is None:
                circular = std[torsions] > math.pi / RIGID_TORSION_MIN_BOUND if rigid_torsions \
                    else torch.ones(plain.n_torsions, dtype=torch.bool)
        return cls(plain.zmatrix.cpu().numpy(), mean=mean, std=std, circular=circular).to(x_data.device)

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
        pos = as_positions(x, self.n_atoms)
        zm = self.zmatrix
        xi = pos.index_select(1, zm[1:, 0])
        bonds = bond_length(xi, pos.index_select(1, zm[1:, 1]))
        angles = bond_angle(xi[:, 1:], pos.index_select(1, zm[2:, 1]), pos.index_select(1, zm[2:, 2]))
        torsions = dihedral(
            xi[:, 2:], pos.index_select(1, zm[3:, 1]), pos.index_select(1, zm[3:, 2]), pos.index_select(1, zm[3:, 3])
        )
        return torch.cat([bonds, angles, torsions], dim=1)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Cartesian ``[batch, 3N]`` (any pose) -> latent ``[batch, 3N-6]``, log|det| ``[batch]``."""
        ic = self.internal(x)
        bonds, angles, _ = self.split(ic)
        loc = self.standardization.loc
        if loc is not None:  # a torsion's deviation from its offset, taken the short way round
            ic = torch.where(self.torsion_mask, loc.to(ic) + wrap_angle(ic - loc.to(ic)), ic)
        z, logdet = self.standardization.to_latent(ic)
        z = torch.where(self.circular_mask, wrap_angle(z), z)
        return z, logdet - self._log_volume(bonds, angles)


def rigid_torsions_by_scan(
    coordinates: InternalCoordinates,
    structure: Tensor,
    energy: Callable[[Tensor], Tensor],
    barrier_kT: float = 15.0,
    reach: float = math.pi / 3,
    step: float = math.radians(5),
) -> Tensor:
    """Which torsions of ``structure`` ``[1, 3N]`` (nm, e.g. an energy minimum) are rigid, judged
    from the reduced energy alone, for training without data: ``[N-3]`` bool.

    Each torsion is turned alone (every other internal coordinate fixed, so the atoms placed from
    it turn along) by up to ``reach`` rad both ways in steps of ``step``. It is free (circular) if
    one way gets there without the energy rising ``barrier_kT`` above the structure's; a non-finite
    energy counts as a wall. A rigid scan overestimates barriers, which errs on the side of rigid
    only where atoms clash. Methyl rotors and backbone torsions come out free, amide, improper and
    sibling-hydrogen torsions rigid. One energy call of ``2 (N-3) reach/step`` configurations.
    """
    plain = InternalCoordinates(coordinates.zmatrix.cpu().numpy()).to(structure)
    ic = plain.internal(structure)
    offsets = torch.arange(1, int(round(reach / step)) + 1, dtype=ic.dtype, device=ic.device) * step
    turns = torch.cat([offsets, -offsets])  # [2S]: one way, then the other
    n_t, n_s = plain.n_torsions, len(offsets)
    scan = ic.repeat(n_t * 2 * n_s, 1)
    rows = torch.arange(n_t * 2 * n_s, device=ic.device)
    column = plain.n_bonds + plain.n_angles + rows // (2 * n_s)
    scan[rows, column] += turns.repeat(n_t)
    with torch.no_grad():
        u = energy(torch.cat([structure, plain(scan)[0]]))
    rise = torch.nan_to_num(u[1:] - u[0], nan=math.inf).reshape(n_t, 2, n_s)
    return ~(rise.amax(dim=-1) < barrier_kT).any(dim=-1)


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
        """The transform of ``n_atoms`` atoms that keeps ``cartesian_atoms`` (at least three) as they
        are and places the others by the mixed Z-matrix ``zmatrix`` ``[N - n_cart, 4]``, whose rows
        have three references each (validated here).

        ``mean`` and ``std`` are optional statistics ``[3N]`` in the latent layout; only their bond
        (nm) and angle (rad) entries are used. :meth:`fit` computes them from data.
        """
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
    def fit(
        cls, cartesian_atoms: Sequence[int], zmatrix: Any, n_atoms: int, x_data: Tensor, min_std: float = 1e-5
    ) -> MixedCoordinates:
        """The transform with bonds and angles standardized by statistics of ``x_data``.

        ``cartesian_atoms``, ``zmatrix`` and ``n_atoms`` are as for the constructor; ``x_data``:
        samples ``[n, 3N]`` (or ``[n, N, 3]``) in nm, n >= 2. Standard deviations are floored at
        ``min_std`` (nm or rad); the statistics are stored as buffers in the dtype of ``x_data``, on
        its device. The Cartesian block and the torsions stay raw.
        """
        plain = cls(cartesian_atoms, zmatrix, n_atoms)
        if x_data.shape[0] < 2:
            raise ValueError(f"need at least 2 samples to fit standardization, got {x_data.shape[0]}")
        with torch.no_grad():
            w, _ = plain.inverse(x_data)
            mean = w.mean(dim=0)
            std = w.std(dim=0).clamp_min(min_std)
        return cls(cartesian_atoms, zmatrix, n_atoms, mean=mean, std=std).to(x_data.device)

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
        pos = as_positions(x, self.n_atoms)
        batch = pos.shape[0]
        zm = self.zmatrix
        cart = pos.index_select(1, self.cartesian_atoms).reshape(batch, 3 * self.n_cartesian)
        xi = pos.index_select(1, zm[:, 0])
        xj, xk, xl = (pos.index_select(1, zm[:, c]) for c in (1, 2, 3))
        bonds = bond_length(xi, xj)
        angles = bond_angle(xi, xj, xk)
        torsions = dihedral(xi, xj, xk, xl)
        z, logdet = self.standardization.to_latent(torch.cat([cart, bonds, angles, torsions], dim=1))
        return z, logdet - _log_volume(bonds, angles).sum(dim=1)

