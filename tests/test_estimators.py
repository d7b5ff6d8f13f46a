"""Estimators against analytic answers: Gaussian shifts, quadrature, AR(1) processes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, signal, stats

from boltzgen import estimators as est


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _ar1(rng: np.random.Generator, rho: float, chains: int, t: int) -> np.ndarray:
    """Stationary AR(1) x_t = rho x_{t-1} + e_t, e ~ N(0, 1); shape [chains, t]."""
    noise = rng.normal(size=(chains, t))
    noise[:, 0] /= math.sqrt(1.0 - rho**2)  # start in the stationary distribution
    return signal.lfilter([1.0], [1.0, -rho], noise, axis=1)


def _ar1_var_of_mean(rho: float, t: int) -> float:
    """Exact variance of the mean of t consecutive stationary AR(1) values (unit noise)."""
    var = 1.0 / (1.0 - rho**2)
    lags = np.arange(1, t)
    return var / t * (1.0 + 2.0 * np.sum((1.0 - lags / t) * rho**lags))


def _double_well_u(x: np.ndarray) -> np.ndarray:
    return x**4 - 6.0 * x**2 + x


def _double_well_samples(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """x from an equal mixture of N(±1.73, 0.35^2) and log_w = -u - log q."""
    centres = np.where(rng.random(n) < 0.5, -1.73, 1.73)
    x = centres + 0.35 * rng.normal(size=n)
    log_q = np.logaddexp(stats.norm.logpdf(x, -1.73, 0.35), stats.norm.logpdf(x, 1.73, 0.35)) - math.log(2)
    return x, -_double_well_u(x) - log_q


def _double_well_delta_f() -> float:
    """ΔF(x < 0 -> x > 0) of exp(-u) by quadrature."""
    boltz = lambda x: math.exp(-(x**4 - 6.0 * x**2 + x))  # noqa: E731
    p_a = integrate.quad(boltz, -6.0, 0.0)[0]
    p_b = integrate.quad(boltz, 0.0, 6.0)[0]
    return -math.log(p_b / p_a)


# ----------------------------------------------------------------------------- weights and ESS


def test_gaussian_shift_mean_ess_and_sign() -> None:
    mu, n = 1.0, 40_000
    x = _rng(1).normal(size=n)
    u = 0.5 * (x - mu) ** 2  # target N(mu, 1), unnormalised
    log_q = stats.norm.logpdf(x)
    log_w = -u - log_q  # the generator's sign convention

    assert est.kish_ess(log_w) == pytest.approx(math.exp(-mu**2), rel=0.08)
    result = est.weighted_mean(x, log_w, n_bootstrap=100, rng=2)
    assert abs(result.value - mu) < 4 * result.stderr
    # asymptotic SNIS error: E_q[w^2 (x - mu)^2] / N with normalised w = e^{mu^2} (1 + mu^2) / N
    analytic_stderr = math.sqrt(math.exp(mu**2) * (1 + mu**2) / n)
    assert result.stderr == pytest.approx(analytic_stderr, rel=0.25)
    assert result.n_eff == pytest.approx(n * est.kish_ess(log_w))
    # the same ratio: Var_p(x) / (N Var(mu_hat)) = 1 / (e^{mu^2} (1 + mu^2))
    assert est.ess_per_observable(log_w, x) == pytest.approx(1 / (math.e * 2), rel=0.15)
    # a wrong sign would move the mean to -mu
    assert abs(est.weighted_mean(x, -u + log_q, n_bootstrap=0).value - mu) > 0.5


def test_uniform_weights_give_full_ess() -> None:
    x = _rng().normal(size=1000)
    log_w = np.full(1000, -3.0)
    assert est.kish_ess(log_w) == pytest.approx(1.0)
    assert est.max_normalized_weight(log_w) == pytest.approx(1e-3)
    assert est.ess_per_observable(log_w, x) == pytest.approx(1.0)
    assert est.ess_per_observable(log_w, np.ones(1000)) == math.inf
    both = est.ess_per_observable(log_w, np.stack([x, x**2], axis=1))
    assert both.shape == (2,) and np.allclose(both, 1.0)
    np.testing.assert_allclose(est.normalized_weights(log_w), 1e-3)


def test_nonfinite_log_weights_are_zero_weight_and_counted() -> None:
    rng = _rng(3)
    log_w = rng.normal(size=200)
    values = rng.normal(size=200)
    bad = np.array([3, 50, 120])
    log_w_bad, values_bad = log_w.copy(), values.copy()
    log_w_bad[bad] = [-np.inf, np.nan, np.inf]
    values_bad[bad] = np.nan  # never read: weight 0
    keep = np.setdiff1d(np.arange(200), bad)

    assert est.count_nonfinite(log_w_bad) == 3
    # ESS counts the zero-weight samples in N
    assert est.kish_ess(log_w_bad) == pytest.approx(est.kish_ess(log_w[keep]) * 197 / 200)
    w = est.normalized_weights(log_w_bad)
    assert np.all(w[bad] == 0) and w.sum() == pytest.approx(1.0)
    result = est.weighted_mean(values_bad, log_w_bad, n_bootstrap=20, rng=0)
    assert result.n_nonfinite == 3
    assert result.value == pytest.approx(est.weighted_mean(values[keep], log_w[keep], n_bootstrap=0).value)
    assert np.isfinite(result.stderr)

    all_bad = np.full(10, -np.inf)
    assert est.kish_ess(all_bad) == 0.0
    with pytest.raises(ValueError, match="all importance weights are zero"):
        est.normalized_weights(all_bad)
    with pytest.raises(ValueError, match="non-finite"):
        est.weighted_mean(np.full(200, np.nan), log_w, n_bootstrap=0)


def test_torch_inputs_match_numpy() -> None:
    rng = _rng(4)
    x, log_w = rng.normal(size=500), rng.normal(size=500)
    a = est.weighted_mean(torch.tensor(x, requires_grad=True), torch.tensor(log_w), rng=5)
    b = est.weighted_mean(x, log_w, rng=5)
    assert a == b


# ----------------------------------------------------------------------------- Pareto k̂


def test_pareto_khat_recovers_gpd_shape() -> None:
    weights = stats.genpareto.rvs(c=0.5, size=50_000, random_state=_rng(6))
    assert est.pareto_khat(np.log(weights)) == pytest.approx(0.5, abs=0.2)  # sd ~0.055


def test_pareto_khat_light_and_heavy_tails() -> None:
    n = 20_000
    x_wide = 2.0 * _rng(7).normal(size=n)  # proposal wider than the N(0, 1) target: bounded w
    light = stats.norm.logpdf(x_wide) - stats.norm.logpdf(x_wide, scale=2.0)
    assert est.pareto_khat(light) < est.KHAT_GOOD
    x_narrow = 0.3 * _rng(8).normal(size=n)  # much narrower: w tail ~ t^-1.1, k ~ 0.9
    heavy = stats.norm.logpdf(x_narrow) - stats.norm.logpdf(x_narrow, scale=0.3)
    assert est.pareto_khat(heavy) > est.KHAT_UNRELIABLE
    assert math.isnan(est.pareto_khat(np.zeros(20)))  # tail of 4: too short to fit
    assert est.pareto_khat(np.r_[np.zeros(10), np.full(990, -np.inf)]) == math.inf


def test_psis_smooths_only_the_tail_in_rank_order() -> None:
    x = 0.3 * _rng(9).normal(size=10_000)
    log_w = stats.norm.logpdf(x) - stats.norm.logpdf(x, scale=0.3)
    smoothed = est.psis_log_weights(log_w)
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
        x = 0.6 * _rng(300 + seed).normal(size=2000)
        log_w = stats.norm.logpdf(x) - stats.norm.logpdf(x, scale=0.6)
        raw.append(est.weighted_mean(x**2, log_w, n_bootstrap=0).value)
        psis.append(est.weighted_mean(x**2, est.psis_log_weights(log_w), n_bootstrap=0).value)
        truncated.append(est.weighted_mean(x**2, est.truncated_log_weights(log_w), n_bootstrap=0).value)
    rmse = lambda v: math.sqrt(np.mean((np.asarray(v) - 1.0) ** 2))  # noqa: E731
    for smoothed in (psis, truncated):
        assert np.std(smoothed) < 0.75 * np.std(raw)
        assert rmse(smoothed) < rmse(raw)
        assert np.mean(smoothed) < 1.0  # the documented downward bias from shrinking the tail


def test_truncation_caps_at_mean_times_sqrt_n() -> None:
    log_w = np.r_[np.zeros(99), 10.0]
    cap = math.log(np.mean(np.exp(log_w)) * math.sqrt(100))
    out = est.truncated_log_weights(log_w)
    assert out[-1] == pytest.approx(cap)
    np.testing.assert_array_equal(out[:99], 0.0)


# ----------------------------------------------------------------------------- ΔF


def test_delta_f_double_well_against_quadrature() -> None:
    x, log_w = _double_well_samples(_rng(10), 20_000)
    result = est.delta_f(x < 0, x > 0, log_w, n_bootstrap=100, rng=11)
    exact = _double_well_delta_f()
    assert exact == pytest.approx(3.38, abs=0.05)  # REFERENCES.md figure
    assert 0 < result.stderr < 0.1
    assert abs(result.value - exact) < 4 * result.stderr
    assert result.empty_state is None and result.n_resamples_invalid == 0


def test_delta_f_unweighted_against_known_populations() -> None:
    rng = _rng(12)
    in_a = rng.random(10_000) < 0.2
    result = est.delta_f(in_a, ~in_a, n_bootstrap=100, rng=13)
    assert abs(result.value - (-math.log(0.8 / 0.2))) < 4 * result.stderr
    # binomial error propagated: Var(ln p_a - ln p_b) = 1 / (N p (1 - p))
    assert result.stderr == pytest.approx(1 / math.sqrt(10_000 * 0.2 * 0.8), rel=0.2)
    assert result.n_eff == pytest.approx(in_a.sum())


def test_delta_f_empty_state_is_reported_not_raised() -> None:
    x = _rng(14).normal(size=100)
    b_empty = est.delta_f(x < 0, x > 100)
    assert b_empty.value == math.inf and b_empty.empty_state == "B" and math.isnan(b_empty.stderr)
    a_empty = est.delta_f(x > 100, x < 0)
    assert a_empty.value == -math.inf and a_empty.empty_state == "A"
    log_w = np.where(x > 0, -np.inf, 0.0)  # state B only holds zero-weight samples
    result = est.delta_f(x < 0, x > 0, log_w)
    assert result.empty_state == "B" and result.n_nonfinite == (x > 0).sum()
    assert math.isnan(est.delta_f(x > 100, x > 100).value)


def test_bootstrap_stderr_matches_spread_over_repeats() -> None:
    values, errors = [], []
    for seed in range(40):
        x, log_w = _double_well_samples(_rng(100 + seed), 2000)
        result = est.delta_f(x < 0, x > 0, log_w, n_bootstrap=100, rng=seed)
        values.append(result.value)
        errors.append(result.stderr)
    ratio = np.mean(errors) / np.std(values, ddof=1)
    assert 0.7 < ratio < 1.4


def test_thermodynamic_delta_f_between_temperatures() -> None:
    x = 1.5 * _rng(15).normal(size=20_000)
    log_q = stats.norm.logpdf(x, scale=1.5)
    u_t1, u_t2 = 0.5 * x**2, 0.5 * x**2 / 2.0  # harmonic well at kT = 1 and kT = 2
    result = est.thermodynamic_delta_f_from_flow(u_t1, u_t2, log_q, n_bootstrap=100, rng=16)
    exact = -0.5 * math.log(2.0)  # -ln(Z_2 / Z_1), Z_T = sqrt(2 pi T)
    assert abs(result.value - exact) < 4 * result.stderr
    assert abs(result.value - exact) < 0.03
    assert 0 < result.n_eff < 20_000


# ----------------------------------------------------------------------------- BAR / MBAR


def test_bar_two_harmonic_oscillators() -> None:
    rng = _rng(17)
    k_a, k_b = 1.0, 4.0
    x_a = rng.normal(scale=1 / math.sqrt(k_a), size=5000)
    x_b = rng.normal(scale=1 / math.sqrt(k_b), size=5000)
    u_a = lambda x: 0.5 * k_a * x**2  # noqa: E731
    u_b = lambda x: 0.5 * k_b * x**2  # noqa: E731
    exact = 0.5 * math.log(k_b / k_a)
    result = est.bar_delta_f(u_b(x_a) - u_a(x_a), u_a(x_b) - u_b(x_b))
    assert abs(result.value - exact) < 4 * result.stderr and result.stderr < 0.05
    assert 0 < result.n_eff <= 10_000
    same = est.thermodynamic_delta_f_bar(u_a(x_a), u_b(x_a), u_a(x_b), u_b(x_b))
    assert same.value == pytest.approx(result.value)
    with pytest.raises(ValueError, match="non-finite"):
        est.bar_delta_f(np.r_[np.inf, 1.0], np.ones(3))


def test_mbar_three_harmonic_oscillators() -> None:
    rng = _rng(18)
    ks = np.array([1.0, 2.0, 4.0])
    x = np.concatenate([rng.normal(scale=1 / math.sqrt(k), size=3000) for k in ks])
    u_kn = 0.5 * ks[:, None] * x[None, :] ** 2
    result = est.mbar_free_energies(u_kn, [3000, 3000, 3000])
    exact = 0.5 * np.log(ks / ks[0])
    assert result.f_k[0] == 0.0
    assert np.all(np.abs(result.f_k[1:] - exact[1:]) < 4 * result.stderr_k[1:])
    pair = result.between(0, 2)
    assert pair.value == pytest.approx(result.f_k[2]) and 0 < pair.n_eff <= 9000


def _wide_gaussian_flow(
    rng: np.random.Generator, n: int, dim: int = 3, scale: float = 1.25
) -> tuple[np.ndarray, np.ndarray]:
    """Flow q = N(0, scale^2 I) and target u_0 = |x|^2 / 2: ``(u_0, log_q)``, both ``[n]``.

    At temperature ratio r the target is N(0, r I), so f(r) - f(1) = -(dim / 2) ln r exactly; the
    weights are bounded for r <= scale^2.
    """
    x = scale * rng.normal(size=(n, dim))
    r2 = np.sum(x**2, axis=1)
    log_q = -0.5 * r2 / scale**2 - dim * math.log(scale * math.sqrt(2 * math.pi))
    return 0.5 * r2, log_q


def test_thermodynamic_mbar_gaussian_matches_exact_and_importance_sampling() -> None:
    dim = 3
    u0, log_q = _wide_gaussian_flow(_rng(30), 20_000, dim)
    ratios = [0.8, 1.0, 1.3]
    results = est.thermodynamic_free_energies_mbar(u0, log_q, ratios)
    assert len(results) == 3
    for r, result in zip(ratios, results):
        exact = -0.5 * dim * math.log(r)
        if r == 1.0:
            assert result.value == 0.0 and result.stderr == 0.0
            continue
        assert 0 < result.stderr < 0.1
        assert abs(result.value - exact) < 4 * result.stderr, (r, result, exact)
        # one sampled state: MBAR is importance sampling, with an asymptotic instead of a bootstrap error
        same = est.thermodynamic_delta_f_from_flow(u0, u0 / r, log_q, n_bootstrap=400, rng=1)
        assert result.value == pytest.approx(same.value, rel=1e-9, abs=1e-12)
        assert result.stderr == pytest.approx(same.stderr, rel=0.25)
        assert result.n_eff == pytest.approx(est._kish_count(-u0 / r - log_q), rel=1e-6)
        assert result.n_nonfinite == 0


def test_thermodynamic_mbar_drops_and_counts_nonfinite() -> None:
    u0, log_q = _wide_gaussian_flow(_rng(31), 4000)
    clean = est.thermodynamic_free_energies_mbar(u0, log_q, [1.2])[0]
    bad_u, bad_q = u0.copy(), log_q.copy()
    bad_u[[0, 7]] = [np.nan, -np.inf]
    bad_q[[3, 9]] = [np.inf, np.nan]
    keep = np.ones(u0.size, dtype=bool)
    keep[[0, 3, 7, 9]] = False
    result = est.thermodynamic_free_energies_mbar(bad_u, bad_q, [1.2])[0]
    expected = est.thermodynamic_free_energies_mbar(u0[keep], log_q[keep], [1.2])[0]
    assert result.n_nonfinite == 4 and expected.n_nonfinite == 0
    assert result.value == pytest.approx(expected.value, rel=1e-12)
    assert result.stderr == pytest.approx(expected.stderr, rel=1e-9)
    # excluded, not set to 0: a zero in place of the bad values would shift the estimate
    zeroed = est.thermodynamic_free_energies_mbar(np.nan_to_num(bad_u, posinf=0, neginf=0),
                                                  np.nan_to_num(bad_q, posinf=0, neginf=0), [1.2])[0]
    assert zeroed.value != pytest.approx(result.value, rel=1e-9)
    assert abs(result.value - clean.value) < clean.stderr
    with pytest.raises(ValueError, match="positive"):
        est.thermodynamic_free_energies_mbar(u0, log_q, [1.0, -2.0])
    with pytest.raises(ValueError, match="finite"):
        est.thermodynamic_free_energies_mbar(np.full(3, np.nan), np.zeros(3), [1.5])


# ----------------------------------------------------------------------------- correlated series


def test_tau_int_of_ar1_process() -> None:
    rho = 0.8
    x = _ar1(_rng(19), rho, chains=4, t=25_000)
    assert est.integrated_autocorrelation_time(x) == pytest.approx((1 + rho) / (1 - rho), rel=0.1)
    assert est.integrated_autocorrelation_time(_rng(20).normal(size=20_000)) == pytest.approx(1.0, abs=0.1)
    assert est.integrated_autocorrelation_time(np.ones((2, 100))) == math.inf
    with pytest.warns(RuntimeWarning, match="shorter than 50 tau"):
        est.integrated_autocorrelation_time(_ar1(_rng(21), 0.99, chains=1, t=500))


def test_block_average_stderr_of_ar1_against_analytic() -> None:
    rho, chains, t = 0.9, 8, 20_000
    x = _ar1(_rng(22), rho, chains, t)
    result = est.block_average(x, n_blocks=20)
    exact = math.sqrt(_ar1_var_of_mean(rho, t) / chains)
    assert result.stderr == pytest.approx(exact, rel=0.15)
    naive = np.std(x) / math.sqrt(x.size)
    assert result.stderr > 3 * naive  # tau = 19: the i.i.d. formula is ~4.4x too small
    tau = (1 + rho) / (1 - rho)
    assert result.n_eff == pytest.approx(x.size / tau, rel=0.3)
    assert abs(result.value) < 4 * result.stderr


def test_delta_f_blocked_on_correlated_two_state_series() -> None:
    rho, t = 0.95, 20_000
    sigma = 1 / math.sqrt(1 - rho**2)
    exact = -math.log(stats.norm.sf(0.5) / 0.5)  # A: x < 0, B: x > 0.5 sigma; P_A = 1/2
    values, errors = [], []
    for seed in range(40):
        x = _ar1(_rng(200 + seed), rho, chains=1, t=t)[0]
        result = est.delta_f_blocked(x < 0, x > 0.5 * sigma, n_blocks=20)
        values.append(result.value)
        errors.append(result.stderr)
    assert abs(np.mean(values) - exact) < 4 * np.std(values, ddof=1) / math.sqrt(40)
    assert 0.6 < np.mean(errors) / np.std(values, ddof=1) < 1.6
    iid = est.delta_f(x < 0, x > 0.5 * sigma, n_bootstrap=50, rng=0)
    assert result.stderr > 2 * iid.stderr  # correlation matters and is seen
    assert result.n_eff < 0.5 * iid.n_eff
    chains = _ar1(_rng(23), rho, chains=4, t=5000)
    assert np.isfinite(est.delta_f_blocked(chains < 0, chains > 0.5 * sigma).stderr)


def test_delta_f_blocked_state_in_one_block_has_infinite_error() -> None:
    in_b = np.zeros(1000, dtype=bool)
    in_b[10:20] = True
    result = est.delta_f_blocked(~in_b, in_b, n_blocks=10)
    assert np.isfinite(result.value) and result.stderr == math.inf
    assert result.n_resamples_invalid == 1


# ----------------------------------------------------------------------------- FES


def test_fes_1d_gaussian_against_analytic() -> None:
    n = 100_000
    x = _rng(24).normal(size=n)
    fes = est.free_energy_surface(x, bins=30, range=(-3, 3), n_bootstrap=50, rng=25)
    edges = fes.edges[0]
    p_bin = np.diff(stats.norm.cdf(edges))
    exact = -np.log(p_bin / np.diff(edges))
    assert fes.f_kT.shape == (30,) and fes.counts.sum() + fes.n_outside == n
    assert np.nanmin(fes.f_kT) == 0.0
    # binomial error of -ln p: sqrt((1 - p) / (N p))
    expected = np.sqrt((1 - p_bin) / (n * p_bin))
    np.testing.assert_allclose(fes.stderr_kT, expected, rtol=0.35)
    residual = fes.f_kT - exact
    z = (residual - residual.mean()) / expected
    assert np.max(np.abs(z)) < 4 and 0.4 < np.mean(z**2) < 2.0
    assert est.fes_rmse(fes.f_kT, exact) < 0.06
    shifted_wrong = -np.log(stats.norm.pdf(0.9 * (edges[:-1] + edges[1:]) / 2))
    assert est.fes_rmse(fes.f_kT, shifted_wrong) > 0.1  # the comparison has power


def test_fes_empty_bins_are_inf() -> None:
    x = _rng(26).uniform(0, 1, size=1000)
    fes = est.free_energy_surface(x, bins=4, range=(0, 2), n_bootstrap=10, rng=0)
    assert np.all(np.isfinite(fes.f_kT[:2])) and np.all(fes.f_kT[2:] == np.inf)
    assert np.all(np.isnan(fes.stderr_kT[2:]))


def test_fes_2d_weighted_double_well_against_quadrature() -> None:
    rng = _rng(27)
    n = 60_000
    x1, log_w1 = _double_well_samples(rng, n)
    x2 = 1.3 * rng.normal(size=n)
    log_w = log_w1 - 0.5 * x2**2 - stats.norm.logpdf(x2, scale=1.3)  # u = u1(x1) + x2^2 / 2
    cv = np.stack([x1, x2], axis=1)
    fes = est.free_energy_surface(cv, log_w, bins=(20, 10), range=[(-2.6, 2.6), (-2.5, 2.5)],
                                  n_bootstrap=20, rng=28)
    e1, e2 = fes.edges
    p1 = np.array([integrate.quad(lambda s: math.exp(-(s**4 - 6 * s**2 + s)), lo, hi)[0]
                   for lo, hi in zip(e1[:-1], e1[1:])])
    p2 = np.diff(stats.norm.cdf(e2))
    exact = -np.log(np.outer(p1, p2) / np.outer(np.diff(e1), np.diff(e2)))
    assert fes.f_kT.shape == (20, 10)
    mask = fes.counts > 50
    assert mask.sum() > 60
    assert est.fes_rmse(fes.f_kT, exact, mask) < 0.1


def test_jensen_shannon_known_values() -> None:
    p = np.array([[1.0, 3.0], [0.0, 4.0]])
    assert est.jensen_shannon(p, 10 * p) == pytest.approx(0.0, abs=1e-15)
    assert est.jensen_shannon([1, 0], [0, 1]) == pytest.approx(math.log(2))
    expected = 0.5 * math.log(4 / 3) + 0.5 * (0.5 * math.log(2 / 3) + 0.5 * math.log(2))
    assert est.jensen_shannon([1, 0], [1, 1]) == pytest.approx(expected)
    with pytest.raises(ValueError):
        est.jensen_shannon([1, -1], [1, 1])


def test_fes_rmse_ignores_constant_shift() -> None:
    rng = _rng(29)
    f1 = rng.normal(size=(5, 5))
    noise = rng.normal(scale=0.1, size=(5, 5))
    assert est.fes_rmse(f1, f1 + 3.0, np.ones((5, 5), dtype=bool)) == pytest.approx(0.0, abs=1e-12)
    assert est.fes_rmse(f1, f1 + noise + 2.0) == pytest.approx(np.std(noise))
    f2 = f1.copy()
    f2[0, 0] = np.inf
    with pytest.raises(ValueError, match="not finite"):
        est.fes_rmse(f1, f2, np.ones((5, 5), dtype=bool))
    assert np.isfinite(est.fes_rmse(f1, f2))  # default mask: bins finite in both


def test_batch_means_tau_matches_ar1_and_survives_chains_that_never_move() -> None:
    rho = 0.8
    x = _ar1(_rng(30), rho, chains=1000, t=1000)
    assert est.batch_means_tau(x) == pytest.approx((1 + rho) / (1 - rho), rel=0.15)
    assert est.batch_means_tau(_rng(31).normal(size=(1000, 200))) == pytest.approx(1.0, rel=0.15)
    # A rare-state indicator: most chains never visit the state, yet tau stays finite.
    rare = np.zeros((100, 50))
    rare[:10, 20:] = 1.0
    assert est.integrated_autocorrelation_time(rare) == math.inf
    tau = est.batch_means_tau(rare)
    assert math.isfinite(tau) and 1.0 < tau <= 50.0
    assert est.batch_means_tau(np.ones((3, 10))) == math.inf
    with pytest.raises(ValueError):
        est.batch_means_tau(np.zeros((1, 10)))
