"""The prioritized replay buffer of FAB (Midgley et al., ICLR 2023, Alg. 2).

It keeps the last ``capacity`` AIS samples with their AIS log-weights toward p^2/q and the log q
they were drawn under. A minibatch is drawn with probability proportional to the weights; when the
flow has changed since, a sample's weight toward p^2/q_new differs by q_old/q_new, which the loss
applies (clipped) and the buffer stores, together with the new log q, so that the priorities follow
the current flow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

_F64 = torch.float64


@dataclass(frozen=True)
class ReplayBatch:
    """A minibatch from the buffer: ``indices`` ``[n]`` long into it, ``x`` ``[n, dim]``, ``log_w``
    and ``log_q`` ``[n]`` float64 (the stored AIS log-weight and the log q it refers to)."""

    indices: Tensor
    x: Tensor
    log_w: Tensor
    log_q: Tensor


class PrioritizedReplayBuffer:
    """A ring buffer of ``capacity`` samples of dimension ``dim`` (``x`` in ``dtype`` on ``device``;
    log-weights and log q in float64). Entries with a non-finite log-weight are never stored; an
    entry whose log q becomes non-finite is dropped (weight 0) and counted in :attr:`n_dropped`.
    """

    def __init__(self, capacity: int, dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.x = torch.zeros(capacity, dim, dtype=dtype, device=device)
        self.log_w = torch.full((capacity,), -math.inf, dtype=_F64, device=device)
        self.log_q = torch.zeros(capacity, dtype=_F64, device=device)
        self.size = 0
        self.position = 0
        self.n_dropped = 0

    def add(self, x: Tensor, log_w: Tensor, log_q: Tensor) -> int:
        """Store the samples ``x`` ``[n, dim]`` whose ``log_w`` and ``log_q`` ``[n]`` are finite,
        overwriting the oldest once full. Returns how many were stored."""
        keep = torch.isfinite(log_w) & torch.isfinite(log_q)
        x, log_w, log_q = x[keep], log_w[keep], log_q[keep]
        n = int(x.shape[0])
        if n > self.capacity:
            x, log_w, log_q, n = x[-self.capacity:], log_w[-self.capacity:], log_q[-self.capacity:], self.capacity
        index = (self.position + torch.arange(n, device=self.x.device)) % self.capacity
        self.x[index] = x.detach().to(self.x)
        self.log_w[index] = log_w.detach().to(_F64)
        self.log_q[index] = log_q.detach().to(_F64)
        self.position = (self.position + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        return n

    @property
    def n_usable(self) -> int:
        """Stored entries with non-zero weight."""
        return int(torch.isfinite(self.log_w[: self.size]).sum())

    def probabilities(self) -> Tensor:
        """``[size]`` float64: the probability of each entry to be the first one drawn (∝ its weight)."""
        if self.n_usable == 0:
            raise ValueError("the replay buffer holds no sample of non-zero weight")
        return torch.softmax(self.log_w[: self.size], dim=0)

    def sample(self, n: int) -> ReplayBatch:
        """``n`` entries drawn in proportion to their weights, without replacement (Gumbel top-k:
        successive draws ∝ w among those left), or with replacement when fewer than ``n`` have
        non-zero weight."""
        usable = self.n_usable
        if usable == 0:
            raise ValueError("the replay buffer holds no sample of non-zero weight")
        logits = self.log_w[: self.size]
        if usable >= n:
            uniform = torch.rand(self.size, dtype=_F64, device=logits.device).clamp_min(1e-300)
            keys = logits - torch.log(-torch.log(uniform))
            indices = torch.topk(keys, n, sorted=False).indices
            indices = indices[torch.randperm(n, device=indices.device)]
        else:
            indices = torch.multinomial(torch.softmax(logits, 0), n, replacement=True)
        return self.gather(indices)

    def gather(self, indices: Tensor) -> ReplayBatch:
        """The entries at ``indices`` ``[n]`` as they are stored now."""
        return ReplayBatch(indices, self.x[indices], self.log_w[indices], self.log_q[indices])

    def update(self, indices: Tensor, log_w_change: Tensor, log_q: Tensor) -> None:
        """Add ``log_w_change`` ``[n]`` to the entries' log-weights and store their new ``log_q`` ``[n]``.

        An entry whose change or new log q is not finite is dropped (its weight becomes 0) and counted.
        """
        good = torch.isfinite(log_w_change) & torch.isfinite(log_q)
        self.log_w[indices[good]] += log_w_change[good].to(_F64)
        self.log_q[indices[good]] = log_q[good].to(_F64)
        bad = indices[~good]
        dropped = torch.isfinite(self.log_w[bad])
        self.n_dropped += int(dropped.sum())
        self.log_w[bad] = -math.inf

    def ess(self) -> float:
        """Kish ESS of the stored weights as a fraction of the stored entries (NaN when empty)."""
        if self.size == 0:
            return math.nan
        lw = self.log_w[: self.size]
        if self.n_usable == 0:
            return 0.0
        return float(torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)) / self.size)

    def state_dict(self) -> dict[str, object]:
        n = self.size
        return {"x": self.x[:n].clone(), "log_w": self.log_w[:n].clone(), "log_q": self.log_q[:n].clone(),
                "position": self.position, "capacity": self.capacity, "n_dropped": self.n_dropped}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"the saved buffer holds {state['capacity']} samples, this one {self.capacity}")
        x = state["x"]
        n = int(x.shape[0])
        self.x[:n] = x.to(self.x)
        self.log_w.fill_(-math.inf)
        self.log_w[:n] = state["log_w"].to(self.log_w)
        self.log_q[:n] = state["log_q"].to(self.log_q)
        self.size, self.position, self.n_dropped = n, int(state["position"]), int(state["n_dropped"])
