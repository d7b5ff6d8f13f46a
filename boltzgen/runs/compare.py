"""`boltzgen compare`: the methods available for a run, side by side (report.md, compare.json, plots).

Methods, each present only when its files are:

- **importance sampling**: the sample summary (from ``boltzgen sample``) if present, else the
  sampling part of the train summary; samples from the file the summary names, with their raw
  ``log_w``.
- **MCMC**: every ``mcmc*/`` folder (``boltzgen mcmc``, ``--out <run>/mcmc_hmc`` etc.) with its chains.
- **MD**: the MD folder's summary (or ``--md DIR``) with its trajectory for molecules; for analytic
  systems, the baseline MALA block of the train summary (no data file is kept for it).
- **umbrella sampling**: every ``umbrella*/`` folder's summary (the flattening bias along phi, windows on
  a grid of one or two CVs), or the ``umbrella`` block of the train summary.
- **replica exchange**: the ``remd/`` folder's summary, with its reweighted frames.
- **exact**: quadrature, for analytic systems.

A baseline is one function in :data:`BASELINES` that reads its summary and appends its row (and its
profile on the shared bins, when it has samples or a profile); nothing else needs to know it.

Every pair of methods is compared (:mod:`boltzgen.runs.pairs`): the difference of their ΔF in combined standard errors
(``sqrt(se_a^2 + se_b^2)``; a pair more than 3 apart is flagged, in the table and in ``pairs`` of the
JSON) and the RMSE between their profiles along the first CV, over the bins both populate.

Reference for the FES RMSE and the Jensen-Shannon divergence: the exact quadrature density for
analytic systems, MD (reweighted to the target temperature if run at another one) for molecules.

Cost to reach a ΔF standard error of 0.1 kT: the statistical error of every method here is assumed
to fall as ``1/sqrt(cost)``, so ``cost_0.1 = fixed + variable * (stderr / 0.1)^2``. ``variable`` is
what the method spent itself (sampling, chains, MD, windows); ``fixed`` is a one-off cost that does
not grow with the sample size: the flow's training and the MD (or MALA) of its training data, for
importance sampling and MCMC. The same
scaling is applied to energy evaluations and to wall seconds. It ignores the bias of a method
(e.g. MD that never crosses a barrier has a small error bar around a wrong answer), and for
importance sampling it holds only when the weights have a finite variance (Pareto k̂ < 0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from boltzgen import plots
from boltzgen.config import OpenMMSystem, load_config
from boltzgen.errors import RunError
from boltzgen.estimators.histograms import FreeEnergySurface, fes_rmse, free_energy_surface, jensen_shannon
from boltzgen.estimators.weights import normalized_weights
from boltzgen.files import atomic_write_json, atomic_write_text, json_safe
from boltzgen.runs.rundir import MDDir, RunDir
from boltzgen.runs.sample import shifted_free_energy
from boltzgen.runs.summaries import (
    BaselineSummary,
    FreeEnergyRow,
    MCMCSummary,
    MDSummary,
    RemdSummary,
    SampleSummary,
    TrainSummary,
    UmbrellaSummary,
)
from boltzgen.runs.pairs import DISAGREE_SIGMA, compare_pairs, pairs_table
from boltzgen.runs.target import Target, build_target
from boltzgen.runs.umbrella import md_log_weights
from boltzgen.states import backbone_torsions, resolve_states
from boltzgen.trajectory import iter_positions, read_datasets, read_topology

TARGET_STDERR_KT = 0.1
#: a reference bin is "populated" when it holds at least this fraction of the probability
POPULATED = 1e-4
#: a method's bin enters the FES RMSE only with at least this many effective samples: a bin whose
#: F rests on one or two heavy importance weights is noise, not a measurement
MIN_BIN_SAMPLES = 10.0
BINS_2D = 60
CHUNK_FRAMES = 500_000
UMBRELLA = "umbrella sampling (flattening bias)"

Curve = tuple[str, np.ndarray, np.ndarray, np.ndarray | None]
Panel = tuple[str, np.ndarray, np.ndarray, np.ndarray]


class _Grid:
    """Bins shared by all methods: 1-D along the first CV, 2-D over the first two CVs, and the reference."""

    def __init__(self, names: list[str], ranges: list[tuple[float, float]], bins_1d: int) -> None:
        self.names = names
        self.edges_1d = np.linspace(*ranges[0], bins_1d + 1)
        self.edges_2d = [np.linspace(*ranges[0], BINS_2D + 1), np.linspace(*ranges[1], BINS_2D + 1)]
        self.centers_1d = 0.5 * (self.edges_1d[1:] + self.edges_1d[:-1])
        self.ref_f1: np.ndarray | None = None
        self.ref_p1: np.ndarray | None = None
        self.ref_h2: np.ndarray | None = None
        self.ref_label = ""

    def histograms(self, cvs: dict[str, np.ndarray], log_w: np.ndarray | None) -> tuple[FreeEnergySurface, np.ndarray]:
        a, b = self.names[0], self.names[1]
        fes = free_energy_surface(cvs[a], log_w=log_w, bins=self.edges_1d, n_bootstrap=20, rng=0)
        weights = None if log_w is None else normalized_weights(log_w)
        h2, _, _ = np.histogram2d(cvs[a], cvs[b], bins=self.edges_2d, weights=weights)
        return fes, h2

    def set_reference(self, label: str, f1: np.ndarray, p1: np.ndarray, h2: np.ndarray) -> None:
        self.ref_label, self.ref_f1, self.ref_p1, self.ref_h2 = label, f1, p1 / p1.sum(), h2

    def scores(self, f1: np.ndarray, h2: np.ndarray | None, n_eff: np.ndarray | None = None) -> dict[str, Any]:
        """FES RMSE over populated reference bins (after the best constant shift) and JS divergence of the 2-D histograms.

        Bins the method left empty are counted as missing; bins it holds with fewer than
        :data:`MIN_BIN_SAMPLES` effective samples (``n_eff``) are counted as sparse; neither enters the RMSE.
        """
        out: dict[str, Any] = {"fes_rmse_kT": None, "fes_bins_compared": 0, "fes_bins_missing": 0,
                               "fes_bins_sparse": 0, "js_divergence": None}
        if self.ref_f1 is None:
            return out
        populated = (self.ref_p1 >= POPULATED) & np.isfinite(self.ref_f1)
        finite = np.isfinite(f1)
        dense = finite if n_eff is None else finite & (n_eff >= MIN_BIN_SAMPLES)
        mask = populated & dense
        out["fes_bins_compared"] = int(mask.sum())
        out["fes_bins_missing"] = int((populated & ~finite).sum())
        out["fes_bins_sparse"] = int((populated & finite & ~dense).sum())
        if mask.any():
            out["fes_rmse_kT"] = fes_rmse(np.where(mask, f1, 0.0), np.where(mask, self.ref_f1, 0.0), mask)
        if h2 is not None and self.ref_h2 is not None and h2.sum() > 0:
            out["js_divergence"] = jensen_shannon(h2, self.ref_h2)
        return out

    def profile_on_grid(self, centers: np.ndarray, f: np.ndarray,
                        stderr: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A profile ``-ln p`` (kT) at ``centers`` mapped onto the 1-D bins: finer bins are merged by
        adding their probabilities (``inf`` where no centre falls), with the error propagated as from
        independent bins. Returns ``(f [bins], stderr [bins])``."""
        n = len(self.centers_1d)
        f = np.asarray(f, dtype=np.float64)
        se = np.full(f.shape, np.nan) if stderr is None else np.asarray(stderr, dtype=np.float64)
        idx = np.clip(np.searchsorted(self.edges_1d, centers, side="right") - 1, 0, n - 1)
        finite = np.isfinite(f)
        if not finite.any():
            return np.full(n, np.inf), np.full(n, np.nan)
        p = np.where(finite, np.exp(-(np.where(finite, f, 0.0) - f[finite].min())), 0.0)
        total = np.bincount(idx, weights=p, minlength=n)
        with np.errstate(divide="ignore", invalid="ignore"):
            merged = -np.log(total)
            merged_se = np.sqrt(np.bincount(idx, weights=(p * np.where(np.isfinite(se), se, np.nan)) ** 2,
                                            minlength=n)) / total
        return merged, np.where(total > 0, merged_se, np.nan)


@dataclass
class _Comparison:
    """What `compare` collects: the rows of the table, and the curves and panels of its plots."""

    name: str
    run: RunDir
    target: Target
    grid: _Grid
    train: TrainSummary | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    curves: list[Curve] = field(default_factory=list)
    panels: list[Panel] = field(default_factory=list)
    #: each method's profile on the shared 1-D bins and its effective samples per bin (None: unknown)
    profiles: dict[str, tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict)

    @property
    def molecule(self) -> bool:
        return self.target.torsions is not None

    @property
    def training_cost(self) -> dict[str, Any]:
        """The flow's training, with the MD or MALA that made its training data, as the fixed cost of
        the flow-based methods."""
        if self.train is None:
            return {"fixed_energy_evaluations": None, "fixed_wall_seconds": None}
        data = self.train.baseline.training_data if self.train.baseline is not None else {}
        return {"fixed_energy_evaluations": self.train.energy_evaluations.get("training", 0)
                + int(data.get("energy_evaluations", 0)),
                "fixed_wall_seconds": self.train.training_wall_seconds + float(data.get("wall_seconds", 0.0))}

    def read_cvs(self, path: Path) -> dict[str, np.ndarray]:
        """The first two CVs of every frame of a trajectory file, read in chunks."""
        if self.molecule and self.target.torsions == {}:
            self.target.torsions = backbone_torsions(read_topology(path))
        parts = [self.target.cvs(x) for x in iter_positions(path, CHUNK_FRAMES)]
        return {name: np.concatenate([p[name] for p in parts]) if parts else np.zeros(0) for name in self.grid.names}

    def score(self, row: dict[str, Any], label: str, cvs: dict[str, np.ndarray], log_w: np.ndarray | None) -> None:
        """FES and JS scores of a method's samples against the reference, and its curves for the plots."""
        fes, h2 = self.grid.histograms(cvs, log_w)
        row.update(self.grid.scores(np.asarray(fes.f_kT), h2, np.asarray(fes.n_eff)))
        self.profiles[row["method"]] = (np.asarray(fes.f_kT), np.asarray(fes.n_eff))
        self.add_curves(label, fes, h2)

    def add_curves(self, label: str, fes: FreeEnergySurface, h2: np.ndarray | None) -> None:
        self.curves.append((label, self.grid.centers_1d, np.asarray(fes.f_kT), np.asarray(fes.stderr_kT)))
        if h2 is not None:
            self.panels.append((label, self.grid.edges_2d[0], self.grid.edges_2d[1], shifted_free_energy(h2 / h2.sum())))


def _row(method: str, source: Path | str, free_energies: list[FreeEnergyRow], **fields: Any) -> dict[str, Any]:
    fe_rows = [r.to_json() for r in free_energies]
    first = free_energies[0] if free_energies else None
    row: dict[str, Any] = {"method": method, "source": str(source), "free_energies": fe_rows,
                           "delta_f_kT": None if first is None else first.delta_f_kT,
                           "stderr_kT": None if first is None else first.stderr_kT,
                           "fes_rmse_kT": None, "fes_bins_compared": 0, "fes_bins_missing": 0, "fes_bins_sparse": 0,
                           "js_divergence": None}
    row.update(fields)
    return row


def _cost(row: dict[str, Any]) -> None:
    """Fill ``cost_to_0.1kT`` = fixed + variable * (stderr / 0.1)^2, for evaluations and wall seconds."""
    se = row.get("stderr_kT")
    factor = (se / TARGET_STDERR_KT) ** 2 if isinstance(se, (int, float)) and math.isfinite(se) and se > 0 else None
    cost: dict[str, Any] = {"energy_evaluations": None, "wall_seconds": None, "factor": factor}
    if factor is not None:
        for key, fixed_key in (("energy_evaluations", "fixed_energy_evaluations"), ("wall_seconds", "fixed_wall_seconds")):
            value = row.get(key)
            if value is not None:
                cost[key] = (row.get(fixed_key) or 0) + value * factor
    row["cost_to_0.1kT"] = cost


def _ess_from_tau(n: int | None, taus: dict[str, float] | None, kish: float = 1.0) -> float | None:
    values = list((taus or {}).values())
    if not n or not values:
        return None
    tau = max(math.inf if math.isnan(t) else t for t in values)  # NaN: an infinite tau written as null
    return (n * kish / tau) if math.isfinite(tau) and tau > 0 else 0.0


def _read_optional(kind: type, path: Path) -> Any:
    return kind.read(path) if path.is_file() else None


# --- the methods -------------------------------------------------------------------------------------

def _add_exact(c: _Comparison) -> dict[tuple[str, str], float] | None:
    exact = c.target.exact_free_energies()
    if exact is None:
        return None
    energy, grid = c.target.energy, c.grid
    p2 = energy.bin_probabilities(*grid.edges_2d)
    p1 = energy.bin_probabilities(grid.edges_1d, grid.edges_2d[1]).sum(axis=1)
    f1 = shifted_free_energy(p1 / np.diff(grid.edges_1d))
    grid.set_reference("exact quadrature", f1, p1, p2)
    c.profiles["exact (quadrature)"] = (f1, None)
    c.curves.append(("exact (quadrature)", grid.centers_1d, f1, None))
    c.panels.append(("exact (quadrature)", grid.edges_2d[0], grid.edges_2d[1], shifted_free_energy(p2)))
    rows = [FreeEnergyRow(from_=a, to=b, delta_f_kT=v, stderr_kT=0.0) for (a, b), v in exact.items()]
    c.rows.append(_row("exact (quadrature)", "quadrature on the box", rows, ess=None, energy_evaluations=None,
                       wall_seconds=None, reference=True))
    return exact


def _add_md(c: _Comparison, md: MDDir) -> None:
    """Plain MD of a molecule: the reference of the FES scores when its trajectory is there."""
    md_summary = _read_optional(MDSummary, md.summary)
    baseline = c.train.baseline if c.train is not None else None
    if not c.molecule or (md_summary is None and baseline is None):
        return
    trajectory = md.trajectory
    if md_summary is not None:
        row = _row("MD (plain Langevin)", md.summary, md_summary.free_energies,
                   ess=_ess_from_tau(md_summary.n_samples, md_summary.tau_int_frames, md_summary.ess),
                   n_samples=md_summary.n_samples, energy_evaluations=md_summary.energy_evaluations.get("total"),
                   wall_seconds=md_summary.md_wall_seconds, reference=False)
    else:
        if not trajectory.is_file() and baseline.h5:
            trajectory = Path(baseline.h5[0])  # the plain MD file comes first
        row = _row("MD (plain Langevin)", f"{c.run.summary} (baseline)", baseline.free_energies, ess=None,
                   n_samples=baseline.n_samples, energy_evaluations=baseline.energy_evaluations,
                   wall_seconds=baseline.wall_seconds, reference=False)
    if trajectory.is_file():
        cvs = c.read_cvs(trajectory)
        log_w = md_log_weights(trajectory)
        fes, h2 = c.grid.histograms(cvs, log_w)
        weights = None if log_w is None else normalized_weights(log_w)
        p1 = np.histogram(cvs[c.grid.names[0]], bins=c.grid.edges_1d, weights=weights)[0]
        c.grid.set_reference("MD", np.asarray(fes.f_kT), p1.astype(float), h2)
        c.profiles[row["method"]] = (np.asarray(fes.f_kT), np.asarray(fes.n_eff))
        row["reference"] = True
        c.add_curves("MD", fes, h2)
    c.rows.append(row)


def _add_importance_sampling(c: _Comparison, sample: SampleSummary | None) -> None:
    if sample is not None:
        block, source = sample, c.run.sample_summary
        evaluations, wall = sample.energy_evaluations["total"], sample.wall_seconds
        samples = c.run.resolve(sample.samples_file)
    elif c.train is not None:
        block, source = c.train, c.run.summary
        evaluations, wall, samples = c.train.energy_evaluations.get("sampling"), c.train.sampling_wall_seconds, c.run.samples
    else:
        return
    # An estimated log-det (residual flows) puts its noise into every weight: the row says so.
    log_det = block.log_det
    method = "importance sampling (flow)" if log_det is None else "importance sampling (flow, estimated log-det)"
    row = _row(method, source, block.free_energies, ess=block.ess * block.n_samples,
               n_samples=block.n_samples, energy_evaluations=evaluations, wall_seconds=wall, **c.training_cost,
               pareto_khat=block.pareto_khat, weights=getattr(block, "weights", "raw"),
               log_det=None if log_det is None else log_det.to_json())
    if samples.is_file():
        c.score(row, "importance sampling", c.read_cvs(samples), read_datasets(samples, ["log_w"])["log_w"])
    c.rows.append(row)


def _add_mcmc(c: _Comparison) -> None:
    for folder in c.run.mcmc_runs():
        block = MCMCSummary.read(folder.summary)
        label = f"MCMC ({block.moves})" + ("" if folder.path.name == "mcmc" else f" [{folder.path.name}]")
        row = _row(label, folder.summary, block.free_energies, ess=block.ess_samples, n_samples=block.n_samples,
                   energy_evaluations=block.energy_evaluations["total"], wall_seconds=block.wall_seconds,
                   **c.training_cost, acceptance_rate=block.acceptance_rate)
        if folder.chains.is_file():
            c.score(row, label, c.read_cvs(folder.chains), None)
        c.rows.append(row)


def _add_mala(c: _Comparison) -> None:
    """The analytic baseline, MALA: it keeps no samples on disk, so it has no FES/JS scores."""
    if c.molecule or c.train is None:
        return
    block: BaselineSummary = c.train.baseline
    c.rows.append(_row(f"{block.source} (local MCMC)", f"{c.run.summary} (baseline)", block.free_energies, ess=None,
                       n_samples=block.n_samples, energy_evaluations=block.energy_evaluations,
                       wall_seconds=block.wall_seconds))


def _add_umbrellas(c: _Comparison) -> None:
    """Every ``umbrella*/`` folder; the train summary's umbrella block when its folder is gone."""
    found = [(folder.summary, UmbrellaSummary.read(folder.summary)) for folder in c.run.umbrella_runs()]
    if not any(path == c.run.umbrella.summary for path, _ in found) and c.train is not None and c.train.umbrella:
        found.insert(0, (c.run.umbrella.summary, c.train.umbrella))
    for source, umbrella in found:
        _add_umbrella(c, source, umbrella)


def _add_umbrella(c: _Comparison, source: Path, umbrella: UmbrellaSummary) -> None:
    """One umbrella sampling: its row, its profile along the first CV of the grid, its 2-D surface."""
    label = umbrella.label
    row = _row(label, source, umbrella.free_energies, ess=None, n_samples=umbrella.n_samples,
               energy_evaluations=umbrella.energy_evaluations.get("total"), wall_seconds=umbrella.wall_seconds,
               warnings=umbrella.warnings)
    cv = c.grid.names[0]
    profile = (umbrella.profiles or {}).get(cv) or (umbrella.profile if (umbrella.profile.cv or "phi") == cv else None)
    if profile is not None:
        centers = np.asarray(profile.centers_rad, dtype=float)
        f, se = np.asarray(profile.f_kT, dtype=float), np.asarray(profile.stderr_kT, dtype=float)
        f_grid, _ = c.grid.profile_on_grid(centers, f, se)
        row.update(c.grid.scores(f_grid, None))
        c.profiles[label] = (f_grid, None)
        c.curves.append((label, centers, f, se))
    surface = umbrella.fes_2d
    if surface is not None and surface.cvs == c.grid.names[:2]:
        f2 = np.asarray(surface.f_kT, dtype=float)
        c.panels.append((label, np.asarray(surface.edges[0]), np.asarray(surface.edges[1]), f2))
    c.rows.append(row)


def _add_remd(c: _Comparison) -> None:
    """Temperature replica exchange: its row, and its frames reweighted to the target for the FES."""
    remd = _read_optional(RemdSummary, c.run.remd.summary)
    if remd is None:
        return
    label = "replica exchange (MBAR)"
    row = _row(label, c.run.remd.summary, remd.free_energies, ess=remd.n_eff, n_samples=remd.n_samples,
               energy_evaluations=remd.energy_evaluations.get("total"), wall_seconds=remd.wall_seconds)
    samples = c.run.resolve(remd.samples_file)
    if samples.is_file():
        c.score(row, label, c.read_cvs(samples), read_datasets(samples, ["log_w"])["log_w"])
    c.rows.append(row)


#: The baselines beside the flow, in table order: each reads its own summary and adds its row.
BASELINES = (_add_mala, _add_umbrellas, _add_remd)


# --- the command ---------------------------------------------------------------------------------------

def _comparison(run: RunDir) -> _Comparison:
    """The run's states and CVs, the shared bins, and its train summary."""
    if not run.path.is_dir():
        raise RunError(f"{run.path}: no such run directory; create one with `boltzgen train CONFIG --out {run.path}`")
    if not run.config.is_file():
        raise RunError(f"{run.path}: no {run.config.name}; is this a run directory written by `boltzgen train`?")
    config, _ = load_config(run.config)
    if len(config.states) < 2:
        raise RunError(f"{run.config}: states: needs at least two states to compare ΔF")
    if isinstance(config.system, OpenMMSystem):
        # The torsions come from the first trajectory read: comparing needs no force field.
        target = Target(None, resolve_states(config.states), torsions={})
        grid = _Grid(list(target.plotted_torsions()), [(-math.pi, math.pi)] * 2, 36)
    else:
        target = build_target(config)
        box = target.energy.box
        grid = _Grid(["x0", "x1"], list(zip(box.lower, box.upper)), 60)
    return _Comparison(config.name, run, target, grid, _read_optional(TrainSummary, run.summary))


def compare_job(run: RunDir, md_dir: Path | None = None) -> dict[str, Any]:
    """`boltzgen compare`: write the report, compare.json and the compare plots into the run directory.

    Returns the content of compare.json plus ``table_markdown``, ``report`` and ``json`` (paths).
    """
    c = _comparison(run)
    md = MDDir(Path(md_dir)) if md_dir is not None else run.md
    if md_dir is not None and not md.path.is_dir():
        raise RunError(f"--md {md.path}: no such directory")
    exact = _add_exact(c)
    _add_md(c, md)
    _add_importance_sampling(c, _read_optional(SampleSummary, run.sample_summary))
    _add_mcmc(c)
    for add in BASELINES:
        add(c)
    if all(r["method"].startswith("exact") for r in c.rows):
        raise RunError(f"{run.path}: no results to compare; run `boltzgen train`, `boltzgen sample` or `boltzgen mcmc` first")
    pair = c.target.pairs[0]
    for row in c.rows:
        if row["method"].startswith("exact"):
            continue
        _cost(row)
        if exact is not None and row.get("delta_f_kT") is not None:
            row["error_vs_exact_kT"] = row["delta_f_kT"] - exact[pair]
    pair_label = f"{pair[0]}→{pair[1]}"
    pairs = compare_pairs(c.rows, c.profiles, pair, min_probability=POPULATED, min_samples=MIN_BIN_SAMPLES)
    plot_files = _plots(c, pair_label)
    table = _table(c.rows, pair_label, exact is not None) + "\n\n" + pairs_table(pairs, pair_label)
    result = json_safe({
        "name": c.name, "pair": list(pair),
        "reference": c.grid.ref_label or None, "target_stderr_kT": TARGET_STDERR_KT,
        "cost_scaling": "cost_0.1 = fixed + variable * (stderr / 0.1)^2 (error ~ 1/sqrt(cost); fixed = flow training)",
        "disagree_sigma": DISAGREE_SIGMA, "disagreements": [p for p in pairs if p["disagree"]],
        "methods": c.rows, "pairs": pairs, "plots": [str(p) for p in plot_files],
        "exact_kT": None if exact is None else {f"{a}→{b}": v for (a, b), v in exact.items()},
    })
    atomic_write_json(run.compare_json, result)
    atomic_write_text(run.report, _report_markdown(result["name"], table, c, plot_files))
    return {**result, "table_markdown": table, "report": str(run.report), "json": str(run.compare_json)}


def _plots(c: _Comparison, pair_label: str) -> list[Path]:
    c.run.plots.mkdir(parents=True, exist_ok=True)
    files = [plots.delta_f_comparison(c.rows, pair_label, c.run.plot("compare_delta_f"))]
    labels = ("phi [rad]", "psi [rad]") if c.molecule else ("x0", "x1")
    if c.curves:
        files.append(plots.free_energy_profiles(c.curves, c.run.plot("compare_fes"), xlabel=labels[0]))
    if c.panels:
        files.append(plots.fes_2d(c.panels, c.run.plot("compare_fes_2d"), labels=labels))
    return files


# --- output ------------------------------------------------------------------------------------------

def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if spec == ".3g" and isinstance(value, (int, float)) and abs(value) >= 1000:
        return f"{value:,.0f}" if abs(value) < 1e7 else f"{value:.3g}"
    return format(value, spec)


def _table(rows: list[dict[str, Any]], pair: str, with_exact: bool) -> str:
    head = ["method", f"ΔF {pair} [kT]"] + (["ΔF − exact [kT]"] if with_exact else []) + [
        "ESS", "energy evals", "wall s", "evals to 0.1 kT", "wall s to 0.1 kT", "FES RMSE [kT]", "JS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        dF = row.get("delta_f_kT")
        se = row.get("stderr_kT")
        f_text = _fmt(dF, "+.3f") + ("" if se is None else f" ± {_fmt(se, '.3f')}")
        cost = row.get("cost_to_0.1kT") or {}
        evals = row.get("energy_evaluations")
        if row.get("fixed_energy_evaluations"):
            evals_text = f"{_fmt(evals)} (+{_fmt(row['fixed_energy_evaluations'])} training)"
        else:
            evals_text = _fmt(evals)
        wall = row.get("wall_seconds")
        wall_text = _fmt(wall) + (f" (+{_fmt(row['fixed_wall_seconds'])} training)" if row.get("fixed_wall_seconds") else "")
        fes = "reference" if row.get("reference") else _fmt(row.get("fes_rmse_kT"), ".3f")
        if row.get("fes_bins_missing") or row.get("fes_bins_sparse"):
            fes += f" ({row.get('fes_bins_missing', 0)} bins empty, {row.get('fes_bins_sparse', 0)} sparse)"
        js = "reference" if row.get("reference") else _fmt(row.get("js_divergence"), ".2e")
        cells = [row["method"], f_text]
        if with_exact:
            cells.append(_fmt(row.get("error_vs_exact_kT"), "+.3f"))
        cells += [_fmt(row.get("ess")), evals_text, wall_text, _fmt(cost.get("energy_evaluations")),
                  _fmt(cost.get("wall_seconds")), fes, js]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _report_markdown(name: str, table: str, c: _Comparison, plot_files: list[Path]) -> str:
    cv = "phi" if c.molecule else "x0"
    hist = "Ramachandran (phi, psi)" if c.molecule else "(x0, x1)"
    lines = [
        f"# {name}: methods compared", "",
        table, "",
        "## How to read this", "",
        "- ΔF ± standard error in kT for the first state pair; every pair is in `compare.json`.",
        f"- The second table compares every two methods: their ΔF difference in combined standard errors "
        f"√(σa² + σb²), flagged **DISAGREE** beyond {DISAGREE_SIGMA:g}σ (— when an error is unknown), and the RMSE "
        "between their profiles over the bins both populate (after the best shift).",
        "- ESS: effective number of independent samples, each by its method's own definition: importance "
        "sampling, Kish ESS (sum w)²/sum w²; MCMC and MD, n / max τ_int over the CVs, u and the state "
        "indicators (0 when a chain never moved); — when unknown.",
        "- Energy evaluations and wall seconds: what the method spent itself; for the flow-based methods the "
        "training (a one-off cost) is shown in parentheses.",
        f"- Cost to a ΔF standard error of {TARGET_STDERR_KT} kT: fixed + variable × (stderr / {TARGET_STDERR_KT})², "
        "assuming the error falls as 1/√cost. This ignores bias (a method stuck in one basin has a small error "
        "bar around a wrong value) and, for importance sampling, holds only with finite-variance weights "
        "(Pareto k̂ < 0.5).",
        f"- FES RMSE: along {cv}, over the bins holding ≥ {POPULATED:g} of the reference probability, after the "
        "best constant shift; bins that are populated in the reference but empty for the method, or held by "
        f"fewer than {MIN_BIN_SAMPLES:g} effective samples (Kish, per bin), are left out and counted. "
        f"JS: Jensen–Shannon divergence (nats, in [0, ln 2]) of the {hist} histograms, {BINS_2D}×{BINS_2D} bins, "
        "against the reference.",
        f"- Reference: {c.grid.ref_label or 'none available (no MD data)'}."
        + (" The baseline MALA keeps no samples on disk, so it has no FES/JS scores." if not c.molecule else ""),
        "",
    ]
    khat = next((r.get("pareto_khat") for r in c.rows if r.get("pareto_khat") is not None), None)
    if khat is not None and khat > 0.7:
        lines += [f"**WARNING**: Pareto k̂ = {khat:.2f} > 0.7: the importance-sampling error bar is unreliable.", ""]
    flagged = [(r["method"], other) for r in c.rows for other in r.get("disagrees_with", []) if r["method"] < other]
    for a, b in flagged:
        lines += [f"**DISAGREE**: {a} and {b} differ by more than {DISAGREE_SIGMA:g} combined standard errors in ΔF; "
                  "at least one of them is biased or its error bar is too small.", ""]
    for row in c.rows:
        for warning in row.get("warnings") or []:
            lines += [f"**WARNING** ({row['method']}): {warning}", ""]
    log_det = next((r["log_det"] for r in c.rows if r.get("log_det")), None)
    if log_det is not None:
        lines += [f"**Estimated log-det**: the flow's log q comes from {log_det['estimator']}; its standard deviation, "
                  f"{log_det['log_q_std']:.4f}, is noise in every log-weight, and even an unbiased log q gives weights "
                  "biased by about exp(variance / 2). `boltzgen mcmc` uses the exact log-det instead (up to 64 latent "
                  "dimensions).", ""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(c.run.path)})" for p in plot_files] + [""]
    return "\n".join(lines)
