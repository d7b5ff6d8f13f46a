"""The settings of the MD baselines beyond plain MD: temperature replica exchange (``remd:``) and
umbrella sampling along one or two collective variables (``umbrella:``).

Part of a config (:class:`boltzgen.config.Config`), validated and reported as one line like every
other key. The check that needs the system, that the ladder holds the target temperature, is
:func:`check_ladder`, which :func:`boltzgen.config.load_config` calls.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import (
    Field,
    NonNegativeInt,
    PositiveFloat,
    StringConstraints,
    field_validator,
    model_validator,
)

from boltzgen.config_base import StrictModel
from boltzgen.cvs import builtin_kind
from boltzgen.errors import ConfigError

#: As in boltzgen.config: a temperature beyond which no force field is meant to be used (K), the
#: longest Langevin time step (fs), the largest step count.
MAX_TEMPERATURE_K = 10_000.0
MAX_TIMESTEP_FS = 10.0
MAX_STEPS = 10**10
#: More replicas than this is no ladder a machine could run.
MAX_REPLICAS = 256
#: Two temperatures closer than this (relative) are the same temperature.
SAME_TEMPERATURE = 1e-9

Temperature = Annotated[float, Field(gt=0, le=MAX_TEMPERATURE_K)]


class RemdConfig(StrictModel):
    """Temperature replica exchange (`boltzgen md --remd`): no collective variable needed.

    The ladder is ``temperatures_K`` (increasing, K), or ``n_replicas`` temperatures spaced
    geometrically from ``min_temperature_K`` (default: the target's) to ``max_temperature_K``. It must
    hold the target temperature. Each of ``iterations`` iterations runs ``steps_per_exchange``
    Langevin steps of ``timestep_fs`` per replica, then tries exchanges between neighbouring
    temperatures. The first ``equilibration_iterations`` are left out of the estimates; the rest are
    cut into ``n_blocks`` blocks of consecutive iterations for the jackknife errors. ``keep_cis``:
    whether frames with a cis peptide bond (|omega| < 90 degrees, which hot replicas can reach) stay
    in the estimates. ``checkpoint_every``: iterations between the checkpoints a resume starts from.
    ``hydrogen_mass_amu``: if set, every hydrogen gets this mass, taken from the heavy atom it is
    bonded to (hydrogen mass repartitioning: only the dynamics change, not the distribution of
    configurations), which allows ``timestep_fs`` of 2 without constraints.
    """

    temperatures_K: list[Temperature] | None = Field(default=None, min_length=2, max_length=MAX_REPLICAS)
    min_temperature_K: Temperature | None = None
    max_temperature_K: Temperature = 600.0
    n_replicas: int = Field(default=8, ge=2, le=MAX_REPLICAS)
    steps_per_exchange: int = Field(default=1000, ge=1, le=MAX_STEPS)
    iterations: int = Field(default=5000, ge=2, le=MAX_STEPS)
    equilibration_iterations: int = Field(default=100, ge=0, le=MAX_STEPS)
    timestep_fs: float = Field(default=1.0, gt=0, le=MAX_TIMESTEP_FS)
    friction_per_ps: float = Field(default=1.0, gt=0, le=10_000.0)
    hydrogen_mass_amu: float | None = Field(default=None, ge=1.0, le=5.0)
    platform: Literal["Reference", "CPU", "CUDA", "OpenCL", "HIP"] = "Reference"
    checkpoint_every: int = Field(default=100, ge=1, le=MAX_STEPS)
    n_blocks: int = Field(default=20, ge=2, le=10_000)
    keep_cis: bool = False
    seed: int = Field(default=0, ge=0, le=2**32 - 1)

    @model_validator(mode="after")
    def _ladder_and_blocks(self) -> "RemdConfig":
        if self.temperatures_K is not None:
            given = sorted({"min_temperature_K", "max_temperature_K", "n_replicas"} & self.model_fields_set)
            if given:
                raise ValueError(f"give either temperatures_K or {', '.join(given)}, not both")
            steps = [b / a for a, b in zip(self.temperatures_K, self.temperatures_K[1:])]
            if min(steps) <= 1.0 + SAME_TEMPERATURE:
                raise ValueError(f"temperatures_K must increase strictly, got {self.temperatures_K}")
        elif self.min_temperature_K is not None and self.max_temperature_K <= self.min_temperature_K:
            raise ValueError(f"max_temperature_K ({self.max_temperature_K:g}) must exceed min_temperature_K "
                             f"({self.min_temperature_K:g})")
        production = self.iterations - self.equilibration_iterations
        if production < self.n_blocks:
            raise ValueError(f"iterations - equilibration_iterations ({production}) must be at least n_blocks "
                             f"({self.n_blocks}): every block needs an iteration")
        return self

    def ladder(self, target_K: float) -> list[float]:
        """The temperatures of the replicas (K, increasing): the explicit list, or the geometric ladder
        from ``min_temperature_K`` (default ``target_K``) to ``max_temperature_K``."""
        if self.temperatures_K is not None:
            return [float(t) for t in self.temperatures_K]
        low = float(self.min_temperature_K if self.min_temperature_K is not None else target_K)
        ratio = (self.max_temperature_K / low) ** (1.0 / (self.n_replicas - 1))
        return [low * ratio**k for k in range(self.n_replicas - 1)] + [float(self.max_temperature_K)]


def target_index(ladder: list[float], target_K: float) -> int | None:
    """The index of ``target_K`` in ``ladder`` (relative tolerance :data:`SAME_TEMPERATURE`), or None."""
    for k, temperature in enumerate(ladder):
        if math.isclose(temperature, target_K, rel_tol=SAME_TEMPERATURE):
            return k
    return None


def check_ladder(remd: RemdConfig, target_K: float | None, source: str) -> None:
    """A one-line :class:`ConfigError` when the REMD ladder cannot serve the target temperature
    ``target_K`` (K; None for a system without one, which has nothing to check): a ladder that does
    not hold it, or a geometric ladder whose top is not above it."""
    if target_K is None:
        return
    if remd.temperatures_K is None and remd.min_temperature_K is None and remd.max_temperature_K <= target_K:
        raise ConfigError(f"{source}: remd.max_temperature_K: {remd.max_temperature_K:g} K must exceed the target "
                          f"temperature {target_K:g} K, where the ladder starts")
    ladder = remd.ladder(target_K)
    if target_index(ladder, target_K) is None:
        shown = ", ".join(f"{t:.4g}" for t in ladder)
        key = "temperatures_K" if remd.temperatures_K is not None else "min_temperature_K"
        raise ConfigError(f"{source}: remd.{key}: the ladder ({shown} K) does not include the target temperature "
                          f"{target_K:g} K (system.temperature_K); replica exchange estimates at a ladder rung")


# --- umbrella sampling ---------------------------------------------------------------------------

#: More windows than this cannot be run or unbiased together (MBAR holds windows x frames numbers).
MAX_WINDOWS = 10_000
CVName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=64)]
#: An atom: its index, its name as mdtraj prints it (``ALA2-CA``), or an atom name unique in the system.
AtomRef = Union[NonNegativeInt, Annotated[str, StringConstraints(min_length=1, max_length=64)]]
_TORSION_KEYS = ("spacing_deg", "k_kJ_per_mol_rad2", "bin_deg")
_LENGTH_KEYS = ("range_nm", "spacing_nm", "k_kJ_per_mol_nm2", "bin_nm")


class UmbrellaCV(StrictModel):
    """A collective variable of the umbrella sampling and, for ``method: windows``, its grid of windows.

    The CV is a built-in name (``phi``, ``psi``, ``phiN``, ``psiN``: backbone torsions; ``x``, ``y``,
    ``z``: the coordinates of a one-particle system; ``xN``: flattened coordinate N, as the states of a
    system without torsions name them) or a name of your own with one of ``torsion``
    (four atoms), ``distance`` (two atoms) or ``coordinate`` (``[atom, x|y|z]``); atoms by index or
    as mdtraj prints them (``ALA2-CA``), see :mod:`boltzgen.cvs`. Windows along a torsion cover the
    circle every ``spacing_deg`` (default 20, rounded down to divide 360) with springs
    ``k_kJ_per_mol_rad2`` (default 50); along a length they run from ``range_nm[0]`` to
    ``range_nm[1]`` every ``spacing_nm`` with springs ``k_kJ_per_mol_nm2``. ``bin_deg`` / ``bin_nm``:
    the profile's bin width (default 10 deg, or half the spacing).
    """

    name: CVName
    torsion: list[AtomRef] | None = Field(default=None, min_length=4, max_length=4)
    distance: list[AtomRef] | None = Field(default=None, min_length=2, max_length=2)
    coordinate: tuple[AtomRef, Literal["x", "y", "z"]] | None = None
    spacing_deg: float | None = Field(default=None, gt=0, le=180)
    k_kJ_per_mol_rad2: float | None = Field(default=None, gt=0, le=1e7)
    bin_deg: float | None = Field(default=None, gt=0, le=180)
    range_nm: tuple[float, float] | None = None
    spacing_nm: float | None = Field(default=None, gt=0, le=1e4)
    k_kJ_per_mol_nm2: float | None = Field(default=None, gt=0, le=1e9)
    bin_nm: float | None = Field(default=None, gt=0, le=1e4)

    @model_validator(mode="after")
    def _one_definition_and_its_units(self) -> "UmbrellaCV":
        defined = [key for key in ("torsion", "distance", "coordinate") if getattr(self, key) is not None]
        if len(defined) > 1:
            raise ValueError(f"{self.name}: give one of torsion, distance, coordinate, not {' and '.join(defined)}")
        if defined and builtin_kind(self.name) is not None:
            raise ValueError(f"{self.name} is a built-in CV; give your own CV another name")
        if not defined and builtin_kind(self.name) is None:
            raise ValueError(f"{self.name!r} is no built-in CV (phi, psi, phiN, psiN, x, y, z, xN); define it with "
                             "torsion: [4 atoms], distance: [2 atoms] or coordinate: [atom, x|y|z]")
        wrong = _LENGTH_KEYS if self.kind == "torsion" else _TORSION_KEYS
        given = [key for key in wrong if getattr(self, key) is not None]
        if given:
            right = _TORSION_KEYS if self.kind == "torsion" else _LENGTH_KEYS
            raise ValueError(f"{given[0]} does not apply to the {self.kind} {self.name}; its keys are {', '.join(right)}")
        return self

    @property
    def kind(self) -> str:
        """``torsion``, ``distance`` or ``coordinate``."""
        for key in ("torsion", "distance", "coordinate"):
            if getattr(self, key) is not None:
                return key
        return builtin_kind(self.name) or "torsion"

    @property
    def grid_keys_given(self) -> list[str]:
        return [key for key in _TORSION_KEYS + _LENGTH_KEYS if getattr(self, key) is not None]

    def window_centers(self) -> list[float]:
        """The window centres along this CV: radians in [-pi, pi) for a torsion, nm for a length.

        A ValueError starting with the key at fault when the grid has fewer than 2 windows or a
        length lacks its range or spacing.
        """
        if self.kind == "torsion":
            n = math.ceil(360.0 / (self.spacing_deg or 20.0) - 1e-9)
            return [math.radians(-180.0 + i * 360.0 / n) for i in range(n)]
        if self.range_nm is None or self.spacing_nm is None:
            missing = "range_nm" if self.range_nm is None else "spacing_nm"
            raise ValueError(f"{missing}: windows along the {self.kind} {self.name} need range_nm: [lo, hi] and "
                             "spacing_nm")
        lo, hi = self.range_nm
        if not hi > lo:
            raise ValueError(f"range_nm: [{lo:g}, {hi:g}] is empty, a grid with no windows; give lo < hi")
        n = math.floor((hi - lo) / self.spacing_nm + 1e-9) + 1
        if n < 2:
            raise ValueError(f"spacing_nm: {self.spacing_nm:g} leaves one window in range_nm [{lo:g}, {hi:g}]; give "
                             f"a spacing below {hi - lo:g}")
        return [lo + i * self.spacing_nm for i in range(n)]

    def spring(self) -> float:
        """The spring constant: kJ/mol/rad^2 for a torsion (default 50), kJ/mol/nm^2 for a length."""
        if self.kind == "torsion":
            return self.k_kJ_per_mol_rad2 or 50.0
        if self.k_kJ_per_mol_nm2 is None:
            raise ValueError(f"k_kJ_per_mol_nm2: windows along the {self.kind} {self.name} need a spring")
        return self.k_kJ_per_mol_nm2

    def bin_width(self) -> float:
        """The profile's bin width: radians for a torsion (default 10 deg), nm for a length (default spacing / 2)."""
        if self.kind == "torsion":
            return math.radians(self.bin_deg or 10.0)
        return self.bin_nm or 0.5 * (self.spacing_nm or 1.0)


class UmbrellaConfig(StrictModel):
    """Umbrella sampling along one or two CVs (``boltzgen md CONFIG --umbrella``): the ΔF reference
    when plain MD cannot cross.

    ``method: windows``: harmonic windows on the grid of the ``cvs`` (each with its spacing and
    spring; two CVs make a 2-D grid), ``equilibration_steps`` per window from its neighbour's end
    (a walk over the grid), then ``steps_per_window`` of production, run by ``workers`` processes;
    all windows are unbiased together by MBAR, each window's series subsampled by its largest
    statistical inefficiency, with a block bootstrap (``n_bootstrap`` replicates of ``n_blocks``
    blocks per window) for the error. With ``prune_above_kT``, every window first runs
    ``pilot_steps_per_window``; only those whose centre lies at most ``prune_above_kT`` above the
    pilot's lowest free energy then run on to ``steps_per_window`` (the others keep their pilot
    frames, and all enter MBAR). With ``exchange_every``, neighbouring windows try to swap their
    configurations every that many steps (replica exchange umbrella sampling), for a coordinate the
    bias leaves free and slow, and the bootstrap draws the same time blocks in every window.
    ``method: flattened`` (phi alone, the default for
    phi): stage 1, short windows + MBAR, gives a rough profile F; stage 2 runs
    ``n_repeats`` long MD runs under the bias -min(F, f_cap) and reweights them.
    """

    method: Literal["flattened", "windows"] | None = None
    cvs: list[UmbrellaCV] = Field(default_factory=lambda: [UmbrellaCV(name="phi")], min_length=1, max_length=2)
    steps_per_window: int = Field(default=50_000, ge=1, le=MAX_STEPS)
    equilibration_steps: int = Field(default=5_000, ge=0, le=MAX_STEPS)
    n_bootstrap: int = Field(default=20, ge=0, le=10_000)
    n_blocks: int = Field(default=10, ge=2, le=10_000)
    workers: int = Field(default=1, ge=1, le=MAX_REPLICAS)
    pilot_steps_per_window: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    prune_above_kT: float | None = Field(default=None, gt=0, le=1e4)
    #: steps between exchanges of configurations between neighbouring windows (None: independent windows)
    exchange_every: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    stage1_spacing_deg: float = Field(default=10.0, gt=0, le=180)
    stage1_k_kJ_per_mol_rad2: PositiveFloat = 200.0
    stage1_steps_per_window: int = Field(default=20_000, ge=1, le=MAX_STEPS)
    stage1_skip_deg: list[tuple[float, float]] = Field(default_factory=lambda: [(115.0, 135.0)])
    f_cap_kT: PositiveFloat = 18.0
    production_steps: int = Field(default=5_000_000, ge=1, le=MAX_STEPS)
    n_repeats: int = Field(default=2, ge=1, le=MAX_REPLICAS)
    report_every: int = Field(default=100, ge=1, le=MAX_STEPS)
    platform: Literal["auto", "Reference", "CPU", "CUDA", "OpenCL", "HIP"] = "Reference"

    @field_validator("cvs", mode="before")
    @classmethod
    def _names_as_cvs(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _method_fits_the_cvs(self) -> "UmbrellaConfig":
        names = self.cv_names
        if len(set(names)) != len(names):
            raise ValueError(f"cvs: {names} names a CV twice")
        method = self.method or ("flattened" if names == ["phi"] else "windows")
        object.__setattr__(self, "method", method)  # the default depends on the CVs; the model is frozen
        if method == "flattened":
            self._check_flattened()
        else:
            self._check_windows()
        return self

    def _check_flattened(self) -> None:
        if self.cv_names != ["phi"]:
            raise ValueError(f"method flattened runs along phi alone; use method: windows for {' and '.join(self.cv_names)}")
        if self.exchange_every is not None:
            raise ValueError("exchange_every exchanges between harmonic windows; method flattened has none")
        if self.cvs[0].grid_keys_given:
            raise ValueError(f"cvs[0].{self.cvs[0].grid_keys_given[0]} sets a window grid, which method flattened "
                             "does not use (its windows are stage1_spacing_deg and stage1_k_kJ_per_mol_rad2)")
        # Each window starts with 2,000 equilibration steps and production with 10,000, both stored.
        runs = {"stage1_steps_per_window": self.stage1_steps_per_window, "production_steps": self.production_steps}
        for key, steps in runs.items():
            if steps % self.report_every or 2_000 % self.report_every:
                raise ValueError(f"{key} ({steps}) and the equilibration (2,000 steps) must be multiples of "
                                 f"report_every ({self.report_every})")
        if self.production_steps <= 10_000:
            raise ValueError(f"production_steps ({self.production_steps}) must exceed the 10,000 equilibration steps")

    def _check_windows(self) -> None:
        n_windows = 1
        for i, cv in enumerate(self.cvs):
            try:
                n_windows *= len(cv.window_centers())
                cv.spring()
            except ValueError as exc:
                raise ValueError(f"cvs[{i}].{exc}") from None
        if n_windows > MAX_WINDOWS:
            raise ValueError(f"cvs: the grid has {n_windows:,} windows, more than {MAX_WINDOWS:,}; widen the spacing")
        for key in ("steps_per_window", "equilibration_steps", "pilot_steps_per_window"):
            if (getattr(self, key) or 0) % self.report_every:
                raise ValueError(f"{key} ({getattr(self, key)}) must be a multiple of report_every ({self.report_every})")
        if (self.pilot_steps_per_window is None) != (self.prune_above_kT is None):
            raise ValueError("pilot_steps_per_window and prune_above_kT go together: give both or neither")
        if self.pilot_steps_per_window is not None and not (
                2 * self.report_every <= self.pilot_steps_per_window < self.steps_per_window):
            raise ValueError(f"pilot_steps_per_window ({self.pilot_steps_per_window}) must store 2 frames or more and "
                             f"be shorter than steps_per_window ({self.steps_per_window})")
        if self.exchange_every is not None:
            step = max(self.exchange_every, self.report_every)
            if step % min(self.exchange_every, self.report_every) or self.steps_per_window % step:
                raise ValueError(f"exchange_every ({self.exchange_every}) and report_every ({self.report_every}) must "
                                 f"divide one another and steps_per_window ({self.steps_per_window})")
            if self.prune_above_kT is not None:
                raise ValueError("exchange_every runs every window to steps_per_window; drop prune_above_kT")
        if self.steps_per_window // self.report_every < 2 * self.n_blocks:
            raise ValueError(f"steps_per_window ({self.steps_per_window}) stores fewer than 2 frames per bootstrap "
                             f"block (n_blocks {self.n_blocks}, report_every {self.report_every})")

    @property
    def cv_names(self) -> list[str]:
        return [cv.name for cv in self.cvs]
