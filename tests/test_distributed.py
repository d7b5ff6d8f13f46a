"""boltzgen.distributed: the launch read from the environment, rank seeds, shares of the work, the
identity in one process, and a training step on 2 gloo processes that gives the gradient of one."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from boltzgen import distributed
from boltzgen.config import TrainingStage, load_config
from boltzgen.distributed import World
from boltzgen.energies.base import RestrictedEnergy
from boltzgen.errors import ConfigError, RunError
from boltzgen.runs.target import build_generator, build_target, to_flow_dtype
from boltzgen.training import Trainer
from tests.launch import spawn

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 64
#: The first rows of the fixed latent batch lie beyond this x0: infinite energy there (weight 0).
CUT_X0 = 3.5
N_CUT = 7


def test_one_process_is_the_identity() -> None:
    assert distributed.world() == World() and distributed.is_main()
    assert distributed.local_batch(7) == 7 and distributed.shard(10) == (0, 10)
    values = torch.arange(5.0)
    assert distributed.gather_cat(values) is values
    assert distributed.sum_over_ranks([3, 0.5]) == [3, 0.5] and distributed.any_rank(True)
    loss = torch.tensor(2.0)
    assert distributed.rescale_mean(loss, 3, 3) is loss
    assert distributed.gather_to_main({"a": 1}) == [{"a": 1}] and distributed.broadcast_from_main(4) == 4
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert distributed.average_gradients([p], [5]) == [5]
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    assert distributed.rank_device(torch.device("cpu")) == torch.device("cpu")


def test_env_world_reads_torchrun_variables() -> None:
    assert distributed.env_world({}) == World()
    assert distributed.env_world({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == World(3, 4, 1)
    with pytest.raises(RunError, match="WORLD_SIZE='two'"):
        distributed.env_world({"WORLD_SIZE": "two"})
    with pytest.raises(RunError, match="0 <= RANK < WORLD_SIZE"):
        distributed.env_world({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(RunError, match="MASTER_ADDR and MASTER_PORT unset"):
        distributed.start({"RANK": "0", "WORLD_SIZE": "2"})


def test_rank_seeds_are_reproducible_and_distinct() -> None:
    seeds = [distributed.rank_seed(0, rank) for rank in range(8)]
    assert seeds == [distributed.rank_seed(0, rank) for rank in range(8)]
    assert len(set(seeds)) == 8 and all(0 <= s < 2**63 for s in seeds)
    assert distributed.rank_seed(1, 0) != seeds[0] and distributed.rank_seed(0, 0, 5) != seeds[0]


def test_shares_and_batches_of_a_launch(monkeypatch) -> None:
    shares = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "_WORLD", World(rank, 3, rank))
        shares.append(distributed.shard(10))
    assert shares == [(0, 4), (4, 3), (7, 3)]
    assert distributed.local_batch(12, "training[0].batch") == 4
    with pytest.raises(ConfigError, match=r"^training\[1\].batch: 256 is not divisible by the 3 processes"):
        distributed.local_batch(256, "training[1].batch")


def test_cuda_on_a_rank_without_its_gpu_is_one_line(monkeypatch) -> None:
    monkeypatch.setattr(distributed, "_WORLD", World(rank=3, size=4, local_rank=1))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RunError, match=r"^device: rank 3 \(local rank 1\) has no GPU of its own: this node has 1"):
        distributed.rank_device(torch.device("cuda"))


def test_restore_rng_continues_or_derives_a_stream() -> None:
    torch.manual_seed(5)
    saved = distributed.rng_state()
    expected = torch.rand(3)
    torch.manual_seed(99)
    distributed.restore_rng([saved])  # as many ranks as now: the stream continues exactly
    assert torch.equal(torch.rand(3), expected)
    other = {"cpu": torch.random.default_generator.get_state(), "cuda": None}
    distributed.restore_rng([saved, other])  # saved by 2 ranks, resumed by 1: a new stream from them
    derived = torch.rand(3)
    distributed.restore_rng([saved, other])
    assert torch.equal(torch.rand(3), derived) and not torch.equal(derived, expected)


# --- two gloo processes ---------------------------------------------------------------------------

def _problem(loss: str, tmp: Path) -> tuple[Trainer, torch.Tensor, torch.Tensor]:
    """A small double-well flow (float64), its trainer, and a fixed global batch of data and latents.

    Energies beyond x0 = CUT_X0 are infinite, and the first N_CUT latents lie there, all in rank
    0's share: the reverse KL must average over the finite samples of the whole batch.
    """
    config, _ = load_config(ROOT / "systems" / "double_well.yaml",
                            ["flow.blocks=2", "flow.hidden=[16,16]", "flow.bins=4", "dtype=float64", "device=cpu"])
    target = build_target(config)
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(1024, 2, generator=gen, dtype=torch.float64) * 0.5 + torch.tensor([1.0, 0.0])
    torch.manual_seed(0)
    generator = build_generator(config, target, data)
    to_flow_dtype(generator, torch.device("cpu"), torch.float64)
    generator.energy = RestrictedEnergy(target.energy, lambda x: x[:, 0] < CUT_X0)
    stage = TrainingStage(loss=loss, steps=1, batch=GLOBAL_BATCH, lr=1e-3, grad_clip=1e6, forward_weight=0.5)
    trainer = Trainer(generator, [stage], tmp / "checkpoint.pt", tmp / "metrics.csv", data=data, log_every=1,
                      progress=False)
    trainer._initialize_from_data()
    x = data[torch.randint(0, len(data), (GLOBAL_BATCH,), generator=gen)]
    z = torch.randn(GLOBAL_BATCH, 2, generator=gen, dtype=torch.float64)
    z[:N_CUT, 0] = 4 * CUT_X0  # beyond the cut in x, whatever the initialization scaled
    return trainer, x, z


def _step_on_share(loss: str, tmp: Path) -> dict:
    """One training step on this rank's share of the fixed global batch: the gradients and the row."""
    trainer, x, z = _problem(loss, tmp)
    world = distributed.world()
    share = slice(world.rank * GLOBAL_BATCH // world.size, (world.rank + 1) * GLOBAL_BATCH // world.size)
    trainer._data_batch = lambda n: x[share]
    trainer.generator.prior.sample = lambda n: z[share]
    row = trainer._step(time.perf_counter())
    return {"grads": [p.grad.clone() for p in trainer.generator.parameters()], "row": row}


def _step_worker(rank: int, loss: str, out: str) -> None:
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    result = _step_on_share(loss, Path(out) / f"rank{rank}")
    torch.save(result, Path(out) / f"rank{rank}.pt")


@pytest.mark.parametrize("loss", ["mixed", "reverse_kl"])
def test_two_ranks_give_the_gradient_of_the_global_batch(tmp_path: Path, loss: str) -> None:
    one = _step_on_share(loss, tmp_path)
    spawn(_step_worker, 2, loss, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    reference = torch.cat([g.reshape(-1) for g in one["grads"]])
    for result in ranks:  # every rank holds the same averaged gradient
        flat = torch.cat([g.reshape(-1) for g in result["grads"]])
        assert float((flat - reference).norm() / reference.norm()) < 1e-6
    row, row1 = ranks[0]["row"], one["row"]
    assert row["n_nonfinite"] == row1["n_nonfinite"] == N_CUT
    for key in ("loss", "reverse_kl", "ess", "grad_norm"):
        assert row[key] == pytest.approx(row1[key], rel=1e-9), key
    assert row["energy_evaluations"] == row1["energy_evaluations"] == GLOBAL_BATCH
    if loss == "mixed":
        assert row["forward_nll"] == pytest.approx(row1["forward_nll"], rel=1e-9)
    else:
        assert np.isnan(row["forward_nll"]) and np.isnan(row1["forward_nll"])


def _collectives_worker(rank: int, out: str) -> None:
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad = torch.full((3,), float(rank + 1))  # 1 and 2: the mean is 1.5
    b.grad = torch.ones(3) if rank == 1 else None  # a gradient on one rank only
    counts = distributed.average_gradients([a, b, c], [70_000 + rank, 3])
    shares = distributed.gather_cat(torch.tensor([float(rank)]))
    total = distributed.rescale_mean(torch.tensor(1.0), 1 + rank, 3)
    torch.save({"a": a.grad, "b": b.grad, "c": c.grad, "counts": counts, "shares": shares, "scaled": total,
                "any": distributed.any_rank(rank == 1), "objects": distributed.gather_to_main(rank),
                "sent": distributed.broadcast_from_main(f"from {rank}")}, Path(out) / f"rank{rank}.pt")


def test_collectives_on_two_ranks(tmp_path: Path) -> None:
    spawn(_collectives_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank, got in enumerate(ranks):
        assert torch.equal(got["a"], torch.full((3,), 1.5)) and torch.equal(got["b"], torch.full((3,), 0.5))
        assert got["c"] is None and got["counts"] == [140_001, 6]  # beyond 2^16: carried exactly in limbs
        assert torch.equal(got["shares"], torch.tensor([0.0, 1.0])) and got["any"] and got["sent"] == "from 0"
        assert float(got["scaled"]) == pytest.approx(2 * (1 + rank) / 3)
    assert ranks[0]["objects"] == [0, 1] and ranks[1]["objects"] is None


def _gloo_threads() -> list[str]:
    tasks = Path("/proc/self/task")
    return [name for name in ((task / "comm").read_text().strip() for task in tasks.iterdir()) if "gloo" in name]


def _teardown_worker(rank: int, out: str) -> None:
    alive = _gloo_threads()
    torch.optim.Adam(torch.nn.Linear(2, 2).parameters(), fused=True)  # as training does, inside the launch
    distributed.stop()
    Path(out, f"rank{rank}.txt").write_text(f"{len(alive)} {','.join(_gloo_threads())}")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through /proc")
def test_leaving_a_launch_ends_the_gloo_threads(tmp_path: Path) -> None:
    """An optimizer built inside a launch must not keep the process group alive past stop(): its gloo
    threads would then be torn down at interpreter exit, where a rank can abort in C++."""
    spawn(_teardown_worker, 2, str(tmp_path))
    for rank in range(2):
        during, after = (tmp_path / f"rank{rank}.txt").read_text().split(" ")
        assert int(during) > 0  # the check can see gloo's threads
        assert after == "", f"rank {rank}: gloo threads alive after stop(): {after}"
