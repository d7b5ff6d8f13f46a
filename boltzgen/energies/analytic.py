"""Analytic 2-D toy potentials, in kT, with exact quadrature for their free energies."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from boltzgen.energies.base import Energy


@dataclass(frozen=True)
class QuadratureBox:
    """A rectangle that holds all but a negligible part of exp(-u): ``[(lo0, hi0), (lo1, hi1)]``."""

    lower: tuple[float, float]
    upper: tuple[float, float]


class AnalyticEnergy(Energy):
    """A 2-D analytic energy that knows a box for exact quadrature."""

    box: QuadratureBox

    def __init__(self) -> None:
        super().__init__(dim=2)

    def quadrature_probabilities(
        self, states: dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]], points_per_dim: int = 2001
    ) -> dict[str, float]:
        """Exact state probabilities by the midpoint rule on :attr:`box`.

        ``states`` maps names to predicates over ``{"x0": grid, "x1": grid}``; each returns bool
        arrays. Results are float64 probabilities (the box's normalization cancels).
        """
        edges = [np.linspace(lo, hi, points_per_dim + 1) for lo, hi in zip(self.box.lower, self.box.upper)]
        centers = [0.5 * (e[1:] + e[:-1]) for e in edges]
        g0, g1 = np.meshgrid(*centers, indexing="ij")
        x = torch.from_numpy(np.stack([g0.ravel(), g1.ravel()], axis=1))
        with torch.no_grad():
            u = self.reduced_energy(x).numpy()
        log_p = -u - np.max(-u)
        p = np.exp(log_p)
        p /= p.sum()
        cvs = {"x0": g0.ravel(), "x1": g1.ravel()}
        return {name: float(p[np.asarray(predicate(cvs), dtype=bool)].sum()) for name, predicate in states.items()}


class DoubleWell(AnalyticEnergy):
    """u(x) = a x0^4 - b x0^2 + c x0 + x1^2 / 2 (Noé et al. 2019: a=1, b=6, c=1)."""

    box = QuadratureBox(lower=(-4.0, -9.0), upper=(4.0, 9.0))

    def __init__(self, a: float = 1.0, b: float = 6.0, c: float = 1.0) -> None:
        super().__init__()
        self.a, self.b, self.c = a, b, c

    def reduced_energy(self, x: Tensor) -> Tensor:
        x0, x1 = x[:, 0], x[:, 1]
        return self.a * x0**4 - self.b * x0**2 + self.c * x0 + 0.5 * x1**2


class MuellerBrown(AnalyticEnergy):
    """u(x) = beta * V(x) with the standard Mueller-Brown constants (REFERENCES.md)."""

    box = QuadratureBox(lower=(-2.5, -1.5), upper=(1.5, 3.0))

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = beta
        constants = {
            "A": [-200.0, -100.0, -170.0, 15.0],
            "a": [-1.0, -1.0, -6.5, 0.7],
            "b": [0.0, 0.0, 11.0, 0.6],
            "c": [-10.0, -10.0, -6.5, 0.7],
            "x0": [1.0, 0.0, -0.5, -1.0],
            "y0": [0.0, 0.5, 1.5, 1.0],
        }
        for name, values in constants.items():
            self.register_buffer(f"_{name}", torch.tensor(values, dtype=torch.float64))

    def reduced_energy(self, x: Tensor) -> Tensor:
        dx = x[:, :1] - self._x0.to(x)
        dy = x[:, 1:2] - self._y0.to(x)
        exponent = self._a.to(x) * dx**2 + self._b.to(x) * dx * dy + self._c.to(x) * dy**2
        return self.beta * (self._A.to(x) * torch.exp(exponent)).sum(dim=1)
