"""What a bijection can compute, and how: the capabilities that tell the flow families apart.

Every flow computes the density of its own samples in the sampling pass (``log q(x) = log p(z) -
log|det dx/dz|`` from ``forward(z)``). The families differ in three things, each a field of
:class:`Capabilities`:

- ``sampling``: how ``forward(z)`` is computed. ``one_pass``: one evaluation of each network.
  ``iterative``: several passes (a masked autoregressive flow inverts its autoregression with one
  pass per dimension, D in all); the result is exact.
- ``density``: how ``inverse(x)`` is computed for a state that the flow did not draw itself (training
  data, a state moved by MCMC). ``one_pass``; ``iterative``: several passes, exact (an inverse
  autoregressive flow: D passes) or to a stated tolerance (a residual flow: fixed-point iteration);
  ``none``: there is no inverse, so the flow cannot evaluate the density of external data at all
  (planar, radial and Sylvester flows). Such a flow cannot be trained by maximum likelihood
  (forward KL); it is trained by reverse KL, and MCMC moves that need ``log q`` at a moved state are
  refused.
- ``log_det``: ``exact`` (analytic, or exact to floating point) or ``estimated`` (a stochastic
  estimator: ``log q`` then differs from call to call, and importance weights ``exp(-u - log q)``
  carry the estimator's noise). ``estimator`` names it; ``unbiased`` says whether its expectation
  is the exact log-det. Even an unbiased estimate of ``log q`` gives a biased weight, since
  ``E[exp(-X)] != exp(-E[X])``: each weight is inflated by about ``exp(var/2)``, which cancels in
  self-normalized estimates only to the extent that the variance is the same for every sample.

A composition has the worst of its layers in each field (:meth:`Capabilities.compose`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Passes = Literal["one_pass", "iterative", "none"]
LogDet = Literal["exact", "estimated"]

_RANK = {"one_pass": 0, "iterative": 1, "none": 2}
_EXPLAIN = {
    "one_pass": "in one pass",
    "iterative": "by iteration",
    "none": "not at all (no inverse)",
}


@dataclass(frozen=True)
class Capabilities:
    """How a bijection samples, evaluates densities and computes its log-det (see the module docstring)."""

    sampling: Passes = "one_pass"
    density: Passes = "one_pass"
    log_det: LogDet = "exact"
    estimator: str | None = None
    unbiased: bool = True

    @property
    def data_density(self) -> bool:
        """Whether the density of external data (not the flow's own samples) can be evaluated."""
        return self.density != "none"

    @property
    def exact_log_det(self) -> bool:
        return self.log_det == "exact"

    def describe(self) -> str:
        """One line for messages: sampling, density of external data, log-det."""
        log_det = "exact log-det" if self.exact_log_det else f"estimated log-det ({self.estimator})"
        return (f"samples {_EXPLAIN[self.sampling]}, evaluates the density of external data "
                f"{_EXPLAIN[self.density]}, {log_det}")

    @classmethod
    def compose(cls, parts: Iterable[Capabilities]) -> Capabilities:
        """The capabilities of layers applied one after the other: the worst of each field.

        Estimator descriptions are joined with ``"; "`` (each once, in order), and the composition's
        log-det is unbiased only if every estimated part is.
        """
        parts = list(parts)
        if not parts:
            return cls()
        estimators = list(dict.fromkeys(p.estimator for p in parts if p.estimator is not None))
        return cls(
            sampling=max((p.sampling for p in parts), key=_RANK.__getitem__),
            density=max((p.density for p in parts), key=_RANK.__getitem__),
            log_det="estimated" if any(not p.exact_log_det for p in parts) else "exact",
            estimator="; ".join(estimators) if estimators else None,
            unbiased=all(p.unbiased for p in parts),
        )


#: The capabilities of an ordinary layer: both directions in one pass, exact log-det.
EXACT = Capabilities()


class NoInverseError(NotImplementedError):
    """Raised by ``inverse`` of a bijection that has no inverse (``density == "none"``)."""
