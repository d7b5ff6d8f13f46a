"""Numerical helpers shared by the estimators: float64 conversion, log-sums, the bootstrap.

Non-finite log-weights, the one rule used by every estimator: a log-weight that is NaN, +inf or
-inf means weight 0 (a non-finite energy or density gives weight 0). Such a sample stays in the
sample count ``N``, so it lowers the ESS, and it is counted in the ``n_nonfinite`` field of the
result. Its observable value is never read.

Resampling errors: a bootstrap replicate whose statistic is undefined or infinite (for example a
state that drew no sample in that replicate) is left out of the standard deviation and counted in
``n_resamples_invalid``. A non-zero count means the estimate rests on a handful of samples and
its ``stderr`` is optimistic.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

ArrayLike = Any  # numpy array, torch tensor or nested sequence


def as_float64(a: ArrayLike) -> np.ndarray:
    """``a`` as a float64 numpy array; a torch tensor is detached and copied to the CPU."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def as_bool(a: ArrayLike, name: str) -> np.ndarray:
    """``a`` as a numpy bool array; any other dtype raises ``ValueError`` naming ``name``."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    arr = np.asarray(a)
    if arr.dtype != np.bool_:
        raise ValueError(f"{name} must be a boolean array, got dtype {arr.dtype}")
    return arr


def clean_log_w(log_w: ArrayLike) -> tuple[np.ndarray, int]:
    """Return ``([N] float64 log-weights with -inf for every non-finite entry, count)``."""
    lw = as_float64(log_w)
    if lw.ndim != 1:
        raise ValueError(f"log_w must have shape [N], got {lw.shape}")
    bad = ~np.isfinite(lw)
    n_bad = int(bad.sum())
    if n_bad:
        lw = np.where(bad, -np.inf, lw)
    return lw, n_bad


def as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    """``rng`` itself if it is a generator, else a new one seeded with it (``None``: fresh entropy)."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def log_sum(lw: np.ndarray, counts: np.ndarray | None = None) -> float:
    """log sum_i c_i exp(lw_i), -inf for an empty or all-zero sum (no warnings)."""
    if counts is not None:
        keep = counts > 0
        lw, counts = lw[keep], counts[keep]
    if lw.size == 0:
        return -math.inf
    m = np.max(lw)
    if not np.isfinite(m):
        return -math.inf
    terms = np.exp(lw - m)
    if counts is not None:
        terms = terms * counts
    return float(m + np.log(np.sum(terms)))


def log_sum_resampled(lw: np.ndarray) -> Callable[[np.ndarray], float]:
    """``counts -> log sum_i counts_i exp(lw_i)`` for bootstrap loops over one fixed ``lw``.

    Weights are taken relative to the largest one once, so each call is a plain weighted sum;
    terms more than ~745 below the maximum underflow to 0, which changes the sum by < 1e-300.
    """
    m = float(np.max(lw)) if lw.size else -math.inf
    if not np.isfinite(m):
        return lambda counts: -math.inf
    w = np.exp(lw - m)

    def resampled(counts: np.ndarray) -> float:
        total = float(np.sum(counts * w))
        return m + math.log(total) if total > 0 else -math.inf

    return resampled


def kish_count(lw: np.ndarray) -> float:
    """(sum w)^2 / sum w^2 of the given log-weights; 0 when all weights are 0."""
    s1 = log_sum(lw)
    if s1 == -math.inf:
        return 0.0
    return float(np.exp(2.0 * s1 - log_sum(2.0 * lw)))


def bootstrap(
    statistic: Callable[[np.ndarray], np.ndarray | float],
    n: int,
    n_bootstrap: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Replicates ``[n_bootstrap, ...]`` of ``statistic(counts)``.

    ``counts`` ``[n]`` holds how often each sample was drawn in a resample of size ``n`` with
    replacement, so every statistic is a vectorised weighted sum over the original samples.
    """
    reps = []
    for _ in range(n_bootstrap):
        counts = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        reps.append(np.asarray(statistic(counts), dtype=np.float64))
    return np.stack(reps) if reps else np.empty((0,))


def finite_std(reps: np.ndarray) -> tuple[float, int]:
    """Standard deviation over the finite replicates (ddof=1) and the number left out."""
    ok = np.isfinite(reps)
    n_ok = int(ok.sum())
    return (float(np.std(reps[ok], ddof=1)) if n_ok >= 2 else math.nan), int(reps.size - n_ok)

