"""The `train` job: energy -> training data -> flow -> training -> sampling -> reweighting -> ΔF.

Each phase is a function so that other commands (`sample`, `mcmc`, `compare`) reuse them. Everything
is written into one run directory (DESIGN.md, "Outputs of a run directory").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from boltzgen.config import Config, DoubleWellSystem, MuellerBrownSystem, dump_config
from boltzgen.energies.analytic import AnalyticEnergy, DoubleWell, MuellerBrown
from boltzgen.energies.base import Energy
from boltzgen.estimators import (
    FreeEnergy,
    count_nonfinite,
    delta_f,
    delta_f_blocked,
    kish_ess,
    max_normalized_weight,
    pareto_khat,
)
from boltzgen.flows import build_flow
from boltzgen.generator import BoltzmannGenerator
from boltzgen.io import SampleWriter, atomic_write_json, atomic_write_text
from boltzgen.mcmc import CartesianMALA, run_chains
from boltzgen.observables import cartesian_cvs, resolve_states
from boltzgen import plots
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


@dataclass
class System:
    """What a run needs to know about its target: the energy, and how to compute CVs."""

    energy: Energy
    molecule: Any = None  # boltzgen.energies.openmm.MolecularSystem for molecules

    def cvs(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Collective variables of ``x`` ``[n, dim]``: ``x0, x1, ...``, and ``phi, psi`` for molecules."""
        if self.molecule is None:
            return cartesian_cvs(x)
        from boltzgen.observables import dihedral_cvs

        return dihedral_cvs(x.reshape(x.shape[0], -1, 3), self.molecule.mdtraj_topology)


def build_system(config: Config) -> System:
    spec = config.system
    if isinstance(spec, DoubleWellSystem):
        return System(DoubleWell(spec.a, spec.b, spec.c))
    if isinstance(spec, MuellerBrownSystem):
        return System(MuellerBrown(spec.beta))
    raise RunError(f"system type {spec.type} is not supported by this command yet")


@dataclass
class TrainingData:
    """Configurations for forward-KL training and their baseline estimates.

    ``x``: ``[n, dim]`` float64; ``chains``: the same frames as ``[chains, T, dim]`` when they come from
    parallel chains (for block-averaged errors), else ``None``; ``u``: ``[n]`` reduced energies at
    the target temperature.
    """

    x: np.ndarray
    u: np.ndarray
    source: str
    energy_evaluations: int
    wall_seconds: float
    chains: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


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
    chains = result.x.permute(1, 0, 2).cpu().numpy()  # [chains, T, dim]
    u = result.u.permute(1, 0).cpu().numpy()
    return TrainingData(
        x=chains.reshape(-1, energy.dim), u=u.reshape(-1), source="baseline MALA",
        energy_evaluations=energy.evaluations - evaluations0, wall_seconds=time.perf_counter() - started,
        chains=chains, extra={"acceptance_rate": result.acceptance_rate, "step_sizes": result.step_sizes},
    )


def state_masks(config: Config, cvs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Membership ``[n]`` bool of every configured state, in config order."""
    return {name: state.evaluate(cvs) for name, state in resolve_states(config.states).items()}


def free_energy_rows(config: Config, estimates: dict[tuple[str, str], FreeEnergy],
                     exact: dict[tuple[str, str], float] | None = None) -> list[dict[str, Any]]:
    rows = []
    for (a, b), fe in estimates.items():
        row = {"from": a, "to": b, "delta_f_kT": fe.value, "stderr_kT": fe.stderr, "n_eff": fe.n_eff}
        if exact is not None and (a, b) in exact:
            row["exact_kT"] = exact[(a, b)]
        rows.append(row)
    return rows


def state_pairs(config: Config) -> list[tuple[str, str]]:
    """ΔF is reported from the first state to each other state."""
    names = list(config.states)
    return [(names[0], other) for other in names[1:]]


def exact_free_energies(config: Config, energy: AnalyticEnergy) -> dict[tuple[str, str], float]:
    """ΔF by quadrature, for states defined exactly as in the config."""
    predicates = {}
    for name in config.states:
        predicates[name] = (lambda cvs, name=name: state_masks(config, cvs)[name])
    probabilities = energy.quadrature_probabilities(predicates)
    return {(a, b): -math.log(probabilities[b] / probabilities[a]) for a, b in state_pairs(config)}


@dataclass
class SampleSet:
    """Flow samples kept in memory for estimators: ``[n]`` float64 arrays and CVs, no positions."""

    log_q: np.ndarray
    u: np.ndarray
    log_w: np.ndarray
    cvs: dict[str, np.ndarray]
    x_head: np.ndarray  # the first few hundred thousand states, for plots
    wall_seconds: float


def draw_samples(generator: BoltzmannGenerator, system: System, n: int, batch: int, path: Path,
                 progress: bool, topology: Any = None, keep_states: int = 200_000) -> SampleSet:
    """Stream ``n`` flow samples into ``path`` (HDF5) with log q, u and log w; memory is bounded by
    ``batch`` plus a few float64 numbers per sample."""
    started = time.perf_counter()
    generator.eval()
    parts: dict[str, list[np.ndarray]] = {"log_q": [], "u": [], "log_w": []}
    cv_parts: list[dict[str, np.ndarray]] = []
    head: list[np.ndarray] = []
    kept = 0
    bar = tqdm(total=n, disable=not progress, desc="sample", unit="sample", unit_scale=True)
    with SampleWriter(path, generator.energy.dim, extras=("log_q", "u", "log_w"), topology=topology) as writer:
        for start in range(0, n, batch):
            s = generator.sample(min(batch, n - start), batch_size=batch)
            x = s.x.detach().to(torch.float64).cpu().numpy()
            arrays = {"log_q": s.log_q.cpu().numpy(), "u": s.u.cpu().numpy(), "log_w": s.log_w.cpu().numpy()}
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
    return SampleSet(**{k: np.concatenate(v) for k, v in parts.items()}, cvs=cvs, x_head=np.concatenate(head),
                     wall_seconds=time.perf_counter() - started)


def reweighting_summary(samples: SampleSet) -> dict[str, Any]:
    khat = pareto_khat(samples.log_w)
    return {
        "ess": kish_ess(samples.log_w),
        "n_samples": int(samples.log_w.size),
        "n_nonfinite": count_nonfinite(samples.log_w),
        "max_normalized_weight": max_normalized_weight(samples.log_w),
        "pareto_khat": khat,
    }


def prepare_run_dir(out_dir: Path, resume: bool, force: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not (resume or force):
        raise RunError(f"{out_dir} already holds a run; pass --resume to continue it, --force to overwrite it, "
                       "or --out DIR to write elsewhere")
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)


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

    data = run_baseline_mala(config, energy, progress)
    baseline_evaluations = energy.evaluations
    energy.evaluations = 0

    prior, flow = build_flow(config.flow, energy.dim, seed=config.seed)
    generator = BoltzmannGenerator(prior, flow, energy).to(device=device, dtype=dtype)
    x_train = torch.as_tensor(data.x, dtype=dtype, device=device)
    trainer = Trainer(generator, config.training, out_dir, data=x_train, checkpoint_every=config.checkpoint_every,
                      log_every=config.log_every, progress=progress)
    trainer.run(resume=resume)
    training_evaluations = energy.evaluations

    samples = draw_samples(generator, system, config.sampling.n, config.sampling.batch, out_dir / "samples.h5", progress)
    sampling_evaluations = energy.evaluations - training_evaluations

    summary: dict[str, Any] = {"name": config.name, "device": str(device), **reweighting_summary(samples)}
    flow_masks = state_masks(config, samples.cvs)
    pairs = state_pairs(config)
    flow_fe = {(a, b): delta_f(flow_masks[a], flow_masks[b], samples.log_w, config.sampling.n_bootstrap, config.seed)
               for a, b in pairs}
    exact = exact_free_energies(config, system.energy) if isinstance(system.energy, AnalyticEnergy) and pairs else None
    summary["free_energies"] = free_energy_rows(config, flow_fe, exact)

    data_cvs = system.cvs(data.x)
    data_masks = {k: v.reshape(data.chains.shape[:2]) for k, v in state_masks(config, data_cvs).items()}
    # One block per chain: chains rarely cross barriers, so only whole chains are independent.
    baseline_fe = {(a, b): delta_f_blocked(data_masks[a], data_masks[b], n_blocks=1) for a, b in pairs}
    summary["baseline"] = {
        "source": data.source, "n_samples": int(data.x.shape[0]), "energy_evaluations": baseline_evaluations,
        "wall_seconds": data.wall_seconds, "free_energies": free_energy_rows(config, baseline_fe, exact), **data.extra,
    }
    summary["energy_evaluations"] = {"training": training_evaluations, "sampling": sampling_evaluations,
                                     "total": training_evaluations + sampling_evaluations}
    summary["training_wall_seconds"] = trainer.wall_seconds
    summary["sampling_wall_seconds"] = samples.wall_seconds
    summary["n_nonfinite_training"] = trainer.n_nonfinite

    make_plots(out_dir, system, data, samples)
    summary["wall_seconds"] = time.perf_counter() - started
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def make_plots(out_dir: Path, system: System, data: TrainingData, samples: SampleSet) -> None:
    plots_dir = out_dir / "plots"
    plots.training_curves(out_dir / "metrics.csv", plots_dir / "training.png")
    plots.energy_histograms(data.u, samples.u, samples.log_w, plots_dir / "energy_histogram.png", data_label=data.source)
    energy = system.energy
    if isinstance(energy, AnalyticEnergy):
        n_head = len(samples.x_head)
        edges = [np.linspace(lo, hi, 121) for lo, hi in zip(energy.box.lower, energy.box.upper)]
        centers = [0.5 * (e[1:] + e[:-1]) for e in edges]
        g0, g1 = np.meshgrid(*centers, indexing="ij")
        with torch.no_grad():
            u = energy.reduced_energy(torch.from_numpy(np.stack([g0.ravel(), g1.ravel()], 1))).numpy().reshape(g0.shape)
        p = np.exp(-(u - u.min()))
        plots.density_2d(samples.x_head, samples.log_w[:n_head], (edges[0], edges[1], p / p.sum()),
                         plots_dir / "density.png")
