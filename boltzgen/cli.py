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
    return parser


def _print_summary(summary: dict[str, Any], out_dir: Path) -> None:
    lines = [f"run directory     {out_dir}"]
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
        lines.append(f"energy evals      {evaluations.get('total', 0):,} (training {evaluations.get('training', 0):,}, "
                     f"sampling {evaluations.get('sampling', 0):,})")
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


COMMANDS = {"train": _cmd_train}


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
