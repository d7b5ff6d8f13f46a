"""`boltzgen compare` on a tiny trained double-well run with an MCMC run beside it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from tests.helpers import train_tiny_double_well

from boltzgen import cli
from boltzgen.runs.chains import mcmc_job
from boltzgen.runs.compare import compare_job
from boltzgen.runs.rundir import RunDir
from boltzgen.runs.sample import sample_job
from boltzgen.runs.summaries import Profile, UmbrellaFreeEnergyRow, UmbrellaSummary

UMBRELLA = UmbrellaSummary(
    temperature_K=300.0,
    free_energies=[UmbrellaFreeEnergyRow(from_="A", to="B", delta_f_kT=3.3, stderr_kT=0.2, repeats_kT=[3.2, 3.4],
                                         repeats_stderr_kT=[0.3, 0.3], repeat_spread_kT=0.14,
                                         stderr_from_repeats_kT=0.1, p_b=0.03, error_method="test")],
    profile=Profile(centers_rad=[-1.0, 0.0, 1.0], f_kT=[0.0, 5.0, 1.0], stderr_kT=[0.1, 0.2, 0.1]),
    stage1={}, settings={}, energy_evaluations={"total": 1_000_000}, wall_seconds=12.0, call_wall_seconds=12.0,
    transitions=[10, 12], n_samples=1000, production_h5=[],
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = train_tiny_double_well(tmp_path_factory.mktemp("dw") / "run", ml_steps=150, mixed_steps=40)
    mcmc_job(RunDir(out), chains=64, steps=100, warmup=20, moves="imh", progress=False)
    return out


def test_compare_writes_report_and_json_with_the_methods_present(run_dir):
    result = compare_job(RunDir(run_dir))
    assert (run_dir / "report.md").is_file() and (run_dir / "compare.json").is_file()
    data = json.loads((run_dir / "compare.json").read_text())
    methods = {row["method"]: row for row in data["methods"]}
    assert set(methods) == {"exact (quadrature)", "importance sampling (flow)", "MCMC (imh)",
                            "baseline MALA (local MCMC)"}
    assert data["reference"] == "exact quadrature"
    exact = methods["exact (quadrature)"]["delta_f_kT"]
    assert abs(exact - 3.38) < 0.01
    text = (run_dir / "report.md").read_text()
    for name in methods:
        assert name in text
    assert "(stderr / 0.1)²" in text  # the scaling assumption is stated
    for name in ("importance sampling (flow)", "MCMC (imh)"):
        row = methods[name]
        assert 0.0 <= row["js_divergence"] <= math.log(2)
        assert row["fes_rmse_kT"] >= 0 and row["fes_bins_compared"] > 10
        assert row["error_vs_exact_kT"] == pytest.approx(row["delta_f_kT"] - exact)
        cost = row["cost_to_0.1kT"]
        factor = (row["stderr_kT"] / 0.1) ** 2
        assert cost["energy_evaluations"] == pytest.approx(row["fixed_energy_evaluations"] + row["energy_evaluations"] * factor)
        assert cost["wall_seconds"] == pytest.approx(row["fixed_wall_seconds"] + row["wall_seconds"] * factor)
    assert methods["baseline MALA (local MCMC)"]["js_divergence"] is None  # no data file for the baseline
    for png in ("compare_delta_f.png", "compare_fes.png", "compare_fes_2d.png"):
        assert (run_dir / "plots" / png).is_file()
    assert result["table_markdown"].startswith("| method")


def test_compare_prefers_sample_summary_and_reads_umbrella(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    sample_job(RunDir(run), n=3000, batch=1000, progress=False)
    (run / "umbrella").mkdir()
    UMBRELLA.write(run / "umbrella" / "summary.json")
    assert cli.main(["compare", str(run)]) == 0
    out = capsys.readouterr().out
    assert "| umbrella sampling (flattening bias) | +3.300 ± 0.200 |" in out
    methods = {row["method"]: row for row in json.loads((run / "compare.json").read_text())["methods"]}
    assert methods["importance sampling (flow)"]["n_samples"] == 3000
    assert methods["importance sampling (flow)"]["source"].endswith("sample_summary.json")
    umbrella = methods["umbrella sampling (flattening bias)"]
    assert umbrella["delta_f_kT"] == 3.3
    assert umbrella["cost_to_0.1kT"]["energy_evaluations"] == pytest.approx(1_000_000 * 4.0)


def test_compare_errors_are_one_line_exit_2(run_dir, tmp_path, capsys):
    assert cli.main(["compare", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("boltzgen: error:")

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "samples.h5").write_bytes(b"garbage, not HDF5")
    assert cli.main(["compare", str(run)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "samples.h5" in err


def test_compare_with_nothing_to_compare(tmp_path, run_dir, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(run_dir / "config.yaml", run / "config.yaml")
    assert cli.main(["compare", str(run)]) == 2
    assert "no results to compare" in capsys.readouterr().err


def test_compare_rejects_a_summary_of_the_wrong_shape(run_dir, tmp_path, capsys):
    """A summary missing a key is one line naming the file and the key, not a silently dropped row."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "umbrella").mkdir()
    broken = {key: value for key, value in UMBRELLA.to_json().items() if key != "profile"}
    (run / "umbrella" / "summary.json").write_text(json.dumps(broken))
    assert cli.main(["compare", str(run)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "umbrella/summary.json" in err and "profile" in err


def test_fes_rmse_leaves_out_bins_that_rest_on_a_few_heavy_weights():
    """Exact FES of the double well as the reference; a weighted sample that matches it except for
    one bin held by a single sample of huge weight. The naive RMSE is dominated by that bin; the
    scores leave it out, count it as sparse, and measure the rest exactly."""
    import numpy as np

    from boltzgen.energies.analytic import DoubleWell
    from boltzgen.estimators.histograms import free_energy_surface
    from boltzgen.runs.compare import _Grid

    energy = DoubleWell()
    grid = _Grid(["x0", "x1"], list(zip(energy.box.lower, energy.box.upper)), 60)
    p1 = energy.bin_probabilities(grid.edges_1d, grid.edges_2d[1]).sum(axis=1)
    f_exact = -np.log(p1 / np.diff(grid.edges_1d))
    grid.set_reference("exact", f_exact - f_exact[np.isfinite(f_exact)].min(), p1, None)
    rng = np.random.default_rng(0)
    x0 = np.repeat(grid.centers_1d, np.round(p1 * 200_000).astype(int))  # many exact samples per bin
    log_w = np.zeros(x0.size)
    outlier_bin = int(np.argmin(np.abs(np.log(p1 / 3e-4))))  # a thinly populated bin of the reference
    x0 = np.r_[x0[np.abs(x0 - grid.centers_1d[outlier_bin]) > 1e-9], grid.centers_1d[outlier_bin]]
    log_w = np.r_[log_w[: x0.size - 1], 8.0]  # its only sample carries e^8 times the usual weight
    fes = free_energy_surface(x0 + rng.uniform(-1e-6, 1e-6, x0.size), log_w=log_w, bins=grid.edges_1d, n_bootstrap=0)
    naive = grid.scores(np.asarray(fes.f_kT), None)
    scored = grid.scores(np.asarray(fes.f_kT), None, np.asarray(fes.n_eff))
    assert naive["fes_rmse_kT"] > 0.5  # the one heavy sample wrecks the plain comparison
    assert scored["fes_bins_sparse"] >= 1 and scored["fes_rmse_kT"] < 0.05
