"""Atomic file writes: a file is either its old self or complete, never half written.

Every output of the package goes through :func:`atomic_path`: the data are written to a temporary
file beside the target, which replaces the target only when the write succeeded. JSON is strict:
a non-finite float is written as ``null`` (:func:`json_safe`).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Strict JSON (see :func:`json_safe`): a non-finite number is written as ``null``."""
    atomic_write_text(path, json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")


def json_safe(value: Any) -> Any:
    """Nested copy with numpy types made plain and every non-finite float replaced by ``None``."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def unreadable_reason(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as an input file (missing, a folder, a FIFO, no permission), or ``None``.

    A FIFO or device is refused before it is opened, since reading one can block forever.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "file not found"
    except PermissionError:
        return "cannot be read (permission denied)"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or type(exc).__name__})"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a FIFO, socket or device)"
    if not os.access(path, os.R_OK):
        return "cannot be read (permission denied)"
    return None


#: Room kept free beyond what a write needs: file-system and HDF5 metadata.
SPACE_MARGIN_BYTES = 4 << 20


def ensure_free_space(path: str | Path, n_bytes: int) -> None:
    """Raise ``OSError(ENOSPC)`` naming ``path`` unless its disk has ``n_bytes`` plus a margin free.

    HDF5 crashes the process when it closes a file after a write failed for lack of space, so the
    HDF5 writers check first and never let it reach a full disk.
    """
    folder = Path(path).parent
    if shutil.disk_usage(folder).free < n_bytes + SPACE_MARGIN_BYTES:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
