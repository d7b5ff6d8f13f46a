"""Training stages without data: FAB (AIS toward p^2/q with a prioritized replay buffer) and
temperature annealing. The Trainer runs them through :func:`make_runner`."""

from boltzgen.stages.base import DATA_FREE_LOSSES, StageRunner, StageStep, make_runner

__all__ = ["DATA_FREE_LOSSES", "StageRunner", "StageStep", "make_runner"]
