"""OpenMM molecular-dynamics baseline: Langevin MD with checkpoints, written as mdtraj HDF5.

Everything that talks to OpenMM works in OpenMM's units (nm, ps, kJ/mol, K); results also carry
reduced energies ``u = U / kT`` (dimensionless, float64).

Trajectories are written in **mdtraj's HDF5 layout** ("Pande" conventions 1.1: ``/coordinates``
[T, n_atoms, 3] float32 nm, ``/time`` [T] ps, ``/topology`` JSON, ``/potentialEnergy`` [T] kJ/mol),
plus extra datasets (``potential_energy_kJ_mol``, ``reduced_energy``, ``final_positions_nm``, CVs).
The file is written by :class:`boltzgen.io.SampleWriter` (h5py, atomically), so ``mdtraj.load``
opens it (mdtraj reads HDF5 through PyTables), :func:`boltzgen.io.read_samples` reads it, and
:func:`load_trajectory_h5` reads it without PyTables.

Public API
----------
- :func:`run_langevin` -> :class:`MDResult` (checkpoint/resume, optional bias forces)
- :func:`load_md` -> :class:`MDResult` from a file written by :func:`run_langevin`
- :func:`reduced_energy_at`, :func:`kT_kJ_per_mol`
- umbrella sampling along a torsion lives in :mod:`boltzgen.umbrella`
- :func:`dihedral_rad`, :func:`load_trajectory_h5`
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
import mdtraj
import numpy as np
import openmm
import openmm.app as app
from openmm import unit
from tqdm.auto import tqdm

from boltzgen.io import SampleWriter, atomic_path, topology_from_json

__all__ = [
    "MDResult",
    "kT_kJ_per_mol",
    "reduced_energy_at",
    "dihedral_rad",
    "load_trajectory_h5",
    "run_langevin",
    "load_md",
    "checkpoint_start_positions",
]

#: Molar gas constant in kJ/(mol K), taken from OpenMM so that kT agrees with OpenMM's thermostat.
R_KJ_PER_MOL_K: float = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)

_H5_FORMAT = "boltzgen.md/1"
_TWO_PI = 2.0 * math.pi


# ----------------------------------------------------------------------------------------------
# units and small helpers
# ----------------------------------------------------------------------------------------------


def kT_kJ_per_mol(temperature_K: float) -> float:
    """Thermal energy kT in kJ/mol at ``temperature_K`` (K)."""
    if not temperature_K > 0:
        raise ValueError(f"temperature_K must be positive, got {temperature_K}")
    return R_KJ_PER_MOL_K * float(temperature_K)


def reduced_energy_at(potential_kJ_mol: np.ndarray | float, temperature_K: float) -> np.ndarray:
    """Reduced energy ``u = U / (k_B T)``.

    Args:
        potential_kJ_mol: potential energy U in kJ/mol, any shape (e.g. [T]).
        temperature_K: temperature of the ensemble the energy is reduced to (K). For MD run at a
            higher temperature, pass the *target* temperature to get the target's reduced energy.

    Returns:
        float64 array of the same shape, dimensionless (units of kT).
    """
    return np.asarray(potential_kJ_mol, dtype=np.float64) / kT_kJ_per_mol(temperature_K)


def openmm_seed(seed: int, stream: int) -> int:
    """A positive 31-bit seed for OpenMM derived from (seed, stream).

    OpenMM treats seed 0 as "pick a random seed", so a user seed of 0 must never reach it.
    """
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(stream)]).generate_state(1)[0]
    return int(state % (2**31 - 2)) + 1


def wrap_angle(x: np.ndarray) -> np.ndarray:
    """Map angles (rad) to [-pi, pi)."""
    return (np.asarray(x, dtype=np.float64) + math.pi) % _TWO_PI - math.pi


def dihedral_rad(positions_nm: np.ndarray, atoms: Sequence[int]) -> np.ndarray:
    """Dihedral angle of four atoms, IUPAC sign convention (the same as OpenMM and mdtraj).

    Args:
        positions_nm: [T, n_atoms, 3] or [n_atoms, 3] positions (any length unit).
        atoms: four atom indices (i, j, k, l).

    Returns:
        [T] (or scalar array for a single frame) float64 angles in [-pi, pi] (rad).
    """
    if len(atoms) != 4:
        raise ValueError(f"a dihedral needs 4 atoms, got {atoms!r}")
    x = np.asarray(positions_nm, dtype=np.float64)
    p = [x[..., int(a), :] for a in atoms]
    b1, b2, b3 = p[1] - p[0], p[2] - p[1], p[3] - p[2]
    n1 = np.cross(b1, b2)
    n2 = np.cross(b2, b3)
    b2_norm = np.linalg.norm(b2, axis=-1)
    y = b2_norm * np.sum(b1 * n2, axis=-1)
    xx = np.sum(n1 * n2, axis=-1)
    return np.arctan2(y, xx)


# ----------------------------------------------------------------------------------------------
# mdtraj-layout HDF5 reading (h5py only; files are written by boltzgen.io.SampleWriter)
# ----------------------------------------------------------------------------------------------


def load_trajectory_h5(path: Path) -> mdtraj.Trajectory:
    """Read a file in mdtraj's HDF5 layout into an ``mdtraj.Trajectory`` (h5py, no PyTables).

    Returns:
        Trajectory with xyz [T, n_atoms, 3] nm and time [T] ps.
    """
    with h5py.File(path, "r") as f:
        top = topology_from_json(f["topology"][0])
        xyz = f["coordinates"][...]
        t = f["time"][...] if "time" in f else None
    return mdtraj.Trajectory(xyz, top, time=t)


# ----------------------------------------------------------------------------------------------
# Langevin MD
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MDResult:
    """Output of :func:`run_langevin` (also what :func:`load_md` returns).

    Attributes:
        positions_nm: [T, n_atoms, 3] float32 frames (nm), one every ``report_every`` steps; frame
            ``i`` is taken after ``(i + 1) * report_every`` steps (the start is not stored).
        time_ps: [T] float64 simulation time of each frame (ps).
        potential_energy_kJ_mol: [T] float64 potential energy *without* any bias force (kJ/mol).
        reduced_energy: [T] float64 ``potential_energy_kJ_mol / kT(target_temperature_K)``.
        bias_energy_kJ_mol: [T] float64 energy of the bias forces (kJ/mol), or None without bias.
        dihedrals_rad: name -> [T] float64 recorded dihedrals (rad, in [-pi, pi]).
        final_positions_nm: [n_atoms, 3] float64 positions after the last step (nm).
        temperature_K: thermostat temperature of the run (K).
        target_temperature_K: temperature that ``reduced_energy`` refers to (K).
        timestep_fs: integration time step (fs).
        steps: number of MD steps run in total.
        energy_evaluations: force evaluations of the dynamics (= steps, one per step). Storing a
            frame costs one more energy evaluation (two with a bias), i.e. +1/report_every.
        wall_seconds: wall-clock time of the MD over all (resumed) segments (s).
        h5: path of the trajectory file.
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
    """Copy ``system`` and add the bias forces in a force group of their own.

    Returns:
        (system copy, bitmask of the unbiased groups or None, bitmask of the bias group or None).
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


def _fingerprint(
    system_xml: str, positions_nm: np.ndarray, params: Mapping[str, Any]
) -> str:
    h = hashlib.sha256()
    h.update(system_xml.encode())
    h.update(np.ascontiguousarray(positions_nm, dtype=np.float64).tobytes())
    h.update(json.dumps(dict(params), sort_keys=True).encode())
    return h.hexdigest()


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
    """Start positions [n_atoms, 3] (nm) of the run a checkpoint belongs to, or None if absent.

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
            raise ValueError(
                f"checkpoint {path} belongs to a different run (system, start positions or MD "
                "parameters differ); delete it or pass resume=False"
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


def load_md(path: Path) -> MDResult:
    """Load an :class:`MDResult` from a trajectory file written by :func:`run_langevin`."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != _H5_FORMAT:
            raise ValueError(f"{path} was not written by boltzgen.md.run_langevin")
        a = f.attrs
        names = json.loads(a["dihedral_names"])
        return MDResult(
            positions_nm=f["coordinates"][...],
            time_ps=f["time_ps"][...],
            potential_energy_kJ_mol=f["potential_energy_kJ_mol"][...],
            reduced_energy=f["reduced_energy"][...],
            bias_energy_kJ_mol=f["bias_energy_kJ_mol"][...] if "bias_energy_kJ_mol" in f else None,
            dihedrals_rad={n: f[f"{n}_rad"][...] for n in names},
            final_positions_nm=f["final_positions_nm"][...],
            temperature_K=float(a["temperature_K"]),
            target_temperature_K=float(a["target_temperature_K"]),
            timestep_fs=float(a["timestep_fs"]),
            steps=int(a["steps"]),
            energy_evaluations=int(a["energy_evaluations"]),
            wall_seconds=float(a["wall_seconds"]),
            h5=path,
        )


def _complete_output(out_h5: Path, fingerprint: str, steps: int, target_temperature_K: float) -> MDResult | None:
    """The existing output if it is the finished result of this very run, else None."""
    if not out_h5.exists():
        return None
    try:
        with h5py.File(out_h5, "r") as f:
            ok = (
                f.attrs.get("format") == _H5_FORMAT
                and f.attrs.get("fingerprint") == fingerprint
                and int(f.attrs.get("steps", -1)) == steps
                and float(f.attrs.get("target_temperature_K", -1.0)) == float(target_temperature_K)
            )
    except OSError:
        return None
    return load_md(out_h5) if ok else None


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
    """Langevin MD (``LangevinMiddleIntegrator``) with a fixed seed, written to an HDF5 trajectory.

    Frames are taken every ``report_every`` steps; frame ``i`` is the state after
    ``(i + 1) * report_every`` steps, so the file holds exactly ``steps // report_every`` frames.
    Initial velocities are drawn from Maxwell-Boltzmann at ``temperature_K`` (seeded), so the run
    is reproducible bit for bit on the Reference platform.

    Args:
        system: OpenMM system (not modified; a copy is simulated).
        topology: OpenMM topology matching ``system`` (written into the HDF5 file).
        positions_nm: [n_atoms, 3] start positions (nm).
        temperature_K: thermostat temperature (K). May be higher than the target (training MD).
        steps: total number of MD steps; a multiple of ``report_every``.
        report_every: steps between stored frames.
        seed: integer seed for velocities and the integrator's random stream.
        out_h5: output file, written atomically at the end of the run.
        timestep_fs: time step (fs).
        friction_per_ps: Langevin friction coefficient (1/ps).
        platform: OpenMM platform name ("Reference", "CPU", "CUDA", ...).
        platform_properties: optional OpenMM platform properties (e.g. ``{"Threads": "1"}``).
        checkpoint: checkpoint file (integrator/context state + frames so far), or None.
        checkpoint_every: frames between checkpoint writes.
        resume: continue from ``checkpoint`` if it exists (its run must have the same system,
            start positions and MD parameters; ``steps`` may be larger, which extends the run). If
            ``out_h5`` already holds the finished result of the same run, it is loaded and returned.
        target_temperature_K: temperature for ``reduced_energy`` (default: ``temperature_K``).
        bias: extra force(s) added for the simulation only, in a force group of their own;
            stored potential energies exclude them, their energy goes to ``bias_energy_kJ_mol``.
        record_dihedrals: name -> 4 atom indices; each is stored as dataset ``<name>_rad`` [T].
        extra_attrs: extra attributes for the output file.
        progress: show a tqdm progress bar (in steps).
        on_frame: called as ``on_frame(frames_done, frames_total)`` after each stored frame (and
            after any checkpoint write at that frame); an exception raised here aborts the run.

    Returns:
        :class:`MDResult`. Raises ``RuntimeError`` if the potential energy becomes non-finite.
    """
    if steps <= 0 or report_every <= 0 or steps % report_every:
        raise ValueError(f"steps ({steps}) must be a positive multiple of report_every ({report_every})")
    if checkpoint_every <= 0:
        raise ValueError("checkpoint_every must be positive")
    out_h5 = Path(out_h5)
    checkpoint = None if checkpoint is None else Path(checkpoint)
    target_T = float(temperature_K if target_temperature_K is None else target_temperature_K)
    pos0 = np.asarray(positions_nm, dtype=np.float64)
    if pos0.shape != (system.getNumParticles(), 3):
        raise ValueError(f"positions_nm must be [{system.getNumParticles()}, 3], got {pos0.shape}")
    dihedrals = {str(k): tuple(int(i) for i in v) for k, v in (record_dihedrals or {}).items()}

    bias_forces = _as_force_list(bias)
    sim_system, unbiased_mask, bias_mask = _prepare_system(system, bias_forces)
    params = {
        "temperature_K": float(temperature_K),
        "timestep_fs": float(timestep_fs),
        "friction_per_ps": float(friction_per_ps),
        "report_every": int(report_every),
        "seed": int(seed),
        "platform": platform,
        "platform_properties": dict(platform_properties or {}),
    }
    fingerprint = _fingerprint(openmm.XmlSerializer.serialize(sim_system), pos0, params)

    if resume:
        done = _complete_output(out_h5, fingerprint, steps, target_T)
        if done is not None:
            return done

    integrator = openmm.LangevinMiddleIntegrator(
        temperature_K * unit.kelvin, friction_per_ps / unit.picosecond, timestep_fs * unit.femtosecond
    )
    integrator.setRandomNumberSeed(openmm_seed(seed, 0))
    omm_platform = openmm.Platform.getPlatformByName(platform)
    context = openmm.Context(sim_system, integrator, omm_platform, dict(platform_properties or {}))
    try:
        context.setPositions(pos0 * unit.nanometer)
        context.setVelocitiesToTemperature(temperature_K * unit.kelvin, openmm_seed(seed, 1))

        buf = _Progress()
        step = 0
        if resume and checkpoint is not None and checkpoint.exists():
            blob, buf, step = _load_checkpoint(checkpoint, fingerprint)
            if step > steps:
                raise ValueError(f"checkpoint {checkpoint} is at step {step}, beyond the requested {steps}")
            context.loadCheckpoint(blob)

        n_total = steps // report_every
        t_start = time.perf_counter()
        with tqdm(
            total=steps, initial=step, disable=not progress, unit="step", unit_scale=True, desc="MD"
        ) as bar:
            while len(buf.positions) < n_total:
                integrator.step(report_every)
                step += report_every
                state = context.getState(
                    getPositions=True,
                    getEnergy=True,
                    **({} if unbiased_mask is None else {"groups": unbiased_mask}),
                )
                pot = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
                if not math.isfinite(pot):
                    raise RuntimeError(
                        f"potential energy became {pot} at step {step}; reduce timestep_fs or minimize first"
                    )
                buf.positions.append(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
                buf.potential.append(pot)
                if bias_mask is not None:
                    b_state = context.getState(getEnergy=True, groups=bias_mask)
                    buf.bias.append(b_state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
                bar.update(report_every)
                n_done = len(buf.positions)
                if checkpoint is not None and (n_done % checkpoint_every == 0 or n_done == n_total):
                    wall = buf.wall_before + time.perf_counter() - t_start
                    _save_checkpoint(checkpoint, context, buf, fingerprint, step, wall, pos0)
                if on_frame is not None:
                    on_frame(n_done, n_total)
        wall_seconds = buf.wall_before + time.perf_counter() - t_start
        final_positions = (
            context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        )
    finally:
        del context, integrator

    xyz = np.asarray(buf.positions, dtype=np.float32).reshape(n_total, -1, 3)
    potential = np.asarray(buf.potential, dtype=np.float64)
    reduced = reduced_energy_at(potential, target_T)
    time_ps = (np.arange(1, n_total + 1, dtype=np.float64) * report_every * timestep_fs) / 1000.0
    bias_energy = np.asarray(buf.bias, dtype=np.float64) if bias_mask is not None else None
    dihedral_values = {name: dihedral_rad(xyz, atoms) for name, atoms in dihedrals.items()}

    # Per-frame [T] datasets. "time" (ps) and "potentialEnergy" (kJ/mol) are mdtraj's own float32
    # fields; the float64 copies are what load_md reads back.
    per_frame: dict[str, np.ndarray] = {
        "time": time_ps,
        "potentialEnergy": potential,
        "potential_energy_kJ_mol": potential,
        "reduced_energy": reduced,
        "time_ps": time_ps,
    }
    if bias_energy is not None:
        per_frame["bias_energy_kJ_mol"] = bias_energy
    for name, values in dihedral_values.items():
        per_frame[f"{name}_rad"] = values
    attrs: dict[str, Any] = {
        "format": _H5_FORMAT,
        **{k: v for k, v in params.items() if k != "platform_properties"},
        "fingerprint": fingerprint,
        "steps": int(steps),
        "target_temperature_K": target_T,
        "energy_evaluations": int(steps),
        "wall_seconds": float(wall_seconds),
        "kT_kJ_per_mol": kT_kJ_per_mol(target_T),
        "dihedral_names": json.dumps(list(dihedrals)),
        "dihedral_atoms": json.dumps(dihedrals),
        **dict(extra_attrs or {}),
    }
    with SampleWriter(
        out_h5, xyz.shape[1] * 3, extras=tuple(per_frame), topology=topology, attrs=attrs, expected_frames=n_total
    ) as writer:
        writer.append(xyz.reshape(n_total, -1), **per_frame)
        writer.add_dataset("final_positions_nm", np.asarray(final_positions, dtype=np.float64))
    return MDResult(
        positions_nm=xyz,
        time_ps=time_ps,
        potential_energy_kJ_mol=potential,
        reduced_energy=reduced,
        bias_energy_kJ_mol=bias_energy,
        dihedrals_rad=dihedral_values,
        final_positions_nm=np.asarray(final_positions, dtype=np.float64),
        temperature_K=float(temperature_K),
        target_temperature_K=target_T,
        timestep_fs=float(timestep_fs),
        steps=int(steps),
        energy_evaluations=int(steps),
        wall_seconds=float(wall_seconds),
        h5=out_h5,
    )
