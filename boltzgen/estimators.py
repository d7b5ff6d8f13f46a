"""Estimators on importance-weighted and on correlated samples.

Everything here works in numpy float64. Inputs may be numpy arrays or torch tensors (they are
detached and copied to the CPU). Free energies are reduced, in units of kT.

Non-finite log-weights, the one rule used throughout: a log-weight that is NaN, +inf or -inf
means weight 0 (DESIGN.md: a non-finite energy or density gives weight 0). Such a sample stays in
the sample count ``N``, so it lowers the ESS, and it is counted in the ``n_nonfinite`` field of
the result. Its observable value is never read.

Resampling errors: a bootstrap replicate whose statistic is undefined or infinite (for example a
state that drew no sample in that replicate) is left out of the standard deviation and counted in
``n_resamples_invalid``. A non-zero count means the estimate rests on a handful of samples and
its ``stderr`` is optimistic.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from scipy.special import logsumexp, rel_entr

ArrayLike = Any  # numpy array, torch tensor or nested sequence

#: k̂ above this: the importance-sampling estimate is unreliable (Vehtari et al., PSIS).
KHAT_UNRELIABLE = 0.7
#: k̂ below this: the weights have finite variance and the estimate converges quickly.
KHAT_GOOD = 0.5


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Estimate:
    """A scalar estimate.

    ``value`` and ``stderr`` are in the units of the observable. ``n_eff`` is the effective
    number of independent samples (its meaning is given by the function that returns it).
    ``n_nonfinite``: samples whose log-weight was not finite (given weight 0).
    ``n_resamples_invalid``: bootstrap replicates left out of ``stderr``.
    """

    value: float
    stderr: float
    n_eff: float
    n_nonfinite: int = 0
    n_resamples_invalid: int = 0


@dataclass(frozen=True)
class FreeEnergy:
    """A free-energy difference ``value = F_B - F_A`` in kT, with its standard error in kT.

    ``n_eff`` is the effective number of samples behind the estimate (stated by each function).
    ``empty_state`` is ``None`` normally. If a state received zero total weight it is ``"A"``,
    ``"B"`` or ``"A,B"``; ``value`` is then ``+inf`` (B empty), ``-inf`` (A empty) or ``nan``
    (both), and ``stderr`` is ``nan``.
    """

    value: float
    stderr: float
    n_eff: float
    n_nonfinite: int = 0
    n_resamples_invalid: int = 0
    empty_state: str | None = None


@dataclass(frozen=True, eq=False)
class FreeEnergySurface:
    """F along one or two CVs, in kT.

    ``edges``: one array of bin edges per CV (length ``bins_d + 1``).
    ``f_kT``: ``[bins_0]`` or ``[bins_0, bins_1]`` (first axis is the first CV, as in
    ``np.histogram2d``), ``-ln p`` of the probability density, shifted so that its minimum is 0.
    Bins with zero weight are ``+inf``.
    ``stderr_kT``: bootstrap standard error of ``-ln p`` per bin (before the shift, so the noise
    of the minimum bin is not added to every bin); ``nan`` for empty bins and where fewer than 2
    replicates populated the bin.
    ``counts``: raw number of samples per bin (unweighted), integer.
    ``n_nonfinite``: samples with a non-finite log-weight. ``n_outside``: samples outside the
    range or with a non-finite CV; they are not binned but still count in the normalisation.
    """

    edges: tuple[np.ndarray, ...]
    f_kT: np.ndarray
    stderr_kT: np.ndarray
    counts: np.ndarray
    n_nonfinite: int = 0
    n_outside: int = 0


@dataclass(frozen=True, eq=False)
class MBARFreeEnergies:
    """MBAR result for ``K`` thermodynamic states, all in kT.

    ``f_k`` ``[K]``: free energies relative to state 0; ``stderr_k`` ``[K]`` their errors.
    ``delta_f`` ``[K, K]``: ``delta_f[i, j] = f_j - f_i``; ``stderr_delta_f`` ``[K, K]``.
    ``n_eff`` ``[K]``: Kish effective number of samples of the MBAR weights of each state.
    """

    f_k: np.ndarray
    stderr_k: np.ndarray
    delta_f: np.ndarray
    stderr_delta_f: np.ndarray
    n_eff: np.ndarray

    def between(self, i: int, j: int) -> FreeEnergy:
        """``F_j - F_i`` as a :class:`FreeEnergy`; ``n_eff`` is the smaller of the two states'."""
        return FreeEnergy(
            value=float(self.delta_f[i, j]),
            stderr=float(self.stderr_delta_f[i, j]),
            n_eff=float(min(self.n_eff[i], self.n_eff[j])),
        )


# ----------------------------------------------------------------------------- helpers


def _as_float64(a: ArrayLike) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _as_bool(a: ArrayLike, name: str) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    arr = np.asarray(a)
    if arr.dtype != np.bool_:
        raise ValueError(f"{name} must be a boolean array, got dtype {arr.dtype}")
    return arr


def _clean_log_w(log_w: ArrayLike) -> tuple[np.ndarray, int]:
    """Return ``([N] float64 log-weights with -inf for every non-finite entry, count)``."""
    lw = _as_float64(log_w)
    if lw.ndim != 1:
        raise ValueError(f"log_w must have shape [N], got {lw.shape}")
    bad = ~np.isfinite(lw)
    n_bad = int(bad.sum())
    if n_bad:
        lw = np.where(bad, -np.inf, lw)
    return lw, n_bad


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _log_sum(lw: np.ndarray, counts: np.ndarray | None = None) -> float:
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


def _log_sum_resampled(lw: np.ndarray) -> Callable[[np.ndarray], float]:
    """``counts -> log sum_i counts_i exp(lw_i)`` for bootstrap loops over one fixed ``lw``.

    Weights are taken relative to the largest one once, so each call is a plain weighted sum;
    terms more than ~745 below the maximum underflow to 0, which changes the sum by < 1e-300.
    """
    m = float(np.max(lw)) if lw.size else -math.inf
    if not np.isfinite(m):
        return lambda counts: -math.inf
    w = np.exp(lw - m)

    def log_sum(counts: np.ndarray) -> float:
        total = float(np.sum(counts * w))
        return m + math.log(total) if total > 0 else -math.inf

    return log_sum


def _kish_count(lw: np.ndarray) -> float:
    """(sum w)^2 / sum w^2 of the given log-weights; 0 when all weights are 0."""
    s1 = _log_sum(lw)
    if s1 == -math.inf:
        return 0.0
    return float(np.exp(2.0 * s1 - _log_sum(2.0 * lw)))


def _bootstrap(
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


def _finite_std(reps: np.ndarray) -> tuple[float, int]:
    """Standard deviation over the finite replicates (ddof=1) and the number left out."""
    ok = np.isfinite(reps)
    n_ok = int(ok.sum())
    return (float(np.std(reps[ok], ddof=1)) if n_ok >= 2 else math.nan), int(reps.size - n_ok)


# ----------------------------------------------------------------------------- weights, ESS


def count_nonfinite(log_w: ArrayLike) -> int:
    """Number of log-weights that are NaN or ±inf (these are weight-0 samples)."""
    return _clean_log_w(log_w)[1]


def normalized_weights(log_w: ArrayLike) -> np.ndarray:
    """Self-normalised weights ``w_i / sum_j w_j``, shape ``[N]``, float64, summing to 1.

    Non-finite log-weights give weight 0. Raises ``ValueError`` if every weight is 0.
    """
    lw, _ = _clean_log_w(log_w)
    total = _log_sum(lw)
    if total == -math.inf:
        raise ValueError("all importance weights are zero (every log-weight is non-finite)")
    return np.exp(lw - total)


def kish_ess(log_w: ArrayLike) -> float:
    """Kish effective sample size as a fraction of N: ``(sum w)^2 / (N sum w^2)`` in [0, 1].

    Samples with non-finite log-weight count as weight 0 but are included in N. Returns 0.0
    when all weights are 0.
    """
    lw, _ = _clean_log_w(log_w)
    if lw.size == 0:
        raise ValueError("log_w is empty")
    return _kish_count(lw) / lw.size


def max_normalized_weight(log_w: ArrayLike) -> float:
    """Largest self-normalised weight, in (0, 1]. Raises ``ValueError`` if all weights are 0."""
    lw, _ = _clean_log_w(log_w)
    total = _log_sum(lw)
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
    f = _as_float64(values)
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


# ----------------------------------------------------------------------------- Pareto k̂, PSIS


def khat_threshold(n: int) -> float:
    """Sample-size dependent k̂ threshold ``min(1 - 1/log10(n), 0.7)`` (Vehtari et al., PSIS).

    For small ``n`` the usable k̂ is lower than :data:`KHAT_UNRELIABLE`; for ``n <= 10`` it is
    ``-inf`` (no k̂ is good enough).
    """
    return min(1.0 - 1.0 / math.log10(n), KHAT_UNRELIABLE) if n > 10 else -math.inf


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
    slow; ``k̂ > KHAT_UNRELIABLE = 0.7`` unreliable (see also :func:`khat_threshold`).

    Returns ``nan`` when the tail is too short (``M < 5``, i.e. ``N < 25``) or degenerate (tied
    weights), and ``inf`` when at most ``M`` samples have non-zero weight (flagged unreliable).
    """
    lw, _ = _clean_log_w(log_w)
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
    lw, _ = _clean_log_w(log_w)
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
    lw, _ = _clean_log_w(log_w)
    if lw.size == 0:
        return lw
    cap = _log_sum(lw) - 0.5 * math.log(lw.size)
    return np.minimum(lw, cap)


# ----------------------------------------------------------------------------- observables


def weighted_mean(
    values: ArrayLike,
    log_w: ArrayLike,
    n_bootstrap: int = 200,
    rng: np.random.Generator | int | None = None,
) -> Estimate:
    """Self-normalised importance-sampling mean ``sum w_i f_i / sum w_i``.

    ``values``, ``log_w``: ``[N]``. ``stderr``: standard deviation over ``n_bootstrap`` bootstrap
    replicates (samples drawn with replacement, value and weight together); ``nan`` if
    ``n_bootstrap < 2``. ``n_eff``: Kish effective number of samples ``(sum w)^2 / sum w^2``.
    A non-finite value with non-zero weight raises ``ValueError``; all-zero weights raise too.
    """
    lw, n_bad = _clean_log_w(log_w)
    f = _as_float64(values)
    if f.shape != lw.shape:
        raise ValueError(f"values {f.shape} and log_w {lw.shape} must both have shape [N]")
    if _log_sum(lw) == -math.inf:
        raise ValueError("all importance weights are zero (every log-weight is non-finite)")
    w = np.exp(lw - np.max(lw))
    pos = w > 0
    if not np.all(np.isfinite(f[pos])):
        raise ValueError("values contain non-finite entries at samples with non-zero weight")
    wf = np.where(pos, w * np.where(pos, f, 0.0), 0.0)
    value = float(np.sum(wf) / np.sum(w))

    def ratio(c: np.ndarray) -> float:
        # multiply-and-sum rather than `@`: a BLAS dot call costs far more at these sizes
        sw = np.sum(c * w)
        return float(np.sum(c * wf) / sw) if sw > 0 else math.nan

    stderr, n_invalid = _finite_std(_bootstrap(ratio, lw.size, n_bootstrap, _rng(rng)))
    return Estimate(value, stderr, _kish_count(lw), n_bad, n_invalid)


# ----------------------------------------------------------------------------- ΔF between states


def _empty_state_result(log_pa: float, log_pb: float, n_bad: int) -> FreeEnergy | None:
    if log_pa > -math.inf and log_pb > -math.inf:
        return None
    if log_pa == -math.inf and log_pb == -math.inf:
        return FreeEnergy(math.nan, math.nan, 0.0, n_bad, 0, "A,B")
    if log_pb == -math.inf:
        return FreeEnergy(math.inf, math.nan, 0.0, n_bad, 0, "B")
    return FreeEnergy(-math.inf, math.nan, 0.0, n_bad, 0, "A")


def delta_f(
    in_a: ArrayLike,
    in_b: ArrayLike,
    log_w: ArrayLike | None = None,
    n_bootstrap: int = 200,
    rng: np.random.Generator | int | None = None,
) -> FreeEnergy:
    """``ΔF_AB = F_B - F_A = -ln(P_B / P_A)`` in kT from independent samples.

    ``in_a``, ``in_b``: ``[N]`` bool membership (the states may overlap). ``log_w``: ``[N]``
    importance log-weights, or ``None`` for unweighted samples (exact, or decorrelated MCMC/MD;
    for correlated series use :func:`delta_f_blocked`).

    ``stderr``: bootstrap standard deviation. ``n_eff``: Kish effective number of samples inside
    the less populated state, ``min_S (sum_{i in S} w_i)^2 / sum_{i in S} w_i^2`` (the plain
    count of samples in that state when unweighted).

    A state with zero total weight does not raise: the result has ``value = +inf`` (B empty),
    ``-inf`` (A empty) or ``nan`` (both), ``stderr = nan``, ``n_eff = 0`` and ``empty_state``
    naming the state.
    """
    a = _as_bool(in_a, "in_a")
    b = _as_bool(in_b, "in_b")
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"in_a {a.shape} and in_b {b.shape} must both have shape [N]")
    if log_w is None:
        lw, n_bad = np.zeros(a.shape), 0
    else:
        lw, n_bad = _clean_log_w(log_w)
        if lw.shape != a.shape:
            raise ValueError(f"log_w {lw.shape} must have the shape of in_a {a.shape}")
    lw_a, lw_b = lw[a], lw[b]
    log_pa, log_pb = _log_sum(lw_a), _log_sum(lw_b)
    empty = _empty_state_result(log_pa, log_pb, n_bad)
    if empty is not None:
        return empty

    idx_a, idx_b = np.flatnonzero(a), np.flatnonzero(b)
    log_sum_a, log_sum_b = _log_sum_resampled(lw_a), _log_sum_resampled(lw_b)

    def stat(c: np.ndarray) -> float:
        return log_sum_a(c[idx_a]) - log_sum_b(c[idx_b])

    with np.errstate(invalid="ignore"):
        reps = _bootstrap(stat, a.size, n_bootstrap, _rng(rng))
    stderr, n_invalid = _finite_std(reps)
    n_eff = min(_kish_count(lw_a), _kish_count(lw_b))
    return FreeEnergy(log_pa - log_pb, stderr, n_eff, n_bad, n_invalid)


def thermodynamic_delta_f_from_flow(
    u_target_a: ArrayLike,
    u_target_b: ArrayLike,
    log_q: ArrayLike,
    n_bootstrap: int = 200,
    rng: np.random.Generator | int | None = None,
) -> FreeEnergy:
    """``F_B - F_A = -ln(Z_B / Z_A)`` in kT between two thermodynamic states (e.g. temperatures).

    All three arrays are ``[N]`` and refer to the same flow samples ``x_i ~ q``: ``u_target_a``
    and ``u_target_b`` are the reduced energies of the two states at ``x_i`` (each in its own
    kT), ``log_q`` the flow log-density. ``Z_S`` is estimated by importance sampling,
    ``Z_S ≈ mean_i exp(-u_S(x_i) - log q(x_i))``, so the flow's normalisation cancels.
    ``stderr``: bootstrap (samples resampled jointly for both states). ``n_eff``: the smaller
    Kish effective sample count of the two states' weights. Non-finite log-weights follow the
    module rule (weight 0 for that state; ``n_nonfinite`` counts samples non-finite in either).
    A state with zero total weight is reported as in :func:`delta_f`.

    With exact samples from both states use :func:`thermodynamic_delta_f_bar` instead.
    """
    log_q64 = _as_float64(log_q)
    lw_a, bad_a = _clean_log_w(-_as_float64(u_target_a) - log_q64)
    lw_b, bad_b = _clean_log_w(-_as_float64(u_target_b) - log_q64)
    if lw_a.shape != lw_b.shape:
        raise ValueError(f"u_target_a {lw_a.shape} and u_target_b {lw_b.shape} must match")
    n_bad = int(np.sum(~np.isfinite(lw_a) | ~np.isfinite(lw_b)))
    log_za, log_zb = _log_sum(lw_a), _log_sum(lw_b)
    empty = _empty_state_result(log_za, log_zb, n_bad)
    if empty is not None:
        return empty

    log_sum_a, log_sum_b = _log_sum_resampled(lw_a), _log_sum_resampled(lw_b)

    def stat(c: np.ndarray) -> float:
        return log_sum_a(c) - log_sum_b(c)

    with np.errstate(invalid="ignore"):
        stderr, n_invalid = _finite_std(_bootstrap(stat, lw_a.size, n_bootstrap, _rng(rng)))
    n_eff = min(_kish_count(lw_a), _kish_count(lw_b))
    return FreeEnergy(log_za - log_zb, stderr, n_eff, n_bad, n_invalid)


# ----------------------------------------------------------------------------- correlated series


def _as_chains(values: ArrayLike, name: str) -> np.ndarray:
    x = _as_float64(values)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [T] or [chains, T], got {x.shape}")
    return x


def _block_means(x: np.ndarray, n_blocks: int) -> np.ndarray:
    """``[chains * n_blocks]`` block means; the trailing ``T mod n_blocks`` frames are dropped."""
    chains, t = x.shape
    # One block per chain is allowed with several chains: independent chains are the blocks.
    if n_blocks < 1 or t < n_blocks or chains * n_blocks < 2:
        raise ValueError(f"need 1 <= n_blocks <= T and at least 2 blocks, got n_blocks={n_blocks}, T={t}, chains={chains}")
    length = t // n_blocks
    return x[:, : n_blocks * length].reshape(chains, n_blocks, length).mean(axis=2).ravel()


def block_average(values: ArrayLike, n_blocks: int = 20) -> Estimate:
    """Mean of a correlated time series with the block-averaging standard error.

    ``values``: ``[T]`` or ``[chains, T]`` (independent chains of equal length). Each chain is
    cut into ``n_blocks`` contiguous blocks of ``T // n_blocks`` frames (the trailing remainder
    is dropped); all ``chains * n_blocks`` block means are treated as independent, so
    ``stderr = std(block means, ddof=1) / sqrt(chains * n_blocks)``. This is unbiased only when
    a block is much longer than the integrated autocorrelation time.
    ``value``: mean of the frames used. ``n_eff = var(frames) / stderr^2``, the number of
    independent samples with the same error. Non-finite values raise ``ValueError``.
    """
    x = _as_chains(values, "values")
    if not np.all(np.isfinite(x)):
        raise ValueError("values contain non-finite entries")
    means = _block_means(x, n_blocks)
    stderr = float(np.std(means, ddof=1) / math.sqrt(means.size))
    used = x[:, : n_blocks * (x.shape[1] // n_blocks)]
    var = float(np.var(used))
    n_eff = var / stderr**2 if stderr > 0 else float(used.size)
    return Estimate(float(np.mean(means)), stderr, n_eff)


def delta_f_blocked(in_a: ArrayLike, in_b: ArrayLike, n_blocks: int = 20, log_w: ArrayLike | None = None) -> FreeEnergy:
    """``ΔF_AB = -ln(P_B / P_A)`` in kT from correlated trajectories (MD, MCMC).

    ``in_a``, ``in_b``: bool ``[T]`` or ``[chains, T]``. ``log_w`` (same shape, optional): log-weights
    of the frames, e.g. ``-(u_target - u_md)`` for MD run at another temperature; non-finite ones
    count as weight 0. ``value`` uses all frames. The error is a delete-one-block jackknife of the
    log-ratio over the ``chains * n_blocks`` blocks (trailing remainder dropped),
    ``stderr^2 = (n-1)/n sum_j (ΔF_(-j) - mean)^2``; no bias correction is applied. If leaving out
    one block empties a state (the state was seen in a single block), ``stderr = inf`` and
    ``n_resamples_invalid`` counts those blocks.

    ``n_eff``: unweighted, for the less populated state S, its frame count divided by the
    statistical inefficiency of its indicator, ``g_S = T_used var_block(P̂_S) / (P_S (1 - P_S))``,
    clipped at ``g_S >= 1``; weighted, the Kish count of the less populated state. Empty states are
    reported as in :func:`delta_f`.
    """
    a = _as_bool(in_a, "in_a")
    b = _as_bool(in_b, "in_b")
    if a.shape != b.shape:
        raise ValueError(f"in_a {a.shape} and in_b {b.shape} must have the same shape")
    n_bad = 0
    if log_w is None:
        w = np.ones(a.shape)
    else:
        lw, n_bad = _clean_log_w(np.ravel(log_w))
        if lw.size != a.size:
            raise ValueError(f"log_w must have the shape of in_a {a.shape}")
        finite = np.isfinite(lw)
        w = np.zeros(lw.shape)
        if finite.any():
            w[finite] = np.exp(lw[finite] - lw[finite].max())
        w = w.reshape(a.shape)
    xa, xb = _as_chains(a * w, "in_a"), _as_chains(b * w, "in_b")
    na, nb = float(xa.sum()), float(xb.sum())
    log_pa = math.log(na) if na > 0 else -math.inf
    log_pb = math.log(nb) if nb > 0 else -math.inf
    empty = _empty_state_result(log_pa, log_pb, n_bad)
    if empty is not None:
        return empty
    value = log_pa - log_pb

    ma, mb = _block_means(xa, n_blocks), _block_means(xb, n_blocks)
    n = ma.size
    with np.errstate(divide="ignore"):
        loo = np.log(ma.sum() - ma) - np.log(mb.sum() - mb)
    n_invalid = int(np.sum(~np.isfinite(loo)))
    if n_invalid:
        stderr = math.inf
    else:
        stderr = float(math.sqrt((n - 1) / n * np.sum((loo - loo.mean()) ** 2)))

    if log_w is not None:
        n_eff = min(_kish_count(np.log(xa[xa > 0])), _kish_count(np.log(xb[xb > 0])))
        return FreeEnergy(value, stderr, n_eff, n_bad, n_invalid)
    t_used = xa.shape[0] * n_blocks * (xa.shape[1] // n_blocks)
    n_eff = math.inf
    for count, means in ((na, ma), (nb, mb)):
        p = float(means.mean())
        var_mean = float(np.var(means, ddof=1) / n)
        g = t_used * var_mean / (p * (1 - p)) if 0 < p < 1 else 1.0
        n_eff = min(n_eff, count / max(g, 1.0))
    return FreeEnergy(value, stderr, n_eff, 0, n_invalid)


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
    xs = _as_chains(x, "x")
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
    xs = _as_chains(x, "x")
    if xs.shape[0] < 2:
        raise ValueError("batch means need at least 2 chains")
    if not np.all(np.isfinite(xs)):
        raise ValueError("x contains non-finite entries")
    var = float(np.var(xs, ddof=1))
    if var == 0:
        return math.inf
    return float(xs.shape[1] * np.var(xs.mean(axis=1), ddof=1) / var)


# ----------------------------------------------------------------------------- FES


def _edges(cv: np.ndarray, bins: Any, range_: Any) -> tuple[np.ndarray, ...]:
    dim = cv.shape[1]
    if dim == 1:
        bins_d, ranges = [bins], [range_]
    else:
        bins_d = [bins] * dim if np.ndim(bins) == 0 else list(bins)
        ranges = [None] * dim if range_ is None else list(range_)
    if len(bins_d) != dim or len(ranges) != dim:
        raise ValueError(f"bins and range must give one entry per CV dimension ({dim})")
    edges = []
    for d in range(dim):
        col = cv[:, d]
        finite = col[np.isfinite(col)]
        edges.append(np.histogram_bin_edges(finite, bins=bins_d[d], range=ranges[d]))
    return tuple(np.asarray(e, dtype=np.float64) for e in edges)


def _bin_index(cv: np.ndarray, edges: tuple[np.ndarray, ...]) -> np.ndarray:
    """Flat bin index ``[N]`` (``-1`` outside the range or for a non-finite CV)."""
    shape = tuple(e.size - 1 for e in edges)
    inside = np.ones(cv.shape[0], dtype=bool)
    idx = []
    for d, e in enumerate(edges):
        col = cv[:, d]
        i = np.searchsorted(e, col, side="right") - 1
        i = np.where(col == e[-1], e.size - 2, i)  # right edge inclusive, as np.histogram
        inside &= np.isfinite(col) & (i >= 0) & (i < e.size - 1)
        idx.append(np.clip(i, 0, e.size - 2))
    flat = np.ravel_multi_index(tuple(idx), shape)
    return np.where(inside, flat, -1)


def free_energy_surface(
    cv: ArrayLike,
    log_w: ArrayLike | None = None,
    bins: int | Sequence[Any] = 50,
    range: Any = None,  # noqa: A002 - mirrors numpy's histogram argument
    n_bootstrap: int = 100,
    rng: np.random.Generator | int | None = None,
) -> FreeEnergySurface:
    """Free-energy surface ``F = -ln p`` (kT) along one or two CVs, shifted to minimum 0.

    ``cv``: ``[N]`` or ``[N, 1]`` (1-D) or ``[N, 2]`` (2-D). ``log_w``: ``[N]`` importance
    log-weights or ``None`` (unweighted). ``bins``/``range``: as ``np.histogram`` (1-D) or
    ``np.histogramdd`` (2-D: an int, or one entry per CV). ``p`` is the probability density
    (bin probability over bin volume), normalised by the total weight of all samples, including
    those outside the range. Empty bins (zero weight) get ``F = +inf``. See
    :class:`FreeEnergySurface` for the error and the counters.
    """
    x = _as_float64(cv)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[1] not in (1, 2):
        raise ValueError(f"cv must have shape [N], [N, 1] or [N, 2], got {x.shape}")
    n = x.shape[0]
    if log_w is None:
        lw, n_bad = np.zeros(n), 0
    else:
        lw, n_bad = _clean_log_w(log_w)
        if lw.shape != (n,):
            raise ValueError(f"log_w {lw.shape} must have shape [N] with N={n}")
    if _log_sum(lw) == -math.inf:
        raise ValueError("all importance weights are zero (every log-weight is non-finite)")
    w = np.exp(lw - np.max(lw))
    edges = _edges(x, bins, range)
    shape = tuple(e.size - 1 for e in edges)
    n_bins = int(np.prod(shape))
    volume = functools.reduce(np.multiply.outer, [np.diff(e) for e in edges]).ravel()

    flat = _bin_index(x, edges)
    inside = flat >= 0
    fi, wi = flat[inside], w[inside]

    def neg_log_density(c: np.ndarray | None) -> np.ndarray:
        cw = wi if c is None else wi * c[inside]
        total = np.sum(w) if c is None else np.sum(c * w)
        hist = np.bincount(fi, weights=cw, minlength=n_bins)
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.log(hist / total / volume)

    f = neg_log_density(None)
    f_shifted = f - np.min(f) if np.any(np.isfinite(f)) else f
    reps = _bootstrap(neg_log_density, n, n_bootstrap, _rng(rng))
    stderr = np.full(n_bins, math.nan)
    if reps.size:
        ok = np.isfinite(reps)
        n_ok = ok.sum(axis=0)
        filled = np.where(ok, reps, 0.0)
        mean = filled.sum(axis=0) / np.maximum(n_ok, 1)
        var = np.where(ok, (reps - mean) ** 2, 0.0).sum(axis=0) / np.maximum(n_ok - 1, 1)
        stderr = np.where((n_ok >= 2) & np.isfinite(f), np.sqrt(var), math.nan)
    counts = np.bincount(fi, minlength=n_bins)
    return FreeEnergySurface(
        edges=edges,
        f_kT=f_shifted.reshape(shape),
        stderr_kT=stderr.reshape(shape),
        counts=counts.reshape(shape),
        n_nonfinite=n_bad,
        n_outside=int(n - inside.sum()),
    )


def jensen_shannon(p_hist: ArrayLike, q_hist: ArrayLike) -> float:
    """Jensen-Shannon divergence in nats between two histograms of the same shape.

    Each histogram (counts or weights, any shape, e.g. a 2-D Ramachandran histogram) is
    normalised to sum 1; ``JS = KL(p||m)/2 + KL(q||m)/2`` with ``m = (p + q)/2``, in ``[0, ln 2]``.
    Negative or non-finite entries, or an all-zero histogram, raise ``ValueError``.
    """
    p, q = _as_float64(p_hist), _as_float64(q_hist)
    if p.shape != q.shape:
        raise ValueError(f"histograms must have the same shape, got {p.shape} and {q.shape}")
    for name, h in (("p_hist", p), ("q_hist", q)):
        if not np.all(np.isfinite(h)) or np.any(h < 0) or h.sum() <= 0:
            raise ValueError(f"{name} must be finite, non-negative and not all zero")
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)
    return float(0.5 * np.sum(rel_entr(p, m)) + 0.5 * np.sum(rel_entr(q, m)))


def fes_rmse(f1: ArrayLike, f2: ArrayLike, populated_mask: ArrayLike | None = None) -> float:
    """RMSE (kT) between two free-energy surfaces after the optimal constant shift.

    Over the bins in ``populated_mask`` (bool, same shape; ``None``: bins where both are
    finite), ``c = mean(f1 - f2)`` minimises the squared error and the result is
    ``sqrt(mean((f1 - f2 - c)^2))``. A non-finite value inside the mask raises ``ValueError``.
    """
    a, b = _as_float64(f1), _as_float64(f2)
    if a.shape != b.shape:
        raise ValueError(f"surfaces must have the same shape, got {a.shape} and {b.shape}")
    if populated_mask is None:
        mask = np.isfinite(a) & np.isfinite(b)
    else:
        mask = _as_bool(populated_mask, "populated_mask")
        if mask.shape != a.shape:
            raise ValueError(f"populated_mask {mask.shape} must have shape {a.shape}")
    d = (a - b)[mask]
    if d.size == 0:
        raise ValueError("no bins selected to compare")
    n_bad = int(np.sum(~np.isfinite(d)))
    if n_bad:
        raise ValueError(f"{n_bad} selected bins are not finite in one of the surfaces")
    return float(np.sqrt(np.mean((d - d.mean()) ** 2)))


# ----------------------------------------------------------------------------- BAR / MBAR


def _import_pymbar() -> Any:
    # pymbar prints a banner about JAX and a timeseries caveat on import (stdout and warnings
    # logged without a handler, i.e. to stderr); keep them out of our output.
    logger = logging.getLogger("pymbar")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import pymbar
            from pymbar import other_estimators  # noqa: F401
    finally:
        logger.setLevel(level)
    return pymbar


def _bar_n_eff(w_f: np.ndarray, w_r: np.ndarray, df: float) -> float:
    """Smaller Kish count of the two states' MBAR weights at the BAR solution ``df``.

    Reduced energies are defined up to a per-sample constant, so forward samples get
    ``u = (0, w_F)`` and reverse samples ``u = (w_R, 0)``.
    """
    u = np.concatenate([np.stack([np.zeros_like(w_f), w_f]), np.stack([w_r, np.zeros_like(w_r)])],
                       axis=1)
    log_n = np.log([w_f.size, w_r.size])
    f = np.array([0.0, df])
    log_den = logsumexp(log_n[:, None] + f[:, None] - u, axis=0)
    return float(min(_kish_count(f[k] - u[k] - log_den) for k in (0, 1)))


def bar_delta_f(w_forward: ArrayLike, w_reverse: ArrayLike) -> FreeEnergy:
    """BAR free-energy difference ``F_B - F_A`` in kT (thin wrapper of ``pymbar.other_estimators.bar``).

    ``w_forward`` ``[N_F]``: ``u_B(x) - u_A(x)`` for ``x ~ A``; ``w_reverse`` ``[N_R]``:
    ``u_A(x) - u_B(x)`` for ``x ~ B`` (reduced, dimensionless). ``stderr`` is pymbar's BAR
    asymptotic error; ``n_eff`` the smaller Kish effective sample count of the two states'
    MBAR weights. Non-finite works raise ``ValueError`` (dropping them would change N_F/N_R,
    which enters BAR).
    """
    w_f, w_r = _as_float64(w_forward).ravel(), _as_float64(w_reverse).ravel()
    for name, w in (("w_forward", w_f), ("w_reverse", w_r)):
        n_bad = int(np.sum(~np.isfinite(w)))
        if n_bad or w.size == 0:
            raise ValueError(f"{name}: {n_bad} non-finite of {w.size} work values; BAR needs "
                             "finite works from non-empty sample sets")
    result = _import_pymbar().other_estimators.bar(w_f, w_r)
    df = float(result["Delta_f"])
    return FreeEnergy(df, float(result["dDelta_f"]), _bar_n_eff(w_f, w_r, df))


def thermodynamic_delta_f_bar(
    u_a_on_a: ArrayLike, u_b_on_a: ArrayLike, u_a_on_b: ArrayLike, u_b_on_b: ArrayLike
) -> FreeEnergy:
    """``F_B - F_A`` in kT by BAR when samples from both thermodynamic states are available.

    ``u_s_on_t``: reduced energy of state ``s`` evaluated on the samples drawn from state ``t``
    (``[N_A]`` for ``t = a``, ``[N_B]`` for ``t = b``), e.g. flow samples that were made exact by
    MCMC, or MD at each temperature. See :func:`bar_delta_f`.
    """
    w_f = _as_float64(u_b_on_a) - _as_float64(u_a_on_a)
    w_r = _as_float64(u_a_on_b) - _as_float64(u_b_on_b)
    return bar_delta_f(w_f, w_r)


def mbar_free_energies(u_kn: ArrayLike, N_k: ArrayLike) -> MBARFreeEnergies:  # noqa: N803
    """MBAR free energies (thin wrapper of ``pymbar.MBAR``).

    ``u_kn`` ``[K, N]``: reduced energy of every sample in every state, samples ordered by the
    state they were drawn from; ``N_k`` ``[K]``: number of samples from each state (0 allowed).
    NaN in ``u_kn`` raises ``ValueError``; ``+inf`` means the sample has zero weight in that state.
    """
    u = _as_float64(u_kn)
    n_k = np.asarray(N_k, dtype=np.int64)
    if u.ndim != 2 or n_k.shape != (u.shape[0],) or n_k.sum() != u.shape[1]:
        raise ValueError(f"u_kn {u.shape} and N_k {n_k.shape} (sum {n_k.sum()}) do not match")
    if np.any(np.isnan(u)):
        raise ValueError(f"u_kn contains {int(np.isnan(u).sum())} NaN entries")
    mbar = _import_pymbar().MBAR(u, n_k)
    res = mbar.compute_free_energy_differences()
    delta, d_delta = np.asarray(res["Delta_f"]), np.asarray(res["dDelta_f"])
    return MBARFreeEnergies(
        f_k=delta[0].copy(),
        stderr_k=d_delta[0].copy(),
        delta_f=delta,
        stderr_delta_f=d_delta,
        n_eff=np.asarray(mbar.compute_effective_sample_number(), dtype=np.float64),
    )


def thermodynamic_free_energies_mbar(
    u_target: ArrayLike, log_q: ArrayLike, temperature_ratios: Sequence[float]
) -> tuple[FreeEnergy, ...]:
    """Reduced free energies ``f(T_k) - f(T_0)`` in kT of the target at other temperatures, by MBAR.

    ``u_target`` ``[N]``: reduced energies ``U(x_i) / kT_0`` of flow samples ``x_i ~ q`` at the
    target temperature ``T_0``; ``log_q`` ``[N]``: the flow log-density of the same samples.
    ``temperature_ratios`` ``[K]``: ``r_k = T_k / T_0``, positive and finite. ``U`` must not depend
    on the temperature (analytic potentials, vacuum, OBC implicit solvent), so the reduced
    potential at ``T_k`` is ``u_target / r_k`` and ``f(T) = -ln ∫ exp(-U(x)/kT) dx``.

    MBAR (:func:`mbar_free_energies`, i.e. ``pymbar.MBAR``) gets one sampled state, the flow
    itself (reduced potential ``-log q``, ``N_0 = N``), and one unsampled state (``N_k = 0``) per
    distinct ratio, ``r = 1`` always among them. With a single sampled state MBAR reduces to
    importance sampling, so the values equal :func:`thermodynamic_delta_f_from_flow`'s; what it
    adds is pymbar's asymptotic error and every temperature in one solve.

    Returns one :class:`FreeEnergy` per entry of ``temperature_ratios``, in order: ``value =
    f(T_k) - f(T_0)``, ``stderr`` pymbar's asymptotic error of that difference (0 for ``r_k = 1``),
    ``n_eff`` the Kish effective number of samples of state ``k``'s weights
    ``exp(-u_target / r_k - log q)``, ``n_nonfinite`` as below.

    Non-finite values: a sample whose ``u_target`` or ``log_q`` is NaN or ±inf has weight 0 in every
    state (module rule). It is dropped from the MBAR input (pymbar rejects NaN) and counted in
    ``n_nonfinite``; dropping weight-0 samples changes neither the differences nor their errors.
    Raises ``ValueError`` when no sample is finite or a ratio is not positive and finite.

    Memory: ``u_kn`` is ``[K', N]`` float64 (``K'`` = 1 + distinct ratios) and pymbar keeps a few
    arrays of that size, e.g. ~0.3 GB each for ``N = 10^7`` and ``K' = 4``.
    """
    u0, lq = _as_float64(u_target), _as_float64(log_q)
    if u0.ndim != 1 or u0.shape != lq.shape:
        raise ValueError(f"u_target {u0.shape} and log_q {lq.shape} must both have shape [N]")
    ratios = _as_float64(temperature_ratios)
    if ratios.ndim != 1 or ratios.size == 0 or not np.all(np.isfinite(ratios) & (ratios > 0)):
        raise ValueError(f"temperature ratios must be a non-empty list of positive numbers, got {ratios.tolist()}")
    finite = np.isfinite(u0) & np.isfinite(lq)
    n_bad = int(u0.size - np.count_nonzero(finite))
    if n_bad == u0.size:
        raise ValueError(f"none of the {u0.size} samples has a finite u_target and log_q")
    if n_bad:
        u0, lq = u0[finite], lq[finite]
    states, index = np.unique(np.r_[1.0, ratios], return_inverse=True)  # index[0]: the target
    u_kn = np.empty((1 + states.size, u0.size))
    u_kn[0] = -lq
    np.divide(u0[None, :], states[:, None], out=u_kn[1:])
    n_k = np.zeros(1 + states.size, dtype=np.int64)
    n_k[0] = u0.size
    mbar = mbar_free_energies(u_kn, n_k)
    ref = 1 + int(index[0])
    return tuple(
        FreeEnergy(float(mbar.delta_f[ref, 1 + k]), float(mbar.stderr_delta_f[ref, 1 + k]),
                   float(mbar.n_eff[1 + k]), n_bad)
        for k in index[1:]
    )
