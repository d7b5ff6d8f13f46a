"""Importance weights against analytic answers: Gaussian shifts, generalized Pareto tails."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from boltzgen.estimators import weights


def snis_mean(values: np.ndarray, log_w: np.ndarray) -> float:
    """The self-normalised importance-sampling mean ``sum w_i f_i / sum w_i``."""
    return float(np.sum(weights.normalized_weights(log_w) * values))


# ----------------------------------------------------------------------------- ESS


def test_gaussian_shift_mean_ess_and_sign() -> None:
    mu, n = 1.0, 40_000
    x = np.random.default_rng(1).normal(size=n)
    u = 0.5 * (x - mu) ** 2  # target N(mu, 1), unnormalised
    log_q = stats.norm.logpdf(x)
    log_w = -u - log_q  # the generator's sign convention

    assert weights.kish_ess(log_w) == pytest.approx(math.exp(-mu**2), rel=0.08)
    # asymptotic SNIS error: E_q[w^2 (x - mu)^2] / N with normalised w = e^{mu^2} (1 + mu^2) / N
    analytic_stderr = math.sqrt(math.exp(mu**2) * (1 + mu**2) / n)
    assert abs(snis_mean(x, log_w) - mu) < 4 * analytic_stderr
    # the same ratio: Var_p(x) / (N Var(mu_hat)) = 1 / (e^{mu^2} (1 + mu^2))
    assert weights.ess_per_observable(log_w, x) == pytest.approx(1 / (math.e * 2), rel=0.15)
    # a wrong sign would move the mean to -mu
    assert abs(snis_mean(x, -u + log_q) - mu) > 0.5


def test_uniform_weights_give_full_ess() -> None:
    x = np.random.default_rng(0).normal(size=1000)
    log_w = np.full(1000, -3.0)
    assert weights.kish_ess(log_w) == pytest.approx(1.0)
    assert weights.max_normalized_weight(log_w) == pytest.approx(1e-3)
    assert weights.ess_per_observable(log_w, x) == pytest.approx(1.0)
    assert weights.ess_per_observable(log_w, np.ones(1000)) == math.inf
    both = weights.ess_per_observable(log_w, np.stack([x, x**2], axis=1))
    assert both.shape == (2,) and np.allclose(both, 1.0)
    np.testing.assert_allclose(weights.normalized_weights(log_w), 1e-3)


def test_nonfinite_log_weights_are_zero_weight_and_counted() -> None:
    rng = np.random.default_rng(3)
    log_w = rng.normal(size=200)
    values = rng.normal(size=200)
    bad = np.array([3, 50, 120])
    log_w_bad, values_bad = log_w.copy(), values.copy()
    log_w_bad[bad] = [-np.inf, np.nan, np.inf]
    values_bad[bad] = np.nan  # never read: weight 0
    keep = np.setdiff1d(np.arange(200), bad)

    assert weights.count_nonfinite(log_w_bad) == 3
    # ESS counts the zero-weight samples in N
    assert weights.kish_ess(log_w_bad) == pytest.approx(weights.kish_ess(log_w[keep]) * 197 / 200)
    ess_f = weights.ess_per_observable(log_w_bad, values_bad)
    assert ess_f == pytest.approx(weights.ess_per_observable(log_w[keep], values[keep]) * 197 / 200)
    w = weights.normalized_weights(log_w_bad)
    assert np.all(w[bad] == 0) and w.sum() == pytest.approx(1.0)
    assert weights.max_normalized_weight(log_w_bad) == pytest.approx(w.max())

    all_bad = np.full(10, -np.inf)
    assert weights.kish_ess(all_bad) == 0.0
    with pytest.raises(ValueError, match="all importance weights are zero"):
        weights.normalized_weights(all_bad)
    with pytest.raises(ValueError, match="non-finite"):
        weights.ess_per_observable(log_w, np.full(200, np.nan))


def test_torch_inputs_match_numpy() -> None:
    rng = np.random.default_rng(4)
    x, log_w = rng.normal(size=500), 2.0 * rng.normal(size=500)
    x_t, log_w_t = torch.tensor(x, requires_grad=True), torch.tensor(log_w, requires_grad=True)
    assert weights.kish_ess(log_w_t) == weights.kish_ess(log_w)
    assert weights.ess_per_observable(log_w_t, x_t) == weights.ess_per_observable(log_w, x)
    assert weights.pareto_khat(log_w_t) == weights.pareto_khat(log_w)
    np.testing.assert_array_equal(weights.psis_log_weights(log_w_t), weights.psis_log_weights(log_w))


# ----------------------------------------------------------------------------- Pareto k̂


def test_pareto_khat_recovers_gpd_shape() -> None:
    draws = stats.genpareto.rvs(c=0.5, size=50_000, random_state=np.random.default_rng(6))
    assert weights.pareto_khat(np.log(draws)) == pytest.approx(0.5, abs=0.2)  # sd ~0.055


def test_pareto_khat_light_and_heavy_tails() -> None:
    n = 20_000
    x_wide = 2.0 * np.random.default_rng(7).normal(size=n)  # proposal wider than the N(0, 1) target: bounded w
    light = stats.norm.logpdf(x_wide) - stats.norm.logpdf(x_wide, scale=2.0)
    assert weights.pareto_khat(light) < 0.5
    x_narrow = 0.3 * np.random.default_rng(8).normal(size=n)  # much narrower: w tail ~ t^-1.1, k ~ 0.9
    heavy = stats.norm.logpdf(x_narrow) - stats.norm.logpdf(x_narrow, scale=0.3)
    assert weights.pareto_khat(heavy) > weights.KHAT_UNRELIABLE
    assert math.isnan(weights.pareto_khat(np.zeros(20)))  # tail of 4: too short to fit
    assert weights.pareto_khat(np.r_[np.zeros(10), np.full(990, -np.inf)]) == math.inf


# ----------------------------------------------------------------------------- PSIS and truncation


def test_psis_smooths_only_the_tail_in_rank_order() -> None:
    x = 0.3 * np.random.default_rng(9).normal(size=10_000)
    log_w = stats.norm.logpdf(x) - stats.norm.logpdf(x, scale=0.3)
    smoothed = weights.psis_log_weights(log_w)
    m = math.ceil(min(0.2 * 10_000, 3 * math.sqrt(10_000)))
    order = np.argsort(log_w)
    changed = smoothed != log_w
    assert set(np.flatnonzero(changed)) <= set(order[-m:])
    assert changed.sum() > m // 2
    assert np.all(np.diff(smoothed[order[-m:]]) >= 0)  # rank order kept
    assert smoothed.max() <= log_w.max()
    assert smoothed[order[-m:]].min() >= log_w[order[-m - 1]]  # tail stays above the threshold


def test_psis_and_truncation_trade_variance_for_bias() -> None:
    raw, psis, truncated = [], [], []
    for seed in range(40):  # E_p[x^2] = 1 under N(0, 1) from a N(0, 0.6^2) proposal (k ~ 0.6)
        x = 0.6 * np.random.default_rng(300 + seed).normal(size=2000)
        log_w = stats.norm.logpdf(x) - stats.norm.logpdf(x, scale=0.6)
        raw.append(snis_mean(x**2, log_w))
        psis.append(snis_mean(x**2, weights.psis_log_weights(log_w)))
        truncated.append(snis_mean(x**2, weights.truncated_log_weights(log_w)))
    rmse = lambda v: math.sqrt(np.mean((np.asarray(v) - 1.0) ** 2))  # noqa: E731
    for smoothed in (psis, truncated):
        assert np.std(smoothed) < 0.75 * np.std(raw)
        assert rmse(smoothed) < rmse(raw)
        assert np.mean(smoothed) < 1.0  # the documented downward bias from shrinking the tail


def test_truncation_caps_at_mean_times_sqrt_n() -> None:
    log_w = np.r_[np.zeros(99), 10.0]
    cap = math.log(np.mean(np.exp(log_w)) * math.sqrt(100))
    out = weights.truncated_log_weights(log_w)
    assert out[-1] == pytest.approx(cap)
    np.testing.assert_array_equal(out[:99], 0.0)


# ----------------------------------------------------------------------------- log Z


def test_log_z_of_a_gaussian_and_its_error_bar_is_calibrated() -> None:
    """q = N(0, 1), p ∝ exp(-(x - 0.5)^2 / (2 * 0.8^2)): log Z = log(sqrt(2 pi) 0.8); over 200
    repeats the estimate is unbiased to its error and the delta-method stderr matches the spread."""
    mu, s, n = 0.5, 0.8, 4000
    exact = math.log(math.sqrt(2 * math.pi) * s)
    rng = np.random.default_rng(3)
    values, stderrs = [], []
    for _ in range(200):
        x = rng.normal(size=n)
        est = weights.log_z_importance_sampling(-(x - mu) ** 2 / (2 * s**2) - stats.norm.logpdf(x))
        values.append(est.value)
        stderrs.append(est.stderr)
    assert est.n_samples == n and est.n_nonfinite == 0
    spread = float(np.std(values))
    assert float(np.mean(stderrs)) == pytest.approx(spread, rel=0.15)
    assert abs(float(np.mean(values)) - exact) < 4 * spread / math.sqrt(200)


def test_log_z_counts_weight_zero_samples_in_n() -> None:
    est = weights.log_z_importance_sampling(np.array([0.0, 0.0, -np.inf, np.nan]))
    assert est.value == pytest.approx(math.log(0.5)) and est.n_nonfinite == 2 and est.n_samples == 4
    assert est.stderr == pytest.approx(math.sqrt(1 / 2 - 1 / 4))
    empty = weights.log_z_importance_sampling(np.array([-np.inf, np.nan]))
    assert empty.value == -math.inf and math.isnan(empty.stderr)
