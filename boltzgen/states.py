"""Collective variables (CVs) and state definitions such as ``"0 < phi < 2.2"``.

A state is a boolean expression over named CVs. Expressions are parsed with :mod:`ast` and
evaluated by a small interpreter here, never by ``eval``. Allowed:

- names of CVs (``x0``, ``phi``, ...) and the constant ``pi``;
- int and float literals;
- comparisons ``< <= > >= == !=``, chained as in Python (``0 < phi < 2.2``);
- ``and``, ``or``, ``not``; parentheses;
- unary ``-``/``+``, binary ``+ - * /``, and ``abs(...)`` with one argument.

Anything else (calls, attribute access, subscripts, lambdas, strings, ...) is rejected with a
``ValueError`` naming the expression and the offending part. The expression must be a condition:
``"phi"`` or ``"phi + 1"`` alone are rejected, as is arithmetic on a condition.

CV arrays may be numpy arrays or torch tensors of shape ``[N]``. A NaN CV value makes every
comparison on it False (numpy semantics), so ``"not (phi < 0)"`` is True there.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from boltzgen.geometry import dihedrals_rad

ArrayLike = Any  # numpy array or torch tensor

#: Constants usable in expressions; a CV with the same name is shadowed by the constant.
CONSTANTS: dict[str, float] = {"pi": math.pi}

_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}
_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_BOOL, _NUM = "condition", "number"


def _to_numpy(a: ArrayLike) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _reject(expression: str, node: ast.AST, what: str) -> ValueError:
    return ValueError(
        f"state expression {_quoted(expression)}: {what} is not allowed "
        f"(offending part: {_quoted(ast.unparse(node))})"
    )


def _check(expression: str, node: ast.AST, names: set[str]) -> str:
    """Validate ``node``; return its kind (condition or number) and collect CV names."""
    if isinstance(node, ast.BoolOp):
        for value in node.values:
            if _check(expression, value, names) != _BOOL:
                raise _reject(expression, value, "a number as an operand of and/or")
        return _BOOL
    if isinstance(node, ast.UnaryOp):
        kind = _check(expression, node.operand, names)
        if isinstance(node.op, ast.Not):
            if kind != _BOOL:
                raise _reject(expression, node, "'not' applied to a number")
            return _BOOL
        if isinstance(node.op, (ast.USub, ast.UAdd)):
            if kind != _NUM:
                raise _reject(expression, node, "a sign applied to a condition")
            return _NUM
        raise _reject(expression, node, f"the operator {type(node.op).__name__}")
    if isinstance(node, ast.Compare):
        for op in node.ops:
            if type(op) not in _COMPARE:
                raise _reject(expression, node, f"the comparison {type(op).__name__}")
        for operand in (node.left, *node.comparators):
            if _check(expression, operand, names) != _NUM:
                raise _reject(expression, operand, "comparing a condition")
        return _BOOL
    if isinstance(node, ast.BinOp):
        if type(node.op) not in _BINARY:
            raise _reject(expression, node, f"the operator {type(node.op).__name__}")
        for operand in (node.left, node.right):
            if _check(expression, operand, names) != _NUM:
                raise _reject(expression, operand, "arithmetic on a condition")
        return _NUM
    if isinstance(node, ast.Call):
        if not (isinstance(node.func, ast.Name) and node.func.id == "abs"):
            raise _reject(expression, node, "a function call other than abs()")
        if len(node.args) != 1 or node.keywords:
            raise _reject(expression, node, "abs() with other than exactly one argument")
        if _check(expression, node.args[0], names) != _NUM:
            raise _reject(expression, node, "abs() of a condition")
        return _NUM
    if isinstance(node, ast.Name):
        if node.id.startswith("__"):
            raise _reject(expression, node, "a dunder name")
        if node.id not in CONSTANTS:
            names.add(node.id)
        return _NUM
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise _reject(expression, node, f"the literal of type {type(node.value).__name__}")
        return _NUM
    raise _reject(expression, node, f"the syntax {type(node).__name__}")


def _quoted(expression: str, limit: int = 80) -> str:
    """``repr(expression)``, cut to ``limit`` characters for one-line messages."""
    text = repr(expression)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _parse(expression: str) -> tuple[ast.expr, frozenset[str]]:
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError(f"state expression must be a non-empty string, got {expression!r}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
        names: set[str] = set()
        kind = _check(expression, tree.body, names)
    except SyntaxError as err:
        raise ValueError(f"state expression {_quoted(expression)} is not valid syntax: {err.msg}") from None
    except (RecursionError, MemoryError):
        raise ValueError(f"state expression {_quoted(expression)} is nested too deeply; simplify it") from None
    if kind != _BOOL:
        raise ValueError(
            f"state expression {_quoted(expression)} is a number, not a condition (add a comparison)"
        )
    if not names:
        raise ValueError(f"state expression {_quoted(expression)} uses no CV")
    return tree.body, frozenset(names)


def _evaluate(node: ast.expr, cvs: Mapping[str, np.ndarray]) -> Any:
    if isinstance(node, ast.BoolOp):
        combine = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
        result = _evaluate(node.values[0], cvs)
        for value in node.values[1:]:
            result = combine(result, _evaluate(value, cvs))
        return result
    if isinstance(node, ast.UnaryOp):
        operand = _evaluate(node.operand, cvs)
        if isinstance(node.op, ast.Not):
            return np.logical_not(operand)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.Compare):
        # each operand evaluated once, as Python does for a < b < c
        left = _evaluate(node.left, cvs)
        result = None
        for op, comparator in zip(node.ops, node.comparators):
            right = _evaluate(comparator, cvs)
            part = _COMPARE[type(op)](left, right)
            result = part if result is None else np.logical_and(result, part)
            left = right
        return result
    if isinstance(node, ast.BinOp):
        with np.errstate(divide="ignore", invalid="ignore"):
            return _BINARY[type(node.op)](_evaluate(node.left, cvs), _evaluate(node.right, cvs))
    if isinstance(node, ast.Call):
        return np.abs(_evaluate(node.args[0], cvs))
    if isinstance(node, ast.Name):
        return CONSTANTS[node.id] if node.id in CONSTANTS else cvs[node.id]
    if isinstance(node, ast.Constant):
        return np.float64(node.value)  # numpy semantics: 1 / 0 is inf, not ZeroDivisionError
    raise AssertionError(f"unchecked node {ast.dump(node)}")  # _check admits nothing else


def _constant(node: ast.expr) -> float | None:
    """The value of a sub-expression that reads no CV, else None."""
    if any(isinstance(n, ast.Name) and n.id not in CONSTANTS for n in ast.walk(node)):
        return None
    return float(_evaluate(node, {}))


def _box(node: ast.expr) -> dict[str, tuple[float, float]] | None:
    """See :meth:`StateDefinition.box`: bounds from an ``and`` of (chained) comparisons of a CV name
    with constants, intersected per CV; None as soon as a part is anything else."""
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And):
        box: dict[str, tuple[float, float]] = {}
        for part in map(_box, node.values):
            if part is None:
                return None
            for name, (low, high) in part.items():
                old_low, old_high = box.get(name, (-math.inf, math.inf))
                box[name] = (max(low, old_low), min(high, old_high))
        return box
    if not isinstance(node, ast.Compare):
        return None
    box = {}
    operands = [node.left, *node.comparators]
    for op, left, right in zip(node.ops, operands, operands[1:]):
        if not isinstance(op, (ast.Lt, ast.LtE, ast.Gt, ast.GtE)):
            return None
        upper = isinstance(op, (ast.Lt, ast.LtE))  # left < right: right bounds left from above
        for cv, bound, cv_is_left in ((left, right, True), (right, left, False)):
            value = _constant(bound)
            if isinstance(cv, ast.Name) and cv.id not in CONSTANTS and value is not None:
                low, high = box.get(cv.id, (-math.inf, math.inf))
                box[cv.id] = (low, min(high, value)) if upper == cv_is_left else (max(low, value), high)
                break
        else:
            return None
    return box


@dataclass(frozen=True)
class StateDefinition:
    """A state given by a boolean expression over CVs, e.g. ``StateDefinition("0 < phi < 2.2")``.

    The expression is validated on construction (``ValueError`` if it is not allowed, see the
    module docstring). ``evaluate(cvs)`` returns a bool ``[N]`` array.
    """

    expression: str
    _tree: ast.expr = field(init=False, repr=False, compare=False)
    _names: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tree, names = _parse(self.expression)
        object.__setattr__(self, "_tree", tree)
        object.__setattr__(self, "_names", names)

    def names_used(self) -> frozenset[str]:
        """CV names the expression reads (constants such as ``pi`` excluded)."""
        return self._names

    def evaluate(self, cvs: Mapping[str, ArrayLike]) -> np.ndarray:
        """Membership ``[N]`` (bool) for CV arrays ``cvs[name]`` of shape ``[N]``.

        Raises ``ValueError`` naming any CV the expression needs that ``cvs`` lacks, or if the
        CV arrays used do not share one shape.
        """
        missing = sorted(self._names - set(cvs))
        if missing:
            raise ValueError(
                f"state {_quoted(self.expression)} needs CVs {missing}; available: {sorted(cvs)}"
            )
        arrays = {name: _to_numpy(cvs[name]) for name in self._names}
        shapes = {a.shape for a in arrays.values()}
        if len(shapes) != 1:
            raise ValueError(f"state {_quoted(self.expression)}: CV arrays have different shapes {shapes}")
        return np.broadcast_to(np.asarray(_evaluate(self._tree, arrays), dtype=bool),
                               shapes.pop()).copy()

    __call__ = evaluate

    def complement(self) -> StateDefinition:
        """The state of every sample not in this one: ``not (<expression>)``."""
        return StateDefinition(f"not ({self.expression})")

    def box(self) -> dict[str, tuple[float, float]] | None:
        """The state as bounds ``{cv: (low, high)}`` (``-inf``/``inf`` where one side is open), when
        it is a conjunction of comparisons between a CV and constants, such as ``"0 < phi < 2.2"`` or
        ``"x0 > 0.5 and x1 < -pi/4"``; ``None`` for any other expression (``or``, ``not``, CV
        arithmetic, ``==``). Strict and non-strict bounds are not told apart."""
        return _box(self._tree)


def names_used(expression: str) -> frozenset[str]:
    """CV names that ``expression`` reads; raises ``ValueError`` for a disallowed expression."""
    return _parse(expression)[1]


REST = "rest"


def resolve_states(specs: Mapping[str, str]) -> dict[str, StateDefinition]:
    """Turn a ``{label: spec}`` mapping (as in a config's ``states:``) into state definitions.

    A spec is one of:

    - an expression over CVs, e.g. ``"phi < 0"``;
    - ``"not LABEL"``, where ``LABEL`` is another key of ``specs``: every sample not in that state;
    - ``"rest"``: every sample in none of the other states (at most one state may be ``rest``,
      and there must be at least one other state).

    ``"not NAME"`` is read as a complement only when ``NAME`` is a state label (``not x0`` with a
    CV ``x0`` is not a valid expression anyway). The result keeps the keys and order of ``specs``;
    each complement is expanded into an ordinary expression, e.g. ``"not ((phi < 0) or (x > 1))"``.
    """
    rest_labels = [label for label, spec in specs.items() if spec.strip() == REST]
    if len(rest_labels) > 1:
        raise ValueError(f"only one state may be {REST!r}, got {rest_labels}")
    if rest_labels and len(specs) < 2:
        raise ValueError(f"state {rest_labels[0]!r} is {REST!r} but there is no other state")

    resolved: dict[str, StateDefinition] = {}
    visiting: list[str] = []

    def resolve(label: str) -> StateDefinition:
        if label in resolved:
            return resolved[label]
        if label in visiting:
            raise ValueError(f"states refer to each other in a cycle: {visiting + [label]}")
        visiting.append(label)
        spec = specs[label].strip()
        words = spec.split()
        if spec == REST:
            others = [resolve(other) for other in specs if other != label]
            state = StateDefinition(
                "not (" + " or ".join(f"({s.expression})" for s in others) + ")"
            )
        elif len(words) == 2 and words[0] == "not" and words[1] in specs:
            if words[1] == label:
                raise ValueError(f"state {label!r} is defined as its own complement")
            state = resolve(words[1]).complement()
        else:
            try:
                state = StateDefinition(spec)
            except ValueError as err:
                raise ValueError(f"state {label!r}: {err}") from None
        visiting.pop()
        resolved[label] = state
        return state

    return {label: resolve(label) for label in specs}


# ----------------------------------------------------------------------------- CVs


def cartesian_cvs(x: ArrayLike) -> dict[str, np.ndarray]:
    """``{"x0": x[:, 0], ..., "x{dim-1}": x[:, dim-1]}`` (float64 ``[N]`` each) for ``x`` ``[N, dim]``."""
    arr = _to_numpy(x).astype(np.float64, copy=False)
    if arr.ndim != 2:
        raise ValueError(f"x must have shape [N, dim], got {arr.shape}")
    return {f"x{i}": arr[:, i].copy() for i in range(arr.shape[1])}


def backbone_torsions(topology: Any) -> dict[str, tuple[int, int, int, int]]:
    """The backbone torsions' atoms, ``{"phi0": (i, j, k, l), ..., "psi0": ...}``, in residue order.

    mdtraj's definitions of φ (C-N-CA-C) and ψ (N-CA-C-N) pick the atoms; ``topology`` is an
    ``mdtraj.Topology`` (an OpenMM ``Topology`` is converted). Raises ``ValueError`` when the
    topology has no φ or no ψ.
    """
    import mdtraj

    if not isinstance(topology, mdtraj.Topology):
        topology = mdtraj.Topology.from_openmm(topology)
    probe = mdtraj.Trajectory(np.zeros((1, topology.n_atoms, 3), dtype=np.float32), topology)
    torsions: dict[str, tuple[int, int, int, int]] = {}
    for name, find in (("phi", mdtraj.compute_phi), ("psi", mdtraj.compute_psi)):
        atoms = find(probe)[0]
        if len(atoms) == 0:
            raise ValueError(f"the topology has no {name} dihedral")
        torsions.update({f"{name}{i}": tuple(int(a) for a in quad) for i, quad in enumerate(atoms)})
    return torsions


def dihedral_cvs(positions_nm: ArrayLike, torsions: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
    """The named torsions of every frame, radians in [-pi, pi), float64 ``[N]`` each.

    ``positions_nm``: ``[N, n_atoms, 3]`` in nm (``[N, 3 n_atoms]`` flattened is accepted).
    ``torsions``: name -> four atom indices, as :func:`backbone_torsions` gives them; ``phi`` and
    ``psi`` alias ``phi0`` and ``psi0``, which for alanine dipeptide are its single φ and ψ.
    """
    xyz = _to_numpy(positions_nm).astype(np.float64, copy=False)
    if xyz.ndim == 2:
        xyz = xyz.reshape(xyz.shape[0], -1, 3)
    n_atoms = 1 + max(max(quad) for quad in torsions.values())
    if xyz.ndim != 3 or xyz.shape[2] != 3 or xyz.shape[1] < n_atoms:
        raise ValueError(f"positions must have shape [N, n_atoms >= {n_atoms}, 3] in nm, got {xyz.shape}")
    angles = dict(zip(torsions, dihedrals_rad(xyz, list(torsions.values())).T))
    cvs: dict[str, np.ndarray] = {}
    for kind in ("phi", "psi"):  # phi0, phi1, ..., phi, then psi0, ..., psi
        cvs.update({name: values.copy() for name, values in angles.items() if name.startswith(kind)})
        if f"{kind}0" in cvs:
            cvs[kind] = cvs[f"{kind}0"]
    return cvs


def torsion_cv_names(torsions: Mapping[str, Sequence[int]]) -> list[str]:
    """The CV names :func:`dihedral_cvs` gives for ``torsions`` (as :func:`backbone_torsions` names
    them): ``phi0, phi1, ..., phi, psi0, ..., psi``."""
    names: list[str] = []
    for kind in ("phi", "psi"):
        names += [name for name in torsions if name.startswith(kind)]
        names += [kind] if f"{kind}0" in torsions else []
    return names


def pdb_cv_names(pdb: Path) -> list[str] | None:
    """The backbone-torsion CV names of the molecule in ``pdb`` (see :func:`torsion_cv_names`), ``None``
    when mdtraj cannot read the file, and ``[]`` for a molecule without a backbone."""
    import mdtraj

    try:
        topology = mdtraj.load_topology(str(pdb))
    except Exception:  # noqa: BLE001 - building the system reports an unreadable PDB in its own words
        return None
    try:
        return torsion_cv_names(backbone_torsions(topology))
    except ValueError:
        return []


_INDEXED_TORSION = re.compile(r"^(phi|psi)\d+$")


def check_state_cvs(states: Mapping[str, StateDefinition], cv_names: Sequence[str]) -> None:
    """A one-line ``ValueError`` naming the first state that reads a CV the system does not have.

    States written as another's complement (``not B``, ``rest``) are checked last, so that the
    message names the state where the CV was written.
    """
    expressions = {f"({state.expression})" for state in states.values()}
    derived = {label for label, state in states.items() if any(e in state.expression for e in expressions)}
    for label in sorted(states, key=lambda label: label in derived):
        unknown = sorted(states[label].names_used() - set(cv_names))
        if not unknown:
            continue
        hint = ""
        if any(_INDEXED_TORSION.match(name) for name in unknown):
            hint = " (phiN and psiN number the backbone torsions from 0 in chain order; phi and psi are phi0 and psi0)"
        raise ValueError(f"{label}: unknown CV {', '.join(unknown)}; this system's CVs are "
                         f"{', '.join(cv_names) or 'none'}{hint}")
