"""Config of the data-free stages and the benchmark systems: defaults, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from boltzgen.config import load_config
from boltzgen.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
BASE = """\
name: mw
system: {type: many_well}
training:
  - {loss: fab, steps: 10, batch: 128}
states: {A: "x0 < 0", B: "x0 > 0"}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "system.yaml"
    path.write_text(text)
    return path


def error_of(path: Path, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_fab_defaults_and_the_shipped_configs_load(tmp_path):
    config, resolved = load_config(write(tmp_path, BASE))
    fab = config.training[0].fab_settings
    assert (fab.ais.intermediate, fab.ais.leapfrog, fab.ais.target_accept) == (2, 5, 0.65)
    assert fab.replay is not None and fab.replay.min_size >= fab.replay.updates * 128
    assert config.system.dim == 32 and resolved["training"][0]["fab"] is None
    for name in ("many_well.yaml", "gmm.yaml"):
        shipped, _ = load_config(ROOT / "systems" / name)
        assert shipped.training[0].loss == "fab"
    no_buffer, _ = load_config(write(tmp_path, BASE), ["training[0].fab={replay: null}"])
    assert no_buffer.training[0].fab_settings.replay is None


@pytest.mark.parametrize(("override", "where", "says"), [
    ("training[0].fab={replay: {min_size: 100, size: 1000}}", "training[0]", "updates x batch"),
    ("training[0].fab={replay: {min_size: 5000, size: 1000}}", "training[0].fab.replay", "must not exceed size"),
    ("training[0].fab={ais: {target_accept: 1.5}}", "training[0].fab.ais.target_accept", "less than 1"),
    ("training[0].fab={ais: {intermediate: true}}", "training[0].fab.ais", "yes/no value where a number"),
    ("training[0]={loss: annealing, steps: 10}", "training[0]", "annealing stage needs its settings"),
    ("training[0]={loss: annealing, steps: 10, annealing: {temperatures: [2.0, 3.0, 1.0]}}",
     "training[0].annealing", "decrease strictly and end at 1.0"),
    ("training[0]={loss: annealing, steps: 10, annealing: {temperatures: [4.0, 2.0]}}",
     "training[0].annealing", "end at 1.0"),
    ("system={type: many_well, dim: 7}", "system.dim", "multiple of 2"),
    ("training[0]={loss: reweighted_forward_kl, steps: 10, reweighting: {samples: 1}}",
     "training[0].reweighting.samples", "greater than or equal to 2"),
    ("training[0]={loss: reweighted_forward_kl, steps: 10, reweighting: {resample_every: 0}}",
     "training[0].reweighting.resample_every", "greater than or equal to 1"),
])
def test_bad_settings_are_one_line_errors(tmp_path, override, where, says):
    message = error_of(write(tmp_path, BASE), [override])
    assert f": {where}" in message and says in message, message
