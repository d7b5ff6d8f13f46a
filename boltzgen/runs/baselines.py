"""The baselines: training data (MALA or MD), the `md` command and the umbrella-sampling reference.

For analytic systems the baseline is batched MALA (:func:`run_baseline_mala`); for molecules it is
OpenMM Langevin MD (:func:`run_md`), reused by later commands from ``<run>/md/``. Both give the
flow's training data and ΔF estimates with block-jackknife errors (:func:`baseline_free_energies`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import openmm
import torch

from boltzgen import distributed, plots
from boltzgen.config import Config, MuellerBrownParticleSystem, OpenMMSystem, dump_config
from boltzgen.cvs import resolve_cv
from boltzgen.energies.base import Energy
from boltzgen.errors import RunError
from boltzgen.estimators.free_energy import delta_f_blocked
from boltzgen.estimators.histograms import free_energy_surface
from boltzgen.estimators.timeseries import integrated_autocorrelation_time
from boltzgen.estimators.weights import count_nonfinite, kish_ess
from boltzgen.files import atomic_write_text
from boltzgen.mcmc import resample_starts, run_chains
from boltzgen.moves import CartesianMALA
from boltzgen.runs.rundir import MDDir, RunDir
from boltzgen.runs.summaries import FreeEnergyRow, MDSummary, Profile, UmbrellaFreeEnergyRow, UmbrellaSummary
from boltzgen.runs.target import Target, build_target

#: Proposals per chain for the MALA baseline's start by sampling-importance-resampling.
MALA_START_OVERSAMPLE = 64
#: Bins of the phi profiles in the plots, over [-pi, pi].
PROFILE_BINS = 36


@dataclass
class TrainingData:
    """Configurations for forward-KL training and their baseline estimates.

    ``x``: ``[n, dim]`` float64 (flattened nm for molecules); frames are chain-major, ``n_chains``
    chains of equal length, for block-averaged errors; ``u``: ``[n]`` reduced energies at the target
    temperature; ``log_w``: ``[n]`` log-weights to the target ensemble (``None`` when the data are
    already from it; MD at another temperature gets ``-(u_target - u_md)``). ``n_plain`` frames (all
    when ``None``) come from the plain run, whose cost is ``plain_cost``; the rest are state-seeded.
    """

    x: np.ndarray
    u: np.ndarray
    source: str
    n_chains: int
    energy_evaluations: int
    wall_seconds: float
    log_w: np.ndarray | None = None
    n_plain: int | None = None
    plain_cost: tuple[int, float] | None = None  # (energy evaluations, wall seconds) of the plain run
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def seeded(self) -> bool:
        return self.n_plain is not None and self.n_plain < len(self.x)

    def plain(self) -> TrainingData:
        """The frames and cost of the plain (unseeded) baseline run, which alone give unbiased estimates."""
        if self.n_plain is None or self.plain_cost is None:
            return self
        n = self.n_plain
        log_w = None if self.log_w is None else self.log_w[:n]
        evaluations, wall = self.plain_cost
        return TrainingData(self.x[:n], self.u[:n], self.source, self.n_chains, evaluations, wall, log_w, n,
                            self.plain_cost, self.extra)


def run_baseline_mala(config: Config, energy: Energy, progress: bool) -> TrainingData:
    """Batched MALA chains on the analytic energy, started by sampling-importance-resampling.

    The start: draw 64 points per chain from N(0, init_scale^2 I) and resample them with weights
    exp(-u) / q (:func:`~boltzgen.mcmc.resample_starts`). That puts chains into every basin in
    about its equilibrium proportion, which plain MALA could not do across a high barrier; MALA
    then decorrelates locally.
    """
    cfg = config.baseline
    started = time.perf_counter()
    evaluations0 = energy.evaluations
    gen = torch.Generator().manual_seed(config.seed)
    proposals = cfg.init_scale * torch.randn(MALA_START_OVERSAMPLE * cfg.chains, energy.dim, generator=gen,
                                             dtype=torch.float64)
    with torch.no_grad():
        log_w = -energy(proposals) + 0.5 * (proposals / cfg.init_scale).pow(2).sum(1)
    try:
        idx = resample_starts(log_w, cfg.chains, gen)
    except ValueError as exc:
        raise RunError(f"baseline: {exc}; lower baseline.init_scale") from None
    torch.manual_seed(config.seed)
    move = CartesianMALA(energy, step_size=cfg.step_size)
    result = run_chains(move, proposals[idx], n_steps=cfg.steps, n_warmup=cfg.warmup, thin=cfg.thin, progress=progress)
    x = result.x.permute(1, 0, 2).reshape(-1, energy.dim).cpu().numpy()  # chain-major
    u = result.u.permute(1, 0).reshape(-1).cpu().numpy()
    return TrainingData(
        x=x, u=u, source="baseline MALA", n_chains=cfg.chains,
        energy_evaluations=energy.evaluations - evaluations0, wall_seconds=time.perf_counter() - started,
        extra={"acceptance_rate": result.acceptance_rate, "step_sizes": result.step_sizes},
    )


def _langevin(config: Config, target: Target, start_nm: np.ndarray, temperature_K: float, steps: int, out_h5: Any,
              progress: bool, seed_offset: int = 0, bias: list[openmm.Force] | None = None) -> Any:
    from boltzgen.simulation.langevin import run_langevin

    md, molecule = config.md, target.molecule
    try:
        return run_langevin(
            molecule.system, molecule.topology, start_nm, temperature_K=temperature_K,
            target_temperature_K=molecule.temperature_K, steps=steps, report_every=md.report_every,
            seed=md.seed + config.seed + seed_offset, timestep_fs=md.timestep_fs,
            friction_per_ps=md.friction_per_ps, platform=md.platform, out_h5=out_h5,
            checkpoint=MDDir.checkpoint(out_h5), checkpoint_every=max(1, steps // md.report_every // 20),
            resume=True, progress=progress, bias=bias,
        )
    except openmm.OpenMMException as exc:
        if "nan" not in str(exc).lower():
            raise
        raise RunError(f"{out_h5}: the MD at {temperature_K:g} K blew up (NaN coordinates) with md.timestep_fs = "
                       f"{md.timestep_fs:g}; lower md.timestep_fs (1-2 fs without constraints)") from None


#: The seeded runs' walls, kJ/mol per rad^2 (torsions) or nm^2: 0.1 rad outside a torsion's bounds costs 4 kT at 300 K.
WALL_K = 1000.0


def _seeded_state_runs(config: Config, target: Target, plain: Any, folder: MDDir, progress: bool) -> tuple[list, Any]:
    """MD started in each configured state that the plain run (nearly) missed (see MDConfig).

    Returns the seeded runs and the hot MD that found the seeds (``None`` when no state was missed).
    """
    from boltzgen.energies.openmm import minimize_positions

    md = config.md
    visited = target.state_masks(target.cvs(plain.positions_nm.reshape(plain.n_frames, -1)))
    # A brief visit teaches the flow as little as none: seed every state the plain run barely saw.
    missing = [name for name, mask in visited.items() if md.seed_states == "all" or mask.mean() < md.seed_below_fraction]
    if not missing:
        return [], None
    hot = _langevin(config, target, target.molecule.positions_nm, md.hot_temperature_K, md.hot_steps,
                    folder.hot_trajectory, progress, seed_offset=1)
    hot_cvs = target.cvs(hot.positions_nm.reshape(hot.n_frames, -1))
    hot_masks = target.state_masks(hot_cvs)
    runs = []
    steps = (md.seeded_steps or md.steps) // md.seeds_per_state
    for i, name in enumerate(missing):
        candidates = np.flatnonzero(hot_masks[name])
        if candidates.size == 0:
            raise RunError(f"state {name} was reached neither by the MD nor by the hot MD ({md.hot_temperature_K:g} K, "
                           f"{md.hot_steps} steps); raise md.hot_steps or md.hot_temperature_K, or set md.seed_states: false")
        seeds = diverse_seeds(hot.potential_energy_kJ_mol[candidates], {k: v[candidates] for k, v in hot_cvs.items()},
                              md.seeds_per_state, periodic=target.torsions is not None)
        for j, frame in enumerate(candidates[seeds]):
            start = minimize_positions(target.molecule, hot.positions_nm[frame].astype(np.float64))
            runs.append(_langevin(config, target, start, md.temperature_K or target.molecule.temperature_K, steps,
                                  folder.seeded_trajectory(name, j), progress, seed_offset=2 + i * md.seeds_per_state + j,
                                  bias=_state_walls(target, name) if md.confine_seeded else None))
    return runs, hot


def diverse_seeds(energy: np.ndarray, cvs: dict[str, np.ndarray], n: int, periodic: bool) -> np.ndarray:
    """Indices of up to ``n`` frames to seed MD from, one per region of the CVs: the frames are split
    into ``n`` clusters by k-means over ``cvs`` (each ``[n_frames]``; as (cos, sin) pairs when
    ``periodic``), and each cluster gives its lowest-``energy`` frame, so that a state's sub-basins
    (alanine's alpha_L and C7ax within phi > 0) each get a seed. Deterministic."""
    values = np.stack([np.asarray(v, dtype=np.float64) for v in cvs.values()], axis=1)
    points = np.concatenate([np.cos(values), np.sin(values)], axis=1) if periodic else values
    rng = np.random.default_rng(0)
    centers = points[[int(np.argmin(energy))]]
    while len(centers) < min(n, len(points)):  # k-means++: far points are likelier centres
        d2 = _squared_distances(points, centers).min(1)
        if d2.sum() == 0:
            break
        centers = np.vstack([centers, points[rng.choice(len(points), p=d2 / d2.sum())]])
    for _ in range(50):
        label = _squared_distances(points, centers).argmin(1)
        centers = np.stack([points[label == c].mean(0) if (label == c).any() else centers[c]
                            for c in range(len(centers))])
    label = _squared_distances(points, centers).argmin(1)
    return np.array([np.flatnonzero(label == c)[np.argmin(energy[label == c])]
                     for c in range(len(centers)) if (label == c).any()], dtype=np.int64)


def _squared_distances(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """``[n_points, n_centers]`` squared Euclidean distances, by chunks of points (bounded memory)."""
    return np.concatenate([((chunk[:, None, :] - centers[None]) ** 2).sum(-1)
                           for chunk in np.array_split(points, max(1, len(points) // 10_000))])


def _state_walls(target: Target, name: str) -> list[openmm.Force] | None:
    """Flat-bottom walls (:data:`WALL_K`) at the bounds of state ``name`` when it is a box of CVs
    (``"0 < phi < 2.2"``), else None: the seeded run then stays in the state it is seeded in."""
    from boltzgen.simulation.walls import wall_forces

    box = target.states[name].box()
    if not box:
        return None
    cvs = {cv: resolve_cv(cv, target.topology, f"states.{name}") for cv in box}
    return wall_forces(box, cvs, WALL_K) or None


def run_md(config: Config, target: Target, folder: MDDir, progress: bool) -> TrainingData:
    """Langevin MD with OpenMM at ``md.temperature_K`` (default: the target's), or ``md.data`` if given.

    The trajectory is ``folder.trajectory``; an identical finished run is reused, an interrupted one
    resumes from its checkpoint. With ``md.seed_states``, MD seeded in each state the plain run
    missed is appended (see :class:`boltzgen.config.MDConfig`); ``n_plain`` counts the plain frames.
    """
    from boltzgen.simulation.langevin import load_md

    md = config.md
    assert target.molecule is not None
    helpers: list = []  # runs that cost evaluations but give no training frames (the hot MD)
    target_T = target.molecule.temperature_K
    if md.data is not None:
        try:
            results = [load_md(md.data)]
        except (OSError, ValueError, KeyError) as exc:
            raise RunError(f"md.data: {md.data}: cannot be read as a boltzgen MD file ({exc})") from None
        atoms = results[0].positions_nm.shape[1]
        if atoms != target.molecule.n_atoms:
            raise RunError(f"md.data: {md.data} has {atoms} atoms per frame, the system {target.molecule.n_atoms}; "
                           "give an MD file of this molecule")
    else:
        folder.path.mkdir(parents=True, exist_ok=True)
        results = [_langevin(config, target, target.molecule.positions_nm, md.temperature_K or target_T,
                             md.steps, folder.trajectory, progress)]
        if md.seed_states:
            seeded, hot = _seeded_state_runs(config, target, results[0], folder, progress)
            results += seeded
            helpers += [hot] if hot is not None else []
    frames = [r.positions_nm.reshape(r.n_frames, -1).astype(np.float64) for r in results]
    x = np.concatenate(frames)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise RunError(f"{results[0].h5}: {int(bad.sum())} MD frame(s) have NaN coordinates (first: frame "
                       f"{int(np.flatnonzero(bad)[0])}); rerun the MD with a smaller md.timestep_fs")
    u_target = np.concatenate([r.potential_energy_kJ_mol for r in results]) / target.molecule.kT_kJ_per_mol
    md_T = results[0].temperature_K
    log_w = None if abs(md_T - target_T) < 1e-9 else -(u_target - u_target * target_T / md_T)
    return TrainingData(
        x=x, u=u_target, source=f"MD {md_T:g} K", n_chains=1, n_plain=len(frames[0]),
        plain_cost=(results[0].energy_evaluations, results[0].wall_seconds),
        energy_evaluations=sum(r.energy_evaluations for r in results + helpers),
        wall_seconds=sum(r.wall_seconds for r in results + helpers), log_w=log_w,
        extra={"h5": [str(r.h5) for r in results], "temperature_K": md_T, "steps": [r.steps for r in results]},
    )


def training_data(config: Config, target: Target, run: RunDir, progress: bool) -> TrainingData:
    """MALA for an analytic system, MD (reused when already run) for a molecule."""
    if target.molecule is None:
        return run_baseline_mala(config, target.energy, progress)
    return run_md(config, target, run.md, progress)


def baseline_free_energies(target: Target, data: TrainingData) -> list[FreeEnergyRow]:
    """ΔF from the plain baseline data, with jackknife errors over blocks (MD) or whole chains (MALA)."""
    data = data.plain()
    masks = target.state_masks(target.cvs(data.x))
    shape = (data.n_chains, -1)
    # Independent chains are the blocks: a chain rarely crosses a barrier, so its frames are not.
    n_blocks = 1 if data.n_chains > 1 else 20
    log_w = None if data.log_w is None else data.log_w.reshape(shape)
    estimates = {(a, b): delta_f_blocked(masks[a].reshape(shape), masks[b].reshape(shape), n_blocks, log_w)
                 for a, b in target.pairs}
    return target.free_energy_rows(estimates)


def phi_profile(phi: np.ndarray, log_w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(bin centres, F [kT], stderr [kT])`` along phi on :data:`PROFILE_BINS` bins, bootstrap errors."""
    edges = np.linspace(-np.pi, np.pi, PROFILE_BINS + 1)
    fes = free_energy_surface(phi, log_w=log_w, bins=edges, n_bootstrap=50)
    return 0.5 * (edges[1:] + edges[:-1]), np.asarray(fes.f_kT), np.asarray(fes.stderr_kT)


def _require_molecule(config: Config, what: str) -> None:
    if not isinstance(config.system, (OpenMMSystem, MuellerBrownParticleSystem)):
        raise RunError(f"{what} needs an OpenMM system; {config.system.type} uses the MALA baseline in `train`")


#: Bins per dimension of the (x0, x1) free-energy plots of the Mueller-Brown particle.
XY_BINS = 60


def xy_fes_plot(target: Target, x0: np.ndarray, x1: np.ndarray, log_w: np.ndarray | None, label: str,
                path: Any) -> None:
    """F(x0, x1) in kT of frames ``x0``, ``x1`` ``[n]`` (nm) with log-weights ``log_w`` ``[n]`` (None:
    equal), beside the exact one by quadrature (the target's energy is analytic: the particle)."""
    energy = target.energy
    edges = [np.linspace(*energy.cv_range(d), XY_BINS + 1) for d in (0, 1)]
    weights = None if log_w is None else np.exp(log_w - np.max(log_w))
    h, _, _ = np.histogram2d(x0, x1, bins=edges, weights=weights)
    with np.errstate(divide="ignore"):
        f = -np.log(h / h.sum())
        f_exact = -np.log(energy.bin_probabilities(edges[0], edges[1]))
    panels = [("exact (quadrature)", edges[0], edges[1], f_exact - np.min(f_exact)),
              (label, edges[0], edges[1], f - np.min(f[np.isfinite(f)]))]
    plots.fes_2d(panels, path, labels=("x0 [nm]", "x1 [nm]"))


def md_job(config: Config, resolved: dict[str, Any], run: RunDir, progress: bool = True) -> MDSummary:
    """`boltzgen md`: the MD baseline into ``<run>/md/``, with ΔF and observables like `train`'s.

    ``ess`` is the Kish ESS of the reweighting to the target temperature (1.0 when the MD runs at
    the target); frames are correlated, which the block-jackknife errors account for.
    """
    started = time.perf_counter()
    _require_molecule(config, "`boltzgen md`")
    torch.set_num_threads(config.cpu_threads)
    target = build_target(config)
    folder = run.md
    folder.plots.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder.config, dump_config(resolved))
    data = run_md(config, target, folder, progress).plain()
    log_w = np.zeros(len(data.u)) if data.log_w is None else data.log_w
    cvs = target.cvs(data.x)
    if target.torsions is None:  # the Mueller-Brown particle: its CVs are its coordinates
        xy_fes_plot(target, cvs["x0"], cvs["x1"], data.log_w, data.source, folder.plot("fes"))
        observables = {name: cvs[name] for name in ("x0", "x1")}
    else:
        phi, psi = target.plotted_torsions()
        plots.ramachandran([(data.source, cvs[phi], cvs[psi], None)], folder.plot("ramachandran"), (phi, psi))
        plots.free_energy_profiles([(data.source, *phi_profile(cvs[phi], data.log_w))], folder.plot("phi_profile"),
                                   xlabel=f"{phi} [rad]")
        observables = {name: np.cos(cvs[name]) for name in ("phi", "psi")}
    summary = MDSummary(
        name=config.name, source=data.source, ess=kish_ess(log_w), n_samples=len(data.u),
        n_nonfinite=count_nonfinite(log_w), free_energies=baseline_free_energies(target, data),
        tau_int_frames={name: integrated_autocorrelation_time(values) for name, values in observables.items()},
        energy_evaluations={"md": data.energy_evaluations, "total": data.energy_evaluations},
        md_wall_seconds=data.wall_seconds, wall_seconds=time.perf_counter() - started,
    )
    summary.write(folder.summary)
    return summary


#: Settings of the flattened umbrella sampling that the config does not expose.
UMBRELLA_FIXED_SETTINGS = {"production_equilibration_steps": 10_000, "n_blocks": 20, "timestep_fs": 1.0,
                           "friction_per_ps": 1.0, "parallel": True}
UMBRELLA_STAGE1_EQUILIBRATION_STEPS = 2_000


def umbrella_job(config: Config, resolved: dict[str, Any], run: RunDir, progress: bool = True) -> UmbrellaSummary:
    """`boltzgen md --umbrella`: the flattened-umbrella reference along phi into ``<run>/umbrella/``.

    The states must be defined on ``phi`` alone (the last state is B, the first A). Finished and
    interrupted parts in the folder are reused.
    """
    from boltzgen.simulation.umbrella import run_flattened_umbrella

    _require_molecule(config, "umbrella sampling")
    target = build_target(config)
    if len(target.pairs) != 1 or any(state.names_used() - {"phi"} for state in target.states.values()):
        raise RunError("umbrella sampling needs exactly two states defined on phi alone, e.g. "
                       "{A: \"not B\", B: \"0 < phi < 2.2\"}")
    torch.set_num_threads(config.cpu_threads)
    molecule = target.molecule
    b_state = target.states[target.pairs[0][1]]
    cfg = config.umbrella
    folder = run.umbrella
    folder.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder.config, dump_config(resolved))
    settings = {"f_cap_kT": cfg.f_cap_kT, "production_steps": cfg.production_steps, "n_repeats": cfg.n_repeats,
                "report_every": cfg.report_every, "platform": cfg.platform, "seed": config.seed,
                **UMBRELLA_FIXED_SETTINGS}
    result = run_flattened_umbrella(
        molecule.system, molecule.topology, molecule.positions_nm,
        dihedral_atoms=target.torsions["phi0"], psi_atoms=target.torsions.get("psi0"),
        temperature_K=molecule.temperature_K, state_b=lambda phi: b_state.evaluate({"phi": phi}), out_dir=folder.path,
        stage1_spacing_deg=cfg.stage1_spacing_deg, stage1_k_kJ_per_mol_rad2=cfg.stage1_k_kJ_per_mol_rad2,
        stage1_steps_per_window=cfg.stage1_steps_per_window,
        stage1_equilibration_steps=UMBRELLA_STAGE1_EQUILIBRATION_STEPS,
        stage1_skip_ranges_deg=[tuple(r) for r in cfg.stage1_skip_deg], progress=progress, **settings,
    )
    summary = umbrella_summary(result, molecule.temperature_K, target.pairs[0], cfg.stage1_k_kJ_per_mol_rad2,
                               cfg.stage1_steps_per_window, settings)
    if distributed.is_main():  # under torchrun every rank ran its share of the windows and repeats
        summary.write(folder.summary)
    return summary


def umbrella_summary(result: Any, temperature_K: float, pair: tuple[str, str], stage1_k: float,
                     stage1_steps: int, settings: dict[str, Any]) -> UmbrellaSummary:
    """The summary of a :class:`~boltzgen.simulation.umbrella.FlattenedUmbrellaResult`."""
    from boltzgen.estimators.umbrella import bin_centers

    est = result.estimate
    n_repeats = settings["n_repeats"]
    spread = est.repeat_spread_kT
    # The repeats' spread sees correlation longer than a jackknife block; the larger error is reported.
    from_repeats = spread / np.sqrt(n_repeats)
    row = UmbrellaFreeEnergyRow(
        from_=pair[0], to=pair[1], delta_f_kT=est.delta_f_kT, stderr_kT=float(np.fmax(est.stderr_kT, from_repeats)),
        n_eff=est.n_eff, repeats_kT=list(est.repeat_delta_f_kT), repeats_stderr_kT=list(est.repeat_stderr_kT),
        repeat_spread_kT=spread, stderr_from_repeats_kT=from_repeats, p_b=est.p_b,
        error_method=f"max(block jackknife, {settings['n_blocks']} blocks x {n_repeats} repeats; spread of the repeats "
                     "/ sqrt(repeats))")
    stage1_profile = result.stage1_profile
    stage1 = {"delta_f_kT": result.stage1_delta_f_kT, "stderr_kT": result.stage1_stderr_kT,
              "centers_rad": result.stage1_centers_rad, "k_kJ_per_mol_rad2": float(stage1_k),
              "steps_per_window": int(stage1_steps), "equilibration_steps": UMBRELLA_STAGE1_EQUILIBRATION_STEPS,
              "profile": Profile(centers_rad=list(bin_centers(stage1_profile.edges[0])),
                                 f_kT=list(stage1_profile.f_kT), stderr_kT=list(stage1_profile.stderr_kT)).to_json()}
    profile = est.profile
    return UmbrellaSummary(
        temperature_K=float(temperature_K), free_energies=[row],
        profile=Profile(centers_rad=list(bin_centers(profile.edges[0])), f_kT=list(profile.f_kT),
                        stderr_kT=list(profile.stderr_kT), source="production, reweighted by exp(+V/kT)"),
        stage1=stage1, settings=settings,
        energy_evaluations={"umbrella": result.stage1_energy_evaluations,
                            "production": result.production_energy_evaluations, "total": result.energy_evaluations},
        wall_seconds=result.wall_seconds, call_wall_seconds=result.call_wall_seconds,
        transitions=list(est.transitions), n_samples=est.n_samples,
        production_h5=[str(p) for p in result.production_h5],
    )
