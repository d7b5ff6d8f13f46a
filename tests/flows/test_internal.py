"""Tests for boltzgen.flows.internal: the internal and mixed coordinate bijections."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from boltzgen.flows.internal import InternalCoordinates, MixedCoordinates, rigid_torsions_by_scan
from boltzgen.flows.zmatrix import build_mixed_zmatrix, build_zmatrix, zmatrix_from_topology
from boltzgen.geometry import find_alpha_carbon_chirality, is_l_chirality, wrap_angle
from tests.helpers import BENZENE, BRANCHED, CHAIN

DT = torch.float64
REPO = Path(__file__).resolve().parents[2]

# Small bond graphs. Indices are deliberately not in chain order.


def random_ic(n_atoms: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Molecule-like internal coordinates [batch, 3N-6]: bonds 0.1-0.16 nm, angles 1.6-2.3 rad."""
    bonds = 0.1 + 0.06 * torch.rand(batch, n_atoms - 1, generator=gen, dtype=DT)
    angles = 1.6 + 0.7 * torch.rand(batch, n_atoms - 2, generator=gen, dtype=DT)
    tors = (2 * torch.rand(batch, n_atoms - 3, generator=gen, dtype=DT) - 1) * math.pi
    return torch.cat([bonds, angles, tors], dim=1)


def random_rotation(gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=DT))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def kabsch_rmsd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """RMSD [batch] after optimal proper rotation + translation of a onto b; inputs [batch, N, 3]."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    h = a.transpose(1, 2) @ b
    u, _, vt = torch.linalg.svd(h)
    d = torch.sign(torch.det(u @ vt))
    corr = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
    rot = u @ corr @ vt
    return ((a @ rot - b) ** 2).sum(-1).mean(-1).sqrt()


def free_cartesian_index(ic: InternalCoordinates) -> torch.Tensor:
    """The 3N-6 Cartesian coordinates that the canonical frame leaves free: x of the second
    Z-matrix atom, x and y of the third, all three of every later one."""
    atoms = [int(a) for a in ic.zmatrix[:, 0]]
    free = [3 * atoms[1], 3 * atoms[2], 3 * atoms[2] + 1]
    free += [3 * a + c for a in atoms[3:] for c in range(3)]
    return torch.tensor(free)


# ---------------------------------------------------------------------------------------------
# InternalCoordinates
# ---------------------------------------------------------------------------------------------

# A user-supplied, permuted Z-matrix of the BRANCHED graph plus the automatic one.
PERMUTED_BRANCHED = np.array(
    [[5, -1, -1, -1], [2, 5, -1, -1], [6, 5, 2, -1], [1, 2, 5, 6], [3, 2, 1, 5], [0, 1, 2, 3], [4, 1, 2, 0]]
)


@pytest.fixture(params=["auto", "permuted"])
def branched_ic(request) -> InternalCoordinates:
    zmat = build_zmatrix(BRANCHED, 7) if request.param == "auto" else PERMUTED_BRANCHED
    return InternalCoordinates(zmat)


def test_internal_shapes_masks_and_canonical_frame(branched_ic):
    ic = branched_ic
    gen = torch.Generator().manual_seed(0)
    assert ic.dim_internal == 15
    assert ic.circular_mask.tolist() == [False] * 11 + [True] * 4
    z = random_ic(7, 5, gen)
    x, logdet = ic(z)
    assert x.shape == (5, 21) and logdet.shape == (5,) and x.dtype == DT
    pos = x.reshape(5, 7, 3)
    a0, a1, a2 = (int(a) for a in ic.zmatrix[:3, 0])
    assert torch.all(pos[:, a0] == 0)
    assert torch.all(pos[:, a1, 1:] == 0) and torch.all(pos[:, a1, 0] > 0)
    assert torch.all(pos[:, a2, 2] == 0) and torch.all(pos[:, a2, 1] > 0)


@pytest.mark.parametrize(
    "table,match",
    [
        ([[0, -1, -1, -1], [1, 0, -1, -1], [2, 1, 0, -1], [3, 4, 1, 0], [4, 1, 0, 2]], "not placed"),
        ([[0, -1, -1, -1], [1, 0, 2, -1], [2, 1, 0, -1], [3, 2, 1, 0], [4, 1, 0, 2]], "only 1 references"),
        ([[0, -1, -1, -1], [1, 0, -1, -1]], "at least 3 atoms"),
    ],
)
def test_internal_validates_its_zmatrix(table, match):
    with pytest.raises(ValueError, match=match):
        InternalCoordinates(np.array(table))


def test_internal_accepts_a_user_zmatrix():
    table = np.array([[4, -1, -1, -1], [2, 4, -1, -1], [0, 2, 4, -1], [1, 0, 2, 4], [3, 4, 2, 1]])
    ic = InternalCoordinates(table)
    assert ic.dim_internal == 9 and (ic.zmatrix.numpy() == table).all()


def test_internal_round_trips(branched_ic):
    ic = branched_ic
    gen = torch.Generator().manual_seed(1)
    z = random_ic(7, 64, gen)
    x, ld_f = ic(z)
    z2, ld_i = ic.inverse(x)
    torch.testing.assert_close(z2, z, atol=1e-10, rtol=0)
    torch.testing.assert_close(ld_f + ld_i, torch.zeros_like(ld_f), atol=1e-10, rtol=0)

    # Arbitrary Cartesian input in an arbitrary pose: forward(inverse(x)) == x up to a rigid motion.
    x_any = torch.randn(64, 7, 3, generator=gen, dtype=DT) * 0.3
    z3, ld_i3 = ic.inverse(x_any.reshape(64, -1))
    x3, ld_f3 = ic(z3)
    assert kabsch_rmsd(x3.reshape(64, 7, 3), x_any).max() < 1e-10
    torch.testing.assert_close(ld_f3 + ld_i3, torch.zeros_like(ld_f3), atol=1e-10, rtol=0)
    # ... but not up to a reflection: the input and its mirror image are different configurations.
    assert kabsch_rmsd(x3.reshape(64, 7, 3), -x_any).min() > 1e-3
    # [batch, N, 3] input is accepted and equivalent.
    torch.testing.assert_close(ic.inverse(x_any)[0], z3)


def test_internal_matches_mdtraj_geometry(villin):
    """On a real protein: torsions equal mdtraj's dihedrals, and the round trip keeps all distances."""
    md = pytest.importorskip("mdtraj")
    zmat = zmatrix_from_topology(villin.top)
    ic = InternalCoordinates(zmat)
    n_generations = len(ic.placer.bounds) - 1
    assert n_generations < villin.n_atoms // 3  # rows are grouped, not placed one by one
    x = torch.as_tensor(villin.xyz.astype(np.float64)).reshape(1, -1)
    z, ld_i = ic.inverse(x)
    bonds, angles, tors = ic.split(z)
    ref_tors = md.compute_dihedrals(villin, zmat[3:]).ravel()
    diff = np.angle(np.exp(1j * (tors[0].numpy() - ref_tors)))
    assert np.abs(diff).max() < 1e-5  # mdtraj computes in float32
    ref_bonds = md.compute_distances(villin, zmat[1:, :2]).ravel()
    np.testing.assert_allclose(bonds[0].numpy(), ref_bonds, atol=1e-6)
    ref_angles = md.compute_angles(villin, zmat[2:, [0, 1, 2]]).ravel()
    np.testing.assert_allclose(angles[0].numpy(), ref_angles, atol=1e-5)
    x2, ld_f = ic(z)
    assert kabsch_rmsd(x2.reshape(1, -1, 3), x.reshape(1, -1, 3)).item() < 1e-9
    assert abs((ld_i + ld_f).item()) < 1e-9


def _free_jacobian_logdet(ic: InternalCoordinates, z: torch.Tensor) -> torch.Tensor:
    free = free_cartesian_index(ic)
    jac = torch.autograd.functional.jacobian(lambda v: ic(v.unsqueeze(0))[0][0, free], z)
    assert jac.shape == (ic.dim_internal, ic.dim_internal)
    return torch.linalg.slogdet(jac)[1]


def _fitted(ic_zmat, gen: torch.Generator, n: int = 200) -> tuple[InternalCoordinates, torch.Tensor]:
    """An InternalCoordinates fitted on rigidly moved, thermally noisy copies of one geometry."""
    base = InternalCoordinates(ic_zmat)
    n_atoms = base.n_atoms
    z0 = random_ic(n_atoms, 1, gen)
    noise = torch.cat(
        [
            0.004 * torch.randn(n, n_atoms - 1, generator=gen, dtype=DT),
            0.08 * torch.randn(n, n_atoms - 2, generator=gen, dtype=DT),
            0.5 * torch.randn(n, n_atoms - 3, generator=gen, dtype=DT),
        ],
        dim=1,
    )
    x, _ = base(z0 + noise)
    rot = random_rotation(gen)
    x = (x.reshape(n, n_atoms, 3) @ rot.T + torch.tensor([1.0, -2.0, 0.5], dtype=DT)).reshape(n, -1)
    return InternalCoordinates.fit(ic_zmat, x), x


@pytest.mark.parametrize("standardized", [False, True])
def test_internal_logdet_matches_autograd_jacobian(branched_ic, standardized):
    gen = torch.Generator().manual_seed(2)
    ic = branched_ic
    if standardized:
        ic, data = _fitted(ic.zmatrix.numpy(), gen)
        assert ic.standardization.loc is not None
        z_all, _ = ic.inverse(data[:3])
    else:
        z_all = random_ic(7, 3, gen)
    for z in z_all:
        _, logdet = ic(z.unsqueeze(0))
        torch.testing.assert_close(logdet[0], _free_jacobian_logdet(ic, z), atol=1e-9, rtol=1e-9)
        # Inverse log-det: Jacobian of the latent w.r.t. the free coordinates of the canonical pose.
        x = ic(z.unsqueeze(0))[0][0]
        free = free_cartesian_index(ic)

        def inv_free(v: torch.Tensor) -> torch.Tensor:
            full = x.detach().clone().index_put((free,), v)
            return ic.inverse(full.unsqueeze(0))[0][0]

        jac_inv = torch.autograd.functional.jacobian(inv_free, x[free].detach())
        _, ld_inv = ic.inverse(x.unsqueeze(0))
        torch.testing.assert_close(ld_inv[0], torch.linalg.slogdet(jac_inv)[1], atol=1e-9, rtol=1e-9)


def test_fit_standardizes_bonds_and_angles_only():
    gen = torch.Generator().manual_seed(3)
    zmat = build_zmatrix(BRANCHED, 7)
    ic, data = _fitted(zmat, gen, n=500)
    z, _ = ic.inverse(data)
    mask = ic.circular_mask
    torch.testing.assert_close(z[:, ~mask].mean(0), torch.zeros(11, dtype=DT), atol=1e-10, rtol=0)
    torch.testing.assert_close(z[:, ~mask].std(0), torch.ones(11, dtype=DT), atol=1e-10, rtol=0)
    raw = InternalCoordinates(zmat).inverse(data)[0]
    # Torsions are rotated by their circular mean, not scaled: the circular mean becomes 0.
    offset = ic.standardization.loc[mask]
    wrapped = torch.remainder(raw[:, mask] - offset + math.pi, 2 * math.pi) - math.pi
    torch.testing.assert_close(z[:, mask], wrapped)
    mean_angle = torch.atan2(torch.sin(z[:, mask]).mean(0), torch.cos(z[:, mask]).mean(0))
    torch.testing.assert_close(mean_angle, torch.zeros_like(mean_angle), atol=1e-10, rtol=0)
    assert z[:, mask].min() >= -math.pi and z[:, mask].max() < math.pi
    # Stats are buffers that follow the module's dtype and are saved in the state dict.
    assert "standardization.loc" in ic.state_dict()
    x64, ld_std = ic(z[:4])
    ic32 = copy.deepcopy(ic).to(torch.float32)
    assert ic32.standardization.scale.dtype == torch.float32
    x32, ld32 = ic32(z[:4].float())
    assert x32.dtype == torch.float32 and ld32.dtype == torch.float32
    torch.testing.assert_close(x32.double(), x64, atol=1e-5, rtol=0)
    torch.testing.assert_close(ld32.double(), ld_std, atol=1e-3, rtol=1e-5)
    # The standardization contributes its log-det: logdets differ from the raw map by sum(log std).
    _, ld_raw = InternalCoordinates(zmat)(raw[:4])
    torch.testing.assert_close(ld_std - ld_raw, torch.log(ic.standardization.scale).sum().expand(4))


def _fitted_with_rigid_torsions(gen: torch.Generator, n: int = 400):
    """A BRANCHED molecule whose torsions 0 and 2 are free (uniform) and 1 and 3 rigid (0.1 rad),
    torsion 3 centred on the seam at pi; fitted, with its data [n, 21]."""
    zmat = build_zmatrix(BRANCHED, 7)
    base = InternalCoordinates(zmat)
    z = random_ic(7, n, gen)
    t = z[:, base.n_bonds + base.n_angles:]
    t[:, 1] = 1.0 + 0.1 * torch.randn(n, generator=gen, dtype=DT)
    t[:, 3] = math.pi + 0.1 * torch.randn(n, generator=gen, dtype=DT)
    x, _ = base(z)
    return InternalCoordinates.fit(zmat, x), x


def test_fit_makes_narrow_torsions_rigid_and_standardizes_them():
    gen = torch.Generator().manual_seed(11)
    ic, data = _fitted_with_rigid_torsions(gen)
    torsions = ic.circular_mask[ic.n_bonds + ic.n_angles:]
    assert torsions.tolist() == [True, False, True, False]
    z, _ = ic.inverse(data)
    rigid = torch.zeros_like(ic.circular_mask)
    rigid[ic.n_bonds + ic.n_angles:] = ~torsions
    # wrap(t - mean) / std: centred and of unit RMS, also across the seam (no value near +-pi / std).
    torch.testing.assert_close(z[:, rigid].mean(0), torch.zeros(2, dtype=DT), atol=0.02, rtol=0)
    torch.testing.assert_close(z[:, rigid].pow(2).mean(0).sqrt(), torch.ones(2, dtype=DT), atol=1e-10, rtol=0)
    assert z[:, rigid].abs().max() < 0.5 * math.pi / ic.standardization.scale[rigid].max()
    x2, ld_f = ic(z)
    z2, ld_i = ic.inverse(x2)
    torch.testing.assert_close(z2, z, atol=1e-9, rtol=0)
    torch.testing.assert_close(ld_f + ld_i, torch.zeros_like(ld_f), atol=1e-9, rtol=0)
    # Without the option every torsion stays circular, as before.
    assert InternalCoordinates.fit(ic.zmatrix.numpy(), data, rigid_torsions=False).circular_mask[
        ic.n_bonds + ic.n_angles:].all()


def test_rigid_torsion_logdet_matches_autograd_jacobian():
    gen = torch.Generator().manual_seed(12)
    ic, data = _fitted_with_rigid_torsions(gen)
    for z in ic.inverse(data[:3])[0]:
        _, logdet = ic(z.unsqueeze(0))
        torch.testing.assert_close(logdet[0], _free_jacobian_logdet(ic, z), atol=1e-9, rtol=1e-9)


def test_scan_finds_rigid_torsions_from_the_energy_alone():
    """Torsions restrained by 1 - cos terms: a weak one (reaches 60 deg within 15 kT) is free, a stiff
    one is rigid, one whose turn one way is blocked by a wall (non-finite energy) but not the other
    way is free, and one blocked both ways is rigid."""
    gen = torch.Generator().manual_seed(13)
    zmat = build_zmatrix(BRANCHED, 7)
    plain = InternalCoordinates(zmat)
    x0 = plain(random_ic(7, 1, gen))[0]
    t0 = plain.internal(x0)[0, plain.n_bonds + plain.n_angles:]
    k = torch.tensor([2.0, 200.0, 2.0, 2.0], dtype=DT)

    def energy(x: torch.Tensor) -> torch.Tensor:
        d = wrap_angle(plain.internal(x)[:, plain.n_bonds + plain.n_angles:] - t0)
        u = (k * (1 - torch.cos(d))).sum(1)
        u = torch.where(d[:, 2] > 0.5, torch.nan, u)  # torsion 2: a wall one way
        return torch.where(d[:, 3].abs() > 0.5, torch.inf, u)  # torsion 3: walls both ways

    assert rigid_torsions_by_scan(plain, x0, energy).tolist() == [False, True, False, True]


def test_torsions_half_open_interval():
    ic = InternalCoordinates(build_zmatrix(CHAIN, 6))
    gen = torch.Generator().manual_seed(4)
    z = random_ic(6, 200, gen)
    z[:, ic.circular_mask] = z[:, ic.circular_mask] * 3  # forward accepts any torsion (periodic)
    x, _ = ic(z)
    tors = ic.inverse(x)[0][:, ic.circular_mask]
    assert tors.min() >= -math.pi and tors.max() < math.pi
    torch.testing.assert_close(torch.cos(tors), torch.cos(z[:, ic.circular_mask]))
    torch.testing.assert_close(torch.sin(tors), torch.sin(z[:, ic.circular_mask]))


def test_out_of_range_latents_give_no_nan():
    ic = InternalCoordinates(build_zmatrix(BRANCHED, 7))
    gen = torch.Generator().manual_seed(5)
    z = random_ic(7, 16, gen)
    n_b, n_a = ic.n_bonds, ic.n_angles
    z[:8, :n_b] *= -1  # negative bonds
    z[4:12, n_b : n_b + n_a] += 3.0  # angles beyond pi
    z[12:, n_b : n_b + n_a] -= 4.0  # negative angles
    z.requires_grad_(True)
    x, logdet = ic(z)
    assert torch.isfinite(x).all() and torch.isfinite(logdet).all()
    (x.sum() + logdet.sum()).backward()
    assert torch.isfinite(z.grad).all()
    # Inverse of what came out is a valid (in-range) latent that reproduces the configuration.
    z2, _ = ic.inverse(x.detach())
    assert (z2[:, :n_b] >= 0).all() and (z2[:, n_b : n_b + n_a] <= math.pi).all()
    assert kabsch_rmsd(ic(z2)[0].reshape(16, 7, 3), x.detach().reshape(16, 7, 3)).max() < 1e-10


def test_internal_batch_equals_per_sample(villin):
    ic = InternalCoordinates(zmatrix_from_topology(villin.top))
    gen = torch.Generator().manual_seed(6)
    x0 = torch.as_tensor(villin.xyz.astype(np.float64)).reshape(1, -1)
    z0, _ = ic.inverse(x0)
    z = z0 + 0.01 * torch.randn(4, ic.dim_internal, generator=gen, dtype=DT)
    xb, ldb = ic(z)
    zb, ldib = ic.inverse(xb)
    for s in range(4):
        xs, lds = ic(z[s : s + 1])
        zs, ldis = ic.inverse(xb[s : s + 1])
        torch.testing.assert_close(xs[0], xb[s], atol=1e-12, rtol=0)
        torch.testing.assert_close(lds[0], ldb[s], atol=1e-12, rtol=0)
        torch.testing.assert_close(zs[0], zb[s], atol=1e-12, rtol=0)
        torch.testing.assert_close(ldis[0], ldib[s], atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------
# MixedCoordinates
# ---------------------------------------------------------------------------------------------


BENZENE_CARTESIAN = [0, 1, 2, 4, 5]  # ring atoms except 3, which is placed internally like the hydrogens


def _mixed_benzene() -> MixedCoordinates:
    return MixedCoordinates(BENZENE_CARTESIAN, build_mixed_zmatrix(BENZENE, 12, BENZENE_CARTESIAN), 12)


def _benzene_like_positions(batch: int, gen: torch.Generator) -> torch.Tensor:
    ang = torch.arange(6, dtype=DT) * (2 * math.pi / 6)
    ring = torch.stack([0.14 * torch.cos(ang), 0.14 * torch.sin(ang), torch.zeros(6, dtype=DT)], -1)
    hyd = ring * (0.25 / 0.14)
    pos = torch.cat([ring, hyd]).expand(batch, 12, 3)
    return (pos + 0.01 * torch.randn(batch, 12, 3, generator=gen, dtype=DT)).reshape(batch, 36)


def test_mixed_shapes_and_masks():
    mixed = _mixed_benzene()
    assert mixed.dim_internal == 36
    assert mixed.circular_mask.tolist() == [False] * (15 + 14) + [True] * 7
    zm = build_mixed_zmatrix(BENZENE, 12, BENZENE_CARTESIAN)
    with pytest.raises(ValueError, match="at least 3"):
        MixedCoordinates([0, 1], zm, 12)
    with pytest.raises(ValueError, match="not placed"):
        MixedCoordinates(BENZENE_CARTESIAN, zm[::-1].copy(), 12)


def test_mixed_round_trip_and_logdet():
    mixed = _mixed_benzene()
    gen = torch.Generator().manual_seed(7)
    x = _benzene_like_positions(8, gen)
    z, ld_i = mixed.inverse(x)
    torch.testing.assert_close(z[:, :15], x.reshape(8, 12, 3)[:, [0, 1, 2, 4, 5]].reshape(8, 15))
    x2, ld_f = mixed(z)
    torch.testing.assert_close(x2, x, atol=1e-12, rtol=0)  # exact: no frame is removed
    torch.testing.assert_close(ld_i + ld_f, torch.zeros(8, dtype=DT), atol=1e-10, rtol=0)
    torch.testing.assert_close(mixed.inverse(x2)[0], z, atol=1e-12, rtol=0)
    for s in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: mixed(v.unsqueeze(0))[0][0], z[s])
        torch.testing.assert_close(ld_f[s], torch.linalg.slogdet(jac)[1], atol=1e-9, rtol=1e-9)
    # Batch equals per-sample.
    for s in range(3):
        xs, lds = mixed(z[s : s + 1])
        torch.testing.assert_close(xs[0], x2[s], atol=1e-13, rtol=0)
        torch.testing.assert_close(lds[0], ld_f[s], atol=1e-13, rtol=0)


def test_fitted_mixed_logdet_matches_jacobian():
    gen = torch.Generator().manual_seed(8)
    x = _benzene_like_positions(100, gen)
    plain = _mixed_benzene()
    mixed = MixedCoordinates.fit(BENZENE_CARTESIAN, plain.zmatrix.numpy(), 12, x)
    z, ld_i = mixed.inverse(x)
    n_c, m = 15, 7
    torch.testing.assert_close(z[:, n_c : n_c + 2 * m].std(0), torch.ones(2 * m, dtype=DT))
    torch.testing.assert_close(z[:, :n_c], plain.inverse(x)[0][:, :n_c])  # Cartesian block raw
    torch.testing.assert_close(z[:, n_c + 2 * m :], plain.inverse(x)[0][:, n_c + 2 * m :])  # torsions raw
    jac = torch.autograd.functional.jacobian(lambda v: mixed(v.unsqueeze(0))[0][0], z[0])
    _, ld_f = mixed(z[:1])
    torch.testing.assert_close(ld_f[0], torch.linalg.slogdet(jac)[1], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(ld_f[0] + ld_i[0], torch.zeros((), dtype=DT), atol=1e-10, rtol=0)


def test_mixed_protein_backbone_cartesian(villin):
    top = villin.top
    backbone = top.select("backbone").tolist()
    heavy = [a.element.symbol != "H" for a in top.atoms]
    bonds = [(a.index, b.index) for a, b in top.bonds]
    mixed = MixedCoordinates(backbone, build_mixed_zmatrix(bonds, top.n_atoms, backbone, heavy=heavy), top.n_atoms)
    x = torch.as_tensor(villin.xyz.astype(np.float64)).reshape(1, -1)
    z, ld_i = mixed.inverse(x)
    x2, ld_f = mixed(z)
    torch.testing.assert_close(x2, x, atol=1e-10, rtol=0)
    assert abs((ld_i + ld_f).item()) < 1e-9


# ---------------------------------------------------------------------------------------------
# Chirality through the transform
# ---------------------------------------------------------------------------------------------


def test_round_trip_keeps_l_chirality(villin):
    """The canonical frame contains no reflection, so an all-L protein stays all-L."""
    quads = find_alpha_carbon_chirality(villin.top)
    x = torch.as_tensor(villin.xyz.astype(np.float64)).reshape(1, -1)
    ic = InternalCoordinates(zmatrix_from_topology(villin.top))
    assert is_l_chirality(ic(ic.inverse(x)[0])[0], quads).item()
    assert not is_l_chirality(ic(ic.inverse(-x)[0])[0], quads).item()


@pytest.mark.parametrize(("pdb", "n_atoms"), [("alanine-dipeptide.pdb", 22), ("tetraalanine.pdb", 42)])
def test_peptide_round_trip(pdb, n_atoms):
    """ACE-(ALA)n-NME from systems/: the structure and thermally perturbed copies of it (0.01 nm,
    rotated and shifted) come back up to rigid motion, all L."""
    path = REPO / "systems" / pdb
    if not path.exists():
        pytest.skip(f"systems/{pdb} not written yet")
    md = pytest.importorskip("mdtraj")
    traj = md.load(str(path))
    assert traj.n_atoms == n_atoms
    gen = torch.Generator().manual_seed(0)
    x0 = torch.as_tensor(traj.xyz[0].astype(np.float64))
    frames = [x0] + [(x0 + 0.01 * torch.randn(x0.shape, generator=gen, dtype=DT)) @ random_rotation(gen) + 1.0
                     for _ in range(4)]
    x = torch.stack(frames).reshape(len(frames), -1)
    ic = InternalCoordinates(zmatrix_from_topology(traj.top))
    assert ic.dim_internal == 3 * n_atoms - 6
    x2 = ic(ic.inverse(x)[0])[0]
    assert kabsch_rmsd(x2.reshape(len(frames), -1, 3), x.reshape(len(frames), -1, 3)).max() < 1e-6
    assert is_l_chirality(x2, traj.top).all()
