"""`boltzgen <command> CONFIG|RUN_DIR [options]`: a thin layer over the pipeline modules."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="system YAML file, e.g. systems/double_well.yaml")
    parser.add_argument("--out", type=Path, help="run directory (default: runs/<name>/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set training[0].steps=500 --set flow.hidden=[32,32]")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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

    check = sub.add_parser("check-energy", help="compare the torch force field with OpenMM on perturbed configurations",
                           description="Evaluates the torch energy and forces and OpenMM's (Reference platform) on N "
                                       "configurations perturbed from the PDB, prints the largest errors, and exits "
                                       "with 1 when they exceed the tolerances.")
    check.add_argument("config", type=Path, help="system YAML file of an OpenMM system")
    check.add_argument("--n", type=int, default=16, help="number of perturbed configurations (default 16)")
    check.add_argument("--noise-nm", type=float, default=0.01, help="Gaussian perturbation per coordinate, nm")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def _print_summary(summary: dict[str, Any], out_dir: Path) -> None:
    lines = [f"run directory     {out_dir}"]
    if summary.get("ess") is not None:
        lines.append(f"ESS (Kish)        {summary['ess']:.4f}  ({summary['n_samples']:,} samples, "
                     f"{summary['n_nonfinite']} non-finite)")
    for row in summary.get("free_energies", []):
        text = f"ΔF {row['from']}→{row['to']:<10} {row['delta_f_kT']:+.4f} ± {row['stderr_kT']:.4f} kT"
        if "exact_kT" in row:
            text += f"   (exact {row['exact_kT']:+.4f}, error {row['delta_f_kT'] - row['exact_kT']:+.4f})"
        lines.append(text)
    baseline = summary.get("baseline")
    if baseline:
        for row in baseline.get("free_energies", []):
            lines.append(f"ΔF {row['from']}→{row['to']} {baseline['source']:<12} "
                         f"{row['delta_f_kT']:+.4f} ± {row['stderr_kT']:.4f} kT")
    evaluations = summary.get("energy_evaluations", {})
    if evaluations:
        parts = ", ".join(f"{key} {value:,}" for key, value in evaluations.items() if key != "total")
        lines.append(f"energy evals      {evaluations.get('total', 0):,} ({parts})")
    lines.append(f"wall time         {summary['wall_seconds']:.1f} s")
    print("\n".join(lines))


def _cmd_train(args: argparse.Namespace) -> int:
    from boltzgen.config import load_config
    from boltzgen.pipeline import train

    config, resolved = load_config(args.config, args.overrides)
    out_dir = args.out or Path("runs") / config.name
    summary = train(config, resolved, out_dir, resume=args.resume, force=args.force, progress=not args.no_progress)
    _print_summary(summary, out_dir)
    return 0


def _cmd_md(args: argparse.Namespace) -> int:
    from boltzgen.config import load_config
    from boltzgen.pipeline import md_job

    config, resolved = load_config(args.config, args.overrides)
    out_dir = args.out or Path("runs") / config.name
    summary = md_job(config, resolved, out_dir, progress=not args.no_progress)
    _print_summary(summary, out_dir / "md")
    return 0


def _cmd_check_energy(args: argparse.Namespace) -> int:
    from boltzgen.config import OpenMMSystem, load_config
    from boltzgen.energies.openmm import build_system
    from boltzgen.energies.torchff import compare_with_openmm
    from boltzgen.pipeline import RunError

    config, _ = load_config(args.config, args.overrides)
    if not isinstance(config.system, OpenMMSystem):
        raise RunError(f"{args.config}: check-energy needs an OpenMM system, not {config.system.type}")
    molecule = build_system(config.system.pdb, config.system.forcefield, config.system.temperature_K)
    try:
        report = compare_with_openmm(molecule.system, molecule.positions_nm, config.system.temperature_K,
                                     n=args.n, noise_nm=args.noise_nm, seed=config.seed)
    except ValueError as exc:
        raise RunError(f"{args.config}: {exc}") from None
    print(f"configurations          {report.n} (noise {args.noise_nm} nm)")
    print(f"max |dE|                {report.max_abs_energy_kJ:.3e} kJ/mol")
    print(f"max |dE|/|E|            {report.max_rel_energy:.3e}")
    print(f"max |dF|                {report.max_abs_force_kJ_nm:.3e} kJ/mol/nm")
    print("parity                  " + ("PASSED" if report.passed else "FAILED: use energy_backend: openmm"))
    return 0 if report.passed else 1


COMMANDS = {"train": _cmd_train, "md": _cmd_md, "check-energy": _cmd_check_energy}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from boltzgen.errors import USER_ERRORS

    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as exc:
        print(f"boltzgen: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("\nboltzgen: interrupted; the last checkpoint is kept; continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
