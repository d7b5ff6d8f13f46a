"""Tests for boltzgen.simulation.umbrella: the biased OpenMM runs along the torsion of the test chain."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import openmm
import pytest
from openmm import unit

from boltzgen.errors import DataFileError
from boltzgen.estimators.umbrella import bin_centers, umbrella_bias
from boltzgen.simulation.langevin import load_md
from boltzgen.simulation.umbrella import (
    flattening_bias,
    flattening_bias_force,
    run_flattened_umbrella,
    run_umbrella,
    umbrella_windows,
)
from boltzgen.units import kT_kJ_per_mol
from tests.simulation.chain import CHAIN, exact_bin_profile, exact_delta_f, make_chain, state_b, torsion


def test_umbrella_windows() -> None:
    c = umbrella_windows(10.0)
    assert len(c) == 36 and c[0] == pytest.approx(-math.pi) and c.max() < math.pi
    np.testing.assert_allclose(np.diff(c), math.radians(10.0))
    skipped = umbrella_windows(10.0, ((115.0, 135.0),))
    assert len(skipped) == 34 and not np.any((np.degrees(skipped) > 114) & (np.degrees(skipped) < 136))
    # Derived from the spring: spacing at most 1.5 window widths, and the circle is tiled evenly.
    auto = umbrella_windows(k_kJ_per_mol_rad2=200.0, temperature_K=300.0)
    sigma = math.sqrt(kT_kJ_per_mol(300.0) / 200.0)
    spacing = np.diff(auto)
    assert spacing.max() <= 1.5 * sigma + 1e-12 and np.allclose(spacing, spacing[0])
    assert (2 * math.pi - (auto[-1] - auto[0])) == pytest.approx(spacing[0])
    with pytest.raises(ValueError):
        umbrella_windows()


def test_umbrella_mbar_matches_quadrature(tmp_path: Path) -> None:
    system, top, pos = make_chain()
    k = 20.0
    res = run_umbrella(
        system, top, pos, dihedral_atoms=CHAIN, psi_atoms=(3, 2, 1, 0), k_kJ_per_mol_rad2=k,
        steps_per_window=30_000, equilibration_steps=200, report_every=20, temperature_K=300.0,
        timestep_fs=4.0, friction_per_ps=5.0, seed=2, out_dir=tmp_path, state_b=state_b, progress=False,
    )
    n_windows = len(res.centers_rad)
    assert n_windows == len(umbrella_windows(k_kJ_per_mol_rad2=k, temperature_K=300.0))
    assert res.energy_evaluations == n_windows * 30_200
    assert all(len(p) == 1500 for p in res.phi_per_window)
    assert all(len(u) == 1500 for u in res.potential_per_window)
    assert res.wall_seconds >= res.md_wall_seconds > 0
    # psi recorded on the reversed chain is the same torsion.
    np.testing.assert_allclose(res.psi_per_window[0], res.phi_per_window[0], atol=1e-5)

    est = res.estimate
    exact = exact_delta_f(300.0)
    err = est.delta_f_kT - exact
    assert 0.0 < est.stderr_kT < 0.08
    assert abs(err) < 4 * est.stderr_kT and abs(err) < 0.15, (est.delta_f_kT, est.stderr_kT, exact)
    assert all(abs(h - exact) < 0.3 for h in est.delta_f_halves_kT)
    assert est.halves_stderr_kT == pytest.approx(abs(np.subtract(*est.delta_f_halves_kT)) / 2)
    assert np.all(est.statistical_inefficiency >= 1.0) and est.n_uncorrelated.sum() > 0

    # Profile against -ln of exact bin probabilities, after removing the arbitrary offset.
    prof = est.profile
    f_exact = exact_bin_profile(prof.edges[0])
    assert np.nanmin(prof.f_kT) == 0.0 and np.all(np.isfinite(prof.f_kT))
    diff = prof.f_kT - f_exact
    assert np.max(np.abs(diff - diff.mean())) < 0.25, np.round(diff - diff.mean(), 2)
    assert np.all(prof.stderr_kT >= 0.0) and np.nanmax(prof.stderr_kT) < 0.2

    # The bias stored during each window is the periodic harmonic bias of that window.
    for i in (0, n_windows // 2):
        win = load_md(res.window_h5[i])
        expected = umbrella_bias(win.dihedrals_rad["phi"], res.centers_rad[i : i + 1], k)[0]
        np.testing.assert_allclose(win.bias_energy_kJ_mol, expected, rtol=1e-4, atol=1e-4)

    # The folder keeps a record of the estimate beside the window files.
    record = json.loads((tmp_path / "umbrella.json").read_text())
    assert record["delta_f_kT"] == pytest.approx(est.delta_f_kT)
    np.testing.assert_allclose(record["profile"]["bin_centers_rad"], bin_centers(prof.edges[0]))


def test_umbrella_resume_reuses_finished_windows(tmp_path: Path) -> None:
    system, top, pos = make_chain()
    kw = dict(
        dihedral_atoms=CHAIN, k_kJ_per_mol_rad2=50.0, centers_rad=umbrella_windows(60.0),
        steps_per_window=1000, equilibration_steps=100, report_every=10, temperature_K=300.0,
        timestep_fs=4.0, friction_per_ps=5.0, seed=7, out_dir=tmp_path, state_b=state_b, progress=False,
        subsample=False,
    )
    first = run_umbrella(system, top, pos, **kw)
    assert first.psi_per_window is None
    mtimes = [p.stat().st_mtime_ns for p in first.window_h5]
    second = run_umbrella(system, top, pos, **kw)
    assert [p.stat().st_mtime_ns for p in second.window_h5] == mtimes
    assert second.estimate.delta_f_kT == first.estimate.delta_f_kT
    for a, b in zip(first.phi_per_window, second.phi_per_window):
        np.testing.assert_array_equal(a, b)
    # A longer run in the same folder extends every window: old frames kept, new ones appended.
    longer = run_umbrella(system, top, pos, **{**kw, "steps_per_window": 2000})
    for a, b in zip(first.phi_per_window, longer.phi_per_window):
        assert len(b) == 200
        np.testing.assert_array_equal(b[:100], a)
    assert longer.energy_evaluations == len(first.centers_rad) * 2100
    # Each window's start is near its own centre thanks to the outward walk.
    for c, p in zip(first.centers_rad, first.phi_per_window):
        assert abs((np.mean(np.exp(1j * p)) * np.exp(-1j * c))) > 0.5
    # Another seed in the same folder is a different run: its checkpoints are refused.
    with pytest.raises(DataFileError, match="different run"):
        run_umbrella(system, top, pos, **{**kw, "seed": 8, "steps_per_window": 3000})


def test_flattening_bias_table_is_periodic_finite_and_capped() -> None:
    kT = kT_kJ_per_mol(300.0)
    centers = np.radians(np.arange(-177.5, 180.0, 5.0))
    f = 30.0 * (1.0 + np.cos(centers)) / 2.0 + 3.0  # 3..33 kT, max at phi = 0
    f[10] = np.inf  # an empty bin
    f[20] = np.nan
    bias = flattening_bias(centers, f, kT_kJ_per_mol=kT, f_cap_kT=18.0)
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
    sys_bias.addForce(flattening_bias_force(CHAIN, bias))
    ctx = openmm.Context(sys_bias, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(40, 4, 3))
    energies = []
    for x in xyz:
        ctx.setPositions(x * unit.nanometer)
        energies.append(ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    np.testing.assert_allclose(energies, bias.energy_at(torsion(xyz)), atol=1e-3)

    with pytest.raises(ValueError, match="no finite value"):
        flattening_bias(centers, np.full_like(centers, np.inf), kT_kJ_per_mol=kT)


def test_flattened_umbrella_matches_quadrature_and_resumes(tmp_path: Path) -> None:
    system, top, pos = make_chain()
    kw = dict(
        dihedral_atoms=CHAIN, psi_atoms=None, temperature_K=300.0, state_b=state_b, out_dir=tmp_path, seed=2,
        stage1_spacing_deg=30.0, stage1_k_kJ_per_mol_rad2=20.0, stage1_steps_per_window=4_000,
        stage1_equilibration_steps=200, stage1_skip_ranges_deg=(), f_cap_kT=18.0,
        production_steps=100_000, production_equilibration_steps=1_000, n_repeats=2, report_every=50,
        timestep_fs=4.0, friction_per_ps=5.0, progress=False, parallel=True,
    )
    res = run_flattened_umbrella(system, top, pos, **kw)
    est = res.estimate
    exact = exact_delta_f(300.0)
    err = est.delta_f_kT - exact
    assert 0.0 < est.stderr_kT < 0.1
    assert abs(err) < 4 * est.stderr_kT and abs(err) < 0.15, (est.delta_f_kT, est.stderr_kT, exact)
    assert len(est.repeat_delta_f_kT) == 2 and all(abs(v - exact) < 0.3 for v in est.repeat_delta_f_kT)
    assert len(est.repeat_stderr_kT) == 2 and est.repeat_spread_kT >= 0.0 and 0.0 < est.p_b < 1.0
    assert all(t > 20 for t in est.transitions)
    assert res.stage1_energy_evaluations == 12 * 4_200
    assert res.production_energy_evaluations == 2 * 100_000
    assert res.energy_evaluations == res.stage1_energy_evaluations + res.production_energy_evaluations
    assert est.n_samples == 2 * (2_000 - 20)
    assert len(res.stage1_centers_rad) == 12 and np.isfinite(res.stage1_delta_f_kT)
    assert len(res.stage1_profile.f_kT) == 72 and np.nanmin(res.stage1_profile.f_kT) == 0.0
    # The reweighted profile: 5-degree bins over the circle, close to the exact one.
    assert len(est.profile.f_kT) == 72 and np.nanmin(est.profile.f_kT) == 0.0
    d = est.profile.f_kT - exact_bin_profile(est.profile.edges[0])
    assert np.max(np.abs(d - d.mean())) < 0.5
    assert res.wall_seconds > 0 and res.call_wall_seconds > 0
    # The biased runs sample the circle far more evenly than the unbiased density would.
    phi = np.concatenate([load_md(p).dihedrals_rad["phi"] for p in res.production_h5])
    hist = np.histogram(phi, bins=12, range=(-math.pi, math.pi))[0]
    assert hist.min() > 0.2 * hist.max()
    # Stored bias energies are the table's V(phi), and the table is kept beside the runs.
    run0 = load_md(res.production_h5[0])
    np.testing.assert_allclose(run0.bias_energy_kJ_mol, res.bias.energy_at(run0.dihedrals_rad["phi"]), atol=1e-3)
    record = json.loads((tmp_path / "bias.json").read_text())
    np.testing.assert_array_equal(record["energy_kJ_mol"], res.bias.energy_kJ_mol)

    # Second call: every file is reused, the result is identical.
    mtimes = [p.stat().st_mtime_ns for p in (*res.production_h5, *res.stage1_h5)]
    again = run_flattened_umbrella(system, top, pos, **{**kw, "parallel": False})
    assert [p.stat().st_mtime_ns for p in (*again.production_h5, *again.stage1_h5)] == mtimes
    assert again.estimate.delta_f_kT == est.delta_f_kT and again.estimate.stderr_kT == est.stderr_kT


def test_flattened_umbrella_refuses_bad_lengths(tmp_path: Path) -> None:
    system, top, pos = make_chain()
    kw = dict(dihedral_atoms=CHAIN, psi_atoms=None, temperature_K=300.0, state_b=state_b, out_dir=tmp_path,
              report_every=50)
    with pytest.raises(ValueError, match="production_steps"):
        run_flattened_umbrella(system, top, pos, production_steps=1_025, **kw)
    with pytest.raises(ValueError, match="smaller than production_steps"):
        run_flattened_umbrella(system, top, pos, production_steps=1_000, production_equilibration_steps=1_000, **kw)
    with pytest.raises(ValueError, match="n_repeats"):
        run_flattened_umbrella(system, top, pos, production_steps=1_000, production_equilibration_steps=0,
                               n_repeats=0, **kw)


# ----------------------------------------------------------------------------------------------
# windows on a grid of CVs (boltzgen.simulation.umbrella_grid)
# ----------------------------------------------------------------------------------------------

from boltzgen import cli  # noqa: E402
from boltzgen.cvs import CollectiveVariable, evaluate_cvs  # noqa: E402
from boltzgen.estimators.umbrella_grid import WindowGrid, analyze_window_grid  # noqa: E402
from boltzgen.simulation.umbrella_grid import (  # noqa: E402
    WindowGridSpec,
    cv_bias_force,
    run_window_grid,
    seeding_order,
)
from tests.simulation.chain import CHAIN2_PHI, CHAIN2_PSI, exact_2d, make_chain_2d  # noqa: E402


def test_cv_bias_forces_match_the_numpy_bias() -> None:
    """Torsion (centred next to the seam), distance and coordinate restraints in one system: OpenMM's
    energy is the sum of 0.5 k d^2 that the MBAR analysis computes."""
    cvs = (CollectiveVariable("t", "torsion", (0, 1, 2, 3)), CollectiveVariable("d", "distance", (0, 4)),
           CollectiveVariable("z", "coordinate", (2,), 2))
    center, k = np.array([math.pi - 0.05, 0.3, 0.1]), np.array([20.0, 500.0, 300.0])
    system = openmm.System()
    for _ in range(5):
        system.addParticle(12.0)
    for d, cv in enumerate(cvs):
        system.addForce(cv_bias_force(cv, float(k[d]), d, float(center[d])))
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    xyz = np.random.default_rng(0).normal(scale=0.3, size=(30, 5, 3))
    energies = []
    for x in xyz:
        ctx.setPositions(x * unit.nanometer)
        energies.append(ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    values = evaluate_cvs(xyz, cvs)
    grid = WindowGrid(np.stack([center, center]), k, [True, False, False])
    expected = grid.bias_kT(np.stack([values[cv.name] for cv in cvs], axis=1))[0]
    np.testing.assert_allclose(energies, expected, rtol=1e-5, atol=1e-6)


def test_seeding_order_is_a_breadth_first_tree_over_the_grid() -> None:
    cvs = (CollectiveVariable("a", "torsion", (0, 1, 2, 3)), CollectiveVariable("r", "distance", (0, 3)))
    spec = WindowGridSpec(cvs, (np.radians([-180.0, -90.0, 0.0, 90.0]), np.array([0.2, 0.3, 0.4])), (10.0, 100.0))
    order = seeding_order(spec, np.array([math.radians(170.0), 0.41]))
    windows = [w for w, _ in order]
    assert sorted(windows) == list(range(12)) and order[0] == (2, -1)  # phi 170 is next to -180 across the seam
    seen = set()
    for window, parent in order:
        if parent >= 0:
            assert parent in seen
            (a0, r0), (a1, r1) = np.unravel_index(window, (4, 3)), np.unravel_index(parent, (4, 3))
            assert (a0 == a1 and abs(int(r0) - int(r1)) == 1) or (r0 == r1 and (int(a0) - int(a1)) % 4 in (1, 3))
        seen.add(window)


def test_window_grid_on_two_torsions_matches_quadrature(tmp_path: Path) -> None:
    """Windows on both torsions of a 5-atom chain whose (phi, psi) density is known exactly: the MD
    passes and the MBAR analysis recover the exact ΔF and profile; a second call reuses every file."""
    system, top, pos = make_chain_2d()
    cvs = (CollectiveVariable("phi", "torsion", CHAIN2_PHI), CollectiveVariable("psi", "torsion", CHAIN2_PSI))
    axis = np.radians(np.arange(-180.0, 180.0, 45.0))
    spec = WindowGridSpec(cvs, (axis, axis), (10.0, 10.0))
    kw = dict(steps_per_window=10_000, equilibration_steps=500, temperature_K=300.0, seed=3, out_dir=tmp_path,
              timestep_fs=4.0, friction_per_ps=5.0, report_every=20, progress=False)
    run = run_window_grid(system, top, pos, spec, **kw)
    assert len(run.windows) == 64 and all(v.shape == (500, 2) for v in run.values)
    assert run.energy_evaluations == 64 * 10_500 and run.seeding_energy_evaluations == 64 * 500
    # The stored bias energy of each window is the harmonic bias of its centre.
    grid = WindowGrid(run.centers, run.k / kT_kJ_per_mol(300.0), [True, True])
    for i in (0, 27):
        np.testing.assert_allclose(run.windows[i].bias_energy_kJ_mol,
                                   grid.bias_kT(run.values[i])[i] * kT_kJ_per_mol(300.0), rtol=1e-4, atol=1e-4)
    in_b = [(v[:, 0] > 0.0) & (v[:, 0] < 2.2) for v in run.values]
    edges = [np.linspace(-math.pi, math.pi, 13)] * 2
    est = analyze_window_grid(grid, run.values, [np.stack([~b, b], axis=1) for b in in_b], edges, n_bootstrap=10,
                              n_blocks=5, rng=0)
    phi, psi, p = exact_2d()
    b = (phi > 0.0) & (phi < 2.2)
    exact = -math.log(p[b].sum() / p[~b].sum())
    assert 0.0 < est.stderr_kT[0] < 0.1
    assert abs(est.delta_f_kT[0] - exact) < 4 * est.stderr_kT[0], (est.delta_f_kT, est.stderr_kT, exact)
    marginal = -np.log(np.histogram(phi.ravel(), edges[0], weights=p.ravel())[0])
    diff = est.profiles[0].f_kT - (marginal - marginal.min())
    assert np.max(np.abs(diff - diff.mean())) < 0.3

    mtimes = [w.h5.stat().st_mtime_ns for w in run.windows]
    again = run_window_grid(system, top, pos, spec, **kw)
    assert [w.h5.stat().st_mtime_ns for w in again.windows] == mtimes
    np.testing.assert_array_equal(again.values[5], run.values[5])


def test_umbrella_windows_on_alanine_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`md --umbrella` on alanine dipeptide with a 2-D grid of 6 x 6 tiny windows: the summary, its
    2-D surface and profiles, the cost, the plots; a bad atom is one line naming the key."""
    grid = ("umbrella={cvs: [{name: phi, spacing_deg: 60}, {name: psi, spacing_deg: 60}], steps_per_window: 2000, "
            "equilibration_steps: 500, report_every: 50, n_blocks: 4, n_bootstrap: 4}")
    args = ["md", "systems/alanine.yaml", "--umbrella", "--out", str(tmp_path), "--no-progress", "--set", grid]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "ΔF A→B" in out and "block bootstrap" in out
    folder = tmp_path / "umbrella_phi_psi"
    data = json.loads((folder / "summary.json").read_text())
    assert data["method"] == "umbrella_windows" and data["cvs"] == ["phi", "psi"]
    row = data["free_energies"][0]
    assert row["from"] == "A" and row["to"] == "B" and row["stderr_kT"] >= row["stderr_analytic_kT"]
    assert len(row["halves_kT"]) == 2 and 0.0 < row["p_b"] < 1.0
    assert data["energy_evaluations"] == {"seeding": 36 * 500, "windows": 36 * 2000, "total": 36 * 2500}
    assert data["windows"]["n_windows"] == 36 and data["windows"]["shape"] == [6, 6]
    assert np.shape(data["fes_2d"]["f_kT"]) == (36, 36) and data["fes_2d"]["cvs"] == ["phi", "psi"]
    assert set(data["profiles"]) == {"phi", "psi"} and len(data["profile"]["f_kT"]) == 36
    assert data["wall_seconds"] > 0 and "md_agreement" not in data  # no plain MD in this run directory
    for plot in ("profile_phi", "profile_psi", "fes_2d"):
        assert (folder / "plots" / f"{plot}.png").is_file()

    bad = ("umbrella={cvs: [{name: d, distance: [ALA2-CA, ALA2-XX], range_nm: [0.2, 0.4], spacing_nm: 0.05, "
           "k_kJ_per_mol_nm2: 1000}]}")
    assert cli.main(["md", "systems/alanine.yaml", "--umbrella", "--out", str(tmp_path), "--set", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "umbrella.cvs[0].distance[1]" in err and "ALA2-XX" in err
