"""Losses and the staged Trainer, with checkpoints that resume exactly where a run stopped.

What each reported loss means (they are not distances and can be negative):

* ``forward_nll`` = -E_data[log q(x)] = KL(p_data || q) + H(p_data). Its constant, the entropy of
  the data, is unknown, so it is not 0 at the optimum.
* ``reverse_kl`` = E_q[u(x) + log q(x)] = KL(q || p) - log Z. It is bounded below by -log Z, which is
  negative whenever Z > 1, so a negative value is normal.
* ``loss`` = forward_weight * forward_nll + reverse_weight * reverse_kl for the stage's weights.
  A ``fab`` stage's loss is -sum_i w̄_i log q(x_i) over AIS (or replayed) samples, an ``annealing``
  stage's the reverse KL at its hot temperature, then the NLL of reweighted flow samples, a
  ``reweighted_forward_kl`` stage's that NLL at the target alone; they run in
  :mod:`boltzgen.stages`, need no data, and checkpoint their state (buffer, step sizes, sets) too.
"""

from __future__ import annotations

import csv
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from boltzgen import distributed
from boltzgen.config import TrainingStage
from boltzgen.errors import ConfigError, RunError
from boltzgen.estimators.weights import kish_ess
from boltzgen.generator import BoltzmannGenerator, log_weights
from boltzgen.files import atomic_torch_save
from boltzgen.flows.capabilities import Capabilities
from boltzgen.flows.transforms import Compose
from boltzgen.stages import DATA_FREE_LOSSES, StageRunner, make_runner

METRIC_FIELDS = ["step", "stage", "loss", "forward_nll", "reverse_kl", "ess", "lr", "grad_norm", "n_nonfinite", "energy_evaluations", "wall_seconds"]


def lin_log_cut(u: Tensor, u_max: float) -> Tensor:
    """u below ``u_max`` unchanged; above it u_max + log(1 + u - u_max), so clashes keep finite gradients."""
    excess = torch.clamp(u - u_max, min=0.0)
    return torch.where(u > u_max, u_max + torch.log1p(excess), u)


@dataclass(frozen=True)
class StepResult:
    """One step's loss and what is logged of it; ``diagnostics`` come from data-free stages (FAB, annealing)."""

    loss: Tensor
    forward_nll: float
    reverse_kl: float
    ess: float
    n_nonfinite: int
    diagnostics: dict[str, float] = field(default_factory=dict)


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


#: The states whose density each loss needs, other than samples from the same pass of the flow.
DENSITY_NEEDED_OF = {"forward_kl": "the training data", "mixed": "the training data", "fab": "its AIS samples",
                     "annealing": "the flow samples it stores and refits",
                     "reweighted_forward_kl": "the flow samples it stores and refits"}


def needs_data_density(stage: TrainingStage) -> bool:
    """Whether a stage evaluates log q at states the flow did not draw in the same pass."""
    if stage.loss == "mixed":
        return stage.forward_weight > 0
    return stage.loss in DENSITY_NEEDED_OF


def check_recipe(stages: list[TrainingStage], capabilities: Capabilities, flow_name: str) -> None:
    """A one-line ``ValueError`` naming the first stage that needs the density of external states
    when the flow (``flow_name``, e.g. ``"flow.type planar"``) cannot evaluate it."""
    if capabilities.data_density:
        return
    for i, stage in enumerate(stages):
        if needs_data_density(stage):
            raise ValueError(f"training[{i}]: loss {stage.loss} needs log q of {DENSITY_NEEDED_OF[stage.loss]}, "
                             f"but {flow_name} cannot evaluate the density of external data (it has no inverse); "
                             "train it with loss reverse_kl")


def check_stages_distributable(stages: list[TrainingStage]) -> None:
    """In a launch of several processes, a one-line ``ConfigError`` naming the first stage it cannot
    split: a data-free stage, or a batch that the number of processes does not divide."""
    if not distributed.world().distributed:
        return
    for i, stage in enumerate(stages):
        if stage.loss in DATA_FREE_LOSSES:
            raise ConfigError(f"training[{i}]: loss {stage.loss} runs in one process only (its AIS samples, replay "
                              "buffer and reweighted sets are not split across ranks); launch it without torchrun")
        distributed.local_batch(stage.batch, f"training[{i}].batch")


#: What every checkpoint of :meth:`Trainer.save_checkpoint` holds.
CHECKPOINT_KEYS = frozenset({"step", "model", "optimizer", "optimizer_stage", "torch_rng", "energy_evaluations",
                             "wall_seconds", "n_nonfinite"})


class Trainer:
    """Runs training stages in order, logging a CSV row per logged step and checkpointing.

    ``checkpoint_path`` and ``metrics_path`` are the checkpoint (torch) and the metrics CSV.
    ``data`` ([n, dim], the flow's dtype and device) is required by forward-KL and mixed stages;
    ``augment`` maps every data batch ``[batch, dim]`` to an equally probable one (a symmetry of the
    target, such as :func:`boltzgen.symmetry.random_relabel`) before the flow sees it.
    Resuming restores parameters, optimizer, step, RNG states and counters, and truncates the
    metrics to the checkpoint's step so no row is duplicated or lost. ``fab`` and ``annealing``
    stages run in :mod:`boltzgen.stages`; their state (replay buffer, HMC step sizes, reweighted
    samples) and their :attr:`diagnostics` rows are checkpointed too.
    """

    def __init__(
        self,
        generator: BoltzmannGenerator,
        stages: list[TrainingStage],
        checkpoint_path: Path,
        metrics_path: Path,
        data: Tensor | None = None,
        augment: Callable[[Tensor], Tensor] | None = None,
        checkpoint_every: int = 500,
        log_every: int = 10,
        progress: bool = True,
    ) -> None:
        self.generator = generator
        self.stages = stages
        self.data = data
        self.augment = augment
        self.checkpoint_every = checkpoint_every
        self.log_every = log_every
        self.progress = progress
        self.checkpoint_path = Path(checkpoint_path)
        self.metrics_path = Path(metrics_path)
        self.step = 0
        self.wall_seconds = 0.0
        self.n_nonfinite = 0
        self.stage_ends = np.cumsum([s.steps for s in stages]).tolist()
        check_recipe(stages, generator.flow.capabilities, "this flow")
        for stage in stages:
            if stage.loss in ("forward_kl", "mixed") and data is None:
                raise ValueError(f"a {stage.loss} stage needs training data, and none was given")
        #: The launch this process is part of; one process unless started by torchrun.
        self.world = distributed.world()
        check_stages_distributable(stages)
        #: The state of each data-free stage (FAB, annealing) that has run, by stage index; checkpointed.
        self._runners: dict[int, StageRunner] = {}
        #: One row per logged step of a data-free stage: step, stage and its diagnostics; checkpointed.
        self.diagnostics: list[dict[str, float]] = []
        self._optimizer_stage = -1
        self.optimizer: torch.optim.Optimizer | None = None
        #: training wall time of earlier sessions, when resumed (s)
        self.resumed_wall_seconds = 0.0

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
            # fused: one kernel for all parameters instead of a handful of ops per parameter tensor.
            self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=stage.lr, weight_decay=stage.weight_decay,
                                              fused=True)
            self._optimizer_stage = stage_idx
        assert self.optimizer is not None
        return self.optimizer

    def _data_batch(self, batch: int) -> Tensor:
        assert self.data is not None
        idx = torch.randint(0, self.data.shape[0], (batch,), device=self.data.device)
        return self.data[idx] if self.augment is None else self.augment(self.data[idx])

    def _initialize_from_data(self) -> None:
        """Data-dependent initialization (ActNorm) runs on the first inverse pass, with real data."""
        if self.data is not None:
            with torch.no_grad():
                x = self.data[: min(len(self.data), 4096)]
                flow = self.generator.flow
                # A flow without an inverse initializes the layers after its last one that has none.
                if isinstance(flow, Compose):
                    flow.initialize_from_data(x)
                else:
                    self.generator.log_prob(x)

    def _runner(self, stage_idx: int) -> StageRunner:
        for finished in [i for i in self._runners if i < stage_idx]:
            del self._runners[finished]  # its buffer need not ride along in later checkpoints
        if stage_idx not in self._runners:
            self._runners[stage_idx] = make_runner(self.generator, self.stages[stage_idx], reverse_kl_loss)
        return self._runners[stage_idx]

    def train_step(self, stage: TrainingStage, stage_idx: int | None = None) -> StepResult:
        if stage.loss in DATA_FREE_LOSSES:
            done = self._runner(self.stages.index(stage) if stage_idx is None else stage_idx).step()
            return StepResult(done.loss, math.nan, done.reverse_kl, done.ess, done.n_nonfinite, done.diagnostics)
        forward_weight = {"forward_kl": 1.0, "reverse_kl": 0.0, "mixed": stage.forward_weight}[stage.loss]
        reverse_weight = {"forward_kl": 0.0, "reverse_kl": 1.0, "mixed": stage.reverse_weight}[stage.loss]
        forward_nll = reverse_kl = ess = float("nan")
        n_nonfinite = 0
        loss = torch.zeros((), dtype=torch.float64)
        batch = distributed.local_batch(stage.batch)  # this rank's share of the global batch
        if forward_weight > 0:
            nll = forward_kl_loss(self.generator, self._data_batch(batch))
            forward_nll = float(nll.detach())
            loss = loss.to(nll) + forward_weight * nll
        if reverse_weight > 0:
            rkl, log_w, n_nonfinite = reverse_kl_loss(self.generator, batch, stage.u_max, stage.temperature_factor)
            log_w = distributed.gather_cat(log_w)  # the global batch's, in a launch
            # A launch averages the ranks' gradients: weigh each by its share of the finite samples.
            rkl = distributed.rescale_mean(rkl, batch - n_nonfinite, int(torch.isfinite(log_w).sum()))
            reverse_kl = float(rkl.detach())
            ess = kish_ess(log_w.cpu().numpy())
            loss = loss.to(rkl) + reverse_weight * rkl
        return StepResult(loss, forward_nll, reverse_kl, ess, n_nonfinite)

    @torch.no_grad()
    def _eval_ess(self, batch: int) -> float:
        x, _, log_q = self.generator.sample_with_log_q(max(1, batch // self.world.size))
        return kish_ess(distributed.gather_cat(log_weights(self.generator.energy(x), log_q)).cpu().numpy())

    def save_checkpoint(self) -> None:
        # Every rank takes part (its random state and energy count travel to rank 0); rank 0 writes.
        rank_rng = distributed.gather_to_main(distributed.rng_state()) if self.world.distributed else None
        evaluations = int(distributed.sum_over_ranks([self.generator.energy.evaluations])[0])
        if not self.world.is_main:
            return
        state = {
            "step": self.step,
            "model": self.generator.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "optimizer_stage": self._optimizer_stage,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "energy_evaluations": evaluations,
            "wall_seconds": self.wall_seconds,
            "n_nonfinite": self.n_nonfinite,
            "stage_runners": {i: runner.state_dict() for i, runner in self._runners.items()},
            "diagnostics": list(self.diagnostics),
            "rank_rng": rank_rng,  # one state per rank of a launch, else None
        }
        atomic_torch_save(state, self.checkpoint_path)

    def load_checkpoint(self) -> None:
        state = read_checkpoint(self.checkpoint_path)
        load_model_state(self.generator, state["model"], self.checkpoint_path)
        if not 0 <= state["step"] <= self.total_steps:
            raise RunError(f"{self.checkpoint_path}: the checkpoint is at step {state['step']}, beyond the "
                           f"{self.total_steps} steps the config's stages add up to; raise training[-1].steps")
        self.step = state["step"]
        if state["optimizer"] is not None:
            self._ensure_optimizer(state["optimizer_stage"]).load_state_dict(state["optimizer"])
        distributed.restore_rng(state.get("rank_rng") or [{"cpu": state["torch_rng"], "cuda": state["cuda_rng"]}])
        # The run's total, counted once: on rank 0 (the others count from 0 and are summed with it).
        self.generator.energy.evaluations = state["energy_evaluations"] if self.world.is_main else 0
        self.wall_seconds = state["wall_seconds"]
        self.resumed_wall_seconds = self.wall_seconds
        self.n_nonfinite = state["n_nonfinite"]
        self._runners = {}
        for i, runner_state in state.get("stage_runners", {}).items():
            self._runner(i).load_state_dict(runner_state)
        self.diagnostics = list(state.get("diagnostics", []))
        if self.world.is_main:
            self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        if not self.metrics_path.exists():
            return
        try:
            with open(self.metrics_path, newline="") as f:
                rows = [row for row in csv.DictReader(f) if int(row["step"]) <= step]
            if rows and set(rows[0]) != set(METRIC_FIELDS):
                raise ValueError("other columns")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, csv.Error):
            raise RunError(f"{self.metrics_path}: not a boltzgen metrics table; restore it, or start over with "
                           "--force") from None
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

    def run(self, resume: bool = False, stop_after: int | None = None, on_log: Callable[[dict], None] | None = None,
            on_start: Callable[[], None] | None = None) -> None:
        """Train to the end of the last stage (or ``stop_after`` steps in total, to emulate a crash).

        ``on_start`` runs once the checkpoint is restored (or training is initialized), before the
        first step: the place to commit to a resume, since a checkpoint that fails to load raises first.

        SIGINT (Ctrl-C) and SIGTERM stop training at the next step boundary and checkpoint there, so
        ``resume`` continues bit for bit; a second Ctrl-C stops at once (the last periodic checkpoint
        stays valid). Either way the run ends with KeyboardInterrupt.
        """
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.checkpoint_path.exists():
            self.load_checkpoint()
        else:
            if self.world.is_main:
                self._write_metrics([], mode="w")
            self._initialize_from_data()
        if on_start is not None:
            on_start()
        self.generator.train()
        end = self.total_steps if stop_after is None else min(self.total_steps, stop_after)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.progress and self.world.is_main),
                   desc="train", unit="step")
        started = time.perf_counter() - self.wall_seconds
        try:
            with _stop_at_step_boundary() as stop_requested:
                while self.step < end:
                    row = self._step(started)
                    if row is not None and self.world.is_main:
                        self._write_metrics([row], mode="a")
                        bar.set_postfix(loss=f"{row['loss']:.3f}", ess=f"{row['ess']:.3f}")
                        if on_log is not None:
                            on_log(row)
                    stop = distributed.any_rank(stop_requested())  # a signal to one rank stops them all here
                    if self.step % self.checkpoint_every == 0 or self.step == end or stop:
                        self.save_checkpoint()
                    bar.update(1)
                    if stop:
                        raise KeyboardInterrupt
        finally:
            bar.close()
            self.generator.eval()

    def _step(self, started: float) -> dict | None:
        """One optimization step; returns the metrics row when this step is logged."""
        stage_idx = self.stage_index(self.step)
        stage = self.stages[stage_idx]
        optimizer = self._ensure_optimizer(stage_idx)
        lr = self._lr(stage_idx, self.step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        result = self.train_step(stage, stage_idx)
        if not torch.isfinite(result.loss):
            raise RunError(f"training[{stage_idx}]: the loss became {float(result.loss)} at step {self.step}; "
                           "lower this stage's lr or u_max")
        result.loss.backward()
        # In a launch: every rank gets the gradient of the global batch's mean loss, and the count of all ranks.
        n_nonfinite = int(distributed.average_gradients(self.generator.parameters(), [result.n_nonfinite])[0])
        grad_norm = torch.nn.utils.clip_grad_norm_(self.generator.parameters(), stage.grad_clip)
        if torch.isfinite(grad_norm):
            optimizer.step()
        self.n_nonfinite += n_nonfinite
        self.step += 1
        self.wall_seconds = time.perf_counter() - started
        if not (self.step % self.log_every == 0 or self.step == self.total_steps):
            return None
        ess = result.ess if not math.isnan(result.ess) else self._eval_ess(min(stage.batch, 1024))
        if result.diagnostics:
            self.diagnostics.append({"step": self.step, "stage": stage_idx, **result.diagnostics})
        loss, forward_nll, reverse_kl = distributed.mean_over_ranks(
            [float(result.loss.detach()), result.forward_nll, result.reverse_kl])
        return {
            "step": self.step, "stage": stage_idx, "loss": loss,
            "forward_nll": forward_nll, "reverse_kl": reverse_kl, "ess": ess, "lr": lr,
            "grad_norm": float(grad_norm), "n_nonfinite": self.n_nonfinite,
            "energy_evaluations": int(distributed.sum_over_ranks([self.generator.energy.evaluations])[0]),
            "wall_seconds": self.wall_seconds,
        }


@contextmanager
def _stop_at_step_boundary() -> Iterator[Callable[[], bool]]:
    """Defer SIGINT and SIGTERM to the caller's next check (main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    requested: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        requested.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(requested)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def read_checkpoint(path: Path) -> dict:
    """A training checkpoint as saved by :meth:`Trainer.save_checkpoint`; a RunError when it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated, random or foreign bytes: torch raises many kinds
        raise RunError(f"{path}: cannot be loaded ({type(exc).__name__}): truncated or not a boltzgen checkpoint; "
                       "start over with --force") from None
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= set(state):
        raise RunError(f"{path}: not a boltzgen training checkpoint; start over with --force")
    return state


#: Index buffers that checkpoints written before the flows' features became non-persistent hold;
#: they are rebuilt from the masks, so they are dropped on load.
RETIRED_BUFFERS = (".cond_idx", ".cond_circular", ".made.circular")


def load_model_state(generator: torch.nn.Module, model_state: dict, path: Path) -> None:
    """Load a checkpoint's model state; a RunError naming the first difference when the flows differ."""
    model_state = {name: t for name, t in model_state.items() if not name.endswith(RETIRED_BUFFERS)}
    expected = {name: tuple(t.shape) for name, t in generator.state_dict().items()}
    saved = {name: tuple(getattr(t, "shape", ())) for name, t in model_state.items()}
    differences = sorted(set(expected) ^ set(saved)) + sorted(n for n in expected.keys() & saved.keys()
                                                              if expected[n] != saved[n])
    if differences:
        name = differences[0]
        raise RunError(f"{path}: the checkpoint's flow does not match the config ({len(differences)} tensors differ, "
                       f"first {name}: {saved.get(name, 'absent')} saved, {expected.get(name, 'absent')} now); "
                       "resume with the config it was trained with, or train into a new --out")
    generator.load_state_dict(model_state)
