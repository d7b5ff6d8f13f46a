"""Free-energy surfaces and their distances against analytic densities and quadrature."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from boltzgen.estimators import histograms
from tests.estimators.analytic import double_well_boltzmann_integral, double_well_samples


def test_fes_1d_gaussian_against_analytic() -> None:
    n = 100_000
    x = np.random.default_rng(24).normal(size=n)
    fes = histograms.free_energy_surface(x, bins=30, range=(-3, 3), n_bootstrap=50, rng=25)
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
    assert histograms.fes_rmse(fes.f_kT, exact) < 0.06
    shifted_wrong = -np.log(stats.norm.pdf(0.9 * (edges[:-1] + edges[1:]) / 2))
    assert histograms.fes_rmse(fes.f_kT, shifted_wrong) > 0.1  # the comparison has power


def test_fes_empty_bins_are_inf() -> None:
    x = np.random.default_rng(26).uniform(0, 1, size=1000)
    fes = histograms.free_energy_surface(x, bins=4, range=(0, 2), n_bootstrap=10, rng=0)
    assert np.all(np.isfinite(fes.f_kT[:2])) and np.all(fes.f_kT[2:] == np.inf)
    assert np.all(np.isnan(fes.stderr_kT[2:]))


def test_fes_2d_weighted_double_well_against_quadrature() -> None:
    rng = np.random.default_rng(27)
    n = 60_000
    x1, log_w1 = double_well_samples(rng, n)
    x2 = 1.3 * rng.normal(size=n)
    log_w = log_w1 - 0.5 * x2**2 - stats.norm.logpdf(x2, scale=1.3)  # u = u1(x1) + x2^2 / 2
    cv = np.stack([x1, x2], axis=1)
    fes = histograms.free_energy_surface(
        cv, log_w, bins=(20, 10), range=[(-2.6, 2.6), (-2.5, 2.5)], n_bootstrap=20, rng=28
    )
    e1, e2 = fes.edges
    p1 = np.array([double_well_boltzmann_integral(lo, hi) for lo, hi in zip(e1[:-1], e1[1:])])
    p2 = np.diff(stats.norm.cdf(e2))
    exact = -np.log(np.outer(p1, p2) / np.outer(np.diff(e1), np.diff(e2)))
    assert fes.f_kT.shape == (20, 10)
    mask = fes.counts > 50
    assert mask.sum() > 60
    assert histograms.fes_rmse(fes.f_kT, exact, mask) < 0.1


def test_jensen_shannon_known_values() -> None:
    p = np.array([[1.0, 3.0], [0.0, 4.0]])
    assert histograms.jensen_shannon(p, 10 * p) == pytest.approx(0.0, abs=1e-15)
    assert histograms.jensen_shannon([1, 0], [0, 1]) == pytest.approx(math.log(2))
    expected = 0.5 * math.log(4 / 3) + 0.5 * (0.5 * math.log(2 / 3) + 0.5 * math.log(2))
    assert histograms.jensen_shannon([1, 0], [1, 1]) == pytest.approx(expected)
    with pytest.raises(ValueError):
        histograms.jensen_shannon([1, -1], [1, 1])


def test_fes_rmse_ignores_constant_shift() -> None:
    rng = np.random.default_rng(29)
    f1 = rng.normal(size=(5, 5))
    noise = rng.normal(scale=0.1, size=(5, 5))
    assert histograms.fes_rmse(f1, f1 + 3.0, np.ones((5, 5), dtype=bool)) == pytest.approx(0.0, abs=1e-12)
    assert histograms.fes_rmse(f1, f1 + noise + 2.0) == pytest.approx(np.std(noise))
    f2 = f1.copy()
    f2[0, 0] = np.inf
    with pytest.raises(ValueError, match="not finite"):
        histograms.fes_rmse(f1, f2, np.ones((5, 5), dtype=bool))
    assert np.isfinite(histograms.fes_rmse(f1, f2))  # default mask: bins finite in both
