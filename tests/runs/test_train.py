"""`boltzgen train` end to end on the double well (tiny step counts), resume, errors, help, devices,
and the exact free energy of the Mueller-Brown config against an independent quadrature."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from boltzgen import cli
from boltzgen.config import load_config
from boltzgen.energies.analytic import MuellerBrown
from boltzgen.runs.chains import mcmc_job
from boltzgen.runs import train as train_module
from boltzgen.runs.rundir import RunDir
from boltzgen.runs.summaries import FreeEnergyRow, MDSummary
from boltzgen.runs.target import Target, build_target, load_run
from boltzgen.states import resolve_states
from boltzgen.trajectory import read_samples
from boltzgen.training import METRIC_FIELDS, Trainer

ROOT = Path(__file__).resolve().parents[2]
DOUBLE_WELL = ROOT / "systems" / "double_well.yaml"
MUELLER_BROWN = ROOT / "systems" / "mueller_brown.yaml"

# 30 + 20 training steps logged every 10 -> rows 10, ..., 50; small enough for a few seconds of CPU.
SMALL = [
    "--set", "training[0].steps=30", "--set", "training[1].steps=20",
    "--set", "training[0].batch=128", "--set", "training[1].batch=128",
    "--set", "flow.blocks=2", "--set", "flow.hidden=[16, 16]", "--set", "flow.bins=4",
    "--set", "sampling.n=20000", "--set", "sampling.n_bootstrap=50",
    "--set", "baseline.chains=256", "--set", "log_every=10", "--set", "device=cpu",
]
TOTAL_STEPS, LOG_EVERY = 50, 10


def train_args(out: Path, *extra: str, config: Path = DOUBLE_WELL) -> list[str]:
    return ["train", str(config), "--out", str(out), "--no-progress", *SMALL, *extra]


def metric_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One real CLI run shared by the tests below: (out_dir, exit code, stdout, stderr)."""
    import contextlib
    import io

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # as the per-test fixture does, so runs are comparable
    out = tmp_path_factory.mktemp("dw") / "run"
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli.main(train_args(out))
    finally:
        torch.set_default_dtype(previous)
    return out, code, stdout.getvalue(), stderr.getvalue()


def test_train_writes_every_output(finished_run):
    out, code, _, stderr = finished_run
    assert code == 0, stderr
    for name in ("config.yaml", "checkpoint.pt", "metrics.csv", "samples.h5", "summary.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    pngs = sorted((out / "plots").glob("*.png"))
    assert {p.name for p in pngs} >= {"training.png", "energy_histogram.png", "density.png"}
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000, png
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert leftovers == []


def test_resolved_config_is_written_and_reloads(finished_run):
    out, _, _, _ = finished_run
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["training"][0]["steps"] == 30 and written["training"][1]["steps"] == 20
    assert written["sampling"]["n"] == 20000 and written["baseline"]["chains"] == 256
    config, resolved = load_config(out / "config.yaml")
    assert resolved == written and config.total_steps == TOTAL_STEPS


def test_summary_json_contents(finished_run):
    out, _, _, _ = finished_run
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["ess"] <= 1.0
    assert summary["n_samples"] == 20000
    assert isinstance(summary["n_nonfinite"], int) and summary["n_nonfinite"] >= 0
    (row,) = summary["free_energies"]
    assert (row["from"], row["to"]) == ("A", "B")
    for key in ("delta_f_kT", "stderr_kT", "exact_kT"):
        assert math.isfinite(row[key]), key
    assert row["stderr_kT"] > 0
    assert abs(row["exact_kT"] - 3.38) < 0.05  # systems/double_well.yaml: "about 3.38 kT by quadrature"
    evaluations = summary["energy_evaluations"]
    assert evaluations["sampling"] == 20000
    assert evaluations["training"] > 0
    assert evaluations["total"] == evaluations["training"] + evaluations["sampling"]
    seconds = summary["energy_seconds"]
    assert 0 < seconds["training"] < summary["training_wall_seconds"]
    assert 0 < seconds["sampling"] < summary["sampling_wall_seconds"]
    assert seconds["total"] == pytest.approx(seconds["training"] + seconds["sampling"])
    assert summary["wall_seconds"] > 0
    assert summary["baseline"]["n_samples"] > 0 and summary["baseline"]["free_energies"][0]["exact_kT"] == row["exact_kT"]


def test_samples_h5_matches_summary(finished_run):
    out, _, _, _ = finished_run
    samples = read_samples(out / "samples.h5")
    assert samples["x"].shape == (20000, 2)
    for key in ("log_q", "u", "log_w"):
        assert samples[key].shape == (20000,)
    finite = np.isfinite(samples["u"]) & np.isfinite(samples["log_q"])
    np.testing.assert_allclose(samples["log_w"][finite], -samples["u"][finite] - samples["log_q"][finite], rtol=1e-12)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_nonfinite"] == int((~np.isfinite(samples["log_w"])).sum())


def test_metrics_csv_has_one_row_per_log_step(finished_run):
    out, _, _, _ = finished_run
    rows = metric_rows(out / "metrics.csv")
    assert list(rows[0]) == METRIC_FIELDS
    assert [int(r["step"]) for r in rows] == list(range(LOG_EVERY, TOTAL_STEPS + 1, LOG_EVERY))
    assert [int(r["stage"]) for r in rows] == [0, 0, 0, 1, 1]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == TOTAL_STEPS


def test_summary_table_is_printed(finished_run):
    out, _, stdout, _ = finished_run
    assert str(out) in stdout
    assert "ESS (Kish)" in stdout and "20,000 samples" in stdout
    assert "ΔF A→B" in stdout and "exact" in stdout
    assert "energy evals" in stdout and "wall time" in stdout


def test_existing_run_directory_is_refused(finished_run, capsys):
    out, _, _, _ = finished_run
    before = (out / "summary.json").read_bytes()
    assert cli.main(train_args(out)) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--resume" in err and "--force" in err and str(out) in err
    assert "Traceback" not in err
    assert (out / "summary.json").read_bytes() == before


def test_bad_config_value_names_file_and_path(tmp_path, capsys):
    raw = yaml.safe_load(DOUBLE_WELL.read_text())
    raw["training"][1]["lr"] = "fast"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert cli.main(["train", str(bad), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("\n") == 0, err
    assert str(bad) in err and "training[1].lr" in err and "fast" in err
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "run").exists()


def test_unknown_key_and_bad_override_exit_2(tmp_path, capsys):
    assert cli.main(train_args(tmp_path / "a", "--set", "training[0].stepz=5")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "training[0].stepz" in err and "unknown key" in err
    assert cli.main(train_args(tmp_path / "b", "--set", "training[5].steps=5")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "out of range" in err


def test_interrupted_run_resumes_to_the_same_result(finished_run, tmp_path, monkeypatch, capsys):
    """Ctrl-C during training (here from the metrics callback at step 40, in the mixed stage), then --resume."""
    reference, _, _, _ = finished_run
    original_run = Trainer.run

    def run_with_interrupt(self, resume=False, stop_after=None, on_log=None, on_start=None):
        def interrupt(row):
            if row["step"] == 40:
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: training stops at the step boundary
        return original_run(self, resume=resume, stop_after=stop_after, on_log=interrupt, on_start=on_start)

    out = tmp_path / "run"
    monkeypatch.setattr(Trainer, "run", run_with_interrupt)
    assert cli.main(train_args(out)) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "--resume" in err and "Traceback" not in err
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 40
    assert [int(r["step"]) for r in metric_rows(out / "metrics.csv")] == [10, 20, 30, 40]
    assert not (out / "summary.json").exists()
    monkeypatch.setattr(Trainer, "run", original_run)

    assert cli.main(train_args(out)) == 2  # the checkpoint marks it as a run: resume or force
    capsys.readouterr()
    assert cli.main(train_args(out, "--resume")) == 0, capsys.readouterr().err
    assert "ESS (Kish)" in capsys.readouterr().out
    rows = metric_rows(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(LOG_EVERY, TOTAL_STEPS + 1, LOG_EVERY))
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] == TOTAL_STEPS
    # Same seed, same data: the resumed run ends with the uninterrupted run's parameters exactly.
    ref_state = torch.load(reference / "checkpoint.pt", weights_only=False)
    assert ref_state["model"].keys() == state["model"].keys()
    for key, value in ref_state["model"].items():
        assert torch.equal(value, state["model"][key]), key
    ref_rows = metric_rows(reference / "metrics.csv")
    for row, ref in zip(rows, ref_rows):
        for key in ("loss", "forward_nll", "reverse_kl", "ess", "lr", "n_nonfinite", "energy_evaluations"):
            assert row[key] == ref[key], (row["step"], key)
    summary = json.loads((out / "summary.json").read_text())
    ref_summary = json.loads((reference / "summary.json").read_text())
    assert summary["energy_evaluations"] == ref_summary["energy_evaluations"]
    assert summary["free_energies"][0]["delta_f_kT"] == ref_summary["free_energies"][0]["delta_f_kT"]


# --- help -------------------------------------------------------------------------------------------

def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("train", "md", "check-energy", "Boltzmann", "systems/double_well.yaml"):
        assert word in out


def test_train_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("--out", "--set", "--resume", "--force", "--no-progress", "summary.json", "KEY=VALUE"):
        assert word in out


def test_no_command_is_a_one_line_usage_error(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "COMMAND" in err and "--help" in err


# --- devices ----------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_exits_2(tmp_path, capsys):
    assert cli.main(train_args(tmp_path / "run", "--set", "device=cuda")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cuda" in err and "Traceback" not in err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiny_train_on_cuda(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(train_args(out, "--set", "device=cuda")) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"].startswith("cuda")
    assert 0.0 <= summary["ess"] <= 1.0 and summary["n_samples"] == 20000
    assert math.isfinite(summary["free_energies"][0]["delta_f_kT"])
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] == TOTAL_STEPS


# --- Mueller-Brown: exact free energy -----------------------------------------------------------

_MB = {  # Mueller & Brown (1979), written out again here to be independent of the package
    "A": (-200.0, -100.0, -170.0, 15.0), "a": (-1.0, -1.0, -6.5, 0.7), "b": (0.0, 0.0, 11.0, 0.6),
    "c": (-10.0, -10.0, -6.5, 0.7), "x0": (1.0, 0.0, -0.5, -1.0), "y0": (0.0, 0.5, 1.5, 1.0),
}


def _mb_potential(x: float, y: float) -> float:
    total = 0.0
    for A, a, b, c, x0, y0 in zip(*_MB.values()):
        total += A * math.exp(a * (x - x0) ** 2 + b * (x - x0) * (y - y0) + c * (y - y0) ** 2)
    return total


def test_mueller_brown_config_states():
    config, _ = load_config(MUELLER_BROWN)
    assert config.name == "mueller_brown" and config.system.type == "mueller_brown" and config.system.beta == 0.1
    states = resolve_states(config.states)
    assert list(states) == ["A", "B"]
    points = {"deepest minimum": (-0.558, 1.442), "middle minimum": (0.623, 0.028),
              "shallow minimum": (-0.050, 0.467)}
    cvs = {"x0": np.array([p[0] for p in points.values()]), "x1": np.array([p[1] for p in points.values()])}
    np.testing.assert_array_equal(states["A"].evaluate(cvs), [True, False, False])
    np.testing.assert_array_equal(states["B"].evaluate(cvs), [False, True, True])
    # A and B partition the plane.
    rng = np.random.default_rng(0)
    grid = {"x0": rng.uniform(-2.5, 1.5, 100_000), "x1": rng.uniform(-1.5, 3.0, 100_000)}
    assert np.all(states["A"].evaluate(grid) ^ states["B"].evaluate(grid))
    # The boundary x1 = 1.175 x0 + 1.59 is lowest in energy at the saddle (-0.822, 0.624).
    t = np.linspace(-2.0, 1.0, 3001)
    v = [_mb_potential(x, 1.175 * x + 1.59) for x in t]
    assert abs(t[int(np.argmin(v))] - (-0.822)) < 0.01
    assert abs(min(v) - (-40.665)) < 0.01


def test_mueller_brown_exact_free_energy_matches_independent_quadrature():
    from scipy.integrate import dblquad

    config, _ = load_config(MUELLER_BROWN)
    target = build_target(config)
    assert isinstance(target.energy, MuellerBrown)
    ((pair, exact),) = target.exact_free_energies().items()
    assert pair == ("A", "B")

    beta, shift = config.system.beta, -146.7  # exp(-beta (V - V_min)) keeps the integrand O(1)
    slope, intercept = 1.175, 1.59  # the dividing line of systems/mueller_brown.yaml

    def density(y, x):
        return math.exp(-beta * (_mb_potential(x, y) - shift))

    # A wider box than the package's, and adaptive quadrature split exactly along the dividing line.
    lo0, hi0, lo1, hi1 = -3.0, 2.0, -2.5, 4.0
    line = lambda x: min(max(slope * x + intercept, lo1), hi1)  # noqa: E731
    p_a, _ = dblquad(density, lo0, hi0, line, lambda x: hi1, epsabs=0, epsrel=1e-7)
    p_b, _ = dblquad(density, lo0, hi0, lambda x: lo1, line, epsabs=0, epsrel=1e-7)
    independent = -math.log(p_b / p_a)
    assert abs(exact - independent) < 1e-3, (exact, independent)
    assert 3.0 < exact < 4.5


def test_float32_run_keeps_the_energy_in_float64(tmp_path, monkeypatch):
    """Energies are float64 whatever the flow's dtype: a float32 flow must not round them."""
    captured = {}

    def capture(generator, *args, **kwargs):
        captured.update({name: value.clone() for name, value in generator.energy.named_buffers()})
        raise KeyboardInterrupt  # nothing after training is needed here

    monkeypatch.setattr(train_module, "draw_samples_distributed", capture)
    args = train_args(tmp_path / "run", "--set", "dtype=float32", "--set", "baseline.steps=50",
                      "--set", "baseline.warmup=10", "--set", "training[0].steps=2", "--set", "training[1].steps=2",
                      config=MUELLER_BROWN)
    assert cli.main(args) == cli.EXIT_INTERRUPTED
    reference = dict(MuellerBrown(beta=0.1).named_buffers())
    assert captured.keys() == reference.keys()
    for name, value in reference.items():
        assert captured[name].dtype == torch.float64
        assert torch.equal(captured[name], value), (name, captured[name], value)


# --- molecules -----------------------------------------------------------------------------------

ALANINE = Path(__file__).resolve().parents[2] / "systems" / "alanine.yaml"
TINY_MOLECULE = [
    "--set", "md.steps=2000", "--set", "md.report_every=20", "--set", "md.seed_states=false",
    "--set", "flow.blocks=2", "--set", "flow.hidden=[16]",
    "--set", "training[0].steps=10", "--set", "training[0].batch=32",
    "--set", "training[1]={loss: reweighted_forward_kl, steps: 4, batch: 32, reweighting: {samples: 256}}",
    "--set", "log_every=2", "--set", "checkpoint_every=5",
    "--set", "sampling.n=300", "--set", "sampling.batch=128",
]


@pytest.fixture(scope="module")
def alanine_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("alanine")
    assert cli.main(["train", str(ALANINE), "--out", str(out), "--no-progress", *TINY_MOLECULE]) == 0
    return out


def test_molecular_train_writes_mdtraj_readable_files(alanine_run):
    import mdtraj

    for name in ("samples.h5", "md/md.h5"):
        traj = mdtraj.load(str(alanine_run / name))
        assert traj.n_atoms == 22 and traj.topology.n_residues == 3
    assert mdtraj.load(str(alanine_run / "samples.h5")).n_frames == 300
    assert mdtraj.load(str(alanine_run / "md/md.h5")).n_frames == 100
    for plot in ("ramachandran.png", "phi_profile.png", "energy_histogram.png", "training.png"):
        assert (alanine_run / "plots" / plot).stat().st_size > 0


def test_reloaded_run_keeps_the_torsion_layout_and_its_densities(alanine_run):
    """The coordinates fitted to the data make rigid torsions Gaussian; a reloaded run (fitted to no
    data) must rebuild that layout from the checkpoint, or its densities would silently differ."""
    run = load_run(RunDir(alanine_run))
    coordinates = run.generator.flow.layers[-1]
    torsions = run.generator.prior.circular[coordinates.n_bonds + coordinates.n_angles:]
    assert not bool(torsions.all())
    assert torch.equal(coordinates.circular_mask, run.generator.prior.circular)
    saved = read_samples(alanine_run / "samples.h5", ("log_q",))
    x = torch.as_tensor(saved["x"][:64], dtype=torch.float32)
    with torch.no_grad():
        log_q = run.generator.log_prob(x).double().numpy()
    np.testing.assert_allclose(log_q, saved["log_q"][:64], atol=2e-3, rtol=0)


@pytest.fixture(scope="module")
def circular_alanine_run(tmp_path_factory):
    """The tiny run with every torsion circular, the improper that fixes CA's chirality included:
    the barely trained flow then draws mirror images."""
    out = tmp_path_factory.mktemp("alanine_circular")
    assert cli.main(["train", str(ALANINE), "--out", str(out), "--no-progress", *TINY_MOLECULE,
                     "--set", "coordinates.rigid_torsions=false"]) == 0
    return out


def test_a_run_resumes_with_the_torsion_layout_of_its_checkpoint(circular_alanine_run, tmp_path):
    """A run whose checkpoint has every torsion circular (as before rigid torsions existed) resumes
    under the default config: the checkpoint's layout wins over the data's classification."""
    import shutil

    out = tmp_path / "old"
    shutil.copytree(circular_alanine_run, out)
    (out / "summary.json").unlink()
    assert cli.main(["train", str(ALANINE), "--out", str(out), "--no-progress", "--resume", *TINY_MOLECULE]) == 0
    run = load_run(RunDir(out))
    assert bool(run.generator.prior.circular[-(run.target.topology.n_atoms - 3):].all())


def test_molecular_summary_counts_chirality_and_reports_md(alanine_run, circular_alanine_run):
    # A rigid improper holds CA's chirality within a few of its 0.08 rad standard deviations (the
    # mirror image is ~50 away), even untrained; circular splines from a uniform prior do not.
    assert json.loads((alanine_run / "summary.json").read_text())["n_wrong_chirality"] == 0
    summary = json.loads((circular_alanine_run / "summary.json").read_text())
    assert summary["n_samples"] == 300
    assert 0 < summary["n_wrong_chirality"] <= 300
    # rejected wrong-chirality samples are weight 0, so they are among the non-finite weights
    assert summary["n_nonfinite"] >= summary["n_wrong_chirality"]
    row = summary["baseline"]["free_energies"][0]
    assert (row["from"], row["to"]) == ("A", "B")
    # 2000 steps of MD at 300 K cannot enter the C7ax basin: the baseline must say B is empty
    assert row.get("empty_state") == "B" and row["delta_f_kT"] is None  # strict JSON: inf is null
    assert summary["baseline"]["energy_evaluations"] == 2000


def test_md_command_reuses_the_cached_trajectory(alanine_run, capsys):
    before = (alanine_run / "md" / "md.h5").stat().st_mtime_ns
    assert cli.main(["md", str(ALANINE), "--out", str(alanine_run), "--no-progress", *TINY_MOLECULE]) == 0
    assert (alanine_run / "md" / "md.h5").stat().st_mtime_ns == before
    summary = json.loads((alanine_run / "md" / "summary.json").read_text())
    assert summary["method"] == "md" and summary["ess"] == pytest.approx(1.0) and summary["n_samples"] == 100
    assert "run directory" in capsys.readouterr().out


def test_check_energy_command_passes_on_alanine(capsys):
    assert cli.main(["check-energy", str(ALANINE), "--n", "3"]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out
    # Both CPU code paths are checked (the C kernel where it builds, else the reason it does not).
    assert "eager torch" in out and "C kernel" in out


def test_check_energy_fails_beyond_tolerance(monkeypatch, capsys):
    """A force field that disagrees with OpenMM (a bond stiffness changed in the torch copy only) fails."""
    import dataclasses

    from boltzgen.energies import torchff

    original = torchff.read_system

    def stiffer_bonds(system):
        parameters = original(system)
        return dataclasses.replace(parameters, bonds=dataclasses.replace(parameters.bonds, k=parameters.bonds.k * 1.01))

    monkeypatch.setattr(torchff, "read_system", stiffer_bonds)
    assert cli.main(["check-energy", str(ALANINE), "--n", "2"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_untemplated_residue_is_one_line(tmp_path, capsys):
    pdb = (ALANINE.parent / "alanine-dipeptide.pdb").read_text().replace("ALA", "ALX")
    (tmp_path / "bad.pdb").write_text(pdb)
    config = yaml.safe_load(ALANINE.read_text())
    config["system"]["pdb"] = str(tmp_path / "bad.pdb")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["check-energy", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "ALX" in err and "bad.pdb" in err


def test_mcmc_on_a_molecule_keeps_the_l_form(circular_alanine_run):
    """The target is L-alanine: an IMH proposal of the mirror image (which a barely trained flow
    with circular torsions makes often) has u = inf and is rejected, so every kept state is L."""
    from boltzgen.geometry import is_l_chirality

    out = circular_alanine_run / "mcmc_chirality"
    summary = mcmc_job(RunDir(circular_alanine_run), chains=16, steps=20, warmup=5, moves="imh", out_dir=out,
                       progress=False)
    x = torch.as_tensor(read_samples(out / "chains.h5")["x"])
    assert bool(is_l_chirality(x, load_run(RunDir(circular_alanine_run)).target.topology).all())
    assert summary.n_nonfinite > 0  # mirror-image proposals were made, and rejected


def test_summary_says_why_a_free_energy_is_missing(capsys):
    """Plain MD that never reaches a state has no ΔF: the summary says so instead of '+inf ± nan'."""
    missing = FreeEnergyRow(from_="A", to="B", delta_f_kT=math.inf, stderr_kT=math.nan, empty_state="B")
    summary = MDSummary(name="x", source="MD 300 K", ess=1.0, n_samples=10, n_nonfinite=0, free_energies=[missing],
                        tau_int_frames={}, energy_evaluations={"md": 10, "total": 10}, md_wall_seconds=1.0,
                        wall_seconds=1.0)
    cli._print_summary(summary, Path("runs/x"))
    out = capsys.readouterr().out
    assert "ΔF A→B" in out and "not estimable: no samples in B" in out
    assert "inf" not in out and "nan" not in out


@pytest.mark.parametrize(("states", "expected"), [
    ({"A": "not B", "B": "0 < phi1 < 2.2"}, ("phi1", "psi1")),  # tetra-alanine: the central residue
    ({"A": "phi < 0", "B": "phi > 0"}, ("phi", "psi")),
    ({"A": "x0 < 0", "B": "x0 > 0"}, ("phi", "psi")),
])
def test_plots_show_the_residue_the_states_are_defined_on(states, expected):
    assert Target(None, resolve_states(states), torsions={}).plotted_torsions() == expected


@pytest.mark.parametrize("symmetrize", [True, False])
def test_alanine_training_batches_relabel_its_three_methyls(symmetrize):
    config, _ = load_config(ALANINE)
    config = config.model_copy(update={"md": config.md.model_copy(update={"symmetrize_rotors": symmetrize})})
    target = build_target(config)
    x = torch.as_tensor(target.molecule.positions_nm).reshape(1, -1).repeat(600, 1)
    augment = train_module._rotor_relabelling(config, target, x, torch.device("cpu"))
    if not symmetrize:
        assert augment is None
        return
    changed = (augment(x) != x).reshape(600, -1, 3).any(-1)
    assert sorted(np.flatnonzero(changed.any(0).numpy()).tolist()) == [1, 2, 3, 11, 12, 13, 19, 20, 21]
    # Two of the three shifts move a rotor: ~400 of 600 rows, independently per rotor.
    per_rotor = changed[:, [1, 11, 19]].sum(0)
    assert ((per_rotor > 340) & (per_rotor < 460)).all(), per_rotor
    assert 0 < int((changed[:, 1] != changed[:, 11]).sum()) < 600
