"""The fused C kernel of the torch force field: equal to the eager torch code, threads, fallbacks.

Parity of both paths with OpenMM is in test_parity.py; here the kernel is checked against the eager
code (the reference) on what only the kernel has: its block and thread splits, its build and its
fallback when it cannot be built.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import pickle
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from boltzgen.energies import native
from boltzgen.energies.torchff import TorchForceField
from tests.helpers import skip_without_kernel

ROOT = Path(__file__).resolve().parents[2]
TEMPERATURE_K = 300.0
FORCEFIELDS = {"vacuum": ["amber14-all.xml"], "obc": ["amber96.xml", "amber96_obc.xml"]}


@pytest.fixture(scope="module", params=list(FORCEFIELDS))
def alanine(request: pytest.FixtureRequest) -> tuple[openmm.System, torch.Tensor]:
    pdb = app.PDBFile(str(ROOT / "systems" / "alanine-dipeptide.pdb"))
    system = app.ForceField(*FORCEFIELDS[request.param]).createSystem(pdb.topology, nonbondedMethod=app.NoCutoff,
                                                                       constraints=None)
    positions = np.asarray(pdb.positions.value_in_unit(unit.nanometer)).reshape(1, -1)
    return system, torch.as_tensor(positions, dtype=torch.float64)


@pytest.fixture()
def kernel() -> None:
    skip_without_kernel()


@pytest.fixture()
def restore_threads() -> Iterator[None]:
    """Tests here change torch's thread count (the kernel's too); it is put back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _batch(base: torch.Tensor, n: int, seed: int = 0, noise: float = 0.02) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return base + noise * torch.randn(n, base.shape[1], generator=gen, dtype=torch.float64)


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 300])
def test_kernel_equals_eager(alanine: tuple[openmm.System, torch.Tensor], n: int) -> None:
    """Batches that are not whole blocks (64) included."""
    system, base = alanine
    fast = TorchForceField(system, TEMPERATURE_K)
    eager = TorchForceField(system, TEMPERATURE_K, native=False)
    assert fast.uses_native_kernel() and not eager.uses_native_kernel()
    x = _batch(base, n)
    e_fast, f_fast = fast.energy_and_forces_kJ(x)
    e_eager, f_eager = eager.energy_and_forces_kJ(x)
    assert e_fast.shape == (n,) and f_fast.shape == (n, base.shape[1])
    torch.testing.assert_close(e_fast, e_eager, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(f_fast, f_eager, rtol=1e-10, atol=1e-8)
    # Energy-only evaluation (no gradient buffer) gives the same energies.
    u_only = fast.reduced_energy(x)
    u_with_grad = fast.reduced_energy(x.clone().requires_grad_(True))
    torch.testing.assert_close(u_only, u_with_grad.detach(), rtol=0, atol=0)


@pytest.mark.usefixtures("kernel", "restore_threads")
def test_thread_split_is_exact(alanine: tuple[openmm.System, torch.Tensor]) -> None:
    """Configurations are independent, so splitting the batch over threads changes no bit; the pool
    also serves jobs that use fewer threads than it has workers."""
    system, base = alanine
    ff = TorchForceField(system, TEMPERATURE_K)
    x = _batch(base, 1000, seed=1)
    results = []
    for n in (1, 4, 2, 3):
        torch.set_num_threads(n)
        results.append(ff.energy_and_forces_kJ(x))
    for energy, forces in results[1:]:
        assert torch.equal(results[0][0], energy) and torch.equal(results[0][1], forces)


def _energies_in_child(ff: TorchForceField, x: torch.Tensor, out: multiprocessing.SimpleQueue) -> None:
    torch.set_num_threads(2)
    out.put(ff.reduced_energy(x).numpy())


@pytest.mark.usefixtures("kernel", "restore_threads")
def test_threads_work_in_a_forked_child(alanine: tuple[openmm.System, torch.Tensor]) -> None:
    """A child forked after the kernel's threads started has none of them; it starts its own."""
    system, base = alanine
    ff = TorchForceField(system, TEMPERATURE_K)
    x = _batch(base, 600, seed=2)
    torch.set_num_threads(2)
    expected = ff.reduced_energy(x)  # the parent's workers exist from here on
    context = multiprocessing.get_context("fork")
    out = context.SimpleQueue()
    child = context.Process(target=_energies_in_child, args=(ff, x, out))
    child.start()
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in the force-field kernel")
    assert child.exitcode == 0
    np.testing.assert_array_equal(out.get(), expected.numpy())


@pytest.mark.usefixtures("kernel", "restore_threads")
def test_concurrent_callers_get_their_own_results(alanine: tuple[openmm.System, torch.Tensor]) -> None:
    """Two Python threads calling at once (ctypes drops the GIL) share the pool one job at a time."""
    system, base = alanine
    ff = TorchForceField(system, TEMPERATURE_K)
    batches = [_batch(base, 500, seed=seed) for seed in (3, 4)]
    expected = [ff.reduced_energy(x) for x in batches]
    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def evaluate(k: int) -> None:
        for _ in range(20):
            got[k].append(ff.reduced_energy(batches[k]))

    torch.set_num_threads(2)
    callers = [threading.Thread(target=evaluate, args=(k,)) for k in (0, 1)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    for k in (0, 1):
        assert len(got[k]) == 20 and all(torch.equal(energy, expected[k]) for energy in got[k])


@pytest.mark.usefixtures("kernel")
def test_nonfinite_input_stays_nonfinite(alanine: tuple[openmm.System, torch.Tensor]) -> None:
    """A NaN coordinate gives a NaN energy for its configuration only (no clamp hides it)."""
    system, base = alanine
    ff = TorchForceField(system, TEMPERATURE_K)
    x = _batch(base, 70)
    x[3, 5] = float("nan")
    energy, forces = ff.energy_and_forces_kJ(x)
    assert torch.isnan(energy[3])
    keep = torch.arange(70) != 3
    assert torch.isfinite(energy[keep]).all() and torch.isfinite(forces[keep]).all()
    # Other places in the kernel block: equal up to rounding (see BLOCK in ffkernel.c).
    torch.testing.assert_close(energy[keep], ff.energy_and_forces_kJ(x[keep])[0], rtol=1e-13, atol=0)


@pytest.mark.usefixtures("kernel")
def test_copies_and_pickles_rebuild_the_kernel_parameters(alanine: tuple[openmm.System, torch.Tensor]) -> None:
    system, base = alanine
    ff = TorchForceField(system, TEMPERATURE_K)
    x = _batch(base, 5)
    expected = ff.reduced_energy(x)  # builds the parameter block, which holds raw pointers
    for clone in (copy.deepcopy(ff), pickle.loads(pickle.dumps(ff))):
        assert clone._kernel_params is None
        torch.testing.assert_close(clone.reduced_energy(x), expected, rtol=0, atol=0)


def test_float32_and_native_false_use_eager(alanine: tuple[openmm.System, torch.Tensor]) -> None:
    system, _ = alanine
    assert not TorchForceField(system, TEMPERATURE_K).to(torch.float32).uses_native_kernel()
    assert not TorchForceField(system, TEMPERATURE_K, native=False).uses_native_kernel()


@pytest.mark.usefixtures("kernel")
def test_kernel_decision_follows_the_dtype(alanine: tuple[openmm.System, torch.Tensor]) -> None:
    """The decision is cached, and made again when the module is moved or cast."""
    system, base = alanine
    ff = TorchForceField(system, TEMPERATURE_K)
    assert ff.uses_native_kernel()
    ff.to(torch.float32)
    assert not ff.uses_native_kernel()
    assert ff.reduced_energy(base.float()).dtype == torch.float32
    ff.double()
    assert ff.uses_native_kernel()


@pytest.fixture()
def fresh_loader(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The loader as if never called, with an empty cache directory."""
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_reason", None)
    monkeypatch.setenv("BOLTZGEN_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_disabled_by_environment(fresh_loader: Path, monkeypatch: pytest.MonkeyPatch,
                                 alanine: tuple[openmm.System, torch.Tensor]) -> None:
    monkeypatch.setenv("BOLTZGEN_NATIVE", "0")
    assert native.load_kernel() is None
    assert "BOLTZGEN_NATIVE" in (native.unavailable_reason() or "")
    system, base = alanine
    assert not TorchForceField(system, TEMPERATURE_K).uses_native_kernel()
    assert torch.isfinite(TorchForceField(system, TEMPERATURE_K).reduced_energy(base)).all()
    with pytest.raises(RuntimeError, match="BOLTZGEN_NATIVE.*native=False"):
        TorchForceField(system, TEMPERATURE_K, native=True).reduced_energy(base)
    assert not list(fresh_loader.iterdir())


def test_missing_compiler_falls_back(fresh_loader: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", str(fresh_loader / "no-such-cc"))
    with pytest.warns(RuntimeWarning, match="eager torch"):
        assert native.load_kernel() is None
    reason = native.unavailable_reason() or ""
    assert "no C compiler" in reason and "no-such-cc" in reason


def test_failing_compiler_reports_its_error(fresh_loader: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compiler = fresh_loader / "broken-cc"
    compiler.write_text("#!/bin/sh\necho 'ffkernel.c:1: error: out of ink' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    with pytest.warns(RuntimeWarning, match="out of ink"):
        assert native.load_kernel() is None
    assert "out of ink" in (native.unavailable_reason() or "")
    assert not list(fresh_loader.glob("*.so"))  # nothing half-written left in the cache


def test_builds_into_the_cache_and_reuses_it(fresh_loader: Path) -> None:
    if shutil.which(os.environ.get("CC") or "cc") is None:
        pytest.skip("no C compiler here")
    library = native.load_kernel()
    assert library is not None, native.unavailable_reason()
    built = list(fresh_loader.glob("ffkernel-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native._library = None  # a second process: finds the cached build, compiles nothing
    assert native.load_kernel() is not None
    assert built[0].stat().st_mtime_ns == stamp and len(list(fresh_loader.glob("ffkernel-*.so"))) == 1


@pytest.mark.usefixtures("kernel")
def test_kernel_refuses_wrong_input(alanine: tuple[openmm.System, torch.Tensor]) -> None:
    system, base = alanine
    ff = TorchForceField(system, TEMPERATURE_K)
    params = ff._kernel_parameters()
    library = native.load_kernel()
    for bad in (base.float(), base[:, :-3], base.reshape(-1)):
        with pytest.raises(ValueError, match="float64 CPU positions"):
            native.energy_and_grad(library, params, bad, True)
