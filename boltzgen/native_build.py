"""Builds the package's C kernels from source at first use, into a per-user cache.

A kernel is one C file next to the Python module that calls it through ctypes. It is compiled with
the system C compiler (``$CC``, else ``cc``) into a shared library under ``$BOLTZGEN_CACHE_DIR``
(default ``~/.cache/boltzgen``), keyed by the source, the compiler, the flags and the CPU, so a
changed source or machine builds afresh and an unchanged one loads the cached library. Builds are
atomic (compiled into a temporary file, then renamed). ``BOLTZGEN_NATIVE=0`` disables every kernel;
callers then run their torch reference code. :func:`load_once` is the lazy loader each kernel's
module calls, keeping the loaded library and the reason for its absence in its own globals.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

# -fno-math-errno and -fno-trapping-math let sqrt and the clamps vectorize and change no result;
# no -ffast-math, which would (and would drop NaN checks). -z defs makes a missing symbol a build error.
BASE_FLAGS = ["-O3", "-fPIC", "-shared", "-pthread", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd",
              "-Wl,-z,defs"]
#: Tried in order, the first that builds wins: this CPU's vector units, then a portable build.
PORTABLE_VARIANTS: list[tuple[list[str], list[str]]] = [(["-march=native"], ["-lm"]), ([], ["-lm"])]


def disabled() -> bool:
    """Whether ``BOLTZGEN_NATIVE`` turns the C kernels off."""
    return os.environ.get("BOLTZGEN_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def cache_dir() -> Path:
    env = os.environ.get("BOLTZGEN_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "boltzgen"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and feature flags (Linux), else the machine name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags"))][:2]
        if keep:
            return "\n".join(keep)
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _compile(compiler: str, source: Path, flags: list[str], libs: list[str], target: Path) -> str | None:
    """Compile ``source`` into ``target`` atomically; returns None, or the compiler's complaint."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run([compiler, *flags, "-o", str(out), str(source), *libs],
                              check=False, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            first_error = next((ln for ln in lines if "error" in ln), lines[0] if lines else "")
            return first_error or f"exit status {proc.returncode}"
        os.replace(out, target)
    return None


def build(source: Path, variants: Sequence[tuple[list[str], list[str]]] = PORTABLE_VARIANTS) -> ctypes.CDLL:
    """The library built from ``source`` with the first of ``variants`` (extra flags, libraries) that
    compiles and loads; a RuntimeError naming the last failure when none does."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler ({compiler!r} not found; set CC)")
    text = source.read_bytes()
    errors = []
    for extra, libs in variants:
        flags = BASE_FLAGS + extra
        key = hashlib.sha256(b"\0".join([text, " ".join([compiler, *flags, *libs]).encode(), _cpu_id().encode()]))
        target = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
        if not target.exists():
            error = _compile(compiler, source, flags, libs, target)
            if error is not None:
                errors.append(error)
                continue
        try:
            return ctypes.CDLL(str(target))
        except OSError as error:  # e.g. a library the build linked is missing at run time
            errors.append(str(error))
    raise RuntimeError(f"building {source.name} failed: {errors[-1]}")


def load_once(library: ctypes.CDLL | None, reason: str | None, source: Path,
              variants: Sequence[tuple[list[str], list[str]]], declare: Callable[[ctypes.CDLL], None], name: str,
              fallback: str) -> tuple[ctypes.CDLL | None, str | None]:
    """One step of a module's lazy loader: the new ``(library, reason)`` from its current ones.

    Nothing is tried again once either is set (a module resets both to retry). Otherwise the
    library is built from ``source`` (:func:`build` with ``variants``) and ``declare`` sets its
    functions' argument and result types; where that is disabled or fails, the library is None and
    the reason says why, and a failed build warns once, naming the kernel (``name``) and what runs
    instead (``fallback``).
    """
    if library is not None or reason is not None:
        return library, reason
    if disabled():
        return None, "disabled by BOLTZGEN_NATIVE"
    try:
        built = build(source, variants)
        declare(built)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        # stacklevel 3: the warning points at whoever asked the module for its kernel.
        warnings.warn(f"boltzgen: the {name} C kernel is unavailable ({error}); {fallback}", RuntimeWarning,
                      stacklevel=3)
        return None, str(error)
    return built, None
