"""A batched, differentiable torch re-implementation of an ``openmm.System``.

:class:`TorchForceField` reads the parameters of a (non-periodic) OpenMM system once and evaluates
the potential energy of a whole batch of configurations with vectorized tensor operations, so that
forces come from autograd and the evaluation runs on CPU or CUDA without a per-sample Python loop.

Supported forces and the exact functional forms (matching OpenMM's Reference platform):

- ``HarmonicBondForce``: ``k/2 (r - r0)^2``.
- ``HarmonicAngleForce``: ``k/2 (theta - theta0)^2``.
- ``PeriodicTorsionForce``: ``k (1 + cos(n phi - phase))`` with the IUPAC dihedral sign (propers and
  impropers alike: OpenMM stores both as ordered atom quadruplets).
- ``NonbondedForce`` with ``NoCutoff``: Coulomb ``ONE_4PI_EPS0 q_i q_j / r`` plus Lennard-Jones
  ``4 eps ((sigma/r)^12 - (sigma/r)^6)`` with Lorentz-Berthelot combining, and the exception list
  overriding (or removing) pairs.
- ``GBSAOBCForce`` with ``NoCutoff``: OBC type II Born radii (alpha=1, beta=0.8, gamma=4.85,
  dielectric offset 0.009 nm), the generalized-Born polar term including the self terms, and the
  ACE non-polar surface term ``4 pi E_sa (R_i + 0.14)^2 (R_i / B_i)^6``.
- ``CMMotionRemover`` is ignored (it contributes no energy).

Anything else raises a one-line ``ValueError``; use ``energy_backend: openmm`` for such systems.

Units: positions in nm, energies in kJ/mol (``energy_kJ``) or kT (``reduced_energy``), forces in
kJ/mol/nm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import openmm
import openmm.unit as unit
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from boltzgen.energies.base import Energy

# Same CODATA-2018 derivation as OpenMM's own ONE_4PI_EPS0 (kJ/mol nm / e^2): 138.93545764438198.
_E_CHARGE = 1.602176634e-19
_AVOGADRO = 6.02214076e23
_EPSILON0 = 1e-6 * 8.8541878128e-12 / (_E_CHARGE * _E_CHARGE * _AVOGADRO)
ONE_4PI_EPS0: float = 1.0 / (4.0 * math.pi * _EPSILON0)

# OBC type II constants, as hard-wired in OpenMM's GBSAOBCForce.
OBC_ALPHA: float = 1.0
OBC_BETA: float = 0.8
OBC_GAMMA: float = 4.85
OBC_DIELECTRIC_OFFSET_NM: float = 0.009
ACE_PROBE_RADIUS_NM: float = 0.14

# Parity tolerances used by `compare_with_openmm` / `boltzgen check-energy`.
ENERGY_REL_TOL: float = 1e-6
ENERGY_ABS_TOL_KJ: float = 1e-4
FORCE_ABS_TOL_KJ_NM: float = 1e-4

_IGNORED_FORCES = ("CMMotionRemover",)

# Bound on (configurations x pairs) handled at once, so a big molecule shrinks the batch chunk.
_MAX_PAIR_ELEMENTS = 1 << 23
# On CPU, blocks of about this many (configuration x pair) elements keep the working set in cache;
# measured about 2x faster than 4096-configuration blocks for alanine dipeptide.
_CPU_BLOCK_PAIR_ELEMENTS = 1 << 16
# ...but never fewer configurations than this: with the batch innermost, very short rows make every
# elementwise op pay per-row overhead (a 582-atom protein runs ~7x faster per configuration at 16 than at 1).
_CPU_MIN_BLOCK = 64


def _unsupported(force: openmm.Force, why: str = "") -> ValueError:
    name = type(force).__name__
    detail = f" ({why})" if why else ""
    return ValueError(
        f"TorchForceField does not support {name}{detail}; use `energy_backend: openmm` for this system"
    )


def _kT_kJ_per_mol(temperature_K: float) -> float:
    kT = unit.MOLAR_GAS_CONSTANT_R * temperature_K * unit.kelvin
    return float(kT.value_in_unit(unit.kilojoule_per_mole))


def _v(q: object, u: unit.Unit) -> float:
    """Strip an OpenMM quantity to a float in unit ``u`` (plain numbers pass through)."""
    return float(q.value_in_unit(u)) if unit.is_quantity(q) else float(q)  # type: ignore[union-attr]


def _cross(a: Tensor, b: Tensor) -> Tensor:
    """Cross product along dim 1 of ``[k, 3, b]`` tensors (componentwise: faster than linalg.cross on CPU)."""
    a0, a1, a2 = a.unbind(1)
    b0, b1, b2 = b.unbind(1)
    return torch.stack((a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0), dim=1)


def _check_no_pbc(force: openmm.Force) -> None:
    if force.usesPeriodicBoundaryConditions():
        raise _unsupported(force, "periodic boundary conditions")


class TorchForceField(Energy):
    """Reduced potential ``u(x) = U(x)/kT`` of an ``openmm.System``, evaluated in torch.

    Args:
        system: a non-periodic OpenMM system made only of the supported forces (module docstring).
        temperature_K: temperature defining ``kT``.
        chunk_size: most configurations evaluated in one vectorized pass; larger batches are split.
            The chunk is further capped so that configurations x pairs stays bounded (2^23 on GPU,
            2^16 on CPU, where cache-sized blocks run faster). Gradients are analytic and computed chunk by chunk alongside the energy, so
            the memory held for the backward pass is only ``[batch, 3 n_atoms]``.

    Shapes: ``x`` is ``[batch, 3 * n_atoms]`` in nm; energies are ``[batch]``.
    The default dtype is float64; ``module.to(torch.float32)`` switches the computation to float32.
    """

    def __init__(self, system: openmm.System, temperature_K: float, chunk_size: int = 4096) -> None:
        n_atoms = system.getNumParticles()
        super().__init__(3 * n_atoms)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.n_atoms = n_atoms
        self.temperature_K = float(temperature_K)
        self.kT_kJ_per_mol = _kT_kJ_per_mol(temperature_K)
        self.chunk_size = int(chunk_size)
        self.terms: list[str] = []
        f64 = torch.float64
        self.register_buffer("_kT", torch.tensor(self.kT_kJ_per_mol, dtype=f64))

        for force in system.getForces():
            name = type(force).__name__
            if name in _IGNORED_FORCES:
                continue
            if isinstance(force, openmm.HarmonicBondForce):
                self._add_bonds(force)
            elif isinstance(force, openmm.HarmonicAngleForce):
                self._add_angles(force)
            elif isinstance(force, openmm.PeriodicTorsionForce):
                self._add_torsions(force)
            elif isinstance(force, openmm.NonbondedForce):
                self._add_nonbonded(force)
            elif isinstance(force, openmm.GBSAOBCForce):
                self._add_obc(force)
            else:
                raise _unsupported(force)
        pair_counts = [1]
        if "nonbonded" in self.terms:
            pair_counts.append(int(self.nb_idx.shape[0]))
        if "gbsa_obc" in self.terms:
            pair_counts.append(int(self.gb_idx.shape[0]))
        self._max_pairs = max(pair_counts)

    @classmethod
    def from_system(cls, system: openmm.System, temperature_K: float, chunk_size: int = 4096) -> "TorchForceField":
        """Same as the constructor; reads for symmetry with other energy factories."""
        return cls(system, temperature_K, chunk_size=chunk_size)

    # ------------------------------------------------------------------ parameter extraction
    def _register(self, name: str, values: np.ndarray | list, dtype: torch.dtype) -> None:
        self.register_buffer(name, torch.as_tensor(np.asarray(values), dtype=dtype))

    def _add_term(self, term: str) -> None:
        if term in self.terms:
            raise ValueError(f"TorchForceField supports one {term} force per system, found several")
        self.terms.append(term)

    def _add_bonds(self, force: openmm.HarmonicBondForce) -> None:
        _check_no_pbc(force)
        idx, r0, k = [], [], []
        for b in range(force.getNumBonds()):
            i, j, length, kb = force.getBondParameters(b)
            idx.append((i, j))
            r0.append(_v(length, unit.nanometer))
            k.append(_v(kb, unit.kilojoule_per_mole / unit.nanometer**2))
        self._add_term("bonds")
        self._register("bond_idx", np.asarray(idx, dtype=np.int64).reshape(-1, 2), torch.long)
        self._register("bond_r0", r0, torch.float64)
        self._register("bond_k", k, torch.float64)

    def _add_angles(self, force: openmm.HarmonicAngleForce) -> None:
        _check_no_pbc(force)
        idx, t0, k = [], [], []
        for a in range(force.getNumAngles()):
            i, j, l, theta0, ka = force.getAngleParameters(a)
            idx.append((i, j, l))
            t0.append(_v(theta0, unit.radian))
            k.append(_v(ka, unit.kilojoule_per_mole / unit.radian**2))
        self._add_term("angles")
        self._register("angle_idx", np.asarray(idx, dtype=np.int64).reshape(-1, 3), torch.long)
        self._register("angle_theta0", t0, torch.float64)
        self._register("angle_k", k, torch.float64)

    def _add_torsions(self, force: openmm.PeriodicTorsionForce) -> None:
        _check_no_pbc(force)
        idx, n, phase, k = [], [], [], []
        for t in range(force.getNumTorsions()):
            i, j, l, m, per, ph, kt = force.getTorsionParameters(t)
            idx.append((i, j, l, m))
            n.append(float(per))
            phase.append(_v(ph, unit.radian))
            k.append(_v(kt, unit.kilojoule_per_mole))
        self._add_term("torsions")
        self._register("torsion_idx", np.asarray(idx, dtype=np.int64).reshape(-1, 4), torch.long)
        self._register("torsion_n", n, torch.float64)
        self._register("torsion_phase", phase, torch.float64)
        self._register("torsion_k", k, torch.float64)

    def _add_nonbonded(self, force: openmm.NonbondedForce) -> None:
        if force.getNonbondedMethod() != openmm.NonbondedForce.NoCutoff:
            raise _unsupported(force, "only the NoCutoff nonbonded method is supported")
        if force.getNumParticleParameterOffsets() > 0 or force.getNumExceptionParameterOffsets() > 0:
            raise _unsupported(force, "parameter offsets are not supported")
        n = force.getNumParticles()
        q = np.empty(n)
        sig = np.empty(n)
        eps = np.empty(n)
        for a in range(n):
            qa, sa, ea = force.getParticleParameters(a)
            q[a] = _v(qa, unit.elementary_charge)
            sig[a] = _v(sa, unit.nanometer)
            eps[a] = _v(ea, unit.kilojoule_per_mole)
        iu, ju = np.triu_indices(n, k=1)
        qq = q[iu] * q[ju]
        s = 0.5 * (sig[iu] + sig[ju])
        e = np.sqrt(eps[iu] * eps[ju])
        # Exceptions replace the combined parameters of their pair (zero = excluded).
        pair_pos = {}
        for e_idx in range(force.getNumExceptions()):
            i, j, cp, se, ee = force.getExceptionParameters(e_idx)
            a, b = (i, j) if i < j else (j, i)
            pair_pos[(a, b)] = (_v(cp, unit.elementary_charge**2), _v(se, unit.nanometer), _v(ee, unit.kilojoule_per_mole))
        if pair_pos:
            keys = np.asarray(list(pair_pos.keys()), dtype=np.int64)
            flat = keys[:, 0] * n - keys[:, 0] * (keys[:, 0] + 1) // 2 + (keys[:, 1] - keys[:, 0] - 1)
            vals = np.asarray(list(pair_pos.values()), dtype=np.float64)
            qq[flat], s[flat], e[flat] = vals[:, 0], vals[:, 1], vals[:, 2]
        keep = (qq != 0.0) | (e != 0.0)
        s6 = s[keep] ** 6
        self._add_term("nonbonded")
        self._register("nb_idx", np.stack([iu[keep], ju[keep]], axis=1).astype(np.int64).reshape(-1, 2), torch.long)
        self._register("nb_qq", ONE_4PI_EPS0 * qq[keep], torch.float64)
        # 4 eps sigma^12 and 4 eps sigma^6, so LJ = c12 / r^12 - c6 / r^6.
        self._register("nb_c12", 4.0 * e[keep] * s6 * s6, torch.float64)
        self._register("nb_c6", 4.0 * e[keep] * s6, torch.float64)

    def _add_obc(self, force: openmm.GBSAOBCForce) -> None:
        if force.getNonbondedMethod() != openmm.GBSAOBCForce.NoCutoff:
            raise _unsupported(force, "only the NoCutoff method is supported")
        n = force.getNumParticles()
        q = np.empty(n)
        radius = np.empty(n)
        scale = np.empty(n)
        for a in range(n):
            qa, ra, sa = force.getParticleParameters(a)
            q[a] = _v(qa, unit.elementary_charge)
            radius[a] = _v(ra, unit.nanometer)
            scale[a] = float(sa)
        eps_in = float(force.getSoluteDielectric())
        eps_out = float(force.getSolventDielectric())
        prefactor = -ONE_4PI_EPS0 * (1.0 / eps_in - 1.0 / eps_out) if eps_in != 0 and eps_out != 0 else 0.0
        surface = 4.0 * math.pi * _v(force.getSurfaceAreaEnergy(), unit.kilojoule_per_mole / unit.nanometer**2)
        offset_radius = radius - OBC_DIELECTRIC_OFFSET_NM
        iu, ju = np.triu_indices(n, k=1)
        self._add_term("gbsa_obc")
        self._register("gb_idx", np.stack([iu, ju], axis=1).astype(np.int64).reshape(-1, 2), torch.long)
        self._register("gb_q", q, torch.float64)
        self._register("gb_radius", radius, torch.float64)
        self._register("gb_offset_radius", offset_radius, torch.float64)
        self._register("gb_scaled_radius", offset_radius * scale, torch.float64)
        self._register("gb_prefactor", np.asarray(prefactor), torch.float64)
        # 4 pi E_sa (R + probe)^2 R^6, so the ACE term is this / B^6.
        self._register("gb_ace", surface * (radius + ACE_PROBE_RADIUS_NM) ** 2 * radius**6, torch.float64)

    # ------------------------------------------------------------------ energy terms
    # Layout inside a block: positions P are [n_atoms, 3, b] (atom-major, batch innermost), so that
    # gathering atoms and scattering their gradients are row copies/adds (fast on CPU), and every
    # elementwise op runs over the contiguous batch axis. Each term returns its energy [b] (kJ/mol)
    # and, when G ([n_atoms, 3, b]) is given, adds dU/dP into it: gradients are analytic, so one pass
    # gives energy and forces without an autograd graph.

    def _bonds(self, P: Tensor, G: Tensor | None) -> Tensor:
        i, j = self.bond_idx[:, 0], self.bond_idx[:, 1]
        d = P.index_select(0, j) - P.index_select(0, i)
        r = torch.sqrt((d * d).sum(1))
        dr = r - self.bond_r0[:, None]
        kdr = self.bond_k[:, None] * dr
        if G is not None:
            gj = (kdr / r).unsqueeze(1) * d
            G.index_add_(0, j, gj).index_add_(0, i, gj.neg_())
        return 0.5 * (kdr * dr).sum(0)

    def _angles(self, P: Tensor, G: Tensor | None) -> Tensor:
        i, j, k = self.angle_idx[:, 0], self.angle_idx[:, 1], self.angle_idx[:, 2]
        pj = P.index_select(0, j)
        a = P.index_select(0, i) - pj
        b = P.index_select(0, k) - pj
        n = _cross(a, b)
        n_norm = torch.sqrt((n * n).sum(1))
        # atan2(|a x b|, a.b) stays accurate near 0 and pi, where acos loses digits.
        theta = torch.atan2(n_norm, (a * b).sum(1))
        kdt = self.angle_k[:, None] * (theta - self.angle_theta0[:, None])
        if G is not None:
            # d theta/da = a x n / (|a|^2 |n|), d theta/db = -b x n / (|b|^2 |n|).
            c = (kdt / n_norm).unsqueeze(1)
            ga = (c / (a * a).sum(1, keepdim=True)) * _cross(a, n)
            gb = (c / (b * b).sum(1, keepdim=True)) * _cross(n, b)
            G.index_add_(0, i, ga).index_add_(0, k, gb).index_add_(0, j, (ga + gb).neg_())
        return 0.5 * (kdt * (theta - self.angle_theta0[:, None])).sum(0)

    def _torsions(self, P: Tensor, G: Tensor | None) -> Tensor:
        idx = self.torsion_idx
        p1 = P.index_select(0, idx[:, 1])
        p2 = P.index_select(0, idx[:, 2])
        f = P.index_select(0, idx[:, 0]) - p1
        g = p1 - p2
        h = P.index_select(0, idx[:, 3]) - p2
        a = _cross(f, g)
        b = _cross(h, g)
        g_norm = torch.sqrt((g * g).sum(1))
        # IUPAC sign convention (the one OpenMM uses): phi = atan2(|b2| b1.(b2 x b3), (b1 x b2).(b2 x b3))
        # with b1 = -f, b2 = -g, b3 = h.
        phi = torch.atan2(-g_norm * (f * b).sum(1), (a * b).sum(1))
        arg = self.torsion_n[:, None] * phi - self.torsion_phase[:, None]
        if G is not None:
            de_dphi = -self.torsion_k[:, None] * self.torsion_n[:, None] * torch.sin(arg)
            a2 = (a * a).sum(1)
            b2 = (b * b).sum(1)
            # Blondel & Karplus (1996) gradient of phi, free of the 1/sin(phi) singularity.
            ga = (de_dphi * g_norm / a2).unsqueeze(1) * a  # = -dU/dp0
            gd = (de_dphi * g_norm / b2).unsqueeze(1) * b  # = dU/dp3
            fg = ((f * g).sum(1) / (g_norm * g_norm)).unsqueeze(1)
            hg = ((h * g).sum(1) / (g_norm * g_norm)).unsqueeze(1)
            gb_ = ga + fg * ga - hg * gd  # dU/dp1
            gc = ga - gb_ - gd  # dU/dp2, since the four gradients sum to zero
            G.index_add_(0, idx[:, 3], gd).index_add_(0, idx[:, 1], gb_).index_add_(0, idx[:, 2], gc)
            G.index_add_(0, idx[:, 0], ga.neg_())
        return (self.torsion_k[:, None] * (1.0 + torch.cos(arg))).sum(0)

    def _nonbonded(self, P: Tensor, G: Tensor | None) -> Tensor:
        i, j = self.nb_idx[:, 0], self.nb_idx[:, 1]
        d = P.index_select(0, j) - P.index_select(0, i)
        inv_r2 = 1.0 / (d * d).sum(1)
        inv_r6 = inv_r2 * inv_r2 * inv_r2
        c12 = self.nb_c12[:, None] * inv_r6
        coul = self.nb_qq[:, None] * torch.sqrt(inv_r2)
        if G is not None:
            # dU/d(r^2) times 2: (-12 c12/r^12 + 6 c6/r^6 - qq/r) / r^2
            de = ((6.0 * self.nb_c6[:, None] - 12.0 * c12) * inv_r6 - coul) * inv_r2
            gj = de.unsqueeze(1) * d
            G.index_add_(0, j, gj).index_add_(0, i, gj.neg_())
        return ((c12 - self.nb_c6[:, None]) * inv_r6 + coul).sum(0)

    @staticmethod
    def _obc_descreen(r: Tensor, rho_i: Tensor, s_j: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        """Pairwise OBC descreening integral of J's scaled sphere seen from I, and its r-derivative.

        ``r`` is ``[pairs, b]`` (nm); ``rho_i`` (offset radius of I) and ``s_j`` (scaled offset radius
        of J) are ``[pairs, 1]``. Returns the term and d term/dr (``None`` unless asked), both ``[pairs, b]``.
        """
        upper = r + s_j
        lower = torch.maximum((r - s_j).abs(), rho_i)
        inv_l = 1.0 / lower
        inv_u = 1.0 / upper
        inv_r = 1.0 / r
        dl2 = inv_l * inv_l - inv_u * inv_u
        log_lu = torch.log(lower * inv_u)
        s2 = s_j * s_j
        term = inv_l - inv_u - 0.25 * r * dl2 + 0.5 * inv_r * log_lu + 0.25 * s2 * inv_r * dl2
        buried = rho_i < s_j - r
        term = term + torch.where(buried, 2.0 * (1.0 / rho_i - inv_l), 0.0)
        active = rho_i < upper
        term = torch.where(active, term, 0.0)
        if not need_grad:
            return term, None
        # Where l and u depend on r, d term/dl and d term/du vanish identically (also with the buried
        # correction), so only the explicit r-dependence is left.
        inv_r2 = inv_r * inv_r
        dterm = -0.25 * dl2 - 0.5 * inv_r2 * log_lu - 0.25 * s2 * inv_r2 * dl2
        return term, torch.where(active, dterm, 0.0)

    def _gbsa_obc(self, P: Tensor, G: Tensor | None) -> Tensor:
        i, j = self.gb_idx[:, 0], self.gb_idx[:, 1]
        need = G is not None
        d = P.index_select(0, j) - P.index_select(0, i)
        r2 = (d * d).sum(1)
        r = torch.sqrt(r2)
        rho = self.gb_offset_radius[:, None]
        sr = self.gb_scaled_radius[:, None]
        radius = self.gb_radius[:, None]
        t_ij, dt_ij = self._obc_descreen(r, rho.index_select(0, i), sr.index_select(0, j), need)
        t_ji, dt_ji = self._obc_descreen(r, rho.index_select(0, j), sr.index_select(0, i), need)
        n_b = P.shape[2]
        total = r.new_zeros(self.n_atoms, n_b).index_add_(0, i, t_ij).index_add_(0, j, t_ji)
        psi = 0.5 * rho * total
        tanh_arg = psi * (OBC_ALPHA + psi * (-OBC_BETA + OBC_GAMMA * psi))
        th = torch.tanh(tanh_arg)
        born = 1.0 / (1.0 / rho - th / radius)
        q = self.gb_q[:, None]
        pre = self.gb_prefactor
        # ACE non-polar term; OpenMM skips atoms whose Born radius came out non-positive.
        ace = torch.where(born > 0, self.gb_ace[:, None] / born**6, 0.0)
        qb = pre * q / born
        qq = q.index_select(0, i) * q.index_select(0, j)
        bi = born.index_select(0, i)
        bj = born.index_select(0, j)
        bb = bi * bj
        dd = r2 / (4.0 * bb)
        ex = torch.exp(-dd)
        f2 = r2 + bb * ex
        inv_f = 1.0 / torch.sqrt(f2)
        pair = pre * qq * inv_f
        energy = ace.sum(0) + 0.5 * (qb * q).sum(0) + pair.sum(0)
        if G is None:
            return energy
        c = -0.5 * pair * inv_f * inv_f  # dU/d(f^2)
        de_dbb = c * ex * (1.0 + dd)
        de_dborn = -6.0 * ace / born - 0.5 * qb * q / born
        de_dborn = de_dborn.index_add(0, i, de_dbb * bj).index_add(0, j, de_dbb * bi)
        dborn_dpsi = born * born * (1.0 - th * th) * (OBC_ALPHA + psi * (-2.0 * OBC_BETA + 3.0 * OBC_GAMMA * psi)) / radius
        de_dterm = de_dborn * dborn_dpsi * 0.5 * rho  # [n_atoms, b]
        de_dr = de_dterm.index_select(0, i) * dt_ij + de_dterm.index_select(0, j) * dt_ji
        de = 2.0 * c * (1.0 - 0.25 * ex) + de_dr / r  # 2 dU/d(r^2)
        gj = de.unsqueeze(1) * d
        G.index_add_(0, j, gj).index_add_(0, i, gj.neg_())
        return energy

    # ------------------------------------------------------------------ evaluation
    def _term_fn(self, term: str) -> Callable[[Tensor, Tensor | None], Tensor]:
        return getattr(self, f"_{term}")

    def _dtype(self) -> torch.dtype:
        return self._kT.dtype

    def _chunk(self) -> int:
        limit = _MAX_PAIR_ELEMENTS // self._max_pairs
        if self._kT.device.type == "cpu":
            limit = min(limit, max(_CPU_MIN_BLOCK, _CPU_BLOCK_PAIR_ELEMENTS // self._max_pairs))
        return max(1, min(self.chunk_size, limit))

    def _prepare(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects x of shape [batch, {self.dim}], got {list(x.shape)}")
        if x.device != self._kT.device:
            # The energy follows its input's device; parameters are moved once and then stay.
            self.to(x.device)
        return x.detach().to(self._dtype())

    def _evaluate(self, x: Tensor, terms: list[str], need_grad: bool) -> tuple[Tensor, Tensor | None]:
        """Energy ``[batch]`` (kJ/mol) of the given terms and, if asked, dU/dx ``[batch, 3 n_atoms]``."""
        energies, grads = [], []
        for part in torch.split(x, self._chunk(), dim=0):
            b = part.shape[0]
            P = part.reshape(b, self.n_atoms, 3).permute(1, 2, 0).contiguous()
            G = torch.zeros_like(P) if need_grad else None
            e = P.new_zeros(b)
            for term in terms:
                e = e + self._term_fn(term)(P, G)
            energies.append(e)
            if G is not None:
                grads.append(G.permute(2, 0, 1).reshape(b, self.dim))
        energy = torch.cat(energies) if len(energies) != 1 else energies[0]
        if not need_grad:
            return energy, None
        return energy, torch.cat(grads) if len(grads) != 1 else grads[0]

    def energy_kJ(self, x: Tensor) -> Tensor:
        """Potential energy U(x) in kJ/mol for ``x [batch, 3 n_atoms]`` in nm; returns ``[batch]``.

        Differentiable with respect to ``x`` (first derivatives only).
        """
        return _TorchFFFunction.apply(x, self)

    def energy_terms_kJ(self, x: Tensor) -> dict[str, Tensor]:
        """Each force's energy in kJ/mol, ``{term: [batch]}`` (no gradient), keyed as in :attr:`terms`."""
        xp = self._prepare(x)
        return {term: self._evaluate(xp, [term], False)[0] for term in self.terms}

    def reduced_energy(self, x: Tensor) -> Tensor:
        """u(x) = U(x)/kT for ``x [batch, 3 n_atoms]`` in nm; returns ``[batch]`` in the module's dtype."""
        return self.energy_kJ(x) / self._kT

    def energy_and_forces_kJ(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """U(x) ``[batch]`` in kJ/mol and F = -dU/dx ``[batch, 3 n_atoms]`` in kJ/mol/nm, in one pass."""
        energy, grad = self._evaluate(self._prepare(x), self.terms, True)
        assert grad is not None
        return energy, -grad

    def forces_kJ(self, x: Tensor) -> Tensor:
        """F = -dU/dx in kJ/mol/nm, shape ``[batch, 3 n_atoms]``."""
        return self.energy_and_forces_kJ(x)[1]


class _TorchFFFunction(torch.autograd.Function):
    """Energy in forward; the analytic gradient computed alongside it is replayed in backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, module: TorchForceField) -> Tensor:
        need_grad = bool(ctx.needs_input_grad[0])
        energy, grad = module._evaluate(module._prepare(x), module.terms, need_grad)
        if need_grad:
            ctx.save_for_backward(grad)
            ctx.input_dtype = x.dtype
        return energy

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_energy: Tensor) -> tuple[Tensor, None]:
        (grad,) = ctx.saved_tensors
        return (grad_energy.to(grad.dtype)[:, None] * grad).to(ctx.input_dtype), None


@dataclass(frozen=True)
class ParityReport:
    """Largest deviations of :class:`TorchForceField` from OpenMM's Reference platform.

    Attributes:
        max_abs_energy_kJ: max |U_torch - U_openmm| over the configurations, kJ/mol.
        max_rel_energy: max |U_torch - U_openmm| / max(|U_openmm|, tiny).
        max_abs_force_kJ_nm: max componentwise |F_torch - F_openmm|, kJ/mol/nm.
        n: number of configurations compared.
    """

    max_abs_energy_kJ: float
    max_rel_energy: float
    max_abs_force_kJ_nm: float
    n: int

    @property
    def passed(self) -> bool:
        """Energies within ENERGY_REL_TOL relative or ENERGY_ABS_TOL_KJ absolute, forces within FORCE_ABS_TOL_KJ_NM."""
        energy_ok = self.max_rel_energy <= ENERGY_REL_TOL or self.max_abs_energy_kJ <= ENERGY_ABS_TOL_KJ
        return energy_ok and self.max_abs_force_kJ_nm <= FORCE_ABS_TOL_KJ_NM


def openmm_energies_forces(system: openmm.System, positions_nm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Energies ``[n]`` (kJ/mol) and forces ``[n, n_atoms, 3]`` (kJ/mol/nm) from a Reference context.

    ``positions_nm`` is ``[n, n_atoms, 3]``.
    """
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    try:
        energies = np.empty(positions_nm.shape[0])
        forces = np.empty(positions_nm.shape)
        for s, frame in enumerate(positions_nm):
            context.setPositions(frame)
            state = context.getState(getEnergy=True, getForces=True)
            energies[s] = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
            forces[s] = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    finally:
        del context
    return energies, forces


def compare_with_openmm(
    system: openmm.System,
    positions_nm: np.ndarray,
    temperature_K: float,
    n: int = 16,
    noise_nm: float = 0.01,
    seed: int = 0,
) -> ParityReport:
    """Compare :class:`TorchForceField` (float64, CPU) with OpenMM's Reference platform.

    Args:
        system: the OpenMM system.
        positions_nm: reference positions ``[n_atoms, 3]`` in nm.
        temperature_K: temperature (only sets kT; parity is checked in kJ/mol).
        n: number of perturbed configurations.
        noise_nm: standard deviation of the Gaussian perturbation of every coordinate, nm.
        seed: seed of the perturbation.
    """
    base = np.asarray(positions_nm, dtype=np.float64).reshape(-1, 3)
    rng = np.random.default_rng(seed)
    frames = base[None] + noise_nm * rng.standard_normal((n, *base.shape))
    e_ref, f_ref = openmm_energies_forces(system, frames)
    ff = TorchForceField(system, temperature_K)
    x = torch.as_tensor(frames.reshape(n, -1), dtype=torch.float64)
    e = ff.energy_kJ(x).detach().numpy()
    f = ff.forces_kJ(x).numpy().reshape(frames.shape)
    abs_err = np.abs(e - e_ref)
    return ParityReport(
        max_abs_energy_kJ=float(abs_err.max()),
        max_rel_energy=float((abs_err / np.maximum(np.abs(e_ref), 1e-300)).max()),
        max_abs_force_kJ_nm=float(np.abs(f - f_ref).max()),
        n=int(n),
    )
