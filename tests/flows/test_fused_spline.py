"""The fused spline kernel against the torch reference of SplineSettings.apply, and its fallbacks."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import Tensor

from boltzgen.flows import fused_spline
from boltzgen.flows.transforms import SplineCoupling, SplineSettings

LIN = torch.tensor([0, 2, 4, 6, 8])
CIRC = torch.tensor([1, 3, 5, 7])
DIM = 11
BINS = 6
N_PARAMS = len(LIN) * (3 * BINS - 1) + len(CIRC) * 3 * BINS


@pytest.fixture(autouse=True)
def _kernel() -> None:
    if fused_spline.load_kernel() is None:
        pytest.skip(f"spline kernel unavailable: {fused_spline._reason}")


@contextmanager
def reference_path() -> Iterator[None]:
    """SplineSettings.apply on its torch code, as where the kernel cannot be built."""
    saved = fused_spline._library, fused_spline._reason
    fused_spline._library, fused_spline._reason = None, "turned off by the test"
    try:
        yield
    finally:
        fused_spline._library, fused_spline._reason = saved


def _inputs(batch: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """States with linear dims inside and outside the tails and angles in [-pi, pi], and raw parameters
    (some large, so that bins and slopes are far from uniform)."""
    generator = torch.Generator().manual_seed(1)
    v = 3.0 * torch.randn(batch, DIM, generator=generator, dtype=dtype)
    v[:, CIRC] = (2 * torch.rand(batch, len(CIRC), generator=generator, dtype=dtype) - 1) * math.pi
    v[0, LIN[0]], v[1, LIN[1]], v[2, CIRC[0]] = 7.0, -5.5, 3.14
    params = 1.5 * torch.randn(batch, N_PARAMS, generator=generator, dtype=dtype)
    params[3, :4] = 40.0
    return v, params


def _apply_with_grads(v: Tensor, params: Tensor, inverse: bool, seed: int = 2) -> tuple[Tensor, ...]:
    v, params = v.clone().requires_grad_(True), params.clone().requires_grad_(True)
    y, logdet = SplineSettings(BINS, 5.0).apply(v, params, LIN, CIRC, inverse)
    generator = torch.Generator().manual_seed(seed)
    weights = (torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y.dtype),
               torch.randn(logdet.shape, generator=generator, dtype=torch.float64).to(y.dtype))
    grad_v, grad_p = torch.autograd.grad((y * weights[0]).sum() + (logdet * weights[1]).sum(), [v, params])
    return y.detach(), logdet.detach(), grad_v, grad_p


# 64 fills whole lane blocks (8 rows in float64, 16 in float32); 37 leaves a part-filled one of each.
@pytest.mark.parametrize("batch", [64, 37])
@pytest.mark.parametrize("inverse", [False, True])
def test_kernel_matches_the_torch_reference_with_gradients(inverse: bool, batch: int) -> None:
    v, params = _inputs(batch)
    fused = _apply_with_grads(v, params, inverse)
    with reference_path():
        reference = _apply_with_grads(v, params, inverse)
    for name, a, b in zip(["outputs", "log-det", "grad states", "grad params"], fused, reference):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)
    assert fused[3].abs().max() > 1.0  # the comparison is not between zeros


@pytest.mark.parametrize("batch", [64, 37])
@pytest.mark.parametrize("inverse", [False, True])
def test_float32_kernel_agrees_with_the_float64_reference(inverse: bool, batch: int) -> None:
    v, params = _inputs(batch)
    fused = _apply_with_grads(v.float(), params.float(), inverse)
    with reference_path():
        reference = _apply_with_grads(v, params, inverse)
    assert all(t.dtype == torch.float32 for t in fused)
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_gradcheck_both_directions() -> None:
    v, params = _inputs(4)
    v[0, LIN[0]] = 0.3  # keep every element away from the tails' kink, where gradcheck's finite differences fail
    v[1, LIN[1]] = -0.2
    v[2, CIRC[0]] = 3.0
    for inverse in (False, True):
        def fn(values: Tensor, raw: Tensor, inverse: bool = inverse) -> tuple[Tensor, Tensor]:
            return SplineSettings(BINS, 5.0).apply(values, raw, LIN, CIRC, inverse)
        assert torch.autograd.gradcheck(fn, (v.clone().requires_grad_(True), params.clone().requires_grad_(True)))


@pytest.mark.parametrize("inverse", [False, True])
def test_float32_kernel_is_as_accurate_as_the_float32_torch_code(inverse: bool) -> None:
    """The kernel computes in float32 for float32 tensors, as the torch code does: its error against
    the float64 reference is of the torch float32 code's size, outputs and gradients alike."""
    v, params = _inputs(37)
    fused = _apply_with_grads(v.float(), params.float(), inverse)
    with reference_path():
        torch32 = _apply_with_grads(v.float(), params.float(), inverse)
        reference = _apply_with_grads(v, params, inverse)
    for name, a, b, exact in zip(["outputs", "log-det", "grad states", "grad params"], fused, torch32, reference):
        error, torch_error = (a.double() - exact).abs().max(), (b.double() - exact).abs().max()
        assert error <= 2 * torch_error + 1e-6 * exact.abs().max(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inverse", [False, True])
def test_no_grad_pass_keeps_nothing_and_gives_the_same_outputs(inverse: bool, dtype: torch.dtype) -> None:
    """Sampling (no gradient) runs the forward pass without its cache for the backward pass."""
    v, params = _inputs(37, dtype)
    settings = SplineSettings(BINS, 5.0)
    with torch.no_grad():
        y, logdet = settings.apply(v, params, LIN, CIRC, inverse)
    assert y.grad_fn is None
    y_grad, logdet_grad = settings.apply(v, params.clone().requires_grad_(True), LIN, CIRC, inverse)
    assert torch.equal(y, y_grad.detach()) and torch.equal(logdet, logdet_grad.detach())


def test_coupling_round_trip_through_the_kernel() -> None:
    circular = torch.zeros(DIM, dtype=torch.bool)
    circular[CIRC] = True
    mask = torch.arange(DIM) % 2 == 0
    layer = SplineCoupling(DIM, mask, [16], bins=BINS, circular=circular, identity_init=False)
    z, _ = _inputs(32)
    x, ld_forward = layer(z)
    z_back, ld_inverse = layer.inverse(x)
    torch.testing.assert_close(z_back, z, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ld_forward + ld_inverse, torch.zeros(32, dtype=torch.float64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("inverse", [False, True])
def test_the_circle_ends_map_onto_themselves(inverse: bool) -> None:
    v, params = _inputs(4)
    v[:2, CIRC] = torch.tensor([-math.pi, math.pi], dtype=torch.float64)[:, None]
    y, _ = SplineSettings(BINS, 5.0).apply(v, params, LIN, CIRC, inverse)
    torch.testing.assert_close(y[:2, CIRC], v[:2, CIRC], rtol=0, atol=1e-12)


def test_nan_stays_nan() -> None:
    v, params = _inputs(4)
    v[0, LIN[2]] = math.nan
    v[1, CIRC[1]] = math.nan
    y, logdet = SplineSettings(BINS, 5.0).apply(v, params, LIN, CIRC, inverse=False)
    assert math.isnan(y[0, LIN[2]]) and math.isnan(y[1, CIRC[1]])
    assert logdet[:2].isnan().all() and torch.isfinite(logdet[2:]).all()


def test_double_backward_is_refused_not_wrong() -> None:
    v, params = _inputs(4)
    v.requires_grad_(True)
    y, _ = SplineSettings(BINS, 5.0).apply(v, params, LIN, CIRC, inverse=False)
    (grad,) = torch.autograd.grad(y.sum(), v, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad|once_differentiable"):
        grad.sum().backward()


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused_spline, "_library", None)
    monkeypatch.setattr(fused_spline, "_reason", None)
    monkeypatch.setenv("BOLTZGEN_NATIVE", "0")
    v, params = _inputs(8)
    assert not fused_spline.usable(v, params, BINS)
    assert "BOLTZGEN_NATIVE" in (fused_spline._reason or "")
    y, _ = SplineSettings(BINS, 5.0).apply(v, params, LIN, CIRC, inverse=False)
    assert torch.isfinite(y).all()


def test_missing_compiler_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The shared loader (native_build.load_once) as the spline module uses it: one warning, a reason
    kept in the module's globals, the torch code run instead, and no second try."""
    monkeypatch.setattr(fused_spline, "_library", None)
    monkeypatch.setattr(fused_spline, "_reason", None)
    monkeypatch.setenv("BOLTZGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    v, params = _inputs(8)
    with pytest.warns(RuntimeWarning, match="spline C kernel is unavailable.*eager torch"):
        assert fused_spline.load_kernel() is None
    assert "no C compiler" in (fused_spline._reason or "")
    assert not fused_spline.usable(v, params, BINS)
    monkeypatch.delenv("CC")
    assert fused_spline.load_kernel() is None  # the reason is kept: nothing is built on a later call
    assert not list(tmp_path.iterdir())
