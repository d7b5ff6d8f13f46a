"""MAF and IAF layers: the autoregressive structure, the cost of each direction, circular dims."""

from __future__ import annotations

import math

import pytest
import torch

from boltzgen.flows.autoregressive import InverseAutoregressive, MaskedAutoregressive
from boltzgen.flows.nn import MADE

DIM = 5
ORDER = torch.tensor([2, 0, 4, 1, 3])  # rank of each dim
CIRC = torch.tensor([True, False, False, True, False])


def _perturbed(layer):
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


def _jacobian(fn, v):
    return torch.stack([torch.autograd.functional.jacobian(lambda p: fn(p[None])[0][0], row) for row in v])


@pytest.mark.parametrize("cls", [MaskedAutoregressive, InverseAutoregressive])
@pytest.mark.parametrize("transformer", ["affine", "spline"])
def test_jacobian_is_triangular_in_the_layer_order(cls, transformer):
    """x_i depends on z_j only for rank(j) <= rank(i), in both directions."""
    layer = _perturbed(cls(DIM, [16, 16], transformer, order=ORDER))
    allowed = ORDER[None, :] <= ORDER[:, None]  # [i, j]: may output i depend on input j
    z = torch.randn(4, DIM)
    for fn in (layer.forward, layer.inverse):
        jac = _jacobian(fn, z)
        assert (jac[:, ~allowed].abs() < 1e-12).all()
        assert (jac[:, allowed & ~torch.eye(DIM, dtype=torch.bool)].abs() > 1e-8).any()


def test_made_outputs_depend_only_on_earlier_dims():
    out_dims = torch.arange(DIM).repeat_interleave(3)
    made = _perturbed(MADE(DIM, out_dims, [16, 16], order=ORDER, circular=CIRC))
    jac = torch.autograd.functional.jacobian(lambda v: made(v[None])[0], torch.randn(DIM))  # [n_out, dim]
    for j, d in enumerate(out_dims):
        later_or_same = ORDER >= ORDER[d]
        assert (jac[j, later_or_same].abs() < 1e-12).all()
    # The first dim in the order gets constants; the last sees every other dim.
    first, last = int(torch.argmin(ORDER)), int(torch.argmax(ORDER))
    assert (jac[out_dims == first].abs() < 1e-12).all()
    assert (jac[out_dims == last][:, ORDER < ORDER[last]].abs().sum(0) > 0).all()


def _count_made_passes(layer, direction, v):
    calls = []
    handle = layer.made.register_forward_hook(lambda *args: calls.append(1))
    direction(v)
    handle.remove()
    return len(calls)


def test_maf_samples_in_dim_passes_and_evaluates_densities_in_one():
    layer = MaskedAutoregressive(DIM, [8], "affine", order=ORDER)
    v = torch.randn(3, DIM)
    assert _count_made_passes(layer, layer.forward, v) == DIM
    assert _count_made_passes(layer, layer.inverse, v) == 1
    assert layer.capabilities.sampling == "iterative" and layer.capabilities.density == "one_pass"


def test_iaf_samples_in_one_pass_and_evaluates_external_densities_in_dim():
    layer = InverseAutoregressive(DIM, [8], "affine", order=ORDER)
    v = torch.randn(3, DIM)
    assert _count_made_passes(layer, layer.forward, v) == 1
    assert _count_made_passes(layer, layer.inverse, v) == DIM
    assert layer.capabilities.sampling == "one_pass" and layer.capabilities.density == "iterative"


@pytest.mark.parametrize("cls", [MaskedAutoregressive, InverseAutoregressive])
def test_affine_transformer_refuses_circular_dims(cls):
    with pytest.raises(ValueError, match="cannot transform circular dims"):
        cls(DIM, [8], "affine", circular=CIRC)


@pytest.mark.parametrize("cls", [MaskedAutoregressive, InverseAutoregressive])
def test_spline_layer_maps_the_circle_and_is_continuous_across_the_wrap(cls):
    layer = _perturbed(cls(DIM, [16], "spline", order=ORDER, circular=CIRC))
    v = torch.randn(1, DIM).repeat(2, 1)
    v[:, CIRC] = 0.5
    v[0, 0], v[1, 0] = math.pi, -math.pi  # dim 0 is circular and conditions the dims after it
    out, ld = layer(v)
    later = ORDER > ORDER[0]
    torch.testing.assert_close(out[0, later], out[1, later], atol=1e-10, rtol=0)
    assert (out[:, CIRC].abs() <= math.pi + 1e-12).all()
    assert torch.isfinite(ld).all()
