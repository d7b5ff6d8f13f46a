"""The target of a run, built from its config: the energy, the CVs, the states, and the generator.

Every command starts here: :func:`build_target` turns ``config.system`` and ``config.states`` into a
:class:`Target`, :func:`build_generator` adds the prior, the flow and the coordinate transform,
and :func:`load_run` rebuilds both from a trained run directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boltzgen import distributed
from boltzgen.config import (
    Config,
    DoubleWellSystem,
    GaussianMixtureSystem,
    ManyWellSystem,
    MuellerBrownParticleSystem,
    MuellerBrownSystem,
    OpenMMSystem,
    load_config,
)
from boltzgen.energies.analytic import AnalyticEnergy, DoubleWell, GaussianMixture, ManyWell, MuellerBrown
from boltzgen.energies.base import Energy
from boltzgen.cvs import BACKBONE_TORSION
from boltzgen.errors import RunError
from boltzgen.estimators.free_energy import FreeEnergy
from boltzgen.flows.build import build_flow
from boltzgen.flows.internal import InternalCoordinates, MixedCoordinates, rigid_torsions_by_scan
from boltzgen.flows.transforms import ActNorm
from boltzgen.flows.zmatrix import build_mixed_zmatrix, zmatrix_from_topology
from boltzgen.generator import BoltzmannGenerator
from boltzgen.training import load_model_state, read_checkpoint
from boltzgen.runs.resources import Shape
from boltzgen.runs.rundir import RunDir
from boltzgen.runs.summaries import FreeEnergyRow
from boltzgen.states import (
    StateDefinition,
    backbone_torsions,
    cartesian_cvs,
    check_state_cvs,
    dihedral_cvs,
    resolve_states,
)


def select_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; under torchrun CUDA is the GPU of the rank's local rank."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("device: cuda was asked for, but torch sees no CUDA device; use device: auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return distributed.rank_device(torch.device(name))


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
    #: The exact ΔF, computed once (a quadrature of millions of points).
    _exact: dict[tuple[str, str], float] | None = field(default=None, init=False, repr=False, compare=False)

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

    def plotted_torsions(self) -> tuple[str, str]:
        """The ``(phiN, psiN)`` pair that plots of a molecule show: the residue of the first backbone
        torsion the states use (tetra-alanine's ``phi1``), the first residue's when they use none."""
        used = sorted(set().union(*(state.names_used() for state in self.states.values())))
        for name in used:
            match = BACKBONE_TORSION.match(name)
            if match:
                return f"phi{match.group(2)}", f"psi{match.group(2)}"
        return "phi", "psi"

    def state_masks(self, cvs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Membership ``[n]`` bool of every state, in config order."""
        return {name: state.evaluate(cvs) for name, state in self.states.items()}

    def quadrature_states(self) -> dict[str, StateDefinition]:
        """The states whose exact probability quadrature gives: those of an analytic energy that use
        x0 and x1 only (the quadrature is over their joint density); none for a molecule."""
        if not isinstance(self.energy, AnalyticEnergy):
            return {}
        return {name: s for name, s in self.states.items() if s.names_used() <= {"x0", "x1"}}

    def exact_free_energies(self) -> dict[tuple[str, str], float] | None:
        """ΔF of every pair by quadrature for an analytic energy (the pairs whose states use x0 and
        x1 only), ``None`` for a molecule."""
        if not isinstance(self.energy, AnalyticEnergy):
            return None
        if self._exact is None:
            states = self.quadrature_states()
            probabilities = self.energy.quadrature_probabilities({name: s.evaluate for name, s in states.items()})
            self._exact = {(a, b): -math.log(probabilities[b] / probabilities[a]) for a, b in self.pairs
                           if a in probabilities and b in probabilities}
        return dict(self._exact)

    def exact_log_z(self) -> float | None:
        """The exact log Z of an analytic energy, ``None`` for a molecule."""
        return self.energy.log_z if isinstance(self.energy, AnalyticEnergy) else None

    def free_energy_rows(self, estimates: dict[tuple[str, str], FreeEnergy]) -> list[FreeEnergyRow]:
        """Summary rows of ``estimates``, with the exact value where quadrature knows it."""
        exact = self.exact_free_energies() or {}
        return [FreeEnergyRow.of(pair, estimate, exact.get(pair)) for pair, estimate in estimates.items()]

    def with_energy(self, energy: Energy) -> Target:
        return replace(self, energy=energy)

    @property
    def shape(self) -> Shape:
        """Sizes for the resource checks: the state dimension and the number of CVs."""
        n_cvs = self.energy.dim if self.torsions is None else len(self.torsions) + 2
        return Shape(dim=self.energy.dim, n_cvs=n_cvs, molecule=self.molecule is not None)


def build_target(config: Config) -> Target:
    """The energy of ``config.system`` (OpenMM or the torch force field for molecules) and the states.

    Everything about the system that can be wrong is checked here, before any MD or training: the
    OpenMM platforms, the states' CVs, states that no configuration can be in, and the atoms.
    """
    spec = config.system
    states = resolve_states(config.states)
    if isinstance(spec, DoubleWellSystem):
        target = Target(DoubleWell(spec.a, spec.b, spec.c), states)
    elif isinstance(spec, MuellerBrownSystem):
        target = Target(MuellerBrown(spec.beta), states)
    elif isinstance(spec, ManyWellSystem):
        target = Target(ManyWell(spec.dim), states)
    elif isinstance(spec, GaussianMixtureSystem):
        target = Target(GaussianMixture(spec.n_modes, spec.loc_scale, spec.scale, spec.seed), states)
    elif isinstance(spec, MuellerBrownParticleSystem):
        target = _particle_target(config, states)
    else:
        target = _molecule_target(config, states)
    _check_states_can_be_reached(target)
    return target


def _check_platforms(config: Config) -> None:
    """A RunError naming the first OpenMM platform the config asks for that is not installed here."""
    from boltzgen.energies.openmm import available_platforms

    platforms = available_platforms()
    for key, name in (("system.platform", config.system.platform), ("md.platform", config.md.platform),
                      ("umbrella.platform", config.umbrella.platform), ("remd.platform", config.remd.platform)):
        if name != "auto" and name not in platforms:
            raise RunError(f"{key}: OpenMM platform {name} is not available here; available: {', '.join(platforms)}")


def _particle_target(config: Config, states: dict[str, StateDefinition]) -> Target:
    """The Mueller-Brown particle: an OpenMM system (MD, umbrella, replica exchange) whose energy is
    analytic (exact ΔF and log Z); its CVs are its coordinates x0, x1, x2 (nm)."""
    from boltzgen.energies.particle import MuellerBrownParticle, build_mueller_brown_particle

    spec = config.system
    assert isinstance(spec, MuellerBrownParticleSystem)
    _check_platforms(config)
    if config.coordinates.type != "identity":
        raise RunError(f"coordinates.type: {config.coordinates.type} is for molecules with bonds; the Mueller-Brown "
                       "particle takes coordinates.type identity")
    molecule = build_mueller_brown_particle(spec.beta, spec.temperature_K, spec.mass_amu, spec.z_sigma_nm)
    return Target(MuellerBrownParticle(molecule, spec.beta, spec.z_sigma_nm, spec.platform), states, molecule)


def _molecule_target(config: Config, states: dict[str, StateDefinition]) -> Target:
    from boltzgen.energies.openmm import OpenMMEnergy
    from boltzgen.energies.openmm import build_system as build_molecule

    spec = config.system
    assert isinstance(spec, OpenMMSystem)
    _check_platforms(config)
    molecule = build_molecule(spec.pdb, spec.forcefield, spec.temperature_K)
    try:
        torsions = backbone_torsions(molecule.mdtraj_topology)
        check_state_cvs(states, list(dihedral_cvs(molecule.positions_nm[None], torsions)))
    except ValueError as exc:
        raise RunError(f"states: {exc} (the CVs of a molecule are its backbone torsions, in radians)") from None
    atoms = config.coordinates.cartesian_atoms or []
    if any(a >= molecule.n_atoms for a in atoms) or len(set(atoms)) != len(atoms):
        raise RunError(f"coordinates.cartesian_atoms: need distinct atom indices below {molecule.n_atoms} "
                       f"(the molecule's atom count), got {atoms}")
    if spec.energy_backend == "openmm":
        energy: Energy = OpenMMEnergy(molecule, platform=spec.platform, n_workers=spec.n_workers)
    else:
        from boltzgen.energies.torchff import TorchForceField

        try:
            energy = TorchForceField(molecule.system, spec.temperature_K)
        except ValueError as exc:
            raise RunError(f"system.energy_backend: torch: {exc}") from None
    return Target(energy, states, molecule, torsions)


#: Random torsions that probe whether a molecule's state can hold any configuration at all.
STATE_PROBES = 20_000


def _check_states_can_be_reached(target: Target) -> None:
    """A RunError naming a state that no configuration can be in (``x0 > 0 and x0 < 0``, ``phi > 4``).

    Analytic systems: its exact probability on the quadrature box is 0. Molecules: none of
    :data:`STATE_PROBES` uniformly random torsion sets falls in it (torsions span [-pi, pi)).
    """
    if isinstance(target.energy, AnalyticEnergy):
        with np.errstate(all="ignore"):
            probabilities = target.energy.quadrature_probabilities(
                {n: s.evaluate for n, s in target.quadrature_states().items()}, points_per_dim=401)
        empty = [name for name, p in probabilities.items() if not p > 0]
    elif target.torsions:
        rng = np.random.default_rng(0)
        probes = {name: rng.uniform(-math.pi, math.pi, STATE_PROBES) for name in target.torsions}
        probes.update(phi=probes.get("phi0"), psi=probes.get("psi0"))
        with np.errstate(all="ignore"):
            empty = [name for name, state in target.states.items() if not state.evaluate(probes).any()]
    else:
        return
    if empty:
        raise RunError(f"states.{empty[0]}: no configuration of this system is in state {empty[0]} "
                       f"({target.states[empty[0]].expression[:80]}); check its bounds")


def build_coordinates(config: Config, target: Target, x_data: torch.Tensor | None,
                      circular: torch.Tensor | None = None) -> InternalCoordinates | MixedCoordinates:
    """The internal or mixed coordinate transform of a molecule.

    ``x_data`` ``[n, dim]`` (nm) fits the standardization; ``None`` builds placeholders of the right
    shapes, to be filled by a checkpoint. ``circular`` ``[3N-6]`` bool, a checkpoint's latent layout
    (its prior's), says which torsions are circular; without it the data (or the energy) decide, and
    placeholders make every torsion circular. One structure (``n = 1``, training without data, see
    :func:`reference_structure`) centres internal coordinates on it, with :data:`REFERENCE_STD`.
    """
    topology = target.topology
    n_atoms = topology.n_atoms
    data = None if x_data is None else x_data.to(torch.float64)
    torsions = None if circular is None else circular[2 * n_atoms - 3:]
    if data is not None and data.shape[0] == 1:
        if config.coordinates.type != "internal":
            raise RunError(f"coordinates.type {config.coordinates.type}: training without data needs coordinates.type "
                           "internal (its standardization is centred on the energy-minimized structure)")
        plain = InternalCoordinates(zmatrix_from_topology(topology))
        std = torch.full((plain.dim_internal,), REFERENCE_STD["angle"], dtype=torch.float64)
        std[: plain.n_bonds] = REFERENCE_STD["bond"]
        std[plain.n_bonds + plain.n_angles:] = REFERENCE_STD["torsion"]
        if torsions is None:
            rigid = rigid_torsions_by_scan(plain, data, target.energy) if config.coordinates.rigid_torsions \
                else torch.zeros(plain.n_torsions, dtype=torch.bool)
            torsions = ~rigid
        return InternalCoordinates(plain.zmatrix.cpu().numpy(), mean=plain.internal(data)[0], std=std, circular=torsions)
    if config.coordinates.type == "internal":
        zmatrix = zmatrix_from_topology(topology)
        if data is not None:
            return InternalCoordinates.fit(zmatrix, data, rigid_torsions=config.coordinates.rigid_torsions,
                                           circular=torsions)
        d = 3 * n_atoms - 6
        return InternalCoordinates(zmatrix, mean=torch.zeros(d), std=torch.ones(d), circular=torsions)
    cartesian = config.coordinates.cartesian_atoms or [a.index for a in topology.atoms if a.element.symbol != "H"]
    bonds = [(a.index, b.index) for a, b in topology.bonds]
    zmatrix = build_mixed_zmatrix(bonds, n_atoms, cartesian)
    if data is not None:
        return MixedCoordinates.fit(cartesian, zmatrix, n_atoms, data)
    d = 3 * n_atoms
    return MixedCoordinates(cartesian, zmatrix, n_atoms, mean=torch.zeros(d), std=torch.ones(d))


#: Standardization of internal coordinates around one reference structure, when no data fit it:
#: bonds in nm, angles in rad, the values of Stimper et al.'s alanine flows; rigid torsions (found by
#: an energy scan) in rad like angles, free torsions are not scaled.
REFERENCE_STD = {"bond": 0.005, "angle": 0.15, "torsion": 0.15}


def reference_structure(target: Target) -> torch.Tensor:
    """The molecule's PDB structure after a local energy minimization, ``[1, 3N]`` nm float64: what
    a flow trained without data is centred on."""
    from boltzgen.energies.openmm import minimize_positions

    positions = minimize_positions(target.molecule, np.asarray(target.molecule.positions_nm, dtype=np.float64))
    return torch.as_tensor(positions, dtype=torch.float64).reshape(1, -1)


def build_generator(config: Config, target: Target, x_data: torch.Tensor | None,
                    circular: torch.Tensor | None = None) -> BoltzmannGenerator:
    """Prior + flow (+ coordinate transform for molecules) + energy; ``x_data`` and ``circular``
    as in :func:`build_coordinates`."""
    coordinates = None
    dim = target.energy.dim
    if target.molecule is not None and config.coordinates.type != "identity":
        coordinates = build_coordinates(config, target, x_data, circular)
        dim, circular = coordinates.dim_internal, coordinates.circular_mask
    elif config.coordinates.scale != 1.0:
        if target.molecule is not None:
            raise RunError("coordinates.scale is for analytic systems; a molecule's coordinates are standardized")
        coordinates = ActNorm(dim)  # takes the place of the flow's last ActNorm, initialized to the scale
        with torch.no_grad():
            coordinates.log_scale.fill_(math.log(config.coordinates.scale))
            coordinates.initialized.fill_(True)
    prior, flow = build_flow(config.flow, dim, circular=circular, coordinates=coordinates, seed=config.seed)
    return BoltzmannGenerator(prior, flow, target.energy)


def load_generator(config: Config, target: Target, checkpoint: Path) -> BoltzmannGenerator:
    """The generator saved in ``checkpoint``, built with the latent layout its prior saved (which
    torsions the fitted coordinates made circular); a RunError when it does not match ``config``."""
    state = read_checkpoint(checkpoint)["model"]
    saved = state.get("prior.circular")  # without it, load_model_state refuses the checkpoint below
    generator = build_generator(config, target, None, None if saved is None else saved.to(torch.bool).cpu())
    load_model_state(generator, state, checkpoint)
    return generator


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
    generator = load_generator(config, target, run.checkpoint)
    to_flow_dtype(generator, device, getattr(torch, config.dtype))
    generator.eval()
    return TrainedRun(run, config, resolved, target, generator)
