"""Training data for molecules: MD seeded in a state the plain run misses, kept there by walls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from boltzgen.config import load_config
from boltzgen.runs.baselines import _state_walls, diverse_seeds, run_md
from boltzgen.runs.rundir import RunDir
from boltzgen.runs.target import build_target

PARTICLE = Path(__file__).resolve().parents[2] / "systems" / "mueller_brown_particle.yaml"


def particle_config(confine: bool, states: dict[str, str]):
    """The Mueller-Brown particle with short runs; the plain MD (from the deep basin) never reaches
    x0 > 0.25 in 20,000 steps, the hot one does."""
    config, _ = load_config(PARTICLE)
    md = config.md.model_copy(update=dict(steps=20_000, seed_states=True, seeded_steps=20_000, hot_steps=20_000,
                                          hot_temperature_K=3000, confine_seeded=confine))
    return config.model_copy(update=dict(md=md, states=states))


@pytest.mark.parametrize("confine", [True, False])
def test_a_seeded_run_with_walls_stays_in_its_state(tmp_path, confine):
    config = particle_config(confine, {"A": "not B", "B": "x0 > 0.25"})
    data = run_md(config, build_target(config), RunDir(tmp_path).md, progress=False)
    plain, seeded = data.x[: data.n_plain], data.x[data.n_plain:]
    assert len(seeded) == 200 and (plain[:, 0] > 0.25).mean() == 0.0
    in_b = (seeded[:, 0] > 0.25).mean()
    if confine:  # k 1000 kJ/mol/nm^2: 0.05 nm beyond the bound costs ~1 kT at 300 K
        assert in_b > 0.95 and seeded[:, 0].min() > 0.25 - 0.15, (in_b, seeded[:, 0].min())
    else:
        assert in_b < 0.9, in_b  # the same run without walls drifts back towards A


def test_only_a_box_state_gets_walls():
    config = particle_config(True, {"A": "not B", "B": "x0 > 0.25", "C": "x1 < 0.3 * x0"})
    target = build_target(config)
    assert [type(f).__name__ for f in _state_walls(target, "B")] == ["CustomExternalForce"]
    assert _state_walls(target, "A") is None and _state_walls(target, "C") is None


def test_one_seed_per_basin_each_its_lowest_energy_frame():
    rng = np.random.default_rng(1)
    # Two basins on the circle, one straddling +-pi: a seed in each, at its lowest energy.
    phi = np.concatenate([rng.normal(1.0, 0.2, 300), np.angle(np.exp(1j * rng.normal(np.pi, 0.2, 300)))])
    energy = rng.normal(0.0, 1.0, 600)
    seeds = diverse_seeds(energy, {"phi": phi}, 2, periodic=True)
    near_one = np.abs(phi[seeds] - 1.0) < 1.0
    assert sorted(near_one.tolist()) == [False, True]
    for seed in seeds:
        basin = (np.abs(phi - 1.0) < 1.0) == (abs(phi[seed] - 1.0) < 1.0)
        assert energy[seed] == energy[basin].min()
    assert np.array_equal(seeds, diverse_seeds(energy, {"phi": phi}, 2, periodic=True))  # deterministic


def test_no_more_seeds_than_distinct_frames():
    seeds = diverse_seeds(np.array([3.0, 1.0, 2.0]), {"x0": np.zeros(3)}, 4, periodic=False)
    assert seeds.tolist() == [1]


def test_seed_states_all_seeds_the_visited_state_too(tmp_path):
    config = particle_config(True, {"A": "not B", "B": "x0 > 0.25"})
    config = config.model_copy(update={"md": config.md.model_copy(update={"seed_states": "all"})})
    data = run_md(config, build_target(config), RunDir(tmp_path).md, progress=False)
    seeded = data.x[data.n_plain:]
    assert len(seeded) == 400  # 4 runs in A (no walls: "not B" is no box), then 4 in B
    assert (seeded[:200, 0] > 0.25).mean() < 0.5 and (seeded[200:, 0] > 0.25).mean() > 0.95
    assert sorted(p.name for p in (tmp_path / "md").glob("seeded_*_?.h5")) == [
        f"seeded_{s}_{k}.h5" for s in "AB" for k in range(4)]
