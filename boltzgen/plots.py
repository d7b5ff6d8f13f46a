"""Every figure of the package, written atomically as PNG.

Training curves, energy histograms, 2-D densities and free-energy surfaces, Ramachandran plots,
free-energy profiles, MCMC traces and the ΔF comparison of `compare`.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from boltzgen.estimators.weights import normalized_weights  # noqa: E402
from boltzgen.files import atomic_path  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def training_curves(metrics_csv: Path, path: Path) -> Path:
    """Loss terms and ESS against the training step."""
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    step = np.array([float(r["step"]) for r in rows])
    fig, (ax_loss, ax_ess) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in [("forward_nll", "forward NLL  (= KL(p||q) + H(p))"), ("reverse_kl", "reverse KL  (= KL(q||p) - log Z)")]:
        values = np.array([float(r[key]) for r in rows])
        if np.isfinite(values).any():
            ax_loss.plot(step, values, label=label)
    # FAB and the annealing stage's reweighted fits log neither: their loss is -sum w̄ log q.
    other = np.array([float(r["loss"]) if r["forward_nll"] in ("", "nan") and r["reverse_kl"] in ("", "nan")
                      else np.nan for r in rows])
    if np.isfinite(other).any():
        ax_loss.plot(step, other, label="-Σ w̄ log q  (FAB, annealing: reweighted NLL)")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=8)
    ax_ess.plot(step, [float(r["ess"]) for r in rows], color="C2")
    ax_ess.set_ylim(0, 1.02)
    ax_ess.set_xlabel("step")
    ax_ess.set_ylabel("ESS / N (Kish)")
    fig.suptitle("training")
    return _save(fig, path)


def energy_histograms(u_data: np.ndarray | None, u_flow: np.ndarray, log_w: np.ndarray, path: Path,
                      data_label: str = "MD") -> Path:
    """Reduced-energy histograms of the data, the raw flow, and the reweighted flow."""
    finite = np.isfinite(u_flow) & np.isfinite(log_w)
    reference = u_data if u_data is not None and len(u_data) else u_flow[finite]
    lo, hi = np.percentile(reference, [0.1, 99.5])
    span = hi - lo
    bins = np.linspace(lo - 0.1 * span, hi + 0.3 * span, 80)
    fig, ax = plt.subplots(figsize=(6, 4))
    if u_data is not None and len(u_data):
        ax.hist(u_data, bins=bins, density=True, histtype="step", lw=2, label=data_label)
    ax.hist(u_flow[finite], bins=bins, density=True, histtype="step", lw=1.5, label="flow")
    ax.hist(u_flow[finite], bins=bins, weights=normalized_weights(log_w[finite]), density=True, histtype="step",
            lw=1.5, ls="--", label="flow, reweighted")
    ax.set_xlabel("reduced energy u [kT]")
    ax.set_ylabel("density")
    ax.legend()
    return _save(fig, path)


def density_2d(x_flow: np.ndarray, log_w: np.ndarray, exact_grid: tuple[np.ndarray, np.ndarray, np.ndarray],
               path: Path) -> Path:
    """Exact density vs flow samples vs reweighted flow samples for a 2-D system.

    ``exact_grid`` = ``(x0_edges, x1_edges, p)`` with ``p`` the normalized exact probability per bin.
    """
    edges0, edges1, p_exact = exact_grid
    finite = np.isfinite(log_w)
    weights = normalized_weights(log_w[finite])
    h_flow, _, _ = np.histogram2d(x_flow[finite, 0], x_flow[finite, 1], bins=[edges0, edges1])
    h_rew, _, _ = np.histogram2d(x_flow[finite, 0], x_flow[finite, 1], bins=[edges0, edges1], weights=weights)
    panels = [("exact", p_exact), ("flow", h_flow / max(h_flow.sum(), 1)), ("flow, reweighted", h_rew / max(h_rew.sum(), 1e-300))]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    with np.errstate(divide="ignore"):
        vmax = np.log(p_exact.max())
        for ax, (title, p) in zip(axes, panels):
            mesh = ax.pcolormesh(edges0, edges1, np.log(p).T, vmin=vmax - 12, vmax=vmax, cmap="viridis")
            ax.set_title(title)
            ax.set_xlabel("x0")
    axes[0].set_ylabel("x1")
    fig.colorbar(mesh, ax=axes, label="log p per bin")
    return _save(fig, path)


def ramachandran(panels: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]], path: Path,
                 names: tuple[str, str] = ("phi", "psi")) -> Path:
    """Free energy -log p over (phi, psi) for each ``(title, phi, psi, log_w or None)``, in kT;
    ``names`` label the axes (``phi1``, ``psi1`` for a residue other than the first)."""
    edges = np.linspace(-np.pi, np.pi, 61)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 4), sharey=True, squeeze=False)
    for ax, (title, phi, psi, log_w) in zip(axes[0], panels):
        weights = None if log_w is None else normalized_weights(log_w)
        h, _, _ = np.histogram2d(phi, psi, bins=[edges, edges], weights=weights)
        with np.errstate(divide="ignore"):
            f = -np.log(h / h.sum())
        f -= np.min(f[np.isfinite(f)]) if np.isfinite(f).any() else 0.0
        mesh = ax.pcolormesh(edges, edges, f.T, vmin=0, vmax=12, cmap="viridis_r")
        ax.set_title(title)
        ax.set_xlabel(f"{names[0]} [rad]")
    axes[0][0].set_ylabel(f"{names[1]} [rad]")
    fig.colorbar(mesh, ax=list(axes[0]), label="F [kT]")
    return _save(fig, path)


def free_energy_profiles(profiles: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]], path: Path,
                         xlabel: str = "phi [rad]") -> Path:
    """1-D free-energy profiles ``(label, bin_centers, f_kT, stderr_kT or None)`` on shared axes."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, centers, f, err in profiles:
        ok = np.isfinite(f)
        # NaN breaks the line, so an unvisited stretch shows as a gap instead of a straight bridge.
        ax.plot(centers, np.where(ok, f, np.nan), marker=".", label=label)
        if err is not None:
            good = ok & np.isfinite(err)
            ax.fill_between(centers, np.where(good, f - err, np.nan), np.where(good, f + err, np.nan), alpha=0.25)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("F [kT]")
    ax.legend()
    return _save(fig, path)


def fes_2d(panels: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: Path,
           labels: tuple[str, str], vmax: float = 12.0) -> Path:
    """Side-by-side 2-D free energies ``(title, edges0, edges1, f_kT [n0, n1])`` in kT (inf or NaN = empty)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 4), sharey=True, squeeze=False)
    mesh = None
    for ax, (title, e0, e1, f) in zip(axes[0], panels):
        f = np.where(np.isfinite(f), f, np.nan)
        mesh = ax.pcolormesh(e0, e1, f.T, vmin=0, vmax=vmax, cmap="viridis_r")
        ax.set_title(title)
        ax.set_xlabel(labels[0])
    axes[0][0].set_ylabel(labels[1])
    fig.colorbar(mesh, ax=list(axes[0]), label="F [kT]")
    return _save(fig, path)


def traces(cv: np.ndarray, u: np.ndarray, cv_label: str, path: Path, n_chains: int = 4) -> Path:
    """Traces of a CV and of u [kT] for the first ``n_chains`` chains; both ``[chains, T]``."""
    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    for c in range(min(cv.shape[0], n_chains)):
        ax0.plot(cv[c], lw=0.6)
        ax1.plot(u[c], lw=0.6)
    ax0.set_ylabel(cv_label)
    ax1.set_ylabel("u [kT]")
    ax1.set_xlabel("kept frame")
    return _save(fig, path)


def delta_f_comparison(rows: list[dict[str, Any]], pair: str, path: Path) -> Path:
    """ΔF ± standard error of each method (``{"method", "delta_f_kT", "stderr_kT"}`` rows); exact rows as lines."""
    finite = [r for r in rows if r.get("delta_f_kT") is not None and math.isfinite(r["delta_f_kT"])]
    shown = [r for r in finite if not r["method"].startswith("exact")]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(shown) + 1.5))
    for row in finite:
        if row["method"].startswith("exact"):
            ax.axvline(row["delta_f_kT"], color="k", ls="--", lw=1, label="exact")
    for i, row in enumerate(shown):
        se = row.get("stderr_kT")
        ax.errorbar(row["delta_f_kT"], i, xerr=se if se is not None and math.isfinite(se) else None, fmt="o", capsize=4)
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([r["method"] for r in shown])
    ax.set_xlabel(f"ΔF {pair} [kT]")
    if len(finite) > len(shown):
        ax.legend(loc="best")
    return _save(fig, path)


#: Panels of :func:`stage_diagnostics`: (title, y label, diagnostics keys or prefixes, log y axis).
_DIAGNOSTIC_PANELS = [
    ("effective sample size", "ESS / N (Kish)", ["ais_flow_ess", "ais_ess", "buffer_ess", "anneal_ess"], True),
    ("HMC acceptance per AIS distribution", "mean acceptance", ["ais_accept_"], False),
    ("HMC step size per AIS distribution", "step size (latent units)", ["ais_step_size_"], True),
    ("latent distance an AIS chain moves", "distance (latent units)", ["ais_distance"], False),
    ("replay buffer", "entries", ["buffer_size"], False),
    ("replay weight corrections q_old / q", "correction", ["buffer_w_adjust_mean", "buffer_w_adjust_max"], True),
    ("replay weight corrections clipped", "fraction of a minibatch", ["buffer_clipped"], False),
    ("log Z by importance sampling on each AIS batch", "log Z", ["ais_flow_log_z"], False),
    ("annealing temperature", "T / T_target", ["temperature"], False),
]

_DIAGNOSTIC_LABELS = {
    "ais_flow_ess": "flow samples toward p", "ais_ess": "AIS samples toward p²/q", "buffer_ess": "replay buffer",
    "anneal_ess": "reweighted set (annealing)", "buffer_w_adjust_mean": "mean", "buffer_w_adjust_max": "largest",
    "ais_flow_log_z": "flow, one AIS batch", "temperature": "temperature", "ais_distance": "mean over chains",
    "buffer_size": "stored samples", "buffer_clipped": "clipped at max_weight_adjust",
}


def stage_diagnostics(rows: list[dict[str, float]], path: Path, exact_log_z: float | None = None,
                      target_accept: float | None = None) -> Path | None:
    """What tuning FAB or annealing needs, against the training step: ESS of the flow, of the AIS
    samples and of the replay buffer; HMC acceptance and step size of each AIS distribution; the
    replay buffer's weight corrections; log Z of each AIS batch (against ``exact_log_z`` when known);
    the annealing temperature. ``rows`` are the Trainer's diagnostics rows. ``None`` when empty."""
    if not rows:
        return None
    keys = sorted({key for row in rows for key in row} - {"step", "stage"})
    panels = []
    for title, ylabel, wanted, log in _DIAGNOSTIC_PANELS:
        chosen = [k for k in keys if any(k == w or (w.endswith("_") and k.startswith(w)) for w in wanted)]
        if chosen:
            panels.append((title, ylabel, chosen, log))
    ncols = min(len(panels), 4)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    for ax, (title, ylabel, chosen, log) in zip(axes.ravel(), panels):
        for key in chosen:
            points = [(r["step"], r[key]) for r in rows if key in r and np.isfinite(r[key]) and (not log or r[key] > 0)]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, lw=1, label=_DIAGNOSTIC_LABELS.get(key, key.replace("ais_", "").replace("_", " ")))
        if chosen[0] == "ais_flow_log_z" and exact_log_z is not None:
            ax.axhline(exact_log_z, color="k", ls="--", lw=1, label="exact")
        if chosen[0].startswith("ais_accept_") and target_accept is not None:
            ax.axhline(target_accept, color="k", ls=":", lw=1, label="target")
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def remd_mixing(temperatures_K: np.ndarray, acceptance: np.ndarray, states: np.ndarray, round_trips: np.ndarray,
                path: Path, n_replicas: int = 4) -> Path:
    """Replica exchange diagnostics: the exchange acceptance of each neighbouring pair of the ladder
    (``temperatures_K`` ``[K]`` K, ``acceptance`` ``[K - 1]``), and the rung of the first ``n_replicas``
    replicas against the iteration (``states`` ``[T, R]``), with each replica's ``round_trips`` ``[R]``."""
    fig, (ax_acc, ax_walk) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1, 2]})
    labels = [f"{a:.0f}-{b:.0f}" for a, b in zip(temperatures_K[:-1], temperatures_K[1:])]
    ax_acc.bar(range(len(acceptance)), acceptance, color="C0")
    ax_acc.set_xticks(range(len(acceptance)), labels, rotation=45, ha="right", fontsize=8)
    ax_acc.set_ylim(0, 1)
    ax_acc.set_xlabel("pair of temperatures [K]")
    ax_acc.set_ylabel("exchange acceptance")
    for r in range(min(n_replicas, states.shape[1])):
        ax_walk.plot(states[:, r], lw=0.6, label=f"replica {r}: {int(round_trips[r])} round trips")
    ax_walk.set_yticks(range(len(temperatures_K)), [f"{t:.0f}" for t in temperatures_K], fontsize=8)
    ax_walk.set_xlabel("iteration")
    ax_walk.set_ylabel("temperature [K]")
    ax_walk.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"replica exchange: {int(np.sum(round_trips))} round trips in all")
    return _save(fig, path)
