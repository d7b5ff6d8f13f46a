"""Builds a flow and its prior from the config."""

from __future__ import annotations

import torch
from torch import Tensor

from boltzgen.config import FlowConfig
from boltzgen.flows.priors import Prior
from boltzgen.flows.transforms import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    Bijection,
    Compose,
    LULinear,
    SplineCoupling,
)


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


def build_flow(
    config: FlowConfig, dim: int, circular: Tensor | None = None, coordinates: Bijection | None = None, seed: int = 0
) -> tuple[Prior, Bijection]:
    """A prior over ``dim`` latents and the flow latent -> state.

    ``circular`` ([dim] bool) flags periodic latents in [-pi, pi): the prior is uniform there and
    spline couplings use circular splines. ``coordinates`` (e.g. internal -> Cartesian) is appended
    as the last layer, in the sampling direction; ``dim`` is then its latent dimension.
    """
    circular = torch.zeros(dim, dtype=torch.bool) if circular is None else circular.to(torch.bool)
    has_circular = bool(circular.any())
    layers: list[Bijection] = []
    for mask in coupling_masks(dim, config.blocks, seed):
        if config.type == "neural_spline":
            layers.append(
                SplineCoupling(
                    dim, mask, config.hidden, bins=config.bins, tail_bound=config.tail_bound,
                    circular=circular, identity_init=config.identity_init,
                )
            )
        elif config.type == "real_nvp":
            if has_circular:
                raise ValueError("flow.type real_nvp cannot transform circular coordinates; use neural_spline")
            layers.append(AffineCoupling(dim, mask, config.hidden, identity_init=config.identity_init))
        else:
            if has_circular:
                raise ValueError("flow.type nice cannot transform circular coordinates; use neural_spline")
            layers.append(AdditiveCoupling(dim, mask, config.hidden, identity_init=config.identity_init))
        if config.lu and not has_circular:
            layers.append(LULinear(dim, identity_init=config.identity_init))
    if config.actnorm and not has_circular and coordinates is None:
        layers.append(ActNorm(dim))
    if coordinates is not None:
        layers.append(coordinates)
    return Prior(dim, circular), Compose(layers)
