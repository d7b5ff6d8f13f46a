"""Builds a flow and its prior from the config: every family of ``flow.type``."""

from __future__ import annotations

import torch
from torch import Tensor

from boltzgen.config import FlowConfig
from boltzgen.flows.autoregressive import InverseAutoregressive, MaskedAutoregressive
from boltzgen.flows.capabilities import Capabilities
from boltzgen.flows.nn import set_conditioner_dtype
from boltzgen.flows.planar import PlanarFlow, RadialFlow
from boltzgen.flows.priors import Prior
from boltzgen.flows.residual import ResidualBlock
from boltzgen.flows.sylvester import HouseholderLinear, SylvesterFlow
from boltzgen.flows.transforms import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    Bijection,
    Compose,
    LULinear,
    SplineCoupling,
)

COUPLING = ("neural_spline", "real_nvp", "nice")
AUTOREGRESSIVE = ("maf", "iaf")
RESIDUAL = ("iresnet", "residual_flow")
NO_INVERSE = ("planar", "radial", "sylvester")


def coupling_masks(dim: int, blocks: int, seed: int = 0) -> list[Tensor]:
    """``blocks`` boolean masks (True = transformed): complementary pairs of seeded random halves.

    Random halves, rather than fixed even/odd ones, let every dimension condition every other within
    a few blocks without permutation layers, which would move circular dimensions around.
    """
    if dim < 2:
        raise ValueError("coupling flows need at least 2 dimensions")
    generator = torch.Generator().manual_seed(seed)
    masks = []
    for k in range(blocks):
        if k % 2 == 0:
            order = torch.arange(dim) if k == 0 else torch.randperm(dim, generator=generator)
            half = torch.zeros(dim, dtype=torch.bool)
            half[order[: dim // 2]] = True
            masks.append(half)
        else:
            masks.append(~masks[-1])
    return masks


def autoregressive_orders(dim: int, blocks: int, seed: int = 0) -> list[Tensor]:
    """``blocks`` orders (each dim's rank) for autoregressive layers: the identity, then alternately
    the reverse of the previous order and a seeded random permutation. Like the coupling masks, they
    replace permutation layers, so that circular dimensions stay where they are."""
    generator = torch.Generator().manual_seed(seed)
    orders = []
    for k in range(blocks):
        if k == 0:
            orders.append(torch.arange(dim))
        elif k % 2 == 1:
            orders.append(dim - 1 - orders[-1])
        else:
            orders.append(torch.randperm(dim, generator=generator))
    return orders


def can_transform_circular(config: FlowConfig) -> bool:
    """Whether ``flow.type`` (with its settings) can transform circular latents (angles)."""
    if config.type in AUTOREGRESSIVE:
        return config.autoregressive_settings.transformer == "spline"
    return config.type == "neural_spline"


def _coupling_blocks(config: FlowConfig, dim: int, circular: Tensor, seed: int) -> list[Bijection]:
    layers: list[Bijection] = []
    for mask in coupling_masks(dim, config.blocks, seed):
        if config.type == "neural_spline":
            layers.append(SplineCoupling(dim, mask, config.hidden, bins=config.bins, tail_bound=config.tail_bound,
                                         circular=circular, identity_init=config.identity_init))
        elif config.type == "real_nvp":
            layers.append(AffineCoupling(dim, mask, config.hidden, identity_init=config.identity_init))
        else:
            layers.append(AdditiveCoupling(dim, mask, config.hidden, identity_init=config.identity_init))
    return layers


def _family_blocks(config: FlowConfig, dim: int, circular: Tensor, seed: int) -> list[Bijection]:
    """The ``config.blocks`` layers of the family ``config.type``, without linear or ActNorm layers."""
    if config.type in COUPLING:
        return _coupling_blocks(config, dim, circular, seed)
    if config.type in AUTOREGRESSIVE:
        cls = MaskedAutoregressive if config.type == "maf" else InverseAutoregressive
        transformer = config.autoregressive_settings.transformer
        return [cls(dim, config.hidden, transformer, order=order, circular=circular, bins=config.bins,
                    tail_bound=config.tail_bound, identity_init=config.identity_init)
                for order in autoregressive_orders(dim, config.blocks, seed)]
    if config.type in RESIDUAL:
        r = config.residual_settings
        estimator = "exact" if r.exact_log_det else ("power_series" if config.type == "iresnet" else "roulette")
        return [ResidualBlock(dim, config.hidden, lipschitz=r.lipschitz, estimator=estimator, n_terms=r.n_terms,
                              exact_terms=r.exact_terms, roulette_p=r.roulette_p,
                              hutchinson_samples=r.hutchinson_samples, fixed_point_tol=r.fixed_point_tol,
                              fixed_point_max_iter=r.fixed_point_max_iter, identity_init=config.identity_init)
                for _ in range(config.blocks)]
    if config.type == "planar":
        return [PlanarFlow(dim, identity_init=config.identity_init) for _ in range(config.blocks)]
    if config.type == "radial":
        return [RadialFlow(dim, identity_init=config.identity_init) for _ in range(config.blocks)]
    s = config.sylvester_settings
    return [SylvesterFlow(dim, s.variant, m=None if s.m is None else min(s.m, dim), reflections=s.reflections,
                          flip=k % 2 == 1, identity_init=config.identity_init)
            for k in range(config.blocks)]


def build_flow(
    config: FlowConfig, dim: int, circular: Tensor | None = None, coordinates: Bijection | None = None, seed: int = 0
) -> tuple[Prior, Bijection]:
    """A prior over ``dim`` latents and the flow latent -> state.

    ``circular`` ([dim] bool) flags periodic latents in [-pi, pi): the prior is uniform there (and
    ``config.prior`` elsewhere), and only spline layers (``neural_spline``, ``maf``/``iaf`` with the
    spline transformer) may transform them; any other family is refused with a one-line
    ``ValueError``. ``coordinates`` (e.g. internal -> Cartesian) is appended as the last layer, in the
    sampling direction; ``dim`` is then its latent dimension. After each block come an ``LULinear``
    (``lu``) and a ``HouseholderLinear`` (``householder: k``) where asked for and no latent is
    circular; ActNorm ends the flow.
    """
    circular = torch.zeros(dim, dtype=torch.bool) if circular is None else circular.to(torch.bool)
    has_circular = bool(circular.any())
    if has_circular and not can_transform_circular(config):
        kind = f"{config.type} ({config.autoregressive_settings.transformer})" if config.type in AUTOREGRESSIVE \
            else config.type
        raise ValueError(f"flow.type {kind} cannot transform circular coordinates; use neural_spline, or maf/iaf "
                         "with autoregressive.transformer spline")
    if has_circular and config.householder:
        raise ValueError("flow.householder mixes dimensions and cannot be used with circular coordinates")
    layers: list[Bijection] = []
    for block in _family_blocks(config, dim, circular, seed):
        layers.append(block)
        if config.lu and not has_circular:
            layers.append(LULinear(dim, identity_init=config.identity_init))
        if config.householder:
            layers.append(HouseholderLinear(dim, config.householder))
    if config.actnorm and not has_circular and coordinates is None:
        layers.append(ActNorm(dim))
    if coordinates is not None:
        layers.append(coordinates)
    flow = Compose(layers)
    if config.conditioner_dtype == "bfloat16":
        set_conditioner_dtype(flow, torch.bfloat16)
    return Prior(dim, circular, base=config.prior), flow


def flow_capabilities(config: FlowConfig) -> Capabilities:
    """The capabilities of the flow ``config`` describes, from a small instance of it (2 dims): they
    depend on the family and its settings, not on the dimension."""
    return build_flow(config.model_copy(update={"hidden": [2]}), 2)[1].capabilities
