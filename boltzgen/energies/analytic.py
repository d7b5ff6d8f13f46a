"""Analytic potentials in kT with exactly known normalizations.

The 2-D toys (double well, Mueller-Brown) and the two standard benchmarks of training without data
(Midgley et al., ICLR 2023): the 32-D many-well and a 2-D mixture of 40 Gaussians. Every one knows

- :attr:`AnalyticEnergy.log_z`, the exact log Z = log ∫ exp(-u(x)) dx (by quadrature, or in closed form);
- :attr:`AnalyticEnergy.box`, a rectangle in (x0, x1) over which the density of (x0, x1) is
  integrated on a grid: exact state probabilities, free-energy surfaces and densities to compare
  with. For more than 2 dimensions it is the marginal density of (x0, x1)
  (:meth:`AnalyticEnergy.marginal_energy`), so states and plots over x0 and x1 stay exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from boltzgen.energies.base import Energy

#: Grid points per dimension of the 2-D quadrature (midpoint rule).
QUADRATURE_POINTS = 2001
#: Grid points per energy call of the quadrature (bounds its memory).
QUADRATURE_CHUNK = 1 << 18


@dataclass(frozen=True)
class QuadratureBox:
    """A rectangle that holds all but a negligible part of exp(-u): ``[(lo0, hi0), (lo1, hi1)]``."""

    lower: tuple[float, float]
    upper: tuple[float, float]


class AnalyticEnergy(Energy):
    """An analytic energy with an exact log Z and exact quadrature over (x0, x1) on :attr:`box`.

    ``dim`` is 2 for the toys; a higher-dimensional subclass gives the marginal density of
    (x0, x1) in :meth:`marginal_energy` and its exact :attr:`log_z`.
    """

    box: QuadratureBox
    #: Grid points per dimension of its quadrature.
    quadrature_points: int = QUADRATURE_POINTS

    def __init__(self, dim: int = 2) -> None:
        super().__init__(dim=dim)

    def marginal_energy(self, x: Tensor) -> Tensor:
        """Reduced energy of the marginal density of (x0, x1), up to a constant: ``[batch, 2]`` -> ``[batch]``.

        For a 2-D energy this is the energy itself.
        """
        if self.dim != 2:
            raise NotImplementedError(f"{type(self).__name__} must give the marginal energy of (x0, x1)")
        return self.reduced_energy(x)

    def cv_range(self, d: int) -> tuple[float, float]:
        """The range that holds nearly all of coordinate ``x{d}``: the box's, for histograms."""
        return float(self.box.lower[d]), float(self.box.upper[d])

    @cached_property
    def log_z(self) -> float:
        """Exact log Z = log ∫ exp(-u) dx (dimensionless for these energies), float64.

        Here :meth:`quadrature_log_z`; subclasses with a closed form override it.
        """
        if self.dim != 2:
            raise NotImplementedError(f"{type(self).__name__} must give its exact log Z")
        return self.quadrature_log_z()

    def quadrature_log_z(self, points_per_dim: int | None = None) -> float:
        """log Z of a 2-D energy by the midpoint rule on :attr:`box` (:attr:`quadrature_points` per
        dimension by default), which converges exponentially fast for these smooth, rapidly decaying
        integrands."""
        points_per_dim = points_per_dim or self.quadrature_points
        centers, widths = [], []
        for lo, hi in zip(self.box.lower, self.box.upper):
            edges = np.linspace(lo, hi, points_per_dim + 1)
            centers.append(0.5 * (edges[1:] + edges[:-1]))
            widths.append((hi - lo) / points_per_dim)
        neg = -self._grid_energy(*centers, self.reduced_energy).ravel()
        top = float(np.max(neg))
        return top + math.log(float(np.exp(neg - top).sum()) * widths[0] * widths[1])

    @staticmethod
    def _grid_energy(points0: np.ndarray, points1: np.ndarray, energy: Callable[[Tensor], Tensor]) -> np.ndarray:
        """``energy`` on the grid ``points0 x points1``, ``[n0, n1]`` float64, in chunks of :data:`QUADRATURE_CHUNK`."""
        g0, g1 = np.meshgrid(points0, points1, indexing="ij")
        grid = torch.from_numpy(np.stack([g0.ravel(), g1.ravel()], axis=1))
        with torch.no_grad():
            u = torch.cat([energy(chunk) for chunk in torch.split(grid, QUADRATURE_CHUNK)]).numpy()
        return u.reshape(g0.shape)

    def _grid_probabilities(self, points0: np.ndarray, points1: np.ndarray) -> np.ndarray:
        """The density of (x0, x1) on the grid ``points0 x points1``, ``[n0, n1]`` float64, normalized to sum 1."""
        u = self._grid_energy(points0, points1, self.marginal_energy)
        p = np.exp(-u - np.max(-u))
        return p / p.sum()

    def quadrature_probabilities(
        self, states: dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]], points_per_dim: int | None = None
    ) -> dict[str, float]:
        """Exact state probabilities by the midpoint rule on :attr:`box` (:attr:`quadrature_points` per dimension by default).

        ``states`` maps names to predicates over ``{"x0": grid, "x1": grid}``; each returns bool
        arrays. Results are float64 probabilities (the box's normalization cancels). In more than 2
        dimensions the states may use x0 and x1 only.
        """
        points_per_dim = points_per_dim or self.quadrature_points
        edges = [np.linspace(lo, hi, points_per_dim + 1) for lo, hi in zip(self.box.lower, self.box.upper)]
        centers = [0.5 * (e[1:] + e[:-1]) for e in edges]
        p = self._grid_probabilities(*centers).ravel()
        g0, g1 = np.meshgrid(*centers, indexing="ij")
        cvs = {"x0": g0.ravel(), "x1": g1.ravel()}
        return {name: float(p[np.asarray(predicate(cvs), dtype=bool)].sum()) for name, predicate in states.items()}

    def bin_probabilities(self, edges0: np.ndarray, edges1: np.ndarray, sub: int = 8) -> np.ndarray:
        """Exact probability ``[n0, n1]`` of every 2-D bin of (x0, x1), by the midpoint rule with ``sub x sub`` points per bin.

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


#: The standard Mueller-Brown constants (Müller & Brown 1979), shared by :class:`MuellerBrown` and the
#: OpenMM particle of :mod:`boltzgen.energies.particle`.
MUELLER_BROWN_CONSTANTS: dict[str, list[float]] = {
    "A": [-200.0, -100.0, -170.0, 15.0],
    "a": [-1.0, -1.0, -6.5, 0.7],
    "b": [0.0, 0.0, 11.0, 0.6],
    "c": [-10.0, -10.0, -6.5, 0.7],
    "x0": [1.0, 0.0, -0.5, -1.0],
    "y0": [0.0, 0.5, 1.5, 1.0],
}


class MuellerBrown(AnalyticEnergy):
    """u(x) = beta * V(x), the Mueller-Brown potential with its standard constants:
    ``V(x) = sum_k A_k exp(a_k dx_k^2 + b_k dx_k dy_k + c_k dy_k^2)`` with ``dx_k = x0 - x0_k`` and
    ``dy_k = x1 - y0_k``; ``beta`` is 1/kT in the units of ``V``."""

    box = QuadratureBox(lower=(-2.5, -1.5), upper=(1.5, 3.0))

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = beta
        for name, values in MUELLER_BROWN_CONSTANTS.items():
            self.register_buffer(f"_{name}", torch.tensor(values, dtype=torch.float64))

    def reduced_energy(self, x: Tensor) -> Tensor:
        dx = x[:, :1] - self._x0.to(x)
        dy = x[:, 1:2] - self._y0.to(x)
        exponent = self._a.to(x) * dx**2 + self._b.to(x) * dx * dy + self._c.to(x) * dy**2
        return self.beta * (self._A.to(x) * torch.exp(exponent)).sum(dim=1)


class ManyWell(AnalyticEnergy):
    """The many-well benchmark: ``dim / 2`` independent copies of the 2-D double well
    ``u(x1, x2) = x1^4 - 6 x1^2 - 0.5 x1 + 0.5 x2^2`` on the pairs ``(x_{2k}, x_{2k+1})``.

    It has ``2^(dim/2)`` modes (65,536 in the standard 32 dimensions). Each pair has the
    same density, so the marginal of (x0, x1) is one double well and :attr:`log_z` is ``dim / 2``
    times the log Z of one pair, by 1-D quadrature of the quartic times the Gaussian's sqrt(2 pi)
    (164.696 for 32 dimensions, as published).
    """

    box = QuadratureBox(lower=(-4.0, -9.0), upper=(4.0, 9.0))

    def __init__(self, dim: int = 32) -> None:
        if dim < 2 or dim % 2:
            raise ValueError(f"the many-well energy needs an even dimension >= 2, got {dim}")
        super().__init__(dim=dim)

    @staticmethod
    def _pair_energy(x1: Tensor, x2: Tensor) -> Tensor:
        return x1**4 - 6.0 * x1**2 - 0.5 * x1 + 0.5 * x2**2

    def reduced_energy(self, x: Tensor) -> Tensor:
        return self._pair_energy(x[:, 0::2], x[:, 1::2]).sum(dim=1)

    def marginal_energy(self, x: Tensor) -> Tensor:
        return self._pair_energy(x[:, 0], x[:, 1])

    def cv_range(self, d: int) -> tuple[float, float]:
        return float(self.box.lower[d % 2]), float(self.box.upper[d % 2])

    @cached_property
    def log_z(self) -> float:
        n = 400_001
        edges = np.linspace(-6.0, 6.0, n + 1)
        x = 0.5 * (edges[1:] + edges[:-1])
        neg = -(x**4 - 6.0 * x**2 - 0.5 * x)
        top = float(neg.max())
        log_quartic = top + math.log(float(np.exp(neg - top).sum()) * (edges[1] - edges[0]))
        return (self.dim // 2) * (log_quartic + 0.5 * math.log(2 * math.pi))


class GaussianMixture(AnalyticEnergy):
    """The 2-D mixture-of-Gaussians benchmark: u(x) = -log sum_k (1/K) N(x; mu_k, s^2 I).

    ``n_modes`` means drawn uniformly in ``[-loc_scale, loc_scale]^2`` by a numpy generator seeded
    with ``seed``; equal weights; standard deviation ``scale`` per dimension (the published
    benchmark: 40 modes, loc_scale 40, scale softplus(1) = 1.3133). The density is normalized, so
    log Z = 0 exactly. Its quadrature uses 1000 points per dimension (spacing 0.1, a 13th of a
    mode's width; an even count puts x0 = 0 and x1 = 0 on cell edges).
    """

    quadrature_points = 1000

    def __init__(self, n_modes: int = 40, loc_scale: float = 40.0, scale: float = math.log1p(math.e),
                 seed: int = 0) -> None:
        super().__init__(dim=2)
        rng = np.random.default_rng(seed)
        means = rng.uniform(-loc_scale, loc_scale, size=(n_modes, 2))
        self.register_buffer("means", torch.as_tensor(means, dtype=torch.float64))
        self.scale = float(scale)
        reach = loc_scale + 8.0 * self.scale
        self.box = QuadratureBox(lower=(-reach, -reach), upper=(reach, reach))

    @property
    def n_modes(self) -> int:
        return int(self.means.shape[0])

    def _log_components(self, x: Tensor) -> Tensor:
        """log((1/K) N(x; mu_k, s^2 I)) ``[batch, K]`` float64."""
        means = self.means.to(x)
        d2 = ((x**2).sum(1, keepdim=True) - 2.0 * x @ means.T + (means**2).sum(1)).clamp_min(0.0)
        s2 = self.scale**2
        return -0.5 * d2 / s2 - math.log(2 * math.pi * s2) - math.log(self.n_modes)

    def reduced_energy(self, x: Tensor) -> Tensor:
        return -torch.logsumexp(self._log_components(x), dim=1)

    def responsibilities(self, x: Tensor) -> Tensor:
        """``[batch, K]``: the probability that ``x`` came from mode k. Its mean under p is exactly 1/K."""
        return torch.softmax(self._log_components(x.to(torch.float64)), dim=1)

    @cached_property
    def log_z(self) -> float:
        return 0.0
