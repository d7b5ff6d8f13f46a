"""Umbrella sampling fanned out over 2 gloo processes (as under torchrun): the stage-1 walks and the
production repeats split by rank give exactly the single-process result, whose seeds they keep."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from boltzgen.simulation import umbrella
from tests.launch import spawn
from tests.simulation.chain import CHAIN, make_chain, state_b

SETTINGS = {
    "dihedral_atoms": CHAIN, "psi_atoms": None, "temperature_K": 300.0, "state_b": state_b, "seed": 3,
    "stage1_spacing_deg": 30.0, "stage1_k_kJ_per_mol_rad2": 20.0, "stage1_steps_per_window": 1_000,
    "stage1_equilibration_steps": 200, "stage1_skip_ranges_deg": (), "f_cap_kT": 18.0, "production_steps": 10_000,
    "production_equilibration_steps": 1_000, "n_repeats": 2, "report_every": 50, "timestep_fs": 4.0,
    "friction_per_ps": 5.0, "progress": False, "parallel": False,
}


def _umbrella_worker(rank: int, out: str) -> None:
    ran = {"windows": 0, "repeats": 0}

    def counted(function, key):
        def run(*args, **kwargs):
            ran[key] += 1
            return function(*args, **kwargs)
        return run

    umbrella._run_window = counted(umbrella._run_window, "windows")
    umbrella._production_worker = counted(umbrella._production_worker, "repeats")
    system, top, pos = make_chain()
    result = umbrella.run_flattened_umbrella(system, top, pos, out_dir=Path(out), **SETTINGS)
    np.save(Path(out) / f"estimate_rank{rank}.npy", [result.estimate.delta_f_kT, result.estimate.stderr_kT,
                                                      result.stage1_delta_f_kT, result.energy_evaluations])
    np.save(Path(out) / f"ran_rank{rank}.npy", [ran["windows"], ran["repeats"]])


def test_two_ranks_run_the_umbrella_windows_and_repeats_of_one(tmp_path: Path) -> None:
    system, top, pos = make_chain()
    one = umbrella.run_flattened_umbrella(system, top, pos, out_dir=tmp_path / "one", **SETTINGS)
    spawn(_umbrella_worker, 2, str(tmp_path / "two"))
    expected = [one.estimate.delta_f_kT, one.estimate.stderr_kT, one.stage1_delta_f_kT, one.energy_evaluations]
    for rank in range(2):  # every rank has the whole analysis, identical to one process's
        np.testing.assert_array_equal(np.load(tmp_path / "two" / f"estimate_rank{rank}.npy"), expected)
    assert np.isfinite(one.estimate.delta_f_kT) and one.energy_evaluations == 12 * 1_200 + 2 * 10_000
    ran = [np.load(tmp_path / "two" / f"ran_rank{rank}.npy") for rank in range(2)]
    assert [r[1] for r in ran] == [1, 1]  # one production repeat each
    assert ran[0][0] + ran[1][0] == 12 and min(ran[0][0], ran[1][0]) > 0  # one walk of windows each
