"""The target of a run, built from its config: the energy, the CVs, the states, and the generator.

Every command starts here: :func:`build_target` turns ``config.system`` and ``config.states`` into a
:class:`Target`, :func:`build_generator` adds the prior, the flow and the coordinate transform,
and :func:`load_run` rebuilds both from a trained run directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from boltzgen.config import Config, DoubleWellSystem, MuellerBrownSystem, OpenMMSystem, load_config
from boltzgen.energies.analytic import AnalyticEnergy, DoubleWell, MuellerBrown
from boltzgen.energies.base import Energy
from boltzgen.errors import RunError
from boltzgen.estimators.free_energy import FreeEnergy
from boltzgen.flows.build import build_flow
from boltzgen.flows.internal import InternalCoordinates, MixedCoordinates
from boltzgen.flows.zmatrix import build_mixed_zmatrix, zmatrix_from_topology
from boltzgen.generator import BoltzmannGenerator
from boltzgen.runs.rundir import RunDir
from boltzgen.runs.summaries import FreeEnergyRow
from boltzgen.states import StateDefinition, backbone_torsions, cartesian_cvs, dihedral_cvs, resolve_states


def select_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("device: cuda was asked for, but torch sees no CUDA device; use device: auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Target:
    """What a run samples: the energy, how to compute CVs, and the states to compare.

    ``molecule`` is the :class:`~boltzgen.energies.openmm.MolecularSystem` of a molecule, ``None``
    for an analytic system. ``torsions`` names the backbone torsions of a molecule, which
    :meth:`cvs` reports; without them the CVs are the coordinates ``x0, x1, ...``. ΔF is reported
    from the first state to each other one (:attr:`pairs`). ``energy`` is ``None`` only for a
    molecule's target rebuilt from files to compare results, which needs no force field.
    """

    energy: Energy | None
    states: dict[str, StateDefinition]
    molecule: Any = None
    torsions: dict[str, tuple[int, int, int, int]] | None = None

    @property
    def topology(self) -> Any:
        return None if self.molecule is None else self.molecule.mdtraj_topology

    @property
    def pairs(self) -> list[tuple[str, str]]:
        names = list(self.states)
        return [(names[0], other) for other in names[1:]]

    def cvs(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """CVs of ``x`` ``[n, dim]``: ``x0, x1, ...``, or the backbone torsions (rad) for molecules."""
        if self.torsions is None:
            return cartesian_cvs(x)
        return dihedral_cvs(np.asarray(x).reshape(len(x), -1, 3), self.torsions)

    def state_masks(self, cvs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Membership ``[n]`` bool of every state, in config order."""
        return {name: state.evaluate(cvs) for name, state in self.states.items()}

    def exact_free_energies(self) -> dict[tuple[str, str], float] | None:
        """ΔF of every pair by quadrature for an analytic energy, ``None`` for a molecule."""
        if not isinstance(self.energy, AnalyticEnergy):
            return None
        probabilities = self.energy.quadrature_probabilities({name: s.evaluate for name, s in self.states.items()})
        return {(a, b): -math.log(probabilities[b] / probabilities[a]) for a, b in self.pairs}

    def free_energy_rows(self, estimates: dict[tuple[str, str], FreeEnergy]) -> list[FreeEnergyRow]:
        """Summary rows of ``estimates``, with the exact value where quadrature knows it."""
        exact = self.exact_free_energies() or {}
        return [FreeEnergyRow.of(pair, estimate, exact.get(pair)) for pair, estimate in estimates.items()]

    def with_energy(self, energy: Energy) -> Target:
        return replace(self, energy=energy)


def build_target(config: Config) -> Target:
    """The energy of ``config.system`` (OpenMM or the torch force field for molecules) and the states."""
    spec = config.system
    states = resolve_states(config.states)
    if isinstance(spec, DoubleWellSystem):
        return Target(DoubleWell(spec.a, spec.b, spec.c), states)
    if isinstance(spec, MuellerBrownSystem):
        return Target(MuellerBrown(spec.beta), states)
    assert isinstance(spec, OpenMMSystem)
    from boltzgen.energies.openmm import OpenMMEnergy
    from boltzgen.energies.openmm import build_system as build_molecule

    molecule = build_molecule(spec.pdb, spec.forcefield, spec.temperature_K)
    try:
        torsions = backbone_torsions(molecule.mdtraj_topology)
    except ValueError as exc:
        raise RunError(f"{spec.pdb}: {exc}; the CVs of a molecule are its backbone torsions") from None
    if spec.energy_backend == "openmm":
        energy: Energy = OpenMMEnergy(molecule, platform=spec.platform, n_workers=spec.n_workers)
    else:
        from boltzgen.energies.torchff import TorchForceField

        try:
            energy = TorchForceField(molecule.system, spec.temperature_K)
        except ValueError as exc:
            raise RunError(f"system.energy_backend: torch: {exc}") from None
    return Target(energy, states, molecule, torsions)


def build_coordinates(config: Config, target: Target, x_data: torch.Tensor | None) -> InternalCoordinates | MixedCoordinates:
    """The internal or mixed coordinate transform of a molecule.

    ``x_data`` ``[n, dim]`` (nm) fits the standardization; ``None`` builds placeholders of the right
    shapes, to be filled by a checkpoint.
    """
    topology = target.topology
    n_atoms = topology.n_atoms
    data = None if x_data is None else x_data.to(torch.float64)
    if config.coordinates.type == "internal":
        zmatrix = zmatrix_from_topology(topology)
        if data is not None:
            return InternalCoordinates.fit(zmatrix, data)
        d = 3 * n_atoms - 6
        return InternalCoordinates(zmatrix, mean=torch.zeros(d), std=torch.ones(d))
    cartesian = config.coordinates.cartesian_atoms or [a.index for a in topology.atoms if a.element.symbol != "H"]
    bonds = [(a.index, b.index) for a, b in topology.bonds]
    zmatrix = build_mixed_zmatrix(bonds, n_atoms, cartesian)
    if data is not None:
        return MixedCoordinates.fit(cartesian, zmatrix, n_atoms, data)
    d = 3 * n_atoms
    return MixedCoordinates(cartesian, zmatrix, n_atoms, mean=torch.zeros(d), std=torch.ones(d))


def build_generator(config: Config, target: Target, x_data: torch.Tensor | None) -> BoltzmannGenerator:
    """Prior + flow (+ coordinate transform for molecules) + energy; ``x_data`` as in :func:`build_coordinates`."""
    coordinates = None
    dim, circular = target.energy.dim, None
    if target.molecule is not None and config.coordinates.type != "identity":
        coordinates = build_coordinates(config, target, x_data)
        dim, circular = coordinates.dim_internal, coordinates.circular_mask
    prior, flow = build_flow(config.flow, dim, circular=circular, coordinates=coordinates, seed=config.seed)
    return BoltzmannGenerator(prior, flow, target.energy)


def to_flow_dtype(generator: BoltzmannGenerator, device: torch.device, dtype: torch.dtype) -> None:
    """Move the generator to ``device``; only the prior and flow take the flow's dtype, so the
    energy's constants keep float64 (a round trip through float32 would round them)."""
    generator.to(device=device)
    generator.prior.to(dtype=dtype)
    generator.flow.to(dtype=dtype)


@dataclass
class TrainedRun:
    """A trained run rebuilt from its directory: the config, the target and the generator (eval mode)."""

    run: RunDir
    config: Config
    resolved: dict[str, Any]
    target: Target
    generator: BoltzmannGenerator


def load_run(run: RunDir) -> TrainedRun:
    """Rebuild a trained run from ``config.yaml`` and ``checkpoint.pt``."""
    run.require_trained()
    config, resolved = load_config(run.config)
    torch.set_num_threads(config.cpu_threads)
    target = build_target(config)
    device = select_device(config.device)
    generator = build_generator(config, target, None)
    try:
        state = torch.load(run.checkpoint, map_location="cpu", weights_only=False)
        generator.load_state_dict(state["model"])
    except Exception as exc:  # a truncated or foreign file: say which, not a traceback
        raise RunError(f"{run.checkpoint}: cannot be loaded ({type(exc).__name__}); retrain or "
                       "--resume the run") from None
    to_flow_dtype(generator, device, getattr(torch, config.dtype))
    generator.eval()
    return TrainedRun(run, config, resolved, target, generator)
