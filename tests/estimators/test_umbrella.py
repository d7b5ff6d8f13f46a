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


# ----------------------------------------------------------------------------------------------
# windows on a grid of CVs (boltzgen.estimators.umbrella_grid)
# ----------------------------------------------------------------------------------------------

from boltzgen.estimators.free_energy import import_pymbar  # noqa: E402
from boltzgen.estimators.umbrella_grid import (  # noqa: E402
    WindowGrid,
    _analytic_covariance,
    analyze_window_grid,
    profile_agreement,
    solve_mbar,
)

TORUS = 120  # grid points per angle of the 2-D quadrature
T_AXIS = np.linspace(-math.pi, math.pi, TORUS, endpoint=False) + math.pi / TORUS
PHI_2D, PSI_2D = np.meshgrid(T_AXIS, T_AXIS, indexing="ij")


def torus_kT(phi: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """F(phi, psi) in kT: wells that couple the two angles, barriers of a few kT."""
    return 2.0 * (1 + np.cos(phi)) + 1.0 * (1 + np.cos(psi - 0.5)) + 0.8 * np.cos(phi + psi) + 0.5 * np.sin(2 * phi)


def torus_b(phi: np.ndarray) -> np.ndarray:
    return (phi > 0.0) & (phi < 2.2)


def draw_torus(log_density: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` independent points ``[n, 2]`` from ``exp(log_density)`` on the torus grid, jittered in their cell."""
    p = np.exp(log_density.ravel() - log_density.max())
    idx = rng.choice(p.size, n, p=p / p.sum())
    h = math.pi / TORUS
    x = np.stack([PHI_2D.ravel()[idx], PSI_2D.ravel()[idx]], axis=1) + rng.uniform(-h, h, (n, 2))
    return np.remainder(x + math.pi, 2 * math.pi) - math.pi


def states_of(x: np.ndarray) -> np.ndarray:
    b = torus_b(x[:, 0])
    return np.stack([~b, b], axis=1)


def test_solve_mbar_and_its_analytic_error_match_pymbar() -> None:
    rng = np.random.default_rng(0)
    grid = WindowGrid(np.radians(np.arange(-180.0, 180.0, 45.0))[:, None], [6.0], [True])
    flat = np.stack([PHI_2D.ravel(), PSI_2D.ravel()], axis=1)
    bias = grid.bias_kT(flat[:, :1]).reshape(grid.n_windows, TORUS, TORUS)
    x = np.concatenate([draw_torus(-torus_kT(PHI_2D, PSI_2D) - bias[k], 150, rng) for k in range(grid.n_windows)])
    u_kn, n_k = grid.bias_kT(x[:, :1]), np.full(grid.n_windows, 150)
    mbar = import_pymbar().MBAR(u_kn, n_k)
    f_k = solve_mbar(u_kn, n_k)
    np.testing.assert_allclose(f_k, mbar.f_k, atol=1e-8)
    b = torus_b(x[:, 0])
    with np.errstate(divide="ignore"):
        res = mbar.compute_expectations(b.astype(float), u_kn=np.zeros(len(b)))
    p, sigma = float(np.ravel(res["mu"])[0]), float(np.ravel(res["sigma"])[0])
    cov = _analytic_covariance(u_kn, n_k, f_k, np.stack([~b, b], axis=1))
    assert math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]) == pytest.approx(sigma / (p * (1 - p)), rel=1e-6)


def test_window_grid_2d_recovers_the_exact_delta_f_and_surface() -> None:
    """Independent draws from the 2-D biased densities of a 10 x 10 grid on the torus: MBAR recovers
    the exact ΔF and the exact profiles and surface within their error bars."""
    rng = np.random.default_rng(1)
    axis = np.radians(np.arange(-180.0, 180.0, 36.0))
    centers = np.array([(a, b) for a in axis for b in axis])
    grid = WindowGrid(centers, [8.0, 8.0], [True, True])
    flat = np.stack([PHI_2D.ravel(), PSI_2D.ravel()], axis=1)
    bias = grid.bias_kT(flat).reshape(grid.n_windows, TORUS, TORUS)
    values = [draw_torus(-torus_kT(PHI_2D, PSI_2D) - bias[k], 150, rng) for k in range(grid.n_windows)]
    edges = [np.linspace(-math.pi, math.pi, 13)] * 2
    est = analyze_window_grid(grid, values, [states_of(v) for v in values], edges, n_bootstrap=10, n_blocks=5, rng=2)

    w = np.exp(-torus_kT(PHI_2D, PSI_2D))
    b = torus_b(PHI_2D)
    exact = -math.log(w[b].sum() / w[~b].sum())
    assert est.delta_f_kT.shape == (1,) and 0 < est.stderr_kT[0] < 0.1
    assert est.stderr_kT[0] == max(est.stderr_analytic_kT[0], est.stderr_bootstrap_kT[0])
    assert abs(est.delta_f_kT[0] - exact) < 4 * est.stderr_kT[0], (est.delta_f_kT, est.stderr_kT, exact)
    assert est.p_states.sum() == pytest.approx(1.0) and est.delta_f_halves_kT.shape == (2, 1)
    # Independent draws; the largest of four noisy estimates from 150 frames still leaves most frames.
    assert np.median(est.statistical_inefficiency) < 1.5 and est.thinning == 1
    np.testing.assert_array_equal(est.n_frames, 150)

    p_exact = np.histogram2d(PHI_2D.ravel(), PSI_2D.ravel(), bins=edges, weights=w.ravel())[0]
    f_exact = -np.log(p_exact / p_exact.sum())
    for d, profile in enumerate(est.profiles):
        marginal = -np.log(p_exact.sum(axis=1 - d) / p_exact.sum())
        diff = profile.f_kT - (marginal - marginal.min())
        assert np.all(np.abs(diff) < 4 * np.hypot(profile.stderr_kT, profile.stderr_kT[np.argmin(profile.f_kT)]) + 0.02)
    surface = est.surface
    low = f_exact - f_exact.min() < 4.0  # the bins with most of the probability
    diff = (surface.f_kT - (f_exact - f_exact.min()))[low]
    assert surface.f_kT.shape == (12, 12) and np.all(np.isfinite(surface.stderr_kT[low]))
    assert np.max(np.abs(diff - diff.mean())) < 0.05 + 4 * np.max(surface.stderr_kT[low])


def psi_b(psi: np.ndarray) -> np.ndarray:
    return (psi > 0.0) & (psi < 2.0)


def _sticky_psi_windows(rng: np.random.Generator, tau: int, n: int) -> tuple[WindowGrid, list, list]:
    """Windows on phi alone, states on psi; within each window psi is redrawn only every ``tau``
    frames (a slow coordinate the bias leaves free) and phi every frame given psi."""
    grid = WindowGrid(np.radians(np.arange(-180.0, 180.0, 30.0))[:, None], [10.0], [True])
    bias = grid.bias_kT(T_AXIS[:, None])
    values, states = [], []
    for k in range(grid.n_windows):
        log_p = -torus_kT(PHI_2D, PSI_2D) - bias[k][:, None]
        p = np.exp(log_p - log_p.max())
        psi_idx = rng.choice(TORUS, n // tau, p=p.sum(axis=0) / p.sum())
        phi = np.concatenate([T_AXIS[rng.choice(TORUS, tau, p=p[:, j] / p[:, j].sum())] for j in psi_idx])
        b = psi_b(np.repeat(T_AXIS[psi_idx], tau))
        values.append(phi[:, None])
        states.append(np.stack([~b, b], axis=1))
    return grid, values, states


def test_window_errors_see_a_slow_coordinate_the_bias_leaves_free() -> None:
    """States on psi, which each window holds for 25 frames. The analytic error of the frames
    decorrelated by the state indicators' inefficiency covers the spread of ΔF over independent
    repeats; taking every frame as independent makes it five times too small, and a bootstrap over
    blocks longer than 25 frames sees the correlation again."""
    rng = np.random.default_rng(3)
    edges = [np.linspace(-math.pi, math.pi, 13)]
    honest, naive = [], []
    for _ in range(12):
        grid, values, states = _sticky_psi_windows(rng, tau=25, n=500)
        honest.append(analyze_window_grid(grid, values, states, edges, n_bootstrap=0))
        naive.append(analyze_window_grid(grid, values, states, edges, subsample=False, n_bootstrap=10, n_blocks=10,
                                         rng=rng))
    spread = np.std([e.delta_f_kT[0] for e in honest], ddof=1)
    assert [e.delta_f_kT[0] for e in honest] == [e.delta_f_kT[0] for e in naive]  # every frame estimates ΔF
    assert np.median([np.median(e.statistical_inefficiency) for e in honest]) > 10
    assert 0.6 < np.mean([e.stderr_kT[0] for e in honest]) / spread < 1.7
    assert np.mean([e.stderr_analytic_kT[0] for e in naive]) / spread < 0.4
    assert 0.6 < np.mean([e.stderr_bootstrap_kT[0] for e in naive]) / spread < 1.7
    assert all(e.n_short_blocks == 0 for e in naive)  # blocks of 50 frames, g of ~25


def test_profile_agreement_flags_a_real_difference_only() -> None:
    rng = np.random.default_rng(4)
    f = np.linspace(0.0, 4.0, 30) ** 1.5
    se = np.full(30, 0.05)
    shifted = f + 2.0 + rng.normal(0.0, 0.05 * math.sqrt(2), 30)
    same = profile_agreement(shifted, se, f, se, np.ones(30, bool))
    assert same.n_bins == 30 and not same.disagree and same.rmse_kT < 0.15 and same.p_value > 1e-3
    bumped = shifted.copy()
    bumped[10:14] += 0.5
    bad = profile_agreement(bumped, se, f, se, np.ones(30, bool))
    assert bad.disagree and bad.max_abs_z > 5 and bad.p_value < 1e-6
    # The bump outside the compared bins does not count; fewer than two bins compare nothing.
    mask = np.ones(30, bool)
    mask[10:14] = False
    assert not profile_agreement(bumped, se, f, se, mask).disagree
    none = profile_agreement(bumped, se, f, se, np.zeros(30, bool))
    assert none.n_bins == 0 and not none.disagree and math.isnan(none.rmse_kT)


def test_window_grid_bias_is_periodic_and_inputs_are_checked() -> None:
    grid = WindowGrid([[math.pi - 0.1, 0.5], [0.0, 0.5]], [10.0, 4.0], [True, False])
    bias = grid.bias_kT(np.array([[-math.pi + 0.1, 1.5]]))
    assert bias.shape == (2, 1)
    assert bias[0, 0] == pytest.approx(0.5 * 10.0 * 0.2**2 + 0.5 * 4.0 * 1.0**2)
    with pytest.raises(ValueError, match="two windows"):
        WindowGrid([[0.0]], [1.0], [True])
    with pytest.raises(ValueError, match="windows"):
        analyze_window_grid(grid, [np.zeros((10, 2))], [np.zeros((10, 2), bool)], [np.linspace(0, 1, 3)] * 2)
