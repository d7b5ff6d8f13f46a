"""Bijections: invertible maps with exact log-determinants, composed into flows.

Convention: ``forward(z) -> (x, logdet)`` maps latent to configuration (the sampling direction);
``inverse(x) -> (z, logdet)`` is the density direction. ``logdet`` is ``log|det dx/dz|`` for
forward and ``log|det dz/dx|`` for inverse, shape ``[batch]``, from the same pass, so that the
forward and inverse log-dets of the same point sum to 0.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from boltzgen.flows import fused_spline
from boltzgen.flows.capabilities import EXACT, Capabilities
from boltzgen.flows.nn import MLP, CircularFeatures


class Bijection(nn.Module, ABC):
    """An invertible map between ``[batch, dim_in]`` latents and ``[batch, dim_out]`` states.

    ``capabilities`` (:class:`~boltzgen.flows.capabilities.Capabilities`) says how each direction is
    computed and whether the log-det is exact; a layer that deviates from the default (both
    directions in one pass, exact log-det) overrides it.
    """

    capabilities: Capabilities = EXACT

    @abstractmethod
    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Latent -> state. Returns ``(x, log|det dx/dz|)``, log-det of shape ``[batch]``."""

    @abstractmethod
    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """State -> latent. Returns ``(z, log|det dz/dx|)``, log-det of shape ``[batch]``."""


class Compose(Bijection):
    """``forward`` applies the layers in order; ``inverse`` applies them in reverse."""

    def __init__(self, layers: Sequence[Bijection]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        return Capabilities.compose(layer.capabilities for layer in self.layers)

    @torch.no_grad()
    def initialize_from_data(self, x: Tensor) -> None:
        """Run the density direction on data ``x`` ``[batch, dim]`` from the last layer back, for
        data-dependent initialization (ActNorm), stopping before the first layer without an inverse."""
        for layer in reversed(self.layers):
            if not layer.capabilities.data_density:
                return
            x, _ = layer.inverse(x)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        logdet = z.new_zeros(z.shape[0])
        for layer in self.layers:
            z, ld = layer(z)
            logdet = logdet + ld
        return z, logdet

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in reversed(self.layers):
            x, ld = layer.inverse(x)
            logdet = logdet + ld
        return x, logdet


# ----------------------------------------------------------------------------------------------
# Elementwise rational-quadratic spline (the map of neural spline flows)
# ----------------------------------------------------------------------------------------------


def _knots(sizes: Tensor, low: float | Tensor, high: float | Tensor) -> Tensor:
    """Knot positions ``[..., K+1]`` from bin fractions ``[..., K]`` that sum to 1, on ``[low, high]``
    (floats, or tensors of the leading shape ``[...]``)."""
    cum = torch.cumsum(sizes, dim=-1)
    # Dividing by the last sum makes the end knot exactly 1 (x / x == 1 in floating point), so the
    # domain's ends are knots exactly: low + (high - low) * 1 == high for the symmetric domains used.
    fractions = nn.functional.pad(cum / cum[..., -1:], (1, 0))
    if isinstance(low, Tensor):
        low, high = low.unsqueeze(-1), high.unsqueeze(-1)
    return low + (high - low) * fractions


def _softmax(p: Tensor) -> Tensor:
    """Softmax over the last axis. Written out because ATen's CPU softmax over a short last axis (a
    spline's 8 bins) is about 3x slower than these few elementwise ops, forward and backward."""
    e = torch.exp(p - p.amax(dim=-1, keepdim=True).detach())
    return e / e.sum(dim=-1, keepdim=True)


def rational_quadratic_spline(
    inputs: Tensor,
    widths: Tensor,
    heights: Tensor,
    derivatives: Tensor,
    inverse: bool = False,
    left: float | Tensor = -1.0,
    right: float | Tensor = 1.0,
    bottom: float | Tensor = -1.0,
    top: float | Tensor = 1.0,
) -> tuple[Tensor, Tensor]:
    """Monotone rational-quadratic spline from ``[left, right]`` onto ``[bottom, top]``, elementwise.

    ``inputs``: any shape ``S``; the bounds are floats or tensors of shape ``S`` (a domain per element). ``widths`` and ``heights``: ``S + [K]``, positive bin fractions that
    each sum to 1 over the last axis. ``derivatives``: ``S + [K+1]``, positive slopes at the knots.
    Inputs outside the domain are clamped into it (callers handle tails). Returns
    ``(outputs [S], log|d out / d in| [S])``; with ``inverse=True`` the inverse map and its log-slope.
    """
    inputs = inputs.clamp(bottom, top) if inverse else inputs.clamp(left, right)
    cumw = _knots(widths, left, right)
    cumh = _knots(heights, bottom, top)
    knots_in = cumh if inverse else cumw
    n_bins = widths.shape[-1]
    idx = torch.searchsorted(knots_in.contiguous(), inputs.unsqueeze(-1).contiguous(), right=True)
    idx = (idx - 1).clamp(0, n_bins - 1)

    # One gather per bin edge for the knots' x, y and slope: [S, 3, 1] each.
    table = torch.stack([cumw, cumh, derivatives], dim=-2)
    lower = torch.gather(table, -1, idx.unsqueeze(-2).expand(*idx.shape[:-1], 3, 1)).squeeze(-1)
    upper = torch.gather(table, -1, (idx + 1).unsqueeze(-2).expand(*idx.shape[:-1], 3, 1)).squeeze(-1)
    x_k, y_k, d_k = lower.unbind(-1)
    w_k, h_k, d_k1 = upper[..., 0] - x_k, upper[..., 1] - y_k, upper[..., 2]
    s_k = h_k / w_k
    curv = d_k1 + d_k - 2 * s_k

    if inverse:
        dy = inputs - y_k
        a = h_k * (s_k - d_k) + dy * curv
        b = h_k * d_k - dy * curv
        c = -s_k * dy
        disc = (b * b - 4 * a * c).clamp_min(0.0)
        # This root form avoids cancellation; the denominator is <= -b < 0 for monotone splines.
        xi = (2 * c) / (-b - torch.sqrt(disc))
        xi = xi.clamp(0.0, 1.0)
        outputs = x_k + xi * w_k
    else:
        xi = ((inputs - x_k) / w_k).clamp(0.0, 1.0)
        xi1 = xi * (1 - xi)
        outputs = y_k + h_k * (s_k * xi * xi + d_k * xi1) / (s_k + curv * xi1)

    xi1 = xi * (1 - xi)
    denom = s_k + curv * xi1
    numer = d_k1 * xi * xi + 2 * s_k * xi1 + d_k * (1 - xi) ** 2
    logabsdet = 2 * torch.log(s_k) + torch.log(numer) - 2 * torch.log(denom)
    return outputs, (-logabsdet if inverse else logabsdet)


def _softplus_inverse(y: float) -> float:
    return math.log(math.expm1(y))


# ----------------------------------------------------------------------------------------------
# Coupling layers
# ----------------------------------------------------------------------------------------------


def _as_mask(mask: Tensor | Sequence[bool] | None, dim: int, name: str) -> Tensor:
    m = torch.zeros(dim, dtype=torch.bool) if mask is None else torch.as_tensor(mask).to(torch.bool).clone()
    if m.shape != (dim,):
        raise ValueError(f"{name} must have shape [{dim}], got {list(m.shape)}")
    return m


class _Coupling(Bijection):
    """Shared machinery: dims with ``mask`` True are transformed elementwise, with parameters
    predicted by an MLP from the other (conditioning) dims.

    Circular conditioning dims enter the MLP as ``(cos, sin)``. When every dim is transformed the
    MLP gets a constant input, so the layer becomes a learned elementwise map.
    """

    def __init__(
        self,
        dim: int,
        mask: Tensor | Sequence[bool],
        hidden: Sequence[int],
        n_params: int,
        identity_init: bool,
        circular: Tensor | Sequence[bool] | None,
    ) -> None:
        super().__init__()
        m = _as_mask(mask, dim, "mask")
        circ = _as_mask(circular, dim, "circular")
        if not bool(m.any()):
            raise ValueError("coupling mask transforms no dimension")
        self.dim = dim
        self.register_buffer("mask", m)
        self.register_buffer("circular", circ)
        self.features = CircularFeatures.of_mask(circ, torch.nonzero(~m).flatten())
        self.conditioner = MLP(max(self.features.out_dim, 1), n_params, hidden, zero_last=identity_init)

    def _params(self, v: Tensor) -> Tensor:
        """Conditioner output ``[batch, n_params]`` from the full state ``v [batch, dim]``."""
        if self.features.out_dim == 0:
            return self.conditioner(v.new_ones(v.shape[0], 1))
        return self.conditioner(self.features(v))


class AffineCoupling(_Coupling):
    """RealNVP coupling: ``x_t = z_t * exp(s) + t`` on the masked dims, ``s, t`` from the rest.

    The log-scale is soft-bounded, ``s = scale_bound * tanh(raw / scale_bound)``, so one layer can
    never scale by more than ``exp(±scale_bound)``. Transformed dims must not be circular (an affine
    map does not preserve the circle); circular dims may condition. ``mask``/``circular``: bool ``[dim]``.
    """

    def __init__(
        self,
        dim: int,
        mask: Tensor | Sequence[bool],
        hidden: Sequence[int],
        identity_init: bool = True,
        scale_bound: float = 3.0,
        circular: Tensor | Sequence[bool] | None = None,
    ) -> None:
        m = _as_mask(mask, dim, "mask")
        if bool((m & _as_mask(circular, dim, "circular")).any()):
            raise ValueError("AffineCoupling cannot transform circular dims; use SplineCoupling")
        super().__init__(dim, m, hidden, 2 * int(m.sum()), identity_init, circular)
        self.scale_bound = scale_bound
        self.register_buffer("trans_idx", torch.nonzero(m).flatten())

    def _shift_logscale(self, v: Tensor) -> tuple[Tensor, Tensor]:
        shift, raw = self._params(v).chunk(2, dim=-1)
        return shift, self.scale_bound * torch.tanh(raw / self.scale_bound)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_s = self._shift_logscale(z)
        x_t = z[:, self.trans_idx] * torch.exp(log_s) + shift
        return z.index_copy(1, self.trans_idx, x_t), log_s.sum(-1)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_s = self._shift_logscale(x)
        z_t = (x[:, self.trans_idx] - shift) * torch.exp(-log_s)
        return x.index_copy(1, self.trans_idx, z_t), -log_s.sum(-1)


class AdditiveCoupling(_Coupling):
    """NICE coupling: ``x_t = z_t + t(z_rest)``; volume preserving (log-det 0).

    Transformed dims must not be circular; circular dims may condition.
    """

    def __init__(
        self,
        dim: int,
        mask: Tensor | Sequence[bool],
        hidden: Sequence[int],
        identity_init: bool = True,
        circular: Tensor | Sequence[bool] | None = None,
    ) -> None:
        m = _as_mask(mask, dim, "mask")
        if bool((m & _as_mask(circular, dim, "circular")).any()):
            raise ValueError("AdditiveCoupling cannot transform circular dims; use SplineCoupling")
        super().__init__(dim, m, hidden, int(m.sum()), identity_init, circular)
        self.register_buffer("trans_idx", torch.nonzero(m).flatten())

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x_t = z[:, self.trans_idx] + self._params(z)
        return z.index_copy(1, self.trans_idx, x_t), z.new_zeros(z.shape[0])

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z_t = x[:, self.trans_idx] - self._params(x)
        return x.index_copy(1, self.trans_idx, z_t), x.new_zeros(x.shape[0])


@dataclass(frozen=True)
class SplineSettings:
    """The elementwise rational-quadratic spline of neural spline flows, shared by the spline
    coupling and the autoregressive spline transformers.

    Non-circular dims: a spline on ``[-tail_bound, tail_bound]`` with boundary slopes 1 and the
    identity outside (linear tails), from ``3 bins - 1`` raw parameters. Circular dims (angles in
    radians, inputs expected in ``[-pi, pi]``, clamped into it): a spline of ``[-pi, pi]`` onto itself
    whose slope at -pi equals that at pi, so it is a diffeomorphism of the circle, from ``3 bins``
    raw parameters. Slopes are ``min_derivative + softplus(raw + c)`` with ``c`` such that
    ``raw = 0`` gives exactly 1, so all-zero raw parameters give the exact identity.
    """

    bins: int = 8
    tail_bound: float = 5.0
    min_bin_width: float = 1e-3
    min_bin_height: float = 1e-3
    min_derivative: float = 1e-3

    def __post_init__(self) -> None:
        if self.bins * self.min_bin_width >= 1 or self.bins * self.min_bin_height >= 1:
            raise ValueError("bins * min_bin_width (and min_bin_height) must be < 1")
        if not 0 < self.min_derivative < 1:
            raise ValueError("min_derivative must lie in (0, 1) so that slope 1 is reachable")

    def n_params(self, circular: bool) -> int:
        """Raw parameters per transformed dim."""
        return 3 * self.bins if circular else 3 * self.bins - 1

    def apply(self, v: Tensor, params: Tensor, lin_idx: Tensor, circ_idx: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """Transform the dims ``lin_idx`` (non-circular) and ``circ_idx`` (circular) of ``v`` ``[batch, dim]``.

        ``params`` ``[batch, n_lin * (3 bins - 1) + n_circ * 3 bins]``: the non-circular dims' raw
        parameters, dim after dim in ``lin_idx`` order, then the circular dims'. Returns ``v`` with
        those dims replaced and the log-det ``[batch]`` (of the inverse map with ``inverse``).
        Both kinds go through one spline evaluation, each dim with its own domain: per-layer op
        count, not arithmetic, is what a training step's time goes to.
        """
        k, batch = self.bins, v.shape[0]
        n_lin, n_circ = lin_idx.numel(), circ_idx.numel()
        idx = torch.cat([lin_idx, circ_idx])
        vals = v.index_select(1, idx)
        if fused_spline.usable(vals, params, k):
            y, logdet = fused_spline.fused_spline(vals, params, n_lin, k, self.tail_bound, self.min_bin_width,
                                                  self.min_bin_height, self.min_derivative, inverse)
            return v.index_copy(1, idx, y), logdet
        p_lin = params[:, : n_lin * (3 * k - 1)].reshape(batch, n_lin, 3 * k - 1)
        p_circ = params[:, n_lin * (3 * k - 1) :].reshape(batch, n_circ, 3 * k)
        raw_bins = torch.cat([p_lin[..., : 2 * k], p_circ[..., : 2 * k]], dim=1).reshape(batch, n_lin + n_circ, 2, k)
        minimum = torch.tensor([self.min_bin_width, self.min_bin_height], dtype=v.dtype, device=v.device)
        bins = minimum.unsqueeze(-1) + (1 - k * minimum.unsqueeze(-1)) * _softmax(raw_bins)
        offset = _softplus_inverse(1.0 - self.min_derivative)
        slopes = self.min_derivative + nn.functional.softplus(torch.cat([p_lin[..., 2 * k :].reshape(batch, -1),
                                                                         p_circ[..., 2 * k :].reshape(batch, -1)], 1)
                                                              + offset)
        inner, circular = slopes.split([n_lin * (k - 1), n_circ * k], dim=1)
        inner, circular = inner.reshape(batch, n_lin, k - 1), circular.reshape(batch, n_circ, k)
        ones = inner.new_ones(batch, n_lin, 1)
        # Linear dims: slope 1 at both ends, to match the identity tails. Circular: the slope at pi is that at -pi.
        derivs = torch.cat([torch.cat([ones, inner, ones], dim=-1), torch.cat([circular, circular[..., :1]], dim=-1)], 1)
        bound = torch.cat([v.new_full((n_lin,), self.tail_bound), v.new_full((n_circ,), math.pi)])
        y, ld = rational_quadratic_spline(vals, bins[..., 0, :], bins[..., 1, :], derivs, inverse, -bound, bound,
                                          -bound, bound)
        if n_lin:
            # Identity tails outside [-tail_bound, tail_bound]; circular inputs are clamped into [-pi, pi].
            outside = (vals.abs() > bound) & (torch.arange(n_lin + n_circ, device=v.device) < n_lin)
            y = torch.where(outside, vals, y)
            ld = torch.where(outside, torch.zeros_like(ld), ld)
        return v.index_copy(1, idx, y), ld.sum(-1)


class SplineCoupling(_Coupling):
    """Rational-quadratic spline coupling (neural spline flow) with circular support.

    The transformed dims go through the spline of :class:`SplineSettings` (linear tails outside
    ``[-tail_bound, tail_bound]`` for ordinary dims, circular splines for angles); one layer may mix
    both kinds. With ``identity_init`` (zero last layer) the layer starts as the exact identity.
    """

    def __init__(
        self,
        dim: int,
        mask: Tensor | Sequence[bool],
        hidden: Sequence[int],
        bins: int = 8,
        tail_bound: float = 5.0,
        circular: Tensor | Sequence[bool] | None = None,
        min_bin_width: float = 1e-3,
        min_bin_height: float = 1e-3,
        min_derivative: float = 1e-3,
        identity_init: bool = True,
    ) -> None:
        m = _as_mask(mask, dim, "mask")
        circ = _as_mask(circular, dim, "circular")
        spline = SplineSettings(bins, tail_bound, min_bin_width, min_bin_height, min_derivative)
        n_lin = int((m & ~circ).sum())
        n_circ = int((m & circ).sum())
        super().__init__(dim, m, hidden, n_lin * spline.n_params(False) + n_circ * spline.n_params(True),
                         identity_init, circ)
        self.spline = spline
        self.bins = bins
        self.tail_bound = tail_bound
        self.register_buffer("lin_idx", torch.nonzero(m & ~circ).flatten())
        self.register_buffer("circ_idx", torch.nonzero(m & circ).flatten())

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.spline.apply(z, self._params(z), self.lin_idx, self.circ_idx, inverse=False)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.spline.apply(x, self._params(x), self.lin_idx, self.circ_idx, inverse=True)


# ----------------------------------------------------------------------------------------------
# Linear and elementwise layers
# ----------------------------------------------------------------------------------------------


class LULinear(Bijection):
    """Glow's invertible linear map ``x = z W^T`` with ``W = P L U``.

    ``P`` is a fixed permutation (buffer), ``L`` lower unit-triangular, ``U`` upper triangular with
    diagonal ``sign * exp(log_diag)`` (``sign`` fixed), so ``log|det W| = sum(log_diag)`` and the
    inverse takes two triangular solves. It mixes dimensions, so it must NOT be applied to circular
    dims (an angle mixed with anything is no longer an angle). With ``identity_init`` it starts as
    ``W = I``; otherwise ``W`` starts as a random rotation (LU-decomposed).
    """

    def __init__(self, dim: int, identity_init: bool = True) -> None:
        super().__init__()
        self.dim = dim
        if identity_init:
            perm, lower, upper = torch.eye(dim), torch.eye(dim), torch.eye(dim)
        else:
            q, _ = torch.linalg.qr(torch.randn(dim, dim))
            perm, lower, upper = torch.linalg.lu(q)
        rows, cols = torch.tril_indices(dim, dim, offset=-1)
        self.register_buffer("lower_rows", rows)
        self.register_buffer("lower_cols", cols)
        self.register_buffer("perm", perm)
        diag = torch.diagonal(upper)
        self.register_buffer("sign", torch.sign(diag))
        self.lower_entries = nn.Parameter(lower[rows, cols].clone())
        self.upper_entries = nn.Parameter(upper[cols, rows].clone())
        self.log_diag = nn.Parameter(torch.log(diag.abs()).clone())

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.dim, dtype=self.log_diag.dtype, device=self.log_diag.device)
        lower = eye.index_put((self.lower_rows, self.lower_cols), self.lower_entries)
        upper = torch.diag(self.sign * torch.exp(self.log_diag)).index_put(
            (self.lower_cols, self.lower_rows), self.upper_entries
        )
        return lower, upper

    def weight(self) -> Tensor:
        """The matrix ``W = P L U``, ``[dim, dim]``."""
        lower, upper = self._factors()
        return self.perm @ lower @ upper

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x = z @ self.weight().T
        return x, self.log_diag.sum().expand(z.shape[0])

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        lower, upper = self._factors()
        # z W^T = x  <=>  (z U^T) L^T = x P, solved as two right-sided triangular systems.
        w = torch.linalg.solve_triangular(lower.T, x @ self.perm, upper=True, left=False, unitriangular=True)
        z = torch.linalg.solve_triangular(upper.T, w, upper=False, left=False)
        return z, (-self.log_diag.sum()).expand(x.shape[0])


class ActNorm(Bijection):
    """Per-dim affine map ``x = z * exp(log_scale) + shift`` with data-dependent initialization.

    Rule: the first call in training mode, in either direction, sets the parameters so that *its
    output* on that batch has zero mean and unit (biased) std per dim. So a first ``inverse(x)``
    (density direction, e.g. training on MD data) standardizes the latent, and a first
    ``forward(z)`` (sampling direction, e.g. reverse-KL training) standardizes the generated batch.
    The buffer ``initialized`` records that this happened, so it survives ``state_dict``
    save/load. The first batch needs at least 2 samples; a dim that is constant on it gets its
    std floored at 1e-6. Must NOT be used on circular dims.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.shift = nn.Parameter(torch.zeros(dim))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _data_init(self, v: Tensor, inverse: bool) -> None:
        if v.shape[0] < 2:
            raise ValueError("ActNorm data initialization needs a batch of at least 2 samples")
        mean = v.mean(0).to(self.shift)
        std = v.std(0, unbiased=False).clamp_min(1e-6).to(self.shift)
        if inverse:
            # z = (x - shift) / scale is standardized when shift = mean, scale = std.
            self.shift.copy_(mean)
            self.log_scale.copy_(torch.log(std))
        else:
            # x = z * scale + shift is standardized when scale = 1/std, shift = -mean/std.
            self.log_scale.copy_(-torch.log(std))
            self.shift.copy_(-mean / std)
        self.initialized.fill_(True)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not bool(self.initialized):
            self._data_init(z, inverse=False)
        x = z * torch.exp(self.log_scale) + self.shift
        return x, self.log_scale.sum().expand(z.shape[0])

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not bool(self.initialized):
            self._data_init(x, inverse=True)
        z = (x - self.shift) * torch.exp(-self.log_scale)
        return z, (-self.log_scale.sum()).expand(x.shape[0])
