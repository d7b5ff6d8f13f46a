"""`boltzgen mcmc` on a tiny trained double-well run: consistency with quadrature, starts, moves."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from boltzgen.energies.analytic import DoubleWell
from tests.helpers import train_tiny_double_well
from boltzgen.energies.base import RestrictedEnergy
from boltzgen.flows.priors import Prior
from boltzgen.flows.transforms import Compose
from boltzgen.generator import BoltzmannGenerator
from boltzgen.mcmc import initial_state
from boltzgen.moves import StepSizeAdapter
from boltzgen.runs.chains import mcmc_job
from boltzgen.runs.rundir import RunDir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train_tiny_double_well(tmp_path_factory.mktemp("dw") / "run")


def exact_p_right() -> float:
    return DoubleWell().quadrature_probabilities({"B": lambda cvs: cvs["x0"] > 0})["B"]

# --- mcmc --------------------------------------------------------------------------------------------

def test_mcmc_imh_is_consistent_with_quadrature(run_dir, tmp_path):
    chains, steps, thin = 128, 600, 2
    summary = mcmc_job(RunDir(run_dir), chains=chains, steps=steps, warmup=50, thin=thin, moves="imh",
                       out_dir=tmp_path / "mcmc", progress=False).to_json()
    T = steps // thin
    with h5py.File(tmp_path / "mcmc" / "chains.h5", "r") as f:
        assert f["positions"].shape == (chains * T, 2)
        chain = f["chain"][()]
        x = f["positions"][()]
        u = f["u"][()]
        assert f.attrs["order"] == "chain-major"
    np.testing.assert_array_equal(chain, np.repeat(np.arange(chains), T))  # chain-major
    np.testing.assert_allclose(u, DoubleWell()(torch.from_numpy(x)).numpy(), rtol=1e-10, atol=1e-10)
    x0 = x[:, 0]
    assert summary["n_samples"] == chains * T
    rate = summary["acceptance_rate"]["imh"]
    assert 0.0 <= rate <= 1.0 and rate > 0.3
    # P(x0 > 0): chains are independent, so the error is the spread of per-chain means
    per_chain = (x0.reshape(chains, T) > 0).mean(axis=1)
    p, se = per_chain.mean(), per_chain.std(ddof=1) / math.sqrt(chains)
    assert abs(p - exact_p_right()) < 4 * se, (p, se, exact_p_right())
    row = summary["free_energies"][0]
    assert abs(row["delta_f_kT"] - row["exact_kT"]) < 4 * row["stderr_kT"]
    for key in ("ess", "n_samples", "n_nonfinite", "free_energies", "energy_evaluations", "wall_seconds",
                "acceptance_rate", "tau_int"):
        assert key in summary, key
    assert set(summary["tau_int"]) == {"x0", "x1", "u", "state:A", "state:B"}
    assert all(t is None or t >= 0.5 for t in summary["tau_int"].values())
    assert summary["energy_evaluations"]["total"] >= chains * (steps + 50)


def test_chains_start_by_importance_resampling():
    """A flow far from the target (a standard normal, half its mass at x0 > 0) still gives starts in
    the right proportions: only about 3 % of the double well's mass lies at x0 > 0."""
    torch.manual_seed(3)
    generator = BoltzmannGenerator(Prior(2), Compose([]), DoubleWell())
    state = initial_state(generator, 4000)
    assert torch.isfinite(state.u).all() and state.x.dtype == torch.float64
    assert float((state.x[:, 0] > 0).double().mean()) == pytest.approx(exact_p_right(), abs=0.015)


def test_restricted_energy_is_inf_outside_and_exact_inside():
    energy = RestrictedEnergy(DoubleWell(), lambda x: x[:, 0] < 0)
    x = torch.tensor([[-1.0, 0.5], [1.0, 0.5]], dtype=torch.float64)
    u = energy(x)
    assert u[0] == DoubleWell()(x[:1])[0] and u[1] == math.inf
    assert torch.equal(energy.force(x[:1]), DoubleWell().force(x[:1]))


def test_mcmc_step_sizes_adapt_in_warmup_only(run_dir, tmp_path, monkeypatch):
    calls = []
    original = StepSizeAdapter.update

    def spy(self, accept_prob):
        calls.append(accept_prob)
        return original(self, accept_prob)

    monkeypatch.setattr(StepSizeAdapter, "update", spy)
    warmup, steps, chains = 30, 40, 32
    summary = mcmc_job(RunDir(run_dir), chains=chains, steps=steps, warmup=warmup, thin=4, moves="imh+mala",
                       out_dir=tmp_path / "m", progress=False).to_json()
    assert len(calls) == warmup  # one adaptation per warm-up step of the one adaptive move, none after
    assert set(summary["acceptance_rate"]) == {"imh", "cartesian_mala"}
    assert all(0.0 <= v <= 1.0 for v in summary["acceptance_rate"].values())
    assert summary["step_sizes"]["cartesian_mala"] > 0
    with h5py.File(tmp_path / "m" / "chains.h5", "r") as f:
        assert f["positions"].shape[0] == chains * steps // 4


def test_mcmc_latent_mala_runs(run_dir, tmp_path):
    summary = mcmc_job(RunDir(run_dir), chains=16, steps=20, warmup=10, moves="latent_mala", out_dir=tmp_path / "m",
                       progress=False).to_json()
    assert 0.0 <= summary["acceptance_rate"]["latent_mala"] <= 1.0
    assert summary["n_samples"] == 16 * 20


