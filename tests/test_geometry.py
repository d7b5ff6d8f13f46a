"""Tests for boltzgen.geometry: angle wrapping, dihedrals and alpha-carbon chirality."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from boltzgen.geometry import (
    L_CHIRALITY_SIGN,
    dihedral,
    dihedrals_rad,
    find_alpha_carbon_chirality,
    is_l_chirality,
    wrap_angle,
)

DT = torch.float64
REPO = Path(__file__).resolve().parents[1]


def rotation_z(angle: float) -> torch.Tensor:
    """A proper rotation ``[3, 3]`` about the z axis by ``angle`` rad."""
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=DT)


# ---------------------------------------------------------------------------------------------
# wrap_angle
# ---------------------------------------------------------------------------------------------


def test_wrap_angle_tensor_range_and_dtype():
    angles = torch.linspace(-20.0, 20.0, 4001, dtype=DT)
    wrapped = wrap_angle(angles)
    assert isinstance(wrapped, torch.Tensor) and wrapped.dtype == DT
    assert wrapped.min() >= -math.pi and wrapped.max() < math.pi
    # Same angle: differs from the input by a whole number of turns.
    turns = (angles - wrapped) / (2 * math.pi)
    torch.testing.assert_close(turns, torch.round(turns), atol=1e-12, rtol=0)
    # Already wrapped angles are left alone.
    inside = torch.tensor([-math.pi, -1.0, 0.0, 2.5], dtype=DT)
    assert torch.equal(wrap_angle(inside), inside)
    assert wrap_angle(angles.float()).dtype == torch.float32


def test_wrap_angle_numpy_matches_tensor():
    angles = np.linspace(-20.0, 20.0, 4001)
    wrapped = wrap_angle(angles)
    assert isinstance(wrapped, np.ndarray) and wrapped.dtype == np.float64
    assert wrapped.min() >= -math.pi and wrapped.max() < math.pi
    np.testing.assert_array_equal(wrapped, wrap_angle(torch.as_tensor(angles)).numpy())
    # Lists and scalars become float64 arrays.
    assert wrap_angle([0.5, 7.0]).dtype == np.float64
    assert float(wrap_angle(2 * math.pi + 0.25)) == pytest.approx(0.25, abs=1e-12)


@pytest.mark.parametrize("as_tensor", [True, False])
def test_wrap_angle_pi_edge(as_tensor):
    # +pi and every odd multiple of pi map to -pi: the interval is half open.
    below_minus_pi = np.nextafter(-math.pi, -math.inf)  # remainder rounds this up to 2 pi
    raw = [math.pi, -math.pi, 3 * math.pi, -3 * math.pi, below_minus_pi, -1e-300]
    angles = torch.tensor(raw, dtype=DT) if as_tensor else np.array(raw)
    wrapped = np.asarray(wrap_angle(angles))
    assert (wrapped >= -math.pi).all() and (wrapped < math.pi).all()
    assert wrapped[0] == wrapped[1] == -math.pi
    np.testing.assert_allclose(wrapped[2:4], -math.pi, atol=1e-12)
    # Just below -pi is just below +pi, or -pi where that rounds to +pi; a tiny angle stays tiny.
    assert abs(abs(wrapped[4]) - math.pi) < 1e-12
    assert abs(wrapped[5]) < 1e-15


# ---------------------------------------------------------------------------------------------
# Dihedrals
# ---------------------------------------------------------------------------------------------


def test_dihedral_sign_and_half_open_interval():
    # Exactly anti-periplanar: atan2 gives +pi; the convention is [-pi, pi).
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, -1.0, 0.0]], dtype=DT)
    assert dihedral(p[0], p[1], p[2], p[3]).item() == -math.pi
    # The IUPAC sign: mdtraj.compute_dihedrals gives +90 degrees for these four points.
    q = p.clone()
    q[3] = torch.tensor([1.0, 0.0, 1.0], dtype=DT)
    assert dihedral(*q).item() == pytest.approx(math.pi / 2, abs=1e-15)
    # Symmetric under reversing the four points and under proper motions; odd under reflections.
    assert dihedral(*q.flip(0)).item() == pytest.approx(math.pi / 2, abs=1e-15)
    assert dihedral(*(q @ rotation_z(0.7).T + 2.0)).item() == pytest.approx(math.pi / 2, abs=1e-12)
    assert dihedral(*(-q)).item() == pytest.approx(-math.pi / 2, abs=1e-15)
    assert dihedral(*(q * torch.tensor([1.0, 1.0, -1.0], dtype=DT))).item() == pytest.approx(-math.pi / 2, abs=1e-15)


def test_dihedrals_rad_matches_mdtraj(villin):
    md = pytest.importorskip("mdtraj")
    rng = np.random.default_rng(0)
    frames = villin.xyz + rng.normal(scale=0.02, size=(5,) + villin.xyz.shape[1:]).astype(np.float32)
    traj = md.Trajectory(frames, villin.top)
    quads = np.concatenate([md.compute_phi(traj)[0], md.compute_psi(traj)[0]])
    reference = md.compute_dihedrals(traj, quads)  # float32
    values = dihedrals_rad(traj.xyz, quads)
    assert values.shape == reference.shape == (5, len(quads)) and values.dtype == np.float64
    diff = np.angle(np.exp(1j * (values - reference)))
    assert np.abs(diff).max() < 1e-5
    assert values.min() >= -math.pi and values.max() < math.pi
    # One frame in gives [n] out; a tensor input gives the same numbers.
    single = dihedrals_rad(traj.xyz[2], quads)
    assert single.shape == (len(quads),)
    np.testing.assert_array_equal(single, values[2])
    np.testing.assert_array_equal(dihedrals_rad(torch.as_tensor(traj.xyz), quads), values)


# ---------------------------------------------------------------------------------------------
# Chirality
# ---------------------------------------------------------------------------------------------


def test_mirror_image_flips_chirality():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(64, 5, 3, generator=gen, dtype=DT)
    quads = np.array([[0, 1, 2, 3]])
    is_l = is_l_chirality(x, quads)
    assert is_l.shape == (64,) and is_l.dtype == torch.bool
    assert 0 < int(is_l.sum()) < 64  # random points: both hands occur
    assert torch.equal(is_l_chirality(-x, quads), ~is_l)
    assert torch.equal(is_l_chirality(x * torch.tensor([1.0, -1.0, 1.0], dtype=DT), quads), ~is_l)
    # Swapping two neighbours also flips it; proper rotations and translations do not.
    assert torch.equal(is_l_chirality(x, quads[:, [0, 2, 1, 3]]), ~is_l)
    moved = x @ rotation_z(1.1).T + 3.0
    assert torch.equal(is_l_chirality(moved.reshape(64, 15), quads), is_l)
    # Without chiral centers every configuration passes.
    assert is_l_chirality(x, np.zeros((0, 4), dtype=np.int64)).all()


def test_villin_is_all_l(villin):
    top = villin.top
    quads = find_alpha_carbon_chirality(top)
    n_non_gly = sum(1 for r in top.residues if r.name != "GLY")
    assert quads.shape == (n_non_gly, 4) and quads.dtype == np.int64
    names = [[top.atom(int(i)).name for i in q] for q in quads]
    assert all(n == ["CA", "N", "C", "CB"] for n in names)
    # An all-L protein fixes the sign convention: det[N - CA, C - CA, CB - CA] has L_CHIRALITY_SIGN.
    xyz = villin.xyz[0].astype(np.float64)
    ca, n, c, cb = (xyz[quads[:, m]] for m in range(4))
    dets = np.linalg.det(np.stack([n - ca, c - ca, cb - ca], axis=1))
    assert (np.sign(dets) == L_CHIRALITY_SIGN).all()
    x = torch.as_tensor(xyz).reshape(1, -1)
    both = torch.cat([x, -x])
    assert is_l_chirality(both, top).tolist() == [True, False]
    assert is_l_chirality(both, quads).tolist() == [True, False]
    # OpenMM topologies work too.
    assert find_alpha_carbon_chirality(top.to_openmm()).tolist() == quads.tolist()


def test_alanine_dipeptide_is_l():
    path = REPO / "systems" / "alanine-dipeptide.pdb"
    if not path.exists():
        pytest.skip("systems/alanine-dipeptide.pdb not written yet")
    md = pytest.importorskip("mdtraj")
    traj = md.load(str(path))
    quads = find_alpha_carbon_chirality(traj.top)
    assert quads.shape == (1, 4)
    x = torch.as_tensor(traj.xyz.astype(np.float64)).reshape(traj.n_frames, -1)
    assert is_l_chirality(x, traj.top).all()
    assert not is_l_chirality(-x, traj.top).any()
