"""Kish ESS of alanine runs against their cost (energy evaluations incl. MD, wall time), beside published figures.

Usage::

    python benchmarks/ess_vs_cost.py RUN_DIR [RUN_DIR ...] [--label NAME ...] [--plot runs/ess_vs_cost.png]

Each RUN_DIR is a ``boltzgen train`` output (its ``summary.json`` is read). Prints a markdown table (run,
energy evaluations incl. the MD training data, wall time, Kish ESS over N samples, ΔF ± σ) with the
published figures as extra rows, and writes a PNG: ESS against energy evaluations (log x) and ESS against
wall time. The published runs (alanine dipeptide in implicit solvent, on a GPU) state no wall time, so they
appear in the first panel only; the reverse-KL figure states no evaluation count either, so it is a
horizontal line there. ESS is Kish ESS / N over all N samples, no clipping, as ``summary.json`` has it.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from boltzgen.files import atomic_path  # noqa: E402

SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
PUBLISHED_NOTE = "published, GPU, implicit solvent"
# (method, ESS, energy evaluations or None where the publication states none).
PUBLISHED: list[tuple[str, float, float | None]] = [
    ("constrained mass transport", 0.977, 1e8),
    ("FAB", 0.948, 2e8),
    ("reverse KL", 0.941, None),
    ("maximum likelihood on MD", 0.821, 5e9),
]


@dataclass(frozen=True)
class Run:
    label: str
    evaluations: float  # flow training + sampling + the MD that made the training data
    wall_seconds: float
    ess: float
    n_samples: int
    delta_f: float | None
    stderr: float | None


def read_run(path: Path, label: str | None = None) -> Run:
    summary = json.loads((path / "summary.json").read_text())
    md = (summary.get("baseline") or {}).get("training_data") or {}
    first = (summary.get("free_energies") or [{}])[0]
    return Run(label=label or path.name, evaluations=float(summary["energy_evaluations"]["total"])
               + float(md.get("energy_evaluations") or 0.0), wall_seconds=float(summary["wall_seconds"]),
               ess=float(summary["ess"]), n_samples=int(summary["n_samples"]), delta_f=first.get("delta_f_kT"),
               stderr=first.get("stderr_kT"))


def _wall(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def _sci(value: float) -> str:
    exponent = math.floor(math.log10(value))
    return f"{value / 10 ** exponent:.2f} × 10{str(exponent).translate(SUPERSCRIPT)}"


def table(runs: list[Run]) -> str:
    lines = ["| run | energy evaluations (incl. MD) | wall time | Kish ESS | N | ΔF(A→B) [kT] |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        df = "—" if r.delta_f is None else f"{r.delta_f:.3f} ± {r.stderr:.3f}"
        lines.append(f"| {r.label} | {_sci(r.evaluations)} | {_wall(r.wall_seconds)} | {r.ess:.3f} | "
                     f"{r.n_samples:,} | {df} |")
    for name, ess, evals in PUBLISHED:
        lines.append(f"| {name} ({PUBLISHED_NOTE}) | {'not stated' if evals is None else _sci(evals)} | — | "
                     f"{ess:.3f} | — | — |")
    return "\n".join(lines)


def plot(runs: list[Run], path: Path) -> Path:
    fig, (ax_evals, ax_wall) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, r in enumerate(runs):
        ax_evals.scatter(r.evaluations, r.ess, color=f"C{i}", label=r.label, zorder=3)
        ax_wall.scatter(r.wall_seconds / 60, r.ess, color=f"C{i}", label=r.label, zorder=3)
    markers = iter("s^Dv")
    for j, (name, ess, evals) in enumerate(PUBLISHED):
        color = f"C{len(runs) + j}"
        if evals is None:
            ax_evals.axhline(ess, color=color, ls="--", lw=1, label=f"{name} (published, cost not stated)")
        else:
            ax_evals.scatter(evals, ess, marker=next(markers), facecolors="none", edgecolors=color,
                             s=60, label=f"{name} (published)")
    ax_evals.set_xscale("log")
    ax_evals.set_xlabel("energy evaluations (incl. MD)")
    ax_wall.set_xlabel("wall time [min] (2-core CPU)")
    ax_wall.set_xlim(0, max([30.0] + [1.1 * r.wall_seconds / 60 for r in runs]))
    for ax in (ax_evals, ax_wall):
        ax.axhline(0.8, color="0.6", lw=0.8, ls=":")  # issue 12's target ESS
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("Kish ESS / N")
        ax.legend(fontsize=7)
    fig.suptitle(f"alanine dipeptide: ours on a 2-core CPU, evaluations incl. the MD; hollow: {PUBLISHED_NOTE}",
                 fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="boltzgen train run directories")
    parser.add_argument("--label", action="append", default=[], help="a name per run, in order (default: dir name)")
    parser.add_argument("--plot", type=Path, default=Path("runs/ess_vs_cost.png"), help="PNG to write")
    args = parser.parse_args()
    labels = args.label + [None] * (len(args.runs) - len(args.label))
    runs = [read_run(path, label) for path, label in zip(args.runs, labels)]
    print(table(runs))
    print(f"\nplot: {plot(runs, args.plot)}")


if __name__ == "__main__":
    main()
