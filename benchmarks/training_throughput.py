"""Training steps per second and samples per second for a config, against an earlier commit and a peer.

Usage::

    python benchmarks/training_throughput.py [--config systems/alanine.yaml] [--baseline REV ...]
        [--set KEY=VALUE ...] [--rounds 3] [--seconds 8] [--clock wall|cpu] [--no-peer] [--json FILE]

The variants are timed taking turns round by round so that a noisy, shared machine slows them
alike; the table gives each one's median and the ratio of the medians to this checkout:

- ``current``: the package in this checkout;
- ``current with KEY=VALUE``: the same with the config overrides given by ``--set`` (as ``boltzgen
  train --set``), e.g. ``--set flow.conditioner_dtype=bfloat16``;
- ``baseline REV``: the package at each ``--baseline`` (a git revision, extracted with ``git archive``
  into a temporary folder with that revision's ``systems/``, whose copy of the config it reads, with
  its ``flow`` section replaced by this checkout's, so that every variant times the same flow, in
  float32 conditioners, the only ones earlier commits have),
  timed by the same worker code; the option may be repeated (e.g. the commit before the speed work
  and ``HEAD``);
- ``normflows``: the peer library (a benchmark-only dependency, ``pip install normflows``) with a
  flow of the same size: as many coupling blocks, hidden widths and bins, built from its
  ``CoupledRationalQuadraticSpline`` and ``CircularCoupledRationalQuadraticSpline`` layers, on the
  same batches of internal coordinates. Its step leaves out the internal-coordinate transform and
  the energy, which ours include, so the comparison favours the peer.

Each variant runs in a fresh process (one torch thread, as ``cpu_threads: 1`` in the configs, or
``--threads``, with the wall clock) and
measures, for each training stage of the config at its own batch size, optimization steps per
second through :class:`boltzgen.training.Trainer` (loss, backward, clipping, Adam: the whole step
the ``train`` command takes), and samples per second with log q and the energy at the config's
sampling batch. ``--clock cpu`` times by each worker's CPU time instead of the wall clock: a
one-thread process on a machine shared with other work waits for a core, which its wall time counts
and its CPU time does not. Training data are the energy-minimized structure with 0.003 nm of
Gaussian noise (4,096 frames): the step's cost does not depend on what the data are.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# Worker: runs in a fresh process with the package of one variant on its path
# --------------------------------------------------------------------------------------------------


def _clock() -> Callable[[], float]:
    """The worker's clock (``--clock``): wall time, or this process's CPU time (one torch thread, so on
    a loaded machine its CPU time leaves out the waits for a core that its wall time counts)."""
    return time.process_time if os.environ.get("BOLTZGEN_BENCH_CLOCK") == "cpu" else time.perf_counter


def _rate(step: Callable[[], None], per_call: int, seconds: float, warmup: int) -> float:
    """Calls of ``step`` per second (times ``per_call``) over at least ``seconds``, after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    clock = _clock()
    calls, start = 0, clock()
    while True:
        step()
        calls += 1
        elapsed = clock() - start
        if elapsed >= seconds:
            return calls * per_call / elapsed


def _stage_key(index: int, stage: Any) -> str:
    """The column of a stage: a baseline's stages may differ from this checkout's in loss or batch."""
    return f"stage {index} ({stage.loss}, batch {stage.batch}) steps/s"


def _setup(config_path: str, overrides: list[str] | None = None) -> tuple[Any, Any, Any]:
    """The config (with ``overrides``), its target and training data ``[4096, 3N]`` float64 (see the
    module doc)."""
    import torch

    from boltzgen.config import load_config
    from boltzgen.runs.target import build_target, reference_structure

    torch.set_num_threads(int(os.environ.get("BOLTZGEN_BENCH_THREADS", "1")))
    torch.manual_seed(0)
    config, _ = load_config(config_path, overrides)
    target = build_target(config)
    x_ref = reference_structure(target)
    data = x_ref + 0.003 * torch.randn(4096, x_ref.shape[1], dtype=torch.float64)
    return config, target, data


def _worker_boltzgen(config_path: str, seconds: float, overrides: list[str]) -> dict[str, float]:
    from stage_steps import stage_step, stage_trainer

    config, target, data = _setup(config_path, overrides)
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        generator, trainer = stage_trainer(config, target, data, Path(folder))
        generator.train()
        started = time.perf_counter()
        for i in range(len(config.training)):
            rates[_stage_key(i, config.training[i])] = _rate(stage_step(trainer, i, started), 1, seconds, warmup=5)
    generator.eval()
    batch = min(config.sampling.batch, 10_000)
    rates["samples/s"] = _rate(lambda: generator.sample(batch, batch), batch, seconds, warmup=1)
    rates["parameters"] = sum(p.numel() for p in generator.flow.parameters())
    return rates


def _worker_normflows(config_path: str, seconds: float) -> dict[str, float]:
    import normflows as nf
    import torch

    from boltzgen.runs.target import build_coordinates

    config, target, data = _setup(config_path)
    coordinates = build_coordinates(config, target, data)
    with torch.no_grad():
        latent, _ = coordinates.inverse(data)
    latent = latent.to(torch.float32)
    dim = latent.shape[1]
    circular = torch.nonzero(coordinates.circular_mask).flatten().tolist()
    flow = config.flow
    layers = []
    for block in range(flow.blocks):
        # normflows' coupling transforms the second half of a permuted vector; alternate the halves.
        layers.append(nf.flows.CircularCoupledRationalQuadraticSpline(
            dim, num_blocks=len(flow.hidden) - 1, num_hidden_channels=flow.hidden[0], ind_circ=circular,
            num_bins=flow.bins, tail_bound=torch.tensor([flow.tail_bound if i not in circular else torch.pi
                                                          for i in range(dim)]), reverse_mask=block % 2 == 1))
    base = nf.distributions.UniformGaussian(dim, circular, torch.tensor(
        [2 * torch.pi if i in circular else 1.0 for i in range(dim)]))
    model = nf.NormalizingFlow(base, layers)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rates: dict[str, float] = {}
    for i, stage in enumerate(config.training):
        def step(batch: int = stage.batch, clip: float = stage.grad_clip) -> None:
            optimizer.zero_grad(set_to_none=True)
            loss = model.forward_kld(latent[torch.randint(0, len(latent), (batch,))])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        rates[_stage_key(i, stage)] = _rate(step, 1, seconds, warmup=5)
    batch = min(config.sampling.batch, 10_000)
    with torch.no_grad():
        rates["samples/s"] = _rate(lambda: model.sample(batch), batch, seconds, warmup=1)
    rates["parameters"] = sum(p.numel() for p in model.parameters())
    return rates


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def _extract(revision: str, folder: Path) -> Path:
    """The ``boltzgen`` package and the ``systems`` folder at ``revision``, extracted under ``folder``
    (created); returns the folder."""
    folder.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "boltzgen", "systems"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def _with_current_flow(source: Path, config: str) -> str:
    """A copy of ``source``'s ``config`` (next to it, so that its relative paths hold) whose ``flow``
    section is this checkout's; returns its path relative to ``source``."""
    import yaml

    theirs = yaml.safe_load((source / config).read_text())
    theirs["flow"] = yaml.safe_load((ROOT / config).read_text())["flow"]
    # The conditioners' precision is this checkout's way to run the flow, not its size; earlier
    # commits know only float32 (time this checkout in float32 too with --set).
    theirs["flow"].pop("conditioner_dtype", None)
    copy = Path(config).with_name(Path(config).stem + ".same-flow.yaml")
    (source / copy).write_text(yaml.safe_dump(theirs, sort_keys=False))
    return str(copy)


def _run_worker(kind: str, source: Path, config: str, overrides: list[str], seconds: float, clock: str,
                threads: int) -> dict[str, float]:
    """One worker process; it reads ``config`` relative to ``source`` (a baseline uses its own copy)."""
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": str(threads), "BOLTZGEN_BENCH_CLOCK": clock,
           "BOLTZGEN_BENCH_THREADS": str(threads)}
    command = [sys.executable, __file__, "--worker", kind, "--config", config, "--seconds", str(seconds)]
    command += [f"--set={override}" for override in overrides]
    out = subprocess.run(command, env=env, cwd=source, check=False, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{kind} worker ({source}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(results: dict[str, list[dict[str, float]]]) -> tuple[str, dict[str, dict[str, float]]]:
    medians = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for name, runs in results.items()}
    keys = sorted({k for m in medians.values() for k in m if k != "parameters"})
    lines = ["| variant | parameters | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for name, m in medians.items():
        cells = [f"{m[k]:.1f}" if k in m else "—" for k in keys]
        ratios = [f"{medians['current'][k] / m[k]:.2f}x" if k in m and k in medians["current"] and name != "current"
                  else "" for k in keys]
        lines.append(f"| {name} | {int(m['parameters']):,} | "
                     + " | ".join(c + (f" (current {r})" if r else "") for c, r in zip(cells, ratios)) + " |")
    return "\n".join(lines), medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="systems/alanine.yaml")
    parser.add_argument("--baseline", action="append", default=[],
                        help="git revision to compare against (e.g. HEAD~3); may be repeated")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="also time this checkout with these config overrides (as `boltzgen train --set`); "
                             "may be repeated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per stage and variant per round")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="time steps by wall clock, or by each worker's CPU time (steadier on a shared machine)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every variant (wall clock only)")
    parser.add_argument("--no-peer", action="store_true", help="leave out normflows")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", choices=["boltzgen", "normflows"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import boltzgen  # noqa: F401 - first: its OMP_WAIT_POLICY must be set before torch loads OpenMP

        if args.worker == "boltzgen":
            print(json.dumps(_worker_boltzgen(args.config, args.seconds, args.set)))
        else:
            print(json.dumps(_worker_normflows(args.config, args.seconds)))
        return
    if args.threads > 1 and args.clock == "cpu":
        parser.error("--threads above 1 needs --clock wall: the CPU clock adds up the threads' time")
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"current": ("boltzgen", ROOT, args.config, [])}
        if args.set:
            variants[f"current with {', '.join(args.set)}"] = ("boltzgen", ROOT, args.config, args.set)
        for i, revision in enumerate(args.baseline):
            folder = _extract(revision, Path(tmp) / str(i))
            variants[f"baseline {revision}"] = ("boltzgen", folder, _with_current_flow(folder, args.config), [])
        if not args.no_peer:
            variants["normflows"] = ("normflows", ROOT, args.config, [])
        results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for round_ in range(args.rounds):
            for name, (kind, source, config, overrides) in variants.items():
                results[name].append(_run_worker(kind, source, config, overrides, args.seconds, args.clock,
                                                 args.threads))
                print(f"round {round_ + 1}/{args.rounds} {name}: {results[name][-1]}", file=sys.stderr)
    table, medians = _table(results)
    from boltzgen.config import load_config

    flow = load_config(args.config)[0].flow
    print(f"{args.config} (flow: {flow.blocks} blocks of {flow.hidden}, {flow.bins} bins, in every variant; each "
          f"variant times its own stages; normflows: forward KL at each stage's batch, without coordinates or "
          f"energy), {args.threads} torch thread(s), {args.clock} clock, medians of {args.rounds} rounds:\n{table}")
    if args.json:
        args.json.write_text(json.dumps({"config": args.config, "clock": args.clock, "medians": medians,
                                         "rounds": results}, indent=1))


if __name__ == "__main__":
    main()
