"""Importance weights: normalization, Kish and per-observable ESS, Pareto k̂, PSIS, truncation and log Z.

Everything works in numpy float64; inputs may be numpy arrays or torch tensors. A non-finite
log-weight means weight 0 (see :mod:`boltzgen.estimators.arrays`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from boltzgen.estimators.arrays import ArrayLike, as_float64, clean_log_w, kish_count, log_sum

#: k̂ above this: the importance-sampling estimate is unreliable (Vehtari et al., PSIS).
KHAT_UNRELIABLE = 0.7


def count_nonfinite(log_w: ArrayLike) -> int:
    """Number of log-weights that are NaN or ±inf (these are weight-0 samples)."""
    return clean_log_w(log_w)[1]


def normalized_weights(log_w: ArrayLike) -> np.ndarray:
    """Self-normalised weights ``w_i / sum_j w_j``, shape ``[N]``, float64, summing to 1.

    Non-finite log-weights give weight 0. Raises ``ValueError`` if every weight is 0.
    """
    lw, _ = clean_log_w(log_w)
    total = log_sum(lw)
    if total == -math.inf:
        raise ValueError("all importance weights are zero (every log-weight is non-finite)")
    return np.exp(lw - total)


def kish_ess(log_w: ArrayLike) -> float:
    """Kish effective sample size as a fraction of N: ``(sum w)^2 / (N sum w^2)`` in [0, 1].

    Samples with non-finite log-weight count as weight 0 but are included in N. Returns 0.0
    when all weights are 0.
    """
    lw, _ = clean_log_w(log_w)
    if lw.size == 0:
        raise ValueError("log_w is empty")
    return kish_count(lw) / lw.size


def max_normalized_weight(log_w: ArrayLike) -> float:
    """Largest self-normalised weight, in (0, 1]. Raises ``ValueError`` if all weights are 0."""
    lw, _ = clean_log_w(log_w)
    total = log_sum(lw)
    if total == -math.inf:
        raise ValueError("all importance weights are zero (every log-weight is non-finite)")
    return float(np.exp(np.max(lw) - total))


def ess_per_observable(log_w: ArrayLike, values: ArrayLike) -> float | np.ndarray:
    """Observable-specific ESS of the self-normalised estimate of ``E_p[f]``, as a fraction of N.

    Formula (variance-ratio ESS; cf. Owen 2013, Monte Carlo theory, §9.3, and the function-specific
    ESS in Vehtari et al., PSIS)::

        ESS_f = sum_i w̄_i (f_i - μ̂)^2  /  sum_i w̄_i^2 (f_i - μ̂)^2,      μ̂ = sum_i w̄_i f_i

    i.e. the weighted variance of ``f`` divided by the delta-method estimate of the variance of
    ``μ̂``: the number of independent exact samples that would give the same error. Returned as
    ``ESS_f / N``. Unlike Kish's ESS it can exceed 1 (IS can beat exact sampling for some ``f``),
    and it is ``inf`` when ``f`` is constant on the samples with non-zero weight.

    ``values``: ``[N]`` or ``[N, k]``; returns a float or a ``[k]`` array. Values of weight-0
    samples are ignored; a non-finite value with non-zero weight raises ``ValueError``.
    """
    w = normalized_weights(log_w)
    f = as_float64(values)
    if f.shape[:1] != w.shape:
        raise ValueError(f"values must have shape [N] or [N, k] with N={w.size}, got {f.shape}")
    pos = w > 0
    f = f[pos]
    w = w[pos].reshape((-1,) + (1,) * (f.ndim - 1))
    if not np.all(np.isfinite(f)):
        raise ValueError("values contain non-finite entries at samples with non-zero weight")
    d2 = (f - np.sum(w * f, axis=0)) ** 2
    num = np.sum(w * d2, axis=0)
    den = np.sum(w * w * d2, axis=0)
    # test constancy exactly: f - μ̂ of a constant f is rounding noise, not zero
    constant = np.ptp(f, axis=0) == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        ess = np.where(constant, np.inf, num / np.where(constant, 1.0, den)) / pos.size
    return float(ess) if ess.ndim == 0 else ess


def _tail_length(n: int) -> int:
    return int(math.ceil(min(0.2 * n, 3.0 * math.sqrt(n))))


def _gpd_fit(x: np.ndarray) -> tuple[float, float]:
    """Zhang & Stephens (2009) posterior-mean fit of a generalized Pareto distribution.

    ``x``: ``[n]`` exceedances over the threshold, sorted ascending, non-negative.
    Returns ``(k, sigma)`` with ``k`` the shape (``k > 0``: heavy tail; the raw estimate, before
    the weakly informative prior adjustment) and ``sigma`` the scale. Written here from the paper
    (profile likelihood over ``theta = -k/sigma`` on a quasi-uniform grid, weights ∝ likelihood).
    """
    n = x.size
    n_grid = 30 + int(math.sqrt(n))
    j = np.arange(1, n_grid + 1, dtype=np.float64)
    x_star = x[int(math.floor(n / 4.0 + 0.5)) - 1]  # first quartile, the paper's 1-based index
    if not (x_star > 0 and x[-1] > 0):
        return math.nan, math.nan
    theta = 1.0 / x[-1] + (1.0 - np.sqrt(n_grid / (j - 0.5))) / (3.0 * x_star)
    k_theta = np.mean(np.log1p(-theta[:, None] * x[None, :]), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_lik = n * (np.log(-theta / k_theta) - k_theta - 1.0)
    log_lik = np.where(np.isfinite(log_lik), log_lik, -np.inf)
    if not np.any(np.isfinite(log_lik)):
        return math.nan, math.nan
    theta_hat = float(np.sum(theta * np.exp(log_lik - logsumexp(log_lik))))
    k = float(np.mean(np.log1p(-theta_hat * x)))
    return k, -k / theta_hat


def _psis_tail(lw: np.ndarray) -> tuple[float, np.ndarray | None, np.ndarray | None]:
    """Fit the tail; return ``(k̂, tail indices, smoothed tail log-weights)``."""
    n = lw.size
    m = _tail_length(n)
    if m < 5 or n <= m:
        return math.nan, None, None
    order = np.argsort(lw, kind="stable")
    tail_idx = order[-m:]
    log_cut = lw[order[-m - 1]]
    if not np.isfinite(log_cut):
        return math.inf, None, None
    lw_max = lw[order[-1]]
    cut = math.exp(log_cut - lw_max)  # weights relative to the largest, so no overflow
    k_raw, sigma = _gpd_fit(np.exp(lw[tail_idx] - lw_max) - cut)
    if not np.isfinite(k_raw):
        return math.nan, None, None
    k = (m * k_raw + 10 * 0.5) / (m + 10)  # weakly informative prior of Vehtari et al.
    p = (np.arange(1, m + 1) - 0.5) / m
    if abs(k) < 1e-12:
        q = -sigma * np.log1p(-p)
    else:
        q = sigma / k * np.expm1(-k * np.log1p(-p))
    smoothed = np.minimum(np.log(q + cut) + lw_max, lw_max)
    return float(k), tail_idx, smoothed


def pareto_khat(log_w: ArrayLike) -> float:
    """Pareto k̂ diagnostic of the importance weights (Vehtari et al., Pareto smoothed IS).

    A generalized Pareto distribution is fitted to the exceedances of the ``M = ceil(min(N/5,
    3 sqrt N))`` largest weights over the next-largest one, with the Zhang & Stephens (2009)
    estimator (implemented here, not ``scipy.stats.genpareto.fit``) and the weakly informative
    prior ``k̂ = (M k + 5) / (M + 10)``. Interpretation: ``k̂ < 0.5`` good; ``0.5..0.7`` usable but
    slow; ``k̂ > KHAT_UNRELIABLE = 0.7`` unreliable.

    Returns ``nan`` when the tail is too short (``M < 5``, i.e. ``N < 25``) or degenerate (tied
    weights), and ``inf`` when at most ``M`` samples have non-zero weight (flagged unreliable).
    """
    lw, _ = clean_log_w(log_w)
    return _psis_tail(lw)[0]


def psis_log_weights(log_w: ArrayLike) -> np.ndarray:
    """Pareto-smoothed log-weights ``[N]`` (float64, unnormalised, same order as the input).

    The ``M`` largest weights (see :func:`pareto_khat`) are replaced, in rank order, by the
    expected order statistics of the fitted generalized Pareto tail, ``threshold + F^-1((j -
    1/2)/M)``, capped at the largest raw weight; all other weights are unchanged. Non-finite
    inputs become -inf. If k̂ is ``nan`` or ``inf`` the weights are returned unsmoothed.

    Bias: smoothing trades variance for a bias that shrinks as N grows; the self-normalised
    estimate stays consistent, and the bias is small for k̂ < 0.7. Above 0.7 the smoothed estimate
    can be far off although it looks stable, so check :func:`pareto_khat` first.
    """
    lw, _ = clean_log_w(log_w)
    out = lw.copy()
    _, tail_idx, smoothed = _psis_tail(lw)
    if tail_idx is not None:
        out[tail_idx] = smoothed
    return out


def truncated_log_weights(log_w: ArrayLike) -> np.ndarray:
    """Truncated importance-sampling log-weights ``[N]`` (Ionides 2008).

    Each weight is capped at ``mean(w) * sqrt(N)`` (the mean over all N samples, zero weights
    included): ``log w_i <- min(log w_i, logsumexp(log w) - log(N)/2)``. Non-finite inputs
    become -inf.

    Bias: capping lowers the weight of the samples in the tail, so the estimate is biased towards
    the region the proposal covers; the bias vanishes as N grows when E_q[w] is finite, while
    the variance is bounded even when E_q[w^2] is infinite.
    """
    lw, _ = clean_log_w(log_w)
    if lw.size == 0:
        return lw
    cap = log_sum(lw) - 0.5 * math.log(lw.size)
    return np.minimum(lw, cap)



@dataclass(frozen=True)
class LogZEstimate:
    """An importance-sampling estimate of log Z = log ∫ exp(-u) dx, dimensionless, float64.

    ``value`` = logsumexp(log w) - log N; ``stderr`` its delta-method standard error
    ``sqrt(1 / n_eff - 1 / N)`` (n_eff the Kish count), NaN when every weight is 0; ``n_samples`` = N
    (weight-0 samples included, as they are draws from q); ``n_nonfinite`` of them had weight 0.
    """

    value: float
    stderr: float
    n_samples: int
    n_nonfinite: int


def log_z_importance_sampling(log_w: ArrayLike) -> LogZEstimate:
    """log Z from unnormalized log-weights ``log w = -u - log q`` of N samples from q, ``[N]``.

    Ẑ = mean(w) is unbiased for Z; its log has the delta-method variance Var(w) / (N mean(w)^2) =
    1 / n_eff - 1 / N with the plug-in variance. A sample of non-finite log-weight is weight 0 and
    still counts in N (q drew it). Every weight 0 gives value -inf and stderr NaN.
    """
    lw, n_nonfinite = clean_log_w(log_w)
    if lw.size == 0:
        raise ValueError("log_w is empty")
    total = log_sum(lw)
    if total == -math.inf:
        return LogZEstimate(-math.inf, math.nan, int(lw.size), n_nonfinite)
    value = float(total - math.log(lw.size))
    stderr = math.sqrt(max(1.0 / kish_count(lw) - 1.0 / lw.size, 0.0))
    return LogZEstimate(value, stderr, int(lw.size), n_nonfinite)
