"""Conditioner networks for coupling layers, and the feature embedding of circular inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def circular_embedding(x: Tensor, circular_mask: Tensor) -> Tensor:
    """Features of ``x`` that are continuous on the circle.

    ``x``: ``[batch, d]``; ``circular_mask``: bool ``[d]`` (True = angle in radians).
    Returns ``[batch, d + n_circular]``: the raw non-circular values, then ``cos`` of the circular
    ones, then their ``sin`` (in the order they appear in ``x``). A conditioner fed these features
    sees -pi and pi as the same point, so the flow stays continuous across the wrap.
    """
    if circular_mask.shape != x.shape[-1:]:
        raise ValueError(f"circular_mask has shape {list(circular_mask.shape)}, x has {x.shape[-1]} dims")
    circ = circular_mask.to(device=x.device, dtype=torch.bool)
    if not bool(circ.any()):
        return x
    angles = x[..., circ]
    return torch.cat([x[..., ~circ], torch.cos(angles), torch.sin(angles)], dim=-1)


def embedding_dim(circular_mask: Tensor) -> int:
    """Number of features :func:`circular_embedding` produces for this mask."""
    return int(circular_mask.numel()) + int(circular_mask.to(torch.bool).sum())


class MLP(nn.Sequential):
    """A fully connected network ``[batch, in_dim] -> [batch, out_dim]``.

    ``hidden`` lists the hidden widths; ``activation`` is a module class applied after each hidden
    layer. With ``zero_last`` the output layer starts at exactly zero (weights and bias), which is
    what lets coupling layers start as the identity.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: Sequence[int],
        activation: type[nn.Module] = nn.SiLU,
        zero_last: bool = False,
    ) -> None:
        widths = [in_dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), activation()]
        last = nn.Linear(widths[-1], out_dim)
        if zero_last:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        layers.append(last)
        super().__init__(*layers)
        self.in_dim = in_dim
        self.out_dim = out_dim
