"""Every two methods of `boltzgen compare` against each other: ΔF in combined standard errors, and
the RMSE between their profiles.

Two methods disagree when their ΔF differ by more than :data:`DISAGREE_SIGMA` combined standard
errors ``sqrt(se_a^2 + se_b^2)`` (the exact value has error 0; a method without an error cannot be
judged). Their profiles are compared over the bins both populate, after the best constant shift.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from boltzgen.estimators.histograms import fes_rmse

#: Two methods whose ΔF differ by more than this many combined standard errors disagree.
DISAGREE_SIGMA = 3.0

#: A method's profile on the shared bins and its effective samples per bin (None: unknown).
Curve = tuple[np.ndarray, np.ndarray | None]


def _stderr(row: Mapping[str, Any]) -> float | None:
    """A row's ΔF error: 0 for the exact value, None when unknown."""
    if row["method"].startswith("exact"):
        return 0.0
    se = row.get("stderr_kT")
    return float(se) if isinstance(se, (int, float)) and math.isfinite(se) else None


def pair_fes_rmse(a: Curve, b: Curve, *, min_probability: float, min_samples: float) -> tuple[float | None, int]:
    """RMSE (kT, after the best shift) of two profiles ``-ln p`` ``[B]`` over the bins both populate
    (probability at least ``min_probability``; at least ``min_samples`` effective samples where that
    is known), and the number of those bins; ``None`` below two bins."""
    mask = np.ones(len(a[0]), dtype=bool)
    for f, n_eff in (a, b):
        finite = np.isfinite(f)
        low = f[finite].min() if finite.any() else 0.0
        p = np.where(finite, np.exp(-(np.where(finite, f, 0.0) - low)), 0.0)
        mask &= finite & (p / max(p.sum(), 1e-300) >= min_probability)
        if n_eff is not None:
            mask &= n_eff >= min_samples
    if mask.sum() < 2:
        return None, int(mask.sum())
    return fes_rmse(np.where(mask, a[0], 0.0), np.where(mask, b[0], 0.0), mask), int(mask.sum())


def compare_pairs(rows: list[dict[str, Any]], profiles: Mapping[str, Curve], pair: tuple[str, str], *,
                  min_probability: float, min_samples: float) -> list[dict[str, Any]]:
    """Every two of ``rows`` (compare's method rows) with a finite ΔF for the state ``pair``: the
    difference, the combined standard error, the difference in those (``z``), ``disagree`` when
    ``|z| > DISAGREE_SIGMA`` (None when an error is unknown), and the profiles' RMSE (``profiles``
    by method, on shared bins). Each row gets ``disagrees_with``: the methods it is flagged against."""
    finite = [r for r in rows if isinstance(r.get("delta_f_kT"), (int, float)) and math.isfinite(r["delta_f_kT"])]
    out = []
    for a, b in itertools.combinations(finite, 2):
        se_a, se_b = _stderr(a), _stderr(b)
        diff = float(a["delta_f_kT"] - b["delta_f_kT"])
        sigma = None if se_a is None or se_b is None else math.hypot(se_a, se_b)
        z = diff / sigma if sigma else None
        rmse, n_bins = None, 0
        if a["method"] in profiles and b["method"] in profiles:
            rmse, n_bins = pair_fes_rmse(profiles[a["method"]], profiles[b["method"]],
                                         min_probability=min_probability, min_samples=min_samples)
        out.append({"a": a["method"], "b": b["method"], "pair": list(pair), "delta_f_difference_kT": diff,
                    "combined_stderr_kT": sigma, "z": z, "disagree": None if z is None else abs(z) > DISAGREE_SIGMA,
                    "fes_rmse_kT": rmse, "fes_bins_compared": n_bins})
    for row in rows:
        row["disagrees_with"] = [p["b"] if p["a"] == row["method"] else p["a"] for p in out
                                 if p["disagree"] and row["method"] in (p["a"], p["b"])]
    return out


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def pairs_table(pairs: list[dict[str, Any]], pair: str) -> str:
    """The pairs as a markdown table: ΔF difference in combined errors (flagged beyond DISAGREE_SIGMA), RMSE."""
    head = ["method a", "method b", f"ΔF a − b {pair} [kT]", "combined σ [kT]", "z", f"> {DISAGREE_SIGMA:g}σ",
            "FES RMSE a vs b [kT]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in pairs:
        flag = "—" if p["disagree"] is None else ("**DISAGREE**" if p["disagree"] else "no")
        rmse = _fmt(p["fes_rmse_kT"], ".3f") + (f" ({p['fes_bins_compared']} bins)" if p["fes_rmse_kT"] is not None else "")
        lines.append("| " + " | ".join([p["a"], p["b"], _fmt(p["delta_f_difference_kT"], "+.3f"),
                                        _fmt(p["combined_stderr_kT"], ".3f"), _fmt(p["z"], "+.1f"), flag, rmse]) + " |")
    return "\n".join(lines)
