"""Capabilities of the flow families, their composition, and the flows `build_flow` makes of each type."""

from __future__ import annotations

import pytest
import torch

from boltzgen.config import FlowConfig
from boltzgen.flows.build import build_flow, can_transform_circular, flow_capabilities
from boltzgen.flows.capabilities import EXACT, Capabilities
from boltzgen.flows.planar import PlanarFlow
from boltzgen.flows.sylvester import HouseholderLinear
from boltzgen.flows.transforms import ActNorm, Compose

ALL_TYPES = ["neural_spline", "real_nvp", "nice", "maf", "iaf", "iresnet", "residual_flow", "planar", "radial",
             "sylvester"]
# type -> (sampling, density, log_det)
EXPECTED = {
    "neural_spline": ("one_pass", "one_pass", "exact"),
    "real_nvp": ("one_pass", "one_pass", "exact"),
    "nice": ("one_pass", "one_pass", "exact"),
    "maf": ("iterative", "one_pass", "exact"),
    "iaf": ("one_pass", "iterative", "exact"),
    "iresnet": ("one_pass", "iterative", "estimated"),
    "residual_flow": ("one_pass", "iterative", "estimated"),
    "planar": ("one_pass", "none", "exact"),
    "radial": ("one_pass", "none", "exact"),
    "sylvester": ("one_pass", "none", "exact"),
}


def test_compose_takes_the_worst_of_each_field():
    maf = Capabilities(sampling="iterative")
    planar = Capabilities(density="none")
    roulette = Capabilities(density="iterative", log_det="estimated", estimator="roulette", unbiased=True)
    series = Capabilities(log_det="estimated", estimator="series", unbiased=False)
    combined = Capabilities.compose([EXACT, maf, roulette, planar, series, roulette])
    assert combined == Capabilities(sampling="iterative", density="none", log_det="estimated",
                                    estimator="roulette; series", unbiased=False)
    assert Capabilities.compose([]) == EXACT
    assert Capabilities.compose([EXACT, roulette]).unbiased


@pytest.mark.parametrize("flow_type", ALL_TYPES)
def test_each_type_builds_with_its_capabilities(flow_type):
    config = FlowConfig(type=flow_type, blocks=2, hidden=[8])
    capabilities = flow_capabilities(config)
    assert (capabilities.sampling, capabilities.density, capabilities.log_det) == EXPECTED[flow_type]
    prior, flow = build_flow(config, 3)
    assert flow.capabilities == capabilities
    x, logdet = flow(prior.sample(4))
    assert x.shape == (4, 3) and torch.isfinite(logdet).all()
    assert capabilities.describe().startswith("samples ")


def test_exact_log_det_setting_makes_residual_flows_exact():
    config = FlowConfig(type="residual_flow", residual={"exact_log_det": True})
    assert flow_capabilities(config).exact_log_det


@pytest.mark.parametrize("flow_type", ALL_TYPES)
def test_circular_latents_are_refused_by_families_that_cannot_transform_them(flow_type):
    config = FlowConfig(type=flow_type, blocks=2, hidden=[8])
    circular = torch.tensor([True, False, True, False])
    if can_transform_circular(config):
        _, flow = build_flow(config, 4, circular=circular)
        assert not any(isinstance(m, ActNorm) for m in flow.modules())
        return
    with pytest.raises(ValueError, match=f"flow.type {flow_type}.*cannot transform circular coordinates") as info:
        build_flow(config, 4, circular=circular)
    assert "\n" not in str(info.value)


def test_affine_autoregressive_flows_refuse_circular_latents_but_splines_do_not():
    affine = FlowConfig(type="iaf", autoregressive={"transformer": "affine"})
    assert not can_transform_circular(affine) and can_transform_circular(FlowConfig(type="iaf"))
    with pytest.raises(ValueError, match=r"flow.type iaf \(affine\)"):
        build_flow(affine, 3, circular=torch.tensor([True, False, False]))


def test_householder_setting_adds_an_orthogonal_layer_per_block():
    _, flow = build_flow(FlowConfig(type="real_nvp", blocks=3, hidden=[8], householder=2), 4)
    assert sum(isinstance(m, HouseholderLinear) for m in flow.modules()) == 3
    with pytest.raises(ValueError, match="householder"):
        build_flow(FlowConfig(householder=2, blocks=2, hidden=[8]), 4, circular=torch.tensor([True] * 4))


def test_initialize_from_data_reaches_the_layers_after_the_last_one_without_inverse():
    flow = Compose([ActNorm(2), PlanarFlow(2), ActNorm(2)])
    data = torch.randn(100, 2) * 3 + 5
    flow.initialize_from_data(data)
    first, _, last = flow.layers
    assert bool(last.initialized) and not bool(first.initialized)
    torch.testing.assert_close(last.shift.detach(), data.mean(0))


@pytest.mark.parametrize("dtype, expected", [("float32", None), ("bfloat16", torch.bfloat16)])
def test_conditioner_dtype_reaches_every_coupling_network(dtype, expected):
    from boltzgen.flows.nn import MLP

    _, flow = build_flow(FlowConfig(type="neural_spline", blocks=3, conditioner_dtype=dtype), 4)
    networks = [m for m in flow.modules() if isinstance(m, MLP)]
    assert len(networks) == 3 and all(m.compute_dtype == expected for m in networks)
