"""YAML config -> typed, validated dataclasses.

Every problem with a config file is raised as :class:`ConfigError` with one line that names the
file and the YAML path, e.g. ``systems/x.yaml: training[1].lr: Input should be greater than 0,
got -1``. The CLI prints that line and exits with status 2.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, model_validator

from boltzgen.errors import ConfigError
from boltzgen.states import resolve_states


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- systems -------------------------------------------------------------------------------------

class DoubleWellSystem(_Strict):
    """u = a x0^4 - b x0^2 + c x0 + x1^2/2 (Noé et al. 2019 with a=1, b=6, c=1), in kT."""

    type: Literal["double_well"]
    a: PositiveFloat = 1.0
    b: float = 6.0
    c: float = 1.0


class MuellerBrownSystem(_Strict):
    """u = beta * V_MB(x0, x1) with the standard Mueller-Brown constants."""

    type: Literal["mueller_brown"]
    beta: PositiveFloat = 0.1


class OpenMMSystem(_Strict):
    """A molecule from a PDB plus OpenMM force-field XML files (implicit solvent by listing its XML)."""

    type: Literal["openmm"]
    pdb: Path
    forcefield: list[str] = Field(min_length=1)
    temperature_K: PositiveFloat = 300.0
    energy_backend: Literal["torch", "openmm"] = "torch"
    platform: str = "auto"
    n_workers: PositiveInt = 1


System = Annotated[Union[DoubleWellSystem, MuellerBrownSystem, OpenMMSystem], Field(discriminator="type")]


# --- flow and coordinates ------------------------------------------------------------------------

class CoordinatesConfig(_Strict):
    """How the flow sees a configuration: as is, or as internal / mixed coordinates."""

    type: Literal["identity", "internal", "mixed"] = "identity"
    cartesian_atoms: list[int] | None = None
    reject_wrong_chirality: bool = False


class FlowConfig(_Strict):
    type: Literal["neural_spline", "real_nvp", "nice"] = "neural_spline"
    blocks: PositiveInt = 8
    hidden: list[PositiveInt] = Field(default_factory=lambda: [64, 64])
    bins: PositiveInt = 8
    tail_bound: PositiveFloat = 5.0
    lu: bool = False
    actnorm: bool = True
    identity_init: bool = True


# --- data ------------------------------------------------------------------------------------------

class BaselineConfig(_Strict):
    """Batched MALA on an analytic energy: the counterpart of MD for toy systems."""

    chains: PositiveInt = 256
    steps: PositiveInt = 2000
    warmup: int = Field(default=500, ge=0)
    step_size: PositiveFloat = 0.05
    thin: PositiveInt = 10
    init_scale: PositiveFloat = 2.0


class MDConfig(_Strict):
    """Langevin MD with OpenMM. ``temperature_K`` may differ from the target's (reweighting corrects it).

    ``seed_states``: for training data only, also run MD from each configured state that holds
    less than ``seed_below_fraction`` of the plain run's frames, seeded with the lowest-energy frame
    in that state from a short hot MD (``hot_temperature_K``, ``hot_steps``). Those runs sample each basin's local structure at the
    run temperature; their relative weights are wrong and are fixed by reverse KL and reweighting,
    so they never enter the MD baseline's estimates.
    """

    steps: PositiveInt = 200_000
    timestep_fs: PositiveFloat = 1.0
    friction_per_ps: PositiveFloat = 1.0
    report_every: PositiveInt = 100
    temperature_K: PositiveFloat | None = None
    seed: int = 0
    platform: str = "Reference"
    data: Path | None = None
    seed_states: bool = False
    seed_below_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    seeded_steps: PositiveInt | None = None
    hot_temperature_K: PositiveFloat = 1000.0
    hot_steps: PositiveInt = 500_000


class UmbrellaConfig(_Strict):
    """Adaptive umbrella sampling along phi with a flattening bias: the reference ΔF when plain MD
    cannot cross. Stage 1, short multi-window umbrella sampling + MBAR, gives a rough profile F(phi);
    stage 2 runs ``n_repeats`` long MD runs under the bias -min(F, f_cap) and reweights them."""

    stage1_spacing_deg: PositiveFloat = 10.0
    stage1_k_kJ_per_mol_rad2: PositiveFloat = 200.0
    stage1_steps_per_window: PositiveInt = 20_000
    stage1_skip_deg: list[tuple[float, float]] = Field(default_factory=lambda: [(115.0, 135.0)])
    f_cap_kT: PositiveFloat = 18.0
    production_steps: PositiveInt = 5_000_000
    n_repeats: PositiveInt = 2
    report_every: PositiveInt = 100
    platform: str = "Reference"


# --- training and sampling --------------------------------------------------------------------

class TrainingStage(_Strict):
    """One stage of training.

    ``loss``: ``forward_kl`` (maximum likelihood on data), ``reverse_kl`` (energy-based, reparametrized)
    or ``mixed`` (``forward_weight * forward + reverse_weight * reverse``).
    ``u_max``: reduced energies above it are cut lin-log, u -> u_max + log(1 + u - u_max), in the
    reverse KL, so that clashes give large but finite gradients.
    ``temperature_factor``: the reverse KL targets u / temperature_factor (annealing: > 1 is hotter).
    """

    loss: Literal["forward_kl", "reverse_kl", "mixed"]
    steps: PositiveInt
    batch: PositiveInt = 256
    lr: PositiveFloat = 1e-3
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    grad_clip: PositiveFloat = 10.0
    weight_decay: float = Field(default=0.0, ge=0.0)
    forward_weight: float = Field(default=1.0, ge=0.0)
    reverse_weight: float = Field(default=1.0, ge=0.0)
    u_max: float = 1e4
    temperature_factor: PositiveFloat = 1.0

    @model_validator(mode="after")
    def _weights_not_both_zero(self) -> "TrainingStage":
        if self.loss == "mixed" and self.forward_weight == 0 and self.reverse_weight == 0:
            raise ValueError("a mixed stage needs forward_weight or reverse_weight > 0")
        return self


class SamplingConfig(_Strict):
    n: PositiveInt = 100_000
    batch: PositiveInt = 65536
    n_bootstrap: PositiveInt = 200


class Config(_Strict):
    """A whole run: the system, how to get data, the flow, training stages, sampling and states."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float64"] = "float32"
    cpu_threads: PositiveInt = 1
    system: System
    coordinates: CoordinatesConfig = CoordinatesConfig()
    flow: FlowConfig = FlowConfig()
    baseline: BaselineConfig = BaselineConfig()
    md: MDConfig = MDConfig()
    umbrella: UmbrellaConfig = UmbrellaConfig()
    training: list[TrainingStage] = Field(min_length=1)
    sampling: SamplingConfig = SamplingConfig()
    states: dict[str, str] = Field(default_factory=dict)
    checkpoint_every: PositiveInt = 500
    log_every: PositiveInt = 10

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.training)


def _format_location(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in ("double_well", "mueller_brown", "openmm"):
            continue  # the union's tag adds nothing for the user: the path already says `system`
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def _format_error(source: str, err: dict[str, Any]) -> str:
    where = _format_location(err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{source}: {where}: unknown key (check the spelling; see the README for the keys)"
    if err["type"] == "missing":
        return f"{source}: {where}: required key is missing"
    return f"{source}: {where}: {err['msg']}, got {err['input']!r}"


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b[2].c``-style paths (``a.b.2.c`` works too) in nested dicts and lists."""
    parts = dotted.replace("[", ".").replace("]", "").split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        key: Any = int(part) if isinstance(node, list) and part.lstrip("-").isdigit() else part
        if isinstance(node, list) and not isinstance(key, int):
            raise ConfigError(f"--set {dotted}: '{part}' indexes a list; use a number")
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
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
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
    return config, config.model_dump(mode="json")


def _resolve_files(config: Config, path: Path) -> Config:
    base = path.parent
    updates: dict[str, Any] = {}
    if isinstance(config.system, OpenMMSystem):
        pdb = config.system.pdb if config.system.pdb.is_absolute() else (base / config.system.pdb).resolve()
        if not pdb.is_file():
            raise ConfigError(f"{path}: system.pdb: file not found: {pdb}")
        updates["system"] = config.system.model_copy(update={"pdb": pdb})
    if config.md.data is not None:
        data = config.md.data if config.md.data.is_absolute() else (base / config.md.data).resolve()
        if not data.is_file():
            raise ConfigError(f"{path}: md.data: file not found: {data}")
        updates["md"] = config.md.model_copy(update={"data": data})
    try:
        resolve_states(config.states)
    except ValueError as exc:
        raise ConfigError(f"{path}: states: {exc}") from None
    return config.model_copy(update=updates) if updates else config


def dump_config(resolved: dict[str, Any]) -> str:
    """The resolved config as YAML text, to be written next to the results."""
    return yaml.safe_dump(resolved, sort_keys=False)
