"""The exceptions that mean "bad input": the CLI prints their one-line message and exits with 2.

Each message names the file, key or option at fault and, where it helps, what to do next. Faults of
the environment (a full disk, no permission, a path too long, no memory) get one line each too:
:func:`describe_environment_error`.
"""

from __future__ import annotations

import errno
import re


class ConfigError(ValueError):
    """A bad config: the message is one line naming the file and the place."""


class DataFileError(ValueError):
    """A data file that cannot be used: the message is one line naming the file and the problem."""


class SystemBuildError(ValueError):
    """A molecular system cannot be built; the one-line message names the problem and the file."""


class RunError(RuntimeError):
    """A run that cannot go on: one line saying why and what to do next."""


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataFileError, SystemBuildError, RunError)


_ERRNO_IN_TEXT = re.compile(r"errno = (\d+)")
_WHAT_TO_DO = {
    errno.ENOSPC: ("the disk is full", "free space on it, or write elsewhere with --out"),
    errno.EDQUOT: ("the disk quota is exhausted", "free space, or write elsewhere with --out"),
    errno.EACCES: ("permission denied", "choose a folder you may write to with --out"),
    errno.EPERM: ("operation not permitted", "choose a folder you may write to with --out"),
    errno.EROFS: ("the file system is read-only", "write elsewhere with --out"),
    errno.ENAMETOOLONG: ("the path is too long", "use a shorter --out or name"),
    errno.EFBIG: ("the file grew beyond the size limit", "raise the limit (ulimit -f) or write less"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "fix the path"),
    errno.EISDIR: ("the path is a folder, not a file", "fix the path"),
}


def describe_environment_error(exc: BaseException) -> str | None:
    """One line for a fault of the environment, naming the file and what to do; ``None`` if not one.

    OS errors are classified by their errno, which HDF5 reports only inside its message text.
    """
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)):
        return "out of memory; lower the batch size, the number of samples or chains, or the flow's width"
    if not isinstance(exc, OSError):
        return None
    code = exc.errno
    if code is None:
        found = _ERRNO_IN_TEXT.search(str(exc))
        code = int(found.group(1)) if found else None
    if code not in _WHAT_TO_DO:
        return None
    what, todo = _WHAT_TO_DO[code]
    where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
    return f"{where}{what}; {todo}"
