"""The parameters of an ``openmm.System``, read once into numpy arrays for the torch force field.

:func:`read_system` turns a non-periodic system into a :class:`ForceFieldParameters`: per-term
index and parameter arrays in the units and layout that both evaluators of
:class:`~boltzgen.energies.torchff.TorchForceField` use (the eager torch kernels in
:mod:`boltzgen.energies.eager` and the C kernel in :mod:`boltzgen.energies.native`).

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

Anything else raises a one-line ``ValueError`` that points to ``energy_backend: openmm``.

Units: lengths in nm, angles in radians, charges in e, energies in kJ/mol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import openmm
import openmm.unit as unit

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

_IGNORED_FORCES = ("CMMotionRemover",)

# Torsion phases this close to a multiple of pi/2 are snapped to it (changing energies by < 1e-12 k),
# so that the usual 0 and pi phases need no sine polynomial.
_PHASE_SNAP = 1e-12


@dataclass(frozen=True, eq=False)
class BondParameters:
    """Harmonic bonds ``k/2 (r - r0)^2``: atom indices ``idx`` ``[2, n_bonds]`` int64, rest lengths
    ``r0`` ``[n_bonds]`` in nm and force constants ``k`` ``[n_bonds]`` in kJ/mol/nm^2."""

    idx: np.ndarray
    r0: np.ndarray
    k: np.ndarray


@dataclass(frozen=True, eq=False)
class AngleParameters:
    """Harmonic angles ``k/2 (theta - theta0)^2`` at the middle atom: ``idx`` ``[3, n_angles]`` int64,
    ``theta0`` ``[n_angles]`` in rad and ``k`` ``[n_angles]`` in kJ/mol/rad^2."""

    idx: np.ndarray
    theta0: np.ndarray
    k: np.ndarray


@dataclass(frozen=True, eq=False)
class TorsionParameters:
    """Periodic torsions, grouped by atom quadruplet ``idx`` ``[4, n_quads]`` int64.

    The energy of quadruplet ``q`` is ``A_q(cos phi) + sin(phi) B_q(cos phi)`` with the polynomial
    coefficients ``cos_coef[m, q]`` (of ``A``) and ``sin_coef[m, q]`` (of ``B``) multiplying
    ``cos(phi)^m``, in kJ/mol: ``cos_coef`` is ``[degree + 1, n_quads]``, ``sin_coef`` is
    ``[degree, n_quads]``, or ``[0, n_quads]`` when every phase is 0 or pi (no sine part).
    """

    idx: np.ndarray
    cos_coef: np.ndarray
    sin_coef: np.ndarray


@dataclass(frozen=True, eq=False)
class NonbondedParameters:
    """Coulomb and Lennard-Jones parameters of the pair list, each ``[n_pairs]``.

    ``qq`` is ``ONE_4PI_EPS0 q_i q_j`` (kJ/mol nm), ``c12`` and ``c6`` are ``4 eps sigma^12`` and
    ``4 eps sigma^6`` (kJ/mol nm^12, kJ/mol nm^6), so the pair energy is
    ``qq / r + c12 / r^12 - c6 / r^6``; excluded pairs have all three zero.
    """

    qq: np.ndarray
    c12: np.ndarray
    c6: np.ndarray


@dataclass(frozen=True, eq=False)
class ObcParameters:
    """OBC generalized-Born parameters, with constants folded in.

    Per atom, each ``[n_atoms]``: ``half_offset_radius`` (``rho / 2``, nm, where the offset radius
    ``rho`` is the radius ``R`` less 0.009 nm), ``inv_offset_radius`` (``1/rho``, 1/nm),
    ``inv_radius`` (``1/R``, 1/nm), ``self_coef`` (the self term is ``self_coef / B``, kJ/mol nm)
    and ``ace`` (``4 pi E_sa (R + 0.14)^2 R^6``, so the ACE term is ``ace / B^6``, kJ/mol nm^6).

    Per ordered pair, each ``[2, n_pairs]`` over the pair list: row 0 is atom ``i`` descreened by
    ``j``, row 1 ``j`` by ``i``; ``center`` (int64) is the descreened atom, ``rho`` its offset radius
    and ``scaled`` the other atom's scaled offset radius (nm). ``pair_qq`` ``[n_pairs]`` is the
    prefactor ``-ONE_4PI_EPS0 (1/eps_solute - 1/eps_solvent)`` times ``q_i q_j`` (kJ/mol nm).
    """

    half_offset_radius: np.ndarray
    inv_offset_radius: np.ndarray
    inv_radius: np.ndarray
    self_coef: np.ndarray
    ace: np.ndarray
    center: np.ndarray
    rho: np.ndarray
    scaled: np.ndarray
    pair_qq: np.ndarray


@dataclass(frozen=True, eq=False)
class ForceFieldParameters:
    """Everything the torch force field evaluates, read from one ``openmm.System``.

    ``terms`` names the energy terms present, in the order of the system's forces, from
    ``bonds``, ``angles``, ``torsions``, ``nonbonded`` and ``gbsa_obc``; a missing term's parameters
    are ``None``. ``pair_idx`` ``[2, n_pairs]`` int64 (pairs ``i < j``) is the pair list shared by
    ``nonbonded`` and ``obc``: every pair with OBC, else only the pairs the exceptions leave
    interacting; ``None`` without either term.
    """

    n_atoms: int
    terms: tuple[str, ...]
    bonds: BondParameters | None = None
    angles: AngleParameters | None = None
    torsions: TorsionParameters | None = None
    pair_idx: np.ndarray | None = None
    nonbonded: NonbondedParameters | None = None
    obc: ObcParameters | None = None


@dataclass(frozen=True, eq=False)
class _AllPairs:
    """Non-bonded parameters over all pairs ``i < j`` (``np.triu_indices`` order), as in
    :class:`NonbondedParameters`, before the pair list is chosen."""

    qq: np.ndarray
    c12: np.ndarray
    c6: np.ndarray


@dataclass(frozen=True, eq=False)
class _ObcAtoms:
    """Per-atom OBC input, each ``[n_atoms]``: charge ``q`` (e), ``radius`` (nm) and ``scale``
    (dimensionless), with the solvent ``prefactor`` (kJ/mol nm / e^2) and the surface energy
    ``surface`` ``4 pi E_sa`` (kJ/mol/nm^2)."""

    q: np.ndarray
    radius: np.ndarray
    scale: np.ndarray
    prefactor: float
    surface: float


def read_system(system: openmm.System) -> ForceFieldParameters:
    """Read the parameters of ``system`` (forms and units in the module docstring).

    Raises a one-line ``ValueError`` for an unsupported force, an unsupported option of a supported
    one (periodic boundaries, a cutoff, parameter offsets), or two forces of the same kind.
    """
    found: dict[str, Any] = {}
    for force in system.getForces():
        if type(force).__name__ in _IGNORED_FORCES:
            continue
        term, value = _read_force(force)
        if term in found:
            raise ValueError(f"TorchForceField supports one {term} force per system, found several")
        found[term] = value
    n_atoms = system.getNumParticles()
    pair_idx, nonbonded, obc = _pair_list(n_atoms, found.get("nonbonded"), found.get("gbsa_obc"))
    return ForceFieldParameters(
        n_atoms=n_atoms, terms=tuple(found), bonds=found.get("bonds"), angles=found.get("angles"),
        torsions=found.get("torsions"), pair_idx=pair_idx, nonbonded=nonbonded, obc=obc,
    )


def _read_force(force: openmm.Force) -> tuple[str, Any]:
    """The term name of ``force`` and its parameters as read (before the pair list is chosen)."""
    if isinstance(force, openmm.HarmonicBondForce):
        return "bonds", _read_bonds(force)
    if isinstance(force, openmm.HarmonicAngleForce):
        return "angles", _read_angles(force)
    if isinstance(force, openmm.PeriodicTorsionForce):
        return "torsions", _read_torsions(force)
    if isinstance(force, openmm.NonbondedForce):
        return "nonbonded", _read_nonbonded(force)
    if isinstance(force, openmm.GBSAOBCForce):
        return "gbsa_obc", _read_obc(force)
    raise _unsupported(force)


def _unsupported(force: openmm.Force, why: str = "") -> ValueError:
    name = type(force).__name__
    detail = f" ({why})" if why else ""
    return ValueError(
        f"TorchForceField does not support {name}{detail}; use `energy_backend: openmm` for this system"
    )


def _check_no_pbc(force: openmm.Force) -> None:
    if force.usesPeriodicBoundaryConditions():
        raise _unsupported(force, "periodic boundary conditions")


def _v(q: object, u: unit.Unit) -> float:
    """Strip an OpenMM quantity to a float in unit ``u`` (plain numbers pass through)."""
    return float(q.value_in_unit(u)) if unit.is_quantity(q) else float(q)  # type: ignore[union-attr]


def _snap(value: float) -> float:
    """``value`` (a cosine or sine of a torsion phase) with values below _PHASE_SNAP set to zero."""
    return 0.0 if abs(value) < _PHASE_SNAP else value


def _read_bonds(force: openmm.HarmonicBondForce) -> BondParameters:
    _check_no_pbc(force)
    idx, r0, k = [], [], []
    for b in range(force.getNumBonds()):
        i, j, length, kb = force.getBondParameters(b)
        idx.append((i, j))
        r0.append(_v(length, unit.nanometer))
        k.append(_v(kb, unit.kilojoule_per_mole / unit.nanometer**2))
    return BondParameters(idx=np.asarray(idx, dtype=np.int64).reshape(-1, 2).T.copy(),
                          r0=np.asarray(r0, dtype=np.float64), k=np.asarray(k, dtype=np.float64))


def _read_angles(force: openmm.HarmonicAngleForce) -> AngleParameters:
    _check_no_pbc(force)
    idx, t0, k = [], [], []
    for a in range(force.getNumAngles()):
        i, j, l, theta0, ka = force.getAngleParameters(a)
        idx.append((i, j, l))
        t0.append(_v(theta0, unit.radian))
        k.append(_v(ka, unit.kilojoule_per_mole / unit.radian**2))
    return AngleParameters(idx=np.asarray(idx, dtype=np.int64).reshape(-1, 3).T.copy(),
                           theta0=np.asarray(t0, dtype=np.float64), k=np.asarray(k, dtype=np.float64))


def _read_torsions(force: openmm.PeriodicTorsionForce) -> TorsionParameters:
    """Group the torsions by atom quadruplet and write each group's energy as polynomials in cos(phi).

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
    return TorsionParameters(idx=np.asarray(list(quads), dtype=np.int64).reshape(-1, 4).T.copy(),
                             cos_coef=cos_coef, sin_coef=sin_coef)


def _read_nonbonded(force: openmm.NonbondedForce) -> _AllPairs:
    """Coulomb and LJ parameters over all pairs ``i < j``, exceptions applied."""
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
    s6 = s**6
    # 4 eps sigma^12 and 4 eps sigma^6, so LJ = c12 / r^12 - c6 / r^6.
    return _AllPairs(qq=ONE_4PI_EPS0 * qq, c12=4.0 * e * s6 * s6, c6=4.0 * e * s6)


def _read_obc(force: openmm.GBSAOBCForce) -> _ObcAtoms:
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
    return _ObcAtoms(q=q, radius=radius, scale=scale, prefactor=prefactor, surface=surface)


def _pair_list(n_atoms: int, nonbonded: _AllPairs | None, obc: _ObcAtoms | None
               ) -> tuple[np.ndarray | None, NonbondedParameters | None, ObcParameters | None]:
    """The pair list ``[2, n_pairs]`` shared by the non-bonded and OBC terms, and their parameters on it.

    OBC needs every pair; without it only the pairs the exceptions leave interacting are kept.
    """
    if nonbonded is None and obc is None:
        return None, None, None
    iu, ju = np.triu_indices(n_atoms, k=1)
    if obc is not None:
        keep = np.ones(iu.shape, dtype=bool)
    else:
        assert nonbonded is not None
        keep = (nonbonded.qq != 0.0) | (nonbonded.c12 != 0.0) | (nonbonded.c6 != 0.0)
    i, j = iu[keep], ju[keep]
    pair_idx = np.stack([i, j]).astype(np.int64).reshape(2, -1)
    nb = None
    if nonbonded is not None:
        nb = NonbondedParameters(qq=nonbonded.qq[keep], c12=nonbonded.c12[keep], c6=nonbonded.c6[keep])
    return pair_idx, nb, None if obc is None else _obc_parameters(obc, i, j)


def _obc_parameters(atoms: _ObcAtoms, i: np.ndarray, j: np.ndarray) -> ObcParameters:
    """The OBC parameters of :class:`ObcParameters` on the pairs ``(i, j)``, each ``[n_pairs]``."""
    radius = atoms.radius
    offset_radius = radius - OBC_DIELECTRIC_OFFSET_NM
    scaled_radius = offset_radius * atoms.scale
    # Descreening runs over ordered pairs: row 0 sees j from i, row 1 sees i from j.
    center, other = np.stack([i, j]), np.stack([j, i])
    return ObcParameters(
        half_offset_radius=0.5 * offset_radius,
        inv_offset_radius=1.0 / offset_radius,
        inv_radius=1.0 / radius,
        self_coef=0.5 * atoms.prefactor * atoms.q * atoms.q,
        ace=atoms.surface * (radius + ACE_PROBE_RADIUS_NM) ** 2 * radius**6,
        center=center.astype(np.int64),
        rho=offset_radius[center],
        scaled=scaled_radius[other],
        pair_qq=atoms.prefactor * atoms.q[i] * atoms.q[j],
    )
