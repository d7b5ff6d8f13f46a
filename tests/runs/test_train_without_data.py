"""`boltzgen train` without data: FAB and annealing stages on the benchmark systems and a molecule,
log Z in the summaries, the diagnostics table and plot, and no MD for a molecule that needs none."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from boltzgen import cli
from boltzgen.runs.rundir import RunDir
from boltzgen.runs.sample import sample_job

ROOT = Path(__file__).resolve().parents[2]
TINY_FAB = "training=[{loss: fab, steps: 12, batch: 64, fab: {ais: {intermediate: 1, leapfrog: 2}, " \
           "replay: {size: 1024, min_size: 256, updates: 4}}}]"
TINY = ["--set", "flow.hidden=[8]", "--set", "sampling.n=3000", "--set", "sampling.batch=3000",
        "--set", "sampling.n_bootstrap=20", "--set", "baseline.chains=64", "--set", "baseline.steps=20",
        "--set", "baseline.warmup=5", "--set", "baseline.thin=5", "--set", "log_every=4", "--set", "device=cpu"]


def run_cli(config: str, out: Path, *extra: str) -> dict:
    assert cli.main(["train", str(ROOT / "systems" / config), "--out", str(out), "--no-progress", *TINY, *extra]) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def many_well_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("many_well") / "run"
    return out, run_cli("many_well.yaml", out, "--set", TINY_FAB)


def test_fab_run_reports_log_z_against_the_exact_value(many_well_run, capsys):
    out, summary = many_well_run
    log_z = summary["log_z"]
    assert set(log_z) == {"estimate", "stderr", "exact", "relative"} and log_z["relative"] is False
    assert log_z["exact"] == pytest.approx(164.6957, abs=1e-4) and math.isfinite(log_z["estimate"])
    (row,) = summary["free_energies"]
    assert row["exact_kT"] == pytest.approx(-1.6906, abs=1e-3)  # x0 < 0 -> x0 > 0, by quadrature of (x0, x1)
    # AIS evaluations are counted as everywhere: 64 x (1 + 1 x 2) per AIS batch; 4 batches fill the
    # buffer to 256 at step 0, and the rounds of 4 updates at steps 4 and 8 add one each
    evaluations = summary["energy_evaluations"]
    assert evaluations["training"] == (4 + 1 + 1) * 64 * (1 + 1 * 2)
    assert summary["baseline"]["source"] == "baseline MALA"  # an analytic system keeps its cheap baseline


def test_fab_run_writes_its_diagnostics(many_well_run):
    out, _ = many_well_run
    with open(out / "diagnostics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [4, 8, 12]
    for key in ("ais_ess", "ais_flow_ess", "ais_accept_0", "ais_step_size_0", "buffer_size", "buffer_ess",
                "buffer_w_adjust_max", "ais_flow_log_z"):
        assert all(math.isfinite(float(r[key])) for r in rows), key
    assert (out / "plots" / "diagnostics.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def gmm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gmm") / "run"
    stage = ("training=[{loss: annealing, steps: 12, batch: 64, annealing: {temperatures: [20.0, 4.0, 1.0], "
             "hot_fraction: 0.5, samples: 500}}]")
    return out, run_cli("gmm.yaml", out, "--set", stage, "--set", "flow.blocks=2")


def test_annealing_run_on_the_gmm(gmm_run):
    out, summary = gmm_run
    assert summary["log_z"]["exact"] == 0.0
    assert summary["free_energies"][0]["exact_kT"] == pytest.approx(-0.2643, abs=1e-3)
    with open(out / "diagnostics.csv", newline="") as f:
        temperatures = [float(r["temperature"]) for r in csv.DictReader(f)]
    assert temperatures == [20.0, 4.0, 1.0]


def test_sample_summary_reports_log_z(gmm_run):
    out, _ = gmm_run
    summary = sample_job(RunDir(out), n=2000, progress=False)
    assert summary.log_z is not None and summary.log_z.exact == 0.0
    assert json.loads((out / "sample_summary.json").read_text())["log_z"]["relative"] is False


@pytest.mark.skipif(not (ROOT / "systems" / "alanine-dipeptide.pdb").exists(), reason="no alanine PDB")
def test_a_molecule_trained_without_data_runs_no_md(tmp_path):
    out = tmp_path / "run"
    summary = run_cli("alanine_implicit.yaml", out, "--set", TINY_FAB, "--set", "flow.blocks=2",
                      "--set", "sampling.n=200", "--set", "sampling.batch=200")
    assert not (out / "md").exists() and "baseline" not in summary
    assert summary["log_z"]["relative"] is True and "exact" not in summary["log_z"]
    assert (out / "plots" / "ramachandran.png").exists() and (out / "diagnostics.csv").exists()


@pytest.mark.skipif(not (ROOT / "systems" / "alanine-dipeptide.pdb").exists(), reason="no alanine PDB")
def test_without_data_the_energy_decides_which_torsions_are_free():
    """From the minimized structure alone: phi, psi and the three methyl rotors are free; the amides,
    the improper that fixes CA's chirality and every sibling hydrogen are rigid."""
    from boltzgen.config import load_config
    from boltzgen.runs.target import build_coordinates, build_target, reference_structure

    config, _ = load_config(ROOT / "systems" / "alanine_implicit_nodata.yaml")
    target = build_target(config)
    coordinates = build_coordinates(config, target, reference_structure(target))
    names = [f"{a.residue.name}-{a.name}" for a in target.topology.atoms]
    rows = coordinates.zmatrix[3:].tolist()
    free = coordinates.circular_mask[coordinates.n_bonds + coordinates.n_angles:]
    bonds = {frozenset((names[j], names[k])) for (_, j, k, _), f in zip(rows, free.tolist()) if f}
    assert bonds == {frozenset(b) for b in [("ALA-N", "ALA-CA"), ("ALA-CA", "ALA-C"), ("ACE-CH3", "ACE-C"),
                                            ("ALA-CB", "ALA-CA"), ("NME-C", "NME-N")]}
    # Five rows turn about those bonds (one each): the rest, 14 of 19, are rigid.
    assert int(free.sum()) == 5
    assert bool((coordinates.standardization.scale[coordinates.n_bonds + coordinates.n_angles:][~free] < 0.26).all())
    assert not build_coordinates(config.model_copy(update={"coordinates": config.coordinates.model_copy(
        update={"rigid_torsions": False})}), target, reference_structure(target)).circular_mask.logical_not()[
        coordinates.n_bonds + coordinates.n_angles:].any()
