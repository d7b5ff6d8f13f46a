from pathlib import Path

import pytest

from boltzgen.config import load_config
from boltzgen.errors import ConfigError

MINIMAL = """\
name: dw
system: {type: double_well}
training:
  - {loss: forward_kl, steps: 10}
  - {loss: mixed, steps: 10, lr: 1.0e-3}
states: {A: "x0 < 0", B: "x0 > 0"}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "system.yaml"
    path.write_text(text)
    return path


def error_of(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_minimal_config_gets_defaults(tmp_path):
    config, resolved = load_config(write(tmp_path, MINIMAL))
    assert config.training[1].lr == 1e-3
    assert config.flow.type == "neural_spline"
    assert resolved["system"]["type"] == "double_well"
    assert config.total_steps == 20


def test_wrong_type_names_file_and_yaml_path(tmp_path):
    path = write(tmp_path, MINIMAL.replace("lr: 1.0e-3", "lr: fast"))
    message = error_of(path)
    assert message.startswith(f"{path}: training[1].lr:")
    assert "'fast'" in message


def test_out_of_range_value(tmp_path):
    message = error_of(write(tmp_path, MINIMAL.replace("lr: 1.0e-3", "lr: -1")))
    assert "training[1].lr" in message and "greater than 0" in message


def test_unknown_key_is_rejected(tmp_path):
    message = error_of(write(tmp_path, MINIMAL.replace("{type: double_well}", "{type: double_well, widht: 3}")))
    assert "system.widht: unknown key" in message


def test_unknown_system_type(tmp_path):
    message = error_of(write(tmp_path, MINIMAL.replace("double_well", "triple_well")))
    assert "system" in message and "triple_well" in message


def test_missing_required_key(tmp_path):
    message = error_of(write(tmp_path, "name: x\nsystem: {type: double_well}\n"))
    assert "training: required key is missing" in message


def test_malformed_yaml_reports_the_line(tmp_path):
    message = error_of(write(tmp_path, "name: x\nsystem: {type: double_well\ntraining: []\n"))
    assert "malformed YAML at line" in message


def test_missing_config_and_missing_pdb(tmp_path):
    assert "config file not found" in error_of(tmp_path / "nope.yaml")
    text = "name: m\nsystem: {type: openmm, pdb: missing.pdb, forcefield: [amber14-all.xml]}\ntraining: [{loss: reverse_kl, steps: 1}]\n"
    message = error_of(write(tmp_path, text))
    assert "system.pdb: file not found" in message and "missing.pdb" in message


def test_overrides_reach_nested_values_and_are_validated(tmp_path):
    path = write(tmp_path, MINIMAL)
    config, _ = load_config(path, ["training[0].steps=5", "flow.hidden=[8, 8]", "sampling.n=100"])
    assert config.training[0].steps == 5 and config.flow.hidden == [8, 8] and config.sampling.n == 100
    assert "training[0].steps" in error_of(path, ["training[0].steps=0"])
    assert "out of range" in error_of(path, ["training[7].steps=3"])
    assert "expected key=value" in error_of(path, ["training"])


def test_seeded_steps_must_split_into_whole_runs(tmp_path):
    path = write(tmp_path, MINIMAL + "md: {steps: 1000, report_every: 10, seed_states: true, seeded_steps: 1000, "
                                     "seeds_per_state: 3}\n")
    message = error_of(path)
    assert "md" in message and "seeds_per_state (3)" in message and "seeded_steps (1000)" in message
    load_config(path, ["md.seeds_per_state=4"])  # 4 runs of 250 steps, 25 frames each


@pytest.mark.parametrize(("value", "expected"), [("all", "all"), ("true", True), ("false", False)])
def test_seed_states_is_yes_no_or_all(tmp_path, value, expected):
    config, _ = load_config(write(tmp_path, MINIMAL), [f"md.seed_states={value}"])
    assert config.md.seed_states == expected
    assert "md.steps" in error_of(write(tmp_path, MINIMAL), ["md.steps=true"]).replace(": steps", ".steps")
