"""Shared test setup: float64 by default and a fixed seed for every test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from boltzgen import pipeline
from boltzgen.config import load_config
from boltzgen.energies import native

ROOT = Path(__file__).resolve().parents[1]

# The suite's tensors are small: intra-op threads only add overhead (and contention on 2 cores).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _float64_and_seed():
    """Runs each test in float64 with torch and numpy seeded, restoring the default dtype after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    np.random.seed(0)
    yield
    torch.set_default_dtype(previous)


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
    pipeline.train(config, resolved, out_dir, progress=False)
    return out_dir


def skip_without_kernel() -> None:
    """Skip the calling test, with the reason, where the force field's C kernel cannot be built."""
    if native.load_kernel() is None:
        pytest.skip(f"C kernel unavailable: {native.unavailable_reason()}")
