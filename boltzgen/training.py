"""Losses and the staged Trainer, with checkpoints that resume exactly where a run stopped.

What each reported loss means (they are not distances and can be negative):

* ``forward_nll`` = -E_data[log q(x)] = KL(p_data || q) + H(p_data). Its constant, the entropy of
  the data, is unknown, so it is not 0 at the optimum.
* ``reverse_kl`` = E_q[u(x) + log q(x)] = KL(q || p) - log Z. It is bounded below by -log Z, which is
  negative whenever Z > 1, so a negative value is normal.
* ``loss`` = forward_weight * forward_nll + reverse_weight * reverse_kl for the stage's weights.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from boltzgen.config import TrainingStage
from boltzgen.estimators.weights import kish_ess
from boltzgen.generator import BoltzmannGenerator, log_weights
from boltzgen.files import atomic_torch_save

METRIC_FIELDS = ["step", "stage", "loss", "forward_nll", "reverse_kl", "ess", "lr", "grad_norm", "n_nonfinite", "energy_evaluations", "wall_seconds"]


def lin_log_cut(u: Tensor, u_max: float) -> Tensor:
    """u below ``u_max`` unchanged; above it u_max + log(1 + u - u_max), so clashes keep finite gradients."""
    excess = torch.clamp(u - u_max, min=0.0)
    return torch.where(u > u_max, u_max + torch.log1p(excess), u)


@dataclass(frozen=True)
class StepResult:
    loss: Tensor
    forward_nll: float
    reverse_kl: float
    ess: float
    n_nonfinite: int


def forward_kl_loss(generator: BoltzmannGenerator, x_data: Tensor) -> Tensor:
    """Maximum likelihood: -mean log q(x) over a data batch ``[batch, dim]``."""
    return -generator.log_prob(x_data).mean()


def reverse_kl_loss(
    generator: BoltzmannGenerator, batch: int, u_max: float, temperature_factor: float = 1.0
) -> tuple[Tensor, Tensor, int]:
    """Reparametrized E_q[u(x)/T + log q(x)] with the lin-log cut.

    Samples whose energy is not finite are left out of the mean and counted; their log-weights are
    -inf, so they count as weight 0 in the ESS. Returns ``(loss, log_w, n_nonfinite)``.
    """
    x, _, log_q = generator.sample_with_log_q(batch)
    u = generator.energy(x)
    finite = torch.isfinite(u) & torch.isfinite(log_q)
    n_nonfinite = int((~finite).sum())
    u_cut = lin_log_cut(u[finite], u_max) / temperature_factor
    if n_nonfinite == batch:
        raise FloatingPointError("every reverse-KL sample had a non-finite energy or density")
    loss = (u_cut.to(log_q) + log_q[finite]).mean()
    return loss, log_weights(u.detach(), log_q.detach()), n_nonfinite


class Trainer:
    """Runs training stages in order, logging a CSV row per logged step and checkpointing.

    ``checkpoint_path`` and ``metrics_path`` are the checkpoint (torch) and the metrics CSV.
    ``data`` ([n, dim], the flow's dtype and device) is required by forward-KL and mixed stages.
    Resuming restores parameters, optimizer, step, RNG states and counters, and truncates the
    metrics to the checkpoint's step so no row is duplicated or lost.
    """

    def __init__(
        self,
        generator: BoltzmannGenerator,
        stages: list[TrainingStage],
        checkpoint_path: Path,
        metrics_path: Path,
        data: Tensor | None = None,
        checkpoint_every: int = 500,
        log_every: int = 10,
        progress: bool = True,
    ) -> None:
        self.generator = generator
        self.stages = stages
        self.data = data
        self.checkpoint_every = checkpoint_every
        self.log_every = log_every
        self.progress = progress
        self.checkpoint_path = Path(checkpoint_path)
        self.metrics_path = Path(metrics_path)
        self.step = 0
        self.wall_seconds = 0.0
        self.n_nonfinite = 0
        self.stage_ends = np.cumsum([s.steps for s in stages]).tolist()
        for stage in stages:
            if stage.loss != "reverse_kl" and data is None:
                raise ValueError(f"a {stage.loss} stage needs training data, and none was given")
        self._optimizer_stage = -1
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def total_steps(self) -> int:
        return self.stage_ends[-1]

    def stage_index(self, step: int) -> int:
        return next(i for i, end in enumerate(self.stage_ends) if step < end)

    def _lr(self, stage_idx: int, step: int) -> float:
        stage = self.stages[stage_idx]
        if stage.lr_schedule == "constant":
            return stage.lr
        start = self.stage_ends[stage_idx] - stage.steps
        progress = (step - start) / stage.steps
        return stage.lr * 0.5 * (1 + math.cos(math.pi * progress))

    def _ensure_optimizer(self, stage_idx: int) -> torch.optim.Optimizer:
        if self._optimizer_stage != stage_idx:
            stage = self.stages[stage_idx]
            self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=stage.lr, weight_decay=stage.weight_decay)
            self._optimizer_stage = stage_idx
        assert self.optimizer is not None
        return self.optimizer

    def _data_batch(self, batch: int) -> Tensor:
        assert self.data is not None
        idx = torch.randint(0, self.data.shape[0], (batch,), device=self.data.device)
        return self.data[idx]

    def _initialize_from_data(self) -> None:
        """Data-dependent initialization (ActNorm) runs on the first inverse pass, with real data."""
        if self.data is not None:
            with torch.no_grad():
                self.generator.log_prob(self.data[: min(len(self.data), 4096)])

    def train_step(self, stage: TrainingStage) -> StepResult:
        forward_weight = {"forward_kl": 1.0, "reverse_kl": 0.0, "mixed": stage.forward_weight}[stage.loss]
        reverse_weight = {"forward_kl": 0.0, "reverse_kl": 1.0, "mixed": stage.reverse_weight}[stage.loss]
        forward_nll = reverse_kl = ess = float("nan")
        n_nonfinite = 0
        loss = torch.zeros((), dtype=torch.float64)
        if forward_weight > 0:
            nll = forward_kl_loss(self.generator, self._data_batch(stage.batch))
            forward_nll = float(nll.detach())
            loss = loss.to(nll) + forward_weight * nll
        if reverse_weight > 0:
            rkl, log_w, n_nonfinite = reverse_kl_loss(self.generator, stage.batch, stage.u_max, stage.temperature_factor)
            reverse_kl = float(rkl.detach())
            ess = kish_ess(log_w.cpu().numpy())
            loss = loss.to(rkl) + reverse_weight * rkl
        return StepResult(loss, forward_nll, reverse_kl, ess, n_nonfinite)

    @torch.no_grad()
    def _eval_ess(self, batch: int) -> float:
        x, _, log_q = self.generator.sample_with_log_q(batch)
        return kish_ess(log_weights(self.generator.energy(x), log_q).cpu().numpy())

    def save_checkpoint(self) -> None:
        state = {
            "step": self.step,
            "model": self.generator.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "optimizer_stage": self._optimizer_stage,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "energy_evaluations": self.generator.energy.evaluations,
            "wall_seconds": self.wall_seconds,
            "n_nonfinite": self.n_nonfinite,
        }
        atomic_torch_save(state, self.checkpoint_path)

    def load_checkpoint(self) -> None:
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        self.generator.load_state_dict(state["model"])
        self.step = state["step"]
        if state["optimizer"] is not None:
            self._ensure_optimizer(state["optimizer_stage"]).load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.generator.energy.evaluations = state["energy_evaluations"]
        self.wall_seconds = state["wall_seconds"]
        self.n_nonfinite = state["n_nonfinite"]
        self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        if not self.metrics_path.exists():
            return
        with open(self.metrics_path, newline="") as f:
            rows = [row for row in csv.DictReader(f) if int(row["step"]) <= step]
        self._write_metrics(rows, mode="w")

    def _write_metrics(self, rows: list[dict], mode: str) -> None:
        tmp = self.metrics_path.with_suffix(".csv.tmp")
        if mode == "w":
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, self.metrics_path)
        else:
            new = not self.metrics_path.exists()
            with open(self.metrics_path, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
                if new:
                    writer.writeheader()
                writer.writerows(rows)

    def run(self, resume: bool = False, stop_after: int | None = None, on_log: Callable[[dict], None] | None = None) -> None:
        """Train to the end of the last stage (or ``stop_after`` steps in total, to emulate a crash)."""
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.checkpoint_path.exists():
            self.load_checkpoint()
        else:
            self._write_metrics([], mode="w")
            self._initialize_from_data()
        self.generator.train()
        end = self.total_steps if stop_after is None else min(self.total_steps, stop_after)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, desc="train", unit="step")
        started = time.perf_counter() - self.wall_seconds
        try:
            while self.step < end:
                stage_idx = self.stage_index(self.step)
                stage = self.stages[stage_idx]
                optimizer = self._ensure_optimizer(stage_idx)
                lr = self._lr(stage_idx, self.step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                result = self.train_step(stage)
                if not torch.isfinite(result.loss):
                    raise FloatingPointError(
                        f"training loss became {float(result.loss)} at step {self.step}; lower the lr or u_max"
                    )
                result.loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.generator.parameters(), stage.grad_clip)
                if torch.isfinite(grad_norm):
                    optimizer.step()
                self.n_nonfinite += result.n_nonfinite
                self.step += 1
                self.wall_seconds = time.perf_counter() - started
                if self.step % self.log_every == 0 or self.step == self.total_steps:
                    ess = result.ess if not math.isnan(result.ess) else self._eval_ess(min(stage.batch, 1024))
                    row = {
                        "step": self.step, "stage": stage_idx, "loss": float(result.loss.detach()),
                        "forward_nll": result.forward_nll, "reverse_kl": result.reverse_kl, "ess": ess, "lr": lr,
                        "grad_norm": float(grad_norm), "n_nonfinite": self.n_nonfinite,
                        "energy_evaluations": self.generator.energy.evaluations, "wall_seconds": self.wall_seconds,
                    }
                    self._write_metrics([row], mode="a")
                    bar.set_postfix(loss=f"{row['loss']:.3f}", ess=f"{ess:.3f}")
                    if on_log is not None:
                        on_log(row)
                if self.step % self.checkpoint_every == 0 or self.step == end:
                    self.save_checkpoint()
                bar.update(1)
        except KeyboardInterrupt:
            self.save_checkpoint()
            raise
        finally:
            bar.close()
            self.generator.eval()
