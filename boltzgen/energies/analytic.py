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

    def _grid_probabilities(self, points0: np.ndarray, points1: np.ndarray) -> np.ndarray:
        """``exp(-u)`` on the grid ``points0 x points1``, ``[n0, n1]`` float64, normalized to sum 1."""
        g0, g1 = np.meshgrid(points0, points1, indexing="ij")
        with torch.no_grad():
            u = self.reduced_energy(torch.from_numpy(np.stack([g0.ravel(), g1.ravel()], axis=1))).numpy()
        p = np.exp(-u - np.max(-u))
        return (p / p.sum()).reshape(g0.shape)

    def quadrature_probabilities(
        self, states: dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]], points_per_dim: int = 2001
    ) -> dict[str, float]:
        """Exact state probabilities by the midpoint rule on :attr:`box`.

        ``states`` maps names to predicates over ``{"x0": grid, "x1": grid}``; each returns bool
        arrays. Results are float64 probabilities (the box's normalization cancels).
        """
        edges = [np.linspace(lo, hi, points_per_dim + 1) for lo, hi in zip(self.box.lower, self.box.upper)]
        centers = [0.5 * (e[1:] + e[:-1]) for e in edges]
        p = self._grid_probabilities(*centers).ravel()
        g0, g1 = np.meshgrid(*centers, indexing="ij")
        cvs = {"x0": g0.ravel(), "x1": g1.ravel()}
        return {name: float(p[np.asarray(predicate(cvs), dtype=bool)].sum()) for name, predicate in states.items()}

    def bin_probabilities(self, edges0: np.ndarray, edges1: np.ndarray, sub: int = 8) -> np.ndarray:
        """Exact probability ``[n0, n1]`` of every 2-D bin, by the midpoint rule with ``sub x sub`` points per bin.

        Normalized over the bins (the quadrature box holds all but a negligible part of exp(-u)).
        """
        def fine(edges: np.ndarray) -> np.ndarray:
            lo, width = edges[:-1, None], np.diff(edges)[:, None]
            return (lo + width * (np.arange(sub) + 0.5)[None, :] / sub).ravel()

        p = self._grid_probabilities(fine(edges0), fine(edges1)).reshape(len(edges0) - 1, sub, len(edges1) - 1, sub)
        p = p * np.diff(edges0)[:, None, None, None] * np.diff(edges1)[None, None, :, None]
        p = p.sum(axis=(1, 3))
        return p / p.sum()


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
    """u(x) = beta * V(x), the Mueller-Brown potential with its standard constants:
    ``V(x) = sum_k A_k exp(a_k dx_k^2 + b_k dx_k dy_k + c_k dy_k^2)`` with ``dx_k = x0 - x0_k`` and
    ``dy_k = x1 - y0_k``; ``beta`` is 1/kT in the units of ``V``."""

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
