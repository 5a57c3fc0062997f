"""Splitting the items over processes: torch.distributed ranks, or independent ``--shard i/n``
jobs of a scheduler's job array.

Both cut the same deterministic way: whole batches (or evaluation groups) go round-robin, so
every item sees the same batch companions as in a single process and the predictions are
identical. Ranks then sum their statistics with an all-reduce and gather predictions, and
only rank 0 writes; shards write their own statistics, which ``merge`` adds (see
:func:`culture_neurons.stats.merge_shards`).

With ``identify_on="correct"`` the recorded items are those the full model answers right:
ranks share their predictions first, so the correct items are batched exactly as in one
process (identical statistics); a shard cannot see the others' predictions and batches its
own correct items among themselves (the same items, other batch companions: counts and sums
agree with one process up to the rounding of activations within float error of 0).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch

from culture_neurons.errors import UsageError
from culture_neurons.stats import Stats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Partition:
    index: int = 0
    count: int = 1
    ranks: bool = False  # True: torch.distributed ranks (collectives available)

    @property
    def main(self) -> bool:
        return self.index == 0 or not self.ranks

    @property
    def sharded(self) -> bool:
        return self.count > 1

    @property
    def tag(self) -> str:
        """Suffix of per-part progress files ("" for a single process)."""
        return f"-{self.index}of{self.count}" if self.sharded else ""

    def mine(self, seq: list, unit: int) -> list:
        """The elements of ``seq`` in this part: blocks of ``unit`` dealt round-robin."""
        return [x for j, x in enumerate(seq) if (j // unit) % self.count == self.index]

    def owns(self, block: int) -> bool:
        return block % self.count == self.index

    # -- collectives (ranks only) -------------------------------------------------------
    def all_reduce_stats(self, stats: Stats) -> Stats:
        """Sum of every rank's statistics (exact for the integer counts)."""
        if not self.ranks:
            return stats
        import torch.distributed as dist

        device = _collective_device()
        for name in ("T", "K", "S", "Q", "items"):
            t = getattr(stats, name).to(device)
            dist.all_reduce(t)
            setattr(stats, name, t.cpu())
        return stats

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
        if not self.ranks:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.count
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.ranks:
            import torch.distributed as dist

            dist.barrier()


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def exit_process(code: int) -> None:
    """End ``python -m culture_neurons`` with ``code``. Under torchrun (a process group
    started), without the interpreter's teardown: there a rank aborted now and then after its
    work was done and written ("terminate called without an active exception", SIGABRT, with
    no Python frame left; 1 in 10-25 runs of two gloo ranks, even with the group destroyed
    first), and torchrun then failed the whole job. Output is flushed first."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def partition(shard: str | None = None) -> Partition:
    """From torchrun's environment (``WORLD_SIZE`` > 1: NCCL on GPUs, gloo on CPUs, process
    group started here if needed) or from ``--shard i/n``; else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if shard:
            raise UsageError("--shard splits work between separate jobs; under torchrun the "
                             "ranks already split it: drop --shard")  # fmt: skip
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)
        return Partition(dist.get_rank(), dist.get_world_size(), ranks=True)
    if shard:
        try:
            i, n = (int(x) for x in shard.split("/"))
        except ValueError:
            raise UsageError(f"--shard takes i/n (e.g. 0/4), got {shard!r}") from None
        if not 0 <= i < n:
            raise UsageError(f"--shard {shard}: i must be in [0, {n - 1}]")
        return Partition(i, n)
    return Partition()
