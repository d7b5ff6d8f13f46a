"""YAML config -> typed, validated dataclasses.

Every problem with a config file is raised as :class:`ConfigError` with one line that names the
file and the YAML path, e.g. ``systems/x.yaml: training[1].lr: Input should be greater than 0,
got -1``. The CLI prints that line and exits with status 2.
"""

from __future__ import annotations

import copy
import reprlib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (Field, PositiveFloat, PositiveInt, StringConstraints, ValidationError,
                      ValidationInfo, field_validator, model_validator)

from boltzgen.baseline_config import RemdConfig, UmbrellaConfig, check_ladder  # noqa: F401 (re-exported)
from boltzgen.config_base import StrictModel
from boltzgen.errors import ConfigError
from boltzgen.files import unreadable_reason
from boltzgen.stage_config import (  # noqa: F401 (re-exported)
    AISConfig,
    AnnealingConfig,
    FABConfig,
    ReplayConfig,
    ReweightingConfig,
)
from boltzgen.states import check_state_cvs, pdb_cv_names, resolve_states


#: Seeds reach numpy, torch and OpenMM: all take 0 .. 2^32 - 1.
SEED_MAX = 2**32 - 1
#: Upper bounds of sizes: beyond them a run cannot fit in memory or finish, so they are refused up front.
MAX_THREADS = 256
MAX_BLOCKS = 256
MAX_WIDTH = 16384
MAX_BINS = 512
MAX_CHAINS = 10**7
MAX_STEPS = 10**10
MAX_BATCH = 10**8
MAX_SAMPLES = 10**10
#: Bound of the analytic potentials' coefficients (beyond it float32 flows overflow).
MAX_COEFFICIENT = 1e6
#: A temperature beyond which no force field is meant to be used (K).
MAX_TEMPERATURE_K = 10_000.0
#: Without constraints, Langevin MD of a molecule blows up beyond a few fs; 10 fs is a hard stop.
MAX_TIMESTEP_FS = 10.0
#: A state expression longer than this is refused (the parser and evaluator recurse into it).
MAX_STATE_EXPRESSION = 2_000
MAX_STATES = 64
#: An OpenMM platform name; whether it is installed is checked when the system is built.
Platform = Literal["auto", "Reference", "CPU", "CUDA", "OpenCL", "HIP"]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
Temperature = Annotated[float, Field(gt=0, le=MAX_TEMPERATURE_K)]
StateName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=64)]
StateExpression = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STATE_EXPRESSION)]


# --- systems -------------------------------------------------------------------------------------

class DoubleWellSystem(StrictModel):
    """u = a x0^4 - b x0^2 + c x0 + x1^2/2 (Noé et al. 2019 with a=1, b=6, c=1), in kT."""

    dim: ClassVar[int] = 2
    type: Literal["double_well"]
    a: float = Field(default=1.0, gt=0, le=MAX_COEFFICIENT)
    b: float = Field(default=6.0, ge=-MAX_COEFFICIENT, le=MAX_COEFFICIENT)
    c: float = Field(default=1.0, ge=-MAX_COEFFICIENT, le=MAX_COEFFICIENT)


class MuellerBrownSystem(StrictModel):
    """u = beta * V_MB(x0, x1) with the standard Mueller-Brown constants."""

    dim: ClassVar[int] = 2
    type: Literal["mueller_brown"]
    beta: float = Field(default=0.1, gt=0, le=MAX_COEFFICIENT)


class ManyWellSystem(StrictModel):
    """dim/2 independent 2-D double wells x1^4 - 6 x1^2 - 0.5 x1 + 0.5 x2^2 (the FAB benchmark; 32-D: 2^16 modes)."""

    type: Literal["many_well"]
    dim: int = Field(default=32, ge=2, le=1024, multiple_of=2)


class GaussianMixtureSystem(StrictModel):
    """A 2-D mixture of equal-weight Gaussians, means uniform in [-loc_scale, loc_scale]^2 from ``seed`` (log Z = 0)."""

    dim: ClassVar[int] = 2
    type: Literal["gmm"]
    n_modes: int = Field(default=40, ge=1, le=10_000)
    loc_scale: PositiveFloat = 40.0
    scale: PositiveFloat = 1.3132616875182228  # softplus(1), as published
    seed: Seed = 0


class OpenMMSystem(StrictModel):
    """A molecule from a PDB plus OpenMM force-field XML files (implicit solvent by listing its XML)."""

    type: Literal["openmm"]
    pdb: Path
    forcefield: list[str] = Field(min_length=1)
    temperature_K: Temperature = 300.0
    energy_backend: Literal["torch", "openmm"] = "torch"
    platform: Platform = "auto"
    n_workers: int = Field(default=1, ge=1, le=MAX_THREADS)


class MuellerBrownParticleSystem(StrictModel):
    """One OpenMM particle (``mass_amu``, positions in nm) in the Mueller-Brown potential over (x, y),
    scaled so that at ``temperature_K`` its reduced energy is ``beta * V_MB`` as in ``mueller_brown``,
    plus the restraint z^2 / (2 z_sigma_nm^2) in kT; ``platform`` evaluates its energy."""

    dim: ClassVar[int] = 3
    type: Literal["mueller_brown_particle"]
    beta: float = Field(default=0.1, gt=0, le=MAX_COEFFICIENT)
    temperature_K: Temperature = 300.0
    mass_amu: float = Field(default=1.0, gt=0, le=1e6)
    z_sigma_nm: float = Field(default=0.1, gt=0, le=100.0)
    platform: Platform = "Reference"


System = Annotated[Union[DoubleWellSystem, MuellerBrownSystem, ManyWellSystem, GaussianMixtureSystem, OpenMMSystem,
                         MuellerBrownParticleSystem], Field(discriminator="type")]


# --- flow and coordinates ------------------------------------------------------------------------

class CoordinatesConfig(StrictModel):
    """How the flow sees a configuration: as is, or as internal / mixed coordinates.

    ``rigid_torsions`` (``internal``): a torsion whose training data deviate from their circular
    mean by at most 15 deg (standard deviation: impropers, amides, a methyl hydrogen placed relative
    to its sibling) is standardized and gets a Gaussian prior, rather than a uniform one that the
    circular splines must squeeze into a narrow peak; free torsions (phi, psi, rotors) stay circular.

    ``scale`` (analytic systems): the flow's last layer, a trainable per-dimension affine map, starts
    as x = scale * y, so that a target much wider than N(0, 1) (the GMM's modes span [-40, 40]) lies
    within the untrained flow's reach; training without data needs that, as nothing else tells the
    flow where the target is.
    """

    type: Literal["identity", "internal", "mixed"] = "identity"
    cartesian_atoms: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, min_length=1)
    reject_wrong_chirality: bool = False
    rigid_torsions: bool = True
    scale: PositiveFloat = 1.0


class AutoregressiveSettings(StrictModel):
    """``maf`` and ``iaf``: the elementwise transformer (``spline`` uses ``flow.bins``, ``flow.tail_bound``)."""

    transformer: Literal["affine", "spline"] = "spline"


class ResidualSettings(StrictModel):
    """``iresnet`` (power series, ``n_terms``) and ``residual_flow`` (Russian roulette, ``exact_terms``,
    ``roulette_p``): the residual branch's Lipschitz bound, the log-det estimator's settings, the
    fixed-point inverse. ``exact_log_det: true`` computes the log-det exactly instead (``dim``
    vector-Jacobian products per block): exact weights, for small dims."""

    lipschitz: float = Field(default=0.9, gt=0.0, lt=1.0)
    n_terms: int = Field(default=5, ge=1, le=100)
    exact_terms: int = Field(default=2, ge=0, le=100)
    roulette_p: float = Field(default=0.5, gt=0.0, lt=1.0)
    hutchinson_samples: int = Field(default=1, ge=1, le=100)
    exact_log_det: bool = False
    fixed_point_tol: PositiveFloat = 1e-6
    fixed_point_max_iter: int = Field(default=500, ge=1, le=100_000)


class SylvesterSettings(StrictModel):
    """``sylvester``: how ``Q`` is built (``orthogonal`` with ``m`` columns, ``householder`` with
    ``reflections``, ``triangular``); ``m`` and ``reflections`` default to the dimension."""

    variant: Literal["orthogonal", "householder", "triangular"] = "orthogonal"
    m: int | None = Field(default=None, ge=1, le=MAX_WIDTH)
    reflections: int | None = Field(default=None, ge=1, le=MAX_WIDTH)


#: The flow types whose settings live in each sub-section of ``flow``.
FLOW_SETTINGS_OWNERS = {"autoregressive": ("maf", "iaf"), "residual": ("iresnet", "residual_flow"),
                        "sylvester": ("sylvester",)}


class FlowConfig(StrictModel):
    """The flow: its family (``type``), ``blocks`` layers of it, their networks and the family's settings.

    Coupling flows: ``neural_spline``, ``real_nvp``, ``nice``; autoregressive: ``maf``, ``iaf``
    (``autoregressive``); residual: ``iresnet``, ``residual_flow`` (``residual``); and, for reverse-KL
    training only (no inverse): ``planar``, ``radial``, ``sylvester`` (``sylvester``). ``householder: k``
    adds an orthogonal layer of ``k`` Householder reflections after each block (like ``lu``).
    ``prior``: the latent density of the non-circular latents, ``normal`` or ``logistic`` (heavier
    tails; for the volume-preserving ``nice``).
    ``conditioner_dtype``: ``bfloat16`` runs the coupling layers' networks in bfloat16 (float32
    weights and sums; faster matrix products on CPUs and GPUs with bfloat16 units). The flow stays
    exactly invertible with an exact log-det: only the parameters it predicts are rounder.
    """

    type: Literal["neural_spline", "real_nvp", "nice", "maf", "iaf", "iresnet", "residual_flow", "planar", "radial",
                  "sylvester"] = "neural_spline"
    blocks: int = Field(default=8, ge=1, le=MAX_BLOCKS)
    hidden: list[Annotated[int, Field(ge=1, le=MAX_WIDTH)]] = Field(default_factory=lambda: [64, 64], min_length=1,
                                                                    max_length=16)
    bins: int = Field(default=8, ge=2, le=MAX_BINS)
    tail_bound: float = Field(default=5.0, gt=0, le=1_000.0)
    lu: bool = False
    actnorm: bool = True
    identity_init: bool = True
    householder: int = Field(default=0, ge=0, le=MAX_WIDTH)
    prior: Literal["normal", "logistic"] = "normal"
    conditioner_dtype: Literal["float32", "bfloat16"] = "float32"
    autoregressive: AutoregressiveSettings | None = None
    residual: ResidualSettings | None = None
    sylvester: SylvesterSettings | None = None

    @field_validator("autoregressive", "residual", "sylvester")
    @classmethod
    def _settings_of_this_type(cls, value: StrictModel | None, info: ValidationInfo) -> StrictModel | None:
        owners = FLOW_SETTINGS_OWNERS[info.field_name]
        flow_type = info.data.get("type")
        if value is not None and flow_type is not None and flow_type not in owners:
            raise ValueError(f"these settings apply to flow.type {' or '.join(owners)}, not {flow_type}")
        return value

    @property
    def autoregressive_settings(self) -> AutoregressiveSettings:
        return self.autoregressive or AutoregressiveSettings()

    @property
    def residual_settings(self) -> ResidualSettings:
        return self.residual or ResidualSettings()

    @property
    def sylvester_settings(self) -> SylvesterSettings:
        return self.sylvester or SylvesterSettings()


# --- data ------------------------------------------------------------------------------------------

class BaselineConfig(StrictModel):
    """Batched MALA on an analytic energy: the counterpart of MD for toy systems."""

    chains: int = Field(default=256, ge=1, le=MAX_CHAINS)
    steps: int = Field(default=2000, ge=1, le=MAX_STEPS)
    warmup: int = Field(default=500, ge=0, le=MAX_STEPS)
    step_size: float = Field(default=0.05, gt=0, le=100.0)
    thin: PositiveInt = 10
    init_scale: float = Field(default=2.0, gt=0, le=10_000.0)

    @model_validator(mode="after")
    def _thin_within_steps(self) -> "BaselineConfig":
        if self.thin > self.steps:
            raise ValueError(f"thin ({self.thin}) must not exceed steps ({self.steps}): no state would be kept")
        return self


class MDConfig(StrictModel):
    """Langevin MD with OpenMM. ``temperature_K`` may differ from the target's (reweighting corrects it).

    ``seed_states``: for training data only, also run MD from each configured state that holds
    less than ``seed_below_fraction`` of the plain run's frames (``all``: from every state, to cover
    the basins within a state that the plain run misses), seeded from frames in that state of a
    short hot MD (``hot_temperature_K``, ``hot_steps``). Those runs sample each basin's local
    structure at the run temperature; their relative weights are wrong and are fixed by the
    importance weights, so they never enter the MD baseline's estimates.

    ``seeds_per_state``: the seeded MD of a state is this many runs (``seeded_steps`` in all, split
    evenly), started from hot frames spread over the CVs (see
    :func:`boltzgen.runs.baselines.diverse_seeds`), so that a state of several basins that 300 K MD
    does not connect in ``seeded_steps`` gets data in each.

    ``confine_seeded``: a seeded run carries flat-bottom walls at its state's bounds when the state
    is a box of CVs (``"0 < phi < 2.2"``; zero inside, so the frames inside follow the Boltzmann
    distribution restricted to the state), so that it keeps sampling a state that it would otherwise
    leave at once (alanine's alpha_L in implicit solvent kept 4 % of an unconfined run's frames).

    ``symmetrize_rotors``: for training only, every data frame the flow sees has the three atoms of
    each rotor (a methyl's hydrogens: see :mod:`boltzgen.symmetry`) relabelled by a random cyclic
    shift, so the data hold a rotor's three wells equally, as the Boltzmann distribution does.
    """

    steps: int = Field(default=200_000, ge=1, le=MAX_STEPS)
    timestep_fs: float = Field(default=1.0, gt=0, le=MAX_TIMESTEP_FS)
    friction_per_ps: float = Field(default=1.0, gt=0, le=10_000.0)
    report_every: PositiveInt = 100
    temperature_K: Temperature | None = None
    seed: Seed = 0
    platform: Platform = "Reference"
    data: Path | None = None
    seed_states: bool | Literal["all"] = False
    seed_below_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    seeded_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    hot_temperature_K: Temperature = 1000.0
    hot_steps: int = Field(default=500_000, ge=1, le=MAX_STEPS)
    seeds_per_state: int = Field(default=4, ge=1, le=64)
    confine_seeded: bool = True
    symmetrize_rotors: bool = True

    @model_validator(mode="after")
    def _runs_are_multiples_of_report_every(self) -> "MDConfig":
        runs = {"steps": self.steps, "hot_steps": self.hot_steps, "seeded_steps": self.seeded_steps or self.steps}
        for key, steps in runs.items():
            if steps % self.report_every:
                raise ValueError(f"{key} ({steps}) must be a multiple of report_every ({self.report_every}), "
                                 "the frames MD stores")
        if self.seed_states and runs["seeded_steps"] % (self.seeds_per_state * self.report_every):
            raise ValueError(f"seeded_steps ({runs['seeded_steps']}) must split into seeds_per_state "
                             f"({self.seeds_per_state}) runs of a multiple of report_every ({self.report_every}) steps")
        return self


# --- training and sampling --------------------------------------------------------------------

class TrainingStage(StrictModel):
    """One stage of training.

    ``loss``: ``forward_kl`` (maximum likelihood on data), ``reverse_kl`` (energy-based, reparametrized)
    or ``mixed`` (``forward_weight * forward + reverse_weight * reverse``); without data, ``fab``
    (flow annealed importance sampling bootstrap: the alpha = 2 divergence estimated by AIS toward
    p^2/q, settings in ``fab``: its ``ais`` and ``replay``, see :class:`FABConfig`) or
    ``annealing`` (reverse KL hot, then reweighting down a temperature ladder; settings in ``annealing``).
    ``reweighted_forward_kl``: maximum likelihood on the flow's own samples, resampled by their
    importance weights toward p (settings in ``reweighting``): forward KL to p itself, without data,
    for a flow already good enough that its weights are usable (ESS of tenths), e.g. after
    ``forward_kl``, whose data it no longer copies (their basins' weights, their sampling noise).
    ``u_max``: reduced energies above it are cut lin-log, u -> u_max + log(1 + u - u_max), in the
    reverse KL, so that clashes give large but finite gradients.
    ``temperature_factor``: the reverse KL targets u / temperature_factor (annealing: > 1 is hotter).
    """

    loss: Literal["forward_kl", "reverse_kl", "mixed", "fab", "annealing", "reweighted_forward_kl"]
    fab: FABConfig | None = None
    annealing: AnnealingConfig | None = None
    reweighting: ReweightingConfig | None = None
    steps: int = Field(ge=1, le=MAX_STEPS)
    batch: int = Field(default=256, ge=1, le=MAX_BATCH)
    lr: float = Field(default=1e-3, gt=0, le=1.0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    grad_clip: float = Field(default=10.0, gt=0, le=1e6)
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    forward_weight: float = Field(default=1.0, ge=0.0, le=1e6)
    reverse_weight: float = Field(default=1.0, ge=0.0, le=1e6)
    u_max: float = Field(default=1e4, ge=-1e12, le=1e12)
    temperature_factor: float = Field(default=1.0, gt=0, le=1e6)

    @model_validator(mode="after")
    def _weights_not_both_zero(self) -> "TrainingStage":
        if self.loss == "mixed" and self.forward_weight == 0 and self.reverse_weight == 0:
            raise ValueError("a mixed stage needs forward_weight or reverse_weight > 0")
        if self.loss == "annealing" and self.annealing is None:
            raise ValueError("an annealing stage needs its settings: annealing: {temperatures: [4.0, 2.0, 1.0]}")
        replay = self.fab_settings.replay
        if self.loss == "fab" and replay is not None and replay.min_size < replay.updates * self.batch:
            raise ValueError(f"fab.replay.min_size ({replay.min_size}) must be at least updates x batch "
                             f"({replay.updates} x {self.batch}), the samples drawn for one round of updates")
        return self

    @property
    def fab_settings(self) -> FABConfig:
        """``fab``, or the defaults when the stage gives none."""
        return self.fab if self.fab is not None else FABConfig()

    @property
    def reweighting_settings(self) -> ReweightingConfig:
        """``reweighting``, or the defaults when the stage gives none."""
        return self.reweighting if self.reweighting is not None else ReweightingConfig()


class SamplingConfig(StrictModel):
    n: int = Field(default=100_000, ge=1, le=MAX_SAMPLES)
    batch: int = Field(default=65536, ge=1, le=MAX_BATCH)
    n_bootstrap: int = Field(default=200, ge=2, le=100_000)


class Config(StrictModel):
    """A whole run: the system, how to get data, the flow, training stages, sampling and states."""

    # A name is a folder name: no "..", no leading dot or dash, not too long for a file system.
    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", max_length=100)
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float64"] = "float32"
    cpu_threads: int = Field(default=1, ge=1, le=MAX_THREADS)
    system: System
    coordinates: CoordinatesConfig = CoordinatesConfig()
    flow: FlowConfig = FlowConfig()
    baseline: BaselineConfig = BaselineConfig()
    md: MDConfig = MDConfig()
    umbrella: UmbrellaConfig = UmbrellaConfig()
    remd: RemdConfig = RemdConfig()
    training: list[TrainingStage] = Field(min_length=1)
    sampling: SamplingConfig = SamplingConfig()
    states: dict[StateName, StateExpression] = Field(default_factory=dict, max_length=MAX_STATES)
    checkpoint_every: int = Field(default=500, ge=1, le=MAX_STEPS)
    log_every: int = Field(default=10, ge=1, le=MAX_STEPS)

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.training)


def _format_location(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in ("double_well", "mueller_brown", "many_well", "gmm", "openmm", "mueller_brown_particle"):
            continue  # the union's tag adds nothing for the user: the path already says `system`
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def _shorten(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a YAML of aliases can expand to megabytes)."""
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 2, limit, limit
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format_error(source: str, err: dict[str, Any]) -> str:
    where = _format_location(err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{source}: {where}: unknown key (check the spelling; see the README for the keys)"
    if err["type"] == "missing":
        return f"{source}: {where}: required key is missing"
    if err["type"] == "value_error":  # a check of several keys: its message says what is wrong
        return f"{source}: {where}: {err['ctx']['error']}"
    message = err["msg"].replace("\n", " ")
    return f"{source}: {where}: {message}, got {_shorten(err['input'])}"


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b[2].c``-style paths (``a.b.2.c`` works too) in nested dicts and lists."""
    parts = dotted.replace("[", ".").replace("]", "").split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        key: Any = int(part) if isinstance(node, list) and part.lstrip("-").isdigit() else part
        if isinstance(node, list) and not isinstance(key, int):
            raise ConfigError(f"--set {dotted}: '{part}' indexes a list; use a number")
        if not isinstance(node, (dict, list)):
            done = ".".join(parts[:i])
            raise ConfigError(f"--set {dotted}: {done} is a single value ({_shorten(node)}), not a section with keys")
        if last:
            if isinstance(node, list) and not -len(node) <= key < len(node):
                raise ConfigError(f"--set {dotted}: index {key} is out of range")
            node[key] = value
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            try:
                node = node[key]
            except IndexError:
                raise ConfigError(f"--set {dotted}: index {key} is out of range") from None


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``["training[0].steps=10", "flow.hidden=[32, 32]"]`` -> [(path, YAML-parsed value), ...]."""
    pairs = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item}: expected key=value, for example --set training[0].steps=100")
        try:
            pairs.append((key.strip(), yaml.safe_load(raw)))
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item}: the value is not valid YAML ({exc.problem})") from None
    return pairs


def load_config(path: str | Path, overrides: list[str] | None = None) -> tuple[Config, dict[str, Any]]:
    """Read, override and validate a config. Returns the typed config and the resolved plain dict.

    Relative file paths inside the config (``system.pdb``, ``md.data``) are resolved against the
    config file's folder, and the files must exist.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(_read_text(path))
    except RecursionError:
        raise ConfigError(f"{path}: the YAML is nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise ConfigError(f"{path}: malformed YAML at {where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    data = copy.deepcopy(raw)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(str(path), exc.errors()[0])) from None
    config = _resolve_files(config, path)
    if "remd" in config.model_fields_set:  # the defaults are checked when replica exchange runs
        check_ladder(config.remd, getattr(config.system, "temperature_K", None), str(path))
    return config, config.model_dump(mode="json")


#: A config is a few kilobytes; anything much larger is not one.
MAX_CONFIG_BYTES = 1 << 20


def _read_text(path: Path) -> str:
    """The config's text; a missing, unreadable, oversized or non-UTF-8 file is a one-line ConfigError."""
    reason = unreadable_reason(path)
    if reason is not None:
        raise ConfigError(f"{path}: config {reason}")
    data = path.read_bytes()
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {len(data):,} bytes is too large for a config (at most {MAX_CONFIG_BYTES:,})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the config as UTF-8 YAML") from None


def _resolve_file(path: Path, key: str, value: Path) -> Path:
    resolved = value if value.is_absolute() else (path.parent / value).resolve()
    reason = unreadable_reason(resolved)
    if reason is not None:
        raise ConfigError(f"{path}: {key}: {reason}: {resolved}")
    return resolved


def _resolve_files(config: Config, path: Path) -> Config:
    updates: dict[str, Any] = {}
    if isinstance(config.system, OpenMMSystem):
        pdb = _resolve_file(path, "system.pdb", config.system.pdb)
        updates["system"] = config.system.model_copy(update={"pdb": pdb})
    if config.md.data is not None:
        updates["md"] = config.md.model_copy(update={"data": _resolve_file(path, "md.data", config.md.data)})
    try:
        states = resolve_states(config.states)
        dim = getattr(config.system, "dim", None)  # analytic systems; a molecule's CVs come from its topology
        if dim is not None:
            check_state_cvs(states, [f"x{i}" for i in range(dim)])
        elif "system" in updates and states:  # a molecule: its backbone torsions (phi0, phi1, ..., psi)
            names = pdb_cv_names(updates["system"].pdb)
            if names is not None:
                check_state_cvs(states, names)
    except ValueError as exc:
        raise ConfigError(f"{path}: states: {exc}") from None
    return config.model_copy(update=updates) if updates else config


def dump_config(resolved: dict[str, Any]) -> str:
    """The resolved config as YAML text, to be written next to the results."""
    return yaml.safe_dump(resolved, sort_keys=False)
