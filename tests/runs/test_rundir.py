"""The run directory: its file names, the guard against overwriting a run, and the trained-run check."""

from __future__ import annotations

import pytest

from boltzgen.errors import RunError
from boltzgen.runs.rundir import MDDir, RunDir


def test_paths_of_a_run_directory(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.summary.name == "summary.json" and run.sample_summary.name == "sample_summary.json"
    assert run.plot("training") == run.plots / "training.png"
    assert run.md.trajectory == tmp_path / "run" / "md" / "md.h5"
    assert MDDir.checkpoint(run.md.trajectory).name == "md.ckpt.h5"
    assert run.mcmc.chains.parent == run.mcmc.path and run.umbrella.summary.parent.name == "umbrella"


def test_a_trained_run_is_not_overwritten_without_resume_or_force(tmp_path):
    run = RunDir(tmp_path / "run")
    run.prepare_for_training(resume=False, force=False)
    assert run.plots.is_dir()
    run.checkpoint.write_bytes(b"")
    with pytest.raises(RunError, match="--resume"):
        run.prepare_for_training(resume=False, force=False)
    run.prepare_for_training(resume=True, force=False)
    run.prepare_for_training(resume=False, force=True)


def test_require_trained_names_what_is_missing(tmp_path):
    with pytest.raises(RunError, match="no such run directory"):
        RunDir(tmp_path / "missing").require_trained()
    run = RunDir(tmp_path)
    run.config.write_text("name: x\n")
    with pytest.raises(RunError, match="no checkpoint.pt"):
        run.require_trained()
    run.checkpoint.write_bytes(b"")
    assert run.require_trained() is run


def test_mcmc_runs_are_the_folders_with_a_summary(tmp_path):
    run = RunDir(tmp_path)
    for name in ("mcmc", "mcmc_hmc", "mcmc_empty"):
        (tmp_path / name).mkdir()
    for name in ("mcmc_hmc", "mcmc"):
        (tmp_path / name / "summary.json").write_text("{}")
    assert [folder.path.name for folder in run.mcmc_runs()] == ["mcmc", "mcmc_hmc"]
