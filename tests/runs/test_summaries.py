"""The summary dataclasses: their JSON keys, NaN and None conventions, and validation when read."""

from __future__ import annotations

import json
import math

import pytest

from boltzgen.errors import DataFileError
from boltzgen.estimators.free_energy import FreeEnergy
from boltzgen.runs.summaries import FreeEnergyRow, MCMCSummary, MDSummary


def _md_summary(**changes) -> MDSummary:
    fields = dict(name="ala", source="MD 300 K", ess=1.0, n_samples=100, n_nonfinite=0,
                  free_energies=[FreeEnergyRow.of(("A", "B"), FreeEnergy(3.5, math.nan, 12.0))],
                  tau_int_frames={"phi": math.inf, "psi": 2.0}, energy_evaluations={"md": 10, "total": 10},
                  md_wall_seconds=1.5, wall_seconds=2.0)
    return MDSummary(**{**fields, **changes})


def test_json_keys_are_the_public_ones_and_round_trip(tmp_path):
    summary = _md_summary()
    data = summary.to_json()
    assert list(data) == ["name", "method", "source", "ess", "n_samples", "n_nonfinite", "free_energies",
                          "tau_int_frames", "energy_evaluations", "md_wall_seconds", "wall_seconds"]
    row = data["free_energies"][0]
    # "from" is the key (a keyword in Python), a NaN error is null, an absent optional key is left out
    assert row == {"from": "A", "to": "B", "delta_f_kT": 3.5, "stderr_kT": None, "n_eff": 12.0}
    assert data["tau_int_frames"] == {"phi": None, "psi": 2.0} and data["method"] == "md"
    summary.write(tmp_path / "summary.json")
    back = MDSummary.read(tmp_path / "summary.json")
    assert back.to_json() == data
    assert math.isnan(back.free_energies[0].stderr_kT) and math.isnan(back.tau_int_frames["phi"])
    assert json.loads((tmp_path / "summary.json").read_text()) == data


def test_exact_and_empty_state_appear_only_when_set():
    row = FreeEnergyRow.of(("A", "B"), FreeEnergy(math.inf, math.nan, 0.0, empty_state="B"), exact_kT=3.38)
    assert row.to_json()["empty_state"] == "B" and row.to_json()["exact_kT"] == 3.38
    assert not row.estimable


def test_unknown_keys_are_ignored_so_newer_files_read():
    data = {**_md_summary().to_json(), "schema_version": 7, "something_new": [1, 2]}
    assert MDSummary.from_json(data).to_json() == _md_summary().to_json()


@pytest.mark.parametrize(("change", "where"), [
    (lambda d: d.pop("free_energies"), "free_energies"),
    (lambda d: d.update(n_samples="many"), "n_samples"),
    (lambda d: d["free_energies"][0].pop("to"), "free_energies.0.to"),
])
def test_a_summary_of_the_wrong_shape_names_the_file_and_the_key(tmp_path, change, where):
    data = _md_summary().to_json()
    change(data)
    path = tmp_path / "md" / "summary.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    with pytest.raises(DataFileError) as info:
        MDSummary.read(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {where}:") and "\n" not in message


def test_unreadable_summaries_are_data_file_errors(tmp_path):
    with pytest.raises(DataFileError, match="file not found"):
        MCMCSummary.read(tmp_path / "missing.json")
    garbage = tmp_path / "summary.json"
    garbage.write_bytes(b"\xff\xfe not json")
    with pytest.raises(DataFileError, match="not a readable JSON file"):
        MCMCSummary.read(garbage)
