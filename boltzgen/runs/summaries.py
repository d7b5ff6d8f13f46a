"""The summary files of a run, one frozen dataclass each, with ``to_json`` and ``from_json``.

Their JSON keys are a public interface (users' scripts read them), so the field names are the keys,
with one exception: ``from`` is a Python keyword and is the field ``from_``. Two conventions:

- a float that is not finite (an undefined error bar, an infinite autocorrelation time) is ``NaN``
  here and ``null`` in the file;
- an optional field whose value is ``None`` is left out of the file (a molecule-only key of an
  analytic run, say).

Reading validates the shape (pydantic): a summary with a missing key or a wrong type is a
:class:`~boltzgen.errors.DataFileError` naming the file and the key. Unknown keys are ignored, so
files written by a later version still read.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from boltzgen.errors import DataFileError
from boltzgen.estimators.free_energy import FreeEnergy
from boltzgen.files import atomic_write_json, json_safe

#: A float that JSON stores as ``null`` when it is not finite; read back as NaN.
Float = Annotated[float, BeforeValidator(lambda value: math.nan if value is None else value)]

_CONFIG = ConfigDict(extra="ignore", populate_by_name=True, arbitrary_types_allowed=True)
S = TypeVar("S", bound="SummaryFile")


def summary(cls: type) -> type:
    """Decorator: a frozen, keyword-only, validating dataclass with the conventions above."""
    return dataclass(frozen=True, kw_only=True, config=_CONFIG)(cls)


@cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _drop_none(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_drop_none(item) for item in value]
    return value


class SummaryFile:
    """Mixin of every summary: JSON conversion and atomic reading and writing."""

    def to_json(self) -> dict[str, Any]:
        """The JSON object: keys as in the file, ``None`` fields left out, non-finite floats as ``null``."""
        return json_safe(_drop_none(_adapter(type(self)).dump_python(self, by_alias=True)))

    @classmethod
    def from_json(cls: type[S], data: Any, source: str | Path = "summary") -> S:
        """Validate a parsed JSON object; a bad shape is a :class:`DataFileError` naming ``source`` and the key."""
        try:
            return _adapter(cls).validate_python(data)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"]) or "(top level)"
            raise DataFileError(f"{source}: {where}: {error['msg']}; is this a {cls.__name__} file "
                                "written by boltzgen?") from None

    def write(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def read(cls: type[S], path: Path) -> S:
        """Read and validate ``path``; missing, unreadable or malformed files are a :class:`DataFileError`."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise DataFileError(f"{path}: file not found") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise DataFileError(f"{path}: not a readable JSON file ({type(exc).__name__})") from None
        return cls.from_json(data, path)


# --- rows shared by the summaries ----------------------------------------------------------------

@summary
class FreeEnergyRow(SummaryFile):
    """ΔF = F(to) - F(from) in kT with its standard error; ``exact_kT`` where quadrature knows it.

    ``empty_state`` names the state that got no weight (the value is then ±inf or NaN).
    """

    from_: str = Field(alias="from")
    to: str
    delta_f_kT: Float
    stderr_kT: Float
    n_eff: Float = math.nan
    empty_state: str | None = None
    exact_kT: float | None = None

    @classmethod
    def of(cls, pair: tuple[str, str], estimate: FreeEnergy, exact_kT: float | None = None) -> FreeEnergyRow:
        return cls(from_=pair[0], to=pair[1], delta_f_kT=estimate.value, stderr_kT=estimate.stderr,
                   n_eff=estimate.n_eff, empty_state=estimate.empty_state, exact_kT=exact_kT)

    @property
    def estimable(self) -> bool:
        return math.isfinite(self.delta_f_kT)


@summary
class UmbrellaFreeEnergyRow(FreeEnergyRow):
    """A free-energy row of umbrella sampling with its error method: the flattened bias's repeats, or
    the windows' analytic MBAR and block-bootstrap errors (``stderr_kT`` is the larger) and the ΔF of
    the first and of the second half of every window (``halves_kT``). ``p_b``: the unbiased
    probability of state ``to``."""

    repeats_kT: list[Float] | None = None
    repeats_stderr_kT: list[Float] | None = None
    repeat_spread_kT: Float | None = None
    stderr_from_repeats_kT: Float | None = None
    stderr_analytic_kT: Float | None = None
    stderr_bootstrap_kT: Float | None = None
    halves_kT: list[Float] | None = None
    p_b: Float
    error_method: str


@summary
class ThermodynamicRow(SummaryFile):
    """f(T) - f(T_target) in kT: ``temperature_K`` for molecules, ``temperature_ratio`` for analytic systems."""

    temperature_K: float | None = None
    temperature_ratio: float | None = None
    delta_f_kT: Float
    stderr_kT: Float
    n_eff: Float
    method: str


@summary
class Profile(SummaryFile):
    """A free-energy profile along a CV: bin centres, F in kT and its standard error.

    ``cv`` names the CV (absent: phi) and ``unit`` the unit of the centres (absent: rad; ``centers_rad``
    keeps its name for the files written before other CVs); ``n_eff`` the effective samples per bin.
    """

    centers_rad: list[float]
    f_kT: list[Float]
    stderr_kT: list[Float]
    source: str | None = None
    cv: str | None = None
    unit: str | None = None
    n_eff: list[Float] | None = None


@summary
class Surface(SummaryFile):
    """A free-energy surface over two CVs: ``edges`` per CV (in their units), F in kT ``[bins0][bins1]``
    (the first CV along the rows, null for an empty bin) with its standard error."""

    cvs: list[str]
    edges: list[list[float]]
    f_kT: list[list[Float]]
    stderr_kT: list[list[Float]]


@summary
class ProfileCheck(SummaryFile):
    """A profile compared with plain MD along ``cv`` over ``n_bins`` bins where the MD is converged
    (``bins`` says how they were chosen): the RMSE after the best shift, the largest difference in
    combined standard errors, chi^2 with its p-value, and whether they ``disagree``."""

    reference: str
    cv: str
    bins: str
    n_bins: int
    rmse_kT: Float
    max_abs_z: Float
    chi2: Float
    p_value: Float
    disagree: bool


@summary
class LogDetEstimate(SummaryFile):
    """The flow's log-det is estimated (residual flows), so ``log q`` and the importance weights carry
    the estimator's noise.

    ``estimator`` names it and ``unbiased`` says whether ``E[log q_hat] = log q`` (even then a weight
    ``exp(-u - log q_hat)`` is biased upward by about ``exp(var / 2)``). The noise is measured on
    ``n_points`` flow samples, each latent evaluated ``n_repeats`` times: ``log_q_std`` is the root of
    the mean per-point variance of ``log q``, ``log_q_std_max`` the largest per-point standard
    deviation. ``log_q_bias`` is the mean of (average estimate - exact ``log q``) over the points,
    where the exact log-det was affordable (``null`` otherwise); ``log_q_bias_stderr`` its error.
    """

    estimator: str
    unbiased: bool
    n_points: int
    n_repeats: int
    log_q_std: Float
    log_q_std_max: Float
    log_q_bias: Float | None = None
    log_q_bias_stderr: Float | None = None


@summary
class LogZRow(SummaryFile):
    """log Z = log ∫ exp(-u) dx by importance sampling: ``estimate`` = logsumexp(log w) - log N over
    the flow samples (weight-0 samples count in N) with its delta-method ``stderr``; ``exact`` where
    it is known (analytic systems: quadrature or closed form). ``relative`` is true for a molecule:
    an OpenMM energy has an arbitrary zero and the flow's density is over its own coordinates, so
    only differences between runs of the same system and coordinates mean something.
    """

    estimate: Float
    stderr: Float
    exact: float | None = None
    relative: bool


# --- the summary files ---------------------------------------------------------------------------

@summary
class BaselineSummary(SummaryFile):
    """The baseline that gave the training data: MALA (analytic systems) or MD (molecules).

    ``n_samples``, ``energy_evaluations`` and ``wall_seconds`` are the plain run's, the only part
    whose estimates are unbiased; ``training_data`` counts everything the flow was trained on.
    """

    source: str
    n_samples: int
    energy_evaluations: int
    wall_seconds: float
    free_energies: list[FreeEnergyRow]
    training_data: dict[str, float]
    acceptance_rate: dict[str, Float] | None = None
    step_sizes: dict[str, float] | None = None
    h5: list[str] | None = None
    temperature_K: float | None = None
    steps: list[int] | None = None


@summary
class UmbrellaSummary(SummaryFile):
    """``umbrella*/summary.json``: umbrella sampling's ΔF between the states and its profiles.

    ``method`` ``flattened_umbrella`` (``umbrella/``: the flattening bias along phi, with ``stage1``,
    ``transitions`` and ``production_h5``) or ``umbrella_windows`` (``umbrella_<cvs>/``: harmonic
    windows on the grid of ``cvs``, with ``windows``, ``profiles`` per CV and, for two CVs, ``fes_2d``).
    ``profile`` is along the first CV. ``md_agreement`` compares each profile with plain MD where that
    is converged, and ``warnings`` says what a reader must know (e.g. that they disagree).
    """

    method: str = "flattened_umbrella"
    cvs: list[str] | None = None
    temperature_K: float
    free_energies: list[UmbrellaFreeEnergyRow]
    profile: Profile
    profiles: dict[str, Profile] | None = None
    fes_2d: Surface | None = None
    stage1: dict[str, Any] | None = None
    windows: dict[str, Any] | None = None
    settings: dict[str, Any]
    energy_evaluations: dict[str, int]
    wall_seconds: float
    call_wall_seconds: float
    transitions: list[int] | None = None
    n_samples: int
    production_h5: list[str] | None = None
    md_agreement: list[ProfileCheck] | None = None
    warnings: list[str] | None = None

    @property
    def label(self) -> str:
        """How `compare` names this method."""
        if self.method == "flattened_umbrella":
            return "umbrella sampling (flattening bias)"
        return f"umbrella sampling ({' × '.join(self.cvs or ['phi'])} windows, MBAR)"


@summary
class TrainSummary(SummaryFile):
    """``summary.json``: the flow's importance weights and ΔF after training, and the baseline's."""

    name: str
    device: str
    ess: Float
    n_samples: int
    n_nonfinite: int
    max_normalized_weight: Float
    pareto_khat: Float
    weights_reliable: bool
    free_energies: list[FreeEnergyRow]
    n_wrong_chirality: int | None = None
    chirality_rejected: bool | None = None
    baseline: BaselineSummary | None = None  # None: trained without data, and no baseline ran
    umbrella: UmbrellaSummary | None = None
    energy_evaluations: dict[str, int]
    energy_seconds: dict[str, float]
    training_wall_seconds: float
    sampling_wall_seconds: float
    n_nonfinite_training: int
    log_det: LogDetEstimate | None = None
    log_z: LogZRow | None = None
    wall_seconds: float
    ranks: int = 1  # processes of the torchrun launch that trained and sampled (energy counts are their sum)


@summary
class SampleSummary(SummaryFile):
    """``sample_summary.json``: N more flow samples, their weights, ΔF, FES and free energies at other T."""

    name: str
    method: Literal["importance_sampling"] = "importance_sampling"
    weights: str
    ess: Float
    n_samples: int
    n_nonfinite: int
    max_normalized_weight: Float
    pareto_khat: Float
    weights_reliable: bool
    ess_raw: Float | None = None
    max_normalized_weight_raw: Float | None = None
    ess_per_observable: dict[str, Float]
    free_energies: list[FreeEnergyRow]
    thermodynamic_free_energies: list[ThermodynamicRow] | None = None
    n_wrong_chirality: int | None = None
    chirality_rejected: bool | None = None
    fes: dict[str, Any]
    energy_evaluations: dict[str, int]
    sampling_wall_seconds: float
    samples_file: str
    batch: int
    log_det: LogDetEstimate | None = None
    log_z: LogZRow | None = None
    wall_seconds: float
    ranks: int = 1  # processes of the torchrun launch, each of which wrote a shard of the samples file


@summary
class MCMCSummary(SummaryFile):
    """``mcmc/summary.json``: flow-preconditioned chains, their acceptance, autocorrelation and ΔF.

    ``ess`` is ``1 / max tau_int`` (a fraction of ``n_samples``), ``ess_samples`` the number it implies.
    """

    name: str
    method: Literal["mcmc"] = "mcmc"
    moves: str
    ess: Float
    ess_samples: Float
    n_samples: int
    n_chains: int
    n_steps: int
    n_warmup: int
    thin: int
    n_nonfinite: int
    free_energies: list[FreeEnergyRow]
    acceptance_rate: dict[str, Float]
    step_sizes: dict[str, float]
    tau_int: dict[str, Float]
    tau_int_units: str
    tau_unreliable: list[str]
    n_stuck_chains: int
    energy_evaluations: dict[str, int]
    mcmc_wall_seconds: float
    chains_file: str
    order: str
    wall_seconds: float


@summary
class MDSummary(SummaryFile):
    """``md/summary.json``: the plain MD baseline, its ΔF with block errors and autocorrelation times."""

    name: str
    method: Literal["md"] = "md"
    source: str
    ess: Float
    n_samples: int
    n_nonfinite: int
    free_energies: list[FreeEnergyRow]
    tau_int_frames: dict[str, Float]
    energy_evaluations: dict[str, int]
    md_wall_seconds: float
    wall_seconds: float


@summary
class RemdSummary(SummaryFile):
    """``remd/summary.json``: temperature replica exchange, ΔF at the target temperature by MBAR over
    every frame of every replica, with block-jackknife errors, and the mixing diagnostics.

    ``temperatures_K``: the ladder; ``pair_acceptance[k]`` the exchange acceptance between rungs k and
    k + 1; ``round_trips`` the completed lowest -> highest -> lowest trips of each replica.
    ``n_samples`` counts the production frames of all replicas that entered MBAR and ``n_eff`` the Kish
    count of their target-temperature weights. ``cis_fraction`` is the fraction of production frames
    with a cis peptide bond (|omega| < 90 degrees; molecules only), ``cis_fraction_by_temperature`` per
    rung; with ``keep_cis`` false they were left out of MBAR. ``tau_int_iterations``: integrated
    autocorrelation time, in iterations, of the least populated state's indicator in the series of
    frames at each temperature (averaged over the temperatures where it changes; null when it never
    does), to compare with ``block_iterations``, the length of a jackknife block.
    """

    name: str
    method: Literal["remd"] = "remd"
    engine: str
    temperatures_K: list[float]
    target_temperature_K: float
    free_energies: list[FreeEnergyRow]
    error_method: str
    n_samples: int
    n_eff: Float
    pair_acceptance: list[Float]
    round_trips: list[int]
    round_trips_total: int
    keep_cis: bool
    cis_fraction: Float | None = None
    cis_fraction_by_temperature: list[Float] | None = None
    n_cis_frames: int | None = None
    iterations: int
    equilibration_iterations: int
    steps_per_exchange: int
    timestep_fs: float
    tau_int_iterations: Float
    block_iterations: int
    energy_evaluations: dict[str, int]
    remd_wall_seconds: float
    wall_seconds: float
    storage: str
    samples_file: str
