"""The `train` command: baseline data, staged training, samples with importance weights, ΔF, plots."""

from __future__ import annotations

import csv
import io
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch

from boltzgen import distributed, plots
from boltzgen.config import Config, OpenMMSystem, dump_config
from boltzgen.errors import ConfigError
from boltzgen.flows.build import can_transform_circular, flow_capabilities
from boltzgen.energies.analytic import AnalyticEnergy
from boltzgen.energies.base import RestrictedEnergy
from boltzgen.files import atomic_write_text
from boltzgen.generator import BoltzmannGenerator
from boltzgen.geometry import find_alpha_carbon_chirality, is_l_chirality
from boltzgen.runs.baselines import TrainingData, baseline_free_energies, phi_profile, training_data
from boltzgen.runs.resources import check_train
from boltzgen.runs.rundir import RunDir
from boltzgen.runs.sample import (
    SampleSet,
    WeightStats,
    draw_samples_distributed,
    log_det_report,
    log_z_row,
    sample_free_energies,
)
from boltzgen.runs.summaries import BaselineSummary, TrainSummary, UmbrellaSummary
from boltzgen.runs.target import (
    Target,
    build_generator,
    build_target,
    load_generator,
    reference_structure,
    select_device,
    to_flow_dtype,
)
from boltzgen.symmetry import energy_invariant_rotors, find_rotors, random_relabel
from boltzgen.training import Trainer, check_recipe, check_stages_distributable

#: Energy added to the mirror image (D) of a molecule trained without data, when it rejects wrong chirality (kT).
CHIRALITY_PENALTY_KT = 1e4
#: Bins per dimension of the density plot of a 2-D analytic system.
DENSITY_BINS = 120


def train(config: Config, resolved: dict[str, Any], run: RunDir, resume: bool = False, force: bool = False,
          progress: bool = True) -> TrainSummary | None:
    """The whole `boltzgen train` job. Returns the summary that it also writes to the run's summary file.

    Everything that can be checked is checked before the baseline and training start: the system,
    the states, the sizes, and on ``resume`` the checkpoint against the config. A resume that fails
    leaves the run directory as it was; its config file is replaced only once the checkpoint loaded.

    Under torchrun every rank trains on its share of each batch and draws its share of the samples;
    rank 0 alone writes files and returns the summary, the other ranks return ``None``.
    """
    started = time.perf_counter()
    check_flow(config)
    check_launch(config)
    progress = progress and distributed.is_main()
    run.prepare_for_training(resume, force)
    resuming = resume and run.checkpoint.exists()
    torch.manual_seed(config.seed)
    # Intra-op threads cost more than they give on small flows (measured 6x slower with 2 threads).
    torch.set_num_threads(config.cpu_threads)
    device = select_device(config.device)
    target = build_target(config)
    check_train(config, target.shape, run.path)
    # A resumed run keeps its checkpoint's torsion layout (its prior's), even one fitted by an
    # earlier version; loading it here also checks that the checkpoint matches the config.
    layout = load_generator(config, target, run.checkpoint).prior.circular if resuming else None
    if not resuming and distributed.is_main():
        atomic_write_text(run.config, dump_config(resolved))
    energy = target.energy.to(device)

    data = None
    if distributed.is_main() and needs_baseline(config, target):
        data = training_data(config, target, run, progress)
    data = distributed.broadcast_from_main(data)  # rank 0 ran the baseline once; the other ranks wait for it
    energy.evaluations, energy.seconds = 0, 0.0

    generator, trainer = _train_flow(config, resolved, run, target, data, resuming, layout, progress)
    # Counts and seconds inside energy calls are summed over the ranks of a launch.
    training_evaluations, training_energy_seconds = distributed.sum_over_ranks([energy.evaluations, energy.seconds])

    samples = draw_samples_distributed(generator, target, config.sampling.n, config.sampling.batch, run.samples,
                                       progress, config.coordinates.reject_wrong_chirality)
    evaluations, seconds = distributed.sum_over_ranks([energy.evaluations, energy.seconds])
    sampling_evaluations, training_evaluations = int(evaluations - training_evaluations), int(training_evaluations)
    sampling_energy_seconds = seconds - training_energy_seconds
    if samples is None:
        return None
    umbrella = UmbrellaSummary.read(run.umbrella.summary) if run.umbrella.summary.exists() else None
    make_plots(run, target, data, samples, umbrella)
    write_diagnostics(run, config, target, trainer.diagnostics)

    stats = WeightStats.of(samples.log_w)
    molecule = target.molecule is not None
    summary = TrainSummary(
        name=config.name, device=str(device), ess=stats.ess, n_samples=stats.n_samples, n_nonfinite=stats.n_nonfinite,
        max_normalized_weight=stats.max_normalized_weight, pareto_khat=stats.pareto_khat,
        weights_reliable=stats.reliable,
        free_energies=sample_free_energies(target, samples, config.sampling.n_bootstrap, config.seed),
        n_wrong_chirality=samples.n_wrong_chirality if molecule else None,
        chirality_rejected=config.coordinates.reject_wrong_chirality if molecule else None,
        baseline=None if data is None else baseline_summary(target, data), umbrella=umbrella,
        energy_evaluations={"training": training_evaluations, "sampling": sampling_evaluations,
                            "total": training_evaluations + sampling_evaluations},
        # Time inside energy calls (this process, since start or resume): what the backend costs.
        energy_seconds={"training": training_energy_seconds, "sampling": sampling_energy_seconds,
                        "total": training_energy_seconds + sampling_energy_seconds},
        training_wall_seconds=trainer.wall_seconds, sampling_wall_seconds=samples.wall_seconds,
        # This session's wall time plus the training time of the sessions it resumed.
        n_nonfinite_training=trainer.n_nonfinite, log_det=log_det_report(generator),
        log_z=log_z_row(target, samples.log_w),
        wall_seconds=time.perf_counter() - started + trainer.resumed_wall_seconds, ranks=distributed.world().size,
    )
    summary.write(run.summary)
    return summary


def _train_flow(config: Config, resolved: dict[str, Any], run: RunDir, target: Target, data: TrainingData | None,
                resuming: bool, layout: torch.Tensor | None, progress: bool) -> tuple[BoltzmannGenerator, Trainer]:
    """Build the generator (a molecule's coordinates fitted to the data, or centred on its minimized
    structure without data, with the latent ``layout`` of a resumed checkpoint) and train it, or
    resume its training."""
    device, dtype = select_device(config.device), getattr(torch, config.dtype)
    x_train = None if data is None else torch.as_tensor(data.x, dtype=torch.float64)
    reference = reference_structure(target) if x_train is None and target.molecule is not None else None
    generator = build_generator(config, target, x_train if x_train is not None else reference, layout)
    to_flow_dtype(generator, device, dtype)
    distributed.reseed_ranks(config.seed)  # every rank of a launch its own stream, after the common initialization
    # The Trainer gets the data only when a stage trains on them: they also initialize ActNorm, and
    # the baseline of a target trained without data can miss modes (the 32-D many-well's MALA does).
    used = x_train is not None and trains_on_data(config)
    augment = _rotor_relabelling(config, target, x_train, device) if used else None
    trainer = Trainer(generator, config.training, run.checkpoint, run.metrics,
                      data=x_train.to(device=device, dtype=dtype) if used else None, augment=augment,
                      checkpoint_every=config.checkpoint_every, log_every=config.log_every, progress=progress)

    def commit() -> None:  # the checkpoint loaded: from here on the run is this config's
        distributed.broadcast_module(generator)  # every rank starts from rank 0's parameters
        if distributed.is_main():
            run.remove_orphan_temporaries()
            atomic_write_text(run.config, dump_config(resolved))

    if target.molecule is not None and config.coordinates.reject_wrong_chirality and not used:
        # Without data nothing else keeps the flow from the mirror image (same energy): D states get
        # CHIRALITY_PENALTY_KT more, weight 0 in FAB and annealing, while reverse KL still sees them.
        quads = find_alpha_carbon_chirality(target.topology)
        generator.energy = RestrictedEnergy(target.energy, partial(is_l_chirality, topology=quads),
                                            penalty=CHIRALITY_PENALTY_KT)
    try:
        trainer.run(resume=resuming, on_start=commit)
    finally:
        if generator.energy is not target.energy:  # a resumed run restored the wrapper's count
            target.energy.evaluations = generator.energy.evaluations
            generator.energy = target.energy
    return generator, trainer


def _rotor_relabelling(config: Config, target: Target, x_train: torch.Tensor,
                       device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The data augmentation of ``md.symmetrize_rotors``: a random cyclic relabelling of every rotor
    whose relabelling leaves the energy of the first data frames unchanged (None without rotors)."""
    if target.molecule is None or not config.md.symmetrize_rotors:
        return None
    rotors, dropped = energy_invariant_rotors(find_rotors(target.topology), target.energy, x_train[:8])
    if dropped and distributed.is_main():
        print(f"WARNING: md.symmetrize_rotors: the force field tells apart the atoms of rotor(s) {dropped}; "
              "their data are not relabelled", file=sys.stderr)
    if len(rotors) == 0:
        return None
    atoms = torch.as_tensor(rotors, device=device)
    return partial(random_relabel, rotors=atoms)


def check_flow(config: Config) -> None:
    """Refuse, before anything runs, a flow that cannot do what the config asks of it: a stage that
    needs the density of external data from a flow without an inverse, or circular coordinates (a
    molecule's torsions) for a family that cannot transform them. One line naming the stage or key."""
    try:
        check_recipe(config.training, flow_capabilities(config.flow), f"flow.type {config.flow.type}")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    circular = isinstance(config.system, OpenMMSystem) and config.coordinates.type != "identity"
    if circular and not can_transform_circular(config.flow):
        raise ConfigError(f"flow.type: {config.flow.type} cannot transform the torsions (circular coordinates) of "
                          f"coordinates.type {config.coordinates.type}; use neural_spline, or maf/iaf with "
                          "autoregressive.transformer spline")


def check_launch(config: Config) -> None:
    """Under torchrun with several processes, a one-line ConfigError when the config cannot be split
    over them: a data-free stage, or a training or sampling batch the number of processes does not divide."""
    check_stages_distributable(config.training)
    distributed.local_batch(config.sampling.batch, "sampling.batch")
    if config.sampling.n < distributed.world().size:
        raise ConfigError(f"sampling.n: {config.sampling.n} samples cannot be split over the "
                          f"{distributed.world().size} processes of this launch")


def trains_on_data(config: Config) -> bool:
    """Whether a stage trains on the baseline's data (forward KL or mixed)."""
    return any(stage.loss in ("forward_kl", "mixed") for stage in config.training)


def needs_baseline(config: Config, target: Target) -> bool:
    """Whether `train` runs the baseline: when a stage trains on its data, and always for an
    analytic system (its MALA is cheap and a comparison). A molecule trained without data (``fab``,
    ``annealing``, ``reverse_kl`` stages only) runs no MD."""
    return target.molecule is None or trains_on_data(config)


def write_diagnostics(run: RunDir, config: Config, target: Target, rows: list[dict[str, float]]) -> None:
    """The data-free stages' diagnostics (FAB's AIS and buffer, the annealing temperature): a CSV
    with a column per quantity (empty where a stage has none) and their plot. Nothing without them."""
    if not rows:
        return
    keys = ["step", "stage"] + sorted({key for row in rows for key in row} - {"step", "stage"})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run.diagnostics, buffer.getvalue())
    fab = [stage.fab_settings.ais.target_accept for stage in config.training if stage.loss == "fab"]
    plots.stage_diagnostics(rows, run.plot("diagnostics"), exact_log_z=target.exact_log_z(),
                            target_accept=fab[0] if fab else None)


def baseline_summary(target: Target, data: TrainingData) -> BaselineSummary:
    """The baseline block of the train summary: the plain run's cost and ΔF, and the training data's cost."""
    plain = data.plain()
    return BaselineSummary(
        source=data.source, n_samples=int(plain.x.shape[0]), energy_evaluations=plain.energy_evaluations,
        wall_seconds=plain.wall_seconds, free_energies=baseline_free_energies(target, data),
        training_data={"n_samples": int(data.x.shape[0]), "energy_evaluations": data.energy_evaluations,
                       "wall_seconds": data.wall_seconds},
        **data.extra,
    )


def make_plots(run: RunDir, target: Target, data: TrainingData | None, samples: SampleSet,
               umbrella: UmbrellaSummary | None = None) -> None:
    """Training curves, energy histograms, and the density (analytic) or Ramachandran plot and phi
    profiles; the baseline's panels and curves only when it ran (``data``)."""
    run.plots.mkdir(parents=True, exist_ok=True)
    if run.metrics.exists():
        plots.training_curves(run.metrics, run.plot("training"))
    plots.energy_histograms(None if data is None else data.u, samples.u, samples.log_w, run.plot("energy_histogram"),
                            data_label="" if data is None else data.source)
    energy = target.energy
    if isinstance(energy, AnalyticEnergy):
        edges = [np.linspace(lo, hi, DENSITY_BINS + 1) for lo, hi in zip(energy.box.lower, energy.box.upper)]
        p = energy.bin_probabilities(edges[0], edges[1], sub=1)
        plots.density_2d(samples.x_head, samples.log_w[: len(samples.x_head)], (edges[0], edges[1], p),
                         run.plot("density"))
        return
    phi, psi = target.plotted_torsions()
    panels = [("flow", samples.cvs[phi], samples.cvs[psi], None),
              ("flow, reweighted", samples.cvs[phi], samples.cvs[psi], samples.log_w)]
    profiles = [("flow, reweighted", *phi_profile(samples.cvs[phi], samples.log_w))]
    if data is not None:
        data_cvs = target.cvs(data.x)
        panels.insert(0, (data.source + (" + state-seeded" if data.seeded else ""), data_cvs[phi], data_cvs[psi],
                          None))
        plain = data.plain()
        label = data.source + (" reweighted to target" if data.log_w is not None else "")
        profiles.insert(0, (label, *phi_profile(data_cvs[phi][: len(plain.x)], plain.log_w)))
    plots.ramachandran(panels, run.plot("ramachandran"), (phi, psi))
    if umbrella is not None and phi == "phi":  # the flattened umbrella runs along the first phi
        prof = umbrella.profile
        profiles.append(("umbrella sampling (flattening bias)", np.asarray(prof.centers_rad), np.asarray(prof.f_kT),
                         np.asarray(prof.stderr_kT)))
    plots.free_energy_profiles(profiles, run.plot("phi_profile"), xlabel=f"{phi} [rad]")
