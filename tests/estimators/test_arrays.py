"""The shared numerics: non-finite log-weights, log-sums, the bootstrap."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from boltzgen.estimators import arrays


def test_clean_log_w_makes_every_nonfinite_entry_minus_inf() -> None:
    lw, n_bad = arrays.clean_log_w(torch.tensor([0.5, np.nan, np.inf, -np.inf, -2.0], requires_grad=True))
    assert lw.dtype == np.float64 and n_bad == 3
    np.testing.assert_array_equal(lw, [0.5, -np.inf, -np.inf, -np.inf, -2.0])
    with pytest.raises(ValueError, match=r"shape \[N\]"):
        arrays.clean_log_w(np.zeros((3, 1)))
    with pytest.raises(ValueError, match="boolean"):
        arrays.as_bool(np.array([0, 1]), "in_a")


def test_log_sums_match_logsumexp_without_warnings() -> None:
    rng = np.random.default_rng(0)
    lw = 50.0 * rng.normal(size=300)
    counts = rng.integers(0, 3, size=300).astype(np.float64)
    resampled = arrays.log_sum_resampled(lw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert arrays.log_sum(lw) == pytest.approx(logsumexp(lw), rel=1e-12)
        assert arrays.log_sum(lw, counts) == pytest.approx(logsumexp(lw, b=counts), rel=1e-12)
        assert resampled(counts) == pytest.approx(logsumexp(lw, b=counts), rel=1e-12)
        assert resampled(np.zeros(300)) == -math.inf
        assert arrays.log_sum(np.full(4, -np.inf)) == -math.inf
        assert arrays.log_sum(np.empty(0)) == -math.inf
        assert arrays.kish_count(np.full(4, -np.inf)) == 0.0
    assert arrays.kish_count(np.log([1.0, 1.0, 2.0])) == pytest.approx(16 / 6)


def test_bootstrap_draws_resamples_of_size_n_and_finite_std_skips_bad_replicates() -> None:
    seen = []

    def statistic(counts: np.ndarray) -> float:
        seen.append(counts)
        return float(counts[0])

    reps = arrays.bootstrap(statistic, 50, 400, np.random.default_rng(1))
    assert reps.shape == (400,)
    assert all(c.shape == (50,) and c.sum() == 50 for c in seen)
    assert np.mean(reps) == pytest.approx(1.0, abs=0.15)  # each sample is drawn once on average
    std, n_bad = arrays.finite_std(np.array([1.0, 3.0, np.nan, np.inf]))
    assert std == pytest.approx(math.sqrt(2.0)) and n_bad == 2
    assert math.isnan(arrays.finite_std(np.array([1.0, np.nan]))[0])
