"""Conditioner networks for coupling layers, and the feature embedding of circular inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class CircularFeatures(nn.Module):
    """Features of chosen dims of a state that are continuous on the circle.

    Takes ``v`` ``[batch, dim]`` and returns ``[batch, n_linear + 2 n_circular]``: the values of the
    ``linear`` dims, then ``cos`` and then ``sin`` of the ``circular`` dims (each block in the order
    given). A conditioner fed these features sees -pi and pi as the same point, so the flow stays
    continuous across the wrap. The indices are fixed buffers, so the forward pass has no
    data-dependent shapes (it traces and compiles without graph breaks).
    """

    def __init__(self, linear: Tensor, circular: Tensor) -> None:
        super().__init__()
        self.register_buffer("linear", torch.as_tensor(linear, dtype=torch.long).flatten(), persistent=False)
        self.register_buffer("circular", torch.as_tensor(circular, dtype=torch.long).flatten(), persistent=False)
        self.out_dim = self.linear.numel() + 2 * self.circular.numel()

    @classmethod
    def of_mask(cls, circular_mask: Tensor, dims: Tensor | None = None) -> CircularFeatures:
        """The features of ``dims`` (default: all dims of ``circular_mask`` ``[dim]`` bool), angles
        being the dims flagged in ``circular_mask``; order as in :func:`circular_embedding`."""
        circ = torch.as_tensor(circular_mask, dtype=torch.bool)
        dims = torch.arange(circ.numel()) if dims is None else torch.as_tensor(dims, dtype=torch.long)
        return cls(dims[~circ[dims]], dims[circ[dims]])

    def forward(self, v: Tensor) -> Tensor:
        if self.circular.numel() == 0:
            return v.index_select(1, self.linear)
        angles = v.index_select(1, self.circular)
        return torch.cat([v.index_select(1, self.linear), torch.cos(angles), torch.sin(angles)], dim=-1)


def circular_embedding(x: Tensor, circular_mask: Tensor) -> Tensor:
    """:class:`CircularFeatures` of all dims of ``x`` ``[batch, d]``, ``circular_mask`` bool ``[d]``
    (True = angle in radians): ``[batch, d + n_circular]``, the raw non-circular values, then ``cos``
    of the circular ones, then their ``sin``."""
    if circular_mask.shape != x.shape[-1:]:
        raise ValueError(f"circular_mask has shape {list(circular_mask.shape)}, x has {x.shape[-1]} dims")
    return CircularFeatures.of_mask(circular_mask.cpu()).to(x.device)(x)


def embedding_dim(circular_mask: Tensor) -> int:
    """Number of features :func:`circular_embedding` produces for this mask."""
    return int(circular_mask.numel()) + int(circular_mask.to(torch.bool).sum())


class MLP(nn.Sequential):
    """A fully connected network ``[batch, in_dim] -> [batch, out_dim]``.

    ``hidden`` lists the hidden widths; ``activation`` is a module class applied after each hidden
    layer. With ``zero_last`` the output layer starts at exactly zero (weights and bias), which is
    what lets coupling layers start as the identity.

    ``compute_dtype`` (None: the input's dtype), set by :func:`set_conditioner_dtype`: with
    ``torch.bfloat16`` the layers run under autocast (bfloat16 operands, float32 accumulation and
    weights) and the output is cast back to the input's dtype. The output is still a deterministic
    function of the input, so a coupling layer built on it stays exactly invertible and its log-det
    exact for the parameters it predicts.
    """

    compute_dtype: torch.dtype | None = None

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

    def forward(self, x: Tensor) -> Tensor:
        if self.compute_dtype is None or self.compute_dtype == x.dtype:
            return super().forward(x)
        with torch.autocast(device_type=x.device.type, dtype=self.compute_dtype):
            y = super().forward(x)
        return y.to(x.dtype)


def set_conditioner_dtype(module: nn.Module, dtype: torch.dtype | None) -> None:
    """Run every :class:`MLP` inside ``module`` in ``dtype`` (None: in its input's dtype)."""
    for child in module.modules():
        if isinstance(child, MLP):
            child.compute_dtype = dtype


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 ``mask`` ``[out, in]`` (a buffer)."""

    def __init__(self, mask: Tensor, zero: bool = False) -> None:
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.to(self.weight.dtype))
        if zero:
            nn.init.zeros_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation (Germain et al. 2015): the conditioner of
    autoregressive flows.

    Maps a state ``[batch, dim]`` to ``[batch, n_out]`` outputs; output ``j`` belongs to dim
    ``out_dims[j]`` and depends only on the dims that come before it in ``order``. ``order``
    (``[dim]``, a permutation of ``0..dim-1``) gives each dim's rank: rank 0 is first, and its outputs
    are constants (biases). Circular dims (``circular``, bool ``[dim]``) enter as ``(cos, sin)``, as in
    :class:`CircularFeatures`, with their dim's rank. Hidden units cycle through degrees
    ``1..dim-1``, so every dependency is possible when each hidden width is at least ``dim - 1``.
    With ``zero_last`` the outputs start at exactly zero.
    """

    def __init__(
        self,
        dim: int,
        out_dims: Tensor,
        hidden: Sequence[int],
        order: Tensor | None = None,
        circular: Tensor | None = None,
        zero_last: bool = False,
    ) -> None:
        super().__init__()
        order = torch.arange(dim) if order is None else torch.as_tensor(order, dtype=torch.long)
        if sorted(order.tolist()) != list(range(dim)):
            raise ValueError(f"order must be a permutation of 0..{dim - 1}")
        circ = torch.zeros(dim, dtype=torch.bool) if circular is None else circular.to(torch.bool).clone()
        degree = order + 1  # the degree of each dim's inputs: 1..dim
        in_degrees = torch.cat([degree[~circ], degree[circ], degree[circ]])
        out_degrees = degree[torch.as_tensor(out_dims, dtype=torch.long)]
        layers: list[nn.Module] = []
        previous = in_degrees
        for k, width in enumerate(hidden):
            units = torch.arange(width)
            degrees = units % (dim - 1) + 1 if dim > 1 else torch.zeros(width, dtype=torch.long)
            layers += [MaskedLinear((degrees[:, None] >= previous[None, :]).to(torch.float32)), nn.SiLU()]
            previous = degrees
        layers.append(MaskedLinear((out_degrees[:, None] > previous[None, :]).to(torch.float32), zero=zero_last))
        self.net = nn.Sequential(*layers)
        self.features = CircularFeatures.of_mask(circ)

    def forward(self, v: Tensor) -> Tensor:
        return self.net(self.features(v))
