"""Autoregressive flows: masked autoregressive (MAF) and inverse autoregressive (IAF) layers.

Both transform every dim ``i`` elementwise, ``x_i = tau(z_i; theta_i)``, with a transformer ``tau``
that is affine (``z exp(s) + t``) or the rational-quadratic spline of neural spline flows (with
circular splines for angles). What ``theta_i`` depends on makes the difference:

- **MAF** (Papamakarios et al. 2017): ``theta_i = MADE(x)_i`` depends on the states ``x_<i`` before
  ``i`` in the layer's order. The density direction ``inverse(x)`` is one MADE pass; sampling must
  recover ``x`` dim after dim, ``dim`` passes (exact).
- **IAF** (Kingma et al. 2016): ``theta_i = MADE(z)_i`` depends on the latents ``z_<i``. Sampling
  is one pass, and so is the density of its own samples; the density of any other state (training
  data, an MCMC state) takes ``dim`` passes (exact). So IAF can be trained by maximum likelihood,
  at ``dim`` times the cost per step of MAF.

The ``dim``-pass inversion feeds the current guess through MADE and transforms again; after pass
``k`` the first ``k`` dims in the order are exact, and the map it computes after ``dim`` passes is
the exact inverse, so autograd through it gives exact gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from boltzgen.flows.capabilities import Capabilities
from boltzgen.flows.nn import MADE
from boltzgen.flows.transforms import Bijection, SplineSettings

Transformer = Literal["affine", "spline"]


class _Autoregressive(Bijection):
    """Shared machinery of MAF and IAF layers over ``dim`` dims.

    ``order`` (``[dim]``): each dim's rank in the autoregression (default ``0..dim-1``); successive
    layers use different orders instead of permutation layers, so circular dims stay in place.
    ``transformer``: ``affine`` (log-scale soft-bounded by ``scale_bound``; no circular dims) or
    ``spline`` (:class:`~boltzgen.flows.transforms.SplineSettings` with ``bins``, ``tail_bound``;
    circular dims get circular splines). With ``identity_init`` the layer starts as the identity.
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int],
        transformer: Transformer = "spline",
        order: Tensor | Sequence[int] | None = None,
        circular: Tensor | None = None,
        bins: int = 8,
        tail_bound: float = 5.0,
        scale_bound: float = 3.0,
        identity_init: bool = True,
    ) -> None:
        super().__init__()
        circ = torch.zeros(dim, dtype=torch.bool) if circular is None else torch.as_tensor(circular).to(torch.bool)
        if circ.shape != (dim,):
            raise ValueError(f"circular must have shape [{dim}], got {list(circ.shape)}")
        if transformer == "affine" and bool(circ.any()):
            raise ValueError(f"{type(self).__name__} with an affine transformer cannot transform circular dims; "
                             "use the spline transformer")
        if transformer not in ("affine", "spline"):
            raise ValueError(f"unknown transformer {transformer!r}; use affine or spline")
        self.dim = dim
        self.transformer = transformer
        self.scale_bound = scale_bound
        self.spline = SplineSettings(bins, tail_bound)
        lin_idx, circ_idx = torch.nonzero(~circ).flatten(), torch.nonzero(circ).flatten()
        self.register_buffer("lin_idx", lin_idx)
        self.register_buffer("circ_idx", circ_idx)
        if transformer == "affine":
            out_dims = torch.cat([torch.arange(dim), torch.arange(dim)])  # shifts, then log-scales
        else:
            out_dims = torch.cat([lin_idx.repeat_interleave(self.spline.n_params(False)),
                                  circ_idx.repeat_interleave(self.spline.n_params(True))])
        order_t = torch.arange(dim) if order is None else torch.as_tensor(order, dtype=torch.long)
        self.made = MADE(dim, out_dims, hidden, order=order_t, circular=circ, zero_last=identity_init)
        #: the dims by rank, and each dim's slice of the MADE outputs, for the dim-by-dim inversion
        self._by_rank = torch.argsort(order_t).tolist()
        positions = [torch.nonzero(out_dims == d).flatten() for d in range(dim)]  # contiguous for splines
        self._param_slices = [(int(p.min()), int(p.max()) + 1) for p in positions]
        self._circular = circ.tolist()

    def _transform(self, v: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """``tau`` (or its inverse) of every dim of ``v`` ``[batch, dim]`` with MADE outputs ``params``."""
        if self.transformer == "spline":
            return self.spline.apply(v, params, self.lin_idx, self.circ_idx, inverse)
        shift, raw = params.chunk(2, dim=-1)
        log_s = self.scale_bound * torch.tanh(raw / self.scale_bound)
        if inverse:
            return (v - shift) * torch.exp(-log_s), -log_s.sum(-1)
        return v * torch.exp(log_s) + shift, log_s.sum(-1)

    def _one_pass(self, v: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """The direction whose conditioner sees its own input: one MADE pass."""
        return self._transform(v, self.made(v), inverse)

    def _transform_dim(self, v: Tensor, params: Tensor, d: int, inverse: bool) -> Tensor:
        """``tau`` (or its inverse) of dim ``d`` of ``v`` alone, ``[batch]``."""
        if self.transformer == "affine":
            shift, raw = params[:, d], params[:, self.dim + d]
            log_s = self.scale_bound * torch.tanh(raw / self.scale_bound)
            return (v[:, d] - shift) * torch.exp(-log_s) if inverse else v[:, d] * torch.exp(log_s) + shift
        start, end = self._param_slices[d]
        index = torch.tensor([d], device=v.device)
        empty = index[:0]
        lin, circ = (empty, index) if self._circular[d] else (index, empty)
        return self.spline.apply(v, params[:, start:end], lin, circ, inverse)[0][:, d]

    def _iterate(self, v: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """The direction whose conditioner sees its output: ``dim`` MADE passes. Pass ``k`` fixes the dim
        of rank ``k`` (its parameters depend on lower ranks only, already final); the last pass
        transforms every dim and gives the log-det."""
        out = v
        for d in self._by_rank[:-1]:
            value = self._transform_dim(v, self.made(out), d, inverse)
            out = out.index_copy(1, torch.tensor([d], device=v.device), value[:, None])
        return self._transform(v, self.made(out), inverse)


class MaskedAutoregressive(_Autoregressive):
    """MAF layer: density (``inverse``) in one pass, sampling (``forward``) in ``dim`` passes."""

    capabilities = Capabilities(sampling="iterative", density="one_pass")

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self._iterate(z, inverse=False)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._one_pass(x, inverse=True)


class InverseAutoregressive(_Autoregressive):
    """IAF layer: sampling (``forward``) in one pass, density of external states in ``dim`` passes."""

    capabilities = Capabilities(sampling="one_pass", density="iterative")

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self._one_pass(z, inverse=False)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._iterate(x, inverse=True)
