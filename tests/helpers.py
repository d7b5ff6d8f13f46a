"""Helpers shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from boltzgen import cli
from boltzgen.config import load_config
from boltzgen.energies import native
from boltzgen.runs.rundir import RunDir
from boltzgen.runs.train import train

ROOT = Path(__file__).resolve().parents[1]

# Bond graphs for Z-matrix tests (atom indices).
CHAIN = [(3, 0), (0, 4), (4, 1), (1, 2), (2, 5)]  # 3-0-4-1-2-5
BRANCHED = [(0, 1), (1, 2), (2, 3), (1, 4), (2, 5), (5, 6)]  # 7 atoms, two branch points
# Benzene-like: ring 0..5, one "hydrogen" on each ring atom 6..11.
BENZENE = [(i, (i + 1) % 6) for i in range(6)] + [(i, i + 6) for i in range(6)]


def train_tiny_double_well(out_dir: Path, ml_steps: int = 200, mixed_steps: int = 60) -> Path:
    """A double-well run directory trained for a few hundred steps (about 15 s on one core)."""
    tiny = [
        "baseline.chains=512", "baseline.steps=100", "baseline.warmup=50", "baseline.thin=10",
        "flow.blocks=4", "flow.hidden=[32,32]", "flow.bins=8",
        f"training[0].steps={ml_steps}", "training[0].batch=256",
        f"training[1].steps={mixed_steps}", "training[1].batch=256",
        "sampling.n=4000", "sampling.batch=4000", "sampling.n_bootstrap=50",
        "checkpoint_every=1000", "log_every=50",
    ]
    config, resolved = load_config(ROOT / "systems" / "double_well.yaml", tiny)
    train(config, resolved, RunDir(out_dir), progress=False)
    return out_dir


def skip_without_kernel() -> None:
    """Skip the calling test, with the reason, where the force field's C kernel cannot be built."""
    if native.load_kernel() is None:
        pytest.skip(f"C kernel unavailable: {native.unavailable_reason()}")


def one_line(argv: list[str], capsys) -> str:
    """Run ``boltzgen argv``, which must fail with exit 2 and one line on stderr (no traceback); the line."""
    capsys.readouterr()
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("boltzgen: error: ") and "Traceback" not in err, err
    return err
