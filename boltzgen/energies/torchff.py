"""A batched, differentiable torch re-implementation of an ``openmm.System``.

:class:`TorchForceField` reads the parameters of a (non-periodic) OpenMM system once and evaluates
the potential energy of a whole batch of configurations with vectorized tensor operations, on CPU or
CUDA without a per-sample Python loop. Forces are derived analytically in the same pass and handed
to autograd, so ``torch.autograd.grad`` of the energy costs no second evaluation.

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

On the CPU in float64, every term runs in a fused C kernel (:mod:`boltzgen.energies.native`,
compiled at first use; 15-25x faster than the eager code below on alanine dipeptide). Without a C
compiler, on CUDA, in float32 or with ``native=False``, every term runs in eager torch.

Performance notes on the eager code (CPU, measured on alanine dipeptide): every torch op is a pass
over memory plus a fixed dispatch cost, so the terms are written for few ops per row: the batch is the innermost axis
(gathers and scatters move contiguous rows), each term runs in cache-sized blocks of its own,
non-bonded and OBC share one pair list (one gather, one scatter), torsions sharing atoms are one
Chebyshev polynomial in cos(phi) (no atan2/sin/cos), and masks (``torch.where``, ~10 passes each)
are replaced by clamps. A dense ``[n_atoms, n_atoms]`` pair layout and incidence-matrix matmuls in
place of ``index_add_`` were measured slower and are not used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import openmm
import openmm.unit as unit
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from boltzgen.energies import native as native_kernel
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

# Bound on (configurations x rows) handled at once, so a big molecule shrinks the batch block.
_MAX_BLOCK_ELEMENTS = 1 << 23
# On CPU, blocks of about this many (configuration x row) elements keep the working set in cache
# (2^13..2^15 measured alike for alanine dipeptide; 2^16 and up slower).
_CPU_BLOCK_ELEMENTS = 1 << 14
# ...but never fewer configurations than this: with the batch innermost, very short rows make every
# elementwise op pay per-row overhead (a 582-atom protein runs ~7x faster per configuration at 16 than at 1).
_CPU_MIN_BLOCK = 64
# Torsion phases this close to a multiple of pi/2 are snapped to it (changing energies by < 1e-12 k),
# so that the usual 0 and pi phases need no sine polynomial.
_PHASE_SNAP = 1e-12


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


_Components = tuple[Tensor, Tensor, Tensor]


def _dot(a: _Components, b: _Components) -> Tensor:
    """Dot product of two vectors given as their x, y, z components (each ``[k, b]``): ``[k, b]``."""
    return torch.addcmul(torch.addcmul(a[0] * b[0], a[1], b[1]), a[2], b[2])


def _cross(a: _Components, b: _Components) -> tuple[Tensor, _Components]:
    """Cross product of two vectors given as components (each ``[k, b]``).

    Returns the product as one ``[k, 3, b]`` tensor and as its component views, written in place
    (no stacking copy).
    """
    out = a[0].new_empty(a[0].shape[0], 3, a[0].shape[1])
    c = out.unbind(1)
    torch.mul(a[1], b[2], out=c[0]).addcmul_(a[2], b[1], value=-1.0)
    torch.mul(a[2], b[0], out=c[1]).addcmul_(a[0], b[2], value=-1.0)
    torch.mul(a[0], b[1], out=c[2]).addcmul_(a[1], b[0], value=-1.0)
    return out, c  # type: ignore[return-value]


def _horner(coef: Tensor, x: Tensor, derivative: bool) -> tuple[Tensor, Tensor | None]:
    """Per-row polynomials ``p(x) = sum_m coef[m] x^m`` and (if asked) ``p'(x)``.

    ``coef`` is ``[degree + 1, rows, 1]``, ``x`` is ``[rows, b]``; both results are ``[rows, b]``,
    possibly broadcast views of ``coef`` (for degrees 0 and 1), so not to be modified in place.
    """
    degree = coef.shape[0] - 1
    coef = coef.unbind(0)  # type: ignore[assignment]
    if degree == 0:
        return coef[0].expand_as(x), torch.zeros_like(x) if derivative else None
    dp = coef[degree].expand_as(x) if derivative else None
    p = torch.addcmul(coef[degree - 1], coef[degree], x)
    for m in range(degree - 2, -1, -1):
        if dp is not None:
            dp = torch.addcmul(p, dp, x)
        p = torch.addcmul(coef[m], p, x)
    return p, dp


def _snap(value: float) -> float:
    """``value`` (a cosine or sine of a torsion phase) with values below _PHASE_SNAP set to zero."""
    return 0.0 if abs(value) < _PHASE_SNAP else value


@dataclass(frozen=True)
class _PairParameters:
    """Non-bonded parameters over all pairs ``i < j`` (``np.triu_indices`` order), each ``[n_pairs]``.

    ``qq`` is ONE_4PI_EPS0 q_i q_j (kJ/mol nm), ``c12`` and ``c6`` are 4 eps sigma^12 and 4 eps sigma^6
    (kJ/mol nm^12, kJ/mol nm^6); excluded pairs have all three zero.
    """

    qq: np.ndarray
    c12: np.ndarray
    c6: np.ndarray


@dataclass(frozen=True)
class _ObcAtoms:
    """Per-atom OBC parameters, each ``[n_atoms]``: charge (e), offset radius R - 0.009 nm and scaled
    offset radius (nm); ``prefactor`` is -ONE_4PI_EPS0 (1/eps_solute - 1/eps_solvent) (kJ/mol nm / e^2).
    """

    q: np.ndarray
    offset_radius: np.ndarray
    scaled_radius: np.ndarray
    prefactor: float


def _check_no_pbc(force: openmm.Force) -> None:
    if force.usesPeriodicBoundaryConditions():
        raise _unsupported(force, "periodic boundary conditions")


class TorchForceField(Energy):
    """Reduced potential ``u(x) = U(x)/kT`` of an ``openmm.System``, evaluated in torch.

    Args:
        system: a non-periodic OpenMM system made only of the supported forces (module docstring).
        temperature_K: temperature defining ``kT``.
        chunk_size: most configurations evaluated in one vectorized pass; larger batches are split.
            Each term further caps its block so that configurations x rows (bonds, angles, torsion
            quadruplets or atom pairs) stays bounded: 2^23 on GPU, 2^14 on CPU where cache-sized
            blocks run faster (but at least 64 configurations). Gradients are analytic and computed
            block by block alongside the energy, so the memory held for the backward pass is only
            ``[batch, 3 n_atoms]``.
        native: use the fused C kernel on the CPU in float64: ``None`` (default) where it builds,
            ``True`` to require it (an error says why it cannot be built), ``False`` never.

    Shapes: ``x`` is ``[batch, 3 * n_atoms]`` in nm; energies are ``[batch]``.
    The default dtype is float64; ``module.to(torch.float32)`` switches the computation to float32.
    """

    # The kernel parameters hold raw pointers, and whether the kernel runs depends on the machine.
    _runtime_attributes: ClassVar[dict[str, Callable[[], Any]]] = {"_kernel_params": dict,
                                                                   "_native_decision": lambda: None}

    def __init__(self, system: openmm.System, temperature_K: float, chunk_size: int = 4096,
                 native: bool | None = None) -> None:
        n_atoms = system.getNumParticles()
        super().__init__(3 * n_atoms)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.native = native
        # Kernel parameter blocks by the tuple of terms they cover (all, or one for energy_terms_kJ);
        # built on first use, not state.
        self._kernel_params: dict[tuple[str, ...], native_kernel.KernelParameters] = {}
        # uses_native_kernel(), decided once per placement of the buffers (see _apply).
        self._native_decision: bool | None = None
        self.n_atoms = n_atoms
        self.temperature_K = float(temperature_K)
        self.kT_kJ_per_mol = _kT_kJ_per_mol(temperature_K)
        self.chunk_size = int(chunk_size)
        self.terms: list[str] = []
        self.register_buffer("_kT", torch.tensor(self.kT_kJ_per_mol, dtype=torch.float64))

        nonbonded: _PairParameters | None = None
        obc_atoms: _ObcAtoms | None = None
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
                nonbonded = self._read_nonbonded(force)
            elif isinstance(force, openmm.GBSAOBCForce):
                obc_atoms = self._add_obc(force)
            else:
                raise _unsupported(force)
        self._add_pairs(nonbonded, obc_atoms)

    @classmethod
    def from_system(cls, system: openmm.System, temperature_K: float, chunk_size: int = 4096,
                    native: bool | None = None) -> "TorchForceField":
        """Same as the constructor; reads for symmetry with other energy factories."""
        return cls(system, temperature_K, chunk_size=chunk_size, native=native)

    # ------------------------------------------------------------------ parameter extraction
    def _register(self, name: str, values: np.ndarray | list, dtype: torch.dtype) -> None:
        self.register_buffer(name, torch.as_tensor(np.asarray(values), dtype=dtype))

    def _register_column(self, name: str, values: np.ndarray) -> None:
        """A float64 per-row parameter stored as ``[rows, 1]``, ready to broadcast over a block."""
        self._register(name, np.asarray(values, dtype=np.float64).reshape(-1, 1), torch.float64)

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
        self._register("bond_idx", np.asarray(idx, dtype=np.int64).reshape(-1, 2).T.copy(), torch.long)
        self._register_column("bond_r0", r0)
        self._register_column("bond_k", k)

    def _add_angles(self, force: openmm.HarmonicAngleForce) -> None:
        _check_no_pbc(force)
        idx, t0, k = [], [], []
        for a in range(force.getNumAngles()):
            i, j, l, theta0, ka = force.getAngleParameters(a)
            idx.append((i, j, l))
            t0.append(_v(theta0, unit.radian))
            k.append(_v(ka, unit.kilojoule_per_mole / unit.radian**2))
        self._add_term("angles")
        self._register("angle_idx", np.asarray(idx, dtype=np.int64).reshape(-1, 3).T.copy(), torch.long)
        self._register_column("angle_theta0", t0)
        self._register_column("angle_k", k)

    def _add_torsions(self, force: openmm.PeriodicTorsionForce) -> None:
        """Group the torsions by atom quadruplet and store each group's energy as polynomials in cos(phi).

        ``sum_t k_t (1 + cos(n_t phi - phase_t)) = A(cos phi) + sin(phi) B(cos phi)``, with
        ``cos(n phi) = T_n(cos phi)`` and ``sin(n phi) = sin(phi) U_{n-1}(cos phi)`` (Chebyshev
        polynomials), so a quadruplet needs cos(phi) and sin(phi) but no atan2, sin or cos.
        """
        _check_no_pbc(force)
        quads: dict[tuple[int, int, int, int], list[tuple[int, float, float]]] = {}
        for t in range(force.getNumTorsions()):
            i, j, l, m, per, ph, kt = force.getTorsionParameters(t)
            quads.setdefault((i, j, l, m), []).append((int(per), _v(ph, unit.radian), _v(kt, unit.kilojoule_per_mole)))
        degree = max((n for terms in quads.values() for n, _, _ in terms), default=0)
        # cos_coef[m, q] and sin_coef[m, q] multiply cos(phi)^m in A and B of quadruplet q.
        cos_coef = np.zeros((degree + 1, len(quads)))
        sin_coef = np.zeros((max(degree, 1), len(quads)))
        for q, terms in enumerate(quads.values()):
            for n, phase, k in terms:
                t_n = np.polynomial.chebyshev.cheb2poly(np.eye(n + 1)[n])  # T_n, monomial basis, [n + 1]
                cos_coef[0, q] += k
                cos_coef[: n + 1, q] += k * _snap(math.cos(phase)) * t_n
                if n > 0:  # U_{n-1} = T_n' / n, [n]
                    sin_coef[:n, q] += k * _snap(math.sin(phase)) * np.polynomial.polynomial.polyder(t_n) / n
        if not sin_coef.any():
            # The usual phases (0 and pi) leave no sine polynomial: skip evaluating it.
            sin_coef = sin_coef[:0]
        self._add_term("torsions")
        self._register("torsion_idx", np.asarray(list(quads), dtype=np.int64).reshape(-1, 4).T.copy(), torch.long)
        self._register("torsion_cos_coef", cos_coef[:, :, None], torch.float64)
        self._register("torsion_sin_coef", sin_coef[:, :, None], torch.float64)

    def _read_nonbonded(self, force: openmm.NonbondedForce) -> _PairParameters:
        """Per-pair Coulomb and LJ parameters over all pairs ``i < j`` (exceptions applied)."""
        if force.getNonbondedMethod() != openmm.NonbondedForce.NoCutoff:
            raise _unsupported(force, "only the NoCutoff nonbonded method is supported")
        if force.getNumParticleParameterOffsets() > 0 or force.getNumExceptionParameterOffsets() > 0:
            raise _unsupported(force, "parameter offsets are not supported")
        self._add_term("nonbonded")
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
        s6 = s**6
        # 4 eps sigma^12 and 4 eps sigma^6, so LJ = c12 / r^12 - c6 / r^6.
        return _PairParameters(qq=ONE_4PI_EPS0 * qq, c12=4.0 * e * s6 * s6, c6=4.0 * e * s6)

    def _add_obc(self, force: openmm.GBSAOBCForce) -> _ObcAtoms:
        """Per-atom OBC parameters ``[n_atoms, 1]``; returns what :meth:`_add_pairs` needs for the pairs."""
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
        self._add_term("gbsa_obc")
        self._register_column("gb_half_offset_radius", 0.5 * offset_radius)
        self._register_column("gb_inv_offset_radius", 1.0 / offset_radius)
        self._register_column("gb_inv_radius", 1.0 / radius)
        # 0.5 prefactor q^2: the self term is this / B.
        self._register_column("gb_self", 0.5 * prefactor * q * q)
        # 4 pi E_sa (R + probe)^2 R^6, so the ACE term is this / B^6.
        self._register_column("gb_ace", surface * (radius + ACE_PROBE_RADIUS_NM) ** 2 * radius**6)
        return _ObcAtoms(q=q, offset_radius=offset_radius, scaled_radius=offset_radius * scale, prefactor=prefactor)

    def _add_pairs(self, nonbonded: _PairParameters | None, obc: _ObcAtoms | None) -> None:
        """The atom pairs ``i < j`` shared by the non-bonded and OBC terms, and their parameters.

        OBC needs every pair; without it only the pairs the exceptions leave interacting are kept.
        """
        if nonbonded is None and obc is None:
            return
        iu, ju = np.triu_indices(self.n_atoms, k=1)
        if obc is not None:
            keep = np.ones(iu.shape, dtype=bool)
        else:
            assert nonbonded is not None
            keep = (nonbonded.qq != 0.0) | (nonbonded.c12 != 0.0) | (nonbonded.c6 != 0.0)
        i, j = iu[keep], ju[keep]
        self._register("pair_idx", np.stack([i, j]).astype(np.int64).reshape(2, -1), torch.long)
        if nonbonded is not None:
            self._register_column("nb_qq", nonbonded.qq[keep])
            self._register_column("nb_c12", nonbonded.c12[keep])
            self._register_column("nb_c6", nonbonded.c6[keep])
        if obc is not None:
            rho, scaled = obc.offset_radius, obc.scaled_radius
            # Descreening runs over ordered pairs: row 0 sees j from i, row 1 sees i from j.
            center, other = np.stack([i, j]), np.stack([j, i])
            self._register("gb_center", center.reshape(-1).astype(np.int64), torch.long)
            self._register("gb_rho", rho[center][:, :, None], torch.float64)
            self._register("gb_neg_rho", -rho[center][:, :, None], torch.float64)
            self._register("gb_scaled", scaled[other][:, :, None], torch.float64)
            self._register("gb_scaled2", (scaled[other] ** 2)[:, :, None], torch.float64)
            self._register_column("gb_pair_qq", obc.prefactor * obc.q[i] * obc.q[j])

    # ------------------------------------------------------------------ energy terms
    # Layout inside a block: positions P are [n_atoms, 3, b] (atom-major, batch innermost), so that
    # gathering atoms and scattering their gradients are row copies/adds (fast on CPU), and every
    # elementwise op runs over the contiguous batch axis; per-row parameters are [rows, 1] columns.
    # Each term returns its energy [b] (kJ/mol) and, when G ([n_atoms, 3, b]) is given, adds dU/dP
    # into it: gradients are analytic, so one pass gives energy and forces without an autograd graph.
    # On CPU every op costs a pass over memory (and torch.where ~10 passes), so the formulas below
    # are arranged for few ops: fused addcmul, constants folded into parameters, no masks.

    def _bonds(self, P: Tensor, G: Tensor | None) -> Tensor:
        i, j = self.bond_idx
        d = P.index_select(0, j).sub_(P.index_select(0, i))
        dc = d.unbind(1)
        # The floor keeps r (and the energy) finite, not NaN, for coincident atoms.
        r2 = _dot(dc, dc).clamp_min_(torch.finfo(P.dtype).tiny)
        inv_r = torch.rsqrt(r2)
        dr = r2.mul_(inv_r).sub_(self.bond_r0)
        kdr = self.bond_k * dr
        if G is not None:
            gj = d.mul_(inv_r.mul_(kdr).unsqueeze(1))
            G.index_add_(0, j, gj).index_add_(0, i, gj.neg_())
        return 0.5 * kdr.mul_(dr).sum(0)

    def _angles(self, P: Tensor, G: Tensor | None) -> Tensor:
        i, j, k = self.angle_idx
        pj = P.index_select(0, j)
        a = P.index_select(0, i).sub_(pj)
        b = P.index_select(0, k).sub_(pj)
        ac, bc = a.unbind(1), b.unbind(1)
        a2, b2, ab = _dot(ac, ac), _dot(bc, bc), _dot(ac, bc)
        # |a x b|^2 = |a|^2 |b|^2 - (a.b)^2: its rounding error moves theta by ~1e-16 / sin(theta) only;
        # the floor keeps |a x b| finite (and the energy not NaN) for collinear atoms.
        n2 = torch.mul(a2, b2).addcmul_(ab, ab, value=-1.0).clamp_min_(torch.finfo(P.dtype).tiny)
        inv_n = torch.rsqrt(n2)
        # atan2(|a x b|, a.b) stays accurate near 0 and pi, where acos loses digits.
        dt = torch.atan2(n2.mul_(inv_n), ab).sub_(self.angle_theta0)
        kdt = self.angle_k * dt
        if G is not None:
            # d theta/da = ((a.b)/|a|^2 a - b) / |a x b|, and symmetrically for b.
            c = inv_n.mul_(kdt)
            cab = ab.mul_(c)
            c_n = c.unsqueeze(1)
            gi = torch.mul(a, (cab / a2).unsqueeze(1)).addcmul_(c_n, b, value=-1.0)
            gk = b.mul_((cab / b2).unsqueeze(1)).addcmul_(c_n, a, value=-1.0)
            G.index_add_(0, i, gi).index_add_(0, k, gk).index_add_(0, j, gi.add_(gk).neg_())
        return 0.5 * kdt.mul_(dt).sum(0)

    def _torsions(self, P: Tensor, G: Tensor | None) -> Tensor:
        i0, i1, i2, i3 = self.torsion_idx
        p1 = P.index_select(0, i1)
        p2 = P.index_select(0, i2)
        f = P.index_select(0, i0).sub_(p1).unbind(1)
        g = p1.sub_(p2).unbind(1)
        h = P.index_select(0, i3).sub_(p2).unbind(1)
        a, ac = _cross(f, g)
        b, bc = _cross(h, g)
        a2, b2, g2 = _dot(ac, ac), _dot(bc, bc), _dot(g, g)
        g_norm = torch.rsqrt(g2).mul_(g2)
        # IUPAC sign convention (the one OpenMM uses): phi = atan2(|b2| b1.(b2 x b3), (b1 x b2).(b2 x b3))
        # with b1 = -f, b2 = -g, b3 = h; the two arguments have norm |a| |b|.
        inv_ab = torch.mul(a2, b2).clamp_min_(torch.finfo(P.dtype).tiny).rsqrt_()
        cos_phi = _dot(ac, bc).mul_(inv_ab)
        neg_sin_phi = _dot(f, bc).mul_(inv_ab.mul_(g_norm))
        need_grad = G is not None
        energy, d_cos = _horner(self.torsion_cos_coef, cos_phi, need_grad)
        if self.torsion_sin_coef.shape[0] > 0:
            sin_poly, d_sin_poly = _horner(self.torsion_sin_coef, cos_phi, need_grad)
            energy = torch.addcmul(energy, neg_sin_phi, sin_poly, value=-1.0)
        if G is None:
            return energy.sum(0)
        de_dphi = neg_sin_phi * d_cos
        if self.torsion_sin_coef.shape[0] > 0:
            # d/dphi [sin B(cos)] = cos B(cos) - sin^2 B'(cos)
            de_dphi.addcmul_(cos_phi, sin_poly).addcmul_(neg_sin_phi * neg_sin_phi, d_sin_poly, value=-1.0)
        # Blondel & Karplus (1996) gradient of phi, free of the 1/sin(phi) singularity.
        de_dphi.mul_(g_norm)
        ca = de_dphi / a2
        cd = de_dphi / b2
        inv_g2 = g2.reciprocal_()
        fg_ca = _dot(f, g).mul_(inv_g2).mul_(ca).unsqueeze(1)
        hg_cd = _dot(h, g).mul_(inv_g2).mul_(cd)
        ga = a * ca.unsqueeze(1)  # = -dU/dp0
        gd = b * cd.unsqueeze(1)  # = dU/dp3
        # dU/dp1 = (1 + fg) ga - hg gd and dU/dp2 = (hg - 1) gd - fg ga (the four sum to zero),
        # with fg = f.g / |g|^2 and hg = h.g / |g|^2.
        g1 = torch.addcmul(ga, fg_ca, a).addcmul_(hg_cd.unsqueeze(1), b, value=-1.0)
        g2_ = b.mul_(hg_cd.sub_(cd).unsqueeze(1)).addcmul_(fg_ca, a, value=-1.0)
        G.index_add_(0, i3, gd).index_add_(0, i1, g1).index_add_(0, i2, g2_).index_add_(0, i0, ga.neg_())
        return energy.sum(0)

    def _pairs(self, P: Tensor, G: Tensor | None, nonbonded: bool, gbsa: bool) -> Tensor:
        """Non-bonded and/or OBC energy over the shared pair list, with one gather and one scatter.

        Each term adds ``-(1/r) dU/dr`` of its pairs (``[pairs, b]``) into ``h``, so that the force on
        atom ``j`` of a pair is ``h d`` and that on ``i`` is ``-h d``.
        """
        i, j = self.pair_idx
        d = P.index_select(0, j).sub_(P.index_select(0, i))
        dc = d.unbind(1)
        r2 = _dot(dc, dc)
        inv_r = torch.rsqrt(r2)
        inv_r2 = inv_r * inv_r
        need_grad = G is not None
        parts: list[tuple[Tensor, Tensor | None]] = []
        if nonbonded:
            parts.append(self._nonbonded(inv_r, inv_r2, need_grad))
        if gbsa:
            parts.append(self._gbsa_obc(r2, inv_r, inv_r2, need_grad))
        energy = parts[0][0] if len(parts) == 1 else parts[0][0] + parts[1][0]
        if G is not None:
            hs = [h for _, h in parts if h is not None]
            h = hs[0] if len(hs) == 1 else hs[0].add_(hs[1])
            gi = d.mul_(h.unsqueeze(1))
            G.index_add_(0, i, gi).index_add_(0, j, gi.neg_())
        return energy

    def _nonbonded(self, inv_r: Tensor, inv_r2: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        """Coulomb + LJ energy ``[b]`` and ``-(1/r) dU/dr`` per pair (``[pairs, b]``, if asked)."""
        inv_r6 = torch.mul(inv_r2, inv_r2).mul_(inv_r2)
        lj12 = self.nb_c12 * inv_r6  # c12 / r^12 = lj12 / r^6
        lj = lj12 - self.nb_c6
        coul = self.nb_qq * inv_r
        energy = torch.addcmul(coul, lj, inv_r6).sum(0)
        if not need_grad:
            return energy, None
        # -r dU/dr = 12 c12/r^12 - 6 c6/r^6 + qq/r = 6 (lj12 + lj) / r^6 + coul
        return energy, coul.addcmul_(lj.add_(lj12), inv_r6, value=6.0).mul_(inv_r2)

    def _gbsa_obc(self, r2: Tensor, inv_r: Tensor, inv_r2: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        """OBC energy ``[b]`` and ``-(1/r) dU/dr`` per pair (``[pairs, b]``, if asked).

        Descreening runs over both orders of each pair at once: ``[2, pairs, b]`` tensors with the
        centre atom's offset radius ``rho`` and the other atom's scaled radius ``s`` as ``[2, pairs, 1]``.
        Intermediates are updated in place where possible, to keep the working set in cache.
        """
        n_b = r2.shape[1]
        r = r2 * inv_r
        upper = r + self.gb_scaled
        lower = r - self.gb_scaled
        # Buried atom (rho < s - r): + 2 (1/rho - 1/l) with 1/l = -1/(r - s); it is 0 otherwise, as
        # min(r - s, -rho) is then -rho.
        buried = lower.clamp(max=self.gb_neg_rho).reciprocal_().add_(self.gb_rho.reciprocal())
        # lower = max(|r - s|, rho), capped at upper: lower == upper exactly where the sphere does not
        # reach (rho >= r + s), which zeroes the term and its derivative without a mask.
        lower.abs_().clamp_(min=self.gb_rho, max=upper)
        inv_l = lower.reciprocal()
        inner2 = lower.div_(upper).log_()  # log(l/u) so far
        inv_u = upper.reciprocal_()
        term = inv_l - inv_u
        dl2 = inv_u.add_(inv_l).mul_(term)  # 1/l^2 - 1/u^2
        del inv_l, inv_u, lower, upper
        # inner2 = log(l/u) + (s^2 - r^2)(1/l^2 - 1/u^2) / 2; term = 1/l - 1/u + inner2 / (2 r) + buried
        inner2.addcmul_(dl2, self.gb_scaled2 - r2, value=0.5)
        term.addcmul_(inv_r, inner2, value=0.5).add_(buried, alpha=2.0)
        del buried
        # Where l and u depend on r, d term/dl and d term/du vanish identically (also with the buried
        # correction), so only the explicit r-dependence is left: d term/dr = -(dl2 + inner2 / r^2) / 2.
        dterm2 = dl2.addcmul_(inv_r2, inner2) if need_grad else None
        del dl2, inner2
        total = r2.new_zeros(self.n_atoms, n_b).index_add_(0, self.gb_center, term.view(-1, n_b))
        del term
        psi = self.gb_half_offset_radius * total
        psi_poly = psi * (OBC_ALPHA + psi * (-OBC_BETA + OBC_GAMMA * psi))
        th = torch.tanh(psi_poly)
        inv_born = torch.addcmul(self.gb_inv_offset_radius, th, self.gb_inv_radius, value=-1.0)
        born = inv_born.reciprocal()
        # ACE non-polar term; OpenMM skips atoms whose Born radius came out non-positive.
        inv_born_pos = inv_born.clamp_min(0.0)
        inv_born_pos3 = inv_born_pos * inv_born_pos * inv_born_pos
        ace = self.gb_ace * inv_born_pos3 * inv_born_pos3
        self_term = self.gb_self * inv_born
        i, j = self.pair_idx
        bi = born.index_select(0, i)
        bj = born.index_select(0, j)
        bb = bi * bj
        dd4 = r2 / bb  # 4 D_ij
        ex = torch.mul(dd4, -0.25).exp_()
        inv_f = bb.mul_(ex).add_(r2).rsqrt_()  # 1 / f_GB
        pair = self.gb_pair_qq * inv_f
        energy = (ace + self_term).sum(0) + pair.sum(0)
        if dterm2 is None:
            return energy, None
        cf = pair.mul_(inv_f).mul_(inv_f)  # = -2 dU/d(f^2)
        cfe = ex.mul_(cf)
        # -2 dU/d(B_i B_j) = cfe (1 + D_ij)
        dbb = torch.addcmul(cfe, cfe, dd4, value=0.25)
        # -2 dU/dB: ACE (12 ace / B), self term (2 self / B) and pairs (dbb times the partner's B).
        de_dborn = torch.add(self_term, ace, alpha=6.0).mul_(2.0 * inv_born)
        de_dborn.index_add_(0, i, bj.mul_(dbb)).index_add_(0, j, bi.mul_(dbb))
        dpsi_poly = OBC_ALPHA + psi * (-2.0 * OBC_BETA + 3.0 * OBC_GAMMA * psi)
        # dU/d(term) = dU/dB dB/dpsi dpsi/d(term), with dB/dpsi = B^2 (1 - th^2) dpsi_poly / R and
        # dpsi/d(term) = rho / 2. As de_dborn is -2 dU/dB and dterm2 is -2 d term/dr, their product
        # below is 4 dU/dr.
        de_dterm = de_dborn.mul_(born).mul_(born).mul_(1.0 - th * th).mul_(dpsi_poly).mul_(self.gb_inv_radius)
        de_dterm.mul_(self.gb_half_offset_radius)
        # Both orders of each pair summed.
        de_dr4 = dterm2.mul_(de_dterm.index_select(0, self.gb_center).view_as(dterm2)).sum(0)
        # -(1/r) dU/dr: the pair term gives cf (1 - ex/4), the descreening -de_dr4 / (4 r).
        return energy, cf.add_(cfe, alpha=-0.25).addcmul_(de_dr4, inv_r, value=-0.25)

    # ------------------------------------------------------------------ evaluation
    def _stages(self, terms: list[str]) -> list[tuple[Callable[[Tensor, Tensor | None], Tensor], int]]:
        """The block functions that evaluate ``terms``, each with its row count (terms or pairs)."""
        stages: list[tuple[Callable[[Tensor, Tensor | None], Tensor], int]] = []
        for term, idx in (("bonds", "bond_idx"), ("angles", "angle_idx"), ("torsions", "torsion_idx")):
            if term in terms:
                stages.append((getattr(self, f"_{term}"), int(getattr(self, idx).shape[1])))
        nonbonded, gbsa = "nonbonded" in terms, "gbsa_obc" in terms
        if nonbonded or gbsa:
            n_pairs = int(self.pair_idx.shape[1])
            stages.append((lambda P, G: self._pairs(P, G, nonbonded, gbsa), n_pairs))
        return stages

    def _block(self, rows: int) -> int:
        """Configurations per block for a term with ``rows`` rows (see the class docstring)."""
        rows = max(rows, 1)
        limit = _MAX_BLOCK_ELEMENTS // rows
        if self._kT.device.type == "cpu":
            limit = min(limit, max(_CPU_MIN_BLOCK, _CPU_BLOCK_ELEMENTS // rows))
        return max(1, min(self.chunk_size, limit))

    def _prepare(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects x of shape [batch, {self.dim}], got {list(x.shape)}")
        kT = self._kT
        if x.device != kT.device:
            # The energy follows its input's device; parameters are moved once and then stay.
            self.to(x.device)
            kT = self._kT
        # Each call here costs microseconds, and a training step makes several: skip the no-ops.
        if x.requires_grad:
            x = x.detach()
        return x if x.dtype == kT.dtype else x.to(kT.dtype)

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> TorchForceField:
        # .to(), .cuda(), .double() ... all come through here: the kernel decision is made again.
        self._native_decision = None
        return super()._apply(fn, *args, **kwargs)

    def uses_native_kernel(self) -> bool:
        """Whether evaluations on the CPU in float64 run in the fused C kernel (builds it if needed)."""
        if self._native_decision is None:
            self._native_decision = self._decide_native(self._kT)
        return self._native_decision

    def _decide_native(self, kT: Tensor) -> bool:
        if self.native is False or kT.device.type != "cpu" or kT.dtype != torch.float64:
            return False
        if native_kernel.load_kernel() is None:
            if self.native:
                raise RuntimeError(f"the force-field C kernel is unavailable: {native_kernel.unavailable_reason()}; "
                                   "install a C compiler (or set CC), or use native=False")
            return False
        return bool(self.terms)

    def _kernel_parameters(self, terms: tuple[str, ...]) -> native_kernel.KernelParameters:
        if terms not in self._kernel_params:
            def index(name: str) -> np.ndarray:
                return getattr(self, name).numpy()

            def column(name: str) -> np.ndarray:
                # [rows, 1] parameters to [rows]; [m, rows, 1] coefficients (and OBC's per-order
                # [2, pairs, 1]) to [m, rows].
                return getattr(self, name).numpy()[..., 0]

            parts = {
                "bonds": lambda: (index("bond_idx"), column("bond_r0"), column("bond_k")),
                "angles": lambda: (index("angle_idx"), column("angle_theta0"), column("angle_k")),
                "torsions": lambda: (index("torsion_idx"), column("torsion_cos_coef"), column("torsion_sin_coef")),
                "nonbonded": lambda: (column("nb_qq"), column("nb_c12"), column("nb_c6")),
                "gbsa_obc": lambda: tuple(column(name) for name in (
                    "gb_rho", "gb_scaled", "gb_half_offset_radius", "gb_inv_offset_radius", "gb_inv_radius",
                    "gb_self", "gb_ace", "gb_pair_qq")),
            }
            kwargs: dict[str, Any] = {term: parts[term]() for term in terms}
            if "nonbonded" in terms or "gbsa_obc" in terms:
                kwargs["pair_idx"] = index("pair_idx")
            self._kernel_params[terms] = native_kernel.KernelParameters(self.n_atoms, **kwargs)
        return self._kernel_params[terms]

    def _evaluate(self, x: Tensor, terms: list[str], need_grad: bool,
                  scale: float = 1.0) -> tuple[Tensor, Tensor | None]:
        """``scale`` times the energy ``[batch]`` (kJ/mol) of ``terms`` and, if asked, of dU/dx ``[batch, 3 n_atoms]``.

        With :meth:`uses_native_kernel` the C kernel evaluates the terms. Otherwise each term runs in
        eager torch over the batch in blocks sized for its own row count (:meth:`_block`); a block is
        transposed to the ``[n_atoms, 3, b]`` layout on the way in and its gradient back on the way
        out (small, cache-resident copies, unlike one transpose of the whole batch).
        """
        n_b = x.shape[0]
        if self.uses_native_kernel():
            library = native_kernel.load_kernel()
            assert library is not None
            return native_kernel.energy_and_grad(library, self._kernel_parameters(tuple(terms)), x, need_grad, scale)
        energy = x.new_zeros(n_b)
        grad = x.new_zeros(n_b, self.dim) if need_grad else None
        for stage, rows in self._stages(terms):
            block = self._block(rows)
            for start in range(0, n_b, block):
                part = slice(start, start + block)
                x_part = x[part]
                P = x_part.reshape(x_part.shape[0], self.n_atoms, 3).permute(1, 2, 0).contiguous()
                G = torch.zeros_like(P) if grad is not None else None
                energy[part] += stage(P, G)
                if grad is not None:
                    grad[part].view(-1, self.n_atoms, 3).permute(1, 2, 0).add_(G)
        if scale != 1.0:
            energy.mul_(scale)
            if grad is not None:
                grad.mul_(scale)
        return energy, grad

    def energy_kJ(self, x: Tensor) -> Tensor:
        """Potential energy U(x) in kJ/mol for ``x [batch, 3 n_atoms]`` in nm; returns ``[batch]``.

        Differentiable with respect to ``x`` (first derivatives only).
        """
        return _TorchFFFunction.apply(x, self, 1.0)

    def energy_terms_kJ(self, x: Tensor) -> dict[str, Tensor]:
        """Each force's energy in kJ/mol, ``{term: [batch]}`` (no gradient), keyed as in :attr:`terms`."""
        xp = self._prepare(x)
        return {term: self._evaluate(xp, [term], False)[0] for term in self.terms}

    def reduced_energy(self, x: Tensor) -> Tensor:
        """u(x) = U(x)/kT for ``x [batch, 3 n_atoms]`` in nm; returns ``[batch]`` in the module's dtype.

        Differentiable with respect to ``x`` (first derivatives only).
        """
        return _TorchFFFunction.apply(x, self, 1.0 / self.kT_kJ_per_mol)

    def energy_and_forces_kJ(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """U(x) ``[batch]`` in kJ/mol and F = -dU/dx ``[batch, 3 n_atoms]`` in kJ/mol/nm, in one pass."""
        energy, grad = self._evaluate(self._prepare(x), self.terms, True)
        assert grad is not None
        return energy, -grad


class _TorchFFFunction(torch.autograd.Function):
    """``scale`` times the energy in forward; the analytic gradient computed alongside it is handed
    out in backward.

    The gradient buffer belongs to this graph node alone (kept on ``ctx``, not saved as an input or
    output), so backward scales it in place and gives it away: no copy. A second backward through the
    same graph (``retain_graph=True``) therefore raises instead of reusing a buffer the caller may
    have changed.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, module: TorchForceField, scale: float) -> Tensor:
        need_grad = bool(ctx.needs_input_grad[0])
        energy, grad = module._evaluate(module._prepare(x), module.terms, need_grad, scale)
        if need_grad:
            ctx.grad = grad
            ctx.input_dtype = x.dtype
        return energy

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_energy: Tensor) -> tuple[Tensor, None, None]:
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("TorchForceField: backward through the same energy evaluation twice is not "
                               "supported; evaluate the energy again")
        grad_energy = grad_energy.to(grad.dtype)
        if grad.device.type == "cpu":
            # numpy: single-threaded, so no OpenMP pool to wake for one light pass over memory.
            weights = grad_energy.numpy()
            if weights.ndim == 1 and weights.strides[0] == 0:
                weights = weights[:1]  # one weight broadcast over the batch (u.sum(), u.mean())
            if not (weights.shape == (1,) and weights[0] == 1.0):
                np.multiply(grad.numpy(), weights[:, None], out=grad.numpy())
        else:
            grad.mul_(grad_energy.unsqueeze(1))
        return grad.to(ctx.input_dtype), None, None


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
    native: bool | None = None,
) -> ParityReport:
    """Compare :class:`TorchForceField` (float64, CPU) with OpenMM's Reference platform.

    Args:
        system: the OpenMM system.
        positions_nm: reference positions ``[n_atoms, 3]`` in nm.
        temperature_K: temperature (only sets kT; parity is checked in kJ/mol).
        n: number of perturbed configurations.
        noise_nm: standard deviation of the Gaussian perturbation of every coordinate, nm.
        seed: seed of the perturbation.
        native: passed to :class:`TorchForceField` (``None``: the C kernel where it builds).
    """
    base = np.asarray(positions_nm, dtype=np.float64).reshape(-1, 3)
    rng = np.random.default_rng(seed)
    frames = base[None] + noise_nm * rng.standard_normal((n, *base.shape))
    e_ref, f_ref = openmm_energies_forces(system, frames)
    ff = TorchForceField(system, temperature_K, native=native)
    x = torch.as_tensor(frames.reshape(n, -1), dtype=torch.float64)
    energy, forces = ff.energy_and_forces_kJ(x)
    e, f = energy.numpy(), forces.numpy().reshape(frames.shape)
    abs_err = np.abs(e - e_ref)
    return ParityReport(
        max_abs_energy_kJ=float(abs_err.max()),
        max_rel_energy=float((abs_err / np.maximum(np.abs(e_ref), 1e-300)).max()),
        max_abs_force_kJ_nm=float(np.abs(f - f_ref).max()),
        n=int(n),
    )
