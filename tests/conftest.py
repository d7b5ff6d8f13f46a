"""Shared test setup: float64 by default and a fixed seed for every test."""

from __future__ import annotations

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
