"""RestrictedEnergy: +inf outside the allowed region, or a finite penalty that keeps those states visible."""

from __future__ import annotations

import math

import torch

from boltzgen.energies.analytic import DoubleWell
from boltzgen.energies.base import RestrictedEnergy


def test_outside_is_infinite_or_penalized_and_inside_unchanged():
    x = torch.tensor([[-1.5, 0.3], [1.5, 0.3], [1.0, math.nan]], dtype=torch.float64)
    u = DoubleWell()(x)

    def left(points):
        return points[:, 0] < 0

    hard = RestrictedEnergy(DoubleWell(), left)(x)
    assert hard[0] == u[0] and math.isinf(hard[1]) and math.isnan(hard[2])  # NaN stays NaN: weight 0, counted
    soft_energy = RestrictedEnergy(DoubleWell(), left, penalty=1e4)
    soft = soft_energy(x)
    assert soft[0] == u[0] and soft[1] == u[1] + 1e4 and math.isnan(soft[2])
    assert soft_energy.evaluations == 3 and soft_energy.energy.evaluations == 3
    # the penalty is a constant outside: the force there is the energy's own
    torch.testing.assert_close(soft_energy.force(x[1:2]), DoubleWell().force(x[1:2]))
