"""Umbrella sampling along a torsion with OpenMM: the molecular ΔF reference when plain MD cannot cross.

Two methods, both built on :func:`boltzgen.simulation.langevin.run_langevin` (OpenMM's units at the
edge) and analysed by :mod:`boltzgen.estimators.umbrella` (reduced units):

- :func:`run_umbrella` -> :class:`UmbrellaResult`: harmonic windows along the torsion
  (:func:`umbrella_windows`, :func:`umbrella_bias_force`), unbiased together with MBAR;
- :func:`run_flattened_umbrella` -> :class:`FlattenedUmbrellaResult`: adaptive umbrella sampling.
  A short stage-1 window run gives a rough profile F(phi); long runs under the flattening bias
  ``-kT min(F, f_cap)`` (:func:`flattening_bias`, :func:`flattening_bias_force`) then cross between
  the basins many times and are reweighted by ``exp(+V/kT)``.

Each method writes its trajectories, checkpoints and a record of its bias or estimate into the
folder it is given, and reuses finished and interrupted runs found there.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openmm
import openmm.app as app
from scipy.interpolate import CubicSpline
from tqdm.auto import tqdm

from boltzgen import distributed
from boltzgen.estimators.histograms import FreeEnergySurface
from boltzgen.estimators.umbrella import (
    FlattenedEstimate,
    StatePredicate,
    UmbrellaEstimate,
    analyze_flattened_umbrella,
    analyze_umbrella,
    bin_centers,
)
from boltzgen.files import atomic_write_json
from boltzgen.geometry import dihedrals_rad, wrap_angle
from boltzgen.simulation.langevin import MDResult, checkpoint_start_positions, load_md, openmm_seed, run_langevin
from boltzgen.units import kT_kJ_per_mol, reduced_energy

_TWO_PI = 2.0 * math.pi

# ----------------------------------------------------------------------------------------------
# harmonic windows along a torsion
# ----------------------------------------------------------------------------------------------


def umbrella_windows(
    spacing_deg: float | None = None,
    skip_ranges_deg: Sequence[tuple[float, float]] = (),
    *,
    k_kJ_per_mol_rad2: float | None = None,
    temperature_K: float = 300.0,
    spacing_in_sigmas: float = 1.5,
) -> np.ndarray:
    """Evenly spaced window centres covering the circle [-pi, pi): ``[K]`` float64 radians, increasing.

    ``spacing_deg`` is the spacing between centres (deg), rounded down so that it divides 360
    evenly. If it is None, it is derived from the spring ``k_kJ_per_mol_rad2`` (kJ/mol/rad^2) at
    ``temperature_K`` (K): ``spacing_in_sigmas * sqrt(kT / k)``, ``sqrt(kT / k)`` being the width of
    a window's distribution on a flat landscape, so that neighbouring windows overlap (on steep
    slopes a window's distribution shifts downhill, so keep the factor at most ~1.5).
    ``skip_ranges_deg`` are closed intervals ``(lo, hi)`` in degrees, in [-180, 180], whose centres
    are left out. For alanine dipeptide, windows that restrain phi alone do not equilibrate at
    phi ~ 120-130 deg, so leave those out (e.g. ``((110, 140),)``) unless psi is biased too.
    """
    if spacing_deg is None:
        if k_kJ_per_mol_rad2 is None:
            raise ValueError("give spacing_deg or k_kJ_per_mol_rad2")
        sigma_deg = math.degrees(math.sqrt(kT_kJ_per_mol(temperature_K) / k_kJ_per_mol_rad2))
        spacing_deg = spacing_in_sigmas * sigma_deg
    if not 0 < spacing_deg <= 180:
        raise ValueError(f"spacing_deg must be in (0, 180], got {spacing_deg}")
    n = math.ceil(360.0 / spacing_deg - 1e-9)
    centers_deg = -180.0 + np.arange(n) * (360.0 / n)
    keep = np.ones(n, dtype=bool)
    for lo, hi in skip_ranges_deg:
        keep &= ~((centers_deg >= lo) & (centers_deg <= hi))
    return np.radians(centers_deg[keep])


def umbrella_bias_force(
    dihedral_atoms: Sequence[int], center_rad: float, k_kJ_per_mol_rad2: float
) -> openmm.CustomTorsionForce:
    """Harmonic, periodic-aware restraint ``0.5 k d(theta, theta0)^2`` (kJ/mol) on the torsion of
    the four ``dihedral_atoms``, centred at ``center_rad`` (rad), with ``k`` in kJ/mol/rad^2.

    ``d`` is the minimum-image angle difference, so the bias is continuous across +-pi; its numpy
    twin is :func:`boltzgen.estimators.umbrella.umbrella_bias`.
    """
    force = openmm.CustomTorsionForce(
        "0.5*k_umb*min(dtheta, 2*pi - dtheta)^2; dtheta = abs(theta - theta0); pi = 3.141592653589793"
    )
    force.addGlobalParameter("k_umb", float(k_kJ_per_mol_rad2))
    force.addGlobalParameter("theta0", float(center_rad))
    force.addTorsion(*(int(a) for a in dihedral_atoms), [])
    return force


@dataclass(frozen=True, eq=False)
class UmbrellaResult:
    """Output of :func:`run_umbrella`.

    ``centers_rad`` ``[K]`` are the window centres (rad), increasing, ``k_kJ_per_mol_rad2`` the
    spring constant (kJ/mol/rad^2) and ``temperature_K`` the temperature of all windows (K).
    ``phi_per_window``, ``psi_per_window`` (None if psi was not recorded) and
    ``potential_per_window`` hold K arrays ``[N]`` of the production frames, equilibration dropped:
    phi and psi in rad, the unbiased potential energy in kJ/mol. ``estimate`` is the MBAR
    analysis. ``energy_evaluations`` counts the MD steps, equilibration included.
    ``md_wall_seconds`` is the wall-clock time of the MD of all windows over all resumed segments
    and ``wall_seconds`` that plus the analysis (s). ``window_h5`` are the K trajectory files.
    """

    centers_rad: np.ndarray
    k_kJ_per_mol_rad2: float
    temperature_K: float
    phi_per_window: tuple[np.ndarray, ...]
    psi_per_window: tuple[np.ndarray, ...] | None
    potential_per_window: tuple[np.ndarray, ...]
    estimate: UmbrellaEstimate
    energy_evaluations: int
    md_wall_seconds: float
    wall_seconds: float
    window_h5: tuple[Path, ...]


@dataclass(frozen=True, eq=False)
class _Windows:
    """What every window of one :func:`run_umbrella` call shares; ``md`` are run_langevin's MD settings."""

    dihedral_atoms: tuple[int, int, int, int]
    torsions: Mapping[str, Sequence[int]]
    k_kJ_per_mol_rad2: float
    steps: int
    equilibration_frames: int
    seed: int
    out_dir: Path
    resume: bool
    md: Mapping[str, Any]


def _check_steps(name: str, steps: int, report_every: int, positive: bool) -> None:
    if steps < (1 if positive else 0) or steps % report_every:
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be a {kind} multiple of report_every")


def _torsions(phi_atoms: Sequence[int], psi_atoms: Sequence[int] | None) -> dict[str, tuple[int, ...]]:
    """The torsions to record: phi always, psi when its atoms are given."""
    torsions = {"phi": tuple(phi_atoms)}
    if psi_atoms is not None:
        torsions["psi"] = tuple(psi_atoms)
    return torsions


def _sorted_centers(centers_rad: Sequence[float] | None, k_kJ_per_mol_rad2: float, temperature_K: float) -> np.ndarray:
    """The window centres (default from the spring) wrapped onto [-pi, pi) and sorted."""
    if centers_rad is None:
        centers_rad = umbrella_windows(k_kJ_per_mol_rad2=k_kJ_per_mol_rad2, temperature_K=temperature_K)
    centers = np.asarray(centers_rad, dtype=np.float64)
    if centers.ndim != 1 or len(centers) < 2:
        raise ValueError("need at least two window centres")
    return wrap_angle(centers[np.argsort(centers)])


def _window_order(centers: np.ndarray, phi0: float) -> list[list[int]]:
    """Two walks outward from the centre nearest ``phi0``: upward, then downward.

    Each walk starts from the initial configuration and visits neighbours in order, so every
    window starts close to its centre without crossing the +-pi seam.
    """
    start = int(np.argmin(np.abs(wrap_angle(centers - phi0))))
    return [list(range(start, len(centers))), list(range(start - 1, -1, -1))]


def _run_window(
    system: openmm.System, topology: app.Topology, start_nm: np.ndarray, i: int, center: float, plan: _Windows,
    on_frame: Callable[[int, int], None],
) -> MDResult:
    """Window ``i`` at ``center`` (rad), from ``start_nm`` unless it was started before."""
    ckpt = plan.out_dir / f"window_{i:03d}.ckpt.h5"
    if plan.resume:
        # A window that was started before keeps its own start, so that a longer
        # steps_per_window extends it instead of clashing with its checkpoint.
        previous_start = checkpoint_start_positions(ckpt)
        start_nm = start_nm if previous_start is None else previous_start
    k = plan.k_kJ_per_mol_rad2
    return run_langevin(
        system, topology, start_nm, steps=plan.steps, seed=openmm_seed(plan.seed, 1000 + i),
        out_h5=plan.out_dir / f"window_{i:03d}.h5", checkpoint=ckpt, resume=plan.resume,
        bias=umbrella_bias_force(plan.dihedral_atoms, center, k), record_dihedrals=plan.torsions,
        extra_attrs={"umbrella_center_rad": center, "umbrella_k_kJ_per_mol_rad2": float(k),
                     "umbrella_equilibration_frames": int(plan.equilibration_frames)},
        progress=False, on_frame=on_frame, **plan.md,
    )


def _run_windows(
    system: openmm.System, topology: app.Topology, positions_nm: np.ndarray, centers: np.ndarray, plan: _Windows,
    progress: bool,
) -> list[MDResult]:
    """Every window, in two walks outward from the start torsion; the results in centre order.

    Under torchrun the walks are shared out over the ranks; each rank then reads the others' windows.
    """
    results: dict[int, MDResult] = {}
    report_every = plan.md["report_every"]
    phi0 = float(dihedrals_rad(positions_nm, [plan.dihedral_atoms])[0])
    world = distributed.world()
    with tqdm(total=len(centers) * plan.steps, disable=not progress, unit="step", unit_scale=True,
              desc="umbrella") as bar:
        for k, walk in enumerate(_window_order(centers, phi0)):
            if k % world.size != world.rank:
                continue
            start = positions_nm
            for i in walk:
                bar.set_postfix(window=i, center_deg=f"{math.degrees(centers[i]):.1f}")
                res = _run_window(system, topology, start, i, float(centers[i]), plan,
                                  on_frame=lambda *_: bar.update(report_every))
                # Frames loaded from a checkpoint or a finished file never reach on_frame.
                bar.n = sum(r.steps for r in results.values()) + res.steps
                bar.refresh()
                results[i] = res
                start = res.final_positions_nm
    distributed.barrier()  # every walk is written before any rank reads another's
    return [results[i] if i in results else load_md(plan.out_dir / f"window_{i:03d}.h5") for i in range(len(centers))]


def _write_umbrella_record(path: Path, result: UmbrellaResult, steps_per_window: int, equilibration_steps: int) -> None:
    """The settings and estimate of a :func:`run_umbrella` call as JSON (non-finite values as null)."""
    est = result.estimate
    profile = est.profile
    atomic_write_json(path, {
        "centers_rad": result.centers_rad, "k_kJ_per_mol_rad2": result.k_kJ_per_mol_rad2,
        "temperature_K": result.temperature_K, "steps_per_window": int(steps_per_window),
        "equilibration_steps": int(equilibration_steps), "delta_f_kT": est.delta_f_kT, "stderr_kT": est.stderr_kT,
        "delta_f_halves_kT": est.delta_f_halves_kT, "halves_stderr_kT": est.halves_stderr_kT, "p_b": est.p_b,
        "statistical_inefficiency": est.statistical_inefficiency, "n_uncorrelated": est.n_uncorrelated,
        "profile": {"bin_centers_rad": bin_centers(profile.edges[0]), "f_kT": profile.f_kT,
                    "stderr_kT": profile.stderr_kT},
        "energy_evaluations": result.energy_evaluations, "wall_seconds": result.wall_seconds,
        "md_wall_seconds": result.md_wall_seconds,
    })


def run_umbrella(
    system: openmm.System,
    topology: app.Topology,
    positions_nm: np.ndarray,
    *,
    dihedral_atoms: tuple[int, int, int, int],
    k_kJ_per_mol_rad2: float,
    steps_per_window: int,
    equilibration_steps: int,
    temperature_K: float,
    seed: int,
    out_dir: Path,
    state_b: StatePredicate,
    centers_rad: Sequence[float] | None = None,
    psi_atoms: tuple[int, int, int, int] | None = None,
    timestep_fs: float = 1.0,
    friction_per_ps: float = 1.0,
    report_every: int = 100,
    platform: str = "Reference",
    platform_properties: Mapping[str, str] | None = None,
    bin_width_deg: float = 10.0,
    subsample: bool = True,
    resume: bool = True,
    progress: bool = True,
) -> UmbrellaResult:
    """Umbrella sampling along the torsion of ``dihedral_atoms`` (phi), one window at a time, unbiased with MBAR.

    ``system``, ``topology`` and ``positions_nm`` (``[n_atoms, 3]`` nm) are as in
    :func:`~boltzgen.simulation.langevin.run_langevin`, and so are the MD settings
    ``temperature_K``, ``timestep_fs``, ``friction_per_ps``, ``report_every``, ``platform`` and
    ``platform_properties``. Each window at a centre of ``centers_rad`` (rad; default
    :func:`umbrella_windows` of the spring) adds ``0.5 k d(phi, c)^2`` (minimum-image ``d``,
    ``k_kJ_per_mol_rad2`` in kJ/mol/rad^2) and runs ``equilibration_steps + steps_per_window``
    steps, both multiples of ``report_every``; the equilibration frames are stored but left out
    of the analysis. Windows run in two walks outward from the centre nearest the start torsion,
    each from the previous window's final configuration with fresh velocities seeded from
    ``(seed, window)``. ``psi_atoms`` name a second torsion to record, not biased. ``state_b``
    defines state B on phi (A is its complement); the estimate (see
    :func:`~boltzgen.estimators.umbrella.analyze_umbrella`) has a profile in bins of
    ``bin_width_deg`` and subsamples by statistical inefficiency when ``subsample`` is True.

    Window trajectories, checkpoints and ``umbrella.json`` (settings and estimate) go to
    ``out_dir``. With ``resume``, finished windows and checkpoints there are reused; a larger
    ``steps_per_window`` extends the windows (other settings must be unchanged, else the
    checkpoints are refused with a ValueError). ``progress`` shows a bar over all MD steps.
    """
    _check_steps("equilibration_steps", equilibration_steps, report_every, positive=False)
    _check_steps("steps_per_window", steps_per_window, report_every, positive=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    centers = _sorted_centers(centers_rad, k_kJ_per_mol_rad2, temperature_K)
    n_eq = equilibration_steps // report_every
    md = dict(temperature_K=temperature_K, report_every=report_every, timestep_fs=timestep_fs,
              friction_per_ps=friction_per_ps, platform=platform, platform_properties=platform_properties)
    plan = _Windows(dihedral_atoms=dihedral_atoms, torsions=_torsions(dihedral_atoms, psi_atoms),
                    k_kJ_per_mol_rad2=float(k_kJ_per_mol_rad2), steps=equilibration_steps + steps_per_window,
                    equilibration_frames=n_eq, seed=seed, out_dir=out_dir, resume=resume, md=md)
    windows = _run_windows(system, topology, np.asarray(positions_nm, dtype=np.float64), centers, plan, progress)
    phi = tuple(r.dihedrals_rad["phi"][n_eq:] for r in windows)
    t_analysis = time.perf_counter()
    est = analyze_umbrella(phi, centers, k_kJ_per_mol_rad2, kT_kJ_per_mol(temperature_K), state_b,
                           bin_width_deg=bin_width_deg, subsample=subsample)
    md_seconds = float(sum(r.wall_seconds for r in windows))
    result = UmbrellaResult(
        centers_rad=centers, k_kJ_per_mol_rad2=float(k_kJ_per_mol_rad2), temperature_K=float(temperature_K),
        phi_per_window=phi,
        psi_per_window=tuple(r.dihedrals_rad["psi"][n_eq:] for r in windows) if psi_atoms is not None else None,
        potential_per_window=tuple(r.potential_energy_kJ_mol[n_eq:] for r in windows),
        estimate=est, energy_evaluations=int(sum(r.energy_evaluations for r in windows)),
        md_wall_seconds=md_seconds, wall_seconds=md_seconds + time.perf_counter() - t_analysis,
        window_h5=tuple(r.h5 for r in windows),
    )
    _write_umbrella_record(out_dir / "umbrella.json", result, steps_per_window, equilibration_steps)
    return result


# ----------------------------------------------------------------------------------------------
# adaptive umbrella sampling with a flattening bias (Mezei 1987)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FlatteningBias:
    """A smooth periodic bias ``V(phi) = -kT * min(F(phi), F_cap)`` tabulated on [-pi, pi].

    ``grid_rad`` ``[G + 1]`` is the uniform grid from -pi to pi inclusive and ``energy_kJ_mol``
    ``[G + 1]`` the bias energies V on it (kJ/mol), float64; the first and last values are equal
    (periodic). V <= 0 up to spline overshoot, and V = -kT * F_cap where the profile was capped or
    empty. ``f_cap_kT`` is the cap of the flattened profile (kT) and ``kT_kJ_per_mol`` the thermal
    energy the profile was scaled with (kJ/mol).
    """

    grid_rad: np.ndarray
    energy_kJ_mol: np.ndarray
    f_cap_kT: float
    kT_kJ_per_mol: float

    def _spline(self) -> CubicSpline:
        return CubicSpline(self.grid_rad, self.energy_kJ_mol, bc_type="periodic")

    def energy_at(self, phi_rad: np.ndarray | float) -> np.ndarray:
        """V(phi) in kJ/mol at any angles ``phi_rad`` (rad), by the same periodic cubic spline of the
        table that OpenMM's periodic ``Continuous1DFunction`` uses (agrees to ~1e-6 kJ/mol)."""
        return np.asarray(self._spline()(wrap_angle(np.asarray(phi_rad, dtype=np.float64))), dtype=np.float64)

    def flattened_profile_kT(self, phi_rad: np.ndarray | float) -> np.ndarray:
        """The profile the bias cancels, ``min(F, F_cap) = -V / kT`` (kT), at angles ``phi_rad`` (rad)."""
        return -self.energy_at(phi_rad) / self.kT_kJ_per_mol


def flattening_bias(
    centers_rad: Sequence[float] | np.ndarray,
    f_kT: Sequence[float] | np.ndarray,
    *,
    kT_kJ_per_mol: float,
    f_cap_kT: float = 18.0,
    n_grid: int = 360,
) -> FlatteningBias:
    """The :class:`FlatteningBias` of a free-energy profile along a periodic angle.

    ``f_kT`` ``[B]`` is the profile (kT; +inf or NaN for empty bins) at the bin centres
    ``centers_rad`` ``[B]`` (rad, any order, distinct modulo 2 pi). It is shifted to minimum 0
    and capped at ``f_cap_kT`` (kT), and empty bins get the cap, so regions higher than the cap
    keep ``F - F_cap`` of their barrier. A periodic cubic spline through the capped values is
    evaluated on ``n_grid + 1`` uniform points from -pi to pi and multiplied by
    ``-kT_kJ_per_mol``, the thermal energy of the ensemble (kJ/mol).
    """
    c = wrap_angle(np.asarray(centers_rad, dtype=np.float64))
    f = np.asarray(f_kT, dtype=np.float64)
    if c.ndim != 1 or f.shape != c.shape or len(c) < 3:
        raise ValueError(f"need matching 1-D centers and f_kT with at least 3 points, got {c.shape}, {f.shape}")
    if not f_cap_kT > 0:
        raise ValueError(f"f_cap_kT must be positive, got {f_cap_kT}")
    if n_grid < 8:
        raise ValueError("n_grid must be at least 8")
    finite = np.isfinite(f)
    if not finite.any():
        raise ValueError("the profile has no finite value")
    f = np.minimum(np.where(finite, f - f[finite].min(), f_cap_kT), f_cap_kT)
    order = np.argsort(c)
    c, f = c[order], f[order]
    if np.any(np.diff(c) <= 0):
        raise ValueError("centers_rad must be distinct modulo 2 pi")
    spline = CubicSpline(np.append(c, c[0] + _TWO_PI), np.append(f, f[0]), bc_type="periodic")
    grid = np.linspace(-math.pi, math.pi, int(n_grid) + 1)
    f_grid = spline(c[0] + (grid - c[0]) % _TWO_PI)  # into the spline's period [c0, c0 + 2 pi)
    f_grid[-1] = f_grid[0]  # -pi and pi are the same angle
    return FlatteningBias(
        grid_rad=grid,
        energy_kJ_mol=-float(kT_kJ_per_mol) * f_grid,
        f_cap_kT=float(f_cap_kT),
        kT_kJ_per_mol=float(kT_kJ_per_mol),
    )


def flattening_bias_force(dihedral_atoms: Sequence[int], bias: FlatteningBias) -> openmm.CustomCompoundBondForce:
    """OpenMM force ``V(phi)`` (kJ/mol) of the :class:`FlatteningBias` ``bias`` on the torsion of
    the four ``dihedral_atoms``.

    The table goes into a periodic ``Continuous1DFunction`` on [-pi, pi] (so the force is smooth
    across the +-pi seam), evaluated at ``dihedral(p1, p2, p3, p4)`` of a 4-particle
    ``CustomCompoundBondForce`` (OpenMM's ``CustomTorsionForce`` takes no tabulated functions;
    ``dihedral()`` uses the same IUPAC sign convention as :func:`boltzgen.geometry.dihedrals_rad`).
    """
    force = openmm.CustomCompoundBondForce(4, "flattening_bias(dihedral(p1, p2, p3, p4))")
    force.addTabulatedFunction(
        "flattening_bias",
        openmm.Continuous1DFunction([float(v) for v in bias.energy_kJ_mol], -math.pi, math.pi, True),
    )
    force.addBond([int(a) for a in dihedral_atoms], [])
    return force


def _write_bias_record(path: Path, bias: FlatteningBias) -> None:
    atomic_write_json(path, {"grid_rad": bias.grid_rad, "energy_kJ_mol": bias.energy_kJ_mol,
                             "f_cap_kT": bias.f_cap_kT, "kT_kJ_per_mol": bias.kT_kJ_per_mol})


@dataclass(frozen=True, eq=False)
class FlattenedUmbrellaResult:
    """Output of :func:`run_flattened_umbrella`.

    ``estimate`` is the production estimate: ΔF with its block-jackknife error, each repeat's ΔF,
    the transitions, p_B and the reweighted profile along phi. ``stage1_profile`` is the stage-1
    MBAR profile the bias was built from, ``stage1_delta_f_kT`` and ``stage1_stderr_kT`` the
    stage-1 ΔF and its analytic error (kT), and ``stage1_centers_rad`` ``[K]`` the stage-1 window
    centres (rad). ``bias`` is the :class:`FlatteningBias` applied in production.
    ``energy_evaluations`` counts the MD steps of stage 1 (with its equilibration) plus
    production, which ``stage1_energy_evaluations`` and ``production_energy_evaluations`` count
    apart. ``wall_seconds`` is the stage-1 MD plus the production MD (the longest repeat when the
    repeats ran in parallel, else their sum) plus the analysis, over all resumed segments (s), and
    ``call_wall_seconds`` the wall time of this call alone (s). ``production_h5`` are the
    repeats' trajectory files (with bias energies) and ``stage1_h5`` the stage-1 window files.
    """

    estimate: FlattenedEstimate
    stage1_profile: FreeEnergySurface
    stage1_delta_f_kT: float
    stage1_stderr_kT: float
    stage1_centers_rad: np.ndarray
    bias: FlatteningBias
    energy_evaluations: int
    stage1_energy_evaluations: int
    production_energy_evaluations: int
    wall_seconds: float
    call_wall_seconds: float
    production_h5: tuple[Path, ...]
    stage1_h5: tuple[Path, ...]


def _production_worker(job: dict[str, Any]) -> str:
    """One production repeat; top-level so that a 'spawn' process pool can import it.

    The system and bias travel as OpenMM XML, and each worker builds its own Context.
    """
    system = openmm.XmlSerializer.deserialize(job.pop("system_xml"))
    bias = openmm.XmlSerializer.deserialize(job.pop("bias_xml"))
    res = run_langevin(system, job.pop("topology"), job.pop("positions_nm"), bias=bias, **job)
    return str(res.h5)


def _run_production(
    system: openmm.System, topology: app.Topology, positions_nm: np.ndarray, bias_force: openmm.Force,
    md: Mapping[str, Any], *, steps: int, n_repeats: int, seed: int, out_dir: Path,
    record_dihedrals: Mapping[str, Sequence[int]], extra: Mapping[str, Any], progress: bool, parallel: bool,
) -> list[MDResult]:
    """``n_repeats`` biased runs of ``steps`` from ``positions_nm``, resumable, in parallel processes
    ('spawn') when ``parallel``; ``md`` are run_langevin's MD settings, ``extra`` file attributes.
    Under torchrun repeat r runs on rank r mod world size, and every rank reads them all."""
    n_frames = steps // md["report_every"]
    jobs = [
        dict(
            system_xml=openmm.XmlSerializer.serialize(system), bias_xml=openmm.XmlSerializer.serialize(bias_force),
            topology=topology, positions_nm=positions_nm, steps=int(steps), seed=openmm_seed(seed, 5000 + r),
            out_h5=out_dir / f"production_{r}.h5", checkpoint=out_dir / f"production_{r}.ckpt.h5",
            # ~20 checkpoints per run: each rewrites all frames so far.
            checkpoint_every=max(1000, n_frames // 20), resume=True, record_dihedrals=record_dihedrals,
            extra_attrs={**extra, "repeat": int(r)}, progress=progress, **md,
        )
        for r in range(n_repeats)
    ]
    world = distributed.world()
    mine = [job for r, job in enumerate(jobs) if r % world.size == world.rank]
    if parallel and len(mine) > 1:
        with ProcessPoolExecutor(max_workers=len(mine), mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_production_worker, mine))
    else:
        for job in mine:
            _production_worker(job)
    distributed.barrier()  # every repeat is written before any rank reads them
    return [load_md(out_dir / f"production_{r}.h5") for r in range(n_repeats)]


def _analyze_production(
    runs: Sequence[MDResult], bias: FlatteningBias, equilibration_frames: int, temperature_K: float,
    state_b: StatePredicate, n_blocks: int, bin_width_deg: float,
) -> FlattenedEstimate:
    """Reweight the production frames after the equilibration (reduced bias energies, kT)."""
    phi = np.stack([r.dihedrals_rad["phi"][equilibration_frames:] for r in runs])
    bias_kJ_mol = np.stack([r.bias_energy_kJ_mol[equilibration_frames:] for r in runs])
    return analyze_flattened_umbrella(
        phi, reduced_energy(bias_kJ_mol, temperature_K), state_b=state_b,
        flattened_profile_kT=bias.flattened_profile_kT, n_blocks=n_blocks, bin_width_deg=bin_width_deg,
    )


def run_flattened_umbrella(
    system: openmm.System, topology: app.Topology, positions_nm: np.ndarray, *,
    dihedral_atoms: tuple[int, int, int, int], psi_atoms: tuple[int, int, int, int] | None,
    temperature_K: float, state_b: StatePredicate, out_dir: Path, seed: int = 0,
    stage1_spacing_deg: float = 10.0, stage1_k_kJ_per_mol_rad2: float = 200.0, stage1_steps_per_window: int = 20_000,
    stage1_equilibration_steps: int = 2_000, stage1_skip_ranges_deg: Sequence[tuple[float, float]] = ((115.0, 135.0),),
    stage1_bin_width_deg: float = 5.0, f_cap_kT: float = 18.0, production_steps: int = 5_000_000,
    production_equilibration_steps: int = 10_000, n_repeats: int = 2, n_blocks: int = 20,
    profile_bin_width_deg: float = 5.0, report_every: int = 100, timestep_fs: float = 1.0,
    friction_per_ps: float = 1.0, platform: str = "Reference", platform_properties: Mapping[str, str] | None = None,
    progress: bool = True, parallel: bool = True,
) -> FlattenedUmbrellaResult:
    """ΔF(A -> B) along the torsion phi of ``dihedral_atoms`` by adaptive umbrella sampling with a flattening bias.

    1. Stage 1: :func:`run_umbrella` with windows every ``stage1_spacing_deg`` (except those in
       ``stage1_skip_ranges_deg``), spring ``stage1_k_kJ_per_mol_rad2``, ``stage1_steps_per_window``
       after ``stage1_equilibration_steps``, gives a rough MBAR profile F(phi) in bins of
       ``stage1_bin_width_deg``.
    2. The bias ``V = -kT min(F, f_cap_kT)`` (:func:`flattening_bias`) is applied as a tabulated force.
    3. Stage 2: ``n_repeats`` independent biased runs of ``production_steps`` from ``positions_nm``
       (``[n_atoms, 3]`` nm), in parallel processes when ``parallel``; the first
       ``production_equilibration_steps`` of each are dropped.
    4. The frames are reweighted by ``exp(+V/kT)``: ΔF with its block jackknife over ``n_blocks``
       time blocks per repeat, each repeat's ΔF, the transitions and the profile in bins of
       ``profile_bin_width_deg``.

    ``state_b`` defines state B on phi (A is its complement) and ``temperature_K`` (K) is the
    temperature of every run and of the target ensemble. ``psi_atoms`` name a torsion to record,
    not biased. ``seed`` seeds every run, ``report_every``, ``timestep_fs``, ``friction_per_ps``,
    ``platform`` and ``platform_properties`` are the MD settings, and ``progress`` shows bars.
    Everything is written under ``out_dir`` (``stage1/``, ``production_<r>.h5`` with
    checkpoints, ``bias.json``) and reused by a second call; a larger ``production_steps`` extends
    the production runs (the stage-1 settings must be unchanged).
    """
    _check_steps("production_steps", production_steps, report_every, positive=True)
    _check_steps("production_equilibration_steps", production_equilibration_steps, report_every, positive=False)
    if production_equilibration_steps >= production_steps:
        raise ValueError("production_equilibration_steps must be smaller than production_steps")
    if n_repeats < 1:
        raise ValueError("n_repeats must be at least 1")
    out_dir, t_call = Path(out_dir), time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    pos0 = np.asarray(positions_nm, dtype=np.float64)
    md = dict(temperature_K=float(temperature_K), report_every=int(report_every), timestep_fs=float(timestep_fs),
              friction_per_ps=float(friction_per_ps), platform=platform,
              platform_properties=dict(platform_properties or {}))
    stage1 = run_umbrella(
        system, topology, pos0, dihedral_atoms=dihedral_atoms, psi_atoms=psi_atoms,
        k_kJ_per_mol_rad2=stage1_k_kJ_per_mol_rad2, steps_per_window=stage1_steps_per_window,
        equilibration_steps=stage1_equilibration_steps, seed=seed, out_dir=out_dir / "stage1", state_b=state_b,
        centers_rad=umbrella_windows(stage1_spacing_deg, stage1_skip_ranges_deg), bin_width_deg=stage1_bin_width_deg,
        progress=progress, **md,
    )
    profile = stage1.estimate.profile
    bias = flattening_bias(bin_centers(profile.edges[0]), profile.f_kT, kT_kJ_per_mol=kT_kJ_per_mol(temperature_K),
                           f_cap_kT=f_cap_kT)
    _write_bias_record(out_dir / "bias.json", bias)
    runs = _run_production(
        system, topology, pos0, flattening_bias_force(dihedral_atoms, bias), md, steps=production_steps,
        n_repeats=n_repeats, seed=seed, out_dir=out_dir, record_dihedrals=_torsions(dihedral_atoms, psi_atoms),
        extra={"flattening_bias_f_cap_kT": float(f_cap_kT)}, progress=progress, parallel=parallel,
    )
    t_analysis = time.perf_counter()
    est = _analyze_production(runs, bias, production_equilibration_steps // report_every, temperature_K, state_b,
                              n_blocks, profile_bin_width_deg)
    production_walls = [r.wall_seconds for r in runs]
    production_wall = max(production_walls) if parallel and n_repeats > 1 else sum(production_walls)
    production_evals = int(sum(r.energy_evaluations for r in runs))
    return FlattenedUmbrellaResult(
        estimate=est, stage1_profile=profile, stage1_delta_f_kT=stage1.estimate.delta_f_kT,
        stage1_stderr_kT=stage1.estimate.stderr_kT, stage1_centers_rad=stage1.centers_rad, bias=bias,
        energy_evaluations=stage1.energy_evaluations + production_evals,
        stage1_energy_evaluations=stage1.energy_evaluations, production_energy_evaluations=production_evals,
        wall_seconds=float(stage1.wall_seconds + production_wall + time.perf_counter() - t_analysis),
        call_wall_seconds=time.perf_counter() - t_call,
        production_h5=tuple(r.h5 for r in runs), stage1_h5=stage1.window_h5,
    )
