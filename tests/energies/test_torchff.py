"""TorchForceField as an Energy: units, autograd, the backward buffer, dtype and device, bad input.

Parity with OpenMM is in test_parity.py, the C kernel against the eager code in test_native.py.
"""

from __future__ import annotations

import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from boltzgen.energies.torchff import TorchForceField

TEMPERATURE_K = 300.0


def _batch(positions: np.ndarray, n: int, noise: float = 0.02, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.as_tensor(positions.reshape(1, -1), dtype=torch.float64)
    return base + noise * torch.randn(n, base.shape[1], generator=gen, dtype=torch.float64)


def test_reduced_energy_autograd_and_units(alanine_obc: tuple[openmm.System, np.ndarray], native: bool) -> None:
    system, positions = alanine_obc
    ff = TorchForceField(system, TEMPERATURE_K, native=native)
    x = _batch(positions, 5).requires_grad_(True)
    u = ff(x)
    assert u.shape == (5,) and u.dtype == torch.float64
    (grad,) = torch.autograd.grad(u.sum(), x)
    energy, forces = ff.energy_and_forces_kJ(x)
    kT = (unit.MOLAR_GAS_CONSTANT_R * TEMPERATURE_K * unit.kelvin).value_in_unit(unit.kilojoule_per_mole)
    torch.testing.assert_close(u.detach(), energy / kT, rtol=1e-14, atol=0)
    torch.testing.assert_close(grad, -forces / kT, rtol=1e-14, atol=0)
    torch.testing.assert_close(ff.force(x), -grad)
    assert ff.evaluations == 5 + 5  # two calls through forward
    # Gradients weight per-sample, as for any energy.
    w = torch.arange(1.0, 6.0, dtype=torch.float64)
    (grad_w,) = torch.autograd.grad((w * ff(x)).sum(), x)
    torch.testing.assert_close(grad_w, w[:, None] * grad)


def test_finite_difference_gradient(alanine_obc: tuple[openmm.System, np.ndarray], native: bool) -> None:
    system, positions = alanine_obc
    ff = TorchForceField(system, TEMPERATURE_K, native=native)
    x = _batch(positions, 2, noise=0.03, seed=4)
    energy, forces = ff.energy_and_forces_kJ(x)
    h = 1e-6
    for k in (0, 7, 20, 45, 65):
        dx = torch.zeros_like(x)
        dx[:, k] = h
        fd = (ff.reduced_energy(x + dx) - ff.reduced_energy(x - dx)) * ff.kT_kJ_per_mol / (2 * h)
        torch.testing.assert_close(-forces[:, k], fd, rtol=1e-6, atol=1e-4)
    # Without a gradient, the energy alone: the same values.
    torch.testing.assert_close(ff.reduced_energy(x) * ff.kT_kJ_per_mol, energy, rtol=1e-14, atol=0)


def test_float32_mode(alanine_obc: tuple[openmm.System, np.ndarray]) -> None:
    system, positions = alanine_obc
    x = _batch(positions, 4)
    ff64 = TorchForceField(system, TEMPERATURE_K)
    ff32 = TorchForceField(system, TEMPERATURE_K).to(torch.float32)
    x32 = x.float().requires_grad_(True)
    u32 = ff32.reduced_energy(x32)
    assert u32.dtype == torch.float32
    (g32,) = torch.autograd.grad(u32.sum(), x32)
    assert g32.dtype == torch.float32 and torch.isfinite(g32).all()
    u64 = ff64.reduced_energy(x)
    # float32 rounding of positions alone moves u by ~1e-5 relative for stiff bonds.
    torch.testing.assert_close(u32.double(), u64, rtol=1e-4, atol=1e-2)
    g64 = -ff64.energy_and_forces_kJ(x)[1] / ff64.kT_kJ_per_mol
    assert (g32.double() - g64).abs().max() <= 1e-3 * g64.abs().max()
    # Back to float64: the eager parameters follow the cast too.
    ff32.double()
    torch.testing.assert_close(ff32.reduced_energy(x), u64, rtol=1e-5, atol=1e-3)


def test_bad_input_shape(alanine_obc: tuple[openmm.System, np.ndarray]) -> None:
    ff = TorchForceField(alanine_obc[0], TEMPERATURE_K)
    with pytest.raises(ValueError, match="shape"):
        ff.reduced_energy(torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="chunk_size"):
        TorchForceField(alanine_obc[0], TEMPERATURE_K, chunk_size=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(alanine_obc: tuple[openmm.System, np.ndarray]) -> None:
    system, positions = alanine_obc
    x = _batch(positions, 64)
    cpu = TorchForceField(system, TEMPERATURE_K)
    gpu = TorchForceField(system, TEMPERATURE_K).to("cuda")
    xg = x.to("cuda").requires_grad_(True)
    u = gpu(xg)
    assert u.device.type == "cuda"
    (g,) = torch.autograd.grad(u.sum(), xg)
    xc = x.clone().requires_grad_(True)
    uc = cpu(xc)
    (gc,) = torch.autograd.grad(uc.sum(), xc)
    torch.testing.assert_close(u.cpu(), uc, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(g.cpu(), gc, rtol=1e-10, atol=1e-8)


def test_gradient_weights_and_single_backward(alanine_obc: tuple[openmm.System, np.ndarray], native: bool) -> None:
    """Backward hands out the evaluation's own gradient buffer, scaled in place: per-sample weights,
    a uniform weight and u.sum() all give the right gradient, and a second backward through the same
    evaluation raises (it would reuse a buffer the caller owns)."""
    system, positions = alanine_obc
    ff = TorchForceField(system, TEMPERATURE_K, native=native)
    x = _batch(positions, 7)
    reference = -ff.energy_and_forces_kJ(x)[1] / ff.kT_kJ_per_mol
    w = torch.linspace(-1.0, 2.0, 7, dtype=torch.float64)
    for loss, expected in ((lambda u: u.sum(), reference), (lambda u: 3.0 * u.mean(), reference * 3.0 / 7),
                           (lambda u: (w * u).sum(), w[:, None] * reference)):
        xx = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(ff(xx)), xx)
        torch.testing.assert_close(grad, expected, rtol=1e-13, atol=1e-12)
    xx = x.clone().requires_grad_(True)
    u = ff(xx).sum()
    u.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        u.backward()
