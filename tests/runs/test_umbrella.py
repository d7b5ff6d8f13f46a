"""The umbrella command's check against plain MD (boltzgen.runs.umbrella) on an exactly known torsion."""

from __future__ import annotations

import math

import numpy as np
import pytest

from boltzgen.cvs import CollectiveVariable
from boltzgen.runs.rundir import RunDir
from boltzgen.runs.summaries import Profile, UmbrellaFreeEnergyRow
from boltzgen.runs.umbrella import _warnings, blocked_profile, md_check
from boltzgen.simulation.langevin import run_langevin
from tests.simulation.chain import CHAIN, MD_KW, exact_bin_profile, make_chain

EDGES = np.linspace(-math.pi, math.pi, 25)
CENTERS = 0.5 * (EDGES[1:] + EDGES[:-1])


def test_blocked_profile_errors_and_visits() -> None:
    rng = np.random.default_rng(0)
    values = rng.uniform(-1.0, 1.0, 40_000)  # bins outside [-1, 1] are never visited
    f, se, visited = blocked_profile(values, EDGES, None, n_blocks=20)
    inside = np.abs(CENTERS) < 0.9
    assert np.all(visited[inside]) and not np.any(visited[np.abs(CENTERS) > 1.1])
    p = np.exp(-f[inside])
    binomial = np.sqrt((1 - p) / (p * len(values)))  # independent frames: the jackknife matches it
    np.testing.assert_allclose(se[inside], binomial, rtol=0.5)
    assert np.all(np.isinf(f[np.abs(CENTERS) > 1.1]))


@pytest.fixture(scope="module")
def run_with_md(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    """A run directory whose plain MD is the 4-atom chain, whose torsion density is known exactly."""
    run = RunDir(tmp_path_factory.mktemp("run"))
    system, top, pos = make_chain()
    run.md.path.mkdir(parents=True)
    run_langevin(system, top, pos, steps=400_000, report_every=20, seed=5, out_h5=run.md.trajectory, **MD_KW)
    return run


def test_md_check_passes_the_exact_profile_and_flags_a_wrong_one(run_with_md: RunDir) -> None:
    cv = CollectiveVariable("phi", "torsion", CHAIN)
    exact = exact_bin_profile(EDGES)
    right = Profile(centers_rad=list(CENTERS), f_kT=list(exact + 1.7), stderr_kT=[0.03] * 24)
    check = md_check(run_with_md, cv, right)
    assert check is not None and check.cv == "phi" and check.n_bins >= 8
    assert not check.disagree and check.rmse_kT < 0.1 and check.p_value > 1e-3
    bumped = exact.copy()
    bumped[CENTERS > 2.5] += 0.6  # a well the profile gets wrong where the MD is converged
    wrong = md_check(run_with_md, cv, Profile(centers_rad=list(CENTERS), f_kT=list(bumped), stderr_kT=[0.03] * 24))
    assert wrong.disagree and wrong.max_abs_z > 5
    row = UmbrellaFreeEnergyRow(from_="A", to="B", delta_f_kT=1.0, stderr_kT=0.05, halves_kT=[0.8, 1.2], p_b=0.3,
                                error_method="test")
    warnings = _warnings([check, wrong], [row])
    assert len(warnings) == 2 and "disagrees with plain MD" in warnings[0] and "halves" in warnings[1]
    assert md_check(RunDir(run_with_md.path / "elsewhere"), cv, right) is None  # no MD, no check
