"""The Energy interface shared by every target distribution."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class Energy(nn.Module, ABC):
    """A reduced potential u(x) = U(x)/kT of a batch of configurations.

    Subclasses implement :meth:`reduced_energy`. Calling the module casts ``x`` to float64,
    evaluates, counts evaluations in :attr:`evaluations` (one per configuration), which the summary
    reports as ``energy_evaluations``, and adds the wall time of the call to :attr:`seconds` (the
    forward pass, which for the molecular backends computes the forces too; on CUDA only what the
    call waits for).

    Shapes: ``x`` is ``[batch, dim]`` (for molecules, flattened positions in nm, ``dim = 3 * n_atoms``);
    the result is ``[batch]`` float64, dimensionless. A NaN or inf result is returned as is: callers
    give such a sample weight 0 and count it (docs/ARCHITECTURE.md), never replace it here.
    """

    #: Attributes that hold runtime resources, not state (OpenMM contexts, worker pools, raw
    #: pointers), with a factory of their fresh value: copies and pickles start from that and
    #: rebuild the resource on first use.
    _runtime_attributes: ClassVar[dict[str, Callable[[], Any]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        for name, fresh in self._runtime_attributes.items():
            state[name] = fresh()
        return state

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """Nothing: an energy is rebuilt from its config, so its constants stay out of checkpoints,
        which then survive changes to how an energy stores them."""

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        """Nothing, and constants in checkpoints written before energies were left out are ignored."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.evaluations = 0
        self.seconds = 0.0

    @abstractmethod
    def reduced_energy(self, x: Tensor) -> Tensor:
        """u(x) for float64 ``x`` of shape ``[batch, dim]``; returns ``[batch]`` float64."""

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects x of shape [batch, {self.dim}], got {list(x.shape)}")
        self.evaluations += x.shape[0]
        started = time.perf_counter()
        u = self.reduced_energy(x if x.dtype == torch.float64 else x.to(torch.float64))
        self.seconds += time.perf_counter() - started
        return u

    def force(self, x: Tensor) -> Tensor:
        """-du/dx in kT per unit of x, shape ``[batch, dim]``, float64, by autograd."""
        x = x.detach().to(torch.float64).requires_grad_(True)
        with torch.enable_grad():
            u = self(x)
            (grad,) = torch.autograd.grad(u.sum(), x)
        return -grad


class RestrictedEnergy(Energy):
    """``energy`` on the configurations ``allowed`` accepts and ``+inf`` elsewhere: the target
    restricted to a region, e.g. L-chirality, that a sampler must not leave.

    ``allowed`` maps ``x`` ``[batch, dim]`` to a bool ``[batch]``. Evaluations are counted here
    and by ``energy``. A finite ``penalty`` (kT) is added outside instead: weight exp(-penalty),
    0 in float64 for a penalty of thousands, while the states stay visible to a loss that would
    otherwise leave them out (reverse KL would then move mass into the excluded region unopposed).
    """

    def __init__(self, energy: Energy, allowed: Callable[[Tensor], Tensor], penalty: float = float("inf")) -> None:
        super().__init__(energy.dim)
        self.energy = energy
        self.allowed = allowed
        self.penalty = penalty

    def reduced_energy(self, x: Tensor) -> Tensor:
        u = self.energy(x)
        return torch.where(self.allowed(x.detach()), u, u + self.penalty)
