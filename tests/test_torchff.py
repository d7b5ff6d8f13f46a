"""TorchForceField against OpenMM's Reference platform (float64 parity), plus chunking, dtype, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import openmm
import pytest
import torch
from conftest import skip_without_kernel
from openmm import app, unit

from boltzgen.energies.torchff import (
    ENERGY_ABS_TOL_KJ,
    ENERGY_REL_TOL,
    FORCE_ABS_TOL_KJ_NM,
    ParityReport,
    TorchForceField,
    compare_with_openmm,
    openmm_energies_forces,
)

ROOT = Path(__file__).resolve().parents[1]
ALANINE_PDB = ROOT / "systems" / "alanine-dipeptide.pdb"
PROTEIN_PDB = Path(app.__file__).parent / "data" / "test.pdb"
TEMPERATURE_K = 300.0


def _make(pdb: app.PDBFile | app.Modeller, forcefield: list[str]) -> tuple[openmm.System, np.ndarray]:
    system = app.ForceField(*forcefield).createSystem(
        pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None, rigidWater=False
    )
    positions = np.asarray(pdb.positions.value_in_unit(unit.nanometer), dtype=np.float64)
    return system, positions


@pytest.fixture(scope="module")
def alanine_pdb() -> app.PDBFile:
    if not ALANINE_PDB.exists():
        pytest.skip("systems/alanine-dipeptide.pdb not present")
    return app.PDBFile(str(ALANINE_PDB))


@pytest.fixture(scope="module")
def protein() -> app.Modeller:
    """The peptide of OpenMM's bundled test.pdb (35 residues, 582 atoms): water and Cl- ions stripped."""
    pdb = app.PDBFile(str(PROTEIN_PDB))
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.deleteWater()
    modeller.delete([r for r in modeller.topology.residues() if r.name == "Cl"])
    assert modeller.topology.getNumAtoms() == 582
    return modeller


SYSTEMS = {
    "alanine-amber14-vacuum": ("alanine", ["amber14-all.xml"]),
    "alanine-amber96-obc": ("alanine", ["amber96.xml", "amber96_obc.xml"]),
    "protein-amber14-vacuum": ("protein", ["amber14-all.xml"]),
    "protein-amber99sb-obc": ("protein", ["amber99sb.xml", "amber99_obc.xml"]),
}


@pytest.fixture(scope="module", params=list(SYSTEMS))
def system_case(request: pytest.FixtureRequest) -> tuple[str, openmm.System, np.ndarray]:
    molecule, forcefield = SYSTEMS[request.param]
    pdb = request.getfixturevalue("alanine_pdb" if molecule == "alanine" else "protein")
    system, positions = _make(pdb, forcefield)
    return request.param, system, positions


@pytest.fixture(params=[False, True], ids=["eager", "kernel"])
def native(request: pytest.FixtureRequest) -> bool:
    """Both CPU paths: eager torch, and the fused C kernel (skipped, with the reason, where it cannot build)."""
    if request.param:
        skip_without_kernel()
    return request.param


def _assert_parity(report: ParityReport) -> None:
    assert report.passed, report
    assert report.max_rel_energy <= ENERGY_REL_TOL or report.max_abs_energy_kJ <= ENERGY_ABS_TOL_KJ
    assert report.max_abs_force_kJ_nm <= FORCE_ABS_TOL_KJ_NM


@pytest.mark.parametrize("noise_nm", [0.01, 0.05])
def test_parity_with_openmm(system_case: tuple[str, openmm.System, np.ndarray], noise_nm: float, native: bool) -> None:
    name, system, positions = system_case
    n = 6 if name.startswith("alanine") else 2
    report = compare_with_openmm(system, positions, TEMPERATURE_K, n=n, noise_nm=noise_nm, seed=1, native=native)
    _assert_parity(report)


def test_per_force_parity(system_case: tuple[str, openmm.System, np.ndarray], native: bool) -> None:
    """Each force on its own group, so a failure names the term at fault."""
    _, system, positions = system_case
    system = openmm.XmlSerializer.clone(system)
    groups = {}
    for g, force in enumerate(system.getForces()):
        force.setForceGroup(g)
        groups[type(force).__name__] = g
    names = {
        "bonds": "HarmonicBondForce",
        "angles": "HarmonicAngleForce",
        "torsions": "PeriodicTorsionForce",
        "nonbonded": "NonbondedForce",
        "gbsa_obc": "GBSAOBCForce",
    }
    rng = np.random.default_rng(3)
    frame = positions + 0.02 * rng.standard_normal(positions.shape)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(frame)
    ff = TorchForceField(system, TEMPERATURE_K, native=native)
    assert ff.uses_native_kernel() == native
    terms = ff.energy_terms_kJ(torch.as_tensor(frame.reshape(1, -1)))
    assert set(terms) == {t for t, f in names.items() if f in groups}
    for term, value in terms.items():
        ref = context.getState(getEnergy=True, groups={groups[names[term]]}).getPotentialEnergy()
        ref = ref.value_in_unit(unit.kilojoule_per_mole)
        assert abs(value.item() - ref) <= max(ENERGY_ABS_TOL_KJ, ENERGY_REL_TOL * abs(ref)), (term, value.item(), ref)


def test_close_pair_high_energy(alanine_pdb: app.PDBFile, native: bool) -> None:
    """A non-bonded pair pushed to 0.12 nm (huge LJ repulsion) still matches OpenMM."""
    for forcefield in (["amber14-all.xml"], ["amber96.xml", "amber96_obc.xml"]):
        system, positions = _make(alanine_pdb, forcefield)
        frame = positions.copy()
        # ACE methyl H1 (1) and ALA carbonyl O (15) are far apart in the topology.
        direction = frame[1] - frame[15]
        frame[1] = frame[15] + 0.12 * direction / np.linalg.norm(direction)
        frames = np.stack([frame, frame + 0.003 * np.random.default_rng(0).standard_normal(frame.shape)])
        e_ref, f_ref = openmm_energies_forces(system, frames)
        assert e_ref.min() > 1e3  # really a high-energy configuration
        ff = TorchForceField(system, TEMPERATURE_K, native=native)
        energy, forces = ff.energy_and_forces_kJ(torch.as_tensor(frames.reshape(2, -1)))
        assert np.all(np.abs(energy.numpy() - e_ref) <= np.maximum(ENERGY_ABS_TOL_KJ, ENERGY_REL_TOL * np.abs(e_ref)))
        # Forces here are ~1e5 kJ/mol/nm; compare relative to their scale.
        scale = np.abs(f_ref).max()
        assert np.abs(forces.numpy().reshape(f_ref.shape) - f_ref).max() <= max(FORCE_ABS_TOL_KJ_NM, 1e-9 * scale)


def test_torsion_phases_and_periodicities(alanine_pdb: app.PDBFile, native: bool) -> None:
    """Arbitrary phases and periodicities 1..6 (the sine polynomial), incl. several terms per quadruplet."""
    system, positions = _make(alanine_pdb, ["amber14-all.xml"])
    torsions = next(f for f in system.getForces() if isinstance(f, openmm.PeriodicTorsionForce))
    rng = np.random.default_rng(7)
    for t in range(torsions.getNumTorsions()):
        i, j, k, l, _, _, kt = torsions.getTorsionParameters(t)
        torsions.setTorsionParameters(t, i, j, k, l, int(rng.integers(1, 7)), float(rng.uniform(0, 2 * np.pi)), kt)
    i, j, k, l, *_ = torsions.getTorsionParameters(0)
    torsions.addTorsion(i, j, k, l, 5, 1.234, 3.0)
    report = compare_with_openmm(system, positions, TEMPERATURE_K, n=4, noise_nm=0.03, seed=2, native=native)
    _assert_parity(report)
    assert TorchForceField(system, TEMPERATURE_K).torsion_sin_coef.shape[0] > 0


@pytest.fixture(scope="module")
def alanine_obc(alanine_pdb: app.PDBFile) -> tuple[openmm.System, np.ndarray]:
    return _make(alanine_pdb, ["amber96.xml", "amber96_obc.xml"])


def _batch(positions: np.ndarray, n: int, noise: float = 0.02, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.as_tensor(positions.reshape(1, -1), dtype=torch.float64)
    return base + noise * torch.randn(n, base.shape[1], generator=gen, dtype=torch.float64)


def test_reduced_energy_autograd_and_units(alanine_obc: tuple[openmm.System, np.ndarray], native: bool) -> None:
    system, positions = alanine_obc
    ff = TorchForceField.from_system(system, TEMPERATURE_K, native=native)
    x = _batch(positions, 5).requires_grad_(True)
    u = ff(x)
    assert u.shape == (5,) and u.dtype == torch.float64
    (grad,) = torch.autograd.grad(u.sum(), x)
    energy, forces = ff.energy_and_forces_kJ(x)
    kT = (unit.MOLAR_GAS_CONSTANT_R * TEMPERATURE_K * unit.kelvin).value_in_unit(unit.kilojoule_per_mole)
    torch.testing.assert_close(u.detach(), energy / kT, rtol=1e-14, atol=0)
    torch.testing.assert_close(grad, -forces / kT, rtol=1e-14, atol=0)
    torch.testing.assert_close(ff.force(x), -grad)
    assert ff.evaluations == 5 + 5  # two calls through forward
    # Gradients weight per-sample, as for any energy.
    w = torch.arange(1.0, 6.0, dtype=torch.float64)
    (grad_w,) = torch.autograd.grad((w * ff(x)).sum(), x)
    torch.testing.assert_close(grad_w, w[:, None] * grad)


def test_finite_difference_gradient(alanine_obc: tuple[openmm.System, np.ndarray], native: bool) -> None:
    system, positions = alanine_obc
    ff = TorchForceField(system, TEMPERATURE_K, native=native)
    x = _batch(positions, 2, noise=0.03, seed=4)
    grad = -ff.energy_and_forces_kJ(x)[1]
    h = 1e-6
    for k in (0, 7, 20, 45, 65):
        dx = torch.zeros_like(x)
        dx[:, k] = h
        fd = (ff.energy_kJ(x + dx) - ff.energy_kJ(x - dx)) / (2 * h)
        torch.testing.assert_close(grad[:, k], fd, rtol=1e-6, atol=1e-4)


def test_chunked_equals_unchunked(alanine_obc: tuple[openmm.System, np.ndarray]) -> None:
    system, positions = alanine_obc
    x = _batch(positions, 11)
    full = TorchForceField(system, TEMPERATURE_K)
    chunked = TorchForceField(system, TEMPERATURE_K, chunk_size=3)
    results = []
    for ff in (full, chunked):
        xx = x.clone().requires_grad_(True)
        u = ff(xx)
        (g,) = torch.autograd.grad((u * torch.linspace(0.5, 2.0, 11, dtype=torch.float64)).sum(), xx)
        results.append((u.detach(), g))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-14, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-14, atol=1e-12)


def test_float32_mode(alanine_obc: tuple[openmm.System, np.ndarray]) -> None:
    system, positions = alanine_obc
    x = _batch(positions, 4)
    ff64 = TorchForceField(system, TEMPERATURE_K)
    ff32 = TorchForceField(system, TEMPERATURE_K).to(torch.float32)
    x32 = x.float().requires_grad_(True)
    u32 = ff32.reduced_energy(x32)
    assert u32.dtype == torch.float32
    (g32,) = torch.autograd.grad(u32.sum(), x32)
    assert g32.dtype == torch.float32 and torch.isfinite(g32).all()
    u64 = ff64.reduced_energy(x)
    # float32 rounding of positions alone moves u by ~1e-5 relative for stiff bonds.
    torch.testing.assert_close(u32.double(), u64, rtol=1e-4, atol=1e-2)
    g64 = -ff64.energy_and_forces_kJ(x)[1] / ff64.kT_kJ_per_mol
    assert (g32.double() - g64).abs().max() <= 1e-3 * g64.abs().max()


def test_unsupported_forces_raise(alanine_pdb: app.PDBFile) -> None:
    system, _ = _make(alanine_pdb, ["amber14-all.xml"])
    custom = openmm.CustomTorsionForce("k*theta^2")
    custom.addPerTorsionParameter("k")
    custom.addTorsion(0, 1, 4, 5, [1.0])
    system.addForce(custom)
    with pytest.raises(ValueError, match=r"CustomTorsionForce.*energy_backend: openmm") as info:
        TorchForceField(system, TEMPERATURE_K)
    assert "\n" not in str(info.value)

    gb_system, _ = _make(alanine_pdb, ["amber14-all.xml", "implicit/obc2.xml"])
    with pytest.raises(ValueError, match="CustomGBForce"):
        TorchForceField(gb_system, TEMPERATURE_K)

    cutoff = app.ForceField("amber14-all.xml").createSystem(
        alanine_pdb.topology, nonbondedMethod=app.CutoffNonPeriodic, constraints=None
    )
    with pytest.raises(ValueError, match="NonbondedForce.*NoCutoff"):
        TorchForceField(cutoff, TEMPERATURE_K)


def test_cmmotionremover_is_ignored(alanine_pdb: app.PDBFile) -> None:
    system, positions = _make(alanine_pdb, ["amber14-all.xml"])
    assert any(isinstance(f, openmm.CMMotionRemover) for f in system.getForces())
    assert "CMMotionRemover" not in " ".join(TorchForceField(system, TEMPERATURE_K).terms)


def test_parity_report() -> None:
    ok = ParityReport(max_abs_energy_kJ=1e-3, max_rel_energy=1e-8, max_abs_force_kJ_nm=1e-6, n=3)
    assert ok.passed
    assert ParityReport(1e-5, 1e-3, 1e-6, 3).passed  # absolute energy criterion alone suffices
    assert not ParityReport(1e-3, 1e-5, 1e-6, 3).passed
    assert not ParityReport(1e-9, 1e-12, 1e-3, 3).passed
    with pytest.raises(dataclasses.FrozenInstanceError):
        ok.n = 4  # type: ignore[misc]


def test_bad_input_shape(alanine_obc: tuple[openmm.System, np.ndarray]) -> None:
    ff = TorchForceField(alanine_obc[0], TEMPERATURE_K)
    with pytest.raises(ValueError, match="shape"):
        ff.energy_kJ(torch.zeros(2, 5, dtype=torch.float64))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(alanine_obc: tuple[openmm.System, np.ndarray]) -> None:
    system, positions = alanine_obc
    x = _batch(positions, 64)
    cpu = TorchForceField(system, TEMPERATURE_K)
    gpu = TorchForceField(system, TEMPERATURE_K).to("cuda")
    xg = x.to("cuda").requires_grad_(True)
    u = gpu(xg)
    assert u.device.type == "cuda"
    (g,) = torch.autograd.grad(u.sum(), xg)
    xc = x.clone().requires_grad_(True)
    uc = cpu(xc)
    (gc,) = torch.autograd.grad(uc.sum(), xc)
    torch.testing.assert_close(u.cpu(), uc, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(g.cpu(), gc, rtol=1e-10, atol=1e-8)


def test_gradient_weights_and_single_backward(alanine_obc: tuple[openmm.System, np.ndarray], native: bool) -> None:
    """Backward hands out the evaluation's own gradient buffer, scaled in place: per-sample weights,
    a uniform weight and u.sum() all give the right gradient, and a second backward through the same
    evaluation raises (it would reuse a buffer the caller owns)."""
    system, positions = alanine_obc
    ff = TorchForceField(system, TEMPERATURE_K, native=native)
    x = _batch(positions, 7)
    reference = -ff.energy_and_forces_kJ(x)[1] / ff.kT_kJ_per_mol
    w = torch.linspace(-1.0, 2.0, 7, dtype=torch.float64)
    for loss, expected in ((lambda u: u.sum(), reference), (lambda u: 3.0 * u.mean(), reference * 3.0 / 7),
                           (lambda u: (w * u).sum(), w[:, None] * reference)):
        xx = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(ff(xx)), xx)
        torch.testing.assert_close(grad, expected, rtol=1e-13, atol=1e-12)
    xx = x.clone().requires_grad_(True)
    u = ff(xx).sum()
    u.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        u.backward()
