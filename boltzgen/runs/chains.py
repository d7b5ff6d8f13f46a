"""The `mcmc` command: flow-preconditioned MCMC chains on a trained run, with their diagnostics."""

from __future__ import annotations

import math
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boltzgen import plots
from boltzgen.energies.base import RestrictedEnergy
from boltzgen.errors import RunError
from boltzgen.estimators.free_energy import delta_f_blocked
from boltzgen.estimators.histograms import free_energy_surface
from boltzgen.estimators.timeseries import batch_means_tau, integrated_autocorrelation_time
from boltzgen.flows.residual import exact_log_dets
from boltzgen.generator import BoltzmannGenerator
from boltzgen.geometry import find_alpha_carbon_chirality, is_l_chirality
from boltzgen.mcmc import initial_state, run_chains
from boltzgen.moves import CartesianMALA, Cycle, IndependenceMetropolis, LatentHMC, LatentMALA, Move
from boltzgen.runs.resources import check_chains
from boltzgen.runs.rundir import MCMCDir, RunDir
from boltzgen.runs.sample import FES_BINS_1D, cv_edges, cv_label, cv_names, is_angle
from boltzgen.runs.summaries import MCMCSummary
from boltzgen.runs.target import Target, load_run
from boltzgen.trajectory import SampleWriter

MOVES = ("imh", "latent_hmc", "latent_mala", "imh+mala")
#: chains of a flow with an estimated log-det use the exact one up to this many latent dimensions
EXACT_LOG_DET_MAX_DIM = 64
#: default step size of the local CartesianMALA move of ``imh+mala``, in units of x (nm for molecules)
LOCAL_STEP_MOLECULE_NM = 0.002
LOCAL_STEP_ANALYTIC = 0.1
#: frames per write of chains.h5
WRITE_FRAMES = 262_144


def build_moves(kind: str, generator: BoltzmannGenerator, target: Target, step_size: float | None = None,
                local_step: float | None = None, n_leapfrog: int = 10) -> Move:
    """The move of ``boltzgen mcmc --moves KIND``.

    ``imh``: independence Metropolis with the flow as proposal. ``latent_hmc`` / ``latent_mala``:
    HMC / MALA on the latent pull-back (NeuTra), initial latent step ``step_size`` (default 0.1).
    ``imh+mala``: a Cycle of one IMH step and one CartesianMALA step of initial size ``local_step``
    (units of x: nm for molecules, default 0.002 nm; 0.1 for analytic systems).
    """
    step_size = 0.1 if step_size is None else step_size
    if local_step is None:
        local_step = LOCAL_STEP_MOLECULE_NM if target.molecule is not None else LOCAL_STEP_ANALYTIC
    for option, value in (("--step-size", step_size), ("--local-step", local_step), ("--leapfrog", n_leapfrog)):
        if not (math.isfinite(value) and value > 0):
            raise RunError(f"{option}: must be a positive finite number, got {value}")
    if kind == "imh":
        return IndependenceMetropolis(generator)
    if kind == "latent_hmc":
        return LatentHMC(generator, step_size=step_size, n_leapfrog=n_leapfrog)
    if kind == "latent_mala":
        return LatentMALA(generator, step_size=step_size)
    if kind == "imh+mala":
        return Cycle([IndependenceMetropolis(generator), CartesianMALA(target.energy, step_size=local_step)])
    raise RunError(f"--moves: unknown move {kind!r}; choose one of {', '.join(MOVES)}")


def exact_flow_density(generator: BoltzmannGenerator, moves: str, flow_type: str) -> AbstractContextManager[Any]:
    """The flow as the chains need it: Metropolis acceptance needs log q exactly.

    A flow without an inverse cannot give log q at a state that the local MALA step of ``imh+mala``
    moved, so that move is refused (``imh`` and the latent moves use log q of the flow's own draws
    only). An estimated log-det would make every acceptance ratio noisy and the chains biased, so
    it is replaced by the exact one (:func:`~boltzgen.flows.residual.exact_log_dets`) up to
    :data:`EXACT_LOG_DET_MAX_DIM` latent dimensions, and refused above. Returns the context in which
    the chains run.
    """
    capabilities = generator.flow.capabilities
    if moves == "imh+mala" and not capabilities.data_density:
        raise RunError(f"mcmc --moves imh+mala: flow.type {flow_type} cannot evaluate the density of a state moved by "
                       "the local MALA step (it has no inverse); use --moves imh, latent_hmc or latent_mala")
    if capabilities.exact_log_det:
        return nullcontext()
    if generator.prior.dim > EXACT_LOG_DET_MAX_DIM:
        raise RunError(f"mcmc: flow.type {flow_type} estimates its log-det ({capabilities.estimator}), which would bias "
                       f"the acceptance, and its {generator.prior.dim} latent dimensions are too many for the exact "
                       f"log-det (at most {EXACT_LOG_DET_MAX_DIM}); use `boltzgen sample`, which reports the noise")
    return exact_log_dets(generator.flow)


def tau_series(cvs: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
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


def _check_options(chains: int, steps: int, warmup: int, thin: int, moves: str) -> int:
    """The number of kept states per chain; a RunError naming the option that is out of range."""
    if chains < 1 or steps < 1 or warmup < 0 or thin < 1:
        raise RunError(f"need --chains >= 1, --steps >= 1, --warmup >= 0, --thin >= 1; got {chains}, {steps}, {warmup}, {thin}")
    n_kept = steps // thin
    if n_kept < 2:
        raise RunError(f"--steps {steps} with --thin {thin} keeps {n_kept} state(s) per chain; need at least 2")
    if moves not in MOVES:
        raise RunError(f"--moves: unknown move {moves!r}; choose one of {', '.join(MOVES)}")
    return n_kept


def _write_chains(folder: MCMCDir, target: Target, x: torch.Tensor, u: np.ndarray, thin: int,
                  attrs: dict[str, Any]) -> dict[str, np.ndarray]:
    """Write ``x`` ``[T, chains, dim]`` chain-major to ``chains.h5``; return the CVs as ``[chains, T]`` arrays."""
    n_kept, chains, dim = x.shape
    cv_parts: list[dict[str, np.ndarray]] = []
    with SampleWriter(folder.chains, dim, extras=("u", "chain", "step"), topology=target.topology, attrs=attrs) as writer:
        per = max(1, WRITE_FRAMES // max(1, n_kept))
        for c0 in range(0, chains, per):
            c1 = min(chains, c0 + per)
            block = x[:, c0:c1].permute(1, 0, 2).reshape(-1, dim).to(torch.float64).cpu().numpy()
            writer.append(block, u=u[c0:c1].ravel(), chain=np.repeat(np.arange(c0, c1), n_kept).astype(np.float64),
                          step=np.tile(np.arange(1, n_kept + 1) * thin, c1 - c0).astype(np.float64))
            cv_parts.append(target.cvs(block))
    return {key: np.concatenate([p[key] for p in cv_parts]).reshape(chains, n_kept) for key in cv_parts[0]}


def _chain_free_energies(target: Target, masks: dict[str, np.ndarray]) -> dict[tuple[str, str], Any]:
    """ΔF of every pair from ``[chains, T]`` state masks, jackknife over blocks (one per chain from 20 chains)."""
    chains, n_kept = next(iter(masks.values())).shape
    n_blocks = max(1, min(n_kept, math.ceil(20 / chains)))
    estimates = {}
    for a, b in target.pairs:
        try:
            estimates[(a, b)] = delta_f_blocked(masks[a], masks[b], n_blocks)
        except ValueError as exc:
            raise RunError(f"mcmc: ΔF {a}→{b}: {exc}; run more chains or steps") from None
    return estimates


def mcmc_job(run: RunDir, chains: int = 256, steps: int = 1000, warmup: int = 200, thin: int = 1,
             moves: str = "imh", out_dir: Path | None = None, step_size: float | None = None,
             local_step: float | None = None, n_leapfrog: int = 10, seed: int | None = None,
             progress: bool = True) -> MCMCSummary:
    """`boltzgen mcmc`: flow-preconditioned MCMC chains, into ``<run>/mcmc/`` (or ``out_dir``).

    Chains start near equilibrium (:func:`~boltzgen.mcmc.initial_state`), run ``warmup`` steps (step
    sizes adapt there only, then are frozen) and ``steps`` production steps, keeping every
    ``thin``-th state.

    ``chains.h5``: positions in **chain-major** order, frame ``c * T + t`` is kept state ``t`` of
    chain ``c`` (``T = steps // thin``), mdtraj layout with topology for molecules; extra float64
    datasets ``u`` (reduced energy), ``chain`` (chain index) and ``step`` (production step, 1-based).

    The summary (:class:`~boltzgen.runs.summaries.MCMCSummary`): ``ess`` is ``1 / tau_max`` over the
    CVs, u and the state indicators (0 when a chain never decorrelates; the indicators' tau comes
    from the spread of chain means); ``n_nonfinite`` counts rejected non-finite proposals (for
    molecules with ``coordinates.reject_wrong_chirality`` the target is the L form, and a D proposal
    has u = inf); ΔF errors are a jackknife over blocks, one block per chain when there are >= 20
    chains; ``tau_int`` is in kept frames (multiply by ``thin`` for steps); ``n_stuck_chains``
    counts chains whose state never changed in production.
    """
    started = time.perf_counter()
    n_kept = _check_options(chains, steps, warmup, thin, moves)
    trained = load_run(run.require_trained())
    config, target, generator = trained.config, trained.target, trained.generator
    folder = MCMCDir(Path(out_dir)) if out_dir is not None else run.mcmc
    folder.path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed if seed is None else seed)
    if target.molecule is not None and config.coordinates.reject_wrong_chirality:
        # the target is the L form; a proposal of its mirror image must be rejected, not accepted
        quads = find_alpha_carbon_chirality(target.topology)
        generator.energy = RestrictedEnergy(generator.energy, partial(is_l_chirality, topology=quads))
        target = target.with_energy(generator.energy)
    energy = generator.energy
    evaluations0 = energy.evaluations

    check_chains(target.shape, chains, n_kept)
    move = build_moves(moves, generator, target, step_size, local_step, n_leapfrog)
    try:
        with exact_flow_density(generator, moves, config.flow.type):
            result = run_chains(move, initial_state(generator, chains), n_steps=steps, n_warmup=warmup, thin=thin,
                                progress=progress)
    except ValueError as exc:
        raise RunError(f"mcmc: {exc}") from None
    evaluations = energy.evaluations - evaluations0
    mcmc_seconds = time.perf_counter() - started

    u = result.u.cpu().numpy().T  # [chains, T]
    attrs = {"order": "chain-major", "n_chains": chains, "n_frames_per_chain": n_kept, "thin": thin, "moves": moves}
    cvs = _write_chains(folder, target, result.x, u, thin, attrs)
    names = cv_names(cvs)
    flat = {key: value.ravel() for key, value in cvs.items()}
    masks = {name: mask.reshape(chains, n_kept) for name, mask in target.state_masks(flat).items()}
    estimates = _chain_free_energies(target, masks)
    series = {**tau_series(cvs, names), "u": u}
    indicators = {f"state:{name}": mask.astype(np.float64) for name, mask in masks.items()}
    taus, short = autocorrelation_times({**series, **indicators}, batch_means=tuple(indicators))
    tau_max = max(taus.values())
    n_samples = chains * n_kept
    _mcmc_plots(folder, target, cvs, names, u)
    summary = MCMCSummary(
        name=config.name, moves=moves,
        ess=(1.0 / tau_max) if math.isfinite(tau_max) else 0.0,
        ess_samples=(n_samples / tau_max) if math.isfinite(tau_max) else 0.0,
        n_samples=n_samples, n_chains=chains, n_steps=steps, n_warmup=warmup, thin=thin,
        n_nonfinite=result.n_nonfinite, free_energies=target.free_energy_rows(estimates),
        acceptance_rate=result.acceptance_rate, step_sizes=result.step_sizes, tau_int=taus,
        tau_int_units=f"kept frames (x{thin} steps)", tau_unreliable=short,
        n_stuck_chains=int(np.sum(np.ptp(u, axis=1) == 0)),
        energy_evaluations={"mcmc": evaluations, "total": evaluations}, mcmc_wall_seconds=mcmc_seconds,
        chains_file=str(folder.chains), order="chain-major: frame c*T + t is state t of chain c",
        wall_seconds=time.perf_counter() - started,
    )
    summary.write(folder.summary)
    return summary


def _mcmc_plots(folder: MCMCDir, target: Target, cvs: dict[str, np.ndarray], names: list[str], u: np.ndarray) -> None:
    """Traces of the first CV and of u for a few chains, and the FES along each CV."""
    folder.plots.mkdir(parents=True, exist_ok=True)
    plots.traces(cvs[names[0]], u, names[0], folder.plot("traces"))
    for name in names:
        edges = cv_edges(target, name, FES_BINS_1D)
        fes = free_energy_surface(cvs[name].ravel(), bins=edges, n_bootstrap=0)
        plots.free_energy_profiles([("MCMC", 0.5 * (edges[1:] + edges[:-1]), np.asarray(fes.f_kT), None)],
                                   folder.plot(f"fes_{name}"), xlabel=cv_label(name))
