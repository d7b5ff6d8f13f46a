"""The exceptions that mean "bad input": the CLI prints their one-line message and exits with 2.

Each message names the file, key or option at fault and, where it helps, what to do next.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad config: the message is one line naming the file and the place."""


class DataFileError(ValueError):
    """A data file that cannot be used: the message is one line naming the file and the problem."""


class SystemBuildError(ValueError):
    """A molecular system cannot be built; the one-line message names the problem and the file."""


class RunError(RuntimeError):
    """A run that cannot go on: one line saying why and what to do next."""


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataFileError, SystemBuildError, RunError)
