"""Tests for `boltzgen md --remd` (boltzgen.runs.remd) and the MD baselines on the Mueller-Brown particle."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mdtraj
import numpy as np
import pytest
import yaml

from boltzgen import cli
from boltzgen.config import load_config
from boltzgen.energies.openmm import build_system
from boltzgen.geometry import dihedrals_rad
from boltzgen.runs.remd import _analyse, omega_torsions
from boltzgen.runs.rundir import RunDir
from boltzgen.runs.summaries import MDSummary, RemdSummary
from boltzgen.runs.target import build_target
from boltzgen.simulation.remd import RemdResult
from boltzgen.trajectory import read_samples
from tests.helpers import ROOT, one_line

PARTICLE = ROOT / "systems" / "mueller_brown_particle.yaml"
ALANINE = ROOT / "systems" / "alanine.yaml"
SHORT_REMD = ["--set", "remd.iterations=60", "--set", "remd.equilibration_iterations=10", "--set", "remd.n_blocks=5",
              "--set", "remd.steps_per_exchange=100", "--set", "remd.checkpoint_every=20", "--no-progress"]


def test_remd_on_the_particle_writes_summary_samples_and_plots(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert cli.main(["md", str(PARTICLE), "--remd", "--out", str(run), *SHORT_REMD]) == 0
    out = capsys.readouterr().out
    assert "round trips" in out and "acceptance" in out and "exact +3.6383" in out
    summary = RemdSummary.read(RunDir(run).remd.summary)
    assert summary.method == "remd" and summary.engine.startswith("openmmtools")
    assert len(summary.temperatures_K) == 6 and summary.temperatures_K[0] == 300.0
    assert len(summary.pair_acceptance) == 5 and all(0 <= a <= 1 for a in summary.pair_acceptance)
    assert len(summary.round_trips) == 6 and summary.round_trips_total == sum(summary.round_trips)
    assert summary.cis_fraction is None and summary.n_samples == 50 * 6 and summary.block_iterations == 10
    assert "cis_fraction" not in json.loads(RunDir(run).remd.summary.read_text())  # no peptide bond: no key
    row = summary.free_energies[0]
    assert (row.from_, row.to) == ("A", "B") and row.exact_kT == pytest.approx(3.638, abs=1e-3)
    assert math.isfinite(row.delta_f_kT) and row.stderr_kT > 0
    assert summary.energy_evaluations["total"] == 60 * 6 * 101 + 6
    data = read_samples(run / summary.samples_file, ("log_w", "u", "temperature_K", "replica", "iteration", "cis"))
    assert data["x"].shape == (300, 3) and np.exp(data["log_w"]).sum() == pytest.approx(1.0)
    assert set(np.unique(data["temperature_K"])) == set(summary.temperatures_K)
    assert data["iteration"].min() == 11 and data["iteration"].max() == 60
    for plot in ("remd_mixing", "fes"):
        assert RunDir(run).remd.plot(plot).exists()
    # An identical second call reuses the storage: no new simulation.
    assert cli.main(["md", str(PARTICLE), "--remd", "--out", str(run), *SHORT_REMD]) == 0
    assert RemdSummary.read(RunDir(run).remd.summary).remd_wall_seconds == summary.remd_wall_seconds


def test_plain_md_on_the_particle_reports_the_exact_answer(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    argv = ["md", str(PARTICLE), "--out", str(run), "--set", "md.steps=20000", "--no-progress"]
    assert cli.main(argv) == 0
    summary = MDSummary.read(RunDir(run).md.summary)
    assert summary.n_samples == 200 and set(summary.tau_int_frames) == {"x0", "x1"}
    assert summary.free_energies[0].exact_kT == pytest.approx(3.638, abs=1e-3)
    assert RunDir(run).md.plot("fes").exists()


def test_remd_on_alanine_reports_the_cis_fraction(tmp_path: Path) -> None:
    config, resolved = load_config(ALANINE, ["remd.iterations=8", "remd.equilibration_iterations=0",
                                             "remd.n_blocks=2", "remd.steps_per_exchange=20", "remd.n_replicas=2",
                                             "remd.max_temperature_K=330"])
    from boltzgen.runs.remd import remd_job

    summary = remd_job(config, resolved, RunDir(tmp_path / "run"), progress=False)
    assert summary.cis_fraction == 0.0 and summary.n_cis_frames == 0 and not summary.keep_cis
    assert summary.cis_fraction_by_temperature == [0.0, 0.0] and summary.n_samples == 16
    assert RunDir(tmp_path / "run").remd.plot("ramachandran").exists()
    traj = mdtraj.load(str(RunDir(tmp_path / "run").remd.samples))
    assert traj.n_frames == 16 and traj.n_atoms == 22


def _cis(positions: np.ndarray, quad: np.ndarray) -> np.ndarray:
    """``positions`` ``[n_atoms, 3]`` with the atoms on the C side of the peptide bond ``quad`` (the ACE
    cap) turned by pi about the C-N axis: omega flips from trans to cis."""
    c, n = positions[quad[1]], positions[quad[2]]
    axis = (n - c) / np.linalg.norm(n - c)
    out = positions.copy()
    for atom in range(quad[1]):  # the ACE atoms precede its C in the PDB
        v = positions[atom] - c
        out[atom] = c + 2 * np.dot(v, axis) * axis - v  # a rotation by pi about the axis
    return out


def test_omega_torsions_and_cis_frames_are_left_out() -> None:
    molecule = build_system(ALANINE.parent / "alanine-dipeptide.pdb", ["amber14-all.xml"], 300.0)
    quads = omega_torsions(molecule.mdtraj_topology)
    names = [[molecule.mdtraj_topology.atom(int(i)).name for i in quad] for quad in quads]
    assert names == [["CH3", "C", "N", "CA"], ["CA", "C", "N", "C"]]
    trans = molecule.positions_nm
    cis = _cis(trans, quads[0])
    omega = dihedrals_rad(np.stack([trans, cis]), [tuple(q) for q in quads])
    assert abs(omega[0, 0]) > 2.5 and abs(omega[1, 0]) < 0.6 and abs(omega[1, 1]) > 2.5

    config, _ = load_config(ALANINE, ["remd.iterations=40", "remd.equilibration_iterations=0", "remd.n_blocks=4",
                                      "remd.n_replicas=2", "remd.max_temperature_K=330"])
    target = build_target(config)
    rng = np.random.default_rng(0)
    positions = np.repeat(trans[None, None], 40, axis=0).repeat(2, axis=1)
    positions = positions + rng.normal(scale=0.002, size=positions.shape)
    positions[20:, 1] = cis
    reduced = rng.normal(size=(40, 2, 1)) + np.array([0.0, -1.0])
    result = RemdResult(temperatures_K=np.array([300.0, 330.0]), reduced_potentials=reduced,
                        states=np.tile([0, 1], (40, 1)), positions_nm=positions.astype(np.float32),
                        n_accepted=np.zeros((2, 2)), n_proposed=np.zeros((2, 2)), steps_per_exchange=1,
                        energy_evaluations=0, wall_seconds=0.0, storage=Path("x"))
    analysis = _analyse(config, target, result, 0)
    assert analysis.cis is not None and analysis.cis.mean() == 0.25 and analysis.cis[20:, 1].all()
    assert np.all(np.isneginf(analysis.estimate.log_w[analysis.cis]))
    kept = _analyse(load_config(ALANINE, ["remd.iterations=40", "remd.equilibration_iterations=0", "remd.n_blocks=4",
                                          "remd.n_replicas=2", "remd.max_temperature_K=330",
                                          "remd.keep_cis=true"])[0], target, result, 0)
    assert np.isfinite(kept.estimate.log_w).all()


@pytest.mark.parametrize(("override", "message"), [
    ("remd.temperatures_K=[310,400,500]", "does not include the target temperature 300 K"),
    ("remd.min_temperature_K=310", "does not include the target temperature 300 K"),
    ("remd.temperatures_K=[300,500,400]", "must increase strictly"),
    ("remd.temperatures_K=[300]", "at least 2 items"),
    ("remd.n_replicas=1", "greater than or equal to 2"),
    ("remd.max_temperature_K=250", "must exceed the target temperature 300 K"),
    ("remd.iterations=10", "must be at least n_blocks"),
    ("remd.keep_cis=3", "valid boolean"),
    ("remd.ladder=[1]", "unknown key"),
])
def test_bad_replica_settings_are_one_line(tmp_path: Path, capsys, override: str, message: str) -> None:
    err = one_line(["md", str(_default_remd(tmp_path)), "--remd", "--set", override], capsys)
    assert message in err and "remd" in err


def _default_remd(tmp_path: Path) -> Path:
    """The particle's config with the default ``remd:`` section (no ladder keys of its own)."""
    config = yaml.safe_load(PARTICLE.read_text())
    del config["remd"]
    path = tmp_path / "particle.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_default_ladder_is_checked_only_when_replica_exchange_runs(tmp_path: Path, capsys) -> None:
    """A system at 700 K loads with the default ``remd:`` (up to 600 K); `md --remd` then refuses it."""
    path = _default_remd(tmp_path)
    config, _ = load_config(path, ["system.temperature_K=700"])
    assert config.remd.max_temperature_K == 600.0
    err = one_line(["md", str(path), "--remd", "--set", "system.temperature_K=700", "--out", str(tmp_path / "r")],
                   capsys)
    assert "remd.max_temperature_K: 600 K must exceed the target temperature 700 K" in err


def test_both_list_and_geometric_ladder_is_refused(capsys) -> None:
    err = one_line(["md", str(PARTICLE), "--remd", "--set", "remd.temperatures_K=[300,400]"], capsys)
    assert "either temperatures_K or max_temperature_K, min_temperature_K, n_replicas" in err


def test_remd_needs_an_openmm_system_and_one_baseline(tmp_path: Path, capsys) -> None:
    err = one_line(["md", str(ROOT / "systems" / "double_well.yaml"), "--remd", "--out", str(tmp_path)], capsys)
    assert "needs an OpenMM system" in err
    err = one_line(["md", str(PARTICLE), "--remd", "--umbrella"], capsys)
    assert "--umbrella and --remd" in err


@pytest.mark.slow
def test_md_and_remd_on_the_particle_agree_with_quadrature(tmp_path: Path) -> None:
    """The real check: plain MD (10^8 steps) and REMD (the config's ladder) each within 3 of their
    standard errors of the exact ΔF (about 1 and 1.5 minutes of CPU)."""
    for argv, folder in ((["md", str(PARTICLE)], "md"), (["md", str(PARTICLE), "--remd"], "remd")):
        assert cli.main([*argv, "--out", str(tmp_path / "run"), "--no-progress"]) == 0
        row = json.loads((tmp_path / "run" / folder / "summary.json").read_text())["free_energies"][0]
        assert abs(row["delta_f_kT"] - row["exact_kT"]) < 3 * row["stderr_kT"], (folder, row)
        assert row["stderr_kT"] < 0.3, (folder, row)  # measured: MD 0.175, REMD 0.035
