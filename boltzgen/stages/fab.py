"""FAB: flow annealed importance sampling bootstrap (Midgley et al., ICLR 2023).

The flow minimizes the alpha = 2 divergence D_2(p || q) = log ∫ p^2 / q. Its gradient is
-∫ (p^2/q) ∇ log q (up to a positive factor), an expectation under g = p^2/q, the distribution that
importance sampling from q would need least variance for. AIS (:mod:`boltzgen.stages.ais`) draws
from q toward g with HMC and weights; the loss is the self-normalized estimate
``-sum_i w̄_i log q(x_i)`` with w̄ the normalized AIS weights. Because g puts mass where p is large
and q is small, the AIS samples pull the flow onto the modes it misses; because the weights use q,
the loss corrects itself as q improves.

With the prioritized replay buffer (the paper's Alg. 2, :mod:`boltzgen.stages.replay`), every AIS
batch is added to the buffer, ``updates x batch`` distinct samples are drawn from it in proportion to
the stored weights (without replacement), and ``updates`` gradient steps follow, one per minibatch
of them. A sample drawn under q_old carries the weight correction q_old/q (clipped at
``max_weight_adjust``: the practice of the reference code, needed for stability), which the buffer
then stores with the new log q. Drawing all minibatches at once, without replacement, keeps a few
heavy samples from entering every minibatch.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from boltzgen.config import TrainingStage
from boltzgen.estimators.weights import kish_ess, log_z_importance_sampling
from boltzgen.generator import BoltzmannGenerator
from boltzgen.stages.ais import AISResult, LatentAIS
from boltzgen.stages.base import StageRunner, StageStep
from boltzgen.stages.replay import PrioritizedReplayBuffer

_F64 = torch.float64


class FABRunner(StageRunner):
    """A ``fab`` stage: AIS toward p^2/q with HMC, the alpha = 2 loss, and optionally the buffer.

    Each step returns its loss, the ESS of the flow on the latest AIS batch's starting samples,
    the non-finite energies and densities it met, and diagnostics (``ais_*`` of the latest AIS batch,
    ``buffer_*`` of the buffer and of this step's weight corrections).
    """

    def __init__(self, generator: BoltzmannGenerator, stage: TrainingStage) -> None:
        settings = stage.fab_settings
        ais = settings.ais
        self.generator = generator
        self.batch = stage.batch
        self.replay = settings.replay
        self.ais = LatentAIS(generator, n_intermediate=ais.intermediate, n_leapfrog=ais.leapfrog,
                             hmc_steps=ais.hmc_steps, step_size=ais.step_size, adapt=ais.adapt_step_size,
                             target_accept=ais.target_accept)
        self.buffer: PrioritizedReplayBuffer | None = None
        #: The buffer entries drawn for this round of ``updates`` steps, ``[updates, batch]`` long.
        self.pending: torch.Tensor | None = None
        self.t = 0
        self.last_ais: dict[str, float] = {}
        self.flow_ess = math.nan

    # --- AIS ------------------------------------------------------------------------------------

    def _run_ais(self) -> AISResult:
        result = self.ais.run(self.batch)
        if not bool(torch.isfinite(result.log_w).any()):
            raise FloatingPointError("every AIS sample had a non-finite energy or density")
        self.flow_ess = kish_ess(result.log_w_flow.cpu().numpy())
        flow_log_z = log_z_importance_sampling(result.log_w_flow.cpu().numpy())
        self.last_ais = {
            "ais_ess": kish_ess(result.log_w.cpu().numpy()), "ais_flow_ess": self.flow_ess,
            "ais_flow_log_z": flow_log_z.value, "ais_distance": result.distance,
            **{f"ais_accept_{j}": a for j, a in enumerate(result.accept)},
            **{f"ais_step_size_{j}": s for j, s in enumerate(result.step_sizes)},
        }
        return result

    def _buffer_for(self, result: AISResult) -> PrioritizedReplayBuffer:
        if self.buffer is None:
            assert self.replay is not None
            self.buffer = PrioritizedReplayBuffer(self.replay.size, result.x.shape[1], result.x.dtype, result.x.device)
        return self.buffer

    def _fill(self) -> int:
        """One AIS batch into the buffer, more while it holds fewer than ``min_size``; the non-finite count."""
        assert self.replay is not None
        n_nonfinite = 0
        while True:
            result = self._run_ais()
            n_nonfinite += result.n_nonfinite
            buffer = self._buffer_for(result)
            buffer.add(result.x, result.log_w, result.log_q)
            if buffer.size >= self.replay.min_size:
                return n_nonfinite

    # --- steps ----------------------------------------------------------------------------------

    def step(self) -> StageStep:
        step = self._buffer_step() if self.replay is not None else self._fresh_step()
        self.t += 1
        return step

    def _fresh_step(self) -> StageStep:
        """FAB without a buffer: the loss on this step's AIS batch."""
        result = self._run_ais()
        log_q = self.generator.log_prob(result.x)
        weights = torch.softmax(result.log_w, dim=0)
        usable = torch.isfinite(log_q) & (weights > 0)
        n_nonfinite = result.n_nonfinite + int((~torch.isfinite(log_q) & (weights > 0)).sum())
        loss = -(weights[usable].to(log_q) * log_q[usable]).sum()
        return StageStep(loss, self.flow_ess, n_nonfinite, diagnostics=dict(self.last_ais))

    def _buffer_step(self) -> StageStep:
        """FAB with the buffer: an AIS batch every ``updates`` steps, then a minibatch drawn ∝ w."""
        assert self.replay is not None
        n_nonfinite, turn = 0, self.t % self.replay.updates
        if turn == 0:
            n_nonfinite = self._fill()
            assert self.buffer is not None
            drawn = self.buffer.sample(self.replay.updates * self.batch).indices
            self.pending = drawn.reshape(self.replay.updates, self.batch)
        assert self.buffer is not None and self.pending is not None
        batch = self.buffer.gather(self.pending[turn])
        log_q = self.generator.log_prob(batch.x)
        log_q64 = log_q.detach().to(_F64)
        finite = torch.isfinite(log_q64)
        # The weight toward p^2/q_new of a sample stored under q_old: times q_old / q_new.
        log_change = batch.log_q - log_q64
        change = torch.exp(log_change)
        adjust = torch.where(finite, torch.clamp(change, max=self.replay.max_weight_adjust), torch.zeros_like(change))
        loss = -(adjust.to(log_q) * torch.where(finite, log_q, torch.zeros_like(log_q))).mean()
        self.buffer.update(batch.indices, log_change, log_q64)
        n_nonfinite += int((~finite).sum())
        shown = change[finite]
        diagnostics = {
            **self.last_ais, "buffer_size": float(self.buffer.size), "buffer_ess": self.buffer.ess(),
            "buffer_dropped": float(self.buffer.n_dropped),
            "buffer_w_adjust_mean": float(shown.mean()) if shown.numel() else math.nan,
            "buffer_w_adjust_max": float(shown.max()) if shown.numel() else math.nan,
            "buffer_clipped": float((shown > self.replay.max_weight_adjust).to(_F64).mean()) if shown.numel() else math.nan,
        }
        return StageStep(loss, self.flow_ess, n_nonfinite, diagnostics=diagnostics)

    # --- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "ais": self.ais.state_dict(), "last_ais": dict(self.last_ais), "flow_ess": self.flow_ess,
                "buffer": None if self.buffer is None else self.buffer.state_dict(), "pending": self.pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
        self.ais.load_state_dict(state["ais"])
        self.last_ais = dict(state["last_ais"])
        self.flow_ess = float(state["flow_ess"])
        saved = state["buffer"]
        self.buffer = None
        device = next(iter(self.generator.prior.buffers())).device  # the checkpoint was read to the CPU
        self.pending = None if state["pending"] is None else state["pending"].to(device)
        if saved is not None:
            assert self.replay is not None, "a buffer was saved for a stage that has none"
            x = saved["x"]
            self.buffer = PrioritizedReplayBuffer(self.replay.size, x.shape[1], x.dtype, device)
            self.buffer.load_state_dict(saved)
