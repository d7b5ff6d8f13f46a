"""Tests for boltzgen.estimators.remd against exact answers: a harmonic well at several temperatures."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from boltzgen.estimators.free_energy import delta_f_blocked
from boltzgen.estimators.remd import pair_acceptance, remd_free_energies, round_trips
from tests.estimators.analytic import ar1

#: u(x) = x^2 / 2 at the target temperature (kT); at temperature ratio r the reduced potential is u / r.
RATIOS = np.array([1.0, 1.4, 2.0])
CUT = 0.5
EXACT = -math.log(stats.norm.sf(CUT) / stats.norm.cdf(CUT))  # F(B) - F(A), B = {x >= 0.5}


def _replicas(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``reduced [T, R, K]`` and ``states [T, R]`` for replicas that stay at their own temperature
    (replica r at state r); ``x`` ``[T, R]`` are standard normal draws, scaled here to their temperature."""
    t, r = x.shape
    positions = x * np.sqrt(RATIOS[:r])[None, :]
    reduced = positions[:, :, None] ** 2 / 2 / RATIOS[None, None, :]
    return reduced, np.tile(np.arange(r), (t, 1)), positions


def test_mbar_over_temperatures_recovers_the_exact_free_energies() -> None:
    rng = np.random.default_rng(1)
    reduced, states, x = _replicas(rng.normal(size=(3000, 3)))
    result = remd_free_energies(reduced, states, {"A": x < CUT, "B": x >= CUT}, [("A", "B")], target=0, n_blocks=20)
    est = result.pairs[("A", "B")]
    assert abs(est.value - EXACT) < 4 * est.stderr and 0.005 < est.stderr < 0.05
    # f(T) = -log sqrt(2 pi r): differences to the target are -log(r) / 2.
    np.testing.assert_allclose(result.f_k, -0.5 * np.log(RATIOS), atol=0.03)
    assert result.n_frames == 9000 and result.log_w.shape == (3000, 3)
    assert np.exp(result.log_w).sum() == pytest.approx(1.0)
    # Another rung as the target: the same well, hotter.
    hot = remd_free_energies(reduced, states, {"A": x < CUT, "B": x >= CUT}, [("A", "B")], target=2, n_blocks=20)
    exact_hot = -math.log(stats.norm.sf(CUT / math.sqrt(2.0)) / stats.norm.cdf(CUT / math.sqrt(2.0)))
    assert abs(hot.pairs[("A", "B")].value - exact_hot) < 4 * hot.pairs[("A", "B")].stderr


def test_one_replica_reduces_to_the_block_jackknife_of_plain_md() -> None:
    """With one temperature the MBAR weights are equal and the jackknife is delta_f_blocked's, exactly."""
    x = ar1(np.random.default_rng(2), 0.9, 1, 4000)[0]
    reduced = (x**2 / 2)[:, None, None]
    masks = {"A": x[:, None] < CUT, "B": x[:, None] >= CUT}
    result = remd_free_energies(reduced, np.zeros((4000, 1), dtype=int), masks,
                                [("A", "B")], target=0, n_blocks=20)
    reference = delta_f_blocked(x < CUT, x >= CUT, n_blocks=20)
    assert result.pairs[("A", "B")].value == pytest.approx(reference.value, rel=1e-10)
    assert result.pairs[("A", "B")].stderr == pytest.approx(reference.stderr, rel=1e-8)


def test_jackknife_error_accounts_for_correlation_in_time() -> None:
    """Strongly correlated replicas (AR(1), rho = 0.95, tau = 39): the jackknife error matches the
    spread of independent repeats, where an error for independent frames would be ~6x too small."""
    estimates, errors = [], []
    for seed in range(16):
        rng = np.random.default_rng(100 + seed)
        reduced, states, x = _replicas(ar1(rng, 0.95, 3, 1200).T * math.sqrt(1 - 0.95**2))  # unit variance
        est = remd_free_energies(reduced, states, {"A": x < CUT, "B": x >= CUT}, [("A", "B")], 0, 12).pairs[("A", "B")]
        estimates.append(est.value)
        errors.append(est.stderr)
    spread = float(np.std(estimates, ddof=1))
    assert 0.6 < float(np.mean(errors)) / spread < 1.7
    assert abs(np.mean(estimates) - EXACT) < 4 * spread / math.sqrt(len(estimates))


def test_frames_left_out_give_the_restricted_ensemble() -> None:
    rng = np.random.default_rng(3)
    reduced, states, x = _replicas(rng.normal(size=(3000, 3)))
    keep = x < 1.5  # at every temperature: the well restricted to x < 1.5
    result = remd_free_energies(reduced, states, {"A": x < CUT, "B": x >= CUT}, [("A", "B")], 0, 20, keep=keep)
    est = result.pairs[("A", "B")]
    exact = -math.log((stats.norm.cdf(1.5) - stats.norm.cdf(CUT)) / stats.norm.cdf(CUT))
    assert abs(est.value - exact) < 4 * est.stderr
    assert np.all(np.isneginf(result.log_w[~keep])) and result.n_frames == int(keep.sum())


def test_empty_state_and_bad_input() -> None:
    rng = np.random.default_rng(4)
    reduced, states, x = _replicas(rng.normal(size=(100, 3)))
    result = remd_free_energies(reduced, states, {"A": x < 100.0, "B": x > 100.0}, [("A", "B")], 0, 4)
    assert result.pairs[("A", "B")].value == math.inf and result.pairs[("A", "B")].empty_state == "B"
    with pytest.raises(ValueError, match="n_blocks"):
        remd_free_energies(reduced, states, {"A": x < 0}, [], 0, 101)
    with pytest.raises(ValueError, match="non-finite"):
        remd_free_energies(np.where(reduced > 1, np.nan, reduced), states, {"A": x < 0}, [], 0, 4)
    with pytest.raises(ValueError, match=r"\[T, R, K\]"):
        remd_free_energies(reduced[:, :, 0], states, {"A": x < 0}, [], 0, 4)
    with pytest.raises(ValueError, match="states must lie"):
        remd_free_energies(reduced, states + 1, {"A": x < 0}, [], 0, 4)


def test_round_trips_count_bottom_top_bottom() -> None:
    states = np.array([[0, 2], [1, 1], [2, 0], [1, 0], [0, 1], [2, 2], [0, 0]])
    # replica 0: 0 -> 2 -> 0 -> 2 -> 0: two trips; replica 1 starts at the top: 2 -> 0 is half a trip,
    # then 0 -> 2 -> 0 one trip.
    np.testing.assert_array_equal(round_trips(states, 3), [2, 1])
    np.testing.assert_array_equal(round_trips(np.ones((5, 2), dtype=int), 3), [0, 0])
    with pytest.raises(ValueError):
        round_trips(states[:, 0], 3)


def test_pair_acceptance_counts_both_directions() -> None:
    accepted = np.array([[0, 3, 0], [2, 0, 0], [0, 1, 0]])
    proposed = np.array([[0, 5, 0], [5, 0, 4], [0, 4, 0]])
    np.testing.assert_allclose(pair_acceptance(accepted, proposed), [0.5, 1 / 8])
    assert math.isnan(pair_acceptance(np.zeros((2, 2)), np.zeros((2, 2)))[0])
