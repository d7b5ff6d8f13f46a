"""The eager torch kernels: blocks and chunks change nothing, scale and casts apply to everything."""

from __future__ import annotations

import numpy as np
import openmm
import torch

from boltzgen.energies import eager
from boltzgen.energies.ffparams import read_system


def _batch(positions: np.ndarray, n: int, noise: float = 0.02, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.as_tensor(positions.reshape(1, -1), dtype=torch.float64)
    return base + noise * torch.randn(n, base.shape[1], generator=gen, dtype=torch.float64)


def test_chunked_equals_unchunked(alanine_obc: tuple[openmm.System, np.ndarray]) -> None:
    system, positions = alanine_obc
    params = eager.EagerParameters.from_parameters(read_system(system))
    x = _batch(positions, 11)
    e_full, g_full = eager.energy_and_grad(params, x, True)
    e_chunked, g_chunked = eager.energy_and_grad(params, x, True, chunk_size=3)
    torch.testing.assert_close(e_full, e_chunked, rtol=1e-14, atol=1e-12)
    torch.testing.assert_close(g_full, g_chunked, rtol=1e-14, atol=1e-12)
    # Energy alone, and the scale applied to both results.
    e_only, none = eager.energy_and_grad(params, x, False)
    assert none is None
    torch.testing.assert_close(e_only, e_full, rtol=1e-14, atol=0)
    e_scaled, g_scaled = eager.energy_and_grad(params, x, True, scale=0.5)
    torch.testing.assert_close(e_scaled, 0.5 * e_full, rtol=1e-15, atol=0)
    torch.testing.assert_close(g_scaled, 0.5 * g_full, rtol=1e-15, atol=0)


def test_apply_casts_every_tensor(alanine_obc: tuple[openmm.System, np.ndarray]) -> None:
    params = eager.EagerParameters.from_parameters(read_system(alanine_obc[0]))
    cast = params.apply(lambda t: t.float() if t.is_floating_point() else t)
    assert cast.obc is not None and cast.obc.rho.dtype == torch.float32 and cast.obc.center.dtype == torch.long
    assert cast.bonds is not None and cast.bonds.k.dtype == torch.float32
    assert params.bonds is not None and params.bonds.k.dtype == torch.float64  # the original is untouched


def test_block_sizes() -> None:
    assert eager._block(rows=10, chunk_size=4096, on_cpu=True) == 1638
    assert eager._block(rows=10**5, chunk_size=4096, on_cpu=True) == 64  # the cache bound stops at 64
    assert eager._block(rows=10**6, chunk_size=4096, on_cpu=False) == 8
    assert eager._block(rows=10, chunk_size=3, on_cpu=True) == 3
