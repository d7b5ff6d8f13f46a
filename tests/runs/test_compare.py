"""`boltzgen compare` on a tiny trained double-well run with an MCMC run beside it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
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
        # The fixed cost is the training and the MALA that made its data.
        train = json.loads((run_dir / "summary.json").read_text())
        data_cost = train["baseline"]["training_data"]
        assert row["fixed_wall_seconds"] == pytest.approx(train["training_wall_seconds"] + data_cost["wall_seconds"])
        assert row["fixed_energy_evaluations"] == (train["energy_evaluations"]["training"]
                                                   + data_cost["energy_evaluations"])
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


WINDOWS = UmbrellaSummary(
    method="umbrella_windows", cvs=["phi", "psi"], temperature_K=300.0,
    free_energies=[UmbrellaFreeEnergyRow(from_="A", to="B", delta_f_kT=4.5, stderr_kT=0.05, stderr_analytic_kT=0.04,
                                         stderr_bootstrap_kT=0.05, halves_kT=[4.45, 4.55], p_b=0.01,
                                         error_method="test")],
    profile=Profile(centers_rad=[-1.0, 0.0, 1.0], f_kT=[0.0, 5.0, 1.0], stderr_kT=[0.1, 0.2, 0.1], cv="phi"),
    settings={}, energy_evaluations={"total": 2_000_000}, wall_seconds=30.0, call_wall_seconds=30.0, n_samples=500,
    warnings=["a test warning"],
)


def test_compare_flags_every_pair_beyond_three_combined_sigma(run_dir, tmp_path, capsys):
    """Two constructed umbrella summaries beside the flow: the one 22 sigma off the exact ΔF is flagged
    against it (and against the flow), the one within its error is not; the table and the JSON say so."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    for folder, summary in (("umbrella", UMBRELLA), ("umbrella_phi_psi", WINDOWS)):
        (run / folder).mkdir()
        summary.write(run / folder / "summary.json")
    assert cli.main(["compare", str(run)]) == 0
    out = capsys.readouterr().out
    windows = "umbrella sampling (phi × psi windows, MBAR)"
    assert f"| {windows} | +4.500 ± 0.050 |" in out and "**DISAGREE**" in out
    data = json.loads((run / "compare.json").read_text())
    pairs = {(p["a"], p["b"]): p for p in data["pairs"]}
    exact = next(r["delta_f_kT"] for r in data["methods"] if r["method"] == "exact (quadrature)")
    against_exact = pairs[("exact (quadrature)", windows)]
    assert against_exact["z"] == pytest.approx((exact - 4.5) / 0.05) and against_exact["disagree"] is True
    assert against_exact["combined_stderr_kT"] == pytest.approx(0.05)
    flattened = pairs[("exact (quadrature)", UMBRELLA.label)]
    assert flattened["disagree"] is False and abs(flattened["z"]) < 3
    both = pairs[(UMBRELLA.label, windows)]
    assert both["combined_stderr_kT"] == pytest.approx(math.hypot(0.2, 0.05))
    assert both["disagree"] is ((4.5 - 3.3) / math.hypot(0.2, 0.05) > 3)
    assert {(p["a"], p["b"]) for p in data["disagreements"]} == {k for k, p in pairs.items() if p["disagree"]}
    methods = {row["method"]: row for row in data["methods"]}
    assert "exact (quadrature)" in methods[windows]["disagrees_with"]
    assert windows not in methods[UMBRELLA.label]["disagrees_with"] or both["disagree"]
    assert methods[windows]["warnings"] == ["a test warning"]
    report = (run / "report.md").read_text()
    assert "**DISAGREE**" in report and "a test warning" in report


def test_profile_on_grid_merges_finer_bins_by_probability():
    """An exact profile on 5-degree bins put onto 10-degree bins: each coarse bin gets -ln of its two
    halves' summed probability (keeping one half, as compare once did, is off by 0.45 kT here)."""
    from boltzgen.runs.compare import _Grid

    grid = _Grid(["phi", "psi"], [(-math.pi, math.pi)] * 2, 36)
    fine_edges = np.linspace(-math.pi, math.pi, 73)
    centers = 0.5 * (fine_edges[1:] + fine_edges[:-1])
    f_fine = 3.0 * (1 + np.cos(centers)) + 2.0 * np.sin(3 * centers)
    merged, se = grid.profile_on_grid(centers, f_fine, np.full(72, 0.1))
    p = np.exp(-f_fine)
    expected = -np.log(p[0::2] + p[1::2])
    np.testing.assert_allclose(merged - merged.min(), expected - expected.min(), atol=1e-12)
    assert np.all(se <= 0.1) and np.all(se >= 0.1 / math.sqrt(2) - 1e-12)
    kept_one = f_fine[1::2]
    assert np.max(np.abs((kept_one - kept_one.min()) - (expected - expected.min()))) > 0.3


def test_pairwise_fes_rmse_uses_the_bins_both_populate():
    from boltzgen.runs.pairs import pair_fes_rmse

    centers = np.linspace(-3, 3, 30)
    f = 0.5 * centers**2
    noisy = f + 0.2 * np.sin(7 * centers) + 4.0
    noisy[:3] = np.inf  # a method that never reached the left tail
    sparse = np.full(30, 100.0)
    sparse[25] = 3.0  # one bin held by three effective samples
    rmse, n = pair_fes_rmse((f, None), (noisy, sparse), min_probability=1e-4, min_samples=10)
    mask = np.isfinite(noisy) & (np.exp(-f) / np.exp(-f).sum() >= 1e-4) & (sparse >= 10)
    d = (noisy - f)[mask]
    assert n == mask.sum() and rmse == pytest.approx(np.sqrt(np.mean((d - d.mean()) ** 2)))
    assert pair_fes_rmse((f, None), (np.full(30, np.inf), None), min_probability=1e-4, min_samples=10) == (None, 0)
