"""boltzgen: Boltzmann generators for molecular and physical equilibrium distributions."""

__version__ = "0.1.0"
