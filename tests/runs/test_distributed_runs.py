"""`train` and `sample` launched by torchrun on 2 gloo processes: the same answers as one process,
a resume with another number of processes, one samples file over the ranks' shards, and one-line
errors for a bad launch."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from boltzgen import cli, distributed
from boltzgen.config import load_config
from boltzgen.distributed import World
from boltzgen.estimators.free_energy import delta_f
from boltzgen.estimators.weights import kish_ess
from boltzgen.runs.rundir import RunDir
from boltzgen.runs.sample import draw_samples
from boltzgen.runs.target import (
    build_generator,
    build_target,
    load_run,
    reference_structure,
    select_device,
    to_flow_dtype,
)
from boltzgen.training import Trainer
from boltzgen.trajectory import read_samples, shard_paths
from tests.launch import error_lines, torchrun

ROOT = Path(__file__).resolve().parents[2]
DOUBLE_WELL = ROOT / "systems" / "double_well.yaml"
SETTINGS = [
    "baseline.chains=512", "baseline.steps=100", "baseline.warmup=50", "flow.blocks=3", "flow.hidden=[32,32]",
    "flow.bins=8", "training[0].steps=200", "training[0].batch=256", "training[1].steps=60", "training[1].batch=256",
    "sampling.n=20000", "sampling.batch=10000", "sampling.n_bootstrap=100", "checkpoint_every=100",
    "log_every=20", "device=cpu",
]
TOTAL_STEPS = 260


def train_args(out: Path, *extra: str) -> list[str]:
    sets = [arg for setting in (*SETTINGS, *extra) for arg in ("--set", setting)]
    return ["train", str(DOUBLE_WELL), "--out", str(out), "--no-progress", *sets]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same tiny double-well training by one process (in this one) and by two (torchrun, gloo)."""
    root = tmp_path_factory.mktemp("distributed")
    two = torchrun(2, *train_args(root / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("run directory") == 1  # rank 0 alone reports
    assert cli.main(train_args(root / "one")) == 0
    return {"one": root / "one", "two": root / "two"}


def summary(run: Path, name: str = "summary.json") -> dict:
    return json.loads((run / name).read_text())


def test_two_ranks_train_to_the_same_free_energy(runs) -> None:
    one, two = summary(runs["one"]), summary(runs["two"])
    assert (one["ranks"], two["ranks"]) == (1, 2)
    a, b = one["free_energies"][0], two["free_energies"][0]
    assert abs(a["delta_f_kT"] - b["delta_f_kT"]) < 4 * math.hypot(a["stderr_kT"], b["stderr_kT"])
    assert abs(b["delta_f_kT"] - b["exact_kT"]) < 4 * b["stderr_kT"] + 0.05
    assert two["ess"] > 0.5 and two["n_samples"] == 20000
    # Energy evaluations are counted over both ranks: the same global batches as one process.
    assert two["energy_evaluations"] == one["energy_evaluations"]
    rows = (runs["two"] / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + TOTAL_STEPS // 20 and rows[-1].startswith(f"{TOTAL_STEPS},")
    state = torch.load(runs["two"] / "checkpoint.pt", weights_only=False)
    assert len(state["rank_rng"]) == 2 and state["step"] == TOTAL_STEPS


def test_samples_of_two_ranks_are_one_file_over_their_shards(runs) -> None:
    path = runs["two"] / "samples.h5"
    shards = shard_paths(path, 2)
    assert all(p.exists() for p in shards)
    with h5py.File(path) as f:
        assert f["positions"].is_virtual and f["log_w"].shape == (20000,)
    whole = read_samples(path)
    parts = [read_samples(p) for p in shards]
    assert [len(p["x"]) for p in parts] == [10000, 10000]
    np.testing.assert_array_equal(whole["x"], np.concatenate([p["x"] for p in parts]))
    np.testing.assert_array_equal(whole["log_w"], np.concatenate([p["log_w"] for p in parts]))
    assert kish_ess(whole["log_w"]) == summary(runs["two"])["ess"]


def test_a_two_rank_run_resumes_with_one_process(runs, tmp_path) -> None:
    run = tmp_path / "resumed"
    shutil.copytree(runs["two"], run)
    assert cli.main([*train_args(run, "training[1].steps=100"), "--resume"]) == 0
    rows = (run / "metrics.csv").read_text().splitlines()
    steps = [int(row.split(",")[0]) for row in rows[1:]]
    assert steps == list(range(20, TOTAL_STEPS + 40 + 1, 20))  # no row lost or repeated
    resumed = summary(run)
    assert resumed["ranks"] == 1 and abs(resumed["free_energies"][0]["delta_f_kT"] - 3.38) < 0.3
    assert not (run / "samples.shards").exists()  # one process wrote samples.h5 itself


@pytest.mark.slow
def test_a_two_rank_run_resumed_by_two_ranks_ends_bit_identical(tmp_path) -> None:
    """Each rank continues its own random stream: interrupted (here: a shorter last stage, constant
    learning rates) and resumed, the run equals the uninterrupted one in every metric and sample."""
    constant = ("training[0].lr_schedule=constant", "training[1].lr_schedule=constant", "sampling.n=4000")
    for args in (train_args(tmp_path / "a", *constant, "training[1].steps=40"),
                 [*train_args(tmp_path / "a", *constant), "--resume"], train_args(tmp_path / "b", *constant)):
        done = torchrun(2, *args)
        assert done.returncode == 0, done.stderr[-3000:]
    rows = [[line.rsplit(",", 1)[0] for line in (tmp_path / run / "metrics.csv").read_text().splitlines()]
            for run in ("a", "b")]
    assert rows[0] == rows[1]  # every column but the last, wall_seconds
    a, b = (read_samples(tmp_path / run / "samples.h5") for run in ("a", "b"))
    assert all(np.array_equal(a[key], b[key]) for key in a)


def test_a_resume_with_another_flow_is_refused_in_one_line(runs, tmp_path, capsys) -> None:
    run = tmp_path / "other_flow"
    shutil.copytree(runs["two"], run)
    assert cli.main([*train_args(run, "flow.blocks=2"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the checkpoint's flow does not match the config" in err


def test_two_ranks_sample_the_same_numbers_as_their_shards_combined(runs, tmp_path) -> None:
    run = tmp_path / "sampled"
    shutil.copytree(runs["two"], run)
    done = torchrun(2, "sample", str(run), "-n", "6001", "--batch", "2000", "--seed", "7", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    result = summary(run, "sample_summary.json")
    assert result["ranks"] == 2 and result["n_samples"] == 6001
    # One process draws the two shards with the ranks' seeds and batches, and joins them.
    trained = load_run(RunDir(run))
    log_w, x = [], []
    for rank, (count, path) in enumerate(zip((3001, 3000), shard_paths(tmp_path / "again.h5", 2))):
        torch.manual_seed(distributed.rank_seed(7, rank))
        drawn = draw_samples(trained.generator, trained.target, count, 1000, path, progress=False)
        log_w.append(drawn.log_w)
        x.append(read_samples(path)["x"])
    log_w, x = np.concatenate(log_w), np.concatenate(x)
    stored = read_samples(run / "samples.h5")
    np.testing.assert_array_equal(stored["log_w"], log_w)
    np.testing.assert_array_equal(stored["x"], x)
    assert result["ess"] == kish_ess(log_w)
    masks = trained.target.state_masks(trained.target.cvs(x))
    estimate = delta_f(masks["A"], masks["B"], log_w, trained.config.sampling.n_bootstrap, trained.config.seed)
    row = result["free_energies"][0]
    assert (row["delta_f_kT"], row["stderr_kT"]) == (estimate.value, estimate.stderr)


# --- bad launches ----------------------------------------------------------------------------------

@pytest.fixture
def two_ranks(monkeypatch):
    """This process as rank 0 of 2 (no process group: for the checks made before any collective)."""
    monkeypatch.setattr(distributed, "start", lambda env=None: distributed.__dict__.__setitem__(
        "_WORLD", World(rank=0, size=2)) or distributed.world())


@pytest.mark.parametrize("setting, message", [
    ("training[1].batch=255", "training[1].batch: 255 is not divisible by the 2 processes of this launch"),
    ("sampling.batch=999", "sampling.batch: 999 is not divisible by the 2 processes"),
    ("training[1].loss=fab", "training[1]: loss fab runs in one process only"),
])
def test_a_config_that_cannot_be_split_is_one_line(two_ranks, tmp_path, capsys, setting, message) -> None:
    assert cli.main(train_args(tmp_path / "run", setting)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("boltzgen: error: ") and message in err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_commands_of_one_process_refuse_a_launch(two_ranks, runs, capsys) -> None:
    assert cli.main(["mcmc", str(runs["two"]), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "`boltzgen mcmc` runs in one process, not on the 2 of this launch" in err


def test_a_rank_without_its_gpu_says_so_in_one_line(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(distributed, "start", lambda env=None: distributed.__dict__.__setitem__(
        "_WORLD", World(rank=1, size=2, local_rank=1)) or distributed.world())
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.main(train_args(tmp_path / "run", "device=cuda")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("boltzgen: error: rank 1: device: rank 1 (local rank 1) has no GPU of its own")


def test_torchrun_with_a_batch_it_cannot_split_prints_one_error(tmp_path) -> None:
    done = torchrun(2, *train_args(tmp_path / "run", "training[0].batch=255"), timeout=120)
    assert done.returncode != 0
    assert error_lines(done.stderr) == [("boltzgen: error: training[0].batch: 255 is not divisible by the 2 processes "
                                         "of this launch; batches are global and split evenly across ranks, so give "
                                         "a multiple of 2")]


# --- the GPU path ----------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_and_sample_on_cuda_with_device_auto(tmp_path, capsys) -> None:
    out = tmp_path / "cuda"
    args = train_args(out, "device=auto", "training[0].steps=20", "training[1].steps=20")
    assert cli.main(args) == 0, capsys.readouterr().err
    assert summary(out)["device"].startswith("cuda")
    assert cli.main(["sample", str(out), "--n", "4000", "--no-progress"]) == 0, capsys.readouterr().err
    assert summary(out, "sample_summary.json")["ess"] > 0


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_ranks_train_on_two_gpus(tmp_path) -> None:
    done = torchrun(2, *train_args(tmp_path / "run", "device=cuda", "training[0].steps=20", "training[1].steps=20"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary(tmp_path / "run")["device"] == "cuda:0"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_training_step_of_alanine_with_the_torch_force_field_on_cuda(tmp_path) -> None:
    # alanine.yaml trains by forward KL alone; a mixed stage exercises the force field's backward on CUDA.
    config, _ = load_config(ROOT / "systems" / "alanine.yaml", [
        "device=auto", "training=[{loss: forward_kl, steps: 2, batch: 64}, {loss: mixed, steps: 2, batch: 64, u_max: 100}]"])
    device = select_device(config.device)
    target = build_target(config)
    x_ref = reference_structure(target)
    data = x_ref + 0.003 * torch.randn(512, x_ref.shape[1], dtype=torch.float64)
    generator = build_generator(config, target, data)
    target.energy.to(device)
    to_flow_dtype(generator, device, torch.float32)
    trainer = Trainer(generator, config.training, tmp_path / "c.pt", tmp_path / "m.csv",
                      data=data.to(device=device, dtype=torch.float32), log_every=1, progress=False)
    trainer._initialize_from_data()
    trainer.step = trainer.stage_ends[0]  # the mixed stage: forward KL and reverse KL with the force field
    row = trainer._step(0.0)
    assert device.type == "cuda" and math.isfinite(row["loss"]) and math.isfinite(row["reverse_kl"])
    assert all(p.grad is None or p.grad.device.type == "cuda" for p in generator.parameters())
    assert row["energy_evaluations"] >= 64
