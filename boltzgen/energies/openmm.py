"""OpenMM systems and the OpenMM-to-torch energy bridge.

:func:`build_system` turns a PDB file and a list of OpenMM force-field XML files into a
:class:`MolecularSystem` (vacuum or implicit solvent, no cutoff, no constraints, so that every
degree of freedom a flow generates carries energy). :class:`OpenMMEnergy` evaluates its reduced
energy ``u = U/kT`` for a batch of flattened positions in nm, with forces returned to autograd.

This is the one place where units are converted: positions are nm, OpenMM energies kJ/mol and
forces kJ/mol/nm; everything leaving this module is in kT (energies) and kT/nm (gradients).
"""

from __future__ import annotations

import inspect
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, ClassVar

import mdtraj
import numpy as np
import openmm
import torch
from openmm import app, unit
from torch import Tensor

from boltzgen.energies.base import Energy
from boltzgen.errors import SystemBuildError
from boltzgen.units import kT_kJ_per_mol

__all__ = [
    "MolecularSystem",
    "OpenMMEnergy",
    "available_forcefields",
    "available_platforms",
    "build_system",
    "minimize_positions",
]

_FF_DATA_DIR = Path(app.__file__).parent / "data"
# XML files in the data folder that are not force fields (naming rules, hydrogen definitions).
_NOT_FORCEFIELDS = {"hydrogens.xml", "glycam-hydrogens.xml", "pdbNames.xml", "residues.xml"}
_PLATFORM_ORDER = ("Reference", "CPU", "CUDA", "OpenCL")
_KJ_PER_MOL = unit.kilojoule_per_mole


def available_forcefields() -> list[str]:
    """Force-field XML names OpenMM ships (``amber14-all.xml``, ``implicit/obc2.xml``, ...), sorted.

    Only the top level of ``openmm/app/data`` and its ``implicit/`` folder are listed; files in the
    other subfolders (``amber14/tip3p.xml``, ...) are accepted by :func:`build_system` as well.
    """
    names = [p.name for p in _FF_DATA_DIR.glob("*.xml") if p.name not in _NOT_FORCEFIELDS]
    names += [f"implicit/{p.name}" for p in (_FF_DATA_DIR / "implicit").glob("*.xml")]
    return sorted(names)


def available_platforms() -> list[str]:
    """Names of the OpenMM platforms this installation can load, in order of preference."""
    present = {openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())}
    return [name for name in _PLATFORM_ORDER if name in present]


@dataclass(frozen=True, eq=False)
class MolecularSystem:
    """An OpenMM system ready to evaluate.

    ``positions_nm``: ``[n_atoms, 3]`` float64 starting coordinates in nm (from the PDB).
    ``kT_kJ_per_mol``: ``k_B T`` in kJ/mol, the unit of reduced energies.
    """

    topology: app.Topology
    system: openmm.System
    positions_nm: np.ndarray
    temperature_K: float
    kT_kJ_per_mol: float
    mdtraj_topology: mdtraj.Topology

    @property
    def n_atoms(self) -> int:
        return int(self.positions_nm.shape[0])


def build_system(pdb: Path | str, forcefield: Sequence[str] | str, temperature_K: float) -> MolecularSystem:
    """Parametrize the molecule in ``pdb`` with the OpenMM force-field XML files ``forcefield``.

    Implicit solvent is chosen by listing its XML, e.g. ``["amber96.xml", "amber96_obc.xml"]`` or
    ``["amber14-all.xml", "implicit/obc2.xml"]``. The system has no cutoff, no constraints, flexible
    water and no centre-of-mass motion remover. Raises :class:`SystemBuildError` (one line) for a
    missing or unreadable PDB, NaN coordinates, an unknown XML file or a residue without template.
    """
    pdb = Path(pdb)
    if isinstance(forcefield, str):
        forcefield = [forcefield]
    forcefield = list(forcefield)
    if not forcefield:
        raise SystemBuildError(f"no force-field XML given for {pdb}")
    if not (math.isfinite(temperature_K) and temperature_K > 0):
        raise SystemBuildError(f"temperature_K must be a positive number, got {temperature_K!r} (system {pdb})")
    if not pdb.is_file():
        raise SystemBuildError(f"PDB file not found: {pdb}")

    text = Path(pdb).read_bytes()
    if not text.strip():
        raise SystemBuildError(f"system.pdb: {pdb} is empty; give a PDB file with the molecule's atoms")
    try:
        text.decode("ascii")
    except UnicodeDecodeError as exc:
        raise SystemBuildError(f"system.pdb: {pdb} is not a text PDB file (binary byte at {exc.start})") from None
    try:
        pdb_file = app.PDBFile(str(pdb))
    except Exception as exc:  # OpenMM's parser raises assorted types for malformed files
        raise SystemBuildError(f"system.pdb: cannot read {pdb} as a PDB file: {_one_line(exc)}") from exc
    positions = np.asarray(pdb_file.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)
    topology = pdb_file.topology
    if positions.shape[0] == 0:
        raise SystemBuildError(f"PDB file has no atoms: {pdb}")
    bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if bad.size:
        atom = list(topology.atoms())[int(bad[0])]
        raise SystemBuildError(
            f"non-finite coordinates in {pdb} for {bad.size} atom(s), first: atom {atom.name} "
            f"(serial {atom.id}) in residue {atom.residue.name} {atom.residue.id}"
        )

    ff = _load_forcefield(forcefield, pdb)
    try:
        system = ff.createSystem(
            topology, nonbondedMethod=app.NoCutoff, constraints=None, rigidWater=False, removeCMMotion=False
        )
    except ValueError as exc:
        raise SystemBuildError(_template_message(exc, topology, forcefield, pdb)) from exc
    except Exception as exc:
        raise SystemBuildError(f"cannot parametrize {pdb} with {forcefield}: {_one_line(exc)}") from exc

    return MolecularSystem(
        topology=topology,
        system=system,
        positions_nm=positions,
        temperature_K=float(temperature_K),
        kT_kJ_per_mol=kT_kJ_per_mol(temperature_K),
        mdtraj_topology=mdtraj.Topology.from_openmm(topology),
    )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _load_forcefield(files: list[str], pdb: Path) -> app.ForceField:
    for name in files:
        if Path(name).is_file():
            continue
        try:
            app.ForceField(name)
        except ValueError as exc:
            if "Could not locate file" in str(exc):
                raise SystemBuildError(
                    f"unknown force-field file {name!r} (for {pdb}); OpenMM ships: {', '.join(available_forcefields())}"
                ) from exc
            raise SystemBuildError(f"cannot load force-field file {name!r} (for {pdb}): {_one_line(exc)}") from exc
    try:
        return app.ForceField(*files)
    except Exception as exc:  # e.g. two files defining the same atom types
        raise SystemBuildError(f"cannot combine force-field files {files} (for {pdb}): {_one_line(exc)}") from exc


def _template_message(exc: ValueError, topology: app.Topology, forcefield: list[str], pdb: Path) -> str:
    text = _one_line(exc)
    text = re.sub(r"\s*For more information, see \S+", "", text)
    residue = None
    match = re.search(r"No template found for residue (\d+) \((\S+)\)\.\s*(.*)", text)
    if match:
        index = int(match.group(1))
        residue = next((r for r in topology.residues() if r.index == index), None)
        reason = match.group(3)
    else:
        match = re.search(r"No template found for .*?residue index within topology (\d+)\)\.\s*(.*)", text)
        if match:
            index = int(match.group(1))
            residue = next((r for r in topology.residues() if r.index == index), None)
            reason = match.group(2)
    if residue is None:
        return f"cannot parametrize {pdb} with {forcefield}: {text}"
    return (
        f"no template in {forcefield} for residue {residue.name} {residue.id} (chain {residue.chain.id}, "
        f"index {residue.index}) of {pdb}: {reason.strip() or 'no matching template'}"
    )


# ---------------------------------------------------------------------------------------------
# Evaluation: shared by the in-process path and the worker processes.


def _make_context(system: openmm.System, platform_name: str, properties: Mapping[str, str]) -> openmm.Context:
    platform = openmm.Platform.getPlatformByName(platform_name)
    # The integrator is never stepped; a Context needs one.
    return openmm.Context(system, openmm.VerletIntegrator(0.001), platform, dict(properties))


def _evaluate(context: openmm.Context, positions_nm: np.ndarray, need_forces: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Energies (kJ/mol, ``[batch]``) and optionally forces (kJ/mol/nm, ``[batch, n_atoms, 3]``).

    A configuration that is not finite, or that OpenMM refuses, gets NaN energy and NaN forces, so
    that it can never inherit the previous configuration's values.
    """
    batch = positions_nm.shape[0]
    energies = np.full(batch, np.nan)
    forces = np.full(positions_nm.shape, np.nan) if need_forces else None
    finite = np.isfinite(positions_nm).reshape(batch, -1).all(axis=1)
    for i in range(batch):
        if not finite[i]:
            continue
        try:
            context.setPositions(positions_nm[i])
            state = context.getState(getEnergy=True, getForces=need_forces)
        except openmm.OpenMMException:
            continue
        energies[i] = state.getPotentialEnergy().value_in_unit(_KJ_PER_MOL)
        if forces is not None:
            _copy_forces(state, forces[i])
    return energies, forces


def _copy_forces(state: openmm.State, out: np.ndarray) -> None:
    """Write the state's forces (kJ/mol/nm, ``[n_atoms, 3]``) into ``out``."""
    # State.getForces(asNumpy=True) calls dir(self) and builds a Quantity on every call, which cut the
    # loop from ~15k to ~4k evaluations/s here; the wrapper's own fill routine skips both.
    fill = getattr(state, "_getVectorAsNumpy", None)
    if fill is not None:
        fill(openmm.State.Forces, out)
    else:
        out[...] = state.getForces(asNumpy=True).value_in_unit(_KJ_PER_MOL / unit.nanometer)


def _time_platform(system: openmm.System, name: str, positions_nm: np.ndarray, n_evaluations: int) -> float:
    """Seconds per energy+force evaluation on platform ``name`` (inf if it cannot run the system)."""
    try:
        context = _make_context(system, name, {})
        batch = np.repeat(positions_nm[None], n_evaluations, axis=0)
        _evaluate(context, batch[:5], True)  # kernels compile lazily on the GPU platforms
        start = time.perf_counter()
        _evaluate(context, batch, True)
        return (time.perf_counter() - start) / n_evaluations
    except Exception:  # a platform that is listed but cannot run here (no driver, no device)
        return math.inf
    finally:
        context = None


def _worker_main(conn: Any) -> None:
    """Worker loop: receive ``(system_xml, platform_name, properties)``, build an own Context, then
    answer ``(positions, need_forces)`` requests with ``("ok", (energies, forces))``.

    Exits on a ``None`` request or when the parent's end of the socket closes (parent gone).
    """
    # The parent alone decides how to shut workers down, also on Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        system_xml, platform_name, properties = conn.recv()
        context = _make_context(openmm.XmlSerializer.deserialize(system_xml), platform_name, properties)
    except (EOFError, OSError):
        return
    except Exception as exc:
        conn.send(("error", _one_line(exc)))
        return
    conn.send(("ready", None))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        positions, need_forces = request
        try:
            conn.send(("ok", _evaluate(context, positions, need_forces)))
        except Exception as exc:
            conn.send(("error", _one_line(exc)))


def _worker_source() -> str:
    """A stand-alone script (numpy and openmm only) that runs :func:`_worker_main` on the socket
    whose file descriptor is its first argument."""
    header = (
        "from __future__ import annotations\n"
        "import signal\nimport sys\nfrom collections.abc import Mapping\nfrom typing import Any\n"
        "from multiprocessing.connection import Connection\n"
        "import numpy as np\nimport openmm\nfrom openmm import unit\n"
        "_KJ_PER_MOL = unit.kilojoule_per_mole\n"
    )
    functions = [inspect.getsource(f) for f in (_one_line, _make_context, _evaluate, _copy_forces, _worker_main)]
    return "\n\n".join([header, *functions, "_worker_main(Connection(int(sys.argv[1])))\n"])


class _WorkerPool:
    """``n`` worker processes, each holding its own OpenMM Context; closed deterministically.

    Workers are fresh interpreters (``python -c``) talking over a socket pair, not
    ``multiprocessing`` spawn/forkserver children: those re-import the parent's ``__main__`` (for the
    CLI, torch and all of boltzgen) in every worker, which measured 13-22 s per pool start on 2 cores
    against about 1 s here. Like spawn, nothing is inherited from the parent but the socket.
    """

    def __init__(self, system: openmm.System, n: int, platform_name: str, properties: dict[str, str],
                 start_timeout_s: float = 120.0) -> None:
        if os.name != "posix":
            raise NotImplementedError("n_workers > 1 needs a POSIX system (file-descriptor passing)")
        init = (openmm.XmlSerializer.serialize(system), platform_name, properties)
        source = _worker_source()
        self.processes: list[subprocess.Popen] = []
        self.connections: list[Connection] = []
        # The finalizer holds only the lists, not self, so it can run at exit or on garbage collection.
        self._finalizer = weakref.finalize(self, _shutdown, self.processes, self.connections)
        try:
            for _ in range(n):
                parent_sock, child_sock = socket.socketpair()
                with child_sock:
                    fd = child_sock.fileno()
                    # A new session keeps a terminal's Ctrl-C away from the workers.
                    process = subprocess.Popen([sys.executable, "-c", source, str(fd)], pass_fds=(fd,),
                                               stdin=subprocess.DEVNULL, start_new_session=True)
                self.processes.append(process)
                self.connections.append(Connection(parent_sock.detach()))
            for conn in self.connections:
                conn.send(init)
            for conn in self.connections:
                if not conn.poll(start_timeout_s):
                    raise RuntimeError(f"an OpenMM worker did not start within {start_timeout_s} s")
                try:
                    status, message = conn.recv()
                except EOFError:
                    raise RuntimeError("an OpenMM worker exited during start-up (see its stderr above)") from None
                if status != "ready":
                    raise RuntimeError(f"an OpenMM worker failed to create its Context: {message}")
        except BaseException:
            _terminate(self.processes)
            self.close()
            raise

    def evaluate(self, positions_nm: np.ndarray, need_forces: bool) -> tuple[np.ndarray, np.ndarray | None]:
        chunks = [c for c in np.array_split(positions_nm, len(self.connections)) if c.shape[0] > 0]
        try:
            for conn, chunk in zip(self.connections, chunks):
                conn.send((chunk, need_forces))
            results = []
            for conn in self.connections[: len(chunks)]:
                try:
                    status, payload = conn.recv()
                except EOFError:
                    raise RuntimeError("an OpenMM worker died during an evaluation") from None
                if status != "ok":
                    raise RuntimeError(f"an OpenMM worker failed: {payload}")
                results.append(payload)
        except BaseException:
            # Replies still in flight would be read as answers to the next request: discard the pool,
            # without waiting for workers that may be busy with a chunk.
            _terminate(self.processes)
            self.close()
            raise
        energies = np.concatenate([r[0] for r in results])
        forces = np.concatenate([r[1] for r in results]) if need_forces else None
        return energies, forces

    def close(self) -> None:
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive


def _terminate(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()


def _shutdown(processes: list[subprocess.Popen], connections: list[Connection], timeout_s: float = 5.0) -> None:
    """Ask each worker to stop, wait up to ``timeout_s`` in all, then terminate and kill stragglers."""
    for conn in connections:
        try:
            conn.send(None)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(max(0.01, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(1.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    for conn in connections:
        conn.close()
    processes.clear()
    connections.clear()


# ---------------------------------------------------------------------------------------------
# The torch bridge.


class _OpenMMFunction(torch.autograd.Function):
    """u(x) with du/dx = -F/kT from OpenMM; ``x`` is ``[batch, 3 n_atoms]`` float64 nm."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, energy: OpenMMEnergy, need_forces: bool) -> Tensor:
        u, grad = energy._evaluate_reduced(x, need_forces)
        ctx.save_for_backward(grad if grad is not None else x.new_zeros(0))
        ctx.has_grad = grad is not None
        return u

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_u: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.has_grad:
            raise RuntimeError("OpenMMEnergy was evaluated without forces; call it on x that requires grad")
        (grad,) = ctx.saved_tensors
        grad_u = grad_u[:, None]
        # A sample masked out downstream (zero upstream gradient, e.g. torch.where on a NaN energy)
        # must not send 0 * NaN = NaN into the parameters.
        return torch.where(grad_u == 0, torch.zeros_like(grad), grad_u * grad), None, None


class OpenMMEnergy(Energy):
    """Reduced energy ``u(x) = U(x)/kT`` of a :class:`MolecularSystem`, evaluated by OpenMM.

    ``x``: ``[batch, 3 n_atoms]`` flattened positions in nm; result ``[batch]`` float64 in kT,
    differentiable (gradient ``-F/kT`` in 1/nm, from OpenMM's forces). Forces are only computed when
    ``x`` requires grad. With ``n_workers > 1`` the batch is split over worker processes (fresh
    interpreters), each with its own Context; :meth:`close` (or ``with``) stops them, and a later call starts them
    again. Non-finite inputs and configurations OpenMM refuses give NaN; OpenMM's own inf/NaN energies
    pass through; each such sample adds one to :attr:`n_nonfinite`.

    ``platform``: an OpenMM platform name, or ``"auto"`` to time each available platform on the
    starting structure and keep the fastest (:attr:`platform_name`, :attr:`platform_timings_s`).
    """

    _runtime_attributes: ClassVar[dict[str, Callable[[], Any]]] = {"_context": lambda: None, "_pool": lambda: None}

    def __init__(self, system: MolecularSystem, platform: str = "auto", n_workers: int = 1,
                 platform_properties: Mapping[str, str] | None = None, auto_evaluations: int = 200) -> None:
        super().__init__(3 * system.n_atoms)
        if n_workers < 1:
            raise ValueError(f"n_workers must be >= 1, got {n_workers}")
        self.molecular_system = system
        self.kT_kJ_per_mol = system.kT_kJ_per_mol
        self.n_workers = int(n_workers)
        self.n_nonfinite = 0
        self.platform_properties = dict(platform_properties or {})
        available = available_platforms()
        self.platform_timings_s: dict[str, float] = {}
        if platform == "auto":
            self.platform_timings_s = {
                name: _time_platform(system.system, name, system.positions_nm, auto_evaluations) for name in available
            }
            self.platform_name = min(self.platform_timings_s, key=self.platform_timings_s.__getitem__)
        elif platform in available:
            self.platform_name = platform
        else:
            raise ValueError(f"unknown OpenMM platform {platform!r}; available here: {', '.join(available)} or 'auto'")
        self._context: openmm.Context | None = None
        self._pool: _WorkerPool | None = None

    def reduced_energy(self, x: Tensor) -> Tensor:
        need_forces = torch.is_grad_enabled() and x.requires_grad
        u = _OpenMMFunction.apply(x, self, need_forces)
        return u

    def _evaluate_reduced(self, x: Tensor, need_forces: bool) -> tuple[Tensor, Tensor | None]:
        positions = x.detach().to("cpu", torch.float64).numpy().reshape(x.shape[0], -1, 3)
        if self.n_workers > 1:
            if self._pool is None or self._pool.closed:
                self._pool = _WorkerPool(self.molecular_system.system, self.n_workers, self.platform_name,
                                         self._worker_properties())
            energies, forces = self._pool.evaluate(positions, need_forces)
        else:
            if self._context is None:
                self._context = _make_context(self.molecular_system.system, self.platform_name, self.platform_properties)
            energies, forces = _evaluate(self._context, positions, need_forces)
        u = energies / self.kT_kJ_per_mol
        self.n_nonfinite += int(np.count_nonzero(~np.isfinite(u)))
        u_t = torch.from_numpy(u).to(device=x.device)
        grad_t = None
        if forces is not None:
            grad_t = torch.from_numpy(-forces.reshape(x.shape[0], -1) / self.kT_kJ_per_mol).to(device=x.device)
        return u_t, grad_t

    def _worker_properties(self) -> dict[str, str]:
        properties = dict(self.platform_properties)
        if self.platform_name == "CPU":
            # Workers already use the cores; extra threads per worker only contend.
            properties.setdefault("Threads", "1")
        return properties

    def close(self) -> None:
        """Stop the worker processes and free the Context; the next evaluation recreates them."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self._context = None

    def __enter__(self) -> OpenMMEnergy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def extra_repr(self) -> str:
        return (f"n_atoms={self.molecular_system.n_atoms}, T={self.molecular_system.temperature_K} K, "
                f"platform={self.platform_name}, n_workers={self.n_workers}")


def minimize_positions(molecule: MolecularSystem, positions_nm: np.ndarray, max_iterations: int = 500) -> np.ndarray:
    """Local energy minimization on the Reference platform: ``[n_atoms, 3]`` nm in, the same out.

    Used to relax a frame taken from hot MD before it seeds MD at a lower temperature.
    """
    integrator = openmm.VerletIntegrator(0.001)
    context = openmm.Context(molecule.system, integrator, openmm.Platform.getPlatformByName("Reference"))
    try:
        context.setPositions(np.asarray(positions_nm, dtype=np.float64) * unit.nanometer)
        openmm.LocalEnergyMinimizer.minimize(context, 1.0, max_iterations)
        state = context.getState(getPositions=True)
        return np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)
    finally:
        del context, integrator
