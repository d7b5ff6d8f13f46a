"""Coverage of the program's ΔF error bars: how often the stated 95 % interval holds the exact ΔF.

Usage::

    nice -n 10 python benchmarks/coverage.py                      # 20 seeds, every system and estimator
    python benchmarks/coverage.py --seeds 40 --systems double_well --estimators is,mcmc
    python benchmarks/coverage.py --systems mueller_brown_particle --estimators md,umbrella,remd

Each seed K runs the program's own code paths, in process, in a temporary run directory, exactly as
a user's command would, and compares the ΔF from the config's first state to its second (A → B)
with the exact ΔF that the program itself reports (``exact_kT`` of the summaries: quadrature of
the analytic density, :meth:`boltzgen.runs.target.Target.exact_free_energies`).

Estimators on the analytic systems (``double_well``, ``mueller_brown``):

- ``is``: ``boltzgen train CONFIG --set seed=K``: flow importance sampling, bootstrap error
  (:func:`boltzgen.runs.sample.sample_free_energies`). Training and sampling both change with K.
- ``mcmc``: ``boltzgen mcmc RUN --seed K`` on that seed's flow, with the command's defaults
  (independence Metropolis, 256 chains × 1000 steps after 200 warm-up; jackknife over chains).
- ``mcmc_local``: the same with ``--moves imh+mala`` (each step an independence Metropolis step
  and a local MALA step), whose local steps reach states the flow itself (nearly) never proposes.
- ``is_fixed_flow``: ``boltzgen sample RUN --seed K`` on one flow trained once (seed = the first
  seed): only the sampling changes. A flow's finite-sample bias is the same in every seed here, so
  this separates the error bar's honesty from a bias that changes with the trained flow.
- ``mcmc_fixed_flow``: ``boltzgen mcmc RUN --seed K`` on that one flow: the MCMC error bar's
  honesty for a given flow, apart from how good each seed's flow is.
- ``mala``: the MALA baseline that ``train`` runs for analytic systems (jackknife over chains).

To keep 20 seeds affordable on a shared 2-core CPU, the flow draws 10⁵ samples instead of 10⁶ and the
double well trains for 300 + 200 steps instead of 1000 + 1000 (:data:`BUDGET`, printed and stored
in the output); Mueller–Brown keeps its config's training, as shorter training left part of a basin
unsampled in some seeds.

On the Mueller–Brown particle (``mueller_brown_particle``, an OpenMM system) the MD baselines
``md`` (plain MD), ``umbrella`` (1-D along x), ``umbrella_exchange`` (1-D along x, with exchanges
between neighbouring windows every 50 steps, :data:`EXCHANGE_WINDOWS`, 2 x 10^5 steps per window),
``umbrella_2d`` and ``remd`` run through the CLI
(``boltzgen md CONFIG --out DIR --set seed=K [flag]``); they are skipped, with the reason, when
the config file or the command's option does not exist yet. The umbrella windows are the
config's when its ``umbrella:`` runs on the same CVs, else :data:`WINDOWS`; MD and REMD are shortened
(:data:`BUDGET`: the config's 10⁸ MD steps and 5000 REMD iterations take 12 and ~8 min a seed).

Output: a progress line per seed; then a markdown table, written with every seed's numbers to
``OUT/coverage.md`` and ``OUT/coverage.json`` (``--out``, default ``runs/coverage``). Columns:
covered seeds, coverage with its 95 % Wilson interval, mean error (estimate − exact) with its
standard error, mean stated σ, and RMS(error) / RMS(σ) (1 for an honest σ; for n seeds with honest
Gaussian errors, RMS(z) lies within ``sqrt(χ²_n(0.025, 0.975) / n)`` 95 % of the time, given too);
``warned``: seeds where the command itself warned that the estimate is unreliable (Pareto k̂ > 0.7,
chains shorter than 50 τ, an umbrella warning), and the coverage of the others. The verdict is
``ok`` when the coverage interval holds 95 % and RMS(z) lies in its honest range.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from boltzgen.config import load_config
from boltzgen.files import atomic_write_json, atomic_write_text
from boltzgen.runs.chains import mcmc_job
from boltzgen.runs.rundir import RunDir
from boltzgen.runs.sample import sample_job
from boltzgen.runs.summaries import FreeEnergyRow
from boltzgen.runs.target import build_target
from boltzgen.runs.train import train

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = {
    "double_well": ROOT / "systems/double_well.yaml",
    "mueller_brown": ROOT / "systems/mueller_brown.yaml",
    "mueller_brown_particle": ROOT / "systems/mueller_brown_particle.yaml",
}
ANALYTIC = ("double_well", "mueller_brown")
FLOW_ESTIMATORS = ("is", "mcmc", "mcmc_local", "is_fixed_flow", "mcmc_fixed_flow", "mala")
#: the `boltzgen mcmc --moves` of each MCMC estimator
MCMC_MOVES = {"mcmc": "imh", "mcmc_local": "imh+mala"}


@dataclass(frozen=True)
class MDEstimator:
    """An MD baseline on the particle: ``boltzgen md CONFIG [flag]``, the folder of the run directory
    that gets its summary, and the umbrella CVs it needs (the benchmark's windows, :data:`WINDOWS`,
    unless the config's ``umbrella:`` already runs on those CVs)."""

    flag: str | None
    folder: str
    umbrella_cvs: tuple[str, ...] = ()
    #: config overrides of this estimator alone, after the system's budget
    sets: tuple[str, ...] = ()
    #: the windows of each CV, when not :data:`WINDOWS`
    windows: dict[str, str] | None = None


#: Windows along x for exchanges: springs 4x stiffer and spacing half that of :data:`WINDOWS`, so that
#: a configuration in A's channel (pulled ~0.05 nm off its centre by the steep slope there) still
#: swaps with one in B's middle basin in the next window.
EXCHANGE_WINDOWS = {"x": "{name: x, range_nm: [-1.5, 1.05], spacing_nm: 0.05, k_kJ_per_mol_nm2: 2000}"}
MD_ESTIMATORS: dict[str, MDEstimator] = {
    "md": MDEstimator(None, "md"),
    "umbrella": MDEstimator("--umbrella", "umbrella_x", ("x",)),
    "umbrella_exchange": MDEstimator("--umbrella", "umbrella_x", ("x",), (
        "umbrella.exchange_every=50", "umbrella.steps_per_window=200000"), EXCHANGE_WINDOWS),
    "umbrella_2d": MDEstimator("--umbrella", "umbrella_x_y", ("x", "y")),
    "remd": MDEstimator("--remd", "remd"),
}
#: Harmonic windows along x (nm) and y of the particle: the springs give each window a width of
#: sqrt(kT/k) = 0.07 nm at 300 K, half the spacing; the ranges hold the three minima and the saddles.
WINDOWS = {
    "x": "{name: x, range_nm: [-1.5, 1.05], spacing_nm: 0.15, k_kJ_per_mol_nm2: 500}",
    "y": "{name: y, range_nm: [-0.3, 2.1], spacing_nm: 0.15, k_kJ_per_mol_nm2: 500}",
}
#: Config overrides per system: 10⁵ flow samples instead of the configs' 10⁶, and on the double well
#: 300 + 200 training steps instead of 1000 + 1000. Mueller–Brown keeps its 1000 + 400: at 300 + 100
#: some seeds' flows left part of basin B unsampled (a bias of 0.14 kT that neither ESS nor k̂ showed).
BUDGET: dict[str, list[str]] = {
    "double_well": ["training[0].steps=300", "training[1].steps=200", "sampling.n=100000"],
    "mueller_brown": ["sampling.n=100000"],
    # The config's MD (10^8 steps) and REMD (5000 iterations) take 12 and ~8 min a seed here.
    "mueller_brown_particle": ["md.steps=20000000", "remd.iterations=1000", "umbrella.steps_per_window=20000"],
}
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Outcome:
    """One estimator's ΔF (A → B) in one seed, in kT, against the exact value."""

    system: str
    estimator: str
    seed: int
    estimate: float
    stderr: float
    exact: float
    #: the command warned that this estimate is unreliable (k̂ > 0.7, chains < 50 τ, an umbrella warning)
    warned: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def error(self) -> float:
        return self.estimate - self.exact

    @property
    def valid(self) -> bool:
        return math.isfinite(self.estimate) and math.isfinite(self.stderr) and self.stderr > 0

    @property
    def covered(self) -> bool:
        """The stated 95 % interval, estimate ± 1.96 σ, holds the exact ΔF (never for a non-finite one)."""
        return self.valid and abs(self.error) <= Z95 * self.stderr


# --- statistics -----------------------------------------------------------------------------------

def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``k / n`` (95 % for the default ``z``)."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def rms_z_range(n: int) -> tuple[float, float]:
    """Where RMS(z) of ``n`` honest standard-normal z-scores lies 95 % of the time: sqrt(χ²_n / n)."""
    return (math.sqrt(stats.chi2.ppf(0.025, n) / n), math.sqrt(stats.chi2.ppf(0.975, n) / n))


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    """Coverage and error statistics of one estimator's seeds (see the module docstring)."""
    n = len(outcomes)
    k = sum(o.covered for o in outcomes)
    good = [o for o in outcomes if o.valid]
    errors = np.array([o.error for o in good])
    sigmas = np.array([o.stderr for o in good])
    lo, hi = wilson_interval(k, n)
    m = len(good)
    unwarned = [o for o in outcomes if not o.warned]
    return {
        "system": outcomes[0].system, "estimator": outcomes[0].estimator, "n_seeds": n, "n_invalid": n - m,
        "n_covered": k, "coverage": k / n, "coverage_low": lo, "coverage_high": hi,
        "n_warned": n - len(unwarned), "n_covered_unwarned": sum(o.covered for o in unwarned),
        "mean_error": float(errors.mean()) if m else math.nan,
        "mean_error_stderr": float(errors.std(ddof=1) / math.sqrt(m)) if m > 1 else math.nan,
        "mean_sigma": float(sigmas.mean()) if m else math.nan,
        "rms_error_over_rms_sigma": float(np.sqrt(np.mean(errors**2) / np.mean(sigmas**2))) if m else math.nan,
        "rms_z": float(np.sqrt(np.mean((errors / sigmas) ** 2))) if m else math.nan,
        "rms_z_honest_range": rms_z_range(m) if m else (math.nan, math.nan),
        "exact": outcomes[0].exact,
    }


def verdict(s: dict[str, Any]) -> str:
    """``ok`` when the coverage interval holds 95 % and RMS(z) is within its honest range, else why not."""
    problems = []
    if not s["coverage_low"] <= 0.95 <= s["coverage_high"]:
        problems.append("coverage")
    lo, hi = s["rms_z_honest_range"]
    if not lo <= s["rms_z"] <= hi:
        problems.append("σ too small" if s["rms_z"] > hi else "σ too large")
    if s["n_invalid"]:
        problems.append(f"{s['n_invalid']} not estimable")
    return "ok" if not problems else ", ".join(problems)


def markdown_table(summaries: list[dict[str, Any]]) -> str:
    """The coverage table, one row per (system, estimator)."""
    lines = [("| system | estimator | seeds | covered | coverage [95 % CI] | mean error ± s.e. [kT] | mean σ [kT] "
              "| RMS(err)/RMS(σ) | RMS(z) [honest 95 % range] | warned | covered, unwarned | verdict |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lo, hi = s["rms_z_honest_range"]
        lines.append(
            f"| {s['system']} | {s['estimator']} | {s['n_seeds']} | {s['n_covered']} | "
            f"{100 * s['coverage']:.0f} % [{100 * s['coverage_low']:.0f}, {100 * s['coverage_high']:.0f}] | "
            f"{s['mean_error']:+.4f} ± {s['mean_error_stderr']:.4f} | {s['mean_sigma']:.4f} | "
            f"{s['rms_error_over_rms_sigma']:.2f} | {s['rms_z']:.2f} [{lo:.2f}, {hi:.2f}] | {s['n_warned']} | "
            f"{s['n_covered_unwarned']}/{s['n_seeds'] - s['n_warned']} | {verdict(s)} |")
    return "\n".join(lines)


# --- the analytic systems: flow IS, flow MCMC, MALA ------------------------------------------------

def pair_row(rows: list[FreeEnergyRow], states: list[str]) -> FreeEnergyRow:
    """The row of ΔF from the config's first state to its second."""
    for row in rows:
        if (row.from_, row.to) == (states[0], states[1]):
            return row
    raise RuntimeError(f"no ΔF row {states[0]} → {states[1]} in {rows}")


def outcome(system: str, estimator: str, seed: int, row: FreeEnergyRow, warned: bool, **extra: Any) -> Outcome:
    if row.exact_kT is None:
        raise RuntimeError(f"{system}: the summary has no exact ΔF (exact_kT)")
    return Outcome(system, estimator, seed, row.delta_f_kT, row.stderr_kT, row.exact_kT, warned, extra)


def train_seed(config_path: Path, overrides: list[str], seed: int, run: RunDir) -> tuple[Any, list[str], Any]:
    """``boltzgen train CONFIG --set seed=K`` (with the overrides) into ``run``; (summary, states, config)."""
    config, resolved = load_config(config_path, [*overrides, f"seed={seed}"])
    summary = train(config, resolved, run, force=True, progress=False)
    return summary, list(config.states), config


def flow_seed(system: str, overrides: list[str], seed: int, estimators: list[str], work: Path,
              fixed: RunDir | None) -> list[Outcome]:
    """One seed of the flow estimators on an analytic system: train, then MCMC on that flow; IS from
    the flow trained once (``fixed``) with this seed's sampling."""
    results: list[Outcome] = []
    if {"is", "mala", *MCMC_MOVES} & set(estimators):
        run = RunDir(work / f"{system}-seed{seed}")
        summary, states, _ = train_seed(SYSTEMS[system], overrides, seed, run)
        if "is" in estimators:
            results.append(outcome(system, "is", seed, pair_row(summary.free_energies, states),
                                   not summary.weights_reliable, ess=summary.ess,
                                   pareto_khat=summary.pareto_khat, n_samples=summary.n_samples,
                                   training_wall_seconds=summary.training_wall_seconds))
        if "mala" in estimators and summary.baseline is not None:
            results.append(outcome(system, "mala", seed, pair_row(summary.baseline.free_energies, states), False,
                                   n_samples=summary.baseline.n_samples))
        for name in (name for name in MCMC_MOVES if name in estimators):
            chains = mcmc_job(run, moves=MCMC_MOVES[name], seed=seed, out_dir=run.path / name, progress=False)
            results.append(outcome(system, name, seed, pair_row(chains.free_energies, states),
                                   bool(chains.tau_unreliable), acceptance_rate=chains.acceptance_rate, ess=chains.ess,
                                   tau_int=chains.tau_int, n_samples=chains.n_samples))
        shutil.rmtree(run.path, ignore_errors=True)
    if "is_fixed_flow" in estimators and fixed is not None:
        config = load_config(SYSTEMS[system], overrides)[0]
        states = list(config.states)
        sampled = sample_job(fixed, n=config.sampling.n, seed=seed,
                             out=work / f"{system}-fixed-samples.h5", progress=False)
        results.append(outcome(system, "is_fixed_flow", seed, pair_row(sampled.free_energies, states),
                               not sampled.weights_reliable, ess=sampled.ess, pareto_khat=sampled.pareto_khat))
    if "mcmc_fixed_flow" in estimators and fixed is not None:
        states = list(load_config(SYSTEMS[system], overrides)[0].states)
        chains = mcmc_job(fixed, moves="imh", seed=seed, out_dir=work / f"{system}-fixed-mcmc", progress=False)
        results.append(outcome(system, "mcmc_fixed_flow", seed, pair_row(chains.free_energies, states),
                               bool(chains.tau_unreliable), acceptance_rate=chains.acceptance_rate, ess=chains.ess,
                               tau_int=chains.tau_int, n_samples=chains.n_samples))
    return results


# --- the Mueller–Brown particle: MD baselines through the CLI --------------------------------------

def md_available(estimators: list[str]) -> tuple[list[str], list[str]]:
    """The MD estimators that can run now, and a message for each one that cannot (and why)."""
    path = SYSTEMS["mueller_brown_particle"]
    if not path.exists():
        return [], [f"mueller_brown_particle: {path.relative_to(ROOT)} does not exist yet; MD baselines skipped"]
    help_text = subprocess.run([sys.executable, "-m", "boltzgen", "md", "--help"], capture_output=True, text=True,
                               cwd=ROOT, check=False).stdout
    ready, skipped = [], []
    for name in estimators:
        flag = MD_ESTIMATORS[name].flag
        if flag is not None and flag not in help_text:
            skipped.append(f"mueller_brown_particle {name}: `boltzgen md` has no {flag} option yet; skipped")
        else:
            ready.append(name)
    return ready, skipped


def umbrella_overrides(estimator: MDEstimator, overrides: list[str]) -> list[str]:
    """The estimator's windows (:data:`WINDOWS` unless it names its own) on its CVs, unless the
    config's umbrella runs on them; then the estimator's own overrides."""
    if not estimator.umbrella_cvs:
        return list(estimator.sets)
    config = load_config(SYSTEMS["mueller_brown_particle"], overrides)[0]
    if tuple(config.umbrella.cv_names) == estimator.umbrella_cvs and estimator.windows is None:
        return list(estimator.sets)
    windows = estimator.windows or WINDOWS
    return [f"umbrella.cvs=[{', '.join(windows[cv] for cv in estimator.umbrella_cvs)}]", *estimator.sets]


def read_row(path: Path, states: list[str], exact: float | None) -> tuple[FreeEnergyRow, list[str]]:
    """The A → B row of a summary file and the summary's warnings; a ΔF stored as null (not
    estimable) reads as NaN; ``exact`` where the summary states no exact ΔF."""
    summary = json.loads(path.read_text())
    rows = summary["free_energies"]
    for row in rows:
        if (row["from"], row["to"]) == (states[0], states[1]):
            value, stderr = row.get("delta_f_kT"), row.get("stderr_kT")
            return FreeEnergyRow(from_=states[0], to=states[1], delta_f_kT=math.nan if value is None else value,
                                 stderr_kT=math.nan if stderr is None else stderr,
                                 exact_kT=row["exact_kT"] if row.get("exact_kT") is not None else exact), \
                list(summary.get("warnings") or [])
    raise RuntimeError(f"{path}: no ΔF row {states[0]} → {states[1]}")


def md_seed(overrides: list[str], seed: int, estimators: list[str], work: Path) -> tuple[list[Outcome], list[str]]:
    """One seed of each MD baseline on the particle via ``boltzgen md``; (outcomes, failure messages).

    The exact ΔF is the program's own quadrature (:meth:`Target.exact_free_energies`) where a
    summary does not state it.
    """
    system, path = "mueller_brown_particle", SYSTEMS["mueller_brown_particle"]
    config = load_config(path, overrides)[0]
    states = list(config.states)
    exact = (build_target(config).exact_free_energies() or {}).get((states[0], states[1]))
    results, failures = [], []
    for name in estimators:
        estimator = MD_ESTIMATORS[name]
        out = work / f"particle-{name}-seed{seed}"
        sets = [*overrides, *umbrella_overrides(estimator, overrides), f"seed={seed}"]
        command = [sys.executable, "-m", "boltzgen", "md", str(path), "--out", str(out), "--no-progress",
                   *[a for o in sets for a in ("--set", o)], *([estimator.flag] if estimator.flag else [])]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            failures.append(f"{name} seed {seed}: exit {done.returncode}: {last}")
            continue
        row, warnings = read_row(out / estimator.folder / "summary.json", states, exact)
        results.append(outcome(system, name, seed, row, bool(warnings), warnings=warnings,
                               wall_seconds=time.perf_counter() - started))
        shutil.rmtree(out, ignore_errors=True)
    return results, failures


# --- the driver -------------------------------------------------------------------------------------

def progress_line(system: str, seed: int, index: int, n: int, outcomes: list[Outcome], seconds: float) -> str:
    parts = [f"{o.estimator} {o.estimate:.3f}±{o.stderr:.3f} ({o.error / o.stderr:+.1f}σ{'' if o.covered else ' MISS'}"
             f"{', warned' if o.warned else ''})"
             if o.valid else f"{o.estimator} {o.estimate} (not estimable)" for o in outcomes]
    return f"{system} seed {seed} ({index + 1}/{n}): " + " | ".join(parts) + f" | {seconds:.0f} s"


def run_system(system: str, seeds: list[int], estimators: list[str], extra: list[str], work: Path,
               log: Callable[[str], None]) -> tuple[list[Outcome], list[str]]:
    """Every seed of one system; (outcomes, messages about what was skipped or failed)."""
    overrides = [*BUDGET[system], *extra]
    notes: list[str] = []
    if system not in ANALYTIC:
        wanted = [e for e in estimators if e in MD_ESTIMATORS]
        ready, notes = md_available(wanted)
        for note in notes:
            log(note)
        if not ready:
            return [], notes
    fixed = None
    if system in ANALYTIC and {"is_fixed_flow", "mcmc_fixed_flow"} & set(estimators):
        fixed = RunDir(work / f"{system}-fixed")
        train_seed(SYSTEMS[system], overrides, seeds[0], fixed)
    outcomes: list[Outcome] = []
    for index, seed in enumerate(seeds):
        started = time.perf_counter()
        if system in ANALYTIC:
            found = flow_seed(system, overrides, seed, [e for e in estimators if e in FLOW_ESTIMATORS], work, fixed)
        else:
            found, failures = md_seed(overrides, seed, ready, work)
            notes += failures
            for failure in failures:
                log(f"  failed: {failure}")
        outcomes += found
        log(progress_line(system, seed, index, len(seeds), found, time.perf_counter() - started))
    return outcomes, notes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=20, help="number of seeds (default 20)")
    parser.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    parser.add_argument("--estimators", default=",".join([*FLOW_ESTIMATORS, *MD_ESTIMATORS]),
                        help=f"comma-separated, of {', '.join([*FLOW_ESTIMATORS, *MD_ESTIMATORS])}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, after the benchmark's own budget")
    parser.add_argument("--out", type=Path, default=Path("runs/coverage"), help="output folder (default runs/coverage)")
    args = parser.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    args.estimators = [e for e in args.estimators.split(",") if e]
    unknown = [s for s in args.systems if s not in SYSTEMS] + \
              [e for e in args.estimators if e not in (*FLOW_ESTIMATORS, *MD_ESTIMATORS)]
    if unknown or args.seeds < 1:
        parser.error(f"unknown system or estimator: {', '.join(unknown)}" if unknown else "--seeds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    command = "python benchmarks/coverage.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = [f"`{command.strip()}`", "",
              ("Budget: these config overrides keep the seeds affordable (the configs themselves draw 10⁶ flow "
               "samples; see BUDGET in the script):")]
    header += [f"- {s}: {' '.join(BUDGET[s] + args.overrides) or '(config as is)'}" for s in args.systems]
    print("\n".join(header), flush=True)
    outcomes: list[Outcome] = []
    notes: list[str] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="boltzgen-coverage-") as tmp:
        for system in args.systems:
            found, skipped = run_system(system, seeds, args.estimators, args.overrides, Path(tmp),
                                        lambda line: print(line, flush=True))
            outcomes += found
            notes += skipped
    groups: dict[tuple[str, str], list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault((o.system, o.estimator), []).append(o)
    summaries = [summarize(group) for group in groups.values()]
    table = markdown_table(summaries)
    wall = time.perf_counter() - started
    text = "\n".join([*header, "", table, "", *[f"- {note}" for note in notes],
                      f"\nWall time {wall / 60:.1f} min."])
    print("\n" + table + "\n" + "\n".join(notes) + f"\nwall time {wall / 60:.1f} min")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "coverage.md", text + "\n")
    atomic_write_json(args.out / "coverage.json", {
        "command": command.strip(), "seeds": seeds, "budget": {s: BUDGET[s] + args.overrides for s in args.systems},
        "summaries": summaries, "notes": notes, "wall_seconds": wall,
        "outcomes": [asdict(o) | {"error": o.error, "covered": o.covered} for o in outcomes],
    })
    print(f"wrote {args.out / 'coverage.md'} and {args.out / 'coverage.json'}")


if __name__ == "__main__":
    main()
