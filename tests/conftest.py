"""Shared test setup: float64 by default and a fixed seed for every test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

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


@pytest.fixture(scope="module")
def villin():
    """The protein of OpenMM's bundled test.pdb (villin headpiece, all L) as an mdtraj trajectory."""
    md = pytest.importorskip("mdtraj")
    openmm = pytest.importorskip("openmm")
    path = Path(openmm.__file__).parent / "app" / "data" / "test.pdb"
    if not path.exists():
        pytest.skip("OpenMM's bundled test.pdb is missing")
    traj = md.load(str(path))
    return traj.atom_slice(traj.top.select("protein"))
