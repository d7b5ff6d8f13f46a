"""Flow samples with importance weights: drawing them (`train`, `sample`) and the `sample` command.

:func:`draw_samples` streams samples to HDF5 and keeps only ``[n]`` float64 arrays and CVs in
memory, so ``N = 10^7`` needs no positions in memory. :func:`sample_job` adds diagnostics: ESS per
observable, Pareto k̂, ΔF with bootstrap errors, FES along every CV, and free energies at other
temperatures by MBAR.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from boltzgen import distributed, plots
from boltzgen.energies.analytic import AnalyticEnergy
from boltzgen.errors import RunError
from boltzgen.estimators.free_energy import delta_f, thermodynamic_free_energies_mbar
from boltzgen.estimators.histograms import FreeEnergySurface, free_energy_surface
from boltzgen.estimators.weights import (
    KHAT_UNRELIABLE,
    count_nonfinite,
    ess_per_observable,
    kish_ess,
    log_z_importance_sampling,
    max_normalized_weight,
    pareto_khat,
    psis_log_weights,
    truncated_log_weights,
)
from boltzgen.files import atomic_write_json, json_safe
from boltzgen.flows.residual import measure_log_q_noise
from boltzgen.generator import BoltzmannGenerator
from boltzgen.geometry import find_alpha_carbon_chirality, is_l_chirality
from boltzgen.runs.resources import check_samples
from boltzgen.runs.rundir import RunDir
from boltzgen.runs.summaries import FreeEnergyRow, LogDetEstimate, LogZRow, SampleSummary, ThermodynamicRow
from boltzgen.runs.target import Target, load_run
from boltzgen.trajectory import SampleWriter, remove_stale_shards, shard_paths, write_virtual_samples

WEIGHTS = ("raw", "psis", "truncate")
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


# --- drawing samples -------------------------------------------------------------------------------

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


def draw_samples(generator: BoltzmannGenerator, target: Target, n: int, batch: int, path: Path, progress: bool,
                 reject_wrong_chirality: bool = False, keep_states: int = 200_000) -> SampleSet:
    """Stream ``n`` flow samples into ``path`` (HDF5) with log q, u and log w.

    Memory is bounded by ``batch`` plus a few float64 numbers per sample. For molecules, samples
    whose alpha carbons are not all L are counted; with ``reject_wrong_chirality`` their log w is
    set to -inf (weight 0): the target is the L molecule, and its mirror image has the same energy.
    """
    started = time.perf_counter()
    generator.eval()
    quads = None if target.molecule is None else find_alpha_carbon_chirality(target.topology)
    parts: dict[str, list[np.ndarray]] = {"log_q": [], "u": [], "log_w": []}
    cv_parts: list[dict[str, np.ndarray]] = []
    head: list[np.ndarray] = []
    kept = n_wrong = 0
    bar = tqdm(total=n, disable=not progress, desc="sample", unit="sample", unit_scale=True)
    with SampleWriter(path, generator.energy.dim, extras=("log_q", "u", "log_w"), topology=target.topology) as writer:
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
            cv_parts.append(target.cvs(x))
            if kept < keep_states:
                head.append(x[: keep_states - kept])
                kept += len(head[-1])
            bar.update(len(x))
    bar.close()
    cvs = {key: np.concatenate([c[key] for c in cv_parts]) for key in cv_parts[0]}
    x_head = np.concatenate(head) if head else np.empty((0, generator.energy.dim))
    return SampleSet(**{k: np.concatenate(v) for k, v in parts.items()}, cvs=cvs, x_head=x_head,
                     n_wrong_chirality=n_wrong, wall_seconds=time.perf_counter() - started)


def draw_samples_distributed(generator: BoltzmannGenerator, target: Target, n: int, batch: int, path: Path,
                             progress: bool, reject_wrong_chirality: bool = False, keep_states: int = 200_000,
                             names: tuple[str, str] = ("sampling.n", "sampling.batch")) -> SampleSet | None:
    """:func:`draw_samples` split over the ranks of a torchrun launch; in one process, draw_samples itself.

    ``n`` and ``batch`` are global (``names`` say where they come from, for errors). Each rank draws
    its contiguous share of ``n`` (:func:`~boltzgen.distributed.shard`) in batches of ``batch`` /
    world size from its own random stream (seeded by the caller) into its own shard file. Only the
    ``[n]`` float64 arrays and CVs travel: rank 0 gets them in rank order, the order of the frames
    in ``path``, which it writes as one file over the shards (HDF5 virtual datasets). Rank 0 returns
    the :class:`SampleSet` of all ``n`` samples, with its own first states as ``x_head``; the other
    ranks return ``None``.
    """
    world = distributed.world()
    if not world.distributed:
        samples = draw_samples(generator, target, n, batch, path, progress, reject_wrong_chirality, keep_states)
        remove_stale_shards(path)
        return samples
    local_batch = distributed.local_batch(batch, names[1])
    if n < world.size:
        raise RunError(f"{names[0]}: {n} samples cannot be split over the {world.size} processes of this launch; "
                       f"ask for at least {world.size}")
    started = time.perf_counter()
    shards = shard_paths(path, world.size)
    own = draw_samples(generator, target, distributed.shard(n)[1], local_batch, shards[world.rank],
                       progress and world.is_main, reject_wrong_chirality, keep_states)
    parts = distributed.gather_to_main(replace(own, x_head=own.x_head[:0]))  # returns once every shard is closed
    if parts is None:
        return None
    write_virtual_samples(path, shards)
    remove_stale_shards(path, keep=shards)
    return SampleSet(**{key: np.concatenate([getattr(p, key) for p in parts]) for key in ("log_q", "u", "log_w")},
                     cvs={key: np.concatenate([p.cvs[key] for p in parts]) for key in own.cvs}, x_head=own.x_head,
                     n_wrong_chirality=sum(p.n_wrong_chirality for p in parts),
                     wall_seconds=time.perf_counter() - started)


@dataclass(frozen=True)
class WeightStats:
    """Diagnostics of a set of importance log-weights."""

    ess: float
    n_samples: int
    n_nonfinite: int
    max_normalized_weight: float
    pareto_khat: float

    @classmethod
    def of(cls, log_w: np.ndarray) -> WeightStats:
        return cls(kish_ess(log_w), int(log_w.size), count_nonfinite(log_w), max_normalized_weight(log_w),
                   pareto_khat(log_w))

    @property
    def reliable(self) -> bool:
        """Pareto k̂ at most 0.7: the weighted estimates can be trusted."""
        return bool(self.pareto_khat <= KHAT_UNRELIABLE)


def log_det_report(generator: BoltzmannGenerator) -> LogDetEstimate | None:
    """For a flow whose log-det is estimated, which estimator and how much it moves log q
    (:func:`~boltzgen.flows.residual.measure_log_q_noise` on 256 samples, 8 repeats); else ``None``."""
    capabilities = generator.flow.capabilities
    if capabilities.exact_log_det:
        return None
    noise = measure_log_q_noise(generator.prior, generator.flow)
    return LogDetEstimate(estimator=capabilities.estimator or "unknown", unbiased=capabilities.unbiased,
                          n_points=noise.n_points, n_repeats=noise.n_repeats, log_q_std=noise.std,
                          log_q_std_max=noise.std_max, log_q_bias=noise.bias, log_q_bias_stderr=noise.bias_stderr)


def log_z_row(target: Target, log_w: np.ndarray) -> LogZRow:
    """log Z from the raw log-weights ``[N]`` (weight-0 samples count in N), the exact value of an
    analytic system, and ``relative`` for a molecule (see :class:`~boltzgen.runs.summaries.LogZRow`)."""
    estimate = log_z_importance_sampling(log_w)
    return LogZRow(estimate=estimate.value, stderr=estimate.stderr, exact=target.exact_log_z(),
                   relative=target.molecule is not None)


def sample_free_energies(target: Target, samples: SampleSet, n_bootstrap: int, seed: int) -> list[FreeEnergyRow]:
    """ΔF of every state pair from the weighted samples, with bootstrap errors."""
    masks = target.state_masks(samples.cvs)
    estimates = {(a, b): delta_f(masks[a], masks[b], samples.log_w, n_bootstrap, seed) for a, b in target.pairs}
    return target.free_energy_rows(estimates)


# --- the sample command ------------------------------------------------------------------------------

def cv_names(cvs: dict[str, np.ndarray]) -> list[str]:
    """The CVs to report: ``x0, x1, ...`` or ``phi, psi`` (plus ``phi1, psi1, ...`` of longer peptides).

    ``phi0``/``psi0`` are aliases of ``phi``/``psi`` and are left out.
    """
    return [name for name in cvs if not (name in ("phi0", "psi0") and name[:-1] in cvs)]


def is_angle(name: str) -> bool:
    return name.startswith(("phi", "psi"))


def cv_label(name: str) -> str:
    return f"{name} [rad]" if is_angle(name) else name


def cv_range(target: Target, name: str) -> tuple[float, float]:
    """Histogram range of a CV: the quadrature box for analytic systems, [-pi, pi] for dihedrals."""
    energy = target.energy
    if is_angle(name):
        return (-math.pi, math.pi)
    if isinstance(energy, AnalyticEnergy) and name.startswith("x") and name[1:].isdigit():
        return energy.cv_range(int(name[1:]))
    raise ValueError(f"no histogram range known for CV {name!r}")


def cv_edges(target: Target, name: str, bins: int) -> np.ndarray:
    return np.linspace(*cv_range(target, name), bins + 1)


def fes_record(fes: FreeEnergySurface, names: list[str]) -> dict[str, Any]:
    """A :class:`FreeEnergySurface` as JSON arrays (``null`` for empty bins)."""
    edges = [np.asarray(e) for e in fes.edges]
    return json_safe({
        "cvs": names, "edges": edges, "centers": [0.5 * (e[1:] + e[:-1]) for e in edges],
        "f_kT": fes.f_kT, "stderr_kT": fes.stderr_kT, "counts": fes.counts,
        "n_nonfinite": fes.n_nonfinite, "n_outside": fes.n_outside,
    })


def shifted_free_energy(p: np.ndarray) -> np.ndarray:
    """``-ln p`` shifted to minimum 0 (``inf`` where ``p`` is 0)."""
    with np.errstate(divide="ignore"):
        f = -np.log(p)
    return f - f[np.isfinite(f)].min()


def select_weights(log_w: np.ndarray, method: str) -> np.ndarray:
    """The log-weights the estimates use: raw, Pareto-smoothed or truncated (see :data:`WEIGHTS_HELP`)."""
    if method == "raw":
        return log_w
    if method == "psis":
        return psis_log_weights(log_w)
    if method == "truncate":
        return truncated_log_weights(log_w)
    raise RunError(f"--weights: unknown method {method!r}; choose one of {', '.join(WEIGHTS)}")


def check_temperatures(temperatures: Sequence[float]) -> list[float]:
    """The temperatures as floats; a RunError naming ``--temperatures`` unless all are positive and finite."""
    values = [float(t) for t in temperatures]
    bad = [t for t in values if not (math.isfinite(t) and t > 0)]
    if not values or bad:
        raise RunError(f"--temperatures: every temperature must be a positive number, got {bad[0] if bad else 'none'}")
    return values


def thermodynamic_rows(target: Target, samples: SampleSet, temperatures: Sequence[float]) -> list[ThermodynamicRow]:
    """One row per temperature: ``f(T) - f(T_target)`` in kT with ``f(T) = -ln Z(T)``.

    By :func:`thermodynamic_free_energies_mbar` on the raw flow samples. Temperatures are in K for
    molecules and relative to the target for analytic systems. Samples with weight 0 (non-finite,
    or rejected for chirality) are left out.
    """
    molecule = target.molecule
    key, reference = ("temperature_ratio", 1.0) if molecule is None else ("temperature_K", molecule.temperature_K)
    u = np.where(np.isfinite(samples.log_w), samples.u, np.nan)  # weight 0 stays 0 at every temperature
    results = thermodynamic_free_energies_mbar(u, samples.log_q, [t / reference for t in temperatures])
    return [ThermodynamicRow(**{key: t}, delta_f_kT=r.value, stderr_kT=r.stderr, n_eff=r.n_eff,
                             method=THERMODYNAMIC_METHOD)
            for t, r in zip(temperatures, results)]


def sample_job(run: RunDir, n: int, batch: int | None = None, out: Path | None = None, weights: str = "raw",
               seed: int | None = None, progress: bool = True,
               temperatures: Sequence[float] | None = None) -> SampleSummary | None:
    """`boltzgen sample`: stream ``n`` flow samples to HDF5 and summarize the importance weights.

    Under torchrun every rank draws its share (:func:`draw_samples_distributed`) and rank 0 alone
    summarizes them all, with the same code as one process; the other ranks return ``None``.

    Writes the summary (see :class:`~boltzgen.runs.summaries.SampleSummary`) to ``sample_summary.json``:
    ESS of the weights used, k̂ of the raw weights, ESS per CV and per state indicator ``state:NAME``
    (fractions of N), ΔF with bootstrap errors, the FES along every CV, and with ``temperatures``
    the free energies at those temperatures (see :func:`thermodynamic_rows`).
    """
    started = time.perf_counter()
    if n < 1:
        raise RunError(f"--n must be at least 1, got {n}")
    if temperatures is not None:
        temperatures = check_temperatures(temperatures)
    if weights not in WEIGHTS:
        raise RunError(f"--weights: unknown method {weights!r}; choose one of {', '.join(WEIGHTS)}")
    trained = load_run(run)
    distributed.barrier()  # load_run removes temporary files: no rank may have begun its shard yet
    config, target, generator = trained.config, trained.target, trained.generator
    batch_name = "sampling.batch" if batch is None else "--batch"
    batch = config.sampling.batch if batch is None else batch
    if batch < 1:
        raise RunError(f"--batch must be at least 1, got {batch}")
    path = Path(out) if out is not None else run.samples
    check_samples(target.shape, n, batch, path.parent, "--n")
    distributed.manual_seed(config.seed if seed is None else seed)
    evaluations0 = generator.energy.evaluations
    samples = draw_samples_distributed(generator, target, n, batch, path, progress,
                                       config.coordinates.reject_wrong_chirality, keep_states=min(n, 10_000),
                                       names=("--n", batch_name))
    evaluations = int(distributed.sum_over_ranks([generator.energy.evaluations - evaluations0])[0])
    if samples is None:
        return None

    log_w = select_weights(samples.log_w, weights)
    if not np.isfinite(log_w).any():
        raise RunError(f"all {n} flow samples have weight 0 (non-finite energy or density); the flow is unusable")
    raw, used = WeightStats.of(samples.log_w), replace(samples, log_w=log_w)
    masks = target.state_masks(samples.cvs)
    names = cv_names(samples.cvs)
    observables = {name: samples.cvs[name] for name in names}
    observables.update({f"state:{state}": mask.astype(np.float64) for state, mask in masks.items()})
    molecule = target.molecule is not None
    summary = SampleSummary(
        name=config.name, weights=weights, ess=kish_ess(log_w), n_samples=raw.n_samples, n_nonfinite=raw.n_nonfinite,
        max_normalized_weight=max_normalized_weight(log_w), pareto_khat=raw.pareto_khat,
        weights_reliable=raw.reliable,
        ess_raw=None if weights == "raw" else raw.ess,
        max_normalized_weight_raw=None if weights == "raw" else raw.max_normalized_weight,
        ess_per_observable={key: float(ess_per_observable(log_w, values)) for key, values in observables.items()},
        free_energies=sample_free_energies(target, used, config.sampling.n_bootstrap, config.seed),
        thermodynamic_free_energies=None if temperatures is None else thermodynamic_rows(target, samples, temperatures),
        n_wrong_chirality=samples.n_wrong_chirality if molecule else None,
        chirality_rejected=config.coordinates.reject_wrong_chirality if molecule else None,
        fes=sample_fes(run, target, used, names, seed=config.seed),
        energy_evaluations={"sampling": evaluations, "total": evaluations},
        sampling_wall_seconds=samples.wall_seconds, samples_file=run.relative(path), batch=batch,
        log_det=log_det_report(generator), log_z=log_z_row(target, samples.log_w),
        wall_seconds=time.perf_counter() - started, ranks=distributed.world().size,
    )
    summary.write(run.sample_summary)
    return summary


def sample_fes(run: RunDir, target: Target, samples: SampleSet, names: list[str], seed: int = 0) -> dict[str, Any]:
    """FES along every CV (and the 2-D FES of the first two) with bootstrap errors; JSON + PNG in plots/."""
    run.plots.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    energy = target.energy
    exact_marginals: dict[str, np.ndarray] = {}
    if isinstance(energy, AnalyticEnergy) and names[:2] == ["x0", "x1"]:  # quadrature of the (x0, x1) density
        p = energy.bin_probabilities(*(cv_edges(target, name, FES_BINS_1D) for name in names[:2]))
        exact_marginals = {names[0]: p.sum(axis=1), names[1]: p.sum(axis=0)}
    for name in names:
        edges = cv_edges(target, name, FES_BINS_1D)
        fes = free_energy_surface(samples.cvs[name], log_w=samples.log_w, bins=edges, n_bootstrap=FES_BOOTSTRAP, rng=seed)
        out[name] = fes_record(fes, [name])
        centers = 0.5 * (edges[1:] + edges[:-1])
        profiles = [("flow, reweighted", centers, np.asarray(fes.f_kT), np.asarray(fes.stderr_kT))]
        if name in exact_marginals:
            profiles.append(("exact (quadrature)", centers, shifted_free_energy(exact_marginals[name]), None))
        plots.free_energy_profiles(profiles, run.plot(f"sample_fes_{name}"), xlabel=cv_label(name))
    if len(names) >= 2:
        a, b = names[0], names[1]
        edges = [cv_edges(target, a, FES_BINS_2D), cv_edges(target, b, FES_BINS_2D)]
        fes2 = free_energy_surface(np.stack([samples.cvs[a], samples.cvs[b]], 1), log_w=samples.log_w, bins=edges,
                                   n_bootstrap=FES_BOOTSTRAP, rng=seed)
        out[f"{a},{b}"] = fes_record(fes2, [a, b])
        panels = [("flow, reweighted", edges[0], edges[1], np.asarray(fes2.f_kT))]
        if isinstance(energy, AnalyticEnergy):
            panels.insert(0, ("exact (quadrature)", edges[0], edges[1],
                              shifted_free_energy(energy.bin_probabilities(edges[0], edges[1]))))
        plots.fes_2d(panels, run.plot(f"sample_fes_{a}_{b}"), labels=(a, b))
    atomic_write_json(run.sample_fes, out)
    return out
