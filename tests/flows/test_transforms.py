"""Contract tests for every Bijection, plus spline- and layer-specific properties."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from torch import Tensor

from boltzgen.flows.autoregressive import InverseAutoregressive, MaskedAutoregressive
from boltzgen.flows.capabilities import Capabilities, NoInverseError
from boltzgen.flows.nn import MLP, circular_embedding, embedding_dim, set_conditioner_dtype
from boltzgen.flows.planar import PlanarFlow, RadialFlow
from boltzgen.flows.residual import ResidualBlock, exact_log_dets
from boltzgen.flows.sylvester import HouseholderLinear, SylvesterFlow
from boltzgen.flows.transforms import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    Bijection,
    Compose,
    LULinear,
    SplineCoupling,
    rational_quadratic_spline,
)

DIM = 5
HIDDEN = [16, 16]
MASK = torch.tensor([True, False, True, False, True])
NO_CIRC = torch.zeros(DIM, dtype=torch.bool)
ALL_CIRC = torch.ones(DIM, dtype=torch.bool)
MIXED_CIRC = torch.tensor([True, True, False, False, True])


def _perturb(layer: Bijection, scale: float = 0.3) -> Bijection:
    """Moves every parameter away from its (often identity) initial value.

    0.3 gives Jacobian condition numbers of about 5-50 per layer: far from the identity, yet not so
    ill-conditioned that float64 round trips lose more than ~1e-11 (errors scale with the
    condition number, which stronger noise would push past 1e6).
    """
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn_like(p))
    return layer


def _sample_inputs(n: int, circular: Tensor) -> Tensor:
    """Standard normal on ordinary dims, uniform on (-pi, pi) on circular dims."""
    z = torch.randn(n, DIM)
    u = (2 * torch.rand(n, DIM) - 1) * math.pi
    return torch.where(circular, u, z)


class _Swapped(Bijection):
    """A bijection with its two directions exchanged, so that the contract also covers each
    layer's inverse as a sampling direction (gradients of the parameters through it included)."""

    def __init__(self, bijection: Bijection) -> None:
        super().__init__()
        self.bijection = bijection

    @property
    def capabilities(self) -> Capabilities:
        inner = self.bijection.capabilities
        return replace(inner, sampling=inner.density, density=inner.sampling)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.bijection.inverse(z)

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.bijection(x)


def _actnorm_initialized() -> ActNorm:
    layer = ActNorm(DIM)
    with torch.no_grad():
        layer.inverse(torch.randn(64, DIM) * 2 + 1)
    return layer


def _compose_euclidean() -> Bijection:
    layers = Compose(
        [
            ActNorm(DIM),
            AffineCoupling(DIM, MASK, HIDDEN),
            LULinear(DIM),
            SplineCoupling(DIM, ~MASK, HIDDEN, bins=4, tail_bound=3.0),
            AdditiveCoupling(DIM, MASK, HIDDEN),
        ]
    )
    with torch.no_grad():
        layers.inverse(torch.randn(64, DIM))
    return layers


def _compose_circular() -> Bijection:
    return Compose(
        [
            SplineCoupling(DIM, MASK, HIDDEN, bins=5, circular=MIXED_CIRC),
            SplineCoupling(DIM, ~MASK, HIDDEN, bins=5, circular=MIXED_CIRC),
        ]
    )


ORDER = [2, 0, 4, 1, 3]


def _residual(estimator: str = "exact") -> ResidualBlock:
    """A residual block whose inverse converges to float64 round-off."""
    return ResidualBlock(DIM, HIDDEN, lipschitz=0.9, estimator=estimator, fixed_point_tol=1e-13)


def _compose_families() -> Bijection:
    return Compose(
        [
            MaskedAutoregressive(DIM, HIDDEN, "affine", order=ORDER),
            _residual(),
            InverseAutoregressive(DIM, HIDDEN, "spline", order=ORDER[::-1], bins=4, tail_bound=3.0),
            HouseholderLinear(DIM, 2),
        ]
    )


# name -> (builder, circular mask of the inputs)
CONFIGS: dict[str, tuple[Callable[[], Bijection], Tensor]] = {
    "spline_all_circular": (lambda: SplineCoupling(DIM, MASK, HIDDEN, bins=6, circular=ALL_CIRC), ALL_CIRC),
    "spline_mixed_circular": (lambda: SplineCoupling(DIM, MASK, HIDDEN, bins=6, circular=MIXED_CIRC), MIXED_CIRC),
    "spline_noncircular": (lambda: SplineCoupling(DIM, MASK, HIDDEN, bins=6, tail_bound=1.5), NO_CIRC),
    "spline_elementwise": (lambda: SplineCoupling(DIM, ALL_CIRC, HIDDEN, bins=4, circular=MIXED_CIRC), MIXED_CIRC),
    "affine": (lambda: AffineCoupling(DIM, MASK, HIDDEN), NO_CIRC),
    "affine_circular_condition": (lambda: AffineCoupling(DIM, ~MASK, HIDDEN, circular=MASK), MASK),
    "additive": (lambda: AdditiveCoupling(DIM, MASK, HIDDEN, circular=~MASK), ~MASK),
    "lu": (lambda: LULinear(DIM), NO_CIRC),
    "lu_random": (lambda: LULinear(DIM, identity_init=False), NO_CIRC),
    "actnorm": (_actnorm_initialized, NO_CIRC),
    "compose_euclidean": (_compose_euclidean, NO_CIRC),
    "compose_circular": (_compose_circular, MIXED_CIRC),
    "inverse_spline": (lambda: _Swapped(SplineCoupling(DIM, MASK, HIDDEN, circular=MIXED_CIRC)), MIXED_CIRC),
    "inverse_affine": (lambda: _Swapped(AffineCoupling(DIM, MASK, HIDDEN)), NO_CIRC),
    # Autoregressive flows: one direction in one pass, the other in DIM passes.
    "maf_affine": (lambda: MaskedAutoregressive(DIM, HIDDEN, "affine", order=ORDER), NO_CIRC),
    "maf_spline_circular": (lambda: MaskedAutoregressive(DIM, HIDDEN, "spline", order=ORDER, circular=MIXED_CIRC,
                                                         bins=5), MIXED_CIRC),
    "iaf_affine": (lambda: InverseAutoregressive(DIM, HIDDEN, "affine", order=ORDER), NO_CIRC),
    "iaf_spline_circular": (lambda: InverseAutoregressive(DIM, HIDDEN, "spline", order=ORDER, circular=MIXED_CIRC,
                                                          bins=5), MIXED_CIRC),
    "inverse_maf": (lambda: _Swapped(MaskedAutoregressive(DIM, HIDDEN, "spline", order=ORDER, tail_bound=3.0)),
                    NO_CIRC),
    # Residual flows: inverse by fixed-point iteration. Estimated log-dets are checked exactly here
    # (the estimator swapped for the exact determinant) and statistically in tests/flows/test_residual.py.
    "residual_exact": (_residual, NO_CIRC),
    "residual_power_series": (lambda: _residual("power_series"), NO_CIRC),
    "residual_roulette": (lambda: _residual("roulette"), NO_CIRC),
    "inverse_residual": (lambda: _Swapped(_residual()), NO_CIRC),
    # Analytic log-det, no inverse.
    "planar": (lambda: PlanarFlow(DIM), NO_CIRC),
    "radial": (lambda: RadialFlow(DIM), NO_CIRC),
    "sylvester_orthogonal": (lambda: SylvesterFlow(DIM, "orthogonal", m=3), NO_CIRC),
    "sylvester_householder": (lambda: SylvesterFlow(DIM, "householder", reflections=3), NO_CIRC),
    "sylvester_triangular": (lambda: SylvesterFlow(DIM, "triangular", flip=True), NO_CIRC),
    "householder": (lambda: HouseholderLinear(DIM, 3), NO_CIRC),
    "compose_families": (_compose_families, NO_CIRC),
}


def _invertible(layer: Bijection) -> bool:
    return layer.capabilities.data_density and layer.capabilities.sampling != "none"


@pytest.fixture(params=sorted(CONFIGS))
def case(request) -> tuple[Bijection, Tensor, Tensor]:
    """(perturbed layer, latent batch z, a state batch x), all in float64.

    A layer whose log-det is estimated computes it exactly here (every contract below is exact); the
    estimators' expectations are tested statistically in tests/flows/test_residual.py.
    """
    builder, circular = CONFIGS[request.param]
    layer = _perturb(builder())
    with exact_log_dets(layer):
        yield layer, _sample_inputs(16, circular), _sample_inputs(16, circular)


def _single(fn: Callable[[Tensor], tuple[Tensor, Tensor]]) -> Callable[[Tensor], Tensor]:
    return lambda v: fn(v.unsqueeze(0))[0].squeeze(0)


# ----------------------------------------------------------------------------------------------
# Contract suite
# ----------------------------------------------------------------------------------------------


def test_shapes_and_roundtrip(case):
    layer, z, x = case
    if not _invertible(layer):
        x_of_z, ld_f = layer(z)
        assert x_of_z.shape == z.shape and ld_f.shape == (z.shape[0],)
        assert torch.isfinite(x_of_z).all() and torch.isfinite(ld_f).all()
        with pytest.raises(NoInverseError, match="no inverse"):
            layer.inverse(x)
        return
    x_of_z, ld_f = layer(z)
    z_of_x, ld_i = layer.inverse(x)
    assert x_of_z.shape == z.shape and z_of_x.shape == x.shape
    assert ld_f.shape == (z.shape[0],) and ld_i.shape == (x.shape[0],)
    assert torch.isfinite(x_of_z).all() and torch.isfinite(ld_f).all()
    torch.testing.assert_close(layer.inverse(x_of_z)[0], z, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer(z_of_x)[0], x, atol=1e-10, rtol=0)


def _batch_jacobian(fn: Callable[[Tensor], tuple[Tensor, Tensor]], v: Tensor) -> Tensor:
    """Per-sample Jacobians ``[batch, dim_out, dim_in]`` of a map that treats samples independently.

    Row ``i`` for all samples at once is the gradient of ``sum_b out[b, i]``; this is exact because
    ``out[b]`` depends on ``v[b]`` only.
    """
    v = v.detach().clone().requires_grad_(True)
    out = fn(v)[0]
    rows = [torch.autograd.grad(out[:, i].sum(), v, retain_graph=True)[0] for i in range(out.shape[1])]
    return torch.stack(rows, dim=1)


def test_logdet_matches_autograd_jacobian(case):
    layer, z, x = case
    _, ld_f = layer(z)
    jacobian_f = torch.linalg.slogdet(_batch_jacobian(layer.forward, z))
    torch.testing.assert_close(ld_f, jacobian_f.logabsdet, atol=1e-8, rtol=1e-8)
    if not _invertible(layer):
        # Without an inverse, invertibility rests on the layer's constraint: det > 0 everywhere.
        assert (jacobian_f.sign > 0).all()
        wide = _sample_inputs(256, torch.zeros(DIM, dtype=torch.bool)) * 3
        assert (torch.linalg.slogdet(_batch_jacobian(layer.forward, wide)).sign > 0).all()
        return
    _, ld_i = layer.inverse(x)
    expected_i = torch.linalg.slogdet(_batch_jacobian(layer.inverse, x)).logabsdet
    torch.testing.assert_close(ld_i, expected_i, atol=1e-8, rtol=1e-8)
    # Cross-check the batched trick on one sample against torch's own per-sample Jacobian.
    jac0 = torch.autograd.functional.jacobian(_single(layer.forward), z[0])
    torch.testing.assert_close(_batch_jacobian(layer.forward, z)[0], jac0, atol=1e-10, rtol=0)


def test_forward_and_inverse_logdets_cancel(case):
    layer, z, _ = case
    if not _invertible(layer):
        pytest.skip("no inverse: nothing to cancel against (test_shapes_and_roundtrip checks that it refuses)")
    x, ld_f = layer(z)
    _, ld_i = layer.inverse(x)
    torch.testing.assert_close(ld_f + ld_i, torch.zeros_like(ld_f), atol=1e-10, rtol=0)


def test_every_parameter_gets_a_gradient(case):
    layer, z, _ = case
    z.requires_grad_(True)
    x, logdet = layer(z)
    target = torch.randn_like(x)
    loss = ((x - target) ** 2).sum() + (logdet * torch.randn_like(logdet)).sum()
    loss.backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_float32_stays_float32(case):
    layer, z, x = case
    layer32 = copy.deepcopy(layer).to(torch.float32)
    pairs = [(layer32(z.float()), layer(z))]
    if _invertible(layer):
        pairs.append((layer32.inverse(x.float()), layer.inverse(x)))
    for (out, ld), (out64, ld64) in pairs:
        assert out.dtype == ld.dtype == torch.float32
        torch.testing.assert_close(out.double(), out64, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(ld.double(), ld64, atol=1e-3, rtol=1e-3)


# ----------------------------------------------------------------------------------------------
# Identity initialization
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "builder, circular",
    [
        (lambda: SplineCoupling(DIM, MASK, HIDDEN, circular=MIXED_CIRC), MIXED_CIRC),
        (lambda: SplineCoupling(DIM, MASK, HIDDEN, tail_bound=2.0), NO_CIRC),
        (lambda: AffineCoupling(DIM, MASK, HIDDEN), NO_CIRC),
        (lambda: AdditiveCoupling(DIM, MASK, HIDDEN), NO_CIRC),
        (lambda: LULinear(DIM), NO_CIRC),
        (lambda: MaskedAutoregressive(DIM, HIDDEN, "spline", order=ORDER, circular=MIXED_CIRC), MIXED_CIRC),
        (lambda: MaskedAutoregressive(DIM, HIDDEN, "affine", order=ORDER), NO_CIRC),
        (lambda: InverseAutoregressive(DIM, HIDDEN, "spline", order=ORDER, circular=MIXED_CIRC), MIXED_CIRC),
        (lambda: InverseAutoregressive(DIM, HIDDEN, "affine", order=ORDER), NO_CIRC),
        (lambda: ResidualBlock(DIM, HIDDEN, estimator="roulette"), NO_CIRC),
        (lambda: PlanarFlow(DIM), NO_CIRC),
        (lambda: RadialFlow(DIM), NO_CIRC),
        (lambda: SylvesterFlow(DIM, "orthogonal"), NO_CIRC),
        (lambda: SylvesterFlow(DIM, "householder"), NO_CIRC),
        (lambda: SylvesterFlow(DIM, "triangular", flip=True), NO_CIRC),
    ],
)
def test_identity_init_is_exact_identity(builder, circular):
    layer = builder()
    z = _sample_inputs(32, circular)
    x, ld_f = layer(z)
    torch.testing.assert_close(x, z, atol=1e-12, rtol=0)
    assert ld_f.abs().max() < 1e-12
    if _invertible(layer):
        z2, ld_i = layer.inverse(z)
        torch.testing.assert_close(z2, z, atol=1e-12, rtol=0)
        assert ld_i.abs().max() < 1e-12


def test_identity_init_off_is_not_identity():
    layer = SplineCoupling(DIM, MASK, HIDDEN, identity_init=False)
    z = torch.randn(8, DIM)
    assert (layer(z)[0] - z).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# The elementwise spline
# ----------------------------------------------------------------------------------------------


def _random_spline(shape: tuple[int, ...], bins: int) -> tuple[Tensor, Tensor, Tensor]:
    widths = torch.softmax(torch.randn(*shape, bins), -1)
    heights = torch.softmax(torch.randn(*shape, bins), -1)
    derivs = torch.exp(0.5 * torch.randn(*shape, bins + 1))
    return widths, heights, derivs


def test_spline_roundtrip_monotone_and_onto():
    widths, heights, derivs = _random_spline((200,), 7)
    kw = dict(left=-2.0, right=3.0, bottom=-1.0, top=4.0)
    x = torch.linspace(-2.0, 3.0, 200)
    y, ld = rational_quadratic_spline(x, widths, heights, derivs, **kw)
    back, ld_inv = rational_quadratic_spline(y, widths, heights, derivs, inverse=True, **kw)
    torch.testing.assert_close(back, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(ld + ld_inv, torch.zeros_like(ld), atol=1e-10, rtol=0)
    assert y[0] == -1.0 and y[-1] == 4.0
    # One shared spline, evaluated on a grid, must be increasing.
    shared = tuple(t[:1].expand(200, -1) for t in (widths, heights, derivs))
    y_shared, _ = rational_quadratic_spline(x, *shared, **kw)
    assert (y_shared.diff() > 0).all()


def test_spline_slopes_at_knots_equal_given_derivatives():
    widths, heights, derivs = _random_spline((1,), 5)
    knots = -1 + 2 * torch.cat([torch.zeros(1), torch.cumsum(widths[0], 0)])
    # Evaluate just inside each bin's left end so the slope is the knot derivative of that bin.
    x = (knots[:-1] + 1e-11).requires_grad_(True)
    y, ld = rational_quadratic_spline(x, *(t.expand(5, -1) for t in (widths, heights, derivs)))
    # Height/width scale is 1 here because domain and range are both [-1, 1].
    torch.testing.assert_close(torch.exp(ld), derivs[0, :-1], atol=1e-6, rtol=1e-6)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, derivs[0, :-1], atol=1e-6, rtol=1e-6)


def _circular_layer() -> SplineCoupling:
    return _perturb(SplineCoupling(DIM, MASK, HIDDEN, bins=6, circular=ALL_CIRC), scale=0.5)


def test_circular_spline_maps_circle_onto_itself_and_handles_pi():
    layer = _circular_layer()
    cond = _sample_inputs(1, ALL_CIRC)
    grid = torch.linspace(-math.pi, math.pi, 401)
    z = cond.expand(401, -1).clone()
    z[:, MASK] = grid[:, None]
    z.requires_grad_(True)
    x, ld = layer(z)
    out = x[:, MASK]
    assert torch.isfinite(x).all() and torch.isfinite(ld).all()
    assert (out.abs() <= math.pi).all()
    assert (out.diff(dim=0) > 0).all()
    torch.testing.assert_close(out[0], torch.full((3,), -math.pi), atol=1e-12, rtol=0)
    torch.testing.assert_close(out[-1], torch.full((3,), math.pi), atol=1e-12, rtol=0)
    (grad,) = torch.autograd.grad(x.sum() + ld.sum(), z)
    assert torch.isfinite(grad).all()
    # Inverse at exactly +-pi is finite and returns +-pi.
    back, ld_back = layer.inverse(x.detach())
    assert torch.isfinite(back).all() and torch.isfinite(ld_back).all()
    torch.testing.assert_close(back, z.detach(), atol=1e-10, rtol=0)


def test_circular_spline_slope_is_periodic():
    """The slope at -pi equals that at +pi, and the slope is continuous across the wrap."""
    layer = _circular_layer()
    cond = _sample_inputs(1, ALL_CIRC)
    pts = torch.tensor([-math.pi, math.pi, -math.pi + 1e-11, math.pi - 1e-11])
    z = cond.expand(4, -1).clone()
    z[:, MASK] = pts[:, None]
    _, ld = layer(z)
    torch.testing.assert_close(ld[0], ld[1], atol=1e-10, rtol=0)
    # Approaching the wrap from either side gives the same slope (no kink across +-pi).
    torch.testing.assert_close(ld[2], ld[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(ld[3], ld[1], atol=1e-6, rtol=0)
    # Non-trivial: the end slope is not simply 1 after perturbation.
    assert ld[0].abs() > 1e-3


def test_coupling_is_continuous_across_the_wrap_of_a_conditioning_angle():
    layer = _perturb(SplineCoupling(DIM, MASK, HIDDEN, circular=MIXED_CIRC))
    z = _sample_inputs(2, MIXED_CIRC)
    z[0, 1], z[1, 1] = math.pi, -math.pi  # dim 1 is a circular conditioning dim
    z[1, [0, 2, 3, 4]] = z[0, [0, 2, 3, 4]]
    x, ld = layer(z)
    torch.testing.assert_close(x[0, MASK], x[1, MASK], atol=1e-12, rtol=0)
    torch.testing.assert_close(ld[0], ld[1], atol=1e-12, rtol=0)


def test_noncircular_spline_is_identity_in_tails_and_continuous_at_the_bound():
    layer = _perturb(SplineCoupling(DIM, MASK, HIDDEN, tail_bound=2.0), scale=1.0)
    z = torch.randn(6, DIM)
    z[:, MASK] = torch.tensor([-50.0, -2.5, 2.0001, 3.0, 7.0, 1e3])[:, None]
    x, ld = layer(z)
    torch.testing.assert_close(x, z, atol=0, rtol=0)
    assert (ld == 0).all()
    # The spline reaches the bound exactly, so the map is continuous where the tails begin.
    edge = torch.randn(2, DIM)
    edge[0, MASK], edge[1, MASK] = 2.0, -2.0
    torch.testing.assert_close(layer(edge)[0], edge, atol=1e-12, rtol=0)


@pytest.mark.parametrize("circular", [NO_CIRC, MIXED_CIRC, ALL_CIRC])
def test_spline_no_nan_at_extreme_inputs(circular):
    layer = _perturb(SplineCoupling(DIM, MASK, HIDDEN, circular=circular), scale=1.0)
    z = torch.tensor([[1e3] * DIM, [-1e3] * DIM, [0.0] * DIM]).requires_grad_(True)
    for direction in (layer.forward, layer.inverse):
        out, ld = direction(z)
        assert torch.isfinite(out).all() and torch.isfinite(ld).all()
        (grad,) = torch.autograd.grad(out.sum() + ld.sum(), z)
        assert torch.isfinite(grad).all()
        params = torch.autograd.grad(direction(z)[0].sum(), list(layer.parameters()), allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in params)


# ----------------------------------------------------------------------------------------------
# Layer-specific behavior
# ----------------------------------------------------------------------------------------------


def test_actnorm_data_init_from_inverse_standardizes_latent():
    layer = ActNorm(DIM)
    x = torch.randn(500, DIM) * torch.tensor([0.1, 1.0, 2.0, 5.0, 30.0]) + torch.arange(DIM) * 3.0
    z, _ = layer.inverse(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(DIM), atol=1e-10, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(DIM), atol=1e-10, rtol=0)
    assert bool(layer.initialized)
    # A second call must not re-initialize.
    z2, _ = layer.inverse(x * 2)
    torch.testing.assert_close(z2.std(0, unbiased=False), torch.full((DIM,), 2.0), atol=1e-10, rtol=0)


def test_actnorm_data_init_from_forward_standardizes_output_and_survives_reload():
    layer = ActNorm(DIM)
    z = torch.randn(300, DIM) * 4 - 2
    x, _ = layer(z)
    torch.testing.assert_close(x.mean(0), torch.zeros(DIM), atol=1e-10, rtol=0)
    torch.testing.assert_close(x.std(0, unbiased=False), torch.ones(DIM), atol=1e-10, rtol=0)
    fresh = ActNorm(DIM)
    fresh.load_state_dict(layer.state_dict())
    assert bool(fresh.initialized)
    other = torch.randn(10, DIM) * 7
    torch.testing.assert_close(fresh(other)[0], layer(other)[0], atol=0, rtol=0)


def test_actnorm_does_not_initialize_in_eval_mode():
    layer = ActNorm(DIM).eval()
    x = torch.randn(10, DIM) * 5 + 2
    torch.testing.assert_close(layer.inverse(x)[0], x, atol=0, rtol=0)
    assert not bool(layer.initialized)


def test_lu_random_init_is_a_rotation():
    layer = LULinear(DIM, identity_init=False)
    w = layer.weight()
    torch.testing.assert_close(w @ w.T, torch.eye(DIM), atol=1e-10, rtol=0)
    assert (w - torch.eye(DIM)).abs().max() > 1e-2


def test_linear_couplings_reject_circular_transformed_dims():
    with pytest.raises(ValueError):
        AffineCoupling(DIM, MASK, HIDDEN, circular=MASK)
    with pytest.raises(ValueError):
        AdditiveCoupling(DIM, MASK, HIDDEN, circular=ALL_CIRC)
    with pytest.raises(ValueError):
        SplineCoupling(DIM, torch.zeros(DIM, dtype=torch.bool), HIDDEN)


def test_circular_embedding_and_mlp():
    x = torch.tensor([[0.5, math.pi / 2, -1.0, 0.0]])
    mask = torch.tensor([False, True, False, True])
    feats = circular_embedding(x, mask)
    assert feats.shape == (1, embedding_dim(mask)) == (1, 6)
    torch.testing.assert_close(feats, torch.tensor([[0.5, -1.0, 0.0, 1.0, 1.0, 0.0]]), atol=1e-12, rtol=0)
    net = MLP(6, 3, [8], zero_last=True)
    assert (net(feats) == 0).all()
    assert MLP(6, 3, [8])(feats).abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# bfloat16 conditioners
# ----------------------------------------------------------------------------------------------


def test_bfloat16_conditioners_keep_a_coupling_layer_exactly_invertible_with_an_exact_logdet():
    """Under ``set_conditioner_dtype(bfloat16)`` the predicted parameters are rounder (they differ
    from the float32 network's), but forward and inverse compute the same ones, so the layer still
    inverts to float32 precision and its log-det matches the autograd Jacobian."""
    torch.manual_seed(0)
    layer = SplineCoupling(DIM, MASK, HIDDEN, circular=MIXED_CIRC, identity_init=False).float()
    z = _sample_inputs(64, MIXED_CIRC).float()
    x32, _ = layer(z)
    set_conditioner_dtype(layer, torch.bfloat16)
    x, ld = layer(z)
    assert x.dtype == ld.dtype == torch.float32
    assert 1e-6 < float((x - x32).abs().max()) < 0.1
    torch.testing.assert_close(layer.inverse(x)[0], z, atol=2e-5, rtol=0)
    torch.testing.assert_close(ld + layer.inverse(x)[1], torch.zeros_like(ld), atol=2e-5, rtol=0)
    jacobian = torch.linalg.slogdet(_batch_jacobian(layer.forward, z)).logabsdet
    torch.testing.assert_close(ld, jacobian, atol=1e-4, rtol=1e-4)
    set_conditioner_dtype(layer, None)
    torch.testing.assert_close(layer(z)[0], x32, atol=0, rtol=0)
