"""`boltzgen md CONFIG --remd`: temperature replica exchange, a baseline that needs no collective variable.

The replicas run on the ladder of ``remd:`` (:class:`boltzgen.baseline_config.RemdConfig`) with
openmmtools (:mod:`boltzgen.simulation.remd`); MBAR over every production frame of every replica
gives ΔF between the config's states at the target temperature, with delete-one-block jackknife
errors over blocks of consecutive iterations (:mod:`boltzgen.estimators.remd`). Frames with a cis
peptide bond, which hot replicas can reach, are counted and left out unless ``remd.keep_cis``.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from boltzgen import plots
from boltzgen.baseline_config import check_ladder, target_index
from boltzgen.config import Config, dump_config
from boltzgen.errors import RunError
from boltzgen.estimators.remd import RemdFreeEnergies, pair_acceptance, remd_free_energies, round_trips
from boltzgen.estimators.timeseries import integrated_autocorrelation_time
from boltzgen.files import atomic_write_text
from boltzgen.geometry import dihedrals_rad, topology_items
from boltzgen.runs.baselines import phi_profile, xy_fes_plot
from boltzgen.runs.rundir import RemdDir, RunDir
from boltzgen.runs.summaries import RemdSummary
from boltzgen.runs.target import Target, build_target
from boltzgen.trajectory import SampleWriter

#: A peptide bond is cis when its omega torsion is within this of 0 (rad).
CIS_CUTOFF_RAD = math.pi / 2


def omega_torsions(topology: Any) -> np.ndarray:
    """``[n_bonds, 4]`` atom indices of each peptide bond's omega torsion, C(alpha)-C-N-C(alpha).

    A peptide bond is a bond from an atom ``C`` of one residue to an atom ``N`` of another; the outer
    atoms are the bonded carbons ``CA``, else ``CH3`` (ACE, NME caps), else ``C`` (NME in some
    naming). Accepts an mdtraj or OpenMM topology; no peptide bond gives ``[0, 4]``.
    """
    bonded: dict[int, list[Any]] = {}
    for bond in topology_items(topology, "bonds"):
        a, b = bond[0], bond[1]
        bonded.setdefault(a.index, []).append(b)
        bonded.setdefault(b.index, []).append(a)

    def outer(atom: Any, exclude: Any) -> int | None:
        near = {n.name: n.index for n in bonded.get(atom.index, [])
                if n.residue == atom.residue and n.index != exclude.index}
        return next((near[name] for name in ("CA", "CH3", "C") if name in near), None)

    quads = []
    for atom in topology_items(topology, "atoms"):
        if atom.name != "C":
            continue
        for n in bonded.get(atom.index, []):
            if n.name == "N" and n.residue != atom.residue:
                first, last = outer(atom, n), outer(n, atom)
                if first is not None and last is not None:
                    quads.append((first, atom.index, n.index, last))
    return np.array(quads, dtype=np.int64).reshape(-1, 4)


@dataclass(frozen=True, eq=False)
class _Analysis:
    """The production frames' CVs (flat ``[T R]`` each), state masks and cis mask (``[T, R]``), and
    the MBAR estimate."""

    cvs: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    cis: np.ndarray | None
    estimate: RemdFreeEnergies


def _analyse(config: Config, target: Target, result: Any, target_rung: int) -> _Analysis:
    """CVs, states and cis bonds of the production frames, and ΔF by MBAR with jackknife errors."""
    cfg = config.remd
    production = slice(cfg.equilibration_iterations, cfg.iterations)
    xyz = result.positions_nm[production]
    t, r = xyz.shape[:2]
    flat = xyz.reshape(t * r, -1).astype(np.float64)
    cvs = target.cvs(flat)
    masks = {name: m.reshape(t, r) for name, m in target.state_masks(cvs).items()}
    quads = omega_torsions(target.molecule.mdtraj_topology)
    cis = None
    if len(quads):
        omega = dihedrals_rad(flat.reshape(t * r, -1, 3), [tuple(q) for q in quads])
        cis = (np.abs(omega) < CIS_CUTOFF_RAD).any(axis=1).reshape(t, r)
    keep = None if cis is None or cfg.keep_cis else ~cis
    if keep is not None and not keep.any():
        raise RunError("remd: every production frame has a cis peptide bond; set remd.keep_cis: true or lower "
                       "remd.max_temperature_K")
    estimate = remd_free_energies(result.reduced_potentials[production], result.states[production], masks,
                                  target.pairs, target_rung, cfg.n_blocks, keep)
    return _Analysis(cvs, masks, cis, estimate)


def _indicator_tau(masks: dict[str, np.ndarray], states: np.ndarray) -> float:
    """Integrated autocorrelation time (iterations) of the least visited state's indicator in the
    series of each temperature (``states`` ``[T, R]``), averaged over the temperatures where it changes;
    inf when it changes at none."""
    rarest = min(masks.values(), key=lambda m: m.mean())
    order = np.argsort(states, axis=1)  # order[t, k]: the replica at temperature k at iteration t
    series = np.take_along_axis(rarest, order, axis=1).T.astype(np.float64)  # [K, T]
    series = series[np.ptp(series, axis=1) > 0]
    if len(series) == 0:
        return math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # short runs: the summary states the block length beside it
        return integrated_autocorrelation_time(series)


def _write_samples(folder: RemdDir, target: Target, result: Any, analysis: _Analysis, config: Config,
                   target_rung: int) -> None:
    """Every production frame (iteration-major) with its target-temperature MBAR log-weight and reduced
    energy, rung temperature, replica, iteration and cis flag, readable by mdtraj."""
    cfg = config.remd
    production = slice(cfg.equilibration_iterations, cfg.iterations)
    xyz = result.positions_nm[production]
    t, r = xyz.shape[:2]
    temperatures = result.temperatures_K[result.states[production]]
    extras = {
        "log_w": analysis.estimate.log_w.ravel(),
        "u": result.reduced_potentials[production][:, :, target_rung].ravel(),
        "temperature_K": temperatures.ravel(),
        "replica": np.tile(np.arange(r, dtype=np.float64), t),
        "iteration": np.repeat(np.arange(cfg.equilibration_iterations + 1, cfg.iterations + 1, dtype=np.float64), r),
        "cis": np.zeros(t * r) if analysis.cis is None else analysis.cis.ravel().astype(np.float64),
    }
    attrs = {"method": "remd", "target_temperature_K": float(result.temperatures_K[target_rung]),
             "temperatures_K": json.dumps(result.temperatures_K.tolist()), "keep_cis": int(cfg.keep_cis)}
    with SampleWriter(folder.samples, xyz.shape[2] * 3, extras=tuple(extras), topology=target.molecule.mdtraj_topology,
                      attrs=attrs, expected_frames=t * r) as writer:
        writer.append(xyz.reshape(t * r, -1), **extras)


def _plots(folder: RemdDir, target: Target, result: Any, analysis: _Analysis, acceptance: np.ndarray,
           trips: np.ndarray) -> None:
    """The mixing diagnostics, and the target-temperature FES: Ramachandran and phi profile for a
    molecule, (x0, x1) against quadrature for the particle."""
    plots.remd_mixing(result.temperatures_K, acceptance, result.states, trips, folder.plot("remd_mixing"))
    lw = analysis.estimate.log_w.ravel()
    kept = np.isfinite(lw)
    cvs = {name: values[kept] for name, values in analysis.cvs.items()}
    if target.torsions is not None:
        phi, psi = target.plotted_torsions()
        plots.ramachandran([("REMD, reweighted to target", cvs[phi], cvs[psi], lw[kept])],
                           folder.plot("ramachandran"), (phi, psi))
        plots.free_energy_profiles([("REMD, reweighted to target", *phi_profile(cvs[phi], lw[kept]))],
                                   folder.plot("phi_profile"), xlabel=f"{phi} [rad]")
        return
    xy_fes_plot(target, cvs["x0"], cvs["x1"], lw[kept], "REMD, reweighted to target", folder.plot("fes"))


def _simulate(config: Config, target: Target, folder: RemdDir, ladder: list[float], progress: bool) -> Any:
    """The replica exchange run of ``remd:`` (resumed or reused when its storage is there)."""
    from boltzgen.simulation.remd import repartition_hydrogen_mass, run_replica_exchange

    cfg, molecule = config.remd, target.molecule
    system = molecule.system
    try:
        if cfg.hydrogen_mass_amu is not None:
            topology = molecule.mdtraj_topology
            system = repartition_hydrogen_mass(
                system, [(a.index, b.index) for a, b in topology.bonds],
                [a.index for a in topology.atoms if a.element is not None and a.element.symbol == "H"],
                cfg.hydrogen_mass_amu)
        return run_replica_exchange(
            system, molecule.positions_nm, ladder, steps_per_exchange=cfg.steps_per_exchange,
            iterations=cfg.iterations, storage=folder.storage, timestep_fs=cfg.timestep_fs,
            friction_per_ps=cfg.friction_per_ps, platform=cfg.platform, seed=cfg.seed + config.seed,
            checkpoint_every=cfg.checkpoint_every, resume=True, progress=progress)
    except (ValueError, RuntimeError) as exc:
        raise RunError(f"{folder.storage}: {exc}") from None


def remd_job(config: Config, resolved: dict[str, Any], run: RunDir, progress: bool = True) -> RemdSummary:
    """`boltzgen md --remd`: replica exchange into ``<run>/remd/``: the openmmtools storage, the
    production frames with their target-temperature weights (samples.h5), the summary and plots."""
    started = time.perf_counter()
    torch.set_num_threads(config.cpu_threads)
    target = build_target(config)
    if target.molecule is None:
        raise RunError(f"replica exchange needs an OpenMM system (openmm or mueller_brown_particle); "
                       f"{config.system.type} uses the MALA baseline in `train`")
    if len(target.states) < 2:
        raise RunError("states: replica exchange needs at least two states to compare")
    cfg, target_K = config.remd, target.molecule.temperature_K
    check_ladder(cfg, target_K, "config")  # load_config checks a remd section it reads, not the defaults
    ladder = cfg.ladder(target_K)
    rung = target_index(ladder, target_K)
    assert rung is not None
    folder = run.remd
    folder.plots.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder.config, dump_config(resolved))
    result = _simulate(config, target, folder, ladder, progress)
    analysis = _analyse(config, target, result, rung)
    production = slice(cfg.equilibration_iterations, cfg.iterations)
    acceptance = pair_acceptance(result.n_accepted, result.n_proposed)
    trips = round_trips(result.states[production], len(ladder))
    _write_samples(folder, target, result, analysis, config, rung)
    _plots(folder, target, result, analysis, acceptance, trips)
    summary = _summary(config, target, result, analysis, acceptance, trips, run, started)
    summary.write(folder.summary)
    return summary


def _summary(config: Config, target: Target, result: Any, analysis: _Analysis, acceptance: np.ndarray,
             trips: np.ndarray, run: RunDir, started: float) -> RemdSummary:
    """The :class:`RemdSummary` of a run; ``started``: the job's start (``time.perf_counter()``)."""
    from boltzgen.simulation.remd import ENGINE

    cfg, est = config.remd, analysis.estimate
    production = cfg.iterations - cfg.equilibration_iterations
    block = production // cfg.n_blocks
    states = result.states[cfg.equilibration_iterations:]
    cis = analysis.cis
    return RemdSummary(
        name=config.name, engine=ENGINE, temperatures_K=result.temperatures_K.tolist(),
        target_temperature_K=float(target.molecule.temperature_K), free_energies=target.free_energy_rows(est.pairs),
        error_method=f"MBAR over all replicas; delete-one-block jackknife over {cfg.n_blocks} blocks of "
                     f"{block} iterations", n_samples=est.n_frames, n_eff=est.n_eff,
        pair_acceptance=acceptance.tolist(), round_trips=trips.tolist(), round_trips_total=int(trips.sum()),
        keep_cis=cfg.keep_cis, cis_fraction=None if cis is None else float(cis.mean()),
        cis_fraction_by_temperature=None if cis is None else [float(cis[states == k].mean()) if (states == k).any()
                                                              else math.nan for k in range(len(result.temperatures_K))],
        n_cis_frames=None if cis is None else int(cis.sum()), iterations=cfg.iterations,
        equilibration_iterations=cfg.equilibration_iterations, steps_per_exchange=cfg.steps_per_exchange,
        timestep_fs=cfg.timestep_fs, tau_int_iterations=_indicator_tau(analysis.masks, states), block_iterations=block,
        energy_evaluations={"remd": result.energy_evaluations, "total": result.energy_evaluations},
        remd_wall_seconds=result.wall_seconds, wall_seconds=time.perf_counter() - started,
        storage=run.relative(result.storage),
        samples_file=run.relative(run.remd.samples),
    )
