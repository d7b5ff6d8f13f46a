"""`boltzgen sample` on a tiny trained double-well run: streaming, weights, free energies at other T."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import integrate

from boltzgen import cli
from boltzgen.energies.analytic import DoubleWell
from tests.helpers import train_tiny_double_well
from boltzgen.generator import BoltzmannGenerator
from boltzgen.runs import sample
from boltzgen.runs.rundir import RunDir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train_tiny_double_well(tmp_path_factory.mktemp("dw") / "run")


def exact_p_right() -> float:
    return DoubleWell().quadrature_probabilities({"B": lambda cvs: cvs["x0"] > 0})["B"]

# --- sample ------------------------------------------------------------------------------------------

def test_sample_streams_n_samples_in_batches(run_dir, tmp_path, monkeypatch):
    sizes: list[int] = []
    original = BoltzmannGenerator.sample

    def spy(self, n, batch_size=65536):
        sizes.append(n)
        return original(self, n, batch_size=batch_size)

    monkeypatch.setattr(BoltzmannGenerator, "sample", spy)
    out = tmp_path / "s.h5"
    summary = sample.sample_job(RunDir(run_dir), n=3000, batch=700, out=out, progress=False).to_json()
    assert sum(sizes) == 3000 and max(sizes) <= 700 and len(sizes) == 5
    with h5py.File(out, "r") as f:
        assert f["positions"].shape == (3000, 2)
        for name in ("log_q", "u", "log_w"):
            assert f[name].shape == (3000,)
        np.testing.assert_allclose(f["log_w"][()], -f["u"][()] - f["log_q"][()])
    on_disk = json.loads((run_dir / "sample_summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("ess", "n_samples", "n_nonfinite", "max_normalized_weight", "pareto_khat", "weights_reliable",
                "ess_per_observable", "free_energies", "fes", "energy_evaluations", "wall_seconds"):
        assert key in summary, key
    assert summary["n_samples"] == 3000 and summary["energy_evaluations"]["total"] == 3000
    assert 0 < summary["ess"] <= 1 and 0 < summary["max_normalized_weight"] <= 1
    assert set(summary["ess_per_observable"]) == {"x0", "x1", "state:A", "state:B"}
    row = summary["free_energies"][0]
    assert (row["from"], row["to"]) == ("A", "B") and row["stderr_kT"] > 0 and "exact_kT" in row
    for name in ("x0", "x1", "x0,x1"):
        fes = summary["fes"][name]
        assert len(fes["f_kT"]) == len(fes["stderr_kT"]) == sample.FES_BINS_1D
        assert min(v for v in np.ravel(np.array(fes["f_kT"], dtype=float)) if np.isfinite(v)) == 0.0
    for png in ("sample_fes_x0.png", "sample_fes_x1.png", "sample_fes_x0_x1.png", "sample_fes.json"):
        assert (run_dir / "plots" / png).is_file()


def test_sample_weights_option_and_khat_warning(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sample, "pareto_khat", lambda log_w: 0.93)
    rc = cli.main(["sample", str(run_dir), "--n", "2000", "--batch", "1000", "--weights", "psis",
                   "--out", str(tmp_path / "s.h5"), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0
    warning = [line for line in captured.err.splitlines() if line.startswith("WARNING")]
    assert len(warning) == 1 and "0.93" in warning[0]
    summary = json.loads((run_dir / "sample_summary.json").read_text())
    assert summary["weights"] == "psis" and "ess_raw" in summary and summary["weights_reliable"] is False


def double_well_ln_z(tau: float) -> float:
    """ln ∫ exp(-u(x)/tau) dx of the default double well; u = x0^4 - 6 x0^2 + x0 + x1^2/2 factorizes."""
    z0, _ = integrate.quad(lambda x: math.exp(-(x**4 - 6.0 * x**2 + x) / tau), -np.inf, np.inf, epsabs=0, epsrel=1e-12)
    return math.log(z0) + 0.5 * math.log(2.0 * math.pi * tau)


def test_sample_temperatures_mbar_matches_quadrature(run_dir, tmp_path, capsys):
    rc = cli.main(["sample", str(run_dir), "--n", "20000", "--batch", "10000", "--temperatures", "1.0,1.5",
                   "--out", str(tmp_path / "s.h5"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = json.loads((run_dir / "sample_summary.json").read_text())["thermodynamic_free_energies"]
    assert [row["temperature_ratio"] for row in rows] == [1.0, 1.5]
    assert rows[0]["delta_f_kT"] == 0.0 and rows[0]["stderr_kT"] == 0.0
    row = rows[1]
    exact = -(double_well_ln_z(1.5) - double_well_ln_z(1.0))
    assert 0 < row["stderr_kT"] < 0.05 and 0 < row["n_eff"] <= 20000
    assert abs(row["delta_f_kT"] - exact) < 4 * row["stderr_kT"] + 0.01, (row, exact)
    assert row["method"] == "MBAR (pymbar), flow samples"
    assert "T/T0 = 1.5" in out and f"{row['delta_f_kT']:+.4f}" in out


@pytest.mark.parametrize("value", ["0", "-300", "abc", "290,,310", "nan"])
def test_sample_bad_temperatures_are_one_line_exit_2(run_dir, value, capsys):
    assert cli.main(["sample", str(run_dir), "--n", "10", "--temperatures", value, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--temperatures" in err


def test_weights_help_states_the_bias():
    text = sample.WEIGHTS_HELP
    assert "psis" in text and "truncate" in text and "bias" in text


# --- errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["sample", "{missing}", "--n", "10"], ["mcmc", "{missing}"]])
def test_missing_run_dir_is_one_line_exit_2(argv, tmp_path, capsys):
    missing = str(tmp_path / "nope")
    rc = cli.main([a.format(missing=missing) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("boltzgen: error:") and missing in err


def test_missing_or_corrupt_checkpoint_is_one_line_exit_2(run_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    assert cli.main(["mcmc", str(broken)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "checkpoint.pt" in err
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert cli.main(["sample", str(broken), "--n", "10"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot be loaded" in err


def test_bad_arguments_are_one_line_exit_2(run_dir, capsys):
    assert cli.main(["mcmc", str(run_dir), "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--steps" in err


def test_an_observable_ess_far_above_one_is_not_printed_as_a_number():
    """A rare state seen only by near-zero weights gives a delta-method ESS_f/N of ~1e21: the terminal
    must not show that as a figure of merit."""
    from boltzgen.estimators.weights import ess_per_observable

    log_w = np.concatenate([[0.0], np.full(999, -60.0)])
    indicator = np.concatenate([[0.0], np.ones(999)])  # the state only where the weights vanish
    value = ess_per_observable(log_w, indicator)
    assert value > 10
    assert cli._observable_ess(value).startswith("> 10 (unreliable")
    assert cli._observable_ess(0.25) == "0.250"
    assert cli._observable_ess(math.inf) == "inf"
