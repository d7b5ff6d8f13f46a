"""State expressions and collective variables."""

from __future__ import annotations

import math

import mdtraj
import numpy as np
import pytest
import torch

from boltzgen.states import (
    StateDefinition,
    backbone_torsions,
    cartesian_cvs,
    check_state_cvs,
    dihedral_cvs,
    names_used,
    resolve_states,
    torsion_cv_names,
)


@pytest.fixture
def cvs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x0": rng.normal(size=500), "x1": rng.normal(size=500), "phi": rng.uniform(-3, 3, 500)}


def test_chained_comparisons(cvs: dict[str, np.ndarray]) -> None:
    phi = cvs["phi"]
    chained = StateDefinition("0 < phi < 2.2").evaluate(cvs)
    np.testing.assert_array_equal(chained, (phi > 0) & (phi < 2.2))
    np.testing.assert_array_equal(StateDefinition("-1 <= phi <= 0 < 1").evaluate(cvs), (phi >= -1) & (phi <= 0))
    result = StateDefinition("x0 < 0").evaluate(cvs)
    assert result.dtype == np.bool_ and result.shape == (500,)


def test_boolean_logic_and_precedence(cvs: dict[str, np.ndarray]) -> None:
    x0, x1 = cvs["x0"], cvs["x1"]
    and_state = StateDefinition("x0 < 0 and x1 > 0.5")
    np.testing.assert_array_equal(and_state.evaluate(cvs), (x0 < 0) & (x1 > 0.5))
    np.testing.assert_array_equal(StateDefinition("not (x0 < 0)")(cvs), x0 >= 0)
    # `and` binds tighter than `or`, as in Python
    expected = (x0 < -1) | ((x1 > 0.5) & (x1 < 1))
    np.testing.assert_array_equal(StateDefinition("x0 < -1 or x1 > 0.5 and x1 < 1")(cvs), expected)
    np.testing.assert_array_equal(StateDefinition("x0 < 0").complement()(cvs), ~(x0 < 0))


def test_arithmetic_abs_and_pi(cvs: dict[str, np.ndarray]) -> None:
    x0, x1, phi = cvs["x0"], cvs["x1"], cvs["phi"]
    np.testing.assert_array_equal(StateDefinition("abs(x0 - 1) < 0.5")(cvs), np.abs(x0 - 1) < 0.5)
    np.testing.assert_array_equal(StateDefinition("-x0 > 2 * x1 / 3 + 0.1")(cvs), -x0 > 2 * x1 / 3 + 0.1)
    np.testing.assert_array_equal(StateDefinition("phi < -pi / 2")(cvs), phi < -math.pi / 2)
    torch_cvs = {k: torch.tensor(v) for k, v in cvs.items()}
    np.testing.assert_array_equal(StateDefinition("x0 < x1")(torch_cvs), x0 < x1)


@pytest.mark.parametrize(
    ("expression", "offending"),
    [
        ("__import__('os').system('ls') < 1", "__import__"),
        ("x0.real < 0", "x0.real"),
        ("x0[0] < 1", "x0[0]"),
        ("open('f') < 1", "open('f')"),
        ("abs(x0, 1) < 1", "abs(x0, 1)"),
        ("x0 ** 2 < 1", "x0 ** 2"),
        ("x0 // 2 < 1", "x0 // 2"),
        ("'a' < x0", "'a'"),
        ("True and x0 < 1", "True"),
        ("(lambda: 1)() < x0", "lambda"),
        ("x0 in x1", "x0 in x1"),
        ("(x0 < 1) + 1 < 2", "x0 < 1"),
        ("not x0", "not x0"),
        ("x0 < 1 if x1 < 0 else x0 > 1", "if"),
        ("__class__ < 1", "__class__"),
    ],
)
def test_rejects_disallowed_expressions(expression: str, offending: str) -> None:
    with pytest.raises(ValueError) as info:
        StateDefinition(expression)
    message = str(info.value)
    assert repr(expression) in message and offending in message


@pytest.mark.parametrize("expression", ["x0", "x0 + 1", "1 < 2", "x0 < < 1", "", "x0 < 1; x1"])
def test_rejects_non_conditions_and_bad_syntax(expression: str) -> None:
    with pytest.raises(ValueError, match="state expression"):
        StateDefinition(expression)


def test_names_used_and_missing_cv(cvs: dict[str, np.ndarray]) -> None:
    assert names_used("0 < phi < pi and abs(psi) > 1") == {"phi", "psi"}
    state = StateDefinition("x0 < 0 and psi > 1")
    assert state.names_used() == {"x0", "psi"}
    with pytest.raises(ValueError, match="psi"):
        state.evaluate(cvs)


def test_resolve_states_rest_and_not(cvs: dict[str, np.ndarray]) -> None:
    x0 = cvs["x0"]
    states = resolve_states({"A": "x0 < 0", "B": "x0 > 1", "C": "rest"})
    assert list(states) == ["A", "B", "C"]
    np.testing.assert_array_equal(states["C"](cvs), (x0 >= 0) & (x0 <= 1))
    total = sum(states[k](cvs).astype(int) for k in "ABC")
    assert np.all(total == 1)  # A, B and rest partition the samples
    pair = resolve_states({"B": "not A", "A": "x0 < 0 and x1 > 0"})
    np.testing.assert_array_equal(pair["B"](cvs), ~((x0 < 0) & (cvs["x1"] > 0)))
    # rest excludes every other state, complements included: here nothing is left
    assert not resolve_states({"A": "x0 < 0", "D": "not A", "R": "rest"})["R"](cvs).any()
    with pytest.raises(ValueError, match="only one"):
        resolve_states({"A": "x0 < 0", "B": "rest", "C": "rest"})
    with pytest.raises(ValueError, match="cycle"):
        resolve_states({"A": "not B", "B": "not A"})
    with pytest.raises(ValueError, match="'B'"):
        resolve_states({"A": "x0 < 0", "B": "x0.imag < 0"})


def test_cartesian_cvs() -> None:
    x = torch.arange(12.0).reshape(4, 3)
    cv = cartesian_cvs(x)
    assert list(cv) == ["x0", "x1", "x2"]
    np.testing.assert_array_equal(cv["x1"], [1.0, 4.0, 7.0, 10.0])
    assert cv["x0"].dtype == np.float64


def _dihedral(p: np.ndarray) -> np.ndarray:
    """IUPAC dihedral of points p [N, 4, 3] in radians, from its textbook definition."""
    b0, b1, b2 = p[:, 0] - p[:, 1], p[:, 2] - p[:, 1], p[:, 3] - p[:, 2]
    b1 = b1 / np.linalg.norm(b1, axis=1, keepdims=True)
    v = b0 - np.sum(b0 * b1, axis=1, keepdims=True) * b1
    w = b2 - np.sum(b2 * b1, axis=1, keepdims=True) * b1
    return np.arctan2(np.sum(np.cross(b1, v) * w, axis=1), np.sum(v * w, axis=1))


def _backbone(n_ala: int) -> mdtraj.Topology:
    """ACE(C) - n x ALA(N, CA, C) - NME(N): only the atoms the backbone dihedrals use."""
    top = mdtraj.Topology()
    chain = top.add_chain()
    for name, atoms in [("ACE", ["C"]), *[("ALA", ["N", "CA", "C"])] * n_ala, ("NME", ["N"])]:
        residue = top.add_residue(name, chain)
        for atom in atoms:
            top.add_atom(atom, mdtraj.element.get_by_symbol(atom[0]), residue)
    return top


def test_dihedral_cvs_single_residue_against_formula() -> None:
    top = _backbone(1)  # atoms C0 N1 CA1 C1 N2
    pos = np.random.default_rng(1).normal(scale=0.15, size=(50, 5, 3))
    torsions = backbone_torsions(top)
    assert torsions == {"phi0": (0, 1, 2, 3), "psi0": (1, 2, 3, 4)}
    cv = dihedral_cvs(pos, torsions)
    np.testing.assert_allclose(cv["phi"], _dihedral(pos[:, [0, 1, 2, 3]]), atol=1e-12)
    np.testing.assert_allclose(cv["psi"], _dihedral(pos[:, [1, 2, 3, 4]]), atol=1e-12)
    assert cv["phi"].dtype == np.float64 and np.all((cv["phi"] >= -math.pi) & (cv["phi"] < math.pi))
    flat = dihedral_cvs(torch.tensor(pos.reshape(50, 15)), torsions)
    np.testing.assert_allclose(flat["phi"], cv["phi"])
    state = StateDefinition("0 < phi < 2.2")
    np.testing.assert_array_equal(state(cv), (cv["phi"] > 0) & (cv["phi"] < 2.2))


def test_dihedral_cvs_names_per_residue() -> None:
    top = _backbone(2)  # C0 N1 CA1 C1 N2 CA2 C2 N3
    pos = np.random.default_rng(2).normal(scale=0.15, size=(20, 8, 3))
    cv = dihedral_cvs(pos, backbone_torsions(top))
    assert list(cv) == ["phi0", "phi1", "phi", "psi0", "psi1", "psi"]
    np.testing.assert_array_equal(cv["phi"], cv["phi0"])
    np.testing.assert_allclose(cv["phi1"], _dihedral(pos[:, [3, 4, 5, 6]]), atol=1e-5)
    np.testing.assert_allclose(cv["psi1"], _dihedral(pos[:, [4, 5, 6, 7]]), atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        dihedral_cvs(pos[:, :7], backbone_torsions(top))


def test_backbone_torsions_need_a_backbone() -> None:
    top = mdtraj.Topology()
    residue = top.add_residue("HOH", top.add_chain())
    top.add_atom("O", mdtraj.element.oxygen, residue)
    with pytest.raises(ValueError, match="no phi"):
        backbone_torsions(top)


def test_central_residue_phi_of_three_residues() -> None:
    """ACE-(ALA)3-NME: phi1 is the middle alanine's phi, and a state on it reads that torsion alone."""
    top = _backbone(3)  # C0 N1 CA1 C1 N2 CA2 C2 N3 CA3 C3 N4
    torsions = backbone_torsions(top)
    assert torsions["phi1"] == (3, 4, 5, 6)
    pos = np.random.default_rng(3).normal(scale=0.15, size=(200, 11, 3))
    cv = dihedral_cvs(pos, torsions)
    assert torsion_cv_names(torsions) == list(cv) == ["phi0", "phi1", "phi2", "phi", "psi0", "psi1", "psi2", "psi"]
    np.testing.assert_allclose(cv["phi1"], _dihedral(pos[:, [3, 4, 5, 6]]), atol=1e-12)
    states = resolve_states({"A": "not B", "B": "0 < phi1 < 2.2"})
    check_state_cvs(states, torsion_cv_names(torsions))
    in_b = (cv["phi1"] > 0) & (cv["phi1"] < 2.2)
    assert 0 < in_b.sum() < len(in_b)
    np.testing.assert_array_equal(states["B"](cv), in_b)
    np.testing.assert_array_equal(states["A"](cv), ~in_b)


def test_unknown_residue_index_names_the_state_that_wrote_it() -> None:
    names = torsion_cv_names(backbone_torsions(_backbone(3)))
    # B is checked before its complement A, though A comes first.
    with pytest.raises(ValueError) as info:
        check_state_cvs(resolve_states({"A": "not B", "B": "0 < phi3 < 2.2"}), names)
    message = str(info.value)
    assert "\n" not in message and message.startswith("B: unknown CV phi3;")
    assert "phi0, phi1, phi2, phi, psi0" in message and "from 0 in chain order" in message
    with pytest.raises(ValueError, match="^A: unknown CV x0; this system's CVs are none$"):
        check_state_cvs(resolve_states({"A": "x0 < 0"}), [])


@pytest.mark.parametrize(("expression", "box"), [
    ("0 < phi < 2.2", {"phi": (0.0, 2.2)}),
    ("2.2 > phi >= -1", {"phi": (-1.0, 2.2)}),
    ("x0 > 0.5 and x1 < -pi/4", {"x0": (0.5, math.inf), "x1": (-math.inf, -math.pi / 4)}),
    ("phi > 0 and phi < 1 and phi > 0.5", {"phi": (0.5, 1.0)}),
    ("not (0 < phi < 2.2)", None),
    ("phi > 0 or psi < 1", None),
    ("phi + psi > 0", None),
    ("abs(phi) < 1", None),
    ("phi == 0", None),
    ("1 < 2 and phi > 0", None),
])
def test_a_conjunction_of_bounds_is_a_box_and_nothing_else_is(expression, box):
    assert StateDefinition(expression).box() == box


def test_a_box_holds_exactly_the_states_members():
    rng = np.random.default_rng(0)
    cvs = {"x0": rng.uniform(-2, 2, 5000), "x1": rng.uniform(-2, 2, 5000)}
    state = StateDefinition("-0.5 < x0 < 1.2 and x1 >= 0.3")
    (low0, high0), (low1, high1) = state.box()["x0"], state.box()["x1"]
    inside = (cvs["x0"] > low0) & (cvs["x0"] < high0) & (cvs["x1"] > low1) & (cvs["x1"] < high1)
    assert np.array_equal(state.evaluate(cvs), inside)
