"""Well crossings per energy evaluation on the double well: flow IMH chains vs baseline MALA chains.

Usage::

    python benchmarks/crossing_rate.py RUN_DIR [--chains 1024] [--steps 1000] [--warmup 200]

RUN_DIR is a trained double-well run (``boltzgen train systems/double_well.yaml --out RUN_DIR``).
Both samplers run the same number of chains and production steps:

- flow IMH: independence Metropolis with the trained flow as proposal, chains started from flow samples;
- baseline MALA: CartesianMALA started exactly as ``runs.baselines.run_baseline_mala`` (sampling-importance-
  resampling from N(0, init_scale^2), so chains start in both wells in about their equilibrium
  proportion), step size from the config, tuned toward 57 % acceptance during warm-up, then frozen.

Crossings are counted over production only, per chain, and summed over chains, in two ways:

- sign changes: ``sign(x0)`` differs between consecutive states of a chain (the issue's definition;
  for a local sampler this also counts re-crossings of the barrier top x0 ~ 0);
- transitions: a chain that was last in one core (x0 < -1 or x0 > 1) enters the other one.

Rates are per energy evaluation of the production phase (one per chain and step for both samplers:
IMH evaluates the energy of its proposal; MALA the energy and, from the same autograd pass, the force).
The issue asks for a ratio IMH / MALA of at least 100. A zero MALA count gives a lower bound on the
ratio from a one-crossing upper estimate.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from boltzgen.config import DoubleWellSystem
from boltzgen.errors import RunError
from boltzgen.mcmc import initial_state, resample_starts, run_chains
from boltzgen.moves import CartesianMALA, ChainState, IndependenceMetropolis
from boltzgen.runs.baselines import MALA_START_OVERSAMPLE
from boltzgen.runs.rundir import RunDir
from boltzgen.runs.target import load_run

CORE = 1.0


def crossings(x0: np.ndarray) -> tuple[int, int]:
    """``(sign changes, core-to-core transitions)`` summed over chains; ``x0``: ``[T, chains]``."""
    s = np.sign(x0)
    sign_changes = int(np.sum(s[1:] != s[:-1]))
    transitions = 0
    last = np.zeros(x0.shape[1])  # -1 / +1: last core visited, 0: none yet
    for row in x0:
        core = np.where(row < -CORE, -1.0, np.where(row > CORE, 1.0, 0.0))
        transitions += int(np.sum((core != 0) & (last != 0) & (core != last)))
        last = np.where(core != 0, core, last)
    return sign_changes, transitions


def sir_start(energy, n_chains: int, init_scale: float, seed: int) -> torch.Tensor:
    """The start of the MALA baseline: SIR from N(0, init_scale^2 I), as ``runs.baselines.run_baseline_mala``."""
    gen = torch.Generator().manual_seed(seed)
    proposals = init_scale * torch.randn(MALA_START_OVERSAMPLE * n_chains, energy.dim, generator=gen,
                                         dtype=torch.float64)
    with torch.no_grad():
        log_w = -energy(proposals) + 0.5 * (proposals / init_scale).pow(2).sum(1)
    return proposals[resample_starts(log_w, n_chains, gen)]


def measure(name: str, move, start: ChainState | torch.Tensor, steps: int, warmup: int) -> dict:
    started = time.perf_counter()
    warm = run_chains(move, start, n_steps=0, n_warmup=warmup, progress=False)
    result = run_chains(move, warm.final_state, n_steps=steps, progress=False)
    x0 = result.x[:, :, 0].cpu().numpy()
    sign_changes, transitions = crossings(x0)
    evaluations = result.energy_evaluations
    return {"name": name, "sign_changes": sign_changes, "transitions": transitions, "evaluations": evaluations,
            "acceptance": result.acceptance_rate, "step_sizes": result.step_sizes,
            "p_right": float(np.mean(x0 > 0)), "seconds": time.perf_counter() - started}


def ratio_text(a: dict, b: dict, key: str) -> str:
    rate_a, rate_b = a[key] / a["evaluations"], b[key] / b["evaluations"]
    if b[key] == 0:
        return f">= {rate_a / (1.0 / b['evaluations']):.3g} (MALA: 0 events; bound from 1 event)"
    # relative Poisson errors of the two counts, combined
    rel = math.sqrt(1.0 / max(a[key], 1) + 1.0 / b[key])
    return f"{rate_a / rate_b:.3g} (± {100 * rel:.0f} %, Poisson)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--chains", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        trained = load_run(RunDir(args.run_dir))
    except RunError as exc:
        print(f"crossing_rate: error: {exc}", file=sys.stderr)
        return 2
    config, generator = trained.config, trained.generator
    if not isinstance(config.system, DoubleWellSystem):
        print(f"crossing_rate: error: {args.run_dir} is a {config.system.type} run, not a double well", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    energy = generator.energy

    torch.manual_seed(args.seed)
    imh = measure("flow IMH", IndependenceMetropolis(generator), initial_state(generator, args.chains),
                  args.steps, args.warmup)
    torch.manual_seed(args.seed)
    start = sir_start(energy, args.chains, config.baseline.init_scale, config.seed + args.seed)
    mala = measure("baseline MALA", CartesianMALA(energy, step_size=config.baseline.step_size), start,
                   args.steps, args.warmup)

    print(f"double well, {args.chains} chains x {args.steps} production steps (+{args.warmup} warm-up) each")
    for r in (imh, mala):
        acc = ", ".join(f"{k} {v:.3f}" for k, v in r["acceptance"].items())
        steps = ", ".join(f"{k} {v:.3g}" for k, v in r["step_sizes"].items()) or "-"
        print(f"{r['name']:<14} sign changes {r['sign_changes']:>9,}  transitions {r['transitions']:>9,}  "
              f"evaluations {r['evaluations']:>11,}  per evaluation: {r['sign_changes'] / r['evaluations']:.3e} / "
              f"{r['transitions'] / r['evaluations']:.3e}  acceptance {acc}  step {steps}  P(x0>0) {r['p_right']:.4f}  "
              f"{r['seconds']:.1f} s")
    print(f"ratio IMH / MALA, sign changes per evaluation: {ratio_text(imh, mala, 'sign_changes')}")
    print(f"ratio IMH / MALA, core-to-core transitions per evaluation: {ratio_text(imh, mala, 'transitions')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
