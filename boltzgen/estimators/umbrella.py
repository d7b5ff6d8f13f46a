"""Umbrella-sampling analysis along a periodic CV (a torsion), in reduced units.

Two estimators, one per way of running the umbrella sampling:

- :func:`analyze_umbrella` -> :class:`UmbrellaEstimate`: harmonic windows along the torsion,
  each window's series subsampled by its statistical inefficiency and all windows unbiased
  together with MBAR (pymbar 4);
- :func:`analyze_flattened_umbrella` -> :class:`FlattenedEstimate`: runs under one static bias
  ``V(phi)``, reweighted to the unbiased ensemble by ``exp(+V/kT)``, with block-jackknife errors
  and counts of the transitions between the two states.

Results are in kT. The harmonic windows are given by their spring constant (kJ/mol/rad^2) and the
thermal energy kT (kJ/mol), so that the reduced bias is computed exactly as the simulation reports
it; the bias energies of the flattened runs come reduced, as ``V / kT``. Profiles along the CV are
:class:`~boltzgen.estimators.histograms.FreeEnergySurface` with one CV, whose ``edges`` run from
-pi to pi.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from boltzgen.estimators.free_energy import delta_f_blocked, import_pymbar
from boltzgen.estimators.histograms import FreeEnergySurface, free_energy_surface
from boltzgen.geometry import wrap_angle

#: A vectorised predicate on the CV: ``[N]`` angles (rad) -> ``[N]`` bool, True in state B.
StatePredicate = Callable[[np.ndarray], np.ndarray]


def umbrella_bias(phi_rad: np.ndarray, centers_rad: np.ndarray, k_per_rad2: float) -> np.ndarray:
    """Harmonic umbrella bias ``0.5 k d(phi, c)^2`` of every sample under every window.

    ``d`` is the minimum-image angle difference, so the bias is continuous across +-pi.
    ``phi_rad`` holds ``[N]`` angles and ``centers_rad`` the ``[K]`` window centres, both in
    radians. The result is ``[K, N]`` float64 in the energy unit of ``k_per_rad2``: kT for a
    spring constant in kT/rad^2, kJ/mol for one in kJ/mol/rad^2.
    """
    phi = np.asarray(phi_rad, dtype=np.float64)
    centers = np.asarray(centers_rad, dtype=np.float64)
    d = wrap_angle(phi[None, :] - centers[:, None])
    return 0.5 * float(k_per_rad2) * d**2


def bin_centers(edges: np.ndarray) -> np.ndarray:
    """Centres ``[B]`` of the bins between ``[B + 1]`` edges (same unit as the edges)."""
    edges = np.asarray(edges, dtype=np.float64)
    return 0.5 * (edges[:-1] + edges[1:])


def _periodic_edges(bin_width_deg: float) -> np.ndarray:
    """Edges ``[B + 1]`` (rad) of equal bins from -pi to pi, ``B = 360 / bin_width_deg`` rounded."""
    n_bins = max(1, int(round(360.0 / bin_width_deg)))
    return np.linspace(-math.pi, math.pi, n_bins + 1)


def _state_mask(state_b: StatePredicate, phi: np.ndarray) -> np.ndarray:
    in_b = np.asarray(state_b(phi), dtype=bool)
    if in_b.shape != phi.shape:
        raise ValueError("state_b must map a [N] array of phi to a [N] boolean array")
    return in_b


# ----------------------------------------------------------------------------------------------
# harmonic windows, unbiased with MBAR
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class UmbrellaEstimate:
    """MBAR estimates from umbrella-sampling windows (see :func:`analyze_umbrella`).

    ``delta_f_kT`` is ``F_B - F_A = -ln(p_B / p_A)`` in kT, A being the complement of B, and
    ``stderr_kT`` its analytic MBAR standard error (kT). ``delta_f_halves_kT`` holds the same
    estimate from the first and from the second half of every window's data, each analysed on
    its own (a check of stationarity and of the analytic error), and ``halves_stderr_kT`` is
    ``|first - second| / 2``, a crude independent-chunk error (kT). ``p_b`` is the unbiased
    probability of state B. ``profile`` is the free energy along the CV: ``f_kT`` ``[B]`` is
    ``-ln`` of the bin probabilities, shifted so that the lowest bin is 0 and ``+inf`` where a bin
    has no sample; its ``stderr_kT`` ``[B]`` is MBAR's analytic error of ``f[b] - f[lowest]`` (0
    at the lowest bin, NaN for empty bins) and its ``counts`` are the subsampled frames per bin.
    ``statistical_inefficiency`` ``[K]`` is each window's g in frames, used for the subsampling,
    and ``n_uncorrelated`` ``[K]`` the frames per window that went into MBAR.
    """

    delta_f_kT: float
    stderr_kT: float
    delta_f_halves_kT: tuple[float, float]
    halves_stderr_kT: float
    p_b: float
    profile: FreeEnergySurface
    statistical_inefficiency: np.ndarray
    n_uncorrelated: np.ndarray


@dataclass(frozen=True, eq=False)
class _MBARFit:
    """One MBAR analysis: ΔF (kT) with its error, p_B, the profile and the window free energies ``f_k`` ``[K]``."""

    delta_f_kT: float
    stderr_kT: float
    p_b: float
    profile: FreeEnergySurface
    f_k: np.ndarray


def _subsample(phi: np.ndarray, center: float, enabled: bool) -> tuple[np.ndarray, float]:
    """Indices of roughly uncorrelated frames of one window, and its statistical inefficiency."""
    timeseries = import_pymbar().timeseries

    n = len(phi)
    if not enabled or n < 4:
        return np.arange(n), 1.0
    # The signed displacement from the centre is continuous across +-pi, unlike phi itself.
    s = wrap_angle(phi - center)
    if np.ptp(s) == 0.0:
        return np.arange(n), 1.0
    g = float(timeseries.statistical_inefficiency(s))
    idx = np.asarray(timeseries.subsample_correlated_data(s, g=g), dtype=int)
    return idx, g


def _mbar_delta_f(mbar: Any, in_b: np.ndarray) -> tuple[float, float, float]:
    """``(ΔF, its stderr, p_B)`` (kT) from the MBAR expectation of the state-B indicator."""
    u_target = np.zeros(in_b.shape)
    with np.errstate(divide="ignore"):
        res = mbar.compute_expectations(in_b.astype(np.float64), u_kn=u_target)
    p_b, sigma_b = float(np.ravel(res["mu"])[0]), float(np.ravel(res["sigma"])[0])
    if 0.0 < p_b < 1.0:
        # d/dp of -logit(p) is -1/(p(1-p)); A and B are complementary so this is exact error propagation.
        return -math.log(p_b / (1.0 - p_b)), sigma_b / (p_b * (1.0 - p_b)), p_b
    return (math.inf if p_b <= 0.0 else -math.inf), math.nan, p_b


def _mbar_profile(mbar: Any, phi: np.ndarray, edges: np.ndarray) -> FreeEnergySurface:
    """The unbiased profile in bins of ``edges``, with delta-method errors from MBAR's covariance."""
    n_bins = len(edges) - 1
    bin_idx = np.clip(np.digitize(phi, edges) - 1, 0, n_bins - 1)
    counts = np.bincount(bin_idx, minlength=n_bins)
    occupied = np.flatnonzero(counts > 0)
    indicators = (bin_idx[None, :] == occupied[:, None]).astype(np.float64)
    with np.errstate(divide="ignore"):  # pymbar takes log of the 0/1 indicators
        multi = mbar.compute_multiple_expectations(indicators, np.zeros_like(phi), return_theta=True)
    mu = np.asarray(multi["mu"], dtype=np.float64)
    theta = np.asarray(multi["Theta"], dtype=np.float64)
    m = len(occupied)
    # pymbar 4.0's "covariances" output is the unscaled inner Theta block, so build Cov(mu_i, mu_j)
    # from the scaled Theta the same way pymbar builds its "sigma".
    cov = theta[:m, :m] + theta[m:, m:] - theta[:m, m:] - theta[m:, :m]
    with np.errstate(divide="ignore"):
        f_occ = -np.log(mu)
    ref = int(np.argmin(f_occ))
    # Var(ln p_b - ln p_r) by the delta method, with the MBAR covariance of the bin probabilities.
    var = np.diag(cov) / mu**2 + cov[ref, ref] / mu[ref] ** 2 - 2.0 * cov[:, ref] / (mu * mu[ref])
    f_bins = np.full(n_bins, np.inf)
    se_bins = np.full(n_bins, np.nan)
    f_bins[occupied] = f_occ - f_occ[ref]
    se_bins[occupied] = np.sqrt(np.clip(var, 0.0, None))
    # n_eff: the bin's frames, already subsampled to be roughly uncorrelated.
    return FreeEnergySurface(edges=(edges,), f_kT=f_bins, stderr_kT=se_bins, counts=counts, n_eff=counts.astype(float))


def _mbar_estimate(
    phi_per_window: Sequence[np.ndarray],
    centers: np.ndarray,
    k_kJ_per_mol_rad2: float,
    kT_kJ_per_mol: float,
    state_b: StatePredicate,
    edges: np.ndarray,
    initial_f_k: np.ndarray | None = None,
) -> _MBARFit:
    """MBAR on already subsampled windows (``phi_per_window``: K arrays of angles in rad)."""
    MBAR = import_pymbar().MBAR

    phi = np.concatenate([np.asarray(p, dtype=np.float64) for p in phi_per_window])
    n_k = np.array([len(p) for p in phi_per_window], dtype=int)
    # The unbiased potential is common to every window at one temperature, so it cancels in MBAR
    # and the reduced bias is all of u_kn. Centres are sorted, so BAR between neighbours is a
    # cheap, good starting point.
    u_kn = umbrella_bias(phi, centers, k_kJ_per_mol_rad2) / kT_kJ_per_mol
    init = {"initialize": "BAR"} if initial_f_k is None else {"initial_f_k": initial_f_k}
    mbar = MBAR(u_kn, n_k, **init)
    delta_f, stderr, p_b = _mbar_delta_f(mbar, _state_mask(state_b, phi))
    return _MBARFit(
        delta_f_kT=delta_f,
        stderr_kT=stderr,
        p_b=p_b,
        profile=_mbar_profile(mbar, phi, edges),
        f_k=np.asarray(mbar.f_k, dtype=np.float64),
    )


def analyze_umbrella(
    phi_per_window: Sequence[np.ndarray],
    centers_rad: Sequence[float],
    k_kJ_per_mol_rad2: float,
    kT_kJ_per_mol: float,
    state_b: StatePredicate,
    *,
    bin_width_deg: float = 10.0,
    subsample: bool = True,
) -> UmbrellaEstimate:
    """Unbias harmonic umbrella windows along a torsion with MBAR (pymbar 4).

    ``phi_per_window`` holds K arrays ``[N_k]`` of production torsion values (rad) in time order,
    one per window, and ``centers_rad`` the ``[K]`` window centres (rad), sorted. All windows
    share the spring constant ``k_kJ_per_mol_rad2`` (kJ/mol/rad^2) and one temperature, whose
    thermal energy is ``kT_kJ_per_mol`` (kJ/mol); MBAR sees the reduced bias. ``state_b`` maps ``[N]`` angles (rad) to ``[N]`` bool; state A is its
    complement. When ``subsample`` is True each window's series is subsampled by its statistical
    inefficiency (pymbar.timeseries) before MBAR. The first and second halves of every window are
    also analysed on their own. The profile has bins of ``bin_width_deg`` degrees (360 divided by
    it, rounded) from -pi to pi. Returns an :class:`UmbrellaEstimate`.
    """
    centers = np.asarray(centers_rad, dtype=np.float64)
    if len(phi_per_window) != len(centers):
        raise ValueError(f"{len(phi_per_window)} windows of data but {len(centers)} centres")
    edges = _periodic_edges(bin_width_deg)

    picked, gs = [], []
    halves: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    for phi, c in zip(phi_per_window, centers):
        phi = np.asarray(phi, dtype=np.float64)
        idx, g = _subsample(phi, c, subsample)
        picked.append(phi[idx])
        gs.append(g)
        mid = len(phi) // 2
        for half, part in zip(halves, (phi[:mid], phi[mid:])):
            half.append(part[_subsample(part, c, subsample)[0]])

    spring = (k_kJ_per_mol_rad2, kT_kJ_per_mol)
    fit = _mbar_estimate(picked, centers, *spring, state_b, edges)
    half_df = tuple(_mbar_estimate(h, centers, *spring, state_b, edges, initial_f_k=fit.f_k).delta_f_kT for h in halves)
    return UmbrellaEstimate(
        delta_f_kT=float(fit.delta_f_kT),
        stderr_kT=float(fit.stderr_kT),
        delta_f_halves_kT=(float(half_df[0]), float(half_df[1])),
        halves_stderr_kT=float(abs(half_df[0] - half_df[1]) / 2.0),
        p_b=fit.p_b,
        profile=fit.profile,
        statistical_inefficiency=np.asarray(gs, dtype=np.float64),
        n_uncorrelated=np.array([len(p) for p in picked], dtype=int),
    )


# ----------------------------------------------------------------------------------------------
# runs under a static (flattening) bias, reweighted by exp(+V/kT)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FlattenedEstimate:
    """Reweighted estimates from runs under a static bias (see :func:`analyze_flattened_umbrella`).

    ``delta_f_kT`` is ``F_B - F_A = -ln(sum_B w / sum_A w)`` over all repeats with
    ``w = exp(+V/kT)``, and ``stderr_kT`` its delete-one-block jackknife error over the
    ``repeats * n_blocks`` time blocks (kT). ``repeat_delta_f_kT`` and ``repeat_stderr_kT`` are
    each repeat's own ΔF and block-jackknife error (kT), and ``repeat_spread_kT`` the sample
    standard deviation of the repeats' ΔF (kT; NaN for one repeat). ``transitions`` counts, per
    repeat, the committed A<->B transitions: changes of the last visited *core*, a core being the
    part of a state within ``core_width_kT`` of the state's lowest flattened-profile value.
    ``p_b`` is the reweighted probability of state B, ``n_samples`` the frames used (all
    repeats) and ``n_eff`` the Kish effective sample count of the less populated state (weights
    only, no time correlation). ``profile`` is the reweighted free energy along the CV: ``-ln`` of
    the bin probabilities, minimum 0, ``+inf`` for empty bins, with a ``stderr_kT`` from the same
    block jackknife (NaN where a leave-one-out replicate empties the bin or the bin is empty).
    """

    delta_f_kT: float
    stderr_kT: float
    repeat_delta_f_kT: tuple[float, ...]
    repeat_stderr_kT: tuple[float, ...]
    repeat_spread_kT: float
    transitions: tuple[int, ...]
    p_b: float
    n_samples: int
    n_eff: float
    profile: FreeEnergySurface


def _count_transitions(labels: np.ndarray) -> int:
    """Changes of the last visited core in a label series (0 = core A, 1 = core B, -1 = neither)."""
    core = labels[labels >= 0]
    return int(np.count_nonzero(core[1:] != core[:-1])) if core.size > 1 else 0


def _jackknife_profile(bin_idx: np.ndarray, w: np.ndarray, n_bins: int, n_blocks: int) -> np.ndarray:
    """Block-jackknife stderr ``[n_bins]`` of ``-ln p_bin`` from ``[R, T]`` bin indices and weights."""
    r, t = bin_idx.shape
    size = t // n_blocks
    if size < 1:
        return np.full(n_bins, math.nan)
    hists = []
    for i in range(r):
        for j in range(n_blocks):
            sl = slice(j * size, (j + 1) * size)
            hists.append(np.bincount(bin_idx[i, sl], weights=w[i, sl], minlength=n_bins))
    h = np.asarray(hists)
    total = h.sum(axis=0)
    loo = total[None, :] - h
    with np.errstate(divide="ignore", invalid="ignore"):
        f = -np.log(loo / loo.sum(axis=1, keepdims=True))
    n = h.shape[0]
    ok = np.all(np.isfinite(f), axis=0)
    f = np.where(ok[None, :], f, 0.0)
    var = (n - 1) / n * np.sum((f - f.mean(axis=0)) ** 2, axis=0)
    return np.where(ok, np.sqrt(var), math.nan)


def _core_transitions(
    phi: np.ndarray,
    log_w: np.ndarray,
    in_b: np.ndarray,
    state_b: StatePredicate,
    flattened_profile_kT: Callable[[np.ndarray], np.ndarray],
    core_width_kT: float,
) -> tuple[int, ...]:
    """Transitions between the state cores, per repeat (rows of the ``[R, T]`` arrays)."""
    # Cores: where the flattened profile is within core_width_kT of each state's lowest value.
    grid = np.linspace(-math.pi, math.pi, 3601)
    f_grid = np.asarray(flattened_profile_kT(grid), dtype=np.float64)
    grid_b = np.asarray(state_b(grid), dtype=bool)
    f_frames = -log_w  # = min(F, F_cap) of the frame's phi
    labels = np.full(phi.shape, -1, dtype=np.int8)
    for code, mask_grid, mask in ((0, ~grid_b, ~in_b), (1, grid_b, in_b)):
        if mask_grid.any():
            labels[mask & (f_frames <= f_grid[mask_grid].min() + core_width_kT)] = code
    return tuple(_count_transitions(row) for row in labels)


def _reweighted_profile(phi: np.ndarray, log_w: np.ndarray, bin_width_deg: float, n_blocks: int) -> FreeEnergySurface:
    """The reweighted profile of ``[R, T]`` angles, with block-jackknife errors."""
    edges = _periodic_edges(bin_width_deg)
    n_bins = len(edges) - 1
    fes = free_energy_surface(phi.ravel(), log_w=log_w.ravel(), bins=edges, n_bootstrap=0)
    bin_idx = np.clip(np.searchsorted(edges, phi, side="right") - 1, 0, n_bins - 1)
    w = np.exp(log_w - log_w.max())
    return dataclasses.replace(
        fes,
        f_kT=np.asarray(fes.f_kT, dtype=np.float64),
        stderr_kT=_jackknife_profile(bin_idx, w, n_bins, n_blocks),
    )


def analyze_flattened_umbrella(
    phi_rad: np.ndarray,
    bias_kT: np.ndarray,
    *,
    state_b: StatePredicate,
    flattened_profile_kT: Callable[[np.ndarray], np.ndarray],
    n_blocks: int = 20,
    bin_width_deg: float = 5.0,
    core_width_kT: float = 2.0,
) -> FlattenedEstimate:
    """Reweight runs under a static bias to the unbiased ensemble and estimate ΔF(A -> B).

    ``phi_rad`` is ``[R, T]`` (or ``[T]``): the torsion per repeat and frame (rad), in time order.
    ``bias_kT`` has the same shape and holds the reduced energy ``V / kT`` of the bias that was
    applied, at each frame; each frame gets ``log w = +V/kT``, which undoes the bias factor
    ``exp(-V/kT)`` of the biased ensemble. ``state_b`` maps angles (rad) to bool for state B; A is
    its complement. ``flattened_profile_kT`` gives ``-V / kT`` (kT) at any angles (rad); it defines
    the state cores for the transition counts, each core reaching ``core_width_kT`` above its
    state's lowest value. ``n_blocks`` is the number of jackknife time blocks per repeat and
    ``bin_width_deg`` the profile's bin width (deg; 360 divided by it, rounded, bins). Returns a
    :class:`FlattenedEstimate`.
    """
    phi = np.atleast_2d(np.asarray(phi_rad, dtype=np.float64))
    log_w = np.atleast_2d(np.asarray(bias_kT, dtype=np.float64))
    if phi.shape != log_w.shape:
        raise ValueError(f"phi_rad {phi.shape} and bias_kT {log_w.shape} must have the same shape")
    in_b = np.asarray(state_b(phi.ravel()), dtype=bool).reshape(phi.shape)
    in_a = ~in_b
    est = delta_f_blocked(in_a, in_b, n_blocks=n_blocks, log_w=log_w)
    per_repeat = [delta_f_blocked(in_a[i], in_b[i], n_blocks=n_blocks, log_w=log_w[i]) for i in range(len(phi))]
    values = np.array([e.value for e in per_repeat])
    spread = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    w = np.exp(log_w - log_w.max())
    return FlattenedEstimate(
        delta_f_kT=float(est.value),
        stderr_kT=float(est.stderr),
        repeat_delta_f_kT=tuple(float(v) for v in values),
        repeat_stderr_kT=tuple(float(e.stderr) for e in per_repeat),
        repeat_spread_kT=spread,
        transitions=_core_transitions(phi, log_w, in_b, state_b, flattened_profile_kT, core_width_kT),
        p_b=float(np.sum(w * in_b) / np.sum(w)),
        n_samples=int(phi.size),
        n_eff=float(est.n_eff),
        profile=_reweighted_profile(phi, log_w, bin_width_deg, n_blocks),
    )
