"""OpenMM system builder and energy bridge, checked against direct OpenMM calls."""

from __future__ import annotations

import copy
import functools
import math
import os
import subprocess
import sys
from pathlib import Path

import mdtraj
import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from boltzgen.energies.openmm import (
    MolecularSystem,
    OpenMMEnergy,
    available_forcefields,
    available_platforms,
    build_system,
)
from boltzgen.errors import SystemBuildError

PDB = Path(__file__).resolve().parents[2] / "systems" / "alanine-dipeptide.pdb"
FORCEFIELDS = {
    "amber14_vacuum": ["amber14-all.xml"],
    "amber96_obc": ["amber96.xml", "amber96_obc.xml"],
}
KJ = unit.kilojoule_per_mole


@functools.cache
def cached_system(name: str) -> MolecularSystem:
    """Loading amber14-all.xml takes seconds on 2 cores, so each system is built once per session."""
    return build_system(PDB, FORCEFIELDS[name], temperature_K=300.0)


@pytest.fixture(params=list(FORCEFIELDS))
def molecular_system(request: pytest.FixtureRequest) -> MolecularSystem:
    return cached_system(request.param)


@pytest.fixture
def vacuum_system() -> MolecularSystem:
    return cached_system("amber14_vacuum")


def perturbed(system: MolecularSystem, n: int, scale_nm: float = 0.005, seed: int = 1) -> torch.Tensor:
    """``[n, 3 n_atoms]`` float64 positions near the PDB structure, distinct per row."""
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.as_tensor(system.positions_nm).reshape(1, -1)
    return x0 + scale_nm * torch.randn(n, x0.shape[1], generator=generator, dtype=torch.float64)


def direct_openmm(system: MolecularSystem, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Energies (kJ/mol) and forces (kJ/mol/nm) from a fresh Reference Context, one by one."""
    context = openmm.Context(system.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    energies, forces = [], []
    for row in x.numpy().reshape(x.shape[0], -1, 3):
        context.setPositions(row * unit.nanometer)
        state = context.getState(getEnergy=True, getForces=True)
        energies.append(state.getPotentialEnergy().value_in_unit(KJ))
        forces.append(state.getForces(asNumpy=True).value_in_unit(KJ / unit.nanometer))
    return np.array(energies), np.array(forces).reshape(x.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# The PDB file


def test_pdb_is_l_alanine_dipeptide_in_c7eq() -> None:
    pdb = app.PDBFile(str(PDB))
    assert pdb.topology.getNumAtoms() == 22
    assert [r.name for r in pdb.topology.residues()] == ["ACE", "ALA", "NME"]
    traj = mdtraj.load(str(PDB))
    phi = math.degrees(float(mdtraj.compute_phi(traj)[1][0, 0]))
    psi = math.degrees(float(mdtraj.compute_psi(traj)[1][0, 0]))
    assert -110.0 < phi < -50.0 and 20.0 < psi < 110.0, (phi, psi)
    x = traj.xyz[0].astype(np.float64)
    index = {a.name: a.index for a in traj.topology.residue(1).atoms}
    ca = x[index["CA"]]
    # Positive for L residues (same sign as every residue of OpenMM's test.pdb).
    volume = np.dot(x[index["N"]] - ca, np.cross(x[index["C"]] - ca, x[index["CB"]] - ca))
    assert volume > 0


@pytest.mark.parametrize("name", list(FORCEFIELDS))
def test_build_system_unconstrained_no_cutoff(name: str) -> None:
    ms = cached_system(name)
    assert ms.system.getNumParticles() == 22 and ms.system.getNumConstraints() == 0
    assert ms.positions_nm.shape == (22, 3) and ms.positions_nm.dtype == np.float64
    assert ms.mdtraj_topology.n_atoms == 22
    forces = [f.__class__.__name__ for f in ms.system.getForces()]
    assert "CMMotionRemover" not in forces
    assert "HarmonicBondForce" in forces
    for force in ms.system.getForces():
        if isinstance(force, openmm.NonbondedForce):
            assert force.getNonbondedMethod() == openmm.NonbondedForce.NoCutoff
    assert ms.kT_kJ_per_mol == pytest.approx(8.314462618e-3 * 300.0, rel=1e-8)
    with pytest.raises(AttributeError):
        ms.temperature_K = 310.0  # frozen


def test_available_forcefields_lists_openmm_xmls() -> None:
    names = available_forcefields()
    for expected in ("amber14-all.xml", "amber96.xml", "amber96_obc.xml", "implicit/obc2.xml"):
        assert expected in names
    assert "hydrogens.xml" not in names and "pdbNames.xml" not in names


# ---------------------------------------------------------------------------------------------
# Energies and forces


def test_energy_matches_direct_openmm(molecular_system: MolecularSystem) -> None:
    x = perturbed(molecular_system, 6)
    energy = OpenMMEnergy(molecular_system, platform="Reference")
    u = energy(x)
    assert u.shape == (6,) and u.dtype == torch.float64
    reference, _ = direct_openmm(molecular_system, x)
    np.testing.assert_allclose(u.numpy() * molecular_system.kT_kJ_per_mol, reference, rtol=1e-6, atol=1e-8)
    # The batch differs row by row, so this cannot pass by repeating one value.
    assert np.ptp(reference) > 1.0
    assert energy.evaluations == 6 and energy.n_nonfinite == 0


def test_force_is_minus_grad_and_matches_openmm(molecular_system: MolecularSystem) -> None:
    x = perturbed(molecular_system, 4, seed=2)
    energy = OpenMMEnergy(molecular_system, platform="Reference")
    force = energy.force(x)
    _, reference = direct_openmm(molecular_system, x)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(force.numpy() * molecular_system.kT_kJ_per_mol, reference, rtol=1e-6, atol=1e-8 * scale)

    # Backward honours upstream weights per sample and reaches x through other operations.
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    x_leaf = (x / 2).requires_grad_(True)
    (weights * energy(2 * x_leaf)).sum().backward()
    np.testing.assert_allclose(x_leaf.grad.numpy(), -2 * weights[:, None].numpy() * force.numpy(), rtol=1e-10)


def test_force_against_finite_differences(molecular_system: MolecularSystem) -> None:
    energy = OpenMMEnergy(molecular_system, platform="Reference")
    x = perturbed(molecular_system, 3, seed=3)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    direction /= direction.norm(dim=1, keepdim=True)
    h = 1e-5  # nm
    slope = (energy(x + h * direction) - energy(x - h * direction)) / (2 * h)
    predicted = -(energy.force(x) * direction).sum(dim=1)
    np.testing.assert_allclose(slope.numpy(), predicted.numpy(), rtol=1e-5, atol=1e-3)
    assert predicted.abs().min() > 1.0  # a non-trivial slope, so the check has teeth


def test_without_grad_no_forces_are_needed(vacuum_system: MolecularSystem) -> None:
    energy = OpenMMEnergy(vacuum_system, platform="Reference")
    x = perturbed(vacuum_system, 2)
    with torch.no_grad():
        u = energy(x.requires_grad_(True))
    assert not u.requires_grad


def test_nan_input_gives_nonfinite_and_is_counted(vacuum_system: MolecularSystem) -> None:
    energy = OpenMMEnergy(vacuum_system, platform="Reference")
    x = perturbed(vacuum_system, 3)
    clean = energy(x)
    bad = x.clone()
    bad[1, 7] = float("nan")
    u = energy(bad)
    assert not torch.isfinite(u[1])
    # Neighbours keep their own values: the failure neither leaks nor reuses the previous sample.
    assert u[0] == clean[0] and u[2] == clean[2]
    assert energy.n_nonfinite == 1
    force = energy.force(bad)
    assert torch.isnan(force[1]).all() and torch.isfinite(force[[0, 2]]).all()
    assert energy.n_nonfinite == 2


def test_masked_nonfinite_sample_does_not_poison_gradients(vacuum_system: MolecularSystem) -> None:
    energy = OpenMMEnergy(vacuum_system, platform="Reference")
    x = perturbed(vacuum_system, 3)
    x[1, 0] = float("nan")
    x.requires_grad_(True)
    u = energy(x)
    loss = torch.where(torch.isfinite(u), u, torch.zeros_like(u)).sum()
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))
    np.testing.assert_allclose(grad[[0, 2]].numpy(), -energy.force(x.detach()[[0, 2]]).numpy(), rtol=1e-12)
    # Unmasked, the NaN stays visible rather than being zeroed.
    (grad,) = torch.autograd.grad(energy(x).sum(), x)
    assert torch.isnan(grad[1]).all()


def test_auto_platform_picks_the_fastest_timed(vacuum_system: MolecularSystem) -> None:
    energy = OpenMMEnergy(vacuum_system, platform="auto", auto_evaluations=20)
    assert set(energy.platform_timings_s) == set(available_platforms())
    assert energy.platform_name == min(energy.platform_timings_s, key=energy.platform_timings_s.get)
    assert torch.isfinite(energy(perturbed(vacuum_system, 2))).all()
    with pytest.raises(ValueError, match="Reference"):
        OpenMMEnergy(vacuum_system, platform="NoSuchPlatform")


def test_copy_rebuilds_context(vacuum_system: MolecularSystem) -> None:
    energy = OpenMMEnergy(vacuum_system, platform="Reference")
    x = perturbed(vacuum_system, 2)
    u = energy(x)
    assert torch.equal(copy.deepcopy(energy)(x), u)


# ---------------------------------------------------------------------------------------------
# Worker processes


def worker_processes(energy: OpenMMEnergy) -> list[subprocess.Popen]:
    """The live worker processes of ``energy`` (empty when in-process or closed)."""
    return list(energy._pool.processes) if energy._pool is not None else []


def test_worker_pool_matches_in_process_and_closes() -> None:
    molecular_system = cached_system("amber96_obc")
    x = perturbed(molecular_system, 5, seed=5)  # odd size: chunks of unequal length
    x[3, 0] = float("nan")
    local = OpenMMEnergy(molecular_system, platform="Reference")
    u_local, f_local = local(x), local.force(x)
    with OpenMMEnergy(molecular_system, platform="Reference", n_workers=2) as pooled:
        u_pool = pooled(x)
        f_pool = pooled.force(x)
        processes = worker_processes(pooled)
        assert len(processes) == 2 and all(p.poll() is None for p in processes)
        assert pooled.n_nonfinite == 2
        pooled.close()
        assert all(p.poll() is not None for p in processes) and worker_processes(pooled) == []
        # A closed energy starts fresh workers on demand, and the context manager stops them.
        assert torch.equal(pooled(x[:2]), u_local[:2])
        processes = worker_processes(pooled)
    assert all(p.returncode == 0 for p in processes)  # they left on request, not by terminate()
    finite = torch.isfinite(u_local)
    assert torch.equal(finite, torch.isfinite(u_pool))
    assert torch.equal(u_pool[finite], u_local[finite])
    assert torch.equal(f_pool[finite], f_local[finite])


class _InterruptingConnection:
    """Stands in for a worker's connection and raises KeyboardInterrupt while awaiting a reply."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def send(self, obj) -> None:
        self.conn.send(obj)

    def recv(self):
        raise KeyboardInterrupt

    def close(self) -> None:
        self.conn.close()


def test_interrupt_during_evaluation_discards_the_pool(vacuum_system: MolecularSystem) -> None:
    x = perturbed(vacuum_system, 4)
    with OpenMMEnergy(vacuum_system, platform="Reference", n_workers=2) as energy:
        expected = energy(x)
        processes = worker_processes(energy)
        energy._pool.connections[0] = _InterruptingConnection(energy._pool.connections[0])
        with pytest.raises(KeyboardInterrupt):
            energy(x)
        # No worker survives to deliver a stale reply to the next request.
        assert all(p.poll() is not None for p in processes)
        assert torch.equal(energy(x), expected)


@pytest.mark.slow
def test_unclosed_pool_does_not_hang_interpreter_exit(tmp_path: Path) -> None:
    script = tmp_path / "leave_open.py"
    script.write_text(
        "import sys, torch\n"
        "from boltzgen.energies.openmm import OpenMMEnergy, build_system\n"
        f"ms = build_system({str(PDB)!r}, ['amber96.xml', 'amber96_obc.xml'], 300.0)\n"
        "e = OpenMMEnergy(ms, platform='Reference', n_workers=2)\n"
        "e(torch.as_tensor(ms.positions_nm).reshape(1, -1).repeat(3, 1))\n"
        "print(*(p.pid for p in e._pool.processes))\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    for pid in map(int, done.stdout.split()):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# ---------------------------------------------------------------------------------------------
# Build errors: one line, naming the place


def assert_one_line(error: pytest.ExceptionInfo[SystemBuildError], *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_missing_pdb(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pdb"
    with pytest.raises(SystemBuildError) as error:
        build_system(missing, ["amber14-all.xml"], 300.0)
    assert_one_line(error, str(missing))


def test_unknown_forcefield_lists_alternatives() -> None:
    with pytest.raises(SystemBuildError) as error:
        build_system(PDB, ["amber96.xml", "amber96_obc9.xml"], 300.0)
    assert_one_line(error, "amber96_obc9.xml", "amber96_obc.xml", "implicit/obc2.xml", "amber14-all.xml")


def _write_variant(tmp_path: Path, name: str, edit) -> Path:
    lines = PDB.read_text().splitlines(keepends=True)
    path = tmp_path / name
    path.write_text("".join(edit(lines)))
    return path


def test_renamed_residue_is_named_with_file(tmp_path: Path) -> None:
    path = _write_variant(tmp_path, "renamed.pdb", lambda lines: [l.replace(" ALA A", " ALX A") for l in lines])
    with pytest.raises(SystemBuildError) as error:
        build_system(path, ["amber14-all.xml"], 300.0)
    assert_one_line(error, "ALX 2", str(path))
    assert "https://" not in str(error.value)


def test_missing_hydrogen_is_named_with_file(tmp_path: Path) -> None:
    path = _write_variant(tmp_path, "no_ha.pdb", lambda lines: [l for l in lines if " HA  ALA" not in l])
    with pytest.raises(SystemBuildError) as error:
        build_system(path, ["amber96.xml", "amber96_obc.xml"], 300.0)
    assert_one_line(error, "ALA 2", str(path), "missing 1 H atom")


def test_nan_coordinate_is_named_with_file(tmp_path: Path) -> None:
    def edit(lines: list[str]) -> list[str]:
        out = []
        for line in lines:
            if line.startswith(("ATOM", "HETATM")) and line[12:16].strip() == "CB":
                line = line[:38] + "     nan" + line[46:]  # the y field, columns 39-46
            out.append(line)
        return out

    path = _write_variant(tmp_path, "nan.pdb", edit)
    with pytest.raises(SystemBuildError) as error:
        build_system(path, ["amber14-all.xml"], 300.0)
    assert_one_line(error, str(path), "CB", "ALA")
