"""Trajectory files: HDF5 samples in mdtraj's layout plus extra per-frame datasets.

This is the only module that knows the layout; everything else reads and writes through it.

A molecular ``samples.h5`` or ``md.h5`` holds ``coordinates`` ``[n_frames, n_atoms, 3]`` float32 in
nm and the topology as JSON, exactly as mdtraj's HDF5 format, so ``mdtraj.load`` opens it (mdtraj
reads HDF5 through PyTables). Per-frame extras (``log_q``, ``u``, ``log_w``, energies) are float64
datasets beside them, except mdtraj's own ``time`` (ps) and ``potentialEnergy`` (kJ/mol), stored as
mdtraj stores them. Analytic systems have no topology; their ``positions`` are ``[n, dim]``.

Samples drawn by several processes (a torchrun launch) are one shard file per rank in
``<stem>.shards/`` and, at ``<stem>.h5``, a file of HDF5 virtual datasets over them
(:func:`write_virtual_samples`) that reads as one file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import mdtraj
import numpy as np
import torch
from mdtraj.formats.hdf5 import HDF5TrajectoryFile

from boltzgen.errors import DataFileError
from boltzgen.files import atomic_path, ensure_free_space


def topology_json(topology: Any) -> str:
    """mdtraj's JSON serialization of an mdtraj (or OpenMM) topology."""
    if not isinstance(topology, mdtraj.Topology):
        topology = mdtraj.Topology.from_openmm(topology)
    return json.dumps(HDF5TrajectoryFile.convert_topology_to_dict(topology))


def topology_from_json(raw: bytes | str) -> mdtraj.Topology:
    """Inverse of :func:`topology_json` (mirrors mdtraj's reader, needs no PyTables)."""
    data = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    top = mdtraj.Topology()
    for chain_dict in sorted(data["chains"], key=lambda c: c["index"]):
        chain = top.add_chain(chain_id=chain_dict.get("chain_id"))
        for res_dict in sorted(chain_dict["residues"], key=lambda r: r["index"]):
            residue = top.add_residue(
                res_dict["name"], chain, resSeq=res_dict.get("resSeq"), segment_id=res_dict.get("segmentID", "")
            )
            for atom_dict in sorted(res_dict["atoms"], key=lambda a: a["index"]):
                try:
                    element = mdtraj.element.get_by_symbol(atom_dict["element"])
                except KeyError:
                    element = mdtraj.element.virtual
                top.add_atom(atom_dict["name"], element, residue)
    atoms = list(top.atoms)
    for a, b in data["bonds"]:
        top.add_bond(atoms[a], atoms[b])
    return top


#: mdtraj's own per-frame fields -> units attribute; as extras they are float32, as mdtraj writes them.
MDTRAJ_FIELDS: dict[str, str] = {"time": "picoseconds", "potentialEnergy": "kilojoules_per_mole"}


class SampleWriter:
    """Streams frames into an HDF5 file, written atomically when :meth:`close` succeeds.

    ``dim``: flattened state dimension. With ``topology`` (mdtraj or OpenMM), states are positions
    in nm, stored as ``coordinates [n, dim/3, 3]`` in mdtraj's layout; otherwise as ``positions [n, dim]``.
    ``extras``: names of per-frame ``[n]`` datasets to stream beside the positions: float64, except
    the names in :data:`MDTRAJ_FIELDS` (float32 with mdtraj's ``units`` attribute).
    ``attrs``: root attributes. ``expected_frames``: total frames, if known; it caps the chunk length,
    so that a short file is not padded to full-size chunks.
    """

    def __init__(self, path: str | Path, dim: int, extras: tuple[str, ...] = (), topology: Any = None,
                 attrs: dict[str, Any] | None = None, expected_frames: int | None = None) -> None:
        if topology is not None:
            n_atoms = topology.n_atoms if isinstance(topology, mdtraj.Topology) else topology.getNumAtoms()
            if dim != 3 * n_atoms:
                raise ValueError(f"dim {dim} does not match the topology's {n_atoms} atoms (3 * n_atoms)")

        def frames_per_chunk(default: int) -> int:
            return default if expected_frames is None else max(1, min(default, expected_frames))

        self.path = Path(path)
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        self._file = h5py.File(self._tmp, "w")
        self.n = 0
        if topology is not None:
            self._file.attrs.update({"conventions": "Pande", "conventionVersion": "1.1", "program": "boltzgen",
                                     "programVersion": "0.1.0", "application": "boltzgen", "title": self.path.stem})
            # Fixed-length bytes: PyTables, which mdtraj reads with, cannot read variable-length strings.
            self._file.create_dataset("topology", data=np.array([topology_json(topology).encode()]))
            self._positions = self._file.create_dataset(
                "coordinates", shape=(0, n_atoms, 3), maxshape=(None, n_atoms, 3), dtype=np.float32,
                chunks=(frames_per_chunk(max(1, 65536 // n_atoms)), n_atoms, 3))
            self._positions.attrs["units"] = "nanometers"
        else:
            self._positions = self._file.create_dataset("positions", shape=(0, dim), maxshape=(None, dim),
                                                        dtype=np.float64, chunks=(frames_per_chunk(max(1, 16384 // dim)), dim))
        self._extras: dict[str, h5py.Dataset] = {}
        for name in extras:
            dtype = np.float32 if name in MDTRAJ_FIELDS else np.float64
            self._extras[name] = self._file.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype,
                                                           chunks=(frames_per_chunk(65536),))
            if name in MDTRAJ_FIELDS:
                self._extras[name].attrs["units"] = MDTRAJ_FIELDS[name]
        for key, value in (attrs or {}).items():
            self._file.attrs[key] = value

    def append(self, x: np.ndarray | torch.Tensor, **extras: np.ndarray | torch.Tensor) -> None:
        """Append ``x`` ``[batch, dim]`` and one ``[batch]`` array per extra name."""
        x = _numpy(x)
        batch = x.shape[0]
        if set(extras) != set(self._extras):
            raise ValueError(f"expected extras {sorted(self._extras)}, got {sorted(extras)}")
        chunks = sum(d.chunks[0] * d.dtype.itemsize * int(np.prod(d.shape[1:])) for d in self._datasets())
        ensure_free_space(self.path, 2 * (x.nbytes + sum(_numpy(v).nbytes for v in extras.values())) + chunks)
        self._positions.resize(self.n + batch, axis=0)
        self._positions[self.n:] = x.reshape((batch,) + self._positions.shape[1:])
        for name, values in extras.items():
            dataset = self._extras[name]
            dataset.resize(self.n + batch, axis=0)
            dataset[self.n:] = _numpy(values).astype(dataset.dtype)
        self.n += batch

    def add_dataset(self, name: str, data: np.ndarray) -> None:
        """Store ``data`` (any shape and dtype, not per-frame; e.g. final positions) whole as dataset ``name``."""
        data = np.asarray(data)
        ensure_free_space(self.path, 2 * data.nbytes)
        self._file.create_dataset(name, data=data)

    def _datasets(self) -> list[h5py.Dataset]:
        return [self._positions, *self._extras.values()]

    def close(self) -> None:
        self._file.close()
        self._atomic.__exit__(None, None, None)

    def abort(self) -> None:
        self._file.close()
        self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> "SampleWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def shard_paths(path: str | Path, n_shards: int) -> list[Path]:
    """The shard files of ``path`` written by ``n_shards`` processes: ``<stem>.shards/<rank>-of-<n>.h5``
    beside it, in rank order."""
    path = Path(path)
    folder = path.with_name(f"{path.stem}.shards")
    return [folder / f"{rank:04d}-of-{n_shards:04d}.h5" for rank in range(n_shards)]


def remove_stale_shards(path: str | Path, keep: Iterable[Path] = ()) -> None:
    """Delete the shard files of ``path`` (see :func:`shard_paths`) other than ``keep``: what an
    earlier launch with another number of processes left; the folder too once it is empty."""
    folder = shard_paths(path, 1)[0].parent
    if not folder.is_dir():
        return
    kept = {Path(p).resolve() for p in keep}
    for stale in folder.glob("*-of-*.h5"):
        if stale.resolve() not in kept:
            stale.unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()


def write_virtual_samples(path: str | Path, shards: list[Path]) -> int:
    """Write ``path`` as one file over ``shards`` (files of :class:`SampleWriter` with the same datasets):
    each per-frame dataset an HDF5 virtual dataset of the shards' frames in shard order, the topology
    and the attributes copied from the first shard. ``mdtraj.load`` and ``h5py`` read it as one file,
    with no frame copied; it names the shards by paths relative to its folder, so the two move together.
    Returns the number of frames.
    """
    path = Path(path)
    with h5py.File(shards[0], "r") as first:
        attrs = dict(first.attrs)
        topology = first["topology"][()] if "topology" in first else None
        layout = {name: (first[name].dtype, first[name].shape[1:], dict(first[name].attrs))
                  for name in first if name != "topology"}
    counts = [int(n) for n in read_frame_counts(shards, next(iter(layout)))]
    total = sum(counts)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update(attrs)
        if topology is not None:
            f.create_dataset("topology", data=topology)
        for name, (dtype, tail, dataset_attrs) in layout.items():
            virtual = h5py.VirtualLayout(shape=(total, *tail), dtype=dtype)
            offset = 0
            for shard, n in zip(shards, counts):
                virtual[offset:offset + n] = h5py.VirtualSource(os.path.relpath(shard, path.parent), name,
                                                                shape=(n, *tail), dtype=dtype)
                offset += n
            f.create_virtual_dataset(name, virtual).attrs.update(dataset_attrs)
    return total


def read_frame_counts(paths: Iterable[Path], dataset: str) -> list[int]:
    """The length of ``dataset`` in each of ``paths``; a missing one is a :class:`DataFileError`."""
    counts = []
    for path in paths:
        with _open(path) as f:
            if dataset not in f:
                raise DataFileError(f"{path}: dataset '{dataset}' is missing")
            counts.append(int(f[dataset].shape[0]))
    return counts


def _numpy(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


@contextmanager
def _open(path: str | Path) -> Iterator[h5py.File]:
    """Open a trajectory file for reading; a missing, unreadable or corrupt file is a :class:`DataFileError`."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: file not found")
    try:
        with h5py.File(path, "r") as f:
            yield f
    except OSError as exc:
        raise DataFileError(f"{path}: not a readable HDF5 file ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


def _positions(f: h5py.File, path: Path) -> h5py.Dataset:
    for key in ("coordinates", "positions"):
        if key in f:
            return f[key]
    raise DataFileError(f"{path}: no 'coordinates' or 'positions' dataset; is this a boltzgen or mdtraj HDF5 file?")


def _flat_finite(x: np.ndarray, path: Path, first_frame: int = 0) -> np.ndarray:
    """Frames as ``[n, dim]`` float64; a frame with NaN or inf positions is a :class:`DataFileError`."""
    x = x.astype(np.float64).reshape(x.shape[0], -1)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        first = first_frame + int(np.flatnonzero(bad)[0])
        raise DataFileError(f"{path}: {int(bad.sum())} frame(s) have NaN or inf coordinates (first: frame {first})")
    return x


def _datasets(f: h5py.File, path: Path, names: Iterable[str]) -> dict[str, np.ndarray]:
    out = {}
    for name in names:
        if name not in f:
            raise DataFileError(f"{path}: dataset '{name}' is missing")
        out[name] = f[name][()]
    return out


def read_samples(path: str | Path, datasets: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Read a whole samples, chains or MD file written by :class:`SampleWriter`.

    Returns ``{"x": [n, dim] float64 (nm for molecules), <dataset>: array, ...}`` with the named
    datasets, or every dataset beside the positions and topology when ``datasets`` is ``None``. A
    missing, corrupt or foreign file, or one with NaN positions, raises :class:`DataFileError`.
    """
    path = Path(path)
    with _open(path) as f:
        x = _flat_finite(_positions(f, path)[()], path)
        names = datasets if datasets is not None else [k for k in f if k not in ("coordinates", "positions", "topology")]
        return {"x": x, **_datasets(f, path, names)}


def iter_positions(path: str | Path, chunk_frames: int = 500_000) -> Iterator[np.ndarray]:
    """The frames of a trajectory file in chunks of ``[<= chunk_frames, dim]`` float64, so that
    positions are never all in memory. Bad files and NaN frames raise :class:`DataFileError`."""
    path = Path(path)
    with _open(path) as f:
        data = _positions(f, path)
        for start in range(0, data.shape[0], chunk_frames):
            yield _flat_finite(data[start:start + chunk_frames], path, start)


def read_datasets(path: str | Path, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Per-frame or whole datasets ``names`` of a trajectory file; a missing one is a :class:`DataFileError`."""
    path = Path(path)
    with _open(path) as f:
        return _datasets(f, path, names)


def read_attributes(path: str | Path) -> dict[str, Any]:
    """The root attributes of a trajectory file (run settings such as ``temperature_K``)."""
    with _open(path) as f:
        return dict(f.attrs)


def read_topology(path: str | Path) -> mdtraj.Topology:
    """The mdtraj topology stored in a molecular trajectory file."""
    path = Path(path)
    with _open(path) as f:
        if "topology" not in f:
            raise DataFileError(f"{path}: no topology dataset; a molecular samples file needs one")
        return topology_from_json(f["topology"][0])
