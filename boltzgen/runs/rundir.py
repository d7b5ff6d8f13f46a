"""The run directory: the one place that knows its file names.

```
runs/<name>/
  config.yaml  checkpoint.pt  metrics.csv  samples.h5  summary.json  sample_summary.json
  compare.json  report.md  plots/*.png
  md/       md.h5, hot.h5, seeded_<state>.h5 (+ .ckpt.h5 while running), config.yaml, summary.json, plots/
  umbrella/ the umbrella-sampling reference, config.yaml and summary.json
  umbrella_<cv>[_<cv>]/  harmonic umbrella windows on a grid of CVs: window_<i>.h5, seeds.json, summary.json, plots/
  remd/     replica exchange: remd.nc + remd_checkpoint.nc (openmmtools), samples.h5, config.yaml, summary.json, plots/
  mcmc*/    chains.h5, summary.json, plots/   (mcmc/ by default; `mcmc --out` may name another)
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from boltzgen.errors import RunError


@dataclass(frozen=True)
class Folder:
    """A folder of results: its resolved config, its summary and its plots."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def plot(self, name: str) -> Path:
        """``plots/<name>.png``."""
        return self.plots / f"{name}.png"


class MCMCDir(Folder):
    """A folder written by ``boltzgen mcmc``."""

    @property
    def chains(self) -> Path:
        return self.path / "chains.h5"


class MDDir(Folder):
    """The MD baseline's folder, ``<run>/md/`` (or any folder given with ``compare --md``)."""

    @property
    def trajectory(self) -> Path:
        """The plain MD run: the baseline's only unbiased data."""
        return self.path / "md.h5"

    @property
    def hot_trajectory(self) -> Path:
        return self.path / "hot.h5"

    def seeded_trajectory(self, state: str, seed: int) -> Path:
        """The ``seed``-th MD run seeded in ``state`` (from 0)."""
        return self.path / f"seeded_{state}_{seed}.h5"

    @staticmethod
    def checkpoint(trajectory: Path) -> Path:
        """The checkpoint an MD run keeps beside its trajectory while it runs."""
        return trajectory.with_suffix(".ckpt.h5")


class UmbrellaDir(Folder):
    """The umbrella-sampling reference, ``<run>/umbrella/``; its inner files belong to the simulation."""


class RemdDir(Folder):
    """Temperature replica exchange, ``<run>/remd/``."""

    @property
    def storage(self) -> Path:
        """openmmtools' storage file; it keeps its checkpoints beside it, in ``remd_checkpoint.nc``."""
        return self.path / "remd.nc"

    @property
    def samples(self) -> Path:
        """Every production frame of every replica with its MBAR log-weight at the target temperature."""
        return self.path / "samples.h5"


class RunDir(Folder):
    """A run directory and every path inside it."""
    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def diagnostics(self) -> Path:
        """Per logged step of a data-free stage (FAB, annealing): its AIS, buffer and annealing diagnostics."""
        return self.path / "diagnostics.csv"

    @property
    def samples(self) -> Path:
        return self.path / "samples.h5"

    @property
    def sample_summary(self) -> Path:
        return self.path / "sample_summary.json"

    @property
    def compare_json(self) -> Path:
        return self.path / "compare.json"

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    @property
    def sample_fes(self) -> Path:
        """The FES arrays of the last ``boltzgen sample``, beside its plots."""
        return self.plots / "sample_fes.json"

    @property
    def md(self) -> MDDir:
        return MDDir(self.path / "md")

    @property
    def umbrella(self) -> UmbrellaDir:
        """The flattened-bias umbrella sampling along phi: the reference `train` reports."""
        return UmbrellaDir(self.path / "umbrella")

    def umbrella_folder(self, method: str, cvs: list[str]) -> UmbrellaDir:
        """Where ``md --umbrella`` writes: :attr:`umbrella` for the flattened bias along phi,
        ``umbrella_<cv>[_<cv>]/`` for harmonic windows on the grid of those CVs."""
        if method == "flattened":
            return self.umbrella
        return UmbrellaDir(self.path / ("umbrella_" + "_".join(cvs)))

    def umbrella_runs(self) -> list[UmbrellaDir]:
        """Every ``umbrella*/`` folder that holds a summary, sorted by name."""
        return [UmbrellaDir(p.parent) for p in sorted(self.path.glob("umbrella*/summary.json"))]

    @property
    def remd(self) -> RemdDir:
        return RemdDir(self.path / "remd")

    @property
    def mcmc(self) -> MCMCDir:
        """The default folder of ``boltzgen mcmc``."""
        return MCMCDir(self.path / "mcmc")

    def mcmc_runs(self) -> list[MCMCDir]:
        """Every ``mcmc*/`` folder that holds a summary, sorted by name."""
        return [MCMCDir(p.parent) for p in sorted(self.path.glob("mcmc*/summary.json"))]

    def relative(self, path: Path) -> str:
        """``path`` as stored in a summary: relative to the run directory when inside it, so that a
        copied or moved run directory reads its own files."""
        try:
            return str(Path(path).resolve().relative_to(self.path.resolve()))
        except ValueError:
            return str(Path(path).resolve())

    def resolve(self, stored: str) -> Path:
        """The file a summary names: relative paths are inside the run directory."""
        path = Path(stored)
        return path if path.is_absolute() else self.path / path

    def prepare_for_training(self, resume: bool, force: bool) -> None:
        """Refuse to overwrite a trained run unless asked, and create the folders."""
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"{self.path}: is a file, not a run directory; pass --out DIR")
        if (self.checkpoint.exists() or self.summary.exists()) and not (resume or force):
            raise RunError(f"{self.path} already holds a trained run; pass --resume to continue it, --force to "
                           "overwrite it, or --out DIR to write elsewhere")
        self.plots.mkdir(parents=True, exist_ok=True)

    def remove_orphan_temporaries(self) -> list[Path]:
        """Delete the temporary files an interrupted write left behind (``.NAME.*.tmp``, ``*.csv.tmp``).

        Atomic writes go to such a file beside their target and rename it when done; a killed
        command leaves it. One command at a time may write into a run directory.
        """
        orphans = [p for pattern in (".*.tmp", "*.csv.tmp") for p in self.path.glob(pattern)]
        orphans += [p for pattern in ("*/.*.tmp", "*/*.csv.tmp") for p in self.path.glob(pattern)]
        for path in orphans:
            path.unlink(missing_ok=True)
        return orphans

    def require_trained(self) -> RunDir:
        """This run directory, checked to hold a trained flow (its config and checkpoint)."""
        if not self.path.exists():
            raise RunError(f"{self.path}: no such run directory; create one with "
                           f"`boltzgen train CONFIG --out {self.path}`")
        if not self.path.is_dir():
            raise RunError(f"{self.path}: is a file, not a run directory written by `boltzgen train`")
        for path in (self.config, self.checkpoint):
            if not path.exists():
                raise RunError(f"{self.path}: no {path.name}; is this a run directory written by `boltzgen train`?")
        self.remove_orphan_temporaries()
        return self
