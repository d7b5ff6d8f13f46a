"""Flow-preconditioned MCMC: chains started near equilibrium and run with :mod:`boltzgen.moves`.

Chains start from flow samples by sampling-importance-resampling (:func:`resample_starts`,
:func:`initial_state`). :func:`run_chains` drives a move for a warm-up (step-size adaptation only
there) and a production phase and returns an :class:`MCMCResult`; every chain is an independent
Markov chain that leaves ``exp(-u(x))`` invariant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from boltzgen.generator import BoltzmannGenerator
from boltzgen.moves import ChainState, Cycle, Move


@dataclass(frozen=True)
class MCMCResult:
    """Output of :func:`run_chains`.

    ``x``: ``[n_steps_kept, n_chains, dim]`` production states (after thinning), in the dtype of the
    chain states; ``u``: ``[n_steps_kept, n_chains]`` float64 reduced energies;
    ``acceptance_rate``: per leaf move, accepted / proposed over the production phase (NaN if the
    move never ran there); ``step_sizes``: final (frozen) step size per adaptive move;
    ``energy_evaluations``: configurations evaluated during the whole run, warm-up and start
    included; ``n_nonfinite``: proposals rejected because an energy, log density or gradient was not
    finite, over the whole run; ``final_state``: the last state, to continue a run.
    """

    x: Tensor
    u: Tensor
    acceptance_rate: dict[str, float]
    step_sizes: dict[str, float]
    energy_evaluations: int
    n_nonfinite: int
    final_state: ChainState


def _leaf_names(leaves: Sequence[Move]) -> list[str]:
    """Names of the leaf moves, made unique with a ``#k`` suffix for repeats."""
    seen: dict[str, int] = {}
    names = []
    for leaf in leaves:
        seen[leaf.name] = seen.get(leaf.name, 0) + 1
        names.append(leaf.name if seen[leaf.name] == 1 else f"{leaf.name}#{seen[leaf.name]}")
    return names


def _find_generator(leaves: Sequence[Move]) -> BoltzmannGenerator | None:
    for leaf in leaves:
        generator = getattr(leaf, "generator", None)
        if isinstance(generator, BoltzmannGenerator):
            return generator
    return None


def resample_starts(log_w: Tensor, n_chains: int, rng: torch.Generator | None = None) -> Tensor:
    """Indices ``[n_chains]`` drawn with replacement, with probability proportional to ``exp(log_w)``.

    Sampling-importance-resampling: given proposals with importance log-weights ``[n]`` towards the
    target, the drawn points start chains in every basin in about its equilibrium proportion. A
    non-finite log-weight is weight 0; a ``ValueError`` is raised when every weight is 0.
    """
    log_w = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))
    if not bool(torch.isfinite(log_w).any()):
        raise ValueError(f"none of the {log_w.numel()} proposals has a finite energy and density")
    return torch.multinomial(torch.softmax(log_w, 0), n_chains, replacement=True, generator=rng)


def initial_state(generator: BoltzmannGenerator, n_chains: int, oversample: int = 16) -> ChainState:
    """``n_chains`` starts near equilibrium from the flow, positions in float64.

    ``oversample * n_chains`` flow samples are resampled by :func:`resample_starts`. Starting from
    raw flow samples would leave local moves (latent HMC/MALA) to correct the basins' weights by
    crossing barriers, and a start in a clash would never move. Starts may repeat; the chains'
    moves are independent.
    """
    with torch.no_grad():
        s = generator.sample(oversample * n_chains)
    idx = resample_starts(s.log_w, n_chains)
    return ChainState(x=s.x[idx].to(torch.float64), u=s.u[idx], z=s.z[idx], log_q=s.log_q[idx])


def _start_state(
    x0: Tensor | int | ChainState, move: Move, leaves: Sequence[Move], generator: BoltzmannGenerator | None
) -> ChainState:
    """The chains' first state from ``x0`` as documented in :func:`run_chains`."""
    if isinstance(x0, ChainState):
        return x0
    if isinstance(x0, int):
        generator = generator if generator is not None else _find_generator(leaves)
        if generator is None:
            raise ValueError("x0 is a number of chains, but no BoltzmannGenerator was given to draw them")
        return initial_state(generator, x0)
    target = move.energies()[0] if move.energies() else generator.energy
    u0 = target(x0)
    if not bool(torch.isfinite(u0).all()):
        raise ValueError(f"{int((~torch.isfinite(u0)).sum())} initial states have a non-finite energy")
    return ChainState(x=x0, u=u0)


def run_chains(
    moves: Move | Sequence[Move],
    x0: Tensor | int | ChainState,
    n_steps: int,
    n_warmup: int = 0,
    thin: int = 1,
    progress: bool = True,
    generator: BoltzmannGenerator | None = None,
) -> MCMCResult:
    """Run all chains for ``n_warmup`` warm-up steps, then ``n_steps`` production steps.

    ``moves``: one move, or a sequence that is run as a :class:`~boltzgen.moves.Cycle`. ``x0``:
    initial states ``[n_chains, dim]`` (energies must be finite), a
    :class:`~boltzgen.moves.ChainState` to continue a run, or a number of chains started by
    :func:`initial_state` from ``generator`` (or from the first move that has one). Step sizes
    adapt during warm-up only and stay frozen afterwards. Every ``thin``-th production state is
    kept, so ``result.x`` is ``[n_steps // thin, n_chains, dim]``.
    """
    if n_steps < 0 or n_warmup < 0 or thin < 1:
        raise ValueError(f"need n_steps >= 0, n_warmup >= 0, thin >= 1; got {n_steps}, {n_warmup}, {thin}")
    move = moves if isinstance(moves, Move) else Cycle(list(moves))
    # A move object used twice in a composite keeps one set of counters: list it once.
    leaves = list({id(leaf): leaf for leaf in move.leaves()}.values())
    names = _leaf_names(leaves)
    energies = {id(e): e for e in move.energies()}
    if generator is not None:
        energies[id(generator.energy)] = generator.energy
    if not energies:
        raise ValueError("the moves evaluate no energy, so the target is unknown")
    evaluations0 = sum(e.evaluations for e in energies.values())
    nonfinite0 = sum(leaf.n_nonfinite for leaf in leaves)

    with torch.no_grad():
        state = _start_state(x0, move, leaves, generator)
        n_chains, dim = state.x.shape
        xs = state.x.new_empty(n_steps // thin, n_chains, dim)
        us = state.u.new_empty(n_steps // thin, n_chains)
        bar = tqdm(total=n_warmup + n_steps, disable=not progress, desc="mcmc")
        try:
            if n_warmup > 0:
                move.begin_warmup()
                try:
                    for _ in range(n_warmup):
                        state = move.step(state)
                        bar.update()
                finally:
                    move.end_warmup()
            accepted0 = [leaf.n_accepted for leaf in leaves]
            proposed0 = [leaf.n_proposed for leaf in leaves]
            for t in range(1, n_steps + 1):
                state = move.step(state)
                if t % thin == 0:
                    xs[t // thin - 1] = state.x
                    us[t // thin - 1] = state.u
                bar.update()
        finally:
            bar.close()

    acceptance = {}
    for name, leaf, a0, p0 in zip(names, leaves, accepted0, proposed0):
        proposed = leaf.n_proposed - p0
        acceptance[name] = (leaf.n_accepted - a0) / proposed if proposed > 0 else math.nan
    return MCMCResult(
        x=xs,
        u=us,
        acceptance_rate=acceptance,
        step_sizes={name: leaf.step_size for name, leaf in zip(names, leaves) if leaf.step_size is not None},
        energy_evaluations=sum(e.evaluations for e in energies.values()) - evaluations0,
        n_nonfinite=sum(leaf.n_nonfinite for leaf in leaves) - nonfinite0,
        final_state=state,
    )
