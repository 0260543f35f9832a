"""CPU ranks share the machine's cores: how many each gets, and a warning when they fight.

Every CPU rank of a pipeline runs its ops on torch's intra-op thread pool,
whose size (``torch.get_num_threads()``, by default the number of cores) is
read by each worker thread when it first computes. Two CPU ranks with the
default each try to use every core, so their ops fight for the same cores:
measured on 2 cores (benchmarks/RESULTS.md, "When a CPU pipeline pays"), a GPT-style model ran at about
half the speed it reaches with one intra-op thread per rank. The fix is one
line before the pipeline is built: ``torch.set_num_threads(cores // ranks)``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

#: Set once the warning was given: it is said once per process, however many pipelines are built.
_warned = False


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def local_processes() -> int:
    """Processes of this job on this machine (torchrun's ``LOCAL_WORLD_SIZE``), 1 outside torchrun."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def cores_per_rank(cpu_ranks: int) -> int:
    """The cores each of ``cpu_ranks`` CPU ranks (of every local process together) gets: at least 1."""
    return max(1, available_cores() // max(1, cpu_ranks))


def warn_if_oversubscribed(devices: Sequence[torch.device]) -> None:
    """Warn once per process when the CPU ranks of ``devices`` (this process's) want more threads than cores.

    ``devices``: the devices of the ranks this process runs. Other processes
    of the same torchrun job on this machine count too (``LOCAL_WORLD_SIZE``).
    """
    global _warned
    if _warned:
        return
    local = sum(1 for device in devices if device.type == "cpu")
    if local == 0:
        return
    ranks = local * local_processes()
    threads, share = torch.get_num_threads(), cores_per_rank(ranks)
    if threads <= share:
        return
    _warned = True
    warnings.warn(
        f"this CPU pipeline runs {ranks} ranks on {available_cores()} cores with {threads} intra-op threads "
        f"each, so the ranks fight for the same cores and every op runs slower. Call "
        f"torch.set_num_threads({share}) before building the pipeline (cores // CPU ranks). "
        f"On CPU, pipelining saves memory per rank but is rarely faster than plain training on the same "
        f"cores; see benchmarks/RESULTS.md, 'When a CPU pipeline pays'",
        UserWarning,
        stacklevel=4,
    )


@contextmanager
def intra_op_threads(threads: int) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(threads)``, then restore the caller's setting.

    Measuring code (``pipesched.tune``) uses it to time what a pipeline with one
    share of the cores per rank will see, without leaving the process changed:
    a worker thread reads the setting at its first op, so it must be set before
    the threads that measure are started.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
