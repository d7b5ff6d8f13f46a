"""Markov moves on a batch of chains, each leaving ``exp(-u(x))`` invariant chain by chain.

- :class:`IndependenceMetropolis` proposes a fresh flow sample and accepts it with the importance
  weight ratio (Gabrié, Rotskoff & Vanden-Eijnden, PNAS 2022).
- :class:`LatentHMC` and :class:`LatentMALA` run gradient-based MCMC on the pull-back of the
  target to the latent space, ``log pi(z) = -u(flow(z)) + log|det dflow/dz|`` (NeuTra, Hoffman et
  al. 2019). Circular latent dimensions (``generator.prior.circular``) are wrapped into [-pi, pi).
- :class:`CartesianMALA` is a local Metropolis-adjusted Langevin move in configuration space.
- :class:`Cycle` combines moves, e.g. global flow jumps with local moves.

A move advances a :class:`ChainState`; adaptive moves tune one global step size with a
:class:`StepSizeAdapter` during warm-up only. :mod:`boltzgen.mcmc` starts and drives the chains.

Writing a new move (for instance short OpenMM Langevin segments as a local move): subclass
:class:`Move`, implement ``step(state) -> state`` for the whole batch of chains, count proposals
with :meth:`Move._record`, and return a state built with :meth:`ChainState.with_x` whenever ``x``
changed, so that the cached latent quantities are dropped and recomputed lazily by the next latent
move. Such a move must leave ``exp(-u)`` invariant for the chains to stay unbiased: a Langevin
segment without a Metropolis correction carries a time-step bias.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from boltzgen.energies.base import Energy
from boltzgen.generator import BoltzmannGenerator
from boltzgen.geometry import wrap_angle, wrap_circular

TARGET_ACCEPT_HMC = 0.65
TARGET_ACCEPT_MALA = 0.57

_F64 = torch.float64


# --------------------------------------------------------------------------------------------------
# Chain state
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainState:
    """The current point of every chain, with optional cached quantities.

    ``x`` (``[n_chains, dim]``) and ``u`` (``[n_chains]`` float64, reduced energy in kT) are the
    source of truth. The other fields are caches, ``None`` when unknown, and valid for every chain
    when present:

    - ``z``: ``[n_chains, latent_dim]`` latent with ``flow(z) = x``;
    - ``log_q``: ``[n_chains]`` float64, log density of the flow at ``x``;
    - ``log_pi_z``: ``[n_chains]`` float64, latent pull-back log density ``-u + log|det dx/dz|``;
    - ``grad_z``: ``[n_chains, latent_dim]``, gradient of ``log_pi_z`` with respect to ``z``;
    - ``force``: ``[n_chains, dim]`` float64, ``-du/dx`` in kT per unit of ``x``.
    """

    x: Tensor
    u: Tensor
    z: Tensor | None = None
    log_q: Tensor | None = None
    log_pi_z: Tensor | None = None
    grad_z: Tensor | None = None
    force: Tensor | None = None

    @property
    def n_chains(self) -> int:
        """Number of chains (the batch size)."""
        return self.x.shape[0]

    def with_x(self, x: Tensor, u: Tensor, force: Tensor | None = None) -> ChainState:
        """A state at new positions ``x`` with energies ``u``; every latent cache is dropped."""
        return ChainState(x=x, u=u, force=force)


def _merge(accept: Tensor, new: ChainState, old: ChainState) -> ChainState:
    """Per-chain choice between ``new`` (where ``accept``) and ``old``; a cache survives only if both have it."""
    if bool(accept.all()):
        return new
    if not bool(accept.any()):
        return old
    merged: dict[str, Tensor | None] = {}
    for f in fields(ChainState):
        a, b = getattr(new, f.name), getattr(old, f.name)
        if a is None or b is None:
            merged[f.name] = None
        else:
            mask = accept.view(-1, *([1] * (a.ndim - 1)))
            merged[f.name] = torch.where(mask, a, b.to(a))
    return ChainState(**merged)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _log_gaussian_kernel(d: Tensor, sigma: float, circular: Tensor | None) -> Tensor:
    """Log of an isotropic Gaussian kernel at displacement ``d`` (``[batch, dim]``), up to a constant.

    On circular dimensions the kernel is the wrapped normal (sum over periodic images), which is the
    exact density of a Gaussian step followed by wrapping. Returns ``[batch]`` float64.
    """
    d = d.to(_F64)
    linear = -0.5 * d**2 / sigma**2
    if circular is None or not bool(circular.any()):
        return linear.sum(-1)
    n_images = math.ceil(8 * sigma / (2 * math.pi)) + 1
    shifts = 2 * math.pi * torch.arange(-n_images, n_images + 1, dtype=_F64, device=d.device)
    wrapped = wrap_angle(d[:, circular])
    # Relative to the nearest image (the largest term, as |wrapped| <= pi), so the sum is >= 1 and
    # needs no max-subtraction.
    excess = (2 * wrapped.unsqueeze(-1) * shifts + shifts**2) / (2 * sigma**2)
    periodic = -0.5 * wrapped**2 / sigma**2 + torch.log(torch.exp(-excess).sum(-1))
    return linear[:, ~circular].sum(-1) + periodic.sum(-1)


def _flow_dtype(generator: BoltzmannGenerator) -> torch.dtype:
    """The floating dtype the flow computes in (its first floating parameter or buffer, else the prior's)."""
    for tensor in (*generator.flow.parameters(), *generator.flow.buffers(), *generator.prior.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def _accept(log_alpha: Tensor) -> Tensor:
    """Metropolis decision per chain: ``log U < log alpha``; NaN never accepts."""
    log_uniform = torch.log(torch.rand(log_alpha.shape, dtype=_F64, device=log_alpha.device))
    return log_uniform < log_alpha


def _accept_prob(log_alpha: Tensor) -> float:
    """Mean over chains of ``min(1, alpha)``, with non-finite or NaN ratios counted as 0."""
    prob = torch.exp(torch.clamp(log_alpha, max=0.0))
    return float(torch.nan_to_num(prob, nan=0.0).mean())


def _energy_and_force(energy: Energy, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(u [batch] float64, force [batch, dim] float64)`` with one energy evaluation when possible."""
    if type(energy).force is not Energy.force:
        # A subclass with its own force (e.g. from OpenMM) is trusted over autograd.
        return energy(x), energy.force(x).to(_F64)
    xr = x.detach().to(_F64).requires_grad_(True)
    with torch.enable_grad():
        u = energy(xr)
        if not u.requires_grad:
            return u.detach(), torch.zeros_like(xr)
        (grad,) = torch.autograd.grad(u.sum(), xr, allow_unused=True)
    force = torch.zeros_like(xr) if grad is None else -grad
    return u.detach(), force.detach()


class StepSizeAdapter:
    """Robbins-Monro adaptation of a log step size toward a target acceptance probability.

    ``log eps <- log eps + gain * (t + 1)^(-decay) * (accept_prob - target)``, where ``accept_prob``
    is the mean Metropolis acceptance probability over all chains in one step, so one global step
    size is tuned per move. Because that mean over many chains is nearly noise-free, this plain
    stochastic approximation settles quickly, where dual averaging (tuned for one noisy chain)
    overshoots. The frozen value is the geometric mean of the step sizes of the second half of
    warm-up (Polyak averaging), which damps the remaining oscillation.
    """

    def __init__(self, target: float, gain: float = 2.0, decay: float = 0.6) -> None:
        if not 0.0 < target < 1.0:
            raise ValueError(f"target acceptance must lie in (0, 1), got {target}")
        self.target = target
        self.gain = gain
        self.decay = decay
        self.start(1.0)

    def start(self, step_size: float) -> None:
        """Restart the adaptation from ``step_size``."""
        self.t = 0
        self.log_step = math.log(step_size)
        self.history: list[float] = []

    def update(self, accept_prob: float) -> float:
        """Take one adaptation step; returns the step size to use next."""
        self.log_step += self.gain * (self.t + 1) ** (-self.decay) * (accept_prob - self.target)
        self.t += 1
        self.history.append(self.log_step)
        return math.exp(self.log_step)

    def final(self) -> float:
        """The step size to freeze after warm-up."""
        if not self.history:
            return math.exp(self.log_step)
        tail = self.history[len(self.history) // 2 :]
        return math.exp(sum(tail) / len(tail))


# --------------------------------------------------------------------------------------------------
# Moves
# --------------------------------------------------------------------------------------------------


class Move(ABC):
    """One Markov transition applied to all chains at once.

    Contract: ``step`` takes a :class:`ChainState` of ``n_chains`` chains and returns the next one,
    leaving ``exp(-u)`` invariant chain by chain. A move counts its proposals (``n_proposed``,
    ``n_accepted``, ``n_nonfinite``, cumulative over its lifetime, one per chain per proposal) through
    :meth:`_record`. :meth:`begin_warmup` / :meth:`end_warmup` bracket the warm-up: only inside it may
    a move adapt its parameters. Composite moves override :meth:`leaves` and forward the warm-up
    calls to their children.
    """

    name: str = "move"

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            self.name = name
        self.n_proposed = 0
        self.n_accepted = 0
        self.n_nonfinite = 0

    @abstractmethod
    def step(self, state: ChainState) -> ChainState:
        """Advance every chain by one transition."""

    def begin_warmup(self) -> None:
        """Start adapting tunable parameters (no-op by default)."""

    def end_warmup(self) -> None:
        """Freeze tunable parameters (no-op by default)."""

    @property
    def step_size(self) -> float | None:
        """The current step size, or ``None`` for moves without one."""
        return None

    def leaves(self) -> list[Move]:
        """The elementary moves inside this one (itself for an elementary move)."""
        return [self]

    def energies(self) -> list[Energy]:
        """The energies this move evaluates (for counting evaluations)."""
        return []

    def _record(self, accepted: Tensor, nonfinite: Tensor) -> None:
        """Count one proposal per chain; ``accepted`` and ``nonfinite`` are ``[n_chains]`` bools."""
        self.n_proposed += accepted.numel()
        self.n_accepted += int(accepted.sum())
        self.n_nonfinite += int(nonfinite.sum())


class _AdaptiveMove(Move):
    """A move with one global step size, tuned by :class:`StepSizeAdapter` during warm-up only."""

    def __init__(self, step_size: float, target_accept: float, adapt: bool, name: str | None) -> None:
        super().__init__(name)
        if step_size <= 0:
            raise ValueError(f"step_size must be positive, got {step_size}")
        self._step_size = float(step_size)
        self.adapt = adapt
        self._adapter = StepSizeAdapter(target_accept)
        self._adapting = False

    @property
    def step_size(self) -> float:
        return self._step_size

    def begin_warmup(self) -> None:
        if self.adapt:
            self._adapter.start(self._step_size)
            self._adapting = True

    def end_warmup(self) -> None:
        if self._adapting:
            self._step_size = self._adapter.final()
            self._adapting = False

    def _adapt(self, log_alpha: Tensor) -> None:
        if self._adapting:
            self._step_size = self._adapter.update(_accept_prob(log_alpha))


class IndependenceMetropolis(Move):
    """Independence Metropolis-Hastings with the flow as proposal.

    Accepts ``x' ~ q`` with probability ``min(1, w(x') / w(x))``, ``log w = -u - log q``. A proposal
    with a non-finite energy or log density is rejected and counted.
    """

    name = "imh"

    def __init__(self, generator: BoltzmannGenerator, name: str | None = None) -> None:
        super().__init__(name)
        self.generator = generator

    def energies(self) -> list[Energy]:
        return [self.generator.energy]

    def _with_log_q(self, state: ChainState) -> ChainState:
        if state.log_q is not None:
            return state
        gen = self.generator
        z, logdet = gen.flow.inverse(state.x.to(_flow_dtype(gen)))
        z = wrap_circular(z, gen.prior.circular)
        log_q = (gen.prior.log_prob(z) + logdet).to(_F64)
        return ChainState(x=state.x, u=state.u, z=z, log_q=log_q, force=state.force)

    def step(self, state: ChainState) -> ChainState:
        current = self._with_log_q(state)
        x, z, log_q = self.generator.sample_with_log_q(current.n_chains)
        x, log_q = x.detach().to(current.x), log_q.detach().to(_F64)
        u = self.generator.energy(x)
        valid = torch.isfinite(u) & torch.isfinite(log_q)
        log_alpha = (-u - log_q) - (-current.u - current.log_q)
        log_alpha = torch.where(valid, log_alpha, torch.full_like(log_alpha, -math.inf))
        accept = _accept(log_alpha) & valid
        self._record(accept, ~valid)
        proposal = ChainState(x=x, u=u, z=z.detach(), log_q=log_q)
        return _merge(accept, proposal, current)


class _LatentMove(_AdaptiveMove):
    """Shared machinery for gradient-based moves on the latent pull-back density."""

    def __init__(
        self, generator: BoltzmannGenerator, step_size: float, target_accept: float, adapt: bool, name: str | None
    ) -> None:
        super().__init__(step_size, target_accept, adapt, name)
        self.generator = generator

    def energies(self) -> list[Energy]:
        return [self.generator.energy]

    @property
    def _circular(self) -> Tensor | None:
        circular = getattr(self.generator.prior, "circular", None)
        return circular if circular is not None and bool(circular.any()) else None

    def _evaluate(self, z: Tensor) -> ChainState:
        """Flow, energy and the gradient of ``log pi(z)`` at ``z`` (``[n_chains, latent_dim]``)."""
        gen = self.generator
        zr = z.detach().requires_grad_(True)
        with torch.enable_grad():
            x, logdet = gen.flow(zr)
            u = gen.energy(x)
            log_pi = -u + logdet.to(_F64)
            grad = None
            if log_pi.requires_grad:
                (grad,) = torch.autograd.grad(log_pi.sum(), zr, allow_unused=True)
        grad = torch.zeros_like(zr) if grad is None else grad
        log_q = (gen.prior.log_prob(zr.detach()) - logdet.detach()).to(_F64)
        return ChainState(
            x=x.detach(), u=u.detach(), z=zr.detach(), log_q=log_q, log_pi_z=log_pi.detach(), grad_z=grad.detach()
        )

    def _prepare(self, state: ChainState) -> ChainState:
        """Fill in ``z`` (by ``flow.inverse`` if unknown), ``log_pi_z`` and ``grad_z``."""
        if state.z is not None and state.log_pi_z is not None and state.grad_z is not None:
            return state
        z = state.z
        if z is None:
            z, _ = self.generator.flow.inverse(state.x.to(_flow_dtype(self.generator)))
            z = wrap_circular(z, self._circular)
        prepared = self._evaluate(z)
        return ChainState(
            x=prepared.x.to(state.x),
            u=prepared.u,
            z=prepared.z,
            log_q=prepared.log_q,
            log_pi_z=prepared.log_pi_z,
            grad_z=prepared.grad_z,
        )

    def _accept_or_keep(
        self, current: ChainState, proposal: ChainState, grad: Tensor, log_alpha: Tensor, stuck: Tensor, bad: Tensor
    ) -> ChainState:
        """The Metropolis step shared by the latent moves: a ``stuck`` start (zero density) takes any
        valid proposal, a ``bad`` proposal (non-finite density) is rejected and counted; the step
        size adapts (in warm-up) and the accepted chains move, carrying their drift ``grad``."""
        log_alpha = torch.where(stuck, torch.full_like(log_alpha, math.inf), log_alpha)
        log_alpha = torch.where(bad, torch.full_like(log_alpha, -math.inf), log_alpha)
        accept = _accept(log_alpha) & ~bad
        self._record(accept, bad)
        self._adapt(log_alpha)
        moved = ChainState(
            x=proposal.x.to(current.x), u=proposal.u, z=proposal.z, log_q=proposal.log_q,
            log_pi_z=proposal.log_pi_z, grad_z=grad,
        )
        return _merge(accept, moved, current)

    @staticmethod
    def _bad(state: ChainState) -> Tensor:
        """Chains whose latent log density is not finite, ``[n_chains]`` bool."""
        return ~torch.isfinite(state.log_pi_z)

    @staticmethod
    def _safe_grad(grad: Tensor, bad: Tensor) -> Tensor:
        """The drift: the gradient where it is finite, else 0.

        A non-finite gradient at a point of finite density would otherwise freeze that chain
        forever. Zero there is a fixed function of the position, so the proposal stays a valid
        Metropolis-Hastings proposal (and leapfrog stays reversible and volume-preserving). Chains
        already ``bad`` get 0 too, which keeps their positions finite; they are rejected anyway.
        """
        usable = torch.isfinite(grad).all(-1, keepdim=True) & ~bad.unsqueeze(-1)
        return torch.where(usable, grad, torch.zeros_like(grad))


class LatentHMC(_LatentMove):
    """Hamiltonian Monte Carlo on the latent pull-back ``log pi(z) = -u(flow(z)) + log|det dflow/dz|``.

    Leapfrog with unit mass, ``n_leapfrog`` steps of size ``step_size`` (latent units). A trajectory
    that meets a non-finite log density or gradient anywhere is rejected (a criterion symmetric
    under time reversal, so detailed balance holds) and counted as non-finite. ``step_size`` is
    tuned toward ``target_accept`` during warm-up if ``adapt``.
    """

    name = "latent_hmc"

    def __init__(
        self,
        generator: BoltzmannGenerator,
        step_size: float = 0.1,
        n_leapfrog: int = 10,
        target_accept: float = TARGET_ACCEPT_HMC,
        adapt: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__(generator, step_size, target_accept, adapt, name)
        if n_leapfrog < 1:
            raise ValueError(f"n_leapfrog must be at least 1, got {n_leapfrog}")
        self.n_leapfrog = n_leapfrog

    def step(self, state: ChainState) -> ChainState:
        current = self._prepare(state)
        eps, circular = self._step_size, self._circular
        p = torch.randn_like(current.z)
        kinetic0 = 0.5 * (p.to(_F64) ** 2).sum(-1)
        stuck = self._bad(current)  # only a start can have zero density: any valid endpoint is taken
        bad = torch.zeros_like(stuck)
        grad = self._safe_grad(current.grad_z, bad)
        z = current.z
        p = p + 0.5 * eps * grad
        for i in range(self.n_leapfrog):
            z = wrap_circular(z + eps * p, circular)
            proposal = self._evaluate(z)
            bad = bad | self._bad(proposal)
            grad = self._safe_grad(proposal.grad_z, bad)
            p = p + (eps if i < self.n_leapfrog - 1 else 0.5 * eps) * grad
        kinetic1 = 0.5 * (p.to(_F64) ** 2).sum(-1)
        log_alpha = (proposal.log_pi_z - kinetic1) - (current.log_pi_z - kinetic0)
        return self._accept_or_keep(current, proposal, grad, log_alpha, stuck, bad)


def _mala_log_alpha(
    log_pi0: Tensor, grad0: Tensor, pos0: Tensor, log_pi1: Tensor, grad1: Tensor, pos1: Tensor, eps: float,
    circular: Tensor | None,
) -> Tensor:
    """MALA log acceptance ratio for the proposal ``pos1 ~ N(pos0 + eps^2/2 grad0, eps^2)``; ``[batch]`` float64."""
    half = 0.5 * eps**2
    forward = _log_gaussian_kernel(pos1.to(_F64) - pos0.to(_F64) - half * grad0.to(_F64), eps, circular)
    backward = _log_gaussian_kernel(pos0.to(_F64) - pos1.to(_F64) - half * grad1.to(_F64), eps, circular)
    return log_pi1 - log_pi0 + backward - forward


class LatentMALA(_LatentMove):
    """Metropolis-adjusted Langevin on the latent pull-back density.

    Proposal ``z' = z + (eps^2 / 2) grad log pi(z) + eps xi`` with ``eps = step_size``; circular
    dimensions are wrapped and their proposal density is the wrapped normal. Non-finite proposals
    are rejected and counted. ``step_size`` is tuned toward ``target_accept`` during warm-up if
    ``adapt``.
    """

    name = "latent_mala"

    def __init__(
        self,
        generator: BoltzmannGenerator,
        step_size: float = 0.1,
        target_accept: float = TARGET_ACCEPT_MALA,
        adapt: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__(generator, step_size, target_accept, adapt, name)

    def step(self, state: ChainState) -> ChainState:
        current = self._prepare(state)
        eps, circular = self._step_size, self._circular
        stuck = self._bad(current)  # only a start can have zero density: any valid proposal is taken
        grad0 = self._safe_grad(current.grad_z, torch.zeros_like(stuck))
        z = current.z + 0.5 * eps**2 * grad0 + eps * torch.randn_like(current.z)
        proposal = self._evaluate(wrap_circular(z, circular))
        bad = self._bad(proposal)
        grad1 = self._safe_grad(proposal.grad_z, bad)
        log_alpha = _mala_log_alpha(
            current.log_pi_z, grad0, current.z, proposal.log_pi_z, grad1, proposal.z, eps, circular
        )
        return self._accept_or_keep(current, proposal, grad1, log_alpha, stuck, bad)


class CartesianMALA(_AdaptiveMove):
    """Local Metropolis-adjusted Langevin move in configuration space.

    Proposal ``x' = x + (eps^2 / 2) F(x) + eps xi`` with ``F = energy.force`` (kT per unit of x) and
    ``eps = step_size`` in units of ``x`` (nm for molecules). Non-finite energies or forces at the
    proposal mean rejection, counted. ``step_size`` is tuned toward ``target_accept`` during
    warm-up if ``adapt``.
    """

    name = "cartesian_mala"

    def __init__(
        self,
        energy: Energy,
        step_size: float = 0.01,
        target_accept: float = TARGET_ACCEPT_MALA,
        adapt: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__(step_size, target_accept, adapt, name)
        self.energy = energy

    def energies(self) -> list[Energy]:
        return [self.energy]

    def step(self, state: ChainState) -> ChainState:
        current = state
        if current.force is None:
            u0, f0 = _energy_and_force(self.energy, current.x)
            current = replace(current, u=u0, force=f0)
        eps = self._step_size
        bad0 = ~torch.isfinite(current.force).all(-1)
        f0 = torch.where(bad0.unsqueeze(-1), torch.zeros_like(current.force), current.force)
        x1 = current.x + (0.5 * eps**2 * f0).to(current.x) + eps * torch.randn_like(current.x)
        u1, f1 = _energy_and_force(self.energy, x1)
        bad = bad0 | ~(torch.isfinite(u1) & torch.isfinite(f1).all(-1))
        f1 = torch.where(bad.unsqueeze(-1), torch.zeros_like(f1), f1)
        log_alpha = _mala_log_alpha(-current.u, f0, current.x, -u1, f1, x1, eps, None)
        log_alpha = torch.where(bad, torch.full_like(log_alpha, -math.inf), log_alpha)
        accept = _accept(log_alpha) & ~bad
        self._record(accept, bad)
        self._adapt(log_alpha)
        return _merge(accept, current.with_x(x1, u1, force=f1), current)


class Cycle(Move):
    """Applies its moves one after the other in each step (e.g. a flow jump, then local moves)."""

    name = "cycle"

    def __init__(self, moves: Sequence[Move], name: str | None = None) -> None:
        super().__init__(name)
        if not moves:
            raise ValueError("Cycle needs at least one move")
        self.moves = list(moves)

    def step(self, state: ChainState) -> ChainState:
        for move in self.moves:
            state = move.step(state)
        return state

    def begin_warmup(self) -> None:
        for move in self.moves:
            move.begin_warmup()

    def end_warmup(self) -> None:
        for move in self.moves:
            move.end_warmup()

    def leaves(self) -> list[Move]:
        return [leaf for move in self.moves for leaf in move.leaves()]

    def energies(self) -> list[Energy]:
        return [energy for move in self.moves for energy in move.energies()]
