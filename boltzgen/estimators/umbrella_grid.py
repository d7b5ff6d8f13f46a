"""Harmonic umbrella windows on a grid of one or more CVs, unbiased together by MBAR, with errors
that see correlated windows; in reduced units.

A window ``k`` adds ``sum_d 0.5 k_d dist(x_d, c_kd)^2`` (kT; the minimum-image distance for a
periodic CV) to the unbiased energy, which is the same in every window and cancels in MBAR. The
analysis (:func:`analyze_window_grid`):

1. **MBAR on every frame** (:func:`solve_mbar`: Newton's method on MBAR's convex objective, the
   equations of pymbar.MBAR, which the tests check it against): ΔF between states, profiles along
   each CV and, for two CVs, the 2-D surface.
2. **Analytic error of decorrelated frames.** Each window's series is subsampled by its largest
   statistical inefficiency (pymbar.timeseries) over the series MBAR averages: the displacements of
   the biased CVs (the bias energy) and the state indicators, plus whatever the caller adds. A
   coordinate the bias leaves free and slow, such as psi under windows on phi alone, counts where
   it matters: states that depend on it are slow in every window. MBAR's asymptotic error of those
   frames (pymbar's "svd-ew" covariance, the states as extra unsampled states) is valid for them.
3. **Block bootstrap.** Each window's frames are cut into ``n_blocks`` consecutive blocks; a
   replicate draws blocks with replacement within every window and refits MBAR from the full fit
   with its Hessian held fixed (a few passes over the windows x frames matrix, where a fresh pymbar
   solve needs ~40), which sees any correlation shorter than a block. The reported error is the
   larger of the two. (Estimating ΔF from the decorrelated frames alone wastes most of them: on a
   test with a psi held 25 frames its spread was twice that of the all-frames estimate.)

No error bar sees a window that never relaxed along a coordinate at all; the halves (ΔF from the
first and from the second half of every window) and a comparison with plain MD where it is
converged (:func:`profile_agreement`) are the checks for that.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from threadpoolctl import threadpool_limits

from boltzgen.estimators.free_energy import import_pymbar
from boltzgen.estimators.histograms import FreeEnergySurface

#: A window's fraction of frames in a state may differ from MBAR's prediction by this much before it
#: counts as inconsistent ...
INCONSISTENT_FRACTION = 0.02
#: ... and when the window's decorrelated frames would show its count that far from the prediction
#: less often than this (two-sided binomial).
INCONSISTENT_P = 1e-3
#: Above this many windows x frames numbers the subsampled frames are thinned further (memory: 8
#: bytes each, a few copies at a time).
MAX_ENTRIES = 40_000_000


@dataclass(frozen=True, eq=False)
class WindowGrid:
    """Harmonic windows: ``centers`` ``[K, D]`` in the CVs' units (rad for periodic CVs), springs
    ``k_kT`` ``[D]`` in kT per unit squared, and which CVs are ``periodic`` ``[D]`` (period 2 pi)."""

    centers: np.ndarray
    k_kT: np.ndarray
    periodic: np.ndarray

    def __post_init__(self) -> None:
        c = np.atleast_2d(np.asarray(self.centers, dtype=np.float64))
        object.__setattr__(self, "centers", c)
        object.__setattr__(self, "k_kT", np.broadcast_to(np.asarray(self.k_kT, dtype=np.float64), c.shape[1:]).copy())
        object.__setattr__(self, "periodic", np.broadcast_to(np.asarray(self.periodic, dtype=bool), c.shape[1:]).copy())
        if c.shape[0] < 2:
            raise ValueError(f"need at least two windows, got {c.shape[0]}")
        if not np.all(self.k_kT > 0):
            raise ValueError("spring constants must be positive")

    @property
    def n_windows(self) -> int:
        return int(self.centers.shape[0])

    def displacements(self, values: np.ndarray, center: np.ndarray) -> np.ndarray:
        """``values`` ``[N, D]`` minus ``center`` ``[D]``, by the minimum image along periodic CVs."""
        d = np.asarray(values, dtype=np.float64) - center
        return np.where(self.periodic, np.remainder(d + math.pi, 2 * math.pi) - math.pi, d)

    def bias_kT(self, values: np.ndarray) -> np.ndarray:
        """Reduced bias ``[K, N]`` of every frame ``values`` ``[N, D]`` under every window."""
        x = np.asarray(values, dtype=np.float64)
        out = np.zeros((self.n_windows, x.shape[0]))
        for d in range(x.shape[1]):
            diff = x[None, :, d] - self.centers[:, d, None]
            if self.periodic[d]:
                diff = np.remainder(diff + math.pi, 2 * math.pi) - math.pi
            out += 0.5 * self.k_kT[d] * diff**2
        return out


# ----------------------------------------------------------------------------------------------
# MBAR
# ----------------------------------------------------------------------------------------------


def _log_denominators(u_kn: np.ndarray, log_n_k: np.ndarray, f_k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``ln D_n = ln sum_k N_k exp(f_k - u_kn)`` ``[N]``, and ``N_k W_kn = N_k exp(f_k - u_kn) / D_n`` ``[K, N]``."""
    a = (f_k + log_n_k)[:, None] - u_kn
    m = a.max(axis=0)
    np.subtract(a, m, out=a)
    np.exp(a, out=a)
    total = a.sum(axis=0)
    a /= total
    return m + np.log(total), a


def solve_mbar(u_kn: np.ndarray, n_k: np.ndarray, f_init: np.ndarray | None = None, tol: float = 1e-9,
               max_iter: int = 500, hessian: np.ndarray | None = None) -> np.ndarray:
    """MBAR's window free energies ``f_k`` ``[K]`` (kT, ``f_0 = 0``) by Newton's method.

    ``u_kn`` ``[K, N]``: reduced bias of every frame under every window, frames ordered by the window
    that drew them; ``n_k`` ``[K]`` frames per window (all > 0). From ``f_init`` (zeros by default)
    until every window's weights ``W_kn`` sum to 1 within ``tol``. Each step is the Newton step of
    MBAR's convex objective, halved until the gradient shrinks, or else the self-consistent
    iteration (pymbar's "adaptive" scheme): near the solution the objective's rounding makes a line
    search on it stall, the gradient does not. A fixed ``hessian`` ``[K, K]`` (that of a nearby
    problem, :func:`mbar_hessian`) saves the K x K x N product of every step: a bootstrap replicate
    started from the full fit converges on it in a few cheap steps.
    """
    n_k = np.asarray(n_k, dtype=np.float64)
    log_n = np.log(n_k)
    f = np.zeros(len(n_k)) if f_init is None else np.asarray(f_init, dtype=np.float64) - f_init[0]
    nw = _log_denominators(u_kn, log_n, f)[1]
    row = nw.sum(axis=1)  # N_k sum_n W_kn: N_k at the solution
    fixed = None if hessian is None else np.linalg.pinv(hessian[1:, 1:], rcond=1e-12)
    for _ in range(max_iter):
        error = np.max(np.abs(row / n_k - 1.0))
        if error < tol:
            break
        step = np.zeros_like(f)
        if fixed is None:
            hess = np.diag(row) - nw @ nw.T
            step[1:] = np.linalg.lstsq(hess[1:, 1:], n_k[1:] - row[1:], rcond=None)[0]
        else:
            step[1:] = fixed @ (n_k[1:] - row[1:])
        for t in (1.0, 0.5, 0.25, 0.125, None):
            trial = f - np.log(row / n_k) if t is None else f + t * step
            trial = trial - trial[0]
            trial_nw = _log_denominators(u_kn, log_n, trial)[1]
            trial_row = trial_nw.sum(axis=1)
            if t is None or np.max(np.abs(trial_row / n_k - 1.0)) < error:
                break
        f, nw, row = trial, trial_nw, trial_row
    return f


def mbar_hessian(u_kn: np.ndarray, n_k: np.ndarray, f_k: np.ndarray) -> np.ndarray:
    """The Hessian ``[K, K]`` of MBAR's objective at ``f_k`` (arguments as in :func:`solve_mbar`)."""
    nw = _log_denominators(u_kn, np.log(np.asarray(n_k, dtype=np.float64)), f_k)[1]
    return np.diag(nw.sum(axis=1)) - nw @ nw.T


def _unbiased_log_weights(u_kn: np.ndarray, n_k: np.ndarray, f_k: np.ndarray) -> np.ndarray:
    """``ln w_n`` ``[N]`` of the unbiased ensemble: ``-ln sum_k N_k exp(f_k - u_kn)``."""
    return -_log_denominators(u_kn, np.log(np.asarray(n_k, dtype=np.float64)), f_k)[0]


def _state_log_probabilities(log_w: np.ndarray, states: np.ndarray) -> np.ndarray:
    """``ln p_s`` ``[S]`` of the states (columns of ``states`` ``[N, S]`` bool) under weights ``exp(log_w)``."""
    m = log_w.max()
    w = np.exp(log_w - m)
    with np.errstate(divide="ignore"):
        return np.log(states.T.astype(np.float64) @ w) - math.log(w.sum())


def _analytic_covariance(u_kn: np.ndarray, n_k: np.ndarray, f_k: np.ndarray, states: np.ndarray) -> np.ndarray:
    """MBAR's asymptotic covariance ``[S, S]`` of the states' free energies ``-ln p_s`` (kT^2).

    The states enter as unsampled thermodynamic states with ``u = 0`` inside and ``+inf`` outside;
    the covariance is pymbar's "svd-ew" formula (Shirts & Chodera 2008, appendix D).
    """
    k = len(n_k)
    log_w = _unbiased_log_weights(u_kn, n_k, f_k)
    w_win = np.exp(f_k[:, None] - u_kn + log_w[None, :]).T  # [N, K]
    w = np.exp(log_w - log_w.max())
    mass = states.T.astype(np.float64) @ w
    w_states = np.where(states, w[:, None], 0.0) / np.where(mass > 0, mass, 1.0)
    big_w = np.concatenate([w_win, w_states], axis=1)
    n_all = np.concatenate([np.asarray(n_k, dtype=np.float64), np.zeros(states.shape[1])])
    s2, v = np.linalg.eigh(big_w.T @ big_w)
    sigma = np.diag(np.sqrt(np.clip(s2, 0.0, None)))
    inner = np.eye(len(n_all)) - sigma @ v.T @ np.diag(n_all) @ v @ sigma
    theta = v @ sigma @ np.linalg.pinv(inner, rcond=1e-10) @ sigma @ v.T
    return theta[k:, k:]


# ----------------------------------------------------------------------------------------------
# the analysis
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class GridEstimate:
    """What :func:`analyze_window_grid` finds, in kT.

    ``delta_f_kT`` ``[S - 1]``: ``F(state j) - F(state 0) = -ln(p_j / p_0)`` for j = 1 .. S-1, by MBAR
    on every frame, with ``stderr_kT`` the larger of ``stderr_analytic_kT`` (MBAR's asymptotic error
    of the decorrelated frames) and ``stderr_bootstrap_kT`` (block bootstrap over each window's time
    blocks; NaN without replicates). ``delta_f_halves_kT`` ``[2, S - 1]``: the same from the first and
    from the second half of every window. ``p_states`` ``[S]``: the unbiased state probabilities.
    ``profiles``: per CV, ``-ln`` of the unbiased bin probabilities (minimum 0, ``+inf`` where no frame
    fell) with bootstrap ``stderr_kT`` (of ``-ln p``, NaN without replicates), ``counts`` (frames) and
    ``n_eff`` (Kish, per bin). ``surface``: the same over the first two CVs (``None`` for one CV).
    ``f_k`` ``[K]``: the windows' free energies. Per window: ``statistical_inefficiency`` ``[K]``
    (frames), ``n_frames`` ``[K]`` (frames used) and ``n_uncorrelated`` ``[K]`` (decorrelated frames).
    ``n_short_blocks``: windows whose bootstrap blocks are shorter than their statistical
    inefficiency (their correlation then escapes the bootstrap); ``thinning`` > 1 when the frames were
    thinned to bound memory (:data:`MAX_ENTRIES`). ``state_fractions`` ``[K, S]``: each window's
    frames in each state; ``state_fractions_predicted`` ``[K, S]``: the same predicted by the unbiased
    ensemble of all frames under the window's bias; ``inconsistent_windows`` ``[K]`` bool: the two
    differ by more than :data:`INCONSISTENT_FRACTION`, with a binomial p-value of the window's
    decorrelated frames below :data:`INCONSISTENT_P`: the mark of a window that never relaxed along
    a coordinate the bias leaves free (its neighbours hold another mixture of states), which no
    error bar of its own frames sees.
    """

    delta_f_kT: np.ndarray
    stderr_kT: np.ndarray
    stderr_analytic_kT: np.ndarray
    stderr_bootstrap_kT: np.ndarray
    delta_f_halves_kT: np.ndarray
    p_states: np.ndarray
    profiles: tuple[FreeEnergySurface, ...]
    surface: FreeEnergySurface | None
    f_k: np.ndarray
    statistical_inefficiency: np.ndarray
    n_frames: np.ndarray
    n_uncorrelated: np.ndarray
    n_bootstrap: int
    n_blocks: int
    n_short_blocks: int
    thinning: int
    state_fractions: np.ndarray | None = None
    state_fractions_predicted: np.ndarray | None = None
    inconsistent_windows: np.ndarray | None = None


def statistical_inefficiency(series: np.ndarray) -> float:
    """The largest statistical inefficiency (frames, >= 1) of the columns of ``series`` ``[T, M]``
    (pymbar.timeseries); constant columns are skipped."""
    timeseries = import_pymbar().timeseries
    g = 1.0
    for column in np.asarray(series, dtype=np.float64).T:
        if len(column) >= 4 and np.ptp(column) > 0:
            g = max(g, float(timeseries.statistical_inefficiency(column)))
    return g


def _subsample(grid: WindowGrid, k: int, values: np.ndarray, states: np.ndarray, observables: np.ndarray | None,
               enabled: bool) -> tuple[np.ndarray, float]:
    """Indices of roughly uncorrelated frames of window ``k`` and its statistical inefficiency."""
    n = len(values)
    if not enabled:
        return np.arange(n), 1.0
    series = np.concatenate([grid.displacements(values, grid.centers[k]), states.reshape(n, -1).astype(np.float64)],
                            axis=1)
    if observables is not None:
        series = np.concatenate([series, np.asarray(observables, dtype=np.float64).reshape(n, -1)], axis=1)
    g = statistical_inefficiency(series)
    idx = np.asarray(import_pymbar().timeseries.subsample_correlated_data(np.arange(n), g=g), dtype=int)
    return idx, g


def _bin_indices(values: np.ndarray, edges: Sequence[np.ndarray]) -> tuple[np.ndarray, tuple[int, ...]]:
    """Flat bin index ``[N]`` of ``values`` ``[N, D']`` on ``edges`` (-1 outside)."""
    shape = tuple(len(e) - 1 for e in edges)
    inside = np.ones(len(values), dtype=bool)
    idx = []
    for d, e in enumerate(edges):
        i = np.searchsorted(e, values[:, d], side="right") - 1
        inside &= (i >= 0) & (i < len(e) - 1)
        idx.append(np.clip(i, 0, len(e) - 2))
    return np.where(inside, np.ravel_multi_index(tuple(idx), shape), -1), shape


def _neg_log_bin_probabilities(bins: np.ndarray, n_bins: int, log_w: np.ndarray) -> np.ndarray:
    """``-ln p`` of every bin ``[n_bins]`` (frames outside, ``bins = -1``, count in the total)."""
    w = np.exp(log_w - log_w.max())
    inside = bins >= 0
    hist = np.bincount(bins[inside], weights=w[inside], minlength=n_bins)
    with np.errstate(divide="ignore"):
        return -np.log(hist / w.sum())


@dataclass(frozen=True, eq=False)
class _Frames:
    """The subsampled frames of all windows, concatenated in window order."""

    u_kn: np.ndarray
    n_k: np.ndarray
    states: np.ndarray
    bins: tuple[np.ndarray, ...]
    blocks: np.ndarray  # [N] block of each frame within its window, 0 .. n_blocks - 1


def _fit(frames: _Frames, idx: np.ndarray | None, f_init: np.ndarray | None,
         hessian: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(f_k, ln w_n)`` of the frames ``idx`` (all when None): the frames must stay in window order."""
    if idx is None:
        u, n_k = frames.u_kn, frames.n_k
    else:
        u = frames.u_kn[:, idx]
        n_k = np.bincount(np.repeat(np.arange(len(frames.n_k)), frames.n_k)[idx], minlength=len(frames.n_k))
    f_k = solve_mbar(u, n_k, f_init, hessian=hessian)
    return f_k, _unbiased_log_weights(u, n_k, f_k)


def _delta_f(log_p: np.ndarray) -> np.ndarray:
    return log_p[0] - log_p[1:]


def _window_starts(n_k: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(n_k)[:-1]])


def _bootstrap(frames: _Frames, f_full: np.ndarray, hessian: np.ndarray, n_bootstrap: int, n_blocks: int,
               rng: np.random.Generator, shapes: Sequence[int], joint: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """Replicates of ΔF ``[R, S - 1]`` and of ``-ln p`` per binning ``[R, bins]``, by blocks within
    windows; ``joint``: the same blocks in every window (windows coupled by exchanges, equal lengths)."""
    starts = _window_starts(frames.n_k)
    delta, curves = [], [[] for _ in shapes]
    for _ in range(n_bootstrap):
        parts = []
        n_shared = min(n_blocks, int(frames.n_k.min()))
        shared = rng.integers(0, n_shared, n_shared) if joint else None
        for k, start in enumerate(starts):
            own = frames.blocks[start:start + frames.n_k[k]]
            n = min(n_blocks, int(frames.n_k[k]))
            picked = shared if shared is not None else rng.integers(0, n, n)
            parts.append(start + np.concatenate([np.flatnonzero(own == b) for b in picked]))
        idx = np.concatenate(parts)
        _, log_w = _fit(frames, idx, f_full, hessian)
        delta.append(_delta_f(_state_log_probabilities(log_w, frames.states[idx])))
        for curve, bins, n_bins in zip(curves, frames.bins, shapes):
            curve.append(_neg_log_bin_probabilities(bins[idx], n_bins, log_w))
    return np.asarray(delta).reshape(n_bootstrap, -1), [np.asarray(c) for c in curves]


def _window_state_fractions(frames: _Frames, log_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per window ``[K, S]``: the fraction of its own frames in each state, and the fraction that the
    unbiased ensemble of all frames (log-weights ``log_w`` ``[N]``) puts there under its bias."""
    states = frames.states.astype(np.float64)
    observed, predicted = [], []
    for k, (start, n) in enumerate(zip(_window_starts(frames.n_k), frames.n_k)):
        observed.append(states[start:start + n].mean(axis=0))
        a = log_w - frames.u_kn[k]
        w = np.exp(a - a.max())
        predicted.append(w @ states / w.sum())
    return np.asarray(observed), np.asarray(predicted)


def _surface(edges: Sequence[np.ndarray], bins: np.ndarray, log_w: np.ndarray, reps: np.ndarray) -> FreeEnergySurface:
    """A :class:`FreeEnergySurface` of bin probabilities (not densities) with bootstrap errors."""
    shape = tuple(len(e) - 1 for e in edges)
    n_bins = int(np.prod(shape))
    f = _neg_log_bin_probabilities(bins, n_bins, log_w)
    inside = bins >= 0
    w = np.exp(log_w - log_w.max())
    counts = np.bincount(bins[inside], minlength=n_bins)
    sum_w = np.bincount(bins[inside], weights=w[inside], minlength=n_bins)
    sum_w2 = np.bincount(bins[inside], weights=w[inside] ** 2, minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        n_eff = np.where(sum_w2 > 0, sum_w**2 / sum_w2, 0.0)
    stderr = np.full(n_bins, math.nan)
    if len(reps) >= 2:
        ok = np.isfinite(reps)
        n_ok = ok.sum(axis=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # bins with fewer than 2 finite replicates
            sd = np.nanstd(np.where(ok, reps, np.nan), axis=0, ddof=1)
        stderr = np.where((n_ok >= 2) & np.isfinite(f), sd, math.nan)
    finite = np.isfinite(f)
    f_shifted = f - f[finite].min() if finite.any() else f
    return FreeEnergySurface(edges=tuple(np.asarray(e, dtype=np.float64) for e in edges), f_kT=f_shifted.reshape(shape),
                             stderr_kT=stderr.reshape(shape), counts=counts.reshape(shape), n_eff=n_eff.reshape(shape),
                             n_outside=int((~inside).sum()))


def _collect(grid: WindowGrid, values_per_window: Sequence[np.ndarray], states_per_window: Sequence[np.ndarray],
             observables_per_window: Sequence[np.ndarray] | None, subsample: bool, n_blocks: int,
             edges: Sequence[np.ndarray]) -> tuple[dict[str, _Frames], np.ndarray, int]:
    """The frames of every window (all, thinned only to bound memory), their first and second halves,
    and the decorrelated ones; each window's statistical inefficiency, and the thinning."""
    total = sum(len(v) for v in values_per_window)
    thinning = max(1, math.ceil(total * grid.n_windows / MAX_ENTRIES))
    kept = [np.arange(0, len(v), thinning) for v in values_per_window]
    if min(len(i) for i in kept) < 2:
        raise ValueError(f"a window keeps {min(len(i) for i in kept)} frame; run the windows longer")
    picked, gs = [], []
    for k, (values, idx) in enumerate(zip(values_per_window, kept)):
        obs = None if observables_per_window is None else np.asarray(observables_per_window[k])[idx]
        sub, g = _subsample(grid, k, np.asarray(values, dtype=np.float64).reshape(len(values), -1)[idx],
                            np.asarray(states_per_window[k])[idx], obs, subsample)
        picked.append(idx[sub])
        gs.append(g * thinning)

    def frames(select: Sequence[np.ndarray]) -> _Frames:
        values = np.concatenate([np.asarray(v, dtype=np.float64).reshape(len(v), -1)[i]
                                 for v, i in zip(values_per_window, select)])
        states = np.concatenate([np.asarray(s, dtype=bool).reshape(len(s), -1)[i]
                                 for s, i in zip(states_per_window, select)])
        # A window with fewer frames than n_blocks has one frame per block.
        blocks = np.concatenate([np.arange(len(i)) * min(n_blocks, len(i)) // max(len(i), 1) for i in select])
        bins = [_bin_indices(values[:, d:d + 1], [edges[d]])[0] for d in range(len(edges))]
        if len(edges) > 1:
            bins.append(_bin_indices(values[:, :2], edges[:2])[0])
        return _Frames(grid.bias_kT(values), np.array([len(i) for i in select]), states, tuple(bins), blocks)

    sets = {"all": frames(kept), "first": frames([i[: len(i) // 2] for i in kept]),
            "second": frames([i[len(i) // 2:] for i in kept]), "decorrelated": frames(picked)}
    return sets, np.asarray(gs), thinning


def analyze_window_grid(
    grid: WindowGrid,
    values_per_window: Sequence[np.ndarray],
    states_per_window: Sequence[np.ndarray],
    edges: Sequence[np.ndarray],
    *,
    observables_per_window: Sequence[np.ndarray] | None = None,
    subsample: bool = True,
    n_bootstrap: int = 20,
    n_blocks: int = 10,
    rng: np.random.Generator | int | None = 0,
    joint_blocks: bool = False,
) -> GridEstimate:
    """Unbias the windows of ``grid`` together by MBAR: ΔF between states, profiles, honest errors.

    ``values_per_window``: K arrays ``[N_k, D]`` (or ``[N_k]`` for one CV) of the biased CVs of each
    window's production frames in time order (rad for periodic CVs). ``states_per_window``: K arrays
    ``[N_k, S]`` bool, the frames' membership of S >= 2 states; ΔF is from state 0 to each other.
    ``edges``: one array of bin edges per CV for the profiles (and the 2-D surface over the first
    two). ``observables_per_window``: K arrays ``[N_k, M]`` of series whose correlation the
    subsampling must respect beside the biased CVs and the states. ``subsample`` False takes every
    frame as independent for the analytic error. ``n_bootstrap`` replicates (0: none) of ``n_blocks``
    blocks per window, drawn with ``rng``; ``joint_blocks`` draws the same blocks of time in every
    window, for windows of equal length coupled by exchanges of configurations, whose correlation
    runs across windows. See the module docstring. Returns a :class:`GridEstimate`.

    The matrix products run on one BLAS thread: on a loaded machine, OpenBLAS's waiting threads made
    them up to 20x slower than one thread.
    """
    if len(values_per_window) != grid.n_windows or len(states_per_window) != grid.n_windows:
        raise ValueError(f"{len(values_per_window)} windows of CVs and {len(states_per_window)} of states, but "
                         f"{grid.n_windows} windows")
    if len(edges) != grid.centers.shape[1]:
        raise ValueError(f"need bin edges for each of the {grid.centers.shape[1]} CVs, got {len(edges)}")
    with threadpool_limits(limits=1, user_api="blas"):
        if joint_blocks and len({len(v) for v in values_per_window}) != 1:
            raise ValueError("joint_blocks needs windows of equal length")
        return _analyze(grid, values_per_window, states_per_window, edges, observables_per_window, subsample,
                        n_bootstrap, n_blocks, np.random.default_rng(rng), joint_blocks)


def _analyze(grid: WindowGrid, values_per_window: Sequence[np.ndarray], states_per_window: Sequence[np.ndarray],
             edges: Sequence[np.ndarray], observables_per_window: Sequence[np.ndarray] | None, subsample: bool,
             n_bootstrap: int, n_blocks: int, rng: np.random.Generator, joint_blocks: bool = False) -> GridEstimate:
    """:func:`analyze_window_grid` after its checks."""
    sets, gs, thinning = _collect(grid, values_per_window, states_per_window, observables_per_window, subsample,
                                  n_blocks, edges)
    full, decorrelated = sets["all"], sets["decorrelated"]
    if full.states.shape[1] < 2:
        raise ValueError("need at least two states")
    f_k, log_w = _fit(full, None, None)
    hessian = mbar_hessian(full.u_kn, full.n_k, f_k)
    log_p = _state_log_probabilities(log_w, full.states)
    delta = _delta_f(log_p)
    f_dec = _fit(decorrelated, None, f_k)[0]
    cov = _analytic_covariance(decorrelated.u_kn, decorrelated.n_k, f_dec, decorrelated.states)
    var = np.diag(cov)[1:] + cov[0, 0] - 2.0 * cov[0, 1:]
    analytic = np.where(np.isfinite(delta), np.sqrt(np.clip(var, 0.0, None)), math.nan)
    halves = np.array([_delta_f(_state_log_probabilities(_fit(sets[h], None, f_k, 0.5 * hessian)[1], sets[h].states))
                       for h in ("first", "second")])
    shapes = [len(e) - 1 for e in edges]
    if len(edges) > 1:
        shapes.append((len(edges[0]) - 1) * (len(edges[1]) - 1))
    reps_delta, reps_curves = (_bootstrap(full, f_k, hessian, n_bootstrap, n_blocks, rng, shapes, joint_blocks) if n_bootstrap >= 2
                               else (np.zeros((0, len(delta))), [np.zeros((0, n)) for n in shapes]))
    boot = np.std(reps_delta, axis=0, ddof=1) if len(reps_delta) >= 2 else np.full(len(delta), math.nan)
    profiles = tuple(_surface([edges[d]], full.bins[d], log_w, reps_curves[d]) for d in range(len(edges)))
    surface = _surface(edges[:2], full.bins[-1], log_w, reps_curves[-1]) if len(edges) > 1 else None
    block_frames = full.n_k * thinning / np.minimum(n_blocks, full.n_k)
    observed, predicted = _window_state_fractions(full, log_w)
    n_dec = np.maximum(decorrelated.n_k, 1)[:, None]
    count = np.round(observed * n_dec)
    p_value = 2.0 * np.minimum(stats.binom.cdf(count, n_dec, predicted), stats.binom.sf(count - 1, n_dec, predicted))
    inconsistent = np.any((np.abs(observed - predicted) > INCONSISTENT_FRACTION) & (p_value < INCONSISTENT_P), axis=1)
    return GridEstimate(
        delta_f_kT=delta, stderr_kT=np.fmax(analytic, boot), stderr_analytic_kT=analytic, stderr_bootstrap_kT=boot,
        delta_f_halves_kT=halves, p_states=np.exp(log_p), profiles=profiles, surface=surface, f_k=f_k,
        statistical_inefficiency=gs, n_frames=full.n_k, n_uncorrelated=decorrelated.n_k,
        n_bootstrap=int(len(reps_delta)), n_blocks=n_blocks, n_short_blocks=int(np.sum(block_frames < gs)),
        thinning=thinning, state_fractions=observed, state_fractions_predicted=predicted,
        inconsistent_windows=inconsistent,
    )


# ----------------------------------------------------------------------------------------------
# agreement of two profiles
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ProfileAgreement:
    """Two profiles compared over ``n_bins`` bins, after the constant shift that fits them best
    (weighted by the combined variance): ``rmse_kT`` of the shifted difference, ``max_abs_z`` the
    largest difference in combined standard errors, ``chi2`` (sum of z^2, ``n_bins - 1`` degrees of
    freedom) and its ``p_value``. ``disagree`` when ``p_value < p_alarm`` and ``rmse_kT`` exceeds
    ``min_rmse_kT`` (a difference too small to matter is not flagged however many frames show it).
    ``n_bins`` = 0: nothing to compare (the other fields NaN, ``disagree`` False).
    """

    n_bins: int
    rmse_kT: float
    max_abs_z: float
    chi2: float
    p_value: float
    disagree: bool


def profile_agreement(f_test: np.ndarray, se_test: np.ndarray, f_ref: np.ndarray, se_ref: np.ndarray,
                      mask: np.ndarray, *, p_alarm: float = 1e-3, min_rmse_kT: float = 0.1) -> ProfileAgreement:
    """Do two profiles ``[B]`` (kT, any constant offset) with standard errors ``[B]`` agree on the
    bins in ``mask`` ``[B]`` bool? Bins where either value or error is not finite are left out.
    Returns a :class:`ProfileAgreement`."""
    f_a, f_b = np.asarray(f_test, dtype=np.float64), np.asarray(f_ref, dtype=np.float64)
    var = np.asarray(se_test, dtype=np.float64) ** 2 + np.asarray(se_ref, dtype=np.float64) ** 2
    ok = np.asarray(mask, dtype=bool) & np.isfinite(f_a) & np.isfinite(f_b) & np.isfinite(var) & (var > 0)
    n = int(ok.sum())
    if n < 2:
        return ProfileAgreement(n, math.nan, math.nan, math.nan, math.nan, False)
    d, v = (f_a - f_b)[ok], var[ok]
    shift = float(np.sum(d / v) / np.sum(1.0 / v))
    z = (d - shift) / np.sqrt(v)
    chi2 = float(np.sum(z**2))
    p_value = float(stats.chi2.sf(chi2, n - 1))
    rmse = float(np.sqrt(np.mean((d - shift) ** 2)))
    return ProfileAgreement(n, rmse, float(np.max(np.abs(z))), chi2, p_value, p_value < p_alarm and rmse > min_rmse_kT)
