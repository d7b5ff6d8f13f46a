"""The jobs behind the CLI: building a run's parts, training, sampling, reweighting, ΔF, MD baselines.

Each phase is a function so that every command (`train`, `md`, `sample`, `mcmc`, `compare`) reuses
them. Everything a run writes goes into one run directory (DESIGN.md, "Outputs of a run directory"):
MD baselines under ``<run>/md/`` and ``<run>/umbrella/``, where `train` finds and reuses them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from boltzgen import plots
from boltzgen.config import Config, DoubleWellSystem, MuellerBrownSystem, OpenMMSystem, dump_config, load_config
from boltzgen.energies.analytic import AnalyticEnergy, DoubleWell, MuellerBrown
from boltzgen.energies.base import Energy
from boltzgen.estimators import (
    FreeEnergy,
    count_nonfinite,
    delta_f,
    delta_f_blocked,
    free_energy_surface,
    kish_ess,
    max_normalized_weight,
    pareto_khat,
    KHAT_UNRELIABLE,
)
from boltzgen.flows import build_flow
from boltzgen.generator import BoltzmannGenerator
from boltzgen.io import SampleWriter, atomic_write_json, atomic_write_text
from boltzgen.mcmc import CartesianMALA, run_chains
from boltzgen.observables import cartesian_cvs, dihedral_cvs, resolve_states
from boltzgen.training import Trainer


class RunError(RuntimeError):
    """A run that cannot go on: one line saying why and what to do next."""


def select_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("device: cuda was asked for, but torch sees no CUDA device; use device: auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --- the system ------------------------------------------------------------------------------------

@dataclass
class System:
    """What a run needs to know about its target: the energy, and how to compute CVs."""

    energy: Energy
    molecule: Any = None  # boltzgen.energies.openmm.MolecularSystem for molecules

    def cvs(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Collective variables of ``x`` ``[n, dim]``: ``x0, x1, ...``, or ``phi, psi`` (rad) for molecules."""
        if self.molecule is None:
            return cartesian_cvs(x)
        return dihedral_cvs(np.asarray(x).reshape(len(x), -1, 3), self.molecule.mdtraj_topology)

    @property
    def topology(self) -> Any:
        return None if self.molecule is None else self.molecule.mdtraj_topology


def build_system(config: Config) -> System:
    spec = config.system
    if isinstance(spec, DoubleWellSystem):
        return System(DoubleWell(spec.a, spec.b, spec.c))
    if isinstance(spec, MuellerBrownSystem):
        return System(MuellerBrown(spec.beta))
    assert isinstance(spec, OpenMMSystem)
    from boltzgen.energies.openmm import OpenMMEnergy
    from boltzgen.energies.openmm import build_system as build_molecule

    molecule = build_molecule(spec.pdb, spec.forcefield, spec.temperature_K)
    if spec.energy_backend == "openmm":
        return System(OpenMMEnergy(molecule, platform=spec.platform, n_workers=spec.n_workers), molecule)
    from boltzgen.energies.torchff import TorchForceField

    try:
        return System(TorchForceField(molecule.system, spec.temperature_K), molecule)
    except ValueError as exc:
        raise RunError(f"system.energy_backend: torch: {exc}") from None


# --- training data ------------------------------------------------------------------------------

@dataclass
class TrainingData:
    """Configurations for forward-KL training and their baseline estimates.

    ``x``: ``[n, dim]`` float64 (flattened nm for molecules); ``chains``: frames as ``[chains, T]``
    index layout for block-averaged errors; ``u``: ``[n]`` reduced energies at the target
    temperature; ``log_w``: ``[n]`` log-weights to the target ensemble (``None`` when the data are
    already from it, e.g. MD at another temperature gets ``-(u_target - u_md)``).
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

    def plain(self) -> "TrainingData":
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

    The start: draw 64 points per chain from N(0, init_scale^2 I), resample them with weights
    exp(-u) / q. That puts chains into every basin in about its equilibrium proportion, which plain
    MALA could not do across a high barrier; MALA then decorrelates locally.
    """
    cfg = config.baseline
    started = time.perf_counter()
    evaluations0 = energy.evaluations
    gen = torch.Generator().manual_seed(config.seed)
    proposals = cfg.init_scale * torch.randn(64 * cfg.chains, energy.dim, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        log_w = -energy(proposals) + 0.5 * (proposals / cfg.init_scale).pow(2).sum(1)
    log_w = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))
    idx = torch.multinomial(torch.softmax(log_w, 0), cfg.chains, replacement=True, generator=gen)
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


def md_dir(out_dir: Path) -> Path:
    return out_dir / "md"


def run_md(config: Config, system: System, out_dir: Path, progress: bool) -> TrainingData:
    """Langevin MD with OpenMM at ``md.temperature_K`` (default: the target's), or ``md.data`` if given.

    The trajectory is ``<run>/md/md.h5``; an identical finished run is reused, an interrupted one
    resumes from ``md.ckpt.h5``. With ``md.seed_states``, MD seeded in each state the plain run
    missed is appended (see :class:`boltzgen.config.MDConfig`); ``n_plain`` counts the plain frames.
    """
    from boltzgen.md import load_md

    spec, md = config.system, config.md
    assert isinstance(spec, OpenMMSystem)
    folder = md_dir(out_dir)
    helpers: list = []  # runs that cost evaluations but give no training frames (the hot MD)
    if md.data is not None:
        try:
            results = [load_md(md.data)]
        except (OSError, ValueError, KeyError) as exc:
            raise RunError(f"md.data: {md.data}: cannot be read as a boltzgen MD file ({exc})") from None
    else:
        folder.mkdir(parents=True, exist_ok=True)
        results = [_langevin(config, system, system.molecule.positions_nm, md.temperature_K or spec.temperature_K,
                             md.steps, folder / "md.h5", progress)]
        if md.seed_states:
            seeded, hot = _seeded_state_runs(config, system, results[0], folder, progress)
            results += seeded
            helpers += [hot] if hot is not None else []
    frames = [r.positions_nm.reshape(r.n_frames, -1).astype(np.float64) for r in results]
    x = np.concatenate(frames)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise RunError(f"{results[0].h5}: {int(bad.sum())} MD frame(s) have NaN coordinates (first: frame "
                       f"{int(np.flatnonzero(bad)[0])}); rerun the MD with a smaller md.timestep_fs")
    target_T = spec.temperature_K
    u_target = np.concatenate([r.potential_energy_kJ_mol for r in results]) / system.molecule.kT_kJ_per_mol
    md_T = results[0].temperature_K
    log_w = None if abs(md_T - target_T) < 1e-9 else -(u_target - u_target * target_T / md_T)
    return TrainingData(
        x=x, u=u_target, source=f"MD {md_T:g} K", n_chains=1, n_plain=len(frames[0]),
        plain_cost=(results[0].energy_evaluations, results[0].wall_seconds),
        energy_evaluations=sum(r.energy_evaluations for r in results + helpers),
        wall_seconds=sum(r.wall_seconds for r in results + helpers), log_w=log_w,
        extra={"h5": [str(r.h5) for r in results], "temperature_K": md_T, "steps": [r.steps for r in results]},
    )


def _langevin(config: Config, system: System, start_nm: np.ndarray, temperature_K: float, steps: int, out_h5: Path,
              progress: bool, seed_offset: int = 0):
    from boltzgen.md import run_langevin

    md, molecule = config.md, system.molecule
    return run_langevin(
        molecule.system, molecule.topology, start_nm, temperature_K=temperature_K,
        target_temperature_K=molecule.temperature_K, steps=steps, report_every=md.report_every,
        seed=md.seed + config.seed + seed_offset, timestep_fs=md.timestep_fs, friction_per_ps=md.friction_per_ps,
        platform=md.platform, out_h5=out_h5, checkpoint=out_h5.with_suffix(".ckpt.h5"),
        checkpoint_every=max(1, steps // md.report_every // 20), resume=True, progress=progress,
    )


def _seeded_state_runs(config: Config, system: System, plain, folder: Path, progress: bool) -> tuple[list, Any]:
    """MD started in each configured state that the plain run (nearly) missed (see MDConfig).

    Returns the seeded runs and the hot MD that found the seeds (``None`` when no state was missed).
    """
    from boltzgen.energies.openmm import minimize_positions

    md = config.md
    visited = state_masks(config, system.cvs(plain.positions_nm.reshape(plain.n_frames, -1)))
    # A brief visit teaches the flow as little as none: seed every state the plain run barely saw.
    missing = [name for name, mask in visited.items() if mask.mean() < md.seed_below_fraction]
    if not missing:
        return [], None
    hot = _langevin(config, system, system.molecule.positions_nm, md.hot_temperature_K, md.hot_steps,
                    folder / "hot.h5", progress, seed_offset=1)
    hot_masks = state_masks(config, system.cvs(hot.positions_nm.reshape(hot.n_frames, -1)))
    runs = []
    for k, name in enumerate(missing, start=2):
        candidates = np.flatnonzero(hot_masks[name])
        if candidates.size == 0:
            raise RunError(f"state {name} was reached neither by the MD nor by the hot MD ({md.hot_temperature_K:g} K, "
                           f"{md.hot_steps} steps); raise md.hot_steps or md.hot_temperature_K, or set md.seed_states: false")
        best = candidates[np.argmin(hot.potential_energy_kJ_mol[candidates])]
        start = minimize_positions(system.molecule, hot.positions_nm[best].astype(np.float64))
        runs.append(_langevin(config, system, start, md.temperature_K or system.molecule.temperature_K,
                              md.seeded_steps or md.steps, folder / f"seeded_{name}.h5", progress, seed_offset=k))
    return runs, hot


def training_data(config: Config, system: System, out_dir: Path, progress: bool) -> TrainingData:
    if system.molecule is None:
        return run_baseline_mala(config, system.energy, progress)
    return run_md(config, system, out_dir, progress)


# --- the generator --------------------------------------------------------------------------------

def build_generator(config: Config, system: System, x_data: torch.Tensor | None) -> BoltzmannGenerator:
    """Prior + flow (+ coordinate transform for molecules) + energy.

    ``x_data`` fits the internal-coordinate standardization; ``None`` builds placeholders of the
    right shapes, to be filled by a checkpoint.
    """
    energy = system.energy
    coordinates = None
    dim, circular = energy.dim, None
    if system.molecule is not None and config.coordinates.type != "identity":
        coordinates = build_coordinates(config, system, x_data)
        dim, circular = coordinates.dim_internal, coordinates.circular_mask
    prior, flow = build_flow(config.flow, dim, circular=circular, coordinates=coordinates, seed=config.seed)
    return BoltzmannGenerator(prior, flow, energy)


def to_flow_dtype(generator: BoltzmannGenerator, device: torch.device, dtype: torch.dtype) -> None:
    """Move the generator to ``device``; only the prior and flow take the flow's dtype, so the
    energy's constants keep float64 (a round trip through float32 would round them)."""
    generator.to(device=device)
    generator.prior.to(dtype=dtype)
    generator.flow.to(dtype=dtype)


def build_coordinates(config: Config, system: System, x_data: torch.Tensor | None):
    from boltzgen.coordinates import InternalCoordinates, MixedCoordinates, build_mixed_zmatrix, zmatrix_from_topology

    topology = system.molecule.mdtraj_topology
    n_atoms = topology.n_atoms
    if config.coordinates.type == "internal":
        zmatrix = zmatrix_from_topology(topology)
        if x_data is not None:
            return InternalCoordinates.fit(zmatrix, x_data.to(torch.float64))
        d = 3 * n_atoms - 6
        return InternalCoordinates(zmatrix, mean=torch.zeros(d), std=torch.ones(d))
    cartesian = config.coordinates.cartesian_atoms or [a.index for a in topology.atoms if a.element.symbol != "H"]
    bonds = [(a.index, b.index) for a, b in topology.bonds]
    zmatrix = build_mixed_zmatrix(bonds, n_atoms, cartesian)
    if x_data is not None:
        return MixedCoordinates.fit(cartesian, zmatrix, n_atoms, x_data.to(torch.float64))
    d = 3 * n_atoms
    return MixedCoordinates(cartesian, zmatrix, n_atoms, mean=torch.zeros(d), std=torch.ones(d))


# --- states and free energies -----------------------------------------------------------------

def state_masks(config: Config, cvs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Membership ``[n]`` bool of every configured state, in config order."""
    return {name: state.evaluate(cvs) for name, state in resolve_states(config.states).items()}


def state_pairs(config: Config) -> list[tuple[str, str]]:
    """ΔF is reported from the first state to each other state."""
    names = list(config.states)
    return [(names[0], other) for other in names[1:]]


def free_energy_rows(estimates: dict[tuple[str, str], FreeEnergy],
                     exact: dict[tuple[str, str], float] | None = None) -> list[dict[str, Any]]:
    rows = []
    for (a, b), fe in estimates.items():
        row: dict[str, Any] = {"from": a, "to": b, "delta_f_kT": fe.value, "stderr_kT": fe.stderr, "n_eff": fe.n_eff}
        if fe.empty_state:
            row["empty_state"] = fe.empty_state
        if exact is not None and (a, b) in exact:
            row["exact_kT"] = exact[(a, b)]
        rows.append(row)
    return rows


def exact_free_energies(config: Config, energy: AnalyticEnergy) -> dict[tuple[str, str], float]:
    """ΔF by quadrature, for states defined exactly as in the config."""
    states = resolve_states(config.states)
    probabilities = energy.quadrature_probabilities({name: state.evaluate for name, state in states.items()})
    return {(a, b): -math.log(probabilities[b] / probabilities[a]) for a, b in state_pairs(config)}


def data_free_energies(config: Config, system: System, data: TrainingData) -> list[dict[str, Any]]:
    """ΔF from baseline data, with jackknife errors over blocks (MD) or whole chains (MALA)."""
    data = data.plain()
    masks = state_masks(config, system.cvs(data.x))
    shape = (data.n_chains, -1)
    # Independent chains are the blocks: a chain rarely crosses a barrier, so its frames are not.
    n_blocks = 1 if data.n_chains > 1 else 20
    log_w = None if data.log_w is None else data.log_w.reshape(shape)
    estimates = {(a, b): delta_f_blocked(masks[a].reshape(shape), masks[b].reshape(shape), n_blocks, log_w)
                 for a, b in state_pairs(config)}
    exact = exact_free_energies(config, system.energy) if isinstance(system.energy, AnalyticEnergy) else None
    return free_energy_rows(estimates, exact)


# --- sampling and reweighting ---------------------------------------------------------------------

@dataclass
class SampleSet:
    """Flow samples kept in memory for estimators: ``[n]`` float64 arrays and CVs, no positions."""

    log_q: np.ndarray
    u: np.ndarray
    log_w: np.ndarray
    cvs: dict[str, np.ndarray]
    x_head: np.ndarray  # the first states (at most keep_states), for plots
    n_wrong_chirality: int
    wall_seconds: float


def draw_samples(generator: BoltzmannGenerator, system: System, n: int, batch: int, path: Path, progress: bool,
                 reject_wrong_chirality: bool = False, keep_states: int = 200_000) -> SampleSet:
    """Stream ``n`` flow samples into ``path`` (HDF5) with log q, u and log w.

    Memory is bounded by ``batch`` plus a few float64 numbers per sample. For molecules, samples
    whose alpha carbons are not all L are counted; with ``reject_wrong_chirality`` their log w is
    set to -inf (weight 0): the target is the L molecule, and its mirror image has the same energy.
    """
    from boltzgen.coordinates import find_alpha_carbon_chirality, is_l_chirality

    started = time.perf_counter()
    generator.eval()
    quads = None if system.molecule is None else find_alpha_carbon_chirality(system.topology)
    parts: dict[str, list[np.ndarray]] = {"log_q": [], "u": [], "log_w": []}
    cv_parts: list[dict[str, np.ndarray]] = []
    head: list[np.ndarray] = []
    kept = n_wrong = 0
    bar = tqdm(total=n, disable=not progress, desc="sample", unit="sample", unit_scale=True)
    with SampleWriter(path, generator.energy.dim, extras=("log_q", "u", "log_w"), topology=system.topology) as writer:
        for start in range(0, n, batch):
            s = generator.sample(min(batch, n - start), batch_size=batch)
            log_w = s.log_w
            if quads is not None:
                wrong = ~is_l_chirality(s.x.detach(), quads)
                n_wrong += int(wrong.sum())
                if reject_wrong_chirality:
                    log_w = torch.where(wrong, torch.full_like(log_w, -math.inf), log_w)
            x = s.x.detach().to(torch.float64).cpu().numpy()
            arrays = {"log_q": s.log_q.cpu().numpy(), "u": s.u.cpu().numpy(), "log_w": log_w.cpu().numpy()}
            writer.append(x, **arrays)
            for key, value in arrays.items():
                parts[key].append(value)
            cv_parts.append(system.cvs(x))
            if kept < keep_states:
                head.append(x[: keep_states - kept])
                kept += len(head[-1])
            bar.update(len(x))
    bar.close()
    cvs = {key: np.concatenate([c[key] for c in cv_parts]) for key in cv_parts[0]}
    x_head = np.concatenate(head) if head else np.empty((0, generator.energy.dim))
    return SampleSet(**{k: np.concatenate(v) for k, v in parts.items()}, cvs=cvs, x_head=x_head,
                     n_wrong_chirality=n_wrong, wall_seconds=time.perf_counter() - started)


def reweighting_summary(samples: SampleSet) -> dict[str, Any]:
    khat = pareto_khat(samples.log_w)
    summary = {
        "ess": kish_ess(samples.log_w),
        "n_samples": int(samples.log_w.size),
        "n_nonfinite": count_nonfinite(samples.log_w),
        "max_normalized_weight": max_normalized_weight(samples.log_w),
        "pareto_khat": khat,
        "weights_reliable": bool(khat <= KHAT_UNRELIABLE),
    }
    return summary


def sample_free_energies(config: Config, system: System, samples: SampleSet) -> list[dict[str, Any]]:
    masks = state_masks(config, samples.cvs)
    estimates = {(a, b): delta_f(masks[a], masks[b], samples.log_w, config.sampling.n_bootstrap, config.seed)
                 for a, b in state_pairs(config)}
    exact = exact_free_energies(config, system.energy) if isinstance(system.energy, AnalyticEnergy) else None
    return free_energy_rows(estimates, exact)


# --- run directories -------------------------------------------------------------------------------

def prepare_run_dir(out_dir: Path, resume: bool, force: bool) -> None:
    finished = [name for name in ("checkpoint.pt", "summary.json") if (out_dir / name).exists()]
    if finished and not (resume or force):
        raise RunError(f"{out_dir} already holds a trained run; pass --resume to continue it, --force to "
                       "overwrite it, or --out DIR to write elsewhere")
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)


def umbrella_reference(out_dir: Path) -> dict[str, Any] | None:
    """The umbrella-sampling summary from ``boltzgen md --umbrella``, if that was run for this run dir."""
    path = out_dir / "umbrella" / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def load_run(run_dir: Path) -> tuple[Config, dict[str, Any], System, BoltzmannGenerator]:
    """Rebuild a trained run's config, system and generator from ``config.yaml`` and ``checkpoint.pt``."""
    run_dir = Path(run_dir)
    for name in ("config.yaml", "checkpoint.pt"):
        if not (run_dir / name).exists():
            raise RunError(f"{run_dir}: no {name}; is this a run directory written by `boltzgen train`?")
    config, resolved = load_config(run_dir / "config.yaml")
    torch.set_num_threads(config.cpu_threads)
    system = build_system(config)
    device = select_device(config.device)
    generator = build_generator(config, system, None)
    try:
        state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
        generator.load_state_dict(state["model"])
    except Exception as exc:  # a truncated or foreign file: say which, not a traceback
        raise RunError(f"{run_dir / 'checkpoint.pt'}: cannot be loaded ({type(exc).__name__}); retrain or "
                       "--resume the run") from None
    to_flow_dtype(generator, device, getattr(torch, config.dtype))
    generator.eval()
    return config, resolved, system, generator


# --- the jobs --------------------------------------------------------------------------------------

def train(config: Config, resolved: dict[str, Any], out_dir: Path, resume: bool = False, force: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """The whole `boltzgen train` job. Returns the summary that it also writes to summary.json."""
    started = time.perf_counter()
    prepare_run_dir(out_dir, resume, force)
    atomic_write_text(out_dir / "config.yaml", dump_config(resolved))
    torch.manual_seed(config.seed)
    # Intra-op threads cost more than they give on small flows (measured 6x slower with 2 threads).
    torch.set_num_threads(config.cpu_threads)
    device = select_device(config.device)
    dtype = getattr(torch, config.dtype)
    system = build_system(config)
    energy = system.energy.to(device)

    data = training_data(config, system, out_dir, progress)
    energy.evaluations, energy.seconds = 0, 0.0

    x_train = torch.as_tensor(data.x, dtype=torch.float64)
    generator = build_generator(config, system, x_train)
    to_flow_dtype(generator, device, dtype)
    trainer = Trainer(generator, config.training, out_dir, data=x_train.to(device=device, dtype=dtype),
                      checkpoint_every=config.checkpoint_every, log_every=config.log_every, progress=progress)
    trainer.run(resume=resume)
    training_evaluations, training_energy_seconds = energy.evaluations, energy.seconds

    samples = draw_samples(generator, system, config.sampling.n, config.sampling.batch, out_dir / "samples.h5",
                           progress, config.coordinates.reject_wrong_chirality)
    sampling_evaluations = energy.evaluations - training_evaluations
    sampling_energy_seconds = energy.seconds - training_energy_seconds

    summary: dict[str, Any] = {"name": config.name, "device": str(device), **reweighting_summary(samples)}
    summary["free_energies"] = sample_free_energies(config, system, samples)
    if system.molecule is not None:
        summary["n_wrong_chirality"] = samples.n_wrong_chirality
        summary["chirality_rejected"] = config.coordinates.reject_wrong_chirality
    plain = data.plain()
    summary["baseline"] = {
        "source": data.source, "n_samples": int(plain.x.shape[0]), "energy_evaluations": plain.energy_evaluations,
        "wall_seconds": plain.wall_seconds, "free_energies": data_free_energies(config, system, data),
        "training_data": {"n_samples": int(data.x.shape[0]), "energy_evaluations": data.energy_evaluations,
                          "wall_seconds": data.wall_seconds},
        **data.extra,
    }
    reference = umbrella_reference(out_dir)
    if reference is not None:
        summary["umbrella"] = reference
    summary["energy_evaluations"] = {"training": training_evaluations, "sampling": sampling_evaluations,
                                     "total": training_evaluations + sampling_evaluations}
    # Time inside energy calls (this process, since start or resume): what the backend costs.
    summary["energy_seconds"] = {"training": training_energy_seconds, "sampling": sampling_energy_seconds,
                                 "total": training_energy_seconds + sampling_energy_seconds}
    summary["training_wall_seconds"] = trainer.wall_seconds
    summary["sampling_wall_seconds"] = samples.wall_seconds
    summary["n_nonfinite_training"] = trainer.n_nonfinite

    make_plots(out_dir, system, data, samples, reference)
    summary["wall_seconds"] = time.perf_counter() - started
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def make_plots(out_dir: Path, system: System, data: TrainingData, samples: SampleSet,
               umbrella: dict[str, Any] | None = None) -> None:
    plots_dir = out_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "metrics.csv").exists():
        plots.training_curves(out_dir / "metrics.csv", plots_dir / "training.png")
    plots.energy_histograms(data.u, samples.u, samples.log_w, plots_dir / "energy_histogram.png", data_label=data.source)
    energy = system.energy
    if isinstance(energy, AnalyticEnergy):
        edges = [np.linspace(lo, hi, 121) for lo, hi in zip(energy.box.lower, energy.box.upper)]
        centers = [0.5 * (e[1:] + e[:-1]) for e in edges]
        g0, g1 = np.meshgrid(*centers, indexing="ij")
        with torch.no_grad():
            u = energy.reduced_energy(torch.from_numpy(np.stack([g0.ravel(), g1.ravel()], 1))).numpy().reshape(g0.shape)
        p = np.exp(-(u - u.min()))
        plots.density_2d(samples.x_head, samples.log_w[: len(samples.x_head)], (edges[0], edges[1], p / p.sum()),
                         plots_dir / "density.png")
        return
    data_cvs = system.cvs(data.x)
    seeded = data.n_plain is not None and data.n_plain < len(data.x)
    plots.ramachandran(
        [(data.source + (" + state-seeded" if seeded else ""), data_cvs["phi"], data_cvs["psi"], None),
         ("flow", samples.cvs["phi"], samples.cvs["psi"], None),
         ("flow, reweighted", samples.cvs["phi"], samples.cvs["psi"], samples.log_w)],
        plots_dir / "ramachandran.png",
    )
    edges = np.linspace(-np.pi, np.pi, 37)
    profiles = []
    label = data.source + (" reweighted to target" if data.log_w is not None else "")
    plain = data.plain()
    for name, phi, log_w in ((label, data_cvs["phi"][: len(plain.x)], plain.log_w),
                             ("flow, reweighted", samples.cvs["phi"], samples.log_w)):
        fes = free_energy_surface(phi, log_w=log_w, bins=edges, n_bootstrap=50)
        f = np.asarray(fes.f_kT)
        profiles.append((name, 0.5 * (edges[1:] + edges[:-1]), f, np.asarray(fes.stderr_kT)))
    if umbrella is not None and "profile" in umbrella:
        prof = umbrella["profile"]
        profiles.append(("umbrella sampling (flattening bias)", np.asarray(prof["centers_rad"]), np.asarray(prof["f_kT"], dtype=float),
                         np.asarray(prof["stderr_kT"], dtype=float)))
    plots.free_energy_profiles(profiles, plots_dir / "phi_profile.png")


def md_job(config: Config, resolved: dict[str, Any], out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """`boltzgen md`: the MD baseline into ``<run>/md/``, with ΔF and observables like `train`'s.

    ``ess`` is the Kish ESS of the reweighting to the target temperature (1.0 when the MD runs at
    the target); frames are correlated, which the block-jackknife errors account for.
    """
    from boltzgen.estimators import integrated_autocorrelation_time

    started = time.perf_counter()
    if not isinstance(config.system, OpenMMSystem):
        raise RunError(f"`boltzgen md` needs an OpenMM system; {config.system.type} uses the MALA baseline in `train`")
    torch.set_num_threads(config.cpu_threads)
    system = build_system(config)
    folder = md_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plots").mkdir(exist_ok=True)
    atomic_write_text(folder / "config.yaml", dump_config(resolved))
    data = run_md(config, system, out_dir, progress).plain()
    log_w = np.zeros(len(data.u)) if data.log_w is None else data.log_w
    cvs = system.cvs(data.x)
    summary: dict[str, Any] = {
        "name": config.name, "method": "md", "source": data.source, "ess": kish_ess(log_w),
        "n_samples": int(len(data.u)), "n_nonfinite": int(count_nonfinite(log_w)),
        "free_energies": data_free_energies(config, system, data),
        "tau_int_frames": {name: integrated_autocorrelation_time(np.cos(values)) for name, values in cvs.items()
                           if name in ("phi", "psi")},
        "energy_evaluations": {"md": data.energy_evaluations, "total": data.energy_evaluations},
        "md_wall_seconds": data.wall_seconds,
    }
    plots.ramachandran([(data.source, cvs["phi"], cvs["psi"], None)], folder / "plots" / "ramachandran.png")
    edges = np.linspace(-np.pi, np.pi, 37)
    fes = free_energy_surface(cvs["phi"], log_w=data.log_w, bins=edges, n_bootstrap=50)
    plots.free_energy_profiles([(data.source, 0.5 * (edges[1:] + edges[:-1]), np.asarray(fes.f_kT),
                                 np.asarray(fes.stderr_kT))], folder / "plots" / "phi_profile.png")
    summary["wall_seconds"] = time.perf_counter() - started
    atomic_write_json(folder / "summary.json", summary)
    return summary


def umbrella_job(config: Config, resolved: dict[str, Any], out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """`boltzgen md --umbrella`: the flattened-umbrella reference along phi into ``<run>/umbrella/``.

    The states must be defined on ``phi`` alone (the last state is B, the first A). Finished and
    interrupted parts in the folder are reused.
    """
    import mdtraj

    from boltzgen.umbrella import run_flattened_umbrella

    if not isinstance(config.system, OpenMMSystem):
        raise RunError(f"umbrella sampling needs an OpenMM system, not {config.system.type}")
    pairs = state_pairs(config)
    states = resolve_states(config.states)
    if len(pairs) != 1 or any(state.names_used() - {"phi"} for state in states.values()):
        raise RunError("umbrella sampling needs exactly two states defined on phi alone, e.g. "
                       "{A: \"not B\", B: \"0 < phi < 2.2\"}")
    torch.set_num_threads(config.cpu_threads)
    system = build_system(config)
    molecule = system.molecule
    top = molecule.mdtraj_topology
    probe = mdtraj.Trajectory(molecule.positions_nm[None], top)
    phi_atoms, psi_atoms = mdtraj.compute_phi(probe)[0], mdtraj.compute_psi(probe)[0]
    if len(phi_atoms) == 0:
        raise RunError(f"{config.system.pdb}: no backbone phi torsion found for umbrella sampling")
    b_state = states[pairs[0][1]]
    cfg = config.umbrella
    folder = out_dir / "umbrella"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "config.yaml", dump_config(resolved))
    run_flattened_umbrella(
        molecule.system, molecule.topology, molecule.positions_nm,
        dihedral_atoms=tuple(int(i) for i in phi_atoms[0]),
        psi_atoms=tuple(int(i) for i in psi_atoms[0]) if len(psi_atoms) else None,
        temperature_K=molecule.temperature_K, state_b=lambda phi: b_state.evaluate({"phi": phi}), out_dir=folder,
        seed=config.seed, stage1_spacing_deg=cfg.stage1_spacing_deg,
        stage1_k_kJ_per_mol_rad2=cfg.stage1_k_kJ_per_mol_rad2, stage1_steps_per_window=cfg.stage1_steps_per_window,
        stage1_skip_ranges_deg=[tuple(r) for r in cfg.stage1_skip_deg], f_cap_kT=cfg.f_cap_kT,
        production_steps=cfg.production_steps, n_repeats=cfg.n_repeats, report_every=cfg.report_every,
        platform=cfg.platform, progress=progress,
    )
    return json.loads((folder / "summary.json").read_text())
