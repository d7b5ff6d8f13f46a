"""Histograms of CVs: free-energy surfaces with bootstrap errors, and distances between surfaces."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy.special import rel_entr

from boltzgen.estimators.arrays import ArrayLike, as_bool, as_float64, as_rng, bootstrap, clean_log_w, log_sum


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
    ``n_eff``: Kish effective number of samples per bin, ``(sum w)^2 / sum w^2`` over the bin's
    samples (``counts`` when unweighted); a bin whose F rests on one heavy weight has ``n_eff`` ~ 1.
    ``n_nonfinite``: samples with a non-finite log-weight. ``n_outside``: samples outside the
    range or with a non-finite CV; they are not binned but still count in the normalisation.
    """

    edges: tuple[np.ndarray, ...]
    f_kT: np.ndarray
    stderr_kT: np.ndarray
    counts: np.ndarray
    n_eff: np.ndarray
    n_nonfinite: int = 0
    n_outside: int = 0


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
    x = as_float64(cv)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[1] not in (1, 2):
        raise ValueError(f"cv must have shape [N], [N, 1] or [N, 2], got {x.shape}")
    n = x.shape[0]
    if log_w is None:
        lw, n_bad = np.zeros(n), 0
    else:
        lw, n_bad = clean_log_w(log_w)
        if lw.shape != (n,):
            raise ValueError(f"log_w {lw.shape} must have shape [N] with N={n}")
    if log_sum(lw) == -math.inf:
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
    reps = bootstrap(neg_log_density, n, n_bootstrap, as_rng(rng))
    stderr = np.full(n_bins, math.nan)
    if reps.size:
        ok = np.isfinite(reps)
        n_ok = ok.sum(axis=0)
        filled = np.where(ok, reps, 0.0)
        mean = filled.sum(axis=0) / np.maximum(n_ok, 1)
        var = np.where(ok, (reps - mean) ** 2, 0.0).sum(axis=0) / np.maximum(n_ok - 1, 1)
        stderr = np.where((n_ok >= 2) & np.isfinite(f), np.sqrt(var), math.nan)
    counts = np.bincount(fi, minlength=n_bins)
    sum_w, sum_w2 = np.bincount(fi, weights=wi, minlength=n_bins), np.bincount(fi, weights=wi * wi, minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        n_eff = np.where(sum_w2 > 0, sum_w**2 / sum_w2, 0.0)
    return FreeEnergySurface(
        edges=edges,
        f_kT=f_shifted.reshape(shape),
        stderr_kT=stderr.reshape(shape),
        counts=counts.reshape(shape),
        n_eff=n_eff.reshape(shape),
        n_nonfinite=n_bad,
        n_outside=int(n - inside.sum()),
    )


def jensen_shannon(p_hist: ArrayLike, q_hist: ArrayLike) -> float:
    """Jensen-Shannon divergence in nats between two histograms of the same shape.

    Each histogram (counts or weights, any shape, e.g. a 2-D Ramachandran histogram) is
    normalised to sum 1; ``JS = KL(p||m)/2 + KL(q||m)/2`` with ``m = (p + q)/2``, in ``[0, ln 2]``.
    Negative or non-finite entries, or an all-zero histogram, raise ``ValueError``.
    """
    p, q = as_float64(p_hist), as_float64(q_hist)
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
    a, b = as_float64(f1), as_float64(f2)
    if a.shape != b.shape:
        raise ValueError(f"surfaces must have the same shape, got {a.shape} and {b.shape}")
    if populated_mask is None:
        mask = np.isfinite(a) & np.isfinite(b)
    else:
        mask = as_bool(populated_mask, "populated_mask")
        if mask.shape != a.shape:
            raise ValueError(f"populated_mask {mask.shape} must have shape {a.shape}")
    d = (a - b)[mask]
    if d.size == 0:
        raise ValueError("no bins selected to compare")
    n_bad = int(np.sum(~np.isfinite(d)))
    if n_bad:
        raise ValueError(f"{n_bad} selected bins are not finite in one of the surfaces")
    return float(np.sqrt(np.mean((d - d.mean()) ** 2)))

