"""Shared by the training benchmarks: a config's trainer on given data, and one optimizer step that
stays inside a chosen stage (so a stage can be timed for as long as wanted).

It calls only what every benchmarked revision of boltzgen has: ``training_throughput.py`` runs it
against earlier commits, whose package is then first on ``PYTHONPATH``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def stage_trainer(config: Any, target: Any, data: Any, folder: Path) -> tuple[Any, Any]:
    """The generator of ``config`` (in its flow dtype, on the CPU) and a quiet Trainer of its stages
    on ``data`` ``[n, dim]``, writing its checkpoint and metrics into ``folder``."""
    import torch

    from boltzgen.runs.target import build_generator, to_flow_dtype
    from boltzgen.training import Trainer

    dtype = getattr(torch, config.dtype)
    generator = build_generator(config, target, data)
    to_flow_dtype(generator, torch.device("cpu"), dtype)
    trainer = Trainer(generator, config.training, folder / "c.pt", folder / "m.csv", data=data.to(dtype),
                      log_every=10**9, progress=False)
    return generator, trainer


def stage_step(trainer: Any, stage: int, started: float) -> Callable[[], None]:
    """One optimizer step of ``stage`` each call: the step counter is reset to the stage's start first."""
    first = trainer.stage_ends[stage] - trainer.stages[stage].steps

    def step() -> None:
        trainer.step = first
        trainer._step(started)

    return step
