"""Training steps per second at a fixed global batch: one process against two (torchrun, gloo).

Usage::

    python benchmarks/distributed.py [--configs systems/double_well.yaml systems/alanine.yaml]
        [--steps 40] [--rounds 3] [--json FILE]

For each config and each of its training stages, at the stage's own (global) batch, the script
times ``--steps`` optimization steps through :class:`boltzgen.training.Trainer` (the whole step of
``train``: loss, backward, the gradient all-reduce, clipping, Adam) after 5 untimed ones. Three
variants take turns round by round, so that a noisy, shared machine slows them alike; each is a
fresh ``torchrun --standalone`` launch:

- ``1 rank x 1 thread``: one process, ``cpu_threads: 1`` (the configs' setting);
- ``1 rank x 2 threads``: one process whose torch intra-op threads may use both cores;
- ``2 ranks x 1 thread``: two processes (gloo), each taking half of every batch, gradients averaged.

The table gives each variant's median steps/s and its ratio to the first, and ``collectives
ms/step``: the time of a step's communication alone (the gradient all-reduce and the stop flag,
timed apart); the 1-minute load average of the machine is printed too. Training data are
synthetic (the step's cost does not depend on what they are): for a molecule the energy-minimized
structure with 0.003 nm of Gaussian noise (4,096 frames, as ``benchmarks/training_throughput.py``),
for an analytic system 4,096 standard normal points. No MD runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"1 rank x 1 thread": (1, 1), "1 rank x 2 threads": (1, 2), "2 ranks x 1 thread": (2, 1)}
WARMUP_STEPS = 5


def _worker(config_path: str, steps: int, threads: int) -> dict[str, Any] | None:
    """Steps/s of every stage of the config on this launch (rank 0 returns them, the others None)."""
    import boltzgen  # noqa: F401, I001 - first: its OMP_WAIT_POLICY must be set before torch loads OpenMP
    import torch

    from boltzgen import distributed
    from boltzgen.config import load_config
    from boltzgen.runs.target import build_target, reference_structure
    from stage_steps import stage_step, stage_trainer

    with distributed.launched() as world:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        config, _ = load_config(config_path)
        target = build_target(config)
        if target.molecule is not None:
            x_ref = reference_structure(target)
            data = x_ref + 0.003 * torch.randn(4096, x_ref.shape[1], dtype=torch.float64)
        else:
            data = torch.randn(4096, target.energy.dim, dtype=torch.float64)
        rates: dict[str, Any] = {"ranks": world.size, "threads": threads}
        with tempfile.TemporaryDirectory() as folder:
            generator, trainer = stage_trainer(config, target, data, Path(folder))
            distributed.reseed_ranks(0)
            trainer._initialize_from_data()
            distributed.broadcast_module(generator)
            generator.train()
            started = time.perf_counter()
            for i, stage in enumerate(config.training):
                step = stage_step(trainer, i, started)
                for _ in range(WARMUP_STEPS):
                    step()
                distributed.barrier()
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                distributed.barrier()
                rates[f"stage {i} ({stage.loss}, batch {stage.batch}) steps/s"] = steps / (time.perf_counter() - start)
            # What a step's communication costs alone: the gradient all-reduce and the stop flag.
            distributed.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                distributed.average_gradients(generator.parameters(), [0])
                distributed.any_rank(False)
            rates["collectives ms/step"] = 1e3 * (time.perf_counter() - start) / steps
        rates["load average"] = os.getloadavg()[0]
        return rates if world.is_main else None


def _launch(config: str, ranks: int, threads: int, steps: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", __file__,
               "--worker", "--configs", config, "--steps", str(steps), "--threads", str(threads)]
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"worker ({ranks} ranks, {threads} threads) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["systems/double_well.yaml", "systems/alanine.yaml"])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per stage, variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.worker:
        rates = _worker(args.configs[0], args.steps, args.threads)
        if rates is not None:
            print(json.dumps(rates))
        return
    print(f"cpus={os.cpu_count()} steps={args.steps} rounds={args.rounds} (medians over rounds; ratio to 1 rank x 1 thread)")
    result: dict[str, Any] = {}
    for config in args.configs:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name, (ranks, threads) in VARIANTS.items():
                runs[name].append(_launch(config, ranks, threads, args.steps))
        keys = [key for key in runs["1 rank x 1 thread"][0] if key.endswith("steps/s")] + ["collectives ms/step"]
        medians = {name: {key: statistics.median(r[key] for r in rounds) for key in keys} for name, rounds in runs.items()}
        print(f"\n{config}\n| variant | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|")
        for name, m in medians.items():
            base = medians["1 rank x 1 thread"]
            cells = [f"{m[k]:.1f} ({m[k] / base[k]:.2f}x)" if k.endswith("steps/s") else f"{m[k]:.2f}" for k in keys]
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
        loads = [r["load average"] for rounds in runs.values() for r in rounds]
        print(f"1-min load average at the end of the launches: {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} cpus")
        result[config] = {"medians": medians, "rounds": runs}
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
