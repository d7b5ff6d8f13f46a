"""Replica exchange between umbrella windows: the pairs, the Metropolis test, and a short run on the
Mueller-Brown particle whose profile along x is known by quadrature."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from boltzgen.baseline_config import UmbrellaConfig
from boltzgen.cvs import CollectiveVariable
from boltzgen.energies.analytic import MuellerBrown
from boltzgen.energies.particle import build_mueller_brown_particle
from boltzgen.estimators.umbrella_grid import WindowGrid, analyze_window_grid
from boltzgen.runs.umbrella import configuration_state_changes
from boltzgen.simulation.umbrella_exchange import (
    exchange,
    neighbour_pairs,
    run_window_exchange,
)
from boltzgen.simulation.umbrella_grid import WindowGridSpec
from boltzgen.units import kT_kJ_per_mol


def test_neighbour_pairs_cover_every_edge_once_in_disjoint_sets() -> None:
    for shape, periodic in (((5,), (False,)), ((6,), (True,)), ((3, 4), (False, True))):
        sets = neighbour_pairs(shape, periodic)
        edges = [tuple(sorted(p)) for pairs in sets for p in pairs.tolist()]
        for pairs in sets:
            assert len(np.unique(pairs)) == pairs.size  # a window is in one pair of a set at most
        expected = set()
        for point in np.ndindex(*shape):
            for d, n in enumerate(shape):
                j = point[d] + 1
                if j == n and periodic[d] and n > 2:
                    j = 0
                if j < n and j != point[d]:
                    other = point[:d] + (j,) + point[d + 1:]
                    expected.add(tuple(sorted((np.ravel_multi_index(point, shape),
                                               np.ravel_multi_index(other, shape)))))
        assert sorted(edges) == sorted(expected)


def test_exchange_accepts_with_the_metropolis_probability() -> None:
    """Swapping two configurations costs Δ = b_0(x_1) + b_1(x_0) - b_0(x_0) - b_1(x_1): accepted
    always when Δ <= 0, with probability exp(-Δ) otherwise."""
    rng = np.random.default_rng(0)
    bias = np.array([[0.0, 1.5], [0.7, 0.2]])  # bias[config, window]
    delta = bias[1, 0] + bias[0, 1] - bias[0, 0] - bias[1, 1]
    pairs = np.array([[0, 1]] * 20_000)
    rate = exchange(bias, pairs, rng).mean()
    assert abs(rate - math.exp(-delta)) < 4 * math.sqrt(math.exp(-delta) / 20_000)
    assert exchange(bias[::-1].copy(), pairs[:100], rng).all()  # swapped back: Δ < 0


def test_exchange_run_matches_quadrature_and_is_reused(tmp_path: Path) -> None:
    """Windows along x inside B's deep basin of the particle: the MBAR profile of the exchange run
    agrees with quadrature, every frame's configurations are a permutation of the windows', and a
    second call reads the saved run."""
    molecule = build_mueller_brown_particle(beta=0.1, temperature_K=300.0)
    x = CollectiveVariable("x", "coordinate", (0,), axis=0)
    spec = WindowGridSpec((x,), (np.arange(0.3, 0.95, 0.1),), (800.0,))
    kw: dict[str, Any] = {"steps_per_window": 20_000, "exchange_every": 50, "equilibration_steps": 500,
                          "temperature_K": 300.0, "seed": 3, "out_dir": tmp_path, "timestep_fs": 10.0,
                          "friction_per_ps": 5.0, "report_every": 100, "progress": False}
    start = np.array([[0.6, 0.03, 0.0]])
    run, stats = run_window_exchange(molecule.system, molecule.topology, start, spec, **kw)
    owners = np.stack([w.replica for w in run.windows])
    assert all(sorted(column) == list(range(len(spec.centers))) for column in owners.T)
    assert np.all((stats.acceptance > 0.05) & (stats.acceptance < 1)) and np.all(stats.attempts > 0)

    grid = WindowGrid(spec.centers, np.asarray(spec.k) / kT_kJ_per_mol(300.0), [False])
    edges = np.linspace(0.3, 0.9, 7)
    states = [np.stack([v[:, 0] < 0.6, v[:, 0] >= 0.6], axis=1) for v in run.values]
    est = analyze_window_grid(grid, run.values, states, [edges], n_bootstrap=20, rng=0, joint_blocks=True)
    xs = np.linspace(0.3, 0.9, 601)
    ys = np.linspace(-1.0, 1.0, 801)
    mesh = torch.tensor(np.stack(np.meshgrid(xs, ys, indexing="ij"), -1).reshape(-1, 2))
    u = MuellerBrown(0.1).reduced_energy(mesh).numpy().reshape(len(xs), len(ys))
    p_x = np.exp(-(u - u.min())).sum(axis=1)
    exact_b = -math.log(p_x[xs >= 0.6].sum() / p_x[xs < 0.6].sum())
    # MBAR normalizes over all frames, which reach a little past the range; the states split it at 0.6.
    assert abs(est.delta_f_kT[0] - exact_b) < 4 * est.stderr_kT[0] + 0.05
    assert not est.inconsistent_windows.any()

    again, _ = run_window_exchange(molecule.system, molecule.topology, start, spec, **kw)
    assert np.array_equal(again.windows[2].positions_nm, run.windows[2].positions_nm)
    assert again.wall_seconds == run.wall_seconds


def test_configuration_state_changes_follow_each_configuration() -> None:
    """Two windows swap their configurations at every frame; each configuration keeps its state, so
    the windows' own series flip at every frame but no configuration ever changes state."""
    replicas = [np.array([0, 1, 0, 1]), np.array([1, 0, 1, 0])]
    in_b = [np.array([False, True, False, True]), np.array([True, False, True, False])]
    states = [np.stack([~b, b], axis=1) for b in in_b]
    assert configuration_state_changes(replicas, states) == 0
    states[0][3] = [True, False]
    assert configuration_state_changes(replicas, states) == 1


def test_exchange_settings_are_checked_at_load() -> None:
    x = {"name": "x", "range_nm": [0.0, 1.0], "spacing_nm": 0.1, "k_kJ_per_mol_nm2": 500}
    ok = UmbrellaConfig(cvs=[x], steps_per_window=2000, report_every=100, exchange_every=50)
    assert ok.exchange_every == 50
    for bad, words in (({"exchange_every": 30}, "divide"), ({"exchange_every": 300}, "divide"),
                       ({"exchange_every": 50, "pilot_steps_per_window": 1000, "prune_above_kT": 5}, "prune")):
        with pytest.raises(ValidationError, match=words):
            UmbrellaConfig(cvs=[x], steps_per_window=2000, report_every=100, **bad)
    with pytest.raises(ValidationError, match="flattened"):
        UmbrellaConfig(cvs=["phi"], exchange_every=50)
