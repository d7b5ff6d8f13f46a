"""Flat-bottom walls that keep an MD run inside a box of CVs: zero inside, harmonic outside.

Inside the box the walls add nothing, so the frames there follow the Boltzmann distribution
restricted to the box: MD seeded in a rare state that would otherwise leave it in picoseconds (alanine
dipeptide's alpha_L basin in implicit solvent) keeps sampling it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
import openmm

from boltzgen.cvs import CollectiveVariable
from boltzgen.simulation.umbrella_grid import cv_force


def wall_forces(box: Mapping[str, tuple[float, float]], cvs: Mapping[str, CollectiveVariable],
                k: float) -> list[openmm.Force]:
    """One force per bounded CV of ``box`` (``{name: (low, high)}``, rad for a torsion, nm otherwise;
    ``-inf``/``inf`` for an open side) with energy ``k * excess^2`` (kJ/mol), where ``excess`` is how
    far the CV lies outside ``[low, high]`` (on the circle for a torsion) and ``k`` is in kJ/mol per
    unit squared. A torsion interval of 2π or more, or with an open side, is no wall."""
    forces = []
    for name, (low, high) in box.items():
        cv = cvs[name]
        if cv.kind == "torsion":
            if not (math.isfinite(low) and math.isfinite(high)) or high - low >= 2 * math.pi:
                continue
            center, half = 0.5 * (low + high), 0.5 * (high - low)
            forces.append(cv_force(cv, f"{k}*max(0, d - {half})^2; "
                                       f"d = abs(atan2(sin(value - {center}), cos(value - {center})))"))
            continue
        terms = [f"max(0, {low} - value)^2" if math.isfinite(low) else "",
                 f"max(0, value - {high})^2" if math.isfinite(high) else ""]
        expression = " + ".join(t for t in terms if t)
        if expression:
            forces.append(cv_force(cv, f"{k}*({expression})"))
    return forces
