"""OpenMM molecular dynamics: Langevin MD with checkpoints, written as an mdtraj-readable trajectory.

Everything that talks to OpenMM works in OpenMM's units (nm, ps, kJ/mol, K); results also carry
reduced energies ``u = U / kT`` (dimensionless, float64) at a target temperature, which may differ
from the thermostat's (training data from hotter MD).

:func:`run_langevin` writes its trajectory through :class:`boltzgen.trajectory.SampleWriter`, in
mdtraj's HDF5 layout, so ``mdtraj.load`` opens it and the readers of :mod:`boltzgen.trajectory`
read it. Beside the frames the file holds the per-frame energies (unbiased potential, reduced
energy, bias), the recorded dihedrals as ``<name>_rad``, the final positions, and the run settings
as root attributes; :func:`load_md` reads it back as an :class:`MDResult`. While a run goes, a
checkpoint file of its own format (OpenMM's checkpoint plus the frames so far) lets an interrupted
run continue bit for bit on the Reference platform. Umbrella sampling along a torsion is built on
this in :mod:`boltzgen.simulation.umbrella`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import openmm
import openmm.app as app
from openmm import unit
from tqdm.auto import tqdm

from boltzgen.errors import DataFileError
from boltzgen.files import atomic_path, ensure_free_space
from boltzgen.geometry import dihedrals_rad
from boltzgen.trajectory import SampleWriter, read_attributes, read_samples
from boltzgen.units import kT_kJ_per_mol, reduced_energy

# The format tag of MD files. It never changes, so that files written by earlier versions still load.
_H5_FORMAT = "boltzgen.md/1"


def openmm_seed(seed: int, stream: int) -> int:
    """A positive 31-bit seed for OpenMM derived from the integers ``seed`` and ``stream``.

    OpenMM treats seed 0 as "pick a random seed", so a user seed of 0 must never reach it.
    """
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(stream)]).generate_state(1)[0]
    return int(state % (2**31 - 2)) + 1


@dataclass(frozen=True, eq=False)
class MDResult:
    """A Langevin MD run: what :func:`run_langevin` returns and :func:`load_md` reads back.

    ``positions_nm`` holds the ``[T, n_atoms, 3]`` float32 frames (nm), one every ``report_every``
    steps; frame ``i`` is taken after ``(i + 1) * report_every`` steps (the start is not stored).
    ``time_ps`` ``[T]`` is the simulation time of each frame (ps). ``potential_energy_kJ_mol``
    ``[T]`` is the potential energy *without* any bias force (kJ/mol) and ``reduced_energy`` ``[T]``
    the same over ``kT(target_temperature_K)``; ``bias_energy_kJ_mol`` ``[T]`` is the energy of the
    bias forces (kJ/mol), or None without bias. All three are float64. ``dihedrals_rad`` maps each
    recorded dihedral's name to its ``[T]`` values (rad, in [-pi, pi]). ``final_positions_nm``
    ``[n_atoms, 3]`` float64 are the positions after the last step (nm). ``temperature_K`` is the
    thermostat's temperature and ``target_temperature_K`` the one the reduced energies refer to
    (K); ``timestep_fs`` the time step (fs) and ``steps`` the number of steps run in total.
    ``energy_evaluations`` counts the force evaluations of the dynamics, one per step; storing a
    frame costs one more energy evaluation (two with a bias), i.e. ``+1/report_every``.
    ``wall_seconds`` is the wall-clock time of the MD over all (resumed) segments (s) and ``h5``
    the path of the trajectory file.
    """

    positions_nm: np.ndarray
    time_ps: np.ndarray
    potential_energy_kJ_mol: np.ndarray
    reduced_energy: np.ndarray
    bias_energy_kJ_mol: np.ndarray | None
    dihedrals_rad: Mapping[str, np.ndarray]
    final_positions_nm: np.ndarray
    temperature_K: float
    target_temperature_K: float
    timestep_fs: float
    steps: int
    energy_evaluations: int
    wall_seconds: float
    h5: Path

    @property
    def n_frames(self) -> int:
        """Number of stored frames T."""
        return int(self.positions_nm.shape[0])


# ----------------------------------------------------------------------------------------------
# the simulated system and the run's identity
# ----------------------------------------------------------------------------------------------


def _clone_force(force: openmm.Force) -> openmm.Force:
    # System.addForce takes ownership, so a caller's Force object must never be added directly.
    return openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(force))


def _as_force_list(bias: openmm.Force | Sequence[openmm.Force] | None) -> list[openmm.Force]:
    if bias is None:
        return []
    if isinstance(bias, openmm.Force):
        return [bias]
    return list(bias)


def _prepare_system(
    system: openmm.System, bias: Sequence[openmm.Force]
) -> tuple[openmm.System, int | None, int | None]:
    """Copy ``system`` and add the ``bias`` forces to the copy, in a force group of their own.

    Returns the copy, the bitmask of the unbiased force groups and the bitmask of the bias group
    (both None without bias).
    """
    sim_system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    if not bias:
        return sim_system, None, None
    used = {sim_system.getForce(i).getForceGroup() for i in range(sim_system.getNumForces())}
    free = [g for g in range(31, -1, -1) if g not in used]
    if not free:
        raise ValueError("all 32 force groups are in use; no group left for the bias")
    bias_group = free[0]
    for force in bias:
        clone = _clone_force(force)
        clone.setForceGroup(bias_group)
        sim_system.addForce(clone)
    bias_mask = 1 << bias_group
    return sim_system, 0xFFFFFFFF & ~bias_mask, bias_mask


def _fingerprint(system_xml: str, positions_nm: np.ndarray, params: Mapping[str, Any]) -> str:
    """SHA-256 of the simulated system, the start positions and the MD settings: a run's identity."""
    h = hashlib.sha256()
    h.update(system_xml.encode())
    h.update(np.ascontiguousarray(positions_nm, dtype=np.float64).tobytes())
    h.update(json.dumps(dict(params), sort_keys=True).encode())
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class _Plan:
    """What one run needs beside the OpenMM objects: its length, checkpointing, force-group masks
    (None without bias), the dihedrals to record (name -> 4 atoms) and the target temperature (K)."""

    steps: int
    report_every: int
    checkpoint: Path | None
    checkpoint_every: int
    fingerprint: str
    start_positions_nm: np.ndarray
    unbiased_mask: int | None
    bias_mask: int | None
    dihedrals: Mapping[str, tuple[int, ...]]
    target_temperature_K: float

    @property
    def n_frames(self) -> int:
        return self.steps // self.report_every


# ----------------------------------------------------------------------------------------------
# checkpoints (their own HDF5 format, written beside the trajectory while a run goes)
# ----------------------------------------------------------------------------------------------


@dataclass
class _Progress:
    """Mutable per-run buffers (frames so far) shared by the MD loop and the checkpoint writer."""

    positions: list[np.ndarray] = field(default_factory=list)
    potential: list[float] = field(default_factory=list)
    bias: list[float] = field(default_factory=list)
    wall_before: float = 0.0


def _save_checkpoint(
    path: Path,
    context: openmm.Context,
    buf: _Progress,
    fingerprint: str,
    step: int,
    wall: float,
    start_positions_nm: np.ndarray,
) -> None:
    positions = np.asarray(buf.positions, dtype=np.float32).reshape(len(buf.positions), -1, 3)
    with atomic_path(path) as tmp:
        ensure_free_space(path, 2 * positions.nbytes + 16 * len(buf.potential))
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = _H5_FORMAT + "/checkpoint"
            f.attrs["fingerprint"] = fingerprint
            f.attrs["step"] = int(step)
            f.attrs["wall_seconds"] = float(wall)
            f.create_dataset("openmm_checkpoint", data=np.frombuffer(context.createCheckpoint(), dtype=np.uint8))
            f.create_dataset("positions_nm", data=positions)
            f.create_dataset("potential_energy_kJ_mol", data=np.asarray(buf.potential, dtype=np.float64))
            f.create_dataset("bias_energy_kJ_mol", data=np.asarray(buf.bias, dtype=np.float64))
            f.create_dataset("start_positions_nm", data=np.asarray(start_positions_nm, dtype=np.float64))


def checkpoint_start_positions(path: Path) -> np.ndarray | None:
    """Start positions ``[n_atoms, 3]`` (nm) of the run the checkpoint ``path`` belongs to, or None.

    Passing them back to :func:`run_langevin` with ``resume=True`` continues (or extends) that
    run even when the caller would now start elsewhere.
    """
    path = Path(path)
    if not path.exists():
        return None
    with h5py.File(path, "r") as f:
        return f["start_positions_nm"][...] if "start_positions_nm" in f else None


def _load_checkpoint(path: Path, fingerprint: str) -> tuple[bytes, _Progress, int]:
    with h5py.File(path, "r") as f:
        if f.attrs.get("fingerprint") != fingerprint:
            raise DataFileError(
                f"{path}: this MD checkpoint belongs to a different run (system, start positions or MD "
                "settings differ); delete it to run that MD afresh, or train into a new --out"
            )
        blob = f["openmm_checkpoint"][...].tobytes()
        buf = _Progress(
            positions=list(f["positions_nm"][...]),
            potential=list(f["potential_energy_kJ_mol"][...]),
            bias=list(f["bias_energy_kJ_mol"][...]),
            wall_before=float(f.attrs["wall_seconds"]),
        )
        step = int(f.attrs["step"])
    return blob, buf, step


# ----------------------------------------------------------------------------------------------
# the trajectory file
# ----------------------------------------------------------------------------------------------


def load_md(path: Path) -> MDResult:
    """Read the trajectory file ``path`` written by :func:`run_langevin` as an :class:`MDResult`.

    A file that :func:`run_langevin` did not write raises :class:`~boltzgen.errors.DataFileError`.
    """
    path = Path(path)
    a = read_attributes(path)
    if a.get("format") != _H5_FORMAT:
        raise DataFileError(f"{path}: not an MD trajectory written by boltzgen's run_langevin")
    names = json.loads(a["dihedral_names"])
    data = read_samples(path)  # every dataset: the bias energies are there only for a biased run
    return MDResult(
        positions_nm=data["x"].reshape(len(data["x"]), -1, 3).astype(np.float32),
        time_ps=data["time_ps"],
        potential_energy_kJ_mol=data["potential_energy_kJ_mol"],
        reduced_energy=data["reduced_energy"],
        bias_energy_kJ_mol=data.get("bias_energy_kJ_mol"),
        dihedrals_rad={n: data[f"{n}_rad"] for n in names},
        final_positions_nm=data["final_positions_nm"],
        temperature_K=float(a["temperature_K"]),
        target_temperature_K=float(a["target_temperature_K"]),
        timestep_fs=float(a["timestep_fs"]),
        steps=int(a["steps"]),
        energy_evaluations=int(a["energy_evaluations"]),
        wall_seconds=float(a["wall_seconds"]),
        h5=path,
    )


def _complete_output(out_h5: Path, plan: _Plan) -> MDResult | None:
    """The existing output ``out_h5`` if it is the finished result of this very run, else None."""
    if not out_h5.exists():
        return None
    try:
        a = read_attributes(out_h5)
    except DataFileError:
        return None
    ok = (
        a.get("format") == _H5_FORMAT
        and a.get("fingerprint") == plan.fingerprint
        and int(a.get("steps", -1)) == plan.steps
        and float(a.get("target_temperature_K", -1.0)) == plan.target_temperature_K
    )
    return load_md(out_h5) if ok else None


def _output_attributes(params: Mapping[str, Any], plan: _Plan, result: MDResult) -> dict[str, Any]:
    """Root attributes of the trajectory file: the MD settings, the run's identity and its cost."""
    return {
        "format": _H5_FORMAT,
        **{k: v for k, v in params.items() if k != "platform_properties"},
        "fingerprint": plan.fingerprint,
        "steps": int(plan.steps),
        "target_temperature_K": plan.target_temperature_K,
        "energy_evaluations": int(result.energy_evaluations),
        "wall_seconds": float(result.wall_seconds),
        "kT_kJ_per_mol": kT_kJ_per_mol(plan.target_temperature_K),
        "dihedral_names": json.dumps(list(plan.dihedrals)),
        "dihedral_atoms": json.dumps(dict(plan.dihedrals)),
    }


def _write_trajectory(result: MDResult, topology: app.Topology, attrs: Mapping[str, Any]) -> None:
    """Write ``result`` to ``result.h5`` through :class:`SampleWriter`, with root attributes ``attrs``."""
    # Per-frame [T] datasets. "time" (ps) and "potentialEnergy" (kJ/mol) are mdtraj's own float32
    # fields; the float64 copies are what load_md reads back.
    per_frame: dict[str, np.ndarray] = {
        "time": result.time_ps,
        "potentialEnergy": result.potential_energy_kJ_mol,
        "potential_energy_kJ_mol": result.potential_energy_kJ_mol,
        "reduced_energy": result.reduced_energy,
        "time_ps": result.time_ps,
    }
    if result.bias_energy_kJ_mol is not None:
        per_frame["bias_energy_kJ_mol"] = result.bias_energy_kJ_mol
    for name, values in result.dihedrals_rad.items():
        per_frame[f"{name}_rad"] = values
    xyz = result.positions_nm
    with SampleWriter(
        result.h5, xyz.shape[1] * 3, extras=tuple(per_frame), topology=topology, attrs=dict(attrs),
        expected_frames=len(xyz),
    ) as writer:
        writer.append(xyz.reshape(len(xyz), -1), **per_frame)
        writer.add_dataset("final_positions_nm", result.final_positions_nm)


def _frames_result(
    buf: _Progress, plan: _Plan, params: Mapping[str, Any], final_positions_nm: np.ndarray, wall: float, out_h5: Path
) -> MDResult:
    """The :class:`MDResult` of the frames collected in ``buf``."""
    n = plan.n_frames
    xyz = np.asarray(buf.positions, dtype=np.float32).reshape(n, -1, 3)
    potential = np.asarray(buf.potential, dtype=np.float64)
    return MDResult(
        positions_nm=xyz,
        time_ps=(np.arange(1, n + 1, dtype=np.float64) * plan.report_every * params["timestep_fs"]) / 1000.0,
        potential_energy_kJ_mol=potential,
        reduced_energy=reduced_energy(potential, plan.target_temperature_K),
        bias_energy_kJ_mol=np.asarray(buf.bias, dtype=np.float64) if plan.bias_mask is not None else None,
        dihedrals_rad={name: dihedrals_rad(xyz, [atoms])[..., 0] for name, atoms in plan.dihedrals.items()},
        final_positions_nm=np.asarray(final_positions_nm, dtype=np.float64),
        temperature_K=params["temperature_K"],
        target_temperature_K=plan.target_temperature_K,
        timestep_fs=params["timestep_fs"],
        steps=int(plan.steps),
        energy_evaluations=int(plan.steps),
        wall_seconds=float(wall),
        h5=out_h5,
    )


# ----------------------------------------------------------------------------------------------
# the MD loop
# ----------------------------------------------------------------------------------------------


def _open_context(system: openmm.System, params: Mapping[str, Any], positions_nm: np.ndarray) -> openmm.Context:
    """An OpenMM context with a seeded Langevin integrator, at ``positions_nm`` with seeded velocities."""
    temperature = params["temperature_K"] * unit.kelvin
    integrator = openmm.LangevinMiddleIntegrator(
        temperature, params["friction_per_ps"] / unit.picosecond, params["timestep_fs"] * unit.femtosecond
    )
    integrator.setRandomNumberSeed(openmm_seed(params["seed"], 0))
    platform = openmm.Platform.getPlatformByName(params["platform"])
    context = openmm.Context(system, integrator, platform, dict(params["platform_properties"]))
    context.setPositions(positions_nm * unit.nanometer)
    context.setVelocitiesToTemperature(temperature, openmm_seed(params["seed"], 1))
    return context


def _restore(context: openmm.Context, plan: _Plan, resume: bool) -> tuple[_Progress, int]:
    """The frames so far and the step count: from the plan's checkpoint when resuming, else empty."""
    if not (resume and plan.checkpoint is not None and plan.checkpoint.exists()):
        return _Progress(), 0
    blob, buf, step = _load_checkpoint(plan.checkpoint, plan.fingerprint)
    if step > plan.steps:
        raise ValueError(f"checkpoint {plan.checkpoint} is at step {step}, beyond the requested {plan.steps}")
    context.loadCheckpoint(blob)
    return buf, step


def _record_frame(context: openmm.Context, plan: _Plan, buf: _Progress, step: int) -> None:
    """Append the current positions, unbiased potential energy and bias energy to ``buf``."""
    groups = {} if plan.unbiased_mask is None else {"groups": plan.unbiased_mask}
    state = context.getState(getPositions=True, getEnergy=True, **groups)
    pot = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    if not math.isfinite(pot):
        raise RuntimeError(f"potential energy became {pot} at step {step}; reduce timestep_fs or minimize first")
    buf.positions.append(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    buf.potential.append(pot)
    if plan.bias_mask is not None:
        b_state = context.getState(getEnergy=True, groups=plan.bias_mask)
        buf.bias.append(b_state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))


def _integrate(
    context: openmm.Context,
    plan: _Plan,
    buf: _Progress,
    step: int,
    progress: bool,
    on_frame: Callable[[int, int], None] | None,
) -> float:
    """Run from ``step`` until ``buf`` holds all frames; returns the wall time of all segments (s)."""
    integrator = context.getIntegrator()
    n_total = plan.n_frames
    t_start = time.perf_counter()
    with tqdm(total=plan.steps, initial=step, disable=not progress, unit="step", unit_scale=True, desc="MD") as bar:
        while len(buf.positions) < n_total:
            integrator.step(plan.report_every)
            step += plan.report_every
            _record_frame(context, plan, buf, step)
            bar.update(plan.report_every)
            n_done = len(buf.positions)
            if plan.checkpoint is not None and (n_done % plan.checkpoint_every == 0 or n_done == n_total):
                wall = buf.wall_before + time.perf_counter() - t_start
                _save_checkpoint(plan.checkpoint, context, buf, plan.fingerprint, step, wall, plan.start_positions_nm)
            if on_frame is not None:
                on_frame(n_done, n_total)
    return buf.wall_before + time.perf_counter() - t_start


def _simulate(
    system: openmm.System,
    params: Mapping[str, Any],
    plan: _Plan,
    resume: bool,
    progress: bool,
    on_frame: Callable[[int, int], None] | None,
) -> tuple[_Progress, np.ndarray, float]:
    """Run the MD of ``plan``; returns the frames, the final positions ``[n_atoms, 3]`` (nm) and the wall time (s)."""
    context = _open_context(system, params, plan.start_positions_nm)
    try:
        buf, step = _restore(context, plan, resume)
        wall = _integrate(context, plan, buf, step, progress, on_frame)
        final = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    finally:
        del context
    return buf, final, wall


def _make_plan(
    sim_system: openmm.System,
    positions_nm: np.ndarray,
    params: Mapping[str, Any],
    masks: tuple[int | None, int | None],
    *,
    steps: int,
    checkpoint: Path | None,
    checkpoint_every: int,
    record_dihedrals: Mapping[str, Sequence[int]] | None,
    target_temperature_K: float,
) -> _Plan:
    """Check the run's arguments and gather them, with the run's fingerprint, into a :class:`_Plan`."""
    report_every = params["report_every"]
    if steps <= 0 or report_every <= 0 or steps % report_every:
        raise ValueError(f"steps ({steps}) must be a positive multiple of report_every ({report_every})")
    if checkpoint_every <= 0:
        raise ValueError("checkpoint_every must be positive")
    pos0 = np.asarray(positions_nm, dtype=np.float64)
    if pos0.shape != (sim_system.getNumParticles(), 3):
        raise ValueError(f"positions_nm must be [{sim_system.getNumParticles()}, 3], got {pos0.shape}")
    return _Plan(
        steps=int(steps),
        report_every=int(report_every),
        checkpoint=None if checkpoint is None else Path(checkpoint),
        checkpoint_every=int(checkpoint_every),
        fingerprint=_fingerprint(openmm.XmlSerializer.serialize(sim_system), pos0, params),
        start_positions_nm=pos0,
        unbiased_mask=masks[0],
        bias_mask=masks[1],
        dihedrals={str(k): tuple(int(i) for i in v) for k, v in (record_dihedrals or {}).items()},
        target_temperature_K=float(target_temperature_K),
    )


def run_langevin(
    system: openmm.System,
    topology: app.Topology,
    positions_nm: np.ndarray,
    *,
    temperature_K: float,
    steps: int,
    report_every: int,
    seed: int,
    out_h5: Path,
    timestep_fs: float = 1.0,
    friction_per_ps: float = 1.0,
    platform: str = "Reference",
    platform_properties: Mapping[str, str] | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 1000,
    resume: bool = False,
    target_temperature_K: float | None = None,
    bias: openmm.Force | Sequence[openmm.Force] | None = None,
    record_dihedrals: Mapping[str, Sequence[int]] | None = None,
    extra_attrs: Mapping[str, Any] | None = None,
    progress: bool = True,
    on_frame: Callable[[int, int], None] | None = None,
) -> MDResult:
    """Langevin MD (``LangevinMiddleIntegrator``) of a copy of ``system`` from ``positions_nm``
    (``[n_atoms, 3]`` nm), written to the trajectory ``out_h5`` with ``topology``.

    Runs ``steps`` steps of ``timestep_fs`` (fs) at ``temperature_K`` (K) with friction
    ``friction_per_ps`` (1/ps) on the OpenMM ``platform`` (with ``platform_properties``). Frame
    ``i`` is the state after ``(i + 1) * report_every`` steps; ``steps`` must be a multiple of
    ``report_every``. Velocities and the integrator's noise are seeded from ``seed``, so a run is
    reproducible bit for bit on the Reference platform. Reduced energies refer to
    ``target_temperature_K`` (default ``temperature_K``). ``bias`` forces are added for the
    simulation only, in a force group of their own: stored potential energies exclude them and
    their energy is stored apart. ``record_dihedrals`` maps names to 4 atom indices. ``extra_attrs``
    are added to the file's root attributes.

    With a ``checkpoint`` path the frames so far and OpenMM's state are saved every
    ``checkpoint_every`` frames. With ``resume``, a finished ``out_h5`` of the same run is loaded
    and returned, and an existing checkpoint is continued: its run must have the same system,
    start positions and MD settings (else ValueError), and a larger ``steps`` extends it.
    ``progress`` shows a progress bar; ``on_frame(frames_done, frames_total)`` is called after
    each stored frame (and after any checkpoint at that frame), and an exception raised there
    aborts the run. Returns an :class:`MDResult`; raises ``RuntimeError`` if the potential energy
    becomes non-finite.
    """
    sim_system, *masks = _prepare_system(system, _as_force_list(bias))
    params = {
        "temperature_K": float(temperature_K),
        "timestep_fs": float(timestep_fs),
        "friction_per_ps": float(friction_per_ps),
        "report_every": int(report_every),
        "seed": int(seed),
        "platform": platform,
        "platform_properties": dict(platform_properties or {}),
    }
    target_T = temperature_K if target_temperature_K is None else target_temperature_K
    plan = _make_plan(sim_system, positions_nm, params, tuple(masks), steps=steps, checkpoint=checkpoint,
                      checkpoint_every=checkpoint_every, record_dihedrals=record_dihedrals,
                      target_temperature_K=target_T)
    out_h5 = Path(out_h5)
    if resume and (done := _complete_output(out_h5, plan)) is not None:
        return done
    buf, final_positions, wall = _simulate(sim_system, params, plan, resume, progress, on_frame)
    result = _frames_result(buf, plan, params, final_positions, wall, out_h5)
    _write_trajectory(result, topology, {**_output_attributes(params, plan, result), **dict(extra_attrs or {})})
    return result
