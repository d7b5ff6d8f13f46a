"""Atomic writes and strict JSON."""

import json
import math
import os

import numpy as np
import pytest

from boltzgen.files import atomic_path, atomic_write_json, json_safe


def test_atomic_path_keeps_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"ess": 0.5})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half a fi")
            raise RuntimeError("crash")
    assert json.loads(target.read_text()) == {"ess": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_json_is_strict_non_finite_floats_become_null(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_json(target, {"a": math.nan, "b": [np.float64(math.inf), 1.5], "c": np.int64(3), "d": np.bool_(True)})
    assert json.loads(target.read_text()) == {"a": None, "b": [None, 1.5], "c": 3, "d": True}
    assert json_safe((np.arange(2.0),)) == [[0.0, 1.0]]
