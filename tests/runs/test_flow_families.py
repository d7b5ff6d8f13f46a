"""The commands with the flow families: config-time refusals, the estimated log-det in `sample`, and
what `mcmc` does with a flow that lacks an exact density."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from boltzgen import cli
from boltzgen.config import FlowConfig, load_config
from boltzgen.energies.analytic import DoubleWell
from boltzgen.errors import ConfigError, RunError
from boltzgen.flows.build import build_flow
from boltzgen.generator import BoltzmannGenerator
from boltzgen.runs.chains import mcmc_job
from boltzgen.runs.rundir import RunDir
from boltzgen.runs.sample import log_det_report, sample_job
from boltzgen.runs.train import train
from tests.helpers import ROOT

TINY = [
    "baseline.chains=256", "baseline.steps=60", "baseline.warmup=20", "baseline.thin=10",
    "flow.blocks=2", "flow.hidden=[16,16]", "training[0].steps=30", "training[0].batch=128",
    "training[1].steps=10", "training[1].batch=128", "sampling.n=1000", "sampling.batch=1000",
    "sampling.n_bootstrap=20", "checkpoint_every=1000", "log_every=10",
]


def _train(out: Path, *overrides: str) -> Path:
    config, resolved = load_config(ROOT / "systems" / "double_well.yaml", [*TINY, *overrides])
    train(config, resolved, RunDir(out), progress=False)
    return out


@pytest.fixture(scope="module")
def residual_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("residual") / "run", "flow.type=residual_flow")


@pytest.fixture(scope="module")
def planar_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("planar") / "run", "flow.type=planar", "training[0].loss=reverse_kl",
                  "training[1].loss=reverse_kl")


# --- refusals at config time --------------------------------------------------------------------------

@pytest.mark.parametrize("flow_type", ["planar", "radial", "sylvester"])
def test_forward_kl_on_a_flow_without_inverse_fails_before_anything_runs(flow_type, tmp_path):
    config, resolved = load_config(ROOT / "systems" / "double_well.yaml", [f"flow.type={flow_type}"])
    with pytest.raises(ConfigError) as info:
        train(config, resolved, RunDir(tmp_path / "run"), progress=False)
    message = str(info.value)
    assert message.startswith("training[0]: loss forward_kl") and f"flow.type {flow_type}" in message
    assert "reverse_kl" in message and "\n" not in message
    assert not (tmp_path / "run").exists()


def test_a_later_mixed_stage_is_named_and_the_cli_exits_with_status_2(tmp_path, capsys):
    code = cli.main(["train", str(ROOT / "systems" / "double_well.yaml"), "--out", str(tmp_path / "run"),
                     "--set", "flow.type=planar", "--set", "training[0].loss=reverse_kl", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith("boltzgen: error: training[1]: loss mixed") and "flow.type planar" in err


def test_mixed_without_forward_term_is_allowed_for_a_flow_without_inverse():
    from boltzgen.training import check_recipe, needs_data_density

    config, _ = load_config(ROOT / "systems" / "double_well.yaml",
                            ["flow.type=planar", "training[0].loss=reverse_kl", "training[1].forward_weight=0"])
    assert not any(needs_data_density(stage) for stage in config.training)
    check_recipe(config.training, build_flow(config.flow, 2)[1].capabilities, "flow.type planar")


def test_a_family_that_cannot_transform_torsions_is_refused_for_a_molecule(tmp_path):
    config, resolved = load_config(ROOT / "systems" / "alanine.yaml", ["flow.type=real_nvp"])
    with pytest.raises(ConfigError, match="flow.type: real_nvp cannot transform the torsions"):
        train(config, resolved, RunDir(tmp_path / "run"), progress=False)


def test_settings_of_another_family_are_an_error():
    with pytest.raises(ConfigError, match=r"flow.residual: these settings apply to flow.type iresnet or "
                                          r"residual_flow, not maf"):
        load_config(ROOT / "systems" / "double_well.yaml", ["flow.type=maf", "flow.residual.lipschitz=0.5"])


# --- sample: the estimated log-det is reported ---------------------------------------------------------

def test_sample_reports_the_estimated_log_det_and_its_noise(residual_run, capsys):
    code = cli.main(["sample", str(residual_run), "--n", "1500", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "log-det           ESTIMATED: Residual Flows Russian-roulette" in out
    summary = json.loads((residual_run / "sample_summary.json").read_text())
    log_det = summary["log_det"]
    assert log_det["unbiased"] is True and "roulette" in log_det["estimator"]
    assert log_det["n_points"] == 256 and log_det["n_repeats"] == 8
    assert 0 < log_det["log_q_std"] <= log_det["log_q_std_max"]
    # 2 dims: the exact log-det is affordable, so the estimate's bias is measured (and small: unbiased).
    assert abs(log_det["log_q_bias"]) < 5 * log_det["log_q_bias_stderr"] + 1e-3
    train_summary = json.loads((residual_run / "summary.json").read_text())
    assert train_summary["log_det"]["estimator"] == log_det["estimator"]


def test_an_exact_flow_reports_no_log_det_estimate():
    prior, flow = build_flow(FlowConfig(blocks=2, hidden=[8]), 2)
    assert log_det_report(BoltzmannGenerator(prior, flow, DoubleWell())) is None


def test_compare_marks_weights_from_an_estimated_log_det(residual_run):
    from boltzgen.runs.compare import compare_job

    sample_job(RunDir(residual_run), 1000, progress=False)
    result = compare_job(RunDir(residual_run))
    report = Path(result["report"]).read_text()
    assert "importance sampling (flow, estimated log-det)" in report and "**Estimated log-det**" in report


# --- mcmc: exact densities or a refusal ------------------------------------------------------------------

def test_mcmc_of_a_residual_flow_uses_the_exact_log_det(residual_run, monkeypatch):
    from boltzgen.flows import residual

    estimators_seen: set[str] = set()
    original = residual.ResidualBlock._g_and_log_det

    def spy(self, point, weights):
        estimators_seen.add(self.estimator)
        return original(self, point, weights)

    monkeypatch.setattr(residual.ResidualBlock, "_g_and_log_det", spy)
    summary = mcmc_job(RunDir(residual_run), chains=16, steps=20, warmup=5, moves="imh+mala", progress=False)
    assert estimators_seen == {"exact"}
    assert 0 < summary.acceptance_rate["imh"] <= 1


def test_mcmc_refuses_a_local_move_for_a_flow_without_inverse_and_runs_imh(planar_run):
    with pytest.raises(RunError, match="imh\\+mala: flow.type planar cannot evaluate the density"):
        mcmc_job(RunDir(planar_run), chains=8, steps=10, warmup=2, moves="imh+mala", progress=False)
    summary = mcmc_job(RunDir(planar_run), chains=16, steps=20, warmup=5, moves="imh", progress=False)
    assert summary.n_samples == 16 * 20 and 0 < summary.acceptance_rate["imh"] <= 1
