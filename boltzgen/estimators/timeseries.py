"""Correlated series: block means, integrated autocorrelation times and batch-means inefficiency.

Series are ``[T]`` or ``[chains, T]`` (independent chains of equal length), numpy float64.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from boltzgen.estimators.arrays import ArrayLike, as_float64


def as_chains(values: ArrayLike, name: str) -> np.ndarray:
    """``values`` as float64 ``[chains, T]`` (a ``[T]`` series is one chain); ``name`` is for the error."""
    x = as_float64(values)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [T] or [chains, T], got {x.shape}")
    return x


def block_means(x: np.ndarray, n_blocks: int) -> np.ndarray:
    """``[chains * n_blocks]`` block means; the trailing ``T mod n_blocks`` frames are dropped."""
    chains, t = x.shape
    # One block per chain is allowed with several chains: independent chains are the blocks.
    if n_blocks < 1 or t < n_blocks or chains * n_blocks < 2:
        raise ValueError(f"need 1 <= n_blocks <= T and at least 2 blocks, got n_blocks={n_blocks}, T={t}, chains={chains}")
    length = t // n_blocks
    return x[:, : n_blocks * length].reshape(chains, n_blocks, length).mean(axis=2).ravel()


def _autocorrelation(x: np.ndarray) -> np.ndarray:
    """Normalised autocorrelation ``[T]`` averaged over chains; ``x``: ``[chains, T]``."""
    t = x.shape[1]
    n_fft = 1 << (2 * t - 1).bit_length()  # zero padding to >= 2T: linear, not circular
    xc = x - x.mean(axis=1, keepdims=True)
    spec = np.fft.rfft(xc, n=n_fft, axis=1)
    acov = np.fft.irfft(spec * np.conj(spec), n=n_fft, axis=1)[:, :t]
    return np.mean(acov / acov[:, :1], axis=0)


def integrated_autocorrelation_time(x: ArrayLike, c: float = 5.0) -> float:
    """Integrated autocorrelation time ``tau = 1 + 2 sum_{t>=1} rho(t)`` in frames.

    ``x``: ``[T]`` or ``[chains, T]`` (equal lengths). The autocorrelation is computed per chain
    by FFT (each chain's own mean removed, biased 1/T normalisation) and averaged over chains;
    the sum is cut at Sokal's automatic window, the smallest ``M`` with ``M >= c tau(M)``,
    ``c = 5``. An i.i.d. series gives ~1, an AR(1) process ``(1 + rho) / (1 - rho)``.

    Removing each chain's mean biases the estimate low for short chains, so a
    ``RuntimeWarning`` is issued when ``T < 50 tau`` (the rule of thumb of emcee's
    ``integrated_time``); the estimate is still returned. Returns ``inf`` when a chain is
    constant (it never decorrelates). Non-finite values raise ``ValueError``.
    """
    xs = as_chains(x, "x")
    if not np.all(np.isfinite(xs)):
        raise ValueError("x contains non-finite entries")
    if xs.shape[1] < 2:
        raise ValueError("need at least 2 frames per chain")
    if np.any(np.ptp(xs, axis=1) == 0):
        return math.inf
    rho = _autocorrelation(xs)
    taus = 2.0 * np.cumsum(rho) - 1.0
    ok = np.arange(taus.size) >= c * taus
    # with chain means removed the estimated rho sums to -1/2 over all lags, so tau at the
    # last lag is ~0 and the criterion always holds somewhere; the fallback is only defensive
    tau = float(taus[int(np.argmax(ok))]) if np.any(ok) else float(taus[-1])
    if xs.shape[1] < 50.0 * tau:
        warnings.warn(
            f"chains of {xs.shape[1]} frames are shorter than 50 tau (tau ~ {tau:.3g}); "
            "the autocorrelation time is likely underestimated",
            RuntimeWarning,
            stacklevel=2,
        )
    return tau


def batch_means_tau(x: ArrayLike) -> float:
    """Statistical inefficiency from the spread of independent chains' means, in frames.

    ``x``: ``[chains, T]``, ``chains >= 2``. ``tau = T var(chain means) / var(all frames)`` (both
    with ``ddof=1``): 1 for i.i.d. frames, ``tau_int`` for long chains. Unlike
    :func:`integrated_autocorrelation_time` it stays finite when some chains never change value,
    as the indicator of a rare state does in chains that never visit it; such chains then count
    as about one sample each. Its relative error is about ``sqrt(2 / chains)``. Returns ``inf``
    when every frame is equal (nothing can be estimated).
    """
    xs = as_chains(x, "x")
    if xs.shape[0] < 2:
        raise ValueError("batch means need at least 2 chains")
    if not np.all(np.isfinite(xs)):
        raise ValueError("x contains non-finite entries")
    var = float(np.var(xs, ddof=1))
    if var == 0:
        return math.inf
    return float(xs.shape[1] * np.var(xs.mean(axis=1), ddof=1) / var)

