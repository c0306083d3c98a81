"""Training on several processes: which one this is, who writes, and where they wait.

    torchrun --nproc-per-node 4 -m distill.cli train --data labelled.jsonl --output runs/s
    accelerate launch --multi-gpu --num-processes 4 -m distill.cli train --data ... --output runs/s
    torchrun --nproc-per-node 2 -m distill.cli train --device cpu ...   # gloo, on the CPU

The launcher sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them this is one process
and every function here is a no-op. Every process reads the data, builds the same model and
trains it; the Trainer wraps it in DistributedDataParallel and gives each process its share of
the batches. Only rank 0 writes the run directory (the emptiness check and ``--overwrite``, the
layer-dropped base, the adapter, the merged model, its card, the run record); the others wait at
a barrier and read what it wrote. The Trainer's checkpoints are written by rank 0 too, except
``rng_state_<rank>.pth``, which each process saves for itself so ``--resume`` restores it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Ranks:
    """This process's place among those the launcher started."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether there are several processes."""
        return self.world_size > 1


def ranks() -> Ranks:
    """The ranks the launcher (torchrun, accelerate launch) set in the environment."""
    return Ranks(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def start(cuda: bool) -> Ranks:
    """Join the process group (NCCL on GPUs, gloo on the CPU) before anything is written.

    The Trainer would join it later, when it is built; joining now lets rank 0 check and
    prepare the run directory while the others wait. On GPUs, each process takes the device of
    its local rank.
    """
    here = ranks()
    if not here.distributed:
        return here
    import torch
    import torch.distributed as dist

    if cuda:
        torch.cuda.set_device(here.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return here


def barrier() -> None:
    """Wait for every process (nothing to wait for in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first; the others run it once rank 0 is through.

    For a step that writes a file once and reads it everywhere: rank 0 writes it, the others
    find it written.
    """
    here = ranks()
    if not here.main:
        barrier()
    yield
    if here.main:
        barrier()


def from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every process (where they may differ: a tuned batch size)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def finish() -> None:
    """Leave the process group once every process is through."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
