"""Test inputs with known answers: stationary AR(1) series and weighted double-well samples."""

from __future__ import annotations

import math

import numpy as np
from scipy import integrate, signal, stats

#: The double well ``u(x) = x^4 - 6 x^2 + x`` (kT) is sampled from an equal mixture of two
#: Gaussians at these centres with this width.
WELL_CENTRE, WELL_WIDTH = 1.73, 0.35


def ar1(rng: np.random.Generator, rho: float, chains: int, t: int) -> np.ndarray:
    """Stationary AR(1) ``x_t = rho x_{t-1} + e_t``, ``e ~ N(0, 1)``; shape ``[chains, t]``.

    Its integrated autocorrelation time is ``(1 + rho) / (1 - rho)`` and its variance
    ``1 / (1 - rho^2)``.
    """
    noise = rng.normal(size=(chains, t))
    noise[:, 0] /= math.sqrt(1.0 - rho**2)  # start in the stationary distribution
    return signal.lfilter([1.0], [1.0, -rho], noise, axis=1)


def double_well_u(x: np.ndarray) -> np.ndarray:
    """``u(x) = x^4 - 6 x^2 + x`` in kT, elementwise."""
    return x**4 - 6.0 * x**2 + x


def double_well_samples(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x, log_w)``, both ``[n]``: x from the two-Gaussian proposal, ``log_w = -u - log q``."""
    centres = np.where(rng.random(n) < 0.5, -WELL_CENTRE, WELL_CENTRE)
    x = centres + WELL_WIDTH * rng.normal(size=n)
    log_q = np.logaddexp(
        stats.norm.logpdf(x, -WELL_CENTRE, WELL_WIDTH), stats.norm.logpdf(x, WELL_CENTRE, WELL_WIDTH)
    ) - math.log(2)
    return x, -double_well_u(x) - log_q


def double_well_boltzmann_integral(lo: float, hi: float) -> float:
    """``∫_lo^hi exp(-u(x)) dx`` by quadrature."""
    return integrate.quad(lambda s: math.exp(-float(double_well_u(np.float64(s)))), lo, hi)[0]


def double_well_delta_f() -> float:
    """``ΔF = F(x > 0) - F(x < 0)`` of ``exp(-u)`` in kT by quadrature (about 3.38 kT)."""
    return -math.log(double_well_boltzmann_integral(0.0, 6.0) / double_well_boltzmann_integral(-6.0, 0.0))
