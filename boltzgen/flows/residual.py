"""Residual flows: invertible ResNets (i-ResNet) and Residual Flows.

A block maps ``x = z + g(z)`` with a residual branch ``g`` of Lipschitz constant ``L < 1``: the
weights are spectrally normalized (each linear layer's largest singular value, computed exactly, is
capped so that their product is at most ``L``) and the activation, LipSwish ``silu(x) / 1.1``, is
1-Lipschitz. Then (Behrmann et al. 2019):

- **Sampling** (``forward``) is one pass. **The density of an external state** (``inverse``) is the
  fixed point of ``z = x - g(z)``, found by iteration; the error shrinks by ``L`` per iteration,
  and the iteration stops when no coordinate moves by more than ``fixed_point_tol`` (floored at a
  few float epsilons of the dtype). Gradients through the inverse are implicit (the adjoint system
  ``(I + J_g)^T y = v`` is solved by the same iteration), so they cost no unrolled graph.
- **The log-det** ``log det(I + J_g) = sum_k (-1)^(k+1) tr(J_g^k) / k`` is estimated, with
  Hutchinson's trace estimator ``tr(A) = E[v^T A v]`` (Rademacher ``v``) and vector-Jacobian
  products. ``power_series`` (i-ResNet) truncates the series after ``n_terms``: biased, by at most
  ``dim * L^(n+1) / ((n+1)(1-L))``. ``roulette`` (Residual Flows, Chen et al. 2019) computes
  ``exact_terms`` terms and then each further term with probability ``(1-p)^j``, reweighted by its
  inverse, the number of terms drawn once per call: unbiased, with a finite variance when the spectral
  radius ``rho`` of ``J_g`` has ``rho^2 < 1 - p``. ``exact`` builds the Jacobian from ``dim``
  vector-Jacobian products and takes its determinant: exact, for small ``dim``.

An estimated log-det makes ``log q`` differ from call to call, and importance weights carry that
noise (see :mod:`boltzgen.flows.capabilities`). Gradients of the estimate are taken through the
estimator itself (an unbiased gradient for ``roulette``); the memory-saving Neumann gradient series
of Residual Flows is not implemented. Residual blocks mix dimensions, so they cannot transform
circular dims.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from boltzgen.flows.capabilities import Capabilities
from boltzgen.flows.transforms import Bijection

Estimator = Literal["power_series", "roulette", "exact"]
ESTIMATORS = ("power_series", "roulette", "exact")
#: at most this many roulette terms beyond the exact ones (the chance of needing more is (1-p)^64)
MAX_ROULETTE_TERMS = 64


def lipswish(x: Tensor) -> Tensor:
    """LipSwish, ``silu(x) / 1.1``: smooth, with Lipschitz constant below 1."""
    return nn.functional.silu(x) / 1.1


class ContractiveMLP(nn.Module):
    """An MLP ``[batch, dim] -> [batch, dim]`` with Lipschitz constant at most ``lipschitz`` (< 1).

    Each of the ``len(hidden) + 1`` linear layers is scaled by ``1 / max(1, sigma / c)``, ``sigma``
    its largest singular value and ``c = lipschitz^(1 / n_layers)``. With ``zero_last`` the output
    layer starts at zero (the block starts as the identity).
    """

    def __init__(self, dim: int, hidden: Sequence[int], lipschitz: float, zero_last: bool = False) -> None:
        super().__init__()
        if not 0 < lipschitz < 1:
            raise ValueError(f"lipschitz must lie in (0, 1), got {lipschitz}")
        widths = [dim, *hidden, dim]
        self.lipschitz = lipschitz
        self.coefficient = lipschitz ** (1.0 / (len(widths) - 1))
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        if zero_last:
            nn.init.zeros_(self.linears[-1].weight)
            nn.init.zeros_(self.linears[-1].bias)

    def normalized_weights(self) -> list[Tensor]:
        """The spectrally normalized weight of every layer (compute once per pass, reuse in iterations)."""
        weights = []
        for linear in self.linears:
            sigma = torch.linalg.matrix_norm(linear.weight, ord=2)
            weights.append(linear.weight / torch.clamp(sigma / self.coefficient, min=1.0))
        return weights

    def apply(self, v: Tensor, weights: list[Tensor]) -> Tensor:
        for i, (linear, weight) in enumerate(zip(self.linears, weights)):
            v = nn.functional.linear(v, weight, linear.bias)
            if i < len(weights) - 1:
                v = lipswish(v)
        return v


def _vjp(out: Tensor, point: Tensor, vector: Tensor, create_graph: bool) -> Tensor:
    return torch.autograd.grad(out, point, vector, retain_graph=True, create_graph=create_graph)[0]


def exact_log_det(g_out: Tensor, point: Tensor, create_graph: bool) -> Tensor:
    """``log|det(I + dg/dpoint)|`` ``[batch]`` from ``dim`` vector-Jacobian products (``g_out = g(point)``)."""
    batch, dim = point.shape
    rows = []
    for i in range(dim):
        unit = torch.zeros_like(g_out)
        unit[:, i] = 1.0
        rows.append(_vjp(g_out, point, unit, create_graph))
    jacobian = torch.stack(rows, dim=1)
    return torch.linalg.slogdet(torch.eye(dim, dtype=point.dtype, device=point.device) + jacobian).logabsdet


def _hutchinson_series(g_out: Tensor, point: Tensor, n_terms: int, n_samples: int, create_graph: bool,
                       term_weight: Callable[[int], float]) -> Tensor:
    """``sum_{k<=n_terms} term_weight(k) (-1)^(k+1) v^T J^k v / k`` ``[batch]``, averaged over
    ``n_samples`` Rademacher vectors ``v``."""
    total = g_out.new_zeros(g_out.shape[0])
    for _ in range(n_samples):
        v = torch.randint(0, 2, g_out.shape, device=g_out.device).to(g_out.dtype) * 2 - 1
        w = v
        for k in range(1, n_terms + 1):
            w = _vjp(g_out, point, w, create_graph)
            total = total + term_weight(k) * (-1) ** (k + 1) / k * (w * v).sum(-1)
    return total / n_samples


def power_series_log_det(g_out: Tensor, point: Tensor, n_terms: int, n_samples: int, create_graph: bool) -> Tensor:
    """i-ResNet's estimate ``sum_{k<=n_terms} (-1)^(k+1) v^T J^k v / k`` ``[batch]``, averaged over
    ``n_samples`` Rademacher vectors ``v``: the truncated series, estimated without bias."""
    return _hutchinson_series(g_out, point, n_terms, n_samples, create_graph, lambda k: 1.0)


def roulette_log_det(g_out: Tensor, point: Tensor, exact_terms: int, p: float, n_samples: int,
                     create_graph: bool) -> Tensor:
    """Residual Flows' unbiased estimate ``[batch]``: ``exact_terms + G`` terms of the series, ``G``
    geometric with ``P(G >= j) = (1-p)^j`` drawn once per call (shared by the batch, as in Chen et
    al. 2019: the cost is that of the batch's one draw), term ``k`` divided by its chance of being
    included; Hutchinson traces averaged over ``n_samples`` Rademacher vectors per sample."""
    uniform = max(float(torch.rand((), dtype=torch.float64)), 1e-300)
    n_terms = exact_terms + min(int(math.floor(math.log(uniform) / math.log1p(-p))), MAX_ROULETTE_TERMS)
    return _hutchinson_series(g_out, point, n_terms, n_samples, create_graph,
                              lambda k: (1 - p) ** -max(0, k - exact_terms))


class ResidualBlock(Bijection):
    """One residual block ``x = z + g(z)`` of an i-ResNet or a Residual Flow (see the module docstring).

    ``estimator``: ``power_series`` (``n_terms``), ``roulette`` (``exact_terms``, ``roulette_p``) or
    ``exact``; ``hutchinson_samples`` probe vectors per estimate. ``fixed_point_tol`` and
    ``fixed_point_max_iter`` control the inverse. ``last_iterations`` holds the number of iterations
    of the latest inverse (a diagnostic).
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int],
        lipschitz: float = 0.9,
        estimator: Estimator = "roulette",
        n_terms: int = 5,
        exact_terms: int = 2,
        roulette_p: float = 0.5,
        hutchinson_samples: int = 1,
        fixed_point_tol: float = 1e-6,
        fixed_point_max_iter: int = 500,
        identity_init: bool = True,
    ) -> None:
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown log-det estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")
        if not 0 < roulette_p < 1:
            raise ValueError(f"roulette_p must lie in (0, 1), got {roulette_p}")
        self.dim = dim
        self.net = ContractiveMLP(dim, hidden, lipschitz, zero_last=identity_init)
        self.estimator = estimator
        self.n_terms, self.exact_terms, self.roulette_p = n_terms, exact_terms, roulette_p
        self.hutchinson_samples = hutchinson_samples
        self.fixed_point_tol, self.fixed_point_max_iter = fixed_point_tol, fixed_point_max_iter
        self.last_iterations = 0

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        if self.estimator == "exact":
            return Capabilities(sampling="one_pass", density="iterative")
        if self.estimator == "power_series":
            description = f"i-ResNet power series truncated after {self.n_terms} terms, Hutchinson trace (biased)"
        else:
            description = (f"Residual Flows Russian-roulette power series ({self.exact_terms} terms + geometric, "
                           f"p = {self.roulette_p}), Hutchinson trace (unbiased)")
        return Capabilities(sampling="one_pass", density="iterative", log_det="estimated", estimator=description,
                            unbiased=self.estimator == "roulette")

    def _g_and_log_det(self, point: Tensor, weights: list[Tensor]) -> tuple[Tensor, Tensor]:
        """``g(point)`` and the log-det of ``I + dg/dpoint`` ``[batch]`` by the block's estimator.

        Works with gradients disabled too (the vector-Jacobian products need a local graph), and
        then returns detached tensors.
        """
        grad_mode = torch.is_grad_enabled()
        with torch.enable_grad():
            # A view, so that vector-Jacobian products stop here and never run a hook on ``point``.
            p = point.view_as(point) if (grad_mode and point.requires_grad) else point.detach().requires_grad_(True)
            g_out = self.net.apply(p, weights)
            if self.estimator == "exact":
                log_det = exact_log_det(g_out, p, grad_mode)
            elif self.estimator == "power_series":
                log_det = power_series_log_det(g_out, p, self.n_terms, self.hutchinson_samples, grad_mode)
            else:
                log_det = roulette_log_det(g_out, p, self.exact_terms, self.roulette_p, self.hutchinson_samples,
                                           grad_mode)
        if not grad_mode:
            return g_out.detach(), log_det.detach()
        return g_out, log_det

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        g_out, log_det = self._g_and_log_det(z, self.net.normalized_weights())
        return z + g_out, log_det

    def _tolerance(self, x: Tensor) -> float:
        return max(self.fixed_point_tol, 8 * torch.finfo(x.dtype).eps * (1.0 + float(x.detach().abs().max())))

    def _solve(self, x: Tensor, weights: list[Tensor]) -> Tensor:
        """The fixed point of ``z = x - g(z)``, without gradients."""
        tol = self._tolerance(x)
        with torch.no_grad():
            x0 = x.detach()
            detached = [w.detach() for w in weights]
            z = x0
            for i in range(1, self.fixed_point_max_iter + 1):
                z_new = x0 - self.net.apply(z, detached)
                moved = float((z_new - z).abs().max()) if z.numel() else 0.0
                z = z_new
                if moved <= tol:
                    break
        self.last_iterations = i
        return z

    def _implicit(self, x: Tensor, z_star: Tensor, weights: list[Tensor]) -> Tensor:
        """``z = x - g(z*)`` with the gradient of the exact fixed point: a hook multiplies the incoming
        gradient by ``(I + J_g(z*))^-T``, solving the adjoint system by iteration."""
        z = x - self.net.apply(z_star, weights)
        if not z.requires_grad:
            return z
        with torch.enable_grad():
            point = z_star.detach().requires_grad_(True)
            g_point = self.net.apply(point, [w.detach() for w in weights])
        tol = self._tolerance(x)

        def adjoint(grad: Tensor) -> Tensor:
            y = grad
            for _ in range(self.fixed_point_max_iter):
                y_new = grad - torch.autograd.grad(g_point, point, y, retain_graph=True)[0]
                moved = float((y_new - y).abs().max())
                y = y_new
                if moved <= tol * (1.0 + float(grad.abs().max())):
                    break
            return y

        z.register_hook(adjoint)
        return z

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        weights = self.net.normalized_weights()
        z = self._implicit(x, self._solve(x, weights), weights)
        _, log_det = self._g_and_log_det(z, weights)
        return z, -log_det


@contextmanager
def exact_log_dets(flow: nn.Module) -> Iterator[int]:
    """Within the block, every :class:`ResidualBlock` in ``flow`` computes its log-det exactly
    (``dim`` vector-Jacobian products each); yields how many blocks were switched."""
    blocks = [m for m in flow.modules() if isinstance(m, ResidualBlock)]
    saved = [block.estimator for block in blocks]
    for block in blocks:
        block.estimator = "exact"
    try:
        yield len(blocks)
    finally:
        for block, estimator in zip(blocks, saved):
            block.estimator = estimator


@dataclass(frozen=True)
class LogQNoise:
    """How much an estimated log-det moves ``log q``, measured by :func:`measure_log_q_noise`.

    ``std``: root of the mean per-point variance of ``log q`` over repeats; ``std_max``: the largest
    per-point standard deviation; ``bias``: mean of (average estimate - exact ``log q``) over the
    points, with its standard error, or ``None`` where the exact log-det was not computed.
    """

    n_points: int
    n_repeats: int
    std: float
    std_max: float
    bias: float | None
    bias_stderr: float | None


@torch.no_grad()
def measure_log_q_noise(prior: nn.Module, flow: Bijection, n_points: int = 256, n_repeats: int = 8,
                        exact_max_dim: int = 64) -> LogQNoise:
    """Evaluate ``log q`` of ``n_points`` flow samples ``n_repeats`` times each from the same latents
    (the estimator draws new probe vectors each time), and once exactly (:func:`exact_log_dets`) when
    the latent dimension is at most ``exact_max_dim``."""
    z = prior.sample(n_points)
    log_p = prior.log_prob(z).to(torch.float64)
    repeats = torch.stack([log_p - flow(z)[1].to(torch.float64) for _ in range(n_repeats)])
    variance = repeats.var(dim=0, unbiased=True)
    bias = bias_stderr = None
    if z.shape[1] <= exact_max_dim:
        with exact_log_dets(flow):
            exact = log_p - flow(z)[1].to(torch.float64)
        difference = repeats.mean(0) - exact
        bias = float(difference.mean())
        bias_stderr = float(difference.std() / math.sqrt(n_points))
    return LogQNoise(n_points, n_repeats, float(variance.mean().sqrt()), float(variance.max().sqrt()), bias,
                     bias_stderr)
