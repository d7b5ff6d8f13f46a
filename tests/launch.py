"""Launching tests on several processes: gloo on the CPU, as torchrun would, with a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from boltzgen import distributed

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on localhost that nothing listens on (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, size: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank)})
    with distributed.launched():
        fn(rank, *args)


def spawn(fn: Callable[..., None], size: int, *args: Any) -> None:
    """Run ``fn(rank, *args)`` in ``size`` fresh processes joined into one gloo group (what torchrun
    sets up); an exception in any of them is raised here. ``fn`` must be importable (module level)."""
    mp.spawn(_join, args=(size, free_port(), fn, args), nprocs=size, join=True)


def torchrun(n_proc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node n_proc -m boltzgen ARGS`` from the repository root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a crash shows its Python stack
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_proc}",
               "-m", "boltzgen", *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode and "(SIGABRT)" in done.stderr:
        # About 1 launch in 30 had a rank abort in C++ at exit ("terminate called without an active
        # exception") while torch._dynamo kept the process group alive (fixed in distributed.start;
        # test_leaving_a_launch_ends_the_gloo_threads). Kept as a guard until the fix has a long record:
        # one retry keeps the suite's verdict about results, and the abort is printed as a warning.
        warnings.warn(f"a torchrun rank aborted (SIGABRT); launching once more: {done.stderr[-2000:]}", stacklevel=2)
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)
    return done


def error_lines(stderr: str) -> list[str]:
    """The lines boltzgen printed as errors (torchrun adds its own report of the failed launch)."""
    return [line for line in stderr.splitlines() if line.startswith("boltzgen: ")]
