"""Energy+force evaluations per second: TorchForceField vs OpenMM, side by side.

Usage::

    python benchmarks/energy_throughput.py [--systems alanine-vacuum] [--batches 1 16 256 1024] [--device cpu|cuda]
        [--seconds 2] [--rounds 5] [--workers N] [--torch-threads N] [--no-eager] [--json FILE]

Systems: alanine dipeptide in vacuum (amber14-all) and with Amber ff96 + OBC (GBSAOBCForce). OpenMM
is evaluated through ``boltzgen.energies.openmm.OpenMMEnergy`` (best platform, one Context per
worker process); the torch force field is timed on the chosen device as the program uses it (on the
CPU in float64: the fused C kernel) and, for reference, with its eager torch code (``native=False``).

The machines here are shared and noisy, so each measurement is ``--rounds`` windows of
``seconds / rounds``, torch and OpenMM taking turns window by window (the eager reference is timed
after them); the table gives each backend's median rate and the ratio of the medians. Prints the
table, and optionally writes it (with every window's rate) as JSON.
"""

from __future__ import annotations  # noqa: I001 - boltzgen is imported first, on purpose

import boltzgen  # noqa: F401 - first: its OMP_WAIT_POLICY must be set before torch loads OpenMP
import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from boltzgen.energies import native
from boltzgen.energies.openmm import OpenMMEnergy, build_system
from boltzgen.energies.torchff import TorchForceField

ROOT = Path(__file__).resolve().parents[1]
PDB = ROOT / "systems" / "alanine-dipeptide.pdb"
SYSTEMS = {"alanine-vacuum": ["amber14-all.xml"], "alanine-ff96-obc": ["amber96.xml", "amber96_obc.xml"]}
DEFAULT_BATCHES = [1, 16, 256, 1024, 4096, 16384]


def _rate(step: Callable[[], None], n_per_call: int, seconds: float) -> float:
    """Evaluations per second of ``step``, repeated for at least ``seconds`` (and at least once)."""
    calls, start = 0, time.perf_counter()
    while True:
        step()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls * n_per_call / elapsed


def _interleaved_rates(steps: dict[str, tuple[Callable[[], None], int]], seconds: float,
                       rounds: int) -> dict[str, list[float]]:
    """Each step's rate in ``rounds`` windows of ``seconds / rounds``, the steps taking turns.

    Every window starts with one untimed call: the first call after another backend ran is slow
    (4x measured: caches, sleeping threads), for either backend, and the very first one also starts
    OpenMM's workers and builds the kernel.
    """
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, (step, n) in steps.items():
            step()
            rates[name].append(_rate(step, n, seconds / rounds))
    return rates


def _energy_and_grad(energy: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        xx = x.detach().requires_grad_(True)
        u = energy(xx)
        torch.autograd.grad(u.sum(), xx)
        if xx.device.type == "cuda":
            torch.cuda.synchronize()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--batches", type=int, nargs="+", default=DEFAULT_BATCHES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per backend and measurement")
    parser.add_argument("--rounds", type=int, default=5, help="windows the timing is split into, backends alternating")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="OpenMM worker processes")
    parser.add_argument("--openmm-max-batch", type=int, default=4096,
                        help="OpenMM is timed on at most this many configurations per call, alternating with "
                             "torch's windows (its rate is linear in the batch)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads, also the C kernel's threads (default: torch's own)")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager-torch reference column")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)

    rows = []
    kernel = args.device == "cpu" and native.load_kernel() is not None
    print(f"device={args.device} torch_threads={torch.get_num_threads()} openmm_workers={args.workers} "
          f"c_kernel={'yes' if kernel else 'no (' + str(native.unavailable_reason()) + ')'} rounds={args.rounds}")
    print(f"{'system':<18} {'batch':>6} {'torch evals/s':>14} {'eager evals/s':>14} {'openmm evals/s':>15} "
          f"{'torch/openmm':>13} {'torch/eager':>12}")
    for name in args.systems:
        molecule = build_system(PDB, SYSTEMS[name], 300.0)
        base = torch.as_tensor(molecule.positions_nm, dtype=torch.float64).reshape(1, -1)
        torch_energy = TorchForceField(molecule.system, 300.0).to(args.device)
        eager_energy = TorchForceField(molecule.system, 300.0, native=False).to(args.device)
        with OpenMMEnergy(molecule, n_workers=args.workers) as openmm_energy:
            for batch in args.batches:
                gen = torch.Generator().manual_seed(batch)
                x = base + 0.01 * torch.randn(batch, base.shape[1], generator=gen, dtype=torch.float64)
                o_batch = min(batch, args.openmm_max_batch)
                steps = {"torch": (_energy_and_grad(torch_energy, x.to(args.device)), batch),
                         "openmm": (_energy_and_grad(openmm_energy, x[:o_batch]), o_batch)}
                windows = _interleaved_rates(steps, args.seconds, args.rounds)
                if not args.no_eager:
                    # Timed after, not between: its many allocations slowed the torch windows after it.
                    eager_step = {"eager": (_energy_and_grad(eager_energy, x.to(args.device)), batch)}
                    windows.update(_interleaved_rates(eager_step, args.seconds, args.rounds))
                rate = {k: statistics.median(v) for k, v in windows.items()}
                row = {"system": name, "batch": batch, "torch_evals_per_s": rate["torch"],
                       "eager_evals_per_s": rate.get("eager"), "openmm_evals_per_s": rate["openmm"],
                       "ratio": rate["torch"] / rate["openmm"], "openmm_batch_timed": o_batch,
                       "windows_evals_per_s": windows}
                rows.append(row)
                eager = f"{rate['eager']:>14.0f}" if "eager" in rate else f"{'-':>14}"
                vs_eager = f"{rate['torch'] / rate['eager']:>12.2f}" if "eager" in rate else f"{'-':>12}"
                print(f"{name:<18} {batch:>6} {rate['torch']:>14.0f} {eager} {rate['openmm']:>15.0f} "
                      f"{row['ratio']:>13.2f} {vs_eager}", flush=True)
            platform = openmm_energy.platform_name
    result = {"device": args.device, "torch_threads": torch.get_num_threads(), "openmm_workers": args.workers,
              "openmm_platform": str(platform), "c_kernel": kernel, "rounds": args.rounds,
              "seconds_per_backend": args.seconds, "rows": rows}
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
