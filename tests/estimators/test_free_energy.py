"""Free-energy differences against exact answers: double-well quadrature, harmonic wells, AR(1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from boltzgen.estimators import arrays, free_energy
from tests.estimators.analytic import ar1, double_well_delta_f, double_well_samples

# ----------------------------------------------------------------------------- ΔF between states


def test_delta_f_double_well_against_quadrature() -> None:
    x, log_w = double_well_samples(np.random.default_rng(10), 20_000)
    result = free_energy.delta_f(x < 0, x > 0, log_w, n_bootstrap=100, rng=11)
    exact = double_well_delta_f()
    assert exact == pytest.approx(3.38, abs=0.05)  # exact value by quadrature: 3.38 kT
    assert 0 < result.stderr < 0.1
    assert abs(result.value - exact) < 4 * result.stderr
    assert result.empty_state is None and result.n_resamples_invalid == 0


def test_delta_f_unweighted_against_known_populations() -> None:
    in_a = np.random.default_rng(12).random(10_000) < 0.2
    result = free_energy.delta_f(in_a, ~in_a, n_bootstrap=100, rng=13)
    assert abs(result.value - (-math.log(0.8 / 0.2))) < 4 * result.stderr
    # binomial error propagated: Var(ln p_a - ln p_b) = 1 / (N p (1 - p))
    assert result.stderr == pytest.approx(1 / math.sqrt(10_000 * 0.2 * 0.8), rel=0.2)
    assert result.n_eff == pytest.approx(in_a.sum())


def test_delta_f_empty_state_is_reported_not_raised() -> None:
    x = np.random.default_rng(14).normal(size=100)
    b_empty = free_energy.delta_f(x < 0, x > 100)
    assert b_empty.value == math.inf and b_empty.empty_state == "B" and math.isnan(b_empty.stderr)
    a_empty = free_energy.delta_f(x > 100, x < 0)
    assert a_empty.value == -math.inf and a_empty.empty_state == "A"
    log_w = np.where(x > 0, -np.inf, 0.0)  # state B only holds zero-weight samples
    result = free_energy.delta_f(x < 0, x > 0, log_w)
    assert result.empty_state == "B" and result.n_nonfinite == (x > 0).sum()
    assert math.isnan(free_energy.delta_f(x > 100, x > 100).value)


def test_bootstrap_stderr_matches_spread_over_repeats() -> None:
    values, errors = [], []
    for seed in range(40):
        x, log_w = double_well_samples(np.random.default_rng(100 + seed), 2000)
        result = free_energy.delta_f(x < 0, x > 0, log_w, n_bootstrap=100, rng=seed)
        values.append(result.value)
        errors.append(result.stderr)
    ratio = np.mean(errors) / np.std(values, ddof=1)
    assert 0.7 < ratio < 1.4


# ----------------------------------------------------------------------------- correlated series


def test_delta_f_blocked_on_correlated_two_state_series() -> None:
    rho, t = 0.95, 20_000
    sigma = 1 / math.sqrt(1 - rho**2)
    exact = -math.log(stats.norm.sf(0.5) / 0.5)  # A: x < 0, B: x > 0.5 sigma; P_A = 1/2
    values, errors = [], []
    for seed in range(40):
        x = ar1(np.random.default_rng(200 + seed), rho, chains=1, t=t)[0]
        result = free_energy.delta_f_blocked(x < 0, x > 0.5 * sigma, n_blocks=20)
        values.append(result.value)
        errors.append(result.stderr)
    assert abs(np.mean(values) - exact) < 4 * np.std(values, ddof=1) / math.sqrt(40)
    assert 0.6 < np.mean(errors) / np.std(values, ddof=1) < 1.6
    iid = free_energy.delta_f(x < 0, x > 0.5 * sigma, n_bootstrap=50, rng=0)
    assert result.stderr > 2 * iid.stderr  # correlation matters and is seen
    assert result.n_eff < 0.5 * iid.n_eff
    chains = ar1(np.random.default_rng(23), rho, chains=4, t=5000)
    assert np.isfinite(free_energy.delta_f_blocked(chains < 0, chains > 0.5 * sigma).stderr)


def test_delta_f_blocked_state_in_one_block_has_infinite_error() -> None:
    in_b = np.zeros(1000, dtype=bool)
    in_b[10:20] = True
    result = free_energy.delta_f_blocked(~in_b, in_b, n_blocks=10)
    assert np.isfinite(result.value) and result.stderr == math.inf
    assert result.n_resamples_invalid == 1


# ----------------------------------------------------------------------------- MBAR


def test_mbar_three_harmonic_oscillators() -> None:
    rng = np.random.default_rng(18)
    ks = np.array([1.0, 2.0, 4.0])
    x = np.concatenate([rng.normal(scale=1 / math.sqrt(k), size=3000) for k in ks])
    u_kn = 0.5 * ks[:, None] * x[None, :] ** 2
    result = free_energy.mbar_free_energies(u_kn, [3000, 3000, 3000])
    exact = 0.5 * np.log(ks / ks[0])  # F_k = -ln sqrt(2 pi / k)
    assert result.f_k[0] == 0.0
    assert np.all(np.abs(result.f_k[1:] - exact[1:]) < 4 * result.stderr_k[1:])
    assert abs(result.delta_f[1, 2] - (exact[2] - exact[1])) < 4 * result.stderr_delta_f[1, 2]
    assert np.all((0 < result.n_eff) & (result.n_eff <= 9000))


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


def _importance_sampling_delta_f(u0: np.ndarray, log_q: np.ndarray, r: float) -> tuple[float, float]:
    """``f(r) - f(1)`` by plain importance sampling, with its delta-method standard error.

    ``Z_r ≈ mean_i exp(-u0_i / r - log q_i)``; the error of ``ln Z_r - ln Z_1`` is the standard
    deviation of ``w_r / mean(w_r) - w_1 / mean(w_1)`` over sqrt(N).
    """
    lw_r, lw_1 = -u0 / r - log_q, -u0 - log_q
    value = -(logsumexp(lw_r) - logsumexp(lw_1))
    w_r, w_1 = np.exp(lw_r - lw_r.max()), np.exp(lw_1 - lw_1.max())
    spread = w_r / w_r.mean() - w_1 / w_1.mean()
    return float(value), float(np.std(spread, ddof=1) / math.sqrt(u0.size))


def test_thermodynamic_mbar_gaussian_matches_exact_and_importance_sampling() -> None:
    dim = 3
    u0, log_q = _wide_gaussian_flow(np.random.default_rng(30), 20_000, dim)
    ratios = [0.8, 1.0, 1.3]
    results = free_energy.thermodynamic_free_energies_mbar(u0, log_q, ratios)
    assert len(results) == 3
    for r, result in zip(ratios, results):
        exact = -0.5 * dim * math.log(r)
        if r == 1.0:
            assert result.value == 0.0 and result.stderr == 0.0
            continue
        assert 0 < result.stderr < 0.1
        assert abs(result.value - exact) < 4 * result.stderr, (r, result, exact)
        # one sampled state: MBAR is importance sampling, its asymptotic error agrees with the delta method
        is_value, is_stderr = _importance_sampling_delta_f(u0, log_q, r)
        assert result.value == pytest.approx(is_value, rel=1e-9, abs=1e-12)
        assert result.stderr == pytest.approx(is_stderr, rel=1e-3)
        assert result.n_eff == pytest.approx(arrays.kish_count(-u0 / r - log_q), rel=1e-6)
        assert result.n_nonfinite == 0


def test_thermodynamic_mbar_drops_and_counts_nonfinite() -> None:
    u0, log_q = _wide_gaussian_flow(np.random.default_rng(31), 4000)
    clean = free_energy.thermodynamic_free_energies_mbar(u0, log_q, [1.2])[0]
    bad_u, bad_q = u0.copy(), log_q.copy()
    bad_u[[0, 7]] = [np.nan, -np.inf]
    bad_q[[3, 9]] = [np.inf, np.nan]
    keep = np.ones(u0.size, dtype=bool)
    keep[[0, 3, 7, 9]] = False
    result = free_energy.thermodynamic_free_energies_mbar(bad_u, bad_q, [1.2])[0]
    expected = free_energy.thermodynamic_free_energies_mbar(u0[keep], log_q[keep], [1.2])[0]
    assert result.n_nonfinite == 4 and expected.n_nonfinite == 0
    assert result.value == pytest.approx(expected.value, rel=1e-12)
    assert result.stderr == pytest.approx(expected.stderr, rel=1e-9)
    # excluded, not set to 0: a zero in place of the bad values would shift the estimate
    zeroed = free_energy.thermodynamic_free_energies_mbar(
        np.nan_to_num(bad_u, posinf=0, neginf=0), np.nan_to_num(bad_q, posinf=0, neginf=0), [1.2]
    )[0]
    assert zeroed.value != pytest.approx(result.value, rel=1e-9)
    assert abs(result.value - clean.value) < clean.stderr
    with pytest.raises(ValueError, match="positive"):
        free_energy.thermodynamic_free_energies_mbar(u0, log_q, [1.0, -2.0])
    with pytest.raises(ValueError, match="finite"):
        free_energy.thermodynamic_free_energies_mbar(np.full(3, np.nan), np.zeros(3), [1.5])
