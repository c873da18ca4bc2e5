"""`stemma build` in several processes: data-parallel training of the build methods that support it.

```
stemma build --nproc N ──launch──▶ N processes (torch's elastic launcher, as torchrun --standalone), or torchrun
   rank 0: the build as in one process (pre-flight, curation, registry, store, evaluation), and for each node whose
   │       method is data-parallel: send a `Job` ──▶ ranks 1..N-1 run the same method on the same inputs
   │       (`BuildContext.world`): DDP all-reduces the gradients, each rank computes its share of every batch
   ├─ ranks 1..N-1: compute only; their outputs are discarded; they write nothing but wait for the next job
   └─ rank 0 done: `None` sent, every rank exits 0. A failure anywhere ends that process with an error; the
      launcher tears the group down, and running the build again resumes from rank 0's last checkpoint.
```

The number of processes is no part of a recipe (`stemma.train.parallel` says why), so a version built with N
processes is reused by a build with any other N. What must hold for N is checked in the pre-flight: every part of a
data-parallel node's batch is a multiple of N.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import SpecError, StemmaError
from .train.parallel import ONE, World


@dataclass(frozen=True)
class Job:
    """What ranks other than 0 need to run a node's method as rank 0 does (the spec gives method and config)."""

    node: str
    parent: str | None
    """The parent version's id."""
    dataset_id: str | None
    replay_dataset_id: str | None
    key: str
    """The recipe key: the work directory the checkpoints are in."""


_world: World = ONE
"""The processes this build runs in (`lead` sets it for rank 0's build)."""


def build_world() -> World:
    """The processes the current build runs in (one, outside `lead`)."""
    return _world


def preflight(spec, targets: set[str], world: World) -> None:
    """Refuse (one line, before anything is written) a data-parallel node whose batch ``world`` cannot share evenly:
    each process must take the same rows of every part of the global batch, or the gradients would differ."""
    from .methods import get

    if world.size == 1:
        return
    for path in spec.order:
        node = spec.nodes[path]
        method = get(node.method)
        if path not in targets or not method.data_parallel:
            continue
        parts = {k: n for k, n in method.batch_parts(node.config).items() if n}
        if any(n % world.size for n in parts.values()):
            rows = " + ".join(f"{n} {k}" for k, n in parts.items())
            raise SpecError(f"node {path}: batch_size {node.config.batch_size} ({rows} rows) cannot be shared evenly "
                            f"by {world.size} processes; choose one whose parts are multiples of {world.size}")


def announce(method, node: str, parent_id: str | None, datasets: dict[str, str], key: str) -> World:
    """Rank 0, before running ``method`` for ``node``: the world it trains with. A data-parallel method in a build
    of several processes sends the `Job` to the others, which run it alongside; any other runs in rank 0 alone."""
    world = build_world()
    if world.size == 1 or not method.data_parallel:
        return ONE
    _send(Job(node, parent_id, datasets.get("train"), datasets.get("replay"), key))
    return world


@contextmanager
def lead(world: World):
    """Rank 0's side of a build in several processes: `announce` sends jobs inside it; leaving it without an error
    tells the other ranks the build is done. After an error nothing is sent (the others may be inside a collective
    of their own): the process exits with the error and the launcher ends the group."""
    global _world
    _world = world
    try:
        yield world
    finally:
        _world = ONE
    if world.size > 1:
        _send(None)


def follow(world: World, spec) -> int:
    """Ranks 1..N-1: run each job rank 0 sends with the same inputs, writing nothing, until it sends ``None``.
    Returns the exit status: 0, or 1 when rank 0 ended first (it failed and says why, or it was killed)."""
    from .methods import get
    from .train.registry import BuildContext
    from .workspace import Workspace

    ws = None
    while True:
        try:
            job = _receive()
        except RuntimeError:  # rank 0 is gone
            return 1
        if job is None:
            return 0
        ws = ws or Workspace.open()  # after rank 0's pre-flight: the registry and the datasets are there
        node = spec.nodes[job.node]
        ctx = BuildContext(ws=ws, node=job.node, spec_dir=spec.root_dir,
                           parent=ws.version(job.parent) if job.parent else None, dataset_id=job.dataset_id,
                           replay_dataset_id=job.replay_dataset_id, work_dir=ws.settings.work_dir / job.key,
                           world=world)
        get(node.method).run(ctx, node.config)


def _send(job: Job | None) -> None:
    import torch.distributed as dist

    dist.broadcast_object_list([job], src=0)


def _receive() -> Job | None:
    import torch.distributed as dist

    box: list[Job | None] = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def launch(nproc: int, args: list[str]) -> int:
    """Run ``stemma`` ``args`` in ``nproc`` processes on this machine, as ``torchrun --standalone`` would (a free
    loopback port, no restarts: a process that dies ends them all), each with its share of the cores. Returns the
    exit status: 0, or the first failed process's."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .train.parallel import threads_per_process

    if nproc < 1:
        raise StemmaError(f"--nproc must be at least 1, got {nproc}")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(nproc)))
    # The processes report their own errors; the launcher's log would only repeat that one failed.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"stemma-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
                          start_method="spawn")
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "stemma.cli", *args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0
