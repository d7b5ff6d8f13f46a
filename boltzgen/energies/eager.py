"""The eager torch kernels of the torch force field: energies and analytic gradients, batched.

:func:`energy_and_grad` evaluates every term of an :class:`EagerParameters` (the parameters of
:mod:`boltzgen.energies.ffparams` as tensors) on a batch of configurations, on any device and in
any floating dtype. It is the reference for the C kernel (:mod:`boltzgen.energies.native`) and the
path on CUDA, in float32 and where no C compiler is available.

Layout inside a block: positions ``P`` are ``[n_atoms, 3, b]`` (atom-major, batch innermost), so
that gathering atoms and scattering their gradients are row copies and adds (fast on the CPU), and
every elementwise op runs over the contiguous batch axis; per-row parameters are ``[rows, 1]``
columns. Each term returns its energy ``[b]`` (kJ/mol) and, when ``G`` (``[n_atoms, 3, b]``) is
given, adds dU/dP (kJ/mol/nm) into it: gradients are analytic, so one pass gives energy and forces
without an autograd graph.

Performance notes (CPU, measured on alanine dipeptide): every torch op is a pass over memory plus a
fixed dispatch cost, so the terms are written for few ops per row: each term runs in cache-sized
blocks of its own, non-bonded and OBC share one pair list (one gather, one scatter), torsions
sharing atoms are one Chebyshev polynomial in cos(phi) (no atan2/sin/cos), constants are folded into
the parameters, and masks (``torch.where``, ~10 passes each) are replaced by clamps. A dense
``[n_atoms, n_atoms]`` pair layout and incidence-matrix matmuls in place of ``index_add_`` were
measured slower and are not used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass, replace
from functools import partial

import numpy as np
import torch
from torch import Tensor

from boltzgen.energies.ffparams import OBC_ALPHA, OBC_BETA, OBC_GAMMA, ForceFieldParameters

# Bound on (configurations x rows) handled at once, so a big molecule shrinks the batch block.
_MAX_BLOCK_ELEMENTS = 1 << 23
# On CPU, blocks of about this many (configuration x row) elements keep the working set in cache
# (2^13..2^15 measured alike for alanine dipeptide; 2^16 and up slower).
_CPU_BLOCK_ELEMENTS = 1 << 14
# ...but never fewer configurations than this: with the batch innermost, very short rows make every
# elementwise op pay per-row overhead (a 582-atom protein runs ~7x faster per configuration at 16 than at 1).
_CPU_MIN_BLOCK = 64


@dataclass(frozen=True)
class BondTensors:
    """Bonds: ``idx`` ``[2, n_bonds]`` long, ``r0`` (nm) and ``k`` (kJ/mol/nm^2) ``[n_bonds, 1]``."""

    idx: Tensor
    r0: Tensor
    k: Tensor


@dataclass(frozen=True)
class AngleTensors:
    """Angles: ``idx`` ``[3, n_angles]`` long, ``theta0`` (rad) and ``k`` (kJ/mol/rad^2) ``[n_angles, 1]``."""

    idx: Tensor
    theta0: Tensor
    k: Tensor


@dataclass(frozen=True)
class TorsionTensors:
    """Torsions: ``idx`` ``[4, n_quads]`` long, polynomial coefficients ``cos_coef``
    ``[degree + 1, n_quads, 1]`` and ``sin_coef`` ``[m, n_quads, 1]`` in kJ/mol (see
    :class:`~boltzgen.energies.ffparams.TorsionParameters`)."""

    idx: Tensor
    cos_coef: Tensor
    sin_coef: Tensor


@dataclass(frozen=True)
class NonbondedTensors:
    """Coulomb and LJ parameters ``qq``, ``c12``, ``c6``, each ``[n_pairs, 1]`` (units as in
    :class:`~boltzgen.energies.ffparams.NonbondedParameters`)."""

    qq: Tensor
    c12: Tensor
    c6: Tensor


@dataclass(frozen=True)
class ObcTensors:
    """OBC parameters (see :class:`~boltzgen.energies.ffparams.ObcParameters`) in the eager layout.

    ``center`` is ``[2 n_pairs]`` long; ``rho``, ``neg_rho`` (``-rho``), ``scaled`` and ``scaled2``
    (``scaled^2``) are ``[2, n_pairs, 1]``; the per-atom parameters are ``[n_atoms, 1]`` and
    ``pair_qq`` is ``[n_pairs, 1]``.
    """

    center: Tensor
    rho: Tensor
    neg_rho: Tensor
    scaled: Tensor
    scaled2: Tensor
    half_offset_radius: Tensor
    inv_offset_radius: Tensor
    inv_radius: Tensor
    self_coef: Tensor
    ace: Tensor
    pair_qq: Tensor


@dataclass(frozen=True)
class EagerParameters:
    """The force-field parameters as tensors in the eager layout; a missing term is ``None``.

    ``pair_idx`` ``[2, n_pairs]`` long is the pair list shared by ``nonbonded`` and ``obc``.
    """

    n_atoms: int
    bonds: BondTensors | None
    angles: AngleTensors | None
    torsions: TorsionTensors | None
    pair_idx: Tensor | None
    nonbonded: NonbondedTensors | None
    obc: ObcTensors | None

    @classmethod
    def from_parameters(cls, p: ForceFieldParameters) -> EagerParameters:
        """float64 (indices int64) CPU tensors of the parameters ``p``."""
        def index(a: np.ndarray) -> Tensor:
            return torch.as_tensor(a, dtype=torch.long)

        def column(a: np.ndarray) -> Tensor:
            return torch.as_tensor(np.asarray(a, dtype=np.float64)[..., None], dtype=torch.float64)

        b, a, t, nb, obc = p.bonds, p.angles, p.torsions, p.nonbonded, p.obc
        return cls(
            n_atoms=p.n_atoms,
            bonds=None if b is None else BondTensors(index(b.idx), column(b.r0), column(b.k)),
            angles=None if a is None else AngleTensors(index(a.idx), column(a.theta0), column(a.k)),
            torsions=None if t is None else TorsionTensors(index(t.idx), column(t.cos_coef), column(t.sin_coef)),
            pair_idx=None if p.pair_idx is None else index(p.pair_idx),
            nonbonded=None if nb is None else NonbondedTensors(column(nb.qq), column(nb.c12), column(nb.c6)),
            obc=None if obc is None else ObcTensors(
                center=index(obc.center.reshape(-1)), rho=column(obc.rho), neg_rho=column(-obc.rho),
                scaled=column(obc.scaled), scaled2=column(obc.scaled**2),
                half_offset_radius=column(obc.half_offset_radius), inv_offset_radius=column(obc.inv_offset_radius),
                inv_radius=column(obc.inv_radius), self_coef=column(obc.self_coef), ace=column(obc.ace),
                pair_qq=column(obc.pair_qq)),
        )

    def apply(self, fn: Callable[[Tensor], Tensor]) -> EagerParameters:
        """A copy with ``fn`` applied to every tensor (as ``nn.Module._apply`` does to buffers)."""
        return _map_tensors(self, fn)


def _map_tensors(obj: object, fn: Callable[[Tensor], Tensor]) -> object:
    changes = {}
    for field in fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, field.name)
        if isinstance(value, Tensor):
            changes[field.name] = fn(value)
        elif is_dataclass(value):
            changes[field.name] = _map_tensors(value, fn)
    return replace(obj, **changes)  # type: ignore[type-var]


def energy_and_grad(params: EagerParameters, x: Tensor, need_grad: bool, scale: float = 1.0,
                    chunk_size: int = 4096) -> tuple[Tensor, Tensor | None]:
    """``scale`` U ``[batch]`` and, if asked, ``scale`` dU/dx ``[batch, 3 n_atoms]``.

    ``x`` is ``[batch, 3 n_atoms]`` in nm, on the device and in the dtype of ``params``; with
    ``scale = 1`` the results are in kJ/mol and kJ/mol/nm. Each term runs over the batch in blocks
    sized for its own row count (at most ``chunk_size`` configurations, see :func:`_block`); a block
    is transposed to the ``[n_atoms, 3, b]`` layout on the way in and its gradient back on the way
    out (small, cache-resident copies, unlike one transpose of the whole batch).
    """
    n_b, n_atoms = x.shape[0], params.n_atoms
    energy = x.new_zeros(n_b)
    grad = x.new_zeros(n_b, 3 * n_atoms) if need_grad else None
    on_cpu = x.device.type == "cpu"
    for stage, rows in _stages(params):
        block = _block(rows, chunk_size, on_cpu)
        for start in range(0, n_b, block):
            part = slice(start, start + block)
            x_part = x[part]
            P = x_part.reshape(x_part.shape[0], n_atoms, 3).permute(1, 2, 0).contiguous()
            G = torch.zeros_like(P) if grad is not None else None
            energy[part] += stage(P, G)
            if grad is not None:
                grad[part].view(-1, n_atoms, 3).permute(1, 2, 0).add_(G)
    if scale != 1.0:
        energy.mul_(scale)
        if grad is not None:
            grad.mul_(scale)
    return energy, grad


_Stage = Callable[[Tensor, Tensor | None], Tensor]


def _stages(p: EagerParameters) -> list[tuple[_Stage, int]]:
    """The block functions of the terms present, each with its row count (terms or pairs)."""
    stages: list[tuple[_Stage, int]] = []
    if p.bonds is not None:
        stages.append((partial(bonds, t=p.bonds), int(p.bonds.idx.shape[1])))
    if p.angles is not None:
        stages.append((partial(angles, t=p.angles), int(p.angles.idx.shape[1])))
    if p.torsions is not None:
        stages.append((partial(torsions, t=p.torsions), int(p.torsions.idx.shape[1])))
    if p.pair_idx is not None:
        stages.append((partial(pairs, p=p), int(p.pair_idx.shape[1])))
    return stages


def _block(rows: int, chunk_size: int, on_cpu: bool) -> int:
    """Configurations per block for a term with ``rows`` rows: at most ``chunk_size``, and few enough
    that configurations x rows stays below 2^23; on the CPU, where cache-sized blocks run faster, also
    below 2^14 unless that leaves fewer than 64 configurations."""
    rows = max(rows, 1)
    limit = _MAX_BLOCK_ELEMENTS // rows
    if on_cpu:
        limit = min(limit, max(_CPU_MIN_BLOCK, _CPU_BLOCK_ELEMENTS // rows))
    return max(1, min(chunk_size, limit))


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


def bonds(P: Tensor, G: Tensor | None, t: BondTensors) -> Tensor:
    """Harmonic bond energy ``[b]`` of the block ``P``; adds dU/dP into ``G`` when given."""
    i, j = t.idx
    d = P.index_select(0, j).sub_(P.index_select(0, i))
    dc = d.unbind(1)
    # The floor keeps r (and the energy) finite, not NaN, for coincident atoms.
    r2 = _dot(dc, dc).clamp_min_(torch.finfo(P.dtype).tiny)
    inv_r = torch.rsqrt(r2)
    dr = r2.mul_(inv_r).sub_(t.r0)
    kdr = t.k * dr
    if G is not None:
        gj = d.mul_(inv_r.mul_(kdr).unsqueeze(1))
        G.index_add_(0, j, gj).index_add_(0, i, gj.neg_())
    return 0.5 * kdr.mul_(dr).sum(0)


def angles(P: Tensor, G: Tensor | None, t: AngleTensors) -> Tensor:
    """Harmonic angle energy ``[b]`` of the block ``P``; adds dU/dP into ``G`` when given."""
    i, j, k = t.idx
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
    dt = torch.atan2(n2.mul_(inv_n), ab).sub_(t.theta0)
    kdt = t.k * dt
    if G is not None:
        # d theta/da = ((a.b)/|a|^2 a - b) / |a x b|, and symmetrically for b.
        c = inv_n.mul_(kdt)
        cab = ab.mul_(c)
        c_n = c.unsqueeze(1)
        gi = torch.mul(a, (cab / a2).unsqueeze(1)).addcmul_(c_n, b, value=-1.0)
        gk = b.mul_((cab / b2).unsqueeze(1)).addcmul_(c_n, a, value=-1.0)
        G.index_add_(0, i, gi).index_add_(0, k, gk).index_add_(0, j, gi.add_(gk).neg_())
    return 0.5 * kdt.mul_(dt).sum(0)


def torsions(P: Tensor, G: Tensor | None, t: TorsionTensors) -> Tensor:
    """Periodic torsion energy ``[b]`` of the block ``P``; adds dU/dP into ``G`` when given."""
    i0, i1, i2, i3 = t.idx
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
    has_sin = t.sin_coef.shape[0] > 0
    energy, d_cos = _horner(t.cos_coef, cos_phi, need_grad)
    if has_sin:
        sin_poly, d_sin_poly = _horner(t.sin_coef, cos_phi, need_grad)
        energy = torch.addcmul(energy, neg_sin_phi, sin_poly, value=-1.0)
    if G is None:
        return energy.sum(0)
    de_dphi = neg_sin_phi * d_cos
    if has_sin:
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


def pairs(P: Tensor, G: Tensor | None, p: EagerParameters) -> Tensor:
    """Non-bonded and/or OBC energy ``[b]`` over the shared pair list, with one gather and one scatter.

    Each term gives ``-(1/r) dU/dr`` of its pairs (``[pairs, b]``) and ``h`` is their sum, so that
    the force on atom ``j`` of a pair is ``h d`` and that on ``i`` is ``-h d``, with ``d`` the
    separation ``P_j - P_i`` (``[pairs, 3, b]``, nm).
    """
    assert p.pair_idx is not None
    i, j = p.pair_idx
    d = P.index_select(0, j).sub_(P.index_select(0, i))
    dc = d.unbind(1)
    r2 = _dot(dc, dc)
    inv_r = torch.rsqrt(r2)
    inv_r2 = inv_r * inv_r
    need_grad = G is not None
    parts: list[tuple[Tensor, Tensor | None]] = []
    if p.nonbonded is not None:
        parts.append(_nonbonded(inv_r, inv_r2, p.nonbonded, need_grad))
    if p.obc is not None:
        parts.append(_gbsa_obc(r2, inv_r, inv_r2, p.obc, p.pair_idx, need_grad))
    energy = parts[0][0] if len(parts) == 1 else parts[0][0] + parts[1][0]
    if G is not None:
        hs = [h for _, h in parts if h is not None]
        h = hs[0] if len(hs) == 1 else hs[0].add_(hs[1])
        gi = d.mul_(h.unsqueeze(1))
        G.index_add_(0, i, gi).index_add_(0, j, gi.neg_())
    return energy


def _nonbonded(inv_r: Tensor, inv_r2: Tensor, t: NonbondedTensors, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Coulomb + LJ energy ``[b]`` and ``-(1/r) dU/dr`` per pair (``[pairs, b]``, if asked)."""
    inv_r6 = torch.mul(inv_r2, inv_r2).mul_(inv_r2)
    lj12 = t.c12 * inv_r6  # c12 / r^12 = lj12 / r^6
    lj = lj12 - t.c6
    coul = t.qq * inv_r
    energy = torch.addcmul(coul, lj, inv_r6).sum(0)
    if not need_grad:
        return energy, None
    # -r dU/dr = 12 c12/r^12 - 6 c6/r^6 + qq/r = 6 (lj12 + lj) / r^6 + coul
    return energy, coul.addcmul_(lj.add_(lj12), inv_r6, value=6.0).mul_(inv_r2)


def _obc_descreening(r2: Tensor, inv_r: Tensor, inv_r2: Tensor, t: ObcTensors,
                     need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """The OBC descreening sum of every atom, ``[n_atoms, b]``, and ``-2 d term/dr`` of every ordered
    pair (``[2, pairs, b]``, if asked).

    Descreening runs over both orders of each pair at once: ``[2, pairs, b]`` tensors with the
    centre atom's offset radius ``rho`` and the other atom's scaled radius ``s`` as ``[2, pairs, 1]``.
    Intermediates are updated in place where possible, to keep the working set in cache.
    """
    n_b = r2.shape[1]
    r = r2 * inv_r
    upper = r + t.scaled
    lower = r - t.scaled
    # Buried atom (rho < s - r): + 2 (1/rho - 1/l) with 1/l = -1/(r - s); it is 0 otherwise, as
    # min(r - s, -rho) is then -rho.
    buried = lower.clamp(max=t.neg_rho).reciprocal_().add_(t.rho.reciprocal())
    # lower = max(|r - s|, rho), capped at upper: lower == upper exactly where the sphere does not
    # reach (rho >= r + s), which zeroes the term and its derivative without a mask.
    lower.abs_().clamp_(min=t.rho, max=upper)
    inv_l = lower.reciprocal()
    inner2 = lower.div_(upper).log_()  # log(l/u) so far
    inv_u = upper.reciprocal_()
    term = inv_l - inv_u
    dl2 = inv_u.add_(inv_l).mul_(term)  # 1/l^2 - 1/u^2
    del inv_l, inv_u, lower, upper
    # inner2 = log(l/u) + (s^2 - r^2)(1/l^2 - 1/u^2) / 2; term = 1/l - 1/u + inner2 / (2 r) + buried
    inner2.addcmul_(dl2, t.scaled2 - r2, value=0.5)
    term.addcmul_(inv_r, inner2, value=0.5).add_(buried, alpha=2.0)
    del buried
    # Where l and u depend on r, d term/dl and d term/du vanish identically (also with the buried
    # correction), so only the explicit r-dependence is left: d term/dr = -(dl2 + inner2 / r^2) / 2.
    dterm2 = dl2.addcmul_(inv_r2, inner2) if need_grad else None
    del dl2, inner2
    n_atoms = t.half_offset_radius.shape[0]
    total = r2.new_zeros(n_atoms, n_b).index_add_(0, t.center, term.view(-1, n_b))
    return total, dterm2


def _gbsa_obc(r2: Tensor, inv_r: Tensor, inv_r2: Tensor, t: ObcTensors, pair_idx: Tensor,
              need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """OBC energy ``[b]`` and ``-(1/r) dU/dr`` per pair (``[pairs, b]``, if asked)."""
    total, dterm2 = _obc_descreening(r2, inv_r, inv_r2, t, need_grad)
    psi = t.half_offset_radius * total
    psi_poly = psi * (OBC_ALPHA + psi * (-OBC_BETA + OBC_GAMMA * psi))
    th = torch.tanh(psi_poly)
    inv_born = torch.addcmul(t.inv_offset_radius, th, t.inv_radius, value=-1.0)
    born = inv_born.reciprocal()
    # ACE non-polar term; OpenMM skips atoms whose Born radius came out non-positive.
    inv_born_pos = inv_born.clamp_min(0.0)
    inv_born_pos3 = inv_born_pos * inv_born_pos * inv_born_pos
    ace = t.ace * inv_born_pos3 * inv_born_pos3
    self_term = t.self_coef * inv_born
    i, j = pair_idx
    bi = born.index_select(0, i)
    bj = born.index_select(0, j)
    bb = bi * bj
    dd4 = r2 / bb  # 4 D_ij
    ex = torch.mul(dd4, -0.25).exp_()
    inv_f = bb.mul_(ex).add_(r2).rsqrt_()  # 1 / f_GB
    pair = t.pair_qq * inv_f
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
    de_dterm = de_dborn.mul_(born).mul_(born).mul_(1.0 - th * th).mul_(dpsi_poly).mul_(t.inv_radius)
    de_dterm.mul_(t.half_offset_radius)
    # Both orders of each pair summed.
    de_dr4 = dterm2.mul_(de_dterm.index_select(0, t.center).view_as(dterm2)).sum(0)
    # -(1/r) dU/dr: the pair term gives cf (1 - ex/4), the descreening -de_dr4 / (4 r).
    return energy, cf.add_(cfe, alpha=-0.25).addcmul_(de_dr4, inv_r, value=-0.25)
