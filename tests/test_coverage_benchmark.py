"""benchmarks/coverage.py: the statistics it reports and the overrides each MD baseline runs with."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

from boltzgen.config import load_config

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "coverage.py"
_spec = importlib.util.spec_from_file_location("coverage_benchmark", _PATH)
coverage = importlib.util.module_from_spec(_spec)
sys.modules["coverage_benchmark"] = coverage  # dataclasses look their module up there
_spec.loader.exec_module(coverage)  # type: ignore[union-attr]


def test_wilson_interval_holds_the_proportion_and_covers_it() -> None:
    rng = np.random.default_rng(0)
    held = 0
    for _ in range(400):
        k = rng.binomial(20, 0.95)
        lo, hi = coverage.wilson_interval(k, 20)
        assert lo <= k / 20 <= hi
        held += lo <= 0.95 <= hi
    assert held / 400 > 0.9


def test_exchange_umbrella_runs_its_own_windows_and_steps_after_the_budget() -> None:
    budget = coverage.BUDGET["mueller_brown_particle"]
    for name in ("umbrella", "umbrella_exchange", "umbrella_2d"):
        estimator = coverage.MD_ESTIMATORS[name]
        config = load_config(coverage.SYSTEMS["mueller_brown_particle"],
                             [*budget, *coverage.umbrella_overrides(estimator, budget)])[0]
        assert tuple(config.umbrella.cv_names) == estimator.umbrella_cvs
        if name == "umbrella_exchange":
            assert config.umbrella.exchange_every == 50 and config.umbrella.steps_per_window == 200_000
            assert config.umbrella.cvs[0].spacing_nm == 0.05
        else:
            assert config.umbrella.exchange_every is None and config.umbrella.steps_per_window == 20_000
