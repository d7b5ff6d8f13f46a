"""Temperature-annealed training (TA-BG; Schopmans & Friederich, 2025): reverse KL where the target
is easy, at a high temperature, then down a ladder of temperatures by reweighting.

At a high temperature T_0 the target exp(-u/T_0) is smooth and its basins are connected, so reverse
KL covers it without collapsing onto one mode. Each step down, T_(i-1) -> T_i, draws N samples from
the flow (which approximates exp(-u/T_(i-1))), gives them the importance weights
``w = exp(-u/T_i) / q`` toward the next temperature, and fits the flow to them by maximum
likelihood: every minibatch is drawn from the N samples with probability ∝ w (with replacement),
so its mean negative log-likelihood estimates the forward KL to exp(-u/T_i) up to a constant. The
ladder must be fine enough for the weights to stay usable (``anneal_ess`` in the diagnostics: the
Kish ESS / N of the reweighted set). The last temperature is the target's (1).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from torch import Tensor

from boltzgen.config import TrainingStage
from boltzgen.estimators.weights import kish_ess
from boltzgen.generator import BoltzmannGenerator
from boltzgen.stages.base import ReverseKL, StageRunner, StageStep

_F64 = torch.float64
#: Flow samples per forward pass when drawing the set to reweight.
DRAW_BATCH = 65536
#: Below this Kish ESS / N of its drawn set, a ``reweighted_forward_kl`` stage warns: it would fit a
#: few heavy samples (on tetra-alanine at 0.01 the flow's batch ESS fell from ~0.08 to 0.004 in 2,000
#: steps).
REWEIGHTED_MIN_ESS = 0.05


def truncate_log_weights(log_w: Tensor) -> tuple[Tensor, int]:
    """Log-weights ``[N]`` with every weight above sqrt(N) times the mean weight cut to that
    (truncated importance sampling, Ionides 2008: the cut's bias vanishes as N grows). The mean is
    the untruncated one, so a sample that held a share 1 - e of the weight holds about
    1 / (1 + e sqrt(N)) of it after the cut (e = 0.03, N = 10^5: 10 %). Returns them and how many were
    cut. ``-inf`` (weight 0) entries stay as they are."""
    cap = torch.logsumexp(log_w, dim=0) - 0.5 * math.log(log_w.numel())
    above = log_w > cap
    return torch.where(above, cap, log_w), int(above.sum())


class AnnealingRunner(StageRunner):
    """An ``annealing`` stage. Its steps: the first ``hot_fraction`` reverse KL at ``temperatures[0]``
    (with the stage's ``u_max``); the rest in equal parts at each lower temperature, fitting the
    reweighted flow samples (see the module docstring). Non-finite energies in a drawn set are weight
    0 and counted in that step's ``n_nonfinite``.

    A ``reweighted_forward_kl`` stage is the last rung alone: every step fits the flow's own samples
    reweighted to the target (temperature 1), with no hot phase."""

    def __init__(self, generator: BoltzmannGenerator, stage: TrainingStage, reverse_kl: ReverseKL) -> None:
        self.generator = generator
        self.reverse_kl = reverse_kl
        self.batch, self.u_max = stage.batch, stage.u_max
        self.warn_below: float | None = None
        self.truncate = False
        if stage.loss == "reweighted_forward_kl":
            cfg = stage.reweighting_settings
            hot_fraction, self.temperatures = 0.0, [math.inf, 1.0]  # an empty hot segment, then the target
            self.warn_below = REWEIGHTED_MIN_ESS
            self.truncate = cfg.truncate_weights
        else:
            assert stage.annealing is not None
            cfg = stage.annealing
            hot_fraction, self.temperatures = cfg.hot_fraction, list(cfg.temperatures)
        self.samples, self.resample_every = cfg.samples, cfg.resample_every
        n_hot = int(round(hot_fraction * stage.steps))
        rest, k = stage.steps - n_hot, len(self.temperatures) - 1
        #: First step of each temperature (the hot reverse-KL phase is segment 0, empty when n_hot is 0).
        self.starts = [0] + [n_hot + (i * rest) // k for i in range(k)]
        self.t = 0
        self.x: Tensor | None = None
        self.log_w: Tensor | None = None
        self.set_ess = math.nan
        self.n_truncated = 0

    def _segment(self) -> int:
        return max(i for i, start in enumerate(self.starts) if start <= self.t)

    def _draw(self, temperature: float) -> tuple[int, float]:
        """Draw and reweight the set at ``temperature``; returns (non-finite count, flow ESS toward p)."""
        parts = [self.generator.sample(min(DRAW_BATCH, self.samples - i), batch_size=DRAW_BATCH)
                 for i in range(0, self.samples, DRAW_BATCH)]
        x = torch.cat([s.x for s in parts])
        u = torch.cat([s.u for s in parts])
        log_q = torch.cat([s.log_q for s in parts])
        log_w = -u / temperature - log_q
        finite = torch.isfinite(log_w)
        if not bool(finite.any()):
            raise FloatingPointError(f"every flow sample drawn to reweight to T = {temperature:g} had a non-finite "
                                     "energy or density")
        self.x = x.detach()
        self.log_w = torch.where(finite, log_w, torch.full_like(log_w, -math.inf))
        self.set_ess = kish_ess(self.log_w.cpu().numpy())
        if self.truncate:
            self.log_w, self.n_truncated = truncate_log_weights(self.log_w)
        if self.warn_below is not None and self.set_ess < self.warn_below:
            print(f"boltzgen: warning: reweighted_forward_kl: the flow's {self.samples:,} samples have ESS "
                  f"{self.set_ess:.3g} toward p; fitting so few effective samples can degrade the flow. Train "
                  "longer by forward KL first, or leave this stage out", file=sys.stderr)
            self.warn_below = None  # once per stage
        n_nonfinite = int((~finite).sum())
        return n_nonfinite, kish_ess(torch.cat([s.log_w for s in parts]).cpu().numpy())

    def step(self) -> StageStep:
        segment = self._segment()
        temperature = self.temperatures[segment]
        if segment == 0:
            loss, log_w, n_nonfinite = self.reverse_kl(self.generator, self.batch, self.u_max, temperature)
            self.t += 1
            return StageStep(loss, kish_ess(log_w.cpu().numpy()), n_nonfinite, reverse_kl=float(loss.detach()),
                             diagnostics={"temperature": temperature})
        since = self.t - self.starts[segment]
        n_nonfinite, ess = 0, math.nan
        if since == 0 or self.x is None or (self.resample_every is not None and since % self.resample_every == 0):
            n_nonfinite, ess = self._draw(temperature)
        assert self.x is not None and self.log_w is not None
        index = torch.multinomial(torch.softmax(self.log_w, dim=0), self.batch, replacement=True)
        log_q = self.generator.log_prob(self.x[index])
        finite = torch.isfinite(log_q)
        n_nonfinite += int((~finite).sum())
        if not bool(finite.any()):
            raise FloatingPointError(f"the flow's log density was not finite on any resampled sample at T = {temperature:g}")
        self.t += 1
        diagnostics = {"temperature": temperature, "anneal_ess": self.set_ess}
        if self.truncate:
            diagnostics["weights_truncated"] = float(self.n_truncated)
        return StageStep(-log_q[finite].mean(), ess, n_nonfinite, diagnostics=diagnostics)

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "x": self.x, "log_w": self.log_w, "set_ess": self.set_ess,
                "n_truncated": self.n_truncated}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = next(iter(self.generator.prior.buffers())).device
        self.t = int(state["t"])
        self.x = None if state["x"] is None else state["x"].to(device)
        self.log_w = None if state["log_w"] is None else state["log_w"].to(device)
        self.set_ess = float(state["set_ess"])
        self.n_truncated = int(state.get("n_truncated", 0))
