"""Correlated series against AR(1) processes, whose autocorrelation time is known exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from boltzgen.estimators import timeseries
from tests.estimators.analytic import ar1


def test_block_means_drop_the_trailing_frames() -> None:
    x = np.arange(23.0).reshape(1, 23)
    # 3 blocks of 7 frames, frames 21 and 22 dropped
    np.testing.assert_array_equal(timeseries.block_means(x, 3), [3.0, 10.0, 17.0])
    two = np.stack([np.arange(10.0), 100 + np.arange(10.0)])
    np.testing.assert_array_equal(timeseries.block_means(two, 1), [4.5, 104.5])  # a chain is a block
    with pytest.raises(ValueError, match="at least 2 blocks"):
        timeseries.block_means(x, 1)
    with pytest.raises(ValueError, match="n_blocks <= T"):
        timeseries.block_means(x, 24)


def test_tau_int_of_ar1_process() -> None:
    rho = 0.8
    x = ar1(np.random.default_rng(19), rho, chains=4, t=25_000)
    assert timeseries.integrated_autocorrelation_time(x) == pytest.approx((1 + rho) / (1 - rho), rel=0.1)
    iid = np.random.default_rng(20).normal(size=20_000)
    assert timeseries.integrated_autocorrelation_time(iid) == pytest.approx(1.0, abs=0.1)
    assert timeseries.integrated_autocorrelation_time(np.ones((2, 100))) == math.inf
    with pytest.warns(RuntimeWarning, match="shorter than 50 tau"):
        timeseries.integrated_autocorrelation_time(ar1(np.random.default_rng(21), 0.99, chains=1, t=500))


def test_batch_means_tau_matches_ar1_and_survives_chains_that_never_move() -> None:
    rho = 0.8
    x = ar1(np.random.default_rng(30), rho, chains=1000, t=1000)
    assert timeseries.batch_means_tau(x) == pytest.approx((1 + rho) / (1 - rho), rel=0.15)
    iid = np.random.default_rng(31).normal(size=(1000, 200))
    assert timeseries.batch_means_tau(iid) == pytest.approx(1.0, rel=0.15)
    # A rare-state indicator: most chains never visit the state, yet tau stays finite.
    rare = np.zeros((100, 50))
    rare[:10, 20:] = 1.0
    assert timeseries.integrated_autocorrelation_time(rare) == math.inf
    tau = timeseries.batch_means_tau(rare)
    assert math.isfinite(tau) and 1.0 < tau <= 50.0
    assert timeseries.batch_means_tau(np.ones((3, 10))) == math.inf
    with pytest.raises(ValueError):
        timeseries.batch_means_tau(np.zeros((1, 10)))
