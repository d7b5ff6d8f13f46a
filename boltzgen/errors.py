"""The exceptions that mean "bad input": the CLI prints their one-line message and exits with 2."""

from __future__ import annotations

from boltzgen.config import ConfigError
from boltzgen.io import DataFileError
from boltzgen.pipeline import RunError


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConfigError, DataFileError, RunError]
    try:
        from boltzgen.energies.openmm import SystemBuildError

        errors.append(SystemBuildError)
    except ImportError:  # OpenMM is a dependency, but the analytic systems run without it
        pass
    return tuple(errors)


USER_ERRORS = _user_errors()
