"""Bounded work: a run whose arrays cannot fit in memory, or whose files cannot fit on disk, is
refused before it starts, with what it would need.

The estimates count the large arrays a command keeps (samples' weights and CVs, chains, MD frames,
a training batch's activations), not every temporary: they are lower bounds, so a refusal is
certain, while a run that passes can still run short of memory and then gets a one-line error.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from boltzgen.config import Config
from boltzgen.errors import RunError

GIB = float(1 << 30)
#: Memory a process keeps for itself beyond the arrays counted here (Python, torch, OpenMM).
OVERHEAD_BYTES = 1 << 30
#: float64 numbers kept per flow sample besides its CVs: log q, u, log w
PER_SAMPLE_NUMBERS = 3


def available_memory_bytes() -> int:
    """Memory available to new allocations: MemAvailable on Linux, else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_disk_bytes(folder: Path) -> int:
    """Free space on the disk that holds ``folder`` (or its nearest existing parent)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return shutil.disk_usage(".").free


@dataclass(frozen=True)
class Shape:
    """What the estimates need to know of a target: its state dimension, atoms and CVs."""

    dim: int
    n_cvs: int
    molecule: bool

    @property
    def frame_bytes(self) -> int:
        """Bytes of one stored frame: float32 positions (molecules) or float64 (analytic), plus 3 float64."""
        return (4 if self.molecule else 8) * self.dim + 8 * PER_SAMPLE_NUMBERS


def sampling_memory(shape: Shape, n: int, batch: int) -> int:
    """Bytes ``draw_samples`` keeps for ``n`` samples drawn in batches of ``batch``."""
    kept = n * 8 * (PER_SAMPLE_NUMBERS + shape.n_cvs)
    return kept + batch * 8 * shape.dim * 8  # a batch of states, latents and Jacobian work


def stored_samples_memory(config: Config, dim: int) -> int:
    """Bytes of the largest sample store of a data-free stage: FAB's replay buffer (x, log w, log q)
    or the annealing stage's reweighted set (x, u, log q, log w), float64."""
    largest = 0
    for stage in config.training:
        replay = stage.fab_settings.replay
        if stage.loss == "fab" and replay is not None:
            largest = max(largest, replay.size * 8 * (dim + 2))
        if stage.loss == "annealing" and stage.annealing is not None:
            largest = max(largest, stage.annealing.samples * 8 * (dim + 4))
        if stage.loss == "reweighted_forward_kl":
            largest = max(largest, stage.reweighting_settings.samples * 8 * (dim + 4))
    return largest


def training_memory(config: Config, dim: int) -> int:
    """Bytes of the largest training batch's activations kept for backpropagation."""
    flow = config.flow
    per_layer = sum(flow.hidden) + dim * (3 * flow.bins + 1)
    return max(stage.batch for stage in config.training) * 8 * 4 * flow.blocks * per_layer


def baseline_memory(config: Config, shape: Shape) -> int:
    """Bytes of the baseline's kept states: MALA chains (analytic) or MD frames (molecules)."""
    if shape.molecule:
        md = config.md
        frames = md.steps // md.report_every + (md.seeded_steps or md.steps) // md.report_every
        return frames * (4 * shape.dim + 8 * 4)
    b = config.baseline
    return 8 * shape.dim * b.chains * (64 + b.steps // b.thin)


def size_text(n_bytes: float) -> str:
    """``1.5 GiB``, ``320 MiB``, ``12 KiB``."""
    for unit, scale in (("GiB", GIB), ("MiB", float(1 << 20))):
        if abs(n_bytes) >= scale:
            return f"{n_bytes / scale:,.1f} {unit}"
    return f"{max(n_bytes, 0) / 1024:,.0f} KiB"


def require(what: str, needed: int, available: int, fix: str, on: str = "memory") -> None:
    """A RunError when ``needed`` bytes exceed ``available``, naming the setting and the sizes."""
    if needed > available:
        raise RunError(f"{what} needs about {size_text(needed)} of {on}, and {size_text(available)} "
                       f"{'is' if on == 'memory' else 'are'} available; {fix}")


def check_train(config: Config, shape: Shape, out: Path) -> None:
    """Refuse a `train` run whose baseline, training batch or samples cannot fit."""
    memory = available_memory_bytes() - OVERHEAD_BYTES
    require("the baseline (baseline.chains x steps / thin, or md.steps / report_every frames)",
            baseline_memory(config, shape), memory, "lower them")
    require("training (batch x flow.blocks x flow.hidden)", training_memory(config, shape.dim), memory,
            "lower training[*].batch or the flow's size")
    require("the samples data-free stages keep (fab.replay.size, annealing.samples, reweighting.samples)",
            stored_samples_memory(config, shape.dim), memory, "lower them")
    check_samples(shape, config.sampling.n, config.sampling.batch, out, "sampling.n")


def check_samples(shape: Shape, n: int, batch: int, out: Path, option: str) -> None:
    """Refuse ``n`` samples whose weights and CVs cannot fit in memory or whose file cannot fit on disk."""
    require(f"{option} = {n:,} samples", sampling_memory(shape, n, batch), available_memory_bytes() - OVERHEAD_BYTES,
            f"lower {option}")
    require(f"{option} = {n:,} samples", n * shape.frame_bytes, free_disk_bytes(out), f"lower {option} or free space",
            on=f"disk at {out}")


def check_chains(shape: Shape, chains: int, kept: int) -> None:
    """Refuse MCMC whose kept states (``chains x kept x dim`` float64) cannot fit in memory."""
    require(f"--chains {chains:,} x {kept:,} kept states", chains * kept * 8 * (shape.dim + 1),
            available_memory_bytes() - OVERHEAD_BYTES, "lower --chains or --steps, or raise --thin")
