"""`boltzgen <command> CONFIG|RUN_DIR [options]`: parses, calls the commands in :mod:`boltzgen.runs`,
and prints a short summary from their summary dataclasses."""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from boltzgen import distributed
from boltzgen.config import MAX_BATCH, MAX_CHAINS, MAX_SAMPLES, MAX_STEPS, SEED_MAX
from boltzgen.errors import USER_ERRORS, ConfigError, RunError, describe_environment_error
from boltzgen.runs.rundir import RunDir
from boltzgen.runs.summaries import FreeEnergyRow, MCMCSummary

EXIT_INTERNAL_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class _UsageError(Exception):
    """A bad command line; :func:`main` prints it as one line and exits with 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the option, what is wrong, and where help is."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message}; see `{self.prog} --help`")


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _count(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number in [low, high] (``1e6`` is accepted)."""
    def parse(text: str) -> int:
        value = _number(text)
        if value != int(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is out of range; give {low:,} to {high:,}")
        return int(value)
    return parse


def _positive(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def _non_negative(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must not be negative")
    return value


def _temperatures(text: str) -> list[float]:
    """``"290,310"`` -> ``[290.0, 310.0]``, every temperature positive and finite."""
    return [_positive(item.strip()) for item in text.split(",")]


_SEED = _count(0, SEED_MAX)


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="system YAML file, e.g. systems/double_well.yaml")
    parser.add_argument("--out", type=Path, help="run directory (default: runs/<name>/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set training[0].steps=500 --set flow.hidden=[32,32]")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="boltzgen",
        description="Boltzmann generators: train a normalizing flow on a system's Boltzmann distribution, "
                    "reweight its samples, and compute free energies.",
        epilog="Example: boltzgen train systems/double_well.yaml   (results in runs/double_well/)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="get training data, train the flow, sample, reweight, compute ΔF",
                           description="Runs the whole job for one system: baseline data (MALA or MD), staged "
                                       "training, sampling with importance weights, free energies, plots. "
                                       "Writes config.yaml, checkpoint.pt, metrics.csv, samples.h5, summary.json "
                                       "and plots/*.png into the run directory.")
    _add_config_options(train)
    train.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    train.add_argument("--force", action="store_true", help="overwrite an existing run directory")

    md = sub.add_parser("md", help="run the OpenMM MD baseline (plain Langevin) for a molecular system",
                        description="Langevin MD with OpenMM as configured under `md:`, into <run>/md/ "
                                    "(md.h5, summary.json, plots). An interrupted run resumes; a finished "
                                    "identical run is reused. `boltzgen train` reuses <run>/md/md.h5.")
    _add_config_options(md)
    md.add_argument("--umbrella", action="store_true",
                    help="instead of plain MD, run umbrella sampling as the config's `umbrella:` says: the flattening "
                         "bias along phi into <run>/umbrella/ (the default), or harmonic windows on a grid of one "
                         "or two CVs (umbrella: {cvs: [phi, psi]}) into <run>/umbrella_<cvs>/; `compare` picks "
                         "them up")
    md.add_argument("--remd", action="store_true",
                    help="instead of plain MD, run temperature replica exchange (config `remd:`, openmmtools) into "
                         "<run>/remd/: ΔF at the target temperature by MBAR over all replicas, exchange acceptance, "
                         "round trips and cis-peptide fraction; an interrupted run resumes from its last checkpoint")

    check = sub.add_parser("check-energy", help="compare the torch force field with OpenMM on perturbed configurations",
                           description="Evaluates the torch energy and forces and OpenMM's (Reference platform) on N "
                                       "configurations perturbed from the PDB, with both CPU code paths of the torch "
                                       "force field (the C kernel and eager torch), prints the largest errors, and "
                                       "exits with 1 when they exceed the tolerances.")
    check.add_argument("config", type=Path, help="system YAML file of an OpenMM system")
    check.add_argument("--n", type=_count(1, 100_000), default=16, help="number of perturbed configurations (default 16)")
    check.add_argument("--noise-nm", type=_non_negative, default=0.01, help="Gaussian perturbation per coordinate, nm")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _add_job_commands(sub)
    return parser


def _add_job_commands(sub: Any) -> None:
    """`sample`, `mcmc` and `compare`: jobs on a trained run directory."""
    from boltzgen.runs.chains import MOVES
    from boltzgen.runs.sample import TEMPERATURES_HELP, WEIGHTS, WEIGHTS_HELP

    sample = sub.add_parser("sample", help="draw N flow samples with importance weights, ESS, k̂, ΔF and FES",
                            description="Streams N flow samples in batches (bounded memory) into RUN_DIR/samples.h5 "
                                        "with log q, u and log w; writes RUN_DIR/sample_summary.json (Kish ESS, ESS "
                                        "per observable, largest normalized weight, Pareto k̂, ΔF with bootstrap "
                                        "errors, FES along each CV, and with --temperatures the free energies at "
                                        "other temperatures by MBAR) and plots/sample_fes*.png. Prints a WARNING "
                                        "when k̂ > 0.7 (the weighted estimates are then unreliable).")
    sample.add_argument("run_dir", type=Path, help="a run directory written by `boltzgen train`")
    # -n: under torchrun, whose own parser takes --n for an ambiguous abbreviation of its options.
    sample.add_argument("-n", "--n", type=_count(1, MAX_SAMPLES), required=True,
                        help="number of samples, e.g. 10000000 (-n N under torchrun)")
    sample.add_argument("--batch", type=_count(1, MAX_BATCH),
                        help="samples per batch (default: sampling.batch of the run's config)")
    sample.add_argument("--out", type=Path, help="samples file (default RUN_DIR/samples.h5, which is replaced)")
    sample.add_argument("--weights", choices=WEIGHTS, default="raw", help=WEIGHTS_HELP)
    sample.add_argument("--seed", type=_SEED, help="random seed (default: the run's seed)")
    sample.add_argument("--temperatures", type=_temperatures, metavar="T1,T2,...", help=TEMPERATURES_HELP)
    sample.add_argument("--no-progress", action="store_true", help="hide progress bars")

    mcmc = sub.add_parser("mcmc", help="flow-preconditioned MCMC: independence MH, latent HMC/MALA, IMH + local MALA",
                          description="Runs many chains in parallel, started near equilibrium by sampling-importance-"
                                      "resampling of flow samples. imh: independence Metropolis with the flow as "
                                      "proposal; latent_hmc / latent_mala: HMC / MALA on the latent pull-back of the "
                                      "target (NeuTra); imh+mala: a cycle of IMH and a local Cartesian MALA step. "
                                      "Warm-up adapts step sizes only; they are frozen afterwards. "
                                      "Writes chains.h5 (chain-major: frame c*T+t is kept state t of chain c; datasets "
                                      "u, chain, step; mdtraj-readable for molecules) and summary.json with acceptance "
                                      "rates, autocorrelation times and ΔF with block errors into RUN_DIR/mcmc/.")
    mcmc.add_argument("run_dir", type=Path, help="a run directory written by `boltzgen train`")
    mcmc.add_argument("--chains", type=_count(1, MAX_CHAINS), default=256, help="number of parallel chains (default 256)")
    mcmc.add_argument("--steps", type=_count(1, MAX_STEPS), default=1000, help="production steps per chain (default 1000)")
    mcmc.add_argument("--warmup", type=_count(0, MAX_STEPS), default=200,
                      help="warm-up steps per chain, step sizes adapt here (default 200)")
    mcmc.add_argument("--thin", type=_count(1, MAX_STEPS), default=1, help="keep every THIN-th production state (default 1)")
    mcmc.add_argument("--moves", choices=MOVES, default="imh", help="the Markov move (default imh)")
    mcmc.add_argument("--step-size", type=_positive,
                      help="initial latent step size of latent_hmc/latent_mala (default 0.1)")
    mcmc.add_argument("--local-step", type=_positive,
                      help="initial step size of the local MALA move of imh+mala, in units of x: nm for molecules "
                           "(default 0.002 nm), 0.1 for analytic systems")
    mcmc.add_argument("--leapfrog", type=_count(1, 10_000), default=10,
                      help="leapfrog steps per latent HMC step (default 10)")
    mcmc.add_argument("--seed", type=_SEED, help="random seed (default: the run's seed)")
    mcmc.add_argument("--out", type=Path, help="output directory (default RUN_DIR/mcmc)")
    mcmc.add_argument("--no-progress", action="store_true", help="hide progress bars")

    compare = sub.add_parser("compare", help="compare importance sampling, MCMC, MD/baseline and umbrella sampling",
                             description="Puts side by side every method available for the run: ΔF ± error, ESS, "
                                         "energy evaluations, wall time, the cost extrapolated to a ΔF error of "
                                         "0.1 kT, FES RMSE and Jensen-Shannon divergence against the reference (exact "
                                         "quadrature for analytic systems, MD for molecules). Writes RUN_DIR/report.md, "
                                         "RUN_DIR/compare.json and plots/compare_*.png.")
    compare.add_argument("run_dir", type=Path, help="a run directory written by `boltzgen train`")
    compare.add_argument("--md", type=Path, help="MD directory with summary.json and md.h5 (default RUN_DIR/md)")


def _delta_f_text(row: FreeEnergyRow) -> str:
    """``+1.2345 ± 0.0123 kT`` for a free-energy row, or why it has no estimate."""
    if not row.estimable:
        return f"not estimable: no samples in {row.empty_state}" if row.empty_state else "not estimable"
    error = f"{row.stderr_kT:.4f}" if math.isfinite(row.stderr_kT) else "n/a"
    return f"{row.delta_f_kT:+.4f} ± {error} kT"


def _free_energy_lines(rows: list[FreeEnergyRow], label: str = "") -> list[str]:
    lines = []
    for row in rows:
        head = f"ΔF {row.from_}→{row.to} {label:<12}" if label else f"ΔF {row.from_}→{row.to:<10}"
        text = f"{head} {_delta_f_text(row)}"
        if row.exact_kT is not None:
            error = f", error {row.delta_f_kT - row.exact_kT:+.4f}" if row.estimable else ""
            text += f"   (exact {row.exact_kT:+.4f}{error})"
        lines.append(text)
    return lines


def _log_det_lines(log_det: Any) -> list[str]:
    """What an estimated log-det does to the weights: the estimator, the noise of log q, its bias."""
    lines = [f"log-det           ESTIMATED: {log_det.estimator}",
             f"                  std of log q {log_det.log_q_std:.4f} (max {log_det.log_q_std_max:.4f}) over "
             f"{log_det.n_repeats} evaluations of {log_det.n_points} samples: the weights carry this noise"]
    if log_det.log_q_bias is not None:
        lines.append(f"                  mean estimate - exact log q: {log_det.log_q_bias:+.4f} ± "
                     f"{log_det.log_q_bias_stderr:.4f}")
    return lines


def _print_summary(summary: Any, out_dir: Path) -> None:
    """The lines every command prints at its end: ESS, ΔF, costs and wall time."""
    lines = [f"run directory     {out_dir}"]
    ess = getattr(summary, "ess", None)
    if ess is not None and not isinstance(summary, MCMCSummary):
        lines.append(f"ESS (Kish)        {ess:.4f}  ({summary.n_samples:,} samples, {summary.n_nonfinite} non-finite)")
    log_det = getattr(summary, "log_det", None)
    if log_det is not None:
        lines += _log_det_lines(log_det)
    log_z = getattr(summary, "log_z", None)
    if log_z is not None:
        stderr = f"{log_z.stderr:.4f}" if math.isfinite(log_z.stderr) else "n/a"
        known = f"   exact {log_z.exact:.4f}" if log_z.exact is not None else ""
        lines.append(f"log Z             {log_z.estimate:.4f} ± {stderr}{known}"
                     + ("   (relative: only differences mean something)" if log_z.relative else ""))
    lines += _free_energy_lines(summary.free_energies)
    baseline = getattr(summary, "baseline", None)
    if baseline is not None:
        lines += _free_energy_lines(baseline.free_energies, baseline.source)
    umbrella = getattr(summary, "umbrella", None)
    if umbrella is not None:
        lines += _free_energy_lines(umbrella.free_energies, "umbrella")
    thermodynamic = getattr(summary, "thermodynamic_free_energies", None) or []
    if thermodynamic:
        lines.append(f"f(T) - f(target)  {thermodynamic[0].method}, reduced (kT of each T)")
    for row in thermodynamic:
        t = f"T = {row.temperature_K:g} K" if row.temperature_K is not None else f"T/T0 = {row.temperature_ratio:g}"
        stderr = f"{row.stderr_kT:.4f}" if math.isfinite(row.stderr_kT) else "n/a"
        n_eff = f"{row.n_eff:,.0f}" if math.isfinite(row.n_eff) else "n/a"
        lines.append(f"  {t:<15} {row.delta_f_kT:+.4f} ± {stderr} kT   n_eff {n_eff}")
    evaluations = summary.energy_evaluations
    parts = ", ".join(f"{key} {value:,}" for key, value in evaluations.items() if key != "total")
    lines.append(f"energy evals      {evaluations.get('total', 0):,} ({parts})")
    energy_seconds = getattr(summary, "energy_seconds", None)
    if energy_seconds:
        lines.append(f"in energy calls   {energy_seconds['total']:.1f} s (training {energy_seconds['training']:.1f} s, "
                     f"sampling {energy_seconds['sampling']:.1f} s)")
    lines.append(f"wall time         {summary.wall_seconds:.1f} s")
    print("\n".join(lines))


def _cmd_train(args: argparse.Namespace) -> int:
    from boltzgen.config import load_config
    from boltzgen.runs.train import train

    config, resolved = load_config(args.config, args.overrides)
    run = RunDir(args.out or Path("runs") / config.name)
    summary = train(config, resolved, run, resume=args.resume, force=args.force, progress=not args.no_progress)
    if summary is not None:  # None on the ranks of a launch other than 0
        _print_summary(summary, run.path)
    return 0


def _cmd_md(args: argparse.Namespace) -> int:
    from boltzgen.config import load_config
    from boltzgen.runs.baselines import md_job
    from boltzgen.runs.remd import remd_job
    from boltzgen.runs.umbrella import umbrella_job

    if args.umbrella and args.remd:
        raise _UsageError("boltzgen md: --umbrella and --remd are two different baselines; give one of them")
    config, resolved = load_config(args.config, args.overrides)
    run = RunDir(args.out or Path("runs") / config.name)
    if args.remd:
        _refuse_launch("md --remd")
        _print_remd(remd_job(config, resolved, run, progress=not args.no_progress), run.remd.path)
    elif args.umbrella:
        if config.umbrella.method == "windows":  # its window grid is not shared out over ranks
            _refuse_launch("md --umbrella (umbrella.method windows)")
        summary = umbrella_job(config, resolved, run, progress=not args.no_progress and distributed.is_main())
        if distributed.is_main():
            _print_umbrella(summary, run.umbrella_folder(config.umbrella.method, config.umbrella.cv_names).path)
    else:
        _refuse_launch("md (plain MD, without --umbrella)")
        _print_summary(md_job(config, resolved, run, progress=not args.no_progress), run.md.path)
    return 0


def _print_remd(summary: Any, out_dir: Path) -> None:
    """The replica exchange lines before the common summary: ladder, acceptance, round trips, cis bonds."""
    acceptance = ", ".join(f"{a:.2f}" if math.isfinite(a) else "n/a" for a in summary.pair_acceptance)
    tau = f"{summary.tau_int_iterations:.1f}" if math.isfinite(summary.tau_int_iterations) else "inf"
    lines = [f"ladder [K]        {', '.join(f'{t:.1f}' for t in summary.temperatures_K)}",
             f"acceptance        {acceptance} (neighbouring pairs)",
             f"round trips       {summary.round_trips_total} ({', '.join(map(str, summary.round_trips))} per replica)",
             f"MBAR frames       {summary.n_samples:,} (n_eff at {summary.target_temperature_K:g} K: {summary.n_eff:,.0f})",
             f"tau_int           {tau} iterations; jackknife blocks of {summary.block_iterations} iterations"]
    if summary.cis_fraction is not None:
        lines.append(f"cis peptide       {summary.cis_fraction:.4f} of frames ({summary.n_cis_frames:,}), "
                     + ("kept" if summary.keep_cis else "left out (remd.keep_cis: false)"))
    print("\n".join(lines))
    _print_summary(summary, out_dir)


def _print_umbrella(summary: Any, out_dir: Path) -> None:
    """The umbrella summary's lines, the errors behind ΔF, and its warnings (on stderr)."""
    _print_summary(summary, out_dir)
    for row in summary.free_energies:
        if row.stderr_bootstrap_kT is not None:
            print(f"ΔF {row.from_}→{row.to} errors    MBAR {row.stderr_analytic_kT:.4f}, block bootstrap "
                  f"{row.stderr_bootstrap_kT:.4f} kT; halves {', '.join(f'{h:+.4f}' for h in row.halves_kT or [])}")
    for check in summary.md_agreement or []:
        print(f"vs plain MD       {check.cv}: RMSE {check.rmse_kT:.3f} kT over {check.n_bins} converged bins, "
              f"max |z| {check.max_abs_z:.1f}, p = {check.p_value:.2g}")
    for warning in summary.warnings or []:
        print(f"WARNING: {warning}", file=sys.stderr)


def _cmd_check_energy(args: argparse.Namespace) -> int:
    from boltzgen.config import OpenMMSystem, load_config
    from boltzgen.energies.native import load_kernel, unavailable_reason
    from boltzgen.energies.openmm import build_system
    from boltzgen.energies.parity import compare_with_openmm

    config, _ = load_config(args.config, args.overrides)
    if not isinstance(config.system, OpenMMSystem):
        raise RunError(f"{args.config}: check-energy needs an OpenMM system, not {config.system.type}")
    molecule = build_system(config.system.pdb, config.system.forcefield, config.system.temperature_K)
    # Both CPU code paths: the C kernel (what runs on the CPU) and eager torch (CUDA, or no compiler).
    paths = {"eager torch": False}
    if load_kernel() is not None:
        paths = {"C kernel": True, **paths}
    else:
        print(f"C kernel                unavailable ({unavailable_reason()}); eager torch runs instead")
    try:
        reports = {name: compare_with_openmm(molecule.system, molecule.positions_nm, config.system.temperature_K,
                                             n=args.n, noise_nm=args.noise_nm, seed=config.seed, native=native)
                   for name, native in paths.items()}
    except ValueError as exc:
        raise RunError(f"{args.config}: {exc}") from None
    n = next(iter(reports.values())).n
    print(f"configurations          {n} (noise {args.noise_nm} nm)")
    print(f"{'':<24}" + "".join(f"{name:>14}" for name in reports))
    for label, field, unit in (("max |dE|", "max_abs_energy_kJ", "kJ/mol"), ("max |dE|/|E|", "max_rel_energy", ""),
                               ("max |dF|", "max_abs_force_kJ_nm", "kJ/mol/nm")):
        values = "".join(f"{getattr(report, field):>14.3e}" for report in reports.values())
        print(f"{label:<24}{values}  {unit}".rstrip())
    passed = all(report.passed for report in reports.values())
    print("parity                  " + ("PASSED" if passed else "FAILED: use energy_backend: openmm"))
    return 0 if passed else 1


def _observable_ess(value: float) -> str:
    """ESS_f / N for the terminal. Far above 1 it only says that the few samples where f differs carry
    almost no weight, so the delta-method variance missed them: no number is shown (the JSON keeps it)."""
    if not math.isfinite(value):
        return "inf"
    return f"{value:.3f}" if value <= 10 else "> 10 (unreliable: f varies only on near-zero weights)"


def _cmd_sample(args: argparse.Namespace) -> int:
    from boltzgen.estimators.weights import KHAT_UNRELIABLE
    from boltzgen.runs.sample import sample_job

    summary = sample_job(RunDir(args.run_dir), args.n, batch=args.batch, out=args.out, weights=args.weights,
                         seed=args.seed, progress=not args.no_progress and distributed.is_main(),
                         temperatures=args.temperatures)
    if summary is None:  # a rank of a launch other than 0: rank 0 reports
        return 0
    khat = summary.pareto_khat
    ess_obs = ", ".join(f"{key} {_observable_ess(value)}" for key, value in summary.ess_per_observable.items())
    print("\n".join([
        f"samples file      {summary.samples_file}  ({summary.n_samples:,} samples, batch {summary.batch:,})",
        f"largest weight    {summary.max_normalized_weight:.3e} (normalized)",
        f"Pareto k̂          {khat:.3f}" if math.isfinite(khat) else "Pareto k̂          undefined",
        f"weights           {summary.weights}",
        f"ESS/N per obs.    {ess_obs}",
    ]))
    _print_summary(summary, args.run_dir)
    if not khat <= KHAT_UNRELIABLE:
        tail = (f"Pareto k̂ = {khat:.3f} > {KHAT_UNRELIABLE}: the importance weights have a heavy tail" if
                math.isfinite(khat) else "Pareto k̂ is undefined (too few samples carry weight to fit the tail)")
        print(f"WARNING: {tail} and the weighted estimates are unreliable; train longer or use MCMC "
              "(`boltzgen mcmc`)", file=sys.stderr)
    return 0


def _cmd_mcmc(args: argparse.Namespace) -> int:
    from boltzgen.runs.chains import mcmc_job

    summary = mcmc_job(RunDir(args.run_dir), chains=args.chains, steps=args.steps, warmup=args.warmup, thin=args.thin,
                       moves=args.moves, out_dir=args.out, step_size=args.step_size, local_step=args.local_step,
                       n_leapfrog=args.leapfrog, seed=args.seed, progress=not args.no_progress)
    acceptance = ", ".join(f"{k} {v:.3f}" if math.isfinite(v) else f"{k} n/a" for k, v in summary.acceptance_rate.items())
    steps = ", ".join(f"{k} {v:.4g}" for k, v in summary.step_sizes.items())
    taus = ", ".join(f"{k} {v:.2f}" if math.isfinite(v) else f"{k} inf" for k, v in summary.tau_int.items())
    print(f"chains file       {summary.chains_file}  ({summary.n_chains} chains x "
          f"{summary.n_samples // summary.n_chains} frames, chain-major)")
    print(f"acceptance        {acceptance}")
    if steps:
        print(f"step sizes        {steps} (frozen after warm-up)")
    print(f"tau_int [frames]  {taus}")
    if summary.tau_unreliable:
        print(f"                  (chains shorter than 50 tau for: {', '.join(summary.tau_unreliable)})")
    ess = summary.ess_samples
    print(f"ESS (from tau)    {ess:,.0f} of {summary.n_samples:,} samples (n / max tau_int)" if math.isfinite(ess)
          else "ESS (from tau)    undefined")
    _print_summary(summary, Path(summary.chains_file).parent)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from boltzgen.runs.compare import compare_job

    result = compare_job(RunDir(args.run_dir), md_dir=args.md)
    print(result["table_markdown"])
    print(f"\nwritten: {result['report']}, {result['json']}")
    return 0


def _refuse_launch(command: str) -> None:
    """A ConfigError when ``command``, which runs in one process, was launched on several (torchrun)."""
    size = distributed.world().size
    if size > 1:
        raise ConfigError(f"`boltzgen {command}` runs in one process, not on the {size} of this launch; run it "
                          "without torchrun (train, sample and md --umbrella run distributed)")


COMMANDS = {"train": _cmd_train, "md": _cmd_md, "check-energy": _cmd_check_energy, "sample": _cmd_sample,
            "mcmc": _cmd_mcmc, "compare": _cmd_compare}


def _output_folder(argv: list[str] | None) -> Path:
    """The folder a command writes into, as far as its arguments say (for the disk-full check)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--out" in args[:-1]:
        return Path(args[args.index("--out") + 1])
    return Path(args[1]) if len(args) > 1 and args[0] in ("sample", "mcmc", "compare") else Path("runs")


def _disk_is_full(folder: Path) -> bool:
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free < (1 << 20)
    return False


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input and faults of the environment end in one line on stderr and exit 2.

    Under torchrun every rank runs it, and the ranks leave together; after an error they wait only a
    moment for each other, so that rank 0 has printed its line before torchrun, which stops every rank
    once one fails, stops it.
    """
    rank = _launch_rank()
    try:
        code = _run_command(argv, rank)
        if code == 0:
            distributed.barrier()  # ranks leave together: none closes its connections while another still uses them
        else:
            distributed.wait_for_ranks()
        return code
    finally:
        distributed.stop()


def _run_command(argv: list[str] | None, rank: int) -> int:
    try:
        args = build_parser().parse_args(argv)
        distributed.start()
        if args.command in ("mcmc", "compare", "check-energy"):
            _refuse_launch(args.command)
        return COMMANDS[args.command](args)
    except (_UsageError, ConfigError) as exc:
        if rank != 0:  # every rank reads the same command line and config: rank 0 says it once
            return EXIT_BAD_INPUT
        message = str(exc)
    except USER_ERRORS as exc:
        message = str(exc)
    except KeyboardInterrupt:
        if rank == 0:
            print("\nboltzgen: interrupted; the last checkpoint is kept; continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (OSError, MemoryError, RuntimeError) as exc:
        message = describe_environment_error(exc)
        folder = _output_folder(argv)
        if message is None and isinstance(exc, OSError) and _disk_is_full(folder):
            # HDF5 reports a full disk without its errno (e.g. "unexpected pos"); the free space tells.
            message = f"{folder}: the disk is full; free space on it, or write elsewhere with --out"
        if message is None:
            return _internal_error(exc)
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback on request
        return _internal_error(exc)
    print(f"boltzgen: error: {'' if rank == 0 else f'rank {rank}: '}{message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _launch_rank() -> int:
    """This process's rank under torchrun (0 otherwise, or when the variable is not a number)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _internal_error(exc: BaseException) -> int:
    if os.environ.get("BOLTZGEN_TRACEBACK"):
        raise exc
    first = str(exc).splitlines()[0] if str(exc) else ""
    print(f"boltzgen: internal error: {type(exc).__name__}: {first[:200]} (a bug: please report it; "
          "BOLTZGEN_TRACEBACK=1 shows where it happened)", file=sys.stderr)
    return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
