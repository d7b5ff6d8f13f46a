"""Umbrella sampling along a torsion: the molecular ΔF reference when plain MD cannot cross.

Two methods, both built on :func:`boltzgen.md.run_langevin` (OpenMM units at the edge, reduced
energies in results):

- :func:`run_umbrella` -> :class:`UmbrellaResult`: harmonic windows along the torsion, unbiased with
  MBAR (:func:`analyze_umbrella`);
- :func:`run_flattened_umbrella` -> :class:`FlattenedUmbrellaResult`: adaptive umbrella sampling.
  A short stage-1 window run gives a rough profile F(phi); long runs under the flattening bias
  ``-min(F, f_cap)`` (:func:`flattening_bias`) then cross between the basins many times and are
  reweighted by exp(+V/kT) (:func:`analyze_flattened_umbrella`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openmm
import openmm.app as app
from tqdm.auto import tqdm

from boltzgen.io import atomic_write_json
from boltzgen.md import (
    MDResult,
    checkpoint_start_positions,
    dihedral_rad,
    kT_kJ_per_mol,
    load_md,
    openmm_seed,
    run_langevin,
    wrap_angle,
)

_TWO_PI = 2.0 * math.pi

# ----------------------------------------------------------------------------------------------
# umbrella sampling along a torsion
# ----------------------------------------------------------------------------------------------


def umbrella_windows(
    spacing_deg: float | None = None,
    skip_ranges_deg: Sequence[tuple[float, float]] = (),
    *,
    k_kJ_per_mol_rad2: float | None = None,
    temperature_K: float = 300.0,
    spacing_in_sigmas: float = 1.5,
) -> np.ndarray:
    """Evenly spaced window centres covering the circle [-pi, pi).

    Args:
        spacing_deg: spacing between centres (deg); rounded down so that it divides 360 evenly.
            If None, derived from the spring: ``spacing_in_sigmas * sqrt(kT / k)``, the width of a
            window's distribution on a flat landscape, so neighbouring windows overlap. (On steep
            slopes a window's distribution shifts downhill, so keep the factor <= ~1.5.)
        skip_ranges_deg: closed intervals (lo, hi) in degrees, in [-180, 180], whose centres are
            left out. For alanine dipeptide REFERENCES.md advises leaving out phi ~ 120-130 deg
            (e.g. ``((110, 140),)``) unless psi is biased too.
        k_kJ_per_mol_rad2: spring constant (kJ/mol/rad^2), needed when ``spacing_deg`` is None.
        temperature_K: temperature for kT (K), used only with ``k_kJ_per_mol_rad2``.
        spacing_in_sigmas: spacing in units of the flat-landscape window width.

    Returns:
        [K] float64 centres in radians, increasing, in [-pi, pi).
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
    """Harmonic, periodic-aware torsion restraint ``0.5 k d(theta, theta0)^2`` (kJ/mol).

    ``d`` is the minimum-image angle difference, so the bias is continuous across +-pi.
    """
    force = openmm.CustomTorsionForce(
        "0.5*k_umb*min(dtheta, 2*pi - dtheta)^2; dtheta = abs(theta - theta0); pi = 3.141592653589793"
    )
    force.addGlobalParameter("k_umb", float(k_kJ_per_mol_rad2))
    force.addGlobalParameter("theta0", float(center_rad))
    force.addTorsion(*(int(a) for a in dihedral_atoms), [])
    return force


def umbrella_bias_kJ_mol(phi_rad: np.ndarray, centers_rad: np.ndarray, k_kJ_per_mol_rad2: float) -> np.ndarray:
    """Bias energies of samples under every window.

    Args:
        phi_rad: [N] torsion values (rad).
        centers_rad: [K] window centres (rad).
        k_kJ_per_mol_rad2: spring constant (kJ/mol/rad^2).

    Returns:
        [K, N] float64 bias energies (kJ/mol).
    """
    d = wrap_angle(np.asarray(phi_rad, dtype=np.float64)[None, :] - np.asarray(centers_rad, dtype=np.float64)[:, None])
    return 0.5 * float(k_kJ_per_mol_rad2) * d**2


@dataclass(frozen=True, eq=False)
class FreeEnergyProfile:
    """Free-energy profile along a periodic CV.

    Attributes:
        bin_centers_rad: [B] bin centres (rad).
        bin_edges_rad: [B + 1] bin edges (rad), from -pi to pi.
        f_kT: [B] ``-ln p_b`` of the bin probabilities (kT), shifted so that the lowest bin is 0;
            +inf for bins with no samples.
        stderr_kT: [B] MBAR's analytic standard error of ``f_kT[b] - f_kT[lowest]`` (kT); 0 at the
            lowest bin, NaN for empty bins.
    """

    bin_centers_rad: np.ndarray
    bin_edges_rad: np.ndarray
    f_kT: np.ndarray
    stderr_kT: np.ndarray


@dataclass(frozen=True, eq=False)
class UmbrellaEstimate:
    """MBAR estimates from umbrella-sampling data (see :func:`analyze_umbrella`).

    Attributes:
        delta_f_kT: ``F_B - F_A = -ln(p_B / p_A)`` (kT), A the complement of B.
        stderr_kT: MBAR's analytic standard error of ``delta_f_kT`` (kT).
        delta_f_halves_kT: (first half, second half) of every window's production data, each
            analysed on its own: a check of stationarity and of the analytic error.
        halves_stderr_kT: ``|first - second| / 2``, a crude independent-chunk standard error (kT).
        p_b: unbiased probability of state B.
        profile: :class:`FreeEnergyProfile` along the CV.
        statistical_inefficiency: [K] per-window g (in frames) used for subsampling.
        n_uncorrelated: [K] frames per window that went into MBAR.
    """

    delta_f_kT: float
    stderr_kT: float
    delta_f_halves_kT: tuple[float, float]
    halves_stderr_kT: float
    p_b: float
    profile: FreeEnergyProfile
    statistical_inefficiency: np.ndarray
    n_uncorrelated: np.ndarray


def _subsample(phi: np.ndarray, center: float, enabled: bool) -> tuple[np.ndarray, float]:
    """Indices of roughly uncorrelated frames of one window, and the statistical inefficiency."""
    from pymbar import timeseries  # lazy: pymbar prints a banner on import

    n = len(phi)
    if not enabled or n < 4:
        return np.arange(n), 1.0
    # The signed displacement from the centre is continuous across +-pi, unlike phi itself.
    s = wrap_angle(phi - center)
    if np.ptp(s) == 0.0:
        return np.arange(n), 1.0
    g = float(timeseries.statistical_inefficiency(s))
    idx = np.asarray(timeseries.subsample_correlated_data(s, g=g), dtype=int)
    return idx, g


def _mbar_estimate(
    phi_per_window: Sequence[np.ndarray],
    centers: np.ndarray,
    k: float,
    kT: float,
    state_b: Callable[[np.ndarray], np.ndarray],
    edges: np.ndarray,
    initial_f_k: np.ndarray | None = None,
) -> tuple[float, float, float, np.ndarray, np.ndarray, np.ndarray]:
    """MBAR on already subsampled data.

    Returns:
        (dF, stderr, p_B, f_bins [B], stderr_bins [B], window free energies f_k [K]).
    """
    from pymbar import MBAR

    phi = np.concatenate([np.asarray(p, dtype=np.float64) for p in phi_per_window])
    n_k = np.array([len(p) for p in phi_per_window], dtype=int)
    u_kn = umbrella_bias_kJ_mol(phi, centers, k) / kT
    # The unbiased potential is common to every window at one temperature, so it cancels in MBAR.
    # Centres are sorted, so BAR between neighbours is a cheap, good starting point.
    init = {"initialize": "BAR"} if initial_f_k is None else {"initial_f_k": initial_f_k}
    mbar = MBAR(u_kn, n_k, **init)
    u_target = np.zeros_like(phi)

    in_b = np.asarray(state_b(phi), dtype=bool)
    if in_b.shape != phi.shape:
        raise ValueError("state_b must map a [N] array of phi to a [N] boolean array")
    with np.errstate(divide="ignore"):
        res = mbar.compute_expectations(in_b.astype(np.float64), u_kn=u_target)
    p_b, sigma_b = float(np.ravel(res["mu"])[0]), float(np.ravel(res["sigma"])[0])
    if 0.0 < p_b < 1.0:
        delta_f = -math.log(p_b / (1.0 - p_b))
        # d/dp of -logit(p) is -1/(p(1-p)); A and B are complementary so this is exact error propagation.
        stderr = sigma_b / (p_b * (1.0 - p_b))
    else:
        delta_f, stderr = (math.inf if p_b <= 0.0 else -math.inf), math.nan

    n_bins = len(edges) - 1
    bin_idx = np.clip(np.digitize(phi, edges) - 1, 0, n_bins - 1)
    counts = np.bincount(bin_idx, minlength=n_bins)
    occupied = np.flatnonzero(counts > 0)
    f_bins = np.full(n_bins, np.inf)
    se_bins = np.full(n_bins, np.nan)
    indicators = (bin_idx[None, :] == occupied[:, None]).astype(np.float64)
    with np.errstate(divide="ignore"):  # pymbar takes log of the 0/1 indicators
        multi = mbar.compute_multiple_expectations(indicators, u_target, return_theta=True)
    mu = np.asarray(multi["mu"], dtype=np.float64)
    theta = np.asarray(multi["Theta"], dtype=np.float64)
    m = len(occupied)
    # pymbar 4.0's "covariances" output is the unscaled inner Theta block, so build Cov(mu_i, mu_j)
    # from the scaled Theta the same way pymbar builds its "sigma".
    cov = theta[:m, :m] + theta[m:, m:] - theta[:m, m:] - theta[m:, :m]
    with np.errstate(divide="ignore"):
        f_occ = -np.log(mu)
    ref = int(np.argmin(f_occ))
    # Var(ln p_b - ln p_r) by the delta method, with the MBAR covariance of the bin probabilities.
    var = (
        np.diag(cov) / mu**2
        + cov[ref, ref] / mu[ref] ** 2
        - 2.0 * cov[:, ref] / (mu * mu[ref])
    )
    f_bins[occupied] = f_occ - f_occ[ref]
    se_bins[occupied] = np.sqrt(np.clip(var, 0.0, None))
    return delta_f, stderr, p_b, f_bins, se_bins, np.asarray(mbar.f_k, dtype=np.float64)


def analyze_umbrella(
    phi_per_window: Sequence[np.ndarray],
    centers_rad: Sequence[float],
    k_kJ_per_mol_rad2: float,
    temperature_K: float,
    state_b: Callable[[np.ndarray], np.ndarray],
    *,
    bin_width_deg: float = 10.0,
    subsample: bool = True,
) -> UmbrellaEstimate:
    """Unbias umbrella windows along a torsion with MBAR (pymbar 4).

    Each window's series is subsampled by its statistical inefficiency (pymbar.timeseries) before
    MBAR; the first and second halves of every window are also analysed on their own.

    Args:
        phi_per_window: K arrays [N_k] of production torsion values (rad), in time order.
        centers_rad: [K] window centres (rad).
        k_kJ_per_mol_rad2: spring constant of the windows (kJ/mol/rad^2).
        temperature_K: temperature of all windows (K).
        state_b: vectorised predicate, [N] phi (rad) -> [N] bool; state A is its complement.
        bin_width_deg: bin width of the profile (deg); 360 must be a multiple of it (rounded).
        subsample: subsample correlated data before MBAR.

    Returns:
        :class:`UmbrellaEstimate`.
    """
    centers = np.asarray(centers_rad, dtype=np.float64)
    if len(phi_per_window) != len(centers):
        raise ValueError(f"{len(phi_per_window)} windows of data but {len(centers)} centres")
    kT = kT_kJ_per_mol(temperature_K)
    n_bins = max(1, int(round(360.0 / bin_width_deg)))
    edges = np.linspace(-math.pi, math.pi, n_bins + 1)

    picked, gs = [], []
    halves: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    for phi, c in zip(phi_per_window, centers):
        phi = np.asarray(phi, dtype=np.float64)
        idx, g = _subsample(phi, c, subsample)
        picked.append(phi[idx])
        gs.append(g)
        mid = len(phi) // 2
        for half, part in zip(halves, (phi[:mid], phi[mid:])):
            half.append(part[_subsample(part, c, subsample)[0]])

    delta_f, stderr, p_b, f_bins, se_bins, f_k = _mbar_estimate(
        picked, centers, k_kJ_per_mol_rad2, kT, state_b, edges
    )
    half_df = tuple(
        _mbar_estimate(h, centers, k_kJ_per_mol_rad2, kT, state_b, edges, initial_f_k=f_k)[0] for h in halves
    )
    return UmbrellaEstimate(
        delta_f_kT=float(delta_f),
        stderr_kT=float(stderr),
        delta_f_halves_kT=(float(half_df[0]), float(half_df[1])),
        halves_stderr_kT=float(abs(half_df[0] - half_df[1]) / 2.0),
        p_b=p_b,
        profile=FreeEnergyProfile(
            bin_centers_rad=0.5 * (edges[:-1] + edges[1:]),
            bin_edges_rad=edges,
            f_kT=f_bins,
            stderr_kT=se_bins,
        ),
        statistical_inefficiency=np.asarray(gs, dtype=np.float64),
        n_uncorrelated=np.array([len(p) for p in picked], dtype=int),
    )


@dataclass(frozen=True, eq=False)
class UmbrellaResult:
    """Output of :func:`run_umbrella`.

    Attributes:
        centers_rad: [K] window centres (rad), increasing.
        k_kJ_per_mol_rad2: spring constant (kJ/mol/rad^2).
        temperature_K: temperature of all windows (K).
        phi_per_window: K arrays [N] of production phi (rad), equilibration dropped.
        psi_per_window: K arrays [N] of production psi (rad), or None if psi was not recorded.
        potential_per_window: K arrays [N] of unbiased potential energy (kJ/mol).
        delta_f_kT, stderr_kT, delta_f_halves_kT, halves_stderr_kT, profile,
        statistical_inefficiency, n_uncorrelated: as in :class:`UmbrellaEstimate`.
        estimate: the full :class:`UmbrellaEstimate`.
        energy_evaluations: total MD steps, equilibration included.
        wall_seconds: wall-clock time of the MD (all windows, all resumed segments) plus analysis (s).
        window_h5: K trajectory files (mdtraj HDF5 layout), one per window.
    """

    centers_rad: np.ndarray
    k_kJ_per_mol_rad2: float
    temperature_K: float
    phi_per_window: tuple[np.ndarray, ...]
    psi_per_window: tuple[np.ndarray, ...] | None
    potential_per_window: tuple[np.ndarray, ...]
    delta_f_kT: float
    stderr_kT: float
    delta_f_halves_kT: tuple[float, float]
    halves_stderr_kT: float
    profile: FreeEnergyProfile
    statistical_inefficiency: np.ndarray
    n_uncorrelated: np.ndarray
    estimate: UmbrellaEstimate
    energy_evaluations: int
    wall_seconds: float
    window_h5: tuple[Path, ...]


def _window_order(centers: np.ndarray, phi0: float) -> list[list[int]]:
    """Two walks outward from the centre nearest ``phi0``: upward, then downward.

    Each walk starts from the initial configuration and visits neighbours in order, so every
    window starts close to its centre without crossing the +-pi seam.
    """
    start = int(np.argmin(np.abs(wrap_angle(centers - phi0))))
    return [list(range(start, len(centers))), list(range(start - 1, -1, -1))]


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
    state_b: Callable[[np.ndarray], np.ndarray],
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
    """Umbrella sampling along a torsion, one window at a time, unbiased with MBAR.

    Each window adds ``0.5 k d(phi, c)^2`` (minimum-image ``d``) and runs Langevin MD for
    ``equilibration_steps + steps_per_window`` steps. Windows are run in two walks outward from the
    centre nearest the start torsion; each window starts from the previous window's final
    configuration (fresh seeded velocities). Frames of the equilibration are stored in the window
    files but left out of the analysis. Finished windows and checkpoints in ``out_dir`` are reused
    when ``resume`` is True, and ``out_dir/umbrella.json`` gets the summary.

    Args:
        system, topology, positions_nm: as in :func:`run_langevin` ([n_atoms, 3] nm).
        dihedral_atoms: four atom indices of the biased torsion (phi).
        k_kJ_per_mol_rad2: spring constant (kJ/mol/rad^2).
        steps_per_window: production steps per window (multiple of ``report_every``).
        equilibration_steps: steps per window before production (multiple of ``report_every``).
        temperature_K: temperature of every window (K); energies are reduced at it.
        seed: base seed; window ``i`` uses a stream derived from (seed, i).
        out_dir: folder for the window trajectories, checkpoints and summary.
        state_b: vectorised predicate on phi (rad) defining state B; A is the complement.
        centers_rad: window centres (rad); default ``umbrella_windows(k_kJ_per_mol_rad2=k, ...)``.
        psi_atoms: optional second torsion to record (not biased).
        timestep_fs, friction_per_ps, report_every, platform, platform_properties: MD settings.
        bin_width_deg: profile bin width (deg).
        subsample: subsample by statistical inefficiency before MBAR.
        resume: reuse finished windows and checkpoints found in ``out_dir``; with a larger
            ``steps_per_window`` the existing windows are extended (same equilibration_steps and
            other settings required, else the checkpoints are refused with a ValueError).
        progress: show a tqdm progress bar over all MD steps.

    Returns:
        :class:`UmbrellaResult`.
    """
    if equilibration_steps < 0 or equilibration_steps % report_every:
        raise ValueError("equilibration_steps must be a non-negative multiple of report_every")
    if steps_per_window <= 0 or steps_per_window % report_every:
        raise ValueError("steps_per_window must be a positive multiple of report_every")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    centers = np.asarray(
        umbrella_windows(k_kJ_per_mol_rad2=k_kJ_per_mol_rad2, temperature_K=temperature_K)
        if centers_rad is None
        else centers_rad,
        dtype=np.float64,
    )
    if centers.ndim != 1 or len(centers) < 2:
        raise ValueError("need at least two window centres")
    order = np.argsort(centers)
    centers = wrap_angle(centers[order])
    pos0 = np.asarray(positions_nm, dtype=np.float64)
    n_eq = equilibration_steps // report_every
    steps_total = equilibration_steps + steps_per_window
    torsions: dict[str, Sequence[int]] = {"phi": dihedral_atoms}
    if psi_atoms is not None:
        torsions["psi"] = psi_atoms

    results: dict[int, MDResult] = {}
    with tqdm(
        total=len(centers) * steps_total, disable=not progress, unit="step", unit_scale=True, desc="umbrella"
    ) as bar:
        for walk in _window_order(centers, float(dihedral_rad(pos0, dihedral_atoms))):
            start = pos0
            for i in walk:
                bar.set_postfix(window=i, center_deg=f"{math.degrees(centers[i]):.1f}")
                ckpt = out_dir / f"window_{i:03d}.ckpt.h5"
                if resume:
                    # A window that was started before keeps its own start, so that a longer
                    # steps_per_window extends it instead of clashing with its checkpoint.
                    previous_start = checkpoint_start_positions(ckpt)
                    start = start if previous_start is None else previous_start
                res = run_langevin(
                    system,
                    topology,
                    start,
                    temperature_K=temperature_K,
                    steps=steps_total,
                    report_every=report_every,
                    seed=openmm_seed(seed, 1000 + i),
                    out_h5=out_dir / f"window_{i:03d}.h5",
                    timestep_fs=timestep_fs,
                    friction_per_ps=friction_per_ps,
                    platform=platform,
                    platform_properties=platform_properties,
                    checkpoint=ckpt,
                    resume=resume,
                    bias=umbrella_bias_force(dihedral_atoms, float(centers[i]), k_kJ_per_mol_rad2),
                    record_dihedrals=torsions,
                    extra_attrs={
                        "umbrella_center_rad": float(centers[i]),
                        "umbrella_k_kJ_per_mol_rad2": float(k_kJ_per_mol_rad2),
                        "umbrella_equilibration_frames": int(n_eq),
                    },
                    progress=False,
                    on_frame=lambda *_: bar.update(report_every),
                )
                # Frames loaded from a checkpoint or a finished file never reach on_frame.
                bar.n = sum(r.steps for r in results.values()) + res.steps
                bar.refresh()
                results[i] = res
                start = res.final_positions_nm

    windows = [results[i] for i in range(len(centers))]
    phi = tuple(r.dihedrals_rad["phi"][n_eq:] for r in windows)
    psi = tuple(r.dihedrals_rad["psi"][n_eq:] for r in windows) if psi_atoms is not None else None
    potential = tuple(r.potential_energy_kJ_mol[n_eq:] for r in windows)
    t_analysis = time.perf_counter()
    est = analyze_umbrella(
        phi, centers, k_kJ_per_mol_rad2, temperature_K, state_b, bin_width_deg=bin_width_deg, subsample=subsample
    )
    analysis_seconds = time.perf_counter() - t_analysis
    md_seconds = float(sum(r.wall_seconds for r in windows))
    result = UmbrellaResult(
        centers_rad=centers,
        k_kJ_per_mol_rad2=float(k_kJ_per_mol_rad2),
        temperature_K=float(temperature_K),
        phi_per_window=phi,
        psi_per_window=psi,
        potential_per_window=potential,
        delta_f_kT=est.delta_f_kT,
        stderr_kT=est.stderr_kT,
        delta_f_halves_kT=est.delta_f_halves_kT,
        halves_stderr_kT=est.halves_stderr_kT,
        profile=est.profile,
        statistical_inefficiency=est.statistical_inefficiency,
        n_uncorrelated=est.n_uncorrelated,
        estimate=est,
        energy_evaluations=int(sum(r.energy_evaluations for r in windows)),
        wall_seconds=md_seconds + analysis_seconds,
        window_h5=tuple(r.h5 for r in windows),
    )
    atomic_write_json(
        out_dir / "umbrella.json",
        {
            "centers_rad": centers.tolist(),
            "k_kJ_per_mol_rad2": float(k_kJ_per_mol_rad2),
            "temperature_K": float(temperature_K),
            "steps_per_window": int(steps_per_window),
            "equilibration_steps": int(equilibration_steps),
            "delta_f_kT": est.delta_f_kT,
            "stderr_kT": est.stderr_kT,
            "delta_f_halves_kT": list(est.delta_f_halves_kT),
            "halves_stderr_kT": est.halves_stderr_kT,
            "p_b": est.p_b,
            "statistical_inefficiency": est.statistical_inefficiency.tolist(),
            "n_uncorrelated": est.n_uncorrelated.tolist(),
            "profile": {
                "bin_centers_rad": est.profile.bin_centers_rad.tolist(),
                "f_kT": [None if not math.isfinite(v) else v for v in est.profile.f_kT.tolist()],
                "stderr_kT": [None if not math.isfinite(v) else v for v in est.profile.stderr_kT.tolist()],
            },
            "energy_evaluations": result.energy_evaluations,
            "wall_seconds": result.wall_seconds,
            "md_wall_seconds": md_seconds,
        },
    )
    return result


# ----------------------------------------------------------------------------------------------
# adaptive umbrella sampling with a flattening bias (Mezei 1987)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FlatteningBias:
    """A smooth periodic bias ``V(phi) = -kT * min(F(phi), F_cap)`` tabulated on [-pi, pi].

    Attributes:
        grid_rad: [G + 1] float64 grid from -pi to pi inclusive (uniform).
        energy_kJ_mol: [G + 1] float64 bias energies V on the grid (kJ/mol); the first and last
            values are equal (periodic). V <= 0 up to spline overshoot; V = -kT * F_cap where the
            profile was capped or empty.
        f_cap_kT: the cap of the flattened profile (kT).
        kT_kJ_per_mol: thermal energy the profile was scaled with (kJ/mol).
    """

    grid_rad: np.ndarray
    energy_kJ_mol: np.ndarray
    f_cap_kT: float
    kT_kJ_per_mol: float

    def _spline(self) -> Any:
        from scipy.interpolate import CubicSpline

        return CubicSpline(self.grid_rad, self.energy_kJ_mol, bc_type="periodic")

    def energy_at(self, phi_rad: np.ndarray | float) -> np.ndarray:
        """V(phi) in kJ/mol for any angles (rad), by the same periodic cubic spline of the table
        that OpenMM's periodic ``Continuous1DFunction`` uses (agrees to ~1e-6 kJ/mol)."""
        return np.asarray(self._spline()(wrap_angle(np.asarray(phi_rad, dtype=np.float64))), dtype=np.float64)

    def flattened_profile_kT(self, phi_rad: np.ndarray | float) -> np.ndarray:
        """The profile the bias cancels, ``min(F, F_cap) = -V / kT`` (kT), at angles ``phi_rad``."""
        return -self.energy_at(phi_rad) / self.kT_kJ_per_mol


def flattening_bias(
    centers_rad: Sequence[float] | np.ndarray,
    f_kT: Sequence[float] | np.ndarray,
    *,
    kT_kJ_per_mol: float,
    f_cap_kT: float = 18.0,
    n_grid: int = 360,
) -> FlatteningBias:
    """Build the flattening bias from a free-energy profile along a periodic angle.

    The profile is shifted to minimum 0 and capped at ``f_cap_kT``; non-finite values (empty
    bins) get the cap. A periodic cubic spline through the capped values at ``centers_rad`` is
    evaluated on ``n_grid + 1`` uniform points from -pi to pi and multiplied by ``-kT``.

    Args:
        centers_rad: [B] bin centres (rad), any order, distinct modulo 2 pi.
        f_kT: [B] free energies (kT); +inf/NaN for empty bins.
        kT_kJ_per_mol: thermal energy of the ensemble (kJ/mol).
        f_cap_kT: profile values above this (relative to the minimum) are not flattened (kT).
        n_grid: grid intervals of the table over 2 pi.

    Returns:
        :class:`FlatteningBias`.
    """
    from scipy.interpolate import CubicSpline

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
    f = np.where(finite, f - f[finite].min(), f_cap_kT)
    f = np.minimum(f, f_cap_kT)
    order = np.argsort(c)
    c, f = c[order], f[order]
    if np.any(np.diff(c) <= 0):
        raise ValueError("centers_rad must be distinct modulo 2 pi")
    spline = CubicSpline(np.append(c, c[0] + _TWO_PI), np.append(f, f[0]), bc_type="periodic")
    grid = np.linspace(-math.pi, math.pi, int(n_grid) + 1)
    x = c[0] + (grid - c[0]) % _TWO_PI  # into the spline's period [c0, c0 + 2 pi)
    f_grid = spline(x)
    f_grid[-1] = f_grid[0]  # -pi and pi are the same angle
    return FlatteningBias(
        grid_rad=grid,
        energy_kJ_mol=-float(kT_kJ_per_mol) * f_grid,
        f_cap_kT=float(f_cap_kT),
        kT_kJ_per_mol=float(kT_kJ_per_mol),
    )


def flattening_bias_force(dihedral_atoms: Sequence[int], bias: FlatteningBias) -> openmm.CustomCompoundBondForce:
    """OpenMM force ``V(phi)`` of a :class:`FlatteningBias` on one torsion (kJ/mol).

    The table goes into a periodic ``Continuous1DFunction`` on [-pi, pi] (so the force is smooth
    across the +-pi seam), evaluated at ``dihedral(p1, p2, p3, p4)`` of a 4-particle
    ``CustomCompoundBondForce`` (OpenMM's ``CustomTorsionForce`` takes no tabulated functions;
    ``dihedral()`` uses the same IUPAC sign convention as :func:`dihedral_rad`).
    """
    force = openmm.CustomCompoundBondForce(4, "flattening_bias(dihedral(p1, p2, p3, p4))")
    force.addTabulatedFunction(
        "flattening_bias",
        openmm.Continuous1DFunction([float(v) for v in bias.energy_kJ_mol], -math.pi, math.pi, True),
    )
    force.addBond([int(a) for a in dihedral_atoms], [])
    return force


@dataclass(frozen=True, eq=False)
class FlattenedEstimate:
    """Reweighted estimates from biased runs (see :func:`analyze_flattened_umbrella`).

    Attributes:
        delta_f_kT: ``F_B - F_A = -ln(sum_B w / sum_A w)`` over all repeats (kT), ``w = exp(+V/kT)``.
        stderr_kT: delete-one-block jackknife over the ``repeats * n_blocks`` time blocks (kT).
        repeat_delta_f_kT: each repeat's own ΔF (kT).
        repeat_stderr_kT: each repeat's own block-jackknife error (kT).
        repeat_spread_kT: sample standard deviation of ``repeat_delta_f_kT`` (kT); NaN for one repeat.
        transitions: per repeat, number of committed A<->B transitions: changes of the last visited
            *core*, a core being the part of a state within ``core_width_kT`` of the state's lowest
            flattened-profile value.
        p_b: reweighted probability of state B.
        n_samples: frames used (all repeats).
        n_eff: Kish effective sample count of the less populated state (weights only, no time
            correlation).
        profile: reweighted :class:`FreeEnergyProfile` along phi (``-ln`` of bin probabilities,
            minimum 0, +inf for empty bins), stderr by the same block jackknife (NaN where a
            leave-one-out replicate empties the bin or the bin is empty).
    """

    delta_f_kT: float
    stderr_kT: float
    repeat_delta_f_kT: tuple[float, ...]
    repeat_stderr_kT: tuple[float, ...]
    repeat_spread_kT: float
    transitions: tuple[int, ...]
    p_b: float
    n_samples: int
    n_eff: float
    profile: FreeEnergyProfile


def _count_transitions(labels: np.ndarray) -> int:
    """Changes of the last visited core in a label series (0 = core A, 1 = core B, -1 = neither)."""
    core = labels[labels >= 0]
    return int(np.count_nonzero(core[1:] != core[:-1])) if core.size > 1 else 0


def _jackknife_profile(bin_idx: np.ndarray, w: np.ndarray, n_bins: int, n_blocks: int) -> np.ndarray:
    """Block-jackknife stderr of ``-ln p_bin`` from [R, T] bin indices and weights."""
    r, t = bin_idx.shape
    size = t // n_blocks
    if size < 1:
        return np.full(n_bins, math.nan)
    hists = []
    for i in range(r):
        for j in range(n_blocks):
            sl = slice(j * size, (j + 1) * size)
            hists.append(np.bincount(bin_idx[i, sl], weights=w[i, sl], minlength=n_bins))
    h = np.asarray(hists)
    total = h.sum(axis=0)
    loo = total[None, :] - h
    with np.errstate(divide="ignore", invalid="ignore"):
        f = -np.log(loo / loo.sum(axis=1, keepdims=True))
    n = h.shape[0]
    ok = np.all(np.isfinite(f), axis=0)
    f = np.where(ok[None, :], f, 0.0)
    var = (n - 1) / n * np.sum((f - f.mean(axis=0)) ** 2, axis=0)
    return np.where(ok, np.sqrt(var), math.nan)


def analyze_flattened_umbrella(
    phi_rad: np.ndarray,
    bias_energy_kJ_mol: np.ndarray,
    *,
    temperature_K: float,
    state_b: Callable[[np.ndarray], np.ndarray],
    bias: FlatteningBias,
    n_blocks: int = 20,
    bin_width_deg: float = 5.0,
    core_width_kT: float = 2.0,
) -> FlattenedEstimate:
    """Reweight runs under a static bias to the unbiased ensemble and estimate ΔF(A -> B).

    Each frame gets ``log w = +V(phi)/kT`` (``V`` = ``bias_energy_kJ_mol``, the energy of the bias
    that was applied), which undoes the bias factor ``exp(-V/kT)`` of the biased ensemble.

    Args:
        phi_rad: [R, T] (or [T]) torsion per repeat and frame (rad), in time order.
        bias_energy_kJ_mol: same shape, bias energy of each frame (kJ/mol).
        temperature_K: temperature of the runs and of the target ensemble (K).
        state_b: vectorised predicate on phi (rad) for state B; A is the complement.
        bias: the bias that was applied (used to define the state cores for transition counts).
        n_blocks: time blocks per repeat for the jackknife.
        bin_width_deg: profile bin width (deg); 360 must be a multiple of it (rounded).
        core_width_kT: width of the state cores for transition counting (kT).

    Returns:
        :class:`FlattenedEstimate`.
    """
    from boltzgen.estimators import delta_f_blocked, free_energy_surface

    phi = np.atleast_2d(np.asarray(phi_rad, dtype=np.float64))
    log_w = np.atleast_2d(np.asarray(bias_energy_kJ_mol, dtype=np.float64)) / kT_kJ_per_mol(temperature_K)
    if phi.shape != log_w.shape:
        raise ValueError(f"phi_rad {phi.shape} and bias_energy_kJ_mol {log_w.shape} must have the same shape")
    in_b = np.asarray(state_b(phi.ravel()), dtype=bool).reshape(phi.shape)
    in_a = ~in_b
    est = delta_f_blocked(in_a, in_b, n_blocks=n_blocks, log_w=log_w)
    per_repeat = [delta_f_blocked(in_a[i], in_b[i], n_blocks=n_blocks, log_w=log_w[i]) for i in range(len(phi))]
    values = np.array([e.value for e in per_repeat])
    spread = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan

    # Cores: where the flattened profile is within core_width_kT of each state's lowest value.
    grid = np.linspace(-math.pi, math.pi, 3601)
    f_grid = bias.flattened_profile_kT(grid)
    grid_b = np.asarray(state_b(grid), dtype=bool)
    f_frames = -log_w  # = min(F, F_cap) of the frame's phi
    labels = np.full(phi.shape, -1, dtype=np.int8)
    for code, mask_grid, mask in ((0, ~grid_b, in_a), (1, grid_b, in_b)):
        if mask_grid.any():
            labels[mask & (f_frames <= f_grid[mask_grid].min() + core_width_kT)] = code
    transitions = tuple(_count_transitions(row) for row in labels)

    n_bins = max(1, int(round(360.0 / bin_width_deg)))
    edges = np.linspace(-math.pi, math.pi, n_bins + 1)
    fes = free_energy_surface(phi.ravel(), log_w=log_w.ravel(), bins=edges, n_bootstrap=0)
    bin_idx = np.clip(np.searchsorted(edges, phi, side="right") - 1, 0, n_bins - 1)
    w = np.exp(log_w - log_w.max())
    p_b = float(np.sum(w * in_b) / np.sum(w))
    return FlattenedEstimate(
        delta_f_kT=float(est.value),
        stderr_kT=float(est.stderr),
        repeat_delta_f_kT=tuple(float(v) for v in values),
        repeat_stderr_kT=tuple(float(e.stderr) for e in per_repeat),
        repeat_spread_kT=spread,
        transitions=transitions,
        p_b=p_b,
        n_samples=int(phi.size),
        n_eff=float(est.n_eff),
        profile=FreeEnergyProfile(
            bin_centers_rad=0.5 * (edges[:-1] + edges[1:]),
            bin_edges_rad=edges,
            f_kT=np.asarray(fes.f_kT, dtype=np.float64),
            stderr_kT=_jackknife_profile(bin_idx, w, n_bins, n_blocks),
        ),
    )


@dataclass(frozen=True, eq=False)
class FlattenedUmbrellaResult:
    """Output of :func:`run_flattened_umbrella`.

    Attributes:
        estimate: the production estimate (:class:`FlattenedEstimate`): ΔF with its block-jackknife
            error, each repeat's ΔF, transitions, p_B and the reweighted profile along phi.
        stage1_profile: the stage-1 MBAR profile the bias was built from.
        stage1_delta_f_kT, stage1_stderr_kT: the stage-1 MBAR ΔF and its analytic error (kT).
        bias: the :class:`FlatteningBias` applied in production.
        energy_evaluations: MD steps of stage 1 (with its equilibration) plus production.
        stage1_energy_evaluations, production_energy_evaluations: the two parts.
        wall_seconds: stage-1 MD + production MD (longest repeat when run in parallel, else the sum)
            + analysis, over all resumed segments (s).
        production_h5: trajectory files of the repeats (mdtraj HDF5 layout, with bias energies).
        stage1_h5: the stage-1 window files.
    """

    estimate: FlattenedEstimate
    stage1_profile: FreeEnergyProfile
    stage1_delta_f_kT: float
    stage1_stderr_kT: float
    bias: FlatteningBias
    energy_evaluations: int
    stage1_energy_evaluations: int
    production_energy_evaluations: int
    wall_seconds: float
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


def _none_if_not_finite(values: np.ndarray) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in np.asarray(values, dtype=np.float64).tolist()]


def run_flattened_umbrella(
    system: openmm.System,
    topology: app.Topology,
    positions_nm: np.ndarray,
    *,
    dihedral_atoms: tuple[int, int, int, int],
    psi_atoms: tuple[int, int, int, int] | None,
    temperature_K: float,
    state_b: Callable[[np.ndarray], np.ndarray],
    out_dir: Path,
    seed: int = 0,
    stage1_spacing_deg: float = 10.0,
    stage1_k_kJ_per_mol_rad2: float = 200.0,
    stage1_steps_per_window: int = 20_000,
    stage1_equilibration_steps: int = 2_000,
    stage1_skip_ranges_deg: Sequence[tuple[float, float]] = ((115.0, 135.0),),
    stage1_bin_width_deg: float = 5.0,
    f_cap_kT: float = 18.0,
    production_steps: int = 5_000_000,
    production_equilibration_steps: int = 10_000,
    n_repeats: int = 2,
    n_blocks: int = 20,
    profile_bin_width_deg: float = 5.0,
    report_every: int = 100,
    timestep_fs: float = 1.0,
    friction_per_ps: float = 1.0,
    platform: str = "Reference",
    platform_properties: Mapping[str, str] | None = None,
    progress: bool = True,
    parallel: bool = True,
) -> FlattenedUmbrellaResult:
    """ΔF(A -> B) along a torsion by adaptive umbrella sampling with a flattening bias.

    1. Stage 1: :func:`run_umbrella` with windows every ``stage1_spacing_deg`` (those in
       ``stage1_skip_ranges_deg`` left out) gives a rough MBAR profile F(phi) (kT).
    2. The bias ``V = -kT min(F, F_cap)`` (:func:`flattening_bias`, a periodic spline) is applied as
       a tabulated ``CustomTorsionForce`` (:func:`flattening_bias_force`).
    3. Stage 2: ``n_repeats`` independent biased Langevin runs of ``production_steps`` from
       ``positions_nm`` (seeds derived from ``seed``), in parallel processes ('spawn') when
       ``parallel``; the first ``production_equilibration_steps`` of each are dropped.
    4. Frames are reweighted by ``exp(+V/kT)`` (:func:`analyze_flattened_umbrella`): ΔF, its block
       jackknife error over all repeats, each repeat's ΔF, transition counts and the profile.

    Everything is written under ``out_dir`` (``stage1/``, ``production_<r>.h5`` with checkpoints,
    ``bias.json``, ``summary.json``) and reused on a second call: finished files are loaded, and
    interrupted runs continue from their checkpoints. A larger ``production_steps`` extends the
    production runs (the bias must be unchanged, i.e. the same stage-1 settings).

    Args:
        system, topology, positions_nm: OpenMM system, topology and [n_atoms, 3] start positions (nm).
        dihedral_atoms: four atoms of the biased torsion phi.
        psi_atoms: optional second torsion to record (not biased).
        temperature_K: temperature of every run and of the target ensemble (K).
        state_b: vectorised predicate on phi (rad) defining state B; A is the complement.
        out_dir: output folder.
        seed: base seed (stage-1 windows and repeats get derived streams).
        stage1_*: settings of the stage-1 umbrella run (see :func:`run_umbrella`); the profile is
            binned at ``stage1_bin_width_deg``.
        f_cap_kT: cap of the flattened profile (kT); higher regions keep ``F - F_cap`` of barrier.
        production_steps: MD steps per repeat (multiple of ``report_every``), equilibration included.
        production_equilibration_steps: leading steps of each repeat left out of the analysis.
        n_repeats: independent production runs.
        n_blocks: jackknife time blocks per repeat.
        profile_bin_width_deg: bin width of the reweighted profile (deg).
        report_every, timestep_fs, friction_per_ps, platform, platform_properties: MD settings.
        progress: show progress bars.
        parallel: run the repeats in separate processes at the same time.

    Returns:
        :class:`FlattenedUmbrellaResult`; ``out_dir/summary.json`` holds the same figures.
    """
    if production_steps <= 0 or production_steps % report_every:
        raise ValueError("production_steps must be a positive multiple of report_every")
    if production_equilibration_steps < 0 or production_equilibration_steps % report_every:
        raise ValueError("production_equilibration_steps must be a non-negative multiple of report_every")
    if production_equilibration_steps >= production_steps:
        raise ValueError("production_equilibration_steps must be smaller than production_steps")
    if n_repeats < 1:
        raise ValueError("n_repeats must be at least 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_call = time.perf_counter()
    kT = kT_kJ_per_mol(temperature_K)
    pos0 = np.asarray(positions_nm, dtype=np.float64)

    # --- stage 1: rough profile ------------------------------------------------------------
    stage1 = run_umbrella(
        system,
        topology,
        pos0,
        dihedral_atoms=dihedral_atoms,
        psi_atoms=psi_atoms,
        k_kJ_per_mol_rad2=stage1_k_kJ_per_mol_rad2,
        steps_per_window=stage1_steps_per_window,
        equilibration_steps=stage1_equilibration_steps,
        temperature_K=temperature_K,
        seed=seed,
        out_dir=out_dir / "stage1",
        state_b=state_b,
        centers_rad=umbrella_windows(stage1_spacing_deg, stage1_skip_ranges_deg),
        timestep_fs=timestep_fs,
        friction_per_ps=friction_per_ps,
        report_every=report_every,
        platform=platform,
        platform_properties=platform_properties,
        bin_width_deg=stage1_bin_width_deg,
        progress=progress,
    )
    bias = flattening_bias(
        stage1.profile.bin_centers_rad, stage1.profile.f_kT, kT_kJ_per_mol=kT, f_cap_kT=f_cap_kT
    )
    atomic_write_json(
        out_dir / "bias.json",
        {
            "grid_rad": bias.grid_rad.tolist(),
            "energy_kJ_mol": bias.energy_kJ_mol.tolist(),
            "f_cap_kT": bias.f_cap_kT,
            "kT_kJ_per_mol": bias.kT_kJ_per_mol,
        },
    )
    bias_force = flattening_bias_force(dihedral_atoms, bias)

    # --- stage 2: biased production ----------------------------------------------------------
    torsions: dict[str, Sequence[int]] = {"phi": tuple(dihedral_atoms)}
    if psi_atoms is not None:
        torsions["psi"] = tuple(psi_atoms)
    n_frames = production_steps // report_every
    jobs = [
        dict(
            system_xml=openmm.XmlSerializer.serialize(system),
            bias_xml=openmm.XmlSerializer.serialize(bias_force),
            topology=topology,
            positions_nm=pos0,
            temperature_K=float(temperature_K),
            steps=int(production_steps),
            report_every=int(report_every),
            seed=openmm_seed(seed, 5000 + r),
            out_h5=out_dir / f"production_{r}.h5",
            timestep_fs=float(timestep_fs),
            friction_per_ps=float(friction_per_ps),
            platform=platform,
            platform_properties=dict(platform_properties or {}),
            checkpoint=out_dir / f"production_{r}.ckpt.h5",
            # ~20 checkpoints per run: each rewrites all frames so far.
            checkpoint_every=max(1000, n_frames // 20),
            resume=True,
            record_dihedrals=torsions,
            extra_attrs={"flattening_bias_f_cap_kT": float(f_cap_kT), "repeat": int(r)},
            progress=progress,
        )
        for r in range(n_repeats)
    ]
    if parallel and n_repeats > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=n_repeats, mp_context=multiprocessing.get_context("spawn")) as pool:
            paths = list(pool.map(_production_worker, jobs))
    else:
        paths = [_production_worker(job) for job in jobs]
    runs = [load_md(Path(p)) for p in paths]

    # --- analysis ------------------------------------------------------------------------------
    t_analysis = time.perf_counter()
    n_eq = production_equilibration_steps // report_every
    phi = np.stack([r.dihedrals_rad["phi"][n_eq:] for r in runs])
    bias_energy = np.stack([r.bias_energy_kJ_mol[n_eq:] for r in runs])
    est = analyze_flattened_umbrella(
        phi,
        bias_energy,
        temperature_K=temperature_K,
        state_b=state_b,
        bias=bias,
        n_blocks=n_blocks,
        bin_width_deg=profile_bin_width_deg,
    )
    analysis_seconds = time.perf_counter() - t_analysis
    production_walls = [r.wall_seconds for r in runs]
    production_wall = max(production_walls) if parallel and n_repeats > 1 else sum(production_walls)
    stage1_evals = int(stage1.energy_evaluations)
    production_evals = int(sum(r.energy_evaluations for r in runs))
    result = FlattenedUmbrellaResult(
        estimate=est,
        stage1_profile=stage1.profile,
        stage1_delta_f_kT=stage1.delta_f_kT,
        stage1_stderr_kT=stage1.stderr_kT,
        bias=bias,
        energy_evaluations=stage1_evals + production_evals,
        stage1_energy_evaluations=stage1_evals,
        production_energy_evaluations=production_evals,
        wall_seconds=float(stage1.wall_seconds + production_wall + analysis_seconds),
        production_h5=tuple(r.h5 for r in runs),
        stage1_h5=stage1.window_h5,
    )
    spread = est.repeat_spread_kT
    atomic_write_json(
        out_dir / "summary.json",
        {
            "method": "flattened_umbrella",
            "temperature_K": float(temperature_K),
            "free_energies": [
                {
                    "from": "A",
                    "to": "B",
                    "delta_f_kT": est.delta_f_kT,
                    "stderr_kT": est.stderr_kT if math.isfinite(est.stderr_kT) else None,
                    "repeats_kT": list(est.repeat_delta_f_kT),
                    "repeats_stderr_kT": _none_if_not_finite(np.array(est.repeat_stderr_kT)),
                    "repeat_spread_kT": spread if math.isfinite(spread) else None,
                    "stderr_from_repeats_kT": spread / math.sqrt(n_repeats) if math.isfinite(spread) else None,
                    "p_b": est.p_b,
                    "n_eff": est.n_eff,
                    "error_method": f"block jackknife, {n_blocks} blocks x {n_repeats} repeats",
                }
            ],
            "profile": {
                "centers_rad": est.profile.bin_centers_rad.tolist(),
                "f_kT": _none_if_not_finite(est.profile.f_kT),
                "stderr_kT": _none_if_not_finite(est.profile.stderr_kT),
                "source": "production, reweighted by exp(+V/kT)",
            },
            "stage1": {
                "delta_f_kT": stage1.delta_f_kT,
                "stderr_kT": stage1.stderr_kT,
                "centers_rad": stage1.centers_rad.tolist(),
                "k_kJ_per_mol_rad2": float(stage1_k_kJ_per_mol_rad2),
                "steps_per_window": int(stage1_steps_per_window),
                "equilibration_steps": int(stage1_equilibration_steps),
                "profile": {
                    "centers_rad": stage1.profile.bin_centers_rad.tolist(),
                    "f_kT": _none_if_not_finite(stage1.profile.f_kT),
                    "stderr_kT": _none_if_not_finite(stage1.profile.stderr_kT),
                },
            },
            "settings": {
                "f_cap_kT": float(f_cap_kT),
                "production_steps": int(production_steps),
                "production_equilibration_steps": int(production_equilibration_steps),
                "n_repeats": int(n_repeats),
                "n_blocks": int(n_blocks),
                "report_every": int(report_every),
                "timestep_fs": float(timestep_fs),
                "friction_per_ps": float(friction_per_ps),
                "platform": platform,
                "seed": int(seed),
                "parallel": bool(parallel),
            },
            "energy_evaluations": {
                "umbrella": stage1_evals,
                "production": production_evals,
                "total": stage1_evals + production_evals,
            },
            "wall_seconds": result.wall_seconds,
            "call_wall_seconds": time.perf_counter() - t_call,
            "transitions": list(est.transitions),
            "n_samples": est.n_samples,
            "production_h5": [str(p) for p in result.production_h5],
        },
    )
    return result
