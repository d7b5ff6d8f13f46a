"""Tests for boltzgen.md on a 4-atom chain whose torsion marginal is known exactly.

For a chain 0-1-2-3 with harmonic bonds and angles, one torsion and no other interactions, the
Jacobian of (bond lengths, angles, torsion) is r^2 sin(theta) products that do not involve the
torsion, so the marginal of phi is exactly p(phi) ∝ exp(-V_tors(phi) / kT). Quadrature of that
1-D density gives exact free energies to compare against.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import mdtraj
import numpy as np
import openmm
import openmm.app as app
import pytest
from openmm import unit

from boltzgen import md, umbrella

# (periodicity, phase rad, k kJ/mol): barrier ≈ 5.2 kT at 300 K, asymmetric wells.
TORSION_TERMS = ((1, 0.0, 6.0), (2, 1.0, 1.5))
CHAIN = (0, 1, 2, 3)


def v_torsion(phi: np.ndarray) -> np.ndarray:
    """Torsion energy (kJ/mol) of the test chain at angles phi (rad)."""
    return sum(k * (1.0 + np.cos(n * phi - phase)) for n, phase, k in TORSION_TERMS)


def state_b(phi: np.ndarray) -> np.ndarray:
    return (phi > 0.0) & (phi < 2.6)


def quadrature_grid(n: int = 200_000) -> np.ndarray:
    return np.linspace(-math.pi, math.pi, n, endpoint=False)


def exact_delta_f(temperature_K: float) -> float:
    phi = quadrature_grid()
    w = np.exp(-(v_torsion(phi) - v_torsion(phi).min()) / md.kT_kJ_per_mol(temperature_K))
    b = state_b(phi)
    return float(-np.log(w[b].sum() / w[~b].sum()))


def exact_mean_v(temperature_K: float) -> float:
    phi = quadrature_grid()
    v = v_torsion(phi)
    w = np.exp(-(v - v.min()) / md.kT_kJ_per_mol(temperature_K))
    return float((w * v).sum() / w.sum())


def make_chain() -> tuple[openmm.System, app.Topology, np.ndarray]:
    """A 4-atom chain with soft bonds (so 4 fs steps are stable) and one torsion."""
    system = openmm.System()
    for _ in range(4):
        system.addParticle(12.0)
    bonds = openmm.HarmonicBondForce()
    for i in range(3):
        bonds.addBond(i, i + 1, 0.15, 1.0e4)
    angles = openmm.HarmonicAngleForce()
    for i in range(2):
        angles.addAngle(i, i + 1, i + 2, 1.91, 400.0)
    torsion = openmm.PeriodicTorsionForce()
    for n, phase, k in TORSION_TERMS:
        torsion.addTorsion(*CHAIN, n, phase, k)
    for force in (bonds, angles, torsion):
        system.addForce(force)
    top = app.Topology()
    chain = top.addChain()
    res = top.addResidue("MOL", chain)
    atoms = [top.addAtom(f"C{i}", app.element.carbon, res) for i in range(4)]
    for i in range(3):
        top.addBond(atoms[i], atoms[i + 1])
    positions = np.array([[0.0, 0.15, 0.0], [0.0, 0.0, 0.0], [0.15, 0.0, 0.0], [0.2, 0.1, 0.1]])
    return system, top, positions


def openmm_energies(system: openmm.System, positions_nm: np.ndarray) -> np.ndarray:
    """Potential energy (kJ/mol) of each frame [T, n, 3], straight from OpenMM."""
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    out = []
    for x in positions_nm:
        ctx.setPositions(np.asarray(x, dtype=np.float64) * unit.nanometer)
        out.append(ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    return np.array(out)


MD_KW = dict(temperature_K=300.0, timestep_fs=4.0, friction_per_ps=5.0, progress=False)


# ---------------------------------------------------------------------------------------------


def test_dihedral_matches_mdtraj() -> None:
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(50, 4, 3)).astype(np.float32)
    system, top, _ = make_chain()
    traj = mdtraj.Trajectory(xyz, mdtraj.Topology.from_openmm(top))
    ref = mdtraj.compute_dihedrals(traj, [list(CHAIN)])[:, 0]
    np.testing.assert_allclose(md.dihedral_rad(xyz, CHAIN), ref, atol=1e-5)
    # Periodic-aware comparison is not needed: both use atan2 in [-pi, pi].
    assert md.dihedral_rad(xyz[0], CHAIN).shape == ()


def test_reduced_energy_at() -> None:
    u = md.reduced_energy_at(np.array([2.494338785, 0.0]), 300.0)
    assert u.dtype == np.float64
    np.testing.assert_allclose(u, [1.0, 0.0], rtol=1e-6)
    # Reducing to a higher temperature gives proportionally smaller reduced energies.
    np.testing.assert_allclose(md.reduced_energy_at(10.0, 600.0) * 2, md.reduced_energy_at(10.0, 300.0))
    with pytest.raises(ValueError):
        md.kT_kJ_per_mol(0.0)


def test_langevin_h5_layout_topology_and_energies(tmp_path: Path) -> None:
    system, top, pos = make_chain()
    out = tmp_path / "md.h5"
    res = md.run_langevin(
        system, top, pos, steps=2000, report_every=50, seed=11, out_h5=out,
        record_dihedrals={"phi": CHAIN}, **{**MD_KW, "temperature_K": 600.0}, target_temperature_K=300.0,
    )
    assert res.n_frames == 40 and res.positions_nm.shape == (40, 4, 3)
    assert res.energy_evaluations == 2000 and res.wall_seconds > 0
    np.testing.assert_allclose(res.time_ps, np.arange(1, 41) * 50 * 4.0 / 1000.0)

    traj = md.load_trajectory_h5(out)
    assert traj.n_frames == 40 and traj.n_atoms == 4
    assert [a.name for a in traj.topology.atoms] == ["C0", "C1", "C2", "C3"]
    assert traj.topology.n_bonds == 3 and traj.topology.atom(0).element.symbol == "C"
    np.testing.assert_array_equal(traj.xyz, res.positions_nm)
    with h5py.File(out, "r") as f:
        assert f.attrs["conventions"] == "Pande" and f.attrs["conventionVersion"] == "1.1"
        assert f["coordinates"].dtype == np.float32 and f["coordinates"].attrs["units"] == "nanometers"
        assert f["topology"].shape == (1,) and f["topology"].dtype.kind == "S"
        assert f["potentialEnergy"].attrs["units"] == "kilojoules_per_mole"
        assert f["reduced_energy"].shape == (40,)

    # Stored energies are OpenMM's energies of the stored frames, and reduced at the target T.
    np.testing.assert_allclose(res.potential_energy_kJ_mol, openmm_energies(system, res.positions_nm), atol=2e-3)
    np.testing.assert_allclose(res.reduced_energy, res.potential_energy_kJ_mol / md.kT_kJ_per_mol(300.0))
    np.testing.assert_allclose(res.dihedrals_rad["phi"], md.dihedral_rad(res.positions_nm, CHAIN))

    loaded = md.load_md(out)
    np.testing.assert_array_equal(loaded.reduced_energy, res.reduced_energy)
    assert loaded.temperature_K == 600.0 and loaded.target_temperature_K == 300.0
    # No temp files are left next to the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["md.h5"]


def test_mdtraj_load_opens_file_when_pytables_present(tmp_path: Path) -> None:
    pytest.importorskip("tables")
    system, top, pos = make_chain()
    out = tmp_path / "md.h5"
    res = md.run_langevin(system, top, pos, steps=500, report_every=50, seed=1, out_h5=out, **MD_KW)
    traj = mdtraj.load(str(out))
    assert traj.n_frames == 10 and traj.n_atoms == 4
    np.testing.assert_allclose(traj.xyz, res.positions_nm)


def test_seed_reproducible_and_distinct(tmp_path: Path) -> None:
    system, top, pos = make_chain()
    run = lambda seed, name: md.run_langevin(  # noqa: E731
        system, top, pos, steps=400, report_every=40, seed=seed, out_h5=tmp_path / name, **MD_KW
    )
    a, b, c = run(5, "a.h5"), run(5, "b.h5"), run(6, "c.h5")
    np.testing.assert_array_equal(a.positions_nm, b.positions_nm)
    assert not np.allclose(a.positions_nm, c.positions_nm)


def test_resume_after_interruption_matches_uninterrupted(tmp_path: Path) -> None:
    system, top, pos = make_chain()
    kw = dict(steps=2000, report_every=50, seed=3, **MD_KW)
    ref = md.run_langevin(system, top, pos, out_h5=tmp_path / "ref.h5", **kw)

    class Interrupt(Exception):
        pass

    def stop_at_17(done: int, total: int) -> None:
        if done == 17:
            raise Interrupt

    out, ckpt = tmp_path / "run.h5", tmp_path / "run.ckpt.h5"
    with pytest.raises(Interrupt):
        md.run_langevin(system, top, pos, out_h5=out, checkpoint=ckpt, checkpoint_every=7, on_frame=stop_at_17, **kw)
    assert not out.exists() and ckpt.exists()
    with h5py.File(ckpt, "r") as f:
        assert f["positions_nm"].shape[0] == 14 and f.attrs["step"] == 14 * 50

    seen: list[int] = []
    res = md.run_langevin(
        system, top, pos, out_h5=out, checkpoint=ckpt, checkpoint_every=7, resume=True,
        on_frame=lambda d, t: seen.append(d), **kw,
    )
    assert seen[0] == 15 and seen[-1] == 40  # continued from the checkpoint, not from scratch
    assert res.n_frames == 40 and md.load_trajectory_h5(out).n_frames == 40
    # Same frames, no gap, no duplicate: the continuation is bit-identical on Reference.
    np.testing.assert_array_equal(res.positions_nm, ref.positions_nm)
    np.testing.assert_array_equal(res.potential_energy_kJ_mol, ref.potential_energy_kJ_mol)
    np.testing.assert_allclose(res.potential_energy_kJ_mol, openmm_energies(system, res.positions_nm), atol=2e-3)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_extend_finished_run_and_refuse_foreign_checkpoint(tmp_path: Path) -> None:
    system, top, pos = make_chain()
    kw = dict(report_every=50, seed=4, **MD_KW)
    ref = md.run_langevin(system, top, pos, steps=2000, out_h5=tmp_path / "ref.h5", **kw)
    out, ckpt = tmp_path / "run.h5", tmp_path / "run.ckpt.h5"
    short = md.run_langevin(system, top, pos, steps=1000, out_h5=out, checkpoint=ckpt, **kw)
    assert short.n_frames == 20

    # Same run again: the finished file is returned without any MD.
    calls: list[int] = []
    again = md.run_langevin(
        system, top, pos, steps=1000, out_h5=out, checkpoint=ckpt, resume=True,
        on_frame=lambda d, t: calls.append(d), **kw,
    )
    assert calls == [] and again.wall_seconds == short.wall_seconds

    longer = md.run_langevin(system, top, pos, steps=2000, out_h5=out, checkpoint=ckpt, resume=True, **kw)
    assert longer.n_frames == 40
    np.testing.assert_array_equal(longer.positions_nm, ref.positions_nm)

    with pytest.raises(ValueError, match="different run"):
        md.run_langevin(
            system, top, pos, steps=2000, out_h5=tmp_path / "x.h5", checkpoint=ckpt, resume=True,
            **{**kw, "seed": 99},
        )


def test_bias_is_applied_but_excluded_from_stored_energy(tmp_path: Path) -> None:
    system, top, pos = make_chain()
    center, k = 3.0, 400.0  # near +pi, so the restrained torsion straddles the ±pi seam
    res = md.run_langevin(
        system, top, pos, steps=8000, report_every=40, seed=8, out_h5=tmp_path / "b.h5",
        bias=umbrella.umbrella_bias_force(CHAIN, center, k), record_dihedrals={"phi": CHAIN}, **MD_KW,
    )
    phi = res.dihedrals_rad["phi"][20:]
    d = (phi - center + math.pi) % (2 * math.pi) - math.pi
    assert abs(d.mean()) < 0.1 and d.std() < 0.15  # the restraint holds phi near its centre
    assert (phi < 0).any()  # ... and frames cross the seam, exercising the minimum-image term
    # Stored potential is the unbiased system's energy; the bias energy matches the numpy formula.
    np.testing.assert_allclose(res.potential_energy_kJ_mol, openmm_energies(system, res.positions_nm), atol=2e-3)
    expected_bias = umbrella.umbrella_bias_kJ_mol(res.dihedrals_rad["phi"], np.array([center]), k)[0]
    np.testing.assert_allclose(res.bias_energy_kJ_mol, expected_bias, rtol=1e-4, atol=1e-4)
    assert system.getNumForces() == 3  # the caller's system is untouched


def test_high_temperature_md_samples_its_own_temperature(tmp_path: Path) -> None:
    """Training MD at 600 K: the torsion energy average matches quadrature at 600 K, not 300 K."""
    system, top, pos = make_chain()
    res = md.run_langevin(
        system, top, pos, steps=200_000, report_every=20, seed=21, out_h5=tmp_path / "hot.h5",
        record_dihedrals={"phi": CHAIN}, **{**MD_KW, "temperature_K": 600.0}, target_temperature_K=300.0,
    )
    v = v_torsion(res.dihedrals_rad["phi"])
    blocks = v[: len(v) // 50 * 50].reshape(50, -1).mean(axis=1)
    se = blocks.std(ddof=1) / math.sqrt(len(blocks))
    hot, cold = exact_mean_v(600.0), exact_mean_v(300.0)
    assert abs(hot - cold) > 10 * se  # the check can tell the two temperatures apart
    assert abs(v.mean() - hot) < 4 * se + 0.02


def test_umbrella_windows() -> None:
    c = umbrella.umbrella_windows(10.0)
    assert len(c) == 36 and c[0] == pytest.approx(-math.pi) and c.max() < math.pi
    np.testing.assert_allclose(np.diff(c), math.radians(10.0))
    skipped = umbrella.umbrella_windows(10.0, ((115.0, 135.0),))
    assert len(skipped) == 34 and not np.any((np.degrees(skipped) > 114) & (np.degrees(skipped) < 136))
    # Derived from the spring: spacing at most 1.5 window widths, and the circle is tiled evenly.
    auto = umbrella.umbrella_windows(k_kJ_per_mol_rad2=200.0, temperature_K=300.0)
    sigma = math.sqrt(md.kT_kJ_per_mol(300.0) / 200.0)
    spacing = np.diff(auto)
    assert spacing.max() <= 1.5 * sigma + 1e-12 and np.allclose(spacing, spacing[0])
    assert (2 * math.pi - (auto[-1] - auto[0])) == pytest.approx(spacing[0])


def test_umbrella_mbar_matches_quadrature(tmp_path: Path) -> None:
    system, top, pos = make_chain()
    k = 20.0
    res = umbrella.run_umbrella(
        system, top, pos, dihedral_atoms=CHAIN, psi_atoms=(3, 2, 1, 0), k_kJ_per_mol_rad2=k,
        steps_per_window=30_000, equilibration_steps=200, report_every=20, temperature_K=300.0,
        timestep_fs=4.0, friction_per_ps=5.0, seed=2, out_dir=tmp_path, state_b=state_b, progress=False,
    )
    n_windows = len(res.centers_rad)
    assert n_windows == len(umbrella.umbrella_windows(k_kJ_per_mol_rad2=k, temperature_K=300.0))
    assert res.energy_evaluations == n_windows * 30_200
    assert all(len(p) == 1500 for p in res.phi_per_window)
    # psi recorded on the reversed chain is the same torsion.
    np.testing.assert_allclose(res.psi_per_window[0], res.phi_per_window[0], atol=1e-5)

    exact = exact_delta_f(300.0)
    err = res.delta_f_kT - exact
    assert 0.0 < res.stderr_kT < 0.08
    assert abs(err) < 4 * res.stderr_kT and abs(err) < 0.15, (res.delta_f_kT, res.stderr_kT, exact)
    assert all(abs(h - exact) < 0.3 for h in res.delta_f_halves_kT)
    assert res.halves_stderr_kT == pytest.approx(abs(np.subtract(*res.delta_f_halves_kT)) / 2)
    assert np.all(res.statistical_inefficiency >= 1.0) and res.n_uncorrelated.sum() > 0

    # Profile against -ln of exact bin probabilities, after removing the arbitrary offset.
    prof = res.profile
    phi = quadrature_grid()
    w = np.exp(-(v_torsion(phi) - v_torsion(phi).min()) / md.kT_kJ_per_mol(300.0))
    p_bins = np.bincount(np.digitize(phi, prof.bin_edges_rad) - 1, weights=w, minlength=len(prof.f_kT))
    f_exact = -np.log(p_bins / p_bins.sum())
    f_exact -= f_exact.min()
    assert np.nanmin(prof.f_kT) == 0.0 and np.all(np.isfinite(prof.f_kT))
    diff = prof.f_kT - f_exact
    assert np.max(np.abs(diff - diff.mean())) < 0.25, np.round(diff - diff.mean(), 2)
    assert np.all(prof.stderr_kT >= 0.0) and np.nanmax(prof.stderr_kT) < 0.2

    # The bias stored during each window is the periodic harmonic bias of that window.
    for i in (0, n_windows // 2):
        win = md.load_md(res.window_h5[i])
        expected = umbrella.umbrella_bias_kJ_mol(win.dihedrals_rad["phi"], res.centers_rad[i : i + 1], k)[0]
        np.testing.assert_allclose(win.bias_energy_kJ_mol, expected, rtol=1e-4, atol=1e-4)

    summary = json.loads((tmp_path / "umbrella.json").read_text())
    assert summary["delta_f_kT"] == pytest.approx(res.delta_f_kT)


def test_umbrella_resume_reuses_finished_windows(tmp_path: Path) -> None:
    system, top, pos = make_chain()
    kw = dict(
        dihedral_atoms=CHAIN, k_kJ_per_mol_rad2=50.0, centers_rad=umbrella.umbrella_windows(60.0),
        steps_per_window=1000, equilibration_steps=100, report_every=10, temperature_K=300.0,
        timestep_fs=4.0, friction_per_ps=5.0, seed=7, out_dir=tmp_path, state_b=state_b, progress=False,
        subsample=False,
    )
    first = umbrella.run_umbrella(system, top, pos, **kw)
    mtimes = [p.stat().st_mtime_ns for p in first.window_h5]
    second = umbrella.run_umbrella(system, top, pos, **kw)
    assert [p.stat().st_mtime_ns for p in second.window_h5] == mtimes
    assert second.delta_f_kT == first.delta_f_kT
    for a, b in zip(first.phi_per_window, second.phi_per_window):
        np.testing.assert_array_equal(a, b)
    # A longer run in the same folder extends every window: old frames kept, new ones appended.
    longer = umbrella.run_umbrella(system, top, pos, **{**kw, "steps_per_window": 2000})
    for a, b in zip(first.phi_per_window, longer.phi_per_window):
        assert len(b) == 200
        np.testing.assert_array_equal(b[:100], a)
    assert longer.energy_evaluations == len(first.centers_rad) * 2100
    # Each window's start is near its own centre thanks to the outward walk.
    for c, p in zip(first.centers_rad, first.phi_per_window):
        assert abs((np.mean(np.exp(1j * p)) * np.exp(-1j * c))) > 0.5


# --------------------------------------------------------------------------------------------- flattened umbrella


def exact_profile_kT(centers: np.ndarray, temperature_K: float = 300.0) -> np.ndarray:
    """Exact F(phi) = V_tors(phi)/kT of the test chain, minimum 0 (kT)."""
    v = v_torsion(np.asarray(centers, dtype=np.float64)) / md.kT_kJ_per_mol(temperature_K)
    return v - v_torsion(quadrature_grid()).min() / md.kT_kJ_per_mol(temperature_K)


def test_flattening_bias_table_is_periodic_finite_and_capped() -> None:
    kT = md.kT_kJ_per_mol(300.0)
    centers = np.radians(np.arange(-177.5, 180.0, 5.0))
    f = 30.0 * (1.0 + np.cos(centers)) / 2.0 + 3.0  # 3..33 kT, max at phi = 0
    f[10] = np.inf  # an empty bin
    f[20] = np.nan
    bias = umbrella.flattening_bias(centers, f, kT_kJ_per_mol=kT, f_cap_kT=18.0)
    v = bias.energy_kJ_mol
    assert bias.grid_rad[0] == -math.pi and bias.grid_rad[-1] == math.pi
    assert np.all(np.isfinite(v)) and v[0] == v[-1]
    flat = -v / kT
    # Shifted to minimum 0 and capped: the cap region is flat, the minimum is cancelled fully.
    # (a cubic spline overshoots a little next to the empty bins and the cap)
    assert flat.max() == pytest.approx(18.0, abs=0.3) and flat.min() == pytest.approx(0.0, abs=0.3)
    np.testing.assert_allclose(bias.flattened_profile_kT(0.0), 18.0, atol=1e-6)
    # Away from the cap and the empty bins, the spline reproduces the profile it flattens.
    ok = (f - 3.0 < 16.0) & np.isfinite(f)
    ok[8:23] = False
    np.testing.assert_allclose(bias.flattened_profile_kT(centers[ok]), (f - 3.0)[ok], atol=0.05)
    # Continuous across the +-pi seam, in numpy and in OpenMM.
    assert bias.energy_at(math.pi - 1e-7) == pytest.approx(bias.energy_at(-math.pi + 1e-7), abs=1e-4)

    sys_bias = openmm.System()
    for _ in range(4):
        sys_bias.addParticle(12.0)
    sys_bias.addForce(umbrella.flattening_bias_force(CHAIN, bias))
    ctx = openmm.Context(sys_bias, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(40, 4, 3))
    phi = md.dihedral_rad(xyz, CHAIN)
    energies = []
    for x in xyz:
        ctx.setPositions(x * unit.nanometer)
        energies.append(ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    np.testing.assert_allclose(energies, bias.energy_at(phi), atol=1e-3)


def test_flattened_reweighting_sign_and_transitions() -> None:
    """iid samples from the biased (flat) ensemble: exp(+V/kT) recovers the exact ΔF, exp(-V/kT) does not."""
    kT = md.kT_kJ_per_mol(300.0)
    centers = np.radians(np.arange(-177.5, 180.0, 5.0))
    bias = umbrella.flattening_bias(centers, exact_profile_kT(centers), kT_kJ_per_mol=kT, f_cap_kT=50.0)
    # F + V is flat up to the spline error, so the biased ensemble is ~uniform on the circle:
    # draw uniform samples and correct the small residual with rejection sampling.
    rng = np.random.default_rng(1)
    phi = rng.uniform(-math.pi, math.pi, size=400_000)
    log_resid = -(v_torsion(phi) + bias.energy_at(phi)) / kT
    phi = phi[np.log(rng.uniform(size=phi.size)) < log_resid - log_resid.max()][:200_000]
    phi = phi.reshape(2, -1)
    est = umbrella.analyze_flattened_umbrella(
        phi, bias.energy_at(phi), temperature_K=300.0, state_b=state_b, bias=bias, n_blocks=10
    )
    exact = exact_delta_f(300.0)
    assert abs(est.delta_f_kT - exact) < max(4 * est.stderr_kT, 0.03), (est.delta_f_kT, est.stderr_kT, exact)
    assert len(est.repeat_delta_f_kT) == 2 and est.n_samples == phi.size
    assert all(t > 1000 for t in est.transitions)  # iid samples hop between cores all the time
    wrong = umbrella.analyze_flattened_umbrella(
        phi, -bias.energy_at(phi), temperature_K=300.0, state_b=state_b, bias=bias, n_blocks=10
    )
    assert abs(wrong.delta_f_kT - exact) > 1.0
    # The reweighted profile is the exact one (bins of 5 degrees, minimum 0).
    f_exact = exact_profile_kT(est.profile.bin_centers_rad)
    d = est.profile.f_kT - f_exact
    assert np.max(np.abs(d - d.mean())) < 0.1 + 4 * np.nanmax(est.profile.stderr_kT)
    assert np.all(np.isfinite(est.profile.stderr_kT))

    # Transition counting: cores only, recrossings of the boundary do not count.
    labels = np.array([0, 0, -1, 0, -1, 1, 1, -1, 1, -1, 0, 0])
    assert umbrella._count_transitions(labels) == 2


def test_flattened_umbrella_matches_quadrature_and_resumes(tmp_path: Path) -> None:
    system, top, pos = make_chain()
    kw = dict(
        dihedral_atoms=CHAIN, psi_atoms=None, temperature_K=300.0, state_b=state_b, out_dir=tmp_path, seed=2,
        stage1_spacing_deg=30.0, stage1_k_kJ_per_mol_rad2=20.0, stage1_steps_per_window=4_000,
        stage1_equilibration_steps=200, stage1_skip_ranges_deg=(), f_cap_kT=18.0,
        production_steps=100_000, production_equilibration_steps=1_000, n_repeats=2, report_every=50,
        timestep_fs=4.0, friction_per_ps=5.0, progress=False, parallel=True,
    )
    res = umbrella.run_flattened_umbrella(system, top, pos, **kw)
    exact = exact_delta_f(300.0)
    err = res.estimate.delta_f_kT - exact
    assert 0.0 < res.estimate.stderr_kT < 0.1
    assert abs(err) < 4 * res.estimate.stderr_kT and abs(err) < 0.15, (res.estimate.delta_f_kT, res.estimate.stderr_kT, exact)
    assert len(res.estimate.repeat_delta_f_kT) == 2 and all(abs(v - exact) < 0.3 for v in res.estimate.repeat_delta_f_kT)
    assert all(t > 20 for t in res.estimate.transitions)
    assert res.stage1_energy_evaluations == 12 * 4_200
    assert res.energy_evaluations == res.stage1_energy_evaluations + 2 * 100_000
    assert res.estimate.n_samples == 2 * (2_000 - 20)
    # The biased runs sample the circle far more evenly than the unbiased density would.
    phi = np.concatenate([md.load_md(p).dihedrals_rad["phi"] for p in res.production_h5])
    hist = np.histogram(phi, bins=12, range=(-math.pi, math.pi))[0]
    assert hist.min() > 0.2 * hist.max()
    # Stored bias energies are the table's V(phi).
    run0 = md.load_md(res.production_h5[0])
    np.testing.assert_allclose(run0.bias_energy_kJ_mol, res.bias.energy_at(run0.dihedrals_rad["phi"]), atol=1e-3)

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == "flattened_umbrella"
    fe = summary["free_energies"][0]
    assert (fe["from"], fe["to"]) == ("A", "B") and fe["delta_f_kT"] == pytest.approx(res.estimate.delta_f_kT)
    assert fe["repeats_kT"] == pytest.approx(list(res.estimate.repeat_delta_f_kT))
    assert set(summary["profile"]) >= {"centers_rad", "f_kT", "stderr_kT"}
    assert len(summary["profile"]["centers_rad"]) == len(summary["profile"]["f_kT"]) == 72
    assert summary["energy_evaluations"]["total"] == res.energy_evaluations
    assert summary["transitions"] == list(res.estimate.transitions) and summary["n_samples"] == res.estimate.n_samples

    # Second call: every file is reused, the result is identical.
    mtimes = [p.stat().st_mtime_ns for p in (*res.production_h5, *res.stage1_h5)]
    again = umbrella.run_flattened_umbrella(system, top, pos, **{**kw, "parallel": False})
    assert [p.stat().st_mtime_ns for p in (*again.production_h5, *again.stage1_h5)] == mtimes
    assert again.estimate.delta_f_kT == res.estimate.delta_f_kT and again.estimate.stderr_kT == res.estimate.stderr_kT
