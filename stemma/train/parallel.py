"""Data-parallel training: the processes one training run is shared by, as the training code sees them.

A `World` is this process's rank among ``size`` processes (one PyTorch process group, gloo on the CPU). Every
process draws the same global batch a single process would draw (`TokenStream.batch` from ``(seed, stream,
step)``) and keeps its contiguous share of the rows (`World.share`); the trained module is wrapped in
``torch.nn.parallel.DistributedDataParallel`` (`World.wrap`), whose backward all-reduces the gradients to their
mean. With equal shares, the mean over processes of each process's mean loss is the global batch's mean loss, so
every process takes the optimiser step one process would take on the whole batch, up to the order of float
additions. That is why the number of processes is no part of a recipe: the computation it describes is the same.

`ONE` is the single process: `share` keeps every row, `wrap` returns the module, reductions are the identity.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch

from ..errors import StemmaError

T = TypeVar("T", bound=Sequence)

WAIT = timedelta(days=30)
"""How long a collective waits for the other processes. Processes other than rank 0 wait while rank 0 curates data,
evaluates and publishes, which can take hours; a process that dies is noticed by the launcher (torchrun tears the
group down), not by this timeout."""


@dataclass(frozen=True)
class World:
    """This process's place among the processes that train together."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, the store and the registry."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        """The world torchrun (or `stemma build --nproc`) describes in ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return ONE
        return cls(rank=int(os.environ["RANK"]), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))

    def start(self) -> None:
        """Join the process group (gloo: stemma trains on the CPU) and use this process's share of the cores."""
        import torch.distributed as dist

        if self.size == 1:
            return
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=self.rank, world_size=self.size, timeout=WAIT)
        torch.set_num_threads(threads_per_process(int(os.environ.get("LOCAL_WORLD_SIZE", self.size))))

    def share(self, rows: T) -> T:
        """This process's contiguous share of a global batch's rows (a tensor's first dimension or a list)."""
        if self.size == 1:
            return rows
        n = len(rows)
        if n % self.size:
            raise StemmaError(f"{n} rows of a batch cannot be shared evenly by {self.size} processes; choose a "
                              f"batch_size whose own and replay rows are multiples of {self.size}")
        k = n // self.size
        return rows[self.rank * k : (self.rank + 1) * k]

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` under DistributedDataParallel, whose backward averages the gradients over the processes.

        Training code calls the returned module's forward for the trained model (DDP prepares the gradient
        reduction there); frozen teachers and references are called directly. Buffers are synchronised once, not
        before every forward: no stemma model changes a buffer in training."""
        if self.size == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, forward_sync_buffers=False)

    def step_totals(self, loss: float, tokens: int) -> tuple[float, int]:
        """(the global batch's mean loss, its tokens) from this process's mean loss and tokens."""
        if self.size == 1:
            return loss, tokens
        import torch.distributed as dist

        t = torch.tensor([loss, float(tokens)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t[0]) / self.size, int(t[1])

    def barrier(self) -> None:
        """Wait until every process gets here (e.g. until rank 0 has written a file the others read)."""
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()


ONE = World()


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (its parameter names have no ``module.`` prefix)."""
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


def threads_per_process(processes: int) -> int:
    """Compute threads for each of ``processes`` processes on this machine: ``OMP_NUM_THREADS`` if set, else the
    usable cores shared out evenly (oversubscribed cores make every process wait for the slowest)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, len(os.sched_getaffinity(0)) // max(1, processes))
