"""Replica exchange analysis: MBAR over all replicas, block-jackknife errors, mixing diagnostics.

Inputs are the arrays a temperature replica exchange run gives, numpy, iteration-major:
``reduced [T, R, K]`` the reduced potential ``u_k(x) = U(x) / kT_k`` of replica ``r``'s frame at
iteration ``t`` in every thermodynamic state ``k`` (float64, kT), and ``states [T, R]`` the state
each replica was in (int). pymbar is reached only through
:func:`~boltzgen.estimators.free_energy.import_pymbar`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from boltzgen.estimators.arrays import ArrayLike, as_bool, as_float64, kish_count, log_sum
from boltzgen.estimators.free_energy import FreeEnergy, _empty_state_result, import_pymbar


@dataclass(frozen=True, eq=False)
class RemdFreeEnergies:
    """ΔF between configurational states at one thermodynamic state of a replica exchange run, in kT.

    ``pairs`` maps ``(from, to)`` to a :class:`FreeEnergy` whose ``stderr`` is the delete-one-block
    jackknife over ``n_blocks`` blocks of consecutive iterations, and whose ``n_eff`` is the Kish
    effective number of frames behind the less populated state. ``log_w`` ``[T, R]``: each frame's
    MBAR log-weight in the target state (normalized, ``-inf`` for a frame left out); ``f_k`` ``[K]``:
    the reduced free energies of the thermodynamic states relative to the target; ``n_eff`` the
    Kish count of all target weights; ``n_frames`` the frames used.
    """

    pairs: dict[tuple[str, str], FreeEnergy]
    log_w: np.ndarray
    f_k: np.ndarray
    n_eff: float
    n_frames: int
    n_blocks: int


def _check_shapes(reduced: np.ndarray, states: np.ndarray) -> None:
    if reduced.ndim != 3 or states.shape != reduced.shape[:2]:
        raise ValueError(f"reduced must be [T, R, K] and states [T, R], got {reduced.shape} and {states.shape}")
    if states.size and (states.min() < 0 or states.max() >= reduced.shape[2]):
        raise ValueError(f"states must lie in 0 .. {reduced.shape[2] - 1}")


def _solve(u_kn: np.ndarray, n_k: np.ndarray, initial_f_k: np.ndarray | None) -> np.ndarray:
    """MBAR free energies ``[K]`` (relative to state 0) of ``u_kn`` ``[K, N]`` with counts ``n_k`` ``[K]``."""
    mbar = import_pymbar().MBAR(u_kn, n_k, initial_f_k=initial_f_k)
    return np.asarray(mbar.f_k, dtype=np.float64)


def target_log_weights(u_kn: np.ndarray, n_k: np.ndarray, f_k: np.ndarray, target: int) -> np.ndarray:
    """Normalized MBAR log-weights ``[N]`` of the pooled samples in state ``target``:
    ``log W_n = f_t - u_t(x_n) - log sum_k N_k exp(f_k - u_k(x_n))``, which sum to 1 in linear space."""
    occupied = n_k > 0
    log_mix = np.logaddexp.reduce(np.log(n_k[occupied])[:, None] + f_k[occupied, None] - u_kn[occupied], axis=0)
    lw = -u_kn[target] - log_mix
    return lw - log_sum(lw)


def _delta_f(lw: np.ndarray, masks: Mapping[str, np.ndarray], pair: tuple[str, str]) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        return log_sum(lw[masks[pair[0]]]) - log_sum(lw[masks[pair[1]]])


def _pooled(reduced: np.ndarray, states: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``u_kn`` ``[K, N]`` and ``N_k`` ``[K]`` of the kept frames sorted by their state, and the order
    (indices into the flattened ``[T * R]`` frames)."""
    k = reduced.shape[2]
    flat_states = states.ravel()
    order = np.flatnonzero(keep.ravel())
    order = order[np.argsort(flat_states[order], kind="stable")]
    u_kn = reduced.reshape(-1, k)[order].T.copy()
    n_k = np.bincount(flat_states[order], minlength=k).astype(np.int64)
    return u_kn, n_k, order


def remd_free_energies(reduced: ArrayLike, states: ArrayLike, masks: Mapping[str, ArrayLike],
                       pairs: list[tuple[str, str]], target: int, n_blocks: int = 20,
                       keep: ArrayLike | None = None) -> RemdFreeEnergies:
    """ΔF = F(to) - F(from) in kT of each of ``pairs`` of configurational states at thermodynamic
    state ``target``, by MBAR over every frame of every replica.

    ``reduced`` ``[T, R, K]`` and ``states`` ``[T, R]`` as in the module docstring; ``masks`` maps each
    state name to its ``[T, R]`` bool membership; ``keep`` ``[T, R]`` bool (default all) leaves frames
    out, e.g. cis peptides: MBAR then estimates the ensembles restricted to the kept region, which
    is exact as long as the restriction is a region of configuration space. Frames of a replica at
    one iteration are correlated with the next iterations', so the error is a delete-one-block
    jackknife over ``n_blocks`` blocks of consecutive iterations (all replicas together, as exchanges
    correlate them), each leave-one-out re-solving MBAR; ``T mod n_blocks`` trailing iterations go
    into the last block. A state without weight gives ``±inf`` and ``empty_state`` as in
    :func:`~boltzgen.estimators.free_energy.delta_f`.
    """
    u = as_float64(reduced)
    s = np.asarray(states, dtype=np.int64)
    _check_shapes(u, s)
    if not np.all(np.isfinite(u)):
        raise ValueError(f"reduced holds {int(np.sum(~np.isfinite(u)))} non-finite energies")
    t = u.shape[0]
    if not 2 <= n_blocks <= t:
        raise ValueError(f"need 2 <= n_blocks <= T, got n_blocks={n_blocks}, T={t}")
    kept = np.ones(s.shape, dtype=bool) if keep is None else as_bool(keep, "keep")
    if kept.shape != s.shape or not kept.any():
        raise ValueError("keep must be [T, R] and keep at least one frame")
    flat_masks = {name: as_bool(m, name).ravel() for name, m in masks.items()}
    u_kn, n_k, order = _pooled(u, s, kept)
    f_k = _solve(u_kn, n_k, None)
    lw_sorted = target_log_weights(u_kn, n_k, f_k, target)
    lw = np.full(s.size, -math.inf)
    lw[order] = lw_sorted
    block = np.minimum(np.arange(t) * n_blocks // t, n_blocks - 1)
    frame_block = np.repeat(block, s.shape[1])
    loo = {pair: np.empty(n_blocks) for pair in pairs}
    for j in range(n_blocks):
        u_j, n_j, order_j = _pooled(u, s, kept & (frame_block != j).reshape(s.shape))
        lw_j = np.full(s.size, -math.inf)
        lw_j[order_j] = target_log_weights(u_j, n_j, _solve(u_j, n_j, f_k), target)
        for pair in pairs:
            loo[pair][j] = _delta_f(lw_j, flat_masks, pair)
    estimates = {pair: _estimate(lw, flat_masks, pair, loo[pair]) for pair in pairs}
    return RemdFreeEnergies(pairs=estimates, log_w=lw.reshape(s.shape), f_k=f_k - f_k[target],
                            n_eff=kish_count(lw_sorted), n_frames=int(order.size), n_blocks=n_blocks)


def _estimate(lw: np.ndarray, masks: Mapping[str, np.ndarray], pair: tuple[str, str], loo: np.ndarray) -> FreeEnergy:
    """The :class:`FreeEnergy` of ``pair`` from the full log-weights ``lw`` and the leave-one-block-out values."""
    a, b = masks[pair[0]], masks[pair[1]]
    log_pa, log_pb = log_sum(lw[a]), log_sum(lw[b])
    empty = _empty_state_result(log_pa, log_pb, 0)
    if empty is not None:
        return empty
    n = loo.size
    invalid = int(np.sum(~np.isfinite(loo)))
    stderr = math.inf if invalid else float(math.sqrt((n - 1) / n * np.sum((loo - loo.mean()) ** 2)))
    n_eff = min(kish_count(lw[a]), kish_count(lw[b]))
    return FreeEnergy(log_pa - log_pb, stderr, n_eff, 0, invalid)


def pair_acceptance(n_accepted: ArrayLike, n_proposed: ArrayLike) -> np.ndarray:
    """Acceptance ``[K - 1]`` of exchanges between neighbouring states ``k, k + 1`` (both directions),
    from the ``[K, K]`` counts of accepted and proposed moves; NaN where none was proposed."""
    acc, prop = np.asarray(n_accepted, dtype=np.float64), np.asarray(n_proposed, dtype=np.float64)
    if acc.ndim != 2 or acc.shape != prop.shape or acc.shape[0] != acc.shape[1]:
        raise ValueError(f"n_accepted and n_proposed must be [K, K], got {acc.shape} and {prop.shape}")
    k = np.arange(acc.shape[0] - 1)
    accepted = acc[k, k + 1] + acc[k + 1, k]
    proposed = prop[k, k + 1] + prop[k + 1, k]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(proposed > 0, accepted / np.maximum(proposed, 1), math.nan)


def round_trips(states: ArrayLike, n_states: int) -> np.ndarray:
    """Completed round trips ``[R]`` of each replica: from the lowest state to the highest and back.

    ``states`` ``[T, R]`` int. A trip counts when the replica is back in state 0 after a visit of
    state ``n_states - 1`` that followed a visit of state 0; a replica that starts at the top must
    first come down, which is half a trip and not counted.
    """
    s = np.asarray(states, dtype=np.int64)
    if s.ndim != 2 or n_states < 2:
        raise ValueError(f"states must be [T, R] and n_states >= 2, got {s.shape} and {n_states}")
    trips = np.zeros(s.shape[1], dtype=np.int64)
    for r in range(s.shape[1]):
        ends = s[:, r][(s[:, r] == 0) | (s[:, r] == n_states - 1)]
        if ends.size == 0:
            continue
        visits = ends[np.r_[True, ends[1:] != ends[:-1]]]  # alternating visits of the two ends
        if visits[0] != 0:
            visits = visits[1:]
        trips[r] = max(0, (visits.size - 1) // 2)
    return trips
