"""Recognise a torchrun launch, so the same command runs in one process or in many.

``torchrun --nproc-per-node 2 -m pipesched demo`` starts two processes with
``WORLD_SIZE=2`` and ``RANK``/``MASTER_ADDR``/``MASTER_PORT`` set; the CLI then
builds a :class:`~pipesched.distributed.DistributedPipeline` (one rank per
process) instead of a single-process :class:`~pipesched.Pipeline`.
"""

from __future__ import annotations

import os


def launched_world() -> int:
    """The number of processes torchrun started (1 when not under torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def init_process_group() -> tuple[int, int]:
    """Join torchrun's process group over gloo (once); return (rank, world size)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def finish_process_group() -> None:
    """Leave the process group cleanly: wait for every rank, then destroy it.

    Exiting with the group alive lets gloo's threads be torn down while still
    joinable, which aborts the process ("terminate called without an active
    exception") at random.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
