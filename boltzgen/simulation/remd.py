"""Temperature replica exchange (parallel tempering) with openmmtools.

:func:`run_replica_exchange` runs openmmtools' ``ParallelTemperingSampler`` on an OpenMM system:
one replica per temperature of a ladder, each iteration ``steps_per_exchange`` Langevin steps
(``LangevinMiddleIntegrator``, velocities drawn afresh from the Maxwell-Boltzmann distribution at
the replica's temperature before each segment, so that the exchange criterion on potential
energies alone is exact) followed by exchange attempts between neighbouring temperatures. Its
netCDF storage holds every iteration's reduced potentials of every replica at every temperature,
the positions and the exchange statistics, and the checkpoints a resumed run starts from.
:func:`run_replica_exchange` reads them back as a :class:`RemdResult` for the package's own MBAR
(:mod:`boltzgen.estimators.remd`).

Everything here is in OpenMM's units (nm, kJ/mol, K) except the reduced potentials, which are
``U / kT_k`` (kT of each ladder temperature), as openmmtools stores them. A run is reproducible
for a given seed (integrator noise, velocities and exchanges are seeded); a resumed run continues
from the last checkpoint with the seed and the iteration, so it is a valid continuation but not
bit for bit the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import netCDF4
import numpy as np
import openmm
from openmm import unit
from tqdm.auto import tqdm

from boltzgen.estimators.free_energy import import_pymbar

import_pymbar()  # before openmmtools imports it: without the JAX banner and the timeseries warning
with contextlib.redirect_stdout(io.StringIO()):  # openmmtools prints citations on stdout
    import openmmtools  # noqa: E402
    from openmmtools import cache, mcmc, multistate, states  # noqa: E402
logging.getLogger("openmmtools").setLevel(logging.ERROR)  # its "API is experimental" on every object

#: What runs the replica exchange, as the summaries name it.
ENGINE = f"openmmtools {openmmtools.__version__} ParallelTemperingSampler (swap-neighbors)"

#: The key under which the run's identity is stored in the netCDF file.
_RUN_KEY = "boltzgen_run"
#: The key of the wall time of all sessions so far (s).
_WALL_KEY = "boltzgen_wall_seconds"


@dataclass(frozen=True, eq=False)
class RemdResult:
    """A finished replica exchange run, ``T`` iterations of ``R = K`` replicas at ``K`` temperatures.

    ``temperatures_K`` ``[K]`` increasing (K). ``reduced_potentials`` ``[T, R, K]`` float64: replica
    ``r``'s configuration after iteration ``t + 1`` in state ``k``, ``U / kT_k``. ``states`` ``[T, R]``
    int: the state replica ``r`` was in during iteration ``t + 1``. ``positions_nm`` ``[T, R, n_atoms, 3]``
    float32 (nm). ``n_accepted`` and ``n_proposed`` ``[K, K]``: exchanges from state i to j over the
    ``T`` iterations. ``energy_evaluations``: force evaluations of the dynamics plus one energy per
    replica and iteration; ``wall_seconds`` over all sessions (s); ``storage`` the netCDF file.
    """

    temperatures_K: np.ndarray
    reduced_potentials: np.ndarray
    states: np.ndarray
    positions_nm: np.ndarray
    n_accepted: np.ndarray
    n_proposed: np.ndarray
    steps_per_exchange: int
    energy_evaluations: int
    wall_seconds: float
    storage: Path

    @property
    def iterations(self) -> int:
        return int(self.states.shape[0])


class SeededLangevinMove(mcmc.LangevinDynamicsMove):
    """openmmtools' Langevin dynamics move with a seeded integrator, and velocities drawn before each
    segment with seeds from numpy's global generator, which :func:`run_replica_exchange` seeds
    (openmmtools draws its exchanges from it too). openmmtools stores the move in its netCDF file by
    module and class name and rebuilds it on resume."""

    def __init__(self, seed: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed = int(seed)

    def _get_integrator(self, thermodynamic_state: Any) -> openmm.Integrator:
        integrator = super()._get_integrator(thermodynamic_state)
        integrator.setRandomNumberSeed(self.seed)
        return integrator

    def _before_integration(self, context: openmm.Context, thermodynamic_state: Any) -> None:
        context.setVelocitiesToTemperature(thermodynamic_state.temperature, int(np.random.randint(1, 2**31 - 1)))

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "seed": self.seed}

    def __setstate__(self, serialization: dict[str, Any]) -> None:
        serialization = dict(serialization)
        self.seed = int(serialization.pop("seed", 1))
        super().__setstate__(serialization)


def repartition_hydrogen_mass(system: openmm.System, bonds: Sequence[tuple[int, int]], hydrogens: Sequence[int],
                              mass_amu: float) -> openmm.System:
    """A copy of ``system`` in which each of the ``hydrogens`` (atom indices) has mass ``mass_amu``
    (amu), the difference taken from the atom it is bonded to (``bonds``: index pairs), so the total
    mass stays; the potential, and with it the distribution of configurations, is unchanged."""
    heavy_of = {}
    hydrogen_set = set(int(h) for h in hydrogens)
    for a, b in bonds:
        if int(a) in hydrogen_set and int(b) not in hydrogen_set:
            heavy_of[int(a)] = int(b)
        elif int(b) in hydrogen_set and int(a) not in hydrogen_set:
            heavy_of[int(b)] = int(a)
    copy = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    for h, heavy in heavy_of.items():
        shift = mass_amu - copy.getParticleMass(h).value_in_unit(unit.dalton)
        heavy_mass = copy.getParticleMass(heavy).value_in_unit(unit.dalton) - shift
        if heavy_mass < 1.0:
            raise ValueError(f"atom {heavy} would keep {heavy_mass:.3g} amu after giving its hydrogens "
                             f"{mass_amu:g} amu each; lower hydrogen_mass_amu")
        copy.setParticleMass(h, mass_amu)
        copy.setParticleMass(heavy, heavy_mass)
    return copy


def _identity(system: openmm.System, positions_nm: np.ndarray, settings: dict[str, Any]) -> str:
    """SHA-256 of the system, the start positions and the settings that fix the run (not its length)."""
    h = hashlib.sha256()
    h.update(openmm.XmlSerializer.serialize(system).encode())
    h.update(np.ascontiguousarray(positions_nm, dtype=np.float64).tobytes())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def _checkpoint_path(storage: Path) -> Path:
    """openmmtools' default checkpoint file beside ``storage``: ``<stem>_checkpoint.nc``."""
    return storage.with_name(storage.stem + "_checkpoint.nc")


def _open_sampler(storage: Path, identity: str, create: Any, resume: bool, reporter: Any) -> tuple[Any, float]:
    """The sampler of an existing storage of the same run (``resume``) through ``reporter``, or
    ``create()``'s fresh one; also returns the wall time of the earlier sessions (s)."""
    if resume and storage.exists():
        stored, wall = _stored_run(storage)
        if stored is not None and stored.get("identity") != identity:
            raise ValueError(f"{storage} belongs to a different replica exchange run (system, start, ladder or "
                             "settings differ); delete it and its checkpoint file, or write elsewhere with --out")
        if stored is not None:
            with contextlib.redirect_stdout(io.StringIO()):
                sampler = multistate.ParallelTemperingSampler.from_storage(reporter)
            return sampler, wall
    for path in (storage, _checkpoint_path(storage)):
        path.unlink(missing_ok=True)
    return create(), 0.0


def _stored_run(storage: Path) -> tuple[dict[str, Any] | None, float]:
    """The run settings and the wall time so far (s) that :func:`run_replica_exchange` stored in
    ``storage``; ``(None, 0.0)`` for a file without them (not ours, or killed before they were written)."""
    try:  # openmmtools retries opening a bad file for seconds; netCDF4 says at once
        netCDF4.Dataset(str(storage), "r").close()
        reporter = multistate.MultiStateReporter(str(storage), open_mode="r")
    except Exception:  # netCDF4 raises OSError or its own types for an unreadable file
        return None, 0.0
    try:
        return dict(reporter.read_dict(_RUN_KEY)), float(reporter.read_dict(_WALL_KEY)["seconds"])
    except Exception:
        return None, 0.0
    finally:
        reporter.close()


def _read_result(storage: Path, iterations: int, steps: int, wall: float) -> RemdResult:
    """Iterations ``1 .. iterations`` of the storage as a :class:`RemdResult`."""
    reporter = multistate.MultiStateReporter(str(storage), open_mode="r")
    done = slice(1, iterations + 1)  # iteration 0 is the start, before any dynamics
    try:
        ladder = [s.temperature.value_in_unit(unit.kelvin) for s in reporter.read_thermodynamic_states()[0]]
        energies = reporter.read_energies()[0][done]
        replica_states = np.asarray(reporter.read_replica_thermodynamic_states()[done], dtype=np.int64)
        accepted, proposed = reporter.read_mixing_statistics()
    finally:
        reporter.close()
    # The reporter reads positions one iteration at a time (~8 ms each); the variable whole is one read.
    with netCDF4.Dataset(str(storage), "r") as ds:
        positions = np.asarray(ds.variables["positions"][done], dtype=np.float32)
    k = len(ladder)
    return RemdResult(
        temperatures_K=np.asarray(ladder, dtype=np.float64), reduced_potentials=np.asarray(energies, dtype=np.float64),
        states=replica_states, positions_nm=positions, n_accepted=np.asarray(accepted[done]).sum(axis=0),
        n_proposed=np.asarray(proposed[done]).sum(axis=0), steps_per_exchange=int(steps),
        energy_evaluations=int(iterations * k * (steps + 1) + k),
        wall_seconds=float(wall), storage=storage,
    )


def _advance(sampler: Any, reporter: Any, iterations: int, seed: int, wall: float, chunk: int, progress: bool) -> float:
    """Run ``sampler`` until it has done ``iterations`` iterations, ``chunk`` at a time, recording the
    wall time of all sessions in the storage after each chunk; returns that wall time (s).

    numpy's global generator (openmmtools' exchanges and the velocity seeds) is seeded from ``seed``
    and the iteration the session starts at, and restored afterwards.
    """
    saved = np.random.get_state()
    np.random.seed(int(np.random.SeedSequence([seed, int(sampler.iteration)]).generate_state(1)[0]))
    try:
        with tqdm(total=iterations, initial=min(int(sampler.iteration), iterations), disable=not progress,
                  unit="iteration", desc="REMD") as bar:
            while sampler.iteration < iterations:
                n = min(chunk, iterations - int(sampler.iteration))
                started = time.perf_counter()
                sampler.extend(n)
                wall += time.perf_counter() - started
                reporter.write_dict(_WALL_KEY, {"seconds": float(wall)})
                bar.update(n)
    finally:
        np.random.set_state(saved)
    return wall


def run_replica_exchange(
    system: openmm.System,
    positions_nm: np.ndarray,
    temperatures_K: Sequence[float],
    *,
    steps_per_exchange: int,
    iterations: int,
    storage: Path,
    timestep_fs: float = 1.0,
    friction_per_ps: float = 1.0,
    platform: str = "Reference",
    platform_properties: dict[str, str] | None = None,
    seed: int = 0,
    checkpoint_every: int = 100,
    resume: bool = True,
    progress: bool = True,
) -> RemdResult:
    """Parallel tempering of ``system`` from ``positions_nm`` (``[n_atoms, 3]`` nm) at the increasing
    ``temperatures_K`` (K), with openmmtools' ``ParallelTemperingSampler``, stored in ``storage``.

    Each of ``iterations`` iterations: ``steps_per_exchange`` steps of ``timestep_fs`` (fs) with friction
    ``friction_per_ps`` (1/ps) per replica on the OpenMM ``platform``, then exchanges between neighbouring
    temperatures (openmmtools' ``swap-neighbors``). Checkpoints every ``checkpoint_every`` iterations.
    With ``resume``, a storage of the same run (system, start, ladder and settings; else ValueError)
    continues from its last checkpoint, or is read as it is when it already holds ``iterations``;
    otherwise an existing storage is replaced. Returns the :class:`RemdResult` of iterations
    ``1 .. iterations``; raises ``RuntimeError`` when the dynamics produce NaN.
    """
    temps = np.asarray(temperatures_K, dtype=np.float64)
    if temps.ndim != 1 or temps.size < 2 or np.any(np.diff(temps) <= 0) or temps[0] <= 0:
        raise ValueError(f"temperatures_K must be at least 2 increasing positive temperatures, got {temps.tolist()}")
    if steps_per_exchange < 1 or iterations < 1 or checkpoint_every < 1:
        raise ValueError("steps_per_exchange, iterations and checkpoint_every must be positive")
    storage, positions = Path(storage), np.asarray(positions_nm, dtype=np.float64)
    settings = {"temperatures_K": temps.tolist(), "steps_per_exchange": int(steps_per_exchange), "seed": int(seed),
                "timestep_fs": float(timestep_fs), "friction_per_ps": float(friction_per_ps), "platform": platform}
    identity = _identity(system, positions, settings)
    reporter = multistate.MultiStateReporter(str(storage), checkpoint_interval=checkpoint_every,
                                             analysis_particle_indices=list(range(system.getNumParticles())),
                                             velocity_interval=0)  # velocities are drawn afresh every iteration

    def create() -> Any:
        move = SeededLangevinMove(seed=1 + int(seed) % (2**31 - 2), timestep=timestep_fs * unit.femtosecond,
                                  collision_rate=friction_per_ps / unit.picosecond, n_steps=int(steps_per_exchange),
                                  reassign_velocities=False)
        sampler = multistate.ParallelTemperingSampler(mcmc_moves=move, number_of_iterations=int(iterations),
                                                      online_analysis_interval=None,
                                                      replica_mixing_scheme="swap-neighbors")
        reference = states.ThermodynamicState(system, temperature=temps[0] * unit.kelvin)
        with contextlib.redirect_stdout(io.StringIO()):
            # openmmtools 0.27 sizes the ladder by n_temperatures even when it gets the list.
            sampler.create(reference, states.SamplerState(positions * unit.nanometer), reporter,
                           temperatures=[t * unit.kelvin for t in temps], n_temperatures=int(temps.size))
        reporter.write_dict(_RUN_KEY, {"identity": identity, **settings})
        reporter.write_dict(_WALL_KEY, {"seconds": 0.0})
        return sampler

    sampler, wall = _open_sampler(storage, identity, create, resume, reporter)
    context_cache = cache.ContextCache(platform=openmm.Platform.getPlatformByName(platform),
                                       platform_properties=platform_properties or None)
    sampler.energy_context_cache = context_cache
    sampler.sampler_context_cache = context_cache
    try:
        wall = _advance(sampler, reporter, iterations, seed, wall, checkpoint_every, progress)
    except multistate.utils.SimulationNaNError as exc:
        raise RuntimeError(f"replica exchange: the energy became NaN ({exc}); lower remd.timestep_fs") from None
    finally:
        reporter.close()
        del sampler
    return _read_result(storage, iterations, steps_per_exchange, wall)
