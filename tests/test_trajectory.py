"""Trajectory files: mdtraj's HDF5 layout, streamed writes, and the readers."""

import h5py
import mdtraj
import numpy as np
import openmm.app as app
import pytest

from boltzgen.errors import DataFileError
from boltzgen.trajectory import (
    SampleWriter,
    iter_positions,
    read_attributes,
    read_datasets,
    read_samples,
    read_topology,
    remove_stale_shards,
    shard_paths,
    write_virtual_samples,
)

WATER_PDB = app.__file__.replace("__init__.py", "data/tip3p.pdb")


def test_sample_writer_roundtrip_without_topology(tmp_path):
    path = tmp_path / "samples.h5"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(25, 2))
    with SampleWriter(path, 2, extras=("u", "log_w")) as writer:
        writer.append(x[:10], u=np.arange(10.0), log_w=-np.arange(10.0))
        writer.append(x[10:], u=np.arange(10.0, 25.0), log_w=-np.arange(10.0, 25.0))
    data = read_samples(path)
    np.testing.assert_array_equal(data["x"], x)
    np.testing.assert_array_equal(data["u"], np.arange(25.0))
    assert data["log_w"].dtype == np.float64


def test_molecular_samples_open_with_mdtraj(tmp_path):
    pdb = app.PDBFile(WATER_PDB)
    n_atoms = pdb.topology.getNumAtoms()
    x = np.random.default_rng(1).uniform(size=(7, 3 * n_atoms))
    path = tmp_path / "samples.h5"
    with SampleWriter(path, 3 * n_atoms, extras=("u",), topology=pdb.topology) as writer:
        writer.append(x, u=np.zeros(7))
    traj = mdtraj.load(str(path))
    assert traj.n_frames == 7 and traj.n_atoms == n_atoms
    assert traj.topology.n_residues == pdb.topology.getNumResidues()
    np.testing.assert_allclose(traj.xyz.reshape(7, -1), x, rtol=1e-6)


def test_failed_writer_leaves_no_file(tmp_path):
    path = tmp_path / "samples.h5"
    with pytest.raises(ValueError):
        with SampleWriter(path, 2, extras=("u",)) as writer:
            writer.append(np.zeros((3, 2)), log_w=np.zeros(3))  # wrong extra name
    assert not path.exists() and not list(tmp_path.iterdir())


def test_bad_files_get_one_line_errors(tmp_path):
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"\x89HDF\r\n garbage")
    with pytest.raises(DataFileError, match="not a readable HDF5 file"):
        read_samples(corrupt)
    with pytest.raises(DataFileError, match="file not found"):
        read_samples(tmp_path / "missing.h5")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["something"] = np.zeros(3)
    with pytest.raises(DataFileError, match="no 'coordinates' or 'positions'"):
        read_samples(foreign)
    nan = tmp_path / "nan.h5"
    x = np.zeros((4, 2))
    x[2, 1] = np.nan
    with SampleWriter(nan, 2) as writer:
        writer.append(x)
    with pytest.raises(DataFileError, match=r"1 frame\(s\) have NaN or inf coordinates \(first: frame 2\)") as info:
        read_samples(nan)
    assert "\n" not in str(info.value)


def test_readers_agree_and_stream_in_chunks(tmp_path):
    pdb = app.PDBFile(WATER_PDB)
    n_atoms = pdb.topology.getNumAtoms()
    x = np.random.default_rng(2).uniform(size=(11, 3 * n_atoms))
    path = tmp_path / "md.h5"
    with SampleWriter(path, 3 * n_atoms, extras=("u",), topology=pdb.topology, attrs={"temperature_K": 310.0}) as writer:
        writer.append(x, u=np.arange(11.0))
    chunks = list(iter_positions(path, chunk_frames=4))
    assert [len(c) for c in chunks] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(chunks), read_samples(path)["x"])
    np.testing.assert_array_equal(read_datasets(path, ["u"])["u"], np.arange(11.0))
    assert read_attributes(path)["temperature_K"] == 310.0
    assert read_topology(path).n_atoms == n_atoms
    with pytest.raises(DataFileError, match="dataset 'log_w' is missing"):
        read_datasets(path, ["log_w"])
    plain = tmp_path / "plain.h5"
    with SampleWriter(plain, 2) as writer:
        writer.append(np.zeros((3, 2)))
    with pytest.raises(DataFileError, match="no topology"):
        read_topology(plain)


def test_shards_read_as_one_file_with_mdtraj_and_h5py(tmp_path):
    pdb = app.PDBFile(WATER_PDB)
    n_atoms = pdb.topology.getNumAtoms()
    path = tmp_path / "run" / "samples.h5"
    shards = shard_paths(path, 2)
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(9, 3 * n_atoms)).astype(np.float32).astype(np.float64)
    for shard, rows in zip(shards, (slice(0, 5), slice(5, 9))):
        with SampleWriter(shard, 3 * n_atoms, extras=("u", "log_w"), topology=pdb.topology) as writer:
            writer.append(x[rows], u=np.arange(9.0)[rows], log_w=-np.arange(9.0)[rows])
    stale = shard_paths(path, 3)[2]
    stale.write_bytes(b"left by a launch of 3")
    assert write_virtual_samples(path, shards) == 9
    remove_stale_shards(path, keep=shards)
    assert not stale.exists() and all(p.exists() for p in shards)
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)  # the shards are named relative to the file: they move with it
    traj = mdtraj.load(str(moved / "samples.h5"))
    assert traj.n_frames == 9 and traj.n_atoms == n_atoms
    np.testing.assert_allclose(traj.xyz.reshape(9, -1), x, rtol=1e-6)
    data = read_samples(moved / "samples.h5")
    np.testing.assert_array_equal(data["u"], np.arange(9.0))
    with h5py.File(moved / "samples.h5") as f:
        assert f["coordinates"].is_virtual and f["coordinates"].attrs["units"] == "nanometers"
    remove_stale_shards(moved / "samples.h5")
    assert not (moved / "samples.shards").exists()
