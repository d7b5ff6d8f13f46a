"""Reduced energies u(x) = U(x)/kT: analytic potentials, OpenMM, and a torch force field."""

from boltzgen.energies.base import Energy

__all__ = ["Energy"]
