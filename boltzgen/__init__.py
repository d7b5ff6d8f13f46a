"""boltzgen: Boltzmann generators for molecular and physical equilibrium distributions."""

import os

# After each parallel op, the threads of torch's OpenMP pool spin by default, holding the cores
# that the force-field kernel's own threads need next (energy+force steps measured 1.4-1.5x slower
# on 2 cores). Passive waiting hands the cores back. This must be set before torch loads OpenMP,
# and it never overrides a user's own setting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
