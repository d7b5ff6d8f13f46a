"""`boltzgen compare`: the methods available for a run, side by side (report.md, compare.json, plots).

Methods, each present only when its files are:

- **importance sampling**: ``<run>/sample_summary.json`` (from ``boltzgen sample``) if present, else
  the sampling part of ``<run>/summary.json`` (from ``boltzgen train``); samples ``<run>/samples.h5``
  (or the file the sample summary names) with their raw ``log_w``.
- **MCMC**: every ``<run>/mcmc*/summary.json`` (``boltzgen mcmc``, ``--out <run>/mcmc_hmc`` etc.) with
  its ``chains.h5``.
- **MD**: ``<run>/md/summary.json`` (or ``--md DIR``) with ``md.h5`` for molecules; for analytic
  systems, the baseline MALA block of ``<run>/summary.json`` (no data file is kept for it).
- **umbrella sampling**: ``<run>/umbrella/summary.json`` (or the ``umbrella`` block of summary.json).
- **exact**: quadrature, for analytic systems.

Reference for the FES RMSE and the Jensen-Shannon divergence: the exact quadrature density for
analytic systems, MD (reweighted to the target temperature if run at another one) for molecules.

Cost to reach a ΔF standard error of 0.1 kT: the statistical error of every method here is assumed
to fall as ``1/sqrt(cost)``, so ``cost_0.1 = fixed + variable * (stderr / 0.1)^2``. ``variable`` is
what the method spent itself (sampling, chains, MD, windows); ``fixed`` is a one-off cost that does
not grow with the sample size: the flow's training, for importance sampling and MCMC. The same
scaling is applied to energy evaluations and to wall seconds. It ignores the bias of a method
(e.g. MD that never crosses a barrier has a small error bar around a wrong answer), and for
importance sampling it holds only when the weights have a finite variance (Pareto k̂ < 0.5).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from boltzgen.estimators import fes_rmse, free_energy_surface, jensen_shannon, normalized_weights
from boltzgen.io import DataFileError, atomic_path, atomic_write_json, atomic_write_text, json_safe
from boltzgen.jobs import exact_bin_probabilities, plot_fes_2d
from boltzgen.pipeline import RunError, state_pairs

TARGET_STDERR_KT = 0.1
#: a reference bin is "populated" when it holds at least this fraction of the probability
POPULATED = 1e-4
BINS_2D = 60
CHUNK_FRAMES = 500_000


# --- reading ----------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataFileError(f"{path}: not a readable JSON file ({type(exc).__name__})") from None


def _topology(path: Path) -> Any:
    from boltzgen.io import topology_from_json

    with h5py.File(path, "r") as f:
        if "topology" not in f:
            raise DataFileError(f"{path}: no topology dataset; a molecular samples file needs one")
        return topology_from_json(f["topology"][0])


def read_cvs(path: Path, cv_fn: Callable[[np.ndarray], dict[str, np.ndarray]], names: list[str],
             extras: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """CVs ``names`` (``[n]`` each) of every frame of an HDF5 samples/MD file, read in chunks, plus ``extras``.

    Positions are never all in memory. Missing, corrupt or NaN-holding files raise :class:`DataFileError`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: file not found")
    out: dict[str, list[np.ndarray]] = {name: [] for name in names}
    try:
        with h5py.File(path, "r") as f:
            key = "coordinates" if "coordinates" in f else "positions" if "positions" in f else None
            if key is None:
                raise DataFileError(f"{path}: no 'coordinates' or 'positions' dataset; is this a boltzgen HDF5 file?")
            data = f[key]
            for start in range(0, data.shape[0], CHUNK_FRAMES):
                x = data[start:start + CHUNK_FRAMES].astype(np.float64)
                x = x.reshape(x.shape[0], -1)
                bad = ~np.isfinite(x).all(axis=1)
                if bad.any():
                    raise DataFileError(f"{path}: frame {start + int(np.flatnonzero(bad)[0])} has NaN or inf coordinates")
                cvs = cv_fn(x)
                for name in names:
                    out[name].append(cvs[name])
            result = {name: (np.concatenate(v) if v else np.zeros(0)) for name, v in out.items()}
            for name in extras:
                if name not in f:
                    raise DataFileError(f"{path}: dataset '{name}' is missing")
                result[name] = f[name][()]
            result["_attrs"] = dict(f.attrs)
    except OSError as exc:
        raise DataFileError(f"{path}: not a readable HDF5 file ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    return result


# --- the comparison ---------------------------------------------------------------------------------

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

    def histograms(self, cvs: dict[str, np.ndarray], log_w: np.ndarray | None) -> tuple[Any, np.ndarray]:
        a, b = self.names[0], self.names[1]
        fes = free_energy_surface(cvs[a], log_w=log_w, bins=self.edges_1d, n_bootstrap=20, rng=0)
        weights = None if log_w is None else normalized_weights(log_w)
        h2, _, _ = np.histogram2d(cvs[a], cvs[b], bins=self.edges_2d, weights=weights)
        return fes, h2

    def set_reference(self, label: str, f1: np.ndarray, p1: np.ndarray, h2: np.ndarray) -> None:
        self.ref_label, self.ref_f1, self.ref_p1, self.ref_h2 = label, f1, p1 / p1.sum(), h2

    def scores(self, f1: np.ndarray, h2: np.ndarray | None) -> dict[str, Any]:
        """FES RMSE over populated reference bins (after the best constant shift) and JS divergence of the 2-D histograms."""
        out: dict[str, Any] = {"fes_rmse_kT": None, "fes_bins_compared": 0, "fes_bins_missing": 0, "js_divergence": None}
        if self.ref_f1 is None:
            return out
        populated = (self.ref_p1 >= POPULATED) & np.isfinite(self.ref_f1)
        finite = np.isfinite(f1)
        mask = populated & finite
        out["fes_bins_compared"] = int(mask.sum())
        out["fes_bins_missing"] = int((populated & ~finite).sum())
        if mask.any():
            out["fes_rmse_kT"] = fes_rmse(np.where(mask, f1, 0.0), np.where(mask, self.ref_f1, 0.0), mask)
        if h2 is not None and self.ref_h2 is not None and h2.sum() > 0:
            out["js_divergence"] = jensen_shannon(h2, self.ref_h2)
        return out


def _row(method: str, source: str, fe_rows: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    row = {"method": method, "source": source, "free_energies": fe_rows}
    first = fe_rows[0] if fe_rows else {}
    row["delta_f_kT"] = first.get("delta_f_kT")
    row["stderr_kT"] = first.get("stderr_kT")
    row.update({"fes_rmse_kT": None, "fes_bins_compared": 0, "fes_bins_missing": 0, "js_divergence": None})
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


def _ess_from_tau(n: int | None, taus: dict[str, Any] | None, kish: float | None = 1.0) -> float | None:
    values = [math.inf if t is None else t for t in (taus or {}).values()]  # JSON null: an infinite tau
    if not n or not values:
        return None
    tau = max(values)
    return (n * (kish if kish is not None else 1.0) / tau) if math.isfinite(tau) and tau > 0 else 0.0


def compare_job(run_dir: Path, md_dir: Path | None = None) -> dict[str, Any]:
    """`boltzgen compare`: write ``report.md``, ``compare.json`` and ``plots/compare_*.png`` into ``run_dir``.

    Returns the content of compare.json plus ``table_markdown``, ``report`` and ``json`` (paths).
    """
    from boltzgen.config import OpenMMSystem, load_config
    from boltzgen.observables import cartesian_cvs, dihedral_cvs

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory; create one with `boltzgen train CONFIG --out {run_dir}`")
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"{run_dir}: no config.yaml; is this a run directory written by `boltzgen train`?")
    config, _ = load_config(run_dir / "config.yaml")
    molecule = isinstance(config.system, OpenMMSystem)
    pairs = state_pairs(config)
    if not pairs:
        raise RunError(f"{run_dir / 'config.yaml'}: states: needs at least two states to compare ΔF")
    pair_label = f"{pairs[0][0]}→{pairs[0][1]}"
    train = _read_json(run_dir / "summary.json")
    sample = _read_json(run_dir / "sample_summary.json")
    md_folder = Path(md_dir) if md_dir is not None else run_dir / "md"
    if md_dir is not None and not md_folder.is_dir():
        raise RunError(f"--md {md_folder}: no such directory")

    # the CV functions and the bins
    energy = None
    topology = None
    if molecule:
        names = ["phi", "psi"]
        grid = _Grid(names, [(-math.pi, math.pi)] * 2, 36)

        def cv_fn(x: np.ndarray) -> dict[str, np.ndarray]:
            nonlocal topology
            return dihedral_cvs(x, topology)
    else:
        from boltzgen.pipeline import build_system

        energy = build_system(config).energy
        names = ["x0", "x1"]
        grid = _Grid(names, [(energy.box.lower[0], energy.box.upper[0]), (energy.box.lower[1], energy.box.upper[1])], 60)
        cv_fn = cartesian_cvs

    def load(path: Path, extras: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        nonlocal topology
        if molecule and topology is None:
            topology = _topology(path) if Path(path).is_file() else None
        return read_cvs(path, cv_fn, names, extras)

    rows: list[dict[str, Any]] = []
    curves: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]] = []
    panels: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []

    def add_curves(label: str, fes: Any, h2: np.ndarray | None) -> None:
        curves.append((label, grid.centers_1d, np.asarray(fes.f_kT), np.asarray(fes.stderr_kT)))
        if h2 is not None:
            with np.errstate(divide="ignore"):
                f2 = -np.log(h2 / h2.sum())
            panels.append((label, grid.edges_2d[0], grid.edges_2d[1], f2 - np.min(f2[np.isfinite(f2)])))

    # reference and exact
    exact = None
    if energy is not None:
        from boltzgen.pipeline import exact_free_energies

        exact = exact_free_energies(config, energy)
        p2 = exact_bin_probabilities(energy, *grid.edges_2d)
        p1 = exact_bin_probabilities(energy, grid.edges_1d, grid.edges_2d[1]).sum(axis=1)
        with np.errstate(divide="ignore"):
            f1 = -np.log(p1 / np.diff(grid.edges_1d))
        f1 = f1 - f1[np.isfinite(f1)].min()
        grid.set_reference("exact quadrature", f1, p1, p2)
        curves.append(("exact (quadrature)", grid.centers_1d, f1, None))
        with np.errstate(divide="ignore"):
            f2 = -np.log(p2)
        panels.append(("exact (quadrature)", grid.edges_2d[0], grid.edges_2d[1], f2 - f2.min()))
        rows.append(_row("exact (quadrature)", "quadrature on the box",
                         [{"from": a, "to": b, "delta_f_kT": v, "stderr_kT": 0.0} for (a, b), v in exact.items()],
                         ess=None, energy_evaluations=None, wall_seconds=None, reference=True))

    # MD (molecules): the reference
    md_summary = _read_json(md_folder / "summary.json")
    md_h5 = md_folder / "md.h5"
    if molecule and (md_summary is not None or (train and "baseline" in train)):
        block = md_summary if md_summary is not None else train["baseline"]
        source = str(md_folder / "summary.json") if md_summary is not None else str(run_dir / "summary.json") + " (baseline)"
        if md_summary is None and not md_h5.is_file() and block.get("h5"):
            h5 = block["h5"]
            md_h5 = Path(h5[0] if isinstance(h5, list) else h5)  # the plain MD file comes first
        evaluations = (block.get("energy_evaluations") or {})
        evaluations = evaluations.get("total") if isinstance(evaluations, dict) else evaluations
        row = _row("MD (plain Langevin)", source, block.get("free_energies", []),
                   ess=_ess_from_tau(block.get("n_samples"), block.get("tau_int_frames"), block.get("ess")),
                   n_samples=block.get("n_samples"), energy_evaluations=evaluations,
                   wall_seconds=block.get("md_wall_seconds", block.get("wall_seconds")), reference=False)
        if md_h5.is_file():
            data = load(md_h5, ())
            attrs = data["_attrs"]
            log_w = None
            t_md, t_target = attrs.get("temperature_K"), attrs.get("target_temperature_K")
            if t_md is not None and t_target is not None and abs(float(t_md) - float(t_target)) > 1e-9:
                with h5py.File(md_h5, "r") as f:
                    u_target = f["reduced_energy"][()]
                log_w = -(u_target - u_target * float(t_target) / float(t_md))
            fes, h2 = grid.histograms(data, log_w)
            p1 = np.histogram(data["phi"], bins=grid.edges_1d, weights=None if log_w is None else normalized_weights(log_w))[0]
            grid.set_reference("MD", np.asarray(fes.f_kT), p1.astype(float), h2)
            row["reference"] = True
            add_curves("MD", fes, h2)
        rows.append(row)

    # importance sampling
    is_block = sample if sample is not None else train
    if is_block is not None and is_block.get("free_energies") is not None:
        training = (train or {}).get("energy_evaluations", {}).get("training")
        training_wall = (train or {}).get("training_wall_seconds")
        if sample is not None:
            source, variable = str(run_dir / "sample_summary.json"), sample["energy_evaluations"]["total"]
            wall = sample.get("wall_seconds")
            h5 = Path(sample.get("samples_file") or run_dir / "samples.h5")
        else:
            source, variable = str(run_dir / "summary.json"), train["energy_evaluations"].get("sampling")
            wall, h5 = train.get("sampling_wall_seconds"), run_dir / "samples.h5"
        ess = is_block.get("ess")
        row = _row("importance sampling (flow)", source, is_block["free_energies"],
                   ess=None if ess is None else ess * is_block["n_samples"], n_samples=is_block.get("n_samples"),
                   energy_evaluations=variable, wall_seconds=wall, fixed_energy_evaluations=training,
                   fixed_wall_seconds=training_wall, pareto_khat=is_block.get("pareto_khat"),
                   weights=is_block.get("weights", "raw"))
        if h5.is_file():
            data = load(h5, ("log_w",))
            fes, h2 = grid.histograms(data, data["log_w"])
            row.update(grid.scores(np.asarray(fes.f_kT), h2))
            add_curves("importance sampling", fes, h2)
        rows.append(row)

    # MCMC runs
    for path in sorted(run_dir.glob("mcmc*/summary.json")):
        block = _read_json(path)
        training = (train or {}).get("energy_evaluations", {}).get("training")
        label = f"MCMC ({block.get('moves', '?')})" + ("" if path.parent.name == "mcmc" else f" [{path.parent.name}]")
        row = _row(label, str(path), block.get("free_energies", []), ess=block.get("ess_samples"),
                   n_samples=block.get("n_samples"), energy_evaluations=block["energy_evaluations"]["total"],
                   wall_seconds=block.get("wall_seconds"), fixed_energy_evaluations=training,
                   fixed_wall_seconds=(train or {}).get("training_wall_seconds"),
                   acceptance_rate=block.get("acceptance_rate"))
        h5 = path.parent / "chains.h5"
        if h5.is_file():
            data = load(h5)
            fes, h2 = grid.histograms(data, None)
            row.update(grid.scores(np.asarray(fes.f_kT), h2))
            add_curves(label, fes, h2)
        rows.append(row)

    # baseline MALA (analytic): no data file is kept, so no FES/JS
    if not molecule and train is not None and "baseline" in train:
        block = train["baseline"]
        rows.append(_row(f"{block.get('source', 'baseline')} (local MCMC)", str(run_dir / "summary.json") + " (baseline)",
                         block.get("free_energies", []), ess=None, n_samples=block.get("n_samples"),
                         energy_evaluations=block.get("energy_evaluations"), wall_seconds=block.get("wall_seconds")))

    # umbrella sampling
    umbrella = _read_json(run_dir / "umbrella" / "summary.json") or (train or {}).get("umbrella")
    if umbrella is not None:
        evaluations = umbrella.get("energy_evaluations") or {}
        row = _row("umbrella sampling (flattening bias)", str(run_dir / "umbrella" / "summary.json"), umbrella.get("free_energies", []),
                   ess=None, energy_evaluations=evaluations.get("total") if isinstance(evaluations, dict) else evaluations,
                   wall_seconds=umbrella.get("wall_seconds"))
        profile = umbrella.get("profile")
        if profile and molecule:
            f_u, centers = _profile_on_grid(profile, grid)
            row.update(grid.scores(f_u, None))
            err = np.asarray(profile.get("stderr_kT", [np.nan] * len(centers)), dtype=float)
            curves.append(("umbrella sampling (flattening bias)", np.asarray(profile["centers_rad"], dtype=float),
                           np.asarray(profile["f_kT"], dtype=float), err))
        rows.append(row)

    if all(r["method"].startswith("exact") for r in rows):
        raise RunError(f"{run_dir}: no results to compare; run `boltzgen train`, `boltzgen sample` or `boltzgen mcmc` first")

    for row in rows:
        if not row["method"].startswith("exact"):
            _cost(row)
        if exact is not None and row.get("delta_f_kT") is not None and not row["method"].startswith("exact"):
            row["error_vs_exact_kT"] = row["delta_f_kT"] - exact[pairs[0]]

    plots_dir = run_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    plot_files = [_plot_delta_f(rows, pair_label, plots_dir / "compare_delta_f.png")]
    from boltzgen import plots

    if curves:
        plots.free_energy_profiles(curves, plots_dir / "compare_fes.png",
                                   xlabel="phi [rad]" if molecule else "x0")
        plot_files.append(plots_dir / "compare_fes.png")
    if panels:
        plot_fes_2d(panels, plots_dir / "compare_fes_2d.png", labels=("phi [rad]", "psi [rad]") if molecule else ("x0", "x1"))
        plot_files.append(plots_dir / "compare_fes_2d.png")

    table = _table(rows, pair_label, exact is not None)
    result = json_safe({
        "name": config.name, "pair": list(pairs[0]), "reference": grid.ref_label or None,
        "target_stderr_kT": TARGET_STDERR_KT,
        "cost_scaling": "cost_0.1 = fixed + variable * (stderr / 0.1)^2 (error ~ 1/sqrt(cost); fixed = flow training)",
        "methods": rows, "plots": [str(p) for p in plot_files],
        "exact_kT": None if exact is None else {f"{a}→{b}": v for (a, b), v in exact.items()},
    })
    atomic_write_json(run_dir / "compare.json", result)
    atomic_write_text(run_dir / "report.md", _report_markdown(config.name, table, rows, grid, plot_files, run_dir, molecule))
    return {**result, "table_markdown": table, "report": str(run_dir / "report.md"), "json": str(run_dir / "compare.json")}


def _profile_on_grid(profile: dict[str, Any], grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """An umbrella profile mapped onto the 1-D reference bins (the bin holding each centre; NaN elsewhere)."""
    centers = np.asarray(profile["centers_rad"], dtype=float)
    f = np.asarray([np.nan if v is None else v for v in profile["f_kT"]], dtype=float)
    out = np.full(grid.centers_1d.shape, np.inf)
    idx = np.clip(np.searchsorted(grid.edges_1d, centers, side="right") - 1, 0, len(out) - 1)
    for i, value in zip(idx, f):
        if np.isfinite(value):
            out[i] = value
    return out, centers


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
        if row.get("fes_bins_missing"):
            fes += f" ({row['fes_bins_missing']} bins empty)"
        js = "reference" if row.get("reference") else _fmt(row.get("js_divergence"), ".2e")
        cells = [row["method"], f_text]
        if with_exact:
            cells.append(_fmt(row.get("error_vs_exact_kT"), "+.3f"))
        cells += [_fmt(row.get("ess")), evals_text, wall_text, _fmt(cost.get("energy_evaluations")),
                  _fmt(cost.get("wall_seconds")), fes, js]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _report_markdown(name: str, table: str, rows: list[dict[str, Any]], grid: _Grid, plot_files: list[Path],
                     run_dir: Path, molecule: bool) -> str:
    cv = "phi" if molecule else "x0"
    hist = "Ramachandran (phi, psi)" if molecule else "(x0, x1)"
    lines = [
        f"# {name}: methods compared", "",
        table, "",
        "## How to read this", "",
        "- ΔF ± standard error in kT for the first state pair; every pair is in `compare.json`.",
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
        "best constant shift; bins that are populated in the reference but empty for the method are left out and "
        "counted. JS: Jensen–Shannon divergence (nats, in [0, ln 2]) of the "
        f"{hist} histograms, {BINS_2D}×{BINS_2D} bins, against the reference.",
        f"- Reference: {grid.ref_label or 'none available (no MD data)'}."
        + (" The baseline MALA keeps no samples on disk, so it has no FES/JS scores." if not molecule else ""),
        "",
    ]
    khat = next((r.get("pareto_khat") for r in rows if r.get("pareto_khat") is not None), None)
    if khat is not None and khat > 0.7:
        lines += [f"**WARNING**: Pareto k̂ = {khat:.2f} > 0.7: the importance-sampling error bar is unreliable.", ""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(run_dir)})" for p in plot_files] + [""]
    return "\n".join(lines)


def _plot_delta_f(rows: list[dict[str, Any]], pair: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r for r in rows if r.get("delta_f_kT") is not None and math.isfinite(r["delta_f_kT"])]
    shown = [r for r in finite if not r["method"].startswith("exact")]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(shown) + 1.5))
    for row in finite:
        if row["method"].startswith("exact"):
            ax.axvline(row["delta_f_kT"], color="k", ls="--", lw=1, label="exact")
    for i, row in enumerate(shown):
        se = row.get("stderr_kT")
        ax.errorbar(row["delta_f_kT"], i, xerr=se if se is not None and math.isfinite(se) else None, fmt="o", capsize=4)
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([r["method"] for r in shown])
    ax.set_xlabel(f"ΔF {pair} [kT]")
    if len(finite) > len(shown):
        ax.legend(loc="best")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path
