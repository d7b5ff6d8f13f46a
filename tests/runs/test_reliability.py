"""Each class of bad input and fault the reliability review found, one test apiece: a one-line error
with exit status 2 that names the place, and no data lost."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from boltzgen import cli
from boltzgen.errors import describe_environment_error
from boltzgen.runs.rundir import RunDir
from boltzgen.states import StateDefinition
from tests.helpers import ROOT, one_line, train_tiny_double_well

DOUBLE_WELL = ROOT / "systems" / "double_well.yaml"
ALANINE = ROOT / "systems" / "alanine.yaml"
TINY = ["--set", "training[0].steps=2", "--set", "training[1].steps=2", "--set", "sampling.n=64",
        "--set", "baseline.chains=16", "--set", "baseline.steps=20", "--set", "flow.hidden=[8]", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train_tiny_double_well(tmp_path_factory.mktemp("dw") / "run", ml_steps=20, mixed_steps=10)


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- config files ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("encoding", "text"), [("latin-1", "name: caf\u00e9\n"), ("utf-16", "name: x\n")])
def test_a_config_in_another_encoding_says_so(tmp_path, capsys, encoding, text):
    path = tmp_path / "x.yaml"
    path.write_bytes(text.encode(encoding))
    assert "not UTF-8 text" in one_line(["train", str(path)], capsys)


def test_a_yaml_of_aliases_gives_a_short_line(tmp_path, capsys):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(9)) + "name: *j\n"
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb)
    assert len(one_line(["train", str(path)], capsys)) < 400


def test_set_into_a_single_value_names_it(tmp_path, capsys):
    message = one_line(["train", str(DOUBLE_WELL), "--set", "seed.x=1", "--out", str(tmp_path / "r")], capsys)
    assert "--set seed.x" in message and "seed is a single value" in message


def test_division_by_zero_in_a_state_is_numpy_infinity_not_a_crash():
    state = StateDefinition("x0 > 1 / 0 or x0 / 0 > 1")
    assert state.evaluate({"x0": torch.tensor([-1.0, 2.0]).numpy()}).tolist() == [False, True]


def test_a_too_long_sample_count_is_refused_with_the_memory_it_needs(tmp_path, capsys):
    message = one_line(["train", str(DOUBLE_WELL), "--out", str(tmp_path / "r"), *TINY,
                        "--set", "sampling.n=9000000000"], capsys)
    assert "sampling.n" in message and "GiB of memory" in message
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


# --- molecules ---------------------------------------------------------------------------------------------

def test_an_unavailable_platform_is_refused_before_md(tmp_path, capsys):
    message = one_line(["train", str(ALANINE), "--out", str(tmp_path / "r"), "--set", "md.platform=CUDA"], capsys)
    assert "md.platform" in message and "not available" in message
    assert not (tmp_path / "r" / "md").exists()


@pytest.mark.parametrize("atoms", ["[0, 0]", "[0, 999]", "[-1]"])
def test_bad_cartesian_atoms_are_refused(tmp_path, capsys, atoms):
    message = one_line(["train", str(ALANINE), "--out", str(tmp_path / "r"), "--set", "coordinates.type=mixed",
                        "--set", f"coordinates.cartesian_atoms={atoms}"], capsys)
    assert "cartesian_atoms" in message


@pytest.mark.parametrize(("content", "expected"), [(b"", "is empty"), (bytes(range(256)) * 4, "not a text PDB")])
def test_an_empty_or_binary_pdb_names_the_file(tmp_path, capsys, content, expected):
    pdb = tmp_path / "bad.pdb"
    pdb.write_bytes(content)
    config = yaml.safe_load(ALANINE.read_text())
    config["system"]["pdb"] = str(pdb)
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(config))
    message = one_line(["train", str(path), "--out", str(tmp_path / "r")], capsys)
    assert "system.pdb" in message and expected in message and str(pdb) in message


@pytest.mark.parametrize(("key", "value"), [("md.report_every", "300000"), ("md.timestep_fs", "1000")])
def test_md_settings_that_cannot_run_are_refused_at_load(tmp_path, capsys, key, value):
    assert key.split(".")[1] in one_line(["md", str(ALANINE), "--out", str(tmp_path / "r"), "--set", f"{key}={value}"],
                                         capsys)


# --- commands on a run ------------------------------------------------------------------------------------

def test_a_summary_without_an_estimate_prints(run_dir, tmp_path, capsys):
    """10 samples rarely reach the rare state: the summary says 'not estimable' instead of crashing."""
    assert cli.main(["sample", str(run_dir), "--n", "10", "--out", str(tmp_path / "s.h5"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "ΔF A→B" in out and "+inf" not in out and "nan" not in out


def test_a_copied_run_reads_its_own_samples(run_dir, tmp_path):
    assert cli.main(["sample", str(run_dir), "--n", "500", "--no-progress"]) == 0
    summary = json.loads((run_dir / "sample_summary.json").read_text())
    assert summary["samples_file"] == "samples.h5"  # relative: the run directory can move
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (run_dir / "samples.h5").rename(run_dir / "moved.h5")  # the original's samples are gone
    try:
        assert cli.main(["compare", str(copy)]) == 0
    finally:
        (run_dir / "moved.h5").rename(run_dir / "samples.h5")


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("x")
    assert "is a file" in one_line(["train", str(DOUBLE_WELL), "--out", str(target), *TINY], capsys)


def test_orphan_temporaries_are_removed_on_the_next_start(run_dir):
    orphan = run_dir / ".samples.h5.abc123.tmp"
    orphan.write_bytes(b"half a file")
    nested = run_dir / "plots" / ".training.png.xyz.tmp"
    nested.write_bytes(b"")
    assert set(RunDir(run_dir).remove_orphan_temporaries()) == {orphan, nested}
    assert not orphan.exists() and not nested.exists() and (run_dir / "samples.h5").exists()


# --- resume ---------------------------------------------------------------------------------------------------

@pytest.fixture
def trained_copy(run_dir, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


RESUME_DW = ["--set", "baseline.chains=512", "--set", "baseline.steps=100", "--set", "baseline.warmup=50",
             "--set", "baseline.thin=10", "--set", "flow.blocks=4", "--set", "flow.hidden=[32,32]",
             "--set", "flow.bins=8", "--set", "training[0].batch=256", "--set", "training[1].batch=256",
             "--set", "sampling.n=4000", "--set", "sampling.batch=4000", "--set", "sampling.n_bootstrap=50",
             "--set", "checkpoint_every=1000", "--set", "log_every=50", "--no-progress"]


@pytest.mark.parametrize("damage", ["truncated", "random", "other architecture", "garbage metrics"])
def test_a_failed_resume_leaves_the_run_directory_byte_identical(trained_copy, capsys, damage):
    checkpoint, metrics = trained_copy / "checkpoint.pt", trained_copy / "metrics.csv"
    extra = []
    if damage == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    elif damage == "random":
        checkpoint.write_bytes(bytes(range(256)) * 64)
    elif damage == "garbage metrics":
        metrics.write_text("step,loss\nnot,numbers\n")
    else:
        extra = ["--set", "flow.blocks=3"]
    before = folder_digest(trained_copy)
    message = one_line(["train", str(DOUBLE_WELL), "--out", str(trained_copy), "--resume", *RESUME_DW, *extra],
                       capsys)
    assert folder_digest(trained_copy) == before
    assert ("metrics.csv" if damage == "garbage metrics" else "checkpoint.pt") in message
    if damage == "other architecture":
        assert "does not match the config" in message and "--resume" not in message


def test_wall_time_adds_up_over_resumes(trained_copy, capsys):
    state = torch.load(trained_copy / "checkpoint.pt", weights_only=False)
    state["wall_seconds"] = 1234.0  # as if the first session had trained for 20 minutes
    torch.save(state, trained_copy / "checkpoint.pt")
    assert cli.main(["train", str(DOUBLE_WELL), "--out", str(trained_copy), "--resume", *RESUME_DW,
                     "--set", "training[0].steps=200", "--set", "training[1].steps=60"]) == 0
    summary = json.loads((trained_copy / "summary.json").read_text())
    assert summary["wall_seconds"] > 1234.0


# --- the environment -------------------------------------------------------------------------------------------

def test_environment_errors_name_the_file_and_what_to_do():
    import errno

    full = OSError(errno.ENOSPC, "No space left on device", "/data/run/samples.h5")
    assert describe_environment_error(full) == ("/data/run/samples.h5: the disk is full; free space on it, "
                                                "or write elsewhere with --out")
    hdf5 = OSError("Unable to create file (unable to open file: name = 'x.h5', errno = 13, error message = "
                   "'Permission denied', flags = 13)")
    assert describe_environment_error(hdf5).startswith("permission denied")
    long = OSError(errno.ENAMETOOLONG, "File name too long", "a" * 300)
    assert "too long" in describe_environment_error(long)
    assert "out of memory" in describe_environment_error(MemoryError())
    assert describe_environment_error(ValueError("x")) is None


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root only): a real full disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_sample_file_that_cannot_fit_is_refused_up_front(run_dir, small_disk, capsys):
    run = small_disk / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("samples.h5", "*.png"))
    message = one_line(["sample", str(run), "--n", "200000", "--no-progress"], capsys)
    assert "--n = 200,000 samples" in message and "MiB of disk" in message


def test_a_full_disk_is_one_line_and_keeps_the_previous_outputs(run_dir, small_disk, capsys):
    run = small_disk / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("samples.h5", "*.png"))
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 60_000))  # 60 kB left: less than one HDF5 chunk
    before = folder_digest(run)
    message = one_line(["sample", str(run), "--n", "1000", "--no-progress"], capsys)
    assert "disk is full" in message
    assert folder_digest(run) == before  # the old summary and checkpoint are intact, no partial file left


def test_a_read_only_run_directory_is_one_line(run_dir, small_disk, capsys):
    run = small_disk / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("samples.h5", "*.png"))
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    message = one_line(["sample", str(run), "--n", "100", "--no-progress"], capsys)
    assert "read-only" in message and "--out" in message
    assert math.isfinite(len(message))
