"""Faults at random moments: kill -9, SIGTERM and SIGINT sent to a real `boltzgen train` process, then
`--resume`; the result must equal an uninterrupted run bit for bit (metrics but wall time, ESS, ΔF).

Slow (about 20 s a point): `python -m pytest -m slow tests/runs/test_faults.py`. The default suite
covers the same paths in-process (tests/test_training.py, tests/runs/test_train.py).
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

ARGS = ["train", str(ROOT / "systems" / "double_well.yaml"), "--no-progress",
        "--set", "baseline.chains=256", "--set", "baseline.steps=40", "--set", "baseline.warmup=10",
        "--set", "baseline.thin=4", "--set", "flow.blocks=2", "--set", "flow.hidden=[16]", "--set", "flow.bins=4",
        "--set", "training[0].steps=40", "--set", "training[1].steps=40", "--set", "training[0].batch=128",
        "--set", "training[1].batch=128", "--set", "sampling.n=20000", "--set", "sampling.batch=5000",
        "--set", "sampling.n_bootstrap=20", "--set", "checkpoint_every=10", "--set", "log_every=5"]
SIGNALS = {"kill -9": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}
#: 7 random moments per signal: 21 interruption points in all.
POINTS = [(name, random.Random(seed).uniform(0.0, 1.0)) for seed, name in enumerate(sorted(SIGNALS) * 7)]


def boltzgen(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.Popen([sys.executable, "-m", "boltzgen", *ARGS, "--out", str(out), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def outcome(out: Path) -> tuple[list[dict[str, str]], dict]:
    with open(out / "metrics.csv", newline="") as f:
        rows = [{k: v for k, v in row.items() if k != "wall_seconds"} for row in csv.DictReader(f)]
    summary = json.loads((out / "summary.json").read_text())
    return rows, {key: summary[key] for key in ("ess", "n_samples", "n_nonfinite", "pareto_khat", "free_energies",
                                                 "energy_evaluations")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[tuple, float]:
    out = tmp_path_factory.mktemp("reference") / "run"
    started = time.perf_counter()
    process = boltzgen(out)
    assert process.wait(timeout=300) == 0, process.stderr.read()
    return outcome(out), time.perf_counter() - started


@pytest.mark.parametrize(("name", "moment"), POINTS, ids=[f"{n}-{m:.2f}" for n, m in POINTS])
def test_interrupt_then_resume_is_bit_identical(reference, tmp_path, name, moment):
    expected, duration = reference
    out = tmp_path / "run"
    process = boltzgen(out)
    time.sleep(moment * duration)
    process.send_signal(SIGNALS[name])
    code = process.wait(timeout=300)
    err = process.stderr.read()
    assert "Traceback" not in err, err
    if code == 0:  # the signal came after the run had finished: nothing to resume
        assert outcome(out) == expected
        return
    resumed = boltzgen(out, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert outcome(out) == expected, f"{name} at {moment:.2f} of the run"
    assert not list(out.rglob(".*.tmp")), "orphan temporary files"
