"""One clock for every rank's records: rank 0's.

Each process times its tasks and transfers with its own ``perf_counter``,
whose origin differs from process to process (and from host to host). To
merge per-rank timelines, every rank measures once, when the pipeline is
built, how far its clock is from rank 0's (:func:`measure_clock_offset`),
and every record it reports or logs is shifted by that offset: the task
records of its report and its transfers here (:func:`shifted`,
:func:`shift_comm`), the logged task events by the runtime, which is
given the offset.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from pipesched.observe.report import CommRecord
from pipesched.plan.record import TaskRecord


def measure_clock_offset(group: Any, rank: int, world: int, global_rank: Callable[[int], int],
                         rounds: int = 16, warmup: int = 4) -> float:
    """This process's ``perf_counter`` minus rank 0's (NTP-style, least-delay sample).

    Every rank's timeline is shifted onto rank 0's clock, so merged
    timelines line up across processes and hosts. The first round trips
    also set up connections and are slow, so ``warmup`` of them are
    discarded; the error of the estimate is at most half the smallest
    round-trip delay seen. ``global_rank`` maps a rank of ``group`` to its
    rank in the world.
    """
    clock = time.perf_counter
    if rank == 0:
        for peer in range(1, world):
            for _ in range(warmup + rounds):
                probe = torch.zeros(1, dtype=torch.float64)
                dist.recv(probe, src=global_rank(peer), group=group, tag=0)
                received = clock()
                dist.send(torch.tensor([received, clock()], dtype=torch.float64),
                          dst=global_rank(peer), group=group, tag=1)
        return 0.0
    best = (float("inf"), 0.0)
    for round_ in range(warmup + rounds):
        t0 = clock()
        dist.send(torch.tensor([t0], dtype=torch.float64), dst=global_rank(0), group=group, tag=0)
        reply = torch.zeros(2, dtype=torch.float64)
        dist.recv(reply, src=global_rank(0), group=group, tag=1)
        t3 = clock()
        t1, t2 = reply.tolist()
        delay = (t3 - t0) - (t2 - t1)
        offset = ((t0 - t1) + (t3 - t2)) / 2
        if round_ >= warmup:
            best = min(best, (delay, offset))
    return best[1]


def shifted(records: list[TaskRecord], offset: float) -> list[TaskRecord]:
    return [TaskRecord(r.rank, r.stage, r.microbatch, r.kind, r.start - offset, r.end - offset) for r in records]


def shift_comm(record: CommRecord, offset: float) -> CommRecord:
    return CommRecord(record.rank, record.peer, record.kind, record.action,
                      record.start - offset, record.end - offset, record.nbytes)
