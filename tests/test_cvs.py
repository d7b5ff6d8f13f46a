"""Collective variables by atoms (boltzgen.cvs) and the umbrella settings that name them."""

from __future__ import annotations

import math

import mdtraj
import numpy as np
import pytest

from boltzgen.config import load_config
from boltzgen.cvs import CollectiveVariable, builtin_kind, evaluate_cvs, resolve_cv
from boltzgen.errors import ConfigError
from boltzgen.geometry import dihedrals_rad
from boltzgen.states import backbone_torsions

ALANINE = "systems/alanine.yaml"


@pytest.fixture(scope="module")
def topology() -> mdtraj.Topology:
    return mdtraj.load("systems/alanine-dipeptide.pdb").topology


def test_resolve_builtin_and_atom_cvs(topology: mdtraj.Topology) -> None:
    torsions = backbone_torsions(topology)
    assert resolve_cv("phi", topology, "k") == CollectiveVariable("phi", "torsion", torsions["phi0"])
    assert resolve_cv("psi0", topology, "k").atoms == torsions["psi0"]
    named = resolve_cv("chi", topology, "k", torsion=["ALA2-N", "CA", "ALA2-CB", 11])
    assert named == CollectiveVariable("chi", "torsion", (6, 8, 10, 11))
    assert resolve_cv("d", topology, "k", distance=[4, "NME3-N"]).atoms == (4, 16)
    assert resolve_cv("z", topology, "k", coordinate=("ALA2-CA", "z")) == CollectiveVariable("z", "coordinate", (8,), 2)
    assert resolve_cv("x7", topology, "k") == CollectiveVariable("x7", "coordinate", (2,), 1)
    assert builtin_kind("psi3") == "torsion" and builtin_kind("y") == "coordinate" and builtin_kind("chi") is None


@pytest.mark.parametrize(("name", "kwargs", "message"), [
    ("d", {"distance": [4, "ALA2-XX"]}, "k.distance[1]: no atom 'ALA2-XX'"),
    ("d", {"distance": [4, 99]}, "k.distance[1]: atom index 99 is out of range"),
    ("d", {"distance": [4, "H1"]}, "not unique"),
    ("d", {"distance": [8, "ALA2-CA"]}, "the same atom twice"),
    ("phi5", {}, "no torsion phi5"),
    ("x", {}, "one-particle system"),
    ("x99", {}, "beyond the 66 coordinates"),
    ("chi", {}, "no built-in CV"),
])
def test_resolve_refuses_bad_cvs_with_the_key(topology: mdtraj.Topology, name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        resolve_cv(name, topology, "k", **kwargs)
    assert str(info.value).startswith("k") and "\n" not in str(info.value)


def test_evaluate_cvs_in_float64() -> None:
    xyz = np.random.default_rng(1).normal(size=(7, 5, 3))
    cvs = [CollectiveVariable("t", "torsion", (0, 1, 2, 3)), CollectiveVariable("d", "distance", (1, 4)),
           CollectiveVariable("y2", "coordinate", (2,), 1)]
    out = evaluate_cvs(xyz.reshape(7, -1), cvs)
    np.testing.assert_allclose(out["t"], dihedrals_rad(xyz, [(0, 1, 2, 3)])[:, 0])
    np.testing.assert_allclose(out["d"], np.linalg.norm(xyz[:, 1] - xyz[:, 4], axis=1))
    np.testing.assert_array_equal(out["y2"], xyz[:, 2, 1])
    assert all(v.dtype == np.float64 for v in out.values()) and np.all(np.abs(out["t"]) <= math.pi)


@pytest.mark.parametrize(("value", "message"), [
    ("{cvs: [phi, psi], method: flattened}", "umbrella: method flattened runs along phi alone"),
    ("{cvs: [{name: d, distance: [0, 1], range_nm: [0.4, 0.2], spacing_nm: 0.1, k_kJ_per_mol_nm2: 10}]}",
     "umbrella: cvs[0].range_nm: [0.4, 0.2] is empty, a grid with no windows"),
    ("{cvs: [{name: d, distance: [0, 1], range_nm: [0.2, 0.25], spacing_nm: 0.1, k_kJ_per_mol_nm2: 10}]}",
     "umbrella: cvs[0].spacing_nm: 0.1 leaves one window"),
    ("{cvs: [{name: d, distance: [0, 1], range_nm: [0.2, 0.4], spacing_nm: 0.1}]}", "umbrella: cvs[0].k_kJ_per_mol_nm2"),
    ("{cvs: [{name: phi, spacing_deg: 0}]}", "umbrella.cvs[0].spacing_deg: Input should be greater than 0"),
    ("{cvs: [{name: phi, spacing_deg: 200}]}", "umbrella.cvs[0].spacing_deg: Input should be less than or equal"),
    ("{cvs: [{name: phi, spacing_nm: 0.1}]}", "umbrella.cvs[0]: spacing_nm does not apply to the torsion phi"),
    ("{cvs: [{name: chi}]}", "umbrella.cvs[0]: 'chi' is no built-in CV"),
    ("{cvs: [{name: phi, torsion: [0, 1, 2, 3]}]}", "umbrella.cvs[0]: phi is a built-in CV"),
    ("{cvs: [phi, phi]}", "umbrella: cvs: ['phi', 'phi'] names a CV twice"),
    ("{cvs: [{name: phi, spacing_deg: 1}, {name: psi, spacing_deg: 1}]}", "more than 10,000"),
    ("{cvs: [phi, psi], steps_per_window: 150}", "umbrella: steps_per_window (150) must be a multiple"),
])
def test_bad_umbrella_settings_are_one_line_naming_the_key(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(ALANINE, [f"umbrella={value}"])
    text = str(info.value)
    assert "\n" not in text and message in text, text


def test_umbrella_method_follows_the_cvs() -> None:
    assert load_config(ALANINE, ["umbrella={cvs: [phi]}"])[0].umbrella.method == "flattened"
    config, resolved = load_config(ALANINE)
    assert config.umbrella.method == "windows" and config.umbrella.cv_names == ["phi", "psi"]
    assert resolved["umbrella"]["method"] == "windows"
    one = load_config(ALANINE, ["umbrella={method: windows, cvs: [psi]}"])[0].umbrella
    assert one.method == "windows" and len(one.cvs[0].window_centers()) == 18
