"""Annealed importance sampling (Neal 2001) from a flow q toward a target g, with HMC transitions
in the flow's latent space.

The target is ``g(x) ∝ exp(-a u(x)) q(x)^b``: ``a = 2, b = -1`` is FAB's ``p^2 / q`` (the
minimum-variance importance distribution for the alpha = 2 divergence), ``a = 1, b = 0`` is p
itself. The intermediate densities are the geometric means ``pi_beta = q^(1-beta) g^beta`` for
evenly spaced ``0 < beta_1 < ... < beta_K < 1``; each transition leaves its ``pi_beta`` invariant.
The log-weight of a chain z_0 ~ q, z_1, ..., z_K is

    log w = sum_{j=0..K} [log pi_{beta_(j+1)}(z_j) - log pi_{beta_j}(z_j)],   beta_0 = 0, beta_(K+1) = 1,

and E[w] = ∫ g (unnormalized), whatever the transitions, as long as each leaves its pi_beta invariant.

Why the latent space: with ``x = f(z)`` and ``q(x) = N(z) / |det df/dz|``, the pull-back of
``q^(1-beta) g^beta`` to z is ``N(z)^(1-beta) (g(f(z)) |det df/dz|)^beta`` (geometric means commute with
the change of variables), so AIS in z gives the same weights for the same chains, and its states map
to x by one forward pass. The latent densities need no inverse pass and are better conditioned
(NeuTra, Hoffman et al. 2019), and for a molecule the flow's last layer (internal coordinates)
keeps every state on the flow's support. With ``lp = log N(z)``, ``ld = log|det df/dz|``, the latent
target is ``log g_z = -a u + b lp + (1 - b) ld``, and

    log pi_beta(z) = (1 - beta + beta b) lp + beta h(z),    h = -a u(f(z)) + (1 - b) ld(z).

Each HMC transition: unit mass, ``leapfrog`` steps, Metropolis correction. A trajectory that meets a
non-finite density or gradient is rejected (a rule symmetric under reversal) and counted; gradients
are clipped elementwise at :data:`MAX_GRAD`, which keeps leapfrog volume-preserving and reversible,
so the Metropolis step stays exact. Chains whose start has a non-finite energy or density have weight
0 from the start, are counted and are not moved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from boltzgen.generator import BoltzmannGenerator
from boltzgen.geometry import wrap_circular

#: Elementwise bound on the latent gradient used by leapfrog (the Metropolis step uses exact densities).
MAX_GRAD = 1e3
_F64 = torch.float64


@dataclass(frozen=True)
class AISResult:
    """The chains of one AIS run.

    ``x``: ``[n, dim]`` final states (detached, the flow's dtype); ``log_w``: ``[n]`` float64 AIS
    log-weights toward g (unnormalized; -inf is weight 0); ``log_q``: ``[n]`` float64 log q(x) of the
    final states under the flow that ran; ``u``: ``[n]`` float64 their reduced energies (kT);
    ``log_w_flow``: ``[n]`` float64 ``-u - log q`` of the starting flow samples (plain importance
    weights toward p, -inf where not finite). ``accept`` and ``step_sizes``: per intermediate
    distribution, the mean Metropolis acceptance probability of its transitions and the step size
    used. ``n_nonfinite``: starts with a non-finite energy or density plus trajectories rejected for
    one. ``distance``: mean latent distance moved by a chain over the whole run.
    """

    x: Tensor
    log_w: Tensor
    log_q: Tensor
    u: Tensor
    log_w_flow: Tensor
    accept: tuple[float, ...]
    step_sizes: tuple[float, ...]
    n_nonfinite: int
    distance: float


@dataclass(frozen=True)
class _Point:
    """A batch of latent states with what the intermediate densities need (float64 except z, grad_h)."""

    z: Tensor
    x: Tensor
    u: Tensor
    lp: Tensor
    ld: Tensor
    h: Tensor
    grad_h: Tensor


class LatentAIS:
    """AIS from ``generator``'s flow toward ``g ∝ exp(-p_power u) q^q_power`` (see the module docstring).

    ``n_intermediate`` distributions (0: plain importance sampling toward g), each with ``hmc_steps``
    HMC transitions of ``n_leapfrog`` leapfrog steps. Step sizes are one per intermediate
    distribution, in latent units, starting at ``step_size``; with ``adapt``, after every run each
    moves by ``log eps += adapt_rate * (acceptance - target_accept)``. Energy evaluations are counted
    by the energy as everywhere else: ``n * (1 + n_intermediate * hmc_steps * n_leapfrog)`` per run.
    """

    def __init__(self, generator: BoltzmannGenerator, n_intermediate: int = 2, n_leapfrog: int = 5,
                 hmc_steps: int = 1, step_size: float = 0.1, adapt: bool = True, target_accept: float = 0.65,
                 adapt_rate: float = 0.5, p_power: float = 2.0, q_power: float = -1.0) -> None:
        if n_intermediate < 0 or n_leapfrog < 1 or hmc_steps < 1 or step_size <= 0:
            raise ValueError("need n_intermediate >= 0, n_leapfrog >= 1, hmc_steps >= 1 and step_size > 0")
        self.generator = generator
        self.n_intermediate = n_intermediate
        self.n_leapfrog = n_leapfrog
        self.hmc_steps = hmc_steps
        self.adapt = adapt
        self.target_accept = target_accept
        self.adapt_rate = adapt_rate
        self.a, self.b = float(p_power), float(q_power)
        self.betas = torch.linspace(0.0, 1.0, n_intermediate + 2, dtype=_F64).tolist()
        self.log_step = torch.full((n_intermediate,), math.log(step_size), dtype=_F64)

    def state_dict(self) -> dict[str, Tensor]:
        return {"log_step": self.log_step.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state["log_step"].shape != self.log_step.shape:
            raise ValueError(f"AIS state has {state['log_step'].numel()} step sizes, this AIS {self.n_intermediate}")
        self.log_step = state["log_step"].clone().to(_F64)

    @property
    def step_sizes(self) -> list[float]:
        return torch.exp(self.log_step).tolist()

    # --- densities ------------------------------------------------------------------------------

    def _evaluate(self, z: Tensor) -> _Point:
        """Flow, energy, and ``h`` with its latent gradient at ``z`` ``[n, latent_dim]``."""
        gen = self.generator
        zr = z.detach().requires_grad_(True)
        with torch.enable_grad():
            x, ld = gen.flow(zr)
            u = gen.energy(x)
            h = -self.a * u + (1.0 - self.b) * ld.to(_F64)
            (grad,) = torch.autograd.grad(h.sum(), zr, allow_unused=True)
        grad = torch.zeros_like(zr) if grad is None else grad
        lp = gen.prior.log_prob(z.detach()).to(_F64)
        return _Point(z.detach(), x.detach(), u.detach(), lp, ld.detach().to(_F64), h.detach(), grad.detach())

    def _log_pi(self, point: _Point, beta: float) -> Tensor:
        return (1.0 - beta + beta * self.b) * point.lp + beta * point.h

    def _grad_log_pi(self, point: _Point, beta: float) -> Tensor:
        """Latent gradient of log pi_beta; the prior's is -z on Gaussian dimensions and 0 on circular ones."""
        circular = self.generator.prior.circular
        grad_lp = torch.where(circular, torch.zeros_like(point.z), -point.z)
        return (1.0 - beta + beta * self.b) * grad_lp + beta * point.grad_h

    def _wrap(self, z: Tensor) -> Tensor:
        return wrap_circular(z, self.generator.prior.circular)

    # --- the run --------------------------------------------------------------------------------

    def _hmc(self, point: _Point, beta: float, eps: float, frozen: Tensor) -> tuple[_Point, Tensor, Tensor]:
        """One HMC transition leaving pi_beta invariant; returns the new point, the per-chain
        acceptance probability ``[n]`` float64 and which trajectories met a non-finite value."""
        p0 = torch.randn_like(point.z)
        grad = _safe_grad(self._grad_log_pi(point, beta), frozen)
        p = p0 + 0.5 * eps * grad
        z = point.z
        bad = torch.zeros_like(frozen)
        for i in range(self.n_leapfrog):
            z = self._wrap(z + eps * p)
            new = self._evaluate(z)
            raw = self._grad_log_pi(new, beta)
            bad = bad | ~torch.isfinite(self._log_pi(new, beta)) | ~torch.isfinite(raw).all(-1)
            grad = _safe_grad(raw, bad | frozen)
            p = p + (eps if i < self.n_leapfrog - 1 else 0.5 * eps) * grad
        kinetic0 = 0.5 * (p0.to(_F64) ** 2).sum(-1)
        kinetic1 = 0.5 * (p.to(_F64) ** 2).sum(-1)
        log_alpha = (self._log_pi(new, beta) - kinetic1) - (self._log_pi(point, beta) - kinetic0)
        log_alpha = torch.where(bad | frozen | torch.isnan(log_alpha), torch.full_like(log_alpha, -math.inf), log_alpha)
        accept = torch.log(torch.rand(log_alpha.shape, dtype=_F64, device=log_alpha.device)) < log_alpha
        merged = _Point(*(torch.where(accept.view(-1, *([1] * (a.ndim - 1))), a, b.to(a))
                          for a, b in zip(vars(new).values(), vars(point).values())))
        return merged, torch.exp(torch.clamp(log_alpha, max=0.0)), bad & ~frozen

    @torch.no_grad()
    def run(self, n: int) -> AISResult:
        """``n`` chains from the flow to g; see :class:`AISResult`. The step sizes adapt afterwards if ``adapt``."""
        gen = self.generator
        z0 = gen.prior.sample(n)
        point = self._evaluate(z0)
        log_q0 = point.lp - point.ld
        frozen = ~(torch.isfinite(point.u) & torch.isfinite(log_q0) & torch.isfinite(point.h))
        n_nonfinite = int(frozen.sum())
        log_w_flow = torch.where(frozen, torch.full_like(log_q0, -math.inf), -point.u - log_q0)
        log_w = self._log_pi(point, self.betas[1]) - point.lp
        accept, used = [], self.step_sizes
        for j in range(1, self.n_intermediate + 1):
            beta, probs = self.betas[j], []
            for _ in range(self.hmc_steps):
                point, prob, bad = self._hmc(point, beta, used[j - 1], frozen)
                n_nonfinite += int(bad.sum())
                probs.append(prob[~frozen])
            live = torch.cat(probs)
            accept.append(float(live.mean()) if live.numel() else math.nan)
            log_w = log_w + self._log_pi(point, self.betas[j + 1]) - self._log_pi(point, beta)
        log_w = torch.where(frozen | torch.isnan(log_w), torch.full_like(log_w, -math.inf), log_w)
        if self.adapt:
            for j, prob in enumerate(accept):
                if math.isfinite(prob):
                    self.log_step[j] += self.adapt_rate * (prob - self.target_accept)
        distance = float((self._wrap(point.z - z0)).to(_F64).norm(dim=-1)[~frozen].mean()) if n > n_nonfinite else 0.0
        return AISResult(x=point.x, log_w=log_w, log_q=point.lp - point.ld, u=point.u, log_w_flow=log_w_flow,
                         accept=tuple(accept), step_sizes=tuple(used), n_nonfinite=n_nonfinite, distance=distance)


def _safe_grad(grad: Tensor, bad: Tensor) -> Tensor:
    """The leapfrog drift: the gradient clipped at :data:`MAX_GRAD`, and 0 on ``bad`` chains or
    non-finite rows (those trajectories are rejected anyway; 0 keeps their positions finite)."""
    usable = torch.isfinite(grad).all(-1, keepdim=True) & ~bad.unsqueeze(-1)
    return torch.where(usable, torch.clamp(grad, min=-MAX_GRAD, max=MAX_GRAD), torch.zeros_like(grad))
