"""Losses and the Trainer: lin-log cut, forward/reverse KL on a Gaussian, non-finite energies, resume."""

from __future__ import annotations

import csv
import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from boltzgen.config import FlowConfig, TrainingStage
from boltzgen.energies.base import Energy
from boltzgen.estimators.weights import kish_ess
from boltzgen.flows.build import build_flow
from boltzgen.generator import BoltzmannGenerator
from boltzgen.training import METRIC_FIELDS, Trainer, forward_kl_loss, lin_log_cut, reverse_kl_loss

MU = (1.0, -1.0)
SIGMA = 0.7


class GaussianEnergy(Energy):
    """u(x) = |x - mu|^2 / (2 s^2); Z = (2 pi s^2)^(d/2)."""

    def __init__(self, mu=MU, sigma: float = SIGMA) -> None:
        super().__init__(dim=len(mu))
        self.register_buffer("mu", torch.tensor(mu, dtype=torch.float64))
        self.sigma = sigma

    def reduced_energy(self, x):
        return ((x - self.mu.to(x)) ** 2).sum(1) / (2 * self.sigma**2)

    @property
    def log_z(self) -> float:
        return 0.5 * self.dim * math.log(2 * math.pi * self.sigma**2)


class InfWhereEnergy(GaussianEnergy):
    """The Gaussian, but +inf where x0 > threshold (a "clash"); remembers its last input."""

    def __init__(self, threshold: float = 1.0, value: float = math.inf) -> None:
        super().__init__(mu=(0.0, 0.0), sigma=1.0)
        self.threshold = threshold
        self.value = value
        self.last_x = None

    def reduced_energy(self, x):
        self.last_x = x.detach().clone()
        u = super().reduced_energy(x)
        return torch.where(x[:, 0] > self.threshold, torch.full_like(u, self.value), u)


def make_generator(energy: Energy, blocks: int = 4, hidden=(32, 32), actnorm: bool = False, init_seed: int = 0):
    """A small real_nvp generator; ``init_seed`` seeds the initial weights (the architecture is fixed)."""
    torch.manual_seed(init_seed)
    cfg = FlowConfig(type="real_nvp", blocks=blocks, hidden=list(hidden), actnorm=actnorm)
    prior, flow = build_flow(cfg, energy.dim, seed=0)
    return BoltzmannGenerator(prior, flow, energy)


def assert_close(actual, expected, rtol=1e-7, atol=1e-7):
    """torch.testing.assert_close without its first-call import cost (seconds on a busy machine)."""
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), (actual, expected)


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- lin-log cut -------------------------------------------------------------------------------------

def test_lin_log_cut_identity_below_u_max():
    u = torch.linspace(-50.0, 10.0, 601)
    assert_close(lin_log_cut(u, 10.0), u, rtol=0, atol=0)


def test_lin_log_cut_continuous_and_monotone():
    u_max = 10.0
    eps = 1e-9
    below, at, above = lin_log_cut(torch.tensor([u_max - eps, u_max, u_max + eps]), u_max)
    assert float(at) == u_max
    assert abs(float(below) - u_max) < 2 * eps and abs(float(above) - u_max) < 2 * eps
    u = torch.linspace(-20.0, 1e6, 200_001)
    cut = lin_log_cut(u, u_max)
    assert torch.all(torch.diff(cut) > 0)
    # the slope is continuous too: 1 below, 1 / (1 + u - u_max) above
    x = torch.tensor([u_max - 1e-6, u_max + 1e-6, u_max + 9.0], requires_grad=True)
    (grad,) = torch.autograd.grad(lin_log_cut(x, u_max).sum(), x)
    assert_close(grad, torch.tensor([1.0, 1 / (1 + 1e-6), 0.1]))


def test_lin_log_cut_grows_like_log_above_u_max():
    u_max = 5.0
    excess = torch.tensor([1e2, 1e4, 1e8, 1e16, 1e100])
    cut = lin_log_cut(u_max + excess, u_max)
    assert_close(cut, u_max + torch.log1p(excess))
    assert torch.all(cut < u_max + torch.log(excess) + 0.01)
    assert torch.isfinite(lin_log_cut(torch.tensor([1e300]), u_max)).all()


# --- forward KL ---------------------------------------------------------------------------------------

def test_forward_kl_fits_a_shifted_scaled_gaussian(tmp_path):
    mean, std = torch.tensor([1.5, -2.0]), torch.tensor([0.5, 2.0])
    gen = torch.Generator().manual_seed(1)
    data = mean + std * torch.randn(8000, 2, generator=gen)
    generator = make_generator(GaussianEnergy(), blocks=2, actnorm=False)  # no ActNorm: the couplings must learn it
    with torch.no_grad():
        nll_start = float(forward_kl_loss(generator, data))
    stage = TrainingStage(loss="forward_kl", steps=150, batch=256, lr=2e-2)
    trainer = Trainer(generator, [stage], tmp_path / "checkpoint.pt", tmp_path / "metrics.csv", data=data, checkpoint_every=1000, log_every=50, progress=False)
    trainer.run()
    with torch.no_grad():
        x = generator.sample(20_000).x
        nll = float(forward_kl_loss(generator, data))
    # Loose but real: means within 0.1 data std, stds within 10% (identity init starts at 0 and 1).
    assert torch.all((x.mean(0) - data.mean(0)).abs() < 0.1 * data.std(0)), (x.mean(0), data.mean(0))
    assert_close(x.std(0), data.std(0), atol=0, rtol=0.1)
    # The NLL at the optimum is the data's entropy, sum of 0.5 log(2 pi e s^2).
    entropy = float(0.5 * torch.log(2 * math.pi * math.e * data.var(0)).sum())
    assert abs(nll - entropy) < 0.05, (nll, entropy)
    assert nll < nll_start - 1.0


def test_forward_kl_sees_every_batch_through_augment(tmp_path):
    gen = torch.Generator().manual_seed(2)
    data = torch.tensor([1.5, -2.0]) + 0.5 * torch.randn(4000, 2, generator=gen)
    generator = make_generator(GaussianEnergy(), blocks=2, actnorm=False)
    stage = TrainingStage(loss="forward_kl", steps=150, batch=256, lr=2e-2)
    trainer = Trainer(generator, [stage], tmp_path / "checkpoint.pt", tmp_path / "metrics.csv", data=data,
                      augment=torch.neg, checkpoint_every=1000, log_every=50, progress=False)
    trainer.run()
    with torch.no_grad():
        x = generator.sample(20_000).x
    # The flow learns the mirrored data: means near (-1.5, +2.0), not the data's own.
    assert torch.all((x.mean(0) + data.mean(0)).abs() < 0.1), x.mean(0)


# --- reverse KL ---------------------------------------------------------------------------------------

def test_reverse_kl_approaches_minus_log_z_and_high_ess(tmp_path):
    energy = GaussianEnergy()
    generator = make_generator(energy, blocks=2, actnorm=False)
    stage = TrainingStage(loss="reverse_kl", steps=150, batch=256, lr=2e-2)
    trainer = Trainer(generator, [stage], tmp_path / "checkpoint.pt", tmp_path / "metrics.csv", checkpoint_every=1000, log_every=50, progress=False)
    trainer.run()
    with torch.no_grad():
        s = generator.sample(20_000)
    rkl = float((s.u + s.log_q).mean())
    # E_q[u + log q] = KL(q||p) - log Z >= -log Z, with equality at q = p.
    assert rkl >= -energy.log_z - 0.01
    assert abs(rkl - (-energy.log_z)) < 0.02, (rkl, -energy.log_z)
    assert kish_ess(s.log_w.numpy()) > 0.9
    assert_close(s.x.mean(0), torch.tensor(MU), atol=0.05, rtol=0)


def test_reverse_kl_steps_reduce_the_kl(tmp_path):
    """The sign: gradient steps on the reverse KL make it smaller (on average, and on fixed latents)."""
    energy = GaussianEnergy()
    generator = make_generator(energy, blocks=2, actnorm=False)
    # One small gradient step on a fixed latent batch (common random numbers) must lower that batch's loss.
    z = generator.prior.sample(4096)

    def loss_at_fixed_z():
        x, logdet = generator.flow(z)
        return (energy(x) + generator.prior.log_prob(z) - logdet).mean()

    before = loss_at_fixed_z()
    params = list(generator.parameters())
    grads = torch.autograd.grad(before, params)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= 1e-3 * g
        after = loss_at_fixed_z()
    assert float(after) < float(before.detach())

    # Through the Trainer: from N(0, I) the reverse KL starts near KL - log Z = 2.37 - 1.12 and falls.
    stage = TrainingStage(loss="reverse_kl", steps=100, batch=256, lr=3e-3, lr_schedule="constant")
    Trainer(generator, [stage], tmp_path / "checkpoint.pt", tmp_path / "metrics.csv", checkpoint_every=1000, log_every=1, progress=False).run()
    kl = np.array([float(r["reverse_kl"]) for r in read_metrics(tmp_path / "metrics.csv")])
    quarters = kl.reshape(4, 25).mean(1)
    assert np.all(np.diff(quarters) < 0), quarters
    assert kl[-10:].mean() < kl[:5].mean() - 1.0, kl
    assert kl[-10:].mean() > -energy.log_z - 0.05  # never below the bound (up to noise)


def test_mixed_loss_is_the_weighted_sum(tmp_path):
    energy = GaussianEnergy()
    data = torch.tensor(MU) + SIGMA * torch.randn(2000, 2)
    generator = make_generator(energy, blocks=2)
    stage = TrainingStage(loss="mixed", forward_weight=0.5, reverse_weight=2.0, steps=20, batch=64)
    Trainer(generator, [stage], tmp_path / "checkpoint.pt", tmp_path / "metrics.csv", data=data, checkpoint_every=100, log_every=5, progress=False).run()
    for row in read_metrics(tmp_path / "metrics.csv"):
        expected = 0.5 * float(row["forward_nll"]) + 2.0 * float(row["reverse_kl"])
        assert abs(float(row["loss"]) - expected) < 1e-9


# --- non-finite energies ----------------------------------------------------------------------------

def test_reverse_kl_excludes_and_counts_nonfinite_energies():
    energy = InfWhereEnergy(threshold=1.0)
    generator = make_generator(energy, blocks=2)
    loss, log_w, n_nonfinite = reverse_kl_loss(generator, 2000, u_max=1e4)
    x = energy.last_x
    bad = x[:, 0] > 1.0
    assert n_nonfinite == int(bad.sum()) > 100  # about 16% of a standard normal
    assert torch.isfinite(loss)
    assert torch.all(torch.isneginf(log_w[bad])) and torch.all(torch.isfinite(log_w[~bad]))
    with torch.no_grad():
        log_q = generator.log_prob(x)
        u = GaussianEnergy(mu=(0.0, 0.0), sigma=1.0).reduced_energy(x)
    assert_close(loss.detach(), (u[~bad] + log_q[~bad]).mean(), rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(loss, list(generator.parameters()), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("value", [math.inf, math.nan, 1e300], ids=["inf", "nan", "huge"])
def test_trainer_survives_and_counts_nonfinite_energies(tmp_path, value):
    energy = InfWhereEnergy(threshold=1.5, value=value)
    generator = make_generator(energy, blocks=2)
    stage = TrainingStage(loss="reverse_kl", steps=20, batch=256, lr=1e-3, u_max=100.0)
    trainer = Trainer(generator, [stage], tmp_path / "checkpoint.pt", tmp_path / "metrics.csv", checkpoint_every=100, log_every=5, progress=False)
    trainer.run()
    rows = read_metrics(tmp_path / "metrics.csv")
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert all(torch.isfinite(p).all() for p in generator.parameters())
    counts = [int(r["n_nonfinite"]) for r in rows]
    if math.isfinite(value):  # a huge but finite energy is cut lin-log, not excluded
        assert trainer.n_nonfinite == 0 and counts == [0] * len(counts)
    else:
        assert trainer.n_nonfinite > 0 and counts == sorted(counts) and counts[-1] == trainer.n_nonfinite


def test_reverse_kl_with_every_energy_nonfinite_raises():
    generator = make_generator(InfWhereEnergy(threshold=-1e9), blocks=2)
    with pytest.raises(FloatingPointError):
        reverse_kl_loss(generator, 64, u_max=1e4)


# --- checkpoints and resume --------------------------------------------------------------------------

STAGES = [
    TrainingStage(loss="forward_kl", steps=30, batch=64, lr=3e-3),
    TrainingStage(loss="mixed", forward_weight=0.5, reverse_weight=1.0, steps=30, batch=64, lr=1e-3),
]


def _data() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.tensor(MU) + torch.tensor([0.5, 1.5]) * torch.randn(1000, 2, generator=gen)


def _trainer(out_dir: Path, init_seed: int = 0) -> Trainer:
    generator = make_generator(GaussianEnergy(), blocks=2, hidden=(16, 16), actnorm=True, init_seed=init_seed)
    return Trainer(generator, STAGES, out_dir / "checkpoint.pt", out_dir / "metrics.csv", data=_data(), checkpoint_every=10, log_every=5, progress=False)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _assert_metric_rows(path: Path, total: int, every: int) -> list[dict[str, str]]:
    rows = read_metrics(path)
    assert list(rows[0].keys()) == METRIC_FIELDS
    assert [int(r["step"]) for r in rows] == list(range(every, total + 1, every))
    return rows


@pytest.fixture
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    torch.manual_seed(123)
    trainer = _trainer(out)
    trainer.run()
    return trainer, out


@pytest.mark.parametrize("stop_after", [23, 30, 40])
def test_resume_after_stop_equals_uninterrupted_run(tmp_path, uninterrupted, stop_after):
    reference, ref_dir = uninterrupted
    torch.manual_seed(123)
    first = _trainer(tmp_path)
    first.run(stop_after=stop_after)
    assert first.step == stop_after
    # A new process: other initial weights and RNG state, both to be replaced by the checkpoint's.
    second = _trainer(tmp_path, init_seed=999)
    second.run(resume=True)
    assert second.step == reference.step == 60
    _assert_same_state(second.generator.state_dict(), reference.generator.state_dict())
    rows = _assert_metric_rows(tmp_path / "metrics.csv", 60, 5)
    ref_rows = read_metrics(ref_dir / "metrics.csv")
    for row, ref in zip(rows, ref_rows):
        for key in ("loss", "forward_nll", "reverse_kl", "ess", "lr", "grad_norm", "n_nonfinite", "energy_evaluations"):
            assert row[key] == ref[key], (row["step"], key)


def test_ctrl_c_checkpoints_at_the_step_boundary_and_resumes_bit_for_bit(tmp_path, uninterrupted):
    """Ctrl-C (a real SIGINT) in the middle of step 36 lets that step finish, checkpoints there and stops."""
    reference, _ = uninterrupted
    trainer = _trainer(tmp_path)
    original = trainer.train_step

    def interrupted_step(*args):
        result = original(*args)
        if trainer.step == 35:  # inside step 36, after its loss: the worst moment
            os.kill(os.getpid(), signal.SIGINT)
        return result

    trainer.train_step = interrupted_step
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 36  # the interrupted step completed; 36 is not a periodic checkpoint step
    second = _trainer(tmp_path, init_seed=999)
    second.run(resume=True)
    assert second.step == 60
    _assert_same_state(second.generator.state_dict(), reference.generator.state_dict())
    _assert_metric_rows(tmp_path / "metrics.csv", 60, 5)


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    trainer = _trainer(tmp_path)
    original = trainer.train_step

    def interrupted_twice(*args):
        if trainer.step == 23:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args)

    trainer.train_step = interrupted_twice
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs as a background job
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 20  # the periodic one
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_resume_after_hard_crash_truncates_metrics(tmp_path, uninterrupted):
    """A crash after the last checkpoint leaves metric rows past it: resuming drops and redoes them."""
    reference, _ = uninterrupted
    torch.manual_seed(123)
    _trainer(tmp_path).run(stop_after=20)
    shutil.copy(tmp_path / "checkpoint.pt", tmp_path / "step20.pt")
    _trainer(tmp_path).run(resume=True, stop_after=28)  # logs 25 and checkpoints 28
    assert [int(r["step"]) for r in read_metrics(tmp_path / "metrics.csv")][-1] == 25
    shutil.copy(tmp_path / "step20.pt", tmp_path / "checkpoint.pt")  # as if the process died before step 28's save
    (tmp_path / "step20.pt").unlink()
    second = _trainer(tmp_path, init_seed=999)
    second.run(resume=True)
    assert second.step == 60
    _assert_metric_rows(tmp_path / "metrics.csv", 60, 5)
    _assert_same_state(second.generator.state_dict(), reference.generator.state_dict())


def test_resume_of_a_finished_run_does_nothing(tmp_path, uninterrupted):
    reference, _ = uninterrupted
    torch.manual_seed(123)
    _trainer(tmp_path).run()
    second = _trainer(tmp_path, init_seed=5)
    second.run(resume=True)
    assert second.step == 60
    _assert_same_state(second.generator.state_dict(), reference.generator.state_dict())
    _assert_metric_rows(tmp_path / "metrics.csv", 60, 5)


def test_checkpoint_contents_and_no_temp_files(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.run(stop_after=20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "metrics.csv"]
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 20
    assert {"model", "optimizer", "torch_rng", "energy_evaluations", "wall_seconds", "n_nonfinite"} <= state.keys()
    _assert_same_state(state["model"], trainer.generator.state_dict())


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A save that dies half way leaves the previous checkpoint intact and no temporary file."""
    trainer = _trainer(tmp_path)
    trainer.run(stop_after=10)
    good = (tmp_path / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    trainer.step = 11
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "checkpoint.pt").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "metrics.csv"]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 10
