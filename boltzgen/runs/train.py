"""The `train` command: baseline data, staged training, samples with importance weights, ΔF, plots."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from boltzgen import plots
from boltzgen.config import Config, dump_config
from boltzgen.energies.analytic import AnalyticEnergy
from boltzgen.files import atomic_write_text
from boltzgen.runs.baselines import TrainingData, baseline_free_energies, phi_profile, training_data
from boltzgen.runs.rundir import RunDir
from boltzgen.runs.sample import SampleSet, WeightStats, draw_samples, sample_free_energies
from boltzgen.runs.summaries import BaselineSummary, TrainSummary, UmbrellaSummary
from boltzgen.runs.target import Target, build_generator, build_target, select_device, to_flow_dtype
from boltzgen.training import Trainer

#: Bins per dimension of the density plot of a 2-D analytic system.
DENSITY_BINS = 120


def train(config: Config, resolved: dict[str, Any], run: RunDir, resume: bool = False, force: bool = False,
          progress: bool = True) -> TrainSummary:
    """The whole `boltzgen train` job. Returns the summary that it also writes to the run's summary file."""
    started = time.perf_counter()
    run.prepare_for_training(resume, force)
    atomic_write_text(run.config, dump_config(resolved))
    torch.manual_seed(config.seed)
    # Intra-op threads cost more than they give on small flows (measured 6x slower with 2 threads).
    torch.set_num_threads(config.cpu_threads)
    device = select_device(config.device)
    dtype = getattr(torch, config.dtype)
    target = build_target(config)
    energy = target.energy.to(device)

    data = training_data(config, target, run, progress)
    energy.evaluations, energy.seconds = 0, 0.0

    x_train = torch.as_tensor(data.x, dtype=torch.float64)
    generator = build_generator(config, target, x_train)
    to_flow_dtype(generator, device, dtype)
    trainer = Trainer(generator, config.training, run.checkpoint, run.metrics,
                      data=x_train.to(device=device, dtype=dtype), checkpoint_every=config.checkpoint_every,
                      log_every=config.log_every, progress=progress)
    trainer.run(resume=resume)
    training_evaluations, training_energy_seconds = energy.evaluations, energy.seconds

    samples = draw_samples(generator, target, config.sampling.n, config.sampling.batch, run.samples,
                           progress, config.coordinates.reject_wrong_chirality)
    sampling_evaluations = energy.evaluations - training_evaluations
    sampling_energy_seconds = energy.seconds - training_energy_seconds
    umbrella = UmbrellaSummary.read(run.umbrella.summary) if run.umbrella.summary.exists() else None
    make_plots(run, target, data, samples, umbrella)

    stats = WeightStats.of(samples.log_w)
    molecule = target.molecule is not None
    summary = TrainSummary(
        name=config.name, device=str(device), ess=stats.ess, n_samples=stats.n_samples, n_nonfinite=stats.n_nonfinite,
        max_normalized_weight=stats.max_normalized_weight, pareto_khat=stats.pareto_khat,
        weights_reliable=stats.reliable,
        free_energies=sample_free_energies(target, samples, config.sampling.n_bootstrap, config.seed),
        n_wrong_chirality=samples.n_wrong_chirality if molecule else None,
        chirality_rejected=config.coordinates.reject_wrong_chirality if molecule else None,
        baseline=baseline_summary(target, data), umbrella=umbrella,
        energy_evaluations={"training": training_evaluations, "sampling": sampling_evaluations,
                            "total": training_evaluations + sampling_evaluations},
        # Time inside energy calls (this process, since start or resume): what the backend costs.
        energy_seconds={"training": training_energy_seconds, "sampling": sampling_energy_seconds,
                        "total": training_energy_seconds + sampling_energy_seconds},
        training_wall_seconds=trainer.wall_seconds, sampling_wall_seconds=samples.wall_seconds,
        n_nonfinite_training=trainer.n_nonfinite, wall_seconds=time.perf_counter() - started,
    )
    summary.write(run.summary)
    return summary


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


def make_plots(run: RunDir, target: Target, data: TrainingData, samples: SampleSet,
               umbrella: UmbrellaSummary | None = None) -> None:
    """Training curves, energy histograms, and the density (analytic) or Ramachandran plot and phi profiles."""
    run.plots.mkdir(parents=True, exist_ok=True)
    if run.metrics.exists():
        plots.training_curves(run.metrics, run.plot("training"))
    plots.energy_histograms(data.u, samples.u, samples.log_w, run.plot("energy_histogram"), data_label=data.source)
    energy = target.energy
    if isinstance(energy, AnalyticEnergy):
        edges = [np.linspace(lo, hi, DENSITY_BINS + 1) for lo, hi in zip(energy.box.lower, energy.box.upper)]
        p = energy.bin_probabilities(edges[0], edges[1], sub=1)
        plots.density_2d(samples.x_head, samples.log_w[: len(samples.x_head)], (edges[0], edges[1], p),
                         run.plot("density"))
        return
    data_cvs = target.cvs(data.x)
    plots.ramachandran(
        [(data.source + (" + state-seeded" if data.seeded else ""), data_cvs["phi"], data_cvs["psi"], None),
         ("flow", samples.cvs["phi"], samples.cvs["psi"], None),
         ("flow, reweighted", samples.cvs["phi"], samples.cvs["psi"], samples.log_w)],
        run.plot("ramachandran"),
    )
    plain = data.plain()
    label = data.source + (" reweighted to target" if data.log_w is not None else "")
    profiles = [(label, *phi_profile(data_cvs["phi"][: len(plain.x)], plain.log_w)),
                ("flow, reweighted", *phi_profile(samples.cvs["phi"], samples.log_w))]
    if umbrella is not None:
        prof = umbrella.profile
        profiles.append(("umbrella sampling (flattening bias)", np.asarray(prof.centers_rad), np.asarray(prof.f_kT),
                         np.asarray(prof.stderr_kT)))
    plots.free_energy_profiles(profiles, run.plot("phi_profile"))
