"""The `sample` and `mcmc` jobs: more flow samples with diagnostics, and flow-preconditioned MCMC chains.

Both start from a trained run directory (``boltzgen train``) and write next to it:

- :func:`sample_job` streams ``N`` flow samples into ``<run>/samples.h5`` (or another file) in
  batches, so that ``N = 10^7`` keeps no positions in memory, and writes
  ``<run>/sample_summary.json`` (ESS, ESS per observable, Pareto k̂, ΔF with bootstrap errors,
  FES along every CV) plus ``<run>/plots/sample_fes*.png`` and ``<run>/plots/sample_fes.json``.
- :func:`mcmc_job` runs many chains in parallel with moves from :mod:`boltzgen.mcmc` and writes
  ``<run>/mcmc/chains.h5`` and ``<run>/mcmc/summary.json`` (train schema plus acceptance rates and
  integrated autocorrelation times).

JSON convention of the files written here: a float that is not finite (an empty FES bin, an
infinite autocorrelation time, an undefined ESS) is written as ``null``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boltzgen.coordinates import find_alpha_carbon_chirality, is_l_chirality
from boltzgen.energies.analytic import AnalyticEnergy
from boltzgen.energies.base import RestrictedEnergy
from boltzgen.estimators import (
    batch_means_tau,
    delta_f_blocked,
    ess_per_observable,
    free_energy_surface,
    integrated_autocorrelation_time,
    kish_ess,
    max_normalized_weight,
    psis_log_weights,
    thermodynamic_free_energies_mbar,
    truncated_log_weights,
)
from boltzgen.io import SampleWriter, atomic_path, atomic_write_json, json_safe
from boltzgen.mcmc import (
    CartesianMALA,
    ChainState,
    Cycle,
    IndependenceMetropolis,
    LatentHMC,
    LatentMALA,
    Move,
    run_chains,
)
from boltzgen.pipeline import (
    RunError,
    SampleSet,
    System,
    draw_samples,
    exact_free_energies,
    free_energy_rows,
    load_run,
    reweighting_summary,
    sample_free_energies,
    state_masks,
    state_pairs,
)

WEIGHTS = ("raw", "psis", "truncate")
MOVES = ("imh", "latent_hmc", "latent_mala", "imh+mala")
#: default step size of the local CartesianMALA move of ``imh+mala``, in units of x (nm for molecules)
LOCAL_STEP_MOLECULE_NM = 0.002
LOCAL_STEP_ANALYTIC = 0.1
FES_BINS_1D = 60
FES_BINS_2D = 60
FES_BOOTSTRAP = 50

WEIGHTS_HELP = (
    "which importance weights the estimates use (default raw). raw: w = exp(-u)/q, consistent, but "
    "its variance is infinite when the flow misses mass (Pareto k̂ > 0.7). psis: Pareto-smoothed "
    "(Vehtari et al.): the largest M weights are replaced by a fitted generalized-Pareto tail; a "
    "bias that vanishes as N grows, small for k̂ < 0.7, but a smoothed estimate above 0.7 can be far "
    "off while looking stable. truncate: each weight capped at mean(w)*sqrt(N) (Ionides 2008); "
    "bounded variance, biased toward the region the flow covers, bias vanishing as N grows. "
    "samples.h5 always stores the raw log w; k̂ is always that of the raw weights."
)
TEMPERATURES_HELP = (
    "comma-separated temperatures, e.g. 290,310: in K for molecules, relative to the target (= 1) for "
    "analytic systems. Adds the reduced free energies f(T) - f(T_target) in kT, by MBAR (pymbar) on the flow "
    "samples with the raw weights, to the summary. Assumes an energy that does not depend on T (vacuum, OBC "
    "implicit solvent, analytic), so u_T = u * T_target / T. Memory: pymbar holds a few (K+1) x N float64 arrays "
    "(3.5 GB at N = 10^7 with two temperatures)."
)
THERMODYNAMIC_METHOD = "MBAR (pymbar), flow samples"


# --- small shared helpers (also used by boltzgen.report) --------------------------------------------

def cv_names(cvs: dict[str, np.ndarray]) -> list[str]:
    """The CVs to report: ``x0, x1, ...`` or ``phi, psi`` (plus ``phi1, psi1, ...`` of longer peptides).

    ``phi0``/``psi0`` are aliases of ``phi``/``psi`` and are left out.
    """
    return [name for name in cvs if not (name in ("phi0", "psi0") and name[:-1] in cvs)]


def is_angle(name: str) -> bool:
    return name.startswith(("phi", "psi"))


def cv_range(system: System, name: str) -> tuple[float, float]:
    """Histogram range of a CV: the quadrature box for analytic systems, [-pi, pi] for dihedrals."""
    energy = system.energy
    if is_angle(name):
        return (-math.pi, math.pi)
    if isinstance(energy, AnalyticEnergy) and name.startswith("x") and name[1:].isdigit():
        d = int(name[1:])
        return (float(energy.box.lower[d]), float(energy.box.upper[d]))
    raise ValueError(f"no histogram range known for CV {name!r}")


def fes_record(fes: Any, names: list[str]) -> dict[str, Any]:
    """A :class:`FreeEnergySurface` as JSON arrays (``null`` for empty bins)."""
    edges = [np.asarray(e) for e in fes.edges]
    return json_safe({
        "cvs": names, "edges": edges, "centers": [0.5 * (e[1:] + e[:-1]) for e in edges],
        "f_kT": fes.f_kT, "stderr_kT": fes.stderr_kT, "counts": fes.counts,
        "n_nonfinite": fes.n_nonfinite, "n_outside": fes.n_outside,
    })


def exact_bin_probabilities(energy: AnalyticEnergy, edges0: np.ndarray, edges1: np.ndarray, sub: int = 8) -> np.ndarray:
    """Exact probability ``[n0, n1]`` of every 2-D bin, by the midpoint rule with ``sub x sub`` points per bin.

    Normalized over the bins (the quadrature box holds all but a negligible part of exp(-u)).
    """
    def fine(edges: np.ndarray) -> np.ndarray:
        lo, width = edges[:-1, None], np.diff(edges)[:, None]
        return (lo + width * (np.arange(sub) + 0.5)[None, :] / sub).ravel()

    g0, g1 = np.meshgrid(fine(edges0), fine(edges1), indexing="ij")
    with torch.no_grad():
        u = energy.reduced_energy(torch.from_numpy(np.stack([g0.ravel(), g1.ravel()], 1))).numpy()
    w = np.exp(-(u - u.min())).reshape(len(edges0) - 1, sub, len(edges1) - 1, sub)
    w = w * np.diff(edges0)[:, None, None, None] * np.diff(edges1)[None, None, :, None]
    p = w.sum(axis=(1, 3))
    return p / p.sum()


def plot_fes_2d(panels: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: Path,
                labels: tuple[str, str], vmax: float = 12.0) -> Path:
    """Side-by-side 2-D free energies ``(title, edges0, edges1, f_kT [n0, n1])`` (inf or NaN = empty)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 4), sharey=True, squeeze=False)
    mesh = None
    for ax, (title, e0, e1, f) in zip(axes[0], panels):
        f = np.where(np.isfinite(f), f, np.nan)
        mesh = ax.pcolormesh(e0, e1, f.T, vmin=0, vmax=vmax, cmap="viridis_r")
        ax.set_title(title)
        ax.set_xlabel(labels[0])
    axes[0][0].set_ylabel(labels[1])
    fig.colorbar(mesh, ax=list(axes[0]), label="F [kT]")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def _check_run_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory; create one with `boltzgen train CONFIG --out {run_dir}`")
    return run_dir


# --- sample ----------------------------------------------------------------------------------------

def select_weights(log_w: np.ndarray, method: str) -> np.ndarray:
    """The log-weights the estimates use: raw, Pareto-smoothed or truncated (see :data:`WEIGHTS_HELP`)."""
    if method == "raw":
        return log_w
    if method == "psis":
        return psis_log_weights(log_w)
    if method == "truncate":
        return truncated_log_weights(log_w)
    raise RunError(f"--weights: unknown method {method!r}; choose one of {', '.join(WEIGHTS)}")


def parse_temperatures(text: str) -> list[float]:
    """``"290,310"`` -> ``[290.0, 310.0]``; a RunError naming ``--temperatures`` for anything else."""
    values = []
    for item in text.split(","):
        try:
            values.append(float(item))
        except ValueError:
            raise RunError(f"--temperatures: {item.strip()!r} is not a number; give e.g. --temperatures 290,310") from None
    return values


def check_temperatures(temperatures: Sequence[float]) -> list[float]:
    """The temperatures as floats; a RunError naming ``--temperatures`` unless all are positive and finite."""
    values = [float(t) for t in temperatures]
    bad = [t for t in values if not (math.isfinite(t) and t > 0)]
    if not values or bad:
        raise RunError(f"--temperatures: every temperature must be a positive number, got {bad[0] if bad else 'none'}")
    return values


def thermodynamic_rows(system: System, samples: SampleSet, temperatures: Sequence[float]) -> list[dict[str, Any]]:
    """Rows ``{temperature_K | temperature_ratio, delta_f_kT, stderr_kT, n_eff, method}``, one per temperature.

    ``delta_f_kT = f(T) - f(T_target)`` with ``f(T) = -ln Z(T)``, by :func:`thermodynamic_free_energies_mbar`
    on the raw flow samples. Temperatures are in K for molecules and relative to the target for analytic
    systems. Samples with weight 0 (non-finite, or rejected for chirality) are left out.
    """
    molecule = system.molecule
    key, target = ("temperature_ratio", 1.0) if molecule is None else ("temperature_K", molecule.temperature_K)
    u = np.where(np.isfinite(samples.log_w), samples.u, np.nan)  # weight 0 stays 0 at every temperature
    results = thermodynamic_free_energies_mbar(u, samples.log_q, [t / target for t in temperatures])
    return [{key: t, "delta_f_kT": r.value, "stderr_kT": r.stderr, "n_eff": r.n_eff, "method": THERMODYNAMIC_METHOD}
            for t, r in zip(temperatures, results)]


def sample_job(run_dir: Path, n: int, batch: int | None = None, out: Path | None = None, weights: str = "raw",
               seed: int | None = None, progress: bool = True,
               temperatures: Sequence[float] | None = None) -> dict[str, Any]:
    """`boltzgen sample`: stream ``n`` flow samples to HDF5 and summarize the importance weights.

    Returns the summary that it also writes to ``<run>/sample_summary.json``:
    ``ess`` (Kish, fraction of N, of the weights used), ``n_samples``, ``n_nonfinite``,
    ``max_normalized_weight``, ``pareto_khat`` (raw weights), ``weights_reliable`` (k̂ <= 0.7),
    ``weights`` (raw / psis / truncate), ``ess_per_observable`` (fraction of N, per CV and per
    state indicator ``state:NAME``), ``free_energies`` (bootstrap errors), ``fes`` (1-D per CV and
    2-D, arrays ``f_kT`` / ``stderr_kT`` with ``null`` for empty bins), ``energy_evaluations``,
    ``wall_seconds``, ``samples_file``; with ``temperatures`` also ``thermodynamic_free_energies``
    (see :func:`thermodynamic_rows`).
    """
    started = time.perf_counter()
    run_dir = _check_run_dir(run_dir)
    if n < 1:
        raise RunError(f"--n must be at least 1, got {n}")
    if temperatures is not None:
        temperatures = check_temperatures(temperatures)
    if weights not in WEIGHTS:
        raise RunError(f"--weights: unknown method {weights!r}; choose one of {', '.join(WEIGHTS)}")
    config, _, system, generator = load_run(run_dir)
    batch = batch or config.sampling.batch
    if batch < 1:
        raise RunError(f"--batch must be at least 1, got {batch}")
    path = Path(out) if out is not None else run_dir / "samples.h5"
    torch.manual_seed(config.seed if seed is None else seed)
    evaluations0 = generator.energy.evaluations
    samples = draw_samples(generator, system, n, batch, path, progress, config.coordinates.reject_wrong_chirality,
                           keep_states=min(n, 10_000))
    evaluations = generator.energy.evaluations - evaluations0

    raw = reweighting_summary(samples)  # k̂ etc. of the raw weights
    log_w = select_weights(samples.log_w, weights)
    used = replace(samples, log_w=log_w)
    summary: dict[str, Any] = {"name": config.name, "method": "importance_sampling", "weights": weights}
    if not np.isfinite(log_w).any():
        raise RunError(f"all {n} flow samples have weight 0 (non-finite energy or density); the flow is unusable")
    summary.update({
        "ess": kish_ess(log_w), "n_samples": raw["n_samples"], "n_nonfinite": raw["n_nonfinite"],
        "max_normalized_weight": max_normalized_weight(log_w),
        "pareto_khat": raw["pareto_khat"], "weights_reliable": raw["weights_reliable"],
    })
    if weights != "raw":
        summary["ess_raw"] = raw["ess"]
        summary["max_normalized_weight_raw"] = raw["max_normalized_weight"]
    names = cv_names(samples.cvs)
    masks = state_masks(config, samples.cvs)
    observables = {name: samples.cvs[name] for name in names}
    observables.update({f"state:{state}": mask.astype(np.float64) for state, mask in masks.items()})
    summary["ess_per_observable"] = {key: float(ess_per_observable(log_w, values)) for key, values in observables.items()}
    summary["free_energies"] = sample_free_energies(config, system, used)
    if temperatures is not None:
        summary["thermodynamic_free_energies"] = thermodynamic_rows(system, samples, temperatures)
    if system.molecule is not None:
        summary["n_wrong_chirality"] = samples.n_wrong_chirality
        summary["chirality_rejected"] = config.coordinates.reject_wrong_chirality

    fes = sample_fes(run_dir, system, used, names, seed=config.seed)
    summary["fes"] = fes
    summary["energy_evaluations"] = {"sampling": evaluations, "total": evaluations}
    summary["sampling_wall_seconds"] = samples.wall_seconds
    summary["samples_file"] = str(path)
    summary["batch"] = batch
    summary["wall_seconds"] = time.perf_counter() - started
    summary = json_safe(summary)
    atomic_write_json(run_dir / "sample_summary.json", summary)
    return summary


def sample_fes(run_dir: Path, system: System, samples: SampleSet, names: list[str], seed: int = 0) -> dict[str, Any]:
    """FES along every CV (and the 2-D FES of the first two) with bootstrap errors; JSON + PNG in plots/."""
    from boltzgen import plots

    plots_dir = run_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    energy = system.energy
    exact_marginals: dict[str, np.ndarray] = {}
    if isinstance(energy, AnalyticEnergy) and len(names) == 2:
        p = exact_bin_probabilities(energy, *(np.linspace(*cv_range(system, name), FES_BINS_1D + 1) for name in names))
        exact_marginals = {names[0]: p.sum(axis=1), names[1]: p.sum(axis=0)}
    for name in names:
        edges = np.linspace(*cv_range(system, name), FES_BINS_1D + 1)
        fes = free_energy_surface(samples.cvs[name], log_w=samples.log_w, bins=edges, n_bootstrap=FES_BOOTSTRAP, rng=seed)
        out[name] = fes_record(fes, [name])
        centers = 0.5 * (edges[1:] + edges[:-1])
        profiles = [("flow, reweighted", centers, np.asarray(fes.f_kT), np.asarray(fes.stderr_kT))]
        if name in exact_marginals:
            with np.errstate(divide="ignore"):
                f_exact = -np.log(exact_marginals[name])
            profiles.append(("exact (quadrature)", centers, f_exact - f_exact[np.isfinite(f_exact)].min(), None))
        plots.free_energy_profiles(profiles, plots_dir / f"sample_fes_{name}.png",
                                   xlabel=f"{name} [rad]" if is_angle(name) else name)
    if len(names) >= 2:
        a, b = names[0], names[1]
        edges = [np.linspace(*cv_range(system, a), FES_BINS_2D + 1), np.linspace(*cv_range(system, b), FES_BINS_2D + 1)]
        fes2 = free_energy_surface(np.stack([samples.cvs[a], samples.cvs[b]], 1), log_w=samples.log_w, bins=edges,
                                   n_bootstrap=FES_BOOTSTRAP, rng=seed)
        out[f"{a},{b}"] = fes_record(fes2, [a, b])
        panels = [("flow, reweighted", edges[0], edges[1], np.asarray(fes2.f_kT))]
        if isinstance(energy, AnalyticEnergy):
            p = exact_bin_probabilities(energy, edges[0], edges[1])
            with np.errstate(divide="ignore"):
                f = -np.log(p)
            panels.insert(0, ("exact (quadrature)", edges[0], edges[1], f - f[np.isfinite(f)].min()))
        plot_fes_2d(panels, plots_dir / f"sample_fes_{a}_{b}.png", labels=(a, b))
    atomic_write_json(plots_dir / "sample_fes.json", out)
    return out


# --- mcmc ------------------------------------------------------------------------------------------

def build_moves(kind: str, generator: Any, system: System, step_size: float | None = None,
                local_step: float | None = None, n_leapfrog: int = 10) -> Move:
    """The move of ``boltzgen mcmc --moves KIND``.

    ``imh``: independence Metropolis with the flow as proposal. ``latent_hmc`` / ``latent_mala``:
    HMC / MALA on the latent pull-back (NeuTra), initial latent step ``step_size`` (default 0.1).
    ``imh+mala``: a Cycle of one IMH step and one CartesianMALA step of initial size ``local_step``
    (units of x: nm for molecules, default 0.002 nm; 0.1 for analytic systems).
    """
    if kind == "imh":
        return IndependenceMetropolis(generator)
    if kind == "latent_hmc":
        return LatentHMC(generator, step_size=step_size or 0.1, n_leapfrog=n_leapfrog)
    if kind == "latent_mala":
        return LatentMALA(generator, step_size=step_size or 0.1)
    if kind == "imh+mala":
        default = LOCAL_STEP_MOLECULE_NM if system.molecule is not None else LOCAL_STEP_ANALYTIC
        return Cycle([IndependenceMetropolis(generator), CartesianMALA(system.energy, step_size=local_step or default)])
    raise RunError(f"--moves: unknown move {kind!r}; choose one of {', '.join(MOVES)}")


def initial_state(generator: Any, n_chains: int, oversample: int = 16) -> ChainState:
    """``n_chains`` starts near equilibrium, positions in float64: sampling-importance-resampling.

    ``oversample * n_chains`` flow samples are drawn and ``n_chains`` of them resampled with
    probability proportional to their importance weights (weight 0 where the energy or density is
    not finite). Starting from raw flow samples would leave local moves (latent HMC/MALA) to
    correct the basins' weights by crossing barriers, and a start in a clash would never move.
    Starts may repeat; the chains' moves are independent.
    """
    with torch.no_grad():
        s = generator.sample(oversample * n_chains)
    finite = torch.isfinite(s.log_w)
    if not bool(finite.any()):
        raise RunError(f"none of {oversample * n_chains} flow samples has a finite energy and density; "
                       "the flow cannot start chains (retrain it)")
    idx = torch.multinomial(torch.softmax(s.log_w, 0), n_chains, replacement=True)  # log w is -inf, not NaN, at 0
    return ChainState(x=s.x[idx].to(torch.float64), u=s.u[idx], z=s.z[idx], log_q=s.log_q[idx])


def tau_series(system: System, cvs: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """The series whose autocorrelation times are reported: each CV (dihedrals as cos and sin)."""
    series: dict[str, np.ndarray] = {}
    for name in names:
        if is_angle(name):
            series[f"cos_{name}"] = np.cos(cvs[name])
            series[f"sin_{name}"] = np.sin(cvs[name])
        else:
            series[name] = cvs[name]
    return series


def autocorrelation_times(series: dict[str, np.ndarray],
                          batch_means: tuple[str, ...] = ()) -> tuple[dict[str, float], list[str]]:
    """``tau_int`` (in kept frames) of each ``[chains, T]`` series and the names whose chains are < 50 tau long.

    Series named in ``batch_means`` (state indicators) use :func:`batch_means_tau` when there are
    several chains: a chain that never leaves a state gives the windowed estimator an infinite tau,
    though the chains together still estimate the state's population.
    """
    taus, short = {}, []
    for name, values in series.items():
        if name in batch_means and values.shape[0] >= 2:
            taus[name] = batch_means_tau(values)
            if values.shape[1] < 50 * taus[name]:
                short.append(name)
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            taus[name] = integrated_autocorrelation_time(values)
        if any(issubclass(w.category, RuntimeWarning) for w in caught):
            short.append(name)
    return taus, short


def mcmc_job(run_dir: Path, chains: int = 256, steps: int = 1000, warmup: int = 200, thin: int = 1,
             moves: str = "imh", out_dir: Path | None = None, step_size: float | None = None,
             local_step: float | None = None, n_leapfrog: int = 10, seed: int | None = None,
             progress: bool = True) -> dict[str, Any]:
    """`boltzgen mcmc`: flow-preconditioned MCMC chains, into ``<run>/mcmc/`` (or ``out_dir``).

    Chains start near equilibrium (:func:`initial_state`), run ``warmup`` steps (step sizes adapt
    there only, then are frozen) and ``steps`` production steps, keeping every ``thin``-th state.

    ``chains.h5``: positions in **chain-major** order, frame ``c * T + t`` is kept state ``t`` of
    chain ``c`` (``T = steps // thin``), mdtraj layout with topology for molecules; extra float64
    datasets ``u`` (reduced energy), ``chain`` (chain index) and ``step`` (production step, 1-based).

    ``summary.json`` (train schema): ``ess`` (fraction of n_samples implied by the largest
    integrated autocorrelation time over the CVs, u and the state indicators: ``1 / tau_max``; 0 when
    a chain never decorrelates; the indicators' tau comes from the spread of chain means),
    ``n_samples``, ``n_nonfinite`` (rejected non-finite proposals; for molecules with
    ``coordinates.reject_wrong_chirality`` the target is the L form, and a D proposal has u = inf),
    ``free_energies`` (jackknife over blocks: one block per chain when there are >= 20 chains),
    ``energy_evaluations``, ``wall_seconds``, plus ``acceptance_rate`` (per move), ``step_sizes``
    (frozen), ``tau_int`` (in kept frames; multiply by ``thin`` for steps), ``tau_unreliable`` (series
    shorter than 50 tau), ``n_stuck_chains`` (chains whose state never changed in production: their
    tau is infinite, and so is ``tau_max``), ``chains_file`` and ``order``.
    """
    started = time.perf_counter()
    run_dir = _check_run_dir(run_dir)
    if chains < 1 or steps < 1 or warmup < 0 or thin < 1:
        raise RunError(f"need --chains >= 1, --steps >= 1, --warmup >= 0, --thin >= 1; got {chains}, {steps}, {warmup}, {thin}")
    n_kept = steps // thin
    if n_kept < 2:
        raise RunError(f"--steps {steps} with --thin {thin} keeps {n_kept} state(s) per chain; need at least 2")
    if moves not in MOVES:
        raise RunError(f"--moves: unknown move {moves!r}; choose one of {', '.join(MOVES)}")
    config, _, system, generator = load_run(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "mcmc"
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed if seed is None else seed)
    if system.molecule is not None and config.coordinates.reject_wrong_chirality:
        # the target is the L form; a proposal of its mirror image must be rejected, not accepted
        quads = find_alpha_carbon_chirality(system.topology)
        generator.energy = RestrictedEnergy(generator.energy, partial(is_l_chirality, topology=quads))
        system = replace(system, energy=generator.energy)
    energy = generator.energy
    evaluations0 = energy.evaluations

    move = build_moves(moves, generator, system, step_size, local_step, n_leapfrog)
    state = initial_state(generator, chains)
    try:
        result = run_chains(move, state, n_steps=steps, n_warmup=warmup, thin=thin, progress=progress)
    except ValueError as exc:
        raise RunError(f"mcmc: {exc}") from None
    evaluations = energy.evaluations - evaluations0
    mcmc_seconds = time.perf_counter() - started

    dim = energy.dim
    x = result.x  # [T, chains, dim]
    u = result.u.cpu().numpy().T  # [chains, T]
    path = out_dir / "chains.h5"
    cv_parts: list[dict[str, np.ndarray]] = []
    attrs = {"order": "chain-major", "n_chains": chains, "n_frames_per_chain": n_kept, "thin": thin, "moves": moves}
    with SampleWriter(path, dim, extras=("u", "chain", "step"), topology=system.topology, attrs=attrs) as writer:
        per = max(1, 262_144 // max(1, n_kept))  # chains per write, about 256k frames
        for c0 in range(0, chains, per):
            c1 = min(chains, c0 + per)
            block = x[:, c0:c1].permute(1, 0, 2).reshape(-1, dim).to(torch.float64).cpu().numpy()
            writer.append(block, u=u[c0:c1].ravel(), chain=np.repeat(np.arange(c0, c1), n_kept).astype(np.float64),
                          step=np.tile(np.arange(1, n_kept + 1) * thin, c1 - c0).astype(np.float64))
            cv_parts.append(system.cvs(block))
    cvs = {key: np.concatenate([p[key] for p in cv_parts]).reshape(chains, n_kept) for key in cv_parts[0]}
    names = cv_names(cvs)

    flat = {key: value.ravel() for key, value in cvs.items()}
    masks = {name: mask.reshape(chains, n_kept) for name, mask in state_masks(config, flat).items()}
    n_blocks = max(1, min(n_kept, math.ceil(20 / chains)))
    estimates = {}
    for a, b in state_pairs(config):
        try:
            estimates[(a, b)] = delta_f_blocked(masks[a], masks[b], n_blocks)
        except ValueError as exc:
            raise RunError(f"mcmc: ΔF {a}→{b}: {exc}; run more chains or steps") from None
    exact = exact_free_energies(config, energy) if isinstance(energy, AnalyticEnergy) else None

    series = tau_series(system, cvs, names)
    series["u"] = u
    indicators = {f"state:{name}": mask.astype(np.float64) for name, mask in masks.items()}
    series.update(indicators)
    taus, short = autocorrelation_times(series, batch_means=tuple(indicators))
    tau_max = max(taus.values())
    n_samples = chains * n_kept

    summary: dict[str, Any] = {
        "name": config.name, "method": "mcmc", "moves": moves,
        "ess": (1.0 / tau_max) if math.isfinite(tau_max) else 0.0,
        "ess_samples": (n_samples / tau_max) if math.isfinite(tau_max) else 0.0,
        "n_samples": n_samples, "n_chains": chains, "n_steps": steps, "n_warmup": warmup, "thin": thin,
        "n_nonfinite": result.n_nonfinite,
        "free_energies": free_energy_rows(estimates, exact),
        "acceptance_rate": result.acceptance_rate,
        "step_sizes": result.step_sizes,
        "tau_int": taus,
        "tau_int_units": f"kept frames (x{thin} steps)",
        "tau_unreliable": short,
        "n_stuck_chains": int(np.sum(np.ptp(u, axis=1) == 0)),
        "energy_evaluations": {"mcmc": evaluations, "total": evaluations},
        "mcmc_wall_seconds": mcmc_seconds,
        "chains_file": str(path),
        "order": "chain-major: frame c*T + t is state t of chain c",
    }
    _mcmc_plots(out_dir, system, cvs, names, u, chains)
    summary["wall_seconds"] = time.perf_counter() - started
    summary = json_safe(summary)
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def _mcmc_plots(out_dir: Path, system: System, cvs: dict[str, np.ndarray], names: list[str], u: np.ndarray,
                chains: int) -> None:
    """Traces of the first CV and of u for a few chains, and the FES along each CV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from boltzgen import plots

    plots_dir = out_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    for c in range(min(chains, 4)):
        ax0.plot(cvs[names[0]][c], lw=0.6)
        ax1.plot(u[c], lw=0.6)
    ax0.set_ylabel(names[0])
    ax1.set_ylabel("u [kT]")
    ax1.set_xlabel("kept frame")
    with atomic_path(plots_dir / "traces.png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    for name in names:
        edges = np.linspace(*cv_range(system, name), FES_BINS_1D + 1)
        fes = free_energy_surface(cvs[name].ravel(), bins=edges, n_bootstrap=0)
        plots.free_energy_profiles([("MCMC", 0.5 * (edges[1:] + edges[:-1]), np.asarray(fes.f_kT), None)],
                                   plots_dir / f"fes_{name}.png", xlabel=f"{name} [rad]" if is_angle(name) else name)
