"""Generated bad input: configs and command lines built from the config schema, each with exactly one
thing wrong. Every one must end in exit status 2 and one line that names the file, key or option;
none may raise a traceback or start the expensive part of a run."""

from __future__ import annotations

import copy
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from boltzgen import cli
from boltzgen.config import Config, DoubleWellSystem
from tests.helpers import ROOT, train_tiny_double_well

#: A double-well config small enough that a mutation which wrongly passed would still finish fast.
TINY = yaml.safe_load((ROOT / "systems" / "double_well.yaml").read_text())
TINY["baseline"] = {"chains": 16, "steps": 20, "warmup": 5, "thin": 2}
TINY["flow"] = {"type": "neural_spline", "blocks": 2, "hidden": [8], "bins": 4}
TINY["training"] = [{"loss": "forward_kl", "steps": 2, "batch": 16}, {"loss": "mixed", "steps": 2, "batch": 16}]
TINY["sampling"] = {"n": 64, "batch": 64, "n_bootstrap": 2}
#: Examples per generated test; `BOLTZGEN_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py` fuzzes longer.
EXAMPLES = int(os.environ.get("BOLTZGEN_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# --- what can be wrong with a field, read from its annotation and constraints --------------------------

def _bounds(metadata: list[Any]) -> tuple[float | None, float | None]:
    low = high = None
    for m in metadata:
        if isinstance(m, (annotated_types.Ge, annotated_types.Gt)):
            low = getattr(m, "ge", getattr(m, "gt", None))
        if isinstance(m, (annotated_types.Le, annotated_types.Lt)):
            high = getattr(m, "le", getattr(m, "lt", None))
    return low, high


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """``Annotated[T, *meta]`` -> ``(T, meta)``; ``T | None`` -> ``T`` (None is valid, so never generated)."""
    metadata: list[Any] = []
    while typing.get_origin(annotation) is typing.Annotated:
        annotation, *extra = typing.get_args(annotation)
        metadata += extra
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) == 1:
            return _unwrap(options[0])[0], metadata + _unwrap(options[0])[1]
    return annotation, metadata


WRONG_TYPE = st.sampled_from(["fast", [1, 2], {"a": 1}, "1e3x"])


def invalid_values(annotation: Any, metadata: list[Any]) -> st.SearchStrategy | None:
    """Values that a field of this type and these constraints must refuse (None: no reliable one)."""
    kind, inner_meta = _unwrap(annotation)
    metadata = metadata + inner_meta
    low, high = _bounds(metadata)
    if kind is bool:
        return st.sampled_from([[True], {"yes": 1}, "perhaps"])
    if kind in (int, float):
        options = [WRONG_TYPE, st.just(True)]
        if low is not None:
            options.append(st.floats(max_value=low, exclude_max=True, allow_nan=False, allow_infinity=False, width=64)
                           .map(lambda v: int(math.floor(v)) if kind is int and abs(v) < 1e18 else v)
                           .filter(lambda v: v < low))
        if high is not None:
            options.append(st.integers(min_value=int(high) + 1, max_value=10**30) if kind is int else
                           st.floats(min_value=high, exclude_min=True, allow_nan=False, allow_infinity=False))
        if kind is float:
            options.append(st.sampled_from([math.inf, -math.inf, math.nan]))
        else:
            # A non-integral float inside the bounds: floor first, since bound * v can end in .5, and + 0.5
            # would then make it an integer (2^32 - 1 times 0.5, plus 0.5, is a valid seed).
            options.append(st.floats(0.1, 0.9).map(lambda v: math.floor((high or 10) * v) + 0.5
                                                   if high is None or high > 1 else 0.5))
        return st.one_of(options)
    if typing.get_origin(kind) is typing.Literal:
        allowed = set(typing.get_args(kind))
        return st.text(min_size=1, max_size=12).filter(lambda v: v not in allowed) | WRONG_TYPE.filter(
            lambda v: not isinstance(v, str))
    if kind is str:
        max_length = next((m.max_length for m in metadata if isinstance(m, annotated_types.MaxLen)), None)
        options = [st.sampled_from([[1], {"a": 1}, 12])]
        if max_length is not None:
            options.append(st.just("a" * (max_length + 1)))
        if any(getattr(m, "pattern", None) for m in metadata):
            options.append(st.sampled_from(["has space", "..", "-dash", "a/b"]))
        return st.one_of(options)
    if typing.get_origin(kind) is list:
        return st.sampled_from(["not a list", 7, {"a": 1}])
    return None


def field_mutations(model: type[BaseModel], path: tuple) -> list[tuple[tuple, st.SearchStrategy]]:
    """``(path, invalid values)`` for every leaf field of ``model`` below ``path``, plus an unknown key."""
    out: list[tuple[tuple, st.SearchStrategy]] = [(path + ("no_such_key",), st.just(1))]
    for name, info in model.model_fields.items():
        kind, _ = _unwrap(info.annotation)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out += field_mutations(kind, path + (name,))
        elif typing.get_origin(kind) is list and typing.get_args(kind) and isinstance(typing.get_args(kind)[0], type) \
                and issubclass(typing.get_args(kind)[0], BaseModel):
            out += field_mutations(typing.get_args(kind)[0], path + (name, 0))
            out.append((path + (name,), st.sampled_from([[], "x", {"a": 1}])))
        else:
            strategy = invalid_values(info.annotation, list(info.metadata))
            if strategy is not None and name != "type":
                out.append((path + (name,), strategy))
    return out


SECTIONS = [("system", DoubleWellSystem)] + [
    (name, _unwrap(info.annotation)[0]) for name, info in Config.model_fields.items()
    if name not in ("system", "states")
]
MUTATIONS = [m for name, kind in SECTIONS for m in (
    field_mutations(kind, (name,)) if isinstance(kind, type) and issubclass(kind, BaseModel) else
    field_mutations(typing.get_args(kind)[0], (name, 0)) if typing.get_origin(kind) is list else
    [((name,), invalid_values(Config.model_fields[name].annotation, list(Config.model_fields[name].metadata)))]
) if m[1] is not None]

BAD_STATES = st.sampled_from([
    "x0 <", "chi > 0", "x0 > 0 and x0 < 0", "__import__('os')", "x0.real > 0", "'a' < 'b'", "x0", "x0 + 1",
    "abs(x0, x1) > 1", "x0 > 10", "not not x0", "lambda: 1", "x0[0] > 1", "(" * 300 + "x0 > 0" + ")" * 300,
    "x0 > 0 or " * 300 + "x0 > 0", "x9 > 0", "",
])


def _set(config: dict, path: tuple, value: Any) -> dict:
    config = copy.deepcopy(config)
    node = config
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
    node[path[-1]] = value
    return config


def _assert_one_line_exit_2(argv: list[str], capsys, *names: str) -> str:
    capsys.readouterr()  # what earlier examples printed
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("boltzgen: error: "), err
    assert "Traceback" not in err and "internal error" not in err
    assert any(name in lines[0] for name in names), (names, lines[0])
    return lines[0]


# --- generated configs ---------------------------------------------------------------------------------

@FUZZ
@given(data=st.data())
def test_a_config_with_one_bad_value_is_refused_in_one_line(tmp_path_factory, capsys, data):
    path, strategy = data.draw(st.sampled_from(MUTATIONS), label="field")
    value = data.draw(strategy, label="value")
    folder = tmp_path_factory.mktemp("cfg")
    config_file = folder / "bad.yaml"
    config_file.write_text(yaml.safe_dump(_set(TINY, path, value)))
    _assert_one_line_exit_2(["train", str(config_file), "--out", str(folder / "run"), "--no-progress"], capsys,
                            str(config_file), path[0], ".".join(str(p) for p in path[:1]))
    assert not (folder / "run" / "checkpoint.pt").exists()  # refused before any training


@FUZZ
@given(expression=BAD_STATES, label=st.sampled_from(["A", "B"]))
def test_a_bad_state_is_refused_before_the_run(tmp_path_factory, capsys, expression, label):
    folder = tmp_path_factory.mktemp("states")
    config_file = folder / "bad.yaml"
    config_file.write_text(yaml.safe_dump(_set(TINY, ("states", label), expression)))
    _assert_one_line_exit_2(["train", str(config_file), "--out", str(folder / "run"), "--no-progress"], capsys,
                            "states")
    assert not (folder / "run" / "checkpoint.pt").exists()


@FUZZ
@given(raw=st.one_of(st.binary(min_size=1, max_size=200).filter(lambda b: not _is_utf8(b)),
                     st.sampled_from(["a: [1, 2", "{{{", "- 1\n- 2", "name: x\nname: [", "\t: :", "just text",
                                      "&a [*a, *a]", "!!python/object:os.system {}"])))
def test_a_config_that_is_not_yaml_of_keys_is_refused(tmp_path, capsys, raw):
    config_file = tmp_path / "bad.yaml"
    config_file.write_bytes(raw if isinstance(raw, bytes) else raw.encode())
    _assert_one_line_exit_2(["train", str(config_file), "--out", str(tmp_path / "run"), "--no-progress"], capsys,
                            str(config_file))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# --- generated command lines ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train_tiny_double_well(tmp_path_factory.mktemp("dw") / "run", ml_steps=10, mixed_steps=5)


NOT_A_NUMBER = st.sampled_from(["abc", "", "1,5", "nan", "inf", "-inf", "0x10", "1e999"])
OPTIONS = {
    ("sample", "--n"): st.one_of(NOT_A_NUMBER, st.integers(max_value=0).map(str), st.just("1.5"),
                                 st.integers(min_value=10**10 + 1).map(str)),
    ("sample", "--batch"): st.one_of(NOT_A_NUMBER, st.integers(max_value=0).map(str)),
    ("sample", "--seed"): st.one_of(NOT_A_NUMBER, st.integers(max_value=-1).map(str),
                                    st.integers(min_value=2**32).map(str)),
    ("sample", "--temperatures"): st.sampled_from(["abc", "", "nan", "inf", "0", "-1", "290,,310", "300,nan", "1e999"]),
    ("sample", "--weights"): st.sampled_from(["psi", "", "RAW"]),
    ("mcmc", "--chains"): st.one_of(NOT_A_NUMBER, st.integers(max_value=0).map(str)),
    ("mcmc", "--steps"): st.one_of(NOT_A_NUMBER, st.integers(max_value=0).map(str)),
    ("mcmc", "--warmup"): st.one_of(NOT_A_NUMBER, st.integers(max_value=-1).map(str)),
    ("mcmc", "--thin"): st.one_of(NOT_A_NUMBER, st.integers(max_value=0).map(str)),
    ("mcmc", "--step-size"): st.one_of(NOT_A_NUMBER, st.sampled_from(["0", "-0.1", "-1e9"])),
    ("mcmc", "--local-step"): st.one_of(NOT_A_NUMBER, st.sampled_from(["0", "-0.002"])),
    ("mcmc", "--leapfrog"): st.one_of(NOT_A_NUMBER, st.integers(max_value=0).map(str)),
    ("mcmc", "--moves"): st.sampled_from(["hmc", "", "imh+"]),
    ("check-energy", "--n"): st.one_of(NOT_A_NUMBER, st.integers(max_value=0).map(str)),
    ("check-energy", "--noise-nm"): st.one_of(NOT_A_NUMBER, st.sampled_from(["-0.01", "-1"])),
}


@FUZZ
@given(data=st.data())
def test_a_bad_option_is_refused_in_one_line(run_dir, capsys, data):
    command, option = data.draw(st.sampled_from(sorted(OPTIONS)), label="option")
    value = data.draw(OPTIONS[(command, option)], label="value")
    target = str(ROOT / "systems" / "alanine.yaml") if command == "check-energy" else str(run_dir)
    argv = [command, target, f"{option}={value}", "--no-progress"] if command != "check-energy" else \
        [command, target, f"{option}={value}"]
    if command == "sample" and option != "--n":
        argv.append("--n=10")
    _assert_one_line_exit_2(argv, capsys, option)


@FUZZ
@given(kind=st.sampled_from(["missing", "file", "empty dir", "fifo"]), command=st.sampled_from(["sample", "mcmc",
                                                                                                 "compare"]))
def test_a_run_directory_that_is_not_one_is_refused(tmp_path_factory, capsys, kind, command):
    folder = tmp_path_factory.mktemp("notrun")
    path = folder / "x"
    if kind == "file":
        path.write_text("not a folder")
    elif kind == "empty dir":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    argv = [command, str(path)] + (["--n", "10"] if command == "sample" else [])
    _assert_one_line_exit_2(argv, capsys, str(path))
