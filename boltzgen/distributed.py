"""Distributed runs over ``torch.distributed``: one process per rank, launched by ``torchrun``.

``torchrun --nproc_per_node N -m boltzgen train CONFIG`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`launched` joins them
into one process group: gloo carries CPU tensors, NCCL CUDA tensors. Without those variables, or
with one process, no group is made and every helper here is the identity, so a plain
``boltzgen train`` runs exactly as it did before, bit for bit.

The conventions of a distributed run:

- batch sizes in the config are global; each rank takes ``batch / world size`` (:func:`local_batch`);
- each rank draws from its own random stream, seeded by :func:`rank_seed` from the seed and its rank;
- only rank 0 (:func:`is_main`) writes files, progress bars and metrics;
- the flow's parameters are the same on every rank: they start from rank 0's
  (:func:`broadcast_module`) and every rank takes the same step, since :func:`average_gradients`
  gives each the mean gradient over the global batch;
- the run directory lies on a file system that every rank sees.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from boltzgen.errors import ConfigError, RunError

T = TypeVar("T")

#: How long a rank waits at a collective. Long on purpose: the other ranks wait at a barrier while
#: rank 0 runs the MD baseline alone, which can take hours; a rank that dies ends the launch anyway
#: (torchrun stops the others).
PROCESS_GROUP_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class World:
    """This process's place in the launch: ``rank`` of ``size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files, progress bars and metrics."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


_WORLD = World()
#: A gloo group over every rank when the default group is NCCL's for CUDA (gloo's monitored barrier).
_GLOO_GROUP: Any = None


def world() -> World:
    """The launch this process belongs to (one process, rank 0, outside :func:`launched`)."""
    return _WORLD


def is_main() -> bool:
    return _WORLD.is_main


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "")
    if text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise RunError(f"environment variable {name}={text!r} is not a whole number; launch with torchrun, "
                       "which sets it") from None


def env_world(env: Mapping[str, str] | None = None) -> World:
    """The rank, world size and local rank that torchrun put into the environment (``env``)."""
    env = os.environ if env is None else env
    size, rank = _env_int(env, "WORLD_SIZE", 1), _env_int(env, "RANK", 0)
    local_rank = _env_int(env, "LOCAL_RANK", rank)
    if size < 1 or not 0 <= rank < size or local_rank < 0:
        raise RunError(f"WORLD_SIZE={size}, RANK={rank}, LOCAL_RANK={local_rank}: not a valid launch "
                       "(0 <= RANK < WORLD_SIZE); launch with torchrun")
    return World(rank=rank, size=size, local_rank=local_rank)


def start(env: Mapping[str, str] | None = None) -> World:
    """Join the process group of a torchrun launch (nothing to join in one process) and return the world."""
    global _WORLD, _GLOO_GROUP
    found = env_world(env)
    if found.distributed and not dist.is_initialized():
        env = os.environ if env is None else env
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
        if missing:
            raise RunError(f"WORLD_SIZE={found.size} but {' and '.join(missing)} unset; launch with "
                           "torchrun --nproc_per_node N -m boltzgen ...")
        if not dist.is_available() or not dist.is_gloo_available():
            raise RunError("this torch build has no torch.distributed with gloo; run in one process")
        # Imported on first use by torch.optim, torch._dynamo keeps (from C++) about ten references to a
        # process group that exists at that moment; destroy_process_group then cannot free it, its gloo
        # threads outlive stop() and are torn down at interpreter exit, where about one launch in 30
        # died with "terminate called without an active exception". Imported before the group exists,
        # it holds none.
        import torch._dynamo  # noqa: F401

        # CPU tensors (counts, objects, CPU gradients) go over gloo, CUDA gradients over NCCL.
        cuda = torch.cuda.is_available() and dist.is_nccl_available()
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo", rank=found.rank,
                                world_size=found.size, timeout=PROCESS_GROUP_TIMEOUT)
        _GLOO_GROUP = dist.new_group(backend="gloo") if cuda else None
    _WORLD = found
    return found


def stop() -> None:
    """Leave the process group (if any); the world is one process again."""
    global _WORLD, _GLOO_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _WORLD, _GLOO_GROUP = World(), None


@contextmanager
def launched(env: Mapping[str, str] | None = None) -> Iterator[World]:
    """:func:`start`, then :func:`stop` however the block ends; after a block that ended normally
    the ranks leave together, so that none closes its connections while another still uses them."""
    found = start(env)
    try:
        yield found
        barrier()
    finally:
        stop()


# --- seeds, shares of the work, devices ------------------------------------------------------------

def rank_seed(seed: int, rank: int, *salt: int) -> int:
    """A 63-bit seed of ``rank``'s own stream, derived from ``seed`` (and ``salt``) by numpy's
    SeedSequence, so that the streams of different ranks are independent."""
    sequence = np.random.SeedSequence(int(seed), spawn_key=(int(rank), *map(int, salt)))
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def manual_seed(seed: int) -> None:
    """Seed this process: with ``seed`` itself in one process, with :func:`rank_seed` in a launch."""
    torch.manual_seed(seed if not _WORLD.distributed else rank_seed(seed, _WORLD.rank))


def reseed_ranks(seed: int) -> None:
    """Give every rank of a launch its own stream from ``seed``; nothing happens in one process,
    whose stream the caller seeded already."""
    if _WORLD.distributed:
        manual_seed(seed)


def local_batch(batch: int, where: str = "batch") -> int:
    """This rank's part of the global ``batch``; a one-line :class:`ConfigError` naming ``where``
    when the world size does not divide it."""
    size = _WORLD.size
    if batch % size:
        raise ConfigError(f"{where}: {batch} is not divisible by the {size} processes of this launch; batches "
                          f"are global and split evenly across ranks, so give a multiple of {size}")
    return batch // size


def shard(n: int) -> tuple[int, int]:
    """``(start, count)`` of this rank's contiguous share of ``n`` items (the first ``n % size`` ranks
    take one more)."""
    size, rank = _WORLD.size, _WORLD.rank
    base, extra = divmod(n, size)
    return rank * base + min(rank, extra), base + (rank < extra)


def rank_device(device: torch.device) -> torch.device:
    """The device this rank uses for ``device``: in a launch, CUDA means the GPU of its local rank,
    and a rank without one of its own is a one-line :class:`RunError`."""
    if device.type != "cuda" or not _WORLD.distributed:
        return device
    count = torch.cuda.device_count()
    if _WORLD.local_rank >= count:
        raise RunError(f"device: rank {_WORLD.rank} (local rank {_WORLD.local_rank}) has no GPU of its own: this "
                       f"node has {count}; start at most {count} processes per node (--nproc_per_node) or use "
                       "device: cpu")
    torch.cuda.set_device(_WORLD.local_rank)
    return torch.device("cuda", _WORLD.local_rank)


# --- collectives (the identity in one process) ------------------------------------------------------

def barrier() -> None:
    if _WORLD.distributed:
        dist.barrier()


def wait_for_ranks(seconds: float = 5.0) -> None:
    """Wait, at most ``seconds``, until every rank got here (on the way out after an error); a rank
    that does not come (it failed elsewhere, or is still busy) only costs the wait."""
    if not (_WORLD.distributed and dist.is_initialized()):
        return
    try:
        dist.monitored_barrier(group=_GLOO_GROUP, timeout=timedelta(seconds=seconds))
    except (RuntimeError, ValueError):
        pass


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Each of ``values`` summed over the ranks (float64; exact for counts below 2^53)."""
    if not _WORLD.distributed:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


def mean_over_ranks(values: Sequence[float]) -> list[float]:
    """Each of ``values`` averaged over the ranks (NaN stays NaN)."""
    if not _WORLD.distributed:
        return list(values)
    return [value / _WORLD.size for value in sum_over_ranks(values)]


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on some rank: so that every rank takes the same branch."""
    if not _WORLD.distributed:
        return flag
    return sum_over_ranks([float(flag)])[0] > 0


def gather_cat(values: Tensor) -> Tensor:
    """``values`` ``[n, ...]`` of every rank, concatenated in rank order (every rank gets them; every
    rank must give the same shape)."""
    if not _WORLD.distributed:
        return values
    parts = [torch.empty_like(values) for _ in range(_WORLD.size)]
    dist.all_gather(parts, values.contiguous())
    return torch.cat(parts)


def gather_to_main(obj: T) -> list[T] | None:
    """Every rank's ``obj`` (picklable), in rank order, on rank 0; ``None`` on the others."""
    if not _WORLD.distributed:
        return [obj]
    out: list[Any] | None = [None] * _WORLD.size if _WORLD.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: T) -> T:
    """Rank 0's ``obj`` (picklable) on every rank."""
    if not _WORLD.distributed:
        return obj
    box = [obj if _WORLD.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into ``module`` on every rank."""
    if not _WORLD.distributed:
        return
    for tensor in module.state_dict().values():  # detached views of the module's own storage
        if isinstance(tensor, Tensor):
            dist.broadcast(tensor, src=0)


#: Counts travel beside float32 gradients as 16-bit limbs, whose sums over up to 256 ranks stay exact.
_LIMB = 2**16


@torch.no_grad()
def average_gradients(parameters: Iterable[Tensor], counts: Sequence[int] = ()) -> list[int]:
    """Replace every gradient by its mean over the ranks, and return ``counts`` (whole numbers
    below 2^32) summed over them.

    One all-reduce of a flat tensor per dtype and device of the gradients (one in practice), which
    carries the counts and, per parameter, whether the rank had a gradient: a parameter without one
    on every rank keeps none, one with a gradient on some rank gets the mean with zeros for the
    others. When each rank's loss is the mean over its equal share of the global batch, the result
    is the gradient of the mean over the global batch.
    """
    if not _WORLD.distributed:
        return list(counts)
    params = list(parameters)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    head = [float(p.grad is not None) for p in params] + [float(part) for c in counts for part in divmod(int(c), _LIMB)]
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, grad in enumerate(grads):
        groups.setdefault((grad.dtype, grad.device), []).append(i)
    if not groups:
        head_sum = sum_over_ranks(head)
    for k, ((dtype, device), members) in enumerate(groups.items()):
        extra = [torch.tensor(head, dtype=dtype, device=device)] if k == 0 else []
        flat = torch.cat([grads[i].reshape(-1) for i in members] + extra)
        dist.all_reduce(flat)
        if k == 0:
            head_sum = flat[flat.numel() - len(head):].tolist()
        flat /= _WORLD.size
        offset = 0
        for i in members:
            grads[i].copy_(flat[offset:offset + grads[i].numel()].view_as(grads[i]))
            offset += grads[i].numel()
    for p, grad, had in zip(params, grads, head_sum):
        p.grad = grad if had > 0 else None
    limbs = head_sum[len(params):]
    return [round(hi) * _LIMB + round(lo) for hi, lo in zip(limbs[::2], limbs[1::2])]


def rescale_mean(local_mean: Tensor, local_count: int, total_count: int) -> Tensor:
    """``local_mean`` over this rank's ``local_count`` items, scaled so that its average over the
    ranks (what :func:`average_gradients` forms) is the mean over all ``total_count`` items of the
    ranks: a rank with more items counts more. The identity in one process."""
    if not _WORLD.distributed:
        return local_mean
    return local_mean * (local_count * _WORLD.size / total_count)


# --- random states in checkpoints --------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """This process's random state: ``cpu`` (torch's) and ``cuda`` (every GPU's, or ``None``)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore a state from :func:`rng_state` (the CUDA part where this process has CUDA)."""
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng(saved: Sequence[Mapping[str, Any]]) -> None:
    """Restore this rank's stream from the states a checkpoint saved, one per rank of its launch.

    With as many ranks as then, each rank continues its own stream exactly; with another number,
    each rank starts a new stream, seeded from the saved states and its rank (:func:`rank_seed`).
    """
    if len(saved) == _WORLD.size:
        set_rng_state(saved[_WORLD.rank])
        return
    digest = hashlib.sha256(b"".join(np.asarray(s["cpu"]).tobytes() for s in saved)).digest()
    torch.manual_seed(rank_seed(int.from_bytes(digest[:4], "little"), _WORLD.rank, _WORLD.size))
