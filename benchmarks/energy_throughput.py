"""Energy+force evaluations per second: TorchForceField vs OpenMM, side by side.

Usage::

    python benchmarks/energy_throughput.py [--batches 1 16 256 1024] [--device cpu|cuda]
        [--seconds 2] [--workers N] [--torch-threads N] [--json FILE]

Systems: alanine dipeptide in vacuum (amber14-all) and with Amber ff96 + OBC (GBSAOBCForce). OpenMM
is evaluated through ``boltzgen.energies.openmm.OpenMMEnergy`` (best platform, one Context per
worker process); the torch force field is timed on the chosen device. Prints a table of evals/s and
the torch/OpenMM ratio, and optionally writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Callable

import torch

from boltzgen.energies.openmm import OpenMMEnergy, build_system
from boltzgen.energies.torchff import TorchForceField

ROOT = Path(__file__).resolve().parents[1]
PDB = ROOT / "systems" / "alanine-dipeptide.pdb"
SYSTEMS = {"alanine-vacuum": ["amber14-all.xml"], "alanine-ff96-obc": ["amber96.xml", "amber96_obc.xml"]}
DEFAULT_BATCHES = [1, 16, 256, 1024, 4096, 16384]


def _rate(step: Callable[[], None], n_per_call: int, seconds: float) -> float:
    """Evaluations per second of ``step`` (one warm-up call, then repeated for ``seconds``)."""
    step()
    calls, start = 0, time.perf_counter()
    while True:
        step()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls * n_per_call / elapsed


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
    parser.add_argument("--batches", type=int, nargs="+", default=DEFAULT_BATCHES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing window per measurement")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="OpenMM worker processes")
    parser.add_argument("--openmm-max-batch", type=int, default=4096,
                        help="larger batches reuse OpenMM's rate at this size (it is linear in the batch)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads (1 is faster than 2 on a loaded 2-core machine)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)

    rows = []
    print(f"device={args.device} torch_threads={torch.get_num_threads()} openmm_workers={args.workers}")
    print(f"{'system':<18} {'batch':>6} {'torch evals/s':>14} {'openmm evals/s':>15} {'ratio':>8}")
    for name, forcefield in SYSTEMS.items():
        molecule = build_system(PDB, forcefield, 300.0)
        base = torch.as_tensor(molecule.positions_nm, dtype=torch.float64).reshape(1, -1)
        torch_energy = TorchForceField(molecule.system, 300.0).to(args.device)
        with OpenMMEnergy(molecule, n_workers=args.workers) as openmm_energy:
            openmm_rate_cache: dict[int, float] = {}
            for batch in args.batches:
                gen = torch.Generator().manual_seed(batch)
                x = base + 0.01 * torch.randn(batch, base.shape[1], generator=gen, dtype=torch.float64)
                t_rate = _rate(_energy_and_grad(torch_energy, x.to(args.device)), batch, args.seconds)
                o_batch = min(batch, args.openmm_max_batch)
                if o_batch not in openmm_rate_cache:
                    openmm_rate_cache[o_batch] = _rate(_energy_and_grad(openmm_energy, x[:o_batch]), o_batch, args.seconds)
                o_rate = openmm_rate_cache[o_batch]
                rows.append({"system": name, "batch": batch, "torch_evals_per_s": t_rate,
                             "openmm_evals_per_s": o_rate, "ratio": t_rate / o_rate,
                             "openmm_batch_timed": o_batch})
                print(f"{name:<18} {batch:>6} {t_rate:>14.0f} {o_rate:>15.0f} {t_rate / o_rate:>8.2f}", flush=True)
            platform = openmm_energy.platform_name
    result = {"device": args.device, "torch_threads": torch.get_num_threads(), "openmm_workers": args.workers,
              "openmm_platform": str(platform), "rows": rows}
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
