"""Free-energy differences between states and thermodynamic states, in kT, with their errors.

Between configurational states of one ensemble: :func:`delta_f` (independent, possibly weighted
samples, bootstrap errors) and :func:`delta_f_blocked` (correlated MD or MCMC series, block
jackknife errors). Between thermodynamic states: :func:`mbar_free_energies`, a thin wrapper of
pymbar's MBAR, and :func:`thermodynamic_free_energies_mbar`, the target at other temperatures
from flow samples. pymbar is imported only through :func:`import_pymbar`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from boltzgen.estimators.arrays import (
    ArrayLike,
    as_bool,
    as_float64,
    as_rng,
    bootstrap,
    clean_log_w,
    finite_std,
    kish_count,
    log_sum,
    log_sum_resampled,
)
from boltzgen.estimators.timeseries import as_chains, block_means


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
    a = as_bool(in_a, "in_a")
    b = as_bool(in_b, "in_b")
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"in_a {a.shape} and in_b {b.shape} must both have shape [N]")
    if log_w is None:
        lw, n_bad = np.zeros(a.shape), 0
    else:
        lw, n_bad = clean_log_w(log_w)
        if lw.shape != a.shape:
            raise ValueError(f"log_w {lw.shape} must have the shape of in_a {a.shape}")
    lw_a, lw_b = lw[a], lw[b]
    log_pa, log_pb = log_sum(lw_a), log_sum(lw_b)
    empty = _empty_state_result(log_pa, log_pb, n_bad)
    if empty is not None:
        return empty

    idx_a, idx_b = np.flatnonzero(a), np.flatnonzero(b)
    log_sum_a, log_sum_b = log_sum_resampled(lw_a), log_sum_resampled(lw_b)

    def stat(c: np.ndarray) -> float:
        return log_sum_a(c[idx_a]) - log_sum_b(c[idx_b])

    with np.errstate(invalid="ignore"):
        reps = bootstrap(stat, a.size, n_bootstrap, as_rng(rng))
    stderr, n_invalid = finite_std(reps)
    n_eff = min(kish_count(lw_a), kish_count(lw_b))
    return FreeEnergy(log_pa - log_pb, stderr, n_eff, n_bad, n_invalid)


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
    a = as_bool(in_a, "in_a")
    b = as_bool(in_b, "in_b")
    if a.shape != b.shape:
        raise ValueError(f"in_a {a.shape} and in_b {b.shape} must have the same shape")
    n_bad = 0
    if log_w is None:
        w = np.ones(a.shape)
    else:
        lw, n_bad = clean_log_w(np.ravel(log_w))
        if lw.size != a.size:
            raise ValueError(f"log_w must have the shape of in_a {a.shape}")
        finite = np.isfinite(lw)
        w = np.zeros(lw.shape)
        if finite.any():
            w[finite] = np.exp(lw[finite] - lw[finite].max())
        w = w.reshape(a.shape)
    xa, xb = as_chains(a * w, "in_a"), as_chains(b * w, "in_b")
    na, nb = float(xa.sum()), float(xb.sum())
    log_pa = math.log(na) if na > 0 else -math.inf
    log_pb = math.log(nb) if nb > 0 else -math.inf
    empty = _empty_state_result(log_pa, log_pb, n_bad)
    if empty is not None:
        return empty
    value = log_pa - log_pb

    ma, mb = block_means(xa, n_blocks), block_means(xb, n_blocks)
    n = ma.size
    with np.errstate(divide="ignore"):
        loo = np.log(ma.sum() - ma) - np.log(mb.sum() - mb)
    n_invalid = int(np.sum(~np.isfinite(loo)))
    if n_invalid:
        stderr = math.inf
    else:
        stderr = float(math.sqrt((n - 1) / n * np.sum((loo - loo.mean()) ** 2)))

    if log_w is not None:
        n_eff = min(kish_count(np.log(xa[xa > 0])), kish_count(np.log(xb[xb > 0])))
        return FreeEnergy(value, stderr, n_eff, n_bad, n_invalid)
    t_used = xa.shape[0] * n_blocks * (xa.shape[1] // n_blocks)
    n_eff = math.inf
    for count, means in ((na, ma), (nb, mb)):
        p = float(means.mean())
        var_mean = float(np.var(means, ddof=1) / n)
        g = t_used * var_mean / (p * (1 - p)) if 0 < p < 1 else 1.0
        n_eff = min(n_eff, count / max(g, 1.0))
    return FreeEnergy(value, stderr, n_eff, 0, n_invalid)


def import_pymbar() -> Any:
    """The pymbar module, imported without the banner it prints (use this, never ``import pymbar``)."""
    # pymbar prints a banner about JAX and a timeseries caveat on import (stdout and warnings
    # logged without a handler, i.e. to stderr); keep them out of our output.
    logger = logging.getLogger("pymbar")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import pymbar
    finally:
        logger.setLevel(level)
    return pymbar


def mbar_free_energies(u_kn: ArrayLike, N_k: ArrayLike) -> MBARFreeEnergies:  # noqa: N803
    """MBAR free energies (thin wrapper of ``pymbar.MBAR``).

    ``u_kn`` ``[K, N]``: reduced energy of every sample in every state, samples ordered by the
    state they were drawn from; ``N_k`` ``[K]``: number of samples from each state (0 allowed).
    NaN in ``u_kn`` raises ``ValueError``; ``+inf`` means the sample has zero weight in that state.
    """
    u = as_float64(u_kn)
    n_k = np.asarray(N_k, dtype=np.int64)
    if u.ndim != 2 or n_k.shape != (u.shape[0],) or n_k.sum() != u.shape[1]:
        raise ValueError(f"u_kn {u.shape} and N_k {n_k.shape} (sum {n_k.sum()}) do not match")
    if np.any(np.isnan(u)):
        raise ValueError(f"u_kn contains {int(np.isnan(u).sum())} NaN entries")
    mbar = import_pymbar().MBAR(u, n_k)
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
    importance sampling, ``f(T_k) - f(T_0) = -ln(sum_i exp(-u_target_i / r_k - log q_i) /
    sum_i exp(-u_target_i - log q_i))``; what it adds is pymbar's asymptotic error and every
    temperature in one solve.

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
    u0, lq = as_float64(u_target), as_float64(log_q)
    if u0.ndim != 1 or u0.shape != lq.shape:
        raise ValueError(f"u_target {u0.shape} and log_q {lq.shape} must both have shape [N]")
    ratios = as_float64(temperature_ratios)
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
