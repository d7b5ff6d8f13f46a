"""FAB, annealing and reweighted stages in the Trainer: they learn, resume bit for bit, and count
non-finite energies."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from boltzgen.config import TrainingStage
from boltzgen.training import Trainer
from tests.test_training import GaussianEnergy, InfWhereEnergy, _assert_same_state, make_generator, read_metrics

FAB = TrainingStage(loss="fab", steps=24, batch=64, lr=3e-3,
                    fab={"ais": {"intermediate": 2, "leapfrog": 3, "step_size": 0.5},
                         "replay": {"size": 1024, "min_size": 256, "updates": 4}})
FAB_FRESH = TrainingStage(loss="fab", steps=6, batch=64, lr=3e-3, fab={"ais": {"intermediate": 1}, "replay": None})
ANNEALING = TrainingStage(loss="annealing", steps=24, batch=64, lr=3e-3,
                          annealing={"temperatures": [3.0, 1.5, 1.0], "hot_fraction": 0.25, "samples": 300,
                                     "resample_every": 5})

REWEIGHTED = TrainingStage(loss="reweighted_forward_kl", steps=12, batch=64, lr=3e-3,
                           reweighting={"samples": 300, "resample_every": 5})


def trainer(out: Path, stages: list[TrainingStage], energy=None, init_seed: int = 0, data=None) -> Trainer:
    generator = make_generator(energy or GaussianEnergy(), blocks=2, hidden=(16, 16), actnorm=True, init_seed=init_seed)
    return Trainer(generator, stages, out / "checkpoint.pt", out / "metrics.csv", checkpoint_every=1000, log_every=3,
                   progress=False, data=data)


def kish(log_w: torch.Tensor) -> float:
    return float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))) / log_w.numel()


@pytest.mark.parametrize("stop_after", [7, 13, 30, 41, 61],
                         ids=["mid-replay-round", "round-start", "fresh-fab", "annealing", "reweighted"])
def test_resuming_data_free_stages_is_bit_identical(tmp_path, stop_after):
    """A run stopped anywhere (inside a round of replay updates, inside an annealing segment) and
    resumed in a new Trainer gives the same flow, metrics and diagnostics as one that never stopped:
    the checkpoint holds the replay buffer, the drawn minibatches, the HMC step sizes and the
    annealing's (and the reweighted stage's) reweighted set."""
    stages = [FAB, FAB_FRESH, ANNEALING, REWEIGHTED]
    torch.manual_seed(11)
    reference = trainer(tmp_path / "ref", stages)
    reference.run()
    torch.manual_seed(11)
    trainer(tmp_path / "run", stages).run(stop_after=stop_after)
    resumed = trainer(tmp_path / "run", stages, init_seed=99)
    torch.manual_seed(12345)  # a new process: another RNG state, replaced by the checkpoint's
    resumed.run(resume=True)
    _assert_same_state(resumed.generator.state_dict(), reference.generator.state_dict())
    def logged(path):
        return [{k: v for k, v in row.items() if k != "wall_seconds"} for row in read_metrics(path)]

    assert logged(tmp_path / "run" / "metrics.csv") == logged(tmp_path / "ref" / "metrics.csv")
    assert resumed.diagnostics == reference.diagnostics
    assert resumed.generator.energy.evaluations == reference.generator.energy.evaluations


def test_fab_and_annealing_learn_a_gaussian_without_data(tmp_path):
    for name, stage in [("fab", FAB.model_copy(update={"steps": 120, "lr": 1e-2})),
                        ("annealing", ANNEALING.model_copy(update={"steps": 120, "lr": 1e-2}))]:
        torch.manual_seed(0)
        t = trainer(tmp_path / name, [stage])
        with torch.no_grad():
            start = t.generator.sample(4000)
        t.run()
        with torch.no_grad():
            end = t.generator.sample(4000)

        def ess(log_w):
            return float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))) / log_w.numel()

        assert ess(end.log_w) > max(0.8, ess(start.log_w) + 0.2), name
        rows = t.diagnostics
        assert rows and rows[-1]["step"] == 120
        key = "ais_ess" if name == "fab" else "temperature"
        assert all(key in row for row in rows if row["stage"] == 0)


def test_reweighted_forward_kl_corrects_a_flow_fitted_to_biased_data(tmp_path):
    """Data drawn off the target (shifted by 0.6 sigma per dimension) leave a forward-KL flow at
    their mean; refitting the flow's own samples reweighted toward p moves it onto p."""
    energy = GaussianEnergy()
    shifted = energy.mu + 0.6 * energy.sigma
    data = (shifted + energy.sigma * torch.randn(4000, energy.dim, generator=torch.Generator().manual_seed(3),
                                                 dtype=torch.float64)).float()
    fit = TrainingStage(loss="forward_kl", steps=200, batch=256, lr=1e-2)
    refit = TrainingStage(loss="reweighted_forward_kl", steps=200, batch=256, lr=3e-3,
                          reweighting={"samples": 4000, "resample_every": 20})
    flows = {}
    for name, stages in [("fit", [fit]), ("refit", [fit, refit])]:
        torch.manual_seed(0)
        t = trainer(tmp_path / name, stages, energy=energy, data=data)
        t.run()
        with torch.no_grad():
            flows[name] = t.generator.sample(20000)
    before, after = kish(flows["fit"].log_w), kish(flows["refit"].log_w)
    assert before < 0.75 and after > max(0.9, before + 0.15), (before, after)
    offset = (flows["refit"].x.double().mean(0) - energy.mu).abs().max()
    assert float(offset) < 0.15 * energy.sigma


def test_reweighted_forward_kl_warns_once_when_the_flows_weights_are_unusable(tmp_path, capsys):
    far = GaussianEnergy(mu=(6.0, -6.0), sigma=0.3)  # the untrained flow's weights: ESS ~0
    trainer(tmp_path / "far", [REWEIGHTED], energy=far).run()
    err = capsys.readouterr().err
    assert err.count("warning: reweighted_forward_kl") == 1 and "Train longer by forward KL" in err
    trainer(tmp_path / "near", [REWEIGHTED]).run()  # the untrained flow on the default target
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("stage", [FAB, FAB_FRESH, ANNEALING, REWEIGHTED],
                         ids=["fab", "fab-no-buffer", "annealing", "reweighted"])
def test_a_data_free_stage_counts_nonfinite_energies_and_never_zeroes_them(tmp_path, stage):
    """u = +inf where x0 > 0.5 (a third of the flow's samples at first): the stage trains on, its
    losses stay finite, and every non-finite energy it met is counted in the metrics."""
    t = trainer(tmp_path, [stage], energy=InfWhereEnergy(threshold=0.5))
    t.run()
    rows = read_metrics(tmp_path / "metrics.csv")
    counts = [int(r["n_nonfinite"]) for r in rows]
    assert t.n_nonfinite > 0 and counts == sorted(counts) and counts[-1] == t.n_nonfinite
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert all(torch.isfinite(p).all() for p in t.generator.parameters())


def test_a_stage_whose_every_energy_is_nonfinite_says_so(tmp_path):
    t = trainer(tmp_path, [FAB_FRESH], energy=InfWhereEnergy(threshold=-1e9))
    with pytest.raises(FloatingPointError, match="non-finite"):
        t.run()


def test_truncated_log_weights_cap_each_weight_at_sqrt_n_times_the_mean():
    """Ionides' rule: no weight above sqrt(N) times the mean of the untruncated weights; those below
    are untouched, zero weights stay zero, and a set with no outlier is returned unchanged."""
    from boltzgen.stages.annealing import truncate_log_weights

    log_w = torch.tensor([0.0] * 99 + [20.0, -math.inf], dtype=torch.float64)
    cut, n_cut = truncate_log_weights(log_w)
    cap = math.log((99 + math.exp(20.0)) / 101 * math.sqrt(101))
    assert n_cut == 1 and cut[99].item() == pytest.approx(cap, abs=1e-12)
    assert torch.equal(cut[:99], log_w[:99]) and cut[100].item() == -math.inf
    flat = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.3
    same, none_cut = truncate_log_weights(flat)
    assert none_cut == 0 and torch.equal(same, flat)


def test_reweighted_forward_kl_with_truncated_weights_still_corrects_a_biased_fit(tmp_path):
    """The cut weights still pull a flow fitted to shifted data onto p (as without the cut), and the
    diagnostics count the weights cut."""
    energy = GaussianEnergy()
    data = (energy.mu + 0.6 * energy.sigma + energy.sigma * torch.randn(
        4000, energy.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)).float()
    fit = TrainingStage(loss="forward_kl", steps=200, batch=256, lr=1e-2)
    refit = TrainingStage(loss="reweighted_forward_kl", steps=200, batch=256, lr=3e-3,
                          reweighting={"samples": 4000, "resample_every": 20, "truncate_weights": True})
    torch.manual_seed(0)
    t = trainer(tmp_path / "cut", [fit, refit], energy=energy, data=data)
    t.run()
    with torch.no_grad():
        assert kish(t.generator.sample(20000).log_w) > 0.9
    refit_rows = [row for row in t.diagnostics if row["stage"] == 1]
    assert refit_rows and all(row["weights_truncated"] >= 0 for row in refit_rows)
