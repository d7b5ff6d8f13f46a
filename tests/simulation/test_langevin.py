"""Tests for boltzgen.simulation.langevin on the 4-atom chain of tests/simulation/chain.py."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import mdtraj
import numpy as np
import pytest

from boltzgen.errors import DataFileError
from boltzgen.estimators.umbrella import umbrella_bias
from boltzgen.simulation.langevin import load_md, run_langevin
from boltzgen.simulation.umbrella import umbrella_bias_force
from boltzgen.trajectory import read_attributes, read_samples, read_topology
from boltzgen.units import kT_kJ_per_mol
from tests.simulation.chain import CHAIN, MD_KW, exact_mean_v, make_chain, openmm_energies, torsion, v_torsion


def test_langevin_h5_layout_topology_and_energies(tmp_path: Path) -> None:
    system, top, pos = make_chain()
    out = tmp_path / "md.h5"
    res = run_langevin(
        system, top, pos, steps=2000, report_every=50, seed=11, out_h5=out,
        record_dihedrals={"phi": CHAIN}, **{**MD_KW, "temperature_K": 600.0}, target_temperature_K=300.0,
    )
    assert res.n_frames == 40 and res.positions_nm.shape == (40, 4, 3) and res.positions_nm.dtype == np.float32
    assert res.energy_evaluations == 2000 and res.wall_seconds > 0
    np.testing.assert_allclose(res.time_ps, np.arange(1, 41) * 50 * 4.0 / 1000.0)

    topology = read_topology(out)
    assert [a.name for a in topology.atoms] == ["C0", "C1", "C2", "C3"]
    assert topology.n_bonds == 3 and topology.atom(0).element.symbol == "C"
    data = read_samples(out, ("reduced_energy",))
    np.testing.assert_array_equal(data["x"].reshape(40, 4, 3), res.positions_nm)
    assert data["reduced_energy"].shape == (40,)
    attrs = read_attributes(out)
    assert attrs["conventions"] == "Pande" and attrs["conventionVersion"] == "1.1"
    assert attrs["temperature_K"] == 600.0 and attrs["target_temperature_K"] == 300.0
    with h5py.File(out, "r") as f:  # mdtraj's own layout, as PyTables will read it
        assert f["coordinates"].dtype == np.float32 and f["coordinates"].attrs["units"] == "nanometers"
        assert f["topology"].shape == (1,) and f["topology"].dtype.kind == "S"
        assert f["potentialEnergy"].attrs["units"] == "kilojoules_per_mole"

    # Stored energies are OpenMM's energies of the stored frames, and reduced at the target T.
    np.testing.assert_allclose(res.potential_energy_kJ_mol, openmm_energies(system, res.positions_nm), atol=2e-3)
    np.testing.assert_allclose(res.reduced_energy, res.potential_energy_kJ_mol / kT_kJ_per_mol(300.0))
    # Recorded dihedrals are those of the stored frames, as mdtraj measures them.
    traj = mdtraj.Trajectory(res.positions_nm, topology)
    np.testing.assert_allclose(res.dihedrals_rad["phi"], mdtraj.compute_dihedrals(traj, [list(CHAIN)])[:, 0], atol=1e-5)
    np.testing.assert_allclose(res.dihedrals_rad["phi"], torsion(res.positions_nm))

    loaded = load_md(out)
    np.testing.assert_array_equal(loaded.positions_nm, res.positions_nm)
    np.testing.assert_array_equal(loaded.reduced_energy, res.reduced_energy)
    np.testing.assert_array_equal(loaded.dihedrals_rad["phi"], res.dihedrals_rad["phi"])
    np.testing.assert_array_equal(loaded.final_positions_nm, res.final_positions_nm)
    assert loaded.bias_energy_kJ_mol is None and loaded.positions_nm.dtype == np.float32
    assert loaded.temperature_K == 600.0 and loaded.target_temperature_K == 300.0
    # No temp files are left next to the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["md.h5"]


def test_load_md_refuses_other_files(tmp_path: Path) -> None:
    with pytest.raises(DataFileError):
        load_md(tmp_path / "missing.h5")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs["format"] = "something else"
    with pytest.raises(DataFileError, match="run_langevin"):
        load_md(other)


def test_mdtraj_load_opens_file_when_pytables_present(tmp_path: Path) -> None:
    pytest.importorskip("tables")
    system, top, pos = make_chain()
    out = tmp_path / "md.h5"
    res = run_langevin(system, top, pos, steps=500, report_every=50, seed=1, out_h5=out, **MD_KW)
    traj = mdtraj.load(str(out))
    assert traj.n_frames == 10 and traj.n_atoms == 4
    np.testing.assert_allclose(traj.xyz, res.positions_nm)


def test_seed_reproducible_and_distinct(tmp_path: Path) -> None:
    system, top, pos = make_chain()

    def run(seed: int, name: str):
        return run_langevin(system, top, pos, steps=400, report_every=40, seed=seed, out_h5=tmp_path / name, **MD_KW)

    a, b, c = run(5, "a.h5"), run(5, "b.h5"), run(6, "c.h5")
    np.testing.assert_array_equal(a.positions_nm, b.positions_nm)
    assert not np.allclose(a.positions_nm, c.positions_nm)


def test_invalid_arguments_are_refused(tmp_path: Path) -> None:
    system, top, pos = make_chain()
    kw = dict(seed=0, out_h5=tmp_path / "x.h5", **MD_KW)
    with pytest.raises(ValueError, match="multiple of report_every"):
        run_langevin(system, top, pos, steps=1000, report_every=300, **kw)
    with pytest.raises(ValueError, match="checkpoint_every"):
        run_langevin(system, top, pos, steps=1000, report_every=100, checkpoint_every=0, **kw)
    with pytest.raises(ValueError, match="positions_nm"):
        run_langevin(system, top, pos[:3], steps=1000, report_every=100, **kw)


def test_resume_after_interruption_matches_uninterrupted(tmp_path: Path) -> None:
    system, top, pos = make_chain()
    kw = dict(steps=2000, report_every=50, seed=3, **MD_KW)
    ref = run_langevin(system, top, pos, out_h5=tmp_path / "ref.h5", **kw)

    class Interrupt(Exception):
        pass

    def stop_at_17(done: int, total: int) -> None:
        if done == 17:
            raise Interrupt

    out, ckpt = tmp_path / "run.h5", tmp_path / "run.ckpt.h5"
    with pytest.raises(Interrupt):
        run_langevin(system, top, pos, out_h5=out, checkpoint=ckpt, checkpoint_every=7, on_frame=stop_at_17, **kw)
    assert not out.exists() and ckpt.exists()
    with h5py.File(ckpt, "r") as f:
        assert f["positions_nm"].shape[0] == 14 and f.attrs["step"] == 14 * 50

    seen: list[int] = []
    res = run_langevin(
        system, top, pos, out_h5=out, checkpoint=ckpt, checkpoint_every=7, resume=True,
        on_frame=lambda d, t: seen.append(d), **kw,
    )
    assert seen[0] == 15 and seen[-1] == 40  # continued from the checkpoint, not from scratch
    assert res.n_frames == 40 and load_md(out).n_frames == 40
    # Same frames, no gap, no duplicate: the continuation is bit-identical on Reference.
    np.testing.assert_array_equal(res.positions_nm, ref.positions_nm)
    np.testing.assert_array_equal(res.potential_energy_kJ_mol, ref.potential_energy_kJ_mol)
    np.testing.assert_array_equal(res.final_positions_nm, ref.final_positions_nm)
    np.testing.assert_allclose(res.potential_energy_kJ_mol, openmm_energies(system, res.positions_nm), atol=2e-3)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_extend_finished_run_and_refuse_foreign_checkpoint(tmp_path: Path) -> None:
    system, top, pos = make_chain()
    kw = dict(report_every=50, seed=4, **MD_KW)
    ref = run_langevin(system, top, pos, steps=2000, out_h5=tmp_path / "ref.h5", **kw)
    out, ckpt = tmp_path / "run.h5", tmp_path / "run.ckpt.h5"
    short = run_langevin(system, top, pos, steps=1000, out_h5=out, checkpoint=ckpt, **kw)
    assert short.n_frames == 20

    # Same run again: the finished file is returned without any MD.
    calls: list[int] = []
    again = run_langevin(
        system, top, pos, steps=1000, out_h5=out, checkpoint=ckpt, resume=True,
        on_frame=lambda d, t: calls.append(d), **kw,
    )
    assert calls == [] and again.wall_seconds == short.wall_seconds

    longer = run_langevin(system, top, pos, steps=2000, out_h5=out, checkpoint=ckpt, resume=True, **kw)
    assert longer.n_frames == 40
    np.testing.assert_array_equal(longer.positions_nm, ref.positions_nm)

    with pytest.raises(DataFileError, match="different run"):
        run_langevin(
            system, top, pos, steps=2000, out_h5=tmp_path / "x.h5", checkpoint=ckpt, resume=True,
            **{**kw, "seed": 99},
        )
    with pytest.raises(ValueError, match="beyond the requested"):
        run_langevin(system, top, pos, steps=1000, out_h5=tmp_path / "y.h5", checkpoint=ckpt, resume=True, **kw)


def test_bias_is_applied_but_excluded_from_stored_energy(tmp_path: Path) -> None:
    system, top, pos = make_chain()
    center, k = 3.0, 400.0  # near +pi, so the restrained torsion straddles the ±pi seam
    out = tmp_path / "b.h5"
    res = run_langevin(
        system, top, pos, steps=8000, report_every=40, seed=8, out_h5=out,
        bias=umbrella_bias_force(CHAIN, center, k), record_dihedrals={"phi": CHAIN}, **MD_KW,
    )
    phi = res.dihedrals_rad["phi"][20:]
    d = (phi - center + math.pi) % (2 * math.pi) - math.pi
    assert abs(d.mean()) < 0.1 and d.std() < 0.15  # the restraint holds phi near its centre
    assert (phi < 0).any()  # ... and frames cross the seam, exercising the minimum-image term
    # Stored potential is the unbiased system's energy; the bias energy matches the numpy formula.
    np.testing.assert_allclose(res.potential_energy_kJ_mol, openmm_energies(system, res.positions_nm), atol=2e-3)
    expected_bias = umbrella_bias(res.dihedrals_rad["phi"], np.array([center]), k)[0]
    np.testing.assert_allclose(res.bias_energy_kJ_mol, expected_bias, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(load_md(out).bias_energy_kJ_mol, res.bias_energy_kJ_mol)
    assert system.getNumForces() == 3  # the caller's system is untouched


def test_high_temperature_md_samples_its_own_temperature(tmp_path: Path) -> None:
    """Training MD at 600 K: the torsion energy average matches quadrature at 600 K, not 300 K."""
    system, top, pos = make_chain()
    res = run_langevin(
        system, top, pos, steps=200_000, report_every=20, seed=21, out_h5=tmp_path / "hot.h5",
        record_dihedrals={"phi": CHAIN}, **{**MD_KW, "temperature_K": 600.0}, target_temperature_K=300.0,
    )
    v = v_torsion(res.dihedrals_rad["phi"])
    blocks = v[: len(v) // 50 * 50].reshape(50, -1).mean(axis=1)
    se = blocks.std(ddof=1) / math.sqrt(len(blocks))
    hot, cold = exact_mean_v(600.0), exact_mean_v(300.0)
    assert abs(hot - cold) > 10 * se  # the check can tell the two temperatures apart
    assert abs(v.mean() - hot) < 4 * se + 0.02
