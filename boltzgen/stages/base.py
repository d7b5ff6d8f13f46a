"""What the Trainer needs from a stage that trains without data: a step, and its state for checkpoints."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from boltzgen.config import TrainingStage
from boltzgen.generator import BoltzmannGenerator

#: Losses that need no training data: their stage runs a :class:`StageRunner`.
DATA_FREE_LOSSES = ("fab", "annealing", "reweighted_forward_kl")

#: ``(generator, batch, u_max, temperature_factor) -> (loss, log_w, n_nonfinite)``: the Trainer's
#: reverse KL, handed to the annealing stage for its hot phase.
ReverseKL = Callable[[BoltzmannGenerator, int, float, float], tuple[Tensor, Tensor, int]]


@dataclass(frozen=True)
class StageStep:
    """One step of a data-free stage.

    ``loss``: the scalar to minimize, differentiable in the flow's parameters. ``ess``: Kish ESS /
    N of flow samples drawn in this step toward p (NaN when it drew none). ``n_nonfinite``: energies
    or densities that were not finite in this step (their samples have weight 0; counted, never
    replaced). ``reverse_kl``: the reverse KL when the step is one (NaN otherwise). ``diagnostics``:
    named floats for the stage's diagnostics table (FAB's AIS and buffer, the annealing temperature).
    """

    loss: Tensor
    ess: float
    n_nonfinite: int
    reverse_kl: float = float("nan")
    diagnostics: dict[str, float] = field(default_factory=dict)


class StageRunner(ABC):
    """The state of a data-free stage between steps; its ``state_dict`` goes into the checkpoint, so
    that a resumed run continues bit for bit."""

    @abstractmethod
    def step(self) -> StageStep:
        """Compute one step's loss (the Trainer does backward and the optimizer step)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything that a resumed run needs besides the flow, the optimizer and the RNG states."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


def make_runner(generator: BoltzmannGenerator, stage: TrainingStage, reverse_kl: ReverseKL) -> StageRunner:
    """The runner of a ``fab``, ``annealing`` or ``reweighted_forward_kl`` stage."""
    if stage.loss == "fab":
        from boltzgen.stages.fab import FABRunner

        return FABRunner(generator, stage)
    if stage.loss in ("annealing", "reweighted_forward_kl"):
        from boltzgen.stages.annealing import AnnealingRunner

        return AnnealingRunner(generator, stage, reverse_kl)
    raise ValueError(f"a {stage.loss} stage has no data-free runner")
