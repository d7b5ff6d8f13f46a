"""Harmonic umbrella windows on a grid of one or two CVs with OpenMM: the biased baseline that needs
no flat direction, e.g. windows on (phi, psi) together.

:func:`run_window_grid` runs it in two passes. The seeding pass walks the grid outward from the
window nearest the start configuration (a breadth-first tree): each window runs
``equilibration_steps`` under its own bias from the end of its parent's, in one OpenMM context whose
window centres are global parameters, so that every window starts equilibrated near its centre
without crossing a barrier unbiased. The production pass then runs every window from its seed,
independently (in ``workers`` processes), with :func:`~boltzgen.simulation.langevin.run_langevin`:
trajectories, checkpoints and resumption as for plain MD. OpenMM's units stay here: positions in
nm, springs in kJ/mol per CV unit squared. The analysis is
:func:`boltzgen.estimators.umbrella_grid.analyze_window_grid`, in kT, by the caller.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openmm
import openmm.app as app
from openmm import unit
from tqdm.auto import tqdm

from boltzgen.cvs import CollectiveVariable, evaluate_cvs
from boltzgen.files import atomic_write_json
from boltzgen.simulation.langevin import MDResult, load_md, openmm_seed, run_langevin

_PI = "pi = 3.141592653589793"


def cv_force(cv: CollectiveVariable, energy: str) -> openmm.Force:
    """A force on ``cv``'s atoms whose energy (kJ/mol) is the OpenMM expression ``energy`` written in
    ``value``, the CV itself: the torsion ``theta`` (rad), the distance ``r`` or the coordinate (nm),
    in the custom force of the CV's kind."""
    if cv.kind == "torsion":
        force: Any = openmm.CustomTorsionForce(f"{energy}; value = theta")
        force.addTorsion(*cv.atoms, [])
    elif cv.kind == "distance":
        force = openmm.CustomBondForce(f"{energy}; value = r")
        force.addBond(*cv.atoms, [])
    else:
        force = openmm.CustomExternalForce(f"{energy}; value = {'xyz'[cv.axis]}")
        force.addParticle(cv.atoms[0], [])
    return force


def cv_bias_force(cv: CollectiveVariable, k: float, index: int, center: float = 0.0) -> openmm.Force:
    """The harmonic restraint ``0.5 k dist(cv, c)^2`` (kJ/mol) on ``cv``, centred at ``center``.

    ``k`` is in kJ/mol/rad^2 for a torsion (``dist`` the minimum image on the circle, so the bias is
    continuous across +-pi) and kJ/mol/nm^2 for a distance or coordinate. The spring and the centre
    are the global parameters ``k_umb<index>`` and ``c_umb<index>``, one pair per CV of the grid, so
    that a context can move a window by setting them.
    """
    k_name, c_name = f"k_umb{index}", f"c_umb{index}"
    if cv.kind == "torsion":
        force = cv_force(cv, f"0.5*{k_name}*min(dtheta, 2*pi - dtheta)^2; dtheta = abs(value - {c_name}); {_PI}")
    else:
        force = cv_force(cv, f"0.5*{k_name}*(value - {c_name})^2")
    force.addGlobalParameter(k_name, float(k))
    force.addGlobalParameter(c_name, float(center))
    return force


@dataclass(frozen=True, eq=False)
class WindowGridSpec:
    """The windows: one axis of centres per CV (``axes[d]`` ``[n_d]``: rad for a torsion, nm for a
    length) and one spring per CV (``k`` in kJ/mol per unit squared). Window ``i`` is the grid point
    ``np.unravel_index(i, shape)``: the last CV varies fastest."""

    cvs: tuple[CollectiveVariable, ...]
    axes: tuple[np.ndarray, ...]
    k: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(a) for a in self.axes)

    @property
    def centers(self) -> np.ndarray:
        """``[K, D]`` window centres."""
        mesh = np.meshgrid(*self.axes, indexing="ij")
        return np.stack([m.ravel() for m in mesh], axis=1).astype(np.float64)

    def forces(self, center: np.ndarray) -> list[openmm.Force]:
        return [cv_bias_force(cv, k, d, float(c)) for d, (cv, k, c) in enumerate(zip(self.cvs, self.k, center))]


def seeding_order(spec: WindowGridSpec, start_values: np.ndarray) -> list[tuple[int, int]]:
    """``(window, parent)`` pairs in breadth-first order over the grid from the window nearest
    ``start_values`` ``[D]`` (its parent is -1); neighbours differ by one step along one CV, across
    the seam for a torsion."""
    shape, centers = spec.shape, spec.centers
    scale = np.array([a[1] - a[0] for a in spec.axes])
    diff = centers - start_values
    for d, cv in enumerate(spec.cvs):
        if cv.periodic:
            diff[:, d] = np.remainder(diff[:, d] + math.pi, 2 * math.pi) - math.pi
    root = int(np.argmin(np.sum((diff / scale) ** 2, axis=1)))
    order, seen, queue = [(root, -1)], {root}, deque([root])
    while queue:
        here = queue.popleft()
        point = np.unravel_index(here, shape)
        for d, cv in enumerate(spec.cvs):
            for step in (1, -1):
                j = point[d] + step
                if cv.periodic:
                    j %= shape[d]
                elif not 0 <= j < shape[d]:
                    continue
                there = int(np.ravel_multi_index(point[:d] + (j,) + point[d + 1:], shape))
                if there not in seen:
                    seen.add(there)
                    order.append((there, here))
                    queue.append(there)
    return order


def _fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else json.dumps(part, sort_keys=True, default=float).encode())
    return h.hexdigest()


def md_settings(temperature_K: float, timestep_fs: float, friction_per_ps: float, report_every: int,
                platform: str) -> dict[str, Any]:
    """The Langevin settings every window shares, as the run's fingerprint and the workers take them."""
    return {"temperature_K": float(temperature_K), "timestep_fs": float(timestep_fs),
            "friction_per_ps": float(friction_per_ps), "report_every": int(report_every), "platform": platform}


def window_starts(system: openmm.System, positions_nm: Any, spec: WindowGridSpec, md: Mapping[str, Any],
                  equilibration_steps: int, seed: int, out_dir: Path, progress: bool) -> tuple[np.ndarray, int, float]:
    """Every window's start ``[K, n_atoms, 3]`` (nm): from the seeding walk when ``equilibration_steps``
    (cached in ``out_dir/seeds.json``), else the given positions; with the walk's steps and seconds."""
    pos0 = np.asarray(positions_nm, dtype=np.float64)
    if equilibration_steps:
        return _seed_windows(system, pos0, spec, md, equilibration_steps, seed, out_dir / "seeds.json", progress)
    return np.broadcast_to(pos0, (len(spec.centers), *pos0.shape)), 0, 0.0


def _seed_windows(system: openmm.System, positions_nm: np.ndarray, spec: WindowGridSpec, md: Mapping[str, Any],
                  steps: int, seed: int, path: Path, progress: bool) -> tuple[np.ndarray, int, float]:
    """The start of every window ``[K, n_atoms, 3]`` (nm), its cost in steps and its wall time (s);
    reused from ``path`` when it holds the seeds of the same grid, system and settings."""
    system_xml = openmm.XmlSerializer.serialize(system)
    centers = spec.centers
    key = _fingerprint(system_xml, np.asarray(positions_nm).tolist(), centers.tolist(), list(spec.k),
                       [cv.__dict__ for cv in spec.cvs], dict(md), steps, seed)
    if path.exists():
        record = json.loads(path.read_text())
        if record.get("fingerprint") == key:
            return np.asarray(record["positions_nm"], dtype=np.float64), int(record["steps"]), float(record["wall_seconds"])
    started = time.perf_counter()
    biased = openmm.XmlSerializer.deserialize(system_xml)
    for force in spec.forces(centers[0]):
        biased.addForce(force)
    temperature = md["temperature_K"] * unit.kelvin
    integrator = openmm.LangevinMiddleIntegrator(temperature, md["friction_per_ps"] / unit.picosecond,
                                                 md["timestep_fs"] * unit.femtosecond)
    integrator.setRandomNumberSeed(openmm_seed(seed, 7))
    context = openmm.Context(biased, integrator, openmm.Platform.getPlatformByName(md["platform"]))
    start = evaluate_cvs(np.asarray(positions_nm)[None], spec.cvs)
    seeds = np.zeros((len(centers), *np.shape(positions_nm)))
    order = seeding_order(spec, np.array([start[cv.name][0] for cv in spec.cvs]))
    for window, parent in tqdm(order, disable=not progress, desc="seeding windows", unit="window"):
        for d, c in enumerate(centers[window]):
            context.setParameter(f"c_umb{d}", float(c))
        context.setPositions((positions_nm if parent < 0 else seeds[parent]) * unit.nanometer)
        context.setVelocitiesToTemperature(temperature, openmm_seed(seed, 20_000 + window))
        integrator.step(steps)
        seeds[window] = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    del context
    wall = time.perf_counter() - started
    total = steps * len(centers)
    atomic_write_json(path, {"fingerprint": key, "positions_nm": seeds, "steps": total, "wall_seconds": wall})
    return seeds, total, wall


def _window_worker(job: dict[str, Any]) -> str:
    """One production window; top-level so that a 'spawn' process pool can import it. The system and
    the bias forces travel as OpenMM XML."""
    system = openmm.XmlSerializer.deserialize(job.pop("system_xml"))
    bias = [openmm.XmlSerializer.deserialize(xml) for xml in job.pop("bias_xml")]
    return str(run_langevin(system, job.pop("topology"), job.pop("positions_nm"), bias=bias, **job).h5)


@dataclass(frozen=True, eq=False)
class WindowGridRun:
    """What :func:`run_window_grid` ran: ``centers`` ``[K, D]`` (the CVs' units) and ``k`` ``[D]``
    (kJ/mol per unit squared); ``windows`` the K production runs (positions in nm, the unbiased
    potential and the bias energy in kJ/mol) and ``values`` K arrays ``[N_k, D]`` float64 of the
    biased CVs of each frame (torsions as recorded during the run, lengths from the stored frames).
    ``energy_evaluations`` counts the steps of both passes, ``seeding_energy_evaluations`` those of
    the seeding pass. ``wall_seconds``: the seeding pass plus the production windows (their sum, over
    ``workers`` when they ran in a pool, or the pool's wall time if longer), over all resumed sessions (s).
    """

    centers: np.ndarray
    k: np.ndarray
    windows: tuple[MDResult, ...]
    values: tuple[np.ndarray, ...]
    energy_evaluations: int
    seeding_energy_evaluations: int
    wall_seconds: float


def _jobs(system: openmm.System, topology: app.Topology, spec: WindowGridSpec, seeds: np.ndarray,
          md: Mapping[str, Any], steps: Sequence[int], seed: int, out_dir: Path,
          record: Mapping[str, Sequence[int]]) -> list[dict[str, Any]]:
    system_xml = openmm.XmlSerializer.serialize(system)
    jobs = []
    for i, center in enumerate(spec.centers):
        jobs.append(dict(
            system_xml=system_xml, bias_xml=[openmm.XmlSerializer.serialize(f) for f in spec.forces(center)],
            topology=topology, positions_nm=seeds[i], steps=int(steps[i]), seed=openmm_seed(seed, 1000 + i),
            out_h5=out_dir / f"window_{i:04d}.h5", checkpoint=out_dir / f"window_{i:04d}.ckpt.h5",
            checkpoint_every=max(100, int(steps[i]) // md["report_every"] // 4), resume=True,
            record_dihedrals=dict(record),
            extra_attrs={"umbrella_center": json.dumps(center.tolist()), "umbrella_k": json.dumps(list(spec.k)),
                         "umbrella_cvs": json.dumps([cv.name for cv in spec.cvs])},
            progress=False, **md,
        ))
    return jobs


def run_window_grid(system: openmm.System, topology: app.Topology, positions_nm: np.ndarray, spec: WindowGridSpec, *,
                    steps_per_window: int | Sequence[int], equilibration_steps: int, temperature_K: float, seed: int,
                    out_dir: Path,
                    record_dihedrals: Mapping[str, Sequence[int]] | None = None, timestep_fs: float = 1.0,
                    friction_per_ps: float = 1.0, report_every: int = 100, platform: str = "Reference",
                    workers: int = 1, progress: bool = True) -> WindowGridRun:
    """Umbrella sampling on the grid ``spec``: a seeding walk, then every window's production.

    ``system``, ``topology`` and ``positions_nm`` (``[n_atoms, 3]`` nm) are as in
    :func:`~boltzgen.simulation.langevin.run_langevin`, and so are the MD settings
    ``temperature_K`` (K), ``timestep_fs``, ``friction_per_ps``, ``report_every`` and ``platform``.
    Each window runs ``equilibration_steps`` in the seeding pass (not stored; 0 starts every window
    from ``positions_nm``) and ``steps_per_window`` of production (one number, or one per window),
    multiples of ``report_every``,
    seeded from ``(seed, window)``. ``record_dihedrals`` (name -> 4 atoms) are recorded besides the
    torsion CVs. ``workers`` > 1 runs the production windows in that many processes ('spawn').
    Everything goes to ``out_dir`` (``seeds.json``, ``window_<i>.h5`` with checkpoints) and is reused
    by a second call with the same settings; a larger ``steps_per_window`` extends the windows.
    """
    steps = np.broadcast_to(np.asarray(steps_per_window, dtype=np.int64), (len(spec.centers),))
    if np.any(steps <= 0) or np.any(steps % report_every) or equilibration_steps % report_every:
        raise ValueError(f"steps_per_window ({steps_per_window}) and equilibration_steps ({equilibration_steps}) "
                         f"must be multiples of report_every ({report_every}), the first positive")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = md_settings(temperature_K, timestep_fs, friction_per_ps, report_every, platform)
    seeds, seed_steps, seed_wall = window_starts(system, positions_nm, spec, md, equilibration_steps, seed, out_dir,
                                                 progress)
    record = {**(record_dihedrals or {}), **{cv.name: cv.atoms for cv in spec.cvs if cv.kind == "torsion"}}
    jobs = _jobs(system, topology, spec, seeds, md, steps, seed, out_dir, record)
    started = time.perf_counter()
    with tqdm(total=len(jobs), disable=not progress, desc="umbrella windows", unit="window") as bar:
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for future in as_completed([pool.submit(_window_worker, job) for job in jobs]):
                    future.result()
                    bar.update()
        else:
            for job in jobs:
                _window_worker(job)
                bar.update()
    pool_wall = time.perf_counter() - started
    windows = tuple(load_md(out_dir / f"window_{i:04d}.h5") for i in range(len(jobs)))
    # In a pool, the windows of earlier calls ran `workers` at a time too.
    production_wall = sum(w.wall_seconds for w in windows) / workers
    production_wall = max(pool_wall, production_wall) if workers > 1 else production_wall
    return WindowGridRun(
        centers=spec.centers, k=np.asarray(spec.k, dtype=np.float64), windows=windows,
        values=tuple(_cv_values(w, spec.cvs) for w in windows),
        energy_evaluations=int(seed_steps + sum(w.energy_evaluations for w in windows)),
        seeding_energy_evaluations=int(seed_steps), wall_seconds=float(seed_wall + production_wall),
    )


def _cv_values(window: MDResult, cvs: Sequence[CollectiveVariable]) -> np.ndarray:
    """``[T, D]`` float64: recorded torsions, lengths from the stored frames."""
    lengths = evaluate_cvs(window.positions_nm, [cv for cv in cvs if cv.kind != "torsion"])
    return np.stack([window.dihedrals_rad[cv.name] if cv.kind == "torsion" else lengths[cv.name] for cv in cvs], axis=1)
