"""Replica exchange between harmonic umbrella windows (Hamiltonian exchange on the bias): windows
whose biased CVs leave a slow coordinate behind a barrier still sample it in the right proportion.

Independent windows on x0 of the Mueller-Brown particle show why it is needed: at fixed x0 between
-0.3 and 0.1 nm, x1 has two basins (A's channel near x1 = 1.7, B's middle minimum near 0.47)
separated by 9-11 kT, which a window of 10^5 steps never crosses. The seeding walk from A leaves
those windows in A's channel, B's middle basin is never sampled, and MBAR, fed the wrong
conditional distributions, gave ΔF 10.5 for 3.64 with an error bar that could not see it.

:func:`run_window_exchange` runs every window in turn for ``exchange_every`` steps in one OpenMM
context (its centres are global parameters, as in the seeding walk), then tries to swap the
configurations (positions and velocities; one temperature) of neighbouring windows with the
Metropolis probability ``min(1, exp(-Δ))``, ``Δ = b_i(x_j) + b_j(x_i) - b_i(x_i) - b_j(x_j)`` of
the reduced biases: the unbiased energy is the same in both windows and cancels. A configuration
in a basin that its window cannot leave moves to windows where the barrier is low (x0 <= -0.8 or
>= 0.2 on the particle) and back, so every window's conditional distribution relaxes. The frames
of every window form one coupled ensemble: their errors need blocks of iterations shared by all
windows (:func:`boltzgen.estimators.umbrella_grid.analyze_window_grid` with ``joint_blocks``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openmm
from openmm import app, unit
from tqdm.auto import tqdm

from boltzgen.cvs import evaluate_cvs
from boltzgen.estimators.umbrella_grid import WindowGrid
from boltzgen.simulation.langevin import openmm_seed
from boltzgen.simulation.umbrella_grid import WindowGridRun, WindowGridSpec, md_settings, window_starts
from boltzgen.units import kT_kJ_per_mol


@dataclass(frozen=True, eq=False)
class ExchangeWindow:
    """The production frames of one window of :func:`run_window_exchange`: ``positions_nm``
    ``[T, n_atoms, 3]`` (nm), ``replica`` ``[T]`` which configuration (its start window) the frame
    belongs to; ``energy_evaluations`` the window's MD steps; ``wall_seconds`` its share of the MD."""

    positions_nm: np.ndarray
    replica: np.ndarray
    energy_evaluations: int
    wall_seconds: float

    @property
    def n_frames(self) -> int:
        return int(self.positions_nm.shape[0])


@dataclass(frozen=True, eq=False)
class ExchangeStats:
    """``acceptance`` ``[P]`` of the neighbouring pairs ``pairs`` ``[P, 2]`` (window indices),
    ``attempts`` ``[P]``; ``round_trips`` ``[K]`` per configuration, a visit to the first window
    of the grid and then the last and back (C-order index, the ends of the first CV for two CVs)."""

    pairs: np.ndarray
    acceptance: np.ndarray
    attempts: np.ndarray
    round_trips: np.ndarray


def neighbour_pairs(shape: tuple[int, ...], periodic: tuple[bool, ...]) -> list[np.ndarray]:
    """Sets of disjoint neighbouring window pairs ``[P, 2]`` (flat C-order indices), one per CV and
    parity: exchanges cycle through them. Along a periodic CV with an even number of windows the
    last and the first window are neighbours too."""
    sets = []
    for d, n in enumerate(shape):
        for parity in (0, 1):
            pairs = []
            for point in np.ndindex(*shape):
                i = point[d]
                if i % 2 != parity:
                    continue
                j = i + 1
                if j == n:
                    if not (periodic[d] and n % 2 == 0 and n > 2):
                        continue
                    j = 0
                other = point[:d] + (j,) + point[d + 1:]
                pairs.append((np.ravel_multi_index(point, shape), np.ravel_multi_index(other, shape)))
            if pairs:
                sets.append(np.asarray(pairs, dtype=np.int64))
    return sets


def exchange(bias: np.ndarray, pairs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Which of ``pairs`` ``[P, 2]`` swap, ``[P]`` bool, by Metropolis on ``bias`` ``[K, K]``:
    ``bias[j, k]`` is the reduced bias (kT) of window j's configuration under window k."""
    i, j = pairs[:, 0], pairs[:, 1]
    delta = bias[j, i] + bias[i, j] - bias[i, i] - bias[j, j]
    return np.log(rng.random(len(pairs))) < -delta


def _fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=float).encode())
    return h.hexdigest()


def _context(system: openmm.System, spec: WindowGridSpec, md: Mapping[str, Any], seed: int) -> openmm.Context:
    biased = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    for force in spec.forces(spec.centers[0]):
        biased.addForce(force)
    integrator = openmm.LangevinMiddleIntegrator(md["temperature_K"] * unit.kelvin,
                                                 md["friction_per_ps"] / unit.picosecond,
                                                 md["timestep_fs"] * unit.femtosecond)
    integrator.setRandomNumberSeed(openmm_seed(seed, 11))
    return openmm.Context(biased, integrator, openmm.Platform.getPlatformByName(md["platform"]))


def _simulate(context: openmm.Context, spec: WindowGridSpec, grid: WindowGrid, start_nm: np.ndarray,
              n_iterations: int, chunk: int, record_every: int, seed: int,
              progress: bool) -> tuple[np.ndarray, np.ndarray, ExchangeStats]:
    """The exchange loop: ``[K, T, n_atoms, 3]`` frames per window, ``[K, T]`` their replica, the stats.

    Every iteration runs ``chunk`` steps in each window and then tries one set of neighbour pairs;
    a frame is stored every ``record_every`` iterations.
    """
    centers, n = spec.centers, len(spec.centers)
    temperature = context.getIntegrator().getTemperature()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 13]))
    pos = np.array(start_nm, dtype=np.float64)
    vel = np.zeros_like(pos)
    for k in range(n):
        context.setPositions(pos[k] * unit.nanometer)
        context.setVelocitiesToTemperature(temperature, openmm_seed(seed, 40_000 + k))
        vel[k] = context.getState(getVelocities=True).getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond)
    replica = np.arange(n)
    pair_sets = neighbour_pairs(spec.shape, tuple(cv.periodic for cv in spec.cvs))
    all_pairs = np.concatenate(pair_sets)
    accepted, attempts = np.zeros(len(all_pairs)), np.zeros(len(all_pairs))
    offsets = np.cumsum([0] + [len(p) for p in pair_sets])
    ends = (0, int(np.ravel_multi_index((spec.shape[0] - 1,) + (0,) * (len(spec.shape) - 1), spec.shape)))
    last_end, trips = np.full(n, -1), np.zeros(n)
    n_frames = n_iterations // record_every
    frames = np.zeros((n, n_frames, *pos.shape[1:]))
    owners = np.zeros((n, n_frames), dtype=np.int64)
    for it in tqdm(range(n_iterations), disable=not progress, desc="umbrella exchange", unit="iteration"):
        for k in range(n):
            for d, c in enumerate(centers[k]):
                context.setParameter(f"c_umb{d}", float(c))
            context.setPositions(pos[k] * unit.nanometer)
            context.setVelocities(vel[k] * unit.nanometer / unit.picosecond)
            context.getIntegrator().step(chunk)
            state = context.getState(getPositions=True, getVelocities=True)
            pos[k] = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            vel[k] = state.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond)
        if (it + 1) % record_every == 0:
            frames[:, (it + 1) // record_every - 1] = pos
            owners[:, (it + 1) // record_every - 1] = replica
        values = evaluate_cvs(pos, spec.cvs)
        bias = grid.bias_kT(np.stack([values[cv.name] for cv in spec.cvs], axis=1)).T  # [config, window]
        s = it % len(pair_sets)
        pairs = pair_sets[s]
        swap = exchange(bias, pairs, rng)
        a, b = pairs[swap, 0], pairs[swap, 1]
        pos[a], pos[b] = pos[b].copy(), pos[a].copy()
        vel[a], vel[b] = vel[b].copy(), vel[a].copy()
        replica[a], replica[b] = replica[b].copy(), replica[a].copy()
        accepted[offsets[s]:offsets[s + 1]] += swap
        attempts[offsets[s]:offsets[s + 1]] += 1
        for end_index, window in enumerate(ends):
            r = replica[window]
            if last_end[r] == 1 - end_index:
                trips[r] += 0.5
            last_end[r] = end_index
    with np.errstate(invalid="ignore"):
        stats = ExchangeStats(all_pairs, accepted / attempts, attempts, np.floor(trips))
    return frames, owners, stats


def run_window_exchange(system: openmm.System, topology: app.Topology, positions_nm: np.ndarray,
                        spec: WindowGridSpec, *, steps_per_window: int, exchange_every: int, equilibration_steps: int,
                        temperature_K: float, seed: int, out_dir: Path, timestep_fs: float = 1.0,
                        friction_per_ps: float = 1.0, report_every: int = 100, platform: str = "Reference",
                        progress: bool = True) -> tuple[WindowGridRun, ExchangeStats]:
    """Umbrella sampling on the grid ``spec`` with exchanges between neighbouring windows.

    Arguments as in :func:`~boltzgen.simulation.umbrella_grid.run_window_grid` (positions ``[n_atoms,
    3]`` nm, springs kJ/mol per unit squared, times in steps); ``exchange_every`` (steps) is the time
    between exchange attempts, and one of ``exchange_every`` and ``report_every`` must divide the
    other. The seeding walk is the grid's; production runs ``steps_per_window`` in every window.
    The frames and statistics go to ``out_dir/exchange.npz``, reused by a call with the same
    settings (an interrupted run starts again). Returns the :class:`WindowGridRun` (its ``windows``
    are :class:`ExchangeWindow`) and the :class:`ExchangeStats`.
    """
    chunk = min(exchange_every, report_every)
    if max(exchange_every, report_every) % chunk or steps_per_window % max(exchange_every, report_every) \
            or equilibration_steps % report_every or steps_per_window <= 0:
        raise ValueError(f"steps_per_window ({steps_per_window}) must be a positive multiple of exchange_every "
                         f"({exchange_every}) and report_every ({report_every}), one of which divides the other; "
                         f"equilibration_steps ({equilibration_steps}) a multiple of report_every")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = md_settings(temperature_K, timestep_fs, friction_per_ps, report_every, platform)
    seeds, seed_steps, seed_wall = window_starts(system, positions_nm, spec, md, equilibration_steps, seed, out_dir,
                                                 progress)
    key = _fingerprint(openmm.XmlSerializer.serialize(system), seeds.tolist(), spec.centers.tolist(), list(spec.k),
                       [cv.__dict__ for cv in spec.cvs], md, steps_per_window, exchange_every, seed)
    path = out_dir / "exchange.npz"
    saved = _load(path, key)
    if saved is None:
        started = time.perf_counter()
        grid = WindowGrid(spec.centers, np.asarray(spec.k) / kT_kJ_per_mol(temperature_K),
                          [cv.periodic for cv in spec.cvs])
        context = _context(system, spec, md, seed)
        frames, owners, stats = _simulate(context, spec, grid, seeds, steps_per_window // chunk, chunk,
                                          report_every // chunk, seed, progress)
        del context
        saved = dict(key=key, frames=frames, owners=owners, wall=time.perf_counter() - started,
                     **{f"stats_{f}": getattr(stats, f) for f in ExchangeStats.__dataclass_fields__})
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **saved)
        os.replace(tmp, path)
    stats = ExchangeStats(**{f: saved[f"stats_{f}"] for f in ExchangeStats.__dataclass_fields__})
    n = len(spec.centers)
    wall = float(saved["wall"])
    windows = tuple(ExchangeWindow(saved["frames"][k], saved["owners"][k], int(steps_per_window), wall / n)
                    for k in range(n))
    values = tuple(np.stack([v[cv.name] for cv in spec.cvs], axis=1)
                   for v in (evaluate_cvs(w.positions_nm, spec.cvs) for w in windows))
    run = WindowGridRun(centers=spec.centers, k=np.asarray(spec.k, dtype=np.float64), windows=windows, values=values,
                        energy_evaluations=int(seed_steps + n * steps_per_window),
                        seeding_energy_evaluations=int(seed_steps), wall_seconds=float(seed_wall + wall))
    return run, stats


def _load(path: Path, key: str) -> dict[str, Any] | None:
    """The saved run at ``path`` when its settings fingerprint is ``key``, else None."""
    if not path.is_file():
        return None
    with np.load(path) as data:
        if str(data["key"]) != key:
            return None
        return {name: data[name] for name in data.files}


def exchange_summary(stats: ExchangeStats, exchange_every: int) -> dict[str, Any]:
    """The exchange statistics as JSON-ready numbers for the summary's ``windows``."""
    acc = stats.acceptance
    return {"exchange_every_steps": int(exchange_every), "acceptance": [float(a) for a in acc],
            "acceptance_min": float(np.nanmin(acc)) if np.isfinite(acc).any() else math.nan,
            "attempts_per_pair": [int(a) for a in stats.attempts], "round_trips": [int(t) for t in stats.round_trips],
            "round_trips_total": int(np.sum(stats.round_trips))}
