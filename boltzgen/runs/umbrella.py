"""`boltzgen md --umbrella`: umbrella sampling along the config's CVs, checked against plain MD.

``umbrella.method: flattened`` runs the flattening bias along phi
(:func:`boltzgen.runs.baselines.umbrella_job`, into ``<run>/umbrella/``); ``windows`` runs harmonic
windows on the grid of one or two CVs (:func:`windows_job`, into ``<run>/umbrella_<cvs>/``), unbiased
by MBAR with errors that see correlated windows. Both summaries get ``md_agreement``: each profile
against plain MD (``<run>/md/md.h5``, when it is there) over the bins where the MD is converged, and
a warning when they disagree.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from boltzgen import distributed, plots
from boltzgen.config import Config, dump_config
from boltzgen.cvs import CollectiveVariable, evaluate_cvs, resolve_cv
from boltzgen.errors import ConfigError, RunError
from boltzgen.estimators.histograms import FreeEnergySurface
from boltzgen.estimators.umbrella_grid import (
    GridEstimate,
    WindowGrid,
    analyze_window_grid,
    profile_agreement,
)
from boltzgen.files import atomic_write_json, atomic_write_text, json_safe
from boltzgen.runs.rundir import RunDir, UmbrellaDir
from boltzgen.runs.summaries import (
    Profile,
    ProfileCheck,
    Surface,
    UmbrellaFreeEnergyRow,
    UmbrellaSummary,
)
from boltzgen.runs.target import Target, build_target
from boltzgen.trajectory import iter_positions, read_attributes, read_datasets

#: Time blocks of plain MD for its profile's jackknife errors.
MD_BLOCKS = 20
#: A bin of plain MD is converged when every block visits it and its jackknife error is below this (kT).
MD_CONVERGED_STDERR_KT = 0.2
CHUNK_FRAMES = 500_000


def umbrella_job(config: Config, resolved: dict[str, Any], run: RunDir, progress: bool = True) -> UmbrellaSummary:
    """`boltzgen md --umbrella`: the method of ``config.umbrella``, its summary with the MD check."""
    if config.umbrella.method == "windows":
        return windows_job(config, resolved, run, progress)
    from boltzgen.runs.baselines import umbrella_job as flattened_job

    summary = flattened_job(config, resolved, run, progress)
    target = build_target(config)
    phi = _resolve_cvs(config, target)[0]
    checks = [c for c in [md_check(run, phi, summary.profile)] if c is not None]
    summary = dataclasses.replace(summary, cvs=["phi"], md_agreement=checks or None,
                                  warnings=_warnings(checks, summary.free_energies) or None)
    if distributed.is_main():
        summary.write(run.umbrella.summary)
    return summary


def _resolve_cvs(config: Config, target: Target) -> tuple[CollectiveVariable, ...]:
    """The umbrella's CVs on the molecule's atoms; an unknown atom or torsion is a one-line ConfigError."""
    if target.molecule is None:
        raise RunError(f"umbrella sampling needs an OpenMM system; {config.system.type} uses the MALA baseline in "
                       "`train`")
    out = []
    for i, cv in enumerate(config.umbrella.cvs):
        try:
            out.append(resolve_cv(cv.name, target.molecule.mdtraj_topology, f"umbrella.cvs[{i}]", torsion=cv.torsion,
                                  distance=cv.distance, coordinate=cv.coordinate))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return tuple(out)


def _edges(cv: CollectiveVariable, centers: Sequence[float], width: float) -> np.ndarray:
    """Profile bins: the circle for a torsion, the windows' span plus half a spacing for a length."""
    if cv.periodic:
        return np.linspace(-math.pi, math.pi, max(2, round(2 * math.pi / width)) + 1)
    half = 0.5 * (centers[1] - centers[0])
    lo, hi = centers[0] - half, centers[-1] + half
    return np.linspace(lo, hi, max(2, round((hi - lo) / width)) + 1)


def _window_frames(target: Target, run: Any, cvs: Sequence[CollectiveVariable]) -> list[np.ndarray]:
    """Per window, the frames' membership ``[T, S]`` of the states, on the target's CVs (from the
    stored frames) and the biased CVs (as recorded), so that states may name either."""
    states = []
    for window, values in zip(run.windows, run.values):
        frames = target.cvs(window.positions_nm.reshape(window.n_frames, -1))
        frames.update({cv.name: values[:, d] for d, cv in enumerate(cvs)})
        states.append(np.stack(list(target.state_masks(frames).values()), axis=1))
    return states


def windows_job(config: Config, resolved: dict[str, Any], run: RunDir, progress: bool = True) -> UmbrellaSummary:
    """Harmonic windows on the grid of ``umbrella.cvs``, unbiased by MBAR, into ``<run>/umbrella_<cvs>/``.

    MD settings (time step, friction) are the config's ``md:``; the windows, steps, bootstrap and
    platform are ``umbrella:``'s. Finished and interrupted windows in the folder are reused.
    """
    from boltzgen.simulation.umbrella_exchange import (
        exchange_summary,
        run_window_exchange,
    )
    from boltzgen.simulation.umbrella_grid import WindowGridSpec, run_window_grid

    started = time.perf_counter()
    target = build_target(config)
    if len(target.states) < 2:
        raise RunError("states: umbrella sampling estimates ΔF between states; define at least two")
    cvs = _resolve_cvs(config, target)
    torch.set_num_threads(config.cpu_threads)
    cfg, molecule = config.umbrella, target.molecule
    folder = run.umbrella_folder("windows", cfg.cv_names)
    folder.plots.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder.config, dump_config(resolved))
    spec = WindowGridSpec(cvs, tuple(np.asarray(c.window_centers()) for c in cfg.cvs), tuple(c.spring() for c in cfg.cvs))
    edges = [_edges(cv, c.window_centers(), c.bin_width()) for cv, c in zip(cvs, cfg.cvs)]

    exchange_stats, state_changes = None, None

    def run_and_analyze(steps: Any, n_bootstrap: int) -> tuple[Any, GridEstimate, float]:
        nonlocal exchange_stats, state_changes
        if cfg.exchange_every is not None:
            grid_run, exchange_stats = run_window_exchange(
                molecule.system, molecule.topology, molecule.positions_nm, spec, steps_per_window=cfg.steps_per_window,
                exchange_every=cfg.exchange_every, equilibration_steps=cfg.equilibration_steps,
                temperature_K=molecule.temperature_K, seed=config.seed, out_dir=folder.path,
                timestep_fs=config.md.timestep_fs, friction_per_ps=config.md.friction_per_ps,
                report_every=cfg.report_every, platform="Reference" if cfg.platform == "auto" else cfg.platform,
                progress=progress)
        else:
            grid_run = run_window_grid(
                molecule.system, molecule.topology, molecule.positions_nm, spec, steps_per_window=steps,
                equilibration_steps=cfg.equilibration_steps, temperature_K=molecule.temperature_K, seed=config.seed,
                out_dir=folder.path, record_dihedrals=target.torsions, timestep_fs=config.md.timestep_fs,
                friction_per_ps=config.md.friction_per_ps, report_every=cfg.report_every,
                platform="Reference" if cfg.platform == "auto" else cfg.platform, workers=cfg.workers, progress=progress)
        grid = WindowGrid(grid_run.centers, grid_run.k / molecule.kT_kJ_per_mol, [cv.periodic for cv in cvs])
        analysis_started = time.perf_counter()
        frames = _window_frames(target, grid_run, cvs)
        if exchange_stats is not None:
            state_changes = configuration_state_changes([w.replica for w in grid_run.windows], frames)
        try:
            estimate = analyze_window_grid(grid, grid_run.values, frames, edges,
                                           n_bootstrap=n_bootstrap, n_blocks=cfg.n_blocks, rng=config.seed,
                                           joint_blocks=cfg.exchange_every is not None)
            return grid_run, estimate, time.perf_counter() - analysis_started
        except ValueError as exc:
            raise RunError(f"{folder.path}: {exc} (umbrella.steps_per_window, umbrella.n_blocks)") from None

    steps, pilot_seconds = _window_steps(cfg, spec, folder, lambda: run_and_analyze(cfg.pilot_steps_per_window, 0))
    grid_run, estimate, analysis_seconds = run_and_analyze(steps, cfg.n_bootstrap)
    summary = _windows_summary(config, target, cvs, grid_run, estimate, grid_run.wall_seconds + pilot_seconds +
                               analysis_seconds, time.perf_counter() - started, steps)
    if exchange_stats is not None:
        summary = dataclasses.replace(summary, windows={**summary.windows, "exchange": {
            **exchange_summary(exchange_stats, cfg.exchange_every), "state_changes": state_changes}},
            settings={**summary.settings, "exchange_every": cfg.exchange_every})
    checks = [c for cv, p in zip(cvs, summary.profiles.values()) if (c := md_check(run, cv, p)) is not None]
    exchange_note = _exchange_warning(state_changes, cfg.n_blocks)
    summary = dataclasses.replace(summary, md_agreement=checks or None,
                                  warnings=_warnings(checks, summary.free_energies, estimate, exchange_note) or None)
    _plots(folder, cvs, summary, estimate)
    if distributed.is_main():
        summary.write(folder.summary)
    return summary


def _window_steps(cfg: Any, spec: Any, folder: UmbrellaDir, pilot: Any) -> tuple[list[int], float]:
    """The production steps of every window, and the wall time of the pilot's analysis (s).

    Without ``umbrella.prune_above_kT`` every window runs ``steps_per_window``. With it, ``pilot()``
    runs every window for ``pilot_steps_per_window`` and unbiases them (once: ``pilot.json`` keeps its
    choice for later calls), and only windows whose centre lies at most ``prune_above_kT`` above the
    lowest free energy run on; the others keep their pilot frames.
    """
    centers = spec.centers
    if cfg.prune_above_kT is None:
        return [cfg.steps_per_window] * len(centers), 0.0
    record = folder.path / "pilot.json"
    settings = {"pilot_steps_per_window": cfg.pilot_steps_per_window, "prune_above_kT": cfg.prune_above_kT,
                "centers": centers.tolist(), "k": list(spec.k), "equilibration_steps": cfg.equilibration_steps}
    saved = json.loads(record.read_text()) if record.is_file() else {}
    if saved.get("settings") != json_safe(settings):
        _, estimate, seconds = pilot()
        surface = estimate.surface if estimate.surface is not None else estimate.profiles[0]
        index = tuple(np.clip(np.searchsorted(e, centers[:, d], side="right") - 1, 0, len(e) - 2)
                      for d, e in enumerate(surface.edges))
        f_center = np.asarray(surface.f_kT)[index]
        saved = {"settings": settings, "f_center_kT": f_center, "keep": f_center <= cfg.prune_above_kT,
                 "analysis_seconds": seconds}
        atomic_write_json(record, saved)
        saved = json.loads(record.read_text())
    steps = [cfg.steps_per_window if keep else cfg.pilot_steps_per_window for keep in saved["keep"]]
    return steps, float(saved["analysis_seconds"])


def _profile(surface: FreeEnergySurface, cv: CollectiveVariable, source: str) -> Profile:
    edges = surface.edges[0]
    return Profile(centers_rad=list(0.5 * (edges[1:] + edges[:-1])), f_kT=list(surface.f_kT),
                   stderr_kT=list(surface.stderr_kT), source=source, cv=cv.name,
                   unit=None if cv.unit == "rad" else cv.unit, n_eff=list(surface.n_eff))


def _windows_summary(config: Config, target: Target, cvs: Sequence[CollectiveVariable], grid_run: Any,
                     est: GridEstimate, wall: float, call_wall: float, steps: Sequence[int]) -> UmbrellaSummary:
    cfg = config.umbrella
    names = list(target.states)
    method = (f"ΔF by MBAR on every frame; error: max(MBAR analytic of the frames decorrelated by each window's "
              f"largest statistical inefficiency, block bootstrap {est.n_bootstrap} x {est.n_blocks} blocks per window)")
    rows = []
    for j, to in enumerate(names[1:]):
        value = float(est.delta_f_kT[j])
        empty = None if math.isfinite(value) else (to if value > 0 else names[0])
        rows.append(UmbrellaFreeEnergyRow(
            from_=names[0], to=to, delta_f_kT=value, stderr_kT=float(est.stderr_kT[j]),
            n_eff=float(est.n_uncorrelated.sum()), empty_state=empty,
            stderr_analytic_kT=float(est.stderr_analytic_kT[j]), stderr_bootstrap_kT=float(est.stderr_bootstrap_kT[j]),
            halves_kT=[float(h) for h in est.delta_f_halves_kT[:, j]], p_b=float(est.p_states[j + 1]),
            error_method=method))
    source = "harmonic windows, MBAR"
    profiles = {cv.name: _profile(p, cv, source) for cv, p in zip(cvs, est.profiles)}
    fes_2d = None
    if est.surface is not None:
        fes_2d = Surface(cvs=[cv.name for cv in cvs[:2]], edges=[list(e) for e in est.surface.edges],
                         f_kT=est.surface.f_kT.tolist(), stderr_kT=est.surface.stderr_kT.tolist())
    md = config.md
    settings = {"steps_per_window": cfg.steps_per_window, "equilibration_steps": cfg.equilibration_steps,
                "n_bootstrap": cfg.n_bootstrap, "n_blocks": cfg.n_blocks, "report_every": cfg.report_every,
                "platform": cfg.platform, "workers": cfg.workers, "seed": config.seed, "timestep_fs": md.timestep_fs,
                "friction_per_ps": md.friction_per_ps, "pilot_steps_per_window": cfg.pilot_steps_per_window,
                "prune_above_kT": cfg.prune_above_kT}
    windows = {"n_windows": int(len(grid_run.centers)), "shape": [len(c.window_centers()) for c in cfg.cvs],
               "centers": grid_run.centers.tolist(), "k": grid_run.k.tolist(),
               "k_unit": [f"kJ/mol/{cv.unit}^2" for cv in cvs], "statistical_inefficiency": est.statistical_inefficiency,
               "steps": list(steps), "n_pruned": int(sum(s < cfg.steps_per_window for s in steps)),
               "n_frames": est.n_frames, "n_uncorrelated": est.n_uncorrelated, "n_short_blocks": est.n_short_blocks,
               "thinning": est.thinning, "f_k_kT": est.f_k,
               "inconsistent_windows": [] if est.inconsistent_windows is None else
               np.flatnonzero(est.inconsistent_windows).tolist()}
    return UmbrellaSummary(
        method="umbrella_windows", cvs=[cv.name for cv in cvs], temperature_K=float(target.molecule.temperature_K),
        free_energies=rows, profile=profiles[cvs[0].name], profiles=profiles, fes_2d=fes_2d, windows=windows,
        settings=settings, energy_evaluations={"seeding": grid_run.seeding_energy_evaluations,
                                               "windows": grid_run.energy_evaluations - grid_run.seeding_energy_evaluations,
                                               "total": grid_run.energy_evaluations},
        wall_seconds=float(wall), call_wall_seconds=float(call_wall),
        n_samples=int(sum(w.n_frames for w in grid_run.windows)))


# ----------------------------------------------------------------------------------------------
# the check against plain MD
# ----------------------------------------------------------------------------------------------


def md_log_weights(trajectory: Any) -> np.ndarray | None:
    """Log-weights ``[T]`` to the target temperature of MD run at another one (``None`` at the target)."""
    attrs = read_attributes(trajectory)
    t_md, t_target = attrs.get("temperature_K"), attrs.get("target_temperature_K")
    if t_md is None or t_target is None or abs(float(t_md) - float(t_target)) <= 1e-9:
        return None
    u_target = read_datasets(trajectory, ["reduced_energy"])["reduced_energy"]
    return -(u_target - u_target * float(t_target) / float(t_md))


def blocked_profile(values: np.ndarray, edges: np.ndarray, log_w: np.ndarray | None,
                    n_blocks: int = MD_BLOCKS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``-ln p`` per bin ``[B]`` of one time series ``values`` ``[T]`` (weights ``exp(log_w)``), its
    delete-one-block jackknife error over ``n_blocks`` time blocks ``[B]``, and whether every block
    visits the bin ``[B]`` bool."""
    n_bins = len(edges) - 1
    idx = np.searchsorted(edges, values, side="right") - 1
    inside = (idx >= 0) & (idx < n_bins)
    w = np.ones(len(values)) if log_w is None else np.exp(log_w - np.max(log_w))
    size = len(values) // n_blocks
    hists = np.array([np.bincount(idx[b * size:(b + 1) * size][inside[b * size:(b + 1) * size]],
                                  weights=w[b * size:(b + 1) * size][inside[b * size:(b + 1) * size]], minlength=n_bins)
                      for b in range(n_blocks)])
    totals = np.array([w[b * size:(b + 1) * size].sum() for b in range(n_blocks)])
    with np.errstate(divide="ignore", invalid="ignore"):  # a bin one block alone visits has no error: NaN
        f = -np.log(hists.sum(axis=0) / totals.sum())
        loo = -np.log((hists.sum(axis=0) - hists) / (totals.sum() - totals)[:, None])
        se = np.sqrt((n_blocks - 1) / n_blocks * np.sum((loo - loo.mean(axis=0)) ** 2, axis=0))
    return f, se, np.all(hists > 0, axis=0)


def md_check(run: RunDir, cv: CollectiveVariable, profile: Profile) -> ProfileCheck | None:
    """``profile`` (along ``cv``) against plain MD, ``<run>/md/md.h5``, over the bins where the MD is
    converged: visited in each of :data:`MD_BLOCKS` time blocks, jackknife error below
    :data:`MD_CONVERGED_STDERR_KT`. ``None`` without MD."""
    trajectory = run.md.trajectory
    if not trajectory.is_file():
        return None
    values = np.concatenate([evaluate_cvs(x, [cv])[cv.name] for x in iter_positions(trajectory, CHUNK_FRAMES)])
    centers = np.asarray(profile.centers_rad, dtype=np.float64)
    if len(centers) < 2 or len(values) < 2 * MD_BLOCKS:
        return None
    half = 0.5 * (centers[1] - centers[0])
    edges = np.append(centers - half, centers[-1] + half)
    f_md, se_md, visited = blocked_profile(values, edges, md_log_weights(trajectory))
    converged = visited & (se_md < MD_CONVERGED_STDERR_KT)
    result = profile_agreement(np.asarray(profile.f_kT, dtype=float), np.asarray(profile.stderr_kT, dtype=float),
                               f_md, se_md, converged)
    rule = (f"bins visited in all {MD_BLOCKS} time blocks of the MD with a jackknife error below "
            f"{MD_CONVERGED_STDERR_KT} kT")
    return ProfileCheck(reference=str(trajectory), cv=cv.name, bins=rule, n_bins=result.n_bins, rmse_kT=result.rmse_kT,
                        max_abs_z=result.max_abs_z, chi2=result.chi2, p_value=result.p_value, disagree=result.disagree)


def configuration_state_changes(replicas: Sequence[np.ndarray], states: Sequence[np.ndarray]) -> int:
    """How often the configurations of an exchange run changed state: ``replicas`` per window ``[T]``
    (which configuration each frame holds), ``states`` per window ``[T, S]`` bool; a frame's state is
    the first it belongs to (-1 for none)."""
    owner = np.stack(replicas)  # [K, T]
    label = np.stack([np.where(s.any(axis=1), np.argmax(s, axis=1), -1) for s in states])
    by_config = np.empty_like(label)
    by_config[owner, np.arange(owner.shape[1])] = label
    return int(np.sum(by_config[:, 1:] != by_config[:, :-1]))


#: Fewer state changes of the configurations per bootstrap block than this make an exchange run's
#: error unreliable: how many configurations sit in each state changes only through them.
MIN_STATE_CHANGES_PER_BLOCK = 10


def _exchange_warning(state_changes: int | None, n_blocks: int) -> str | None:
    if state_changes is None or state_changes >= MIN_STATE_CHANGES_PER_BLOCK * n_blocks:
        return None
    return (f"the configurations changed state {state_changes} times in the exchange run, fewer than "
            f"{MIN_STATE_CHANGES_PER_BLOCK} per bootstrap block: how many sit in each state is then barely sampled "
            "and the ΔF error bar does not see it; run the windows longer")


def _warnings(checks: Sequence[ProfileCheck], rows: Sequence[UmbrellaFreeEnergyRow],
              estimate: GridEstimate | None = None, exchange_note: str | None = None) -> list[str]:
    """What the reader of the summary must know: disagreement with MD, halves that disagree, thinning."""
    out = []
    for c in checks:
        if c.disagree:
            out.append(f"the profile along {c.cv} disagrees with plain MD where the MD is converged ({c.n_bins} bins): "
                       f"RMSE {c.rmse_kT:.3f} kT, largest difference {c.max_abs_z:.1f} combined sigma, p = "
                       f"{c.p_value:.1e}; the windows may not have relaxed along a coordinate the bias leaves free, "
                       "and the ΔF error bar does not see that")
    for row in rows:
        halves = row.halves_kT or []
        if len(halves) == 2 and math.isfinite(row.stderr_kT) and abs(halves[0] - halves[1]) > 3 * math.sqrt(2) * row.stderr_kT:
            out.append(f"ΔF {row.from_}→{row.to}: the first and second halves of the windows give {halves[0]:.3f} and "
                       f"{halves[1]:.3f} kT, further apart than the error allows; run the windows longer")
    if estimate is not None and estimate.inconsistent_windows is not None and estimate.inconsistent_windows.any():
        bad = np.flatnonzero(estimate.inconsistent_windows)
        gap = np.abs(estimate.state_fractions - estimate.state_fractions_predicted)[bad].max(axis=1)
        k = int(bad[np.argmax(gap)])
        out.append(f"{len(bad)} windows hold another mixture of states than the unbiased ensemble of all windows "
                   f"predicts under their bias (window {k}: {np.round(estimate.state_fractions[k], 3).tolist()} "
                   f"against {np.round(estimate.state_fractions_predicted[k], 3).tolist()}): they did not relax along "
                   "a coordinate the bias leaves free, and the ΔF error bar does not see it; bias that coordinate "
                   "too, or exchange configurations between windows (umbrella.exchange_every) and run longer")
    if exchange_note is not None:
        out.append(exchange_note)
    if estimate is not None and estimate.thinning > 1:
        out.append(f"the frames were thinned by {estimate.thinning} to fit MBAR in memory")
    if estimate is not None and estimate.n_short_blocks:
        out.append(f"{estimate.n_short_blocks} windows have bootstrap blocks shorter than their statistical "
                   "inefficiency, whose correlation the bootstrap misses; run the windows longer or lower n_blocks")
    return out


def _plots(folder: UmbrellaDir, cvs: Sequence[CollectiveVariable], summary: UmbrellaSummary,
           estimate: GridEstimate) -> None:
    for cv, p in zip(cvs, summary.profiles.values()):
        curve = (summary.label, np.asarray(p.centers_rad), np.asarray(p.f_kT), np.asarray(p.stderr_kT))
        plots.free_energy_profiles([curve], folder.plot(f"profile_{cv.name}"), xlabel=f"{cv.name} [{cv.unit}]")
    surface = estimate.surface
    if surface is not None:
        plots.fes_2d([(summary.label, surface.edges[0], surface.edges[1], surface.f_kT)], folder.plot("fes_2d"),
                     labels=(f"{cvs[0].name} [{cvs[0].unit}]", f"{cvs[1].name} [{cvs[1].unit}]"))
