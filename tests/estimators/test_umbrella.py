"""Tests for boltzgen.estimators.umbrella against a torsion profile known in closed form.

Samples are drawn exactly (by inverse CDF on a fine grid) from the biased ensembles, so the MBAR
and reweighting estimates can be compared with quadrature without running any dynamics.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from boltzgen.estimators.histograms import FreeEnergySurface
from boltzgen.estimators.umbrella import (
    _count_transitions,
    analyze_flattened_umbrella,
    analyze_umbrella,
    bin_centers,
    umbrella_bias,
)

GRID = np.linspace(-math.pi, math.pi, 400_000, endpoint=False)
KT = 2.5  # kJ/mol; any value, the estimators only see the ratio k / kT


def profile_kT(phi: np.ndarray) -> np.ndarray:
    """F(phi) in kT, minimum about 0: two asymmetric wells with a barrier of about 5 kT."""
    phi = np.asarray(phi, dtype=np.float64)
    return 2.4 * (1.0 + np.cos(phi)) + 0.6 * (1.0 + np.cos(2.0 * phi - 1.0))


def state_b(phi: np.ndarray) -> np.ndarray:
    return (phi > 0.0) & (phi < 2.6)


def exact_delta_f() -> float:
    w = np.exp(-profile_kT(GRID))
    b = state_b(GRID)
    return float(-np.log(w[b].sum() / w[~b].sum()))


def exact_bin_profile(edges: np.ndarray) -> np.ndarray:
    p = np.bincount(np.digitize(GRID, edges) - 1, weights=np.exp(-profile_kT(GRID)), minlength=len(edges) - 1)
    f = -np.log(p / p.sum())
    return f - f.min()


def draw(log_density: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` independent angles from the density ``exp(log_density)`` on GRID (rad, in [-pi, pi))."""
    p = np.exp(log_density - log_density.max())
    cdf = np.cumsum(p) / p.sum()
    idx = np.minimum(np.searchsorted(cdf, rng.uniform(size=n)), len(GRID) - 1)
    return GRID[idx] + rng.uniform(0.0, 2.0 * math.pi / len(GRID), size=n)


def test_umbrella_bias_is_periodic_and_in_the_unit_of_k() -> None:
    phi = np.array([math.pi - 0.1, 0.0, -1.0])
    centers = np.array([-math.pi + 0.1, 0.0])
    bias = umbrella_bias(phi, centers, 10.0)
    assert bias.shape == (2, 3) and bias.dtype == np.float64
    assert bias[0, 0] == pytest.approx(0.5 * 10.0 * 0.2**2)  # across the seam, not the long way round
    np.testing.assert_allclose(bias[1], [0.5 * 10.0 * (math.pi - 0.1) ** 2, 0.0, 5.0])
    np.testing.assert_allclose(umbrella_bias(phi, centers, 10.0 / KT), bias / KT)
    np.testing.assert_allclose(bin_centers(np.array([0.0, 1.0, 3.0])), [0.5, 2.0])


@pytest.mark.parametrize("subsample", [False, True])
def test_analyze_umbrella_matches_quadrature(subsample: bool) -> None:
    rng = np.random.default_rng(3)
    k = 50.0  # kJ/mol/rad^2: windows sqrt(kT/k) = 13 deg wide
    centers = np.radians(np.arange(-180.0, 180.0, 15.0))
    phi = [draw(-profile_kT(GRID) - umbrella_bias(GRID, [c], k / KT)[0], 1000, rng) for c in centers]
    est = analyze_umbrella(phi, centers, k, KT, state_b, bin_width_deg=10.0, subsample=subsample)

    exact = exact_delta_f()
    assert 0.0 < est.stderr_kT < 0.1
    assert abs(est.delta_f_kT - exact) < 4 * est.stderr_kT, (est.delta_f_kT, est.stderr_kT, exact)
    assert all(abs(h - exact) < 0.3 for h in est.delta_f_halves_kT)
    assert est.halves_stderr_kT == pytest.approx(abs(np.subtract(*est.delta_f_halves_kT)) / 2)
    p_b_exact = 1.0 / (1.0 + math.exp(exact))
    assert est.p_b == pytest.approx(p_b_exact, abs=4 * est.stderr_kT * p_b_exact)
    if subsample:  # independent draws: little to thin out
        assert np.all(est.statistical_inefficiency >= 1.0) and np.all(est.statistical_inefficiency < 3.0)
    else:
        np.testing.assert_array_equal(est.statistical_inefficiency, 1.0)
        np.testing.assert_array_equal(est.n_uncorrelated, 1000)

    prof = est.profile
    assert isinstance(prof, FreeEnergySurface) and len(prof.edges) == 1 and len(prof.f_kT) == 36
    assert prof.edges[0][0] == -math.pi and prof.edges[0][-1] == math.pi
    assert prof.counts.sum() == est.n_uncorrelated.sum()
    assert np.nanmin(prof.f_kT) == 0.0 and prof.stderr_kT[np.argmin(prof.f_kT)] == 0.0
    d = prof.f_kT - exact_bin_profile(prof.edges[0])
    assert np.max(np.abs(d - d.mean())) < 4 * np.max(prof.stderr_kT), np.round(d - d.mean(), 2)
    assert np.all(prof.stderr_kT >= 0.0) and np.max(prof.stderr_kT) < 0.2


def test_analyze_umbrella_refuses_mismatched_windows() -> None:
    with pytest.raises(ValueError, match="centres"):
        analyze_umbrella([np.zeros(10)], [0.0, 1.0], 10.0, KT, state_b)
    with pytest.raises(ValueError, match="state_b"):
        analyze_umbrella([np.zeros(10), np.ones(10)], [0.0, 1.0], 10.0, KT, lambda phi: True, subsample=False)


def test_flattened_reweighting_sign_profile_and_transitions() -> None:
    """Independent samples from the flattened (uniform) ensemble: exp(+V/kT) recovers the exact ΔF,
    exp(-V/kT) does not."""
    f_min = profile_kT(GRID).min()

    def flattened(phi: np.ndarray) -> np.ndarray:
        return profile_kT(phi) - f_min

    # V = -kT F exactly cancels the profile, so the biased ensemble is uniform on the circle.
    phi = np.random.default_rng(1).uniform(-math.pi, math.pi, size=(2, 100_000))
    bias_kT = -flattened(phi)
    est = analyze_flattened_umbrella(phi, bias_kT, state_b=state_b, flattened_profile_kT=flattened, n_blocks=10)
    exact = exact_delta_f()
    assert abs(est.delta_f_kT - exact) < max(4 * est.stderr_kT, 0.03), (est.delta_f_kT, est.stderr_kT, exact)
    assert len(est.repeat_delta_f_kT) == 2 and len(est.repeat_stderr_kT) == 2 and est.n_samples == phi.size
    assert est.repeat_spread_kT == pytest.approx(np.std(est.repeat_delta_f_kT, ddof=1))
    assert est.p_b == pytest.approx(1.0 / (1.0 + math.exp(exact)), rel=0.05)
    assert 0.0 < est.n_eff < phi.size
    assert all(t > 1000 for t in est.transitions)  # independent samples hop between cores all the time
    wrong = analyze_flattened_umbrella(phi, -bias_kT, state_b=state_b, flattened_profile_kT=flattened, n_blocks=10)
    assert abs(wrong.delta_f_kT - exact) > 1.0

    # The reweighted profile is the exact one (bins of 5 degrees, minimum 0).
    prof = est.profile
    assert isinstance(prof, FreeEnergySurface) and len(prof.f_kT) == 72 and np.min(prof.f_kT) == 0.0
    d = prof.f_kT - exact_bin_profile(prof.edges[0])
    assert np.max(np.abs(d - d.mean())) < 0.1 + 4 * np.nanmax(prof.stderr_kT)
    assert np.all(np.isfinite(prof.stderr_kT)) and np.all(prof.stderr_kT > 0.0)

    # One repeat as a [T] series: no spread.
    single = analyze_flattened_umbrella(phi[0], bias_kT[0], state_b=state_b, flattened_profile_kT=flattened)
    assert math.isnan(single.repeat_spread_kT) and single.delta_f_kT == pytest.approx(est.repeat_delta_f_kT[0])
    with pytest.raises(ValueError, match="same shape"):
        analyze_flattened_umbrella(phi, bias_kT[0], state_b=state_b, flattened_profile_kT=flattened)


def test_count_transitions_counts_core_changes_only() -> None:
    # Recrossings of the boundary between the cores (label -1) do not count.
    assert _count_transitions(np.array([0, 0, -1, 0, -1, 1, 1, -1, 1, -1, 0, 0])) == 2
    assert _count_transitions(np.array([-1, -1, 1])) == 0
    assert _count_transitions(np.array([], dtype=int)) == 0
